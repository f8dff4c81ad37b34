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

    # on 2-D ``[rows, features]`` tensors: the output is a fresh matrix, not a view (callers add to it in place).
    # Under autocast the forward's matmul runs in the autocast dtype; the backward (which autograd runs without
    # autocast) casts to that dtype explicitly and returns gradients in the inputs' dtypes.
    @staticmethod
    def forward(ctx, h, weight, bias, approximate: str):
        out = F.linear(F.gelu(h, approximate=approximate), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.approximate, ctx.mm_dtype = approximate, out.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_out = grad_out.to(ctx.mm_dtype)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            act = F.gelu(h, approximate=ctx.approximate).to(ctx.mm_dtype)
            grad_w = grad_out.t().mm(act).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            grad_act = grad_out.mm(weight.to(ctx.mm_dtype)).to(h.dtype)
            grad_h = torch.ops.aten.gelu_backward(grad_act, h, approximate=ctx.approximate)
        return grad_h, grad_w, grad_b, None


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                approximate: str = 'none') -> torch.Tensor:
    """``F.linear(F.gelu(h, approximate), weight, bias)``, keeping only ``h`` (not ``GELU(h)``) for backward."""
    if h.shape[-1] != weight.shape[-1]:
        raise ValueError(f'h has {h.shape[-1]} features but weight expects {weight.shape[-1]}')
    out = _GeluLinear.apply(h.reshape(-1, h.shape[-1]), weight, bias, approximate)
    return out.view(*h.shape[:-1], weight.shape[0])
