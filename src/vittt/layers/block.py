"""The ViT³ / H-ViT³ block: conditional position encoding, TTT mixer, MLP, each as a residual branch.

    x = x + DWConv3x3(x)                       (CPE, on the token grid, with bias)
    x = x + DropPath(TTT(Norm(x), grid))
    x = x + DropPath(MLP(Norm(x), grid))
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.layers import DropPath

from ..ops._capture import eval_inference
from ..ops.onednn import plain_linear
from .conv import cpe_residual
from .grid import GridSize, residual
from . import lean
from .lean import DEFAULT_CHUNK_TOKENS, bands
from .mlp import TokenMlp
from .ttt import TTTMixer

__all__ = ['TTTBlock', 'cpe_residual', 'residual']


class TTTBlock(nn.Module):
    """One block on tokens ``[B, N, C]`` with their grid.

    Args:
        dim, num_heads: width and SwiGLU heads of the TTT mixer.
        mlp_ratio: MLP hidden width / dim.
        norm_eps: LayerNorm eps (1e-6 in ViT³, PyTorch's 1e-5 in H-ViT³).
        mlp_dwconv: H-ViT³'s depth-wise conv inside the MLP.
        rope: optional 2-D RoPE module given to the mixer (H-ViT³).
        drop_path: stochastic-depth rate of both residual branches.
        ttt_kwargs: passed to :class:`TTTMixer` (inner loss, scale, inner lr, gradient normalisation, ...).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, mlp_dwconv: bool = False, rope: Optional[nn.Module] = None,
                 drop_path: float = 0.0, proj_drop: float = 0.0, ttt_kwargs: Optional[dict] = None):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = TTTMixer(dim, num_heads, qkv_bias=qkv_bias, rope=rope, **(ttt_kwargs or {}))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio), dwconv=mlp_dwconv, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.memory_lean, self.chunk_tokens = False, DEFAULT_CHUNK_TOKENS  # see vittt.layers.set_memory_lean

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        # Each residual sum is never formed in ``x``, which the caller may keep (see ``residual``).
        x = cpe_residual(self.cpe, x, grid_size)
        # eval without autograd: residuals in place, the MLP (and, memory-lean, the mixer) in bands (Python loops)
        if eval_inference(self):
            # (the bands read the QKV projection's weights: a hooked or subclassed one runs whole)
            if self.memory_lean and self.attn.supports_lean() and plain_linear(self.attn.qkv):
                x += self.attn.forward_lean(x, grid_size, self.norm1, self.chunk_tokens)
            else:
                x = residual(self.attn(self.norm1(x), grid_size), x)
            return self._mlp_in_bands(x, grid_size)
        x = residual(self.drop_path1(self.attn(self.norm1(x), grid_size)), x)
        return residual(self.drop_path2(self.mlp(self.norm2(x), grid_size)), x)

    def _mlp_in_bands(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        """``x + MLP(norm2(x))`` without autograd, in bands of grid rows: the MLP is per token (H-ViT³'s convolution
        needs one row of context), so its hidden activations exist for one band at a time. In memory-lean mode the
        bands have about ``chunk_tokens`` tokens; otherwise as many as keep the band's hidden activations under
        :data:`~vittt.layers.lean.CHUNK_ELEMENTS` (one band, and no copy, wherever the whole fits: the bands' context
        rows are work done twice, a quarter more at 1024-token bands on H-ViT³'s 256-wide first stage)."""
        halo = 1 if self.mlp.dwc is not None else 0
        chunk = self.chunk_tokens if self.memory_lean else \
            lean.CHUNK_ELEMENTS // max(1, x.shape[0] * self.mlp.fc1.out_features)
        band_list = bands(grid_size, chunk, halo)
        if len(band_list) == 1:
            return self.mlp(self.norm2(x), grid_size).add_(x)
        out = torch.empty_like(x)
        for band in band_list:
            hidden = self.mlp(self.norm2(x[:, band.ctx_tokens]), (band.ctx_stop - band.ctx_start, grid_size[1]))
            out[:, band.tokens] = band.center(hidden).add_(x[:, band.tokens])
        return out
