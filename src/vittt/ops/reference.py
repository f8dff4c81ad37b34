"""Plain autograd references of the inner steps, written straight from the spec's equations.

Only for tests: each builds the inner loss explicitly, takes its gradient with ``torch.autograd.grad``
(``create_graph=True``, so the result stays differentiable for the outer loop), normalises it with an
explicit square root, steps and applies. Nothing here shares code with the closed-form paths except the
loss definitions' ``value``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .inner_loss import InnerLoss

__all__ = ['reference_swiglu_grads', 'reference_swiglu_ttt', 'reference_dwconv_grad', 'reference_dwconv_ttt',
           'shifted_dwconv', 'reference_ttt_scan']


def _per_sample_leaf(w: torch.Tensor, shape) -> torch.Tensor:
    out = w.expand(*shape).clone()
    if not out.requires_grad:
        out.requires_grad_(True)
    return out


def _explicit_soft_norm(g: torch.Tensor, dims) -> torch.Tensor:
    return g / (g.pow(2).sum(dim=dims, keepdim=True).sqrt() + 1.0)


def reference_swiglu_grads(k, v, w1, w2, loss: InnerLoss, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dW1, dL/dW2)`` per sample and head by autograd; ``k, v [B, h, N, d]``, ``w [1, h, d, d]``."""
    b, h, n, d = k.shape
    with torch.enable_grad():
        w1b, w2b = _per_sample_leaf(w1, (b, h, d, d)), _per_sample_leaf(w2, (b, h, d, d))
        prediction = (k @ w1b) * F.silu(k @ w2b)
        total = loss.value(prediction, v, scale, n)  # per-(b, h) losses are independent: grad of the sum is each
        return torch.autograd.grad(total, (w1b, w2b), create_graph=True)


def reference_swiglu_ttt(q, k, v, w1, w2, *, loss: InnerLoss, scale: float, inner_lr: float = 1.0,
                         normalize: bool = True) -> torch.Tensor:
    g1, g2 = reference_swiglu_grads(k, v, w1, w2, loss, scale)
    if normalize:
        g1, g2 = _explicit_soft_norm(g1, -2), _explicit_soft_norm(g2, -2)
    w1n, w2n = w1 - inner_lr * g1, w2 - inner_lr * g2
    return (q @ w1n) * F.silu(q @ w2n)


def shifted_dwconv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample depth-wise conv as an explicit sum of k² shifted products: ``x [B,C,H,W]``, ``weight [B,C,k,k]``."""
    ks = weight.shape[-1]
    p = ks // 2
    h, w = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p))
    out = torch.zeros_like(x)
    for i in range(ks):
        for j in range(ks):
            out = out + weight[:, :, i, j, None, None] * xp[:, :, i:i + h, j:j + w]
    return out


def reference_dwconv_grad(k, v, weight, loss: InnerLoss, scale: float) -> torch.Tensor:
    """``dL/dW`` per sample ``[B, C, k, k]`` by autograd; ``k, v [B, C, H, W]``, ``weight [C, 1, k, k]``."""
    b, c, h, w = k.shape
    ks = weight.shape[-1]
    with torch.enable_grad():
        wb = _per_sample_leaf(weight.reshape(1, c, ks, ks), (b, c, ks, ks))
        prediction = shifted_dwconv(k, wb)
        total = loss.value(prediction, v, scale, h * w)
        return torch.autograd.grad(total, wb, create_graph=True)[0]


def reference_dwconv_ttt(q, k, v, weight, *, loss: InnerLoss, scale: float, inner_lr: float = 1.0,
                         normalize: bool = True) -> torch.Tensor:
    c, ks = weight.shape[0], weight.shape[-1]
    g = reference_dwconv_grad(k, v, weight, loss, scale)
    if normalize:
        g = _explicit_soft_norm(g, (-2, -1))
    return shifted_dwconv(q, weight.reshape(1, c, ks, ks) - inner_lr * g)


def _ln(z, weight, bias, eps):
    mu = z.mean(-1, keepdim=True)
    return (z - mu) / (((z - mu) ** 2).mean(-1, keepdim=True) + eps).sqrt() * weight + bias


def _inner_pre(kind, x, params):
    """The inner model without its residual: ``x W + b`` or ``GELU(x W1 + b1) W2 + b2`` (one token, one head)."""
    if kind == 'linear':
        return x @ params['w'] + params['b'][0]
    return F.gelu(x @ params['w1'] + params['b1'][0]) @ params['w2'] + params['b2'][0]


def reference_ttt_scan(kind: str, q, k, v, lr, state, *, mini_batch_size: int, causal: bool = False,
                       eps: float = 1e-6) -> torch.Tensor:
    """Token-by-token primal mini-batch TTT: every per-token gradient by autograd of its explicit loss, every
    token's state formed explicitly. ``q, k, v [B, h, N, d]``, ``lr [B, h, N]``; O(N · b) autograd calls."""
    bsz, heads, n, _ = q.shape
    names = ['w', 'b'] if kind == 'linear' else ['w1', 'b1', 'w2', 'b2']
    out = torch.empty_like(q)
    with torch.enable_grad():
        for bi in range(bsz):
            for hi in range(heads):
                params = {name: state[name][hi] for name in names}
                ln_w, ln_b = state['ln_weight'][hi, 0], state['ln_bias'][hi, 0]
                for start in range(0, n, mini_batch_size):
                    end = min(start + mini_batch_size, n)
                    size = end - start
                    grads = []
                    for j in range(start, end):
                        leaves = {name: p if p.requires_grad else p.clone().requires_grad_()
                                  for name, p in params.items()}
                        loss = 0.5 * (_ln(_inner_pre(kind, k[bi, hi, j], leaves), ln_w, ln_b, eps)
                                      - (v[bi, hi, j] - k[bi, hi, j])).pow(2).sum()
                        grads.append(dict(zip(names, torch.autograd.grad(loss, [leaves[m] for m in names],
                                                                         create_graph=True))))
                    for i in range(start, end):
                        if causal:
                            weights = {j: lr[bi, hi, j] / (i - start + 1) for j in range(start, i + 1)}
                        else:
                            weights = {j: lr[bi, hi, j] / size for j in range(start, end)}
                        state_i = {m: params[m] - sum(a * grads[j - start][m] for j, a in weights.items())
                                   for m in names}
                        out[bi, hi, i] = q[bi, hi, i] + _ln(_inner_pre(kind, q[bi, hi, i], state_i), ln_w, ln_b, eps)
                    params = {m: params[m] - sum(lr[bi, hi, j] / size * grads[j - start][m]
                                                 for j in range(start, end)) for m in names}
    return out
