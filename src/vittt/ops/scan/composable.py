"""Mini-batch TTT with TTT-Linear / TTT-MLP inner models (Sun et al. 2024, as extended by Vision-TTT).

Shapes: per head, ``q, k, v [B, h, N, d]`` and a token-wise inner learning rate ``lr [B, h, N]`` (already
``base_lr · sigmoid(·) / d`` or a constant). The initial state (learnable, per head) is a dict of tensors:

* TTT-Linear ``f(x) = x + LN(x W + b)``: ``w [h, d, d]``, ``b [h, 1, d]``, ``ln_weight, ln_bias [h, 1, d]``;
* TTT-MLP ``f(x) = x + LN(GELU(x W1 + b1) W2 + b2)``: ``w1 [h, d, m]``, ``b1 [h, 1, m]``, ``w2 [h, m, d]``,
  ``b2 [h, 1, d]`` and the same LN parameters.

Inner loss of token j (LN-fused L2 reconstruction of ``V - K``, the residual's target)::

    ℓ_j = ½ ‖LN(g(K_j)) − (V_j − K_j)‖²        g = the pre-residual part (x W + b, or the MLP)

The tokens are cut into mini-batches of ``mini_batch_size`` (the last one may be shorter). Within mini-batch k every
gradient is taken at the state ``S_(k-1)`` left by the previous mini-batch; token i's output uses the state
``S_(k-1) − Σ_j A_ij ∇ℓ_j(S_(k-1))`` with ``A_ij = c_ij · lr_j``:

* ``causal=False`` (default): ``c_ij = 1/b_k`` — every token of the mini-batch uses the mean gradient of the whole
  mini-batch, so ``mini_batch_size = N`` is exactly one full-batch step (ViT³'s Insight 2);
* ``causal=True`` (vanilla TTT): ``c_ij = [j ≤ i] / (i + 1)`` — token i only uses the tokens up to itself.

Both carry the same state to the next mini-batch: ``S_k = S_(k-1) − Σ_j (lr_j / b_k) ∇ℓ_j(S_(k-1))``.
The outputs are computed in the **dual form**: for a linear layer with input X, gradient G at its output,
``X_Q,i W_i = X_Q,i W − Σ_j A_ij (X_Q,i · X_j) G_j``, i.e. ``X_Q W − (A ⊙ X_Q Xᵀ) G`` (and ``b − A G``), so the
per-token states are never formed; the state itself is only updated once per mini-batch (a scan over N/b steps).

:func:`ttt_scan_fused` is the fast path of the same function. Without the causal rule every row of A is the same,
``a_j = lr_j / b``, so ``(A ⊙ X_Q Xᵀ) G = X_Q Xᵀ (a ⊙ G)`` and every token of mini-batch k is served by the *same*
state, the one left after it: ``X_Q W − X_Q Xᵀ (a ⊙ G) = X_Q W_k`` and ``b − A G = b_k`` (for TTT-MLP the same holds
for each layer, the second layer's input being the first layer's output at ``S_k``). The sequential loop therefore
only runs the K side (forward, LN-fused gradient, state update) and keeps each ``S_k``; the Q side is one batched
matmul of all mini-batches' queries against the stacked states, then one LayerNorm over all tokens. With the causal
rule the Q side is the dual form above, batched over all mini-batches after the loop the same way.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from ..inner.functions import gelu_grad, layer_norm, layer_norm_project, layer_norm_stats, make_inner_function
from ..inner.train import inner_ttt
from ..loss import MSELoss

__all__ = ['ln_l2_grad', 'ln_l2_grad_parts', 'layer_norm', 'gelu_grad', 'minibatch_coefficients', 'ttt_linear_scan',
           'ttt_mlp_scan', 'ttt_scan']  # layer_norm, gelu_grad: re-exported from vittt.ops.inner.functions


def ln_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """``d/dz ½‖LN(z) − target‖²`` row-wise (LN over the last dim with affine ``weight, bias``)."""
    root_d = math.sqrt(z.shape[-1])
    u, r = ln_l2_grad_parts(z, weight * (bias - target), weight * weight * root_d, eps)
    return u * (r * root_d)


def ln_l2_grad_parts(z: torch.Tensor, c: torch.Tensor, w_sq: torch.Tensor, eps: float):
    """:func:`ln_l2_grad` from pieces that do not depend on ``z`` (so callers can compute them once), in few passes.

    Takes ``c = weight · (bias − target)`` and ``w_sq = weight² · √d``; returns ``(u, r)`` with ``ln_l2_grad =
    u · r · √d`` (callers fold ``√d`` and any row scale into ``r``, a ``[..., 1]`` column).

    With ``x̂ = (z − μ) · rstd`` and ``ĝ = dℓ/dx̂ = (weight · x̂ + bias − target) · weight = weight² x̂ + c``, the
    gradient is ``(ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)) · rstd``. Here ``r = rstd / √d = 1 / √(Σ(z − μ)² + d · eps)`` and
    ``x̃ = x̂ / √d``, so that ``u = ĝ − Σĝ / d − x̃ · Σ(ĝ x̃)`` (:func:`~vittt.ops.inner.functions.layer_norm_stats`,
    :func:`~vittt.ops.inner.functions.layer_norm_project`: LayerNorm's one backward, with ``ĝ`` formed from ``x̃``).
    """
    x_t, r = layer_norm_stats(z, eps)
    return layer_norm_project(torch.addcmul(c, w_sq, x_t), x_t), r


def minibatch_coefficients(size: int, causal: bool, device=None, dtype=None) -> torch.Tensor:
    """``c [size, size]``: row i weighs the gradients of tokens j (see the module docstring)."""
    if causal:
        rows = torch.arange(1, size + 1, device=device, dtype=dtype)
        return torch.ones(size, size, device=device, dtype=dtype).tril() / rows[:, None]
    return torch.full((size, size), 1.0 / size, device=device, dtype=dtype)


def _step_coefficients(eta: torch.Tensor, size: int, causal: bool) -> torch.Tensor:
    """``A = c ⊙ η_j`` for one mini-batch (``eta [B, h, b]``). Without the causal rule every row is the same,
    ``η_j / b``, so A stays a broadcast row ``[B, h, 1, b]`` (no b × b matrix, and ``A @ G`` is one row)."""
    if causal:
        return minibatch_coefficients(size, True, eta.device, eta.dtype) * eta.unsqueeze(-2)
    return (eta / size).unsqueeze(-2)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def ttt_linear_scan(q, k, v, lr, state: Dict[str, torch.Tensor], *, mini_batch_size: int, causal: bool = False,
                    eps: float = 1e-6) -> torch.Tensor:
    """TTT-Linear over all mini-batches; returns ``f_(S_i)(q_i)`` for every token, ``[B, h, N, d]``."""
    w, b = state['w'].unsqueeze(0), state['b'].unsqueeze(0)
    ln_w, ln_b = state['ln_weight'].unsqueeze(0), state['ln_bias'].unsqueeze(0)
    outs = []
    for start, end in _chunks(q.shape[-2], mini_batch_size):
        xq, xk, xv, eta = q[..., start:end, :], k[..., start:end, :], v[..., start:end, :], lr[..., start:end]
        size = end - start
        grad = ln_l2_grad(xk @ w + b, xv - xk, ln_w, ln_b, eps)                     # dℓ_j/dZ_j
        coef = _step_coefficients(eta, size, causal)                                # A [B, h, b, b]
        z_q = xq @ w + b - (coef * (xq @ xk.transpose(-2, -1))) @ grad - coef @ grad
        outs.append(xq + layer_norm(z_q, ln_w, ln_b, eps))
        last = (eta / size).unsqueeze(-1)                                            # A's last row, as a column
        w = w - xk.transpose(-2, -1) @ (last * grad)
        b = b - (last * grad).sum(-2, keepdim=True)
    return torch.cat(outs, dim=-2)


def ttt_mlp_scan(q, k, v, lr, state: Dict[str, torch.Tensor], *, mini_batch_size: int, causal: bool = False,
                 eps: float = 1e-6) -> torch.Tensor:
    """TTT-MLP (two layers, GELU) over all mini-batches; ``[B, h, N, d]``."""
    w1, b1 = state['w1'].unsqueeze(0), state['b1'].unsqueeze(0)
    w2, b2 = state['w2'].unsqueeze(0), state['b2'].unsqueeze(0)
    ln_w, ln_b = state['ln_weight'].unsqueeze(0), state['ln_bias'].unsqueeze(0)
    outs = []
    for start, end in _chunks(q.shape[-2], mini_batch_size):
        xq, xk, xv, eta = q[..., start:end, :], k[..., start:end, :], v[..., start:end, :], lr[..., start:end]
        size = end - start
        z1 = xk @ w1 + b1
        x2 = F.gelu(z1)
        grad2 = ln_l2_grad(x2 @ w2 + b2, xv - xk, ln_w, ln_b, eps)
        grad1 = (grad2 @ w2.transpose(-2, -1)) * gelu_grad(z1)
        coef = _step_coefficients(eta, size, causal)
        zq1 = xq @ w1 + b1 - (coef * (xq @ xk.transpose(-2, -1))) @ grad1 - coef @ grad1
        xq2 = F.gelu(zq1)
        zq2 = xq2 @ w2 + b2 - (coef * (xq2 @ x2.transpose(-2, -1))) @ grad2 - coef @ grad2
        outs.append(xq + layer_norm(zq2, ln_w, ln_b, eps))
        last = (eta / size).unsqueeze(-1)
        w1 = w1 - xk.transpose(-2, -1) @ (last * grad1)
        b1 = b1 - (last * grad1).sum(-2, keepdim=True)
        w2 = w2 - x2.transpose(-2, -1) @ (last * grad2)
        b2 = b2 - (last * grad2).sum(-2, keepdim=True)
    return torch.cat(outs, dim=-2)


_MSE = MSELoss()


def ttt_scan(kind: str, q, k, v, lr, state: Dict[str, torch.Tensor], *, mini_batch_size: int, causal: bool = False,
             eps: float = 1e-6) -> torch.Tensor:
    """Mini-batch TTT with the ``'linear'`` or ``'mlp'`` inner model. Without the causal rule this is the generic
    composition :func:`~vittt.ops.inner.inner_ttt` of :class:`~vittt.ops.inner.TTTLinear` / ``TTTMLP`` (the
    LN-fused L2 loss is the MSE loss of scale 1, ``η_j`` the token weights, no gradient normalisation); the causal
    rule needs every token's own state, which the dual form above gives without forming them."""
    if kind not in ('linear', 'mlp'):
        raise ValueError(f"inner model must be 'linear' or 'mlp', got {kind!r}")
    if causal:
        return (ttt_linear_scan if kind == 'linear' else ttt_mlp_scan)(q, k, v, lr, state,
                                                                       mini_batch_size=mini_batch_size, causal=True,
                                                                       eps=eps)
    d = q.shape[-1]
    fn = make_inner_function(f'ttt_{kind}', d, 1 if kind == 'linear' else state['w1'].shape[-1] // d)
    fn.eps = eps
    per_sample = {n: t if t.dim() == 4 else t.unsqueeze(0) for n, t in state.items()}
    return inner_ttt(fn, q, k, v, per_sample, loss=_MSE, scale=1.0, inner_lr=1.0, normalize=False,
                     token_weights=lr, mini_batch_size=mini_batch_size)
