"""Vision-TTT (Kong et al., arXiv 2603.00518): a plain column of mini-batch TTT mixers with SwiGLU MLPs.

patch 16 -> [Norm -> VisionTTTMixer (dual-dataset mini-batch TTT), Norm -> SwiGLU] × depth -> Norm -> mean pool
(or class token) -> Linear. No absolute position embedding (the Q/K convolutions and the scan order carry position),
so every resolution and aspect ratio runs; sides that are not multiples of 16 are zero-padded on the right/bottom.

Like timm's VisionTransformer, ``forward_features`` returns tokens ``[B, P + N, C]`` (P = 1 with a class token),
and ``forward_intermediates`` returns patch-token maps.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn
from timm.layers import DropPath, RmsNorm, SwiGLU
from timm.models import generate_default_cfgs, register_model

from ..layers import GridSize, PatchEmbed, VisionTTTMixer, residual
from ..layers.vision_ttt import TTTInnerState
from ..ops._capture import eval_inference
from ..ops.onednn import activation_name, linear_act, linear_layer, linear_mul, plain_linear
from ._base import (ClassifierMixin, SingleGridMixin, check_images, create_model, init_weights, quarter_depth_indices,
                    run_blocks, vit3_pretrained_cfg)

__all__ = ['VisionTTT', 'VisionTTTBlock']


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == 'layernorm':
        return nn.LayerNorm(dim, eps=1e-6)
    if kind == 'rmsnorm':
        return RmsNorm(dim, eps=1e-6)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class VisionTTTBlock(nn.Module):
    """``x + DropPath(Mixer(Norm(x)))``, ``x + DropPath(SwiGLU(Norm(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 8 / 3, norm: str = 'layernorm',
                 drop_path: float = 0.0, proj_drop: float = 0.0, num_prefix_tokens: int = 0,
                 mixer_kwargs: Optional[dict] = None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.norm1 = _norm(norm, dim)
        self.mixer = VisionTTTMixer(dim, num_heads, **(mixer_kwargs or {}))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _norm(norm, dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        if eval_inference(self):
            # eval inference: each residual sum in its branch's fresh output, the SwiGLU through oneDNN post-ops
            x = residual(self.mixer(self.norm1(x), grid_size, self.num_prefix_tokens), x)
            return residual(_swiglu_inference(self.mlp, self.norm2(x)), x)
        x = x + self.drop_path1(self.mixer(self.norm1(x), grid_size, self.num_prefix_tokens))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _swiglu_inference(mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """timm's ``SwiGLU`` in eval without autograd: ``act(x W_g) ⊙ (x W_x)`` as two matmuls with the activation and
    the product as oneDNN post-ops (:mod:`vittt.ops.onednn`; elsewhere in place), so no fresh maps are written for
    them: Vittt-T at 1280², 731 → 705 ms. Same function as the module; other modules run as they are."""
    act = activation_name(getattr(mlp, 'act', None))
    if type(mlp) is not SwiGLU or act is None or not (plain_linear(mlp.fc1_g) and plain_linear(mlp.fc1_x)):
        return mlp(x)
    gate = linear_act(x, mlp.fc1_g.weight, mlp.fc1_g.bias, act, getattr(mlp.act, 'approximate', 'none'))
    return linear_layer(mlp.fc2, mlp.norm(linear_mul(x, mlp.fc1_x.weight, mlp.fc1_x.bias, gate)))


class VisionTTT(ClassifierMixin, SingleGridMixin, nn.Module):
    """Vittt.

    Args:
        img_size: nominal input size (``pretrained_cfg`` only; any size ≥ ``patch_size`` runs).
        patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio (SwiGLU hidden / dim),
        norm ('layernorm' or 'rmsnorm'), drop_rate, proj_drop_rate, drop_path_rate.
        global_pool: 'avg' (mean over patch tokens, default), 'token' (adds a class token) or '' (no pooling).
        mixer_kwargs: :class:`~vittt.layers.VisionTTTMixer` switches (inner model, mini_batch_size, scans, merge, ...).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = 'avg', embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 8 / 3, norm: str = 'layernorm', drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, mixer_kwargs: Optional[dict] = None):
        super().__init__()
        self.in_chans, self.patch_size = in_chans, patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if global_pool == 'token' else 0
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.num_prefix_tokens else None
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()  # (also under torch.device('meta'))
        self.blocks = nn.ModuleList([
            VisionTTTBlock(embed_dim, num_heads, mlp_ratio, norm, dpr[i], proj_drop_rate, self.num_prefix_tokens,
                           mixer_kwargs)
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        self.norm = _norm(norm, embed_dim)
        self._init_head(num_classes, global_pool, drop_rate)
        self.apply(init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool not in ('avg', 'token', ''):
            raise ValueError(f"global_pool must be 'avg', 'token' or '' (no pooling), got {global_pool!r}")

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool == 'token' and not self.num_prefix_tokens:
            raise ValueError("global_pool='token' needs a model built with a class token (global_pool='token')")
        super().reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^cls_token|^patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    def _embed(self, x: torch.Tensor):
        check_images(x, self.in_chans, self.patch_size, type(self).__name__)
        x, grid = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x, grid

    def no_weight_decay(self):
        """The class token and the inner models' initial biases and LayerNorm affine parameters: biases and norm
        parameters shaped ``[heads, 1, d]``, which timm's 1-D rule does not see. The initial weights W0 and the
        convolution kernels are decayed, as ViT³'s recipe decays its W0 and CPE kernels."""
        names = {'cls_token'} if self.cls_token is not None else set()
        for name, module in self.named_modules():
            if isinstance(module, TTTInnerState):
                names |= {f'{name}.{p}' for p, _ in module.named_parameters(recurse=False) if not p.startswith('w')}
        return names

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> normalised tokens ``[B, P + ceil(H/16)·ceil(W/16), C]``."""
        x, grid = self._embed(x)
        x = run_blocks(self.blocks, x, grid, self.grad_checkpointing)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Patch tokens after the blocks at ``indices`` as ``NCHW`` / ``NHWC`` maps or ``NLC``; the final output
        (unless ``intermediates_only``) is ``forward_features``' token tensor."""
        x, _, intermediates = self._block_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def _cfg(**kwargs):
    return vit3_pretrained_cfg(first_conv='patch_embed.proj', paper_ids='arXiv:2603.00518',
                               paper_name='Vision-TTT: Efficient and Expressive Visual Representation Learning '
                                          'with Test-Time Training', origin_url='', **kwargs)


default_cfgs = generate_default_cfgs({
    'vision_ttt_tiny.untrained': _cfg(),
    'vision_ttt_small.untrained': _cfg(),
    'vision_ttt_base.untrained': _cfg(),
})


def _create_vision_ttt(variant: str, pretrained: bool = False, **kwargs) -> VisionTTT:
    return create_model(VisionTTT, variant, pretrained, quarter_depth_indices(kwargs.get('depth', 12)), **kwargs)


def _sized(kwargs: dict, mini_batch_size: int, **arch) -> dict:
    mixer = dict(dict(mini_batch_size=mini_batch_size), **(kwargs.pop('mixer_kwargs', None) or {}))
    return dict(arch, mixer_kwargs=mixer, **kwargs)


@register_model
def vision_ttt_tiny(pretrained: bool = False, **kwargs) -> VisionTTT:
    """Vittt-T: 192 wide, 12 blocks, 3 heads of 64, mini-batch 64 (FLOPs calibrated vs DeiT-T at 1280²,
    docs/vision_ttt.md)."""
    return _create_vision_ttt('vision_ttt_tiny', pretrained,
                              **_sized(kwargs, 64, embed_dim=192, depth=12, num_heads=3))


@register_model
def vision_ttt_small(pretrained: bool = False, **kwargs) -> VisionTTT:
    """Vittt-S: 384 wide, 12 blocks, 6 heads of 64, mini-batch 128 (calibrated, docs/vision_ttt.md)."""
    return _create_vision_ttt('vision_ttt_small', pretrained,
                              **_sized(kwargs, 128, embed_dim=384, depth=12, num_heads=6))


@register_model
def vision_ttt_base(pretrained: bool = False, **kwargs) -> VisionTTT:
    """Vittt-B: 768 wide, 12 blocks, 12 heads of 64, mini-batch 256 (calibrated, docs/vision_ttt.md)."""
    return _create_vision_ttt('vision_ttt_base', pretrained,
                              **_sized(kwargs, 256, embed_dim=768, depth=12, num_heads=12))
