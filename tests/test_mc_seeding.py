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


U32 = 2.0 ** -24  # float32 unit roundoff


def _binary_entropy_bits(d: float) -> float:
    return float(-(d * np.log2(d) + (1 - d) * np.log2(1 - d)))


@pytest.mark.integration
@pytest.mark.parametrize("trainer, mirror", [(DROPOUT, False), (XBOUND, True)])
def test_mc_outputs_do_not_depend_on_the_mc_batch(tiny_kaz, members, trainer, mirror, monkeypatch):
    """Batches of 1, 3 (uneven: 3 + 3 + 2) and 8 samples draw identical masks for every sample and give every
    sample identical stitched logits (exact); the outputs then differ only by how the float32 accumulators group
    the samples, within bounds argued below; torch's global seed plays no part; another seed gives other samples.

    oneDNN is off here (`torch.backends.mkldnn.flags(enabled=False)`), which is what made the test need rtol 2e-2:
    oneDNN's CPU convolutions round a batch of 8 differently from a batch of 1 (~1e-5 in a logit, measured up to
    2e-3 in the float16 stitched logits of these members), which flips float16 roundings of stitched logits, so a
    sample's mask can gain or lose a voxel and count-based scores move by 1/count. That rounding belongs to the
    convolution library, not to the seeding; torch's own convolution computes each sample alone, so equal inputs
    and masks give equal logits whatever the batch."""
    import nnunet_kaz.inference.predictor as predictor_module

    image = [str(sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0])]
    own = predictor_module.predict_samples
    results, masks, logits = {}, {}, {}
    for batch, global_seed, chunks in ((1, 0, [1] * 8), (3, 1, [3, 3, 2]), (8, 2, [8])):
        torch.manual_seed(global_seed)
        predictor = UncertaintyPredictor([members[trainer]], mc=8, mc_batch=batch, mirror=mirror, device="cpu",
                                         seed=3, verbose=False)
        data, props = predictor.preprocess(image)
        calls, handles = _record_masks(predictor)
        stitched = []

        def recording(*args, emit=None, **kwargs):  # the stitched float16 logits of each batch, slab by slab
            parts = []

            def keep(rows, part):
                parts.append(part.clone())
                emit(rows, part)
            out = own(*args, emit=keep, **kwargs)
            stitched.append(torch.cat(parts, 2))
            return out

        monkeypatch.setattr(predictor_module, "predict_samples", recording)
        with torch.backends.mkldnn.flags(enabled=False):
            results[batch] = predictor.finalize(predictor.sample_case(data, "case_a"), props)
        for h in handles:
            h.remove()
        masks[batch], logits[batch] = _per_sample(calls, chunks), torch.cat(stitched)
    ref = results[1]
    assert ref["variance"].max() > 1e-4  # the samples differ: a trivial pass is ruled out
    assert len(masks[1]) == 8 and len(masks[1][0]) > 0
    assert not torch.equal(masks[1][0][0][0], masks[1][1][0][0])
    n, classes = 8, ref["probabilities"].shape[0]
    assert classes == 2 and logits[1].shape[0] == n  # the bounds below are for two classes
    # Bounds (u = 2^-24, N = 8 samples, probabilities in [0, 1]): one Chan update of b samples rounds the running
    # mean by <= (b + 4) u (the batch mean b u, then four operations), earlier errors shrink by (1 - b/n), so a
    # run's mean is off by <= 5 N u and two runs differ by <= 10 N u; the renormalisation p / sum(p) at export
    # adds twice that: probabilities <= 30 N u. The sums of squares: <= (5 b^2 + 8 b) u per update, (5 N + 8) N u
    # over a run, / N: variance <= 2 (5 N + 8) u. Entropy (two classes: the binary entropy in bits) moves by at
    # most h(d) for a probability change d (the binary entropy is its own modulus of continuity). The mean sample
    # entropy's float32 sums of p ln p (terms <= 1/e) differ by <= 2 (N - 1) u N / e, / N, per class, / ln 2.
    d_p = 30 * n * U32
    d_var = 2 * (5 * n + 8) * U32
    d_h = _binary_entropy_bits(d_p)
    d_u = 2 * (n - 1) * U32 / np.e                       # U = -(1/N) sum p ln p of one class, nats
    tolerance = {"probabilities": d_p, "variance": d_var, "entropy": d_h,
                 "mutual_information": d_h + classes * d_u / np.log(2)}
    # masks of the mean (p > 0.5, p >= 0.5) are the same in every run when no mean lies within d_p of 0.5
    assert (np.abs(ref["probabilities"] - 0.5) > d_p).all()
    for batch in (3, 8):
        assert torch.equal(logits[batch], logits[1]), batch
        for k in range(8):
            for (dropped, readable), (dropped_ref, readable_ref) in zip(masks[batch][k], masks[1][k], strict=True):
                both = readable & readable_ref
                assert torch.equal(dropped[both], dropped_ref[both]), (batch, k)
        for key, tol in tolerance.items():
            diff = np.abs(results[batch][key] - ref[key])
            assert diff.max() <= tol, (batch, key, diff.max(), tol)
        for row, row_ref in zip(results[batch]["scores"], ref["scores"]):
            assert row.keys() == row_ref.keys()
            for k, v in row_ref.items():
                if k in ("cv", "pairwise_dice", "pairwise_dice_pooled") or not isinstance(v, float):
                    assert row[k] == v or (np.isnan(row[k]) and np.isnan(v)), (batch, k)  # counts: identical
                elif k == "labelled_uncertainty":  # the mean of U over the same voxels
                    assert abs(row[k] - v) <= d_u, (batch, k)
                else:  # mean entropy, Rel-UNet scores: sum of entropies over the same voxels / the same count
                    assert abs(row[k] - v) <= abs(v) * d_h / row_ref["mean_entropy"], (batch, k)
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
