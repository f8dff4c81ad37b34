"""``Linear(GELU(h))`` keeping only ``h`` for backward (the MLP's training memory): ``fused``; its reference is
``F.linear(F.gelu(h), W, b)`` (tests/ops/test_gelu_linear.py)."""
from .fused import gelu_linear

__all__ = ['gelu_linear']
