"""Calibration of Vittt-T/S/B against DeiT-T/S/B: parameters, and MACs at a resolution (default 1280²).

The Vision-TTT paper reports that at 1280² Vittt-T/S/B need 79.4 % / 66.3 % / 48.9 % fewer FLOPs than DeiT-T/S/B.
Its model sizes are not published; vittt chose widths, depths, heads and mini-batch sizes so that its own counter
(``vittt.bench.count_macs``: matmuls and convolutions incl. the TTT inner loop and DeiT's attention) reproduces
those reductions within ±3 points. Run:

    .venv/bin/python benchmarks/vision_ttt_calibration.py [--size 1280] [--json out.json]

(several minutes on 2 cores: the mini-batch scan is traced op by op on shape-only tensors).
"""
import argparse
import json

import vittt  # noqa: F401  (registers the models; import before timm on CPU-only torch)
import timm

from vittt.bench import count_macs, count_params

PAPER = {'tiny': 79.4, 'small': 66.3, 'base': 48.9}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=1280)
    parser.add_argument('--json')
    args = parser.parse_args()
    rows = []
    print(f'{"size":<6}{"Vittt params":>13}{"DeiT params":>12}{"Vittt GMACs":>12}{"DeiT GMACs":>11}'
          f'{"reduction":>10}{"paper":>7}{"mini-batch":>11}')
    for name, paper in PAPER.items():
        ours = timm.create_model(f'vision_ttt_{name}')
        deit = timm.create_model(f'deit_{name}_patch16_224', dynamic_img_size=True)
        macs = count_macs(ours, (3, args.size, args.size))
        deit_macs = count_macs(deit, (3, args.size, args.size))
        row = dict(model=f'vision_ttt_{name}', params=count_params(ours), deit_params=count_params(deit), macs=macs,
                   deit_macs=deit_macs, reduction=100 * (1 - macs / deit_macs), paper=paper,
                   mini_batch_size=ours.blocks[0].mixer.mini_batch_size, size=args.size)
        rows.append(row)
        print(f'{name:<6}{row["params"] / 1e6:>12.2f}M{row["deit_params"] / 1e6:>11.2f}M{macs / 1e9:>12.1f}'
              f'{deit_macs / 1e9:>11.1f}{row["reduction"]:>9.1f}%{paper:>6.1f}%{row["mini_batch_size"]:>11}',
              flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
