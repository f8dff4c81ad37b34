"""The IDDPM hybrid loss DiT trains with (``LossType.MSE`` + ``ModelVarType.LEARNED_RANGE``), written once.

    mse  = mean over non-batch dims of (ε − ε̂)²
    vb   = KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)) / ln 2                      (t > 0, bits per dim)
         = −log p(x_0 | x_1) / ln 2, the discretised-Gaussian decoder (bins of 2/255, edges at ±0.999,
           the normal CDF in its tanh approximation)                                (t = 0)
    loss = mse + vb,   vb computed on [stop-grad(ε̂), v]: it trains the variance channels only

Without learned σ, ``loss = mse``.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from .schedule import GaussianTables

__all__ = ['hybrid_loss', 'normal_kl', 'approx_standard_normal_cdf', 'discretized_gaussian_log_likelihood']


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) element-wise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """ADM's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data ``x`` in [-1, 1] quantised to 256 levels under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.flatten(1).mean(dim=1)


def hybrid_loss(model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                tables: GaussianTables, learn_sigma: bool = True) -> Dict[str, torch.Tensor]:
    """Per-sample ``{'mse', 'vb', 'loss'}`` ([B] each; ``vb`` is zeros without learned σ). ``model_out`` is
    ``[B, 2C, H, W]`` (ε̂ then v) with learned σ, else ``[B, C, H, W]``."""
    c = x0.shape[1]
    eps = model_out[:, :c]
    mse = _mean_flat((noise - eps).pow(2))
    if not learn_sigma:
        return dict(mse=mse, vb=torch.zeros_like(mse), loss=mse)
    frozen = torch.cat([eps.detach(), model_out[:, c:2 * c]], dim=1)
    mean, log_var, _ = tables.p_mean_variance(frozen, x_t, t, learn_sigma=True)
    true_mean, true_log_var = tables.q_posterior(x0, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return dict(mse=mse, vb=vb, loss=mse + vb)
