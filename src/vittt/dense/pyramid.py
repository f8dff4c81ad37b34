"""Multi-scale maps from a single-stride (plain) backbone: the simple feature pyramid.

Plain models (``vit3_*``, ``vision_ttt_*``, timm ViTs) produce one token grid at stride 16. Detectors and UPerNet
want maps at strides 4 / 8 / 16 / 32. Two standard adaptors do the resampling:

* ``mode='last'`` (ViTDet, Li et al. 2022): only the last block's output (after the model's final norm) feeds four
  branches: ×4 = deconv 2×2/2 (C → C/2) → norm → GELU → deconv 2×2/2 (C/2 → C/4); ×2 = deconv 2×2/2 (C → C/2);
  ×1 = identity; ×½ = 2×2/2 max-pool. With ``out_chs`` each branch then gets a 1×1 conv → norm → 3×3 conv → norm
  to ``out_chs`` channels (the detection default, 256).
* ``mode='taps'`` (BEiT / Vim segmentation): four taps at quarter depths, each through its own branch with the same
  four resamplings but keeping C channels (×4 = deconv → norm → GELU → deconv). With ``out_chs``, a 1×1 conv → norm
  projects each level.

The ×½ branch pools in ceil mode, so a grid of odd size halves to ``ceil(n / 2)`` (as the hierarchical models'
merging layers do); the deconvolutions give exactly 2× / 4× the stride-16 grid.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

__all__ = ['SimpleFeaturePyramid', 'LayerNorm2d', 'norm2d']

SCALES = (4.0, 2.0, 1.0, 0.5)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (eps 1e-5 by default, as the official dense backbone's)."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def norm2d(kind: str, channels: int) -> nn.Module:
    """``'ln'``: :class:`LayerNorm2d`; ``'bn'``: BatchNorm2d; ``'none'``: identity."""
    if kind == 'ln':
        return LayerNorm2d(channels)
    if kind == 'bn':
        return nn.BatchNorm2d(channels)
    if kind == 'none':
        return nn.Identity()
    raise ValueError(f"norm must be 'ln', 'bn' or 'none', got {kind!r}")


def _resample(scale: float, in_chs: int, out_chs: int, norm: str) -> nn.Module:
    """The branch that takes a stride-16 map of ``in_chs`` channels to ``16 / scale`` (``out_chs`` channels after
    the deconvolutions; identity and pooling keep ``in_chs``)."""
    if scale == 4.0:
        mid = in_chs // 2 if out_chs < in_chs else in_chs  # ViTDet: C -> C/2 -> C/4
        return nn.Sequential(nn.ConvTranspose2d(in_chs, mid, 2, 2), norm2d(norm, mid), nn.GELU(),
                             nn.ConvTranspose2d(mid, out_chs, 2, 2))
    if scale == 2.0:
        return nn.ConvTranspose2d(in_chs, out_chs, 2, 2)
    if scale == 1.0:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2, 2, ceil_mode=True)
    raise ValueError(f'scales must be among {SCALES}, got {scale}')


class SimpleFeaturePyramid(nn.Module):
    """Stride-16 map(s) of ``in_chs`` channels -> maps at strides ``16 / scale`` for ``scale`` in ``scales``.

    ``forward(features)`` takes the list of stride-16 maps the trunk returns: one (``'last'``) or one per scale
    (``'taps'``). ``out_channels`` lists each output's channels; ``strides`` their strides.
    """

    def __init__(self, in_chs: int, mode: str = 'last', scales: Sequence[float] = SCALES, norm: str = 'ln',
                 out_chs: int = None):
        super().__init__()
        if mode not in ('last', 'taps'):
            raise ValueError(f"mode must be 'last' or 'taps', got {mode!r}")
        self.mode, self.scales = mode, tuple(float(s) for s in scales)
        self.branches = nn.ModuleList()
        self.outputs = nn.ModuleList()
        self.out_channels: List[int] = []
        for scale in self.scales:
            if mode == 'last':  # ViTDet: C/4 at ×4, C/2 at ×2
                chs = {4.0: in_chs // 4, 2.0: in_chs // 2}.get(scale, in_chs)
            else:
                chs = in_chs
            self.branches.append(_resample(scale, in_chs, chs, norm))
            if out_chs is None:
                self.outputs.append(nn.Identity())
                self.out_channels.append(chs)
            elif mode == 'last':
                self.outputs.append(nn.Sequential(
                    nn.Conv2d(chs, out_chs, 1, bias=False), norm2d(norm, out_chs),
                    nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False), norm2d(norm, out_chs)))
                self.out_channels.append(out_chs)
            else:
                self.outputs.append(nn.Sequential(nn.Conv2d(chs, out_chs, 1, bias=False), norm2d(norm, out_chs)))
                self.out_channels.append(out_chs)
        self.strides = [int(round(16 / s)) for s in self.scales]  # for a stride-16 input

    @property
    def num_inputs(self) -> int:
        return 1 if self.mode == 'last' else len(self.scales)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != self.num_inputs:
            raise ValueError(f'the {self.mode!r} pyramid takes {self.num_inputs} stride-16 map(s), got {len(features)}')
        inputs = list(features) * len(self.scales) if self.mode == 'last' else list(features)
        return [out(branch(x)) for x, branch, out in zip(inputs, self.branches, self.outputs)]
