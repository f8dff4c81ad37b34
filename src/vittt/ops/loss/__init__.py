"""Inner (self-supervised) losses of a TTT layer, as their gradient with respect to the prediction.

A TTT layer trains its inner model F_W on the key-value "mini-dataset" of one sample and head:
``V_hat = F_W(K)``, ``L = loss(V_hat, V)``. The inner models differentiate ``L`` by hand (chain rule through their
own forward, :mod:`vittt.ops.inner`), so a loss only has to provide

* ``needs_prediction``: whether ``dL/dV_hat`` depends on ``V_hat`` (if not, the inner model skips the last layer of
  its forward on the keys: that is why the paper's dot-product rows cost fewer MACs),
* ``grad(prediction, target, scale, num_tokens, dims)``: ``E = dL/dV_hat``, same shape as ``target``,
* ``value(prediction, target, scale, num_tokens, dims)``: the loss, summed over every training set (sample / head),
* ``additive``: whether the loss is a sum over tokens, so that gradients of token subsets add up to the full one
  (what the memory-lean mode's bands rely on; RMSE's square root is not).

With N the number of training pairs (``num_tokens``), ``s`` the scale (ViT³'s code uses 1/3; the paper writes
1/√d), ``r = V_hat − V``, the appendix formulas (spec A.6, Insight 1) are::

    dot        L = −(s/N) Σ_i ⟨V_hat_i, V_i⟩              E = −(s/N) V
    mse        L = (s/(2N)) Σ_i ‖r_i‖²                     E = (s/N) r
    rmse       L = √((s/N) Σ_i ‖r_i‖²)                     E = (s/N) r / L
    mae        L = (s/N) Σ_i ‖r_i‖₁                        E = (s/N) sign(r)
    smooth_l1  L = (s/N) Σ_ij ℓ(r_ij), ℓ(x) = x²/2 if |x| < 1 else |x| − 1/2        E = (s/N) clamp(r, −1, 1)

Insight 1 is visible in these: the outer gradient reaching the value projection flows through ``dE/dV`` (the mixed
derivative ∂²L/∂V_hat∂V): −(s/N) I for dot, (s/N) I for MSE, zero almost everywhere for MAE (sign is flat), and
zero outside |r| < 1 for smooth-L1. ``dims`` are the dimensions of one training set: ``(-2, -1)`` (tokens, channels of
a head) for ``[B, h, N, d]`` tensors, ``(-3, -2, -1)`` for one head laid out as a map ``[B, d, H, W]``; only RMSE
(whose square root is per training set) uses them.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ['InnerLoss', 'DotProductLoss', 'MSELoss', 'RMSELoss', 'MAELoss', 'SmoothL1Loss', 'get_inner_loss',
           'INNER_LOSSES']

Dims = Sequence[int]
_TOKENS = (-2, -1)


def _per_token(scale: float, num_tokens) -> float:
    """``scale / N``; ``N`` as a float first (the same value in eager mode; a symbolic N at export stays a float
    expression, without the integrality guards a true division of integers adds)."""
    return scale / torch.sym_float(num_tokens)


class InnerLoss:
    """Interface of an inner loss: see the module docstring."""

    name: str = ''
    needs_prediction: bool = True
    additive: bool = True

    def grad(self, prediction: Optional[torch.Tensor], target: torch.Tensor, scale: float,
             num_tokens: int, dims: Dims = _TOKENS) -> torch.Tensor:
        raise NotImplementedError

    def value(self, prediction: torch.Tensor, target: torch.Tensor, scale: float, num_tokens: int,
              dims: Dims = _TOKENS) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


class DotProductLoss(InnerLoss):
    """``L = -(s/N) Σ_i <V_hat_i, V_i>``; ``dL/dV_hat = -(s/N) V`` (independent of the prediction).

    ViT³'s choice (Insight 1: its mixed derivative -(s/N) I never vanishes, so the value projection always receives
    outer gradient)."""

    name = 'dot'
    needs_prediction = False

    def grad(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return target * -_per_token(scale, num_tokens)

    def value(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return -_per_token(scale, num_tokens) * (prediction * target).sum()


class MSELoss(InnerLoss):
    """``L = (s/(2N)) Σ_i ||V_hat_i - V_i||²``; ``dL/dV_hat = (s/N) (V_hat - V)``."""

    name = 'mse'

    def grad(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return (prediction - target) * _per_token(scale, num_tokens)

    def value(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return (scale / (2 * num_tokens)) * (prediction - target).pow(2).sum()


class RMSELoss(InnerLoss):
    """``L = sqrt((s/N) Σ_i ||V_hat_i - V_i||²)`` per training set; ``dL/dV_hat = (s/N) (V_hat - V) / L``.

    At L = 0 the gradient is taken as 0 (the clamp keeps it finite)."""

    name = 'rmse'
    additive = False

    def _root(self, residual, scale, num_tokens, dims):
        squares = residual.pow(2).sum(dim=tuple(dims), keepdim=True)
        return (_per_token(scale, num_tokens) * squares).clamp_min(1e-30).sqrt()

    def grad(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        residual = prediction - target
        return residual * _per_token(scale, num_tokens) / self._root(residual, scale, num_tokens, dims)

    def value(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return self._root(prediction - target, scale, num_tokens, dims).sum()


class MAELoss(InnerLoss):
    """``L = (s/N) Σ_i ||V_hat_i - V_i||_1``; ``dL/dV_hat = (s/N) sign(V_hat - V)`` (its mixed derivative vanishes
    almost everywhere: Insight 1's failure case)."""

    name = 'mae'

    def grad(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return torch.sign(prediction - target) * _per_token(scale, num_tokens)

    def value(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return _per_token(scale, num_tokens) * (prediction - target).abs().sum()


class SmoothL1Loss(InnerLoss):
    """``L = (s/N) Σ_ij ℓ(V_hat_ij - V_ij)`` with the Huber ℓ of β = 1;
    ``dL/dV_hat = (s/N) clamp(V_hat - V, -1, 1)``."""

    name = 'smooth_l1'

    def grad(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        return (prediction - target).clamp(-1.0, 1.0) * _per_token(scale, num_tokens)

    def value(self, prediction, target, scale, num_tokens, dims=_TOKENS):
        r = (prediction - target).abs()
        return _per_token(scale, num_tokens) * torch.where(r < 1.0, 0.5 * r * r, r - 0.5).sum()


INNER_LOSSES: Dict[str, InnerLoss] = {loss.name: loss for loss in
                                      (DotProductLoss(), MSELoss(), RMSELoss(), MAELoss(), SmoothL1Loss())}


def get_inner_loss(loss) -> InnerLoss:
    """Return an :class:`InnerLoss` from an instance or one of the names in ``INNER_LOSSES``."""
    if isinstance(loss, InnerLoss):
        return loss
    try:
        return INNER_LOSSES[loss]
    except (KeyError, TypeError):
        raise ValueError(f'unknown inner loss {loss!r}; choose one of {sorted(INNER_LOSSES)} '
                         f'or pass an InnerLoss instance') from None
