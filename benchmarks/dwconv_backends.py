"""The per-sample depth-wise 3×3 step's two convolutions, batch folded into conv groups vs batch-independent.

    python benchmarks/dwconv_backends.py [--threads 2] [--rounds 200]

For ViT³'s conv inner model (32 channels) at the shapes it meets (batch 1 and 4 at 224², batch 1 at 448² and
1248², a training batch of 32 at 224², a batch of 8 at 448²), on token-major views of one projection output as the
mixer passes them, this times, interleaved, median of ``--rounds`` calls each:

* ``grouped`` / ``shifted``: :func:`vittt.ops.dwconv_per_sample` (the per-sample kernel applied to the queries) and
  :func:`vittt.ops.dwconv_inner_grad` (the kernel gradient) under each :func:`vittt.ops.dwconv_backend`, the grouped
  one always as the convolution;
* ``windowed``: both ops' form for small maps without autograd (the grouped backend takes it up to
  :data:`vittt.ops.dwconv.composable.WINDOWED_ELEMENTS` / ``WINDOWED_APPLY_ELEMENTS`` values);
* ``im2col``: the other batch-independent formulation, ``F.unfold`` + one batched matmul over (sample, channel),
  which is not in the library because it is slower still on this CPU.

The grouped backend is the CPU default; the shifted one is what export uses (no batch size in the graph).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import vittt.ops.dwconv.composable as composable
from vittt.ops import dwconv_backend, dwconv_inner_grad, dwconv_per_sample

SHAPES = [(1, 32, 14, 14), (4, 32, 14, 14), (1, 32, 28, 28), (1, 32, 56, 56), (1, 32, 78, 78), (32, 32, 14, 14),
          (8, 32, 28, 28)]


def _im2col_apply(x, weight):
    b, c, h, w = x.shape
    cols = F.unfold(x, 3, padding=1).view(b * c, 9, h * w)
    return torch.bmm(weight.reshape(b * c, 1, 9), cols).view(b, c, h, w)


def _im2col_grad(k, e):
    b, c, h, w = k.shape
    cols = F.unfold(k, 3, padding=1).view(b * c, 9, h * w)
    return torch.bmm(cols, e.reshape(b * c, h * w, 1)).view(b, c, 3, 3)


def _with_backend(name, fn, windowed_elements=None):
    """``fn`` under the dwconv backend ``name`` (and, if given, both windowed forms' size limit)."""
    names = ('WINDOWED_ELEMENTS', 'WINDOWED_APPLY_ELEMENTS')

    def run(*args):
        limits = [getattr(composable, n) for n in names]
        for n, limit in zip(names, limits):
            setattr(composable, n, limit if windowed_elements is None else windowed_elements)
        try:
            with dwconv_backend(name):
                return fn(*args)
        finally:
            for n, limit in zip(names, limits):
                setattr(composable, n, limit)
    return run


def _token_major(shape, generator):
    """Two ``[B, C, H, W]`` views of one token-major ``[B, H·W, 3C]`` tensor (a QKV projection's output)."""
    b, c, h, w = shape
    rows = torch.randn(b, h * w, 3 * c, generator=generator)
    return [rows[..., i * c:(i + 1) * c].reshape(b, h, w, c).permute(0, 3, 1, 2) for i in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; median µs per call over {args.rounds} '
          'interleaved rounds')
    print('| shape [B, C, H, W] | op | grouped | windowed | shifted | im2col | shifted / grouped |')
    print('| --- | --- | ---: | ---: | ---: | ---: | ---: |')
    grad = lambda a, b: dwconv_inner_grad(a, b, 3)  # noqa: E731
    for shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        x, e = _token_major(shape, g)
        weight = torch.randn(shape[0], shape[1], 3, 3, generator=g)
        ops = {
            'apply': {'grouped': _with_backend('grouped', dwconv_per_sample, windowed_elements=-1),
                      'windowed': _with_backend('grouped', dwconv_per_sample, windowed_elements=1 << 62),
                      'shifted': _with_backend('shifted', dwconv_per_sample), 'im2col': _im2col_apply},
            'gradient': {'grouped': _with_backend('grouped', grad, windowed_elements=-1),
                         'windowed': _with_backend('grouped', grad, windowed_elements=1 << 62),
                         'shifted': _with_backend('shifted', grad), 'im2col': _im2col_grad},
        }
        for op, fns in ops.items():
            operand = weight if op == 'apply' else e
            reference = fns['grouped'](x, operand)
            for fn in fns.values():  # all compute the same thing
                torch.testing.assert_close(fn(x, operand), reference, rtol=1e-4, atol=1e-3)
            times = {name: [] for name in fns}
            with torch.inference_mode():
                for _ in range(10):
                    for fn in fns.values():
                        fn(x, operand)
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        start = time.perf_counter()
                        fn(x, operand)
                        times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            print(f'| {list(shape)} | {op} | {med["grouped"]:.0f} | {med["windowed"]:.0f} | {med["shifted"]:.0f} | '
                  f'{med["im2col"]:.0f} | {med["shifted"] / med["grouped"]:.1f}× |')


if __name__ == '__main__':
    main()
