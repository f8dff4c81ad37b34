"""The fast path of the depth-wise conv inner step (dot-product loss): one autograd function whose backward is four
more depth-wise convolutions (the derivation is in :mod:`vittt.ops.dwconv.composable`'s docstring)."""
from __future__ import annotations

import torch

from .._capture import records_grad
from ..normalize import soft_normalize_backward
from .composable import dwconv_inner_grad, dwconv_per_sample, stepped_kernel

__all__ = ['dwconv_ttt_fused']


def _forward(q, k, v, weight, c: float, inner_lr: float, normalize: bool):
    """The step's output and the raw kernel gradient (all the backward needs besides the inputs)."""
    grad = dwconv_inner_grad(k, v * c, weight.shape[-1])
    return dwconv_per_sample(q, stepped_kernel(weight, grad, inner_lr, normalize)), grad


class _DWConvTTT(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, weight, c: float, inner_lr: float, normalize: bool):
        out, grad = _forward(q, k, v, weight, c, inner_lr, normalize)
        ctx.save_for_backward(q, k, v, weight, grad)
        ctx.c, ctx.inner_lr, ctx.normalize = c, inner_lr, normalize
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, weight, grad = ctx.saved_tensors
        c, lr = ctx.c, ctx.inner_lr
        ks = weight.shape[-1]
        kernel = stepped_kernel(weight, grad, lr, ctx.normalize)
        grad_q = dwconv_per_sample(grad_out, kernel.flip(-2, -1))
        grad_kernel = dwconv_inner_grad(q, grad_out, ks)
        grad_step = grad_kernel * -lr
        grad_grad = soft_normalize_backward(grad, grad_step, (-2, -1)) if ctx.normalize else grad_step
        grad_e = dwconv_per_sample(k, grad_grad)
        grad_k = dwconv_per_sample(v * c, grad_grad.flip(-2, -1))
        return grad_q, grad_k, grad_e.mul_(c), grad_kernel.sum(0).unsqueeze(1), None, None, None


def dwconv_ttt_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, *, scale: float,
                     inner_lr: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """:func:`dwconv_ttt` for the dot-product loss with a hand-written backward (see the module docstring);
    ``q, k, v [B, C, H, W]``, ``weight [C, 1, k, k]``."""
    if q.shape != k.shape or q.shape != v.shape or q.ndim != 4:
        raise ValueError(f'q, k, v must share one [B, C, H, W] shape, got {tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    channels = q.shape[1]
    if weight.ndim != 4 or weight.shape[:2] != (channels, 1) or weight.shape[2] != weight.shape[3] \
            or weight.shape[-1] % 2 != 1:
        raise ValueError(f'weight must be [C, 1, k, k] with C = {channels} and odd k, got {tuple(weight.shape)}')
    c = -float(scale) / (q.shape[-2] * q.shape[-1])
    if not records_grad(q, k, v, weight):
        return _forward(q, k, v, weight, c, float(inner_lr), bool(normalize))[0]  # (no autograd Function's call)
    return _DWConvTTT.apply(q, k, v, weight, c, float(inner_lr), bool(normalize))
