"""``vittt bench --official PATH``: the official ViT³ TTT block (``ttt_block.py`` of a LeapLabTHU/ViTTT checkout) in
place of vittt's mixers. The official file is not part of vittt (nor of its tests), so the tests use a stand-in with
its interface and parameter layout (``TTT(dim, num_heads, qkv_bias)``, ``forward(x, h, w, rope)``; ``qkv``, ``w1``,
``w2`` ``[1, h, d, d]``, ``w3`` ``[d, 1, 3, 3]``, ``proj``) computing ViT³'s mixer with vittt's composable
ops; that the official block itself equals vittt's mixer is what the golden-output tests check."""
import json
import math
import textwrap

import pytest
import timm
import torch

from vittt.bench.official import find_ttt_block, load_official_ttt, with_official_ttt
from vittt.cli import main

STAND_IN = textwrap.dedent('''
    import torch
    from torch import nn
    from vittt.ops.dwconv import dwconv_ttt
    from vittt.ops.glu import swiglu_ttt
    from vittt.ops.loss import get_inner_loss


    class TTT(nn.Module):
        def __init__(self, dim, num_heads, qkv_bias=True, **kwargs):
            super().__init__()
            d = dim // num_heads
            self.num_heads, self.scale = num_heads, 9 ** -0.5 * 1.0
            self.qkv = nn.Linear(dim, 3 * dim + 3 * d, bias=qkv_bias)
            self.w1 = nn.Parameter(torch.randn(1, num_heads, d, d) * 0.02)
            self.w2 = nn.Parameter(torch.randn(1, num_heads, d, d) * 0.02)
            self.w3 = nn.Parameter(torch.randn(d, 1, 3, 3) * 0.02)
            self.proj = nn.Linear(dim + d, dim)

        def forward(self, x, h, w, rope=None):
            b, n, c = x.shape
            d = c // self.num_heads
            q1, k1, v1, q2, k2, v2 = self.qkv(x).split([c, c, c, d, d, d], dim=-1)
            if rope is not None:
                q1, k1 = (rope(t.reshape(b, h, w, c)).reshape(b, n, c) for t in (q1, k1))
            heads = lambda t: t.reshape(b, n, self.num_heads, d).transpose(1, 2)
            maps = lambda t: t.transpose(1, 2).reshape(b, d, h, w)
            dot = get_inner_loss('dot')
            x1 = swiglu_ttt(heads(q1), heads(k1), heads(v1), self.w1, self.w2, loss=dot, scale=self.scale)
            x2 = dwconv_ttt(maps(q2), maps(k2), maps(v2), self.w3, loss=dot, scale=self.scale)
            return self.proj(torch.cat([x1.transpose(1, 2).reshape(b, n, c), x2.flatten(2).transpose(1, 2)], -1))
''')

TINY = {
    'vit3_tiny': dict(depth=2, embed_dim=32, num_heads=2, num_classes=5),
    'hvit3_tiny': dict(depths=(1, 1), dims=(16, 32), num_heads=(1, 2), num_classes=5),   # RoPE
}


@pytest.fixture
def checkout(tmp_path):
    models = tmp_path / 'ViTTT' / 'vittt' / 'models'
    models.mkdir(parents=True)
    (models / 'ttt_block.py').write_text(STAND_IN)
    return tmp_path / 'ViTTT'


@pytest.mark.parametrize('name', sorted(TINY))
def test_the_official_block_replaces_every_mixer_with_the_same_weights(name, checkout, images):
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY[name]).eval()
    mixers = sum(type(m).__name__ == 'TTTMixer' for m in model.modules())
    x = images(2, 40, 56)
    with torch.no_grad():
        ours = model(x)
    swapped = with_official_ttt(model, checkout, check=x)  # (the check raises if the outputs differ)
    TTT = load_official_ttt(checkout)
    assert sum(isinstance(m, TTT) for m in swapped.modules()) == mixers > 0
    assert not any(type(m).__name__ == 'TTTMixer' for m in swapped.modules())
    with torch.no_grad():
        assert torch.allclose(swapped(x), ours, atol=1e-5)
    swapped.train()
    swapped(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in swapped.modules() if isinstance(m, TTT)
               for p in m.parameters())


def test_a_block_that_computes_something_else_is_refused(checkout, images):
    (checkout / 'vittt' / 'models' / 'ttt_block.py').write_text(
        STAND_IN.replace('self.proj(torch.cat', '1.5 * self.proj(torch.cat'))
    model = timm.create_model('vit3_tiny', **TINY['vit3_tiny']).eval()
    with pytest.raises(ValueError, match='differs from vittt'):
        with_official_ttt(model, checkout, check=images(1, 32, 32))


def test_paths_and_models_it_cannot_use_are_named(tmp_path, checkout):
    assert find_ttt_block(checkout) == checkout / 'vittt' / 'models' / 'ttt_block.py'
    assert find_ttt_block(checkout / 'vittt' / 'models' / 'ttt_block.py').name == 'ttt_block.py'
    with pytest.raises(ValueError, match='does not exist'):
        find_ttt_block(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no ttt_block.py under'):
        find_ttt_block(tmp_path / 'empty')
    (tmp_path / 'other.py').write_text('x = 1\n')
    with pytest.raises(ValueError, match='defines no TTT class'):
        load_official_ttt(tmp_path / 'other.py')
    (tmp_path / 'broken.py').write_text('import no_such_module\n')
    with pytest.raises(ValueError, match='importing .*broken.py failed: ModuleNotFoundError'):
        load_official_ttt(tmp_path / 'broken.py')
    design = timm.create_model('vit3_design_small', depth=1, embed_dim=32, num_heads=2)  # MLP inner model
    with pytest.raises(ValueError, match="implements ViT³'s default mixer"):
        with_official_ttt(design, checkout)
    with pytest.raises(ValueError, match='no ViT³ TTT mixer'):
        with_official_ttt(timm.create_model('deit_tiny_patch16_224', depth=1), checkout)


def test_bench_times_the_official_variant_beside_ours(tmp_path, checkout):
    out = tmp_path / 'bench'
    vit3, deit = 'vit3_tiny:depth=1,embed_dim=32,num_heads=2', 'deit_tiny_patch16_224:depth=1'
    assert main(['bench', '--models', vit3, deit, '--sizes', '32', '--repeats', '1', '--warmup', '0',
                 '--official', str(checkout), '--mode', 'infer', 'train', '--threads', '1', '--no-memory',
                 '--output', str(out)]) == 0
    result = json.loads((out / 'bench.json').read_text())
    assert [v['label'] for v in result['variants']] == [vit3, f'{vit3}+official', deit]
    timed = {(m['variant'], m['mode']) for m in result['measurements']
             if math.isfinite((m.get('time') or {}).get('median_ms', math.nan))}
    assert {(f'{vit3}+official', 'infer'), (f'{vit3}+official', 'train')} <= timed
    assert any('+official' in note and 'ttt_block.py' in note for note in result['notes'])
    assert main(['bench', '--models', vit3, '--sizes', '32', '--official', str(tmp_path / 'nowhere'),
                 '--output', str(out)]) == 2
