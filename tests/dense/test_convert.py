"""Official detection / segmentation checkpoints -> vittt (spec dense.md §3.3–3.4, §6.5–6.6, §9 item 3).

All synthetic: the backbone is the official dense micro backbone of the goldens (``norm0..3`` and the RoPE tables
included) under ``backbone.``; the heads are random tensors with the mmdet / mmseg names and shapes of the spec's
tables, written out here independently of the converter's own table.
"""
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vittt.dense.convert import convert_dense_file, convert_maskrcnn_state_dict, convert_upernet_state_dict, \
    detect_dense_task, inspect_checkpoint, load_official_detector, load_official_segmenter
from vittt.models.official import CheckpointError, ForeignObject, convert_official_file, load_checkpoint_file

GOLDEN = Path(__file__).parent.parent / 'fixtures' / 'golden'
MICRO = dict(dims=(32, 64, 96, 128), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))
CHS = MICRO['dims']
K_DET, K_SEG, SEG_CH = 10, 7, 64
CLASSES = tuple(f'thing{i}' for i in range(K_DET))


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen) * 0.05


def _bn(gen, prefix, c):
    return {f'{prefix}.weight': 1 + _rand(gen, c), f'{prefix}.bias': _rand(gen, c),
            f'{prefix}.running_mean': _rand(gen, c), f'{prefix}.running_var': 0.5 + torch.rand(c, generator=gen),
            f'{prefix}.num_batches_tracked': torch.tensor(100)}


def _conv(gen, prefix, cout, cin, k, bias=True):
    out = {f'{prefix}.weight': _rand(gen, cout, cin, k, k)}
    if bias:
        out[f'{prefix}.bias'] = _rand(gen, cout)
    return out


def _fc(gen, prefix, cout, cin):
    return {f'{prefix}.weight': _rand(gen, cout, cin), f'{prefix}.bias': _rand(gen, cout)}


@pytest.fixture(scope='module')
def golden_backbone():
    return {'backbone.' + k: v for k, v in load_file(GOLDEN / 'hvit3_dense_micro.weights.safetensors').items()}


@pytest.fixture(scope='module')
def golden_io():
    return load_file(GOLDEN / 'hvit3_dense_micro.io.safetensors')


@pytest.fixture(scope='module')
def det_sd(golden_backbone):
    """mmdet ``mask-rcnn_r50_fpn`` names and shapes (spec §3.3), FPN 256, 10 classes."""
    gen = torch.Generator().manual_seed(0)
    sd = dict(golden_backbone)
    for level, c in enumerate(CHS):
        sd.update(_conv(gen, f'neck.lateral_convs.{level}.conv', 256, c, 1))
        sd.update(_conv(gen, f'neck.fpn_convs.{level}.conv', 256, 256, 3))
    sd.update(_conv(gen, 'rpn_head.rpn_conv', 256, 256, 3))
    sd.update(_conv(gen, 'rpn_head.rpn_cls', 3, 256, 1))
    sd.update(_conv(gen, 'rpn_head.rpn_reg', 12, 256, 1))
    sd.update(_fc(gen, 'roi_head.bbox_head.shared_fcs.0', 1024, 256 * 7 * 7))
    sd.update(_fc(gen, 'roi_head.bbox_head.shared_fcs.1', 1024, 1024))
    sd.update(_fc(gen, 'roi_head.bbox_head.fc_cls', K_DET + 1, 1024))
    sd.update(_fc(gen, 'roi_head.bbox_head.fc_reg', 4 * K_DET, 1024))
    for i in range(4):
        sd.update(_conv(gen, f'roi_head.mask_head.convs.{i}.conv', 256, 256, 3))
    sd.update(_conv(gen, 'roi_head.mask_head.upsample', 256, 256, 2))
    sd.update(_conv(gen, 'roi_head.mask_head.conv_logits', K_DET, 256, 1))
    return sd


@pytest.fixture(scope='module')
def seg_sd(golden_backbone):
    """mmseg ``UPerHead`` + ``FCNHead`` names and shapes (spec §3.4) at channels 64, 7 classes."""
    gen = torch.Generator().manual_seed(1)
    sd = dict(golden_backbone)
    for p in range(4):
        sd.update(_conv(gen, f'decode_head.psp_modules.{p}.1.conv', SEG_CH, CHS[3], 1, bias=False))
        sd.update(_bn(gen, f'decode_head.psp_modules.{p}.1.bn', SEG_CH))
    sd.update(_conv(gen, 'decode_head.bottleneck.conv', SEG_CH, CHS[3] + 4 * SEG_CH, 3, bias=False))
    sd.update(_bn(gen, 'decode_head.bottleneck.bn', SEG_CH))
    for j in range(3):
        sd.update(_conv(gen, f'decode_head.lateral_convs.{j}.conv', SEG_CH, CHS[j], 1, bias=False))
        sd.update(_bn(gen, f'decode_head.lateral_convs.{j}.bn', SEG_CH))
        sd.update(_conv(gen, f'decode_head.fpn_convs.{j}.conv', SEG_CH, SEG_CH, 3, bias=False))
        sd.update(_bn(gen, f'decode_head.fpn_convs.{j}.bn', SEG_CH))
    sd.update(_conv(gen, 'decode_head.fpn_bottleneck.conv', SEG_CH, 4 * SEG_CH, 3, bias=False))
    sd.update(_bn(gen, 'decode_head.fpn_bottleneck.bn', SEG_CH))
    sd.update(_conv(gen, 'decode_head.conv_seg', K_SEG, SEG_CH, 1))
    sd.update(_conv(gen, 'auxiliary_head.convs.0.conv', 256, CHS[2], 3, bias=False))
    sd.update(_bn(gen, 'auxiliary_head.convs.0.bn', 256))
    sd.update(_conv(gen, 'auxiliary_head.conv_seg', K_SEG, 256, 1))
    return sd


@pytest.fixture(scope='module')
def det_model():
    from vittt.dense.detection import build_maskrcnn
    return build_maskrcnn('hvit3_tiny', K_DET, preset='official', backbone_kwargs=MICRO)


@pytest.fixture(scope='module')
def seg_model():
    from vittt.dense.segmentation import build_upernet
    return build_upernet('hvit3_tiny', K_SEG, decoder_channels=SEG_CH, backbone_kwargs=MICRO)


# ------------------------------------------------------------------------------------------------ fake mmengine
_SIDE_EFFECTS = []


def _record(what):
    _SIDE_EFFECTS.append(what)
    return what


class HistoryBuffer:
    """Stands in for ``mmengine.logging.history_buffer.HistoryBuffer`` (numpy arrays inside)."""

    def __init__(self, values):
        import numpy as np
        self._log_history = np.asarray(values, dtype=np.float64)
        self._count_history = np.ones(len(values))


class MessageHub:
    def __init__(self):
        self.log_scalars = {'train/loss': HistoryBuffer([1.5, 1.2, 0.9])}
        self.runtime_info = {'epoch': 12, 'iter': 90000}


class Sneaky:
    """Its ``__reduce__`` makes an ordinary unpickler call a function of the file's choosing."""

    def __reduce__(self):
        return _record, ('ran',)


class SneakyShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.fixture
def fake_mmengine(monkeypatch):
    """The classes above importable as mmengine's (and ``_record`` from a module of its own) while saving."""
    modules = {}
    for name in ('mmengine', 'mmengine.logging', 'mmengine.logging.history_buffer', 'mmengine.logging.message_hub',
                 'fake_payload'):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])
    for cls, module in ((HistoryBuffer, 'mmengine.logging.history_buffer'),
                        (MessageHub, 'mmengine.logging.message_hub'),
                        (Sneaky, 'fake_payload'), (SneakyShell, 'fake_payload')):
        monkeypatch.setattr(cls, '__module__', module)
        setattr(modules[module], cls.__name__, cls)
    monkeypatch.setattr(_record, '__module__', 'fake_payload')
    modules['fake_payload']._record = _record
    return modules


def _mmengine_checkpoint(state_dict, marker):
    return {'meta': {'dataset_meta': {'classes': CLASSES, 'palette': [(220, 20, 60)] * K_DET},
                     'mmengine_version': '0.10.7', 'epoch': 12, 'iter': 90000, 'seed': 0},
            'state_dict': state_dict, 'message_hub': MessageHub(),
            'param_schedulers': [{'begin': 0, 'end': 500, 'by_epoch': False, 'last_step': 500}],
            'sneaky': Sneaky(), 'shell': SneakyShell(marker)}


def _save_mmengine(path, state_dict, fake_mmengine, marker):
    torch.save(_mmengine_checkpoint(state_dict, marker), path)
    for name in [n for n in fake_mmengine if n.startswith('mmengine')]:
        del sys.modules[name]  # mmengine is not installed when the file is read


# ------------------------------------------------------------------------------------------------ tests
def test_tensors_only_loader_on_mmengine_checkpoint(tmp_path, fake_mmengine, golden_backbone):
    path, marker = tmp_path / 'epoch_12.pth', tmp_path / 'pwned'
    state_dict = {k: v for k, v in list(golden_backbone.items())[:20]}
    _save_mmengine(path, state_dict, fake_mmengine, marker)
    assert 'fake_payload' in sys.modules and 'mmengine' not in sys.modules  # _record could be found and run
    with pytest.raises(CheckpointError, match=r'besides tensors.*trust_pickle'):
        load_checkpoint_file(path)  # the default stays weights-only
    _SIDE_EFFECTS.clear()
    ckpt = load_checkpoint_file(path, tensors_only=True)
    assert set(ckpt['state_dict']) == set(state_dict)
    assert all(torch.equal(ckpt['state_dict'][k], v) for k, v in state_dict.items())
    assert ckpt['meta']['dataset_meta']['classes'] == CLASSES and ckpt['meta']['epoch'] == 12
    assert ckpt['param_schedulers'][0]['end'] == 500
    hub = ckpt['message_hub']
    assert isinstance(hub, ForeignObject) and hub.global_name == 'mmengine.logging.message_hub.MessageHub'
    assert isinstance(hub.state['log_scalars']['train/loss'], ForeignObject)  # numpy inside stays unbuilt too
    assert isinstance(ckpt['sneaky'], ForeignObject) and ckpt['sneaky'].global_name == 'fake_payload._record'
    assert ckpt['sneaky'].args == ('ran',)
    assert ckpt['shell'].global_name.endswith('.system')
    assert _SIDE_EFFECTS == [] and not marker.exists()  # no code from the file ran
    with pytest.warns(UserWarning, match='tensor-only loader'):
        auto = load_checkpoint_file(path, tensors_only='auto')
    assert torch.equal(auto['state_dict'][next(iter(state_dict))], next(iter(state_dict.values())))
    # the control: an ordinary unpickler does run the file's code (with the payload only; no shell command)
    torch.save({'sneaky': Sneaky()}, tmp_path / 'control.pth')
    torch.load(tmp_path / 'control.pth', weights_only=False)
    assert _SIDE_EFFECTS == ['ran']
    _SIDE_EFFECTS.clear()


def test_detect_dense_task(det_sd, seg_sd, golden_backbone, det_model):
    assert detect_dense_task(det_sd) == 'maskrcnn'
    assert detect_dense_task({'state_dict': det_sd, 'meta': {}}) == 'maskrcnn'
    no_mask = {k: v for k, v in det_sd.items() if not k.startswith('roi_head.mask_head.')}
    assert detect_dense_task(no_mask) == 'fasterrcnn'
    assert detect_dense_task(seg_sd) == 'upernet'
    assert detect_dense_task(golden_backbone) == 'backbone'
    assert detect_dense_task(load_file(GOLDEN / 'hvit3_micro.weights.safetensors')) == 'classification'
    assert detect_dense_task(det_model.state_dict()) == 'maskrcnn'  # already converted (torchvision names)
    cascade = {k.replace('roi_head.bbox_head.', 'roi_head.bbox_head.0.'): v for k, v in det_sd.items()}
    with pytest.raises(CheckpointError, match=r'unsupported detector layout: multi-stage.*roi_head\.bbox_head\.0'):
        detect_dense_task(cascade)
    retina = dict(golden_backbone, **{'neck.lateral_convs.0.conv.weight': torch.zeros(1),
                                      'bbox_head.retina_cls.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r'unsupported detector layout: top-level groups .*bbox_head'):
        detect_dense_task(retina)
    convfc = dict(det_sd, **{'roi_head.bbox_head.shared_convs.0.conv.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r'unsupported detector layout: roi_head\.bbox_head\.shared_convs'):
        detect_dense_task(convfc)
    with pytest.raises(CheckpointError, match=r'unsupported segmentation layout: decode_head\.aspp_modules'):
        detect_dense_task(dict(seg_sd, **{'decode_head.aspp_modules.0.conv.weight': torch.zeros(1)}))


def test_maskrcnn_conversion(det_sd, det_model, golden_io):
    ckpt = {'meta': {'dataset_meta': {'classes': CLASSES}}, 'state_dict': det_sd}
    report = load_official_detector(det_model, ckpt)  # strict: raises on any mismatch
    assert report['task'] == 'maskrcnn' and report['num_classes'] == K_DET and report['classes'] == list(CLASSES)
    assert report['dropped'] == [] and report['initialised'] == []
    tv = det_model.state_dict()
    for name in ('weight', 'bias'):  # background: mmdet's last row, torchvision's first
        mm, ours = det_sd[f'roi_head.bbox_head.fc_cls.{name}'], tv[f'roi_heads.box_predictor.cls_score.{name}']
        assert torch.equal(ours[0], mm[K_DET]) and torch.equal(ours[1:], mm[:K_DET])
        mm, ours = det_sd[f'roi_head.bbox_head.fc_reg.{name}'], tv[f'roi_heads.box_predictor.bbox_pred.{name}']
        assert ours.shape[0] == 4 * (K_DET + 1) and not ours[:4].any() and torch.equal(ours[4:], mm)
        mm = det_sd[f'roi_head.mask_head.conv_logits.{name}']
        ours = tv[f'roi_heads.mask_predictor.mask_fcn_logits.{name}']
        assert not ours[0].any() and torch.equal(ours[1:], mm)
    pairs = {'backbone.fpn.inner_blocks.2.0.weight': 'neck.lateral_convs.2.conv.weight',
             'backbone.fpn.layer_blocks.3.0.bias': 'neck.fpn_convs.3.conv.bias',
             'rpn.head.conv.0.0.weight': 'rpn_head.rpn_conv.weight',
             'rpn.head.cls_logits.bias': 'rpn_head.rpn_cls.bias',
             'rpn.head.bbox_pred.weight': 'rpn_head.rpn_reg.weight',
             'roi_heads.box_head.fc6.weight': 'roi_head.bbox_head.shared_fcs.0.weight',
             'roi_heads.box_head.fc7.bias': 'roi_head.bbox_head.shared_fcs.1.bias',
             'roi_heads.mask_head.3.0.weight': 'roi_head.mask_head.convs.3.conv.weight',
             'roi_heads.mask_predictor.conv5_mask.weight': 'roi_head.mask_head.upsample.weight',
             'backbone.body.norms.2.weight': 'backbone.norm2.weight',
             'backbone.body.trunk.model.layers.1.blocks.1.attn.inner.0.w2': 'backbone.layers.1.blocks.1.attn.w2',
             'backbone.body.trunk.model.layers.0.blocks.0.attn.inner.1.weight': 'backbone.layers.0.blocks.0.attn.w3'}
    for ours, mm in pairs.items():
        assert torch.equal(tv[ours], det_sd[mm]), ours
    body = det_model.backbone.body.eval()
    with torch.no_grad():
        features = body(golden_io['square_input'])
    for i, f in enumerate(features):
        torch.testing.assert_close(f, golden_io[f'square_out{i}'], rtol=0, atol=1e-5)


def test_fasterrcnn_conversion(det_sd):
    from vittt.dense.detection import build_fasterrcnn
    model = build_fasterrcnn('hvit3_tiny', K_DET, preset='official', backbone_kwargs=MICRO)
    no_mask = {k: v for k, v in det_sd.items() if not k.startswith('roi_head.mask_head.')}
    assert load_official_detector(model, no_mask)['task'] == 'fasterrcnn'
    with pytest.raises(CheckpointError, match=r'(?s)unexpected keys \(12\).*<- roi_head\.mask_head\.convs\.0'):
        convert_maskrcnn_state_dict(det_sd, model)  # a Mask R-CNN file into a Faster R-CNN: never a silent drop


# the inverse of the §3.4 table, written out here: smp key -> mmseg key
def _smp_to_mmseg(key):
    import re
    rules = [(r'decoder\.psp\.blocks\.(\d)\.1\.0\.', r'decode_head.psp_modules.\1.1.conv.'),
             (r'decoder\.psp\.blocks\.(\d)\.1\.1\.', r'decode_head.psp_modules.\1.1.bn.'),
             (r'decoder\.psp\.out_conv\.0\.', 'decode_head.bottleneck.conv.'),
             (r'decoder\.psp\.out_conv\.1\.', 'decode_head.bottleneck.bn.'),
             (r'decoder\.fusion_block\.0\.', 'decode_head.fpn_bottleneck.conv.'),
             (r'decoder\.fusion_block\.1\.', 'decode_head.fpn_bottleneck.bn.'),
             (r'segmentation_head\.0\.', 'decode_head.conv_seg.'),
             (r'aux_head\.conv\.0\.', 'auxiliary_head.convs.0.conv.'),
             (r'aux_head\.conv\.1\.', 'auxiliary_head.convs.0.bn.'),
             (r'aux_head\.conv_seg\.', 'auxiliary_head.conv_seg.'),
             (r'decoder\.feature_norms\.(\d)\.', r'backbone.norm\1.'),
             (r'encoder\.backbone\.trunk\.model\.', 'backbone.')]
    for smp_index, mm_index in ((0, 2), (1, 1), (2, 0)):  # smp runs coarse to fine
        rules += [(rf'decoder\.fpn_lateral_blocks\.{smp_index}\.conv_norm_relu\.0\.',
                   f'decode_head.lateral_convs.{mm_index}.conv.'),
                  (rf'decoder\.fpn_lateral_blocks\.{smp_index}\.conv_norm_relu\.1\.',
                   f'decode_head.lateral_convs.{mm_index}.bn.'),
                  (rf'decoder\.fpn_conv_blocks\.{smp_index}\.0\.', f'decode_head.fpn_convs.{mm_index}.conv.'),
                  (rf'decoder\.fpn_conv_blocks\.{smp_index}\.1\.', f'decode_head.fpn_convs.{mm_index}.bn.')]
    for pattern, repl in rules:
        new, n = re.subn('^' + pattern, repl, key)
        if n:
            return new.replace('attn.inner.0.w', 'attn.w').replace('attn.inner.1.weight', 'attn.w3')
    raise AssertionError(f'no inverse rule for {key}')


def test_upernet_conversion_round_trip(seg_sd, seg_model, golden_io):
    report = load_official_segmenter(seg_model, {'state_dict': seg_sd})
    assert report['task'] == 'upernet' and report['num_classes'] == K_SEG and report['dropped'] == []
    ours = seg_model.state_dict()
    back = {_smp_to_mmseg(k): v for k, v in ours.items()}
    official = {k: v for k, v in seg_sd.items() if not k.endswith('.rope.rotations')}
    assert set(back) == set(official)
    assert all(torch.equal(back[k], v) for k, v in official.items())
    # the reversed FPN order, by value and by shape (stride-4 lateral conv: 32 input channels)
    lateral = ours['decoder.fpn_lateral_blocks.2.conv_norm_relu.0.weight']
    assert lateral.shape[1] == CHS[0] and torch.equal(lateral, seg_sd['decode_head.lateral_convs.0.conv.weight'])
    for i in range(4):
        norm = seg_model.decoder.feature_norms[i]
        assert norm.eps == 1e-5 and torch.equal(norm.weight.detach(), seg_sd[f'backbone.norm{i}.weight'])
    seg_model.eval()
    with torch.no_grad():  # the official backbone's outputs = smp's feature norms over our trunk
        features = seg_model.encoder.backbone(golden_io['square_input'])
        for i, f in enumerate(features):
            torch.testing.assert_close(seg_model.decoder.feature_norms[i](f), golden_io[f'square_out{i}'],
                                       rtol=0, atol=1e-5)
        logits = seg_model(golden_io['square_input'])
    assert logits.shape == (2, K_SEG, 64, 64) and torch.isfinite(logits).all()


def test_upernet_without_aux_head_drops_it(seg_sd):
    from vittt.dense.segmentation import build_upernet
    model = build_upernet('hvit3_tiny', K_SEG, decoder_channels=SEG_CH, aux_head=False, backbone_kwargs=MICRO)
    report = load_official_segmenter(model, seg_sd)
    assert report['dropped'] and all(k.startswith('auxiliary_head.') for k in report['dropped'])


def test_errors_name_the_keys(det_sd, seg_sd, det_model, seg_model):
    bad = dict(det_sd)
    bad['neck.lateral_convs.0.cnv.weight'] = bad.pop('neck.lateral_convs.0.conv.weight')
    with pytest.raises(CheckpointError) as e:
        convert_maskrcnn_state_dict(bad, det_model)
    text = str(e.value)
    assert 'missing keys (1)' in text and 'backbone.fpn.inner_blocks.0.0.weight' in text
    assert 'unexpected keys (1)' in text and 'neck.lateral_convs.0.cnv.weight' in text

    bad = dict(det_sd, **{'roi_head.mask_head.convs.1.conv.weight': torch.zeros(256, 256, 1, 1),
                          'backbone.layers.0.blocks.0.mlp.fc1.weight': torch.zeros(3, 32)})
    with pytest.raises(CheckpointError) as e:
        convert_maskrcnn_state_dict(bad, det_model)
    text = str(e.value)
    assert 'shape mismatches (2)' in text
    assert 'roi_heads.mask_head.1.0.weight: checkpoint (256, 256, 1, 1) vs model (256, 256, 3, 3)' in text
    assert 'roi_heads.mask_head.1.0.weight <- roi_head.mask_head.convs.1.conv.weight' in text
    assert 'backbone.body.trunk.model.layers.0.blocks.0.mlp.fc1.weight <- backbone.layers.0.blocks.0.mlp.fc1' in text

    from vittt.dense.detection import build_maskrcnn
    eighty = build_maskrcnn('hvit3_tiny', 80, preset='official', backbone_kwargs=MICRO)
    with pytest.raises(CheckpointError, match=r'cls_score\.weight: checkpoint \(11, 1024\) vs model \(81, 1024\)'):
        convert_maskrcnn_state_dict(det_sd, eighty)

    bad = dict(seg_sd)
    bad['decode_head.fpn_convs.1.bn.running_var'] = torch.ones(SEG_CH + 1)
    del bad['decode_head.psp_modules.3.1.bn.weight']
    with pytest.raises(CheckpointError) as e:
        convert_upernet_state_dict(bad, seg_model)
    text = str(e.value)
    assert 'decoder.psp.blocks.3.1.1.weight' in text  # missing
    assert 'decoder.fpn_conv_blocks.1.1.running_var <- decode_head.fpn_convs.1.bn.running_var' in text

    bad = dict(seg_sd, **{'backbone.layers.0.blocks.0.attn.rope.rotations': torch.zeros(16, 16, 16, 2)})
    with pytest.raises(CheckpointError, match=r'rope\.rotations: the RoPE table differs'):
        convert_upernet_state_dict(bad, seg_model)
    with pytest.raises(CheckpointError, match='not a UPerNet checkpoint'):
        convert_upernet_state_dict(det_sd, seg_model)


def test_classification_converter_refuses_dense_files(tmp_path, det_sd, fake_mmengine):
    plain = tmp_path / 'det_plain.pth'
    torch.save({'state_dict': det_sd}, plain)
    message = r'this is a Mask R-CNN checkpoint \(backbone/neck/rpn_head/roi_head\); use --task maskrcnn or ' \
              r'--task backbone'
    with pytest.raises(CheckpointError, match=message):
        convert_official_file(plain, tmp_path / 'x.safetensors')
    mmengine = tmp_path / 'det_mmengine.pth'  # its weights-only load fails first: the file is sniffed
    small = {k: v for k, v in det_sd.items() if not k.startswith('roi_head.bbox_head.shared_fcs.0')}
    _save_mmengine(mmengine, small, fake_mmengine, tmp_path / 'pwned')
    with pytest.raises(CheckpointError, match=message):
        convert_official_file(mmengine, tmp_path / 'x.safetensors')
    assert not (tmp_path / 'x.safetensors').exists() and not (tmp_path / 'pwned').exists()


@pytest.fixture
def det_file(tmp_path, det_sd, fake_mmengine):
    path = tmp_path / 'mask_rcnn_hvit3_micro.pth'
    _save_mmengine(path, det_sd, fake_mmengine, tmp_path / 'pwned')
    return path


@pytest.mark.filterwarnings('ignore:.*tensor-only loader')
def test_cli_convert_and_inspect(det_file, tmp_path, capsys, det_model):
    from vittt.cli import main

    out = tmp_path / 'det.safetensors'
    with pytest.warns(UserWarning, match='tensor-only loader'):
        assert main(['convert', str(det_file), str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'maskrcnn on hvit3_tiny, 10 classes' in printed
    converted = load_file(out)
    expected = det_model.state_dict()
    assert set(converted) == set(expected) and all(converted[k].shape == v.shape for k, v in expected.items())
    with safe_open(str(out), 'pt') as f:
        meta = f.metadata()
    assert meta['task'] == 'maskrcnn' and meta['num_classes'] == '10' and json.loads(meta['classes']) == list(CLASSES)
    assert json.loads(meta['config'])['backbone_kwargs']['depths'] == [1, 2, 1, 1]
    load_official_detector(det_model, out)  # the converted file loads back strictly

    assert main(['convert', '--inspect', str(det_file)]) == 0
    printed = capsys.readouterr().out
    assert 'task: maskrcnn' in printed and 'classes: 10 (thing0, thing1' in printed
    assert 'custom H-ViT³ (dims=(32, 64, 96, 128), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))' in printed
    groups = dict(line.split() for line in printed.split('key groups:\n')[1].splitlines())
    assert groups['roi_head.bbox_head'] == '8' and groups['neck.lateral_convs'] == '8'
    assert groups['backbone.norm0'] == '2' and groups['rpn_head.rpn_cls'] == '2'
    assert main(['convert', '--inspect', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'task: maskrcnn' in printed and 'classes: 10 (thing0' in printed

    backbone = tmp_path / 'backbone.safetensors'
    assert main(['convert', str(det_file), str(backbone), '--task', 'backbone']) == 0
    assert set(load_file(backbone)) == set(det_model.backbone.body.state_dict())
    assert main(['convert', str(det_file), str(tmp_path / 'c.safetensors'), '--task', 'classification']) == 2
    assert 'use --task maskrcnn or --task backbone' in capsys.readouterr().err
    assert main(['convert', str(det_file), str(tmp_path / 'u.safetensors'), '--task', 'upernet']) == 2
    assert 'this is a maskrcnn checkpoint' in capsys.readouterr().err


def test_convert_seg_file(tmp_path, seg_sd, seg_model):
    src, dst = tmp_path / 'upernet.pth', tmp_path / 'upernet.safetensors'
    torch.save({'meta': {'dataset_meta': {'classes': tuple('abcdefg')}}, 'state_dict': seg_sd}, src)
    report = convert_dense_file(src, dst)
    assert report['task'] == 'upernet' and report['classes'] == list('abcdefg')
    assert report['config']['decoder_channels'] == SEG_CH and report['config']['aux_head'] is True
    assert load_official_segmenter(seg_model, dst)['classes'] == list('abcdefg')
    info = inspect_checkpoint(src)
    assert info['task'] == 'upernet' and info['num_classes'] == K_SEG
    assert info['groups']['decode_head.lateral_convs'] == 3 * 6
