"""The official ViT³ TTT block as a benchmark variant (``vittt bench --official PATH``).

``PATH`` is a checkout of LeapLabTHU/ViTTT (or its ``ttt_block.py`` itself); nothing of it is part of vittt. The
``<spec>+official`` variant is the vittt model with the official ``TTT`` module in place of each block's
:class:`~vittt.layers.TTTMixer`, holding the same weights, so the same run times the TTT layer users would otherwise
run against ours. The patch embedding, CPE, norms and MLPs stay vittt's (they are standard layers in both).
:func:`with_official_ttt` checks that the swapped model computes what vittt's does before it is timed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

__all__ = ['find_ttt_block', 'load_official_ttt', 'with_official_ttt']

_LOADED: Dict[str, type] = {}


def find_ttt_block(path) -> Path:
    """``ttt_block.py`` in a checkout of LeapLabTHU/ViTTT (``<checkout>/**/ttt_block.py``), or ``path`` itself."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f'--official: {path} does not exist (give a checkout of LeapLabTHU/ViTTT or its '
                         'ttt_block.py)')
    found = sorted(p for p in path.rglob('ttt_block.py') if '.git' not in p.parts)
    if not found:
        raise ValueError(f'--official: no ttt_block.py under {path} (give a checkout of LeapLabTHU/ViTTT)')
    classification = [p for p in found if 'vittt' in p.parts and 'models' in p.parts]
    return (classification or found)[0]


def load_official_ttt(path) -> type:
    """The official ``TTT`` class from ``path`` (see :func:`find_ttt_block`), imported once per process."""
    file = find_ttt_block(path).resolve()
    if str(file) not in _LOADED:
        spec = importlib.util.spec_from_file_location(f'_official_vit3_ttt_block_{len(_LOADED)}', file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[spec.name]
            raise ValueError(f'--official: importing {file} failed: {type(e).__name__}: {e}') from e
        if not isinstance(getattr(module, 'TTT', None), type):
            raise ValueError(f'--official: {file} defines no TTT class (not the official ViT³ ttt_block.py?)')
        _LOADED[str(file)] = module.TTT
    return _LOADED[str(file)]


class OfficialTTT(nn.Module):
    """The official ``TTT(dim, num_heads)`` behind vittt's mixer interface ``(x [B, N, C], grid_size) -> [B, N, C]``;
    vittt's RoPE module (H-ViT³) is handed to it as the ``rope`` callable it applies to ``[B, H, W, C]`` maps."""

    def __init__(self, official: nn.Module, rope: Optional[nn.Module]):
        super().__init__()
        self.official = official
        self.rope = rope

    def forward(self, x: torch.Tensor, grid_size) -> torch.Tensor:
        h, w = grid_size
        rope: Optional[Callable] = None
        if self.rope is not None:
            def rope(t):  # [B, H, W, C] -> the same, rotated as vittt rotates [B, N, C]
                return self.rope(t.reshape(t.shape[0], h * w, t.shape[-1]), grid_size).reshape(t.shape)
        return self.official(x, h, w, rope=rope)


def _official_keys(mixer: nn.Module) -> Dict[str, str]:
    """official TTT key -> the vittt mixer's key (the inverse of the checkpoint conversion's renames)."""
    from ..models.official import _RENAMES

    ours = set(mixer.state_dict())
    mapping = {}
    for key in ('qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias', 'w1', 'w2', 'w3'):
        renamed = '.attn.' + key
        for pattern, repl in _RENAMES:
            renamed = pattern.sub(repl, renamed)
        mapping[key] = renamed[len('.attn.'):]
    missing = sorted(set(mapping.values()) - ours - {'qkv.bias'})
    extra = sorted(k for k in ours - set(mapping.values()) if not k.startswith('rope.'))
    if missing or extra:
        raise ValueError('--official: the official TTT block implements ViT³\'s default mixer (SwiGLU + 3×3 '
                         f'depth-wise conv heads) only; this model\'s mixer has {sorted(ours)}')
    return mapping


def with_official_ttt(model: nn.Module, path, check: Optional[torch.Tensor] = None) -> nn.Module:
    """``model`` with every :class:`~vittt.layers.TTTMixer` replaced by the official ``TTT`` from ``path`` with
    the same weights. With ``check`` (an input of the model), each official block must give what the mixer it
    replaces gave on that input's activations (within 1e-5 of the output's largest value), else ValueError."""
    from ..layers import TTTMixer

    TTT = load_official_ttt(path)
    mixers = [(name, m) for name, m in model.named_modules() if isinstance(m, TTTMixer)]
    if not mixers:
        raise ValueError('--official: the model has no ViT³ TTT mixer to replace (ViT³ and H-ViT³ models only)')
    seen: Dict[str, tuple] = {}
    if check is not None:  # each mixer's own input and output (the model's output alone barely sees a mixer at init)
        def keep(name):
            def hook(_, args, out):
                # copies: the block adds its residual into the output in place (returns None: the output stays)
                seen.setdefault(name, (tuple(a.clone() if torch.is_tensor(a) else a for a in args), out.clone()))
            return hook
        hooks = [m.register_forward_hook(keep(name)) for name, m in mixers]
        with torch.no_grad():
            model(check)
        for hook in hooks:
            hook.remove()
    for name, mixer in mixers:
        keys = _official_keys(mixer)
        official = TTT(mixer.dim, num_heads=mixer.inner[0].num_heads, qkv_bias=mixer.qkv.bias is not None)
        if mixer.inner[1].scale != official.scale or mixer.inner[0].scale != official.scale:
            raise ValueError(f'--official: {name} uses inner-loss scale {mixer.inner[0].scale:.4g} / '
                             f'{mixer.inner[1].scale:.4g}, the official block {official.scale:.4g}')
        ours, theirs = mixer.state_dict(), official.state_dict()
        official.load_state_dict({k: ours[v].reshape(theirs[k].shape) for k, v in keys.items() if v in ours})
        adapter = OfficialTTT(official, mixer.rope).to(mixer.qkv.weight.device).train(mixer.training)
        if name in seen:
            args, expected = seen[name]
            with torch.no_grad():
                got = adapter(*args)
            diff = (got - expected).abs().max().item()
            if not diff <= 1e-5 * expected.abs().max().item():
                raise ValueError(f'--official: the official TTT block differs from vittt\'s mixer {name} by {diff:.3g} '
                                 f'(outputs up to {expected.abs().max().item():.3g})')
        parent, _, attr = name.rpartition('.')
        setattr(model.get_submodule(parent) if parent else model, attr, adapter)
    return model


def describe(path) -> str:
    """What the variant runs, for the report's notes."""
    file = find_ttt_block(path)
    return f'{file} ({os.path.getsize(file)} bytes)'
