"""benchmarks/targets.py: the targets table and its plot from recorded `vittt bench` runs."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _targets():
    spec = importlib.util.spec_from_file_location('targets', ROOT / 'benchmarks' / 'targets.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_issue15_table_and_plot(tmp_path, capsys):
    targets = _targets()
    runs = sorted(str(p) for p in (ROOT / 'docs' / 'bench' / 'issue15').glob('*/bench.json'))
    assert runs, 'the recorded issue-15 runs are missing'
    plot = tmp_path / 'targets.png'
    assert targets.main(runs, '15', str(plot)) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table[2:] if line.startswith('| ')]
    assert len(rows) == len(targets.TARGETS_15)
    assert all('not measured' not in row for row in rows)
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(tmp_path.glob('*.tmp.png'))


def test_ratios_only_within_one_run(tmp_path):
    """A variant and its baseline from different runs give no ratio (the machine drifts between runs)."""
    import json
    targets = _targets()
    m = dict(size=[224, 224], mode='infer', batch_size=1, time={'median_ms': 10.0})
    for name, variant in (('a.json', 'vit3_tiny'), ('b.json', 'deit_tiny_patch16_224')):
        (tmp_path / name).write_text(json.dumps({'measurements': [dict(m, variant=variant)]}))
    found = targets.load([str(tmp_path / 'a.json'), str(tmp_path / 'b.json')])
    assert targets.ratio(found, 'vit3_tiny', 'deit_tiny_patch16_224', 'infer', 224, 'time') is None
    (tmp_path / 'c.json').write_text(json.dumps({'measurements': [dict(m, variant='vit3_tiny'),
                                                                  dict(m, variant='deit_tiny_patch16_224',
                                                                       time={'median_ms': 20.0})]}))
    found = targets.load([str(tmp_path / 'c.json')])
    assert targets.ratio(found, 'vit3_tiny', 'deit_tiny_patch16_224', 'infer', 224, 'speedup') == 2.0
