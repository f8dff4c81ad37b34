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
from timm.layers import trunc_normal_

from ..ops import InnerLoss, dwconv_ttt, get_inner_loss, swiglu_ttt
from ..ops.precision import in_float32
from .grid import GridSize, map_to_tokens, tokens_to_map

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
    """Base class. Subclasses set ``width``, ``out_width``, ``accepts_rope`` and implement ``forward``."""

    width: int
    out_width: int
    accepts_rope: bool = False

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

    def forward(self, q, k, v, grid_size):
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = in_float32(swiglu_ttt, q, k, v, self.w1, self.w2, loss=self.loss, scale=self.scale,
                         inner_lr=self.inner_lr, normalize=self.grad_norm)
        return out.transpose(1, 2).reshape(b, n, self.width)

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

    def forward(self, q, k, v, grid_size):
        q, k, v = (tokens_to_map(t, grid_size) for t in (q, k, v))
        out = in_float32(dwconv_ttt, q, k, v, self.weight, loss=self.loss, scale=self.scale, inner_lr=self.inner_lr,
                         normalize=self.grad_norm)
        return map_to_tokens(out)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, kernel_size={self.kernel_size}, ' + self._extra()
