"""Fashion-MNIST read straight from its IDX files (no download, no torchvision dataset class).

The files are those of the Debian package ``dataset-fashion-mnist``::

    /usr/share/datasets/fashion-mnist/{train,t10k}-images-idx3-ubyte.gz   uint8 [N, 28, 28]
    /usr/share/datasets/fashion-mnist/{train,t10k}-labels-idx1-ubyte.gz   uint8 [N]

(60,000 train / 10,000 test images, 10 classes). The directory can be changed with ``root=`` or the environment
variable ``VITTT_FASHION_MNIST``; uncompressed files (without ``.gz``) are read too.

IDX layout: a big-endian header ``0x00 0x00 <dtype> <ndim>`` (magic 2051 = uint8 3-d for images, 2049 = uint8
1-d for labels), then ``ndim`` big-endian uint32 sizes, then the row-major data. A bad header, a truncated file or
trailing bytes raise :class:`IDXFormatError` naming the file.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ['FashionMNIST', 'IDXFormatError', 'read_idx', 'load_fashion_mnist', 'fashion_mnist_root',
           'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DEFAULT_ROOT', 'FASHION_MNIST_ENV']

PathLike = Union[str, os.PathLike]

FASHION_MNIST_DEFAULT_ROOT = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_ENV = 'VITTT_FASHION_MNIST'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim

_SPLIT_PREFIX = {'train': 'train', 'test': 't10k'}
_INSTALL_HINT = (f'install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), '
                 f'or point root= or ${FASHION_MNIST_ENV} at a directory holding the IDX files')


class IDXFormatError(ValueError):
    """An IDX file with a bad header, a wrong magic number, a wrong size or a count mismatch; names the file."""


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Parse an uint8 IDX file (gzipped if its name ends in ``.gz``) into an array of the header's shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise IDXFormatError(f'{path}: cannot read the file ({e}); it is truncated or not a valid '
                             f'{"gzip" if opener is gzip.open else "IDX"} file') from e
    if len(data) < 4:
        raise IDXFormatError(f'{path}: {len(data)} bytes is too short for an IDX header (truncated file?)')
    (magic,) = struct.unpack('>I', data[:4])
    zeros, dtype_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise IDXFormatError(f'{path}: bad IDX magic number {magic} (0x{magic:08x}), expected {expected_magic} '
                             f'(0x{expected_magic:08x})')
    if zeros != 0 or dtype_code != 0x08 or ndim == 0:
        raise IDXFormatError(f'{path}: bad IDX magic number {magic} (0x{magic:08x}); expected 0x000008NN '
                             f'(uint8 data, NN >= 1 dimensions)')
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f'{path}: truncated IDX header (needs {header} bytes for {ndim} dimensions, '
                             f'file has {len(data)})')
    shape = struct.unpack(f'>{ndim}I', data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    got = len(data) - header
    if got != expected:
        kind = 'truncated' if got < expected else 'has trailing bytes'
        raise IDXFormatError(f'{path}: file {kind}: the header says shape {tuple(shape)} = {expected} bytes of '
                             f'data, the file holds {got}')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_root(root: Optional[PathLike] = None) -> Path:
    """The Fashion-MNIST directory: ``root`` if given, else ``$VITTT_FASHION_MNIST``, else the Debian path."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env).expanduser() if env else Path(FASHION_MNIST_DEFAULT_ROOT)


def _find_file(root: Path, stem: str) -> Path:
    for name in (f'{stem}.gz', stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f'Fashion-MNIST file {root / (stem + ".gz")} not found; {_INSTALL_HINT}')


def _split_files(split: str, root: Optional[PathLike]) -> Tuple[Path, Path]:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"Fashion-MNIST split must be one of {list(_SPLIT_PREFIX)}, got {split!r}")
    root = fashion_mnist_root(root)
    if not root.is_dir():
        raise FileNotFoundError(f'Fashion-MNIST directory {root} does not exist; {_INSTALL_HINT}')
    prefix = _SPLIT_PREFIX[split]
    return _find_file(root, f'{prefix}-images-idx3-ubyte'), _find_file(root, f'{prefix}-labels-idx1-ubyte')


def load_fashion_mnist(split: str = 'train', root: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels uint8 [N] of one split ('train' or 'test'), checked for agreement."""
    images_path, labels_path = _split_files(split, root)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f'{images_path} holds {images.shape[0]} images but {labels_path} holds '
                             f'{labels.shape[0]} labels')
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IDXFormatError(f'{labels_path}: label {int(labels.max())} out of range for '
                             f'{len(FASHION_MNIST_CLASSES)} classes')
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST as ``(PIL.Image mode 'L' 28x28, int label)`` pairs, ``transform`` applied to the image.

    The files are located (and a missing one reported) at construction; the arrays are read on first use and
    kept in memory (about 55 MB for the train split).
    """

    def __init__(self, split: str = 'train', root: Optional[PathLike] = None,
                 transform: Optional[Callable] = None) -> None:
        self.split = split
        self.images_path, self.labels_path = _split_files(split, root)
        self.root = self.images_path.parent
        self.transform = transform
        self.classes = list(FASHION_MNIST_CLASSES)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._images: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None

    def _load(self) -> None:
        if self._images is None:
            self._images, self._labels = load_fashion_mnist(self.split, self.root)

    @property
    def data(self) -> np.ndarray:
        """All images, uint8 [N, 28, 28]."""
        self._load()
        return self._images

    @property
    def labels(self) -> np.ndarray:
        """All labels, uint8 [N]."""
        self._load()
        return self._labels

    @property
    def targets(self) -> List[int]:
        """All labels as a list of ints (as torchvision's ``ImageFolder.targets``)."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        self._load()
        img = Image.fromarray(self._images[index])  # uint8 [28, 28] -> mode 'L'
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self._labels[index])

    def __repr__(self) -> str:
        return f'{type(self).__name__}(split={self.split!r}, root={str(self.root)!r}, transform={self.transform!r})'
