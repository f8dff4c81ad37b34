"""Convolutional pieces of H-ViT³: the ÷4 stem and the ÷2 patch-merging downsample, both any input size."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._capture import symbolic_shapes
from .grid import GridSize, map_to_tokens, pad_to_multiple, tokens_to_map

__all__ = ['ConvNormAct', 'ConvStem', 'ConvDownsample', 'PatchEmbed']


class ConvNormAct(nn.Module):
    """``conv -> [BatchNorm] -> [ReLU]`` (attribute names ``conv``, ``norm``, ``act`` as in the official weights)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = True, norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_chs) if norm else None
        self.act = nn.ReLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not symbolic_shapes():
            return self._forward_inference(x)
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Without autograd: an eval-mode BatchNorm folded into the convolution's weight and bias (one pass over the
        map less) and the ReLU in place in the convolution's fresh output (no second map of that size: on CPU the
        stem's and the merges' largest maps cost more to allocate than to rectify). Same function as the modules."""
        conv, norm = self.conv, self.norm
        if norm is not None and not norm.training and norm.track_running_stats:
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            bias = norm.bias - norm.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            x = F.conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias, conv.stride, conv.padding,
                         conv.dilation, conv.groups)
        else:
            x = conv(x)
            if norm is not None:
                x = norm(x)
        return F.relu_(x) if self.act is not None else x


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
        x = self.conv(pad_to_multiple(tokens_to_map(x, grid_size), 2))
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
