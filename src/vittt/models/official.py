"""Official ViT³ / H-ViT³ checkpoints (LeapLabTHU/ViTTT) -> vittt state dicts.

The official layouts differ from ours only in where the inner models' initial states live and in H-ViT³'s
fixed-size RoPE buffers:

    blocks...attn.w1 / w2   -> ...attn.inner.0.w1 / w2      (SwiGLU heads)
    blocks...attn.w3        -> ...attn.inner.1.weight       (depth-wise conv head)
    ...rope.rotations       -> checked against our RoPE for its grid, then dropped (ours is computed per grid)

Checkpoints may be a plain state dict or wrapped (``model``, ``state_dict``, ``state_dict_ema``, ``model_ema``;
EMA preferred unless ``use_ema=False``), optionally with a ``module.`` prefix. Keys and shapes are checked
strictly: a mismatch raises :class:`CheckpointError` listing every missing, unexpected and mis-shaped key.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

__all__ = ['CheckpointError', 'unwrap_state_dict', 'is_official_state_dict', 'convert_official_state_dict',
           'check_state_dict', 'checkpoint_filter_fn', 'load_checkpoint_file', 'detect_official_variant',
           'convert_official_file', 'OFFICIAL_VARIANTS']


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the problem."""


_RENAMES = (
    (re.compile(r'\.attn\.w1$'), '.attn.inner.0.w1'),
    (re.compile(r'\.attn\.w2$'), '.attn.inner.0.w2'),
    (re.compile(r'\.attn\.w3$'), '.attn.inner.1.weight'),
)
_WRAPPER_KEYS_EMA = ('state_dict_ema', 'model_ema')
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


def load_checkpoint_file(path, trust_pickle: bool = False):
    """Read a ``.safetensors`` or torch-pickle checkpoint. Pickles are read with ``weights_only=True`` unless
    ``trust_pickle`` (a pickle can run code: only for files you trust)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except Exception as e:
        if not trust_pickle and 'Unsupported global' in str(e):
            culprit = re.search(r'GLOBAL (\S+)', str(e))
            raise CheckpointError(f'{path}: holds Python objects besides tensors'
                                  f'{f" ({culprit.group(1)})" if culprit else ""}, which are not loaded by default '
                                  f'(a pickle can run code). If you trust the file, pass trust_pickle=True '
                                  f'(`vittt convert --trust-pickle`)') from e
        raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from e


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

    state_dict = convert_official_state_dict(load_checkpoint_file(src, trust_pickle), use_ema=use_ema)
    model_name = model_name or detect_official_variant(state_dict)
    if 'head.weight' in state_dict:
        model_kwargs.setdefault('num_classes', state_dict['head.weight'].shape[0])
    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    check_state_dict(state_dict, model)
    save_safetensors_atomic(state_dict, dst, metadata={'model': model_name, 'source': os.path.basename(str(src)),
                                                       'format': 'vittt'})
    return model_name, len(state_dict)
