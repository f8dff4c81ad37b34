"""``vittt ablate --table N``: one of ViT³'s ablation tables (spec A.6) re-run on this machine, next to the paper's.

For every row of the table (:mod:`.tables`), the same switches of ``vit3_design_small`` give

1. **counts at 224²** of the full-size model (params, MACs), built on the meta device;
2. **throughput** of the full-size model at 224² (inference, no grad), measured like ``vittt bench``: every row built
   in one process, warm-up calls, then rounds in which every row runs once (interleaved, so machine noise hits all
   alike), median of the rounds; reported as images/s and as a ratio to the table's base row, next to the paper's
   FPS ratio (the paper's absolute FPS come from an unstated GPU and batch: only the ratios are comparable);
3. **small-scale training**: the row's switches on the shape of the demo recipe ``fashion_mnist_demo`` (patch 7,
   96 wide, 6 blocks, 3 heads of 32 on 28×28 grey Fashion-MNIST), every row trained with that one recipe, budget
   and seed, then test top-1 / loss; a run whose loss turns non-finite is recorded as diverged (with its best top-1
   before, like the paper's ``*``), not fatal.

Every row trains into ``<output>/rows/<slug>/`` (the Trainer's run folder, checkpoint ``last.pth`` at each epoch);
a finished row is saved as ``<output>/rows/<slug>.json`` and skipped on a rerun, an unfinished one resumes from its
checkpoint (exact resume: a killed run continued gives the same numbers), and the throughput of a run is kept in
``<output>/bench.json`` and reused by a rerun with the same bench settings. So a killed ``vittt ablate`` rerun gives
the same table. A rerun with a different budget into the same folder is refused (it would mix budgets in one table).

Outputs: ``results.json``, ``report.md`` (the table in the paper's layout with ours next to it and one sentence per row
on whether the paper's ordering against the base reproduces, computed from the numbers), ``ablation.png`` (Δtop-1
and throughput ratio, ours vs the paper's, and our top-1 curves) and ``curves.png`` (loss / top-1 of every row).

**Budget** (measured on the 2-core CPU this was written on, 1 torch thread, often another process busy on the other
core): a 224² forward of the 22.6M-parameter base at batch 8 takes ~2 s (~4 images/s; the widest rows ~3 s), so the
bench runs batch 8, 1 warm-up call and 5 timed rounds per row: ~1 minute for Table 1's 5 rows, ~2.5 for Table 4's
11. Training: the recipe's 3 epochs over the first 8,000 training images (186 updates of batch 128; ~250 images/s for
the base), each epoch tested on all 10,000 test images (~13 s): 2-2.5 minutes for a row of the base's cost, up to
~5 for the widest (MLP r4, Conv3×3). Measured: Table 1 in 14 minutes, Table 4 in 39 (the longest table).
On a shared machine pass ``threads=1`` (``--threads 1``): two torch threads competing with another process for two
cores ran the same training ten times slower. ``quick=True`` (CI): 1 epoch over 32 images (batch 32), 32 test
images, the bench on the small shape at 28² (batch 2, 1 warm-up call, 1 round) and the counts from a 1-block build
(the blocks are identical, so they are exact: tests/tasks/ablate/test_tables.py); ~10 s for Table 4 in-process.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .tables import BASE_MODEL, TABLE_TITLES, Row, get_table

__all__ = ['ABLATE_RECIPE', 'SCHEMA', 'BENCH', 'QUICK', 'DEFAULT_TRAIN_SUBSET', 'run_ablation', 'base_label',
           'row_slug', 'select_rows', 'count_row', 'bench_rows', 'train_row', 'row_recipe', 'compare_row',
           'render_report', 'plot_ablation']

SCHEMA = 'vittt-ablate/1'
ABLATE_RECIPE = 'fashion_mnist_demo'
#: the default training budget per row: the recipe's epochs over the first this-many training images
DEFAULT_TRAIN_SUBSET = 8000
#: the throughput measurement of a real run: the full-size model at size², batch, warm-up calls, timed rounds
BENCH = dict(size=224, batch=8, warmup=1, repeats=5, model_kwargs={})
#: everything tiny (CI): the budget overrides and the bench on the demo shape
QUICK = dict(epochs=1, train_subset=32, val_subset=32, batch_size=32,
             bench=dict(size=28, batch=2, warmup=1, repeats=1,
                        model_kwargs=dict(patch_size=7, embed_dim=96, depth=6, num_heads=3)))
#: tables whose base row has switches: the base's default spelled out (Table 1: dot product, Table 3: η = 1)
_BASE_SWITCHES = {1: {'inner_loss': 'dot'}, 3: {'inner_lr': 1.0}}
_TRANSLITERATE = {'η': 'eta', '⊙': 'x', '×': 'x', '₁': '1', '₂': '2'}

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------- rows

def base_label(table: int) -> str:
    """The label of the table's base row (every Δ and ratio is against it): the row without switches, or the one
    spelling out the base's default (Table 1: the dot product; Table 3: η = 1)."""
    switches = _BASE_SWITCHES.get(table, {})
    return next(r.label for r in get_table(table) if r.switches == switches)


def row_slug(index: int, label: str) -> str:
    """File-system name of a row: its index in the table and its label in lowercase ASCII ('04-fc-x')."""
    text = ''.join(_TRANSLITERATE.get(c, c) for c in label)
    text = unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode().lower()
    words, current = [], ''
    for char in text:
        if char.isalnum() or char == '.':
            current += char
        elif current:
            words.append(current)
            current = ''
    words.append(current)
    return f'{index:02d}-' + '-'.join(w for w in words if w)


def select_rows(table: int, labels: Optional[Sequence[str]] = None) -> List[Tuple[int, Row]]:
    """``(index, row)`` of the rows to run, in table order: all, or those named in ``labels`` (a label as printed,
    its slug with or without the index, case-insensitive) plus the base row. Raises ValueError naming the valid
    labels for an unknown one."""
    rows = list(enumerate(get_table(table)))
    if not labels:
        return rows
    names: Dict[str, int] = {}
    for index, row in rows:
        slug = row_slug(index, row.label)
        for name in (row.label, slug, slug.split('-', 1)[1]):
            names.setdefault(name.lower(), index)
    unknown = [label for label in labels if label.strip().lower() not in names]
    if unknown:
        raise ValueError(f'table {table} has no row {", ".join(map(repr, unknown))}; its rows are: '
                         + ', '.join(repr(r.label) for _, r in rows)
                         + ' (or their slugs: ' + ', '.join(row_slug(i, r.label) for i, r in rows) + ')')
    wanted = {names[label.strip().lower()] for label in labels}
    base = base_label(table)
    return [(i, r) for i, r in rows if i in wanted or r.label == base]


def row_recipe(switches: Dict[str, Any], overrides: Optional[Dict[str, Any]] = None,
               notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """The recipe of one row's small-scale run: ``fashion_mnist_demo`` (budget ``overrides`` on top) training
    ``vit3_design_small`` with the recipe's ``model_kwargs`` and the row's switches on top."""
    from ...engine import load_recipe

    shape = load_recipe(ABLATE_RECIPE)['model_kwargs']
    return load_recipe(ABLATE_RECIPE, dict(overrides or {}, model=BASE_MODEL,
                                           model_kwargs={**shape, **switches}), notes)


# ---------------------------------------------------------------------------------------------- counts

def count_row(switches: Dict[str, Any], size: int = 224, exact_build: bool = True) -> Dict[str, int]:
    """Params and MACs (one image at ``size``²) of the full-size ``vit3_design_small`` with ``switches``, built on
    the meta device. ``exact_build=False`` counts a 0- and a 1-block model and extrapolates to the 12 blocks (the
    blocks are identical, so the numbers are the same; a tenth of the time). Counts are kept for the process."""
    key = (json.dumps(switches, sort_keys=True), size, exact_build)
    if key not in _COUNTS:
        _COUNTS[key] = _count_row(switches, size, exact_build)
    return dict(_COUNTS[key])


def _count_row(switches: Dict[str, Any], size: int, exact_build: bool) -> Dict[str, int]:
    import timm
    import torch

    from ...bench import count_macs, count_params

    def build(**kwargs) -> Tuple[int, int]:
        with torch.device('meta'):
            model = timm.create_model(BASE_MODEL, **switches, **kwargs)
        return count_params(model), count_macs(model, (3, size, size))

    if exact_build:
        params, macs = build()
    else:
        if size not in _STEM_COUNTS:  # no blocks: the switches change nothing
            _STEM_COUNTS[size] = build(depth=0)
        stem, block = _STEM_COUNTS[size], build(depth=1)
        params, macs = (s + 12 * (b - s) for s, b in zip(stem, block))
    return dict(params=params, macs=macs)


_STEM_COUNTS: Dict[int, Tuple[int, int]] = {}
_COUNTS: Dict[Tuple[str, int, bool], Dict[str, int]] = {}


# ---------------------------------------------------------------------------------------------- throughput

def bench_rows(rows: Sequence[Tuple[str, Dict[str, Any]]], size: int = 224, batch: int = 8, warmup: int = 1,
               repeats: int = 3, model_kwargs: Optional[Dict[str, Any]] = None, device: str = 'cpu',
               log: Log = _print) -> Dict[str, Dict[str, Any]]:
    """Inference throughput of ``vit3_design_small`` with each row's switches (``(label, switches)``; plus
    ``model_kwargs``) at ``size``², batch ``batch``: ``vittt bench``'s timing (:func:`vittt.bench.time_variants`:
    warm-up, then interleaved rounds; median). Returns ``{label: timing entry}`` (``images_per_s``, ``median_ms``,
    ...; ``error`` for a row that could not be built or run)."""
    from ...bench import BenchSettings, Variant, time_variants, timing_entry
    from ...bench.spec import ModelSpec
    from ...bench.workload import Workload, build_model, make_step

    settings = BenchSettings(models=[label for label, _ in rows], sizes=[(size, size)], batch_size=batch,
                             warmup=warmup, repeats=repeats, device=device, memory=False)
    settings.validate()
    steps, errors = {}, {}
    for label, switches in rows:
        spec = ModelSpec(text=label, name=BASE_MODEL, kwargs={**(model_kwargs or {}), **switches})
        workload = Workload(Variant(label, spec), (size, size), 'infer', 'fp32', batch, device)
        try:
            steps[label] = make_step(build_model(workload), workload)
        except Exception as e:  # recorded for the row, the table goes on
            errors[label] = f'{type(e).__name__}: {e}'
            log(f'[bench] building {label} failed: {errors[label]}')
    tag = f'infer fp32 {size}x{size} batch {batch}'
    log(f'[bench] {tag}: timing {len(steps)} row(s), {warmup} warm-up call(s) and {repeats} round(s) each')
    times = time_variants(steps, settings, tag, errors, log)
    return {label: timing_entry(times[label], batch) if times.get(label) else
            dict(error=errors.get(label, 'not timed')) for label, _ in rows}


# ---------------------------------------------------------------------------------------------- training

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def train_row(recipe: Dict[str, Any], datasets: Tuple[Any, Any, int], folder, info=None,
              progress: bool = True, curves: bool = True, log: Log = _print) -> Dict[str, Any]:
    """Train one row (``recipe`` from :func:`row_recipe`) into ``folder`` (resuming from ``folder/last.pth`` when it
    is there) and return its result: final test ``top1`` / ``top5`` / ``val_loss``, ``history``, and ``diverged``
    when the loss (or the test loss) turned non-finite, with ``top1`` then the best test top-1 before (None when no
    evaluation came first). ``curves=False``: no ``curves.png`` in the run folder (the table's plots every row)."""
    import yaml

    from ...engine import Trainer, get_task, recipe_yaml

    folder = Path(folder)
    train_set, val_set, num_classes = datasets
    resume = None
    if (folder / 'last.pth').is_file():
        saved = folder / 'recipe.yaml'
        if saved.is_file() and yaml.safe_load(saved.read_text()) != yaml.safe_load(recipe_yaml(recipe)):
            raise ValueError(f'{folder} holds a run with another recipe than this one; give another --output (or '
                             f'delete {folder}) to train with this budget')
        resume = str(folder / 'last.pth')
    start = time.perf_counter()
    task = get_task('classification')(recipe, num_classes)  # (every task is registered by import vittt)
    if not curves:
        task.report = lambda history, output, title=None: None
    trainer = Trainer(task, train_set, val_set, folder, info, resume=resume, progress=progress)
    resumed_at = trainer.num_updates if resume else None
    failure = None
    try:
        history = trainer.fit()
    except RuntimeError as e:
        if not str(e).startswith('the loss is'):  # the Trainer's non-finite-loss error; anything else is a bug
            raise
        trainer.log.close()
        history, failure = trainer.history, str(e)
        log(f'   diverged: {failure}')
    seconds = time.perf_counter() - start
    evaluated = [r for r in history if 'top1' in r]
    final = evaluated[-1] if evaluated else {}
    diverged = failure is not None or not _finite(final.get('val_loss')) or not _finite(final.get('train_loss'))
    if diverged and failure is None:
        failure = f'non-finite loss at epoch {final.get("epoch")} (train {final.get("train_loss")}, test ' \
                  f'{final.get("val_loss")})'
    finite_top1 = [r['top1'] for r in evaluated if _finite(r.get('val_loss'))]
    if diverged:
        top1 = max(finite_top1) if finite_top1 else None
    else:
        top1 = final['top1']
    return dict(top1=top1, top5=None if diverged else final.get('top5'),
                val_loss=None if diverged else final.get('val_loss'),
                best_top1=max(finite_top1) if finite_top1 else None,
                diverged=diverged, divergence=failure, epochs=recipe['epochs'],
                train_images=len(trainer.train_set), test_images=len(trainer.val_set),
                updates=trainer.num_updates, total_updates=trainer.total_updates, train_seconds=seconds,
                resumed_at_update=resumed_at, history=_json_roundtrip(history))


# ---------------------------------------------------------------------------------------------- comparison

def _noise(top1: Optional[float], images: int) -> Optional[float]:
    """Twice the binomial standard error of a difference of two top-1s (%) on ``images`` test images: a floor
    for the noise of Δtop-1 (seed-to-seed variation is not measured and is usually larger)."""
    if top1 is None or not images:
        return None
    p = min(max(top1 / 100, 0.0), 1.0)
    return 2 * 100 * math.sqrt(2 * p * (1 - p) / images)


def _direction(delta: Optional[float], diverged: bool = False) -> str:
    if diverged:
        return 'diverged'
    if delta is None:
        return 'unknown'
    return 'better' if delta > 0 else 'worse' if delta < 0 else 'tied'


def compare_row(row: Dict[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    """Δtop-1 and throughput ratio of ``row`` against ``base`` (entries of results.json's ``rows``), ours and the
    paper's, and the verdict: whether the paper's ordering against the base reproduces at small scale
    (``reproduces``: True / False / None when either side has no number) and one sentence saying so."""
    paper, ours = row['paper'], row.get('train') or {}
    base_paper, base_ours = base['paper'], base.get('train') or {}
    out: Dict[str, Any] = dict(paper_delta=None, delta=None, paper_fps_ratio=None, throughput_ratio=None,
                               noise=None, reproduces=None)
    if paper['top1'] is not None and base_paper['top1'] is not None:
        out['paper_delta'] = round(paper['top1'] - base_paper['top1'], 2)
    if ours.get('top1') is not None and base_ours.get('top1') is not None:
        out['delta'] = ours['top1'] - base_ours['top1']
    if paper['fps'] and base_paper['fps']:
        out['paper_fps_ratio'] = paper['fps'] / base_paper['fps']
    mine, base_mine = (row.get('bench') or {}).get('images_per_s'), (base.get('bench') or {}).get('images_per_s')
    if mine and base_mine:
        out['throughput_ratio'] = mine / base_mine
    out['noise'] = _noise(base_ours.get('top1'), base_ours.get('test_images') or 0)

    label = row['label']
    if row['label'] == base['label']:
        out['verdict'] = f'**{label}** is the base row: every Δ and ratio is against it.'
        return out
    if not ours:
        out['verdict'] = f'**{label}**: not trained (no small-scale number).'
        return out
    if base_ours.get('diverged'):
        out['verdict'] = f'**{label}**: our base run diverged, so there is no ordering to compare.'
        return out
    paper_dir = _direction(out['paper_delta'], paper.get('diverged', False))
    ours_dir = _direction(out['delta'], ours.get('diverged', False))
    noise, delta = out['noise'], out['delta']
    noisy = delta is not None and noise is not None and abs(delta) <= noise
    noise_text = '' if noise is None or delta is None else \
        (f', within the ±{noise:.2f} test-set noise' if noisy else f', beyond the ±{noise:.2f} test-set noise')
    paper_text = ('the paper\'s run diverged (best ' f'{paper["top1"]:.1f} before, Δ {out["paper_delta"]:+.1f})'
                  if paper_dir == 'diverged' else
                  'the paper gives no top-1' if paper_dir == 'unknown' else
                  f'the paper has it {paper_dir} than the base (Δ {out["paper_delta"]:+.1f})' if paper_dir != 'tied'
                  else 'the paper has it tied with the base (Δ 0.0)')
    if ours_dir == 'diverged':
        ours_text = 'ours diverged' + (f' (best {ours["top1"]:.2f} before)' if ours.get('top1') is not None else '')
    elif ours_dir == 'unknown':
        ours_text = 'ours has no top-1'
    else:
        ours_text = f'ours is {ours_dir} (Δ {delta:+.2f}{noise_text})' if ours_dir != 'tied' else \
            f'ours is tied (Δ {delta:+.2f})'
    if paper_dir == 'unknown' or ours_dir == 'unknown':
        reproduces = None
    elif paper_dir == 'tied':
        reproduces = ours_dir == 'tied' or noisy
    else:
        paper_worse = paper_dir in ('worse', 'diverged')
        ours_worse = ours_dir in ('worse', 'diverged')
        reproduces = paper_worse == ours_worse and ours_dir != 'tied'
    out['reproduces'] = reproduces
    head = {True: 'the paper\'s ordering against the base reproduces' + (' (but only within noise)' if noisy else ''),
            False: 'the paper\'s ordering against the base does not reproduce',
            None: 'no ordering to compare'}[reproduces]
    sentence = f'**{label}**: {head}: {paper_text}; {ours_text}.'
    if out['throughput_ratio'] is not None:
        ratio, paper_ratio = out['throughput_ratio'], out['paper_fps_ratio']
        speed = f' Throughput ×{ratio:.2f} of the base here'
        if paper_ratio is not None:
            same = (ratio - 1) * (paper_ratio - 1) > 0 or (abs(ratio - 1) < 0.03 and abs(paper_ratio - 1) < 0.03)
            speed += f' vs ×{paper_ratio:.2f} in the paper ({"same" if same else "opposite"} direction)'
        sentence += speed + '.'
    out['verdict'] = sentence
    return out


# ---------------------------------------------------------------------------------------------- the table

def _write_json(path: Path, value: Any) -> None:
    from ...io import atomic_write
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2, ensure_ascii=False) + '\n'))


def _load_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _paper(row: Row) -> Dict[str, Any]:
    return dict(params=row.params, flops=row.flops, fps=row.fps, top1=row.top1, diverged=row.diverged)


def _bench_cached(path: Path, settings: Dict[str, Any], rows: Sequence[Tuple[str, Dict[str, Any]]],
                  log: Log, measure: Callable[[], Dict[str, Dict[str, Any]]]) -> Tuple[Dict[str, Dict], bool]:
    """The rows' throughput from ``bench.json`` when it was measured with these settings for (at least) these rows,
    else measured now (all of them, interleaved) and saved. Returns (entries, reused)."""
    cached = _load_json(path)
    if cached and cached.get('settings') == _json_roundtrip(settings):
        entries = cached.get('rows', {})
        if all(label in entries and entries[label].get('switches') == _json_roundtrip(switches)
               and 'error' not in entries[label]['time'] for label, switches in rows):
            log(f'[bench] reusing {path} (measured {cached.get("measured_at")})')
            return {label: entries[label]['time'] for label, _ in rows}, True
    measured = measure()
    _write_json(path, dict(settings=settings, measured_at=time.strftime('%Y-%m-%d %H:%M:%S'),
                           rows={label: dict(switches=switches, time=measured[label]) for label, switches in rows}))
    return measured, False


def run_ablation(table: int, output=None, data: str = 'fashion-mnist', epochs: Optional[int] = None,
                 train_subset: Optional[int] = None, val_subset: Optional[int] = None, quick: bool = False,
                 rows: Optional[Sequence[str]] = None, bench: bool = True, progress: bool = True,
                 threads: Optional[int] = None, command: Optional[Sequence[str]] = None,
                 log: Log = _print) -> Dict[str, Any]:
    """Run ablation table ``table`` (1, 2, 3, 4 or 6) into ``output`` (default ``results/ablate/table{N}``, with
    ``_quick`` appended for ``quick``) and return what results.json holds; see the module docstring.

    ``epochs`` / ``train_subset`` / ``val_subset`` override the training budget (default: the recipe's epochs over
    :data:`DEFAULT_TRAIN_SUBSET` training images, the whole test set; ``train_subset=0`` = all 60,000);
    ``rows``: only these labels (and the base row); ``bench=False`` skips the throughput measurement;
    ``quick``: tiny everything (:data:`QUICK`), for CI; ``threads``: torch threads for the run (restored after;
    default: torch's, 1 with ``quick``: tiny tensors gain nothing from more, and a second busy process on the
    cores makes spinning threads many times slower)."""
    import torch

    if threads is None and quick:
        threads = 1
    if threads is not None and threads < 1:
        raise ValueError(f'threads must be at least 1, got {threads}')
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_ablation(table, output, data, epochs, train_subset, val_subset, quick, rows, bench, progress,
                             command, log)
    finally:
        torch.set_num_threads(before)


def _run_ablation(table, output, data, epochs, train_subset, val_subset, quick, rows, bench, progress, command,
                  log) -> Dict[str, Any]:
    import torch

    from ...bench import load_average, machine_info
    from ...data import build_datasets
    from ...engine import init_distributed, recipe_yaml

    started = time.perf_counter()
    selected = select_rows(table, rows)  # validates the table and the labels before any work
    base = base_label(table)
    output = Path(output if output is not None else f'results/ablate/table{table}{"_quick" if quick else ""}')
    overrides: Dict[str, Any] = dict(train_subset=DEFAULT_TRAIN_SUBSET)
    bench_settings = dict(BENCH, device='cpu')
    if quick:
        overrides.update({k: QUICK[k] for k in ('epochs', 'train_subset', 'val_subset', 'batch_size')})
        bench_settings = dict(QUICK['bench'], device='cpu')
    overrides.update({k: v for k, v in dict(epochs=epochs, train_subset=train_subset,
                                            val_subset=val_subset).items() if v is not None})
    notes: List[str] = []
    recipes = {index: row_recipe(row.switches, overrides, None if position else notes)
               for position, (index, row) in enumerate(selected)}
    first_recipe = next(iter(recipes.values()))
    slugs = {index: row_slug(index, row.label) for index, row in selected}
    title = TABLE_TITLES[table]
    log(f'== {title}: {len(selected)} row(s) of {BASE_MODEL} ({", ".join(r.label for _, r in selected)}) -> {output}')
    for note in notes:
        log(f'   {note}')

    # 1. counts at 224² of the full-size model
    t0 = time.perf_counter()
    counts = {index: count_row(row.switches, exact_build=not quick) for index, row in selected}
    count_seconds = time.perf_counter() - t0
    log(f'[counts] {len(counts)} row(s) at 224² in {count_seconds:.1f} s: ' + ', '.join(
        f'{row.label} {counts[i]["params"] / 1e6:.2f}M / {counts[i]["macs"] / 1e9:.2f}G' for i, row in selected))

    # 2. throughput, every row interleaved in this process
    load_start = load_average()
    cores = os.cpu_count() or 1
    if load_start and load_start[0] > 0.5 * cores and torch.get_num_threads() > 1:
        log(f'vittt ablate: warning: the machine is busy (load average {load_start[0]:.1f} on {cores} cores) and '
            f'torch runs {torch.get_num_threads()} threads: timings will be noisy and training slow (threads that '
            f'share cores with another process can be several times slower); --threads 1 avoids the latter')
    bench_times: Dict[str, Dict[str, Any]] = {}
    bench_seconds, bench_reused = 0.0, False
    if bench:
        t0 = time.perf_counter()
        pairs = [(row.label, row.switches) for _, row in selected]
        bench_times, bench_reused = _bench_cached(
            output / 'bench.json', dict(bench_settings, threads=torch.get_num_threads()), pairs, log,
            lambda: bench_rows(pairs, **{k: v for k, v in bench_settings.items()}, log=log))
        bench_seconds = time.perf_counter() - t0

    # 3. small-scale training, one row after the other, each resumable
    info = init_distributed('cpu')
    datasets = None
    train_results: Dict[int, Dict[str, Any]] = {}
    t0 = time.perf_counter()
    for index, row in selected:
        slug, recipe = slugs[index], recipes[index]
        config = _json_roundtrip(dict(data=str(data), recipe=recipe))
        done_path = output / 'rows' / f'{slug}.json'
        done = _load_json(done_path)
        if done is not None:
            if done.get('config') != config:
                raise ValueError(f'{done_path} was trained with another recipe or dataset than this run\'s; give '
                                 f'another --output (or delete {output / "rows"}) to train with this budget')
            log(f'-- {row.label}: done before ({done_path}), top-1 {done["result"]["top1"]}')
            train_results[index] = done['result']
            continue
        if datasets is None:
            datasets = build_datasets(data, first_recipe)
        log(f'-- {row.label} ({json.dumps(row.switches, ensure_ascii=False)}): {recipe["epochs"]} epoch(s) over '
            f'{min(len(datasets[0]), recipe["train_subset"] or len(datasets[0])):,} images -> '
            f'{output / "rows" / slug}')
        result = train_row(recipe, datasets, output / 'rows' / slug, info, progress=progress, curves=not quick,
                           log=log)
        _write_json(done_path, dict(label=row.label, switches=row.switches, config=config, result=result))
        log(f'   top-1 {result["top1"]}{" (diverged)" if result["diverged"] else ""} in '
            f'{result["train_seconds"]:.0f} s')
        train_results[index] = result
    train_seconds = time.perf_counter() - t0

    # 4. the table
    entries = []
    for index, row in selected:
        entries.append(dict(index=index, label=row.label, slug=slugs[index], switches=row.switches,
                            paper=_paper(row), counts=counts[index], bench=bench_times.get(row.label),
                            train={k: v for k, v in train_results[index].items() if k != 'history'},
                            history=train_results[index]['history']))
    base_entry = next(e for e in entries if e['label'] == base)
    for entry in entries:
        entry['compare'] = compare_row(entry, base_entry)
    result = dict(
        schema=SCHEMA, table=table, title=title, base=base, model=BASE_MODEL,
        command=list(command) if command is not None else list(sys.argv),
        machine=dict(machine_info('cpu'), load_average_start=load_start, load_average_end=load_average()),
        quick=quick, data=str(data),
        recipe=dict(name=ABLATE_RECIPE, overrides=overrides, resolved={k: v for k, v in first_recipe.items()
                                                                       if k != 'model_kwargs'},
                    shape=row_recipe({})['model_kwargs'], notes=notes),
        bench=dict(bench_settings, threads=torch.get_num_threads(), measured=bench, reused=bench_reused),
        seconds=dict(counts=count_seconds, bench=bench_seconds, train=train_seconds,
                     total=time.perf_counter() - started),
        rows=entries,
    )
    _write_json(output / 'results.json', result)
    plot_ablation(result, output / 'ablation.png')
    from ...engine.plots import plot_runs
    plot_runs({e['label']: e['history'] for e in entries}, output / 'curves.png',
              title=f'{title}: small-scale runs (test top-1)')
    report = render_report(result, recipe_text=recipe_yaml({k: v for k, v in first_recipe.items()
                                                            if k not in ('model', 'model_kwargs')}))
    from ...io import atomic_write
    atomic_write(output / 'report.md', lambda tmp: Path(tmp).write_text(report))
    log(report)
    log(f'report: {output / "report.md"} ({result["seconds"]["total"] / 60:.1f} min)')
    return result


# ---------------------------------------------------------------------------------------------- report

def _f(value: Optional[float], spec: str, suffix: str = '', sign: bool = False) -> str:
    if value is None:
        return '–'
    return f'{value:{"+" if sign else ""}{spec}}{suffix}'


def render_report(result: Dict[str, Any], recipe_text: Optional[str] = None) -> str:
    """report.md: the table in the paper's layout with ours next to it, the per-row verdicts and the settings."""
    rows, recipe, bench = result['rows'], result['recipe'], result['bench']
    resolved, machine = recipe['resolved'], result['machine']
    first = rows[0]['train']
    shape = recipe['shape']
    lines = [f'# {result["title"]}: the paper vs this machine', '',
             f'Base model `{result["model"]}` (spec A.6: DeiT-S with attention replaced by TTT; base row '
             f'**{result["base"]}**). Every row is that model with the switches of the row. Paper columns: params (M), '
             f'FLOPs (= MACs, G) at 224², FPS on an unstated GPU and batch, ImageNet-1k top-1 (300 epochs; `*` = '
             f'best before the run diverged). Ours: params and MACs of the full-size model at 224² (counted), its '
             f'inference throughput on this machine (images/s) and the ratio to the base row next to the paper\'s '
             f'FPS ratio (only ratios are comparable), and the test top-1 of a small-scale run with the same '
             f'switches and its difference to the base next to the paper\'s.', '']
    has_params = any(r['paper']['params'] is not None for r in rows)
    has_flops = any(r['paper']['flops'] is not None for r in rows)
    has_fps = any(r['paper']['fps'] is not None for r in rows)
    head = ['row'] + (['paper params'] if has_params else []) + (['paper FLOPs'] if has_flops else []) \
        + (['paper FPS'] if has_fps else []) + ['paper top-1', 'ours params', 'ours GMACs', 'ours img/s',
                                                'ours speed ratio'] \
        + (['paper FPS ratio'] if has_fps else []) + ['ours top-1', 'ours Δ', 'paper Δ', 'reproduces']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for r in rows:
        paper, counts, train, cmp = r['paper'], r['counts'], r['train'], r['compare']
        time_entry = r.get('bench') or {}
        top1 = _f(paper['top1'], '.1f') + ('*' if paper['diverged'] else '')
        ours_top1 = '–' if train.get('top1') is None else f'{train["top1"]:.2f}'
        if train.get('diverged'):
            ours_top1 += '* (diverged)'
        is_base = r['label'] == result['base']
        cells = [f'**{r["label"]}**' if is_base else r['label']]
        cells += [_f(paper['params'], '.1f', 'M')] if has_params else []
        cells += [_f(paper['flops'], '.2f', 'G')] if has_flops else []
        cells += [_f(paper['fps'], '.0f')] if has_fps else []
        cells += [top1, f'{counts["params"] / 1e6:.2f}M', f'{counts["macs"] / 1e9:.2f}',
                  _f(time_entry.get('images_per_s'), '.2f') if 'error' not in time_entry else 'error',
                  'base' if is_base else _f(cmp['throughput_ratio'], '.2f', '×')]
        cells += ['base' if is_base else _f(cmp['paper_fps_ratio'], '.2f', '×')] if has_fps else []
        cells += [ours_top1, 'base' if is_base else _f(cmp['delta'], '.2f', sign=True),
                  'base' if is_base else _f(cmp['paper_delta'], '.1f', sign=True),
                  '' if is_base else {True: 'yes', False: 'no', None: '–'}[cmp['reproduces']]]
        lines.append('| ' + ' | '.join(cells) + ' |')
    compared = [r for r in rows if r['label'] != result['base'] and r['compare']['reproduces'] is not None]
    agree = sum(r['compare']['reproduces'] for r in compared)
    lines += ['', f'**Orderings against the base** ({agree} of {len(compared)} reproduce at small scale):', '']
    lines += [f'- {r["compare"]["verdict"]}' for r in rows]
    noise = rows[0]['compare'].get('noise')
    lines += ['', '**How to read it.** The small-scale runs are one seed each; the ±noise quoted is twice the '
              'binomial standard error of a difference of two top-1s on '
              f'{first.get("test_images", 0):,} test images' + (f' (±{noise:.2f} points here)' if noise else '')
              + ', a floor: seed-to-seed variation is not measured and is usually larger. Most of the paper\'s '
              'differences are a few tenths of a point after 300 ImageNet epochs; a small model trained for minutes '
              'on Fashion-MNIST need not order them the same way. Our params / MACs differ from the paper\'s by a '
              'constant offset of the base (ours 22.61M / 4.57G, the paper\'s 23.5M / 4.58G); the rows\' '
              'differences to the base match the paper\'s within its rounding (tests/tasks/ablate/test_tables.py).',
              '', '![ablation](ablation.png)', '', '![curves](curves.png)', '']

    lines += ['## Settings', '',
              f'- **Command:** `{" ".join(result["command"])}`' + (' (quick: a smoke run, not a measurement)'
                                                                    if result['quick'] else ''),
              f'- **Machine:** {machine.get("cpu")} ({machine.get("cpu_count")} cores, {machine.get("threads")} torch '
              f'threads), torch {machine.get("torch")}, timm {machine.get("timm")}, vittt {machine.get("vittt")}; '
              f'load average {_load(machine.get("load_average_start"))} at the start, '
              f'{_load(machine.get("load_average_end"))} at the end.',
              f'- **Small-scale training:** recipe `{recipe["name"]}` on `{result["data"]}`, '
              f'`{result["model"]}` at the recipe\'s shape `{json.dumps(shape)}` ({resolved["img_size"]}×'
              f'{resolved["img_size"]}×{resolved["in_chans"]} images) with each row\'s switches on top; '
              f'{resolved["epochs"]} epoch(s) over {first.get("train_images", 0):,} training images '
              f'({first.get("total_updates")} updates of batch {resolved["batch_size"]}), seed {resolved["seed"]}, '
              f'test on {first.get("test_images", 0):,} images; the same recipe and budget for every row.',
              '- **Throughput:** ' + (
                  f'inference (no grad, fp32) at {bench["size"]}×{bench["size"]}, batch {bench["batch"]}'
                  + (f' of the shape `{json.dumps(bench["model_kwargs"])}`' if bench['model_kwargs']
                     else ' of the full-size model')
                  + f', {bench["threads"]} torch thread(s), `vittt bench`\'s timing: {bench["warmup"]} warm-up '
                  f'call(s), then {bench["repeats"]} '
                  f'round(s) in which every row runs once (interleaved), median per row'
                  + (' (reused from bench.json)' if bench['reused'] else '') + '.'
                  if bench['measured'] else 'not measured (--no-bench).'),
              f'- **Wall time of this invocation:** counts {result["seconds"]["counts"]:.0f} s, throughput '
              f'{result["seconds"]["bench"]:.0f} s, training {result["seconds"]["train"] / 60:.1f} min, total '
              f'{result["seconds"]["total"] / 60:.1f} min. Training time per row (when it was trained; a resumed row '
              f'only its last part): ' + ', '.join(f'{r["label"]} {r["train"]["train_seconds"]:.0f} s' for r in rows)
              + f'; {sum(r["train"]["train_seconds"] for r in rows) / 60:.1f} min in all.']
    if recipe['notes']:
        lines += [f'- Recipe note: {note}' for note in recipe['notes']]
    if recipe_text:
        lines += ['', 'The resolved recipe (without the model):', '', '```yaml', recipe_text.rstrip(), '```']
    lines.append('')
    return '\n'.join(lines)


def _load(values: Optional[Sequence[float]]) -> str:
    return '–' if not values else f'{values[0]:.1f}'


def plot_ablation(result: Dict[str, Any], path) -> Path:
    """ablation.png: Δtop-1 against the base, ours vs the paper's; throughput ratio, ours vs the paper's FPS ratio;
    our test top-1 per epoch of every row."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from ...engine.plots import save_figure

    rows = result['rows']
    others = [r for r in rows if r['label'] != result['base']]
    fig, axes = plt.subplots(1, 3, figsize=(17, max(4.0, 0.45 * len(rows) + 2)))
    ys = list(range(len(others)))[::-1]
    labels = [r['label'] for r in others]
    for ax, key, paper_key, title, xlabel, ref in (
            (axes[0], 'delta', 'paper_delta', 'top-1 vs the base', 'Δ top-1 (points)', 0.0),
            (axes[1], 'throughput_ratio', 'paper_fps_ratio', 'throughput vs the base', 'ratio to the base', 1.0)):
        ours = [r['compare'][key] for r in others]
        paper = [r['compare'][paper_key] for r in others]
        height = 0.38
        ax.barh([y + height / 2 for y in ys], [(p - ref) if p is not None else 0 for p in paper], height, left=ref,
                color='C0', label='paper')
        ax.barh([y - height / 2 for y in ys], [(o - ref) if o is not None else 0 for o in ours], height, left=ref,
                color='C1', label='ours')
        for y, r in zip(ys, others):
            if r['train'].get('diverged') and key == 'delta':
                ax.annotate('ours diverged', (ref, y - height / 2), fontsize=7, va='center')
        ax.axvline(ref, color='k', linewidth=0.8)
        noise = others[0]['compare'].get('noise') if others else None
        if key == 'delta' and noise:
            ax.axvspan(-noise, noise, color='0.85', zorder=0, label=f'±{noise:.2f} test-set noise')
        ax.set_yticks(ys)
        ax.set_yticklabels(labels)
        ax.set(title=title, xlabel=xlabel)
        ax.grid(axis='x', alpha=0.3)
        ax.legend(loc='best', fontsize=8)
    axes[1].set_yticklabels([])
    ax = axes[2]
    colors = plt.cm.tab20.colors if len(rows) > 10 else [f'C{i}' for i in range(10)]
    for index, r in enumerate(rows):
        points = [(h.get('epoch', h.get('step')), h['top1']) for h in r['history'] if 'top1' in h]
        if points:
            ax.plot(*zip(*points), marker='o', color=colors[index % len(colors)], label=r['label'],
                    linewidth=2.5 if r['label'] == result['base'] else 1.2)
    ax.set(title='ours: test top-1 per epoch', xlabel='epoch', ylabel='top-1 (%)')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
    fig.suptitle(result['title'] + (' (quick smoke run)' if result.get('quick') else ''))
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
