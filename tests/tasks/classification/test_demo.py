"""The README's main job at toy scale: both models trained with one recipe, evaluated, reported."""
import json

from vittt.tasks.classification import demo


def test_demo_writes_report_results_and_curves(tmp_path):
    results = demo.run_demo(tmp_path, epochs=1, train_subset=256, val_subset=200, progress=False)
    assert set(results) == {'ViT³', 'DeiT'}
    saved = json.loads((tmp_path / 'results.json').read_text())
    for r in saved.values():
        assert r['epochs'] == 1 and r['test_images'] == 200 and 0 <= r['top1'] <= 100 and r['params'] > 0
        assert r['train_images'] == 256 and r['updates'] == 256 // 128 and len(r['top1_per_epoch']) == 1
        assert (tmp_path / r['model'] / 'last.pth').exists()
    assert saved['ViT³']['arch'] == saved['DeiT']['arch']  # same shape, same recipe
    report = (tmp_path / 'report.md').read_text()
    assert '| ViT³ (`vit3_tiny`)' in report and '| DeiT (`deit_tiny_patch16_224`)' in report
    assert 'What was trained' in report and 'How they did' in report and 'fashion_mnist_demo' in report
    assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'
