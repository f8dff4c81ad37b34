"""``vittt export`` (:func:`vittt.tasks.export.export_model`): for each family a tiny configuration exported to ONNX
with a dynamic batch and resolution, checked by ``onnx.checker`` and run in onnxruntime at the shapes of
:func:`check_shapes` (batch 1 and 3, non-square, sides not multiples of the stride) against eager PyTorch; the
``.pt2`` path; the refusals (a mismatching graph writes nothing; bad arguments are named)."""
import json
import os

import pytest
import torch

from vittt.cli import main
from vittt.tasks.export import ExportMismatch, check_shapes, export_model, load_export_model
from vittt.tasks.export import core

TINY = {
    'vit3_tiny': dict(depth=1, embed_dim=32, num_heads=2, num_classes=5),
    'hvit3_tiny': dict(depths=(1, 1), dims=(16, 32), num_heads=(1, 2), num_classes=5),       # stride 8
    'vision_ttt_tiny': dict(depth=1, embed_dim=32, num_heads=2, num_classes=5, mixer_kwargs=dict(mini_batch_size=7)),
    'dit3_s_2': dict(depth=1, embed_dim=32, num_heads=2, in_chans=1, num_classes=10),
}


def _quiet(*_):
    pass


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(TINY))
def test_onnx_export_with_dynamic_batch_and_resolution(name, tmp_path, monkeypatch):
    """Each family once (H-ViT³ as its features_only backbone, the dense-prediction export; its classification head
    is in tests/models/test_export.py); ViT³ with its weights in a side file, as a model over 2 GB is written."""
    pytest.importorskip('onnxruntime')
    import onnx
    from torch.onnx._internal.exporter import _onnx_program

    torch.manual_seed(0)
    out = tmp_path / f'{name}.onnx'
    features = name == 'hvit3_tiny'
    if name == 'vit3_tiny':  # torch.onnx keeps the weights beside the model above this size (2 GB: e.g. DiT-XL)
        monkeypatch.setattr(_onnx_program, '_LARGE_MODEL_THRESHOLD', 0)
    result = export_model(name, out, model_kwargs=TINY[name], example_size=(48, 64), max_size=256,
                          features_only=features, log=_quiet)
    side = [tmp_path / f'{name}.onnx.data'] if name == 'vit3_tiny' else []
    assert [str(p) for p in side] == result.side_files and all(p.is_file() for p in side)
    assert out.exists() and result.file_bytes == sum(os.path.getsize(p) for p in [out, *side])
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in [out, *side])   # nothing staged is left
    onnx.checker.check_model(str(out), full_check=True)
    shapes = [tuple(c['shape']) for c in result.checks]
    assert {s[0] for s in shapes} >= {1, 2, 3}                                   # batch sizes
    assert any(s[2] != s[3] for s in shapes)                                     # non-square
    stride = load_export_model(name, model_kwargs=TINY[name]).stride
    if name.startswith('dit'):
        assert all(s[2] % 2 == 0 and s[3] % 2 == 0 for s in shapes)              # a generator keeps its patch grid
    else:
        assert any(s[2] % stride or s[3] % stride for s in shapes)               # padded sides
    assert result.max_diff < 1e-4 and min(c['max_abs_ref'] for c in result.checks) > 1e-3   # (not all zeros)
    if features:  # the file as a user runs it: stage maps at strides 4 and 8, ceil-rounded
        maps = core.run_exported(str(out), 'onnx')(torch.randn(1, 3, 37, 50))
        assert [m.shape[1] for m in maps] == [16, 32] and maps[0].shape[-2:] == (10, 13)
    if side:  # the model finds its weights after the move
        assert core.run_exported(str(out), 'onnx')(torch.randn(2, 3, 40, 72))[0].shape == (2, 5)


def test_pt2_export_and_its_json_record(tmp_path, capsys):
    out, record = tmp_path / 'vit3.pt2', tmp_path / 'vit3.json'
    rc = main(['export', 'vit3_tiny', str(out), '--set', 'depth=1', 'embed_dim=32', 'num_heads=2',
               '--example-size', '48x64', '--max-size', '128', '--json', str(record)])
    assert rc == 0 and out.exists()
    data = json.loads(record.read_text())
    assert data['format'] == 'pt2' and data['dynamic'] == ['batch', 'height', 'width']
    assert data['size_range'] == [32, 128]
    assert len(data['checks']) >= 3 and max(c['max_abs_diff'] for c in data['checks']) < 1e-5
    program = torch.export.load(str(out)).module()
    assert program(torch.randn(3, 3, 45, 77)).shape == (3, 1000)
    assert 'max difference' in capsys.readouterr().out


def test_a_mismatching_graph_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    real = core.run_exported

    def off_by_a_bit(path, fmt, threads=None):
        run = real(path, fmt, threads)
        return lambda *args: [t + 1e-2 for t in run(*args)]
    monkeypatch.setattr(core, 'run_exported', off_by_a_bit)
    out = tmp_path / 'bad.pt2'
    out.write_bytes(b'an earlier file')
    with pytest.raises(ExportMismatch, match='disagrees with eager PyTorch'):
        export_model('vit3_tiny', out, model_kwargs=TINY['vit3_tiny'], dynamic=('batch',), example_size=(32, 32),
                     log=_quiet)
    assert out.read_bytes() == b'an earlier file' and os.listdir(tmp_path) == ['bad.pt2']


@pytest.mark.parametrize('kwargs, match', [
    (dict(output='m.tflite'), 'must end in .onnx or .pt2'),
    (dict(dynamic=('batch', 'height')), 'height and width are dynamic together'),
    (dict(dynamic=('depth',)), 'subset of batch,height,width'),
    (dict(min_size=16), 'below 32, the smallest side'),
    (dict(min_size=64, max_size=48), 'below --min-size'),
    (dict(tolerance=0.0), 'tolerance must be positive'),
    (dict(name='no_such_model'), 'unknown model'),
    (dict(name='dit3_s_2', features_only=True), 'has no features_only'),
    (dict(name='dit3_s_2', min_size=33), 'multiples of its patch size 2'),
])
def test_bad_arguments_are_named(kwargs, match, tmp_path):
    kwargs = dict(dict(name='vit3_tiny', output='m.pt2'), **kwargs)
    name, output = kwargs.pop('name'), tmp_path / kwargs.pop('output')
    model_kwargs = TINY.get(name) if not kwargs.get('features_only') else None
    with pytest.raises(ValueError, match=match):
        export_model(name, output, model_kwargs=model_kwargs, log=_quiet, **kwargs)


def test_check_shapes_stay_in_range_and_cover_odd_sizes():
    target = load_export_model('hvit3_tiny', model_kwargs=TINY['hvit3_tiny'])
    shapes = check_shapes(target, ('batch', 'height', 'width'), (16, 100), (48, 64))
    assert all(16 <= h <= 100 and 16 <= w <= 100 for _, h, w in shapes)
    assert {b for b, _, _ in shapes} == {1, 2, 3} and any(h % 8 or w % 8 for _, h, w in shapes)
    assert check_shapes(target, ('batch',), (16, 100), (48, 64)) == [(1, 48, 64), (3, 48, 64), (2, 48, 64)]


def test_cli_reports_a_bad_argument(tmp_path, capsys):
    assert main(['export', 'vit3_tiny', str(tmp_path / 'm.onnx'), '--dynamic', 'batch,height']) == 2
    assert 'height and width are dynamic together' in capsys.readouterr().err
