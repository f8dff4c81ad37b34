"""``Linear(GELU(h))`` that keeps only ``h`` for backward and recomputes ``GELU(h)`` there (training memory).

Autograd's composition keeps both the MLP's pre-activation ``h`` (for GELU's backward) and ``GELU(h)`` (the second
linear's input, for its weight gradient): two ``N × 4C`` tensors per block, the largest activations of a ViT block.
This function keeps ``h`` alone; the backward recomputes the element-wise ``GELU(h)`` (one cheap pass, no matmul)::

    Y = GELU(h) Wᵀ + b
    dW = dYᵀ GELU(h),  db = Σ dY,  dh = GELU'(h) ⊙ (dY W)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['gelu_linear']


class _GeluLinear(torch.autograd.Function):

    # on 2-D ``[rows, features]`` tensors: the output is a fresh matrix, not a view (callers add to it in place)
    @staticmethod
    def forward(ctx, h, weight, bias, approximate: str):
        ctx.save_for_backward(h, weight)
        ctx.approximate, ctx.has_bias = approximate, bias is not None
        return F.linear(F.gelu(h, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.t().mm(F.gelu(h, approximate=ctx.approximate))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad_out.mm(weight), h, approximate=ctx.approximate)
        return grad_h, grad_w, grad_b, None


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                approximate: str = 'none') -> torch.Tensor:
    """``F.linear(F.gelu(h, approximate), weight, bias)``, keeping only ``h`` (not ``GELU(h)``) for backward."""
    if h.shape[-1] != weight.shape[-1]:
        raise ValueError(f'h has {h.shape[-1]} features but weight expects {weight.shape[-1]}')
    out = _GeluLinear.apply(h.reshape(-1, h.shape[-1]), weight, bias, approximate)
    return out.view(*h.shape[:-1], weight.shape[0])
