"""What the explain tools share: models by name (and checkpoint), images (a dataset's or noise), the patch / stride
of a model, features as an ``NCHW`` map, gradient-mass spread numbers, JSON output."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['as_pair', 'model_patch_size', 'model_stride', 'features_as_map', 'token_grid', 'mass_fraction',
           'centred_square', 'eval_mode', 'check_model_names', 'load_model', 'load_images', 'write_json', 'batches',
           'NOISE']

NOISE = 'noise'


def as_pair(size) -> Tuple[int, int]:
    """``16`` -> ``(16, 16)``; ``(16, 8)`` / ``[16, 8]`` -> ``(16, 8)``."""
    if isinstance(size, int):
        return size, size
    pair = tuple(int(s) for s in size)
    if len(pair) != 2:
        raise ValueError(f'a size must be an int or an (H, W) pair, got {size!r}')
    return pair


def model_patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The patch ``(ph, pw)`` of a patch-embedding model: ``model.patch_embed.patch_size`` (timm ViTs, vittt
    ViT³ / Vision-TTT) or ``model.patch_size``; None for models without one (convnets, H-ViT³'s conv stem)."""
    for owner in (getattr(model, 'patch_embed', None), model):
        size = getattr(owner, 'patch_size', None) if owner is not None else None
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2):
            return as_pair(size)
    return None


def model_stride(model: nn.Module, image_size: Optional[Tuple[int, int]] = None,
                 in_chans: int = 3) -> Tuple[int, int]:
    """The input pixels per token / feature-map cell of ``model``: its patch size if it has one, else the
    reduction of its last ``feature_info`` entry (timm, H-ViT³), else measured from one ``forward_features``
    call on zeros of ``image_size`` (a ``[1, in_chans, H, W]`` batch). Raises ``ValueError`` when none applies."""
    patch = model_patch_size(model)
    if patch is not None:
        return patch
    info = getattr(model, 'feature_info', None)
    if isinstance(info, (list, tuple)) and info and isinstance(info[-1], dict) and info[-1].get('reduction'):
        return as_pair(int(info[-1]['reduction']))
    if hasattr(model, 'forward_features') and image_size is not None:
        h, w = image_size
        with torch.no_grad(), eval_mode(model):
            fmap = features_as_map(model, model.forward_features(torch.zeros(1, in_chans, h, w)), (h, w))
        return max(1, round(h / fmap.shape[-2])), max(1, round(w / fmap.shape[-1]))
    raise ValueError(f'cannot tell the patch / stride of a {type(model).__name__}: it has no patch_embed.patch_size, '
                     f'patch_size, feature_info or forward_features; pass patch_size=')


def token_grid(model: nn.Module, num_tokens: int, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """The ``(h, w)`` grid of ``num_tokens`` patch tokens (prefix tokens already dropped) of an ``image_size``
    input: from the patch size (``ceil`` for models that pad, ``floor`` for models that crop), else the square
    root when ``num_tokens`` is a square."""
    h, w = image_size
    patch = model_patch_size(model)
    if patch is not None:
        ph, pw = patch
        for grid in ((-(-h // ph), -(-w // pw)), (h // ph, w // pw)):
            if grid[0] * grid[1] == num_tokens:
                return grid
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    raise ValueError(f'cannot arrange {num_tokens} tokens of a {type(model).__name__} on a grid for a {h}×{w} input '
                     f'(patch size {patch})')


def features_as_map(model: nn.Module, features: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """``forward_features`` output -> ``[B, C, h, w]``.

    ``[B, C, h, w]`` (convnets, ViT³, H-ViT³) is returned as is; ``[B, h, w, C]`` (timm models whose ``output_fmt``
    is 'NHWC', e.g. Swin) is permuted; ``[B, P + h·w, C]`` tokens (timm ViTs, Vision-TTT) lose their
    ``model.num_prefix_tokens`` class / register tokens and are laid on the patch grid (:func:`token_grid`)."""
    if isinstance(features, (list, tuple)):
        features = features[-1]
    if features.ndim == 4:
        fmt = getattr(model, 'output_fmt', None)
        fmt = getattr(fmt, 'value', fmt)  # timm's Format enum or a plain string
        channels = getattr(model, 'num_features', None)
        nhwc = fmt == 'NHWC' or (fmt is None and channels is not None and features.shape[-1] == channels
                                 and features.shape[1] != channels)
        return features.permute(0, 3, 1, 2) if nhwc else features
    if features.ndim == 3:
        prefix = int(getattr(model, 'num_prefix_tokens', 0) or 0)
        tokens = features[:, prefix:]
        gh, gw = token_grid(model, tokens.shape[1], image_size)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)
    raise ValueError(f'{type(model).__name__} returned features of shape {tuple(features.shape)}: neither a map '
                     f'[B, C, h, w] / [B, h, w, C] nor tokens [B, L, C], so there is no spatial position to explain')


def mass_fraction(values: torch.Tensor, share: float) -> Optional[float]:
    """The smallest fraction of the entries of ``values`` (any shape, non-negative) holding ``share`` of their
    sum: entries sorted by descending value, the count reaching the share, over the number of entries. In (0, 1];
    None when the sum is 0."""
    flat = values.detach().reshape(-1).double()
    total = float(flat.sum())
    if not total > 0:
        return None
    cumulative = torch.sort(flat, descending=True).values.cumsum(0)
    count = int(torch.searchsorted(cumulative, torch.tensor([share * total], dtype=torch.float64))[0]) + 1
    return min(count, flat.numel()) / flat.numel()


def centred_square(values: torch.Tensor, share: float,
                   centre: Optional[Tuple[int, int]] = None) -> Tuple[Optional[int], Optional[float]]:
    """``(side, area ratio)`` of the smallest square centred at ``centre`` (default ``(H // 2, W // 2)``) of an
    ``[H, W]`` map whose pixels hold ``share`` of the map's sum (sides 1, 3, 5, ..., clipped at the border); the
    ratio is the clipped square's pixel count over ``H·W``. RepLKNet's "high-contribution area ratio". (None, None)
    when the sum is 0."""
    h, w = values.shape
    ci, cj = centre if centre is not None else (h // 2, w // 2)
    data = values.detach().double()
    total = float(data.sum())
    if not total > 0:
        return None, None
    for radius in range(max(h, w) + 1):
        top, left = max(ci - radius, 0), max(cj - radius, 0)
        window = data[top:ci + radius + 1, left:cj + radius + 1]
        if float(window.sum()) >= share * total * (1 - 1e-12):
            return 2 * radius + 1, window.numel() / (h * w)
    return 2 * max(h, w) + 1, 1.0  # not reached: the last window is the whole map


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout / drop-path, BatchNorm on running statistics) for the block; the previous
    train / eval flags of all submodules are restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def check_model_names(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first of ``names`` that is no registered timm / vittt model."""
    import timm

    for name in names:
        if not timm.is_model(name):
            close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
            raise ValueError(f'unknown model {name!r} (not a timm or vittt model name)'
                             + (f'; similar names: {", ".join(close)}' if close else ''))


def load_model(name: str, checkpoint=None, img_size: Optional[int] = None, num_classes: int = 1000,
               model_kwargs: Optional[dict] = None) -> Tuple[nn.Module, int, int]:
    """``(model in eval mode, in_chans, img_size)`` for a timm / vittt model name, randomly initialised (no download)
    or with ``checkpoint``'s weights (an engine training checkpoint, an official ``.pth`` or a converted
    ``.safetensors``, see :func:`vittt.engine.load_model_weights`). ``img_size`` defaults to the
    checkpoint's training size, else 224; ``model_kwargs`` (e.g. design switches) go to ``timm.create_model`` of a
    model without checkpoint. Raises ``ValueError`` for an unknown name."""
    import timm

    check_model_names([name])
    if checkpoint is not None:
        from ...engine import load_model_weights

        model, in_chans, size = load_model_weights(name, checkpoint, img_size=img_size)
        return model.eval(), int(in_chans), int(size)
    size = img_size or 224
    try:  # models with a nominal size (timm ViTs: position embeddings) are built for the size asked for
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=size,
                                  **(model_kwargs or {}))
    except TypeError as e:  # convnets take no img_size
        if 'img_size' not in str(e):
            raise
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
    return model.eval(), int(getattr(model, 'in_chans', 3) or 3), size


def load_images(data: str, count: int, img_size: int, in_chans: int = 3, seed: int = 0
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[List[str]]]:
    """``(images [count, in_chans, img_size, img_size], labels [count] or None, class names or None)``.

    ``data='noise'``: standard-normal images from ``seed``. Otherwise a dataset of :func:`vittt.data.build_datasets`
    ('fashion-mnist', a class-folder tree, ...): ``count`` images of its validation split drawn without replacement
    with ``seed``, through the evaluation transform of ``vittt eval`` (grey repeated to RGB for 3-channel models,
    resize + centre crop to ``img_size``, normalised)."""
    if count < 1:
        raise ValueError(f'the number of images must be at least 1, got {count}')
    generator = torch.Generator().manual_seed(seed)
    if data == NOISE:
        return torch.randn(count, in_chans, img_size, img_size, generator=generator), None, None
    from ...data import build_datasets
    from ...engine import load_recipe

    recipe = load_recipe(None, dict(img_size=img_size, in_chans=in_chans))
    _, dataset, _ = build_datasets(data, recipe, train=False)
    if len(dataset) == 0:
        raise ValueError(f'the dataset {data!r} has no validation images')
    picked = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    samples = [dataset[i] for i in picked]
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples])
    classes = getattr(dataset, 'classes', None)
    return images, labels, list(classes) if classes else None


def write_json(path, payload: Any) -> Path:
    """``payload`` as indented JSON, written atomically."""
    from ...io import atomic_write

    text = json.dumps(payload, indent=2) + '\n'
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def batches(images: torch.Tensor, batch_size: int) -> Sequence[torch.Tensor]:
    """``images`` split into chunks of at most ``batch_size`` along the first dimension."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    return images.split(batch_size)

