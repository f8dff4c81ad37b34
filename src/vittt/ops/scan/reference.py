"""Plain autograd reference of token-by-token mini-batch TTT, written straight from the spec's equations (tests
only): the inner loss is built explicitly and differentiated with ``torch.autograd.grad(create_graph=True)``;
nothing is shared with the closed-form paths except the loss definitions' ``value``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ['reference_ttt_scan']


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
