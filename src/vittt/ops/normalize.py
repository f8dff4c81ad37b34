"""The soft normalisation ViT³ applies to every inner gradient before the step (official code only).

``g / (||g|| + 1)``: a gradient part with a large norm gets a step of length ~1, a small one is left almost
unchanged. The norm runs over ``dims`` (the d input rows of each output column for a d×d matrix; the k×k
taps of each channel for a depth-wise kernel).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ['soft_normalize', 'soft_normalize_backward', 'l2_norm', 'inner_step']


def soft_normalize(grad: torch.Tensor, dims: Union[int, Sequence[int]]) -> torch.Tensor:
    """``grad / (||grad||_2 over dims + 1)``, norms kept for broadcasting.

    The norm is ``sqrt(max(Σ g², tiny))``: on these small strided reductions several times faster than
    ``linalg.vector_norm``, and with the same gradient at g = 0 (the clamp's, zero, where a bare sqrt would give
    0 · ∞ = NaN); the clamp changes the value only when ``||g|| < 1e-15``, where ``g / (||g|| + 1) = g`` anyway."""
    return grad / (l2_norm(grad, dims) + 1.0)


def l2_norm(grad: torch.Tensor, dims: Union[int, Sequence[int]]) -> torch.Tensor:
    """``sqrt(max(Σ g² over dims, 1e-30))``, dims kept (the norm :func:`soft_normalize` divides by)."""
    return grad.square().sum(dim=dims, keepdim=True).clamp_min(1e-30).sqrt()


def inner_step(weight: torch.Tensor, grad: torch.Tensor, inner_lr: float, dims: Union[int, Sequence[int]],
               normalize: bool = True) -> torch.Tensor:
    """The trained inner state ``W - lr · ĝ``, ``ĝ`` the gradient soft-normalised over ``dims`` (or raw). One
    ``addcdiv`` (``W + (-lr) · g / (||g|| + 1)``) instead of a division, a product and a difference: these tensors
    are tiny, each kernel call is fixed cost (ViT³-T at batch 1 steps 24 of them a forward)."""
    if not normalize:
        return torch.add(weight, grad, alpha=-inner_lr)
    return torch.addcdiv(weight, grad, l2_norm(grad, dims) + 1.0, value=-inner_lr)


def soft_normalize_backward(grad: torch.Tensor, grad_out: torch.Tensor,
                            dims: Union[int, Sequence[int]]) -> torch.Tensor:
    """The gradient w.r.t. ``grad`` of :func:`soft_normalize` given the gradient ``grad_out`` of its output
    (for hand-written backward passes)::

        d/dg [g / (n + 1)] = grad_out / (n + 1) - g (Σ g ⊙ grad_out) / (n (n + 1)²),   n = ||g|| over dims

    At g = 0 the clamped norm makes the second term 0 / tiny = 0 (finite)."""
    norm = l2_norm(grad, dims)
    inner = (grad * grad_out).sum(dim=dims, keepdim=True)
    return grad_out / (norm + 1.0) - grad * (inner / (norm * (norm + 1.0) ** 2))
