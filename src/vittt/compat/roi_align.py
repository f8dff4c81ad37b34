"""Pure-torch RoIAlign for torchvision without its C++ extension.

Why this exists
---------------
Without torchvision's ``_C`` extension (see :mod:`vittt.compat.torchvision_ops`),
``torchvision.ops.roi_align`` falls back to the pure-Python ``_roi_align`` in
``torchvision/ops/roi_align.py``. That fallback is wrapped in a lazy
``torch.compile`` (about 70 s of cold compile on first use), and with adaptive
sampling (``sampling_ratio <= 0``, which Mask R-CNN's ``project_masks_on_boxes``
uses) it samples every pixel of the map for every bin and masks the unused
samples: its intermediates are ``[K, C, PH, PW, H, W]``, which for 16 RoIs on
192x192 masks with 28x28 output takes minutes eagerly.

What it does
------------
:func:`roi_align` computes the same result as torchvision's C++ kernel (which
is mmcv's/Detectron2's RoIAlign), for any float dtype and device, and is
differentiable w.r.t. ``input`` through autograd (``rois`` get no gradient, as
with the C++ op). Per RoI:

- the box corners are scaled by ``spatial_scale`` and, if ``aligned``, shifted
  by -0.5; with ``aligned=False`` the RoI width/height are clamped to >= 1;
- each of the ``PH x PW`` bins averages ``gh x gw`` bilinear samples placed at
  the centres of a regular sub-grid of the bin, with ``gh = gw =
  sampling_ratio`` if that is > 0, else ``gh = ceil(roi_h / PH)`` and ``gw =
  ceil(roi_w / PW)`` for that RoI (the average is over that RoI's own count,
  at least 1);
- a sample with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` contributes 0;
  otherwise ``y`` and ``x`` are clamped into ``[0, H-1]`` and ``[0, W-1]`` and
  interpolated bilinearly.

The last rule is the C++ kernel's. torchvision's Python fallback clamps but
does NOT zero samples beyond -1/H, so for RoIs more than a pixel outside the map
the two differ; this module follows the C++ kernel.

Bilinear weights are separable, so each RoI gathers, once, the values at the
``2 gh PH`` sample rows times ``2 gw PW`` sample columns it needs and contracts
them with the row and column weights (zero for out-of-range samples and for
samples beyond the RoI's own grid). Adaptive grids are padded only to the
largest ``gh``/``gw`` any RoI of the call needs, and RoIs are processed in
chunks of at most ``_MAX_CHUNK_ELEMENTS`` gathered values, so memory is
``O(K C PH PW gh gw)``, never ``O(K C PH PW H W)``. Coordinates and weights are
computed in float64 for float64 input and in float32 otherwise (the result is
cast back to the input dtype).

:func:`install_roi_align` puts :func:`roi_align` in place of the module-level
name ``_roi_align`` inside ``torchvision.ops.roi_align`` (only there), which is
what ``torchvision.ops.roi_align`` (and so ``RoIAlign``, ``MultiScaleRoIAlign``
and Mask R-CNN's ``project_masks_on_boxes``) calls when the compiled ops are
missing. It also replaces that module's ``is_compile_supported`` name with one
that answers ``True``: torchvision only takes the Python path on devices where
``torch.compile`` works, and otherwise raises "Couldn't load custom C++ ops";
ours needs no compiler. Nothing is changed when torchvision's compiled ops are
available. :func:`vittt.compat.ensure_torchvision` calls it in its fallback
case, so ``import vittt`` installs it.
"""

from __future__ import annotations

import contextlib
import sys

import torch

__all__ = ["install_roi_align", "original_roi_align", "roi_align", "roi_align_installed", "uninstall_roi_align"]

# Upper bound on the values gathered per chunk of RoIs (a single RoI that needs more is still done whole).
_MAX_CHUNK_ELEMENTS = 1 << 24

# What install_roi_align() replaced inside torchvision.ops.roi_align, to put back on uninstall: name -> object.
_REPLACED: dict[str, object] = {}


def _axis_taps(start, bin_size, grid, max_grid, pooled, size, compute_dtype):
    """Bilinear taps along one axis for every sample of every bin.

    ``start``, ``bin_size`` and ``grid`` are per RoI ``[K]``. Returns ``(index,
    weight)``, both ``[K, pooled, 2 * max_grid]``: for sample ``i`` of bin ``p``
    the low tap is at ``[..., 2 i]`` and the high tap at ``[..., 2 i + 1]``.
    Samples outside ``[-1, size]`` and samples ``i >= grid`` of their RoI get
    weight 0 (their indices stay valid).
    """
    device = start.device
    p = torch.arange(pooled, device=device, dtype=compute_dtype)
    i = torch.arange(max_grid, device=device)
    grid_f = grid.clamp(min=1).to(compute_dtype)[:, None, None]
    # Same evaluation order as the C++ kernel: start + p * bin + (i + .5) * bin / grid.
    coord = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (i.to(compute_dtype) + 0.5)[None, None, :] * bin_size[:, None, None] / grid_f
    )  # [K, pooled, max_grid]
    keep = (coord >= -1.0) & (coord <= size) & (i[None, None, :] < grid[:, None, None])
    coord = coord.clamp(0, size - 1)
    low = coord.floor().long()  # coord >= 0, so floor == the kernel's int cast
    high = (low + 1).clamp(max=size - 1)
    frac = coord - low  # 0 on the last row/column, where the kernel sets y = y_low
    zero = torch.zeros((), dtype=compute_dtype, device=device)
    w_low = torch.where(keep, 1.0 - frac, zero)
    w_high = torch.where(keep, frac, zero)
    index = torch.stack([low, high], dim=-1).flatten(-2)
    weight = torch.stack([w_low, w_high], dim=-1).flatten(-2)
    return index, weight


def _roi_align_chunk(flat_input, batch, y_index, y_weight, x_index, x_weight, height, width, count):
    """RoIAlign of one chunk of RoIs from channels-last ``flat_input`` ``[N*H*W, C]``; returns ``[k, C, PH, PW]``."""
    k, ph, a = y_index.shape
    _, pw, b = x_index.shape
    channels = flat_input.size(1)
    rows = (batch[:, None, None] * height + y_index).view(k, ph * a, 1)
    flat_index = (rows * width + x_index.view(k, 1, pw * b)).flatten()
    # one channel: a 1-d gather is several times faster than gathering rows of one element
    source = flat_input.view(-1) if channels == 1 else flat_input
    values = source.index_select(0, flat_index).view(k, ph, a, pw * b * channels).to(y_weight.dtype)
    # contract the row taps with a batched matmul, then the column taps
    rows_done = torch.matmul(y_weight.view(k, ph, 1, a), values).view(k, ph, pw, b, channels)
    out = torch.einsum("kpqbc,kqb->kcpq", rows_done, x_weight)
    return out / count[:, None, None, None]


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign with the semantics of torchvision's C++ kernel (see the module docstring).

    Same signature as torchvision's ``_roi_align``: ``input`` is ``[N, C, H, W]``,
    ``rois`` is ``[K, 5]`` with rows ``(batch_index, x1, y1, x2, y2)`` in input
    coordinates times ``1 / spatial_scale``. Returns ``[K, C, pooled_height,
    pooled_width]`` in ``input``'s dtype, differentiable w.r.t. ``input``.
    """
    torch._check(input.dim() == 4, lambda: f"input should be a 4d tensor, got {input.dim()}D")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5, lambda: f"rois should be a [K, 5] tensor, got {list(rois.shape)}"
    )
    torch._check(input.is_floating_point(), lambda: f"input should be a float tensor, got {input.dtype}")
    torch._check(
        pooled_height > 0 and pooled_width > 0,
        lambda: f"output size should be positive, got {pooled_height}x{pooled_width}",
    )
    _, channels, height, width = input.shape
    num_rois = rois.size(0)

    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    device_type = input.device.type
    autocast_off = (  # we choose the compute dtype ourselves; autocast would run the contractions in half
        torch.autocast(device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        else contextlib.nullcontext()
    )
    with autocast_off:
        rois = rois.detach().to(device=input.device, dtype=compute_dtype)
        offset = 0.5 if aligned else 0.0
        batch = rois[:, 0].long()  # the kernel's int cast truncates towards zero, as does .long()
        start_w = rois[:, 1] * spatial_scale - offset
        start_h = rois[:, 2] * spatial_scale - offset
        roi_w = rois[:, 3] * spatial_scale - offset - start_w
        roi_h = rois[:, 4] * spatial_scale - offset - start_h
        if not aligned:
            roi_w = roi_w.clamp(min=1.0)
            roi_h = roi_h.clamp(min=1.0)
        bin_h = roi_h / pooled_height
        bin_w = roi_w / pooled_width
        if sampling_ratio > 0:
            grid_h = torch.full((num_rois,), sampling_ratio, dtype=torch.long, device=input.device)
            grid_w = grid_h
            max_grid_h = max_grid_w = sampling_ratio
        else:
            # An empty or inverted RoI (aligned=True) gets a grid of <= 0 samples: no samples, output 0.
            grid_h = torch.ceil(roi_h / pooled_height).long().clamp(min=0)
            grid_w = torch.ceil(roi_w / pooled_width).long().clamp(min=0)
            max_grid_h, max_grid_w = 1, 1
            if num_rois > 0:  # one host sync; at least 1 so that all-empty calls still give (zero) outputs
                max_grid_h, max_grid_w = (max(int(v), 1) for v in torch.stack([grid_h.max(), grid_w.max()]).tolist())
        count = (grid_h * grid_w).clamp(min=1).to(compute_dtype)

        y_index, y_weight = _axis_taps(start_h, bin_h, grid_h, max_grid_h, pooled_height, height, compute_dtype)
        x_index, x_weight = _axis_taps(start_w, bin_w, grid_w, max_grid_w, pooled_width, width, compute_dtype)
        flat_input = input.permute(0, 2, 3, 1).reshape(-1, channels)

        per_roi = channels * pooled_height * pooled_width * 4 * max_grid_h * max_grid_w
        chunk = max(1, _MAX_CHUNK_ELEMENTS // per_roi)
        outs = [
            _roi_align_chunk(
                flat_input,
                batch[s : s + chunk],
                y_index[s : s + chunk],
                y_weight[s : s + chunk],
                x_index[s : s + chunk],
                x_weight[s : s + chunk],
                height,
                width,
                count[s : s + chunk],
            )
            for s in range(0, max(num_rois, 1), chunk)  # K = 0 runs once on empty slices: [0, C, PH, PW]
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.to(input.dtype)


def _compile_not_needed(device_type) -> bool:
    """Stands in for ``is_compile_supported`` inside ``torchvision.ops.roi_align``: our fallback runs anywhere."""
    return True


def _torchvision_roi_align_module():
    import torchvision.ops.roi_align  # noqa: F401  (the module, not the function the package re-exports)

    return sys.modules["torchvision.ops.roi_align"]


def roi_align_installed() -> bool:
    """Whether ``torchvision.ops.roi_align`` currently dispatches to :func:`roi_align` (``False`` if not imported)."""
    module = sys.modules.get("torchvision.ops.roi_align")
    return module is not None and getattr(module, "_roi_align", None) is roi_align


def install_roi_align() -> bool:
    """Make torchvision's RoIAlign use :func:`roi_align` when its compiled ops are missing; idempotent.

    Imports ``torchvision.ops.roi_align``, so call it only once torchvision is
    importable (after :func:`vittt.compat.ensure_torchvision`). Returns whether
    ours is installed; if ``torchvision.extension._has_ops()`` is ``True``
    nothing is changed and ``False`` is returned.
    """
    import torchvision.extension

    if torchvision.extension._has_ops():
        return roi_align_installed()
    module = _torchvision_roi_align_module()
    if module._roi_align is not roi_align:
        _REPLACED["_roi_align"] = module._roi_align
        module._roi_align = roi_align
    if getattr(module, "is_compile_supported", None) is not _compile_not_needed:
        _REPLACED["is_compile_supported"] = getattr(module, "is_compile_supported", None)
        module.is_compile_supported = _compile_not_needed
    return True


def uninstall_roi_align() -> bool:
    """Put back what :func:`install_roi_align` replaced; returns whether anything was restored."""
    module = sys.modules.get("torchvision.ops.roi_align")
    if module is None or not _REPLACED:
        return False
    for name, value in _REPLACED.items():
        setattr(module, name, value)
    _REPLACED.clear()
    return True


def original_roi_align():
    """torchvision's own pure-Python ``_roi_align``, unwrapped from its lazy ``torch.compile`` (runs eagerly).

    The reference the tests compare against; slow and memory-hungry with
    adaptive sampling (see the module docstring).
    """
    fn = _REPLACED.get("_roi_align")
    if fn is None:
        fn = _torchvision_roi_align_module()._roi_align
    while fn is not roi_align and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    if fn is roi_align:
        raise RuntimeError("torchvision's _roi_align is not reachable: it was replaced outside install_roi_align()")
    return fn
