"""The ``vittt`` command line: the models table and checkpoint conversion, including error exits."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vittt.cli import main, parse_size

GOLDEN = Path(__file__).parent.parent / 'fixtures' / 'golden'


def test_parse_size():
    assert parse_size('224') == (224, 224) and parse_size('160x288') == (160, 288)
    for bad in ('0', 'x', '12x', 'ax3', '1x2x3'):
        with pytest.raises(Exception, match='image size'):
            parse_size(bad)


def test_models_table(tmp_path, capsys):
    out = tmp_path / 'models.json'
    assert main(['models', '--models', 'vit3_tiny', 'hvit3_tiny', '--sizes', '64', '96x160',
                 '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'vit3_tiny' in printed and 'hvit3_tiny' in printed
    rows = json.loads(out.read_text())
    assert [r['model'] for r in rows] == ['vit3_tiny', 'hvit3_tiny']
    assert rows[0]['params'] == 6149416  # the official key listing's parameter count
    assert rows[0]['sizes'][1]['features'] == [1, 192, 6, 10]
    assert rows[1]['sizes'][1]['features'] == [1, 512, 3, 5]
    assert rows[1]['sizes'][1]['logits'] == [1, 1000]
    assert rows[0]['sizes'][1]['macs'] > rows[0]['sizes'][0]['macs'] > 0


def test_convert_command(tmp_path, capsys):
    src = tmp_path / 'official.pth'
    torch.save({'model': load_file(GOLDEN / 'vit3_micro.weights.safetensors')}, src)
    # micro weights are no official variant: detection fails with a clear message and exit code 2
    assert main(['convert', str(src), str(tmp_path / 'a.safetensors')]) == 2
    assert 'none of the official models' in capsys.readouterr().err
    assert not (tmp_path / 'a.safetensors').exists()


def test_convert_full_size_official_layout(tmp_path, capsys):
    import timm
    model = timm.create_model('vit3_tiny')
    official = {k.replace('attn.inner.0.w', 'attn.w').replace('attn.inner.1.weight', 'attn.w3'): v
                for k, v in model.state_dict().items()}
    src, dst = tmp_path / 'vit3_t.pth', tmp_path / 'vit3_t.safetensors'
    torch.save({'model': official, 'epoch': 300}, src)
    assert main(['convert', str(src), str(dst)]) == 0
    assert 'vit3_tiny, 210 tensors' in capsys.readouterr().out
    converted = load_file(dst)
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_convert_missing_file(tmp_path, capsys):
    assert main(['convert', str(tmp_path / 'nope.pth'), str(tmp_path / 'o.safetensors')]) == 2
    assert 'checkpoint file not found' in capsys.readouterr().err
