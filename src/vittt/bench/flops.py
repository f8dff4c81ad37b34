"""Multiply-accumulate (MAC) counting with ``torch.utils.flop_counter`` (fvcore convention: matmuls and
convolutions only; element-wise ops, norms and softmax are not counted), run on shape-only fake tensors.

What torch's counter sees: every mm / addmm / bmm / matmul and convolution, which covers the TTT inner loop (key
forward, both inner gradients, the query forward, and the 3×3 inner gradient and per-sample kernel, which are
grouped convolutions). What it misses: the CPU fused-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) that timm's DeiT uses by default; it is counted here by
formula, QKᵀ plus AV = 2·B·h·N²·d MACs, so DeiT is charged for attention whichever kernel runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_macs', 'count_params']


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # query [B, h, Nq, d], key [B, h, Nk, d], value [B, h, Nk, dv]: QKᵀ and AV, 2 FLOPs per MAC
    b, h, nq, d = query
    nk, dv = key[-2], value[-1]
    return 2 * b * h * nq * nk * (d + dv)


def _custom_mapping():
    mapping = {}
    op = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops  # FlopCounterMode passes shapes to custom formulas
    return mapping


def count_macs(model: torch.nn.Module, input_size: Union[Sequence[int], Tuple[int, int, int]] = (3, 224, 224),
               batch_size: int = 1, model_args: Optional[Callable[[torch.Tensor], tuple]] = None) -> int:
    """MACs of one forward pass of ``model`` on a ``[batch_size, *input_size]`` input (eval mode, no grad).
    ``model_args(x)`` gives the positional arguments of models that take more than the image (DiT: ``(x, t, y)``);
    the model may live on the meta device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else 'cpu'
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        # shapes only: under FakeTensorMode no arithmetic runs, so large models and resolutions count in seconds
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.randn(batch_size, *input_size, device=device, dtype=dtype)
            args = model_args(x) if model_args is not None else (x,)
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
                model(*args)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
