"""Whether a graph with symbolic shapes is being captured for export (``torch.export``, ``torch.onnx``'s dynamo
exporter, or ``torch.jit`` tracing): then the ops choose batch-independent formulations, so a dynamic batch size is
not baked into the exported graph. :func:`symbolic_shapes` also covers ``torch.fx`` symbolic tracing, where sizes
are proxies that no Python ``if`` may read."""
from __future__ import annotations

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


def capturing_for_export() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors``: grad mode on and one of them requires grad (the fused ops
    skip their autograd Function, and the small-map forms run, only when it does not)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def eval_inference(module) -> bool:
    """Whether ``module`` runs its eval inference path: eval mode, no autograd and concrete shapes. In training mode
    the plain path runs with or without autograd (so drop-path and dropout act under ``torch.no_grad()`` too)."""
    return not (module.training or torch.is_grad_enabled() or symbolic_shapes())


def symbolic_shapes() -> bool:
    """Sizes may be symbolic: no branch on them (and no cache keyed by them) while this holds."""
    return capturing_for_export() or torch.compiler.is_compiling() or is_fx_symbolic_tracing()
