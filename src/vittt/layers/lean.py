"""Switching TTT models into their token-chunked, memory-lean inference mode."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._capture import eval_inference
from .switches import set_fast_path

__all__ = ['set_memory_lean', 'DEFAULT_CHUNK_TOKENS', 'CHUNK_ELEMENTS', 'Band', 'bands', 'chunks_on_cpu',
           'sample_group']

DEFAULT_CHUNK_TOKENS = 1024

#: the largest activation (values) one chunk of the CPU inference paths holds: 4 Mi values, 16 MiB in float32.
#: On CPU a fresh tensor above glibc's mmap threshold (32 MiB at most) is page-faulted on first touch at every call,
#: ~0.9 µs per 4 KiB page, which for the 4C-wide activations of a batch costs more than the matmul that fills
#: them; chunk-sized buffers are recycled by the allocator instead (see :func:`sample_group`).
CHUNK_ELEMENTS = 1 << 22


def chunks_on_cpu(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the CPU inference paths chunk ``module``'s work on ``x``: eval mode, no autograd, concrete shapes and a
    CPU tensor (the page faults they avoid are the CPU allocator's; a GPU's caching allocator has none, and chunks
    would only add kernels there)."""
    return eval_inference(module) and x.device.type == 'cpu'


def sample_group(batch: int, per_sample: int) -> int:
    """How many samples one chunk takes so that its widest activation (``per_sample`` values a sample) stays under
    :data:`CHUNK_ELEMENTS` (at least one, at most ``batch``)."""
    return max(1, min(batch, CHUNK_ELEMENTS // max(1, per_sample)))


def set_memory_lean(model: nn.Module, enabled: bool = True, chunk_tokens: Optional[int] = None) -> int:
    """Turn the memory-lean inference mode of every block of ``model`` that has one on (or off).

    In lean mode a block processes its tokens in chunks of ``chunk_tokens`` wherever the math is per token (the
    projections, the MLP, applying the trained inner model) and accumulates the inner gradients (sums over tokens)
    chunk by chunk, so peak activation memory no longer grows with several ``N × 4C`` tensors. The result equals the
    default mode's. It applies to inference (eval mode, no autograd graph); with gradients enabled or in training
    mode blocks run the default path.

    A thin call of ``vittt.set_fast_path(model, memory_lean=enabled, chunk_tokens=chunk_tokens)``, chunk_tokens
    defaulting to :data:`DEFAULT_CHUNK_TOKENS` (see :mod:`vittt.layers.switches`: restoring the previous settings,
    ``with vittt.fast_path(...)``). Returns the number of blocks switched (0 when the model has no lean mode).
    """
    chunk_tokens = DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    previous = set_fast_path(model, memory_lean=bool(enabled), chunk_tokens=chunk_tokens)
    return previous.counts['memory_lean']


class Band:
    """Grid rows ``[start, stop)`` of a ``(H, W)`` grid, with up to ``halo`` rows of context on each side
    (``[ctx_start, ctx_stop)``, clipped to the grid)."""

    def __init__(self, grid_size, start: int, stop: int, halo: int):
        self.grid_size, self.start, self.stop, self.halo = grid_size, start, stop, halo
        self.ctx_start, self.ctx_stop = max(0, start - halo), min(grid_size[0], stop + halo)

    @property
    def width(self) -> int:
        return self.grid_size[1]

    @property
    def tokens(self) -> slice:
        """The band's own tokens in the full sequence."""
        return slice(self.start * self.width, self.stop * self.width)

    @property
    def ctx_tokens(self) -> slice:
        """The band's tokens with context, in the full sequence."""
        return slice(self.ctx_start * self.width, self.ctx_stop * self.width)

    def center(self, t: torch.Tensor) -> torch.Tensor:
        """The band's own tokens of a ``[B, ctx tokens, C]`` tensor."""
        first = (self.start - self.ctx_start) * self.width
        return t[:, first:first + (self.stop - self.start) * self.width]

    def padded_map(self, t: torch.Tensor, pad: int) -> torch.Tensor:
        """``[B, ctx tokens, C]`` -> ``[B, C, rows + 2 pad, W]``: the band with ``pad`` context rows each side, zero
        rows where the context leaves the image (what a zero-padded convolution of the whole map would see)."""
        top = pad - (self.start - self.ctx_start)
        bottom = pad - (self.ctx_stop - self.stop)
        m = t.reshape(t.shape[0], self.ctx_stop - self.ctx_start, self.width, -1).permute(0, 3, 1, 2)
        first = self.start - self.ctx_start - (pad - top)
        m = m[:, :, first:first + (self.stop - self.start) + 2 * pad - top - bottom]
        return F.pad(m, (0, 0, top, bottom)) if top or bottom else m


def bands(grid_size, chunk_tokens: int, halo: int = 0) -> List[Band]:
    """Split the grid's rows into bands of about ``chunk_tokens`` tokens (at least one row each)."""
    rows = max(1, chunk_tokens // grid_size[1])
    return [Band(grid_size, r, min(r + rows, grid_size[0]), halo) for r in range(0, grid_size[0], rows)]
