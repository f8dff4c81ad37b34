"""Hierarchical H-ViT³ (Han et al., CVPR 2026): four stages of TTT blocks with 2-D RoPE, conv stem and merging.

conv stem ÷4 -> stage 1 -> merge ÷2 -> stage 2 -> merge ÷2 -> stage 3 -> merge ÷2 -> stage 4
-> BatchNorm -> mean over tokens -> Linear.
Blocks: CPE, LN -> TTT (2-D RoPE on the SwiGLU heads' q/k), LN -> MLP with a depth-wise conv; head width 32.
RoPE tables are computed for the actual grid of each stage (cached), and odd sides are padded like the official
dense-prediction backbone, so any resolution and aspect ratio runs; features at strides 4/8/16/32 are the stage
outputs before merging.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers import ConvDownsample, ConvStem, GridSize, RoPE2d, TTTBlock, tokens_to_map
from ._base import ClassifierMixin, check_images, create_model, init_weights, run_blocks, vit3_pretrained_cfg

__all__ = ['HViT3', 'HViT3Stage']


class HViT3Stage(nn.Module):
    """``depth`` TTT blocks at one resolution (sharing one RoPE table cache), then an optional ÷2 merge."""

    def __init__(self, dim: int, dim_out: Optional[int], depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: Sequence[float] = (), proj_drop: float = 0.0,
                 ttt_kwargs: Optional[dict] = None):
        super().__init__()
        rope = RoPE2d(dim)
        self.blocks = nn.ModuleList([
            TTTBlock(dim, num_heads, mlp_ratio, qkv_bias, norm_eps=1e-5, mlp_dwconv=True, rope=rope,
                     drop_path=drop_path[i] if drop_path else 0.0, proj_drop=proj_drop, ttt_kwargs=ttt_kwargs)
            for i in range(depth)])
        self.downsample = ConvDownsample(dim, dim_out) if dim_out else None
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        return run_blocks(self.blocks, x, grid_size, self.grad_checkpointing)

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> Tuple[torch.Tensor, GridSize]:
        x = self.forward_blocks(x, grid_size)
        if self.downsample is not None:
            x, grid_size = self.downsample(x, grid_size)
        return x, grid_size


class HViT3(ClassifierMixin, nn.Module):
    """H-ViT³.

    Args:
        img_size: nominal input size (``pretrained_cfg`` only; the model runs at any size ≥ 4).
        in_chans, num_classes, global_pool ('avg' or ''), dims, depths, num_heads (per stage), mlp_ratio,
        qkv_bias, drop_rate (before the head), proj_drop_rate, drop_path_rate (linear over all blocks).
        ttt_kwargs: options of every TTT mixer (``inner_loss``, ``scale``, ``inner_lr``, ``grad_norm``, ...).
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, global_pool: str = 'avg',
                 dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (1, 3, 9, 4),
                 num_heads: Sequence[int] = (2, 4, 10, 16), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 ttt_kwargs: Optional[dict] = None):
        super().__init__()
        if not len(dims) == len(depths) == len(num_heads):
            raise ValueError(f'dims, depths and num_heads need one entry per stage, got {dims}, {depths}, {num_heads}')
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.patch_embed = ConvStem(in_chans, dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))
        self.layers = nn.ModuleList([
            HViT3Stage(dims[i], dims[i + 1] if i + 1 < len(dims) else None, depths[i], num_heads[i], mlp_ratio,
                       qkv_bias, dpr[i].tolist(), proj_drop_rate, ttt_kwargs)
            for i in range(len(dims))])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'layers.{i}.blocks')
                             for i in range(len(dims))]
        self.norm = nn.BatchNorm2d(dims[-1])
        self._init_head(num_classes, global_pool, drop_rate)
        self.apply(init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^layers\.(\d+)\.downsample', (99998,)),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, GridSize]:
        check_images(x, self.in_chans, ConvStem.stride, type(self).__name__)
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> BatchNorm-ed last-stage map ``[B, C, ~H/32, ~W/32]``."""
        x, grid = self._embed(x)
        for stage in self.layers:
            x, grid = stage(x, grid)
        return self.norm(tokens_to_map(x, grid))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage outputs (before merging; strides 4/8/16/32) at ``indices`` as ``NCHW`` or ``NHWC`` maps.
        ``norm`` applies the final BatchNorm to the last stage's map. With ``stop_early`` before the last stage, the
        returned final map is the last computed stage's output (no merge, no final norm)."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        x, grid = self._embed(x)
        stages = self.layers[:max_index + 1] if (stop_early or intermediates_only) else self.layers
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x, grid)
            if i in take_indices:
                y = tokens_to_map(x, grid)
                if norm and i == last:
                    y = self.norm(y)
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == 'NHWC' else y)
            if stage.downsample is not None and i < len(stages) - 1:
                x, grid = stage.downsample(x, grid)
        if intermediates_only:
            return intermediates
        final = tokens_to_map(x, grid)
        return (self.norm(final) if len(stages) == len(self.layers) else final), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the stages after the last wanted index (and that stage's merge, whose output nothing uses)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        if max_index < len(self.layers) - 1:
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = None
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.norm = nn.Identity()
            prune_head = True
        self._prune_norm_and_head(prune_norm, prune_head)
        return take_indices


def _cfg(**kwargs):
    return vit3_pretrained_cfg(pool_size=(7, 7), first_conv='patch_embed.conv.0.conv', **kwargs)


default_cfgs = generate_default_cfgs({
    'hvit3_tiny.in1k': _cfg(),
    'hvit3_small.in1k': _cfg(),
    'hvit3_base.in1k': _cfg(),
})


def _create_hvit3(variant: str, pretrained: bool = False, **kwargs) -> HViT3:
    return create_model(HViT3, variant, pretrained, tuple(range(len(kwargs.get('depths', (1, 1, 1, 1))))), **kwargs)


@register_model
def hvit3_tiny(pretrained: bool = False, **kwargs) -> HViT3:
    """H-ViT³-T: dims 64/128/320/512, depths 1/3/9/4 (28.70M params, 4.91 GMACs at 224²; recipe drop-path 0.2)."""
    args = dict(dims=(64, 128, 320, 512), depths=(1, 3, 9, 4), num_heads=(2, 4, 10, 16))
    return _create_hvit3('hvit3_tiny', pretrained, **dict(args, **kwargs))


@register_model
def hvit3_small(pretrained: bool = False, **kwargs) -> HViT3:
    """H-ViT³-S: dims 64/128/320/512, depths 2/6/18/8 (54.36M params, 8.74 GMACs; recipe drop-path 0.4)."""
    args = dict(dims=(64, 128, 320, 512), depths=(2, 6, 18, 8), num_heads=(2, 4, 10, 16))
    return _create_hvit3('hvit3_small', pretrained, **dict(args, **kwargs))


@register_model
def hvit3_base(pretrained: bool = False, **kwargs) -> HViT3:
    """H-ViT³-B: dims 96/192/448/640, depths 2/6/18/8 (94.37M params, 16.69 GMACs; recipe drop-path 0.6)."""
    args = dict(dims=(96, 192, 448, 640), depths=(2, 6, 18, 8), num_heads=(3, 6, 14, 20))
    return _create_hvit3('hvit3_base', pretrained, **dict(args, **kwargs))
