"""``vittt ablate``: the quick table end to end, skipping finished rows, resuming a killed row, divergence, verdicts
and bad input."""
import json

import pytest

import vittt  # noqa: F401  (registers the models)
from vittt.cli import main
from vittt.tasks.ablate import run as ablate_run
from vittt.tasks.ablate.run import base_label, compare_row, row_slug, run_ablation, select_rows
from vittt.tasks.ablate.tables import TABLES


def _strip_times(history):
    return [{k: v for k, v in row.items() if k not in ('time_s', 'train_img_s')} for row in history]


def test_quick_table_4_writes_the_table_and_a_rerun_skips_finished_rows(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'table4'
    assert main(['ablate', '--table', '4', '--quick', '--no-progress', '--output', str(out)]) == 0
    for name in ('report.md', 'results.json', 'ablation.png', 'curves.png', 'bench.json'):
        assert (out / name).is_file(), name
    assert (out / 'ablation.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    result = json.loads((out / 'results.json').read_text())
    labels = [row.label for row in TABLES[4]]
    assert [r['label'] for r in result['rows']] == labels
    assert result['base'] == 'MLP r1' and result['quick']
    report = (out / 'report.md').read_text()
    for header in ('paper params', 'paper FLOPs', 'paper FPS', 'paper top-1', 'ours GMACs', 'ours img/s',
                   'paper FPS ratio', 'ours Δ', 'paper Δ'):
        assert header in report, header
    for row, entry in zip(TABLES[4], result['rows']):
        assert entry['paper'] == dict(params=row.params, flops=row.flops, fps=row.fps, top1=row.top1,
                                      diverged=row.diverged)
        assert entry['counts']['params'] > 0 and entry['counts']['macs'] > 0
        assert entry['bench']['images_per_s'] > 0
        assert 0 <= entry['train']['top1'] <= 100 and entry['history']
        assert entry['compare']['verdict'].startswith(f'**{row.label}**')
        assert f'| {row.label} |' in report or f'| **{row.label}** |' in report
        assert (out / 'rows' / f'{entry["slug"]}.json').is_file()
    # the counts at 224² are the full-size model's (the base: 22.61M params, 4.57 GMACs)
    assert abs(result['rows'][0]['counts']['params'] / 1e6 - 22.61) < 0.01
    assert round(result['rows'][0]['counts']['macs'] / 1e9, 2) == 4.57
    # one verdict per row
    verdicts = [line for line in report.splitlines() if any(line.startswith(f'- **{label}**') for label in labels)]
    assert len(verdicts) == len(labels)

    row_files = sorted((out / 'rows').glob('*.json'))
    mtimes = {p: p.stat().st_mtime_ns for p in row_files}

    def must_not_train(*args, **kwargs):
        raise AssertionError('a finished row was trained again')

    monkeypatch.setattr(ablate_run, 'train_row', must_not_train)
    capsys.readouterr()
    assert main(['ablate', '--table', '4', '--quick', '--no-progress', '--output', str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in row_files} == mtimes
    again = json.loads((out / 'results.json').read_text())
    assert again['bench']['reused']
    assert [r['train']['top1'] for r in again['rows']] == [r['train']['top1'] for r in result['rows']]
    assert [r['bench'] for r in again['rows']] == [r['bench'] for r in result['rows']]
    assert 'done before' in capsys.readouterr().out


def test_a_killed_row_resumes_from_its_checkpoint_and_gives_the_same_result(tmp_path, monkeypatch):
    from vittt.engine.trainer import Trainer

    only_base = [base_label(6)]
    kwargs = dict(quick=True, epochs=2, rows=only_base, bench=False, progress=False, log=lambda line: None)
    full = run_ablation(6, output=tmp_path / 'full', **kwargs)['rows'][0]

    class Killed(Exception):
        pass

    update = Trainer._update

    def dies_in_epoch_2(self, batch):  # killed after the epoch-1 checkpoint, inside epoch 2
        if self.num_updates == 1:
            raise Killed
        update(self, batch)

    monkeypatch.setattr(Trainer, '_update', dies_in_epoch_2)
    with pytest.raises(Killed):
        run_ablation(6, output=tmp_path / 'killed', **kwargs)
    slug = row_slug(0, only_base[0])
    assert (tmp_path / 'killed' / 'rows' / slug / 'last.pth').is_file()
    assert not (tmp_path / 'killed' / 'rows' / f'{slug}.json').exists()
    monkeypatch.setattr(Trainer, '_update', update)
    resumed = run_ablation(6, output=tmp_path / 'killed', **kwargs)['rows'][0]
    assert resumed['train']['resumed_at_update'] == 1
    for key in ('top1', 'top5', 'val_loss', 'updates', 'diverged'):
        assert resumed['train'][key] == full['train'][key], key
    assert _strip_times(resumed['history']) == _strip_times(full['history'])

    # a rerun with another budget into the same folder is refused, not mixed into the table
    with pytest.raises(ValueError, match='another recipe'):
        run_ablation(6, output=tmp_path / 'killed', **dict(kwargs, epochs=1))


def test_a_diverged_row_is_recorded_and_the_table_goes_on(tmp_path, monkeypatch):
    from vittt.tasks.classification.task import ClassificationTask

    step = ClassificationTask.train_step

    def nan_for_fc_in_epoch_2(self, model, batch, ctx):
        loss, logs = step(self, model, batch, ctx)
        if self.recipe['model_kwargs'].get('inner_model') == 'fc' and ctx.epoch >= 1:
            loss = loss * float('nan')
        return loss, logs

    monkeypatch.setattr(ClassificationTask, 'train_step', nan_for_fc_in_epoch_2)
    result = run_ablation(4, output=tmp_path / 't4', quick=True, epochs=2, rows=['FC(x)'], bench=False,
                          progress=False, log=lambda line: None)
    base, fc = result['rows']
    assert [base['label'], fc['label']] == ['MLP r1', 'FC(x)']
    assert not base['train']['diverged'] and fc['train']['diverged']
    assert 'the loss is nan' in fc['train']['divergence']
    assert fc['train']['top1'] == fc['history'][0]['top1']  # the best before it diverged, like the paper's *
    assert fc['compare']['reproduces'] is False  # the paper has FC(x) better than the base
    report = (tmp_path / 't4' / 'report.md').read_text()
    assert '(diverged)' in report and 'ours diverged' in report
    assert json.loads((tmp_path / 't4' / 'rows' / f'{fc["slug"]}.json').read_text())['result']['diverged']


def test_bad_table_and_row_labels_error_naming_the_choices(tmp_path, capsys):
    out = tmp_path / 'nothing'
    assert main(['ablate', '--table', '5', '--quick', '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'no ablation table 5' in err and '[1, 2, 3, 4, 6]' in err
    assert main(['ablate', '--table', '4', '--quick', '--rows', 'MLP r9', '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert "no row 'MLP r9'" in err and "'MLP r1'" in err and "'DWConv3×3(x)'" in err
    assert not out.exists()  # refused before any work
    with pytest.raises(SystemExit):
        main(['ablate', '--table', '4', '--train-subset', '-1'])
    capsys.readouterr()


def test_rows_are_selected_by_label_or_slug_and_always_with_the_base():
    assert [i for i, _ in select_rows(4, ['fc-x'])] == [0, 4]
    assert [r.label for _, r in select_rows(4, ['SwiGLU(x)', '09-conv3x3-x'])] == ['MLP r1', 'SwiGLU(x)', 'Conv3×3(x)']
    assert [r.label for _, r in select_rows(3, ['eta-0.5'])] == ['η = 0.5', 'η = 1']
    assert [base_label(n) for n in (1, 2, 3, 4, 6)] == ['Dot product', '1 epoch, batch N', 'η = 1', 'MLP r1',
                                                        'SiLU(xW₁)W₂ (base)']
    assert len(select_rows(2)) == len(TABLES[2])
    for number, rows in TABLES.items():
        slugs = [row_slug(i, row.label) for i, row in enumerate(rows)]
        assert len(set(slugs)) == len(slugs) and all(s.isascii() and ' ' not in s for s in slugs)
        assert base_label(number) in [row.label for row in rows]
    assert row_slug(8, 'FC(x) ⊙ SiLU(FC(x))') == '08-fc-x-x-silu-fc-x'
    assert row_slug(0, 'η = 0.1') == '00-eta-0.1'


def _entry(label, paper_top1, top1, paper_fps=None, images_per_s=None, diverged=False, paper_diverged=False):
    return dict(label=label, paper=dict(params=None, flops=None, fps=paper_fps, top1=paper_top1,
                                        diverged=paper_diverged),
                train=dict(top1=top1, diverged=diverged, test_images=10000),
                bench=dict(images_per_s=images_per_s) if images_per_s else None)


def test_the_verdict_is_computed_from_the_numbers():
    base = _entry('base', 78.9, 85.0, paper_fps=1315, images_per_s=5.0)
    noise = compare_row(base, base)['noise']
    assert 1.0 < noise < 1.02  # 2 × binomial SE of a difference at 85 % on 10,000 images
    better = compare_row(_entry('wide', 79.6, 86.5, paper_fps=836, images_per_s=3.0), base)
    assert better['reproduces'] is True and better['delta'] == pytest.approx(1.5)
    assert better['paper_delta'] == 0.7 and better['throughput_ratio'] == pytest.approx(0.6)
    assert all(text in better['verdict'] for text in ('reproduces:', 'beyond', 'same direction'))
    small = compare_row(_entry('small', 79.6, 85.3), base)
    assert small['reproduces'] is True and 'only within noise' in small['verdict']
    opposite = compare_row(_entry('deep', 77.5, 86.0), base)
    assert opposite['reproduces'] is False and 'does not reproduce' in opposite['verdict']
    both_diverged = compare_row(_entry('ep4', 57.0, 20.0, diverged=True, paper_diverged=True), base)
    assert both_diverged['reproduces'] is True and 'ours diverged' in both_diverged['verdict']
    tie = compare_row(_entry('eta2', 78.9, 85.4), base)
    assert tie['reproduces'] is True and 'tied' in tie['verdict']
    no_paper = compare_row(_entry('x', None, 85.4), base)
    assert no_paper['reproduces'] is None
