"""Numerically safe inner updates under mixed precision.

The inner step differentiates a loss over all N tokens and normalises the gradient; in float16 / bfloat16 the
sums over thousands of tokens and the norms lose most of their bits (and float16 can overflow). So the inner math
always runs in float32 with autocast off, whatever the surrounding precision, and its result is returned in the
dtype of the incoming queries (so the rest of the network keeps its memory savings).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

__all__ = ['in_float32', 'runs_as_is', 'upcast']


def upcast(x: Any) -> Any:
    """float16 / bfloat16 tensors (also inside dicts) -> float32; float32, float64 and non-tensors unchanged."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.float()
    if isinstance(x, dict):
        return {k: upcast(v) for k, v in x.items()}
    return x


def runs_as_is(q: torch.Tensor) -> bool:
    """Whether :func:`in_float32` calls its function on ``q`` as it is: float32 or float64, autocast off."""
    device = q.device.type
    autocast = torch.amp.is_autocast_available(device)  # not on 'meta' (shape-only counting)
    return q.dtype in (torch.float32, torch.float64) and not (autocast and torch.is_autocast_enabled(device))


def in_float32(fn: Callable[..., torch.Tensor], q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``fn(q, *args, **kwargs)`` with floating tensors (and dicts of them) in float32 and autocast disabled."""
    if runs_as_is(q):
        return fn(q, *args, **kwargs)
    device = q.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        out = fn(upcast(q), *(upcast(a) for a in args), **{k: upcast(v) for k, v in kwargs.items()})
    return out.to(q.dtype)
