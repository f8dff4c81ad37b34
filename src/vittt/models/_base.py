"""What the ViT³ and H-ViT³ model classes share: input checks, weight init, the classifier head API."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ..layers.lean import chunks_on_cpu, sample_group

__all__ = ['check_images', 'init_weights', 'ClassifierMixin', 'run_block', 'run_blocks', 'vit3_pretrained_cfg',
           'create_model', 'quarter_depth_indices', 'SingleGridMixin']


def check_images(x: torch.Tensor, in_chans: int, min_size: int, model_name: str) -> None:
    """Raise a ValueError naming the problem when ``x`` is not a batch of images this model can take (not checked
    while ``torch.fx`` traces the model symbolically: its sizes are proxies then)."""
    if is_fx_symbolic_tracing():
        return
    if x.ndim != 4:
        raise ValueError(f'{model_name} expects images shaped [B, C, H, W], got a tensor of shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'{model_name} expects {in_chans}-channel images, got {x.shape[1]} channels '
                         f'(input shape {tuple(x.shape)})')
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(f'{model_name} needs images of at least {min_size}×{min_size} pixels, got {h}×{w}')


def init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc_normal(0.02) with zero bias, LayerNorm 1/0; convs keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ClassifierMixin:
    """Pooled linear head: ``global_pool`` in {'avg', ''}, ``head_drop``, ``head`` (Linear or Identity)."""

    num_classes: int
    global_pool: str
    num_features: int

    def _init_head(self, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self._check_pool(global_pool)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``x`` is the ``[B, C, H, W]`` output of ``forward_features``."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _prune_norm_and_head(self, prune_norm: bool, prune_head: bool) -> None:
        """The end of ``prune_intermediate_layers``: optionally drop the final norm and the classifier."""
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        """Nothing beyond timm's default (1-D parameters and biases): the official recipe decays W0 and CPE kernels."""
        return set()


def run_block(block: nn.Module, x: torch.Tensor, grid_size, checkpointing: bool) -> torch.Tensor:
    """``block(x, grid_size)``, as :func:`run_blocks` runs one block."""
    return run_blocks([block], x, grid_size, checkpointing)


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, grid_size, checkpointing: bool) -> torch.Tensor:
    """The blocks in turn on one token grid, each ``block(x, grid_size)``; in training with ``checkpointing``, each
    recomputed in backward. Eval inference on CPU runs the whole sequence over groups of samples (every block
    computes each sample on its own) whose widest activation (the blocks' widest linear layer over the tokens) stays
    under :data:`~vittt.layers.lean.CHUNK_ELEMENTS`, so no batch-sized buffer is page-faulted at every call (ViT³-T
    at batch 64 runs ~1.3× faster) and the groups are joined once per sequence, not once per block."""
    blocks = list(blocks)
    if checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        for block in blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, grid_size, use_reentrant=False)
        return x
    # (chunks_on_cpu first: it is False while a graph is traced, and only then may the sizes be read)
    if blocks and all(chunks_on_cpu(block, x) for block in blocks) and x.shape[0] > 1:
        widest = max((m.out_features for block in blocks for m in block.modules() if isinstance(m, nn.Linear)),
                     default=x.shape[-1])
        group = sample_group(x.shape[0], widest * x.shape[1])
        if group < x.shape[0]:
            outs = []
            for i in range(0, x.shape[0], group):
                part = x[i:i + group]
                for block in blocks:
                    part = block(part, grid_size)
                outs.append(part)
            return torch.cat(outs)
    for block in blocks:
        x = block(x, grid_size)
    return x


def require_weight_source(variant: str, pretrained: bool, kwargs: dict) -> None:
    """No weights are hosted for download: ``pretrained=True`` needs a local file (or state dict) in
    ``pretrained_cfg_overlay``. Say so, and how, instead of timm's generic message."""
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if pretrained and not any(overlay.get(k) for k in ('file', 'state_dict', 'url', 'hf_hub_id')):
        raise RuntimeError(
            f'no download location is known for {variant} weights: get the official checkpoint '
            f'(https://github.com/LeapLabTHU/ViTTT) and load it with timm.create_model({variant!r}, pretrained=True, '
            f"pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth')), or convert it once with "
            f'`vittt convert checkpoint.pth {variant}.safetensors` and pass that file')


def vit3_pretrained_cfg(**kwargs) -> dict:
    """timm ``pretrained_cfg`` of the official ImageNet-1k weights (eval: resize 256/224 · size, centre crop)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'crop_pct': 0.875, 'interpolation': 'bicubic',
        'fixed_input_size': False, 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'classifier': 'head',
        'paper_ids': 'arXiv:2512.01643', 'paper_name': 'ViT³: Unlocking Test-Time Training in Vision',
        'origin_url': 'https://github.com/LeapLabTHU/ViTTT', **kwargs}


#: the TTT mixer's design-space switches (spec A.6), accepted as model kwargs and passed to every mixer
DESIGN_SWITCHES = ('inner_model', 'inner_ratio', 'inner_depth', 'inner_residual', 'inner_loss', 'inner_epochs',
                   'inner_batches', 'inner_lr', 'conv_head')


def merge_design_switches(kwargs: dict, defaults: Optional[dict] = None) -> dict:
    """Move the design switches given as model kwargs (``timm.create_model('vit3_design_small', inner_loss='mse')``)
    into ``ttt_kwargs``, over the entry point's ``defaults``; a switch given both ways must agree."""
    ttt = dict(defaults or {})
    given = dict(kwargs.pop('ttt_kwargs', None) or {})
    for name in DESIGN_SWITCHES:
        if name in kwargs:
            value = kwargs.pop(name)
            if name in given and given[name] != value:
                raise ValueError(f'{name} given twice with different values: {value!r} and ttt_kwargs[{name!r}] = '
                                 f'{given[name]!r}')
            given[name] = value
    ttt.update(given)
    if ttt:
        kwargs['ttt_kwargs'] = ttt
    return kwargs


def create_model(model_cls, variant: str, pretrained: bool, default_out_indices, ttt_defaults: Optional[dict] = None,
                 **kwargs):
    """``build_model_with_cfg`` with the official-checkpoint filter and ``features_only`` via forward_intermediates;
    the design switches may be given as kwargs (:func:`merge_design_switches`)."""
    from .official import checkpoint_filter_fn

    merge_design_switches(kwargs, ttt_defaults)
    require_weight_source(variant, pretrained, kwargs)
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def quarter_depth_indices(depth: int):
    """Default ``features_only`` taps of a plain (single-stage) model: the blocks ending each quarter of the depth,
    e.g. (2, 5, 8, 11) for 12 blocks; fewer, distinct taps when depth < 4."""
    return tuple(sorted({max(0, depth * (i + 1) // 4 - 1) for i in range(4)}))


class SingleGridMixin:
    """``forward_intermediates`` helpers and pruning for single-stage models: ``self.blocks`` on one token grid after
    ``self._embed`` (``num_prefix_tokens`` class tokens first, excluded from the maps)."""

    num_prefix_tokens: int = 0

    def _block_intermediates(self, x: torch.Tensor, indices, norm: bool, stop_early: bool, output_fmt: str,
                             intermediates_only: bool):
        """Runs the blocks; returns ``(tokens after the last block run, grid, intermediates)``."""
        from timm.models._features import feature_take_indices
        from ..layers import tokens_to_map

        if output_fmt not in ('NCHW', 'NHWC', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW', 'NHWC' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        blocks = self.blocks[:max_index + 1] if (stop_early or intermediates_only) else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = run_block(block, x, grid, self.grad_checkpointing)
            if i in take_indices:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    y = tokens_to_map(y, grid)
                elif output_fmt == 'NHWC':
                    y = y.reshape(y.shape[0], grid[0], grid[1], -1)
                intermediates.append(y)
        return x, grid, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the blocks after the last wanted index (and optionally the norm and head)."""
        from timm.models._features import feature_take_indices

        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self._prune_norm_and_head(prune_norm, prune_head)
        return take_indices
