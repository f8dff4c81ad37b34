"""The Vision-TTT token mixer (Kong et al., 2026): mini-batch TTT over two "datasets" of the same tokens.

    x -> shared Q/K projection -> two depth-wise Conv2d on the token grid -> Q, K   ("Conv2d-based preprocessing")
    x -> V projection;  x -> token-wise inner learning rate  base_lr · sigmoid(x θ_h + β_h) / d
    for each scan order (default: raster, reverse raster), with its own learnable initial state:
        mini-batch TTT (TTT-Linear by default) over the tokens in that order, outputs put back in raster order
    merge (sum) -> post LayerNorm -> gate GELU(x W_g) ⊙ · -> output projection

Every choice the sources leave open is a constructor switch; docs/vision_ttt.md lists each default with its
provenance. Prefix tokens (a class token) skip the convolutions and are placed at the end of every scan, so they
read the state after all patch tokens.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..ops.inner import make_inner_function
from ..ops.onednn import linear_layer
from ..ops.scan import ttt_scan, ttt_scan_fused
from ..ops.precision import in_float32
from .grid import GridSize, map_to_tokens, tokens_to_map

__all__ = ['TTTInnerState', 'VisionTTTMixer', 'SCAN_ORDERS', 'MERGE_RULES']

SCAN_ORDERS = ('forward', 'reverse', 'column', 'column_reverse')
MERGE_RULES = ('sum', 'mean', 'concat')


class TTTInnerState(nn.Module):
    """Learnable initial state of one TTT-Linear (``w, b``) or TTT-MLP (``w1, b1, w2, b2``) per head, plus the
    inner LayerNorm's per-head affine parameters: the state of :class:`~vittt.ops.inner.TTTLinear` /
    :class:`~vittt.ops.inner.TTTMLP` (``fn``), one ``[h, rows, cols]`` parameter per state tensor. Weights ~ N(0, 0.02),
    biases 0, LayerNorm 1 / 0."""

    def __init__(self, kind: str, num_heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        if kind not in ('linear', 'mlp'):
            raise ValueError(f"inner model must be 'linear' or 'mlp', got {kind!r}")
        ratio = 1 if kind == 'linear' else int(head_dim * mlp_ratio) // head_dim
        if kind == 'mlp' and ratio * head_dim != int(head_dim * mlp_ratio):
            raise ValueError(f'inner_mlp_ratio × head_dim must be a multiple of head_dim, got {mlp_ratio} × {head_dim}')
        self.kind = kind
        self.fn = make_inner_function(f'ttt_{kind}', head_dim, ratio)
        for name, (rows, cols) in self.fn.shapes().items():
            if name.startswith('w'):
                value = torch.randn(num_heads, rows, cols) * 0.02
            else:
                value = (torch.ones if name == 'ln_weight' else torch.zeros)(num_heads, rows, cols)
            self.register_parameter(name, nn.Parameter(value))

    def tensors(self) -> Dict[str, torch.Tensor]:
        return dict(self.named_parameters(recurse=False))


def _scan_index(order: str, grid_size: GridSize, num_prefix: int, device) -> Optional[torch.Tensor]:
    """Positions (into ``[prefix..., patches...]``) in scan order; prefix tokens last. None = identity."""
    h, w = grid_size
    if order == 'forward' and num_prefix == 0:
        return None
    raster = torch.arange(h * w, device=device)
    if order in ('column', 'column_reverse'):
        raster = raster.reshape(h, w).t().reshape(-1)
    if order in ('reverse', 'column_reverse'):
        raster = raster.flip(0)
    return torch.cat([raster + num_prefix, torch.arange(num_prefix, device=device)])


class VisionTTTMixer(nn.Module):
    """Token mixer ``[B, P + H·W, C] -> same`` (P prefix tokens first).

    Args:
        dim, num_heads: width and TTT heads (head width d = dim / num_heads).
        inner: ``'linear'`` (TTT-Linear) or ``'mlp'`` (TTT-MLP, hidden ``inner_mlp_ratio · d``).
        mini_batch_size: tokens per inner mini-batch (≥ 1; ≥ N means one full-batch step).
        causal: within a mini-batch, token i uses only tokens ≤ i (vanilla TTT); default all of the mini-batch.
        share_qk: one projection feeding both Q and K convolutions (else separate Q and K projections).
        qk_conv_kernel: kernel of the depth-wise Conv2d on Q and K (0 = no convolution).
        scans: scan orders, each one dataset (``'forward'``, ``'reverse'``, ``'column'``, ``'column_reverse'``).
        merge: how the scans' outputs are combined: ``'sum'``, ``'mean'`` or ``'concat'`` (+ linear).
        share_state: all scans train the same learnable initial state (default: one each).
        learnable_lr: token-wise learnable inner lr (else the constant ``base_lr / d``).
        gate: output gate ``GELU(x W_g) ⊙ ·``.

    ``fused`` (class attribute, instance-overridable): run all scans as one batched scan (the scans stacked along
    the batch dimension with their initial states) through :func:`~vittt.ops.ttt_scan_fused`; ``False`` runs one
    composable :func:`~vittt.ops.ttt_scan` per scan. Same function either way.
    """

    #: all scans in one batched :func:`~vittt.ops.ttt_scan_fused`; False runs the composable per-scan path
    fused: bool = True

    def __init__(self, dim: int, num_heads: int, *, inner: str = 'linear', inner_mlp_ratio: float = 4.0,
                 mini_batch_size: int = 64, causal: bool = False, share_qk: bool = True, qk_conv_kernel: int = 3,
                 scans: Sequence[str] = ('forward', 'reverse'), merge: str = 'sum', share_state: bool = False,
                 learnable_lr: bool = True, base_lr: float = 1.0, gate: bool = True, qkv_bias: bool = True,
                 inner_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f'mini_batch_size must be an integer ≥ 1, got {mini_batch_size!r}')
        bad = [s for s in scans if s not in SCAN_ORDERS]
        if not scans or bad:
            raise ValueError(f'scans must be a non-empty list of {SCAN_ORDERS}, got {list(scans)}')
        if merge not in MERGE_RULES:
            raise ValueError(f'merge must be one of {MERGE_RULES}, got {merge!r}')
        if qk_conv_kernel and qk_conv_kernel % 2 == 0:
            raise ValueError(f'qk_conv_kernel must be odd (or 0 for none), got {qk_conv_kernel}')
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.inner_kind, self.mini_batch_size, self.causal = inner, mini_batch_size, causal
        self.scans, self.merge, self.base_lr, self.inner_eps = tuple(scans), merge, base_lr, inner_eps
        if share_qk:
            self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        ks = qk_conv_kernel
        self.q_conv = nn.Conv2d(dim, dim, ks, padding=ks // 2, groups=dim) if ks else None
        self.k_conv = nn.Conv2d(dim, dim, ks, padding=ks // 2, groups=dim) if ks else None
        self.lr_proj = nn.Linear(dim, num_heads) if learnable_lr else None
        self.states = nn.ModuleList([TTTInnerState(inner, num_heads, self.head_dim, inner_mlp_ratio)
                                     for _ in range(1 if share_state else len(self.scans))])
        self.merge_proj = nn.Linear(dim * len(self.scans), dim) if merge == 'concat' else None
        self.post_norm = nn.LayerNorm(dim, eps=1e-6)
        self.gate = nn.Linear(dim, dim) if gate else None
        self.proj = nn.Linear(dim, dim)

    def _conv(self, conv: Optional[nn.Module], x: torch.Tensor, grid_size: GridSize, num_prefix: int) -> torch.Tensor:
        if conv is None:
            return x
        patches = map_to_tokens(conv(tokens_to_map(x[:, num_prefix:], grid_size)))
        return torch.cat([x[:, :num_prefix], patches], dim=1) if num_prefix else patches

    def forward(self, x: torch.Tensor, grid_size: GridSize, num_prefix: int = 0) -> torch.Tensor:
        b, n, c = x.shape
        qk = linear_layer(self.qk, x) if hasattr(self, 'qk') else None
        q = self._conv(self.q_conv, qk if qk is not None else linear_layer(self.q, x), grid_size, num_prefix)
        k = self._conv(self.k_conv, qk if qk is not None else linear_layer(self.k, x), grid_size, num_prefix)
        v = linear_layer(self.v, x)
        if self.fused:
            y = self._fused_scans(x, q, k, v, grid_size, num_prefix)
        else:
            heads = lambda t: t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            q, k, v = heads(q), heads(k), heads(v)
            if self.lr_proj is not None:
                lr = (self.base_lr / self.head_dim) * torch.sigmoid(linear_layer(self.lr_proj, x)).transpose(1, 2)
            else:
                lr = q.new_full((b, self.num_heads, n), self.base_lr / self.head_dim)
            outs = []
            for i, order in enumerate(self.scans):
                index = _scan_index(order, grid_size, num_prefix, x.device)
                state = self.states[i % len(self.states)].tensors()
                args = (q, k, v, lr) if index is None else (q[:, :, index], k[:, :, index], v[:, :, index],
                                                            lr[..., index])
                out = in_float32(partial(ttt_scan, self.inner_kind), *args, state,
                                 mini_batch_size=self.mini_batch_size, causal=self.causal, eps=self.inner_eps)
                if index is not None:
                    out = torch.empty_like(out).index_copy_(2, index, out)  # back to [prefix, raster] order
                outs.append(out.transpose(1, 2).reshape(b, n, c))
            if self.merge == 'concat':
                y = linear_layer(self.merge_proj, torch.cat(outs, dim=-1))
            else:
                y = torch.stack(outs).sum(0) if len(outs) > 1 else outs[0]
                if self.merge == 'mean':
                    y = y / len(outs)
        y = self.post_norm(y)
        if self.gate is not None:
            y = linear_layer(self.gate, x, 'gelu') * y
        return linear_layer(self.proj, y)

    def _fused_scans(self, x, q, k, v, grid_size: GridSize, num_prefix: int) -> torch.Tensor:
        """The scans and their merge with all scans as one batched scan over ``S·B`` samples: sample ``s·B + i`` is
        sample i's tokens in scan s's order, with scan s's initial state. ``x, q, k, v [B, N, C]`` -> ``[B, N, C]``."""
        b, n, c = q.shape
        s, h = len(self.scans), self.num_heads
        raster = torch.arange(n, device=q.device)
        orders = [_scan_index(order, grid_size, num_prefix, q.device) for order in self.scans]
        orders = torch.stack([raster if index is None else index for index in orders])           # [S, N]
        inverse = torch.empty_like(orders).scatter_(1, orders, raster.expand(s, n))               # raster -> scan pos
        sample = torch.arange(b, device=q.device).view(1, b, 1) * n                              # row of token 0
        rows = (orders[:, None] + sample).flatten()                      # [S·B·N] rows of [B·N, ·] in scan order
        rows_back = (inverse[:, None] + sample + (torch.arange(s, device=q.device) * (b * n)).view(s, 1, 1)).flatten()
        # [B, N, h·a] -> [S·B, h, N, a]: each scan's copy of the tokens in its order (a view of token-major rows)
        gather = lambda t: t.reshape(b * n, -1).index_select(0, rows).view(s * b, n, h, -1).transpose(1, 2)
        if self.lr_proj is not None:
            lr = (self.base_lr / self.head_dim) * torch.sigmoid(linear_layer(self.lr_proj, x))  # [B, N, h]
        else:
            lr = q.new_full((b, n, h), self.base_lr / self.head_dim)
        tensors = [self.states[i % len(self.states)].tensors() for i in range(s)]
        state = {name: torch.stack([t[name] for t in tensors]).unsqueeze(1).expand(s, b, *tensors[0][name].shape)
                 .reshape(s * b, *tensors[0][name].shape) for name in tensors[0]}                  # [S·B, h, ...]
        out = in_float32(partial(ttt_scan_fused, self.inner_kind), gather(q), gather(k), gather(v), gather(lr)[..., 0],
                         state, mini_batch_size=self.mini_batch_size, causal=self.causal,
                         eps=self.inner_eps)
        # [S·B, h, N, d] (token-major memory) -> each scan's outputs in [prefix, raster] order, [S, B, N, C]
        out = out.transpose(1, 2).reshape(s * b * n, c).index_select(0, rows_back).view(s, b, n, c)
        if self.merge == 'concat':
            return linear_layer(self.merge_proj, out.permute(1, 2, 0, 3).reshape(b, n, s * c))  # = cat(outs, -1)
        y = out.sum(0) if s > 1 else out[0]
        return y / s if self.merge == 'mean' else y

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, inner={self.inner_kind}, '
                f'mini_batch_size={self.mini_batch_size}, causal={self.causal}, scans={self.scans}, merge={self.merge}')
