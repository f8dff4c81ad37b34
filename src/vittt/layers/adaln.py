"""Diffusion-transformer pieces (DiT, Peebles & Xie 2023; DiT³, Han et al. 2026): timestep and label embedders,
adaLN-Zero modulation, the 2-D sin-cos position table for any grid, the DiT / DiT³ block and the final layer.

    modulate(u, shift, scale) = u · (1 + scale) + shift                  (broadcast over tokens)
    DiT³ block:  x = x + CPE(x)                                          (3×3 depth-wise conv, bias; DiT³ only)
                 (s1, c1, g1, s2, c2, g2) = Linear(SiLU(c)).chunk(6)
                 x = x + g1 · Mixer(modulate(LN(x), s1, c1), grid)       (TTT mixer, or attention for DiT)
                 x = x + g2 · MLP(modulate(LN(x), s2, c2))               (GELU-tanh MLP)
    LN: LayerNorm without affine parameters, eps 1e-6.
"""
from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Optional

import torch
from torch import nn
from timm.layers import Attention

from ..ops._capture import symbolic_shapes
from .block import cpe_residual
from .grid import GridSize
from .mlp import TokenMlp
from .ttt import TTTMixer

__all__ = ['modulate', 'timestep_features', 'TimestepEmbedder', 'LabelEmbedder', 'sincos_2d', 'GridAttention',
           'DiTBlock', 'FinalLayer']


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C] · (1 + scale [B, C]) + shift [B, C]``."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal features ``[cos(t f), sin(t f)]`` (cos first), ``f_k = max_period^(-k / half)`` with
    ``half = dim // 2`` (divisor half, not half - 1 as in diffusers); an odd ``dim`` is zero-padded. ``t``: [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats


class TimestepEmbedder(nn.Module):
    """``t [B] -> [B, D]``: sinusoidal features (256) then Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class LabelEmbedder(nn.Module):
    """``y [B] -> [B, D]``; with ``dropout_prob > 0`` one extra row, index ``num_classes``, is the null class.

    In training each label is replaced by the null class with probability ``dropout_prob`` (``torch.rand`` on the
    global RNG, as the official code), unless ``drop_mask`` (bool [B], True = drop) says which."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)

    def forward(self, y: torch.Tensor, drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if drop_mask is None and self.training and self.dropout_prob > 0:
            drop_mask = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        if drop_mask is not None:
            if self.dropout_prob <= 0:
                raise ValueError('label dropout needs a null class: build the model with class_dropout_prob > 0')
            y = torch.where(drop_mask.to(torch.bool), torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


@lru_cache(maxsize=32)
def _sincos_2d(h: int, w: int, dim: int, base_h: Optional[int], base_w: Optional[int]) -> torch.Tensor:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # the cache must hold real CPU tensors: a table first built under FakeTensorMode (MAC counting) or a meta /
    # CUDA default device would otherwise be handed to every later forward at that grid
    with unset_fake_temporarily(), torch.device('cpu'):
        return _sincos_table(h, w, dim, base_h, base_w)


def _sincos_table(h: int, w: int, dim: int, base_h: Optional[int], base_w: Optional[int]) -> torch.Tensor:
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(h, dtype=torch.float64)
    cols = torch.arange(w, dtype=torch.float64)
    if base_h:  # diffusers / PixArt-style: positions scaled to the base grid
        rows, cols = rows * (base_h / h), cols * (base_w / w)

    def encode(pos):  # [P] -> [P, dim / 2]: sin then cos
        args = pos[:, None] * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    col_part = encode(cols)[None, :, :].expand(h, w, 2 * quarter)   # first half: the column index (x)
    row_part = encode(rows)[:, None, :].expand(h, w, 2 * quarter)   # second half: the row index (y)
    return torch.cat([col_part, row_part], dim=-1).reshape(h * w, dim).float()


def sincos_2d(grid_size: GridSize, dim: int, base_grid: Optional[GridSize] = None) -> torch.Tensor:
    """The MAE / DiT 2-D sin-cos table ``[H·W, dim]`` (float32, computed in float64, cached per grid): the first half
    of the channels encodes the column index, the second half the row index, each ``[sin(p ω_k), cos(p ω_k)]`` with
    ``ω_k = 10000^(-k / (dim/4))``. At the training grid it equals the official stored ``pos_embed``; other grids
    (any aspect ratio) extrapolate the same formula, or interpolate to ``base_grid`` when given."""
    if dim % 4:
        raise ValueError(f'the sin-cos position table needs a width divisible by 4, got {dim}')
    h, w = grid_size
    base_h, base_w = base_grid if base_grid is not None else (None, None)
    if symbolic_shapes():  # computed in the graph: a cache key would specialise the sizes
        return _sincos_table(h, w, int(dim), base_h, base_w)
    return _sincos_2d(int(h), int(w), int(dim), base_h, base_w)


class GridAttention(Attention):
    """timm ``Attention`` (keys ``qkv``, ``proj``) called like a TTT mixer, ``(x, grid_size)``: the grid is ignored."""

    def forward(self, x: torch.Tensor, grid_size: Optional[GridSize] = None, attn_mask=None) -> torch.Tensor:
        return super().forward(x, attn_mask=attn_mask)


class DiTBlock(nn.Module):
    """The adaLN-Zero block on tokens ``[B, N, D]`` with conditioning ``c [B, D]``; see the module docstring.

    Args:
        mixer: ``'ttt'`` (the ViT³ TTT mixer, qkv bias, no RoPE) or ``'attention'`` (timm ``Attention``, qkv bias).
        cpe: the 3×3 depth-wise conditional position encoding in front (DiT³; DiT has none).
        ttt_kwargs: passed to :class:`~vittt.layers.TTTMixer`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, mixer: str = 'ttt', cpe: bool = True,
                 ttt_kwargs: Optional[dict] = None):
        super().__init__()
        if mixer not in ('ttt', 'attention'):
            raise ValueError(f"mixer must be 'ttt' or 'attention', got {mixer!r}")
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = (TTTMixer(dim, num_heads, qkv_bias=True, **(ttt_kwargs or {})) if mixer == 'ttt'
                     else GridAttention(dim, num_heads=num_heads, qkv_bias=True))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate='tanh'))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        if self.cpe is not None:
            x = cpe_residual(self.cpe, x, grid_size)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1), grid_size))
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2), grid_size))


class FinalLayer(nn.Module):
    """``LN -> modulate(shift, scale from c) -> Linear(D, p·p·C_out)`` (keys ``linear``, ``adaLN_modulation.1``)."""

    def __init__(self, dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
