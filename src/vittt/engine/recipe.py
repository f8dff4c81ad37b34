"""Training recipes as data: a flat dict of the engine's keys plus the keys of the recipe's task.

``load_recipe(source, overrides)`` starts from :data:`ENGINE_DEFAULTS` and the task's defaults (the task is named by
``task`` in the overrides, else in the file, else ``classification``), applies the YAML file, then ``key=value``
overrides (values parsed as YAML: ``lr=1e-3``, ``amp=bf16``, ``auto_augment=null``). ``source`` is a path or the name
of a recipe shipped inside the package (``vittt recipes`` lists them). Unknown keys are an error naming the closest
known ones.

**Run length.** A run is epoch-based (``epochs``) or step-based (``steps``, the number of optimizer updates); setting
one in the overrides clears the other. When the overrides shorten the recipe's run and leave its warm-up alone, the
warm-up shrinks in the same proportion and a note says so (the official 20 warm-up epochs of 300 become 0.2 of a
3-epoch run); a warm-up that is not shorter than the run is refused.
"""
from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import yaml

from .task import get_task

__all__ = ['ENGINE_DEFAULTS', 'RecipeError', 'load_recipe', 'parse_overrides', 'scaled_lr', 'recipe_defaults',
           'list_recipes', 'find_recipe', 'recipe_yaml', 'AMP_MODES', 'SCHEDULES']


class RecipeError(ValueError):
    """A recipe file or override that cannot be used; the message names it."""


# What every task shares (the official ViT³ code's values where it has one, spec A.5): AdamW, lr 5e-4 per 512
# images scaled linearly with the global batch, cosine per update with 20 warm-up epochs of 300, clip 5.0.
ENGINE_DEFAULTS: Dict[str, Any] = dict(
    task='classification', model=None, model_kwargs={},
    epochs=300, steps=None, batch_size=128,
    opt='adamw', lr=5e-4, lr_base_batch=512, warmup_lr=5e-7, min_lr=5e-6, sched='cosine',
    warmup_epochs=20, warmup_steps=None, decay_milestones=[], decay_rate=0.1, poly_power=1.0,
    weight_decay=0.05, weight_decay_exempt=None, opt_betas=[0.9, 0.999], opt_eps=1e-8, clip_grad=5.0,
    model_ema=False, model_ema_decay=0.9996, model_ema_ref_batch=4096,
    amp='none', grad_checkpointing=False,
    num_workers=4, seed=0, eval_every=1, checkpoint_every=0, train_subset=0, val_subset=0,
)
AMP_MODES = ('none', 'bf16', 'fp16')
SCHEDULES = ('cosine', 'constant', 'step', 'poly')
_POSITIVE_INTS = ('batch_size',)
_RECIPE_PACKAGE = 'vittt'
_RECIPE_DIR = 'configs'


def recipe_defaults(task: str) -> Dict[str, Any]:
    """The engine's defaults updated with ``task``'s (a copy)."""
    try:
        task_cls = get_task(task)
    except KeyError as e:
        raise RecipeError(str(e.args[0])) from None
    return {**ENGINE_DEFAULTS, **task_cls.defaults, 'task': task}


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


def _check_keys(source: str, recipe: Dict[str, Any], known: Dict[str, Any]) -> None:
    unknown = [k for k in recipe if k not in known]
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
        raise RecipeError(f'{source}: unknown recipe keys ' + ', '.join(
            f'{k!r}' + (f' (did you mean {" or ".join(hints[k])}?)' if hints[k] else '') for k in unknown))


def _coerce_numbers(recipe: Dict[str, Any], defaults: Dict[str, Any]) -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: turn such strings into numbers for numeric keys."""
    numeric = set(k for k, v in defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    numeric |= {'steps', 'warmup_steps'}
    for key in numeric:
        value = recipe.get(key)
        if isinstance(value, str):
            try:
                recipe[key] = float(value)
            except ValueError:
                raise RecipeError(f'{key} must be a number, got {value!r}') from None


# ---------------------------------------------------------------------------------------------- shipped recipes

def _recipe_root():
    return resources.files(_RECIPE_PACKAGE).joinpath(_RECIPE_DIR)


def list_recipes() -> Dict[str, Any]:
    """``{name: resource}`` of the recipes shipped in the package (``<task>/<name>.yaml``), sorted by name."""
    found = {}
    root = _recipe_root()
    if root.is_dir():
        for task_dir in sorted(root.iterdir(), key=lambda p: p.name):
            if task_dir.is_dir():
                for f in sorted(task_dir.iterdir(), key=lambda p: p.name):
                    if f.name.endswith('.yaml'):
                        found[f.name[:-5]] = f
    return found


def find_recipe(model: Optional[str], task: str = 'classification') -> Optional[str]:
    """The shipped recipe for ``model`` and ``task`` (its name), or None when none is shipped."""
    if not model:
        return None
    shipped = list_recipes()
    if model in shipped and (yaml.safe_load(shipped[model].read_text()) or {}).get('task', 'classification') == task:
        return model
    for name, resource in shipped.items():
        data = yaml.safe_load(resource.read_text()) or {}
        if data.get('model') == model and data.get('task', 'classification') == task:
            return name
    return None


def _read_source(source) -> (Dict[str, Any], str):
    """(mapping, label) of a recipe path or shipped recipe name."""
    shipped = list_recipes()
    text, label = None, str(source)
    if isinstance(source, str) and source in shipped:
        text, label = shipped[source].read_text(), f'recipe {source}'
    else:
        path = Path(source)
        if path.is_file():
            text = path.read_text()
        else:
            close = difflib.get_close_matches(str(source), shipped, n=3)
            raise RecipeError(f'recipe not found: {source} is neither a file nor a shipped recipe'
                              + (f' (did you mean {" or ".join(close)}?)' if close else '')
                              + '; `vittt recipes` lists the shipped ones')
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f'{label}: not valid YAML: {e}') from None
    if not isinstance(data, dict):
        raise RecipeError(f'{label}: a recipe is a mapping of keys to values, got {type(data).__name__}')
    return data, label


def recipe_yaml(recipe: Dict[str, Any]) -> str:
    return yaml.safe_dump(dict(recipe), sort_keys=False)


# ---------------------------------------------------------------------------------------------- resolution

def _run_length(recipe: Dict[str, Any]):
    """('epochs' | 'steps', length, warm-up key)."""
    if recipe.get('steps') is not None:
        return 'steps', recipe['steps'], 'warmup_steps'
    return 'epochs', recipe['epochs'], 'warmup_epochs'


def load_recipe(source: Union[str, Path, None] = None, overrides: Optional[Dict[str, Any]] = None,
                notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """The resolved recipe; see the module docstring. Lines worth telling the user are appended to ``notes``."""
    overrides = dict(overrides or {})
    data, label = _read_source(source) if source is not None else ({}, None)
    task = overrides.get('task', data.get('task', 'classification'))
    defaults = recipe_defaults(task)
    if label:
        _check_keys(label, data, defaults)
    _check_keys('override', overrides, defaults)

    for where, layer in ((label, data), ('override', overrides)):
        if layer.get('steps') is not None and layer.get('epochs') is not None:
            raise RecipeError(f'{where}: set either epochs or steps, not both')
    base = _layer(defaults, data)
    _coerce_numbers(base, defaults)
    recipe = _layer(base, overrides)
    _coerce_numbers(recipe, defaults)
    _validate(recipe)
    _fit_warmup(base, recipe, overrides, notes if notes is not None else [])
    return recipe


def _layer(below: Dict[str, Any], above: Dict[str, Any]) -> Dict[str, Any]:
    """``above`` over ``below``; a run length set in ``above`` clears the other kind of length."""
    out = {**below, **above}
    if above.get('steps') is not None:
        out['epochs'] = None
    elif above.get('epochs') is not None:
        out['steps'] = None
    return out


def _validate(recipe: Dict[str, Any]) -> None:
    if recipe['amp'] not in AMP_MODES:
        raise RecipeError(f"amp must be one of {AMP_MODES}, got {recipe['amp']!r}")
    if recipe['sched'] not in SCHEDULES:
        raise RecipeError(f"sched must be one of {SCHEDULES}, got {recipe['sched']!r}")
    for key in _POSITIVE_INTS:
        if not isinstance(recipe[key], int) or isinstance(recipe[key], bool) or recipe[key] < 1:
            raise RecipeError(f'{key} must be a positive integer, got {recipe[key]!r}')
    kind, length, _ = _run_length(recipe)
    if isinstance(length, float) and length.is_integer():
        recipe[kind] = length = int(length)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise RecipeError(f'{kind} must be a positive integer, got {length!r}')
    for key in ('eval_every', 'checkpoint_every'):
        value = recipe[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RecipeError(f'{key} must be a non-negative integer, got {value!r}')


def _fit_warmup(base: Dict[str, Any], recipe: Dict[str, Any], overrides: Dict[str, Any], notes: List[str]) -> None:
    """Shrink the warm-up with a shortened run; refuse a warm-up as long as the run."""
    kind, length, warm_key = _run_length(recipe)
    base_kind, base_length, _ = _run_length(base)
    warmup = recipe.get(warm_key)
    if warmup is None:
        warmup = 0
    if warm_key not in overrides and base_kind == kind and base_length and length < base_length and warmup > 0:
        scaled = warmup * length / base_length
        if kind == 'steps':
            scaled = int(round(scaled))
        notes.append(f'the run is shortened from {base_length} to {length} {kind}: warm-up scaled in proportion, '
                     f'{warmup} -> {scaled:g} {kind} (set {warm_key}=... to choose another)')
        recipe[warm_key] = warmup = scaled
    if warmup < 0:
        raise RecipeError(f'{warm_key} must not be negative, got {warmup}')
    if warmup and warmup >= length:
        raise RecipeError(f'the warm-up ({warm_key}={warmup:g}) is not shorter than the run ({kind}={length}): the lr '
                          f'would never leave the warm-up and the schedule never reach its peak; shorten the '
                          f'warm-up or lengthen the run')


def scaled_lr(recipe: Dict[str, Any], world_size: int) -> Dict[str, float]:
    """The official linear scaling: every lr × (global batch / lr_base_batch); no scaling when lr_base_batch is
    null."""
    base = recipe.get('lr_base_batch')
    factor = recipe['batch_size'] * world_size / base if base else 1.0
    return {k: recipe[k] * factor for k in ('lr', 'warmup_lr', 'min_lr')}
