"""Official detection / segmentation checkpoints -> vittt dense modules.

**Backbone** (:func:`dense_backbone_state_dict`, :func:`load_dense_backbone`). An official Mask R-CNN or UPerNet file
holds the H-ViT³ trunk under ``backbone.*`` in the layout of the classification checkpoints (``attn.w1/w2/w3``, the
fixed-size ``attn.rope.rotations`` tables), plus the per-level output norms ``backbone.norm{0..3}``. They map to a
:class:`~vittt.dense.DenseBackbone` as

* ``backbone.<key>`` -> ``trunk.model.<key>`` after the classification renames (``attn.w1`` ->
  ``attn.inner.0.w1`` ...); every RoPE table is checked against the 2-D RoPE layout and dropped (ours is computed
  for each grid);
* ``backbone.norm{i}.*`` -> ``norms.{i}.*``.

A classification file (official or vittt) loads too: its classifier and final norm are dropped and the level norms
keep their initialisation (weight 1, bias 0), reported as ``initialised``. Everything else must match exactly: the
error lists every missing, unexpected and mis-shaped key.

**Heads** (spec dense.md §3.3–3.4). :func:`detect_dense_task` tells the layouts apart by their key groups;
:func:`convert_maskrcnn_state_dict` maps an mmdet Mask R-CNN (or Faster R-CNN) file onto torchvision's ``MaskRCNN``
(``FasterRCNN``) from :func:`~vittt.dense.build_maskrcnn`, :func:`convert_upernet_state_dict` an mmseg UPerNet file
onto :class:`~vittt.dense.UPerNet`, both strictly. :func:`convert_dense_file` / :func:`inspect_checkpoint` are the
``vittt convert`` command. mmengine files (``meta``, ``message_hub`` ...) are read with the tensor-only loader, and
the class names come from ``meta.dataset_meta.classes``.

Mask R-CNN (mmdet -> torchvision):

=============================================  ==================================================================
``neck.lateral_convs.{l}.conv.*``              ``backbone.fpn.inner_blocks.{l}.0.*``
``neck.fpn_convs.{l}.conv.*``                  ``backbone.fpn.layer_blocks.{l}.0.*``
``rpn_head.rpn_conv / rpn_cls / rpn_reg``      ``rpn.head.conv.0.0 / cls_logits / bbox_pred``
``roi_head.bbox_head.shared_fcs.{0,1}``        ``roi_heads.box_head.fc6 / fc7``
``roi_head.bbox_head.fc_cls`` [K+1, D]         ``roi_heads.box_predictor.cls_score``: background row (mmdet's last)
                                               moved first
``roi_head.bbox_head.fc_reg`` [4K, D]          ``roi_heads.box_predictor.bbox_pred`` [4(K+1), D]: zero rows 0–3
                                               (background) prepended
``roi_head.mask_head.convs.{i}.conv.*``        ``roi_heads.mask_head.{i}.0.*``
``roi_head.mask_head.upsample``                ``roi_heads.mask_predictor.conv5_mask``
``roi_head.mask_head.conv_logits`` [K, ...]    ``roi_heads.mask_predictor.mask_fcn_logits`` [K+1, ...]: zero
                                               background row prepended
=============================================  ==================================================================

UPerNet (mmseg -> smp): ``decode_head.psp_modules.{p}.1.{conv,bn}`` -> ``decoder.psp.blocks.{p}.1.{0,1}``,
``bottleneck`` -> ``decoder.psp.out_conv``, ``lateral_convs.{j}`` -> ``decoder.fpn_lateral_blocks.{L-1-j}
.conv_norm_relu`` and ``fpn_convs.{j}`` -> ``decoder.fpn_conv_blocks.{L-1-j}`` (smp orders them coarse to fine),
``fpn_bottleneck`` -> ``decoder.fusion_block``, ``conv_seg`` -> ``segmentation_head.0``, ``backbone.norm{i}`` ->
``decoder.feature_norms.{i}``, ``auxiliary_head.convs.0.{conv,bn}`` / ``conv_seg`` -> ``aux_head.conv.{0,1}`` /
``aux_head.conv_seg`` (dropped, and reported, for a model built with ``aux_head=False``).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..models.official import CheckpointError, check_state_dict, convert_official_state_dict, \
    detect_official_variant, load_checkpoint_file, unwrap_state_dict

__all__ = ['dense_backbone_state_dict', 'load_dense_backbone', 'read_checkpoint', 'split_prefix', 'DENSE_TASKS',
           'detect_dense_task', 'convert_maskrcnn_state_dict', 'convert_upernet_state_dict', 'load_official_detector',
           'load_official_segmenter', 'class_names', 'build_model_for_checkpoint', 'convert_dense_file',
           'inspect_checkpoint', 'format_inspection']

#: what :func:`detect_dense_task` returns
DENSE_TASKS = ('maskrcnn', 'fasterrcnn', 'upernet', 'backbone', 'classification')

_LEVEL_NORM = re.compile(r'^norm(\d+)\.(weight|bias)$')
_CLASSIFIER_PREFIXES = ('head.', 'norm.', 'fc_norm.', 'head_drop.')


def read_checkpoint(checkpoint: Any, trust_pickle: bool = False) -> Dict[str, Any]:
    """A path (``.pth`` / ``.safetensors``) or an already loaded object -> the loaded object. Pickles holding
    Python objects besides tensors (mmengine checkpoints) are read with the tensor-only loader (one warning)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return load_checkpoint_file(checkpoint, trust_pickle=trust_pickle, tensors_only='auto')
    return checkpoint


def split_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries under ``prefix`` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _pruned(key: str, body_keys, body) -> bool:
    """Whether ``key`` of a classification file belongs to a part of the model the trunk pruned."""
    if key.startswith(_CLASSIFIER_PREFIXES):
        return True
    match = re.match(r'^(layers|stages|blocks)\.(\d+)\.', key)
    if match and not any(k.startswith(match.group(0)) for k in body_keys):
        return True  # a stage (or block) after the last one used
    match = re.match(r'^layers\.(\d+)\.downsample\.', key)
    if match and getattr(body, 'layers', None) is not None and int(match.group(1)) == len(body.layers) - 1:
        return True  # the last kept stage's merge, whose output nothing uses
    return False


def dense_backbone_state_dict(checkpoint: Any, backbone, check: bool = True,
                              split_norms: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state_dict, report)`` for ``backbone.load_state_dict``; ``report`` lists what was ``dropped`` and which
    level norms were ``initialised`` (absent from the file). Raises :class:`CheckpointError` listing every key that
    does not fit.

    ``split_norms=True`` leaves the official per-level norms (``norm{i}.*``) out of the state dict and returns them
    in ``report['level_norms']`` (``{'0.weight': ..., ...}``), for a model that applies them elsewhere (UPerNet's
    ``decoder.feature_norms``, with ``backbone`` built with ``out_norm=None``)."""
    raw = read_checkpoint(checkpoint)
    state_dict = unwrap_state_dict(raw, use_ema=False)  # the official dense code loads the non-EMA weights
    if any(k.startswith('trunk.') for k in state_dict):  # already a DenseBackbone state dict
        if check:
            check_state_dict(state_dict, backbone)
        return state_dict, dict(dropped=[], initialised=[])
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = split_prefix(state_dict, 'backbone.')
    norms, trunk = {}, {}
    for key, value in state_dict.items():
        match = _LEVEL_NORM.match(key)
        if match:
            norms[f'{match.group(1)}.{match.group(2)}'] = value
        else:
            trunk[key] = value
    trunk = convert_official_state_dict(trunk)  # renames; RoPE tables checked and dropped (no-op on vittt files)
    body = backbone.body
    body_keys = set(body.state_dict())
    dropped = sorted(k for k in trunk if k not in body_keys and _pruned(k, body_keys, body))
    out = {f'trunk.model.{k}': v for k, v in trunk.items() if k not in dropped}
    initialised: List[str] = []
    extra: Dict[str, Any] = {}
    if split_norms:
        extra['level_norms'], norms = norms, {}
    if backbone.norms is not None:
        if norms:
            out.update({f'norms.{k}': v for k, v in norms.items()})
        else:
            initialised = sorted(k for k in backbone.state_dict() if k.startswith('norms.'))
            out.update({k: v for k, v in backbone.state_dict().items() if k.startswith('norms.')})
    elif norms and not split_norms:
        raise CheckpointError(f'the checkpoint has per-level output norms ({", ".join(sorted(norms))}) but this '
                              f'DenseBackbone was built with out_norm=None')
    if backbone.pyramid is not None:  # a plain-model checkpoint never holds our pyramid: it starts fresh
        pyramid = {k: v for k, v in backbone.state_dict().items() if k.startswith('pyramid.')}
        if not any(k.startswith('pyramid.') for k in state_dict):
            initialised += sorted(pyramid)
            out.update(pyramid)
    if check:
        check_state_dict(out, backbone)
    return out, dict(dropped=dropped, initialised=initialised, **extra)


def load_dense_backbone(backbone, checkpoint: Any, strict: bool = True) -> Dict[str, List[str]]:
    """Load ``checkpoint`` into ``backbone`` (see the module docstring); returns the report. ``strict=False`` loads
    whatever fits and adds the ``missing`` and ``unexpected`` keys to the report instead of raising."""
    state_dict, report = dense_backbone_state_dict(checkpoint, backbone, check=strict)
    result = backbone.load_state_dict(state_dict, strict=strict)
    if not strict:
        report.update(missing=list(result.missing_keys), unexpected=list(result.unexpected_keys))
    return report


# ------------------------------------------------------------------------------------------------ layouts
_DET_GROUPS = {'neck': {'lateral_convs', 'fpn_convs'}, 'rpn_head': {'rpn_conv', 'rpn_cls', 'rpn_reg'},
               'roi_head': {'bbox_head', 'mask_head'}, 'roi_head.bbox_head': {'shared_fcs', 'fc_cls', 'fc_reg'},
               'roi_head.mask_head': {'convs', 'upsample', 'conv_logits'}}
_SEG_GROUPS = {'decode_head': {'psp_modules', 'bottleneck', 'lateral_convs', 'fpn_convs', 'fpn_bottleneck',
                               'conv_seg'},
               'auxiliary_head': {'convs', 'conv_seg'}}
_IGNORED_TOPS = ('data_preprocessor',)  # mmengine's (normally non-persistent) normalisation buffers
_MULTI_STAGE = re.compile(r'^roi_head\.(bbox_head|mask_head|bbox_roi_extractor|mask_roi_extractor)\.\d+\.')


def _subgroups(keys, prefix: str) -> set:
    return {k[len(prefix) + 1:].split('.', 1)[0] for k in keys if k.startswith(prefix + '.')}


def _unknown_groups(keys, table) -> List[str]:
    return sorted(f'{prefix}.{g}' for prefix, known in table.items() for g in _subgroups(keys, prefix) - known)


def _state_dict_of(checkpoint: Any) -> Dict[str, torch.Tensor]:
    return unwrap_state_dict(read_checkpoint(checkpoint), use_ema=False)


def detect_dense_task(checkpoint: Any) -> str:
    """``'maskrcnn'``, ``'fasterrcnn'``, ``'upernet'``, ``'backbone'`` or ``'classification'`` from the key groups
    of a (wrapped) state dict or file: mmdet's ``backbone.`` + ``neck.`` + ``rpn_head.`` + ``roi_head.`` (with a
    ``mask_head``: Mask R-CNN; without: Faster R-CNN), mmseg's ``backbone.`` + ``decode_head.`` (UPerNet), only
    ``backbone.``; vittt's own converted layouts (torchvision ``roi_heads.``, smp ``encoder.`` + ``decoder.``,
    ``DenseBackbone`` ``trunk.``) too. Other detector / segmenter layouts (Cascade R-CNN's
    ``roi_head.bbox_head.{0,1,2}``, single-stage heads, other decode heads) raise :class:`CheckpointError`."""
    state_dict = _state_dict_of(checkpoint)
    keys = list(state_dict)
    tops = {k.split('.', 1)[0] for k in keys} - set(_IGNORED_TOPS)
    if 'roi_heads' in tops or 'rpn' in tops:  # torchvision (already converted)
        return 'maskrcnn' if any(k.startswith('roi_heads.mask_predictor.') for k in keys) else 'fasterrcnn'
    if {'encoder', 'decoder'} <= tops:  # smp / vittt UPerNet (already converted)
        return 'upernet'
    if 'trunk' in tops:  # a DenseBackbone state dict
        return 'backbone'
    if 'backbone' not in tops:
        return 'classification'
    rest = tops - {'backbone'}
    if not rest:
        return 'backbone'
    if 'decode_head' in rest:
        unknown = sorted(rest - {'decode_head', 'auxiliary_head'}) + _unknown_groups(keys, _SEG_GROUPS)
        if unknown:
            raise CheckpointError(f'unsupported segmentation layout: {", ".join(unknown)}; vittt converts mmseg '
                                  f'UPerNet files (decode_head: {", ".join(sorted(_SEG_GROUPS["decode_head"]))}; '
                                  f'auxiliary_head: FCN with one conv)')
        return 'upernet'
    if rest == {'neck', 'rpn_head', 'roi_head'}:
        staged = sorted({'.'.join(k.split('.')[:3]) for k in keys if _MULTI_STAGE.match(k)})
        if staged:
            raise CheckpointError(f'unsupported detector layout: multi-stage RoI heads ({", ".join(staged[:6])}: '
                                  f'Cascade R-CNN / HTC); vittt converts Mask R-CNN and Faster R-CNN')
        unknown = _unknown_groups(keys, _DET_GROUPS)
        if unknown:
            raise CheckpointError(f'unsupported detector layout: {", ".join(unknown)}; vittt converts Mask R-CNN / '
                                  f'Faster R-CNN files with an FPN neck, a standard RPN head, a two-FC box head and '
                                  f'an FCN mask head')
        if 'bbox_head' not in _subgroups(keys, 'roi_head'):
            raise CheckpointError('unsupported detector layout: roi_head has no bbox_head')
        return 'maskrcnn' if 'mask_head' in _subgroups(keys, 'roi_head') else 'fasterrcnn'
    raise CheckpointError(f'unsupported detector layout: top-level groups {", ".join(sorted(tops))}; vittt converts '
                          f'Mask R-CNN / Faster R-CNN (backbone, neck, rpn_head, roi_head), UPerNet (backbone, '
                          f'decode_head, auxiliary_head) and backbone-only (backbone.*) files')


def class_names(checkpoint: Any) -> Optional[List[str]]:
    """The class names an mmengine checkpoint carries (``meta.dataset_meta.classes``; mmdet 2's ``meta.CLASSES``),
    or those in a vittt ``.safetensors`` file's metadata; None when absent."""
    if isinstance(checkpoint, (str, os.PathLike)) and os.fspath(checkpoint).endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(os.fspath(checkpoint), 'pt') as f:
            names = (f.metadata() or {}).get('classes')
        return json.loads(names) if names else None
    raw = read_checkpoint(checkpoint)
    meta = raw.get('meta') if isinstance(raw, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    dataset_meta = meta.get('dataset_meta')
    names = dataset_meta.get('classes') if isinstance(dataset_meta, Mapping) else meta.get('CLASSES')
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


# ------------------------------------------------------------------------------------------------ head mapping
_PARAM = r'(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)$'


def _background_first(w: torch.Tensor) -> torch.Tensor:  # mmdet: background is the last class
    return torch.cat([w[-1:], w[:-1]])


def _zero_rows(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: torch.cat([w.new_zeros((n,) + tuple(w.shape[1:])), w])


_MMDET_RULES = tuple((re.compile(f'^{pattern}' + _PARAM), target, transform) for pattern, target, transform in (
    (r'neck\.lateral_convs\.(?P<i>\d+)\.conv\.', 'backbone.fpn.inner_blocks.{i}.0.', None),
    (r'neck\.fpn_convs\.(?P<i>\d+)\.conv\.', 'backbone.fpn.layer_blocks.{i}.0.', None),
    (r'rpn_head\.rpn_conv\.', 'rpn.head.conv.0.0.', None),
    (r'rpn_head\.rpn_cls\.', 'rpn.head.cls_logits.', None),
    (r'rpn_head\.rpn_reg\.', 'rpn.head.bbox_pred.', None),
    (r'roi_head\.bbox_head\.shared_fcs\.0\.', 'roi_heads.box_head.fc6.', None),
    (r'roi_head\.bbox_head\.shared_fcs\.1\.', 'roi_heads.box_head.fc7.', None),
    (r'roi_head\.bbox_head\.fc_cls\.', 'roi_heads.box_predictor.cls_score.', _background_first),
    (r'roi_head\.bbox_head\.fc_reg\.', 'roi_heads.box_predictor.bbox_pred.', _zero_rows(4)),
    (r'roi_head\.mask_head\.convs\.(?P<i>\d+)\.conv\.', 'roi_heads.mask_head.{i}.0.', None),
    (r'roi_head\.mask_head\.upsample\.', 'roi_heads.mask_predictor.conv5_mask.', None),
    (r'roi_head\.mask_head\.conv_logits\.', 'roi_heads.mask_predictor.mask_fcn_logits.', _zero_rows(1)),
))

# {rev}: smp's FPN blocks run coarse to fine (index L-1-j for mmseg's lateral / fpn conv j, fine to coarse)
_MMSEG_RULES = tuple((re.compile(f'^{pattern}' + _PARAM), target, None) for pattern, target in (
    (r'decode_head\.psp_modules\.(?P<i>\d+)\.1\.conv\.', 'decoder.psp.blocks.{i}.1.0.'),
    (r'decode_head\.psp_modules\.(?P<i>\d+)\.1\.bn\.', 'decoder.psp.blocks.{i}.1.1.'),
    (r'decode_head\.bottleneck\.conv\.', 'decoder.psp.out_conv.0.'),
    (r'decode_head\.bottleneck\.bn\.', 'decoder.psp.out_conv.1.'),
    (r'decode_head\.lateral_convs\.(?P<i>\d+)\.conv\.', 'decoder.fpn_lateral_blocks.{rev}.conv_norm_relu.0.'),
    (r'decode_head\.lateral_convs\.(?P<i>\d+)\.bn\.', 'decoder.fpn_lateral_blocks.{rev}.conv_norm_relu.1.'),
    (r'decode_head\.fpn_convs\.(?P<i>\d+)\.conv\.', 'decoder.fpn_conv_blocks.{rev}.0.'),
    (r'decode_head\.fpn_convs\.(?P<i>\d+)\.bn\.', 'decoder.fpn_conv_blocks.{rev}.1.'),
    (r'decode_head\.fpn_bottleneck\.conv\.', 'decoder.fusion_block.0.'),
    (r'decode_head\.fpn_bottleneck\.bn\.', 'decoder.fusion_block.1.'),
    (r'decode_head\.conv_seg\.', 'segmentation_head.0.'),
    (r'auxiliary_head\.convs\.0\.conv\.', 'aux_head.conv.0.'),
    (r'auxiliary_head\.convs\.0\.bn\.', 'aux_head.conv.1.'),
    (r'auxiliary_head\.conv_seg\.', 'aux_head.conv_seg.'),
))


def _map_heads(state_dict: Mapping[str, torch.Tensor], rules, levels: int = 0):
    """``(mapped, sources)``: every key renamed (and transformed) by the first rule that matches it; keys no rule
    matches keep their name (the strict check then lists them as unexpected). ``sources``: new name -> old."""
    out, sources = {}, {}
    for key, value in state_dict.items():
        for pattern, target, transform in rules:
            match = pattern.match(key)
            if match:
                i = int(match.group('i')) if 'i' in pattern.groupindex else 0
                new = target.format(i=i, rev=levels - 1 - i) + match.group('param')
                value = transform(value) if transform is not None and match.group('param') in ('weight', 'bias') \
                    else value
                break
        else:
            new = key
        out[new], sources[new] = value, key
    return out, sources


def _official_backbone_key(key: str) -> str:
    """The official checkpoint name of a ``DenseBackbone`` key (for error messages)."""
    if key.startswith('norms.'):
        return 'backbone.norm' + key[len('norms.'):]
    key = key[len('trunk.model.'):] if key.startswith('trunk.model.') else key
    key = re.sub(r'attn\.inner\.0\.w([12])$', r'attn.w\1', key)
    return 'backbone.' + re.sub(r'attn\.inner\.1\.weight$', 'attn.w3', key)


def _strict_check(state_dict, model, sources: Mapping[str, str], task: str) -> None:
    """``check_state_dict`` whose error also names the checkpoint key of every listed converted key."""
    try:
        check_state_dict(state_dict, model)
    except CheckpointError as e:
        text = str(e)
        named = sorted(f'{new} <- {old}' for new, old in sources.items()
                       if new != old and re.search(rf'(^|\s){re.escape(new)}(:|$)', text, re.M))
        more = ('\n  checkpoint names of the converted keys listed:\n    ' + '\n    '.join(named[:25])) if named else ''
        raise CheckpointError(f'{task} conversion: {text}{more}') from None


def _already_converted(state_dict, model, task: str):
    check_state_dict(state_dict, model)
    return dict(state_dict), dict(task=task, dropped=[], initialised=[])


def _report(raw, task: str, num_classes: Optional[int], backbone_report, dropped=()) -> Dict[str, Any]:
    names = class_names(raw)
    if names is not None and num_classes is not None and len(names) != num_classes:
        warnings.warn(f'the checkpoint names {len(names)} classes but its head predicts {num_classes}: class names '
                      f'ignored', stacklevel=3)
        names = None
    return dict(task=task, num_classes=num_classes, classes=names,
                dropped=sorted(list(backbone_report.get('dropped', [])) + list(dropped)),
                initialised=list(backbone_report.get('initialised', [])))


def convert_maskrcnn_state_dict(checkpoint: Any, model, check: bool = True
                                ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """An mmdet Mask R-CNN (or Faster R-CNN) checkpoint (file, loaded object or state dict) -> ``(state_dict,
    report)`` for a torchvision ``MaskRCNN`` / ``FasterRCNN`` from :func:`~vittt.dense.build_maskrcnn` /
    ``build_fasterrcnn`` (``model``; its backbone is ``model.backbone.body``). The mapping is the module's table;
    with ``check`` every missing, unexpected and mis-shaped key raises :class:`CheckpointError`, naming both the
    torchvision and the mmdet key. ``report``: ``task``, ``num_classes`` (``fc_cls`` rows - 1), ``classes`` (from
    ``meta.dataset_meta``), ``dropped``, ``initialised``."""
    raw = read_checkpoint(checkpoint)
    state_dict = unwrap_state_dict(raw, use_ema=False)
    task = detect_dense_task(state_dict)
    if task in ('maskrcnn', 'fasterrcnn') and any(k.startswith('roi_heads.') for k in state_dict):
        out, report = _already_converted(state_dict, model, task)
        return out, dict(report, num_classes=state_dict['roi_heads.box_predictor.cls_score.weight'].shape[0] - 1,
                         classes=class_names(checkpoint))
    if task not in ('maskrcnn', 'fasterrcnn'):
        raise CheckpointError(f'not a Mask R-CNN / Faster R-CNN checkpoint: its layout is {task!r}')
    fc_cls, fc_reg = (state_dict.get(f'roi_head.bbox_head.{n}.weight') for n in ('fc_cls', 'fc_reg'))
    if fc_cls is None or fc_reg is None:
        raise CheckpointError('Mask R-CNN checkpoint without roi_head.bbox_head.fc_cls.weight / fc_reg.weight')
    num_classes = fc_cls.shape[0] - 1
    if fc_reg.shape[0] != 4 * num_classes:
        raise CheckpointError(f'roi_head.bbox_head.fc_reg.weight has {fc_reg.shape[0]} rows for {num_classes} '
                              f'classes: class-agnostic box regression (4 rows) has no torchvision equivalent')
    out, sources = _map_heads({k: v for k, v in state_dict.items() if not k.startswith('backbone.')}, _MMDET_RULES)
    backbone_sd, backbone_report = dense_backbone_state_dict(split_prefix(state_dict, 'backbone.'),
                                                             model.backbone.body, check=False)
    sources.update({'backbone.body.' + k: _official_backbone_key(k) for k in backbone_sd})
    out.update({'backbone.body.' + k: v for k, v in backbone_sd.items()})
    dropped = [k for k in out if k.startswith(_IGNORED_TOPS)]
    for key in dropped:
        del out[key]
    if check:
        _strict_check(out, model, sources, task)
    return out, _report(raw, task, num_classes, backbone_report, dropped)


def convert_upernet_state_dict(checkpoint: Any, model, check: bool = True
                               ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """An mmseg UPerNet checkpoint -> ``(state_dict, report)`` for :class:`~vittt.dense.UPerNet` (``model``, from
    :func:`~vittt.dense.build_upernet`, whose backbone has no level norms: ``backbone.norm{i}`` go to
    ``decoder.feature_norms.{i}``). The auxiliary head maps to ``aux_head``, or is dropped (and reported) when the
    model has none. Strict as :func:`convert_maskrcnn_state_dict`; ``num_classes`` from ``conv_seg`` rows."""
    raw = read_checkpoint(checkpoint)
    state_dict = unwrap_state_dict(raw, use_ema=False)
    task = detect_dense_task(state_dict)
    if task == 'upernet' and any(k.startswith('encoder.') for k in state_dict):
        out, report = _already_converted(state_dict, model, task)
        return out, dict(report, num_classes=state_dict['segmentation_head.0.weight'].shape[0],
                         classes=class_names(checkpoint))
    if task != 'upernet':
        raise CheckpointError(f'not a UPerNet checkpoint: its layout is {task!r}')
    conv_seg = state_dict.get('decode_head.conv_seg.weight')
    if conv_seg is None:
        raise CheckpointError('UPerNet checkpoint without decode_head.conv_seg.weight')
    backbone = model.encoder.backbone
    if backbone.norms is not None:
        raise CheckpointError('the official UPerNet backbone norms (backbone.norm{i}) load into the decoder\'s '
                              'feature_norms: build the UPerNet with a backbone without level norms '
                              '(out_norm=None, the build_upernet default)')
    heads = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    dropped = []
    if model.aux_head is None:
        dropped = sorted(k for k in heads if k.startswith('auxiliary_head.'))
        heads = {k: v for k, v in heads.items() if not k.startswith('auxiliary_head.')}
    levels = len(_subgroups(heads, 'decode_head.lateral_convs'))
    out, sources = _map_heads(heads, _MMSEG_RULES, levels)
    backbone_sd, backbone_report = dense_backbone_state_dict(split_prefix(state_dict, 'backbone.'), backbone,
                                                             check=False, split_norms=True)
    sources.update({'encoder.backbone.' + k: _official_backbone_key(k) for k in backbone_sd})
    out.update({'encoder.backbone.' + k: v for k, v in backbone_sd.items()})
    for key, value in backbone_report.pop('level_norms', {}).items():
        out[f'decoder.feature_norms.{key}'], sources[f'decoder.feature_norms.{key}'] = value, f'backbone.norm{key}'
    ignored = [k for k in out if k.startswith(_IGNORED_TOPS)]
    for key in ignored:
        del out[key]
    if check:
        _strict_check(out, model, sources, task)
    return out, _report(raw, task, conv_seg.shape[0], backbone_report, dropped + ignored)


def load_official_detector(model, checkpoint: Any) -> Dict[str, Any]:
    """Load an official Mask R-CNN / Faster R-CNN file (or a ``vittt convert`` output) into ``model`` strictly;
    returns the report (``task``, ``num_classes``, ``classes``, ``dropped``, ``initialised``)."""
    state_dict, report = convert_maskrcnn_state_dict(checkpoint, model)
    model.load_state_dict(state_dict)
    return report


def load_official_segmenter(model, checkpoint: Any) -> Dict[str, Any]:
    """Load an official UPerNet file (or a ``vittt convert`` output) into ``model`` strictly; returns the report."""
    state_dict, report = convert_upernet_state_dict(checkpoint, model)
    model.load_state_dict(state_dict)
    return report


# ------------------------------------------------------------------------------------------------ files
def _hvit3_arch(trunk: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """``dims`` / ``depths`` / ``num_heads`` of an H-ViT³ trunk state dict (official or vittt keys)."""
    keys = list(trunk)
    stages = sorted({int(m.group(1)) for k in keys if (m := re.match(r'layers\.(\d+)\.blocks\.0\.norm1\.weight$', k))})
    if not stages:
        raise CheckpointError('the backbone is not an H-ViT³ (no layers.{i}.blocks.0.norm1.weight): name the model '
                              'with --model')
    dims = tuple(int(trunk[f'layers.{i}.blocks.0.norm1.weight'].shape[0]) for i in stages)
    depths = tuple(len({m.group(1) for k in keys if (m := re.match(rf'layers\.{i}\.blocks\.(\d+)\.', k))})
                   for i in stages)
    heads = []
    for i in stages:
        w1 = trunk.get(f'layers.{i}.blocks.0.attn.w1', trunk.get(f'layers.{i}.blocks.0.attn.inner.0.w1'))
        heads.append(int(w1.shape[1]) if w1 is not None else 0)
    return dict(dims=dims, depths=depths, num_heads=tuple(heads))


def _trunk_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The backbone's own keys (official names, no prefix) of a state dict of any :data:`DENSE_TASKS` layout."""
    for prefix in ('backbone.body.trunk.model.', 'encoder.backbone.trunk.model.', 'trunk.model.', 'backbone.'):
        found = split_prefix(state_dict, prefix)
        if found:
            return found
    return dict(state_dict)


def _variant(trunk: Mapping[str, torch.Tensor], model_name: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """``(registered name, model kwargs)``: the official variant, else ``hvit3_tiny`` with the checkpoint's
    ``dims`` / ``depths`` / ``num_heads`` (a custom H-ViT³ configuration)."""
    if model_name:
        return model_name, {}
    try:
        return detect_official_variant(trunk), {}
    except CheckpointError:
        arch = _hvit3_arch(trunk)
    return 'hvit3_tiny', arch


def build_model_for_checkpoint(state_dict: Mapping[str, torch.Tensor], task: str, model_name: Optional[str] = None):
    """``(model, config)``: the vittt module an official ``task`` state dict converts into (torchvision Mask R-CNN /
    Faster R-CNN with the ``'official'`` preset, :class:`~vittt.dense.UPerNet` with the checkpoint's decoder width
    and auxiliary head, or a :class:`~vittt.dense.DenseBackbone`), sized from the checkpoint. ``config``: the build
    arguments (``model``, ``backbone_kwargs``, ``num_classes`` ...)."""
    name, kwargs = _variant(_trunk_keys(state_dict), model_name)
    config: Dict[str, Any] = dict(model=name, backbone_kwargs=kwargs)
    if task in ('maskrcnn', 'fasterrcnn'):
        from .detection import build_detector
        fc_cls = state_dict.get('roi_head.bbox_head.fc_cls.weight')
        if fc_cls is None:
            raise CheckpointError('no roi_head.bbox_head.fc_cls.weight: cannot tell the number of classes')
        config.update(num_classes=int(fc_cls.shape[0]) - 1, preset='official')
        return build_detector(task, name, config['num_classes'], preset='official', backbone_kwargs=kwargs), config
    if task == 'upernet':
        from .segmentation import build_upernet
        conv_seg = state_dict.get('decode_head.conv_seg.weight')
        if conv_seg is None:
            raise CheckpointError('no decode_head.conv_seg.weight: cannot tell the number of classes')
        config.update(num_classes=int(conv_seg.shape[0]), decoder_channels=int(conv_seg.shape[1]),
                      aux_head=any(k.startswith('auxiliary_head.') for k in state_dict))
        return build_upernet(name, config['num_classes'], decoder_channels=config['decoder_channels'],
                             aux_head=config['aux_head'], backbone_kwargs=kwargs), config
    if task == 'backbone':
        from .backbone import DenseBackbone
        return DenseBackbone(name, **kwargs), config
    raise ValueError(f'task must be one of {DENSE_TASKS[:-1]}, got {task!r}')


def _load_quietly(src, trust_pickle: bool):
    """The file's object and the warnings its reading raised (re-issued only if the file is converted here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        raw = read_checkpoint(src, trust_pickle)
    return raw, caught


def convert_dense_file(src, dst, task: Optional[str] = None, model_name: Optional[str] = None,
                       trust_pickle: bool = False) -> Optional[Dict[str, Any]]:
    """Convert an official Mask R-CNN / Faster R-CNN / UPerNet file (or, ``task='backbone'``, the backbone of any
    H-ViT³ file) into a vittt ``.safetensors`` file, checked strictly against the module it loads into (built as
    :func:`build_model_for_checkpoint`) and written atomically. Metadata: ``format``, ``task``, ``model``,
    ``config`` (JSON of the build arguments), ``num_classes``, ``classes`` (JSON list), ``source``.

    ``task=None`` detects it; for a classification file nothing is written and None is returned (convert it with
    :func:`vittt.models.convert_official_file`). Returns the report, with ``model``, ``config`` and
    ``num_tensors``."""
    from ..io import save_safetensors_atomic

    if task is not None and task not in DENSE_TASKS:
        raise ValueError(f'task must be one of {DENSE_TASKS}, got {task!r}')
    if task == 'classification':
        return None
    raw, caught = _load_quietly(src, trust_pickle)
    try:
        state_dict = unwrap_state_dict(raw, use_ema=False)
    except CheckpointError:
        if task is None:
            return None  # not a dense layout: the classification converter says what is wrong with it
        raise
    found = detect_dense_task(state_dict)
    if found == 'classification' and task is None:
        return None
    if task is None:
        task = found
    elif task != 'backbone' and task != found:
        raise CheckpointError(f'{src}: --task {task} given, but this is a {found} checkpoint')
    for warning in caught:
        warnings.warn(warning.message, stacklevel=2)
    model, config = build_model_for_checkpoint(state_dict, task, model_name)
    if task in ('maskrcnn', 'fasterrcnn'):
        out, report = convert_maskrcnn_state_dict(raw, model)
    elif task == 'upernet':
        out, report = convert_upernet_state_dict(raw, model)
    else:
        trunk = split_prefix(state_dict, 'backbone.body.') if found in ('maskrcnn', 'fasterrcnn') else state_dict
        out, backbone_report = dense_backbone_state_dict(trunk or state_dict, model)
        report = _report(raw, task, None, backbone_report)
        if found not in ('backbone', 'classification'):  # the heads
            report['dropped'] += sorted(k for k in state_dict if not k.startswith('backbone.'))
    metadata = dict(format='vittt', task=task, model=config['model'], source=os.path.basename(os.fspath(src)),
                    config=json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}))
    if report.get('num_classes') is not None:
        metadata['num_classes'] = str(report['num_classes'])
    if report.get('classes'):
        metadata['classes'] = json.dumps(report['classes'])
    save_safetensors_atomic(out, dst, metadata=metadata)
    return dict(report, model=config['model'], config=config, num_tensors=len(out))


def inspect_checkpoint(src, trust_pickle: bool = False) -> Dict[str, Any]:
    """What a checkpoint file holds: ``task`` (:func:`detect_dense_task`; an unsupported layout gives
    ``'unsupported'`` and the reason in ``error``), ``variant`` (the official model name, or a custom H-ViT³
    configuration), ``num_classes``, ``classes`` and ``groups`` (key prefix of up to two components, the parameter
    name excluded -> tensor count)."""
    raw, _ = _load_quietly(src, trust_pickle)
    state_dict = unwrap_state_dict(raw, use_ema=False)
    info: Dict[str, Any] = dict(source=os.fspath(src), num_tensors=len(state_dict))
    try:
        info['task'] = detect_dense_task(state_dict)
    except CheckpointError as e:
        info.update(task='unsupported', error=str(e))
    trunk = _trunk_keys(state_dict)
    try:
        name, kwargs = _variant(trunk)
        info['variant'] = name if not kwargs else f'custom H-ViT³ ({", ".join(f"{k}={v}" for k, v in kwargs.items())})'
    except CheckpointError as e:
        info['variant'] = f'unknown ({e})'
    rows = {'roi_head.bbox_head.fc_cls.weight': -1, 'roi_heads.box_predictor.cls_score.weight': -1,
            'decode_head.conv_seg.weight': 0, 'segmentation_head.0.weight': 0, 'head.weight': 0}
    info['num_classes'] = next((int(state_dict[k].shape[0]) + d for k, d in rows.items() if k in state_dict), None)
    info['classes'] = class_names(src) if os.fspath(src).endswith('.safetensors') else class_names(raw)
    info['groups'] = dict(sorted(Counter('.'.join(k.split('.')[:min(2, k.count('.'))] or [k])
                                         for k in state_dict).items()))
    return info


def format_inspection(info: Mapping[str, Any]) -> str:
    """:func:`inspect_checkpoint`'s result as the text ``vittt convert --inspect`` prints."""
    lines = [f'{info["source"]}: {info["num_tensors"]} tensors', f'task: {info["task"]}']
    if info.get('error'):
        lines.append(f'  ({info["error"]})')
    lines.append(f'variant: {info["variant"]}')
    classes = info.get('classes')
    lines.append(f'classes: {info["num_classes"] if info["num_classes"] is not None else "-"}'
                 + (f' ({", ".join(classes[:10])}{", ..." if len(classes) > 10 else ""})' if classes else ''))
    lines.append('key groups:')
    width = max((len(k) for k in info['groups']), default=0)
    lines += [f'  {group:<{width}}  {count}' for group, count in info['groups'].items()]
    return '\n'.join(lines)
