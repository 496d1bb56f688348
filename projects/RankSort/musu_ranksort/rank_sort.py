"""Rank & Sort (RS) loss (Oksuz et al., ICCV 2021) with the identity update, vectorized.

Notation: K examples (flattened anchor x class scores of a batch), P positives, Q negatives that
can still rank above some positive. For a positive i and any example j, x_ij = s_j - s_i and H is
the smoothed step (0 below -delta, 1 above delta, linear in between). Self-comparisons count 1.

    rank(i)    = sum_{j in P u N} H(x_ij)           rank+(i) = sum_{j in P} H(x_ij)
    l_R(i)     = sum_{j in N} H(x_ij) / rank(i)      l*_R(i) = 0
    l_S(i)     = sum_{j in P} H(x_ij) (1 - y_j) / rank+(i)
    l*_S(i)    = sum_{j in P, y_j >= y_i} H(x_ij) (1 - y_j) / sum_{j in P, y_j >= y_i} H(x_ij)
    L_RS       = 1/|P| sum_{i in P} (l_R(i) + l_S(i) - l*_S(i))

Gradients are not the derivative of L_RS (it is piecewise constant) but the identity update of
the supplement: Eq. S7 for negatives, Eq. S16 for positives, with the pmfs
p_R(j|i) = H(x_ij) / sum_{k in N} H(x_ik) over negatives and
p_S(j|i) = H(x_ij) [y_j < y_i] / sum_{k in P} H(x_ik) [y_k < y_i] over positives.

Cost: negatives below min_i s_i - delta are pruned first; the positive-negative sums (N_FP in
forward, Eq. S7 in backward) use sorted prefix sums (:func:`step_sums`), so no (P, Q) matrix is
built; only the positive-positive sorting terms are pairwise, (P, P).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "RankSortLoss",
    "rank_sort_errors",
    "rank_sort_loss",
    "smoothed_step",
    "step_sums",
]


def smoothed_step(x: Tensor, delta: float) -> Tensor:
    """H(x): 0 for x < -delta, x / (2 delta) + 1/2 on [-delta, delta], 1 for x > delta."""
    return (x / (2.0 * delta) + 0.5).clamp(0.0, 1.0)


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0."""
    zero = denominator == 0
    return torch.where(
        zero, torch.zeros_like(numerator), numerator / denominator.masked_fill(zero, 1)
    )


def step_sums(
    queries: Tensor, values: Tensor, weights: Tensor, delta: float, above: bool
) -> Tensor:
    """Exact sums of the smoothed step against sorted prefix sums, without a pairwise matrix.

    Returns (B,): sum_k weights_k H(values_k - queries_b) if ``above`` (how much weight lies
    above each query), else sum_k weights_k H(queries_b - values_k). H is linear on
    [-delta, delta], so the sum splits into a plain count beyond the band and, inside it, a
    weighted sum and a weighted sum of values, both differences of prefix sums. O((B + K) log K).
    """
    order = values.argsort()
    sorted_values = values[order].double()
    sorted_weights = weights[order].double()
    zero = sorted_values.new_zeros(1)
    cum_w = torch.cat([zero, sorted_weights.cumsum(0)])  # (K + 1,)
    cum_wv = torch.cat([zero, (sorted_weights * sorted_values).cumsum(0)])
    q = queries.double()
    low = torch.searchsorted(sorted_values, q - delta, side="left")  # count of values < q - d
    high = torch.searchsorted(sorted_values, q + delta, side="right")  # count <= q + d
    band_w = cum_w[high] - cum_w[low]
    band_wv = cum_wv[high] - cum_wv[low]
    band_offset = (band_wv - q * band_w) / (2.0 * delta)  # sum w (v - q) / (2 delta)
    if above:
        total = (cum_w[-1] - cum_w[high]) + band_offset + 0.5 * band_w
    else:
        total = cum_w[low] - band_offset + 0.5 * band_w
    return total.to(queries.dtype)


def rank_sort_errors(
    pos_logits: Tensor, pos_labels: Tensor, neg_logits: Tensor, delta: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-positive errors.

    Args:
        pos_logits: (P,) logits of the positives; pos_labels: (P,) labels in [0, 1].
        neg_logits: (Q,) logits of the negatives (all, or only those that can rank above some
            positive: the others contribute exact zeros).
    Returns:
        l_R (P,), l_S (P,), l*_S (P,), the positive steps H(x_ij) (P, P) with a unit diagonal,
        and N_FP (P,), the step-weighted count of negatives above each positive.
    """
    pos_steps = smoothed_step(pos_logits[None, :] - pos_logits[:, None], delta)  # (P, P)
    pos_steps.fill_diagonal_(1.0)
    false_positives = step_sums(
        pos_logits, neg_logits, torch.ones_like(neg_logits), delta, above=True
    )  # (P,)
    rank_pos = pos_steps.sum(1)  # (P,) >= 1
    ranking_error = false_positives / (rank_pos + false_positives)
    miss = (1.0 - pos_labels)[None, :]  # (1, P) sorting error contributed by positive j
    sorting_error = (pos_steps * miss).sum(1) / rank_pos
    target_steps = pos_steps * (pos_labels[None, :] >= pos_labels[:, None])  # (P, P), diag 1
    target_sorting_error = (target_steps * miss).sum(1) / target_steps.sum(1)
    return ranking_error, sorting_error, target_sorting_error, pos_steps, false_positives


def _rank_sort_forward(
    logits: Tensor, labels: Tensor, positive: Tensor, delta: float
) -> Tuple[Tensor, Tensor]:
    """Loss value and identity-update gradient (K,) of the RS loss; see the module docstring."""
    grad = torch.zeros_like(logits)
    pos_index = positive.nonzero(as_tuple=True)[0]  # (P,)
    num_pos = len(pos_index)
    if num_pos == 0:
        return logits.new_zeros(()), grad
    pos_logits, pos_labels = logits[pos_index], labels[pos_index]
    # Prune negatives below every positive by more than delta: H(x_ij) = 0 for all i.
    neg_index = ((~positive) & (logits > pos_logits.min() - delta)).nonzero(as_tuple=True)[0]
    neg_logits = logits[neg_index]  # (Q,)
    ranking, sorting, target_sorting, pos_steps, false_positives = rank_sort_errors(
        pos_logits, pos_labels, neg_logits, delta
    )
    sorting_loss = sorting - target_sorting  # (P,)
    loss = (ranking + sorting_loss).sum() / num_pos

    # Eq. S7: negative j gets sum_i l_R(i) p_R(j|i), p_R(j|i) = H(x_ij) / N_FP(i).
    ranking_share = _safe_divide(ranking, false_positives)  # (P,) l_R(i) / N_FP(i)
    grad[neg_index] = step_sums(neg_logits, pos_logits, ranking_share, delta, above=False) / num_pos
    # Eq. S16: positive j gets -l_R(j) - (l_S(j) - l*_S(j)) + sum_i (l_S(i) - l*_S(i)) p_S(j|i).
    lower_steps = pos_steps * (pos_labels[None, :] < pos_labels[:, None])  # (P, P), diag 0
    sorting_share = _safe_divide(sorting_loss, lower_steps.sum(1))  # (P,)
    received = (sorting_share[:, None] * lower_steps).sum(0)  # (P,)
    grad[pos_index] = (received - ranking - sorting_loss) / num_pos
    return loss, grad


class RankSortLoss(torch.autograd.Function):
    """RS loss of (K,) logits; backward returns the identity-update gradient (Eqs. S7, S16)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, positive: Tensor, delta: float) -> Tensor:
        with torch.no_grad():
            loss, grad = _rank_sort_forward(logits.detach(), labels.detach(), positive, delta)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None


def rank_sort_loss(
    logits: Tensor, labels: Tensor, positive: Optional[Tensor] = None, delta: float = 0.5
) -> Tensor:
    """Rank & Sort loss of flattened logits, averaged over positives; 0 without positives.

    Args:
        logits: (K,) float logits of all examples (positives and negatives).
        labels: (K,) continuous labels in [0, 1] (e.g. IoU); read on positives only.
        positive: (K,) bool; default ``labels > 0``, as in the paper.
        delta: half-width of the smoothed step, > 0.
    Returns:
        A scalar whose gradient w.r.t. ``logits`` is the identity update.
    """
    if not delta > 0:
        raise ValueError(f"rank_sort_loss: delta must be > 0, got {delta!r}")
    if logits.dim() != 1 or labels.shape != logits.shape:
        raise ValueError(
            f"rank_sort_loss: logits and labels must both be (K,), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if positive is None:
        positive = labels > 0
    if positive.shape != logits.shape or positive.dtype != torch.bool:
        raise ValueError("rank_sort_loss: positive must be a (K,) bool tensor")
    return RankSortLoss.apply(logits, labels.to(logits.dtype), positive, float(delta))
