"""Gradient × input token importance: which tokens a class logit rests on.

For images ``x`` (``[B, C, H, W]``), logits ``z = model(x)`` (``[B, K]``) and a target class ``t_b`` per image
(default: the predicted one), the pixel attribution is the magnitude of gradient × input, summed over channels::

    a_b[i, j] = sum_c | x_b[c, i, j] · d z_b[t_b] / d x_b[c, i, j] |                 ([B, H, W])

pooled (summed) over the model's patches, ``p_h × p_w`` pixels per token (inputs whose sides are not multiples
are zero-padded, as vittt's patch embedding pads), and normalised per image::

    m_b[u, v] = sum over the patch (u, v) of a_b  /  sum of a_b                   ([B, ceil(H/p_h), ceil(W/p_w)])

Going through the input pixels makes it model-agnostic: the same map for ViT³, Vision-TTT, DeiT or a convnet (whose
"tokens" are the cells of its last feature map: the pooling uses its stride). Images are independent in eval mode,
so one backward of the batch's summed target logits gives every image's own gradient.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._common import NOISE, as_pair, batches, eval_mode, load_images, load_model, mass_fraction, model_stride, \
    write_json

__all__ = ['token_importance', 'pool_to_tokens', 'plot_tokens', 'run_tokens']


def pool_to_tokens(pixel_map: torch.Tensor, patch_size) -> torch.Tensor:
    """``[B, H, W]`` -> ``[B, ceil(H/p_h), ceil(W/p_w)]``: sums over ``p_h × p_w`` patches, zero-padded at the
    bottom / right."""
    ph, pw = as_pair(patch_size)
    h, w = pixel_map.shape[-2:]
    padded = F.pad(pixel_map, (0, -w % pw, 0, -h % ph))
    b, hp, wp = padded.shape
    return padded.reshape(b, hp // ph, ph, wp // pw, pw).sum(dim=(2, 4))


def token_importance(model: nn.Module, images: torch.Tensor, target: Union[None, int, Sequence[int],
                     torch.Tensor] = None, *, patch_size=None, batch_size: int = 8) -> Dict[str, Any]:
    """Per-token gradient × input importance of ``images`` ``[B, C, H, W]`` for ``target`` (None: each image's
    predicted class; an int: that class for all; or one class per image), see the module docstring.

    ``model`` maps images to logits ``[B, K]`` and runs in eval mode (restored afterwards). ``patch_size`` (int or
    pair) overrides the token size found on the model (its patch, else its last feature map's stride, see
    :func:`vittt.tasks.explain._common.model_stride`).

    Returns a dict: ``maps`` ``[B, h, w]`` (non-negative, each summing to 1; all zero for an image whose
    attribution is zero), ``pixels`` ``[B, H, W]`` (the un-pooled attribution), ``targets`` ``[B]``,
    ``predicted`` ``[B]`` (argmax of the logits), ``logits`` ``[B, K]``, ``patch_size`` ``(p_h, p_w)``,
    ``grid`` ``(h, w)``, and per image ``area_50`` / ``area_90`` (the fraction of tokens holding 50 % / 90 % of
    the map, largest first) as lists.
    """
    if images.ndim != 4:
        raise ValueError(f'images must be [B, C, H, W], got shape {tuple(images.shape)}')
    count, chans, height, width = images.shape
    patch = as_pair(patch_size) if patch_size is not None else model_stride(model, (height, width), chans)
    if height < patch[0] or width < patch[1]:
        raise ValueError(f'images of {height}×{width} are smaller than the {patch[0]}×{patch[1]} token of the '
                         f'{type(model).__name__}')
    targets = _targets(target, count)
    pixels, logits_all = [], []
    with eval_mode(model), torch.enable_grad():
        start = 0
        for batch in batches(images, batch_size):
            x = batch.detach().clone().requires_grad_(True)
            logits = model(x)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f'{type(model).__name__} returned shape {tuple(logits.shape)}, not logits [B, K]')
            chosen = logits.argmax(dim=1) if targets is None else targets[start:start + len(x)]
            if int(chosen.max()) >= logits.shape[1] or int(chosen.min()) < 0:
                raise ValueError(f'target class out of range for {logits.shape[1]} logits: {chosen.tolist()}')
            (grad,) = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), x)
            pixels.append((x.detach() * grad).abs().sum(dim=1))
            logits_all.append(logits.detach())
            start += len(x)
    pixels = torch.cat(pixels)
    logits = torch.cat(logits_all)
    predicted = logits.argmax(dim=1)
    tokens = pool_to_tokens(pixels, patch)
    sums = tokens.sum(dim=(1, 2), keepdim=True)
    maps = torch.where(sums > 0, tokens / sums.clamp_min(torch.finfo(tokens.dtype).tiny), torch.zeros_like(tokens))
    return dict(maps=maps, pixels=pixels, targets=predicted.clone() if targets is None else targets,
                predicted=predicted, logits=logits, patch_size=patch, grid=tuple(maps.shape[-2:]),
                area_50=[mass_fraction(m, 0.5) for m in maps], area_90=[mass_fraction(m, 0.9) for m in maps])


def _targets(target, count: int) -> Optional[torch.Tensor]:
    if target is None:
        return None
    if isinstance(target, int):
        return torch.full((count,), target, dtype=torch.long)
    out = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if out.numel() != count:
        raise ValueError(f'target needs one class per image ({count}), got {out.numel()}')
    return out


def _display(image: torch.Tensor):
    """``[C, H, W]`` normalised image -> an ``[H, W]`` (grey) or ``[H, W, 3]`` array in [0, 1]. Min-max per channel
    undoes any per-channel normalisation up to scale, so a grey image repeated to RGB is grey again."""
    image = image.detach().float()
    low = image.amin(dim=(1, 2), keepdim=True)
    image = (image - low) / (image.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    if image.shape[0] == 1 or (image.shape[0] == 3 and torch.allclose(image[0], image[1:], atol=1e-3)):
        return image[0].numpy()
    return image[:3].permute(1, 2, 0).numpy()


def plot_tokens(result: Dict[str, Any], images: torch.Tensor, path, *, labels: Optional[Sequence[int]] = None,
                class_names: Optional[Sequence[str]] = None, title: Optional[str] = None, columns: int = 8,
                alpha: float = 0.55) -> Path:
    """Each of ``images`` ``[B, C, H, W]`` with its token map of ``result`` (:func:`token_importance`) over it
    (bilinear upsampling of the token grid, ``alpha`` opacity, scaled to each image's top token), titled with the
    true label (``labels``), the predicted class, the explained target when it differs (by name when
    ``class_names`` are given) and the top token's share; a PNG written atomically."""
    import math

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ...engine.plots import save_figure

    maps = result['maps']
    count = maps.shape[0]
    ph, pw = result['patch_size']
    gh, gw = result['grid']
    height, width = images.shape[-2:]
    name = (lambda c: class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c))
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols + 0.8, 2.6 * rows + 0.4), squeeze=False)
    overlay = None
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= count:
            ax.axis('off')
            continue
        shown = _display(images[index])
        ax.imshow(shown, cmap='gray' if shown.ndim == 2 else None, extent=(0, width, height, 0))
        top = float(maps[index].max())
        overlay = ax.imshow((maps[index] / (top or 1.0)).numpy(), cmap='jet', alpha=alpha, interpolation='bilinear',
                            extent=(0, gw * pw, gh * ph, 0), vmin=0.0, vmax=1.0)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        predicted, target = int(result['predicted'][index]), int(result['targets'][index])
        lines = [] if labels is None else [f'true: {name(int(labels[index]))}']
        lines.append(f'pred: {name(predicted)}')
        if target != predicted:
            lines.append(f'explained: {name(target)}')
        lines.append(f'top token {100 * top:.1f} %')
        ax.set_title('\n'.join(lines), fontsize=8)
    if overlay is not None:
        bar = fig.colorbar(overlay, ax=list(axes.flat), fraction=0.02, pad=0.02)
        bar.set_label('token share of |gradient × input| / the image\'s top token', fontsize=8)
    fig.suptitle(title or 'Token importance (gradient × input)', fontsize=10)
    return save_figure(fig, path, bbox_inches='tight')


def run_tokens(model_name: str, output='results/explain/tokens', data: str = 'fashion-mnist', images: int = 8,
               img_size: Optional[int] = None, checkpoint=None, seed: int = 0, batch_size: int = 8
               ) -> Dict[str, Any]:
    """What ``vittt explain tokens`` does: token importance of ``model_name`` (randomly initialised, with as many
    classes as ``data`` has, or ``checkpoint``'s weights) for ``images`` images of ``data`` drawn with ``seed``, at
    ``img_size`` (default: the checkpoint's training size, else 224), each for its predicted class; writes
    ``<output>/tokens.png`` and ``tokens.json`` (the maps, classes and spread per image). Returns the JSON payload."""
    torch.manual_seed(seed)
    model, in_chans, size = load_model(model_name, checkpoint, img_size)
    x, labels, class_names = load_images(data, images, size, in_chans, seed)
    if checkpoint is None and class_names and hasattr(model, 'reset_classifier'):
        model.reset_classifier(len(class_names))  # a random head over the dataset's classes
    patch = model_stride(model, (size, size), in_chans)
    if size < max(patch):
        raise ValueError(f'image size {size} is smaller than the {patch[0]}×{patch[1]} patch of {model_name}')
    result = token_importance(model, x, batch_size=batch_size)
    output = Path(output)
    source = 'Gaussian noise' if data == NOISE else str(data)
    plot_tokens(result, x, output / 'tokens.png', labels=None if labels is None else labels.tolist(),
                class_names=class_names,
                title=f'{model_name}{" (random weights)" if checkpoint is None else ""}: gradient × input per '
                      f'{patch[0]}×{patch[1]} token, predicted class, {source}')
    named = (lambda c: class_names[c] if class_names and c < len(class_names) else None)
    per_image = []
    for i in range(len(x)):
        predicted, target = int(result['predicted'][i]), int(result['targets'][i])
        per_image.append(dict(
            label=None if labels is None else int(labels[i]), label_name=None if labels is None else named(
                int(labels[i])), predicted=predicted, predicted_name=named(predicted), target=target,
            area_50=result['area_50'][i], area_90=result['area_90'][i],
            top_token_share=float(result['maps'][i].max()),
            map=[[round(float(v), 6) for v in row] for row in result['maps'][i]]))
    payload = dict(model=model_name, checkpoint=None if checkpoint is None else str(checkpoint), data=str(data),
                   images=len(x), seed=seed, img_size=size, in_chans=in_chans, patch_size=list(patch),
                   grid=list(result['grid']), class_names=class_names,
                   definition='per token: sum over its pixels and channels of |x * d(target logit)/dx|, normalised '
                              'to sum 1 per image; target = predicted class; area_S: fraction of tokens (largest '
                              'first) holding S % of the map',
                   png=str(output / 'tokens.png'), per_image=per_image)
    write_json(output / 'tokens.json', payload)
    payload['json'] = str(output / 'tokens.json')
    return payload
