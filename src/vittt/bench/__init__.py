"""Efficiency measurement: MAC counting and the ``vittt bench`` speed / memory sweep."""
from .flops import count_macs, count_params
from .report import (Crossover, compute_crossovers, compute_ratios, find_crossover, memory_ratio, render_markdown,
                     speedup, write_outputs)
from .runner import (BenchSettings, build_variants, load_average, machine_info, matmul_throughput, resolve_baseline,
                     run_bench, time_variants, timing_entry)
from .spec import ModelSpec, Variant, check_model_name, expand_variants, parse_model_spec, probe_model

__all__ = ['count_macs', 'count_params', 'Crossover', 'compute_crossovers', 'compute_ratios', 'find_crossover',
           'memory_ratio', 'render_markdown', 'speedup', 'write_outputs', 'BenchSettings', 'build_variants',
           'machine_info', 'matmul_throughput', 'resolve_baseline', 'run_bench', 'load_average', 'time_variants',
           'timing_entry', 'ModelSpec', 'Variant',
           'check_model_name', 'expand_variants', 'parse_model_spec', 'probe_model', 'measure_memory']


def __getattr__(name: str):
    # imported on first use: `python -m vittt.bench.memory` must not find the module already imported by its package
    if name == 'measure_memory':
        from .memory import measure_memory
        return measure_memory
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
