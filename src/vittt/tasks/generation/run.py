"""What ``vittt generate train`` / ``sample`` do: datasets from the recipe, the engine, samples from a checkpoint."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ...engine import DistInfo, Trainer, load_trained_model, load_training_checkpoint
from .data import build_generation_datasets
from .task import GenerationTask, recipe_vae

__all__ = ['train', 'load_generator', 'sample_checkpoint', 'load_reference', 'real_training_images', 'score_generator',
           'evaluate_checkpoint', 'is_fmnist_like']


def train(recipe: Dict[str, Any], data, output, info: DistInfo, resume: Optional[str] = None,
          progress: bool = True) -> List[Dict[str, Any]]:
    """Fit ``recipe['model']`` (a DiT³ / DiT name) on ``data``; the run's history."""
    from .latents import LatentCache, check_cache_vae

    train_set, val_set, channels, num_classes = build_generation_datasets(data, recipe)
    vae, cached = recipe_vae(recipe, info.device), isinstance(train_set, LatentCache)
    if cached:
        check_cache_vae(train_set, vae)
    task = GenerationTask(recipe, channels, num_classes, vae, moments=cached)
    return Trainer(task, train_set, val_set, output, info, resume=resume, progress=progress).fit()


def load_generator(checkpoint, use_ema: bool = True, vae: Optional[str] = None, device='cpu'):
    """``(task, model)`` from a generation checkpoint of the engine (EMA weights unless ``use_ema`` is False)."""
    return _generator_from(load_training_checkpoint(checkpoint), checkpoint, use_ema, vae, device)


def _generator_from(ckpt, checkpoint, use_ema: bool, vae: Optional[str], device):
    recipe = dict(ckpt['recipe'])
    if vae is not None:
        recipe['vae'] = vae
    task, model = load_trained_model(dict(ckpt, recipe=recipe), use_ema, task='generation', source=str(checkpoint),
                                     vae_device=device)
    return task, model.to(device)


def sample_checkpoint(checkpoint, labels: Sequence[int], output, cfg_scale: float = 4.0, sampler: str = 'ddpm250',
                      seed: int = 0, image_size: Optional[int] = None, npz: Optional[str] = None,
                      use_ema: bool = True, vae: Optional[str] = None, device='cpu', nrow: Optional[int] = None,
                      batch_size: Optional[int] = None):
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
    images = task.sample(model, list(labels), (size, size), cfg_scale, sampler, seed, device, batch_size)
    atomic_write(output, lambda tmp: save_image((images + 1) / 2, tmp, nrow=nrow or min(len(labels), 10),
                                                format='png'))
    if npz:
        arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        atomic_write(npz, lambda tmp: np.savez(open(tmp, 'wb'), arr_0=arr))
    return images



def load_reference(reference, size: int, count: Optional[int] = None):
    """Real images ``[N, C, size, size]`` in [-1, 1] for a metric: 'fashion-mnist' (the 10k test split, padded to
    32), a folder of images (searched recursively; ADM centre crop), or an ``.npz`` with an ``arr_0`` NHWC uint8
    array (the ADM reference batches)."""
    import os
    from pathlib import Path

    import numpy as np
    import torch

    name = os.fspath(reference)
    if name.lower() in ('fashion-mnist', 'fashion_mnist'):
        return _fmnist_images('test', size, lambda n: range(n if count is None else min(count, n)))
    path = Path(name).expanduser()
    if path.suffix == '.npz' and path.is_file():
        with np.load(path) as data:
            if 'arr_0' not in data:
                raise ValueError(f'{path}: expected an arr_0 array (NHWC uint8), found {list(data.keys())}')
            arr = data['arr_0'][:count]
        if arr.ndim != 4 or arr.dtype != np.uint8:
            raise ValueError(f'{path}: arr_0 must be NHWC uint8, got {arr.dtype} {arr.shape}')
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    if path.is_dir():
        from ...data import IMG_EXTENSIONS, pil_rgb_loader
        from .data import ToSignedTensor
        files = sorted(p for p in path.rglob('*') if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith('.'))
        if not files:
            raise ValueError(f'{path}: no images ({", ".join(IMG_EXTENSIONS)}) found')
        to_tensor = ToSignedTensor('RGB', size, crop=True)
        return torch.stack([to_tensor(pil_rgb_loader(f)) for f in files[:count]])
    raise FileNotFoundError(f"reference {name!r}: expected 'fashion-mnist', a folder of images or an .npz file")


def _fmnist_images(split: str, size: int, pick):
    """Fashion-MNIST images of ``split`` (padded to 32, then ``size``) at the indices ``pick(len(split))``."""
    import torch

    from ...data import FashionMNIST
    from .data import ToSignedTensor

    data = FashionMNIST(split, transform=ToSignedTensor('L', size, pad_to=32))
    return torch.stack([data[i][0] for i in pick(len(data))])


def real_training_images(count: int, seed: int):
    """``count`` Fashion-MNIST training images (a seeded random draw, padded to 32): the FD noise floor at N."""
    import torch

    return _fmnist_images('train', 32, lambda n: torch.randperm(
        n, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def score_generator(task, model, num_samples: int, cfg_scale: float, sampler: str, seed: int = 0,
                    fmnist_reference=None, fid_reference=None, fid_weights=None, net=None, device='cpu',
                    batch_size: int = 100):
    """``(metrics, images)`` for ``num_samples`` balanced samples (label ``i % num_classes``) at one guidance
    scale: FD-FMNIST, label agreement and the classifier score when ``fmnist_reference`` (real images) is given,
    Inception FID when ``fid_reference`` and ``fid_weights`` are."""
    import time

    import torch

    from .metrics import classifier_score, fd_fmnist, inception_fid, label_agreement

    labels = torch.arange(num_samples) % task.num_classes
    size = task.recipe['image_size']
    start = time.perf_counter()
    images = task.sample(model, labels.tolist(), (size, size), cfg_scale, sampler, seed, device, batch_size)
    row = dict(cfg_scale=cfg_scale, samples=num_samples, sample_seconds=time.perf_counter() - start)
    if fmnist_reference is not None:
        row.update(fd_fmnist=fd_fmnist(fmnist_reference, images, net),
                   label_agreement=label_agreement(images, labels, net), classifier_score=classifier_score(images, net))
    if fid_reference is not None:
        row['inception_fid'] = inception_fid(fid_reference, images, fid_weights)
    return row, images


def is_fmnist_like(task) -> bool:
    """Whether the FD-FMNIST network applies: one channel, 10 classes, 32×32 pixels (no VAE)."""
    return task.vae is None and task.model_channels == 1 and task.num_classes == 10 and \
        task.recipe['image_size'] == 32


def evaluate_checkpoint(checkpoint, samples: int = 1000, cfg_scales=(1.0, 3.0), sampler: str = 'ddim25',
                        seed: int = 0, fid_weights=None, reference=None, use_ema: bool = True,
                        vae: Optional[str] = None, device='cpu', output=None, batch_size: int = 100) -> Dict[str, Any]:
    """Score a generation checkpoint at each guidance scale; the result is also written (atomically) as JSON to
    ``output`` (default ``<checkpoint>.gen-eval.json``). FD-FMNIST (with its noise floor: as many real training
    images) for Fashion-MNIST-shaped models; Inception FID against ``reference`` when ``fid_weights`` is given."""
    import json
    from pathlib import Path

    from ...io import atomic_write
    from .metrics import fd_fmnist, feature_net_hash, load_feature_net

    if samples < 2:
        raise ValueError(f'--samples must be at least 2, got {samples}')
    ckpt = load_training_checkpoint(checkpoint)
    task, model = _generator_from(ckpt, checkpoint, use_ema, vae, device)
    fmnist = is_fmnist_like(task)
    if fid_weights is None and not fmnist:
        raise ValueError('this model is not Fashion-MNIST-shaped (1×32×32, 10 classes), so FD-FMNIST does not apply: '
                         'pass --fid-weights (a local Inception file) and --reference for Inception FID')
    if fid_weights is not None and reference is None and not fmnist:
        raise ValueError('Inception FID needs --reference (a folder of images or an ADM .npz)')
    net = load_feature_net() if fmnist else None
    fmnist_reference = load_reference('fashion-mnist', 32) if fmnist else None
    fid_reference = None
    if fid_weights is not None:
        fid_reference = fmnist_reference if reference is None else load_reference(reference, task.recipe['image_size'])
    result: Dict[str, Any] = dict(checkpoint=str(checkpoint), step=ckpt.get('num_updates'),
                                  weights='ema' if use_ema else 'model', sampler=sampler, samples=samples, seed=seed,
                                  rows=[])
    if fmnist:
        result.update(feature_net=feature_net_hash(),
                      fd_fmnist_floor=fd_fmnist(fmnist_reference, real_training_images(samples, seed=1), net))
    for cfg in cfg_scales:
        row, _ = score_generator(task, model, samples, cfg, sampler, seed, fmnist_reference, fid_reference,
                                 fid_weights, net, device, batch_size)
        result['rows'].append(row)
    path = Path(output) if output else Path(f'{checkpoint}.gen-eval.json')
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + '\n'))
    result['output'] = str(path)
    return result
