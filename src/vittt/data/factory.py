"""Datasets and transforms by name: Fashion-MNIST, class-folder trees, and pass-through to timm.

``create_dataset`` accepts::

    'fashion-mnist' / 'fashion_mnist'        FashionMNIST; split 'train' -> train, 'val' / 'test' -> test
    a directory path                         ImageFolder of path/train or path/val (split 'train' / 'val')
    'timm:<name>'                            timm.data.create_dataset(<name>, root=..., split=...)
    'torch/...', 'hfds/...', 'hfids/...',    the same, for names with a timm dataset prefix
    'tfds/...', 'wds/...'

``create_transforms`` builds timm's train / eval pipelines from a plain ``recipe`` dict, preceded by a PIL mode
conversion so that grey images feed 3-channel models (and colour images 1-channel ones).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from PIL import Image, ImageOps
from torch.utils.data import Dataset, Subset

from .fashion_mnist import FashionMNIST
from .folder import ImageFolder

__all__ = ['create_dataset', 'num_classes_of', 'create_transforms', 'build_datasets', 'first_n', 'ToMode',
           'TRANSFORM_RECIPE_KEYS',
           'TIMM_DATASET_PREFIXES', 'GREY_DEFAULT_MEAN', 'GREY_DEFAULT_STD']

PathLike = Union[str, os.PathLike]

_FASHION_MNIST_NAMES = ('fashion-mnist', 'fashion_mnist')
_FASHION_MNIST_SPLITS = {'train': 'train', 'val': 'test', 'validation': 'test', 'test': 'test'}
_FOLDER_SPLITS = {'train': 'train', 'val': 'val', 'validation': 'val'}
TIMM_DATASET_PREFIXES = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')
_TIMM_EXPLICIT = 'timm:'

GREY_DEFAULT_MEAN = (0.5,)
GREY_DEFAULT_STD = (0.5,)

# recipe key -> timm.data.create_transform argument
_RECIPE_TO_TIMM = {
    'auto_augment': 'auto_augment',
    'color_jitter': 'color_jitter',
    'reprob': 're_prob',
    'remode': 're_mode',
    'recount': 're_count',
    'interpolation': 'interpolation',
    'crop_pct': 'crop_pct',
    'scale': 'scale',
    'hflip': 'hflip',
}
TRANSFORM_RECIPE_KEYS = tuple(_RECIPE_TO_TIMM)
_EVAL_KEYS = ('interpolation', 'crop_pct')
_NONE_MEANS_OFF = ('auto_augment', 'color_jitter')


def _accepted_names() -> str:
    return (f"{' / '.join(repr(n) for n in _FASHION_MNIST_NAMES)}, a directory holding train/ and val/ "
            f"class-folder trees, '{_TIMM_EXPLICIT}<timm dataset name>', or a timm dataset name starting with "
            f"{', '.join(repr(p) for p in TIMM_DATASET_PREFIXES)}")


def create_dataset(name_or_path: PathLike, split: str = 'train', transform: Optional[Callable] = None,
                   root: Optional[PathLike] = None, **timm_kwargs: Any) -> Dataset:
    """The ``split`` ('train' or 'val') of a dataset given by name or directory; see the module docstring.

    ``root`` is the data directory of a timm dataset (required for 'torch/...' names) or overrides the
    Fashion-MNIST directory; ``timm_kwargs`` (e.g. ``download=True``) go to ``timm.data.create_dataset`` only.
    Raises ``ValueError`` for an unknown name or split, ``FileNotFoundError`` for a missing directory.
    """
    name = os.fspath(name_or_path)
    lower = name.lower()
    timm_name = None
    if lower.startswith(_TIMM_EXPLICIT):
        timm_name = name[len(_TIMM_EXPLICIT):]
    elif lower.startswith(TIMM_DATASET_PREFIXES):
        timm_name = name
    if timm_name is not None:
        return _create_timm_dataset(timm_name, split, transform, root, timm_kwargs)
    if timm_kwargs:
        raise TypeError(f'create_dataset({name!r}): unexpected arguments {sorted(timm_kwargs)} (they are only '
                        f'accepted for timm datasets)')

    if lower in _FASHION_MNIST_NAMES:
        if split not in _FASHION_MNIST_SPLITS:
            raise ValueError(f"Fashion-MNIST split must be one of {list(_FASHION_MNIST_SPLITS)}, got {split!r}")
        return FashionMNIST(_FASHION_MNIST_SPLITS[split], root=root, transform=transform)

    path = Path(name).expanduser()
    if path.is_dir():
        if split not in _FOLDER_SPLITS:
            raise ValueError(f"split for a dataset directory must be one of {list(_FOLDER_SPLITS)}, got {split!r}")
        sub = path / _FOLDER_SPLITS[split]
        if not sub.is_dir():
            raise FileNotFoundError(f'dataset directory {path} has no {_FOLDER_SPLITS[split]}/ sub-folder '
                                    f'({sub} does not exist); expected {path}/{{train,val}}/<class>/<image>')
        return ImageFolder(sub, transform=transform)
    if path.exists():
        raise NotADirectoryError(f'dataset path {path} is not a directory; accepted: {_accepted_names()}')
    if os.sep in name or '/' in name or name.startswith(('.', '~')):
        raise FileNotFoundError(f'dataset directory {path} does not exist; accepted: {_accepted_names()}')
    raise ValueError(f'unknown dataset {name!r}; accepted: {_accepted_names()}')


def _create_timm_dataset(name: str, split: str, transform: Optional[Callable], root: Optional[PathLike],
                         kwargs: Dict[str, Any]) -> Dataset:
    from timm.data import create_dataset as timm_create_dataset

    if not name:
        raise ValueError(f"'{_TIMM_EXPLICIT}' must be followed by a timm dataset name, e.g. 'timm:torch/cifar10'")
    if root is None and name.lower().startswith('torch/'):
        raise ValueError(f'timm dataset {name!r} needs root= (the directory holding or receiving its files)')
    timm_split = 'validation' if split == 'val' else split
    kwargs.setdefault('is_training', split == 'train')
    return timm_create_dataset(name, root=None if root is None else os.fspath(root), split=timm_split,
                               transform=transform, **kwargs)


def num_classes_of(dataset: Any) -> int:
    """Number of classes (= logits needed) of a dataset: from ``classes``, ``class_to_idx`` (also a timm
    reader's), the wrapped dataset of a ``Subset`` / ``ConcatDataset``, or as a last resort ``max(targets) + 1``."""
    classes = getattr(dataset, 'classes', None)
    if isinstance(classes, Sequence) and not isinstance(classes, str) and len(classes):
        return len(classes)
    for owner in (dataset, getattr(dataset, 'reader', None)):
        class_to_idx = getattr(owner, 'class_to_idx', None)
        if isinstance(class_to_idx, Mapping) and class_to_idx:
            values = list(class_to_idx.values())
            if all(isinstance(v, int) for v in values):
                return max(values) + 1
            return len(class_to_idx)
    inner = getattr(dataset, 'dataset', None)
    if inner is not None and inner is not dataset:
        return num_classes_of(inner)
    parts = getattr(dataset, 'datasets', None)
    if isinstance(parts, Sequence) and parts:
        counts = {num_classes_of(d) for d in parts}
        if len(counts) != 1:
            raise ValueError(f'the datasets of this {type(dataset).__name__} disagree on the class count: '
                             f'{sorted(counts)}')
        return counts.pop()
    targets = getattr(dataset, 'targets', None)
    if targets is not None and len(targets):
        return int(max(int(t) for t in targets)) + 1
    raise TypeError(f'cannot tell the number of classes of a {type(dataset).__name__}: it has no classes, '
                    f'class_to_idx, reader.class_to_idx, wrapped dataset or targets')


class ToMode:
    """Convert a PIL image to ``mode`` ('RGB', 'L', ...) unless it already has it. Picklable."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f'ToMode({self.mode!r}) expects a PIL image, got {type(img).__name__}')
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.mode!r})'


def _posterize_safe(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize op, valid for 0 bits: Pillow >= 12 rejects ``bits=0`` that older Pillow turned black."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> None:
    """Swap timm's posterize for :func:`_posterize_safe` in the auto-augment ops of a Compose (in place).
    RandAugment with ``inc1`` and a magnitude reaching 10 asks for 0 bits, which Pillow >= 12 refuses."""
    from timm.data import auto_augment

    for t in getattr(transform, 'transforms', ()):
        ops = list(getattr(t, 'ops', ()))
        for sub_policy in getattr(t, 'policy', ()):
            ops += list(sub_policy)
        for op in ops:
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = _posterize_safe


def create_transforms(img_size: Union[int, Tuple[int, int]], in_chans: int, train: bool,
                      recipe: Optional[Mapping[str, Any]] = None, mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None) -> Callable[[Image.Image], Any]:
    """PIL image (any mode) -> normalized float tensor [in_chans, H, W] with (H, W) = ``img_size``.

    Train: ``ToMode`` -> timm RandomResizedCrop (``scale``, ``interpolation``) -> flip (``hflip``) ->
    RandAugment / AutoAugment (``auto_augment``, e.g. 'rand-m9-mstd0.5-inc1') or colour jitter (``color_jitter``)
    -> ToTensor + Normalize -> random erasing (``reprob``, ``remode``, ``recount``).
    Eval: ``ToMode`` -> resize the short side to ``img_size / crop_pct`` (default 0.875 = 224/256) -> centre crop
    -> ToTensor + Normalize.

    ``recipe`` keys are :data:`TRANSFORM_RECIPE_KEYS` (others raise ``ValueError``). A missing key, or None,
    takes timm's default (``interpolation`` 'bilinear', ``color_jitter`` 0.4, ``hflip`` 0.5, ``scale``
    (0.08, 1), no auto-augment, no erasing), except that ``color_jitter=None`` turns jitter off; ``auto_augment``
    'none' means None (timm skips colour jitter when auto-augment is on). The eval pipeline uses only
    ``interpolation`` and ``crop_pct``. ``mean`` / ``std`` default to ImageNet's for 3 channels and
    (0.5,) / (0.5,) for 1; their length must equal ``in_chans``.

    Besides, timm's posterize op is swapped for one that accepts 0 bits (RandAugment 'inc1' at magnitude 10 asks
    for that, and Pillow >= 12 raises on it).
    """
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    if in_chans not in (1, 3):
        raise ValueError(f'in_chans must be 1 (grey) or 3 (RGB), got {in_chans}')
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f'img_size must be a positive int or an (H, W) pair, got {img_size!r}')
    mean = tuple(float(m) for m in (mean if mean is not None else
                                    (IMAGENET_DEFAULT_MEAN if in_chans == 3 else GREY_DEFAULT_MEAN)))
    std = tuple(float(s) for s in (std if std is not None else
                                   (IMAGENET_DEFAULT_STD if in_chans == 3 else GREY_DEFAULT_STD)))
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f'mean and std need {in_chans} value(s) for in_chans={in_chans}, got mean={mean} std={std}')
    if any(s <= 0 for s in std):
        raise ValueError(f'std must be positive, got {std}')

    recipe = dict(recipe or {})
    unknown = sorted(set(recipe) - set(_RECIPE_TO_TIMM))
    if unknown:
        raise ValueError(f'unknown transform recipe key(s) {unknown}; accepted: {list(TRANSFORM_RECIPE_KEYS)}')
    crop_pct = recipe.get('crop_pct')
    if crop_pct is not None and not (0 < crop_pct <= 1 and math.isfinite(crop_pct)):
        raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
    if isinstance(recipe.get('auto_augment'), str) and recipe['auto_augment'].lower() in ('', 'none'):
        recipe['auto_augment'] = None
    if recipe.get('scale') is not None:
        recipe['scale'] = tuple(recipe['scale'])
        if len(recipe['scale']) != 2:
            raise ValueError(f"scale must be a (min, max) pair, got {recipe['scale']}")

    keys = TRANSFORM_RECIPE_KEYS if train else _EVAL_KEYS
    # None is meaningful (off) for auto_augment and color_jitter; for the other keys it means timm's default
    kwargs = {_RECIPE_TO_TIMM[k]: recipe[k] for k in keys
              if k in recipe and (recipe[k] is not None or k in _NONE_MEANS_OFF)}
    tf = create_transform(sizes, is_training=train, mean=mean, std=std, **kwargs)
    if train:
        _patch_posterize(tf)
    return transforms.Compose([ToMode('RGB' if in_chans == 3 else 'L'), *tf.transforms])


def first_n(dataset, n: Optional[int]):
    """The first ``n`` items of ``dataset`` (all of it when ``n`` is falsy or not smaller)."""
    return Subset(dataset, range(n)) if n and n < len(dataset) else dataset


def build_datasets(data: PathLike, recipe: Mapping[str, Any], train: bool = True):
    """``(train_set or None, val_set, num_classes)`` for a training recipe: its ``img_size``, ``in_chans`` and the
    augmentation keys in :data:`TRANSFORM_RECIPE_KEYS` (other recipe keys are ignored)."""
    augment = {k: recipe[k] for k in TRANSFORM_RECIPE_KEYS if k in recipe}
    eval_tf = create_transforms(recipe['img_size'], recipe['in_chans'], train=False, recipe=augment)
    val_set = create_dataset(data, 'val', eval_tf)
    if not train:
        return None, val_set, num_classes_of(val_set)
    train_tf = create_transforms(recipe['img_size'], recipe['in_chans'], train=True, recipe=augment)
    train_set = create_dataset(data, 'train', train_tf)
    return train_set, val_set, num_classes_of(train_set)
