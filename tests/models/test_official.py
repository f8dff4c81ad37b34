"""Official checkpoints: golden parity with the official implementation, the converter, timm loading, errors."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from vittt.models import CheckpointError, HViT3, ViT3, convert_official_file, convert_official_state_dict
from vittt.models.official import detect_official_variant, unwrap_state_dict

GOLDEN = Path(__file__).parent.parent / 'fixtures' / 'golden'
MICRO = {
    'vit3_micro': lambda: ViT3(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10),
    'hvit3_micro': lambda: HViT3(dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), num_classes=10),
}


def _golden(name):
    return load_file(GOLDEN / f'{name}.weights.safetensors'), load_file(GOLDEN / f'{name}.io.safetensors')


@pytest.mark.parametrize('name', sorted(MICRO))
def test_golden_logits(name):
    weights, io = _golden(name)
    model = MICRO[name]()
    model.load_state_dict(convert_official_state_dict(weights, model), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(io['input'])
    assert (logits - io['logits']).abs().max().item() <= 1e-5


@pytest.mark.parametrize('wrapper', ['model', 'state_dict_ema', 'module'])
def test_wrapped_official_checkpoints(wrapper, tmp_path):
    weights, io = _golden('vit3_micro')
    ckpt = {'module.' + k: v for k, v in weights.items()} if wrapper == 'module' else {wrapper: weights, 'epoch': 3}
    model = MICRO['vit3_micro']()
    model.load_state_dict(convert_official_state_dict(ckpt, model))
    model.eval()
    with torch.no_grad():
        assert (model(io['input']) - io['logits']).abs().max() <= 1e-5


def test_ema_preferred_unless_disabled():
    a, b = {'x': torch.zeros(1)}, {'x': torch.ones(1)}
    assert unwrap_state_dict({'model': a, 'state_dict_ema': b})['x'].item() == 1
    assert unwrap_state_dict({'model': a, 'state_dict_ema': b}, use_ema=False)['x'].item() == 0


def test_wrong_keys_are_listed():
    weights, _ = _golden('vit3_micro')
    weights = dict(weights)
    weights['blocks.0.attn.extra'] = weights.pop('blocks.1.norm1.weight')
    weights['norm.weight'] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        convert_official_state_dict(weights, MICRO['vit3_micro']())
    msg = str(err.value)
    assert 'missing keys (1)' in msg and 'blocks.1.norm1.weight' in msg
    assert 'unexpected keys (1)' in msg and 'blocks.0.attn.extra' in msg
    assert 'shape mismatches (1)' in msg and 'norm.weight: checkpoint (3,) vs model (64,)' in msg


def test_wrong_model_family_is_an_error():
    weights, _ = _golden('hvit3_micro')
    with pytest.raises(CheckpointError, match='missing keys'):
        convert_official_state_dict(weights, MICRO['vit3_micro']())


def test_corrupt_rope_table_rejected():
    weights, _ = _golden('hvit3_micro')
    weights = dict(weights)
    weights['layers.0.blocks.0.rope.rotations'] = weights['layers.0.blocks.0.rope.rotations'].flip(0)
    with pytest.raises(CheckpointError, match='RoPE table'):
        convert_official_state_dict(weights)


def test_timm_pretrained_file_loads_official(tmp_path):
    """The timm way: create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)) with an official .pth."""
    weights, io = _golden('hvit3_micro')
    path = tmp_path / 'official.pth'
    torch.save({'model': weights, 'epoch': 299}, path)
    model = timm.create_model('hvit3_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), num_classes=10)
    model.eval()
    with torch.no_grad():
        assert (model(io['input']) - io['logits']).abs().max() <= 1e-5


def test_timm_pretrained_new_num_classes_drops_head(tmp_path):
    weights, io = _golden('vit3_micro')
    path = tmp_path / 'official.pth'
    torch.save(weights, path)
    model = timm.create_model('vit3_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              embed_dim=64, depth=2, num_heads=2, num_classes=3)
    ref = MICRO['vit3_micro']()
    ref.load_state_dict(convert_official_state_dict(weights, ref))
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io['input']), ref.forward_features(io['input']))
    assert model.head.weight.shape == (3, 64)


def test_convert_file_roundtrip_and_detection(tmp_path):
    weights, io = _golden('hvit3_micro')
    src, dst = tmp_path / 'official.pth', tmp_path / 'out' / 'converted.safetensors'
    torch.save({'state_dict_ema': weights}, src)
    with pytest.raises(CheckpointError, match='none of the official models'):
        convert_official_file(src, dst)
    name, count = convert_official_file(src, dst, 'hvit3_tiny', dims=(32, 64, 96, 128), depths=(1, 1, 1, 1),
                                        num_heads=(1, 2, 3, 4))
    assert name == 'hvit3_tiny' and count == len(weights) - 4  # four RoPE buffers dropped
    assert [p.name for p in dst.parent.iterdir()] == ['converted.safetensors']  # no temporary file left
    model = MICRO['hvit3_micro']()
    model.load_state_dict(load_file(dst))
    model.eval()
    with torch.no_grad():
        assert (model(io['input']) - io['logits']).abs().max() <= 1e-5


@pytest.mark.parametrize('name', ['vit3_tiny', 'hvit3_tiny'])
def test_detect_variant_of_full_size_layout(name):
    model = timm.create_model(name)
    sd = {k.replace('attn.inner.0.w1', 'attn.w1'): v for k, v in model.state_dict().items()}
    assert detect_official_variant(sd) == name


def test_unreadable_checkpoint_files(tmp_path):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        convert_official_file(bad, tmp_path / 'x.safetensors')
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        convert_official_file(tmp_path / 'missing.pth', tmp_path / 'x.safetensors')
    pickled = tmp_path / 'pickled.pth'
    torch.save({'model': {}, 'config': _Config()}, pickled)
    with pytest.raises(CheckpointError, match=r'Python objects besides tensors \(.*_Config\).*trust_pickle'):
        convert_official_file(pickled, tmp_path / 'x.safetensors')
    assert not (tmp_path / 'x.safetensors').exists()


class _Config:
    """Stands in for the yacs config object official training checkpoints carry."""


@pytest.mark.parametrize('name', ['vit3_tiny', 'hvit3_small'])
def test_pretrained_without_file_explains_how_to_get_weights(name):
    with pytest.raises(RuntimeError, match=r"pretrained_cfg_overlay=dict\(file=.*vittt convert"):
        timm.create_model(name, pretrained=True)
