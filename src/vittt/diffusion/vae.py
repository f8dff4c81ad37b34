"""The latent path: a diffusers ``AutoencoderKL`` read only from a local folder, encoding and decoding with its scale.

DiT and DiT³ train in the SD-VAE latent space (``stabilityai/sd-vae-ft-mse`` / ``-ema``, scale 0.18215): images in
[-1, 1] -> ``latent_dist.sample() × scale`` (the official training behaviour; ``.mode()`` optional) -> the model;
samples ``/ scale`` -> ``decode``. Nothing is downloaded: the user gives the folder ``save_pretrained`` wrote
(``config.json`` + weights). Grey images are repeated to the VAE's input channels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ['load_vae', 'encode', 'encode_moments', 'sample_moments', 'decode', 'latent_scale', 'vae_fingerprint']


def load_vae(path, device='cpu'):
    """``AutoencoderKL`` from a local folder (eval mode, no gradients). A hub id or a missing folder is an error that
    says what to pass."""
    from .schedule import require_diffusers

    folder = Path(os.fspath(path)).expanduser()
    if not folder.is_dir():
        hint = ('it looks like a Hugging Face hub id; vittt downloads nothing at run time: on a machine with internet, '
                f'run `AutoencoderKL.from_pretrained("{path}").save_pretrained("sd-vae")`, copy that folder here and '
                'pass its path' if '/' in str(path) and not str(path).startswith(('.', '/', '~')) else
                'pass the folder written by AutoencoderKL.save_pretrained (config.json + weights)')
        raise FileNotFoundError(f'VAE folder not found: {path}: {hint}')
    if not (folder / 'config.json').is_file():
        raise FileNotFoundError(f'{folder} has no config.json: pass the folder written by '
                                f'AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)')
    vae = require_diffusers().AutoencoderKL.from_pretrained(str(folder), local_files_only=True,
                                                            low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


def latent_scale(vae, override: Optional[float] = None) -> float:
    """The latent scale: ``override``, else the VAE config's ``scaling_factor`` (0.18215 for the SD VAEs)."""
    return float(override if override is not None else getattr(vae.config, 'scaling_factor', 0.18215))


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in [-1, 1] (grey repeated to the VAE's channels) -> the posterior's parameters
    ``[B, 2 × latent channels, h, w]`` (mean, then log-variance: what a latent cache stores)."""
    want = vae.config.in_channels
    if images.shape[1] != want:
        if images.shape[1] != 1:
            raise ValueError(f'the VAE takes {want}-channel images, got {images.shape[1]} channels')
        images = images.expand(-1, want, -1, -1)
    return vae.encode(images.to(vae.dtype)).latent_dist.parameters


def sample_moments(moments: torch.Tensor, scale: float, generator: Optional[torch.Generator] = None,
                   mode: bool = False) -> torch.Tensor:
    """Scaled latents from posterior parameters (diffusers' ``DiagonalGaussianDistribution``: the same draw as
    encoding the image with the same generator)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(moments)
    return (dist.mode() if mode else dist.sample(generator=generator)) * scale


@torch.no_grad()
def encode(vae, images: torch.Tensor, scale: float, generator: Optional[torch.Generator] = None,
           mode: bool = False) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in [-1, 1] (grey repeated to the VAE's channels) -> scaled latents; a sample of the
    posterior (drawn from ``generator``) unless ``mode``."""
    return sample_moments(encode_moments(vae, images), scale, generator, mode)


def vae_fingerprint(vae) -> str:
    """SHA-256 (12 hex digits) of the VAE's weights: a latent cache is only valid for the VAE that wrote it."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents -> images in (about) [-1, 1]."""
    return vae.decode(latents.to(vae.dtype) / scale).sample
