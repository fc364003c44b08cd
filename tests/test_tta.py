"""`predict --tta`: each of nnU-Net's mirror flips a sample of its own, in the MC accumulators (issue 25 item 6).

References are nnU-Net's own sliding window (`nnUNetPredictor.predict_sliding_window_return_logits`): mirrored
(its within-sample average of the flips' logits), and one flip at a time (the network wrapped to flip its input
and output, mirroring off), on a test image of the patch size and on one that is not (padding, several tiles)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nnunet_kaz.inference import UncertaintyPredictor, parse_member
from nnunet_kaz.inference.sliding_window import tta_flips
from tests.conftest import run

pytestmark = pytest.mark.integration

PLAIN = "nnUNetTrainer_debug"
DROPOUT = "nnUNetTrainerDropout_p02_debug"
SIGMOID_CURVATURE = 1 / (6 * np.sqrt(3))  # max |sigma''(z)| of the logistic function
HALF_ULP = 2.0 ** -11                     # float16 relative rounding of a normal number
HALF_SUBNORMAL = 2.0 ** -25               # float16 absolute rounding below 2^-14 (half the subnormal spacing)


class Flipped(torch.nn.Module):
    """A network that sees its input flipped along `axes` and flips its output back: one test-time flip."""

    def __init__(self, net, axes):
        super().__init__()
        self.net, self.axes = net, [a + 2 for a in axes]

    def forward(self, x):
        if not self.axes:
            return self.net(x)
        return torch.flip(self.net(torch.flip(x, self.axes)), self.axes)


def nnunet_logits(predictor: UncertaintyPredictor, data: torch.Tensor, flip=None) -> np.ndarray:
    """nnU-Net's sliding-window logits of our loaded network: mirrored (flip None) or of one flip."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    net = predictor.network(0)
    ref = nnUNetPredictor(tile_step_size=0.5, use_mirroring=flip is None, perform_everything_on_device=False,
                          device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    ref.manual_initialization(net if flip is None else Flipped(net, flip), predictor.plans_manager,
                              predictor.configuration_manager, None, predictor.dataset_json, PLAIN, net.mirror_axes)
    return ref.predict_sliding_window_return_logits(data).float().numpy()


@pytest.fixture(scope="module")
def images(tiny_kaz, tmp_path_factory):
    """One test image of the patch size (32 x 32) and one that is not (45 x 27: padded, two tiles)."""
    first = sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]
    odd = tmp_path_factory.mktemp("odd") / "odd_0000.png"
    Image.open(first).resize((27, 45), Image.BILINEAR).save(odd)
    return [first, odd]


def stitch_weights(predictor: UncertaintyPredictor, data: torch.Tensor) -> np.ndarray:
    """The summed Gaussian tile weights w of every voxel, as nnU-Net stitches (padding, its tiles, its Gaussian)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = predictor.configuration_manager.patch_size
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    ref = nnUNetPredictor(tile_step_size=0.5, device=torch.device("cpu"), verbose=False)
    ref.configuration_manager = predictor.configuration_manager
    g = compute_gaussian(tuple(patch), 1 / 8, 10, device=torch.device("cpu")).double()
    w = torch.zeros(padded.shape[1:], dtype=torch.float64)
    for sl in ref._internal_get_sliding_window_slicers(padded.shape[1:]):
        w[sl[1:]] += g
    return w[tuple(revert[1:])].numpy()


def stitch_error(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bound on the float16 error of a stitched logit z at total tile weight w: z g summed over <= 4 tiles into a
    float16 sum, then divided by the float16 weight: at most 6 roundings, each 2^-11 relative (normal numbers) or
    2^-25 absolute (subnormals: the Gaussian falls to ~1e-7 at the tile corners, where z g and w are subnormal),
    the absolute ones amplified by the division by w."""
    return 6 * HALF_ULP * np.abs(z) + 6 * HALF_SUBNORMAL * (1 + np.abs(z)) / w


def recording_stats(captured: list, transform):
    """StreamingStats that records `transform(logits, nonlin)` of every sample batch: the stitched logits arrive
    slab by slab (issue 23.7), so each batch is a list of slabs along the first spatial axis."""
    from nnunet_kaz.uncertainty.streaming import StreamingStats

    class Recording(StreamingStats):
        def batch(self, b, nonlin):
            sink, parts = super().batch(b, nonlin), []
            captured.append(parts)
            slab = sink.slab

            def recording_slab(rows, part):
                parts.append(transform(part, nonlin).detach().double().cpu().numpy().copy())
                return slab(rows, part)

            sink.slab = recording_slab
            return sink

    return Recording


def softmax(z):
    e = np.exp(z - z.max(0))
    return e / e.sum(0)


def test_tta_flips_are_nnunets_and_their_mean_and_variance(tiny_kaz, images, monkeypatch):
    """The streamed flips are nnU-Net's (identical to its one-flip passes), and their mean logit equals nnU-Net's
    mirrored logit within the float16 stitching error (`stitch_error`: the flips are stitched one by one, nnU-Net
    stitches their fp32 average); the variance of the flips' probabilities equals the one of nnU-Net's individual
    flipped passes; and the TTA probability (the mean of the flips' softmax) differs from nnU-Net's mirrored
    probability (the softmax of the mean logit) by at most the Jensen gap of the logistic: for two classes
    p = sigma(d), d = z1 - z0, and |mean_f sigma(d_f) - sigma(mean_f d_f)| <= max|sigma''| / 2 Var_f(d) =
    0.0481 Var_f(d) (Taylor with remainder), plus the stitching errors of the d's times max sigma' = 1/4."""
    import nnunet_kaz.inference.predictor as predictor_module

    captured = []


    monkeypatch.setattr(predictor_module, "StreamingStats", recording_stats(captured, lambda z, nonlin: z))
    member = parse_member(f"{tiny_kaz.train(PLAIN)}:0")
    tta = UncertaintyPredictor([member], device="cpu", verbose=False, tta=True, mirror=True)
    assert not tta.mirror and tta.flips(0) == [(), (0,), (1,), (0, 1)]   # 2D: 4 flips, mirroring off
    worst_gap = 0.0
    for image in images:
        data, _ = tta.preprocess([str(image)])
        captured.clear()
        stats = tta.sample_case(data, image.stem)
        ours = np.concatenate([np.concatenate(p, axis=2) for p in captured])[:, :, 0]  # (4 flips, C, H, W)
        assert stats.n_samples == 4 and ours.shape[0] == 4
        mirrored = nnunet_logits(tta, data)[:, 0]
        flips = np.stack([nnunet_logits(tta, data, f)[:, 0] for f in tta_flips(tta.network(0).mirror_axes)])
        w = stitch_weights(tta, data)[0]
        tol = stitch_error(ours, w).mean(0) + stitch_error(mirrored, w)
        assert (np.abs(ours.mean(0) - mirrored) <= tol).all()
        np.testing.assert_allclose(ours, flips, atol=1e-6)         # the same flips, one at a time
        p_flips = np.stack([softmax(z) for z in flips])
        assert np.abs(stats.variance[:, 0] - p_flips.var(0)).max() < 1e-5
        assert stats.variance.max() > 1e-3                          # the flips disagree somewhere
        np.testing.assert_allclose(stats.mean[:, 0], p_flips.mean(0), atol=1e-5)
        d = flips[:, 1] - flips[:, 0]
        rounding = (stitch_error(flips, w).sum(1).mean(0) + stitch_error(mirrored, w).sum(0)) / 4
        bound = SIGMOID_CURVATURE / 2 * d.var(0) + rounding + 1e-6
        gap = np.abs(stats.mean[1, 0] - softmax(mirrored)[1])
        assert (gap <= bound).all()
        worst_gap = max(worst_gap, float(gap.max()))
    assert worst_gap > 1e-5  # averaging probabilities is not averaging logits: the bound is doing work


def test_predict_tta_cli_combines_with_mc_and_writes_its_samples(tiny_kaz, tmp_path, monkeypatch):
    """`predict --tta --mc 2`: members x MC x flips samples (n_samples 8 per member), the identity flip's masks are
    plain MC's (key (seed, case, m, k)), predict_args.json says tta; stock mirroring is the reference for the mean
    of the probabilities of a deterministic model (checked above), here the CLI and the scores."""
    import json

    import pandas as pd

    import nnunet_kaz.inference.predictor as predictor_module

    folder = tiny_kaz.train(DROPOUT)
    out = tmp_path / "tta"
    run(["nnunet-kaz", "predict", "-i", str(tiny_kaz.raw / "imagesTs"), "-o", str(out), "-m", f"{folder}:0",
         "--mc", "2", "--tta", "-device", "cpu"], tiny_kaz.env)
    scores = pd.read_csv(out / "scores.csv")
    assert (scores["n_samples"] == 8).all() and (scores["n_members"] == 1).all()
    args = json.loads((out / "predict_args.json").read_text())
    assert args["tta"] and not args["mirror"] and args["tta_flips"] == [[], [0], [1], [0, 1]]
    unc = np.load(sorted(out.glob("*_uncertainty.npz"))[0])
    assert unc["variance"].max() > 0 and unc["mutual_information"].max() > 0
    # seeded like MC samples: the identity flip of TTA x MC draws plain MC's masks
    captured = []

    monkeypatch.setattr(predictor_module, "StreamingStats", recording_stats(captured, lambda z, nonlin: nonlin(z)))
    member = parse_member(f"{folder}:0")
    image = [str(sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0])]
    mc = UncertaintyPredictor([member], mc=2, device="cpu", verbose=False, seed=3, mirror=False)
    data, _ = mc.preprocess(image)
    plain = mc.sample_case(data, "c").mean
    captured.clear()
    UncertaintyPredictor([member], mc=2, device="cpu", verbose=False, seed=3, tta=True).sample_case(data, "c")
    samples = np.concatenate([np.concatenate(p, axis=2) for p in captured])
    assert samples.shape[0] == 8
    np.testing.assert_allclose(samples[:2].mean(0), plain, atol=1e-6)
    assert not np.allclose(samples[2], samples[0], atol=1e-4)  # another flip: another sample
