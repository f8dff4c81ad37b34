"""Compatibility shims applied when ``vittt`` is imported.

Importing this package runs :func:`ensure_torchvision`, which must happen
before torchvision (or timm, which imports it) is imported. See
:mod:`vittt.compat.torchvision_ops` for why, and :mod:`vittt.compat.roi_align`
for the RoIAlign it installs when torchvision's C++ extension is unusable.
"""

# The function itself stays ``vittt.compat.roi_align.roi_align``: exporting it here would shadow the submodule.
from vittt.compat.roi_align import (  # does not import torchvision
    install_roi_align,
    original_roi_align,
    roi_align_installed,
    uninstall_roi_align,
)
from vittt.compat.torchvision_ops import ensure_torchvision, fallback_installed, nms_blocked, nms_reference

TORCHVISION_FALLBACK = ensure_torchvision()

__all__ = [
    "TORCHVISION_FALLBACK",
    "ensure_torchvision",
    "fallback_installed",
    "install_roi_align",
    "nms_reference",
    "nms_blocked",
    "original_roi_align",
    "roi_align_installed",
    "uninstall_roi_align",
]
