"""The ViT³ TTT token mixer: one QKV projection feeding several inner models, one output projection.

Default layout (the released ViT³ / H-ViT³ checkpoints): all ``num_heads`` heads use the simplified-SwiGLU inner
model and one *extra* ``head_dim``-wide head uses the 3×3 depth-wise conv inner model, so the QKV projection is
``C -> 3C + 3d`` (split per inner model as q, k, v) and the output projection ``C + d -> C``. Optional 2-D RoPE
is applied to the query/key of every inner model that accepts it (the SwiGLU heads).

The design-space switches (spec A.6) replace the heads' inner model and its training: ``inner_model`` (``'glu'`` is
ViT³'s; ``'fc'``, ``'silu_fc'``, ``'mlp'``, ``'swiglu'``, ``'conv3x3'``, ``'dwconv3x3'``), ``inner_ratio``,
``inner_depth``, ``inner_residual``, ``inner_loss``, ``inner_epochs``, ``inner_batches``, ``inner_lr`` (a number or
``'dynamic'``: the token-wise lr's logits are ``h`` extra output channels of the QKV projection, i.e. ``x W_η``), and
``conv_head`` (ViT³'s extra depth-wise conv head; it trains with the same loss, lr and epochs, always full-batch).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import InnerLoss
from ..ops._capture import symbolic_shapes
from ..ops.onednn import linear_layer
from .grid import GridSize
from .inner import DWConvInner, InnerLr, InnerModel, Scale, SwiGLUInner, TokenInner
from .lean import bands
from .rope import RoPE2d

__all__ = ['TTTMixer', 'vit3_inner_models']


def vit3_inner_models(dim: int, num_heads: int, conv_kernel_size: int = 3, *, inner_model: str = 'glu',
                      conv_head: bool = True, inner_ratio: int = 1, inner_depth: int = 2,
                      inner_residual: Optional[str] = None, batches: int = 1, **inner_kwargs) -> List[InnerModel]:
    """The heads' inner models (ViT³: the simplified SwiGLU on all heads) plus, with ``conv_head``, one extra
    depth-wise conv head of the same width (ViT³'s layout)."""
    if dim % num_heads:
        raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
    head_dim = dim // num_heads
    if inner_model == 'glu':
        if inner_ratio != 1 or inner_depth != 2 or inner_residual is not None:
            raise ValueError("inner_model='glu' takes no inner_ratio / inner_depth / inner_residual")
        heads = SwiGLUInner(num_heads, head_dim, batches=batches, **inner_kwargs)
    else:
        heads = TokenInner(num_heads, head_dim, inner_model, inner_ratio, inner_depth, inner_residual,
                           batches=batches, **inner_kwargs)
    conv = [DWConvInner(head_dim, kernel_size=conv_kernel_size, **dict(inner_kwargs, inner_lr=_const_lr(inner_kwargs)))]
    return [heads] + (conv if conv_head else [])


def _const_lr(kwargs) -> float:
    """The conv head's lr: the heads' number, or 1.0 where the heads' lr is dynamic (it has no tokens to weigh)."""
    lr = kwargs.get('inner_lr', 1.0)
    return 1.0 if isinstance(lr, str) else lr


class TTTMixer(nn.Module):
    """Token mixer ``[B, N, C] -> [B, N, C]`` on a ``(H, W)`` grid.

    Args:
        dim: channels C.
        num_heads: heads of the default inner models (ignored when ``inner_models`` is given).
        qkv_bias: bias of the QKV projection (True in every released model).
        rope: optional module ``rope(x [B, N, c] or [B, N, 2, c], grid_size)`` applied to q and k of rope-accepting
            inner models (both in one call).
        inner_models: the inner models; default :func:`vit3_inner_models`.
        inner_loss, scale, inner_lr, grad_norm, conv_kernel_size: settings of the default inner models
            (dot-product loss, scale 1/3 or ``'head_dim'`` for d^-1/2, lr 1.0, soft gradient normalisation on).
        inner_model, inner_ratio, inner_depth, inner_residual, inner_epochs, inner_batches, conv_head: the design
            space (module docstring); the defaults are ViT³'s.
    """

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = True, rope: Optional[nn.Module] = None,
                 inner_models: Optional[Sequence[InnerModel]] = None, *, inner_loss: Union[str, InnerLoss] = 'dot',
                 scale: Scale = 1 / 3, inner_lr: InnerLr = 1.0, grad_norm: bool = True, conv_kernel_size: int = 3,
                 inner_model: str = 'glu', inner_ratio: int = 1, inner_depth: int = 2,
                 inner_residual: Optional[str] = None, inner_epochs: int = 1, inner_batches: int = 1,
                 conv_head: bool = True):
        super().__init__()
        if inner_models is None:
            inner_models = vit3_inner_models(dim, num_heads, conv_kernel_size, inner_model=inner_model,
                                             conv_head=conv_head, inner_ratio=inner_ratio, inner_depth=inner_depth,
                                             inner_residual=inner_residual, batches=inner_batches, loss=inner_loss,
                                             scale=scale, inner_lr=inner_lr, grad_norm=grad_norm,
                                             epochs=inner_epochs)
        self.dim = dim
        self.inner = nn.ModuleList(inner_models)
        self.rope = rope
        # the projection's columns per inner model: q, k, v (and the lr logits); q and k as one part where RoPE
        # rotates them, in one call on a [B, N, 2, width] view
        self._splits = [w for m in self.inner for w in
                        ((2 * m.width,) if self._rotates(m) else (m.width, m.width)) + (m.width,)
                        + ((m.lr_width,) if m.lr_width else ())]
        self.qkv = nn.Linear(dim, sum(self._splits), bias=qkv_bias)
        self.proj = nn.Linear(sum(m.out_width for m in self.inner), dim)

    def supports_lean(self) -> bool:
        return all(getattr(m, 'supports_lean', False) for m in self.inner)

    def forward_lean(self, x: torch.Tensor, grid_size: GridSize, norm: nn.Module, chunk_tokens: int) -> torch.Tensor:
        """``forward(norm(x))`` computed in bands of about ``chunk_tokens`` tokens (inference only): one pass over the
        bands sums each inner model's gradient (keys and values only), a second applies the trained inner models to
        the queries and projects. Peak memory holds the output and one band's intermediates, never the full QKV."""
        n = x.shape[1]
        halo = max(m.halo for m in self.inner)
        parts = self._projection_rows()
        band_list = bands(grid_size, chunk_tokens, halo)
        grads = [None] * len(self.inner)
        for band in band_list:
            xb = norm(x[:, band.ctx_tokens])
            for i, inner in enumerate(self.inner):
                k, v = F.linear(xb, *parts[i]['kv']).split(inner.width, dim=-1)
                if self.rope is not None and inner.accepts_rope:
                    k = self.rope(k, grid_size, token_offset=band.ctx_tokens.start)
                grads[i] = inner.lean_accumulate(grads[i], k, v, band, n)
        trained = [inner.lean_step(g) for inner, g in zip(self.inner, grads)]
        out = x.new_empty(x.shape)
        for band in band_list:
            xb = norm(x[:, band.ctx_tokens])
            outs = []
            for i, inner in enumerate(self.inner):
                q = F.linear(xb, *parts[i]['q'])
                if self.rope is not None and inner.accepts_rope:
                    q = self.rope(q, grid_size, token_offset=band.ctx_tokens.start)
                outs.append(inner.lean_apply(trained[i], q, band))
            out[:, band.tokens] = self.proj(torch.cat(outs, dim=-1))
        return out

    def _projection_rows(self):
        """Per inner model, (weight, bias) views of the QKV projection rows of its q and of its k, v."""
        weight, bias = self.qkv.weight, self.qkv.bias
        rows, start = [], 0
        for m in self.inner:
            q_rows, kv_rows = slice(start, start + m.width), slice(start + m.width, start + 3 * m.width)
            rows.append({'q': (weight[q_rows], None if bias is None else bias[q_rows]),
                         'kv': (weight[kv_rows], None if bias is None else bias[kv_rows])})
            start += 3 * m.width + m.lr_width
        return rows

    def _rotates(self, inner: InnerModel) -> bool:
        return self.rope is not None and inner.accepts_rope

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        # (linear_layer: the module itself under autograd; without, one oneDNN matmul with the bias in the kernel)
        parts = linear_layer(self.qkv, x).split(self._splits, dim=-1)  # (indexed, not iterated: torch.fx traces it)
        outs, i = [], 0
        # without autograd RoPE2d rotates q and k in the projection's fresh output, which is the mixer's own
        rope_kwargs = {'inplace': True} if isinstance(self.rope, RoPE2d) and not torch.is_grad_enabled() else {}
        # without autograd the inner models' outputs go straight into one buffer, the projection's input (no cat):
        # those that take out= write into their slice, the others are copied there
        joined = x.new_empty(*x.shape[:-1], self.proj.in_features) \
            if not torch.is_grad_enabled() and not symbolic_shapes() else None
        start = 0
        for inner in self.inner:
            if self._rotates(inner):
                qk = self.rope(parts[i].unflatten(-1, (2, inner.width)), grid_size, **rope_kwargs)
                q, k, v = qk[:, :, 0], qk[:, :, 1], parts[i + 1]
                i += 2
            else:
                q, k, v = parts[i], parts[i + 1], parts[i + 2]
                i += 3
            lr_logits = parts[i] if inner.lr_width else None
            i += 1 if inner.lr_width else 0
            kwargs = {} if lr_logits is None else {'lr_logits': lr_logits}
            if joined is None:
                outs.append(inner(q, k, v, grid_size, **kwargs))
                continue
            target = joined[..., start:start + inner.out_width]
            start += inner.out_width
            if getattr(inner, 'writes_out', False):
                inner(q, k, v, grid_size, out=target, **kwargs)
            else:
                target.copy_(inner(q, k, v, grid_size, **kwargs))
        return linear_layer(self.proj, torch.cat(outs, dim=-1) if joined is None else joined)
