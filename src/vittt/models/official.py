"""Official ViT³ / H-ViT³ checkpoints (LeapLabTHU/ViTTT) -> vittt state dicts.

The official layouts differ from ours only in where the inner models' initial states live and in H-ViT³'s
fixed-size RoPE buffers:

    blocks...attn.w1 / w2   -> ...attn.inner.0.w1 / w2      (SwiGLU heads)
    blocks...attn.w3        -> ...attn.inner.1.weight       (depth-wise conv head)
    ...rope.rotations       -> checked against our RoPE for its grid, then dropped (ours is computed per grid)

Checkpoints may be a plain state dict or wrapped (``model``, ``state_dict``, ``state_dict_ema``, ``model_ema``;
EMA preferred unless ``use_ema=False``), optionally with a ``module.`` prefix. Keys and shapes are checked
strictly: a mismatch raises :class:`CheckpointError` listing every missing, unexpected and mis-shaped key.

Files are read without running their code: ``weights_only`` pickles, or (``tensors_only``) a restricted unpickler
that rebuilds tensors and plain containers and turns every other object (mmengine's ``HistoryBuffer``, numpy arrays,
configs ...) into an inert :class:`ForeignObject`.
"""
from __future__ import annotations

import os
import pickle
import re
import types
import warnings
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

__all__ = ['CheckpointError', 'unwrap_state_dict', 'is_official_state_dict', 'convert_official_state_dict',
           'check_state_dict', 'checkpoint_filter_fn', 'load_checkpoint_file', 'detect_official_variant',
           'convert_official_file', 'OFFICIAL_VARIANTS', 'is_dit_state_dict', 'dit_config_from_state_dict',
           'convert_dit_state_dict', 'load_dit_checkpoint', 'ForeignObject', 'dense_layout_hint']


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the problem."""


_RENAMES = (
    (re.compile(r'\.attn\.w1$'), '.attn.inner.0.w1'),
    (re.compile(r'\.attn\.w2$'), '.attn.inner.0.w2'),
    (re.compile(r'\.attn\.w3$'), '.attn.inner.1.weight'),
)
_WRAPPER_KEYS_EMA = ('state_dict_ema', 'model_ema', 'ema')
_WRAPPER_KEYS = ('model', 'state_dict')

# (family, width(s), depth(s), heads) -> registered name
OFFICIAL_VARIANTS: Dict[Tuple, str] = {
    ('vit3', 192, 12, 6): 'vit3_tiny',
    ('vit3', 384, 12, 6): 'vit3_small',
    ('vit3', 768, 12, 12): 'vit3_base',
    ('hvit3', (64, 128, 320, 512), (1, 3, 9, 4), (2, 4, 10, 16)): 'hvit3_tiny',
    ('hvit3', (64, 128, 320, 512), (2, 6, 18, 8), (2, 4, 10, 16)): 'hvit3_small',
    ('hvit3', (96, 192, 448, 640), (2, 6, 18, 8), (3, 6, 14, 20)): 'hvit3_base',
}


def unwrap_state_dict(checkpoint, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a (possibly wrapped) checkpoint, without a DDP ``module.`` prefix."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'expected a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}')
    for key in (_WRAPPER_KEYS_EMA if use_ema else ()) + _WRAPPER_KEYS + (() if use_ema else _WRAPPER_KEYS_EMA):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return unwrap_state_dict(inner, use_ema)
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'the checkpoint holds non-tensor entries {bad[:5]} and none of the known wrapper '
                              f'keys {list(_WRAPPER_KEYS_EMA + _WRAPPER_KEYS)}')
    if checkpoint and all(k.startswith('module.') for k in checkpoint):
        return {k[len('module.'):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def is_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(('.attn.w1', '.rope.rotations')) for k in state_dict)


def _check_rope_buffer(key: str, value: torch.Tensor) -> None:
    from ..layers import rope_2d_angles

    if value.ndim != 4 or value.shape[-1] != 2:
        raise CheckpointError(f'{key}: expected a RoPE table [H, W, C/2, 2], got shape {tuple(value.shape)}')
    h, w, half, _ = value.shape
    angles = rope_2d_angles((h, w), 2 * half)
    expected = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    err = (value.float() - expected).abs().max().item()
    if err > 1e-4:
        raise CheckpointError(f'{key}: the RoPE table differs from the official 2-D RoPE layout by {err:.3g}; '
                              f'this checkpoint was not made by the model vittt implements')


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, check_head: bool = True) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the model's keys and shapes.
    With ``check_head=False`` the classifier's shapes may differ (timm drops it when num_classes changes)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    head = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head') if not check_head else None
    mis_shaped = sorted(
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape) and not (head and k.startswith(head + '.')))
    if missing or unexpected or mis_shaped:
        def listing(title, items):
            shown = '\n    '.join(items[:25]) + (f'\n    ... and {len(items) - 25} more' if len(items) > 25 else '')
            return f'\n  {title} ({len(items)}):\n    {shown}' if items else ''
        raise CheckpointError(f'checkpoint does not match {type(model).__name__}:'
                              + listing('missing keys', missing) + listing('unexpected keys', unexpected)
                              + listing('shape mismatches', mis_shaped))


def convert_official_state_dict(checkpoint, model: Optional[torch.nn.Module] = None, *, use_ema: bool = True,
                                check_head: bool = True) -> Dict[str, torch.Tensor]:
    """Official (or already converted) checkpoint -> vittt state dict, checked against ``model`` if given."""
    state_dict = unwrap_state_dict(checkpoint, use_ema)
    hint = dense_layout_hint(state_dict)
    if hint:
        raise CheckpointError(f'not a classification checkpoint: {hint}')
    if is_official_state_dict(state_dict):
        out = {}
        for key, value in state_dict.items():
            if key.endswith('.rope.rotations'):
                _check_rope_buffer(key, value)
                continue
            for pattern, repl in _RENAMES:
                key = pattern.sub(repl, key)
            out[key] = value
        state_dict = out
    if model is not None:
        check_state_dict(state_dict, model, check_head=check_head)
    return state_dict


def checkpoint_filter_fn(state_dict, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: lets ``timm.create_model(..., pretrained=True,
    pretrained_cfg_overlay=dict(file='official.pth'))`` load official files."""
    return convert_official_state_dict(state_dict, model, check_head=False)


class ForeignObject:
    """What the tensor-only loader makes of an object whose class it does not trust: it keeps the pickled
    constructor arguments (``args``, ``kwargs``), the ``state`` given to ``__setstate__`` and any ``items`` /
    ``list_items`` pickle added, and runs none of the original class's code. ``global_name`` names that class (or
    the function the pickle wanted to call)."""

    global_name = '?'

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list_items = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def __getitem__(self, key):
        return self.items[key]

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __repr__(self):
        return f'<not loaded: {self.global_name}>'


def _rebuild_from_type_v2(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2`` for plain tensors and parameters only (no foreign subclass code)."""
    ret = func(*args)
    if isinstance(ret, torch.Tensor) and isinstance(new_type, type) and new_type in (torch.Tensor,
                                                                                   torch.nn.Parameter):
        if type(ret) is not new_type:
            ret = ret.as_subclass(new_type)
        if state:
            torch._utils._set_obj_state(ret, state)
    return ret


def _trusted_globals() -> Dict[Tuple[str, str], object]:
    import _codecs
    import builtins
    import collections

    allowed = {('collections', 'OrderedDict'): collections.OrderedDict, ('_codecs', 'encode'): _codecs.encode,
               ('torch', 'Size'): torch.Size, ('torch', 'device'): torch.device,
               ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2}
    for name in ('set', 'frozenset', 'slice', 'complex', 'tuple', 'list', 'dict', 'int', 'float', 'bool', 'str'):
        allowed[('builtins', name)] = getattr(builtins, name)
    for name in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3', '_rebuild_parameter',
                 '_rebuild_parameter_with_state', '_rebuild_qtensor', '_rebuild_sparse_tensor',
                 '_rebuild_meta_tensor_no_storage'):
        if hasattr(torch._utils, name):
            allowed[('torch._utils', name)] = getattr(torch._utils, name)
    return allowed


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuild functions, storages, ``torch.Size``, torch dtypes / layouts / memory formats,
    ``OrderedDict`` and the built-in container types; any other global becomes a :class:`ForeignObject` subclass,
    so calling it, ``__reduce__`` results and ``__setstate__`` included, runs no code from the file."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowed = _trusted_globals()
        self._foreign: Dict[Tuple[str, str], type] = {}

    def find_class(self, module, name):
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 pickles name builtins '__builtin__'
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module in ('torch', 'torch.storage') and isinstance(name, str):
            value = getattr(torch, name, None) if module == 'torch' else getattr(torch.storage, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
                return value
            if isinstance(value, type) and issubclass(value, (torch.storage.TypedStorage, torch.UntypedStorage)):
                return value
        key = (str(module), str(name))
        if key not in self._foreign:
            self._foreign[key] = type(str(name), (ForeignObject,), {'global_name': f'{module}.{name}',
                                                                     '__module__': __name__})
        return self._foreign[key]


def _tensors_only_pickle_module() -> types.ModuleType:
    module = types.ModuleType('vittt_tensors_only_pickle')
    module.Unpickler = _TensorsOnlyUnpickler
    module.load = lambda file, **kwargs: _TensorsOnlyUnpickler(file, **kwargs).load()
    module.__dict__.update(HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL, UnpicklingError=pickle.UnpicklingError)
    return module


def _load_tensors_only(path: str):
    return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_tensors_only_pickle_module())


def load_checkpoint_file(path, trust_pickle: bool = False, tensors_only: Union[bool, str] = False):
    """Read a ``.safetensors`` or torch-pickle checkpoint. Pickles are read with ``weights_only=True`` unless
    ``trust_pickle`` (a pickle can run code: only for files you trust).

    ``tensors_only=True`` reads a pickle with a restricted unpickler instead: tensors, ``torch.Size``, dtypes and
    plain containers (dicts, lists, tuples, sets, strings, numbers, ``OrderedDict``) are rebuilt; every other object
    becomes an inert :class:`ForeignObject` and none of its code runs. ``tensors_only='auto'`` tries
    ``weights_only`` first and falls back to that (saying so in one warning) when the file holds other Python
    objects, as mmengine checkpoints do (``message_hub``'s ``HistoryBuffer``, numpy arrays). Without it such a file
    raises :class:`CheckpointError`."""
    path = os.fspath(path)
    if tensors_only not in (False, True, 'auto'):
        raise ValueError(f"tensors_only must be False, True or 'auto', got {tensors_only!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    fallback = None
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        if tensors_only is True:
            return _load_tensors_only(path)
        import argparse  # DiT's train.py stores its arguments as a Namespace beside the tensors (harmless to load)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except Exception as e:
        if not trust_pickle and 'Unsupported global' in str(e):
            culprit = re.search(r'GLOBAL (\S+)', str(e))
            culprit = f' ({culprit.group(1)})' if culprit else ''
            if tensors_only != 'auto':
                raise CheckpointError(f'{path}: holds Python objects besides tensors{culprit}, which are not loaded '
                                      f'by default (a pickle can run code). If you trust the file, pass '
                                      f'trust_pickle=True (`vittt convert --trust-pickle`)') from e
            fallback = culprit
        else:
            raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from e
    warnings.warn(f'{path}: holds Python objects besides tensors{fallback}; reading it with the tensor-only loader '
                  f'(those objects become inert placeholders, none of their code runs)', stacklevel=2)
    try:
        return _load_tensors_only(path)
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from e


_DENSE_LAYOUTS = (
    (('backbone', 'neck', 'rpn_head', 'roi_head'), 'mask_head', 'a Mask R-CNN checkpoint (backbone/neck/rpn_head/'
                                                                'roi_head); use --task maskrcnn or --task backbone'),
    (('backbone', 'neck', 'rpn_head', 'roi_head'), None, 'a Faster R-CNN checkpoint (backbone/neck/rpn_head/'
                                                         'roi_head); use --task fasterrcnn or --task backbone'),
    (('backbone', 'decode_head'), None, 'a UPerNet checkpoint (backbone/decode_head/auxiliary_head); use --task '
                                        'upernet or --task backbone'),
    (('backbone', 'neck'), None, 'a detection checkpoint (backbone/neck/...); use --task backbone'),
    (('backbone',), None, 'a dense backbone checkpoint (backbone.*); use --task backbone'),
)


def dense_layout_hint(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``'this is a Mask R-CNN checkpoint (...); use --task ...'`` for an mmdet / mmseg state dict, else None."""
    tops = {k.split('.', 1)[0] for k in state_dict}
    for groups, marker, text in _DENSE_LAYOUTS:
        if set(groups) <= tops and (marker is None or any(k.startswith(f'roi_head.{marker}.') for k in state_dict)):
            return f'this is {text}'
    return None


def _sniff_dense(path) -> Optional[str]:
    """The :func:`dense_layout_hint` of a file whose weights-only load failed (read tensors-only), or None."""
    try:
        return dense_layout_hint(unwrap_state_dict(load_checkpoint_file(path, tensors_only=True), use_ema=False))
    except Exception:
        return None


def _count(prefix_re: str, keys) -> int:
    pattern = re.compile(prefix_re)
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def detect_official_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name of the registered model whose architecture matches ``state_dict`` (official or converted)."""
    keys = list(state_dict)
    if 'patch_embed.proj.weight' in state_dict:
        depth = _count(r'blocks\.(\d+)\.', keys)
        heads_key = next((k for k in keys if k.endswith(('attn.w1', 'attn.inner.0.w1'))), None)
        sig = ('vit3', state_dict['patch_embed.proj.weight'].shape[0], depth,
               state_dict[heads_key].shape[1] if heads_key else None)
    elif any(k.startswith('layers.') for k in keys):
        stages = _count(r'layers\.(\d+)\.', keys)
        dims = tuple(state_dict[f'layers.{i}.blocks.0.norm1.weight'].shape[0] for i in range(stages)
                     if f'layers.{i}.blocks.0.norm1.weight' in state_dict)
        depths = tuple(_count(rf'layers\.{i}\.blocks\.(\d+)\.', keys) for i in range(stages))
        heads = tuple(next((state_dict[k].shape[1] for k in keys if re.match(rf'layers\.{i}\.blocks\.0\.attn\.'
                                                                              r'(w1|inner\.0\.w1)$', k)), 0)
                      for i in range(stages))
        sig = ('hvit3', dims, depths, heads)
    else:
        raise CheckpointError('not a ViT³ or H-ViT³ checkpoint: found neither patch_embed.proj.weight nor layers.*')
    try:
        return OFFICIAL_VARIANTS[sig]
    except KeyError:
        raise CheckpointError(f'the checkpoint architecture {sig} is none of the official models '
                              f'({", ".join(OFFICIAL_VARIANTS.values())}); name the model explicitly') from None


def convert_official_file(src, dst, model_name: Optional[str] = None, *, use_ema: bool = True,
                          trust_pickle: bool = False, **model_kwargs) -> Tuple[str, int]:
    """Convert an official checkpoint file to a vittt ``.safetensors`` file (written atomically).
    Returns ``(model_name, number_of_tensors)``. The result is checked by building the model and matching every
    key and shape; the number of classes is taken from the checkpoint's head."""
    import timm
    from ..io import save_safetensors_atomic

    try:
        raw = load_checkpoint_file(src, trust_pickle)
    except CheckpointError as e:  # an mmdet / mmseg file (mmengine objects beside the tensors): say what it is
        hint = _sniff_dense(src) if 'besides tensors' in str(e) else None
        if hint:
            raise CheckpointError(f'{src}: not a classification checkpoint: {hint}') from e
        raise
    if is_dit_state_dict(unwrap_state_dict(raw, use_ema)):
        return _convert_dit_file(raw, src, dst, model_name, use_ema, model_kwargs)
    state_dict = convert_official_state_dict(raw, use_ema=use_ema)
    model_name = model_name or detect_official_variant(state_dict)
    if 'head.weight' in state_dict:
        model_kwargs.setdefault('num_classes', state_dict['head.weight'].shape[0])
    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    check_state_dict(state_dict, model)
    save_safetensors_atomic(state_dict, dst, metadata={'model': model_name, 'source': os.path.basename(str(src)),
                                                       'format': 'vittt'})
    return model_name, len(state_dict)


# ---------------------------------------------------------------------------------------------- DiT³ / DiT
# Official DiT³ (LeapLabTHU/ViTTT dittt/) and facebookresearch/DiT checkpoints: the layout of vittt.models.dit3 but
# for the three TTT inner renames above (DiT has none) and the fixed ``pos_embed`` table, which is checked against
# the computed sin-cos table and dropped (ours is computed per grid).

def is_dit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return 'x_embedder.proj.weight' in state_dict and 't_embedder.mlp.0.weight' in state_dict


def dit_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """Constructor arguments of :class:`~vittt.models.dit3.DiT3` read off a DiT³ / DiT state dict (official or
    converted); ``num_heads`` of an attention DiT is taken from the matching named config (weights do not show it),
    else D / 64 (72 for D = 1152)."""
    from .dit3 import DIT_CONFIGS

    if not is_dit_state_dict(state_dict):
        raise CheckpointError('not a DiT³ / DiT checkpoint: no x_embedder.proj.weight / t_embedder.mlp.0.weight')
    proj = state_dict['x_embedder.proj.weight']
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    keys = list(state_dict)
    depth = _count(r'blocks\.(\d+)\.', keys)
    ttt = any(k.startswith('blocks.0.attn.') and k.endswith(('.w1', 'inner.0.w1')) for k in keys)
    rows = state_dict['y_embedder.embedding_table.weight'].shape[0]
    out = state_dict['final_layer.linear.weight'].shape[0]
    learn_sigma = out == 2 * patch * patch * in_chans
    if ttt:
        w1 = state_dict.get('blocks.0.attn.w1', state_dict.get('blocks.0.attn.inner.0.w1'))
        heads = w1.shape[1] if w1.ndim == 4 else w1.shape[0]
    else:
        named = [c for c in DIT_CONFIGS.values() if (c['embed_dim'], c['depth'], c['patch_size'], c['mixer'])
                 == (dim, depth, patch, 'attention')]
        heads = named[0]['num_heads'] if named else (16 if dim == 1152 else max(1, dim // 64))
    config = dict(in_chans=in_chans, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                  learn_sigma=learn_sigma, mixer='ttt' if ttt else 'attention',
                  cpe='blocks.0.cpe.weight' in state_dict)
    # rows = num_classes + 1 with a null class (class_dropout_prob > 0); a table without one cannot be told apart
    config.update(num_classes=rows - 1, class_dropout_prob=0.1)
    return config


def _check_pos_embed(value: torch.Tensor, dim: int) -> None:
    from ..layers.adaln import sincos_2d

    n = value.shape[-2]
    grid = int(round(n ** 0.5))
    if value.ndim != 3 or grid * grid != n or value.shape[-1] != dim:
        raise CheckpointError(f'pos_embed: expected a square sin-cos table [1, N, {dim}], got {tuple(value.shape)}')
    err = (value[0].float() - sincos_2d((grid, grid), dim)).abs().max().item()
    if err > 1e-4:
        raise CheckpointError(f'pos_embed: differs from the 2-D sin-cos table of a {grid}×{grid} grid by {err:.3g}; '
                              f'this checkpoint was not made by the model vittt implements')


def convert_dit_state_dict(checkpoint, model: Optional[torch.nn.Module] = None, *,
                           use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Official DiT³ / facebookresearch DiT checkpoint (plain, or ``{model, ema, opt, args}``; EMA preferred unless
    ``use_ema=False``) -> vittt state dict: the TTT inner renames, ``pos_embed`` checked and dropped; checked
    strictly against ``model`` when given."""
    state_dict = unwrap_state_dict(checkpoint, use_ema)
    out = {}
    for key, value in state_dict.items():
        if key == 'pos_embed':
            _check_pos_embed(value, state_dict['x_embedder.proj.weight'].shape[0])
            continue
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    if model is not None:
        check_state_dict(out, model)
    return out


def load_dit_checkpoint(model: torch.nn.Module, checkpoint, use_ema: bool = True,
                        trust_pickle: bool = False) -> torch.nn.Module:
    """Load a DiT³ / DiT checkpoint (path, or an already-read dict) into ``model`` strictly."""
    raw = load_checkpoint_file(checkpoint, trust_pickle) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if isinstance(raw, Mapping) and raw.get('format') == 'vittt-train-2' and 'model' in raw:
        raw = {'ema': raw['ema'], 'model': raw['model']} if raw.get('ema') is not None else raw['model']
    model.load_state_dict(convert_dit_state_dict(raw, model, use_ema=use_ema))
    return model


def _convert_dit_file(raw, src, dst, model_name, use_ema, model_kwargs) -> Tuple[str, int]:
    from ..io import save_safetensors_atomic
    from .dit3 import DiT3, create_dit

    state_dict = convert_dit_state_dict(raw, use_ema=use_ema)
    config = dict(dit_config_from_state_dict(state_dict), **model_kwargs)
    model = create_dit(model_name, **{k: v for k, v in config.items() if k not in (
        'embed_dim', 'depth', 'num_heads', 'patch_size', 'mixer', 'cpe')}) if model_name else DiT3(**config)
    check_state_dict(state_dict, model)
    metadata = {'model': model_name or 'dit3', 'source': os.path.basename(str(src)), 'format': 'vittt',
                'config': repr(sorted(config.items()))}
    grid = unwrap_state_dict(raw, use_ema).get('pos_embed')
    if grid is not None:
        metadata['trained_grid'] = str(int(round(grid.shape[-2] ** 0.5)))
    save_safetensors_atomic(state_dict, dst, metadata=metadata)
    return model_name or f'{config["mixer"]} DiT (D={config["embed_dim"]}, depth {config["depth"]})', len(state_dict)
