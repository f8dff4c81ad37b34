"""Convolutional pieces: H-ViT³'s ÷4 stem and ÷2 patch-merging downsample (both any input size), and the residual
depth-wise convolution on the token grid (the blocks' CPE, H-ViT³'s MLP convolution)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._capture import symbolic_shapes
from ..ops.onednn import conv_act, identity_folded, plain_module
from . import lean
from .grid import GridSize, map_to_tokens, pad_to_multiple, residual, tokens_to_map

__all__ = ['ConvNormAct', 'ConvStem', 'ConvDownsample', 'PatchEmbed', 'cpe_residual', 'folds_identity']


def folds_identity(conv: nn.Module) -> bool:
    """Whether ``x + conv(x)`` may run as one convolution with the identity added to its kernel's centre tap
    (:func:`~vittt.ops.onednn.identity_folded`): an exact, hook-free ``nn.Conv2d``
    (:func:`~vittt.ops.onednn.plain_module`) with zero padding, which the folded kernel's border relies on."""
    return plain_module(conv, nn.Conv2d) and conv.padding_mode == 'zeros'


def cpe_residual(conv: nn.Conv2d, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
    """``x + DWConv(x)`` on the token grid (``x [B, N, C]`` is left intact) as one convolution whose kernel holds the
    identity (:func:`~vittt.ops.onednn.identity_folded`): no second pass for the sum, and in training none for its
    gradient either (autograd otherwise adds the residual's gradient to the convolution's input gradient, another
    pass; ViT³-T's CPE at batch 32: 4.0-4.7 → 2.3-2.4 ms forward + backward). ``conv``: a stride-1, zero-padded
    depth-wise ``nn.Conv2d`` keeping the size. One that :func:`folds_identity` refuses (hooked, subclassed, not
    zero-padded), and any while a graph is captured, runs as the module plus the sum."""
    if folds_identity(conv) and not symbolic_shapes():
        return map_to_tokens(F.conv2d(tokens_to_map(x, grid_size), identity_folded(conv.weight), conv.bias,
                                      conv.stride, conv.padding, conv.dilation, conv.groups))
    return residual(map_to_tokens(conv(tokens_to_map(x, grid_size))), x)


class ConvNormAct(nn.Module):
    """``conv -> [BatchNorm] -> [ReLU]`` (attribute names ``conv``, ``norm``, ``act`` as in the official weights)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = True, norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_chs) if norm else None
        self.act = nn.ReLU() if act else None

    def plain(self) -> bool:
        """Whether the children are exactly ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` with no hooks
        (:func:`~vittt.ops.onednn.plain_module`): only then does inference fold them into one convolution."""
        return (plain_module(self.conv, nn.Conv2d) and (self.norm is None or plain_module(self.norm, nn.BatchNorm2d))
                and (self.act is None or plain_module(self.act, nn.ReLU)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not symbolic_shapes() and self.plain():
            return self._forward_inference(x)
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x

    def _forward_inference(self, x: torch.Tensor, padding=None) -> torch.Tensor:
        """Without autograd: an eval-mode BatchNorm folded into the convolution's weight and bias (one pass over the
        map less) and the ReLU in place in the convolution's fresh output (no second map of that size: on CPU the
        stem's and the merges' largest maps cost more to allocate than to rectify). Same function as the modules.
        ``padding``: instead of the convolution's own (a band of rows that brings its context rows along)."""
        conv, norm = self.conv, self.norm
        padding = conv.padding if padding is None else padding
        weight, bias = conv.weight, conv.bias
        if norm is not None and not norm.training and norm.track_running_stats:
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            bias = norm.bias - norm.running_mean * scale if bias is None else norm.bias + (bias - norm.running_mean) \
                * scale
            weight, norm = weight * scale.reshape(-1, 1, 1, 1), None
        if norm is None:  # the ReLU as the convolution's post-op (vittt.ops.onednn), or in place in its output
            return conv_act(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups,
                            'relu' if self.act is not None else None)
        x = norm(F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups))
        return F.relu_(x) if self.act is not None else x


def bandable(convs: nn.Sequential) -> bool:
    """Whether :func:`banded_convs` may run ``convs`` (it calls each layer's fused inference directly): the
    sequence and its layers exactly :class:`ConvNormAct` with plain children and no hooks anywhere."""
    return plain_module(convs, nn.Sequential) and all(plain_module(m, ConvNormAct) and m.plain() for m in convs)


def _geometry(convs) -> list:
    """Per convolution ``(kernel, stride, padding)`` along the rows."""
    return [(m.conv.kernel_size[0], m.conv.stride[0], m.conv.padding[0]) for m in convs]


def _rows_needed(geometry: list, heights: list, a: int, b: int) -> list:
    """Rows ``[lo, hi)`` of each map (input first) that output rows ``[a, b)`` of the last convolution read, each
    from the rows of the next map that lie inside it (``lo < 0`` or ``hi >`` the map's height: the convolution's
    zero padding)."""
    spans = [(a, b)]
    for (k, s, p), height in zip(reversed(geometry), reversed(heights[1:])):
        lo, hi = max(spans[0][0], 0), min(spans[0][1], height)
        spans.insert(0, (s * lo - p, s * (hi - 1) - p + k))
    return spans


def banded_convs(x: torch.Tensor, convs) -> torch.Tensor:
    """``convs`` (a sequence of :class:`ConvNormAct`, square kernels with ``padding = (kernel − 1) / 2``) without
    autograd, over groups of samples and bands of output rows whose largest intermediate map stays under
    :data:`~vittt.layers.lean.CHUNK_ELEMENTS` values, then joined. Same function as running them on the whole map:
    a band of output rows reads its context rows from the maps before it (recomputed by the band: a few rows per
    convolution), and rows outside a map are zeros, as the convolutions' padding.

    Why: at batch 16 (or at 1024², batch 1) the H-ViT³ stem's and merges' widest maps cost more to page-fault in
    than their convolutions take (:data:`~vittt.layers.lean.CHUNK_ELEMENTS`)."""
    geometry = _geometry(convs)
    heights, widths, channels = [x.shape[2]], [x.shape[3]], [x.shape[1]]
    for (k, s, p), m in zip(geometry, convs):
        heights.append((heights[-1] + 2 * p - k) // s + 1)
        widths.append((widths[-1] + 2 * m.conv.padding[1] - m.conv.kernel_size[1]) // m.conv.stride[1] + 1)
        channels.append(m.conv.out_channels)
    b, h_out = x.shape[0], heights[-1]

    def size(samples: int, rows: int) -> int:   # values in the largest map of a band with context on both sides
        a = max(0, min(rows, h_out - rows))
        spans = _rows_needed(geometry, heights, a, a + rows)
        return samples * max((min(hi, hgt) - max(lo, 0)) * wd * ch
                             for (lo, hi), hgt, wd, ch in zip(spans, heights, widths, channels))

    samples = lean.sample_group(b, size(1, h_out))
    rows = h_out
    while rows > 1 and size(samples, rows) > lean.CHUNK_ELEMENTS:
        rows = (rows + 1) // 2
    if samples >= b and rows >= h_out:
        for m in convs:
            x = m._forward_inference(x)
        return x
    groups = []
    for i in range(0, b, samples):
        outs = []
        for a in range(0, h_out, rows):
            spans = _rows_needed(geometry, heights, a, min(a + rows, h_out))
            lo, hi = spans[0]
            xb = x[i:i + samples, :, max(lo, 0):min(hi, heights[0])]
            for m, (lo, hi), hgt, (_, _, p), (out_lo, out_hi), out_hgt in zip(convs, spans, heights, geometry,
                                                                                spans[1:], heights[1:]):
                pad_w = m.conv.padding[1]
                if lo < 0:   # a band at the top (lo = −p): the convolution's own zero rows; the last output rows
                    # it then makes read its bottom padding where the band has real rows (stride 1), so are cut
                    xb = m._forward_inference(xb, (p, pad_w))[:, :, :min(out_hi, out_hgt) - max(out_lo, 0)]
                else:
                    if hi > hgt:  # a band at the bottom, not at the top: its zero rows below, explicitly
                        xb = F.pad(xb, (0, 0, 0, hi - hgt)).contiguous(memory_format=torch.channels_last)
                    xb = m._forward_inference(xb, (0, pad_w))
            outs.append(xb)
        groups.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
    return torch.cat(groups, dim=0) if len(groups) > 1 else groups[0]


class ConvStem(nn.Module):
    """÷4 stem: 3×3 s2 (C/2) -> 3×3 -> 3×3 -> 3×3 s2 (4C) -> 1×1 (C), BN everywhere, ReLU except the last.

    Inputs whose sides are not multiples of 4 are zero-padded on the right/bottom first (as the official
    dense-prediction backbone does), so the output grid is ``ceil(H/4) × ceil(W/4)``.
    """

    stride = 4

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.conv = nn.Sequential(
            ConvNormAct(in_chans, half, 3, 2, 1, bias=False),
            ConvNormAct(half, half, 3, 1, 1, bias=False),
            ConvNormAct(half, half, 3, 1, 1, bias=False),
            ConvNormAct(half, dim * 4, 3, 2, 1, bias=False),
            ConvNormAct(dim * 4, dim, 1, bias=False, act=False),
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, GridSize]:
        x = pad_to_multiple(x, self.stride)
        if not symbolic_shapes():
            # channels-last: oneDNN's convolutions are 1.5-10× faster on it than on NCHW here (3 input channels
            # included), and the output map is then already token-major (map_to_tokens is a view, the first
            # block's CPE gets the layout it wants). Not while shapes are symbolic (see tokens_to_map).
            x = x.contiguous(memory_format=torch.channels_last)
        if lean.chunks_on_cpu(self, x) and bandable(self.conv):  # in bands (banded_convs)
            x = banded_convs(x, self.conv)
        else:
            x = self.conv(x)
        return map_to_tokens(x), (x.shape[-2], x.shape[-1])


class ConvDownsample(nn.Module):
    """÷2 patch merging: 1×1 (4C') + ReLU -> depth-wise 3×3 s2 + ReLU -> 1×1 (C') + BN, all with bias.

    Odd grids get one zero row/column of tokens on the bottom/right first (official dense backbone), so the
    output grid is ``ceil(H/2) × ceil(W/2)``.
    """

    def __init__(self, dim: int, dim_out: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim_out * ratio)
        self.conv = nn.Sequential(
            ConvNormAct(dim, hidden, 1, norm=False),
            ConvNormAct(hidden, hidden, 3, 2, 1, groups=hidden, norm=False),
            ConvNormAct(hidden, dim_out, 1, act=False),
        )

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> Tuple[torch.Tensor, GridSize]:
        x = pad_to_multiple(tokens_to_map(x, grid_size), 2)
        if lean.chunks_on_cpu(self, x) and bandable(self.conv):  # the 4C' map at the input's resolution, in bands
            x = banded_convs(x, self.conv)
        else:
            x = self.conv(x)
        return map_to_tokens(x), (x.shape[-2], x.shape[-1])


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``dim`` channels (conv ``proj``). Sides that are not multiples
    of the patch size are zero-padded on the right/bottom, so the grid is ``ceil(H/p) × ceil(W/p)``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, GridSize]:
        x = self.proj(pad_to_multiple(x, self.patch_size))
        return map_to_tokens(x), (x.shape[-2], x.shape[-1])
