"""MC dropout reproducible whatever `--mc-batch` (issue 18.4): sample k of model m on case c draws its masks on tile t
from a generator seeded by (seed, case, m, k, t), so batches of 1, 3 and 8 samples give identical outputs on the CPU.
Real members trained by `nnUNetv2_train`: nnU-Net's U-Net with dropout (one forward pass per batch) and XBoundNet++
(its deterministic prefix once per tile, the dropout suffix on the batch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_kaz.inference import UncertaintyPredictor, parse_member
from nnunet_kaz.inference.sliding_window import seeded_dropout

DROPOUT, XBOUND = "nnUNetTrainerDropout_p02_debug", "XBoundNetTrainer_debug"


def _generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.mark.parametrize("cls", [nn.Dropout, nn.Dropout2d, nn.Dropout3d])
def test_seeded_dropout_is_torch_dropout_with_per_item_masks(cls):
    """Reference: torch's own module on the same input. Every output value is 0 or x / (1 - p) as torch's; channel
    dropout drops whole channels; the drop rate is p; item b depends on generators[b] only."""
    p = 0.3
    module = cls(p).train()
    x = torch.randn(4, 6, 8, 10, 12) + 3.0  # no zeros in x; 5D: the 3D layout
    ours = seeded_dropout(module, x.clone(), _generators(4))
    torch.manual_seed(0)
    theirs = module(x.clone())
    for out in (ours, theirs):
        kept = out != 0
        torch.testing.assert_close(out[kept], x[kept] / (1 - p))
        if cls is not nn.Dropout:  # a channel is dropped or kept as a whole
            flat = kept.reshape(4, 6, -1)
            assert bool((flat.all(-1) | ~flat.any(-1)).all())
    assert abs(float((ours == 0).double().mean()) - p) < (0.03 if cls is nn.Dropout else 0.2)
    # item 2 alone, from its own generator, is item 2 of the batch
    alone = seeded_dropout(module, x[2:3].clone(), _generators(1, offset=2))
    assert torch.equal(alone[0], ours[2])
    assert not torch.equal(ours[0] != 0, ours[1] != 0)
    assert torch.equal(seeded_dropout(module.eval(), x, _generators(4)), x)  # eval mode: the identity


@pytest.mark.parametrize("cls", [nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_seeded_alpha_dropout_uses_torchs_affine_constants(cls):
    """Reference: torch's alpha dropout output, from which its constants are read off (dropped value -alpha a (1-p)
    and kept a x + alpha a p: each a single affine map of x), compared with ours on the same x."""
    p = 0.25
    module = cls(p).train()
    x = torch.randn(3, 40, 8, 8, dtype=torch.float64)  # 120 channels: some dropped for sure (0.75^120)
    ours = seeded_dropout(module, x.clone(), _generators(3))
    torch.manual_seed(1)
    theirs = module(x.clone())

    def constants(out):
        values, counts = out.unique(return_counts=True)
        dropped = values[counts.argmax()]  # the one value every dropped element gets
        kept = out != dropped
        slope, intercept = np.polyfit(x[kept].numpy(), out[kept].numpy(), 1)
        return float(dropped), slope, intercept

    np.testing.assert_allclose(constants(ours), constants(theirs), rtol=1e-9)


@pytest.fixture(scope="module")
def members(tiny_kaz):
    return {name: parse_member(f"{tiny_kaz.train(name)}:0") for name in (DROPOUT, XBOUND)}


def _record_masks(predictor):
    """Hooks on every dropout module: per call, item by item, which inputs the dropout zeroed (and where the input
    was non-zero, so that the mask is readable from the output)."""
    from nnunet_kaz.inference.sliding_window import dropout_modules

    calls = []

    def hook(module, inputs, output):
        calls.append(((output == 0) & (inputs[0] != 0), inputs[0] != 0))

    handles = [m.register_forward_hook(hook) for model in predictor.models for m in dropout_modules(model.network)]
    return calls, handles


def _per_sample(calls, chunks):
    """Calls of batches `chunks` (one pass over every tile per chunk) -> per sample k its calls' masks."""
    n = len(calls) // len(chunks)
    samples = []
    for c, b in enumerate(chunks):
        samples += [[(dropped[j], readable[j]) for dropped, readable in calls[c * n:(c + 1) * n]] for j in range(b)]
    return samples


@pytest.mark.integration
@pytest.mark.parametrize("trainer, mirror", [(DROPOUT, False), (XBOUND, True)])
def test_mc_outputs_do_not_depend_on_the_mc_batch(tiny_kaz, members, trainer, mirror):
    """Batches of 1, 3 (uneven: 3 + 3 + 2) and 8 samples draw identical masks for every sample (exact), and give
    the same mean, variance, entropy, MI and scores within float rounding (CPU convolutions of a batch of 8 round
    differently from a batch of 1, ~1e-5 in the logits, which may flip a float16 rounding of a stitched logit);
    torch's global seed plays no part; another seed gives other samples, far outside that rounding."""
    image = [str(sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0])]
    results, masks = {}, {}
    for batch, global_seed, chunks in ((1, 0, [1] * 8), (3, 1, [3, 3, 2]), (8, 2, [8])):
        torch.manual_seed(global_seed)
        predictor = UncertaintyPredictor([members[trainer]], mc=8, mc_batch=batch, mirror=mirror, device="cpu",
                                         seed=3, verbose=False)
        data, props = predictor.preprocess(image)
        calls, handles = _record_masks(predictor)
        results[batch] = predictor.finalize(predictor.sample_case(data, "case_a"), props)
        for h in handles:
            h.remove()
        masks[batch] = _per_sample(calls, chunks)
    ref = results[1]
    assert ref["variance"].max() > 1e-4  # the samples differ: a trivial pass is ruled out
    assert len(masks[1]) == 8 and len(masks[1][0]) > 0
    assert not torch.equal(masks[1][0][0][0], masks[1][1][0][0])
    for batch in (3, 8):
        for k in range(8):
            for (dropped, readable), (dropped_ref, readable_ref) in zip(masks[batch][k], masks[1][k], strict=True):
                both = readable & readable_ref
                assert torch.equal(dropped[both], dropped_ref[both]), (batch, k)
        for key in ("probabilities", "variance", "entropy", "mutual_information"):
            # A ~1e-5 logit difference can flip one float16 rounding of a stitched logit (ulp 2^-8 at |logit| in
            # [2, 4)): one sample's probability moves by <= 0.25 * 2^-8 / 8 = 1.2e-4 in the mean, more in
            # entropy and MI near p = 0 or 1 (their slope log((1 - p) / p)). So: a rare flip is allowed up to
            # 2e-3 (still far below the 1e-2 another seed makes), and nearly every voxel agrees to 1e-4.
            diff = np.abs(results[batch][key] - ref[key])
            assert diff.max() <= 2e-3, (batch, key, diff.max())
            assert (diff > 1e-4).mean() <= 0.01, (batch, key, (diff > 1e-4).mean())
        for row, row_ref in zip(results[batch]["scores"], ref["scores"]):
            assert row.keys() == row_ref.keys()
            for k, v in row_ref.items():
                if isinstance(v, float):
                    # counts (sample volumes, the p >= 0.5 region) move by one voxel on such a flip: 1/count
                    np.testing.assert_allclose(row[k], v, rtol=2e-2, atol=1e-6, err_msg=f"{batch} {k}")
                else:
                    assert row[k] == v
    other = UncertaintyPredictor([members[trainer]], mc=8, mc_batch=8, mirror=mirror, device="cpu", seed=4,
                                 verbose=False)
    data, props = other.preprocess(image)
    moved = other.finalize(other.sample_case(data, "case_a"), props)["probabilities"]
    assert np.abs(moved - ref["probabilities"]).max() > 1e-2


@pytest.mark.parametrize("row", [0, 37])
def test_float16_overflow_anywhere_in_the_stitched_logits_is_an_error(row):
    """The stitched logits are float16 (as nnU-Net's): a logit above 65504 becomes inf and is refused, wherever it
    lies (the check runs slab by slab over the first spatial axis)."""
    from nnunet_kaz.inference.sliding_window import predict_samples

    class Spike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.cat([x, -x], 1) * self.w

    data = torch.zeros((1, 40, 128, 128))  # slabs of 16 rows: row 37 lies in the last, partial one
    assert predict_samples(Spike(), data, (40, 128, 128), 2, 1).isfinite().all()
    data[0, row, 3, 3] = 1e6
    with pytest.raises(RuntimeError, match="float16 overflow"):
        predict_samples(Spike(), data, (40, 128, 128), 2, 1)
