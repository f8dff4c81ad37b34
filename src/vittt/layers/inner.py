"""Inner models of a TTT layer as modules: the learned initial state W0 and one inner step.

An :class:`InnerModel` consumes ``width`` channels of each of q, k, v (tokens ``[B, N, width]`` on a grid),
trains a copy of its initial state on ``(k, v)`` with the math in :mod:`vittt.ops`, applies it to ``q`` and
returns ``[B, N, out_width]``. :class:`~vittt.layers.ttt.TTTMixer` only needs these attributes, so new inner
models (and, through :class:`~vittt.ops.InnerLoss`, new inner losses) plug in without touching the mixer or
the models.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..ops import (DotProductLoss, InnerLoss, dwconv_inner_grad, dwconv_per_sample, dwconv_ttt, dwconv_ttt_fused,
                   get_inner_loss, swiglu_inner_grads, swiglu_ttt, swiglu_ttt_fused)
from ..ops.normalize import inner_step
from ..ops.precision import in_float32, upcast
from .grid import GridSize, map_to_tokens, tokens_to_map
from .lean import Band

__all__ = ['InnerModel', 'SwiGLUInner', 'DWConvInner', 'resolve_scale']

Scale = Union[float, str]


def resolve_scale(scale: Scale, head_dim: int) -> float:
    """A number is used as is; ``'head_dim'`` means ``head_dim ** -0.5`` (the paper's 1/sqrt(d))."""
    if isinstance(scale, str):
        if scale != 'head_dim':
            raise ValueError(f"inner loss scale must be a number or 'head_dim', got {scale!r}")
        return head_dim ** -0.5
    return float(scale)


class InnerModel(nn.Module):
    """Base class. Subclasses set ``width``, ``out_width``, ``accepts_rope`` and implement ``forward``.

    The memory-lean inference mode (:func:`vittt.layers.set_memory_lean`) also uses ``lean_accumulate``
    (add a band of tokens' share of the inner gradient to a running sum; ``None`` starts it), ``lean_step`` (the
    trained state from the summed gradient) and ``lean_apply`` (the trained model on a band of queries); ``halo``
    is how many grid rows of context around a band these need. Inner models without them run the lean mode's
    caller on the default path.
    """

    width: int
    out_width: int
    accepts_rope: bool = False
    halo: int = 0

    def __init__(self, loss: Union[str, InnerLoss] = 'dot', scale: Scale = 1 / 3, inner_lr: float = 1.0,
                 grad_norm: bool = True):
        super().__init__()
        self.loss = get_inner_loss(loss)
        self.scale_spec = scale
        self.inner_lr = float(inner_lr)
        self.grad_norm = bool(grad_norm)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        raise NotImplementedError

    def _extra(self) -> str:
        return f'loss={self.loss.name}, scale={self.scale:.4g}, inner_lr={self.inner_lr}, grad_norm={self.grad_norm}'


class SwiGLUInner(InnerModel):
    """``num_heads`` simplified-SwiGLU inner models of width ``head_dim``; W0 = ``w1, w2`` ``[1, h, d, d]``."""

    accepts_rope = True

    def __init__(self, num_heads: int, head_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.width = self.out_width = num_heads * head_dim
        self.scale = resolve_scale(self.scale_spec, head_dim)
        self.w1 = nn.Parameter(torch.empty(1, num_heads, head_dim, head_dim))
        self.w2 = nn.Parameter(torch.empty(1, num_heads, head_dim, head_dim))
        trunc_normal_(self.w1, std=0.02)
        trunc_normal_(self.w2, std=0.02)

    #: use the fused autograd function (dot-product loss only); False runs the composable reference-style path
    fused: bool = True

    def forward(self, q, k, v, grid_size):
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim) for t in (q, k, v))
        if self.fused and isinstance(self.loss, DotProductLoss):
            w12 = self._w12()[0]
            out = in_float32(swiglu_ttt_fused, q, k, v, w12, scale=self.scale, inner_lr=self.inner_lr,
                             normalize=self.grad_norm)
            return out.view(b, n, self.width)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = in_float32(swiglu_ttt, q, k, v, self.w1, self.w2, loss=self.loss, scale=self.scale,
                         inner_lr=self.inner_lr, normalize=self.grad_norm)
        return out.transpose(1, 2).reshape(b, n, self.width)

    def _w12(self) -> torch.Tensor:
        """``[W1 | W2]``, ``[1, h, d, 2d]``."""
        return torch.cat([self.w1, self.w2], dim=-1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def lean_accumulate(self, grad_sum, k, v, band: Band, num_tokens: int):
        k, v = self._heads(band.center(k)), self._heads(band.center(v))
        grad = in_float32(swiglu_inner_grads, k, v, self._w12(), self.loss, self.scale, num_tokens)
        return grad if grad_sum is None else grad_sum + grad

    def lean_step(self, grad_sum):
        return inner_step(upcast(self._w12()), grad_sum, self.inner_lr, -2, self.grad_norm)

    def lean_apply(self, trained, q, band: Band):
        q = band.center(q)
        z1, z2 = (upcast(self._heads(q)) @ trained).split(self.head_dim, dim=-1)
        out = z1 * F.silu(z2)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], self.width).to(q.dtype)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, head_dim={self.head_dim}, ' + self._extra()


class DWConvInner(InnerModel):
    """One ``channels``-wide depth-wise ``kernel_size``² conv inner model on the token grid; W0 = ``weight``."""

    def __init__(self, channels: int, kernel_size: int = 3, **kwargs):
        super().__init__(**kwargs)
        if kernel_size % 2 != 1:
            raise ValueError(f'the conv inner model needs an odd kernel size, got {kernel_size}')
        self.channels, self.kernel_size = channels, kernel_size
        self.width = self.out_width = channels
        self.scale = resolve_scale(self.scale_spec, channels)
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size))
        trunc_normal_(self.weight, std=0.02)

    #: use the fused autograd function (dot-product loss only); False runs the composable reference-style path
    fused: bool = True

    def forward(self, q, k, v, grid_size):
        q, k, v = (tokens_to_map(t, grid_size) for t in (q, k, v))
        if self.fused and isinstance(self.loss, DotProductLoss):
            fn, kwargs = dwconv_ttt_fused, {}
        else:
            fn, kwargs = dwconv_ttt, {'loss': self.loss}
        out = in_float32(fn, q, k, v, self.weight, scale=self.scale, inner_lr=self.inner_lr, normalize=self.grad_norm,
                         **kwargs)
        return map_to_tokens(out)

    @property
    def halo(self) -> int:
        return self.kernel_size // 2

    def lean_accumulate(self, grad_sum, k, v, band: Band, num_tokens: int):
        pad = self.halo
        k_band = upcast(band.padded_map(k, pad))                 # [B, C, rows + 2 pad, W]
        v = upcast(tokens_to_map(band.center(v), (band.stop - band.start, band.width)))
        prediction = None
        if self.loss.needs_prediction:
            prediction = F.conv2d(k_band, upcast(self.weight), padding=(0, pad), groups=self.channels)
        e = self.loss.grad(prediction, v, self.scale, num_tokens, dims=(-3, -2, -1))
        grad = dwconv_inner_grad(k_band, e, self.kernel_size, padding=(0, pad))
        return grad if grad_sum is None else grad_sum + grad

    def lean_step(self, grad_sum):
        return inner_step(upcast(self.weight).transpose(0, 1), grad_sum, self.inner_lr, (-2, -1), self.grad_norm)

    def lean_apply(self, trained, q, band: Band):
        out = dwconv_per_sample(upcast(band.padded_map(q, self.halo)), trained, padding=(0, self.halo))
        return map_to_tokens(out).to(q.dtype)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, kernel_size={self.kernel_size}, ' + self._extra()
