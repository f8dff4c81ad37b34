"""Sampling a class-conditional DiT / DiT³ with a diffusers scheduler, with classifier-free guidance.

* CFG doubles the batch: the same x_t with the labels and with the null label (``model.num_classes``, never a
  hard-coded 1000); ``model.forward_with_cfg`` mixes ε on ``guided_channels`` (default all noise channels). No
  doubled batch when ``cfg_scale == 1``.
* The learned σ goes to ``DDPMScheduler`` (variance type 'learned_range'); DDIM and DPM-Solver get ε only.
* Every random draw (x_T and each step's noise) comes from ``generator``; timesteps reach the model on the original
  0..T-1 scale; any latent shape (non-square included).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ['sample', 'to_uint8']


def _takes_variance(scheduler) -> bool:
    return getattr(scheduler.config, 'variance_type', None) in ('learned', 'learned_range')


@torch.no_grad()
def sample(model, scheduler, labels, shape: Sequence[int], cfg_scale: float = 1.0,
           guided_channels: Optional[int] = None, generator: Optional[torch.Generator] = None,
           x_T: Optional[torch.Tensor] = None, progress: bool = False) -> torch.Tensor:
    """x_0 samples ``[len(labels), C, H, W]`` in model space (latents, or pixels in [-1, 1]); ``shape`` is
    ``(C, H, W)``.
    ``scheduler`` comes from :func:`vittt.diffusion.make_scheduler` (``set_timesteps`` already called)."""
    from .schedule import require_diffusers

    if isinstance(scheduler, require_diffusers().DPMSolverMultistepScheduler) and _takes_variance(scheduler):
        raise ValueError('DPMSolverMultistepScheduler with a learned variance type cuts the model output to 3 '
                         'channels; build it without variance_type (make_scheduler does)')
    if cfg_scale < 1:
        raise ValueError(f'cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}')
    device = next(model.parameters()).device
    if getattr(scheduler, 'num_inference_steps', None) is None:
        raise ValueError('call scheduler.set_timesteps(n) first (make_scheduler does)')
    scheduler.set_timesteps(scheduler.num_inference_steps)  # multistep schedulers keep state: start afresh
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    n, c = len(labels), shape[0]
    if x_T is None:
        x_T = torch.randn((n, *shape), generator=generator, device=generator.device if generator else 'cpu')
    x = x_T.to(device) * scheduler.init_noise_sigma
    guided = cfg_scale != 1
    null = torch.full_like(labels, model.num_classes)
    steps = scheduler.timesteps
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc='sampling', leave=False)
    was_training = model.training
    model.eval()
    try:
        for t in steps:
            x_in = scheduler.scale_model_input(x, t)
            tt = torch.full((n,), int(t), device=device)
            if guided:
                out = model.forward_with_cfg(torch.cat([x_in, x_in]), torch.cat([tt, tt]),
                                             torch.cat([labels, null]), cfg_scale, guided_channels)[:n]
            else:
                out = model(x_in, tt, labels)
            if not _takes_variance(scheduler):
                out = out[:, :c]
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    finally:
        model.train(was_training)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images ``[B, C, H, W]`` -> uint8 with DiT's quantisation ``clamp(127.5 x + 128, 0, 255)``."""
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)
