"""Whether a graph with symbolic shapes is being captured for export (``torch.export``, ``torch.onnx``'s dynamo
exporter, or ``torch.jit`` tracing): then the ops choose batch-independent formulations, so a dynamic batch size is
not baked into the exported graph."""
from __future__ import annotations

import torch


def capturing_for_export() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing()
