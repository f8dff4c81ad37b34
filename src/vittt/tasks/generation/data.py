"""Datasets for generation: ``(image in [-1, 1] [C, S, S], label)``.

* ``fashion-mnist``: the bundled 28×28 grey images zero-padded to 32×32 (the background is 0, so nothing is blurred;
  ``image_size`` other than 32 resizes after padding), random horizontal flips for training; val = the test split.
* a folder with ``train/`` (and optionally ``val/``) class folders: the ADM centre crop of the official code (box
  downsampling while the image is at least twice the target, bicubic resize of the short side, centre crop), flips,
  RGB.
* a latent cache folder (``vittt generate cache``, :mod:`.latents`): the posterior parameters of the encoded images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ['build_generation_datasets', 'adm_center_crop', 'ToSignedTensor']


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM / DiT's centre crop to ``size × size``."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


class ToSignedTensor:
    """PIL (any mode) -> float tensor ``[C, H, W]`` in [-1, 1], with a random horizontal flip (torch RNG)."""

    def __init__(self, mode: str, size: int, pad_to: Optional[int] = None, hflip: float = 0.0, crop: bool = False):
        self.mode, self.size, self.pad_to, self.hflip, self.crop = mode, size, pad_to, hflip, crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert(self.mode)
        if self.crop:
            image = adm_center_crop(image, self.size)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        x = x.float() / 127.5 - 1.0
        if self.pad_to:
            h, w = x.shape[-2:]
            top, left = (self.pad_to - h) // 2, (self.pad_to - w) // 2
            x = torch.nn.functional.pad(x, (left, self.pad_to - w - left, top, self.pad_to - h - top), value=-1.0)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x[None], size=(self.size, self.size), mode='bilinear',
                                                align_corners=False)[0]
        if self.hflip and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        return x


def build_generation_datasets(data, recipe: Dict[str, Any]) -> Tuple[Dataset, Optional[Dataset], int, int]:
    """``(train_set, val_set or None, channels, num_classes)``."""
    from ...data import FashionMNIST, ImageFolder, num_classes_of

    from .latents import cache_datasets, is_latent_cache

    name = os.fspath(data)
    size = recipe['image_size']
    if is_latent_cache(name):  # posterior parameters written by `vittt generate cache`
        return cache_datasets(name, recipe)
    if name.lower() in ('fashion-mnist', 'fashion_mnist'):
        train = FashionMNIST('train', transform=ToSignedTensor('L', size, pad_to=32, hflip=recipe['hflip']))
        val = FashionMNIST('test', transform=ToSignedTensor('L', size, pad_to=32))
        return train, val, 1, 10
    root = Path(name).expanduser()
    if not (root / 'train').is_dir():
        raise FileNotFoundError(f'{root}: expected a folder with train/ (and optionally val/) class folders, a '
                                f"latent cache (cache.json), or 'fashion-mnist'")
    train = ImageFolder(root / 'train', transform=ToSignedTensor('RGB', size, hflip=recipe['hflip'], crop=True))
    val = ImageFolder(root / 'val', transform=ToSignedTensor('RGB', size, crop=True)) if (root / 'val').is_dir() \
        else None
    return train, val, 3, num_classes_of(train)
