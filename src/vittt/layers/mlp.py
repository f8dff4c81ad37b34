"""Token MLPs: ``fc1 -> GELU -> fc2`` (ViT³), optionally with H-ViT³'s depth-wise conv on the hidden map."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import gelu_linear
from ..ops._capture import eval_inference, symbolic_shapes
from ..ops.onednn import activation_name, conv_act, identity_folded, linear_layer, plain_linear, plain_module
from .conv import cpe_residual, folds_identity
from .grid import GridSize, map_to_tokens, tokens_to_map

__all__ = ['TokenMlp']


class TokenMlp(nn.Module):
    """``fc2(act(fc1(x)))``; with ``dwconv=True``: ``a = act(fc1(x)); fc2(act(a + DWConv3x3(a)))`` on the grid.

    With autograd on, GELU and dropout off, the last ``act -> fc2`` runs as :func:`vittt.ops.gelu_linear`, which
    keeps the pre-activation alone for backward (one ``N × hidden`` tensor per block less, same values and
    gradients)."""

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
        if eval_inference(self):
            return self._forward_inference(x, grid_size)
        h = self.fc1(x)
        dropout_before_fc2 = self.dwc is None and self.training and self.drop1.p > 0
        if self.dwc is not None:
            h = cpe_residual(self.dwc, self.drop1(self.act(h)), grid_size)   # a + DWConv(a), one convolution
        if (torch.is_grad_enabled() and plain_module(self.act, nn.GELU) and plain_linear(self.fc2)
                and not dropout_before_fc2 and not symbolic_shapes()):
            # (the fused function saves memory in training; captured graphs, hooked or subclassed layers: plain ops)
            out = gelu_linear(h, self.fc2.weight, self.fc2.bias, self.act.approximate)
        else:
            a = self.act(h)
            out = self.fc2(a if self.dwc is not None else self.drop1(a))
        return self.drop2(out)

    def _forward_inference(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        """Without autograd (eval): the same function with each activation applied as its layer writes its output
        (:mod:`vittt.ops.onednn`: a oneDNN post-op on float32 CPU tensors, else in place in the fresh output) and the
        convolution's residual sum folded into its kernel (:func:`~vittt.ops.onednn.identity_folded`), so the hidden
        width is written twice and allocated twice, not four times; ``fc2`` with its bias in the oneDNN kernel
        (:func:`~vittt.ops.onednn.linear_layer`). Hooked or subclassed layers are called as modules
        (:func:`~vittt.ops.onednn.plain_module`)."""
        act, approximate = activation_name(self.act), getattr(self.act, 'approximate', 'none')
        after = self.act if act is None else (lambda t: t)   # another activation module: applied after the layer
        h = after(linear_layer(self.fc1, x, act, approximate))
        dwc = self.dwc
        if dwc is not None and folds_identity(dwc):
            h = after(map_to_tokens(conv_act(tokens_to_map(h, grid_size), identity_folded(dwc.weight), dwc.bias,
                                             dwc.stride, dwc.padding, dwc.dilation, dwc.groups, act, approximate)))
        elif dwc is not None:  # a hooked, subclassed or not zero-padded convolution: called as the module
            h = self.act(cpe_residual(dwc, h, grid_size))
        return linear_layer(self.fc2, h)
