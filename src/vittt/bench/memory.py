"""Peak memory of one step.

CPU: run as ``python -m vittt.bench.memory '<config JSON>'`` in a fresh process per configuration (allocator caches
make in-process numbers meaningless); it prints one JSON line. The peak resident set (VmHWM) is reset to the current
resident set after the model and inputs exist (``/proc/self/clear_refs``), then ONE step runs: activation = VmHWM -
VmRSS before the step - the file-backed pages the step faulted in (RssFile growth: library code run for the first
time, 10-20 MiB, which is not activation memory), total = VmHWM (the whole process: interpreter, libraries, weights,
inputs and activations). There is no warm-up step on purpose: it would leave freed pages resident in the heap and hide
the real peak, so the activation includes first-call allocations (thread pools, kernel scratch buffers); and code
pages first faulted after the peak are subtracted too, a small under-count (a few MiB) in train mode.

CUDA: in-process from PyTorch's allocator statistics (activation = peak allocated - allocated before the step).
"""
from __future__ import annotations

import gc
import json
import sys
from typing import Any, Dict, Optional

import torch

from .workload import Workload, build_model, make_step, synchronize

__all__ = ['measure_memory', 'read_proc_status']

STATUS = '/proc/self/status'
CLEAR_REFS = '/proc/self/clear_refs'


def read_proc_status(field: str) -> int:
    """A ``Vm*`` field of /proc/self/status in bytes."""
    with open(STATUS) as f:
        for line in f:
            if line.startswith(f'{field}:'):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f'{field} not in {STATUS}')


def _reset_peak_rss() -> Optional[str]:
    """Reset VmHWM to the current resident set; returns why that is impossible, or None."""
    try:
        with open(CLEAR_REFS, 'w') as f:
            f.write('5')
        read_proc_status('VmHWM')
    except OSError as e:
        return f'cannot reset the peak resident set ({CLEAR_REFS}: {e}); memory needs Linux procfs'
    return None


def _rss_file() -> int:
    """File-backed resident pages (RssFile; 0 where the kernel does not report it)."""
    try:
        return read_proc_status('RssFile')
    except OSError:
        return 0


def _unmeasured(reason: str) -> Dict[str, Any]:
    return dict(activation_bytes=None, total_bytes=None, before_bytes=None, method=None, reason=reason)


def _measure_cpu(workload: Workload) -> Dict[str, Any]:
    if workload.variant.compiled:
        return _unmeasured('compiled variant: the one measured step would include the compilation (and a warm-up '
                           'step would hide the peak, see vittt.bench.memory)')
    reason = _reset_peak_rss()  # checked before building anything
    if reason:
        return _unmeasured(reason)
    model = build_model(workload)
    step = make_step(model, workload)
    gc.collect()
    file_before = _rss_file()
    before = read_proc_status('VmRSS')
    _reset_peak_rss()
    step()
    peak = read_proc_status('VmHWM')
    code_pages = max(_rss_file() - file_before, 0)
    return dict(activation_bytes=max(peak - before - code_pages, 0), total_bytes=peak, before_bytes=before,
                peak_rss_growth_bytes=max(peak - before, 0), file_pages_faulted_bytes=code_pages,
                method='procfs: VmHWM - VmRSS before - file-backed pages faulted in (fresh process, one step)')


def _measure_cuda(workload: Workload) -> Dict[str, Any]:
    device = torch.device(workload.device)
    model = build_model(workload)
    step = make_step(model, workload)
    if workload.variant.compiled:
        step()  # compiles; the allocator's peak is reset below
    gc.collect()
    synchronize(workload.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(workload.device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return dict(activation_bytes=max(peak - before, 0), total_bytes=peak, before_bytes=before,
                method='torch.cuda.max_memory_allocated (one step)')


def measure_memory(config: Dict[str, Any]) -> Dict[str, Any]:
    """Peak activation and total memory of one step of the workload described by ``config``
    (``Workload.to_config``). On CPU call it in a fresh process (this module's ``__main__``)."""
    if config.get('threads'):
        torch.set_num_threads(int(config['threads']))
    workload = Workload.from_config(config)
    if torch.device(workload.device).type == 'cuda':
        return _measure_cuda(workload)
    return _measure_cpu(workload)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print('usage: python -m vittt.bench.memory \'<config JSON>\'', file=sys.stderr)
        return 2
    try:
        result = measure_memory(json.loads(argv[0]))
    except Exception as e:  # reported to the parent as data; it records the failure and goes on
        print(json.dumps(dict(error=f'{type(e).__name__}: {e}')), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
