"""Inner (self-supervised) losses of a TTT layer, as their gradient with respect to the prediction.

A TTT layer trains its inner model F_W on the key-value "mini-dataset" of one sample:
``V_hat = F_W(K)``, ``L = loss(V_hat, V)``. The inner models in this package differentiate ``L`` by hand
(chain rule through their own forward), so a loss only has to provide

* ``needs_prediction``: whether ``dL/dV_hat`` depends on ``V_hat`` (if not, the inner model skips its
  forward on the keys), and
* ``grad(prediction, target, scale, num_tokens)``: ``E = dL/dV_hat``, same shape as ``target``,
* ``value(...)``: the loss itself, summed over every leading (sample / head) dimension, for references.

Both losses are means over the ``num_tokens`` training pairs, times ``scale`` (ViT³ uses ``scale = 1/3``;
the paper writes ``1/sqrt(d)``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ['InnerLoss', 'DotProductLoss', 'MSELoss', 'get_inner_loss', 'INNER_LOSSES']


class InnerLoss:
    """Interface of an inner loss: see the module docstring."""

    name: str = ''
    needs_prediction: bool = True

    def grad(self, prediction: Optional[torch.Tensor], target: torch.Tensor, scale: float,
             num_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def value(self, prediction: torch.Tensor, target: torch.Tensor, scale: float, num_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


class DotProductLoss(InnerLoss):
    """``L = -(s/N) * sum_i <V_hat_i, V_i>``; ``dL/dV_hat = -(s/N) V`` (independent of the prediction).

    ViT³'s choice (Insight 1: its mixed derivative d²L/dV_hat dV = -(s/N) I never vanishes, so the value
    projection always receives outer gradient).
    """

    name = 'dot'
    needs_prediction = False

    def grad(self, prediction, target, scale, num_tokens):
        return target * (-scale / num_tokens)

    def value(self, prediction, target, scale, num_tokens):
        return -(scale / num_tokens) * (prediction * target).sum()


class MSELoss(InnerLoss):
    """``L = (s/(2N)) * sum_i ||V_hat_i - V_i||²``; ``dL/dV_hat = (s/N) (V_hat - V)``."""

    name = 'mse'
    needs_prediction = True

    def grad(self, prediction, target, scale, num_tokens):
        return (prediction - target) * (scale / num_tokens)

    def value(self, prediction, target, scale, num_tokens):
        return (scale / (2 * num_tokens)) * (prediction - target).pow(2).sum()


INNER_LOSSES: Dict[str, InnerLoss] = {'dot': DotProductLoss(), 'mse': MSELoss()}


def get_inner_loss(loss) -> InnerLoss:
    """Return an :class:`InnerLoss` from an instance or one of the names in ``INNER_LOSSES``."""
    if isinstance(loss, InnerLoss):
        return loss
    try:
        return INNER_LOSSES[loss]
    except KeyError:
        raise ValueError(f'unknown inner loss {loss!r}; choose one of {sorted(INNER_LOSSES)} '
                         f'or pass an InnerLoss instance') from None
