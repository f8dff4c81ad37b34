"""The Gaussian diffusion process of DiT / ADM as float64 tables, and the diffusers schedulers built from the same
betas.

With betas β_t (DiT: ``linspace(1e-4, 0.02, 1000)``), α_t = 1 − β_t, ᾱ_t = Π α, ᾱ_{t-1} (ᾱ_{-1} = 1):

    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
    posterior q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, β̃_t I)
        c1 = β_t √ᾱ_{t-1} / (1 − ᾱ_t),  c2 = (1 − ᾱ_{t-1}) √α_t / (1 − ᾱ_t),  β̃_t = β_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t)
    log β̃ is clipped: index 0 takes index 1's value (β̃_0 = 0)
    x̂_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε̂
    learned range: log σ² = f log β_t + (1 − f) log β̃_t (clipped), f = (v + 1) / 2

Tables are float64 and gathered per sample, then cast to the input's dtype (as ADM does).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ['linear_betas', 'GaussianTables', 'SAMPLERS', 'make_scheduler', 'require_diffusers']

#: sampler presets: 'ddpm250' is the official 250-step sampler (ADM respacing = diffusers 'linspace' spacing)
SAMPLERS = ('ddpm250', 'ddpm1000', 'ddim50', 'dpm++25')


def linear_betas(num_timesteps: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """DiT's linear schedule, scaled by 1000 / T (so any T spans the same noise range), float64."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * start, scale * end, num_timesteps, dtype=torch.float64)


class GaussianTables:
    """The coefficient tables of one process (see the module docstring); ``gather(name, t, x)`` reads one per
    sample, shaped to broadcast against ``x``."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError('betas must be a 1-D tensor of values in (0, 1]')
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = ac.sqrt(), (1 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod = (1 / ac).sqrt(), (1 / ac - 1).sqrt()
        self.posterior_variance = betas * (1 - ac_prev) / (1 - ac)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if len(pv) > 1 else \
            torch.log(betas)
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - ac_prev) * alphas.sqrt() / (1 - ac)
        self.log_betas = torch.log(betas)

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        table = getattr(self, name)
        values = table.to(t.device)[t.long()].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self.gather('sqrt_alphas_cumprod', t, x0) * x0
                + self.gather('sqrt_one_minus_alphas_cumprod', t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(mean, clipped log-variance) of q(x_{t-1} | x_t, x_0)."""
        mean = self.gather('posterior_mean_coef1', t, x_t) * x0 + self.gather('posterior_mean_coef2', t, x_t) * x_t
        return mean, self.gather('posterior_log_variance_clipped', t, x_t).expand_as(x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.gather('sqrt_recip_alphas_cumprod', t, x_t) * x_t - \
            self.gather('sqrt_recipm1_alphas_cumprod', t, x_t) * eps

    def learned_range_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        frac = (v + 1) / 2
        return frac * self.gather('log_betas', t, v) + (1 - frac) * self.gather('posterior_log_variance_clipped',
                                                                                 t, v)

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, learn_sigma: bool = True):
        """(mean, log-variance, x̂_0) of p(x_{t-1} | x_t) from a model output ``[ε̂, v]`` (or ``ε̂`` with the fixed
        large variance β_t, ADM's FIXED_LARGE, when ``learn_sigma`` is False)."""
        c = x_t.shape[1]
        eps = model_out[:, :c]
        if learn_sigma:
            log_var = self.learned_range_log_variance(model_out[:, c:2 * c], t)
        else:
            log_var = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]])).to(t.device)[t.long()]
            log_var = log_var.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1))).expand_as(x_t)
        x0 = self.predict_x0(x_t, t, eps)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0


def require_diffusers():
    """The ``diffusers`` module, or an ImportError that says how to get it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"vittt's diffusion samplers use diffusers, which is not installed ({e}); "
                          f"pip install 'vittt[gen]'") from e
    return diffusers


def make_scheduler(sampler: str, betas: Optional[torch.Tensor] = None, learn_sigma: bool = True):
    """A diffusers scheduler for a sampler preset, built from the training betas (default DiT's linear 1000), with
    ``set_timesteps`` already called. 'ddpm250' is the official sampler (learned range variance, no clipping,
    'linspace' spacing = ADM's respacing); DDIM uses 'trailing' spacing (diffusers' DDIM steps wrongly with
    'linspace'); DPM-Solver++ never gets a learned variance type (it would cut the output to 3 channels)."""
    import re

    diffusers = require_diffusers()
    DDIMScheduler, DDPMScheduler = diffusers.DDIMScheduler, diffusers.DDPMScheduler
    DPMSolverMultistepScheduler = diffusers.DPMSolverMultistepScheduler

    match = re.fullmatch(r'(ddpm|ddim|dpm\+\+)(\d+)', sampler)
    if not match or int(match.group(2)) < 1:
        raise ValueError(f'unknown sampler {sampler!r}; presets: {SAMPLERS} (ddpmN, ddimN, dpm++N for other N)')
    kind, steps = match.group(1), int(match.group(2))
    betas = linear_betas() if betas is None else torch.as_tensor(betas, dtype=torch.float64)
    if steps > len(betas):
        raise ValueError(f'{sampler}: {steps} sampling steps exceed the {len(betas)} training timesteps')
    common = dict(num_train_timesteps=len(betas), trained_betas=betas.tolist(), prediction_type='epsilon')
    if kind == 'ddpm':
        scheduler = DDPMScheduler(**common, variance_type='learned_range' if learn_sigma else 'fixed_large',
                                  clip_sample=False, timestep_spacing='linspace')
    elif kind == 'ddim':
        scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, timestep_spacing='trailing')
    else:
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type='dpmsolver++', solver_order=2,
                                                timestep_spacing='linspace')
    scheduler.set_timesteps(steps)
    return scheduler
