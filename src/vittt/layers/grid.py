"""Token sequence <-> feature map helpers. Tokens are ``[B, N, C]`` in raster order of a ``(H, W)`` grid."""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ['GridSize', 'tokens_to_map', 'map_to_tokens']

GridSize = Tuple[int, int]


def tokens_to_map(x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
    """``[B, H*W, C]`` -> ``[B, C, H, W]``: a view in channels-last layout (convolutions take it without a copy and
    return channels-last maps, which :func:`map_to_tokens` turns back into tokens without a copy)."""
    b, n, c = x.shape
    h, w = grid_size
    return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``."""
    return x.flatten(2).transpose(1, 2)
