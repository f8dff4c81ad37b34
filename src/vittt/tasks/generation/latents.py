"""An optional latent cache: a dataset encoded once by the VAE, so latent-space training skips the encoder.

``write_latent_cache`` runs the VAE encoder over a generation dataset (the ADM centre crop, no random flip) and stores
the posterior's parameters (mean and log-variance, ``[N, F, 2 × latent channels, h, w]``; F = 2 holds the image and
its horizontal mirror, each encoded, because a flipped image's latent is not the flipped latent), the labels and a
``cache.json`` naming the VAE by a hash of its weights. Training on the folder draws the flip from the same per-sample
RNG as the image path and the posterior sample from the same per-update generator, so a run on the cache is the run
on the images (to the VAE encoder's rounding: the cache encodes other batches than training does).

Layout: ``{split}_moments.npy`` (memory-mapped on read), ``{split}_labels.npy`` for the splits ``train`` (and
``val``), ``cache.json``. Every file is written under a temporary name and renamed; ``cache.json`` comes last, so a
folder without it is an interrupted write (run the command again).
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ['CACHE_FORMAT', 'LatentCache', 'is_latent_cache', 'write_latent_cache', 'check_cache_vae']

CACHE_FORMAT = 'vittt-latents-1'
_META = 'cache.json'


def is_latent_cache(folder) -> bool:
    return (Path(os.fspath(folder)).expanduser() / _META).is_file()


class LatentCache(Dataset):
    """``(posterior parameters [2 × latent channels, h, w] float32, label)`` of one split; with ``hflip`` the
    mirrored image's parameters with that probability (the same ``torch.rand`` draw as the image transform)."""

    def __init__(self, folder, split: str = 'train', hflip: float = 0.0):
        self.folder = Path(os.fspath(folder)).expanduser()
        self.meta = json.loads((self.folder / _META).read_text())
        if self.meta.get('format') != CACHE_FORMAT:
            raise ValueError(f'{self.folder}: not a {CACHE_FORMAT} latent cache (format {self.meta.get("format")!r})')
        if split not in self.meta['splits']:
            raise FileNotFoundError(f'{self.folder}: the cache has no {split!r} split ({list(self.meta["splits"])})')
        if hflip and not self.meta['flips']:
            raise ValueError(f'{self.folder} was written with --no-flip: train on it with hflip=0')
        self.moments = np.load(self.folder / f'{split}_moments.npy', mmap_mode='r')
        self.labels = np.load(self.folder / f'{split}_labels.npy')
        self.hflip = hflip
        self.classes = self.meta['classes']

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        flip = bool(self.hflip and torch.rand(()) < self.hflip)
        moments = np.array(self.moments[index, int(flip)], dtype=np.float32)
        return torch.from_numpy(moments), int(self.labels[index])


def check_cache_vae(cache: LatentCache, vae) -> None:
    """Refuse a cache written by another VAE (or training on one without a VAE to decode samples)."""
    from ...diffusion.vae import vae_fingerprint

    if vae is None:
        raise ValueError(f'{cache.folder} is a latent cache: train with vae=<the VAE folder that wrote it> '
                         f'({cache.meta["vae"]}), needed to decode the sample grids')
    if vae_fingerprint(vae) != cache.meta['vae_sha256']:
        raise ValueError(f'{cache.folder} was written by another VAE ({cache.meta["vae"]}, weights '
                         f'{cache.meta["vae_sha256"]}); this one hashes to {vae_fingerprint(vae)}')


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, 'wb') as f:  # np.save(str) would append '.npy' to the temporary name
        np.save(f, array)


@torch.no_grad()
def _encode_into(path: str, vae, loader, shape, dtype: str, labels: np.ndarray, device) -> None:
    """Posterior parameters of every batch (and of its mirror when ``shape[1] == 2``) into a new ``.npy`` memory
    map at ``path``; the labels into ``labels``."""
    from ...diffusion.vae import encode_moments

    moments = np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape)
    start = 0
    for images, targets in loader:
        images = images.to(device)
        end = start + len(images)
        moments[start:end, 0] = encode_moments(vae, images).float().cpu().numpy()
        if shape[1] == 2:
            moments[start:end, 1] = encode_moments(vae, images.flip(-1)).float().cpu().numpy()
        labels[start:end] = targets.numpy()
        start = end
    moments.flush()


@torch.no_grad()
def write_latent_cache(vae_path, data, output, image_size: int = 256, batch_size: int = 32, flips: bool = True,
                       dtype: str = 'float32', device='cpu', progress: bool = True) -> Dict[str, Any]:
    """Encode ``data`` (a generation dataset: 'fashion-mnist' or an image folder with train/ (val/)) with the VAE
    in ``vae_path``; writes the cache into ``output`` and returns its ``cache.json`` contents."""
    from torch.utils.data import DataLoader

    from ...diffusion.vae import load_vae, vae_fingerprint
    from ...io import atomic_write
    from .data import build_generation_datasets

    if dtype not in ('float32', 'float16'):
        raise ValueError(f'dtype must be float32 or float16, got {dtype!r}')
    vae = load_vae(vae_path, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f'image_size {image_size} is not divisible by the VAE downsampling factor {factor}')
    train, val, channels, num_classes = build_generation_datasets(data, dict(image_size=image_size, hflip=0.0))
    output = Path(os.fspath(output)).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    (output / _META).unlink(missing_ok=True)  # the folder is incomplete until the new cache.json is written
    side = image_size // factor
    splits = {}
    for split, dataset in (('train', train), ('val', val)):
        if dataset is None:
            continue
        n = len(dataset)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        if progress:
            from tqdm import tqdm
            loader = tqdm(loader, desc=f'encoding {split}', leave=False)
        labels = np.empty(n, dtype=np.int64)
        shape = (n, 2 if flips else 1, 2 * vae.config.latent_channels, side, side)
        atomic_write(output / f'{split}_moments.npy',
                     partial(_encode_into, vae=vae, loader=loader, shape=shape, dtype=dtype, labels=labels,
                             device=device))
        atomic_write(output / f'{split}_labels.npy', partial(_save_npy, array=labels))
        splits[split] = n
    classes = getattr(train, 'classes', None) or [str(c) for c in range(num_classes)]
    meta = dict(format=CACHE_FORMAT, vae=str(Path(os.fspath(vae_path)).expanduser().resolve()),
                vae_sha256=vae_fingerprint(vae), image_size=image_size, image_channels=channels,
                latent_channels=vae.config.latent_channels, latent_side=side, flips=flips, dtype=dtype,
                splits=splits, num_classes=num_classes, classes=list(classes), data=str(data))
    atomic_write(output / _META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + '\n'))
    return meta


def cache_datasets(folder, recipe: Dict[str, Any]):
    """``(train, val or None, image channels, classes)`` of a latent cache (what build_generation_datasets
    returns for a cache folder); the recipe's image_size must be the cache's."""
    train = LatentCache(folder, 'train', hflip=recipe['hflip'])
    if recipe['image_size'] != train.meta['image_size']:
        raise ValueError(f'{train.folder} holds latents of {train.meta["image_size"]}² images; the recipe asks for '
                         f'image_size={recipe["image_size"]}')
    val: Optional[LatentCache] = LatentCache(folder, 'val') if 'val' in train.meta['splits'] else None
    return train, val, train.meta['image_channels'], train.meta['num_classes']
