"""Plain ViT³ (Han et al., CVPR 2026): a DeiT-like column whose attention is replaced by the TTT mixer.

patch 16 -> [CPE, LN, TTT, LN, MLP] × depth -> LN -> mean over tokens -> Linear.
No class token and no absolute position embedding (position comes from the CPE and the conv inner model), so any
resolution and aspect ratio runs without changes; sides that are not multiples of 16 are zero-padded.

The network here is built from the same ``TTTBlock`` as H-ViT³ (:mod:`vittt.models.hvit3`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model

from ..layers import PatchEmbed, TTTBlock, tokens_to_map
from ._base import (ClassifierMixin, SingleGridMixin, check_images, create_model, init_weights, quarter_depth_indices,
                    run_blocks, vit3_pretrained_cfg)

__all__ = ['ViT3']


class ViT3(ClassifierMixin, SingleGridMixin, nn.Module):
    """Plain ViT³.

    Args:
        img_size: nominal input size (for ``pretrained_cfg`` only; the model runs at any size ≥ ``patch_size``).
        patch_size, in_chans, num_classes, global_pool ('avg' or ''), embed_dim, depth, num_heads, mlp_ratio,
        qkv_bias, drop_rate (before the head), proj_drop_rate (MLP dropout), drop_path_rate (linear over depth).
        ttt_kwargs: options of every TTT mixer (``inner_loss``, ``scale``, ``inner_lr``, ``grad_norm``, ...).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = 'avg', embed_dim: int = 192, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, ttt_kwargs: Optional[dict] = None):
        super().__init__()
        self.in_chans, self.patch_size = in_chans, patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()  # (also under torch.device('meta'))
        self.blocks = nn.ModuleList([
            TTTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps=1e-6, drop_path=dpr[i],
                     proj_drop=proj_drop_rate, ttt_kwargs=ttt_kwargs)
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_head(num_classes, global_pool, drop_rate)
        self.apply(init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        check_images(x, self.in_chans, self.patch_size, type(self).__name__)
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> normalised features ``[B, C, ceil(H/16), ceil(W/16)]``."""
        x, grid = self._embed(x)
        x = run_blocks(self.blocks, x, grid, self.grad_checkpointing)
        return tokens_to_map(self.norm(x), grid)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Block outputs at ``indices`` (last n if int, all if None) as ``NCHW`` (or ``NHWC`` / ``NLC``) maps,
        optionally through the final norm; also returns the ``forward_features`` output unless intermediates_only."""
        x, grid, intermediates = self._block_intermediates(x, indices, norm, stop_early, output_fmt,
                                                           intermediates_only)
        if intermediates_only:
            return intermediates
        return tokens_to_map(self.norm(x), grid), intermediates


def _cfg(**kwargs):
    return vit3_pretrained_cfg(pool_size=(14, 14), first_conv='patch_embed.proj', **kwargs)


default_cfgs = generate_default_cfgs({
    'vit3_tiny.in1k': _cfg(),
    'vit3_small.in1k': _cfg(),
    'vit3_base.in1k': _cfg(),
    'vit3_design_small': _cfg(),
})


def _create_vit3(variant: str, pretrained: bool = False, **kwargs) -> ViT3:
    return create_model(ViT3, variant, pretrained, quarter_depth_indices(kwargs.get('depth', 12)), **kwargs)


#: the ablation base's mixer: every head an MLP inner model, no extra conv head (spec A.6, docs/design_space.md)
DESIGN_BASE = dict(inner_model='mlp', conv_head=False)


@register_model
def vit3_tiny(pretrained: bool = False, **kwargs) -> ViT3:
    """ViT³-T: 192 wide, 12 blocks, 6 heads of 32 (6.15M params, 1.22 GMACs at 224²)."""
    return _create_vit3('vit3_tiny', pretrained, **dict(dict(embed_dim=192, depth=12, num_heads=6), **kwargs))


@register_model
def vit3_small(pretrained: bool = False, **kwargs) -> ViT3:
    """ViT³-S: 384 wide, 12 blocks, 6 heads of 64 (23.80M params, 4.81 GMACs at 224²; recipe drop-path 0.1)."""
    return _create_vit3('vit3_small', pretrained, **dict(dict(embed_dim=384, depth=12, num_heads=6), **kwargs))


@register_model
def vit3_base(pretrained: bool = False, **kwargs) -> ViT3:
    """ViT³-B: 768 wide, 12 blocks, 12 heads of 64 (90.06M params, 17.94 GMACs at 224²; recipe drop-path 0.4)."""
    return _create_vit3('vit3_base', pretrained, **dict(dict(embed_dim=768, depth=12, num_heads=12), **kwargs))


@register_model
def vit3_design_small(pretrained: bool = False, **kwargs) -> ViT3:
    """The base of ViT³'s six-insight ablations (spec A.6): DeiT-S with attention replaced by TTT, 384 wide, 12 blocks,
    6 heads of 64, patch 16, every head a 2-layer SiLU MLP inner model (ratio 1), dot-product loss, one full-batch
    epoch, inner lr 1, no extra conv head (22.69M params, 4.57 GMACs at 224²; docs/design_space.md says why).
    Every switch of the design space is a kwarg: ``inner_model``, ``inner_ratio``, ``inner_depth``,
    ``inner_residual``, ``inner_loss``, ``inner_epochs``, ``inner_batches``, ``inner_lr``, ``conv_head``."""
    return _create_vit3('vit3_design_small', pretrained, ttt_defaults=DESIGN_BASE,
                        **dict(dict(embed_dim=384, depth=12, num_heads=6), **kwargs))
