"""Semantic segmentation: UPerNet from segmentation-models-pytorch over a :class:`~vittt.dense.DenseBackbone`.

:class:`UPerNet` is an ``smp`` segmentation model (``smp.base.SegmentationModel``: smp's ``UPerNetDecoder`` and
``SegmentationHead``, smp's initialisation and hub mix-in) whose encoder is a ``DenseBackbone``: hierarchical models
as they are, plain models through the multi-tap simple feature pyramid. smp's own ``smp.UPerNet('tu-hvit3_tiny')``
works too for hierarchical models; this class adds what the official configs need:

* ``head_mode='mmseg'`` (default): the head of the official mmseg ``UPerHead`` (spec dense.md §3.4): dropout 0.1
  before the 1×1 classifier and logits resized to the input with ``align_corners=False``; smp's per-level
  LayerNorms (where the official backbone's ``norm0..3`` sit) get eps 1e-5. ``'smp'``: smp's head (×4 upsampling,
  ``align_corners=True``).
* an auxiliary FCN head on the stride-16 level (mmseg's ``FCNHead``: 3×3 conv 256, BN, ReLU, dropout 0.1, 1×1
  classifier), returned beside the logits in training mode (loss weight 0.4 in the official recipe);
* any input size: the image is padded to a multiple of ``pad`` (bottom / right, zeros) and the logits cropped back;
  ``pad='auto'`` pads only for backbones that need it (H-ViT³ takes any size, as the official test pipeline does).

Needs the ``dense`` extra (``pip install 'vittt[dense]'``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DenseBackbone

__all__ = ['UPerNet', 'build_upernet', 'FCNHead']


try:
    import segmentation_models_pytorch as smp
    from segmentation_models_pytorch.base import SegmentationHead
    from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
except ImportError as e:  # pragma: no cover - the dense extra is part of dev
    raise ImportError("semantic segmentation needs segmentation-models-pytorch: pip install 'vittt[dense]'") from e


class _Encoder(nn.Module):
    """A ``DenseBackbone`` behind smp's encoder contract: ``forward`` returns ``[x, (empty stride 2), s4, s8, s16,
    s32]`` and ``out_channels`` matches."""

    def __init__(self, backbone: DenseBackbone):
        super().__init__()
        if list(backbone.strides) != [4, 8, 16, 32]:
            raise ValueError(f'UPerNet needs maps at strides 4 / 8 / 16 / 32, the backbone gives {backbone.strides}')
        self.backbone = backbone
        self.out_channels = [3, 0] + list(backbone.out_channels)
        self.output_stride = 32

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [x, x[:, :0, ::2, ::2]] + list(self.backbone(x))


class FCNHead(nn.Module):
    """mmseg's ``FCNHead`` with one convolution (the official UPerNet auxiliary head)."""

    def __init__(self, in_chs: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_chs, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.conv(x)))


class UPerNet(smp.base.SegmentationModel):
    """Images ``[B, 3, H, W]`` -> logits ``[B, num_classes, H, W]`` (plus the auxiliary logits in training mode
    when ``aux_head``). See the module docstring."""

    requires_divisible_input_shape = False

    def __init__(self, backbone: DenseBackbone, num_classes: int, decoder_channels: int = 512,
                 aux_head: bool = True, head_mode: str = 'mmseg', pad: Union[str, int, None] = 'auto'):
        super().__init__()
        if head_mode not in ('mmseg', 'smp'):
            raise ValueError(f"head_mode must be 'mmseg' or 'smp', got {head_mode!r}")
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.num_classes, self.head_mode = num_classes, head_mode
        self.encoder = _Encoder(backbone)
        self.decoder = UPerNetDecoder(encoder_channels=self.encoder.out_channels, encoder_depth=5,
                                      decoder_channels=decoder_channels, use_norm='batchnorm')
        if head_mode == 'mmseg':
            for norm in self.decoder.feature_norms:
                norm.eps = 1e-5
        self.dropout = nn.Dropout2d(0.1) if head_mode == 'mmseg' else nn.Identity()
        self.segmentation_head = SegmentationHead(decoder_channels, num_classes, kernel_size=1,
                                                  upsampling=1 if head_mode == 'mmseg' else 4)
        self.classification_head = None
        self.aux_head = FCNHead(backbone.out_channels[2], num_classes) if aux_head else None
        if pad == 'auto':
            pad = None if backbone.is_hvit3 and backbone.pyramid is None else 32
        self.pad = pad
        self.name = f'upernet-{backbone.model_name}'
        self.initialize()

    @property
    def backbone(self) -> DenseBackbone:
        return self.encoder.backbone

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        if self.pad:
            x = F.pad(x, (0, -w % self.pad, 0, -h % self.pad))
        features = self.encoder(x)
        logits = self.segmentation_head(self.dropout(self.decoder(features)))
        size = x.shape[-2:]
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode='bilinear', align_corners=False)
        logits = logits[..., :h, :w]
        if self.aux_head is None or not self.training:
            return logits
        aux = self.aux_head(self.decoder.feature_norms[2](features[4]))
        aux = F.interpolate(aux, size=size, mode='bilinear', align_corners=False)[..., :h, :w]
        return logits, aux


def build_upernet(backbone: Union[str, DenseBackbone, nn.Module], num_classes: int, decoder_channels: int = 512,
                  aux_head: bool = True, head_mode: str = 'mmseg', pad: Union[str, int, None] = 'auto',
                  backbone_kwargs: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """:class:`UPerNet` over ``backbone`` (a model name, a built timm model or a ``DenseBackbone``; plain models get
    the ``'taps'`` pyramid). ``num_classes`` counts every class predicted (150 for ADE20K; 11 for the offline set,
    background included). ``backbone_kwargs`` go to :class:`DenseBackbone` (``checkpoint=``, ``drop_path_rate=``,
    model arguments)."""
    if not isinstance(backbone, DenseBackbone):
        kwargs_b = dict(backbone_kwargs or {})
        kwargs_b.setdefault('out_norm', None)  # the decoder's per-level LayerNorms play that role
        kwargs_b.setdefault('plain_pyramid', 'taps')
        if isinstance(backbone, str):
            import timm
            if not timm.is_model(backbone):
                raise ValueError(f'unknown backbone {backbone!r}: not a registered timm model')
        backbone = DenseBackbone(backbone, **kwargs_b)
    return UPerNet(backbone, num_classes, decoder_channels, aux_head, head_mode, pad, **kwargs)
