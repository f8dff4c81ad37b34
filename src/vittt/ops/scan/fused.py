""":func:`ttt_scan_fused`, the fast path of the mini-batch TTT scan (the maths and why it is the same function are in
:mod:`vittt.ops.scan.composable`'s docstring)."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .._capture import records_grad
from .composable import ln_l2_grad_parts, minibatch_coefficients

__all__ = ['ttt_scan_fused']


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-head ``[h, r, c]`` (shared by all samples) or per-sample ``[B, h, r, c]`` state -> ``[B·h, r, c]``."""
    if t.dim() == 3:
        t = t.unsqueeze(0).expand(batch, *t.shape)
    elif t.dim() != 4 or t.shape[0] != batch:
        raise ValueError(f'state tensors must be [h, ...] or [B={batch}, h, ...], got {tuple(t.shape)}')
    return t.reshape(-1, *t.shape[-2:])


def _block_views(t: torch.Tensor, size: int, full: int) -> list:
    """``[B, h, N, a]`` (any strides) -> views ``[the full whole mini-batches [K, B, h, b, a], the shorter last one
    [B, h, r, a]]`` (the latter only if b does not divide N)."""
    nf = full * size
    views = [t[:, :, :nf].unflatten(2, (full, size)).permute(2, 0, 1, 3, 4)]
    return views + [t[:, :, nf:]] if nf < t.shape[2] else views


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[(K,) B, h, b, a]`` -> ``[(K,) B·h, b, a]`` (a copy, laid out mini-batch-major, unless it is one already)."""
    return x.reshape(*x.shape[:-4], x.shape[-4] * x.shape[-3], *x.shape[-2:])


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """``[x | 1]`` (contiguous): ``[x | 1] @ [W; b] = x W + b`` in one matmul, and ``b``'s update rides on ``W``'s."""
    return torch.cat([x, x.new_ones(()).expand(*x.shape[:-1], 1)], dim=-1)


class _States:
    """The state before the first loop step and after each step, ``[steps + 1, ...]``: a list stacked at the end
    under autograd; without autograd one preallocated stack that each step's update writes into (``out=``)."""

    def __init__(self, initial: torch.Tensor, steps: int, track: bool):
        self.track = track
        if track:
            self.items = [initial]
        else:
            self.items = initial.new_empty(steps + 1, *initial.shape)
            self.items[0].copy_(initial)

    def slot(self, i: int):
        """``out=`` for the state after step i (None under autograd)."""
        return None if self.track else self.items[i + 1]

    def add(self, new: torch.Tensor) -> torch.Tensor:
        if self.track:
            self.items.append(new)
        return new

    def per_part(self, full: int, before: bool = False) -> list:
        """The states that serve each part: ``[S_1..S_K of the whole mini-batches [K, ...], S_(K+1) of the last]``
        (``before``: the states each mini-batch started from, ``S_0..``)."""
        stacked = torch.stack(self.items) if self.track else self.items
        first = 0 if before else 1
        return [stacked[first:first + full]] + ([stacked[first + full]] if stacked.shape[0] > full + 1 else [])


def _grouped(history: list, full: int) -> list:
    """Per-step tensors -> ``[stacked over the whole mini-batches [K, ...], (the last shorter one's)]``."""
    return [torch.stack(history[:full])] + history[full:]


def _causal_dual(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, size: int, plus_one: bool = False,
                 counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal dual-form correction ``(A' ⊙ X Yᵀ) G`` within each mini-batch, ``A'_ij = b · [j ≤ i] / (i + 1)`` (``G``
    already carries ``η_j / b``); ``plus_one`` adds the bias term ``A' G`` (``X Yᵀ + 1``). ``counts``: each
    mini-batch's own ``b`` (``[K, 1, 1, 1]``, padded mini-batches of ``size`` slots), instead of ``size``."""
    coef = minibatch_coefficients(size, True, x.device, x.dtype) * (size if counts is None else counts)
    scores = x @ y.transpose(-2, -1)
    return (coef * (scores + 1 if plus_one else scores)) @ g


def ttt_scan_fused(kind: str, q, k, v, lr, state: Dict[str, torch.Tensor], *, mini_batch_size: int,
                   causal: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """:func:`ttt_scan` with far fewer, larger ops (the same function; see the module docstring).

    ``q, k, v [B, h, N, d]`` (any strides), ``lr [B, h, N]``; every state tensor either per head ``[h, ...]`` (as
    for :func:`ttt_scan`) or per sample ``[B, h, ...]``. Before the loop, the K side of all tokens is laid out once,
    mini-batch-major: ``[K | 1]`` (the bias rides on the weight as a last row) and ``c = weight · (bias − (V − K))``
    (with the LN weight products and the per-token ``√d · η_j / b_k``). The loop runs over mini-batches and does the K
    side only: ``z = [K | 1] S``, the LN-fused L2 gradient (:func:`ln_l2_grad_parts`), ``S −= [K | 1]ᵀ (η/b ⊙ G)``,
    about a dozen small ops a step. The Q side runs for all mini-batches at once after the loop: ``[Q | 1]`` laid out
    mini-batch-major ``[K, B·h, b, d + 1]``, one batched matmul against the stacked states (causal: plus the batched
    dual-form correction), one LayerNorm + residual; so all ``K + 1`` states are kept (autograd keeps them anyway).
    Without autograd the TTT-MLP and causal states are written straight into one preallocated stack; non-causal
    TTT-Linear keeps one state, updated in place, and each mini-batch's queries read it right after its step. The
    tail then runs in place. Returns ``[B, h, N, d]``, a view of a token-major ``[B, N, h, d]`` tensor.
    """
    if kind not in ('linear', 'mlp'):
        raise ValueError(f"inner model must be 'linear' or 'mlp', got {kind!r}")
    if mini_batch_size < 1:
        raise ValueError(f'mini_batch_size must be ≥ 1, got {mini_batch_size}')
    bsz, heads, n, d = q.shape
    track = records_grad(q, k, v, lr, *state.values())
    root_d = math.sqrt(d)
    ln_w, ln_b = _per_sample(state['ln_weight'], bsz), _per_sample(state['ln_bias'], bsz)  # [BH, 1, d]
    w_sq = ln_w * ln_w * root_d
    per_head = lambda t: t.view(bsz, heads, 1, d)                          # [BH, 1, d] -> [B, h, 1, d]

    def k_prep(k_b, v_b):
        """Blocks ``[(K,) B, h, b, d]`` of keys and values -> ``[K | 1]`` and ``c = weight · (bias − target)``
        (target = V − K), both ``[(K,) B·h, b, ·]`` mini-batch-major: what the loop's steps read."""
        xk = _with_ones(k_b)
        return _flat(xk), _flat(torch.addcmul(per_head(ln_w * ln_b), per_head(ln_w), xk[..., :d] - v_b))

    def grad(z, c_i, eta_i):
        """``(η_j / b) dℓ_j/dz_j`` of one mini-batch from its output z."""
        u, r = ln_l2_grad_parts(z, c_i, w_sq, eps)
        return u * (r * eta_i)

    if torch.compiler.is_exporting():  # a symbolic N: padded mini-batches in one scan op
        return _captured_scan(kind, q, k, v, lr, state, k_prep, grad, mini_batch_size, causal, eps, bsz, heads)
    size = min(mini_batch_size, n)
    full = n // size
    sizes = [size, n - full * size][:1 + (full * size < n)]                # whole mini-batches, the shorter last one
    # each part: [the whole mini-batches [K, B·h, b, ·], the shorter last one [B·h, r, ·]]; the K side of all of them
    # is laid out once, before the loop (one pass each; per step they would be ~3 more small ops of the ~12)
    prepared = [k_prep(k_b, v_b) for k_b, v_b in zip(_block_views(k, size, full), _block_views(v, size, full))]
    eta = [_flat(x * (root_d / m)) for x, m in zip(_block_views(lr.unsqueeze(-1), size, full), sizes)]  # √d η_j / b
    steps = list(zip(prepared[0][0].unbind(0), prepared[0][1].unbind(0), eta[0].unbind(0)))
    steps += [(xk, c, e) for (xk, c), e in zip(prepared[1:], eta[1:])]
    keys = [xk for xk, _ in prepared]                                       # [K | 1] per part (causal Q side)
    xq = [_flat(_with_ones(x)) for x in _block_views(q, size, full)]       # [Q | 1] per part

    if kind == 'linear':
        w = torch.cat([_per_sample(state['w'], bsz), _per_sample(state['b'], bsz)], dim=-2)    # [BH, d + 1, d]
    if kind == 'linear' and not (track or causal):
        # no autograd, every query served by the state after its mini-batch: one state updated in place, and each
        # mini-batch's queries read it right after its step (cache-resident) instead of a stack of all the states
        zq = [x.new_empty(*x.shape[:-1], d) for x in xq]
        for (xk, c_i, eta_i), x, z in zip(steps, [*xq[0].unbind(0), *xq[1:]], [*zq[0].unbind(0), *zq[1:]]):
            torch.baddbmm(w, xk.transpose(1, 2), grad(torch.bmm(xk, w), c_i, eta_i), alpha=-1, out=w)  # (counted)
            torch.bmm(x, w, out=z)
    elif kind == 'linear':
        states, grads = _States(w, len(steps), track), []
        for i, (xk, c_i, eta_i) in enumerate(steps):
            g = grad(torch.bmm(xk, w), c_i, eta_i)
            if causal:
                grads.append(g)
            w = states.add(torch.baddbmm(w, xk.transpose(1, 2), g, alpha=-1, out=states.slot(i)))
        if causal:
            zq = [x @ w_p - _causal_dual(x, y, g_p, m) for x, y, w_p, g_p, m in
                  zip(xq, keys, states.per_part(full, before=True), _grouped(grads, full), sizes)]
        else:
            zq = [x @ w_p for x, w_p in zip(xq, states.per_part(full))]
    else:
        w1 = torch.cat([_per_sample(state['w1'], bsz), _per_sample(state['b1'], bsz)], dim=-2)  # [BH, d + 1, m]
        w2, b2 = _per_sample(state['w2'], bsz), _per_sample(state['b2'], bsz)                  # [BH, m, d], [BH, 1, d]
        states = [_States(t, len(steps), track) for t in (w1, w2, b2)]
        grads1, grads2, hidden = [], [], []
        for i, (xk, c_i, eta_i) in enumerate(steps):
            z1 = torch.bmm(xk, w1)
            x2 = F.gelu(z1)
            g2 = grad(torch.baddbmm(b2, x2, w2), c_i, eta_i)
            g1 = torch.ops.aten.gelu_backward(torch.bmm(g2, w2.transpose(1, 2)), z1)  # G2 W2ᵀ ⊙ GELU'(z1), one op
            if causal:
                grads1.append(g1)
                grads2.append(g2)
                hidden.append(x2)
            w1 = states[0].add(torch.baddbmm(w1, xk.transpose(1, 2), g1, alpha=-1, out=states[0].slot(i)))
            w2 = states[1].add(torch.baddbmm(w2, x2.transpose(1, 2), g2, alpha=-1, out=states[1].slot(i)))
            b2 = states[2].add(torch.sub(b2, g2.sum(1, keepdim=True), out=states[2].slot(i)))
        w1s, w2s, b2s = (st.per_part(full, before=causal) for st in states)
        if causal:
            zq = []
            for x, y, w1_p, w2_p, b2_p, g1_p, g2_p, x2_p, m in zip(
                    xq, keys, w1s, w2s, b2s, _grouped(grads1, full), _grouped(grads2, full),
                    _grouped(hidden, full), sizes):
                xq2 = F.gelu(x @ w1_p - _causal_dual(x, y, g1_p, m))
                zq.append(xq2 @ w2_p + b2_p - _causal_dual(xq2, x2_p, g2_p, m, plus_one=True))
        else:
            zq = [F.gelu(x @ w1_p) @ w2_p + b2_p for x, w1_p, w2_p, b2_p in zip(xq, w1s, w2s, b2s)]
    return _tail(zq, xq, ln_w, ln_b, eps, bsz, heads, size, track)


def _captured_scan(kind, q, k, v, lr, state, k_prep, grad, size: int, causal: bool, eps: float, bsz: int,
                   heads: int):
    """The scan while ``torch.export`` captures it, for any (symbolic) token count N: the tokens padded to
    K = ⌈N / b⌉ + 1 whole mini-batches of ``b = mini_batch_size`` slots, the padding with zero keys, values and lr
    (so zero gradient) and every slot's ``√d η_j`` divided by its own mini-batch's token count (the last one may be
    shorter), so the K steps have one shape and run as one ``torch`` scan (ONNX ``Scan``); the step is the eager
    loop's (``k_prep``, ``grad``). Same function as the loop (the shorter last mini-batch's mean and, causal, its
    ``(i + 1)`` weights are unchanged by the padding); tested against it in tests/models/test_export.py."""
    from torch._higher_order_ops.scan import scan

    n, d = q.shape[2], q.shape[3]
    # one more mini-batch than the tokens need, all padding (a step with zero gradient): the scan is then at least
    # 2 long for every N, and a length that could be 1 would be specialised by torch.export
    blocks = (n + size - 1) // size + 1
    pad = blocks * size - n
    padded = lambda t: F.pad(t, (0, 0, 0, pad))                                   # [B, h, K·b, ·]
    slot = torch.arange(blocks * size, device=q.device)
    counts = (n - slot // size * size).clamp(1, size)                           # tokens in each slot's mini-batch
    eta = padded(lr.unsqueeze(-1)) * (math.sqrt(d) / counts.to(lr.dtype)).view(1, 1, -1, 1)
    blocked = lambda t: t.unflatten(2, (blocks, size)).permute(2, 0, 1, 3, 4)     # [K, B, h, b, ·]
    xs = (*k_prep(blocked(padded(k)), blocked(padded(v))), _flat(blocked(eta)))     # [K | 1], c, √d η / b
    block_counts = counts[::size].to(q.dtype).view(-1, 1, 1, 1)                # [K, 1, 1, 1]
    xq = _flat(_with_ones(blocked(padded(q))))                                  # [K, B·h, b, d + 1]
    if kind == 'linear':
        w0 = torch.cat([_per_sample(state['w'], bsz), _per_sample(state['b'], bsz)], dim=-2)

        def step(w, x):                 # ys: the state each mini-batch's queries read (causal: the one before)
            xk, c, eta_i = x
            g = grad(torch.bmm(xk, w), c, eta_i)
            new = torch.baddbmm(w, xk.transpose(1, 2), g, alpha=-1)
            return new, ((w if causal else new).clone(), g)
        _, (read, grads) = scan(step, w0, xs)
        zq = xq @ read
        if causal:
            zq = zq - _causal_dual(xq, xs[0], grads, size, counts=block_counts)
    else:
        init = (torch.cat([_per_sample(state['w1'], bsz), _per_sample(state['b1'], bsz)], dim=-2),
                _per_sample(state['w2'], bsz), _per_sample(state['b2'], bsz))

        def step(carry, x):
            w1, w2, b2 = carry
            xk, c, eta_i = x
            z1 = torch.bmm(xk, w1)
            x2 = F.gelu(z1)
            g2 = grad(torch.baddbmm(b2, x2, w2), c, eta_i)
            g1 = torch.ops.aten.gelu_backward(torch.bmm(g2, w2.transpose(1, 2)), z1)
            new = (torch.baddbmm(w1, xk.transpose(1, 2), g1, alpha=-1),
                   torch.baddbmm(w2, x2.transpose(1, 2), g2, alpha=-1), b2 - g2.sum(1, keepdim=True))
            return new, tuple(t.clone() for t in (carry if causal else new)) + (g1, g2, x2)
        _, (w1s, w2s, b2s, grads1, grads2, hidden) = scan(step, init, xs)
        if causal:
            xq2 = F.gelu(xq @ w1s - _causal_dual(xq, xs[0], grads1, size, counts=block_counts))
            zq = xq2 @ w2s + b2s - _causal_dual(xq2, hidden, grads2, size, plus_one=True, counts=block_counts)
        else:
            zq = F.gelu(xq @ w1s) @ w2s + b2s
    ln_w, ln_b = _per_sample(state['ln_weight'], bsz), _per_sample(state['ln_bias'], bsz)
    return _tail([zq], [xq], ln_w, ln_b, eps, bsz, heads, size, True)[:, :, :n]


def _tail(zq: list, xq: list, ln_w, ln_b, eps: float, bsz: int, heads: int, size: int, track: bool) -> torch.Tensor:
    """``q + LN(z_q)`` of every part (``zq``: ``[K, B·h, b, d]`` and maybe ``[B·h, r, d]``; ``xq``: the
    parts' ``[Q | 1]``), put back in token order: ``[B, h, N, d]``, a view of a token-major ``[B, N, h, d]``
    tensor."""
    d, full = ln_w.shape[-1], zq[0].shape[0]
    nf = full * size
    heads_apart = lambda t: t.unflatten(-3, (bsz, heads))                  # [..., B·h, b, ·] -> [..., B, h, b, ·]
    if track:
        outs = [heads_apart(torch.addcmul(ln_b, F.layer_norm(z, (d,), eps=eps), ln_w) + x[..., :d])
                for z, x in zip(zq, xq)]
        out = outs[0].permute(1, 0, 3, 2, 4).reshape(bsz, nf, heads, d)
        return torch.cat([out, outs[1].transpose(1, 2)], dim=1).transpose(1, 2) if len(outs) > 1 else \
            out.transpose(1, 2)
    # no autograd: in place, the residual sum written straight into the token-major output
    n = nf + (zq[1].shape[-2] if len(zq) > 1 else 0)
    out = zq[0].new_empty(bsz, n, heads, d)
    targets = [out[:, :nf].unflatten(1, (full, size)).permute(1, 0, 3, 2, 4), out[:, nf:].transpose(1, 2)]
    for z, x, target in zip(zq, xq, targets):
        y = F.layer_norm(z, (d,), eps=eps)
        torch.add(heads_apart(torch.addcmul(ln_b, y, ln_w, out=y)), heads_apart(x[..., :d]), out=target)
    return out.transpose(1, 2)
