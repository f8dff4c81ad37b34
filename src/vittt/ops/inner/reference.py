"""Plain autograd references of the design space's inner models (tests only).

Each inner model is written as its bare forward (no caches, no split into pieces), the inner loss is built
explicitly and differentiated with ``torch.autograd.grad(create_graph=True)``; epochs and mini-batches are explicit
Python loops over single steps. Nothing is shared with :mod:`vittt.ops.inner` except the losses' ``value``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..dwconv.reference import shifted_dwconv
from ..loss import InnerLoss
from ..reference_utils import explicit_soft_norm

__all__ = ['reference_forward', 'reference_grads', 'reference_inner_ttt']


def _conv3x3(x, state, grid_size):
    """Per sample and head, a full 3×3 conv ``d -> d`` written with ``F.conv2d``; ``x [B, h, N, d]`` on the grid,
    ``w [S, h, 9d, d]`` (rows ``c · 9 + tap``)."""
    w = state['w1']
    b, h, n, d = x.shape
    gh, gw = grid_size
    out = []
    for bi in range(b):
        rows = []
        for hi in range(h):
            weight = w[min(bi, w.shape[0] - 1), hi].t().reshape(d, d, 3, 3)
            xm = x[bi, hi].t().reshape(1, d, gh, gw)
            rows.append(F.conv2d(xm, weight, padding=1).reshape(d, n).t())
        out.append(torch.stack(rows))
    return torch.stack(out)



def reference_forward(name: str, residual: Optional[str] = None, depth: int = 2, grid_size=None) -> Callable:
    """``F(x, state)`` of inner model ``name`` on tokens ``[B, h, N, d]`` (``dwconv3x3``: maps ``[B, C, H, W]``)."""
    if name == 'fc':
        return lambda x, s: x @ s['w1']
    if name == 'silu_fc':
        return lambda x, s: F.silu(x @ s['w1'])
    if name == 'glu':
        return lambda x, s: (x @ s['w1']) * F.silu(x @ s['w2'])
    if name == 'swiglu':
        return lambda x, s: ((x @ s['w1']) * F.silu(x @ s['w2'])) @ s['w3']
    if name == 'conv3x3':
        return lambda x, s: _conv3x3(x, s, grid_size)
    if name in ('ttt_linear', 'ttt_mlp'):
        def ttt(x, s):
            z = x @ s['w'] + s['b'] if name == 'ttt_linear' else F.gelu(x @ s['w1'] + s['b1']) @ s['w2'] + s['b2']
            mu = z.mean(-1, keepdim=True)
            ln = (z - mu) / ((z - mu).pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
            return x + ln * s['ln_weight'] + s['ln_bias']
        return ttt
    if name == 'dwconv3x3':
        return lambda x, s: shifted_dwconv(x, s['weight'].expand(x.shape[0], *s['weight'].shape[1:]))
    if name == 'mlp':
        def mlp(x, s):
            a = F.silu(x @ s['w1'])
            if depth == 3:
                a = F.silu(a @ s['w2'])
            last = s[f'w{depth}']
            y = a @ (last + torch.eye(last.shape[-1], dtype=last.dtype) if residual == 'identity_w2' else last)
            return y + x if residual == 'add' else y
        return mlp
    raise ValueError(name)


def reference_grads(forward: Callable, k, v, state: Dict[str, torch.Tensor], loss: InnerLoss, scale: float,
                    token_weights=None, map_dims: bool = False, tokens: slice = slice(None)) -> Dict[str, torch.Tensor]:
    """``dL/dW`` per sample by autograd of the explicit loss on the ``tokens`` of the keys (the forward runs on all
    keys: a convolution's neighbourhoods cross a slice's edges). With ``token_weights [B, h, N]`` the loss is
    ``Σ_(b,h,i) w_bhi ℓ_bhi``, one token's term at a time (what weighting ``E`` means for the additive losses)."""
    batch = k.shape[0]
    with torch.enable_grad():
        leaves = {n: (w.expand(batch, *w.shape[1:]) if w.shape[0] == 1 else w).clone().requires_grad_(True)
                  for n, w in state.items()}
        prediction = forward(k, leaves)
        if not map_dims:
            prediction, v = prediction[..., tokens, :], v[..., tokens, :]
        dims = (-3, -2, -1) if map_dims else (-2, -1)
        n = k.shape[-2] * k.shape[-1] if map_dims else v.shape[-2]
        if token_weights is None:
            total = loss.value(prediction, v, scale, n, dims=dims)
        else:
            total = sum(token_weights[b, h, i] * loss.value(prediction[b, h, i:i + 1], v[b, h, i:i + 1], scale, n)
                        for b in range(k.shape[0]) for h in range(k.shape[1]) for i in range(v.shape[2]))
        names = list(leaves)
        return dict(zip(names, torch.autograd.grad(total, [leaves[m] for m in names], create_graph=True)))


def reference_inner_ttt(name: str, q, k, v, state, *, loss: InnerLoss, scale: float, inner_lr: float = 1.0,
                        normalize: bool = True, epochs: int = 1, batches: int = 1, token_weights=None,
                        grid_size=None, residual=None, depth: int = 2) -> torch.Tensor:
    """Explicit loops: per mini-batch slice, ``epochs`` autograd steps, then the slice's queries. ``q, k, v [B, h, N,
    d]``; returns ``[B, h, N, d_out]``."""
    forward = reference_forward(name, residual, depth, grid_size)
    map_dims = name == 'dwconv3x3'
    heads = q.shape[1]
    if map_dims:   # tokens -> one [B, h·d, H, W] map
        q, k, v = (t.permute(0, 1, 3, 2).reshape(t.shape[0], -1, *grid_size) for t in (q, k, v))
    norm = (-2, -1) if map_dims else -2
    sizes = [k.shape[-2]] if map_dims else [len(c) for c in torch.arange(k.shape[-2]).tensor_split(batches)]
    outs, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        ws = None if token_weights is None else token_weights[..., sl]
        for _ in range(epochs):
            grads = reference_grads(forward, k, v, state, loss, scale, ws, map_dims, sl)
            state = {m: w - inner_lr * (explicit_soft_norm(grads[m], norm) if normalize else grads[m])
                     for m, w in state.items()}
        outs.append(forward(q, state) if map_dims else forward(q, state)[..., sl, :])
        start += size
    out = torch.cat(outs, dim=-2)
    if map_dims:
        b, c = out.shape[:2]
        out = out.reshape(b, heads, c // heads, -1).transpose(-2, -1)
    return out
