"""Effective receptive field (Luo et al., NeurIPS 2016; measured as in RepLKNet, Ding et al., CVPR 2022).

For images ``x_n`` (``[N, C, H, W]``) and the last feature map ``F(x) [N, D, h, w]`` of a model (its
``forward_features``, laid out as a map), the ERF is the mean over images of the input-gradient magnitude of the
central feature, summed over feature and input channels::

    y_n   = sum_d relu(F(x_n)[d, h // 2, w // 2])                    (one scalar per image)
    ERF   = 1/N · sum_n sum_c | d y_n / d x_n[c] |                   ([H, W])

The ReLU is RepLKNet's choice, and it matters: a LayerNorm-ed feature (ViTs, ViT³) with a uniform gain sums to a
constant over its channels (its bias), so without it the gradient of the plain channel sum is zero (DeiT at
initialisation) or rounding noise. ``relu=False`` gives the plain sum (Luo et al.'s unit gradient at the centre).

Images are independent in eval mode, so one backward of ``sum_n y_n`` per batch gives every image's own gradient.
The spread of the map is reported two ways, both over the gradient mass (the map's sum):

- ``area_50`` / ``area_90``: the smallest fraction of the pixels (taken by descending value) holding 50 % / 90 %
  of the mass: shape-free, comparable across models and resolutions;
- ``square_side_50`` / ``square_ratio_50`` (and 90): the side of the smallest square centred on the image centre
  holding that share, and its area over the image's (RepLKNet's "high-contribution area ratio").
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._common import (NOISE, batches, centred_square, check_model_names, eval_mode, features_as_map, load_images,
                      load_model, mass_fraction, model_patch_size, write_json)

__all__ = ['effective_receptive_field', 'erf_spread', 'log_scaled', 'plot_erf', 'run_erf', 'DEFAULT_SHARES']

DEFAULT_SHARES = (0.5, 0.9)


def _share_key(share: float) -> str:
    return f'{round(100 * share):d}'


def log_scaled(erf: torch.Tensor, decades: float = 4.0) -> torch.Tensor:
    """``[H, W]`` map -> ``[H, W]`` in [0, 1] for display: ``log10(erf / max + 10^-decades)`` mapped linearly from
    ``[-decades, 0]`` to ``[0, 1]`` (the peak is 1, values ``decades`` orders of magnitude below it are ~0). An
    all-zero map stays zero."""
    peak = erf.max()
    if not peak > 0:
        return torch.zeros_like(erf)
    floor = 10.0 ** -decades
    return ((torch.log10(erf / peak + floor) + decades) / decades).clamp(0, 1)


def erf_spread(erf: torch.Tensor, shares: Sequence[float] = DEFAULT_SHARES) -> Dict[str, Optional[float]]:
    """The spread numbers of an ``[H, W]`` ERF for each share ``s`` (e.g. 0.5 → keys ending in ``_50``):
    ``area_s`` (fraction of pixels holding ``s`` of the mass, largest first), ``square_side_s`` (pixels) and
    ``square_ratio_s`` (the smallest centred square holding ``s``). None values for an all-zero map."""
    out: Dict[str, Optional[float]] = {}
    for share in shares:
        key = _share_key(share)
        side, ratio = centred_square(erf, share)
        out[f'area_{key}'] = mass_fraction(erf, share)
        out[f'square_side_{key}'] = side
        out[f'square_ratio_{key}'] = ratio
    return out


def effective_receptive_field(model: nn.Module, images: torch.Tensor, *,
                              position: Union[str, Tuple[int, int]] = 'center', batch_size: int = 8,
                              relu: bool = True, shares: Sequence[float] = DEFAULT_SHARES) -> Dict[str, Any]:
    """The ERF of ``model`` over ``images`` ``[N, C, H, W]`` (see the module docstring).

    ``model``: a timm / vittt model (its ``forward_features``; ``[B, D, h, w]`` maps, ``[B, h, w, D]`` for
    ``output_fmt='NHWC'`` models, or ``[B, P + h·w, D]`` tokens whose ``num_prefix_tokens`` are dropped), or any
    module mapping images to a ``[B, D, h, w]`` map. It runs in eval mode (no dropout / drop-path); its mode is
    restored afterwards. ``position``: 'center' (``(h // 2, w // 2)``) or a ``(row, column)`` of the feature map.
    ``batch_size``: images per backward. ``relu``: clamp the central features at 0 before summing (RepLKNet's
    choice, the default; False: the plain channel sum).

    Returns a dict: ``erf`` (the mean map ``[H, W]``, float32), ``erf_log`` (:func:`log_scaled`, ``[H, W]`` in
    [0, 1]), ``feature_grid`` ``(h, w)``, ``position`` ``(row, column)``, ``input_size`` ``(H, W)``, ``images``
    (N) and the :func:`erf_spread` numbers (``area_50``, ``area_90``, ``square_side_50``, ...).
    """
    if images.ndim != 4:
        raise ValueError(f'images must be [N, C, H, W], got shape {tuple(images.shape)}')
    height, width = images.shape[-2:]
    patch = model_patch_size(model)
    if patch is not None and (height < patch[0] or width < patch[1]):
        raise ValueError(f'images of {height}×{width} are smaller than the {patch[0]}×{patch[1]} patch of the '
                         f'{type(model).__name__}')
    total = torch.zeros(height, width, dtype=torch.float64)
    grid = chosen = None
    forward = getattr(model, 'forward_features', None) or model
    with eval_mode(model), torch.enable_grad():
        for batch in batches(images, batch_size):
            x = batch.detach().clone().requires_grad_(True)
            fmap = features_as_map(model, forward(x), (height, width))
            grid = tuple(fmap.shape[-2:])
            chosen = _position(position, grid)
            central = fmap[:, :, chosen[0], chosen[1]]
            if relu:
                central = central.relu()
            (grad,) = torch.autograd.grad(central.sum(), x)
            total += grad.abs().sum(dim=1).sum(dim=0).double()
    erf = (total / images.shape[0]).float()
    return dict(erf=erf, erf_log=log_scaled(erf), feature_grid=grid, position=chosen, input_size=(height, width),
                images=int(images.shape[0]), **erf_spread(erf, shares))


def _position(position, grid: Tuple[int, int]) -> Tuple[int, int]:
    if position in ('center', 'centre'):
        return grid[0] // 2, grid[1] // 2
    if isinstance(position, str):
        raise ValueError(f"position must be 'center' or a (row, column) pair, got {position!r}")
    row, column = (int(p) for p in position)
    if not (0 <= row < grid[0] and 0 <= column < grid[1]):
        raise ValueError(f'position {(row, column)} is outside the {grid[0]}×{grid[1]} feature map')
    return row, column


def plot_erf(results: Mapping[str, Mapping[str, Any]], path, title: Optional[str] = None) -> Path:
    """Side-by-side heat maps of the ``erf_log`` maps of ``results`` (label -> the dict of
    :func:`effective_receptive_field`), titled with the label and the 50 % / 90 % areas; a PNG written atomically."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ...engine.plots import save_figure

    count = len(results)
    if count == 0:
        raise ValueError('plot_erf needs at least one result')
    fig, axes = plt.subplots(1, count, figsize=(3.6 * count + 0.9, 4.2), squeeze=False, layout='constrained')
    image = None
    for ax, (label, result) in zip(axes[0], results.items()):
        image = ax.imshow(_as_numpy(result['erf_log']), cmap='inferno', vmin=0.0, vmax=1.0, interpolation='nearest')
        sides = ' / '.join('-' if result.get(f'square_side_{k}') is None else str(result[f'square_side_{k}'])
                           for k in ('50', '90'))
        h, w = result['input_size']
        ax.set_title(f'{label}\nmass 50 % / 90 % in {_percent(result.get("area_50"))} / '
                     f'{_percent(result.get("area_90"))} of pixels\ncentred square 50 / 90 %: {sides} px of {h}×{w}',
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02)
    bar.set_label('|∂ centre feature / ∂ input|, log10 over 4 decades', fontsize=8)
    fig.suptitle(title or 'Effective receptive field', fontsize=10)
    return save_figure(fig, path, bbox_inches='tight')


def _as_numpy(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t


def _percent(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.1f} %'


def run_erf(models: Sequence[str], output='results/explain/erf', data: str = 'fashion-mnist', images: int = 16,
            img_size: Optional[int] = None, checkpoints: Optional[Mapping[str, Any]] = None, seed: int = 0,
            batch_size: int = 8, relu: bool = True) -> Dict[str, Any]:
    """What ``vittt explain erf`` does: the ERF of each model over the same ``images`` images of ``data`` ('noise'
    or a dataset, see :func:`vittt.tasks.explain._common.load_images`), drawn with ``seed``, at ``img_size``
    (default: a checkpoint's training size, else 224), ``relu`` as in :func:`effective_receptive_field`; writes
    ``<output>/erf.png``, ``erf.json`` (the spread numbers per model) and ``erf_maps.safetensors`` (the raw maps).
    Returns the JSON payload."""
    from ...io import save_safetensors_atomic

    checkpoints = dict(checkpoints or {})
    if len(set(models)) != len(models):
        raise ValueError(f'--models names a model twice: {list(models)}')
    unknown = sorted(set(checkpoints) - set(models))
    if unknown:
        raise ValueError(f'--checkpoint given for {", ".join(unknown)}, which is not among --models '
                         f'({", ".join(models)})')
    check_model_names(models)
    output = Path(output)
    torch.manual_seed(seed)
    loaded = [(name, *load_model(name, checkpoints.get(name), img_size)) for name in models]  # fail early
    cache: Dict[Tuple[int, int], torch.Tensor] = {}
    results, rows = {}, {}
    for name, model, in_chans, size in loaded:
        _check_size(name, model, size)
        if (in_chans, size) not in cache:
            cache[(in_chans, size)] = load_images(data, images, size, in_chans, seed)[0]
        start = time.perf_counter()
        result = effective_receptive_field(model, cache[(in_chans, size)], batch_size=batch_size, relu=relu)
        seconds = time.perf_counter() - start
        results[name] = result
        rows[name] = dict(checkpoint=None if checkpoints.get(name) is None else str(checkpoints[name]),
                          in_chans=in_chans, img_size=size, feature_grid=list(result['feature_grid']),
                          position=list(result['position']), seconds=round(seconds, 2),
                          **{k: v for k, v in result.items() if k.startswith(('area_', 'square_'))})
        del model
    source = 'Gaussian noise' if data == NOISE else str(data)
    shown = {f'{name}{" (random weights)" if checkpoints.get(name) is None else ""}': r for name, r in results.items()}
    plot_erf(shown, output / 'erf.png',
             title=f'Effective receptive field: mean over {images} {source} images, central feature of the last map')
    save_safetensors_atomic({name: r['erf'] for name, r in results.items()}, output / 'erf_maps.safetensors')
    payload = dict(data=str(data), images=images, seed=seed, shares=list(DEFAULT_SHARES), relu=relu,
                   definition=f'mean over images of sum over channels of |d(sum of the {"ReLU-ed " if relu else ""}'
                              'central output feature) / d(input pixels)|; area_S: fraction of pixels (largest '
                              'first) holding S % of the mass; square_side_S / square_ratio_S: smallest centred '
                              'square holding S %',
                   png=str(output / 'erf.png'), maps=str(output / 'erf_maps.safetensors'), models=rows)
    write_json(output / 'erf.json', payload)
    payload['json'] = str(output / 'erf.json')
    return payload


def _check_size(name: str, model: nn.Module, size: int) -> None:
    patch = model_patch_size(model)
    if patch is not None and size < max(patch):
        raise ValueError(f'image size {size} is smaller than the {patch[0]}×{patch[1]} patch of {name}')
