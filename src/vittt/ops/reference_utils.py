"""Shared pieces of the plain autograd references (tests only): per-sample leaves and the explicit soft norm."""
from __future__ import annotations

import torch

__all__ = ['per_sample_leaf', 'explicit_soft_norm']


def per_sample_leaf(w: torch.Tensor, shape) -> torch.Tensor:
    out = w.expand(*shape).clone()
    if not out.requires_grad:
        out.requires_grad_(True)
    return out


def explicit_soft_norm(g: torch.Tensor, dims) -> torch.Tensor:
    return g / (g.pow(2).sum(dim=dims, keepdim=True).sqrt() + 1.0)
