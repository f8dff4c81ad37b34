"""What ``vittt generate train`` / ``sample`` do: datasets from the recipe, the engine, samples from a checkpoint."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ...engine import DistInfo, Trainer, load_training_checkpoint
from .data import build_generation_datasets
from .task import GenerationTask

__all__ = ['train', 'load_generator', 'sample_checkpoint']


def _vae(recipe, device):
    if not recipe.get('vae'):
        return None
    from ...diffusion.vae import load_vae
    return load_vae(recipe['vae'], device)


def train(recipe: Dict[str, Any], data, output, info: DistInfo, resume: Optional[str] = None,
          progress: bool = True) -> List[Dict[str, Any]]:
    """Fit ``recipe['model']`` (a DiT³ / DiT name) on ``data``; the run's history."""
    train_set, val_set, channels, num_classes = build_generation_datasets(data, recipe)
    task = GenerationTask(recipe, channels, num_classes, _vae(recipe, info.device))
    return Trainer(task, train_set, val_set, output, info, resume=resume, progress=progress).fit()


def load_generator(checkpoint, use_ema: bool = True, vae: Optional[str] = None, device='cpu'):
    """``(task, model)`` from a generation checkpoint of the engine (EMA weights unless ``use_ema`` is False)."""
    ckpt = load_training_checkpoint(checkpoint)
    if ckpt.get('task') != 'generation':
        raise ValueError(f'{checkpoint} is a checkpoint of a {ckpt.get("task")} run, not of vittt generate train')
    recipe = dict(ckpt['recipe'])
    if vae is not None:
        recipe['vae'] = vae
    identity = ckpt['identity']
    vae_model = _vae(recipe, device)
    channels = identity['in_chans'] if vae_model is None else vae_model.config.in_channels
    task = GenerationTask(recipe, channels, identity['num_classes'], vae_model)
    model = task.build_model()
    state = ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model']
    model.load_state_dict(state)
    return task, model.to(device).eval()


def sample_checkpoint(checkpoint, labels: Sequence[int], output, cfg_scale: float = 4.0, sampler: str = 'ddpm250',
                      seed: int = 0, image_size: Optional[int] = None, npz: Optional[str] = None,
                      use_ema: bool = True, vae: Optional[str] = None, device='cpu', nrow: Optional[int] = None):
    """Samples for ``labels`` as a PNG grid (and, with ``npz``, the ADM evaluator's ``arr_0`` NHWC uint8 array)."""
    import numpy as np
    from torchvision.utils import save_image

    from ...diffusion import to_uint8
    from ...io import atomic_write

    task, model = load_generator(checkpoint, use_ema, vae, device)
    bad = [y for y in labels if not 0 <= y < task.num_classes]
    if bad:
        raise ValueError(f'labels must be in [0, {task.num_classes - 1}], got {bad}')
    size = image_size or task.recipe['image_size']
    images = task.sample(model, list(labels), (size, size), cfg_scale, sampler, seed, device)
    atomic_write(output, lambda tmp: save_image((images + 1) / 2, tmp, nrow=nrow or min(len(labels), 10),
                                                format='png'))
    if npz:
        arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        atomic_write(npz, lambda tmp: np.savez(open(tmp, 'wb'), arr_0=arr))
    return images

