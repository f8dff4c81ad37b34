"""Token MLPs: ``fc1 -> GELU -> fc2`` (ViT³), optionally with H-ViT³'s depth-wise conv on the hidden map."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .grid import GridSize, map_to_tokens, tokens_to_map

__all__ = ['TokenMlp']


class TokenMlp(nn.Module):
    """``fc2(act(fc1(x)))``; with ``dwconv=True``: ``a = act(fc1(x)); fc2(act(a + DWConv3x3(a)))`` on the grid."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: Optional[int] = None, dwconv: bool = False,
                 act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.dwc = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim) if dwconv else None
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        if self.dwc is not None:
            x = self.act(x + map_to_tokens(self.dwc(tokens_to_map(x, grid_size))))
        return self.drop2(self.fc2(x))
