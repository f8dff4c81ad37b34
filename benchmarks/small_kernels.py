"""What a ViT³ block's small kernels cost at 196 tokens (224², batch 1), and the alternatives tried for them.

    python benchmarks/small_kernels.py [--threads 2] [--rounds 300]

Median µs per call, each candidate checked against the kernel it would replace first:

* a depth-wise 3×3 convolution of one map (the CPE: 192 channels; the conv inner model's application: 64 channels;
  H-ViT³'s first stage: 32-64 channels at 56²), as oneDNN runs it (channels-last, as the blocks hold tokens, and
  NCHW), PyTorch's native kernel (oneDNN off), an ``as_strided`` multiply-and-sum, nine shifted ``addcmul``s, and an
  im2col of the zero-padded map on a flat grid followed by one ``bmm``;
* the conv inner model's kernel gradient (:func:`vittt.ops.dwconv_inner_grad`, a grouped conv) on channels-last and
  on contiguous operands, and by the flat-grid im2col;
* ViT³-T's SwiGLU inner step (:func:`vittt.ops.swiglu_ttt_fused`) through ``autograd.Function.apply`` and its
  forward called directly (the wrapper's cost), beside the composable path.

docs/benchmarks.md ("Issue 15") records a run and what it ruled out.
"""
from __future__ import annotations

import argparse
import statistics
import time

import vittt  # noqa: F401  (before timm / torchvision)
import torch
import torch.nn.functional as F

from vittt.ops import dwconv_inner_grad, get_inner_loss, swiglu_ttt_fused
from vittt.ops.glu import swiglu_ttt
from vittt.ops.glu.fused import _SwiGLUTTT

CONV_SHAPES = [(192, 14), (64, 14), (64, 56), (32, 56)]   # (channels, side), batch 1


def _median_us(fn, rounds: int) -> float:
    for _ in range(max(10, rounds // 10)):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _flat_taps(x: torch.Tensor, ks: int = 3) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B·C, k², H·(W+2p)]``: every tap of the zero-padded map on the padded-width flat grid."""
    b, c, h, w = x.shape
    p = ks // 2
    wp = w + 2 * p
    flat = F.pad(x, (p, p, p, p + 1)).reshape(b * c, -1)  # one spare row keeps the last taps in range
    s = flat.stride()
    return flat.as_strided((b * c, ks, ks, h * wp), (s[0], wp * s[1], s[1], s[1])).reshape(b * c, ks * ks, h * wp)


def conv_candidates(x: torch.Tensor, weight: torch.Tensor):
    """Depth-wise 3×3 of ``x [1, C, H, W]`` (channels-last) with ``weight [C, 1, 3, 3]``, each as NCHW output."""
    c, h, w = x.shape[1:]
    tokens = x.permute(0, 2, 3, 1)                 # [1, H, W, C], the block's token layout
    taps = weight.reshape(c, 9).t().reshape(3, 3, c)

    def strided():
        p = F.pad(tokens, (0, 0, 1, 1, 1, 1))
        s = p.stride()
        view = p.as_strided((1, h, w, 3, 3, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
        return (view * taps).sum((3, 4)).permute(0, 3, 1, 2)

    def shifted():
        p = F.pad(tokens, (0, 0, 1, 1, 1, 1))
        out = p[:, :h, :w] * taps[0, 0]
        for i in range(3):
            for j in range(3):
                if i or j:
                    out.addcmul_(p[:, i:i + h, j:j + w], taps[i, j])
        return out.permute(0, 3, 1, 2)

    def im2col():
        out = torch.bmm(weight.reshape(c, 1, 9), _flat_taps(x))
        return out.reshape(1, c, h, w + 2)[..., :w]

    def native():
        with torch.backends.mkldnn.flags(enabled=False):
            return F.conv2d(x, weight, padding=1, groups=c)

    contiguous = x.contiguous()
    return {
        'oneDNN channels-last': lambda: F.conv2d(x, weight, padding=1, groups=c),
        'oneDNN NCHW': lambda: F.conv2d(contiguous, weight, padding=1, groups=c),
        'native (oneDNN off)': native,
        'as_strided mul+sum': strided,
        '9 shifted addcmul': shifted,
        'flat im2col + bmm': im2col,
    }


def grad_candidates(k: torch.Tensor, e: torch.Tensor):
    c, h, w = k.shape[1:]

    def im2col():
        return torch.bmm(_flat_taps(k), F.pad(e, (0, 2)).reshape(c, -1, 1)).reshape(1, c, 3, 3)

    return {
        'grouped conv, channels-last': lambda: dwconv_inner_grad(k, e, 3),
        'grouped conv, contiguous': lambda: dwconv_inner_grad(k.contiguous(), e.contiguous(), 3),
        'flat im2col + bmm': im2col,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {args.threads} threads, median µs of {args.rounds} calls\n')
    print('| kernel | shape [1, C, H, W] | candidate | µs |')
    print('| --- | --- | --- | ---: |')
    with torch.inference_mode():
        for c, side in CONV_SHAPES:
            x = torch.randn(1, side, side, c).permute(0, 3, 1, 2)   # a channels-last map, as the blocks hold it
            weight = torch.randn(c, 1, 3, 3)
            reference = F.conv2d(x.contiguous(), weight, padding=1, groups=c)
            for name, fn in conv_candidates(x, weight).items():
                torch.testing.assert_close(fn(), reference, atol=1e-4, rtol=1e-4)
                print(f'| depth-wise 3×3 | [1, {c}, {side}, {side}] | {name} | {_median_us(fn, args.rounds):.0f} |')
            e = torch.randn(1, side, side, c).permute(0, 3, 1, 2)
            reference = dwconv_inner_grad(x.contiguous(), e.contiguous(), 3)
            for name, fn in grad_candidates(x, e).items():
                torch.testing.assert_close(fn(), reference, atol=1e-3, rtol=1e-4)
                print(f'| kernel gradient | [1, {c}, {side}, {side}] | {name} | {_median_us(fn, args.rounds):.0f} |')

        b, n, h, d = 1, 196, 3, 64                                  # ViT³-T at 224²
        q, k, v = torch.randn(b, n, 3, h, d).unbind(2)
        w12 = torch.randn(h, d, 2 * d) * 0.02
        scale = 1 / 3

        class _NoCtx:
            def save_for_backward(self, *tensors):
                pass
        dot = get_inner_loss('dot')
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        candidates = {
            'fused, autograd.Function.apply': lambda: swiglu_ttt_fused(q, k, v, w12, scale=scale),
            'fused forward called directly': lambda: _SwiGLUTTT.forward(_NoCtx(), q, k, v, w12, -scale / n, 1.0, True),
            'composable': lambda: swiglu_ttt(qh, kh, vh, w12[None, ..., :d], w12[None, ..., d:], loss=dot,
                                             scale=scale),
        }
        for name, fn in candidates.items():
            print(f'| SwiGLU inner step | q, k, v [1, 196, 3, 64] | {name} | {_median_us(fn, args.rounds):.0f} |')


if __name__ == '__main__':
    main()
