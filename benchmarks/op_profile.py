"""Where a model's time goes: ``torch.profiler`` over a few forwards (or training steps), self CPU time per op, per
call, as a markdown table. The profiles behind the misses in docs/benchmarks.md.

    python benchmarks/op_profile.py vit3_tiny deit_tiny_patch16_224 --size 224 --batch-size 1
    python benchmarks/op_profile.py vit3_tiny --size 224 --batch-size 32 --mode train --steps 2
    python benchmarks/op_profile.py vit3_tiny --official ../ViTTT   # and with the official TTT block in place

Models are built as ``vittt bench`` builds them (``name:key=value,...`` specs, a fixed seed).
"""
from __future__ import annotations

import argparse
import statistics
import time

import vittt  # noqa: F401  (registers the models; must come before timm)
import torch
from torch.profiler import ProfilerActivity, profile

from vittt.bench import Variant, parse_model_spec
from vittt.bench.workload import Workload, build_model, make_step


def profile_model(text: str, size: int, batch_size: int, mode: str, steps: int, official=None, top: int = 18):
    spec = parse_model_spec(text)
    workload = Workload(Variant(text + ('+official' if official else ''), spec, official=official),
                        (size, size), mode, 'fp32', batch_size)
    model = build_model(workload)
    step = make_step(model, workload)
    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    calls = sum(e.count for e in events) / steps
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    print(f'\n### {workload.variant.label}, {mode} {size}², batch {batch_size}: median '
          f'{statistics.median(times):.1f} ms unprofiled; {total:.1f} ms self CPU under the profiler, '
          f'{calls:.0f} op calls per step\n')
    print('| op | ms per step | calls per step | µs per call | share |')
    print('| --- | ---: | ---: | ---: | ---: |')
    for e in rows:
        ms = e.self_cpu_time_total / steps / 1e3
        print(f'| `{e.key}` | {ms:.2f} | {e.count / steps:.0f} | {e.self_cpu_time_total / max(e.count, 1):.0f} | '
              f'{ms / total:.1%} |')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('models', nargs='+', help='model specs (name or name:key=value,...)')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--mode', choices=['infer', 'train'], default='infer')
    p.add_argument('--steps', type=int, default=5, help='profiled steps')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--top', type=int, default=18, help='ops listed')
    p.add_argument('--official', metavar='PATH', help='also profile each model with the official TTT block')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for text in args.models:
        profile_model(text, args.size, args.batch_size, args.mode, args.steps, top=args.top)
        if args.official and not text.startswith(('deit', 'vit_', 'convnext', 'swin', 'pvt')):
            profile_model(text, args.size, args.batch_size, args.mode, args.steps, args.official, args.top)


if __name__ == '__main__':
    main()
