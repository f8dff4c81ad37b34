"""What is particular to the registered Vision-TTT models (``vision_ttt_tiny/small/base``): the variants' widths and
mini-batch sizes, forward at token counts that are not multiples of the mini-batch size, what the class token
reads, zero padding, the switches (inner MLP, causal, concat merge, RMSNorm, optional parts, bad values) and what
the mini-batch size does to the output. The timm model contract (forward / head, features, intermediates, groups,
errors, training, ...) of every registered model is tests/models/test_contract.py.

CPU only and kept cheap: inputs of 1-72 tokens, the eval-mode tiny models built once per module (never switched to
train mode), small / base built with one block only.
"""
import pytest
import torch
from torch import nn

import vittt  # noqa: F401  (registers the models; must be imported before timm/torchvision)
import timm  # noqa: E402
from timm.layers import RmsNorm  # noqa: E402

from vittt.layers import VisionTTTMixer  # noqa: E402
from vittt.models import VisionTTT  # noqa: E402

NAMES = ['vision_ttt_tiny', 'vision_ttt_small', 'vision_ttt_base']
WIDTHS = {'vision_ttt_tiny': (192, 3, 64), 'vision_ttt_small': (384, 6, 128), 'vision_ttt_base': (768, 12, 256)}
MB = 8  # mini-batch size of the shared models (the odd sizes below give 30, 21 and 20 tokens)
CONFIGS = {
    'avg': dict(mixer_kwargs=dict(mini_batch_size=MB)),
    'token': dict(global_pool='token', mixer_kwargs=dict(mini_batch_size=MB)),
}


def _ceil(a, b):
    return -(-a // b)


def _num_tokens(h, w):
    return _ceil(h, 16) * _ceil(w, 16)


def _mixers(m):
    return [mod for mod in m.modules() if isinstance(mod, VisionTTTMixer)]


@pytest.fixture(scope='module')
def shared(build_model):
    """``shared(key)``: one eval-mode vision_ttt_tiny per entry of ``CONFIGS``, for read-only tests."""
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = build_model('vision_ttt_tiny', **CONFIGS[key])
        return cache[key]

    yield get
    cache.clear()


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize('name', NAMES)
def test_architecture_defaults(name, build_model):
    """Width, heads and the default mini-batch size of each variant (depth=1 keeps the build cheap)."""
    dim, heads, mb = WIDTHS[name]
    m = build_model(name, depth=1)
    assert isinstance(m, VisionTTT)
    assert m.num_features == m.head_hidden_size == m.embed_dim == dim
    assert m.num_prefix_tokens == 0 and m.cls_token is None and m.global_pool == 'avg'
    mixer = m.blocks[0].mixer
    assert (mixer.num_heads, mixer.head_dim, mixer.mini_batch_size) == (heads, 64, mb)
    assert (mixer.inner_kind, mixer.causal, mixer.scans, mixer.merge) == ('linear', False, ('forward', 'reverse'),
                                                                          'sum')
    # mixer_kwargs are merged into the variant's defaults, and an explicit mini_batch_size wins
    other = build_model(name, depth=1, mixer_kwargs=dict(causal=True))
    assert (other.blocks[0].mixer.mini_batch_size, other.blocks[0].mixer.causal) == (mb, True)
    assert build_model(name, depth=1, mixer_kwargs=dict(mini_batch_size=3)).blocks[0].mixer.mini_batch_size == 3


def test_full_depth_tiny_defaults(shared):
    m = shared('avg')
    assert len(m.blocks) == 12
    assert all(mx.mini_batch_size == MB for mx in _mixers(m)) and len(_mixers(m)) == 12


# --------------------------------------------------------------------------- forward


# 30, 21 and 20 tokens: none a multiple of the mini-batch size 8; 50×70 is padded to 64×80
SIZES = [(96, 80), (112, 48), (50, 70)]


def test_forward_odd_sizes(shared, images):
    """(small and base: tests/models/test_contract.py::test_forward_and_head, 12 tokens in mini-batches of 8)"""
    m = shared('avg')
    for h, w in SIZES:
        assert _num_tokens(h, w) % MB != 0
        x = images(2, h, w, seed=h + w)
        with torch.no_grad():
            feats = m.forward_features(x)
            out = m.forward_head(feats)
        assert feats.shape == (2, _num_tokens(h, w), m.num_features)
        assert out.shape == (2, 1000)
        assert torch.isfinite(feats).all() and torch.isfinite(out).all()
        assert not torch.equal(out[0], out[1]), 'different images gave the same logits'


def test_forward_default_mini_batch_two_chunks(build_model, images):
    """vision_ttt_tiny with its default mini-batch 64 on 8×9 = 72 tokens: one full and one short mini-batch."""
    m = build_model('vision_ttt_tiny')
    assert m.blocks[0].mixer.mini_batch_size == 64
    x = images(1, 128, 144, seed=1)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (1, 72, 192)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_class_token_reads_every_patch(shared, images):
    """The class token is placed at the end of every scan: its output depends on the last patches of both the
    forward and the reverse raster order."""
    m = shared('token')
    x = images(1, 64, 64, seed=5)
    with torch.no_grad():
        ref = m.forward_features(x)[:, 0]
        for rows, cols in [(slice(0, 16), slice(0, 16)), (slice(48, 64), slice(48, 64))]:
            y = x.clone()
            y[:, :, rows, cols] = torch.randn_like(y[:, :, rows, cols])
            assert (m.forward_features(y)[:, 0] - ref).abs().max() > 1e-3


def test_padding_is_zero_padding(shared, images):
    """Sides that are not multiples of 16 behave as if zero-padded on the right/bottom."""
    m = shared('avg')
    x = images(2, 33, 47, seed=12)
    padded = nn.functional.pad(x, (0, 48 - 47, 0, 48 - 33))
    with torch.no_grad():
        a, b = m.forward_features(x), m.forward_features(padded)
    assert a.shape == b.shape == (2, 9, 192)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- switches


def test_backward_mlp_concat_causal(build_model, images):
    """Inner MLP, separate Q/K, concat merge of a forward and a column scan, causal: every parameter trains.
    (The default and class-token models: tests/models/test_contract.py::test_backward_all_params_get_finite_grads.)"""
    mixer_kwargs = dict(inner='mlp', merge='concat', share_qk=False, scans=('forward', 'column'), causal=True,
                        mini_batch_size=4)
    m = build_model('vision_ttt_tiny', num_classes=42, mixer_kwargs=mixer_kwargs).train()
    x = images(2, 72, 40, seed=1).requires_grad_(True)  # 5×3 = 15 tokens (padded): mini-batches 4, 4, 4, 3
    target = torch.randn(2, 42)
    out = m(x)
    assert out.shape == (2, 42)
    (out * target).sum().backward()

    params = dict(m.named_parameters())
    mixer = m.blocks[0].mixer
    assert mixer.inner_kind == 'mlp' and mixer.causal and mixer.merge_proj is not None
    assert not hasattr(mixer, 'qk') and hasattr(mixer, 'q') and hasattr(mixer, 'k')
    assert 'blocks.0.mixer.states.1.w2' in params
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert no_grad == [], f'parameters without gradient: {no_grad}'
    non_finite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert non_finite == [], f'non-finite gradients: {non_finite}'
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    assert zero == [], f'identically zero gradients: {zero}'
    # the padded last row and column still reach the output
    assert torch.isfinite(x.grad).all()
    assert x.grad[:, :, -1, :].abs().sum() > 0 and x.grad[:, :, :, -1].abs().sum() > 0


@pytest.mark.parametrize('kwargs, match', [
    (dict(mixer_kwargs=dict(scans=('diagonal',))), 'scans'),
    (dict(mixer_kwargs=dict(scans=('forward', 'diagonal'))), 'scans'),
    (dict(mixer_kwargs=dict(scans=())), 'scans'),
    (dict(mixer_kwargs=dict(merge='max')), 'merge'),
    (dict(mixer_kwargs=dict(mini_batch_size=0)), 'mini_batch_size'),
    (dict(mixer_kwargs=dict(mini_batch_size=-4)), 'mini_batch_size'),
    (dict(mixer_kwargs=dict(inner='rnn')), 'inner'),
    (dict(mixer_kwargs=dict(qk_conv_kernel=2)), 'qk_conv_kernel'),
    (dict(norm='batchnorm'), 'norm'),
    (dict(global_pool='max'), 'global_pool'),
    (dict(num_heads=5), 'divisible'),
], ids=['scan-diagonal', 'scan-mixed', 'scans-empty', 'merge-max', 'mb-0', 'mb-negative', 'inner-rnn',
        'even-kernel', 'norm-batchnorm', 'pool-max', 'heads'])
def test_bad_switches(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('vision_ttt_tiny', **kwargs)


def test_rmsnorm_builds_and_runs(build_model, images):
    m = build_model('vision_ttt_tiny', norm='rmsnorm', depth=3, mixer_kwargs=dict(mini_batch_size=MB))
    norms = [m.norm] + [mod for b in m.blocks for mod in (b.norm1, b.norm2)]
    assert all(isinstance(mod, RmsNorm) for mod in norms)
    assert not any(isinstance(mod, nn.LayerNorm) for b in m.blocks for mod in (b.norm1, b.norm2))
    x = images(2, 64, 48, seed=16)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (2, 12, 192) and out.shape == (2, 1000)
    assert torch.isfinite(out).all() and not torch.equal(out[0], out[1])
    m.train()
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_optional_parts_switched_off(build_model, images):
    """qk_conv_kernel=0, share_state, learnable_lr=False, gate=False drop their parameters and still run."""
    m = build_model('vision_ttt_tiny', depth=2, mixer_kwargs=dict(
        mini_batch_size=MB, qk_conv_kernel=0, share_state=True, learnable_lr=False, gate=False,
        scans=('forward', 'column_reverse'), merge='mean'))
    names = {n for n, _ in m.named_parameters()}
    for part in ('q_conv', 'k_conv', 'lr_proj', 'gate', 'states.1', 'merge_proj'):
        assert not any(f'.mixer.{part}.' in n for n in names), part
    assert 'blocks.0.mixer.states.0.w' in names
    with torch.no_grad():
        out = m(images(2, 80, 48, seed=17))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- mini-batch size


def test_mini_batch_size_changes_output_up_to_n(build_model, images):
    x = images(2, 64, 64, seed=18)  # 16 tokens
    outs, states = {}, {}
    for b in (4, 16, 17, 1000):
        m = build_model('vision_ttt_tiny', mixer_kwargs=dict(mini_batch_size=b))
        assert all(mx.mini_batch_size == b for mx in _mixers(m))
        states[b] = m.state_dict()
        with torch.no_grad():
            outs[b] = m.forward_features(x)
    for b in (4, 17, 1000):  # the same weights: only the mini-batch size differs
        assert all(torch.equal(states[b][k], states[16][k]) for k in states[16])
    # one mini-batch of all N tokens is one full-batch step, whatever the nominal size ≥ N
    assert torch.equal(outs[17], outs[16])
    assert torch.equal(outs[1000], outs[16])
    # four mini-batches of 4 are four sequential steps: a different function
    assert (outs[4] - outs[16]).abs().max() > 1e-2
