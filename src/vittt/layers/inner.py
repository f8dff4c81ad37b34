"""Inner models of a TTT layer as modules: the learned initial state W0 and its inner training.

An :class:`InnerModel` consumes ``width`` channels of each of q, k, v (tokens ``[B, N, width]`` on a grid),
trains a copy of its initial state on ``(k, v)`` and applies it to ``q``, returning ``[B, N, out_width]``. The math
is one :class:`~vittt.ops.inner.InnerFunction` (gradient, step, apply) composed by :func:`~vittt.ops.inner.inner_ttt`
(epochs, mini-batches, dynamic lr); the memory-lean mode uses the same pieces band by band. ViT³'s two inner models
add their fused fast paths (:class:`SwiGLUInner`, :class:`DWConvInner`, switched by ``fused``), which compute the same
function for the configuration they cover and are tested against the composition.

:class:`~vittt.layers.ttt.TTTMixer` only needs the attributes below, so new inner models (and, through
:class:`~vittt.ops.InnerLoss`, new inner losses) plug in without touching the mixer or the models.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch import nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..ops import DotProductLoss, InnerLoss, dwconv_inner_grad, dwconv_per_sample, get_inner_loss, swiglu_ttt_fused
from ..ops.dwconv import dwconv_ttt_fused
from ..ops.inner import InnerFunction, check_schedule, inner_stats, inner_step, inner_ttt, make_inner_function
from ..ops._capture import capturing_for_export
from ..ops.precision import in_float32, runs_as_is, upcast
from .grid import GridSize, map_to_tokens, tokens_to_map
from .lean import Band

__all__ = ['InnerModel', 'TokenInner', 'SwiGLUInner', 'DWConvInner', 'resolve_scale', 'record_inner_stats']

Scale = Union[float, str]
InnerLr = Union[float, str]


def resolve_scale(scale: Scale, head_dim: int) -> float:
    """A number is used as is; ``'head_dim'`` means ``head_dim ** -0.5`` (the paper's 1/sqrt(d))."""
    if isinstance(scale, str):
        if scale != 'head_dim':
            raise ValueError(f"inner loss scale must be a number or 'head_dim', got {scale!r}")
        return head_dim ** -0.5
    return float(scale)


def _check_lr(inner_lr: InnerLr):
    if isinstance(inner_lr, str):
        if inner_lr != 'dynamic':
            raise ValueError(f"inner_lr must be a number or 'dynamic', got {inner_lr!r}")
        return 1.0, True
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
        raise ValueError(f"inner_lr must be a number or 'dynamic', got {inner_lr!r}")
    return float(inner_lr), False


class InnerModel(nn.Module):
    """Base class. Subclasses set ``width``, ``out_width``, ``accepts_rope`` and implement ``forward(q, k, v,
    grid_size, lr_logits=None)``; ``lr_width`` extra projection channels (the dynamic inner lr's logits, one per
    head) are passed as ``lr_logits [B, N, lr_width]``.

    The memory-lean inference mode (:func:`vittt.layers.set_memory_lean`) also uses ``lean_accumulate`` (add a band of
    tokens' share of the inner gradient to a running sum; ``None`` starts it), ``lean_step`` (the trained state from
    the summed gradient) and ``lean_apply`` (the trained model on a band of queries), when ``supports_lean`` is true;
    ``halo`` is how many grid rows of context around a band these need.
    """

    width: int
    out_width: int
    accepts_rope: bool = False
    halo: int = 0
    lr_width: int = 0

    def __init__(self, loss: Union[str, InnerLoss] = 'dot', scale: Scale = 1 / 3, inner_lr: InnerLr = 1.0,
                 grad_norm: bool = True, epochs: int = 1, batches: int = 1):
        super().__init__()
        self.loss = get_inner_loss(loss)
        self.scale_spec = scale
        self.inner_lr, self.dynamic_lr = _check_lr(inner_lr)
        self.grad_norm = bool(grad_norm)
        self.epochs, self.batches = epochs, batches
        self.stats: Optional[List[Dict[str, torch.Tensor]]] = None   # see record_inner_stats

    @property
    def supports_lean(self) -> bool:
        """The band-by-band sums equal the full gradient: an additive loss, one full-batch step, constant lr."""
        return (hasattr(self, 'lean_accumulate') and self.loss.additive and self.epochs == 1 and self.batches == 1
                and not self.dynamic_lr)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_size: GridSize,
                lr_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def _extra(self) -> str:
        lr = 'dynamic' if self.dynamic_lr else self.inner_lr
        text = f'loss={self.loss.name}, scale={self.scale:.4g}, inner_lr={lr}, grad_norm={self.grad_norm}'
        return text + (f', epochs={self.epochs}' if self.epochs != 1 else '') + \
            (f', batches={self.batches}' if self.batches != 1 else '')


class TokenInner(InnerModel):
    """``num_heads`` inner models of width ``head_dim`` built from one :class:`~vittt.ops.inner.InnerFunction`.

    Args:
        num_heads, head_dim: heads and their width d (the model consumes ``num_heads · head_dim`` channels).
        inner_model: ``'fc'``, ``'silu_fc'``, ``'mlp'``, ``'swiglu'``, ``'glu'``, ``'conv3x3'`` or ``'dwconv3x3'``
            (:mod:`vittt.ops.inner.functions`).
        ratio, depth, residual: hidden width ``ratio · d``; ``mlp`` depth 2 or 3; ``mlp`` residual ``None``,
            ``'add'``, ``'identity_w2'`` or ``'init_identity'`` (W_last initialised to I).
        loss, scale, inner_lr (a number or ``'dynamic'``), grad_norm, epochs, batches: the inner training.

    W0: one parameter per state tensor of the function (``w1``, ``w2``, ... ``[1, h, rows, cols]``, trunc-normal std
    0.02; ``dwconv3x3``: ``weight [1, C, k, k]``).
    """

    def __init__(self, num_heads: int, head_dim: int, inner_model: str = 'mlp', ratio: int = 1, depth: int = 2,
                 residual: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.fn = self._make_function(inner_model, head_dim, ratio, depth, residual)
        check_schedule(self.fn, self.epochs, self.batches)
        if self.dynamic_lr and not self.fn.token_wise:
            raise ValueError(f"inner_lr='dynamic' is defined for token-wise inner models, not {inner_model!r}")
        self.width = num_heads * head_dim
        self.out_width = num_heads * self.fn.out_dim
        self.lr_width = num_heads if self.dynamic_lr else 0
        self.scale = resolve_scale(self.scale_spec, head_dim)
        self.accepts_rope = self.fn.token_wise and self.fn.name != 'conv3x3'
        self._create_state(residual)

    def _make_function(self, name, head_dim, ratio, depth, residual) -> InnerFunction:
        return make_inner_function(name, head_dim, ratio, depth, residual)

    def _create_state(self, residual):
        for name, shape in self.fn.state_shapes(self.num_heads).items():
            p = nn.Parameter(torch.empty(shape))
            trunc_normal_(p, std=0.02)
            self.register_parameter(name, p)
        if residual == 'init_identity':
            last = getattr(self, f'w{self.fn.depth}')
            with torch.no_grad():
                last.copy_(torch.eye(last.shape[-1]).expand_as(last))

    def state(self) -> Dict[str, torch.Tensor]:
        """The initial state W0 as the function's dict."""
        return {name: getattr(self, name) for name in self.fn.shapes()}

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, N, h·a]`` -> ``[B, h, N, a]``."""
        # sizes spelled out (no -1), and contiguous while a graph is captured: an inferred size or the layout of a
        # strided view is decided from the sizes, a guard on them that a dynamic-shape export may not bake in
        t = t.reshape(t.shape[0], t.shape[1], self.num_heads, t.shape[2] // self.num_heads).transpose(1, 2)
        return t.contiguous() if capturing_for_export() else t

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], t.shape[1] * t.shape[3])

    def _settings(self, lr_logits):
        weights = None if lr_logits is None else torch.sigmoid(lr_logits).transpose(1, 2)
        return dict(loss=self.loss, scale=self.scale, inner_lr=self.inner_lr, normalize=self.grad_norm,
                    token_weights=weights)

    def composed(self, q, k, v, grid_size, lr_logits=None) -> torch.Tensor:
        """The composable path: :func:`~vittt.ops.inner.inner_ttt` on the heads."""
        def run(q, k, v, state, lr_logits):
            return inner_ttt(self.fn, q, k, v, state, epochs=self.epochs, batches=self.batches, grid_size=grid_size,
                             **self._settings(lr_logits))
        out = in_float32(run, self._heads(q), self._heads(k), self._heads(v), self.state(), lr_logits)
        if self.stats is not None:
            self._record(q, k, v, grid_size, lr_logits)
        return self._merge(out)

    def forward(self, q, k, v, grid_size, lr_logits=None):
        return self.composed(q, k, v, grid_size, lr_logits)

    def _record(self, q, k, v, grid_size, lr_logits):
        kh, vh = upcast(self._heads(k)).detach(), upcast(self._heads(v)).detach()
        state = {n: upcast(w).detach() for n, w in self.state().items()}
        settings = self._settings(None if lr_logits is None else upcast(lr_logits).detach())
        self.stats.append(inner_stats(self.fn, kh, vh, state, epochs=self.epochs, grid_size=grid_size, **settings))

    # --- memory-lean inference, for token-wise functions (band gradients add up)
    def lean_accumulate(self, grad_sum, k, v, band: Band, num_tokens: int):
        k, v = self._heads(upcast(band.center(k))), self._heads(upcast(band.center(v)))
        state = upcast(self.state())
        grad = self.fn.grads(self.fn.features(k, None), v, state, self.loss, self.scale, num_tokens)
        return grad if grad_sum is None else {n: grad_sum[n] + g for n, g in grad.items()}

    def lean_step(self, grad_sum):
        return inner_step(self.fn, upcast(self.state()), grad_sum, self.inner_lr, self.grad_norm)

    def lean_apply(self, trained, q, band: Band):
        q = band.center(q)
        return self._merge(self.fn.apply(self._heads(upcast(q)), trained)).to(q.dtype)

    @property
    def supports_lean(self) -> bool:
        return super().supports_lean and self.fn.token_wise and self.fn.name != 'conv3x3'

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, head_dim={self.head_dim}, fn={self.fn!r}, ' + self._extra()


class SwiGLUInner(TokenInner):
    """ViT³'s ``num_heads`` simplified-SwiGLU inner models (``inner_model='glu'``) of width ``head_dim``; W0 = ``w1,
    w2`` ``[1, h, d, d]``; with the dot-product loss, one epoch, one batch and a constant lr, the fused function
    (except while a graph is captured for export: the composable path is a few batched matmuls over all heads)."""

    def __init__(self, num_heads: int, head_dim: int, **kwargs):
        kwargs.pop('inner_model', None)
        super().__init__(num_heads, head_dim, inner_model='glu', **kwargs)

    #: use the fused autograd function where it applies; False runs the composable path
    fused: bool = True

    def _fusable(self, lr_logits) -> bool:
        return (self.fused and isinstance(self.loss, DotProductLoss) and self.epochs == 1 and self.batches == 1
                and lr_logits is None and self.stats is None and not capturing_for_export())

    #: ``forward`` takes ``out=`` (see :meth:`forward`)
    writes_out = True

    def forward(self, q, k, v, grid_size, lr_logits=None, out: Optional[torch.Tensor] = None):
        """``out`` (without autograd): a ``[B, N, width]`` tensor (e.g. a slice of the mixer's buffer for all inner
        models' outputs) that the result is written into and returned as; the fused path writes it directly."""
        if not self._fusable(lr_logits):
            result = self.composed(q, k, v, grid_size, lr_logits)
            return result if out is None else out.copy_(result)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim) for t in (q, k, v))
        w12 = torch.cat([self.w1, self.w2], dim=-1)[0]
        kwargs = dict(scale=self.scale, inner_lr=self.inner_lr, normalize=self.grad_norm)
        if out is not None and runs_as_is(q) and out.dtype == q.dtype:
            swiglu_ttt_fused(q, k, v, w12, out=out.unflatten(-1, (self.num_heads, self.head_dim)), **kwargs)
            return out
        result = in_float32(swiglu_ttt_fused, q, k, v, w12, **kwargs).view(b, n, self.width)
        return result if out is None else out.copy_(result)


class DWConvInner(TokenInner):
    """One ``channels``-wide depth-wise ``kernel_size``² conv inner model on the token grid (ViT³'s extra head,
    ``inner_model='dwconv3x3'``); W0 = ``weight [C, 1, k, k]`` (the official layout). With the dot-product loss and
    one step, the fused function; the memory-lean mode works on bands of the map with ``k // 2`` rows of halo."""

    def __init__(self, channels: int, kernel_size: int = 3, **kwargs):
        if kernel_size % 2 != 1:
            raise ValueError(f'the conv inner model needs an odd kernel size, got {kernel_size}')
        self.channels, self.kernel_size = channels, kernel_size
        kwargs.pop('inner_model', None)
        super().__init__(1, channels, inner_model='dwconv3x3', **kwargs)

    def _make_function(self, name, head_dim, ratio, depth, residual):
        from ..ops.inner import DWConv
        if depth != 2 or residual is not None:
            raise ValueError("inner_depth / inner_residual apply to inner_model='mlp' only")
        return DWConv(head_dim, ratio, self.kernel_size)

    def _create_state(self, residual):
        self.weight = nn.Parameter(torch.empty(self.channels, 1, self.kernel_size, self.kernel_size))
        trunc_normal_(self.weight, std=0.02)

    def state(self):
        return {'weight': self.weight.transpose(0, 1)}

    #: use the fused autograd function (dot-product loss, one step); False runs the composable path
    fused: bool = True

    def forward(self, q, k, v, grid_size, lr_logits=None):
        if not (self.fused and isinstance(self.loss, DotProductLoss) and self.epochs == 1 and self.stats is None
                and not capturing_for_export()):
            return self.composed(q, k, v, grid_size, lr_logits)
        q, k, v = (tokens_to_map(t, grid_size) for t in (q, k, v))
        out = in_float32(dwconv_ttt_fused, q, k, v, self.weight, scale=self.scale, inner_lr=self.inner_lr,
                         normalize=self.grad_norm)
        return map_to_tokens(out)

    @property
    def halo(self) -> int:
        return self.kernel_size // 2

    @property
    def supports_lean(self) -> bool:
        return InnerModel.supports_lean.fget(self)

    def lean_accumulate(self, grad_sum, k, v, band: Band, num_tokens: int):
        pad = self.halo
        k_band = upcast(band.padded_map(k, pad))                 # [B, C, rows + 2 pad, W]
        v = upcast(tokens_to_map(band.center(v), (band.stop - band.start, band.width)))
        prediction = None
        if self.loss.needs_prediction:
            prediction = F.conv2d(k_band, upcast(self.weight), padding=(0, pad), groups=self.channels)
        e = self.loss.grad(prediction, v, self.scale, num_tokens, dims=(-3, -2, -1))
        grad = {'weight': dwconv_inner_grad(k_band, e, self.kernel_size, padding=(0, pad))}
        return grad if grad_sum is None else {'weight': grad_sum['weight'] + grad['weight']}

    def lean_apply(self, trained, q, band: Band):
        out = dwconv_per_sample(upcast(band.padded_map(q, self.halo)), trained['weight'], padding=(0, self.halo))
        return map_to_tokens(out).to(q.dtype)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, kernel_size={self.kernel_size}, ' + self._extra()


@contextlib.contextmanager
def record_inner_stats(model: nn.Module) -> Iterator[Dict[str, List[Dict[str, torch.Tensor]]]]:
    """``with record_inner_stats(model) as stats:`` every forward of an inner model inside the block appends its
    :func:`~vittt.ops.inner.inner_stats` (per sample and head: inner loss before / after the step, gradient norm
    before / after the normalisation, relative update ‖W − W0‖ / ‖W0‖) to ``stats[module name]``. The inner models
    run their composable path meanwhile (same function); restored on exit."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, TokenInner)}
    stats: Dict[str, List[Dict[str, torch.Tensor]]] = {}
    try:
        for name, m in modules.items():
            m.stats = stats.setdefault(name, [])
        yield stats
    finally:
        for m in modules.values():
            m.stats = None
