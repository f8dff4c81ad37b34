"""Training recipes as data: the official ViT³ ImageNet recipe as defaults, one YAML per model size, overridable.

A recipe is a flat dict. ``load_recipe(path, overrides)`` starts from :data:`DEFAULTS`, applies the YAML file, then
``key=value`` overrides (values parsed as YAML, so ``lr=1e-3``, ``amp=bf16``, ``auto_augment=null`` work). Unknown
keys are an error naming the closest known ones.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

__all__ = ['DEFAULTS', 'load_recipe', 'parse_overrides', 'RecipeError', 'scaled_lr']


class RecipeError(ValueError):
    """A recipe file or override that cannot be used; the message names it."""


# Official ViT³ code defaults (spec A.5): per-process batch 128, lr 5e-4 per 512 images, AdamW wd 0.05 (1-D params and
# biases exempt), 20 warm-up epochs of 300, cosine per iteration, clip 5.0, Mixup 0.8 / CutMix 1.0, label smoothing 0.1,
# RandAugment m9, colour jitter 0.4, random erasing 0.25, bicubic, eval crop 224/256.
DEFAULTS: Dict[str, Any] = dict(
    model=None, epochs=300, batch_size=128, img_size=224, in_chans=3,
    opt='adamw', lr=5e-4, lr_base_batch=512, warmup_lr=5e-7, min_lr=5e-6, warmup_epochs=20,
    weight_decay=0.05, opt_betas=[0.9, 0.999], opt_eps=1e-8, clip_grad=5.0,
    label_smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch',
    auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.4, reprob=0.25, remode='pixel', recount=1,
    interpolation='bicubic', crop_pct=0.875, scale=[0.08, 1.0], hflip=0.5,
    drop_path=0.0, drop=0.0,
    model_ema=False, model_ema_decay=0.9996, model_ema_ref_batch=4096,
    mesa=0.0, mesa_start=0.25,
    amp='none', grad_checkpointing=False,
    num_workers=4, seed=0, eval_every=1, train_subset=0, val_subset=0, model_kwargs={},
)

_AMP = ('none', 'bf16', 'fp16')


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``['lr=1e-3', 'mixup=0']`` -> ``{'lr': 0.001, 'mixup': 0}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise RecipeError(f'overrides are key=value, got {item!r}')
        try:
            out[key.strip()] = yaml.safe_load(value) if value != '' else None
        except yaml.YAMLError as e:
            raise RecipeError(f'cannot parse the value of override {item!r}: {e}') from None
    return out


def _check_keys(source: str, recipe: Dict[str, Any]) -> None:
    unknown = [k for k in recipe if k not in DEFAULTS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, DEFAULTS, n=2) for k in unknown}
        raise RecipeError(f'{source}: unknown recipe keys ' + ', '.join(
            f'{k!r}' + (f' (did you mean {" or ".join(hints[k])}?)' if hints[k] else '') for k in unknown))


def _coerce_numbers(recipe: Dict[str, Any]) -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: turn such strings into numbers for numeric keys."""
    for key, value in recipe.items():
        default = DEFAULTS.get(key)
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                recipe[key] = float(value)
            except ValueError:
                raise RecipeError(f'{key} must be a number, got {value!r}') from None


def load_recipe(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    recipe = dict(DEFAULTS)
    if path:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f'recipe file not found: {path}')
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f'{path}: not valid YAML: {e}') from None
        if not isinstance(data, dict):
            raise RecipeError(f'{path}: a recipe is a mapping of keys to values, got {type(data).__name__}')
        _check_keys(str(path), data)
        recipe.update(data)
    if overrides:
        _check_keys('override', overrides)
        recipe.update(overrides)
    _coerce_numbers(recipe)
    if recipe['amp'] not in _AMP:
        raise RecipeError(f"amp must be one of {_AMP}, got {recipe['amp']!r}")
    for key in ('epochs', 'batch_size', 'img_size'):
        if not isinstance(recipe[key], int) or recipe[key] < 1:
            raise RecipeError(f'{key} must be a positive integer, got {recipe[key]!r}')
    return recipe


def scaled_lr(recipe: Dict[str, Any], world_size: int) -> Dict[str, float]:
    """The official linear scaling: every lr × (global batch / lr_base_batch)."""
    factor = recipe['batch_size'] * world_size / recipe['lr_base_batch']
    return {k: recipe[k] * factor for k in ('lr', 'warmup_lr', 'min_lr')}
