"""Depth-wise k×k convolution inner model of ViT³ (k = 3 in the released models), one closed-form step per sample.

Shapes: ``q, k, v`` are feature maps ``[B, C, H, W]``; the initial kernel ``weight`` is ``[C, 1, k, k]``.

With ``V_hat = DWConv(K; W)`` (zero padding k//2) and ``E = dL/dV_hat`` (``-(s/(H W)) V`` for the dot-product
loss), the kernel gradient is the cross-correlation of the padded keys with E::

    g[b, c, i, j] = sum_{y, x} K_pad[b, c, y + i, x + j] · E[b, c, y, x]

computed as one grouped convolution whose kernel is E itself (3-4× faster on CPU than k² shifted products).
The gradient is optionally soft-normalised over the k×k taps of each (sample, channel), the per-sample
kernel ``W' = W - lr g`` is applied to Q.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .inner_loss import InnerLoss
from .normalize import soft_normalize

__all__ = ['dwconv_inner_grad', 'dwconv_per_sample', 'dwconv_ttt']


def dwconv_inner_grad(k: torch.Tensor, e: torch.Tensor, kernel_size: int, padding=None) -> torch.Tensor:
    """``dL/dW`` per sample: ``[B, C, kernel_size, kernel_size]`` from keys ``k`` and ``e = dL/dV_hat``.

    ``padding`` defaults to k//2 on every side (the whole map). A band of grid rows passes its keys with p = k//2
    context rows above and below (zero rows at the image border) and ``padding=(0, p)``: its share of the gradient,
    and the bands' shares add up to the whole map's."""
    b, c, hk, w = k.shape
    padding = kernel_size // 2 if padding is None else padding
    grad = F.conv2d(k.reshape(1, b * c, hk, w), e.reshape(b * c, 1, e.shape[-2], e.shape[-1]), padding=padding,
                    groups=b * c)
    return grad.reshape(b, c, kernel_size, kernel_size)


def dwconv_per_sample(x: torch.Tensor, weight: torch.Tensor, padding=None) -> torch.Tensor:
    """Depth-wise convolution of each sample with its own kernel: ``x [B, C, H, W]``, ``weight [B, C, k, k]``;
    ``padding`` defaults to k//2 on every side (same size out)."""
    b, c, h, w = x.shape
    ks = weight.shape[-1]
    padding = ks // 2 if padding is None else padding
    if b == 1:  # one sample: a plain depth-wise convolution (keeps a channels-last input channels-last)
        return F.conv2d(x, weight.reshape(c, 1, ks, ks), padding=padding, groups=c)
    out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * c, 1, ks, ks), padding=padding, groups=b * c)
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


def dwconv_ttt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, *, loss: InnerLoss,
               scale: float, inner_lr: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """One full-batch inner step of the depth-wise kernel on ``(k, v)``, applied to ``q``; returns ``[B, C, H, W]``."""
    channels, ks = weight.shape[0], weight.shape[-1]
    prediction = F.conv2d(k, weight, padding=ks // 2, groups=channels) if loss.needs_prediction else None
    e = loss.grad(prediction, v, scale, k.shape[-2] * k.shape[-1])
    grad = dwconv_inner_grad(k, e, ks)
    if normalize:
        grad = soft_normalize(grad, (-2, -1))
    return dwconv_per_sample(q, weight.reshape(1, channels, ks, ks) - inner_lr * grad)
