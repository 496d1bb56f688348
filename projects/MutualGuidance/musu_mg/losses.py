"""Balanced L1 loss (Pang et al., Libra R-CNN, CVPR 2019, Eqs. 8-10), element-wise."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["balanced_l1_loss", "balanced_l1_b"]


def balanced_l1_b(alpha: float, gamma: float) -> float:
    """b of the Balanced L1 loss, fixed by the gradient continuity alpha * ln(b + 1) = gamma."""
    return math.exp(gamma / alpha) - 1.0


def balanced_l1_loss(
    diff: Tensor, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0
) -> Tensor:
    """Element-wise Balanced L1 of a regression error ``diff``, measured in units of ``beta``.

    With u = |diff| / beta and alpha * ln(b + 1) = gamma:
        L_b(u) = alpha / b * (b u + 1) ln(b u + 1) - alpha u     if u < 1
               = gamma u + gamma / b - alpha                       otherwise,
    and the loss is beta * L_b(u). Value and gradient are continuous at u = 1 (the gradient is
    alpha * ln(b u + 1) below, gamma above, in units of sign(diff)) and both vanish at 0.
    """
    if not (alpha > 0 and gamma > 0 and beta > 0):
        raise ValueError(
            f"balanced_l1_loss: alpha, gamma, beta must be > 0, got {alpha, gamma, beta}"
        )
    b = balanced_l1_b(alpha, gamma)
    u = diff.abs() / beta
    inner = alpha / b * (b * u + 1) * torch.log1p(b * u) - alpha * u
    outer = gamma * u + (gamma / b - alpha)
    return beta * torch.where(u < 1, inner, outer)
