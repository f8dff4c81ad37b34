"""Plain autograd reference of the simplified-SwiGLU inner step, written straight from the spec's equations (tests
only): the inner loss is built explicitly and differentiated with ``torch.autograd.grad(create_graph=True)``;
nothing is shared with the closed-form paths except the loss definitions' ``value``."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..loss import InnerLoss
from ..reference_utils import explicit_soft_norm, per_sample_leaf

__all__ = ['reference_swiglu_grads', 'reference_swiglu_ttt']


def reference_swiglu_grads(k, v, w1, w2, loss: InnerLoss, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dW1, dL/dW2)`` per sample and head by autograd; ``k, v [B, h, N, d]``, ``w [1, h, d, d]``."""
    b, h, n, d = k.shape
    with torch.enable_grad():
        w1b, w2b = per_sample_leaf(w1, (b, h, d, d)), per_sample_leaf(w2, (b, h, d, d))
        prediction = (k @ w1b) * F.silu(k @ w2b)
        total = loss.value(prediction, v, scale, n)  # per-(b, h) losses are independent: grad of the sum is each
        return torch.autograd.grad(total, (w1b, w2b), create_graph=True)


def reference_swiglu_ttt(q, k, v, w1, w2, *, loss: InnerLoss, scale: float, inner_lr: float = 1.0,
                         normalize: bool = True) -> torch.Tensor:
    g1, g2 = reference_swiglu_grads(k, v, w1, w2, loss, scale)
    if normalize:
        g1, g2 = explicit_soft_norm(g1, -2), explicit_soft_norm(g2, -2)
    w1n, w2n = w1 - inner_lr * g1, w2 - inner_lr * g2
    return (q @ w1n) * F.silu(q @ w2n)
