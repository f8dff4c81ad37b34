"""The benchmark sweep: variants × resolutions × modes × dtypes, interleaved timing, memory in fresh processes,
MACs and this machine's matmul throughput; returns everything as one JSON-able dict."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .flops import count_macs, count_params
from .report import compute_crossovers, compute_ratios
from .spec import (ATTN_MODES, Variant, check_model_name, count_ttt_mixers, expand_variants, parse_model_spec,
                   probe_model, tokens)
from .workload import (DTYPES, MODES, Workload, build_model, create_model, is_dit_name, make_step, model_input,
                       synchronize)

__all__ = ['BenchSettings', 'run_bench', 'build_variants', 'resolve_baseline', 'matmul_throughput',
           'machine_info', 'load_average', 'time_variants', 'timing_entry', 'SCHEMA']

SCHEMA = 'vittt-bench/1'
MEMORY_WORKER_TIMEOUT_S = 3600
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class BenchSettings:
    """Everything ``vittt bench`` takes on its command line."""
    models: List[str]
    sizes: List[Tuple[int, int]]
    modes: List[str] = field(default_factory=lambda: ['infer'])
    dtypes: List[str] = field(default_factory=lambda: ['fp32'])
    batch_size: int = 1
    threads: Optional[int] = None
    repeats: int = 7
    warmup: int = 2
    attn: List[str] = field(default_factory=lambda: ['fused'])
    lean: bool = False
    compile: bool = False
    ort: bool = False                                     # --backend ort: add onnxruntime variants
    official: Optional[str] = None                        # --official PATH: add +official variants (ViT³ mixers)
    baseline: Optional[str] = None
    device: str = 'cpu'
    memory: bool = True
    memory_repeats: int = 1                               # fresh processes per memory reading (the median is kept)
    timing: bool = True
    train_sizes: Optional[List[Tuple[int, int]]] = None   # train mode's sizes (default: sizes)
    train_batch_size: Optional[int] = None                # train mode's batch (default: batch_size)

    def sizes_for(self, mode: str) -> List[Tuple[int, int]]:
        chosen = self.train_sizes if mode == 'train' and self.train_sizes else self.sizes
        return sorted(dict.fromkeys(tuple(s) for s in chosen), key=lambda s: (s[0] * s[1], s))

    def batch_for(self, mode: str) -> int:
        return self.train_batch_size if mode == 'train' and self.train_batch_size else self.batch_size

    def validate(self) -> None:
        """Raise ValueError on settings that cannot run (before any model is built)."""
        for name, values, allowed in (('mode', self.modes, MODES), ('dtype', self.dtypes, DTYPES),
                                      ('attn', self.attn, ATTN_MODES)):
            if not values or set(values) - set(allowed):
                raise ValueError(f'--{name} takes one or more of {list(allowed)}, got {values}')
        if not self.models or not self.sizes:
            raise ValueError('give at least one model and one size')
        for name, value, least in (('batch-size', self.batch_size, 1), ('repeats', self.repeats, 1),
                                   ('train-batch-size', self.train_batch_size or 1, 1),
                                   ('warmup', self.warmup, 0), ('memory-repeats', self.memory_repeats, 1),
                                   ('threads', 1 if self.threads is None else self.threads, 1)):
            if value < least:
                raise ValueError(f'--{name} must be at least {least}, got {value}')
        if not self.memory and not self.timing:
            raise ValueError('--no-memory together with --no-time leaves nothing to measure')
        if self.official is not None:
            from .official import load_official_ttt
            load_official_ttt(self.official)  # raises naming what is wrong with the path
        device = torch.device(self.device)  # raises on a malformed device string
        if device.type not in ('cpu', 'cuda'):
            raise ValueError(f'--device must be cpu or cuda, got {self.device!r}')
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'--device {self.device} requested but CUDA is not available '
                             f'(torch {torch.__version__}, built with CUDA {torch.version.cuda})')


def build_variants(settings: BenchSettings, log: Log = _stderr) -> Tuple[List[Variant], Dict[str, int]]:
    """Parse and check the model specs, build each once to see which variants apply; returns the variants and
    the parameter count per variant label."""
    specs = [parse_model_spec(text) for text in settings.models]
    for spec in specs:
        check_model_name(spec.name)
    variants, params = [], {}
    for spec in specs:
        model = create_model(spec, settings.sizes[0])
        for size in {*settings.sizes_for('infer'), *settings.sizes_for('train')}:
            model_input(model, size)  # a DiT refuses image sizes without a whole latent
        attention, lean_blocks = probe_model(model)
        for variant in expand_variants(spec, attention, lean_blocks, settings.attn, settings.lean, settings.compile,
                                       settings.ort, 0 if is_dit_name(spec.name) else count_ttt_mixers(model),
                                       settings.official):
            variants.append(variant)
            params[variant.label] = count_params(model)
        del model
    labels = [v.label for v in variants]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f'model specs give duplicate variants: {duplicates}')
    if settings.lean and not any(v.lean for v in variants):
        log('vittt bench: warning: --lean given but none of the models has a memory-lean mode; '
            'no +lean variants')
    if settings.official and not any(v.official for v in variants):
        log('vittt bench: warning: --official given but none of the models has ViT³ TTT mixers; '
            'no +official variants')
    return variants, params


def resolve_baseline(variants: Sequence[Variant], baseline: Optional[str]) -> str:
    """The baseline's label: the one asked for, else the first DeiT variant, else the first attention DiT, else the
    first variant."""
    labels = [v.label for v in variants]
    if baseline is not None:
        if baseline not in labels:
            raise ValueError(f'--baseline {baseline!r} is not among the variants: {", ".join(labels)}')
        return baseline
    from ..models.dit3 import resolve_dit_name
    from .workload import is_dit_name

    deit = [v.label for v in variants if v.spec.name.startswith('deit')]
    dit = [v.label for v in variants if is_dit_name(v.spec.name) and resolve_dit_name(v.spec.name).startswith('dit_')]
    return deit[0] if deit else dit[0] if dit else labels[0]


def matmul_throughput(dtype: str, device: str, n: Optional[int] = None, repeats: int = 5) -> Dict[str, Any]:
    """Median time of an n×n @ n×n matmul (2048 on CPU, 4096 on GPU) and the MAC rate it achieves: the ceiling
    that model rates are compared with."""
    n = n or (4096 if torch.device(device).type == 'cuda' else 2048)
    torch_dtype = torch.bfloat16 if dtype == 'bf16' else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=torch_dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=torch_dtype)
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(n=n, dtype=dtype, times_ms=[t * 1e3 for t in times], median_ms=median * 1e3,
                gmacs_per_s=n ** 3 / median / 1e9)


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def load_average() -> Optional[List[float]]:
    """1-, 5- and 15-minute load averages (None where the OS does not report them)."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine_info(device: str) -> Dict[str, Any]:
    """Platform, CPU, library versions, threads and the device the run used."""
    import timm

    from .. import __version__

    cuda = torch.device(device).type == 'cuda'
    return dict(platform=platform.platform(), python=platform.python_version(), cpu=_cpu_model(),
                cpu_count=os.cpu_count(), torch=torch.__version__, timm=timm.__version__, vittt=__version__,
                threads=torch.get_num_threads(), device=device,
                device_name=torch.cuda.get_device_name(device) if cuda else _cpu_model())


def time_variants(steps: Dict[str, Callable[[], None]], settings: BenchSettings, tag: str,
                  errors: Dict[str, str], log: Log, compiled: Sequence[str] = ()) -> Dict[str, List[float]]:
    """Warm-up (at least one call for the ``compiled`` labels: it compiles), then ``repeats`` rounds in which every
    variant runs once (interleaved, so machine noise hits all alike). Returns seconds per call for each variant; a
    variant that raises is dropped and its error recorded."""
    times: Dict[str, List[float]] = {label: [] for label in steps}

    def run_once(label: str) -> Optional[float]:
        try:
            synchronize(settings.device)
            start = time.perf_counter()
            steps[label]()
            synchronize(settings.device)
            return time.perf_counter() - start
        except Exception as e:  # e.g. a model that cannot run at this size: recorded, the sweep goes on
            errors[label] = f'{type(e).__name__}: {e}'
            log(f'[bench] {tag}: {label} failed: {errors[label]}')
            return None

    for label in steps:
        for _ in range(max(settings.warmup, int(label in compiled))):
            if label not in errors and run_once(label) is None:
                break
    if settings.warmup:
        log(f'[bench] {tag}: warm-up done ({settings.warmup} call(s) each)')
    for round_index in range(settings.repeats):
        for label in steps:
            if label not in errors:
                elapsed = run_once(label)
                if elapsed is not None:
                    times[label].append(elapsed)
        summary = ' | '.join(f'{label} {times[label][-1] * 1e3:.1f} ms' for label in steps if label not in errors)
        log(f'[bench] {tag}: round {round_index + 1}/{settings.repeats}: {summary}')
    return times


def timing_entry(seconds: List[float], batch_size: int) -> Dict[str, Any]:
    median = statistics.median(seconds)
    return dict(times_ms=[s * 1e3 for s in seconds], median_ms=median * 1e3, min_ms=min(seconds) * 1e3,
                max_ms=max(seconds) * 1e3, images_per_s=batch_size / median)


def _memory_in_subprocess(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run the memory worker in a fresh interpreter and parse its JSON line."""
    command = [sys.executable, '-m', 'vittt.bench.memory', json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=MEMORY_WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return dict(error=f'memory worker timed out after {MEMORY_WORKER_TIMEOUT_S} s')
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
        return dict(error=f'memory worker exited with code {done.returncode}: {tail}')
    return result


def _measure_memory(workload: Workload, threads: int, repeats: int = 1) -> Dict[str, Any]:
    """One step's memory; on CPU in ``repeats`` fresh processes, keeping the reading with the median activation
    (``activation_runs_bytes``: all of them, in order). A CPU reading is RSS, which the allocator's state moves by
    tens of MiB from process to process; the median of a few is what a bound within a few % can be held to."""
    config = workload.to_config(threads)
    if torch.device(workload.device).type == 'cuda':
        from .memory import measure_memory
        try:
            return measure_memory(config)
        except Exception as e:  # e.g. out of memory: recorded, the sweep goes on
            return dict(error=f'{type(e).__name__}: {e}')
    readings = [_memory_in_subprocess(config) for _ in range(repeats)]
    valid = [r for r in readings if r.get('activation_bytes') is not None]
    if len(valid) < len(readings) or repeats == 1:  # an error or a single reading: the first such, as it is
        return next((r for r in readings if r.get('activation_bytes') is None), readings[0])
    chosen = dict(sorted(valid, key=lambda r: r['activation_bytes'])[(len(valid) - 1) // 2])
    chosen['activation_runs_bytes'] = [r['activation_bytes'] for r in valid]
    return chosen


def _count_macs(variant: Variant, size: Tuple[int, int], batch_size: int) -> Optional[int]:
    model = build_model(Workload(variant, size, 'infer', 'fp32', batch_size, 'cpu'))
    shape, model_args = model_input(model, size)
    return count_macs(model, shape, batch_size, model_args=model_args)


def _measure_point(workloads: Sequence[Workload], settings: BenchSettings, threads: int,
                   macs: Dict[Tuple[str, Tuple[int, int]], Optional[int]], matmul: Optional[Dict[str, Any]],
                   log: Log) -> List[Dict[str, Any]]:
    """Time (interleaved) and measure the memory of the variants at one mode, dtype and size."""
    first = workloads[0]
    tag = f'{first.mode} {first.dtype} {first.size[0]}x{first.size[1]}'
    errors: Dict[str, str] = {}
    timings: Dict[str, List[float]] = {}
    if settings.timing:
        steps = {}
        for workload in workloads:
            label = workload.variant.label
            try:
                steps[label] = make_step(build_model(workload), workload)
            except Exception as e:  # recorded per variant, the sweep goes on
                errors[label] = f'{type(e).__name__}: {e}'
                log(f'[bench] {tag}: building {label} failed: {errors[label]}')
        log(f'[bench] {tag}: timing {len(steps)} variant(s), {settings.repeats} round(s)')
        timings = time_variants(steps, settings, tag, errors, log,
                                compiled=[w.variant.label for w in workloads if w.variant.compiled])
        del steps
        gc.collect()
        if torch.device(settings.device).type == 'cuda':
            torch.cuda.empty_cache()
    entries = []
    for workload in workloads:
        label = workload.variant.label
        entry: Dict[str, Any] = dict(variant=label, mode=workload.mode, dtype=workload.dtype,
                                     size=list(workload.size), tokens=tokens(workload.size),
                                     batch_size=workload.batch_size, time=None, memory=None,
                                     macs=None if macs[label, workload.size] is None
                                     else macs[label, workload.size] * workload.batch_size)
        if label in errors:
            entry['error'] = errors[label]
            entries.append(entry)
            continue
        if timings.get(label):
            entry['time'] = timing_entry(timings[label], workload.batch_size)
            if workload.mode == 'infer' and entry['macs'] and matmul:
                rate = entry['macs'] / (entry['time']['median_ms'] / 1e3) / 1e9
                entry['time'].update(gmacs_per_s=rate, fraction_of_matmul=rate / matmul['gmacs_per_s'])
        if settings.memory and workload.variant.ort:
            entry['memory'] = dict(reason='onnxruntime allocates outside torch: not measured')
        elif settings.memory:
            memory = entry['memory'] = _measure_memory(workload, threads, settings.memory_repeats)
            if memory.get('activation_bytes') is not None:
                log(f'[bench] {tag}: {label} activation {memory["activation_bytes"] / 2 ** 20:.1f} MiB, '
                    f'total {memory["total_bytes"] / 2 ** 20:.1f} MiB')
            else:
                log(f'[bench] {tag}: {label} memory not measured: {memory.get("error") or memory.get("reason")}')
        entries.append(entry)
    return entries


def _ort_version() -> str:
    try:
        import onnxruntime
        return onnxruntime.__version__
    except ImportError:
        return '(not installed)'


def _notes(settings: BenchSettings) -> List[str]:
    """How to read the numbers (written into bench.json and bench.md)."""
    cuda = torch.device(settings.device).type == 'cuda'
    notes = [
        'MACs: one forward pass (matmuls and convolutions, torch FlopCounterMode on shape-only tensors). The fused '
        'attention kernel is counted by formula (QKᵀ + AV), so a +math variant reports the same MACs as its fused '
        'one; a +lean variant reports its model\'s MACs (the bands recompute a few context rows, not charged). '
        'A train step (forward + backward) costs about 3× the forward MACs; rates are reported for infer only.',
        'tokens: the 16×16-patch grid of the input, a model-independent resolution scale.',
        'Timing: median of interleaved rounds (every variant once per round), time.perf_counter around one call'
        + (', CUDA-synchronised' if cuda else '') + '.',
    ]
    if settings.memory and cuda:
        notes.append('Memory: peak minus before-step allocations of PyTorch\'s CUDA allocator, one step.')
    elif settings.memory:
        notes.append(('Memory: one step in a fresh process' if settings.memory_repeats == 1 else
                      f'Memory: one step in each of {settings.memory_repeats} fresh processes, the reading with the '
                      'median activation kept (all in bench.json)')
                     + ' (no warm-up); activation = peak RSS (VmHWM) during the step '
                     'minus RSS before it minus the library code pages the step faulted in; it includes first-call '
                     'allocations (thread pools, kernel scratch), so small configurations show a floor of a few MiB. '
                     'total = the process\'s peak RSS (interpreter and libraries included). Train steps include the '
                     'parameter gradients.')
    if settings.ort:
        notes.append('+ort: the model exported to ONNX by vittt export (torch.export -> torch.onnx, checked against '
                     'eager PyTorch; a vittt model once, with a dynamic batch and resolution; a model built for one '
                     'resolution, e.g. DeiT, once per resolution with a dynamic batch) and run by onnxruntime '
                     f'{_ort_version()} (CPU, default graph optimisations, intra-op threads = torch\'s); the export '
                     'is not timed and its memory is not measured')
    if settings.official:
        from .official import describe
        notes.append(f'+official: the official ViT³ TTT block ({describe(settings.official)}, LeapLabTHU/ViTTT) in '
                     'place of every vittt TTT mixer, with the same weights (checked to give the same output); the '
                     'rest of the model (patch embedding, CPE, norms, MLP) is vittt\'s')
    if settings.compile:
        notes.append('+compile: torch.compile (Inductor, static shapes: each size compiled for itself), compiled in '
                     'the warm-up (not timed); '
                     'a +compile variant reports its model\'s MACs'
                     + ('; memory after one compiling step.' if cuda else '; its memory is not measured on CPU.'))
    return notes


def run_bench(settings: BenchSettings, log: Log = _stderr, command: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the whole sweep and return the result (what bench.json holds)."""
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    threads = torch.get_num_threads()
    load_start = load_average()
    if load_start and load_start[0] > 0.5 * (os.cpu_count() or 1):
        log(f'vittt bench: warning: the machine is busy (load average {load_start[0]:.1f} on {os.cpu_count()} '
            f'cores); timings will be noisy')
    variants, params = build_variants(settings, log)
    baseline = resolve_baseline(variants, settings.baseline)
    sizes = settings.sizes_for('infer')
    all_sizes = sorted(set(sizes) | {s for mode in settings.modes for s in settings.sizes_for(mode)},
                       key=lambda s: (s[0] * s[1], s))
    log(f'[bench] {len(variants)} variant(s): {", ".join(v.label for v in variants)}; baseline {baseline}; '
        f'sizes {", ".join(f"{h}x{w}" for h, w in sizes)}; {threads} thread(s) on {settings.device}')

    matmul: Dict[str, Any] = {}
    if settings.timing:
        for dtype in settings.dtypes:
            matmul[dtype] = matmul_throughput(dtype, settings.device)
            log(f'[bench] matmul {dtype} {matmul[dtype]["n"]}³: {matmul[dtype]["gmacs_per_s"]:.1f} GMAC/s')

    macs: Dict[Tuple[str, Tuple[int, int]], Optional[int]] = {}
    counted: Dict[Tuple[str, Tuple[int, int]], Optional[int]] = {}
    for size in all_sizes:
        for variant in variants:
            # +math counts the same matmuls as fused (the flash kernel is charged by formula) and +lean the same
            # inner loop: count each model spec once per size (the lean bands' few recomputed context rows are
            # not charged)
            key = (variant.spec.text, size)
            if key not in counted:
                try:  # per image; an entry's MACs are this times its batch
                    counted[key] = _count_macs(Variant(variant.spec.text, variant.spec), size, 1)
                except Exception as e:  # counting is shape-only; a failure here is reported, not fatal
                    counted[key] = None
                    log(f'[bench] MACs of {variant.spec.text} at {size[0]}x{size[1]} not counted: '
                        f'{type(e).__name__}: {e}')
            macs[variant.label, size] = counted[key]

    measurements: List[Dict[str, Any]] = []
    for mode in settings.modes:
        mode_variants = [v for v in variants if mode == 'infer' or not (v.lean or v.ort)]  # inference-only variants
        for dtype in settings.dtypes:
            for size in settings.sizes_for(mode):
                workloads = [Workload(v, size, mode, dtype, settings.batch_for(mode), settings.device)
                             for v in mode_variants]
                measurements += _measure_point(workloads, settings, threads, macs, matmul.get(dtype), log)
    ratios = compute_ratios(measurements, baseline)
    return dict(
        schema=SCHEMA,
        command=list(command) if command is not None else list(sys.argv),
        machine=dict(machine_info(settings.device), load_average_start=load_start, load_average_end=load_average()),
        settings=dict(asdict(settings), sizes=[list(s) for s in sizes], threads=threads, baseline=baseline,
                      train_sizes=[list(s) for s in settings.sizes_for('train')],
                      train_batch_size=settings.batch_for('train')),
        variants=[dict(label=v.label, spec=v.spec.text, model=v.spec.name, kwargs=v.spec.kwargs, attn=v.attn,
                       lean=v.lean, params=params[v.label]) for v in variants],
        matmul=matmul,
        measurements=measurements,
        ratios=ratios,
        crossovers=compute_crossovers(ratios),
        notes=_notes(settings),
    )
