"""``vittt ablate --table N``: argument parsing of the ablation runner (the work is in :mod:`.run`)."""
from __future__ import annotations

import argparse

__all__ = ['add_ablate_parser', 'cmd_ablate']


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected a non-negative integer, got {text!r}')
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def add_ablate_parser(subparsers) -> argparse.ArgumentParser:
    """``vittt ablate`` on the ``vittt`` command's subparsers."""
    from .run import BENCH, DEFAULT_TRAIN_SUBSET, QUICK
    from .tables import TABLE_TITLES

    tables = '; '.join(f'{n}: {title.split(" — ", 1)[-1]}' for n, title in TABLE_TITLES.items())
    p = subparsers.add_parser(
        'ablate', help="one of ViT³'s ablation tables (spec A.6): counts, throughput and small-scale training per row",
        description="Re-run one of ViT³'s ablation tables: for every row (a switch of vit3_design_small), params and "
                    f"MACs of the full-size model at 224², its inference throughput here ({BENCH['size']}², batch "
                    f"{BENCH['batch']}, every row interleaved as in vittt bench) and a small-scale training run "
                    "(the fashion_mnist_demo recipe's shape, recipe and budget, the row's switches on top), next to "
                    "the paper's numbers. Finished rows are skipped on a rerun, unfinished ones resume. Writes "
                    "report.md, results.json, ablation.png and curves.png.")
    p.add_argument('--table', type=int, required=True, metavar='N', help=f'the table ({tables})')
    p.add_argument('--data', default='fashion-mnist',
                   help="'fashion-mnist' (default) or any dataset vittt train takes (28×28 grey is what the recipe "
                        "is for)")
    p.add_argument('--epochs', type=_positive_int, help="training epochs per row (default: the recipe's, 3)")
    p.add_argument('--train-subset', type=_non_negative_int,
                   help=f'train on the first K training images (default {DEFAULT_TRAIN_SUBSET}; 0 = all 60,000)')
    p.add_argument('--val-subset', type=_non_negative_int, help='test on the first K test images (default: all)')
    p.add_argument('--rows', nargs='+', metavar='LABEL',
                   help="only these rows (labels as in the table, quoted, or their slugs such as 'fc-x'; the base "
                        "row is always run)")
    p.add_argument('--no-bench', action='store_true', help='skip the throughput measurement')
    p.add_argument('--quick', action='store_true',
                   help=f'a smoke run: {QUICK["epochs"]} epoch over {QUICK["train_subset"]} images (batch '
                        f'{QUICK["batch_size"]}), {QUICK["val_subset"]} test images, the throughput of the small '
                        f'shape at {QUICK["bench"]["size"]}²')
    p.add_argument('--threads', type=_positive_int,
                   help="torch threads (default: torch's; 1 with --quick)")
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--output', help='folder (default results/ablate/table<N>, results/ablate/table<N>_quick with '
                                    '--quick)')
    p.set_defaults(func=cmd_ablate)
    return p


def cmd_ablate(args) -> int:
    from .run import run_ablation

    run_ablation(args.table, output=args.output, data=args.data, epochs=args.epochs, train_subset=args.train_subset,
                 val_subset=args.val_subset, quick=args.quick, rows=args.rows, bench=not args.no_bench,
                 progress=not args.no_progress, threads=args.threads,
                 command=getattr(args, 'command_line', None))
    return 0
