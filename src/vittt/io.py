"""Files written by vittt appear whole or not at all: write to a temporary file beside the target, then rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

__all__ = ['atomic_write', 'save_safetensors_atomic']

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, and atomically rename ``tmp_path`` to ``path``. On any error the
    temporary file is removed and an existing ``path`` is left untouched. The file gets the permissions a plain
    ``open(path, 'w')`` would give (``0o666`` less the umask; ``mkstemp`` alone would leave it ``0o600``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path: PathLike,
                            metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a state dict as safetensors (contiguous, unshared copies) atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
