"""Plain autograd reference of the depth-wise conv inner step, written straight from the spec's equations (tests
only): the inner loss is built explicitly and differentiated with ``torch.autograd.grad(create_graph=True)``;
nothing is shared with the closed-form paths except the loss definitions' ``value``."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..loss import InnerLoss
from ..reference_utils import explicit_soft_norm, per_sample_leaf

__all__ = ['shifted_dwconv', 'reference_dwconv_grad', 'reference_dwconv_ttt']


def shifted_dwconv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample depth-wise conv as an explicit sum of k² shifted products: ``x [B,C,H,W]``, ``weight [B,C,k,k]``."""
    ks = weight.shape[-1]
    p = ks // 2
    h, w = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p))
    out = torch.zeros_like(x)
    for i in range(ks):
        for j in range(ks):
            out = out + weight[:, :, i, j, None, None] * xp[:, :, i:i + h, j:j + w]
    return out


def reference_dwconv_grad(k, v, weight, loss: InnerLoss, scale: float) -> torch.Tensor:
    """``dL/dW`` per sample ``[B, C, k, k]`` by autograd; ``k, v [B, C, H, W]``, ``weight [C, 1, k, k]``."""
    b, c, h, w = k.shape
    ks = weight.shape[-1]
    with torch.enable_grad():
        wb = per_sample_leaf(weight.reshape(1, c, ks, ks), (b, c, ks, ks))
        prediction = shifted_dwconv(k, wb)
        total = loss.value(prediction, v, scale, h * w, dims=(-3, -2, -1))
        return torch.autograd.grad(total, wb, create_graph=True)[0]


def reference_dwconv_ttt(q, k, v, weight, *, loss: InnerLoss, scale: float, inner_lr: float = 1.0,
                         normalize: bool = True) -> torch.Tensor:
    c, ks = weight.shape[0], weight.shape[-1]
    g = reference_dwconv_grad(k, v, weight, loss, scale)
    if normalize:
        g = explicit_soft_norm(g, (-2, -1))
    return shifted_dwconv(q, weight.reshape(1, c, ks, ks) - inner_lr * g)
