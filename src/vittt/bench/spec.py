"""Model specs (``name`` or ``name:key=value,key=value``) and the benchmark variants each one expands to."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from torch import nn

__all__ = ['ATTN_MODES', 'ModelSpec', 'Variant', 'parse_model_spec', 'expand_variants', 'probe_model',
           'check_model_name', 'tokens']

ATTN_MODES = ('fused', 'math')
PATCH = 16  # token counts are reported on the 16×16-patch grid of DeiT / ViT³


@dataclass
class ModelSpec:
    """A timm model name plus constructor kwargs; ``text`` is the spec as the user wrote it (the variant label)."""
    text: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Variant:
    """One benchmarked configuration of a model.

    ``attn`` is 'fused' or 'math' for models with timm attention modules and None for models without any;
    ``lean`` switches on the TTT blocks' memory-lean inference mode; ``compiled`` wraps the model in
    ``torch.compile`` (static shapes, default options; the warm-up calls compile it); ``ort`` runs the model exported
    to ONNX (dynamic batch and resolution, ``vittt export``'s path) in onnxruntime (inference only); ``official``
    (a path to LeapLabTHU/ViTTT or its ``ttt_block.py``) puts the official TTT block in place of every ViT³ mixer
    (:mod:`vittt.bench.official`).
    """
    label: str
    spec: ModelSpec
    attn: str | None = None
    lean: bool = False
    compiled: bool = False
    ort: bool = False
    official: Optional[str] = None


def _split_top_level(text: str, sep: str = ',') -> List[str]:
    """Split on ``sep`` outside brackets, so ``depths=[1,1],embed_dim=64`` gives two items."""
    items, depth, current = [], 0, []
    for char in text:
        if char in '([{':
            depth += 1
        elif char in ')]}':
            depth -= 1
        if char == sep and depth == 0:
            items.append(''.join(current))
            current = []
        else:
            current.append(char)
    items.append(''.join(current))
    return items


def _parse_value(text: str) -> Any:
    """YAML scalar or list; lists become tuples, ``(1, 2)`` is read as a tuple, ``1e-3`` as a float."""
    text = text.strip()
    if text.startswith('(') and text.endswith(')'):
        text = f'[{text[1:-1]}]'
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return _lists_to_tuples(value)


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def parse_model_spec(text: str) -> ModelSpec:
    """'vit3_tiny:depth=2,embed_dim=64' -> ModelSpec(name='vit3_tiny', kwargs={'depth': 2, 'embed_dim': 64})."""
    text = text.strip()
    name, _, rest = text.partition(':')
    name = name.strip()
    if not name:
        raise ValueError(f'model spec {text!r} has no model name (expected name or name:key=value,...)')
    kwargs: Dict[str, Any] = {}
    for item in _split_top_level(rest) if rest.strip() else []:
        key, eq, value = item.partition('=')
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f'model spec {text!r}: expected key=value, got {item!r}')
        if key in kwargs:
            raise ValueError(f'model spec {text!r} sets {key!r} twice')
        try:
            kwargs[key] = _parse_value(value)
        except yaml.YAMLError as e:
            raise ValueError(f'model spec {text!r}: cannot parse the value of {key!r}: {e}') from None
    return ModelSpec(text=text, name=name, kwargs=kwargs)


def check_model_name(name: str) -> None:
    """Raise ValueError naming close matches when neither timm nor ``vittt.create_dit`` knows ``name``."""
    import timm

    from .workload import is_dit_name

    if timm.is_model(name) or is_dit_name(name):
        return
    base = name.split('.')[0]
    matches = timm.list_models(f'*{base}*')
    matches += [m for m in difflib.get_close_matches(base, timm.list_models(), n=8, cutoff=0.6) if m not in matches]
    hint = f'; close matches: {", ".join(matches[:10])}' if matches else ''
    raise ValueError(f'unknown model {name!r}{hint}')


def count_ttt_mixers(model: nn.Module) -> int:
    """ViT³-style TTT token mixers (what ``+official`` replaces in ViT³ / H-ViT³)."""
    from ..layers import TTTMixer
    return sum(isinstance(m, TTTMixer) for m in model.modules())


def probe_model(model: nn.Module) -> Tuple[int, int]:
    """(number of timm attention modules with a ``fused_attn`` switch, number of blocks with a memory-lean mode).

    The lean mode is switched on to count it and switched off again."""
    from ..layers import set_memory_lean

    attention = sum(isinstance(getattr(m, 'fused_attn', None), bool) for m in model.modules())
    lean_blocks = set_memory_lean(model, True)
    set_memory_lean(model, False)
    return attention, lean_blocks


def expand_variants(spec: ModelSpec, attention_modules: int, lean_blocks: int, attn_modes: Sequence[str],
                    lean: bool, compiled: bool = False, ort: bool = False, ttt_mixers: int = 0,
                    official: Optional[str] = None) -> List[Variant]:
    """The variants of one model: one per requested attention kernel when the model has timm attention (the fused
    one labelled by the spec, the explicit one ``<spec>+math``), else the plain model; plus ``<spec>+lean`` when
    asked for and the model has a memory-lean mode, ``<spec>+compile`` (fused attention) and ``<spec>+ort``
    (onnxruntime) when asked for, and ``<spec>+official`` (the official TTT block) for a model with ViT³ mixers when
    ``official`` gives its path."""
    unknown = set(attn_modes) - set(ATTN_MODES)
    if unknown:
        raise ValueError(f'unknown attention mode(s) {sorted(unknown)}; choose from {list(ATTN_MODES)}')
    if attention_modules > 0:
        variants = [Variant(spec.text if mode == 'fused' else f'{spec.text}+math', spec, attn=mode)
                    for mode in dict.fromkeys(attn_modes)]
    else:
        variants = [Variant(spec.text, spec)]
    if lean and lean_blocks > 0:
        variants.append(Variant(f'{spec.text}+lean', spec, attn='fused' if attention_modules else None, lean=True))
    if compiled:
        variants.append(Variant(f'{spec.text}+compile', spec, attn='fused' if attention_modules else None,
                                compiled=True))
    if ort:
        variants.append(Variant(f'{spec.text}+ort', spec, attn='fused' if attention_modules else None, ort=True))
    if official and ttt_mixers:
        variants.append(Variant(f'{spec.text}+official', spec, official=str(official)))
    return variants


def tokens(size: Sequence[int]) -> int:
    """Tokens on the 16×16-patch grid (DeiT, ViT³): a model-independent scale for the resolution axis."""
    return (size[0] // PATCH) * (size[1] // PATCH)
