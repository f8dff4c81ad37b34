"""Inner training composed from an :class:`~vittt.ops.inner.InnerFunction`'s pieces: the step, several full-batch
epochs, sequential mini-batches, the dynamic (token-wise) inner lr, and the statistics ``vittt explain inner`` shows.

* **step**: ``W' = W − η · ĝ``, ``ĝ = g / (‖g‖ + 1)`` over the function's ``norm_dims`` (or the raw ``g``);
* **epochs** (Insight 2, Table 2): ``inner_epochs`` full-batch steps, each gradient taken at the state the previous
  step left (per sample after the first);
* **mini-batches**: the tokens, in raster order, cut into ``inner_batches`` consecutive slices of N/k tokens
  (``torch.tensor_split``: sizes differ by at most one); slice i trains the state left by slice i − 1 (its loss a
  mean over its own tokens) and its queries read the state after their own slice: the causal bias at mini-batch
  granularity that Insight 2 measures;
* **dynamic lr** (Insight 3): ``token_weights [B, h, N]`` = ``sigmoid(x W_η)``, each token's row of ``E`` scaled by
  it (the step then uses ``inner_lr``): η_i = η · sigmoid(x_i W_η) of prior TTT work, applied before normalisation.

The fused paths (:func:`~vittt.ops.swiglu_ttt_fused`, :func:`~vittt.ops.dwconv_ttt_fused`) compute
``inner_ttt`` with one epoch, one batch and a constant lr for the dot-product loss, and are tested against it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..loss import InnerLoss
from ..normalize import inner_step as _tensor_step, l2_norm
from .functions import GridSize, InnerFunction, State

__all__ = ['inner_step', 'inner_fit', 'inner_ttt', 'inner_stats', 'check_schedule']


def check_schedule(fn: InnerFunction, epochs: int, batches: int) -> None:
    """Clear errors for an unusable ``inner_epochs`` / ``inner_batches``."""
    for name, value in (('inner_epochs', epochs), ('inner_batches', batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if batches > 1 and not fn.token_wise:
        raise ValueError(f'inner_batches > 1 cuts the tokens into slices: it needs a token-wise inner model, not '
                         f'{fn.name!r}')


def inner_step(fn: InnerFunction, state: State, grads: State, inner_lr: float, normalize: bool = True) -> State:
    """The trained state ``W − lr · ĝ`` of every state tensor with a gradient (the function's ``fixed`` tensors have
    none and are passed through)."""
    dims = fn.norm_dims
    return {name: _tensor_step(w, grads[name], inner_lr, dims[name], normalize) if name in grads else w
            for name, w in state.items()}


def inner_fit(fn: InnerFunction, k: torch.Tensor, v: torch.Tensor, state: State, *, loss: InnerLoss, scale: float,
              inner_lr: float = 1.0, normalize: bool = True, epochs: int = 1,
              token_weights: Optional[torch.Tensor] = None, num_tokens: Optional[int] = None) -> State:
    """``epochs`` full-batch steps on key features ``k`` and targets ``v`` (as :meth:`InnerFunction.grads` takes
    them); returns the trained (per-sample) state."""
    for _ in range(epochs):
        state = inner_step(fn, state, fn.grads(k, v, state, loss, scale, num_tokens, token_weights), inner_lr,
                           normalize)
    return state


def inner_ttt(fn: InnerFunction, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State, *,
              loss: InnerLoss, scale: float, inner_lr: float = 1.0, normalize: bool = True, epochs: int = 1,
              batches: int = 1, token_weights: Optional[torch.Tensor] = None,
              grid_size: Optional[GridSize] = None, mini_batch_size: Optional[int] = None) -> torch.Tensor:
    """The TTT layer's inner learning on one set of heads: train on ``(k, v)``, apply to ``q``.

    ``q, k, v [B, h, N, d]`` on the grid ``grid_size``; ``state`` the initial state (``[1, h, ...]``, or per sample);
    returns ``[B, h, N, out_dim]``. The mini-batches are ``batches`` equal slices, or (Vision-TTT) slices of
    ``mini_batch_size`` tokens, the last one shorter. Differentiable by autograd in every input (the "gradient of
    gradient")."""
    check_schedule(fn, epochs, batches)
    if mini_batch_size is not None:
        if batches != 1:
            raise ValueError('give inner_batches or mini_batch_size, not both')
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f'mini_batch_size must be an integer ≥ 1, got {mini_batch_size!r}')
        check_schedule(fn, epochs, 2 if mini_batch_size < k.shape[-2] else 1)
    heads = q.shape[1]
    qf, kf, vf = fn.features(q, grid_size), fn.features(k, grid_size), fn.values(v, grid_size)
    kwargs = dict(loss=loss, scale=scale, inner_lr=inner_lr, normalize=normalize, epochs=epochs)
    n = kf.shape[-2]
    if batches == 1 and (mini_batch_size is None or mini_batch_size >= n):
        out = fn.apply(qf, inner_fit(fn, kf, vf, state, token_weights=token_weights, **kwargs))
        return fn.unfeatures(out, heads)
    if mini_batch_size is None:
        cut = lambda t, dim: t.tensor_split(batches, dim=dim)            # noqa: E731
    else:
        cut = lambda t, dim: t.split(mini_batch_size, dim=dim)           # noqa: E731
    outs = []
    weights = [None] * n if token_weights is None else cut(token_weights, -1)
    for qs, ks, vs, ws in zip(cut(qf, -2), cut(kf, -2), cut(vf, -2), weights):
        state = inner_fit(fn, ks, vs, state, token_weights=ws, **kwargs)
        outs.append(fn.apply(qs, state))
    return torch.cat(outs, dim=-2)


def _per_head_loss(fn: InnerFunction, x: torch.Tensor, v: torch.Tensor, state: State, loss: InnerLoss,
                   scale: float) -> torch.Tensor:
    """The inner loss of each training set, ``[B, h]`` (``[B, 1]`` for a map-wide inner model)."""
    prediction = fn.predict(x, state)
    if not fn.token_wise:
        n = x.shape[-2] * x.shape[-1]
        return torch.stack([loss.value(p, t, scale, n, dims=(-3, -2, -1)) for p, t in zip(prediction, v)])[:, None]
    n = x.shape[-2]
    return torch.stack([torch.stack([loss.value(prediction[b, h], v[b, h], scale, n, dims=(-2, -1))
                                     for h in range(x.shape[1])]) for b in range(x.shape[0])])


def _head_norm(tensors: Dict[str, torch.Tensor], fn: InnerFunction, heads: int) -> torch.Tensor:
    """Frobenius norm over all state tensors, per sample and head, ``[B, h]`` (map-wide: ``[B, 1]``)."""
    total = 0.0
    for t in tensors.values():
        t = t.reshape(t.shape[0], heads if fn.token_wise else 1, -1)
        total = total + t.pow(2).sum(-1)
    return total.sqrt()


@torch.no_grad()
def inner_stats(fn: InnerFunction, k: torch.Tensor, v: torch.Tensor, state: State, *, loss: InnerLoss,
                scale: float, inner_lr: float = 1.0, normalize: bool = True, epochs: int = 1,
                token_weights: Optional[torch.Tensor] = None,
                grid_size: Optional[GridSize] = None) -> Dict[str, torch.Tensor]:
    """What the insights argue about, per sample and head (``[B, h]``; ``[B, 1]`` for ``dwconv3x3``), for a full-batch
    inner training of ``epochs`` steps on ``k, v [B, h, N, d]``:

    ``loss_before`` / ``loss_after`` (the inner loss at W0 and at the trained state), ``grad_norm`` (‖g‖ of the first
    step, all state tensors together) and ``grad_norm_normalized`` (‖ĝ‖ after the soft normalisation; = ‖g‖ without
    it), ``update`` (‖W − W0‖ / ‖W0‖)."""
    heads = k.shape[1]
    kf, vf = fn.features(k, grid_size), fn.values(v, grid_size)
    grads = fn.grads(kf, vf, state, loss, scale, None, token_weights)
    dims = fn.norm_dims
    normalized = {n: g / (l2_norm(g, dims[n]) + 1.0) if normalize else g for n, g in grads.items()}
    trained = inner_fit(fn, kf, vf, state, loss=loss, scale=scale, inner_lr=inner_lr, normalize=normalize,
                        epochs=epochs, token_weights=token_weights)
    batch = k.shape[0]
    initial = {n: state[n].expand(batch, *state[n].shape[1:]) for n in grads}      # the stepped tensors
    delta = {n: trained[n] - initial[n] for n in grads}
    return dict(loss_before=_per_head_loss(fn, kf, vf, state, loss, scale),
                loss_after=_per_head_loss(fn, kf, vf, trained, loss, scale),
                grad_norm=_head_norm(grads, fn, heads), grad_norm_normalized=_head_norm(normalized, fn, heads),
                update=_head_norm(delta, fn, heads) / _head_norm(initial, fn, heads).clamp_min(1e-30))
