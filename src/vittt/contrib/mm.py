"""Experimental mmdet 3.x / mmseg 1.x plugin: vittt backbones in OpenMMLab configs. NOT run in CI.

mmdet / mmseg import compiled mmcv ops (``mmcv._ext``) at model-building time, which the project's build machine
cannot provide (spec dense.md §4.3), so this module is tested only as a plain ``nn.Module``. For users who have a
working mmcv::

    custom_imports = dict(imports=['vittt.contrib.mm'], allow_failed_imports=False)
    model = dict(backbone=dict(_delete_=True, type='VitttBackbone', model='hvit3_tiny', drop_path_rate=0.1,
                               grad_checkpointing=True,
                               init_cfg=dict(type='Pretrained', checkpoint='H-ViTTT-T.pth')),
                 neck=dict(in_channels=[64, 128, 320, 512]))

``VitttBackbone`` is a :class:`~vittt.dense.DenseBackbone` (the official per-level norms included) returning a tuple
of maps. It takes the official dense layout directly: a state dict with the official key names (as in the official
Mask R-CNN / UPerNet checkpoints, which mmengine's ``load_checkpoint`` hands to the backbone with ``backbone.``
stripped) is converted on load, so official checkpoints load unchanged; ``init_cfg=dict(type='Pretrained',
checkpoint=...)`` loads a classification or dense file through the strict converter.
"""
from __future__ import annotations

from typing import Any, Optional

from ..dense import DenseBackbone

__all__ = ['VitttBackbone']


class VitttBackbone(DenseBackbone):
    """``DenseBackbone(model, **kwargs)`` with mmdet's backbone conventions: ``forward`` returns a tuple,
    ``init_weights()`` loads ``init_cfg['checkpoint']`` (official classification / det / seg or vittt files)."""

    def __init__(self, model: str = 'hvit3_tiny', init_cfg: Optional[dict] = None, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.init_cfg = init_cfg
        self._register_load_state_dict_pre_hook(_official_keys_hook, with_module=True)

    def init_weights(self) -> None:
        if self.init_cfg and self.init_cfg.get('checkpoint'):
            self.load_official(self.init_cfg['checkpoint'])

    def forward(self, x):
        return tuple(super().forward(x))


def _official_keys_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """Convert official-layout keys under ``prefix`` (``layers.*``, ``patch_embed.*``, ``norm{i}.*``) in place."""
    from ..dense.convert import dense_backbone_state_dict

    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not own or any(k.startswith(('trunk.', 'norms.', 'pyramid.')) for k in own):
        return  # already our layout (or nothing for us)
    converted, _ = dense_backbone_state_dict(own, module, check=False)
    for key in own:
        del state_dict[prefix + key]
    state_dict.update({prefix + k: v for k, v in converted.items()})


def _register() -> None:
    """Register ``VitttBackbone`` into mmdet's and mmseg's MODELS registries when they import."""
    for registry_module in ('mmdet.registry', 'mmseg.registry'):
        try:
            registry = __import__(registry_module, fromlist=['MODELS']).MODELS
        except Exception:  # not installed, or mmcv without its ops: nothing to register into
            continue
        registry.register_module(name='VitttBackbone', module=VitttBackbone, force=True)


_register()
