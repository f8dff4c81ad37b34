"""`vittt dense demo --quick`: both tasks, both backbones, the report with its pictures (a smoke run of the README's
dense demo on the tiny dataset)."""
import json

import pytest

import vittt  # noqa: F401


@pytest.mark.slow
def test_quick_dense_demo_writes_the_report(tmp_path):
    from vittt.tasks.dense.demo import DEMO_BACKBONES, run_dense_demo
    out = run_dense_demo(tmp_path / 'demo', quick=True, progress=False)
    results = out['results']
    assert set(results) == {'detection', 'segmentation'}
    for task, rows in results.items():
        assert set(rows) == set(DEMO_BACKBONES)
        for row in rows.values():
            assert row['updates'] == 4 and row['train_img_s'] > 0
            assert all(row['eval_ms'][str(s)] is None or row['eval_ms'][str(s)] > 0 for s in (192, 512, 1024))
            assert ('bbox_AP' in row['metrics']) == (task == 'detection')
    report = (tmp_path / 'demo' / 'report.md').read_text()
    assert 'H-ViT³-nano' in report and 'PVTv2-b0' in report and 'detections.png' in report
    for picture in ('detections.png', 'segmentations.png', 'detection_curves.png', 'segmentation_curves.png'):
        assert (tmp_path / 'demo' / picture).stat().st_size > 1000
    assert json.loads((tmp_path / 'demo' / 'results.json').read_text())['meta']['quick'] is True
