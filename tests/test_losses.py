"""Tests of the MuSu losses: focal terms, Eq. 7 classification loss and weighted GIoU loss.

Values are checked against hand arithmetic and the plain references in ``reference_musu.py``;
gradients with float64 ``gradcheck``; numerical safety at logits of +-50 in float32.

Notation: N images, R anchors, C classes, P box pairs.
"""

from __future__ import annotations

import itertools
import math
from typing import Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musu.modeling.losses import (
    focal_loss_terms,
    musu_classification_loss,
    weighted_giou_loss,
)

from reference_musu import (
    reference_classification_loss,
    reference_focal_terms,
    reference_weighted_giou_loss,
    stable_classification_loss_torch,
)

# ----------------------------------------------------------------------------------------------
# Focal terms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.0), (0.75, 0.0)])
# float32: small terms are compared in absolute terms, at the float32 resolution of O(1) values.
@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float64, 1e-9, 1e-12), (torch.float32, 1e-5, 1e-6)]
)
def test_focal_terms_match_plain_formula(
    alpha: float, gamma: float, dtype: torch.dtype, rtol: float, atol: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    cls_logits = (torch.rand(2, 3, 4, generator=gen, dtype=torch.float64) * 16 - 8).to(dtype)
    obj_logits = (torch.rand(2, 3, generator=gen, dtype=torch.float64) * 16 - 8).to(dtype)
    pos, neg = focal_loss_terms(cls_logits, obj_logits, alpha=alpha, gamma=gamma)
    assert pos.shape == neg.shape == (2, 3, 4)
    expected_pos = torch.empty(2, 3, 4, dtype=torch.float64)
    expected_neg = torch.empty(2, 3, 4, dtype=torch.float64)
    for n, r, c in itertools.product(range(2), range(3), range(4)):
        expected_pos[n, r, c], expected_neg[n, r, c] = reference_focal_terms(
            float(cls_logits[n, r, c]), float(obj_logits[n, r]), alpha, gamma
        )
    torch.testing.assert_close(pos.double(), expected_pos, rtol=rtol, atol=atol)
    torch.testing.assert_close(neg.double(), expected_neg, rtol=rtol, atol=atol)


def test_focal_terms_accept_trailing_unit_objectness_dim() -> None:
    gen = torch.Generator().manual_seed(1)
    cls_logits = torch.randn(2, 5, 3, generator=gen)  # (N, R, C)
    obj_logits = torch.randn(2, 5, generator=gen)  # (N, R)
    flat = focal_loss_terms(cls_logits, obj_logits)
    unit = focal_loss_terms(cls_logits, obj_logits.unsqueeze(-1))  # (N, R, 1)
    for a, b in zip(flat, unit):
        assert a.shape == (2, 5, 3)
        torch.testing.assert_close(a, b)


def test_focal_terms_hand_value() -> None:
    # cls = obj = 0: p = 0.5 * 0.5 = 0.25.
    # FL+ = -0.25 * 0.75^2 * ln(0.25) = 0.140625 * 1.3862944 = 0.1949476
    # FL- = -0.75 * 0.25^2 * ln(0.75) = 0.046875 * 0.2876821 = 0.0134851
    pos, neg = focal_loss_terms(torch.zeros(1, 1), torch.zeros(1))
    torch.testing.assert_close(pos, torch.tensor([[0.19494764]]))
    torch.testing.assert_close(neg, torch.tensor([[0.01348510]]))


# ----------------------------------------------------------------------------------------------
# Classification loss (Eq. 7, summed)
# ----------------------------------------------------------------------------------------------

FL_POS = 0.19494764453248462  # FL+(0.25) with alpha 0.25, gamma 2 (see above)
FL_NEG = 0.01348509714617723  # FL-(0.25)


def one_anchor(target: int, weight: float) -> Tuple[torch.Tensor, ...]:
    """N = R = 1, C = 2, all logits 0 (p = 0.25 for both classes)."""
    return (
        torch.zeros(1, 1, 2),
        torch.zeros(1, 1),
        torch.tensor([[target]]),
        torch.tensor([[weight]]),
    )


@pytest.mark.parametrize(
    "target, weight, expected",
    [
        # target 0, w = 0.5: w * FL+ + (1 - w)^4 * FL- + FL-(class 1)
        #   = 0.5 * 0.1949476 + 0.0625 * 0.0134851 + 0.0134851
        #   = 0.0974738 + 0.0008428 + 0.0134851 = 0.1118017
        (0, 0.5, 0.11180173798405561),
        # w = 1: FL+ + 0 + FL- = 0.1949476 + 0.0134851 = 0.2084327
        (1, 1.0, FL_POS + FL_NEG),
        # w = 0: FL- + FL- (the same as an unassigned anchor)
        (0, 0.0, 2 * FL_NEG),
        # target -1: sum over both classes of FL- = 0.0269702
        (-1, 0.0, 2 * FL_NEG),
    ],
)
def test_classification_loss_hand_value(target: int, weight: float, expected: float) -> None:
    loss = musu_classification_loss(*one_anchor(target, weight))
    assert loss.dim() == 0
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def random_classification_inputs(
    seed: int, num_images: int, num_anchors: int, num_classes: int, dtype: torch.dtype
) -> Tuple[torch.Tensor, ...]:
    """Logits in [-8, 8]; targets in [-1, C); weights in [0, 1] with exact 0s and 1s, 0 at -1."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_images, num_anchors)
    cls_logits = torch.rand(*shape, num_classes, generator=gen, dtype=torch.float64) * 16 - 8
    obj_logits = torch.rand(*shape, generator=gen, dtype=torch.float64) * 16 - 8
    targets = torch.randint(-1, num_classes, shape, generator=gen)
    weights = torch.rand(*shape, generator=gen, dtype=torch.float64)
    weights = torch.where(weights < 0.15, torch.zeros_like(weights), weights)
    weights = torch.where(weights > 0.85, torch.ones_like(weights), weights)
    weights = torch.where(targets < 0, torch.zeros_like(weights), weights)
    return cls_logits.to(dtype), obj_logits.to(dtype), targets, weights.to(dtype)


HYPER = [(0.25, 2.0, 4.0), (0.5, 1.0, 2.0), (0.75, 3.0, 1.0)]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_images=st.integers(1, 3),
    num_anchors=st.integers(1, 8),
    num_classes=st.integers(1, 5),
    hyper=st.sampled_from(HYPER),
    double=st.booleans(),
)
def test_classification_loss_matches_reference(
    seed: int,
    num_images: int,
    num_anchors: int,
    num_classes: int,
    hyper: Tuple[float, float, float],
    double: bool,
) -> None:
    dtype = torch.float64 if double else torch.float32
    inputs = random_classification_inputs(seed, num_images, num_anchors, num_classes, dtype)
    focal_alpha, gamma, beta = hyper
    loss = musu_classification_loss(*inputs, focal_alpha=focal_alpha, gamma=gamma, beta=beta)
    expected = reference_classification_loss(
        *inputs, focal_alpha=focal_alpha, gamma=gamma, beta=beta
    )
    assert loss.dim() == 0
    # float32: absolute tolerance at the resolution of O(1) logits, for small loss sums.
    tol = dict(rel_tol=1e-9, abs_tol=1e-12) if double else dict(rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(float(loss), expected, **tol)


def test_classification_loss_default_hyper_parameters() -> None:
    inputs = random_classification_inputs(3, 2, 6, 4, torch.float64)
    torch.testing.assert_close(
        musu_classification_loss(*inputs),
        musu_classification_loss(*inputs, focal_alpha=0.25, gamma=2.0, beta=4.0),
    )


def test_unassigned_anchors_ignore_weight() -> None:
    # For target -1 Eq. 7 has only the background term: the weight must not matter.
    cls_logits, obj_logits, _, _ = random_classification_inputs(4, 2, 5, 3, torch.float64)
    targets = torch.full((2, 5), -1)
    loss_zero = musu_classification_loss(
        cls_logits, obj_logits, targets, torch.zeros(2, 5).double()
    )
    loss_half = musu_classification_loss(
        cls_logits, obj_logits, targets, torch.full((2, 5), 0.7).double()
    )
    torch.testing.assert_close(loss_zero, loss_half)


def test_zero_weight_equals_unassigned() -> None:
    # w = 0: 0 * FL+ + 1^beta * FL- + background = sum of FL- over all classes.
    cls_logits, obj_logits, targets, _ = random_classification_inputs(5, 2, 5, 3, torch.float64)
    zero = torch.zeros(2, 5, dtype=torch.float64)
    torch.testing.assert_close(
        musu_classification_loss(cls_logits, obj_logits, targets.clamp(min=0), zero),
        musu_classification_loss(cls_logits, obj_logits, torch.full_like(targets, -1), zero),
    )


def test_classification_loss_gradcheck() -> None:
    cls_logits, obj_logits, targets, weights = random_classification_inputs(
        6, 2, 5, 3, torch.float64
    )
    cls_logits.requires_grad_(True)
    obj_logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda c, o: musu_classification_loss(c, o, targets, weights), (cls_logits, obj_logits)
    )


EXTREMES = (-50.0, 0.0, 50.0)


def extreme_inputs() -> Tuple[torch.Tensor, ...]:
    """Every combination of cls logits (C = 2) and obj logit in {-50, 0, 50}, each with targets
    {-1, 0, 1} and weights {0, 0.5, 1}: R = 27 * 3 * 3 = 243 anchors, N = 1, float32."""
    rows = list(itertools.product(EXTREMES, EXTREMES, EXTREMES, (-1, 0, 1), (0.0, 0.5, 1.0)))
    cls_logits = torch.tensor([[c0, c1] for c0, c1, _, _, _ in rows]).unsqueeze(0)  # (1, R, 2)
    obj_logits = torch.tensor([o for _, _, o, _, _ in rows]).unsqueeze(0)  # (1, R)
    targets = torch.tensor([t for _, _, _, t, _ in rows]).unsqueeze(0)  # (1, R)
    weights = torch.tensor([w for *_, w in rows]).unsqueeze(0)  # (1, R)
    return cls_logits, obj_logits, targets, weights


def test_extreme_logits_give_finite_values_and_gradients() -> None:
    cls_logits, obj_logits, targets, weights = extreme_inputs()
    cls_logits.requires_grad_(True)
    obj_logits.requires_grad_(True)
    loss = musu_classification_loss(cls_logits, obj_logits, targets, weights)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(cls_logits.grad).all()
    assert torch.isfinite(obj_logits.grad).all()
    # Anchor by anchor too, so that a failure names the offending logits.
    for r in range(cls_logits.shape[1]):
        c = cls_logits.detach()[:, r : r + 1].clone().requires_grad_(True)
        o = obj_logits.detach()[:, r : r + 1].clone().requires_grad_(True)
        value = musu_classification_loss(c, o, targets[:, r : r + 1], weights[:, r : r + 1])
        value.backward()
        assert torch.isfinite(value), (c, o, targets[:, r], weights[:, r])
        assert torch.isfinite(c.grad).all() and torch.isfinite(o.grad).all(), (c, o)


def test_extreme_logits_values_and_gradients_are_accurate() -> None:
    # Compare with a log-space float64 reference:
    # log p = -softplus(-a) - softplus(-b), log(1 - p) = log(e^-a + e^-b + e^-(a+b)) + log p.
    cls_logits, obj_logits, targets, weights = extreme_inputs()
    cls_logits.requires_grad_(True)
    obj_logits.requires_grad_(True)
    loss = musu_classification_loss(cls_logits, obj_logits, targets, weights)
    loss.backward()

    ref_cls = cls_logits.detach().double().requires_grad_(True)
    ref_obj = obj_logits.detach().double().requires_grad_(True)
    ref = stable_classification_loss_torch(ref_cls, ref_obj, targets, weights)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    # float32 gradients: loose enough for rounding, tight enough for any wrong term or factor.
    torch.testing.assert_close(cls_logits.grad.double(), ref_cls.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(obj_logits.grad.double(), ref_obj.grad, rtol=1e-3, atol=1e-5)


def test_stable_reference_agrees_with_plain_reference() -> None:
    # Check of the test helper itself on moderate logits.
    inputs = random_classification_inputs(7, 2, 6, 3, torch.float64)
    assert math.isclose(
        float(stable_classification_loss_torch(*inputs)),
        reference_classification_loss(*inputs),
        rel_tol=1e-12,
    )


# ----------------------------------------------------------------------------------------------
# Weighted GIoU loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        # identical boxes: GIoU = 1, loss 0
        ([0, 0, 4, 3], [0, 0, 4, 3], 0.0),
        # disjoint unit boxes, gap 1: IoU 0, union 2, hull [0,0,3,1] area 3,
        # GIoU = 0 - (3 - 2) / 3 = -1/3, loss = 4/3
        ([0, 0, 1, 1], [2, 0, 3, 1], 4 / 3),
        # inter 1, union 4 + 4 - 1 = 7, hull 3*3 = 9: GIoU = 1/7 - 2/9 = -5/63, loss = 68/63
        ([0, 0, 2, 2], [1, 1, 3, 3], 68 / 63),
        # target inside pred: IoU 4/16, hull = union = 16, GIoU = 1/4, loss = 3/4
        ([0, 0, 4, 4], [1, 1, 3, 3], 0.75),
        # far apart: IoU 0, union 2, hull [0,0,11,11] area 121: GIoU = -119/121, loss = 240/121
        ([0, 0, 1, 1], [10, 10, 11, 11], 240 / 121),
    ],
)
def test_giou_loss_hand_values(pred, target, expected: float) -> None:
    loss = weighted_giou_loss(
        torch.tensor([pred], dtype=torch.float32),
        torch.tensor([target], dtype=torch.float32),
        torch.ones(1),
    )
    assert loss.dim() == 0
    assert math.isclose(float(loss), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_giou_loss_is_weighted_sum() -> None:
    # 0.5 * 4/3 + 2 * 68/63 + 0 * 3/4 = 2/3 + 136/63 = 178/63
    pred = torch.tensor([[0.0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 4, 4]])
    target = torch.tensor([[2.0, 0, 3, 1], [1, 1, 3, 3], [1, 1, 3, 3]])
    loss = weighted_giou_loss(pred, target, torch.tensor([0.5, 2.0, 0.0]))
    assert math.isclose(float(loss), 178 / 63, rel_tol=1e-5)


def test_giou_loss_of_no_boxes_is_zero() -> None:
    loss = weighted_giou_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0))
    assert float(loss) == 0.0


def random_boxes(gen: torch.Generator, count: int) -> torch.Tensor:
    """(count, 4) XYXY float64 boxes with corners in [0, 10] and sides in [0.5, 5.5]."""
    xy = torch.rand(count, 2, generator=gen, dtype=torch.float64) * 10
    wh = torch.rand(count, 2, generator=gen, dtype=torch.float64) * 5 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 12))
def test_giou_loss_matches_reference(seed: int, count: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pred, target = random_boxes(gen, count), random_boxes(gen, count)
    weights = torch.rand(count, generator=gen, dtype=torch.float64)
    expected = reference_weighted_giou_loss(pred, target, weights)
    assert math.isclose(
        float(weighted_giou_loss(pred, target, weights)), expected, rel_tol=1e-6, abs_tol=1e-9
    )
    loss32 = weighted_giou_loss(pred.float(), target.float(), weights.float())
    assert math.isclose(float(loss32), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_giou_loss_gradcheck() -> None:
    gen = torch.Generator().manual_seed(8)
    pred, target = random_boxes(gen, 6), random_boxes(gen, 6)
    weights = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    # Continuous random boxes: no coordinate ties, so GIoU is smooth around these inputs.
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: weighted_giou_loss(p, target, weights), (pred,))
