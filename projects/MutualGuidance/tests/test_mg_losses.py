"""Balanced L1 (Libra R-CNN Eqs. 8-10): hand values, the reference formula, continuity of value and
gradient at |x| = beta."""

from __future__ import annotations

import math

import pytest
import torch

from musu_mg import balanced_l1_b, balanced_l1_loss

from reference_mg import reference_balanced_l1

B = math.e**3 - 1  # alpha 0.5, gamma 1.5: 0.5 ln(b + 1) = 1.5


def test_b_from_gradient_continuity() -> None:
    assert balanced_l1_b(0.5, 1.5) == pytest.approx(B, rel=1e-12)
    for alpha, gamma in ((0.5, 1.5), (0.25, 1.0), (1.0, 0.5)):
        assert alpha * math.log(balanced_l1_b(alpha, gamma) + 1) == pytest.approx(gamma)


@pytest.mark.parametrize(
    "x,expected",
    [
        (0.0, 0.0),
        # 0.5 / b * (0.5 b + 1) * ln(0.5 b + 1) - 0.25
        (0.5, 0.5 / B * (0.5 * B + 1) * math.log(0.5 * B + 1) - 0.25),
        (0.5, 0.4005675),  # the same, evaluated by hand
        (1.0, 1.5 / B + 1.0),  # both branches: gamma + gamma / b - alpha
        (-2.0, 3.0 + 1.5 / B - 0.5),
        (2.0, 2.5785935),
    ],
)
def test_hand_values_beta_1(x: float, expected: float) -> None:
    value = balanced_l1_loss(torch.tensor([x], dtype=torch.float64), 0.5, 1.5, 1.0)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_matches_reference_on_a_grid() -> None:
    x = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)
    for alpha, gamma, beta in ((0.5, 1.5, 0.11), (0.5, 1.5, 1.0), (0.3, 0.9, 0.25)):
        out = balanced_l1_loss(x, alpha, gamma, beta)
        expected = [reference_balanced_l1(v, alpha, gamma, beta) for v in x.tolist()]
        torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.11, 1.0])
def test_continuous_value_and_gradient_at_beta(beta: float) -> None:
    eps = 1e-7
    x = torch.tensor([beta - eps, beta + eps, -beta - eps, 0.0], dtype=torch.float64)
    x.requires_grad_(True)
    loss = balanced_l1_loss(x, 0.5, 1.5, beta)
    loss.sum().backward()
    assert loss[0].item() == pytest.approx(loss[1].item(), abs=1e-6)
    # Gradient alpha ln(b u + 1) -> gamma below beta, exactly gamma above, odd in x, 0 at 0.
    assert x.grad[0].item() == pytest.approx(1.5, abs=1e-5)
    assert x.grad[1].item() == pytest.approx(1.5, abs=1e-12)
    assert x.grad[2].item() == pytest.approx(-1.5, abs=1e-12)
    assert x.grad[3].item() == 0.0
    assert loss[3].item() == 0.0


def test_inliers_get_larger_gradient_than_smooth_l1() -> None:
    # The point of Balanced L1: inliers (|x| < beta) get more gradient than smooth L1's x / beta.
    x = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
    balanced_l1_loss(x, 0.5, 1.5, 1.0).sum().backward()
    assert bool((x.grad > x.detach()).all())


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        balanced_l1_loss(torch.zeros(1), alpha=0.0)
    with pytest.raises(ValueError):
        balanced_l1_loss(torch.zeros(1), beta=-1.0)
