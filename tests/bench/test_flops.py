"""Parameter and MAC counts of the six models against the spec's table (A.4, within 0.5 %), and the counter itself."""
import pytest
import timm
import torch

from vittt.bench import count_macs, count_params

SPEC = {  # params (M), GMACs at 224² — ../shared/spec/vit3.md A.4
    'vit3_tiny': (6.15, 1.22), 'vit3_small': (23.80, 4.81), 'vit3_base': (90.06, 17.94),
    'hvit3_tiny': (28.70, 4.91), 'hvit3_small': (54.36, 8.74), 'hvit3_base': (94.37, 16.69),
}


@pytest.mark.parametrize('name', sorted(SPEC))
def test_params_and_macs_match_spec(name):
    params, gmacs = SPEC[name]
    model = timm.create_model(name)
    assert count_params(model) / 1e6 == pytest.approx(params, rel=5e-3)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=5e-3)


def test_macs_formula_of_one_vit3_layer():
    """Spec A.2.8 per token: C(3C+3d) + (C+d)C + 6dC + 18d (+ the MLP 8C² and the 9C CPE)."""
    model = timm.create_model('vit3_tiny', depth=1, num_classes=0)
    c, d, n = 192, 32, 14 * 14
    per_token = c * (3 * c + 3 * d) + (c + d) * c + 6 * d * c + 18 * d + 8 * c * c + 9 * c
    assert count_macs(model) == n * per_token + n * 16 * 16 * 3 * c


@pytest.mark.parametrize('size,ratio', [(224, (1.22, 1.25)), (1248, (37.85, 203.76))])
def test_deit_attention_is_counted(size, ratio):
    """DeiT's CPU flash-attention kernel is invisible to torch's counter; our formula charges it (spec A.10)."""
    vit3 = count_macs(timm.create_model('vit3_tiny'), (3, size, size)) / 1e9
    deit = count_macs(timm.create_model('deit_tiny_patch16_224', dynamic_img_size=True), (3, size, size)) / 1e9
    assert vit3 == pytest.approx(ratio[0], rel=5e-3)
    assert deit == pytest.approx(ratio[1], rel=5e-3)  # the spec's DeiT has no class token: within 0.1 %


def test_count_macs_restores_training_mode_and_leaves_no_fake_tensors():
    model = timm.create_model('hvit3_tiny', depths=(1, 1, 1, 1)).train()
    assert count_macs(model, (3, 64, 64)) > 0
    assert model.training
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()  # RoPE tables cached during the real forward, not the counted one
    caches = [m._cache for m in model.modules() if hasattr(m, '_cache')]
    assert caches and all(type(t) is torch.Tensor for c in caches for pair in c.values() for t in pair)


@pytest.mark.parametrize('fused', [False, True], ids=['composable', 'fused'])
@pytest.mark.parametrize('mini_batch_size,scans', [(16, ('forward', 'reverse')), (32, ('forward',))])
def test_macs_formula_of_one_vision_ttt_block(mini_batch_size, scans, fused):
    """Per token: 4C² (qk, v, gate, proj) + Ch (lr) + 18C (two 3×3 dw convs) + 3CH (SwiGLU), plus per scan:

    * composable path (``VisionTTTMixer.fused = False``): 3dC (key forward, weight gradient, query forward against
      the state after its mini-batch: the generic ``inner_ttt`` composition of TTT-Linear; the bias terms are sums);
    * fused path (the default): 3(d + 1)C (key forward, state update and query forward against the stored state,
      each a matmul with the bias as an extra row of the state), whatever b."""
    model = timm.create_model('vision_ttt_tiny', depth=1, num_classes=0,
                              mixer_kwargs=dict(mini_batch_size=mini_batch_size, scans=scans))
    model.blocks[0].mixer.fused = fused
    c, h, n = 192, 3, 64
    d, hidden = c // h, int(c * 8 / 3)
    scan = 3 * (d + 1) * c if fused else 3 * d * c
    per_token = 4 * c * c + c * h + 18 * c + 3 * c * hidden + len(scans) * scan
    assert count_macs(model, (3, 128, 128)) == n * per_token + n * 16 * 16 * 3 * c
