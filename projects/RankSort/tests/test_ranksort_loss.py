"""Tests of the vectorized Rank & Sort loss and its identity-update gradients.

References: the supplement's Figure S1 example (values and hand-derived Eq. S7 / S16 gradients)
and a plain double loop over examples that builds the primary terms L_ij (Eq. S4) and applies
Eq. S2 directly. Notation: K examples, P positives.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import musu_ranksort.rank_sort as rs_module
from musu_ranksort import rank_sort_loss
from musu_ranksort.rank_sort import rank_sort_errors, smoothed_step, step_sums

FIG_S1_LOGITS = [3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]
FIG_S1_LABELS = [0.9, 0.4, 0.0, 0.0, 0.8, 0.0, 0.1, 0.0]


def step(x: float, delta: float) -> float:
    if x < -delta:
        return 0.0
    if x > delta:
        return 1.0
    return x / (2 * delta) + 0.5


def reference_rank_sort(
    logits: List[float], labels: List[float], positive: List[bool], delta: float
) -> Tuple[float, List[float]]:
    """Loss and Eq. S2 gradients from explicit primary terms L_ij, one pair at a time."""
    k = len(logits)
    pos = [i for i in range(k) if positive[i]]
    neg = [i for i in range(k) if not positive[i]]
    if not pos:
        return 0.0, [0.0] * k
    primary = [[0.0] * k for _ in range(k)]  # primary[i][j] = L_ij
    total = 0.0
    for i in pos:
        false_pos = sum(step(logits[j] - logits[i], delta) for j in neg)
        rank_pos, sort_sum, lower_den = 1.0, 1.0 - labels[i], 0.0  # i counts itself once
        target_num, target_den = 1.0 - labels[i], 1.0
        for j in pos:
            if j == i:
                continue
            h = step(logits[j] - logits[i], delta)
            rank_pos += h
            sort_sum += h * (1.0 - labels[j])
            if labels[j] >= labels[i]:
                target_num += h * (1.0 - labels[j])
                target_den += h
            else:
                lower_den += h
        ranking = false_pos / (false_pos + rank_pos)
        sorting_loss = sort_sum / rank_pos - target_num / target_den
        total += ranking + sorting_loss
        for j in neg:
            if false_pos > 0:
                primary[i][j] = ranking * step(logits[j] - logits[i], delta) / false_pos
        for j in pos:
            if j != i and labels[j] < labels[i] and lower_den > 0:
                primary[i][j] = sorting_loss * step(logits[j] - logits[i], delta) / lower_den
    grads = []
    for m in range(k):
        incoming = sum(primary[i][m] for i in range(k))
        outgoing = sum(primary[m][j] for j in range(k))
        grads.append((incoming - outgoing) / len(pos))
    return total / len(pos), grads


def run(logits, labels, positive=None, delta=0.5, dtype=torch.float64):
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    y = torch.tensor(labels, dtype=dtype)
    mask = None if positive is None else torch.tensor(positive, dtype=torch.bool)
    loss = rank_sort_loss(x, y, mask, delta)
    loss.backward()
    return loss.detach(), x.grad


def test_figure_s1_errors_and_loss() -> None:
    """Figure S1 (positives 0, 1, 4, 6). The figure prints 0.38 for both the current and the
    target sorting error of positive 6; by the definitions they are both 0.45: the positives
    at or above it are 0, 1, 4 and itself, l_S(6) = (0.1 + 0.6 + 0.2 + 0.9) / 4 = 0.45, and
    all four have y >= 0.1, so l*_S(6) is the same average. Its sorting loss (0) is unchanged."""
    logits = torch.tensor(FIG_S1_LOGITS, dtype=torch.float64)
    labels = torch.tensor(FIG_S1_LABELS, dtype=torch.float64)
    pos = labels > 0
    ranking, sorting, target, _, _ = rank_sort_errors(logits[pos], labels[pos], logits[~pos], 0.5)
    torch.testing.assert_close(ranking, torch.tensor([0.0, 0.0, 0.4, 3 / 7], dtype=torch.float64))
    torch.testing.assert_close(sorting, torch.tensor([0.1, 0.35, 0.3, 0.45], dtype=torch.float64))
    torch.testing.assert_close(target, torch.tensor([0.1, 0.35, 0.15, 0.45], dtype=torch.float64))
    torch.testing.assert_close(
        sorting - target, torch.tensor([0.0, 0.0, 0.15, 0.0], dtype=torch.float64)
    )
    loss, _ = run(FIG_S1_LOGITS, FIG_S1_LABELS)
    assert loss.item() == pytest.approx((0.55 + 3 / 7) / 4, abs=1e-12)


def test_figure_s1_gradients_by_hand() -> None:
    """Eq. S7 for negatives, S16 for positives, |P| = 4.
    Negatives: 2 and 3 lie above positive 4 (p_R = 1/2 each) and 6 (1/3 each); 5 only above 6;
    7 below all. Positive 1 is the only positive above 4 with a lower label: p_S(1|4) = 1."""
    expected = [
        0.0,  # 0: no loss, nothing above it with a lower label
        0.15 / 4,  # 1: receives 4's sorting loss
        (0.4 / 2 + (3 / 7) / 3) / 4,  # 2
        (0.4 / 2 + (3 / 7) / 3) / 4,  # 3
        -(0.4 + 0.15) / 4,  # 4: -(l_RS - l*_RS)
        ((3 / 7) / 3) / 4,  # 5
        -(3 / 7) / 4,  # 6
        0.0,  # 7
    ]
    _, grad = run(FIG_S1_LOGITS, FIG_S1_LABELS)
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64))
    assert grad[1] > 0  # the sorting objective pushes down the worse-localised positive 1


finite_logit = st.floats(-4.0, 4.0, allow_nan=False).map(lambda v: round(v * 4) / 4)  # ties
label_value = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 1.0])


@st.composite
def rs_inputs(draw):
    k = draw(st.integers(1, 14))
    logits = draw(st.lists(finite_logit, min_size=k, max_size=k))
    labels = draw(st.lists(label_value, min_size=k, max_size=k))
    positive = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    delta = draw(st.sampled_from([0.5, 0.25, 1.0, 2.0]))
    return logits, labels, positive, delta


@settings(max_examples=150, deadline=None)
@given(rs_inputs())
def test_matches_loop_reference(inputs) -> None:
    """Loss and gradients equal the pairwise loop (explicit masks, label-0 positives, ties)."""
    logits, labels, positive, delta = inputs
    loss, grad = run(logits, labels, positive, delta)
    ref_loss, ref_grad = reference_rank_sort(logits, labels, positive, delta)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(rs_inputs())
def test_default_positives_are_positive_labels(inputs) -> None:
    logits, labels, _, delta = inputs
    loss, grad = run(logits, labels, None, delta)
    ref_loss, ref_grad = reference_rank_sort(logits, labels, [y > 0 for y in labels], delta)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 300), st.sampled_from([0.5, 0.1, 1.0]))
def test_identity_update_gradients_sum_to_zero(seed: int, k: int, delta: float) -> None:
    """Positives push up exactly what negatives push down (float32, random inputs)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=gen) * 3
    labels = torch.rand(k, generator=gen) * (torch.rand(k, generator=gen) < 0.3)
    x = logits.clone().requires_grad_(True)
    rank_sort_loss(x, labels, None, delta).backward()
    assert abs(x.grad.double().sum().item()) < 1e-6
    scale = x.grad.abs().sum().item()
    if bool((labels > 0).any()):
        assert x.grad[labels > 0].sum().item() <= 1e-7 * max(scale, 1.0)


def test_pruned_negatives_never_enter_pairwise_work(monkeypatch) -> None:
    """Negatives below min positive logit - delta are dropped before the (P, Q) matrices; the
    result equals the one without them."""
    seen = []
    original = rs_module.rank_sort_errors

    def spy(pos_logits, pos_labels, neg_logits, delta):
        seen.append(len(neg_logits))
        return original(pos_logits, pos_labels, neg_logits, delta)

    monkeypatch.setattr(rs_module, "rank_sort_errors", spy)
    base_logits = FIG_S1_LOGITS[:7]  # drops negative 7 (s = -4)
    base_labels = FIG_S1_LABELS[:7]
    far = [-3.5] + [-100.0 - i for i in range(1000)]  # -3.5 = -3 - delta: H = 0 exactly
    loss_far, grad_far = run(base_logits + far, base_labels + [0.0] * len(far))
    loss_base, grad_base = run(base_logits, base_labels)
    assert seen == [3, 3]  # negatives 2, 3, 5 only
    assert loss_far.item() == loss_base.item()
    torch.testing.assert_close(grad_far[:7], grad_base)
    assert bool((grad_far[7:] == 0).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.5, 0.25, 1.0]), st.booleans())
def test_step_sums_equal_dense_sums(seed: int, delta: float, above: bool) -> None:
    """Prefix-sum step sums equal the dense (B, K) matrix sums, values on a grid (ties and
    exact band edges)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(-12, 12, (9,), generator=gen).double() / 4
    values = torch.randint(-12, 12, (31,), generator=gen).double() / 4
    weights = torch.rand(31, generator=gen, dtype=torch.float64)
    diff = values[None, :] - queries[:, None] if above else queries[:, None] - values[None, :]
    expected = (smoothed_step(diff, delta) * weights[None, :]).sum(1)
    torch.testing.assert_close(step_sums(queries, values, weights, delta, above), expected)


def test_no_positives_gives_zero_loss_and_gradient() -> None:
    loss, grad = run([1.0, -2.0, 0.5], [0.0, 0.0, 0.0])
    assert loss.item() == 0.0
    assert bool((grad == 0).all())


def test_float32_matches_float64_and_scales_with_grad_output() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(200, generator=gen)
    labels = torch.rand(200, generator=gen) * (torch.rand(200, generator=gen) < 0.2)
    loss32, grad32 = run(logits.tolist(), labels.tolist(), dtype=torch.float32)
    loss64, grad64 = run(logits.tolist(), labels.tolist(), dtype=torch.float64)
    assert loss32.item() == pytest.approx(loss64.item(), abs=1e-5)
    torch.testing.assert_close(grad32.double(), grad64, atol=1e-6, rtol=1e-4)
    x = logits.clone().requires_grad_(True)
    (3.0 * rank_sort_loss(x, labels)).backward()
    torch.testing.assert_close(x.grad, 3.0 * grad32)


def test_invalid_arguments() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="delta"):
        rank_sort_loss(x, x, None, 0.0)
    with pytest.raises(ValueError, match=r"\(K,\)"):
        rank_sort_loss(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="bool"):
        rank_sort_loss(x, x, torch.ones(3))
