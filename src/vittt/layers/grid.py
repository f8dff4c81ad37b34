"""Token sequence <-> feature map helpers. Tokens are ``[B, N, C]`` in raster order of a ``(H, W)`` grid."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..ops._capture import symbolic_shapes

__all__ = ['GridSize', 'tokens_to_map', 'map_to_tokens', 'pad_to_multiple', 'residual']

GridSize = Tuple[int, int]


def tokens_to_map(x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
    """``[B, H*W, C]`` -> ``[B, C, H, W]``: a view in channels-last layout (convolutions take it without a copy and
    return channels-last maps, which :func:`map_to_tokens` turns back into tokens without a copy; a contiguous copy
    while shapes are symbolic)."""
    b, n, c = x.shape
    h, w = grid_size
    x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
    # while shapes are symbolic, plain NCHW: a channels-last view makes every convolution decide its output layout
    # from the sizes (is a side 1?), a guard on them that no dynamic-shape export may bake in
    return x.contiguous() if symbolic_shapes() else x


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``."""
    return x.flatten(2).transpose(1, 2)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a map ``[B, C, H, W]`` on the bottom / right to sides that are multiples of ``multiple``. In eager
    mode a map that fits is returned as is (a zero-width pad still copies); while shapes are symbolic (export,
    ``torch.fx``) the pad is always applied, with symbolic widths (0 where the side fits), so no branch on the sides'
    divisibility is baked into the graph."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (h + multiple - 1) // multiple * multiple - h, (w + multiple - 1) // multiple * multiple - w
    if symbolic_shapes() or pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def residual(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``branch + x``. Without autograd the sum is formed in place in the branch's fresh output (one large
    allocation less). With autograd a new tensor: the branch outputs are views (of a Linear's 2-D output, of a
    channels-last map), and an in-place add on a view costs a ``CopySlices`` / ``AsStrided`` replay in backward
    (a zero-filled buffer, a clone and two copies of the gradient per branch), more than the allocation saved."""
    if torch.is_grad_enabled():
        return branch + x
    return branch.add_(x)
