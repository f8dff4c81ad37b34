"""Export with a dynamic batch size: ``torch.export`` programs and ONNX models (run by onnxruntime) = the eager
model at other batch sizes. While a graph is captured for export the per-sample 3×3 inner step runs without
folding the batch into conv groups (ONNX's Conv has a static ``group``) and the fused SwiGLU step loops over
heads, not samples."""
import pytest
import timm
import torch
from torch.export import Dim, export

from test_fast_path import SMALL

SIZE = (48, 80)
DYNAMIC = {'x': {0: Dim('batch', min=1, max=64)}}
MODELS = dict(SMALL, vision_ttt_tiny=dict(depth=2, embed_dim=32, num_heads=2, mixer_kwargs=dict(mini_batch_size=5)))


def _model(name):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **MODELS[name]).eval()


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(MODELS))
def test_torch_export_dynamic_batch_equals_eager(name, images):
    model = _model(name)
    program = export(model, (images(2, *SIZE),), dynamic_shapes=DYNAMIC).module()
    with torch.no_grad():
        for batch in (1, 3, 5):
            x = images(batch, *SIZE, seed=batch)
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)


def _onnx_export(model, path, example):
    torch.onnx.export(model, (example,), str(path), dynamic_shapes=DYNAMIC, dynamo=True, verbose=False)


@pytest.mark.slow
def test_onnx_dynamic_batch_equals_eager(tmp_path, images):
    ort = pytest.importorskip('onnxruntime')
    model = _model('vit3_tiny')
    _onnx_export(model, tmp_path / 'vit3.onnx', images(2, *SIZE))
    session = ort.InferenceSession(str(tmp_path / 'vit3.onnx'))
    name = session.get_inputs()[0].name
    with torch.no_grad():
        for batch in (1, 3, 5):
            x = images(batch, *SIZE, seed=batch)
            out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_fails_with_batch_folding(tmp_path, dwconv_backend, images):
    """Why the batch-independent path exists: folded into conv groups, the batch would be an ONNX attribute."""
    pytest.importorskip('onnxruntime')
    dwconv_backend('grouped')
    with pytest.raises(Exception, match='conv2d'):
        _onnx_export(_model('vit3_tiny'), tmp_path / 'folded.onnx', images(2, *SIZE))
