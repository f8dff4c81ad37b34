"""Simplified-SwiGLU inner model of ViT³: ``F(x) = (x W1) ⊙ SiLU(x W2)``, one closed-form step per sample and head.

Shapes: ``q, k, v`` are ``[B, h, N, d]`` (h heads of width d, N tokens); the initial state ``w1, w2`` is
``[1, h, d, d]`` (or already per sample, ``[B, h, d, d]``).

Inner gradients, with ``E = dL/dV_hat`` from the inner loss (``-(s/N) V`` for the dot-product loss)::

    Z1 = K W1,  Z2 = K W2,  σ = sigmoid(Z2),  A = SiLU(Z2) = Z2 σ,  SiLU'(Z2) = σ (1 + Z2 (1 - σ))
    V_hat = Z1 ⊙ A
    G1 = dL/dW1 = Kᵀ (E ⊙ A)
    G2 = dL/dW2 = Kᵀ (E ⊙ Z1 ⊙ SiLU'(Z2))

Each G is optionally soft-normalised column-wise (``G / (||G||_rows + 1)``), then
``W' = W - lr G`` and the output is ``F_W'(Q)``. The two weights are handled as one ``[d, 2d]`` matrix
``[W1 | W2]`` so the key forward, both gradients and the query forward are one matmul each; the column-wise
norm is unaffected because every column is normalised on its own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..loss import InnerLoss
from ..normalize import inner_step

__all__ = ['swiglu_inner', 'swiglu_inner_grads', 'swiglu_ttt']


def swiglu_inner(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The inner model itself: ``(x W1) ⊙ SiLU(x W2)``."""
    return (x @ w1) * F.silu(x @ w2)


def swiglu_inner_grads(k: torch.Tensor, v: torch.Tensor, w12: torch.Tensor, loss: InnerLoss,
                       scale: float, num_tokens: Optional[int] = None) -> torch.Tensor:
    """Closed-form ``[G1 | G2]`` (``[B, h, d, 2d]``) of the inner loss at ``w12 = [W1 | W2]``.

    ``num_tokens`` (default: the tokens in ``k``) is the size of the whole training set; passing the full count
    for a chunk of the tokens gives that chunk's share of the gradient, so chunk results add up to the full one."""
    d = k.shape[-1]
    z1, z2 = (k @ w12).split(d, dim=-1)
    sig = torch.sigmoid(z2)
    act = z2 * sig
    prediction = z1 * act if loss.needs_prediction else None
    e = loss.grad(prediction, v, scale, num_tokens or k.shape[-2])
    d_act = sig * (1.0 + z2 * (1.0 - sig))
    return k.transpose(-2, -1) @ torch.cat([e * act, e * z1 * d_act], dim=-1)


def swiglu_ttt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *,
               loss: InnerLoss, scale: float, inner_lr: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """One full-batch inner step on ``(k, v)``, then the updated model applied to ``q``; returns ``[B, h, N, d]``."""
    d = q.shape[-1]
    w12 = torch.cat([w1, w2], dim=-1)
    grad = swiglu_inner_grads(k, v, w12, loss, scale)
    z1, z2 = (q @ inner_step(w12, grad, inner_lr, -2, normalize)).split(d, dim=-1)
    return z1 * F.silu(z2)
