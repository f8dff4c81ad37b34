"""Eager vs torch.compile latency of ViT³-T and DeiT-T at one resolution, interleaved in one process.

    python benchmarks/compile_latency.py --size 224 [--freezing] [--rounds 11] [--threads 2]

Prints each variant's median over the rounds (after two compiled warm-up calls and three warm-up rounds) and its
ratio to eager DeiT-T, plus the cold compile time of each model. Inference, batch 1, fp32.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vittt  # noqa: F401  (registers the models with timm)
import timm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--freezing', action='store_true', help='torch._inductor.config.freezing = True')
    parser.add_argument('--rounds', type=int, default=11)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--models', nargs='+', default=['vit3_tiny', 'deit_tiny_patch16_224'])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config
    inductor_config.freezing = args.freezing
    x = torch.randn(1, 3, args.size, args.size)
    variants = {}
    with torch.inference_mode():
        for name in args.models:
            model = timm.create_model(name, img_size=args.size).eval()
            variants[name] = model
            start = time.perf_counter()
            compiled = torch.compile(model, fullgraph=True)
            compiled(x)
            compiled(x)
            print(f'{name}: cold compile {time.perf_counter() - start:.1f} s', flush=True)
            variants[f'{name}+compile'] = compiled
        for model in variants.values():
            for _ in range(3):
                model(x)
        times = {label: [] for label in variants}
        for _ in range(args.rounds):
            for label, model in variants.items():
                start = time.perf_counter()
                model(x)
                times[label].append(time.perf_counter() - start)
    base = statistics.median(times[args.models[-1]])
    for label, values in times.items():
        median = statistics.median(values)
        print(f'{label:32s} {median * 1e3:8.2f} ms   {median / base:.3f}x {args.models[-1]} eager')


if __name__ == '__main__':
    main()
