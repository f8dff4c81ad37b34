"""One benchmarked step: a variant built at a resolution, its inputs, and the callable that runs it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ModelSpec, Variant, parse_model_spec

__all__ = ['MODES', 'DTYPES', 'Workload', 'create_model', 'build_model', 'make_step', 'synchronize', 'is_dit_name',
           'model_input']

MODES = ('infer', 'train')
DTYPES = ('fp32', 'bf16')
SEED = 0
#: DiT / DiT³ run on SD-VAE latents: a benchmark size is the image size, the model sees ``size / 8``
LATENT_FACTOR = 8


def is_dit_name(name: str) -> bool:
    """Whether ``name`` is a ``vittt.create_dit`` model (``dit3_b_2``, ``DiT-B/2``, ...) rather than a timm one."""
    from ..models.dit3 import resolve_dit_name
    try:
        resolve_dit_name(name)
    except (KeyError, ValueError):
        return False
    return True


def model_input(model: nn.Module, size: Sequence[int]) -> Tuple[Tuple[int, int, int], Any]:
    """``((C, H, W), model_args)`` of one benchmarked sample at image size ``size``: ``(3, h, w)`` and no extra
    arguments for classifiers; for a DiT the latent ``(in_chans, h / 8, w / 8)`` and ``dit_model_args`` (t = 500,
    class 0), because DiT³'s workload is the SD-VAE latent of a ``size`` image."""
    from ..models.dit3 import DiT3, dit_model_args

    h, w = size
    if isinstance(model, DiT3):
        if h % LATENT_FACTOR or w % LATENT_FACTOR:
            raise ValueError(f'DiT benchmarks take image sizes divisible by {LATENT_FACTOR} (the SD-VAE latent is '
                             f'size / {LATENT_FACTOR}), got {h}x{w}')
        return (model.in_chans, h // LATENT_FACTOR, w // LATENT_FACTOR), dit_model_args
    return (3, h, w), None


@dataclass
class Workload:
    """A variant at one resolution, mode ('infer' / 'train') and dtype ('fp32' / 'bf16') on one device."""
    variant: Variant
    size: Tuple[int, int]
    mode: str
    dtype: str
    batch_size: int = 1
    device: str = 'cpu'

    def to_config(self, threads: int) -> Dict[str, Any]:
        """The JSON-able description the memory worker rebuilds the workload from."""
        return dict(label=self.variant.label, spec=self.variant.spec.text, attn=self.variant.attn,
                    lean=self.variant.lean, compiled=self.variant.compiled, official=self.variant.official,
                    size=list(self.size), mode=self.mode,
                    dtype=self.dtype,
                    batch_size=self.batch_size, device=self.device, threads=threads)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'Workload':
        spec = parse_model_spec(config['spec'])
        variant = Variant(config.get('label', spec.text), spec, attn=config.get('attn'), lean=config.get('lean', False),
                          compiled=config.get('compiled', False), official=config.get('official'))
        return cls(variant, tuple(config['size']), config['mode'], config['dtype'], config.get('batch_size', 1),
                   config.get('device', 'cpu'))


def create_model(spec: ModelSpec, size: Sequence[int]) -> nn.Module:
    """``timm.create_model`` under a fixed seed, passing ``img_size=(h, w)`` when the constructor takes it (timm ViTs
    are built for one resolution; vittt models take it as a nominal size and run at any)."""
    import timm

    kwargs = dict(spec.kwargs)
    if is_dit_name(spec.name):
        from ..models.dit3 import create_dit
        torch.manual_seed(SEED)
        try:
            return create_dit(spec.name, **kwargs)
        except TypeError as e:
            raise ValueError(f'{spec.text}: {e}') from None
    if 'img_size' not in kwargs:
        torch.manual_seed(SEED)
        try:
            return timm.create_model(spec.name, img_size=tuple(size), **kwargs)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise ValueError(f'{spec.text}: {e}') from None
    torch.manual_seed(SEED)
    try:
        return timm.create_model(spec.name, **kwargs)
    except TypeError as e:
        raise ValueError(f'{spec.text}: {e}') from None


def build_model(workload: Workload) -> nn.Module:
    """The variant's model at the workload's resolution, in eval (infer) or train mode, on its device and dtype:
    bf16 inference converts the weights, bf16 training keeps fp32 weights and runs under autocast. A compiled
    variant is returned wrapped in ``torch.compile(dynamic=False)`` (compiled on its first call)."""
    from ..layers import set_memory_lean

    if workload.variant.ort:
        return ort_model(workload)
    model = create_model(workload.variant.spec, workload.size)
    if workload.variant.official:
        from .official import with_official_ttt
        shape, _ = model_input(model, workload.size)
        model = with_official_ttt(model.eval(), workload.variant.official,
                                  check=torch.randn(1, *shape, generator=torch.Generator().manual_seed(SEED)))
    if workload.variant.attn is not None:
        for module in model.modules():
            if isinstance(getattr(module, 'fused_attn', None), bool):
                module.fused_attn = workload.variant.attn == 'fused'
    if workload.variant.lean:
        set_memory_lean(model, True)
    model.train(workload.mode == 'train')
    dtype = torch.bfloat16 if workload.dtype == 'bf16' and workload.mode == 'infer' else torch.float32
    model = model.to(device=workload.device, dtype=dtype)
    # dynamic=False: each resolution compiled for itself (as a fixed-resolution deployment would), never the
    # automatic dynamic-shape recompile that a second size would trigger
    return torch.compile(model, dynamic=False) if workload.variant.compiled else model


_ORT_FILES: Dict[str, str] = {}


class OrtModel(nn.Module):
    """An onnxruntime session called like the model (inference, CPU): tensors in, the first output as a tensor."""

    def __init__(self, path: str, threads: int, like: nn.Module):
        super().__init__()
        from ..tasks.export import run_exported
        self.run = run_exported(path, 'onnx', threads=threads)
        self.in_chans = getattr(like, 'in_chans', 3)
        self.num_classes = getattr(like, 'num_classes', 0)
        self.like = [like]  # (not a submodule) what model_input inspects

    def forward(self, *args):
        return self.run(*args)[0]


def ort_model(workload: Workload) -> OrtModel:
    """The variant's model exported to ONNX through ``vittt export``'s path (checked against eager PyTorch) and run
    by an onnxruntime session with torch's thread count. A vittt model (any resolution) is exported once per
    process with a dynamic batch and resolution, what ``vittt export`` writes by default, so one file serves every
    size of the run; a model built for one resolution (timm's ViTs: DeiT) once per resolution, dynamic batch."""
    import atexit
    import shutil
    import tempfile

    from ..tasks.export import export_model

    if workload.mode != 'infer' or workload.dtype != 'fp32' or torch.device(workload.device).type != 'cpu':
        raise ValueError('the onnxruntime backend times fp32 inference on the CPU only')
    spec = workload.variant.spec
    model = create_model(spec, workload.size).eval()
    any_size = type(model).__module__.startswith('vittt.')
    key = spec.text if any_size else f'{spec.text}@{workload.size[0]}x{workload.size[1]}'
    if key not in _ORT_FILES:
        shape, _ = model_input(model, workload.size)
        folder = tempfile.mkdtemp(prefix='vittt-bench-ort-')
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the exported files live as long as the process
        path = os.path.join(folder, 'model.onnx')
        export_model(spec.name, path, module=model, example_size=shape[1:], log=lambda *_: None,
                     dynamic=('batch', 'height', 'width') if any_size else ('batch',))
        _ORT_FILES[key] = path
    return OrtModel(_ORT_FILES[key], torch.get_num_threads(), model)


def _loss(output: Any, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy on logits; a mean square for anything else (feature outputs, when num_classes=0)."""
    if isinstance(output, (tuple, list)):  # e.g. distilled DeiT in train mode: (logits, distillation logits)
        return sum(_loss(o, labels, num_classes) for o in output)
    if output.ndim == 2 and output.shape[1] == num_classes > 0:
        return F.cross_entropy(output.float(), labels)
    return output.float().square().mean()


def make_step(model: nn.Module, workload: Workload) -> Callable[[], None]:
    """Inputs on the workload's device and a callable running one step: a forward under inference_mode (infer),
    or grads set to None, forward, cross-entropy on random labels and backward (train; no optimizer step). A DiT
    takes ``(latent, t, y)`` (:func:`model_input`) and trains on the mean square of its output."""
    device, batch = torch.device(workload.device), workload.batch_size
    generator = torch.Generator().manual_seed(SEED)
    infer_dtype = torch.bfloat16 if workload.dtype == 'bf16' else torch.float32
    inner = model.like[0] if isinstance(model, OrtModel) else getattr(model, '_orig_mod', model)
    shape, model_args = model_input(inner, workload.size)
    x = torch.randn(batch, *shape, generator=generator)
    if workload.mode == 'infer':
        x = x.to(device=device, dtype=infer_dtype)
        args = model_args(x) if model_args else (x,)

        def infer() -> None:
            with torch.inference_mode():
                model(*args)
        return infer

    x = x.to(device)
    args = model_args(x) if model_args else (x,)
    num_classes = 0 if model_args else int(getattr(model, 'num_classes', 0) or 0)  # a DiT's loss: a mean square
    labels = torch.randint(0, max(num_classes, 1), (batch,), generator=generator).to(device)
    autocast = workload.dtype == 'bf16'

    def train() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            output = model(*args)
        _loss(output, labels, num_classes).backward()
    return train


def synchronize(device: str) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)
