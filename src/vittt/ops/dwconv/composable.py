"""Depth-wise k×k convolution inner model of ViT³ (k = 3 in the released models), one closed-form step per sample.

Shapes: ``q, k, v`` are feature maps ``[B, C, H, W]``; the initial kernel ``weight`` is ``[C, 1, k, k]``.

With ``V_hat = DWConv(K; W)`` (zero padding k//2) and ``E = dL/dV_hat`` (``-(s/(H W)) V`` for the dot-product
loss), the kernel gradient is the cross-correlation of the padded keys with E::

    g[b, c, i, j] = sum_{y, x} K_pad[b, c, y + i, x + j] · E[b, c, y, x]

computed as one grouped convolution whose kernel is E itself (faster on CPU than k² shifted products, see below).
Small maps without autograd (at most :data:`WINDOWED_ELEMENTS` values, e.g. ViT³-T at 224², batch ≤ 20) take the
windowed form instead, for the gradient and for the per-sample kernel's application: the k² shifted windows of the
padded token-major map as one strided view, one product (with E, or with the taps) into a fresh buffer and one sum
(over the tokens, or over the taps). oneDNN's fixed cost is more than the arithmetic there, most of all for a
convolution whose kernel is the whole map (ViT³-T at batch 1: 84 → 44 µs a gradient, 12 a forward).

**Batch folding.** Every sample has its own kernel, so with B > 1 both convolutions fold the batch into the conv
groups (``groups = B·C`` on a ``[1, B·C, H, W]`` view). On this CPU that is 1.2-2.7× faster than the best
batch-independent formulation measured (k² shifted multiply-adds; im2col by ``unfold`` + bmm is slower still:
``benchmarks/dwconv_backends.py``, docs/benchmarks.md), but the batch size becomes a conv attribute: ONNX's Conv has
a static ``group``, so a dynamic-batch ONNX export fails on it.
The ``'shifted'`` backend computes both without folding: the per-sample kernel as k² broadcast multiply-adds of
shifted views, the gradient as k² products reduced over the map; nothing in it depends on B. ``'auto'`` (default)
folds, except while ``torch.export`` / ``torch.onnx`` (dynamo) or ``torch.jit`` tracing captures the graph;
``with dwconv_backend(name):`` picks one explicitly for the code inside (a :class:`contextvars.ContextVar`: scoped to
the ``with`` block and the current thread / asyncio task, restored on exit); :func:`get_dwconv_backend` reads it.
``torch.compile`` reads the backend once, when it traces a graph: the graph keeps the path it was traced with.
The gradient is optionally soft-normalised over the k×k taps of each (sample, channel), the per-sample
kernel ``W' = W - lr g`` is applied to Q.

:func:`dwconv_ttt_fused` is the same step for the dot-product loss as one autograd function whose backward is
four more depth-wise convolutions of the same two kinds (``flip`` = the kernel rotated by 180°)::

    dQ = DWConv(dO; flip W'),   dW' = corr(Q_pad, dO),   dĝ = -lr dW',   dW = Σ_b dW'
    dE = DWConv(K; dg),         dK = DWConv(E; flip dg),  dV = c dE            (E = c V, c = -s / (H W))

It keeps only q, k, v (views of the QKV projection, kept anyway) and the small g for backward; autograd's
composition keeps batch-folded copies of the maps and runs mkldnn's slow backward of the E-kernel convolution.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .._capture import capturing_for_export, records_grad, symbolic_shapes
from ..loss import InnerLoss
from ..normalize import inner_step

__all__ = ['DWCONV_BACKENDS', 'dwconv_backend', 'dwconv_inner_grad', 'dwconv_per_sample', 'dwconv_ttt',
           'get_dwconv_backend', 'stepped_kernel', 'WINDOWED_ELEMENTS', 'WINDOWED_APPLY_ELEMENTS']

DWCONV_BACKENDS = ('auto', 'grouped', 'shifted')
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar('vittt_dwconv_backend', default='auto')


def _check_backend(name) -> str:
    if not isinstance(name, str) or name not in DWCONV_BACKENDS:
        raise ValueError(f'dwconv backend must be one of {DWCONV_BACKENDS}, got {name!r}')
    return name


# torch.compile cannot trace ContextVar.get: it calls this once per traced graph and keeps the result
@torch.compiler.assume_constant_result
def get_dwconv_backend() -> str:
    """The dwconv backend in effect here: ``'auto'`` (the default) unless inside ``with dwconv_backend(name):``."""
    return _BACKEND.get()


@contextlib.contextmanager
def dwconv_backend(name: str) -> Iterator[str]:
    """``with dwconv_backend(name):`` runs the per-sample depth-wise convolutions inside the block with ``name``
    (see the module docstring): ``'auto'``, ``'grouped'`` (fold the batch into conv groups) or ``'shifted'``
    (batch-independent). Scoped: it nests, is restored on exit (also on an exception), and other threads and
    asyncio tasks keep their own setting. Yields ``name``; an unknown name raises a ValueError listing the choices."""
    token = _BACKEND.set(_check_backend(name))
    try:
        yield name
    finally:
        _BACKEND.reset(token)


def _folds_batch() -> bool:
    backend = get_dwconv_backend()
    if backend != 'auto':
        return backend == 'grouped'
    return not capturing_for_export()


def _pad(x: torch.Tensor, padding) -> torch.Tensor:
    ph, pw = _pair(padding)
    return F.pad(x, (pw, pw, ph, ph))


def _pair(padding) -> tuple:
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


#: the largest keys map (values, ``B·C·H·W``) whose kernel gradient :func:`dwconv_inner_grad` computes in the windowed
#: form without autograd. ``python benchmarks/dwconv_backends.py`` on this CPU: the windowed gradient is 1.1-1.9×
#: faster than the grouped convolution up to 1 × 32 × 56² (100 k values), the convolution 1.1-1.3× faster from 195 k
#: (1 × 32 × 78², 32 × 32 × 14²)
WINDOWED_ELEMENTS = 1 << 17
#: the same for :func:`dwconv_per_sample`'s map. In isolation (warm caches) the convolution is faster at every size;
#: inside ViT³-T at batch 1 (a cold kernel, 12 calls) the windowed form saves 0.4 ms of 17.7 (in-model A/B, issue 15),
#: at batch 4 and in H-ViT³-T nothing: so only the smallest maps
WINDOWED_APPLY_ELEMENTS = 1 << 13


def _windowed(x: torch.Tensor, kernel_size: int, padding, height: int, width: int) -> torch.Tensor:
    """The ``kernel_size``² shifted windows of the zero-padded map ``x [B, C, H, W]``, taken token-major (channels
    last, where the mixer's maps already are), as one strided view ``[B, k, k, height, width, C]``."""
    ph, pw = _pair(padding)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))             # [B, H + 2ph, W + 2pw, C]
    s_b, s_h, s_w, s_c = padded.stride()
    return padded.as_strided((x.shape[0], kernel_size, kernel_size, height, width, x.shape[1]),
                             (s_b, s_h, s_w, s_h, s_w, s_c), padded.storage_offset())


def _windowed_inner_grad(k: torch.Tensor, e: torch.Tensor, kernel_size: int, padding) -> torch.Tensor:
    """The kernel gradient as one product of the keys' windows with ``e`` into a fresh contiguous buffer and one
    sum over the tokens (contiguous rows of channels)."""
    b, c, h, w = e.shape
    products = e.new_empty(b, kernel_size, kernel_size, h, w, c)
    torch.mul(_windowed(k, kernel_size, padding, h, w), e.permute(0, 2, 3, 1)[:, None, None], out=products)
    return products.view(b, kernel_size * kernel_size, h * w, c).sum(2).view(b, kernel_size, kernel_size, c) \
        .permute(0, 3, 1, 2)


def _windowed_per_sample(x: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
    """The per-sample convolution as one product of the windows with the taps and one sum over the taps; the
    output is channels-last (a token-major map, as the mixer wants it)."""
    b, c, ks = x.shape[0], x.shape[1], weight.shape[-1]
    ph, pw = _pair(padding)
    h, w = x.shape[2] + 2 * ph - ks + 1, x.shape[3] + 2 * pw - ks + 1
    products = x.new_empty(b, ks, ks, h, w, c)
    torch.mul(_windowed(x, ks, padding, h, w), weight.permute(0, 2, 3, 1)[:, :, :, None, None], out=products)
    return products.view(b, ks * ks, h, w, c).sum(1).permute(0, 3, 1, 2)


def _runs_windowed(limit: int, *tensors: torch.Tensor) -> bool:
    """Small maps (at most ``limit`` values) without autograd, with concrete shapes (no size branch while a graph is
    captured or compiled: the grouped backend then keeps its convolutions) and no dispatch mode active
    (``FlopCounterMode`` counts the convolutions' MACs, not those of a product and a sum)."""
    if symbolic_shapes() or is_in_torch_dispatch_mode() or records_grad(*tensors):
        return False
    return tensors[0].numel() <= limit


def _shifted_per_sample(x: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
    xp, ks = _pad(x, padding), weight.shape[-1]
    h, w = xp.shape[-2] - ks + 1, xp.shape[-1] - ks + 1
    out = None
    for i in range(ks):
        for j in range(ks):
            tap, wt = xp[..., i:i + h, j:j + w], weight[:, :, i, j, None, None]
            out = tap * wt if out is None else out.addcmul_(tap, wt)
    return out


def _shifted_inner_grad(k: torch.Tensor, e: torch.Tensor, kernel_size: int, padding) -> torch.Tensor:
    kp, (h, w) = _pad(k, padding), e.shape[-2:]
    taps = [(kp[..., i:i + h, j:j + w] * e).sum((-2, -1)) for i in range(kernel_size) for j in range(kernel_size)]
    return torch.stack(taps, -1).unflatten(-1, (kernel_size, kernel_size))


def dwconv_inner_grad(k: torch.Tensor, e: torch.Tensor, kernel_size: int, padding=None) -> torch.Tensor:
    """``dL/dW`` per sample: ``[B, C, kernel_size, kernel_size]`` from keys ``k`` and ``e = dL/dV_hat``.

    ``padding`` defaults to k//2 on every side (the whole map). A band of grid rows passes its keys with p = k//2
    context rows above and below (zero rows at the image border) and ``padding=(0, p)``: its share of the gradient,
    and the bands' shares add up to the whole map's."""
    padding = kernel_size // 2 if padding is None else padding
    if not _folds_batch():
        return _shifted_inner_grad(k, e, kernel_size, padding)
    if _runs_windowed(WINDOWED_ELEMENTS, k, e):
        return _windowed_inner_grad(k, e, kernel_size, padding)
    b, c, hk, w = k.shape
    grad = F.conv2d(k.reshape(1, b * c, hk, w), e.reshape(b * c, 1, e.shape[-2], e.shape[-1]), padding=padding,
                    groups=b * c)
    return grad.reshape(b, c, kernel_size, kernel_size)


def dwconv_per_sample(x: torch.Tensor, weight: torch.Tensor, padding=None) -> torch.Tensor:
    """Depth-wise convolution of each sample with its own kernel: ``x [B, C, H, W]``, ``weight [B, C, k, k]``;
    ``padding`` defaults to k//2 on every side (same size out)."""
    ks = weight.shape[-1]
    padding = ks // 2 if padding is None else padding
    if not _folds_batch():
        return _shifted_per_sample(x, weight, padding)
    if _runs_windowed(WINDOWED_APPLY_ELEMENTS, x, weight):
        return _windowed_per_sample(x, weight, padding)
    b, c, h, w = x.shape
    if b == 1:  # one sample: a plain depth-wise convolution (keeps a channels-last input channels-last)
        return F.conv2d(x, weight.reshape(c, 1, ks, ks), padding=padding, groups=c)
    out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * c, 1, ks, ks), padding=padding, groups=b * c)
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


def dwconv_ttt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, *, loss: InnerLoss,
               scale: float, inner_lr: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """One full-batch inner step of the depth-wise kernel on ``(k, v)``, applied to ``q``; returns ``[B, C, H, W]``."""
    channels, ks = weight.shape[0], weight.shape[-1]
    prediction = F.conv2d(k, weight, padding=ks // 2, groups=channels) if loss.needs_prediction else None
    e = loss.grad(prediction, v, scale, k.shape[-2] * k.shape[-1], dims=(-3, -2, -1))
    grad = dwconv_inner_grad(k, e, ks)
    return dwconv_per_sample(q, stepped_kernel(weight, grad, inner_lr, normalize))


def stepped_kernel(weight: torch.Tensor, grad: torch.Tensor, inner_lr: float, normalize: bool) -> torch.Tensor:
    """W' ``[B, C, k, k]`` from W ``[C, 1, k, k]`` and the per-sample gradient."""
    return inner_step(weight.transpose(0, 1), grad, inner_lr, (-2, -1), normalize)
