"""``DenseBackbone``: any timm model (ours or timm's) as a list of NCHW maps at strides 4 / 8 / 16 / 32.

* **Hierarchical models** (``hvit3_*``, ConvNeXt, PVTv2, ResNet, ...): the stage outputs at strides 4–32, taken
  through timm's ``forward_intermediates`` (the ``features_only`` machinery). H-ViT³ gets the official dense
  backbone's per-level output LayerNorms (``norm0 … norm3`` of the official detection / segmentation checkpoints,
  eps 1e-5): with them it reproduces LeapLabTHU's ``detection/mmdet/models/backbones/vittt.py`` at any input size.
* **Plain models** (``vit3_*``, ``vision_ttt_*``, timm ViTs: one stride-16 grid) go through a
  :class:`~vittt.dense.pyramid.SimpleFeaturePyramid`: ``'last'`` (ViTDet, from the last block after the final norm;
  the detection default) or ``'taps'`` (four quarter-depth taps; the segmentation choice).

``frozen_stages=k`` freezes the stem and the first ``k`` output levels (everything that runs before level ``k``'s
blocks, in parameter order) and keeps them in eval mode; ``norm_eval`` keeps every BatchNorm of the trunk in eval
mode. Both are off by default, as in the official recipes. ``set_grad_checkpointing`` reaches the trunk's blocks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .pyramid import LayerNorm2d, SimpleFeaturePyramid

__all__ = ['DenseBackbone', 'DENSE_STRIDES']

DENSE_STRIDES = (4, 8, 16, 32)


def _quarter_taps(depth: int) -> List[int]:
    from ..models._base import quarter_depth_indices
    taps = list(quarter_depth_indices(depth))
    if len(taps) < 4:
        raise ValueError(f"the 'taps' pyramid needs four distinct taps; the model has only {depth} blocks")
    return taps


def _is_hvit3(model: nn.Module) -> bool:
    from ..models.hvit3 import HViT3
    return isinstance(model, HViT3)


class DenseBackbone(nn.Module):
    """Images ``[B, C, H, W]`` -> ``list`` of NCHW maps at ``self.strides`` with ``self.out_channels`` channels.

    ``model``: a registered model name (``timm.create_model`` gets ``pretrained``, ``drop_path_rate`` and
    ``**timm_kwargs``) or a built timm-style model (with ``forward_intermediates`` and ``feature_info``).
    ``out_indices``: which of the model's feature levels to return (default: the last level of each stride 4–32 for
    hierarchical models; the last block, or the quarter-depth taps, for plain ones). ``strides``: the output strides
    wanted (default 4 / 8 / 16 / 32; RetinaNet and FCOS use 8 / 16 / 32). ``out_norm``: ``'layernorm'``
    (one LayerNorm2d per level), ``None``, or ``'auto'`` (LayerNorm for H-ViT³, as the official dense backbone; none
    for other models). ``pyramid``: ``'auto'`` (none for multi-stride models, ``'last'`` for single-stride ones),
    ``'none'``, ``'last'`` or ``'taps'``; ``pyramid_chs`` projects every pyramid level to that many channels
    (ViTDet's output convs); ``pyramid_norm`` ``'ln'`` or ``'bn'``; ``plain_pyramid``: what ``'auto'`` means for
    single-stride models. ``checkpoint``: a file or state dict loaded with
    :meth:`load_official` (official classification / detection / segmentation files or vittt ones).
    """

    def __init__(self, model: Union[str, nn.Module] = 'hvit3_tiny', out_indices: Optional[Sequence[int]] = None,
                 strides: Sequence[int] = DENSE_STRIDES, out_norm: Optional[str] = 'auto', pyramid: str = 'auto',
                 pyramid_chs: Optional[int] = None, pyramid_norm: str = 'ln', plain_pyramid: str = 'last',
                 pretrained: bool = False, checkpoint: Any = None,
                 drop_path_rate: Optional[float] = None, grad_checkpointing: bool = False, frozen_stages: int = -1,
                 norm_eval: bool = False, **timm_kwargs):
        super().__init__()
        from timm.models._features import FeatureGetterNet

        if isinstance(model, str):
            import timm
            self.model_name = model
            if drop_path_rate is not None:
                timm_kwargs['drop_path_rate'] = drop_path_rate
            model = timm.create_model(model, pretrained=pretrained, num_classes=0, **timm_kwargs)
        elif timm_kwargs or pretrained or drop_path_rate is not None:
            raise ValueError('pretrained, drop_path_rate and model keyword arguments need a model name, '
                             'not a built model')
        else:
            self.model_name = getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)
        if not hasattr(model, 'forward_intermediates') or not hasattr(model, 'feature_info'):
            raise TypeError(f'{type(model).__name__} has no forward_intermediates / feature_info: DenseBackbone '
                            f'takes timm models (timm >= 1.0)')
        info = list(model.feature_info)
        reductions = [int(i['reduction']) for i in info]
        single_stride = len(set(reductions)) == 1
        if pyramid == 'auto':
            pyramid = plain_pyramid if single_stride else 'none'
        if pyramid not in ('none', 'last', 'taps'):
            raise ValueError(f"pyramid must be 'auto', 'none', 'last' or 'taps', got {pyramid!r}")
        if pyramid != 'none' and not single_stride:
            raise ValueError(f'a feature pyramid is for single-stride models; {self.model_name} already has strides '
                             f'{sorted(set(reductions))}')
        if out_indices is None:
            if pyramid == 'last':
                out_indices = [len(info) - 1]
            elif pyramid == 'taps':
                out_indices = _quarter_taps(len(info))[-len(strides):]
            else:
                last_of = {r: i for i, r in enumerate(reductions)}
                absent = [s for s in strides if s not in last_of]
                if absent:
                    raise ValueError(f'{self.model_name} has no feature level at strides {absent} '
                                     f'(its strides: {reductions})')
                out_indices = [last_of[s] for s in strides]
        out_indices = [i % len(info) for i in out_indices]
        level_info = [info[i] for i in out_indices]
        self.is_hvit3 = _is_hvit3(model)
        self.trunk = FeatureGetterNet(model, out_indices=out_indices, norm=pyramid == 'last')
        self._stage_modules = [str(i['module']) for i in level_info]
        chs = [int(i.get('num_chs_norm', i['num_chs'])) if pyramid == 'last' else int(i['num_chs'])
               for i in level_info]

        if out_norm == 'auto':
            out_norm = 'layernorm' if self.is_hvit3 and pyramid == 'none' else None
        if out_norm not in (None, 'layernorm'):
            raise ValueError(f"out_norm must be 'auto', 'layernorm' or None, got {out_norm!r}")
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in chs) if out_norm else None
        if pyramid == 'none':
            self.pyramid = None
            self.out_channels = chs
            self.strides = [int(i['reduction']) for i in level_info]
        else:
            scales = [reductions[0] / s for s in strides]
            if pyramid == 'taps' and len(scales) != len(out_indices):
                raise ValueError(f"the 'taps' pyramid needs one tap per stride: {len(strides)} strides, "
                                 f'{len(out_indices)} taps')
            self.pyramid = SimpleFeaturePyramid(chs[0], pyramid, scales=scales, norm=pyramid_norm, out_chs=pyramid_chs)
            self.out_channels = list(self.pyramid.out_channels)
            self.strides = list(strides)
        self.feature_info = [dict(num_chs=c, reduction=s, module=f'level{i}')
                             for i, (c, s) in enumerate(zip(self.out_channels, self.strides))]
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        if checkpoint is not None:
            self.load_official(checkpoint)
        self._freeze()
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def body(self) -> nn.Module:
        """The wrapped timm model."""
        return self.trunk.model

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not hasattr(self.body, 'set_grad_checkpointing'):
            raise ValueError(f'{self.model_name} does not support gradient checkpointing')
        self.body.set_grad_checkpointing(enable)

    def _frozen_parameter_names(self) -> List[str]:
        k = self.frozen_stages
        names = [n for n, _ in self.trunk.named_parameters()]
        if k < 0:
            return []
        if k >= len(self._stage_modules):
            return names
        prefix = f'model.{self._stage_modules[k]}.'
        first = next((i for i, n in enumerate(names) if n.startswith(prefix)), None)
        if first is None:
            raise ValueError(f'frozen_stages={k}: no parameter under {prefix!r}')
        return names[:first]

    def _freeze(self) -> None:
        frozen = set(self._frozen_parameter_names())
        for name, param in self.trunk.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        self._frozen_modules = []
        if frozen:
            for name, module in self.trunk.named_modules():
                params = [f'{name}.{n}' if name else n for n, _ in module.named_parameters()]
                if params and all(p in frozen for p in params) and \
                        not any(name.startswith(m + '.') for m in self._frozen_modules):
                    self._frozen_modules.append(name)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            modules = dict(self.trunk.named_modules())
            for name in self._frozen_modules:
                modules[name].eval()
            if self.norm_eval:
                for module in self.trunk.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    # ------------------------------------------------------------------------------------------------ weights
    def load_official(self, checkpoint: Any, strict: bool = True) -> Dict[str, List[str]]:
        """Load an official classification / Mask R-CNN / UPerNet checkpoint (its ``backbone.*`` part), a vittt
        checkpoint of the same model, or a ``DenseBackbone`` state dict; see :func:`vittt.dense.convert`."""
        from .convert import load_dense_backbone
        return load_dense_backbone(self, checkpoint, strict=strict)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = self.trunk(x)
        if self.norms is not None:
            features = [norm(f) for norm, f in zip(self.norms, features)]
        if self.pyramid is not None:
            features = self.pyramid(features)
        return features
