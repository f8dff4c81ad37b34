"""ImageNet-style class-folder datasets: ``root/<class>/**/<image>``, decoded with PIL and converted to RGB.

:class:`ImageFolder` is torchvision's ``ImageFolder`` (same ``classes`` / ``class_to_idx`` / ``samples`` /
``targets``, classes sorted by folder name) with stricter checks:

* a missing ``root`` raises ``FileNotFoundError`` naming it, a file raises ``NotADirectoryError``;
* a root without class folders, or with class folders holding no image file, raises :class:`DatasetLayoutError`
  (a ``ValueError``) naming every empty class folder;
* an image that cannot be decoded raises :class:`ImageLoadError` (an ``OSError``) with its path, when it is loaded
  in ``__getitem__``.

Only files with an image extension (``IMG_EXTENSIONS``, case-insensitive) count; hidden entries (``.name``) are
skipped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from PIL import Image
from torchvision.datasets import ImageFolder as _TVImageFolder

__all__ = ['ImageFolder', 'DatasetLayoutError', 'ImageLoadError', 'pil_rgb_loader', 'IMG_EXTENSIONS']

PathLike = Union[str, os.PathLike]

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class DatasetLayoutError(ValueError):
    """A dataset directory that does not have the ``root/<class>/<image>`` layout; the message names the folder."""


class ImageLoadError(OSError):
    """An image file that PIL cannot open or decode; the message holds its path."""


def pil_rgb_loader(path: PathLike) -> Image.Image:
    """Open and fully decode an image with PIL, converted to RGB. Raises :class:`ImageLoadError` naming ``path``."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')  # convert() decodes the whole image, so truncation shows up here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f'cannot read image {os.fspath(path)}: {type(e).__name__}: {e}') from e


def _is_image(name: str) -> bool:
    return not name.startswith('.') and name.lower().endswith(IMG_EXTENSIONS)


class ImageFolder(_TVImageFolder):
    """Class-folder dataset returning ``(PIL.Image RGB, int label)``; see the module docstring for the checks."""

    def __init__(self, root: PathLike, transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None, loader: Callable = pil_rgb_loader) -> None:
        super().__init__(os.fspath(root), transform=transform, target_transform=target_transform, loader=loader)

    def find_classes(self, directory: PathLike) -> Tuple[List[str], Dict[str, int]]:
        """Sorted class folder names under ``directory`` and their indices."""
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f'dataset folder {directory} does not exist')
        if not directory.is_dir():
            raise NotADirectoryError(f'dataset root {directory} is not a directory')
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))
        if not classes:
            raise DatasetLayoutError(f'dataset folder {directory} has no class sub-folders; expected the layout '
                                     f'{directory}/<class>/<image>')
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: PathLike, class_to_idx: Dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        """(path, class index) for every image file under each class folder, sorted; every class must have one."""
        directory = os.fspath(directory)
        samples: List[Tuple[str, int]] = []
        empty: List[str] = []
        for name, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
            class_dir = os.path.join(directory, name)
            found = []
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
            if not found:
                empty.append(class_dir)
            samples += [(p, idx) for p in found]
        if empty and not allow_empty:
            raise DatasetLayoutError(f'{len(empty)} class folder(s) hold no image file '
                                     f'(extensions {", ".join(IMG_EXTENSIONS)}): {", ".join(empty)}')
        return samples
