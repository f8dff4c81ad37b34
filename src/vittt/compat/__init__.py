"""Compatibility shims applied when ``vittt`` is imported.

Importing this package runs :func:`ensure_torchvision`, which must happen
before torchvision (or timm, which imports it) is imported. See
:mod:`vittt.compat.torchvision_ops` for why.
"""

from vittt.compat.torchvision_ops import ensure_torchvision, fallback_installed, nms_reference

TORCHVISION_FALLBACK = ensure_torchvision()

__all__ = ["TORCHVISION_FALLBACK", "ensure_torchvision", "fallback_installed", "nms_reference"]
