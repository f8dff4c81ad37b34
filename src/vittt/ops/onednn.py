"""Convolutions and linear layers with their activation applied by oneDNN as it writes the output (a *post-op*), for
inference on CPU.

``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise`` are the ATen ops Inductor emits for these fusions
on CPU; they ship with every CPU build of PyTorch that has oneDNN, need no compiler, and have no autograd formula.
Eager code otherwise writes the layer's output and then runs the activation as a second pass over it (``gelu_``,
``relu_``): at H-ViT³'s 4C-wide hidden maps that pass costs as much as the depth-wise convolution before it. Even
without an activation oneDNN's matmul is the faster one in a model: it adds the bias as it writes the output, where
``F.linear`` first copies the bias into every row of a fresh output and then accumulates into it (a whole extra pass
over memory no cache holds; :func:`linear_layer`). Every
function here falls back to exactly that eager pair where the fused op does not apply (autograd on, another device
or dtype, oneDNN disabled, a graph being captured, a dispatch mode such as ``FlopCounterMode``), so callers need no
condition of their own.

:func:`identity_folded` turns ``x + DWConv(x)`` into one depth-wise convolution (the identity is a kernel whose
centre tap is one), which every backend runs.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ._capture import symbolic_shapes

__all__ = ['post_ops_apply', 'activation_name', 'linear_act', 'linear_mul', 'linear_layer', 'plain_module',
           'plain_linear', 'conv_act', 'identity_folded', 'ACTIVATIONS', 'LINEAR_BIAS_PASS_ELEMENTS']

#: activations the fused paths take: name -> (oneDNN post-op, in-place eager form, out-of-place eager form)
ACTIVATIONS = {
    'gelu': ('gelu', lambda t, approximate: torch.ops.aten.gelu_(t, approximate=approximate),
             lambda t, approximate: F.gelu(t, approximate=approximate)),
    'relu': ('relu', lambda t, approximate: F.relu_(t), lambda t, approximate: F.relu(t)),
    'silu': ('swish', lambda t, approximate: F.silu(t, inplace=True), lambda t, approximate: F.silu(t)),
    None: ('none', lambda t, approximate: t, lambda t, approximate: t),
}

_MODULES = {nn.GELU: 'gelu', nn.ReLU: 'relu', nn.SiLU: 'silu'}


def activation_name(module: nn.Module) -> Optional[str]:
    """The :data:`ACTIVATIONS` key of an activation module (``nn.GELU``, ``nn.ReLU``, ``nn.SiLU``; subclasses and
    hooked modules excluded, see :func:`plain_module`), or None for any other module, which callers apply
    themselves (as the module)."""
    name = _MODULES.get(type(module))
    return name if name is not None and plain_module(module, type(module)) else None


def post_ops_apply(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN's fused post-ops run for these operands: no autograd, no CPU autocast (which sets the ops'
    dtype), concrete shapes, float32 CPU tensors, oneDNN available and enabled
    (``torch.backends.mkldnn.flags(enabled=False)`` turns the fused paths off too), and no dispatch mode active
    (``FlopCounterMode`` and its kin know the plain ops' formulas, not these)."""
    if torch.is_grad_enabled() or symbolic_shapes() or is_in_torch_dispatch_mode():
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if not torch.backends.mkldnn.enabled:
        return False
    if torch.is_autocast_enabled('cpu'):  # autocast sets the ops' dtype; the fused ops would bypass it
        return False
    return all(t is None or (t.device.type == 'cpu' and t.dtype == torch.float32) for t in tensors)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: Optional[str] = None,
               approximate: str = 'none') -> torch.Tensor:
    """``act(F.linear(x, weight, bias))``; ``act`` one of ``'gelu'`` (``approximate`` as :class:`torch.nn.GELU`),
    ``'relu'``, ``'silu'`` or ``None``. Without autograd on float32 CPU tensors one oneDNN matmul with the bias and the
    activation as post-ops (no separate bias copy, no second pass); otherwise the linear and an in-place
    activation."""
    if post_ops_apply(x, weight, bias):
        return _linear_pointwise(x, weight, bias, act, approximate)
    return ACTIVATIONS[act][1](F.linear(x, weight, bias), approximate)


def _linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: Optional[str],
                      approximate: str) -> torch.Tensor:
    """The fused oneDNN matmul itself (callers have checked :func:`post_ops_apply`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, ACTIVATIONS[act][0], [],
                                              approximate if act == 'gelu' else None)


def linear_mul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               other: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias) * other`` (``other`` of the output's shape, e.g. a SwiGLU's activated gate): one
    oneDNN matmul with the product as a binary post-op where :func:`post_ops_apply` holds and ``other`` is
    contiguous; otherwise the linear and an in-place product."""
    if (post_ops_apply(x, weight, bias, other) and other.is_contiguous()
            and other.shape == (*x.shape[:-1], weight.shape[0])):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, 'mul')
    return F.linear(x, weight, bias).mul_(other)


#: output size (elements) from which :func:`linear_layer` runs an activation-less linear through oneDNN (1 MiB of
#: float32: below it the output stays in cache and MKL's matmul wins; above it skipping F.linear's bias pass does)
LINEAR_BIAS_PASS_ELEMENTS = 1 << 18


def plain_module(module: Optional[nn.Module], cls: type) -> bool:
    """Whether ``module`` is exactly a ``cls`` (not a subclass, which may change ``forward``) with no forward hooks
    of its own and none registered globally, so that calling it is exactly its class's function of its parameters.
    Only then do the fused paths (here and in :mod:`vittt.layers`) use its weights directly; otherwise they call the
    module, and a feature extractor's or profiler's hook sees every call."""
    return (type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
            and not _nn_module._global_forward_hooks and not _nn_module._global_forward_pre_hooks)


def plain_linear(module: nn.Module) -> bool:
    """Whether ``module(x)`` is exactly ``F.linear(x, module.weight, module.bias)`` (:func:`plain_module` for
    ``nn.Linear``)."""
    return plain_module(module, nn.Linear)


def linear_layer(module: nn.Module, x: torch.Tensor, act: Optional[str] = None,
                 approximate: str = 'none') -> torch.Tensor:
    """``act(module(x))`` for a linear layer (``act`` as in :func:`linear_act`): one oneDNN matmul with the bias
    (and the activation) as it writes the output where :func:`plain_linear` and :func:`post_ops_apply` hold;
    otherwise the module itself and the activation out of place, exactly as the plain code (autograd included).
    Without an activation, outputs under :data:`LINEAR_BIAS_PASS_ELEMENTS` elements stay with ``F.linear``: its bias
    pass is then a cache-resident write, and MKL's matmul is the faster one at those sizes (ViT³-T at batch 1).
    In eval at 224², batch 16, this saves ~3 % of H-ViT³-T's forward (docs/benchmarks.md, issue 15)."""
    if plain_linear(module) and post_ops_apply(x, module.weight, module.bias) and (
            act is not None or x.numel() // max(1, x.shape[-1]) * module.out_features >= LINEAR_BIAS_PASS_ELEMENTS):
        return _linear_pointwise(x, module.weight, module.bias, act, approximate)  # (post_ops_apply checked)
    return ACTIVATIONS[act][2](module(x), approximate)


def conv_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int] = (1, 1),
             padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
             act: Optional[str] = None, approximate: str = 'none') -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups))``, with the activation as oneDNN's
    post-op where :func:`post_ops_apply` holds and the padding is numbers (the output in the input's memory format,
    as ``F.conv2d`` gives it); otherwise (a padding string such as ``'same'`` included) the convolution and an
    in-place activation."""
    post_op, eager, _ = ACTIVATIONS[act]
    if not isinstance(padding, str) and post_ops_apply(x, weight, bias):
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(padding), list(stride), list(dilation),
                                                       groups, post_op, [], approximate if act == 'gelu' else None)
    return eager(F.conv2d(x, weight, bias, stride, padding, dilation, groups), approximate)


def identity_folded(weight: torch.Tensor) -> torch.Tensor:
    """The depth-wise kernel ``[C, 1, k, k]`` (odd ``k``) plus the identity: ``DWConv(x; result) = x + DWConv(x;
    weight)`` for a zero-padded, stride-1 convolution (up to rounding: the centre tap's product is
    ``(w + 1) x`` instead of ``w x + x``). One broadcast sum with a cached one-hot kernel (a fresh tensor: the
    module's kernel is left alone)."""
    k_h, k_w = weight.shape[-2:]
    if weight.dim() != 4 or weight.shape[1] != 1 or not (k_h % 2 and k_w % 2):
        raise ValueError(f'identity_folded needs a depth-wise kernel [C, 1, k, k] with odd k, got {list(weight.shape)}')
    # (never cache a tensor made under a dispatch mode: a fake or meta tensor would outlive it)
    tap = _centre_tap if is_in_torch_dispatch_mode() or weight.is_meta else _cached_centre_tap
    return weight + tap(k_h, k_w, weight.dtype, weight.device)


def _centre_tap(k_h: int, k_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[k_h, k_w]`` zeros with a one at the centre."""
    with torch.inference_mode(False):  # usable outside inference mode too
        tap = torch.zeros(k_h, k_w, dtype=dtype, device=device)
        tap[k_h // 2, k_w // 2] = 1
    return tap


_cached_centre_tap = functools.lru_cache(maxsize=32)(_centre_tap)
