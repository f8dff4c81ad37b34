"""One public switch API for the execution paths of TTT models.

Every path computes the same function (tested); the switches only choose how:

* ``fused``: the fused autograd functions of ViT³'s inner models (:class:`~vittt.layers.SwiGLUInner`,
  :class:`~vittt.layers.DWConvInner`, dot-product loss) and Vision-TTT's one batched scan over all scan orders
  (:class:`~vittt.layers.VisionTTTMixer`); ``False`` runs the composable reference-style path. Default on.
* ``memory_lean`` / ``chunk_tokens``: the blocks' token-chunked inference mode (:class:`~vittt.layers.TTTBlock`, see
  :func:`vittt.layers.set_memory_lean`); only used without autograd. Default off, 1024 tokens.
* ``dwconv_backend`` (only :func:`fast_path`, a scoped setting rather than module state, see
  :func:`vittt.ops.dwconv_backend`): how the per-sample depth-wise convolutions run.

A module takes part in a switch by having the attribute: ``fused`` is a boolean declared by its class, ``memory_lean``
a boolean attribute next to ``chunk_tokens``. A model without any module having a requested switch (a timm model,
say) is not an error: nothing is switched, the count in :attr:`FastPathSettings.counts` is 0 and the returned settings
leave that switch out (there is nothing to restore).

The module switches are attributes of the model's modules: they hold for every caller of that model, in every thread,
until switched again. :func:`fast_path` switches them for a ``with`` block and then restores each module's own value.

Settings round-trip: :func:`set_fast_path` returns the previous settings as a :class:`FastPathSettings` dict, and
``set_fast_path(model, **previous)`` restores them exactly. For a switch whose modules all agree the value is that
one bool / int; where they disagree it is a :class:`PerModule` mapping ``{module name: value}`` (the names of
``model.named_modules()``), which :func:`set_fast_path` accepts as well and applies module by module.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from torch import nn

from ..ops import dwconv as _dwconv

__all__ = ['SWITCHES', 'FastPathSettings', 'PerModule', 'fast_path', 'fast_path_settings', 'set_fast_path']

#: the module switches, in the order they are reported
SWITCHES = ('fused', 'memory_lean', 'chunk_tokens')


class PerModule(dict):
    """``{module name: value}`` of one switch, one entry per module of the model having it (names as in
    ``model.named_modules()``, ``''`` for the model itself): what :class:`FastPathSettings` holds for a switch whose
    modules disagree, and what :func:`set_fast_path` accepts to give each module its own value."""


class FastPathSettings(dict):
    """``{switch: value}``: one bool (``fused``, ``memory_lean``) or int (``chunk_tokens``) where every module having
    the switch agrees, else a :class:`PerModule` mapping. Switches that no module of the model has are absent.

    ``set_fast_path(model, **settings)`` restores them exactly (each module its own value).

    Attributes:
        modules: ``{switch: PerModule}`` for each switch asked about, always module by module (empty when no module
            has the switch).
    """

    def __init__(self, modules: Mapping[str, PerModule]):
        super().__init__()
        self.modules: Dict[str, PerModule] = dict(modules)
        for switch, values in self.modules.items():
            distinct = set(values.values())
            if len(distinct) == 1:
                self[switch] = next(iter(distinct))
            elif distinct:
                self[switch] = PerModule(values)

    @property
    def counts(self) -> Dict[str, int]:
        """``{switch: number of modules}``: for :func:`set_fast_path`'s result the modules switched, for
        :func:`fast_path_settings`'s the modules having the switch (0 where none has it)."""
        return {switch: len(values) for switch, values in self.modules.items()}


def _has_fused(module: nn.Module) -> bool:
    return isinstance(getattr(type(module), 'fused', None), bool)


def _has_lean(module: nn.Module) -> bool:
    return isinstance(getattr(module, 'memory_lean', None), bool) and hasattr(module, 'chunk_tokens')


_HAS = {'fused': _has_fused, 'memory_lean': _has_lean, 'chunk_tokens': _has_lean}


def _check_flag(switch: str, value, where: str = '') -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{switch}{where} must be True or False (None leaves it unchanged), got {value!r}')
    return value


def _check_chunk_tokens(switch: str, value, where: str = '') -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{switch}{where} must be a positive number of tokens (an int >= 1; None leaves it '
                         f'unchanged), got {value!r}')
    return int(value)


_CHECK = {'fused': _check_flag, 'memory_lean': _check_flag, 'chunk_tokens': _check_chunk_tokens}


def _switchable(model: nn.Module, switch: str) -> List[Tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise ValueError(f'model must be a torch.nn.Module, got {type(model).__name__}')
    return [(name, m) for name, m in model.named_modules() if _HAS[switch](m)]


def _plan(model: nn.Module, switch: str, value) -> List[Tuple[str, nn.Module, Any]]:
    """``[(name, module, new value)]`` for one switch, every argument checked before anything is switched."""
    modules = _switchable(model, switch)
    check = _CHECK[switch]
    if not isinstance(value, Mapping):
        value = check(switch, value)
        return [(name, m, value) for name, m in modules]
    names = {name for name, _ in modules}
    missing, unknown = sorted(names - set(value)), sorted(set(value) - names)
    if missing or unknown:
        raise ValueError(f"{switch}: the per-module settings must name exactly the model's modules with that switch "
                         f'(missing: {missing}; not such a module of the model: {unknown})')
    return [(name, m, check(switch, value[name], f' of module {name!r}')) for name, m in modules]


def _plans(model: nn.Module, fused, memory_lean, chunk_tokens) -> Dict[str, List[Tuple[str, nn.Module, Any]]]:
    requested = {s: v for s, v in zip(SWITCHES, (fused, memory_lean, chunk_tokens)) if v is not None}
    return {s: _plan(model, s, v) for s, v in requested.items()}


def _apply(plans: Mapping[str, List[Tuple[str, nn.Module, Any]]]) -> None:
    for switch, plan in plans.items():
        for _, module, value in plan:
            setattr(module, switch, value)


def _read(model: nn.Module, switches) -> FastPathSettings:
    return FastPathSettings({s: PerModule((name, getattr(m, s)) for name, m in _switchable(model, s))
                             for s in switches})


def fast_path_settings(model: nn.Module) -> FastPathSettings:
    """The current settings of every switch that a module of ``model`` has (see :class:`FastPathSettings`);
    ``.counts`` gives the number of modules per switch (0 where none). ``set_fast_path(model, **settings)`` puts
    exactly these settings back later."""
    return _read(model, SWITCHES)


def set_fast_path(model: nn.Module, *, fused: Union[bool, Mapping[str, bool], None] = None,
                  memory_lean: Union[bool, Mapping[str, bool], None] = None,
                  chunk_tokens: Union[int, Mapping[str, int], None] = None) -> FastPathSettings:
    """Switch every module of ``model`` that has the switch; ``None`` leaves a switch unchanged.

    Args:
        fused: the fused kernels (True, the default of every module) or the composable reference-style path.
        memory_lean: the blocks' memory-lean inference mode (token chunks; inference only).
        chunk_tokens: tokens per chunk of the memory-lean mode (a positive int).

    Each may also be a :class:`PerModule` mapping naming every module with the switch (what this function returns
    for modules that disagreed). All arguments are checked before anything is switched: a bad one raises a
    ``ValueError`` naming it and leaves the model as it was. Modules without the switch, and models with no such
    module (timm models), are left alone.

    Returns:
        the previous settings of the requested switches (:class:`FastPathSettings`; ``.counts`` = the number of
        modules switched per switch): ``set_fast_path(model, **previous)`` restores them exactly.
    """
    plans = _plans(model, fused, memory_lean, chunk_tokens)
    previous = _read(model, plans)
    _apply(plans)
    return previous


@contextlib.contextmanager
def fast_path(model: nn.Module, *, fused: Union[bool, Mapping[str, bool], None] = None,
              memory_lean: Union[bool, Mapping[str, bool], None] = None,
              chunk_tokens: Union[int, Mapping[str, int], None] = None,
              dwconv_backend: Optional[str] = None) -> Iterator[nn.Module]:
    """``with fast_path(model, ...):`` applies :func:`set_fast_path`'s switches (same arguments, same checks) and,
    with ``dwconv_backend``, :func:`vittt.ops.dwconv_backend` for the block; on exit, also when the block raises,
    every switched module gets back its own previous value and the backend is restored. ``None`` leaves a setting
    unchanged. Yields ``model``."""
    with contextlib.ExitStack() as stack:
        if dwconv_backend is not None:
            stack.enter_context(_dwconv.dwconv_backend(dwconv_backend))
        plans = _plans(model, fused, memory_lean, chunk_tokens)
        # restored by module identity (not by name), so it holds whatever the block does to the model's structure
        snapshot = {s: [(name, m, getattr(m, s)) for name, m, _ in plan] for s, plan in plans.items()}
        stack.callback(_apply, snapshot)
        _apply(plans)
        yield model
