"""Deployment: ``vittt export`` to ONNX / ``torch.export`` with a dynamic batch and resolution, verified against eager
PyTorch (:mod:`.core`)."""
from .core import (DYNAMIC_AXES, ExportMismatch, ExportResult, check_shapes, export_model, load_export_model,
                   run_exported)

__all__ = ['DYNAMIC_AXES', 'ExportMismatch', 'ExportResult', 'check_shapes', 'export_model', 'load_export_model',
           'run_exported']
