"""Gaussian diffusion for DiT / DiT³: float64 process tables, the hybrid loss, diffusers schedulers, CFG sampling.

Import ``vittt`` first (``import vittt.diffusion`` does): diffusers imports torchvision, which needs vittt's shim on
CPU-only torch.
"""
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, hybrid_loss, normal_kl
from .sampling import sample, to_uint8
from .schedule import SAMPLERS, GaussianTables, linear_betas, make_scheduler

__all__ = ['GaussianTables', 'linear_betas', 'make_scheduler', 'SAMPLERS', 'hybrid_loss', 'normal_kl',
           'approx_standard_normal_cdf', 'discretized_gaussian_log_likelihood', 'sample', 'to_uint8']
