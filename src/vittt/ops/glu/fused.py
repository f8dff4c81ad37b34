"""The fast path of the simplified-SwiGLU inner step (dot-product loss): one autograd function with a hand-written
backward, on token-major ``[B, N, h, d]`` views, no permute→contiguous copies.

Same maths as :func:`vittt.ops.glu.swiglu_ttt` (which stays the readable path and handles any inner loss). With
``c = -s/N`` (the dot-product loss's ``E = c V``) and per sample and head::

    Z = K [W1|W2],  A = SiLU(Z2),  D = SiLU'(Z2)
    M = [V ⊙ A | V ⊙ Z1 ⊙ D],      G = c Kᵀ M,        Ĝ = G / (||G||_col + 1)   (optional)
    W' = W - lr Ĝ,                 Y = Q W',          O = Y1 ⊙ SiLU(Y2)

Forward: the keys of all samples share W0, so ``K W`` is one batched matmul over heads on a ``[h, B·N, d]`` view of
the token-major keys (a view, not a copy); the element-wise work runs in place in Z's buffer; ``G`` and ``Y`` are
per-sample-and-head matmuls, batched over the samples (one call per head) or over the heads (one call per sample),
whichever needs fewer calls, on views; the output is written straight into a token-major ``[B, N, h, d]`` tensor, so
the output projection needs no transpose.

Backward (the function saves only q, k, v, W and the raw G, and recomputes Z, W' and Y)::

    dY1 = dO ⊙ SiLU(Y2),  dY2 = (dO ⊙ Y1) ⊙ SiLU'(Y2),  dQ = dY W'ᵀ,  dW' = Qᵀ dY
    dĜ = -lr dW',  dG = dĜ/(n+1) - G (Σ_rows G ⊙ dĜ) / (n (n+1)²)          (n = ||G||_col)
    dM = c K dG,   dK = c M dGᵀ + dZ Wᵀ,   dW = Σ_b dW' + Kᵀ dZ
    dV = dM1 ⊙ A + dM2 ⊙ Z1 ⊙ D,   dZ1 = dM2 ⊙ V ⊙ D,
    dZ2 = V ⊙ (dM1 ⊙ SiLU'(Z2) + dM2 ⊙ Z1 ⊙ SiLU''(Z2)),   SiLU'' = σ(1-σ)(2 + z(1-2σ)) = σ + (1-2σ) SiLU'
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._capture import records_grad
from ..normalize import inner_step, soft_normalize_backward

__all__ = ['swiglu_ttt_fused']

_silu_grad = torch.ops.aten.silu_backward  # silu_backward(g, z) = g ⊙ SiLU'(z), one pass


def _into(out: torch.Tensor, fn, *args) -> None:
    """``fn(*args, out=out)``; under torch.compile (whose tracer rejects non-contiguous ``out=``) the same as an
    in-place copy, which the compiler fuses away."""
    if torch.compiler.is_compiling():
        out.copy_(fn(*args))
    else:
        fn(*args, out=out)


def _silu_grad_into(out: torch.Tensor, grad: torch.Tensor, z: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        out.copy_(_silu_grad(grad, z))
    else:
        _silu_grad.grad_input(grad, z, grad_input=out)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, h, d]`` -> ``[h, B·N, d]`` (a view whenever the token rows are evenly strided, e.g. slices of a
    QKV projection)."""
    b, n, h, d = t.shape
    return t.permute(2, 0, 1, 3).reshape(h, b * n, d)


class _Slices:
    """The per-sample-and-head matmuls run as a few batched matmuls over 3-D views: one per head (batched over the
    samples) when there are more samples than heads (training batches), else one per sample (batched over the
    heads; inference at batch 1). Either way no operand is copied: the views index the tensors' own strides.
    (While a graph is captured for export the inner model takes the composable path instead, :class:`SwiGLUInner`.)

    Layouts: token-major ``[B, N, h, c]`` (q, k, v, the output), per-sample matrices ``[B, h, r, c]`` (G, W'),
    head-major buffers ``[h, B, N, c]`` (Z, M and the backward's token gradients)."""

    def __init__(self, batch: int, heads: int):
        self.over_heads = heads < batch
        self.count = heads if self.over_heads else batch

    def tok(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[:, :, i] if self.over_heads else t[i].transpose(0, 1)

    def mat(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[:, i] if self.over_heads else t[i]

    def head_major(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[i] if self.over_heads else t[:, i]

    def new_mats(self, like: torch.Tensor, b: int, h: int, r: int, c: int) -> torch.Tensor:
        """An empty ``[B, h, r, c]`` tensor whose slices are contiguous matrices (written with ``out=``)."""
        if self.over_heads:
            return like.new_empty(h, b, r, c).transpose(0, 1)
        return like.new_empty(b, h, r, c)


def _key_products(kh: torch.Tensor, vh: torch.Tensor, w12: torch.Tensor) -> torch.Tensor:
    """``[M2 | M1]`` in one ``[h, B·N, 2d]`` buffer (Z's, computed in place)."""
    d = kh.shape[-1]
    z = torch.bmm(kh, w12)
    z1, z2 = z[..., :d], z[..., d:]
    z1.mul_(vh)                                    # V ⊙ Z1
    _silu_grad_into(z1, z1, z2)                    # M2 = V ⊙ Z1 ⊙ SiLU'(Z2)
    F.silu(z2, inplace=True)
    z2.mul_(vh)                                    # M1 = V ⊙ SiLU(Z2)
    return z


def _forward(q, k, v, w12, c: float, inner_lr: float, normalize: bool, out=None):
    """The step's output and the raw gradient G (all the backward needs besides the inputs)."""
    b, n, h, d = q.shape
    s = _Slices(b, h)
    m = _key_products(_heads(k), _heads(v), w12).view(h, b, n, 2 * d)
    g = s.new_mats(q, b, h, d, 2 * d)
    for i in range(s.count):
        _into(s.mat(g, i), torch.bmm, s.tok(k, i).transpose(1, 2), s.head_major(m, i))
    del m
    g = torch.cat([g[..., d:], g[..., :d]], dim=-1).mul_(c)  # buffer order was [M2 | M1]
    w_new = inner_step(w12, g, inner_lr, -2, normalize)
    out = q.new_empty(b, n, h, d) if out is None else out
    for i in range(s.count):
        y = torch.bmm(s.tok(q, i), s.mat(w_new, i))
        y1, y2 = y[..., :d], y[..., d:]
        _into(s.tok(out, i), torch.mul, y1, F.silu(y2, inplace=True))
    return out, g


class _SwiGLUTTT(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, w12, c: float, inner_lr: float, normalize: bool, out=None):
        out, g = _forward(q, k, v, w12, c, inner_lr, normalize, out)
        ctx.save_for_backward(q, k, v, w12, g)  # W' (as large as G) is recomputed from G
        ctx.c, ctx.inner_lr, ctx.normalize = c, inner_lr, normalize
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, w12, g = ctx.saved_tensors
        c, lr = ctx.c, ctx.inner_lr
        w_new = inner_step(w12, g, lr, -2, ctx.normalize)
        b, n, h, d = q.shape
        s = _Slices(b, h)
        kh, vh = _heads(k), _heads(v)

        # query side: O = Y1 ⊙ SiLU(Y2), Y = Q W'
        grad_q = q.new_empty(h, b, n, d)
        grad_w_new = s.new_mats(q, b, h, d, 2 * d)
        for i in range(s.count):
            q_i, w_i = s.tok(q, i), s.mat(w_new, i)
            y = torch.bmm(q_i, w_i)
            y1, y2 = y[..., :d], y[..., d:]
            go = s.tok(grad_out, i)
            dy = torch.empty_like(y)
            _into(dy[..., :d], torch.mul, go, F.silu(y2))
            _silu_grad_into(dy[..., d:], go * y1, y2)
            _into(s.head_major(grad_q, i), torch.bmm, dy, w_i.transpose(1, 2))
            _into(s.mat(grad_w_new, i), torch.bmm, q_i.transpose(1, 2), dy)

        # through the step and the soft normalisation (tiny [B, h, d, 2d] tensors)
        grad_step = grad_w_new * -lr
        grad_g = soft_normalize_backward(g, grad_step, -2) if ctx.normalize else grad_step
        grad_g = grad_g * c
        grad_w12 = grad_w_new.sum(0)

        # key side: G = c Kᵀ M, M from Z = K W
        z = torch.bmm(kh, w12)
        z1, z2 = z[..., :d], z[..., d:]
        sig = torch.sigmoid(z2)
        act = z2 * sig                                            # SiLU(Z2)
        d_act = _silu_grad(sig.new_ones(()).expand_as(z2), z2)   # SiLU'(Z2)
        vd = vh * d_act                                           # V ⊙ SiLU'(Z2), in M2 and dZ1
        m = q.new_empty(h, b * n, 2 * d)
        _into(m[..., :d], torch.mul, vh, act)
        _into(m[..., d:], torch.mul, vd, z1)
        m = m.view(h, b, n, 2 * d)
        grad_m = q.new_empty(h, b, n, 2 * d)
        grad_k = q.new_empty(h, b, n, d)
        for i in range(s.count):
            k_i, gg_i = s.tok(k, i), s.mat(grad_g, i)
            _into(s.head_major(grad_m, i), torch.bmm, k_i, gg_i)
            _into(s.head_major(grad_k, i), torch.bmm, s.head_major(m, i), gg_i.transpose(1, 2))
        del m
        grad_m = grad_m.view(h, b * n, 2 * d)
        gm1, gm2 = grad_m[..., :d], grad_m[..., d:]
        u = gm2 * z1
        grad_v = torch.addcmul(gm1 * act, u, d_act)
        grad_z = torch.empty_like(z)
        gz1, gz2 = grad_z[..., :d], grad_z[..., d:]
        _into(gz1, torch.mul, gm2, vd)
        del vd
        # SiLU''(Z2) = σ(1-σ)(2 + Z2(1-2σ)) = σ + (1-2σ) SiLU'(Z2), since SiLU' = σ + Z2 σ(1-σ)
        d2_act = torch.addcmul(d_act, sig, d_act, value=-2.0).add_(sig)
        _into(gz2, torch.mul, gm1, d_act)
        gz2.addcmul_(u, d2_act).mul_(vh)
        grad_k = grad_k.view(h, b * n, d).baddbmm_(grad_z, w12.transpose(1, 2))
        grad_w12 = grad_w12 + torch.bmm(kh.transpose(1, 2), grad_z)

        def tokens(t):  # [h, B·N, d] -> [B, N, h, d] view
            return t.view(h, b, n, d).permute(1, 2, 0, 3)

        return (tokens(grad_q.view(h, b * n, d)), tokens(grad_k), tokens(grad_v), grad_w12, None, None, None, None)


def swiglu_ttt_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w12: torch.Tensor, *, scale: float,
                     inner_lr: float = 1.0, normalize: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dot-product-loss SwiGLU inner step. ``q, k, v [B, N, h, d]`` (any strides, e.g. views of a QKV projection),
    ``w12 = [W1 | W2]`` ``[h, d, 2d]``; returns ``[B, N, h, d]`` (contiguous). ``out`` (without autograd only): a
    ``[B, N, h, d]`` tensor of q's dtype and device, any strides (e.g. a slice of a wider token-major buffer), that
    the result is written into and returned as."""
    if q.shape != k.shape or q.shape != v.shape or q.ndim != 4:
        raise ValueError(f'q, k, v must share one [B, N, h, d] shape, got {tuple(q.shape)}, {tuple(k.shape)}, '
                         f'{tuple(v.shape)}')
    h, d = q.shape[2:]
    if w12.shape != (h, d, 2 * d):
        raise ValueError(f'w12 must be [h, d, 2d] = {(h, d, 2 * d)}, got {tuple(w12.shape)}')
    differentiable = records_grad(q, k, v, w12)
    if out is not None:
        if differentiable:
            raise ValueError('out= is for inference: q, k, v or w12 requires grad')
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f'out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, got '
                             f'{out.dtype} {tuple(out.shape)} on {out.device}')
    c = -float(scale) / q.shape[1]
    if not differentiable:
        # nothing to differentiate: the forward alone (an autograd Function's call costs ~12 µs, 12 calls a forward)
        return _forward(q, k, v, w12, c, float(inner_lr), bool(normalize), out)[0]
    return _SwiGLUTTT.apply(q, k, v, w12, c, float(inner_lr), bool(normalize), out)
