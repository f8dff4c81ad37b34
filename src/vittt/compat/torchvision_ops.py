"""Fallback for torchvision's C++ ``nms``/``qnms`` ops when its extension cannot load.

Why this exists
---------------
The torchvision 0.28.0 wheel from PyPI for Linux is a CUDA build (``+cu130``).
Its C++ extension (``torchvision/_C.so``) links against ``libc10_cuda.so`` and friends,
so next to the CPU-only torch 2.13.0 wheel it fails to load. torchvision guards
almost everything that needs the extension with ``extension._has_ops()``, but
``torchvision/_meta_registrations.py`` calls
``torch.library.register_fake("torchvision::nms")`` (and ``"torchvision::qnms"``)
unconditionally, so ``import torchvision`` dies with::

    RuntimeError: operator torchvision::nms does not exist

and timm, which imports torchvision, cannot be imported either.

What it does
------------
:func:`ensure_torchvision` must run before torchvision is first imported
(``vittt/__init__.py`` does this first thing). It

1. returns ``False`` and changes nothing if torchvision is not installed, or if
   ``torchvision::nms`` is already registered, or if torchvision's own
   ``_C`` extension loads (it is loaded with ``torch.ops.load_library``, exactly
   as torchvision itself would; torchvision's later load of the same file is a
   no-op). On a normal install this is the whole effect.
2. otherwise defines the two ops with the schemas of the real extension,
   ``nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor`` and
   ``qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor``, backed
   by a pure-torch greedy NMS (any device; :func:`nms_blocked`, equal to the
   plain :func:`nms_reference`). torchvision then attaches its own
   fake (meta) kernels to them during import, as usual.
3. imports torchvision (so in this case ``import vittt`` imports it) and
   replaces the ``_assert_has_ops`` name inside ``torchvision.ops.boxes`` (only
   there) with a no-op, so that ``torchvision.ops.nms`` / ``batched_nms`` reach
   the fallback ops. The only
   other caller in that module is ``box_iou`` with rotated box formats, which
   then fails with "no attribute 'box_iou_rotated'" instead of torchvision's
   "Couldn't load custom C++ ops" message.
4. calls :func:`vittt.compat.roi_align.install_roi_align`, which makes
   ``torchvision.ops.roi_align`` (and ``RoIAlign``, ``MultiScaleRoIAlign``,
   Mask R-CNN's mask targets) use a fast exact pure-torch RoIAlign instead of
   torchvision's own Python fallback, which is lazily ``torch.compile``-d
   (about 70 s cold) and, with adaptive sampling, samples every pixel of the
   map for every bin (see :mod:`vittt.compat.roi_align`). TorchScript-ed
   models call the C++ op directly and still fail.

Not fixed here: the other ops of the extension (``roi_pool``, ``ps_roi_align``,
``ps_roi_pool``, ``deform_conv2d``, quantized ``qroi_align``, ...) still raise
torchvision's "Couldn't load custom C++ ops" error. Image
decoding/encoding in ``torchvision.io`` (``decode_jpeg``, ``read_image``, ...)
does not work either, because ``torchvision/image.so`` is the same CUDA build
and fails to load; use PIL for image files.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import numpy as np
import torch

__all__ = ["ensure_torchvision", "fallback_installed", "nms_reference", "nms_blocked"]

# None until ensure_torchvision() has run; then whether the fallback is installed.
_FALLBACK_INSTALLED: bool | None = None
# The torch.library.Library that owns the fallback ops. It must stay referenced:
# the ops are deregistered when it is garbage collected.
_LIB: torch.library.Library | None = None

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _op_registered(qualname: str) -> bool:
    """Whether the dispatcher knows the default-overload schema of ``qualname`` (``"torchvision::nms"``)."""
    find_schema = getattr(torch._C, "_dispatch_find_schema_or_throw", None)
    if find_schema is None:  # private API gone in some torch version: ask the op namespace
        namespace, name = qualname.split("::")
        return hasattr(getattr(torch.ops, namespace), name)
    try:
        find_schema(qualname, "")
    except RuntimeError:
        return False
    return True


def _load_real_extension() -> bool:
    """Try to load torchvision's own ``_C`` extension without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib_dir = list(spec.submodule_search_locations)[0]
    if os.name == "nt":  # torchvision does the same before loading its DLL
        os.add_dll_directory(lib_dir)
    finder = importlib.machinery.FileFinder(
        lib_dir, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    )
    ext = finder.find_spec("_C")
    if ext is None or ext.origin is None:
        return False
    try:
        torch.ops.load_library(ext.origin)
    except (OSError, ImportError, RuntimeError):
        return False
    return _op_registered("torchvision::nms")


def _nms_inputs(dets: torch.Tensor, scores: torch.Tensor):
    """The checked arguments of an NMS: ``(boxes in float32 / float64, indices by decreasing score, ties in input
    order)``, or None when there are no boxes."""
    torch._check(dets.dim() == 2, lambda: f"boxes should be a 2d tensor, got {dets.dim()}D")
    torch._check(dets.size(1) == 4, lambda: f"boxes should have 4 elements in dimension 1, got {dets.size(1)}")
    torch._check(scores.dim() == 1, lambda: f"scores should be a 1d tensor, got {scores.dim()}D")
    torch._check(
        dets.size(0) == scores.size(0),
        lambda: f"boxes and scores should have same number of elements in dimension 0, "
        f"got {dets.size(0)} and {scores.size(0)}",
    )
    if dets.size(0) == 0:
        return None
    if dets.dtype not in (torch.float32, torch.float64):
        dets = dets.float()
    return dets, torch.argsort(scores, descending=True, stable=True)


def nms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with the semantics of torchvision's CPU kernel.

    Boxes are ``(x1, y1, x2, y2)``. Visit boxes by decreasing score (stable
    sort, so ties keep input order); keep a box unless a kept box has
    IoU > ``iou_threshold`` with it. Returns the kept indices as int64, in
    decreasing score order. IoU is computed in the box dtype (float32 for
    half/bfloat16/integer boxes) and compared to the threshold in float64, like
    the C++ kernel; 0/0 IoU of empty boxes is NaN and never suppresses.
    """
    prepared = _nms_inputs(dets, scores)
    if prepared is None:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    dets, order = prepared
    n = dets.size(0)
    x1, y1, x2, y2 = dets[order].unbind(1)
    areas = (x2 - x1) * (y2 - y1)

    keep = torch.empty(n, dtype=torch.long, device=dets.device)
    num_kept = 0
    remaining = torch.arange(n, device=dets.device)  # positions in score order, not yet suppressed
    while remaining.numel() > 0:
        i = remaining[0]
        keep[num_kept] = i
        num_kept += 1
        rest = remaining[1:]
        w = (torch.minimum(x2[rest], x2[i]) - torch.maximum(x1[rest], x1[i])).clamp(min=0)
        h = (torch.minimum(y2[rest], y2[i]) - torch.maximum(y1[rest], y1[i])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        remaining = rest[~(iou.double() > iou_threshold)]
    return order[keep[:num_kept]]


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` [M, 4] with every box of ``b`` [N, 4] in the boxes' dtype (the reference's
    arithmetic: the same products and sums per pair)."""
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms_blocked(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float, block: int = 1024) -> torch.Tensor:
    """The same result as :func:`nms_reference`, fast: boxes are visited in score order by blocks of ``block``.

    Each block is first suppressed by every box kept in earlier blocks (one [kept, block] IoU matrix), then resolved
    greedily inside itself from its [block, block] "suppresses" matrix, walked in NumPy. Memory is O(block · (kept +
    block)); time is dominated by a few large tensor operations instead of one small kernel sequence per kept box
    (the reference took about half of a small Mask R-CNN training step on CPU)."""
    prepared = _nms_inputs(dets, scores)
    if prepared is None:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    dets, order = prepared
    n = dets.size(0)
    boxes = dets[order]
    kept_positions = []
    kept_boxes = boxes[:0]
    for start in range(0, n, block):
        chunk = boxes[start:start + block]
        alive = torch.ones(len(chunk), dtype=torch.bool, device=dets.device)
        if len(kept_boxes):
            alive = ~(_pairwise_iou(kept_boxes, chunk).double() > iou_threshold).any(dim=0)
        idx = alive.nonzero().flatten()
        if not len(idx):
            continue
        cand = chunk[idx]
        suppresses = (_pairwise_iou(cand, cand).double() > iou_threshold).triu(diagonal=1).cpu().numpy()
        dead = np.zeros(len(idx), dtype=bool)
        keep_local = []
        for i in range(len(idx)):
            if not dead[i]:
                keep_local.append(i)
                dead |= suppresses[i]
        keep_local = torch.as_tensor(keep_local, dtype=torch.long, device=dets.device)
        kept_positions.append(idx[keep_local] + start)
        kept_boxes = torch.cat([kept_boxes, cand[keep_local]])
    return order[torch.cat(kept_positions)] if kept_positions else order[:0]


def _define_fallback_ops() -> torch.library.Library:
    lib = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        # CompositeExplicitAutograd: one kernel for every device; leaves the Meta key
        # free for the fake kernels torchvision registers while it is imported.
        # qnms receives the integer representations of quantized boxes/scores; IoU and
        # score order are invariant to a shared scale and zero point, so plain NMS applies.
        lib.impl(name, nms_blocked, "CompositeExplicitAutograd")
    return lib


def _nms_ops_available() -> None:
    """Stands in for ``torchvision.extension._assert_has_ops`` inside ``torchvision.ops.boxes``."""
    return None


def _patch_torchvision_boxes() -> None:
    import torchvision.ops.boxes as boxes  # safe now: torchvision::nms exists

    boxes._assert_has_ops = _nms_ops_available


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` and ``torchvision.ops.nms`` work; idempotent.

    Returns ``True`` if the pure-torch fallback is installed (torchvision's C++
    extension is unusable), ``False`` if nothing had to be done.
    """
    global _FALLBACK_INSTALLED, _LIB
    if _FALLBACK_INSTALLED is not None:
        return _FALLBACK_INSTALLED
    if _LIB is None:
        if (
            importlib.util.find_spec("torchvision") is None
            or _op_registered("torchvision::nms")  # real extension (or someone else) provides it
            or _load_real_extension()
        ):
            _FALLBACK_INSTALLED = False
            return False
        _LIB = _define_fallback_ops()
    _patch_torchvision_boxes()
    from vittt.compat.roi_align import install_roi_align

    install_roi_align()
    _FALLBACK_INSTALLED = True
    return True


def fallback_installed() -> bool:
    """Whether :func:`ensure_torchvision` installed the fallback (``False`` before it ran)."""
    return bool(_FALLBACK_INSTALLED)
