"""LogDice + CE (paper 000 eq. 1) against a hand computation."""
import math

import pytest
import torch

from nnunet_kaz.trainers.losses import build_logdice_ce_loss


def _hand_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> float:
    """Plain-Python computation on a (1, 2, 2, 2) tensor: per-image soft Dice of class 1, CE averaged over pixels."""
    p = torch.softmax(logits, 1)[0].tolist()
    y = target[0, 0].tolist()
    inter = sum(p[1][i][j] * (y[i][j] == 1) for i in range(2) for j in range(2))
    sum_p = sum(p[1][i][j] for i in range(2) for j in range(2))
    sum_y = sum(y[i][j] == 1 for i in range(2) for j in range(2))
    dice = (2 * inter + 1e-5) / (sum_p + sum_y + 1e-5)
    ce = -sum(math.log(p[int(y[i][j])][i][j]) for i in range(2) for j in range(2)) / 4
    return alpha * -math.log(dice) + (1 - alpha) * ce


@pytest.mark.parametrize("alpha", [0.7, 0.3, 1.0])
def test_logdice_ce_matches_hand_computation(alpha):
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]], [[-1.0, 1.5], [0.2, 3.0]]]])
    target = torch.tensor([[[[0, 1], [1, 1]]]], dtype=torch.float32)
    loss = build_logdice_ce_loss(has_regions=False, batch_dice=False, alpha=alpha)
    assert loss(logits, target).item() == pytest.approx(_hand_loss(logits, target, alpha), rel=1e-5)


def test_logdice_regions_uses_bce():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum() + 1e-5) / (p.sum() + target.sum() + 1e-5)
    bce = torch.nn.functional.binary_cross_entropy(p, target)
    expected = 0.7 * -torch.log(dice) + 0.3 * bce
    loss = build_logdice_ce_loss(has_regions=True, batch_dice=False, alpha=0.7)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_logdice_is_finite_when_all_wrong():
    logits = torch.tensor([[[[50.0, 50.0]], [[-50.0, -50.0]]]])
    target = torch.ones(1, 1, 1, 2)
    value = build_logdice_ce_loss(False, False)(logits, target)
    assert torch.isfinite(value)


def test_alpha_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        build_logdice_ce_loss(False, False, alpha=1.5)


def test_deep_supervision_weights_as_nnunet_and_a_single_output_is_kept():
    import numpy as np
    import torch

    from nnunet_kaz.trainers.losses import build_logdice_ce_loss
    from nnunet_kaz.trainers.xboundnet_trainer import wrap_deep_supervision

    base = build_logdice_ce_loss(False, False)
    three = wrap_deep_supervision(base, 3, is_ddp=False, compiled=False)
    np.testing.assert_allclose(three.weight_factors, np.array([1, 0.5, 0]) / 1.5)  # nnUNetTrainer._build_loss
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    single = wrap_deep_supervision(base, 1, is_ddp=False, compiled=False)  # a two-stage network: one output
    value = single([logits], [target])
    assert torch.isfinite(value) and torch.allclose(value, base(logits, target))
