"""Readers for detection / instance segmentation (COCO json) and semantic segmentation (PNG label maps).

:class:`CocoInstances` reads either layout, whichever ``root`` holds::

    root/annotations/instances_{split}.json + root/images/{split}/...       vittt data make-dense output
    root/annotations/instances_{split}2017.json + root/{split}2017/...      COCO 2017

(or any json and image folder given as ``ann_file`` / ``img_dir``) and returns torchvision detection targets:
``boxes`` float32 [N, 4] as (x1, y1, x2, y2) pixel coordinates with x2 = x + w (the COCO convention), ``labels``
int64 [N] in 1..K (category ids mapped to contiguous labels, 0 being the background; ``label_to_cat_id`` maps
back), ``masks`` uint8 [N, H, W] decoded from RLE or polygons, ``image_id`` and ``orig_size``. Crowd annotations
(``iscrowd=1``) and boxes without area inside the image are left out of the targets.

:class:`SemanticMaps` reads::

    root/images/{train,val}/*.png + root/semantic/{train,val}/*.png                         make-dense output
    root/images/{training,validation}/*.jpg + root/annotations/{training,validation}/*.png  ADE20K (ADEChallenge)

and returns ``(image, label)`` with label int64 [H, W], 255 = ignore. ADE20K labels are reduced by default
(``reduce_zero_label``: 0 -> 255, k -> k - 1, 150 classes), as in the official recipes.

Images are decoded with PIL and converted to RGB: float32 [3, H, W] in [0, 1]. With ``train=True`` an image
and its targets are flipped horizontally with probability ``hflip``, drawn with ``torch.rand`` (seed torch per
sample for reproducible loading). pycocotools is needed for :class:`CocoInstances` (the ``vittt[dense]`` extra).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .dense_synth import DENSE_MARKER, _read_json, is_dense_dataset
from .folder import DatasetLayoutError, pil_rgb_loader

__all__ = ['CocoInstances', 'SemanticMaps', 'dense_collate', 'load_coco', 'PYCOCOTOOLS_HINT']

PathLike = Union[str, os.PathLike]

PYCOCOTOOLS_HINT = "pip install 'vittt[dense]' (or pip install pycocotools)"
_MAKE_DENSE_HINT = 'generate the offline dataset with: vittt data make-dense --out DIR'
_ADE_SPLITS = {'train': 'training', 'training': 'training', 'val': 'validation', 'validation': 'validation'}
_ADE_NUM_CLASSES = 150


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
    except ImportError as e:
        raise ImportError(f'COCO annotations are read with pycocotools: {PYCOCOTOOLS_HINT}') from e
    return COCO, mask_utils


def load_coco(ann_file: PathLike):
    """A ``pycocotools.coco.COCO`` of ``ann_file``, without pycocotools' prints; a missing file names itself."""
    COCO, _ = _pycocotools()
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f'COCO annotation file {ann_file} does not exist')
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(os.fspath(ann_file))


def _ann_to_mask(coco, ann) -> np.ndarray:
    """``coco.annToMask(ann)`` without pycocotools 2.0.11's NumPy-2 DeprecationWarning (one per mask decoded)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return coco.annToMask(ann)


def _image_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


def _check_complete(root: Path) -> None:
    if (root / DENSE_MARKER).is_file() and not (root / 'meta.json').is_file():
        raise DatasetLayoutError(f'{root} is an incomplete make-dense output (no meta.json: the generation was '
                                 f'interrupted); run vittt data make-dense --out {root} again')


def dense_collate(batch: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[List[torch.Tensor], List[Any]]:
    """Collate ``(image, target)`` pairs into ``(list of images, list of targets)``, as torchvision detectors take."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def _coco_layout(root: Optional[Path], split: str, ann_file: Optional[PathLike],
                 img_dir: Optional[PathLike]) -> Tuple[str, Path, Path]:
    if ann_file is not None:
        ann_file = Path(ann_file).expanduser()
        base = Path(img_dir).expanduser() if img_dir is not None else (root or ann_file.parent.parent)
        return 'custom', ann_file, base
    if root is None:
        raise ValueError('CocoInstances needs root, or ann_file (and img_dir)')
    ours = root / 'annotations' / f'instances_{split}.json'
    year = split if split.endswith('2017') else f'{split}2017'
    coco = root / 'annotations' / f'instances_{year}.json'
    layouts = (f'{ours} with images under {root}/images/{split}/ (vittt data make-dense), or {coco} with images '
               f'under {root}/{year}/ (COCO 2017)')
    if not root.exists():
        raise FileNotFoundError(f'dataset folder {root} does not exist; expected {layouts}; {_MAKE_DENSE_HINT}')
    if ours.is_file() or is_dense_dataset(root):
        _check_complete(root)
        if not ours.is_file():
            raise DatasetLayoutError(f'{ours} does not exist (the dataset has no {split!r} split)')
        return 'vittt', ours, Path(img_dir).expanduser() if img_dir is not None else root
    if coco.is_file():
        return 'coco', coco, Path(img_dir).expanduser() if img_dir is not None else root / year
    raise DatasetLayoutError(f'{root} holds no COCO annotations for split {split!r}: expected {layouts}; '
                             f'{_MAKE_DENSE_HINT}')


class CocoInstances(Dataset):
    """COCO-format instances as ``(image float32 [3, H, W], target dict)``; see the module docstring.

    Attributes: ``coco`` (the ``pycocotools.coco.COCO``, reusable as the evaluation ground truth), ``ann_file``,
    ``img_dir``, ``layout`` ('vittt', 'coco' or 'custom'), ``image_ids`` (in file order), ``cat_ids`` (sorted),
    ``label_to_cat_id`` / ``cat_id_to_label`` (dicts), ``num_classes`` (K, without background) and
    ``class_names`` (K names in label order).
    """

    def __init__(self, root: Optional[PathLike], split: str = 'train', train: bool = False, hflip: float = 0.5,
                 ann_file: Optional[PathLike] = None, img_dir: Optional[PathLike] = None) -> None:
        self.root = None if root is None else Path(root).expanduser()
        self.split = split
        self.train = bool(train)
        self.hflip = float(hflip)
        self.layout, self.ann_file, self.img_dir = _coco_layout(self.root, split, ann_file, img_dir)
        self.coco = load_coco(self.ann_file)
        self.cat_ids = sorted(int(c) for c in self.coco.cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]['name'] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self.image_ids = [int(img['id']) for img in self.coco.dataset.get('images', [])]
        unknown = sorted({int(a['category_id']) for a in self.coco.anns.values()} - set(self.cat_ids))
        if unknown:
            raise DatasetLayoutError(f'{self.ann_file}: annotations use category ids {unknown[:10]} that are not '
                                     f'listed in "categories"')

    collate = staticmethod(dense_collate)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.img_dir / info['file_name']
        img = pil_rgb_loader(path)
        w, h = img.size
        if (info.get('width', w), info.get('height', h)) != (w, h):
            raise DatasetLayoutError(f'{path} is {w}x{h} but {self.ann_file} says {info["width"]}x{info["height"]}')
        image = _image_tensor(img)
        boxes, labels, masks, areas = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get('iscrowd', 0):
                continue
            x, y, bw, bh = (float(v) for v in ann['bbox'])
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            if x2 <= x1 or y2 <= y1:
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self.cat_id_to_label[int(ann['category_id'])])
            masks.append(_ann_to_mask(self.coco, ann) if 'segmentation' in ann else np.zeros((h, w), np.uint8))
            areas.append(float(ann.get('area', (x2 - x1) * (y2 - y1))))
        target = {
            'boxes': torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            'labels': torch.tensor(labels, dtype=torch.int64),
            'masks': torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks
            else torch.zeros((0, h, w), dtype=torch.uint8),
            'image_id': torch.tensor(image_id, dtype=torch.int64),
            'area': torch.tensor(areas, dtype=torch.float32),
            'iscrowd': torch.zeros(len(boxes), dtype=torch.int64),
            'orig_size': torch.tensor([h, w], dtype=torch.int64),
        }
        if self.train and torch.rand(()).item() < self.hflip:
            image = image.flip(-1)
            target['masks'] = target['masks'].flip(-1)
            b = target['boxes']
            target['boxes'] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return image, target

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(ann_file={str(self.ann_file)!r}, images={len(self)}, '
                f'classes={self.num_classes}, train={self.train})')


def _ade_class_names(root: Path) -> Optional[List[str]]:
    """The 150 names from ADEChallengeData2016's objectInfo150 table, when it is there."""
    for name in ('objectInfo150.txt', 'objectInfo150.csv'):
        path = root / name
        if not path.is_file():
            continue
        rows = path.read_text(encoding='utf-8', errors='replace').splitlines()[1:]
        sep = '\t' if name.endswith('.txt') else ','
        names = [r.split(sep)[-1].split(';')[0].strip().strip('"') for r in rows if r.strip()]
        if len(names) == _ADE_NUM_CLASSES:
            return names
    return None


def _paired_files(img_dir: Path, label_dir: Path, img_suffixes: Tuple[str, ...]) -> List[Tuple[Path, Path]]:
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in img_suffixes and not p.name.startswith('.'))
    if not images:
        raise DatasetLayoutError(f'{img_dir} holds no image ({", ".join(img_suffixes)}); {_MAKE_DENSE_HINT}')
    pairs, missing = [], []
    for p in images:
        label = label_dir / f'{p.stem}.png'
        (pairs if label.is_file() else missing).append((p, label))
    if missing:
        raise DatasetLayoutError(f'{len(missing)} image(s) of {img_dir} have no label map in {label_dir}, e.g. '
                                 f'{", ".join(str(m[1]) for m in missing[:3])}')
    return pairs


class SemanticMaps(Dataset):
    """Semantic segmentation pairs ``(image float32 [3, H, W], label int64 [H, W])``; see the module docstring.

    ``reduce_zero_label`` (None: True for ADE20K, False for make-dense output) maps label 0 to 255 and every other
    label k to k - 1. Attributes: ``num_classes`` (ours 11: background + 10; ADE20K 150), ``class_names``,
    ``ignore_index`` (255), ``layout`` ('vittt' or 'ade20k'), ``samples`` (image path, label path).
    """

    ignore_index = 255

    def __init__(self, root: PathLike, split: str = 'train', train: bool = False, hflip: float = 0.5,
                 reduce_zero_label: Optional[bool] = None) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.train = bool(train)
        self.hflip = float(hflip)
        layouts = (f'{self.root}/images/{split}/*.png + {self.root}/semantic/{split}/*.png (vittt data make-dense), '
                   f'or {self.root}/images/{{training,validation}}/*.jpg + '
                   f'{self.root}/annotations/{{training,validation}}/*.png (ADE20K)')
        if not self.root.exists():
            raise FileNotFoundError(f'dataset folder {self.root} does not exist; expected {layouts}; '
                                    f'{_MAKE_DENSE_HINT}')
        ours_img, ours_sem = self.root / 'images' / split, self.root / 'semantic' / split
        ade = _ADE_SPLITS.get(split)
        if ours_sem.is_dir() or is_dense_dataset(self.root):
            _check_complete(self.root)
            if not (ours_img.is_dir() and ours_sem.is_dir()):
                raise DatasetLayoutError(f'{self.root} has no {split!r} split: expected {ours_img} and {ours_sem}')
            meta = _read_json(self.root / 'meta.json') or {}
            self.layout = 'vittt'
            self.samples = _paired_files(ours_img, ours_sem, ('.png',))
            names = meta.get('semantic_classes') or (['background'] + list(meta.get('class_names', [])))
            if len(names) < 2:
                raise DatasetLayoutError(f'{self.root}/meta.json lists no class names')
            self.reduce_zero_label = bool(reduce_zero_label)
            self.class_names = list(names[1:] if self.reduce_zero_label else names)
        elif ade is not None and (self.root / 'annotations' / ade).is_dir():
            self.layout = 'ade20k'
            self.samples = _paired_files(self.root / 'images' / ade, self.root / 'annotations' / ade,
                                         ('.jpg', '.jpeg', '.png'))
            self.reduce_zero_label = True if reduce_zero_label is None else bool(reduce_zero_label)
            names = _ade_class_names(self.root) or [f'class_{i}' for i in range(1, _ADE_NUM_CLASSES + 1)]
            self.class_names = list(names) if self.reduce_zero_label else ['other'] + list(names)
        else:
            raise DatasetLayoutError(f'{self.root} is not a semantic segmentation dataset for split {split!r}: '
                                     f'expected {layouts}; {_MAKE_DENSE_HINT}')
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img_path, label_path = self.samples[index]
        img = pil_rgb_loader(img_path)
        with Image.open(label_path) as f:
            label = np.asarray(f, dtype=np.uint8) if f.mode in ('L', 'P') else None
        if label is None or label.ndim != 2:
            raise DatasetLayoutError(f'{label_path}: a label map must be an 8-bit single-channel PNG (mode L or P)')
        if label.shape != (img.size[1], img.size[0]):
            raise DatasetLayoutError(f'{label_path} is {label.shape[1]}x{label.shape[0]} but its image {img_path} '
                                     f'is {img.size[0]}x{img.size[1]}')
        label = torch.from_numpy(label.astype(np.int64))
        if self.reduce_zero_label:
            label = torch.where((label == 0) | (label == self.ignore_index), self.ignore_index, label - 1)
        valid = label[label != self.ignore_index]
        if valid.numel() and int(valid.max()) >= self.num_classes:
            raise DatasetLayoutError(f'{label_path}: label {int(valid.max())} >= num_classes {self.num_classes} '
                                     f'(and not the ignore index 255)')
        image = _image_tensor(img)
        if self.train and torch.rand(()).item() < self.hflip:
            image, label = image.flip(-1), label.flip(-1)
        return image, label.contiguous()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, layout={self.layout!r}, '
                f'images={len(self)}, classes={self.num_classes})')
