"""The registered Vision-TTT models (``vision_ttt_tiny/small/base``): forward at odd sizes, training, the timm
model API adapted to token outputs (``forward_features`` -> ``[B, P + N, C]`` as in timm's VisionTransformer),
features_only / forward_intermediates, any resolution, batch independence, input and switch errors, and what
the mini-batch size does to the output.

CPU only and kept cheap: inputs of 15-72 tokens, small mini-batch sizes (``mixer_kwargs``) where several
mini-batches are wanted, the eval-mode tiny models built once per module (never switched to train mode), and
small / base built only for the forward test (base once). The module runs with one intra-op thread (restored
afterwards): the models are many small ops, and on a 2-core machine shared with other processes two OpenMP
threads made e.g. building vision_ttt_tiny ~15x slower (3 s instead of 0.2 s).
"""
import copy
import re

import pytest
import torch
from torch import nn

import vittt  # noqa: F401  (registers the models; must be imported before timm/torchvision)
import timm  # noqa: E402
from timm.layers import RmsNorm  # noqa: E402
from timm.models import group_parameters  # noqa: E402
from timm.models._features import FeatureGetterNet  # noqa: E402

from vittt.layers import VisionTTTMixer  # noqa: E402
from vittt.models import VisionTTT  # noqa: E402
from helpers import checkpointing_runs, ceil_div, images

NAMES = ['vision_ttt_tiny', 'vision_ttt_small', 'vision_ttt_base']
WIDTHS = {'vision_ttt_tiny': (192, 3, 64), 'vision_ttt_small': (384, 6, 128), 'vision_ttt_base': (768, 12, 256)}
MB = 5  # mini-batch size of the shared models: a 64×64 image (16 tokens) is 4 mini-batches, the last one of 1

# --------------------------------------------------------------------------- helpers / shared models


_SHARED = {}

_CONFIGS = {
    'avg': dict(mixer_kwargs=dict(mini_batch_size=MB)),
    'token': dict(global_pool='token', mixer_kwargs=dict(mini_batch_size=MB)),
}


def _build(name='vision_ttt_tiny', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _shared(key):
    """One eval-mode vision_ttt_tiny per configuration, for read-only tests (never put in train mode)."""
    if key not in _SHARED:
        _SHARED[key] = _build(**_CONFIGS[key])
    return _SHARED[key]


@pytest.fixture(scope='module', autouse=True)
def _release_shared():
    yield
    _SHARED.clear()


@pytest.fixture(params=list(_CONFIGS))
def tiny(request):
    return _shared(request.param)


_images, _ceil = images, ceil_div


def _grid(h, w):
    return _ceil(h, 16), _ceil(w, 16)


def _num_tokens(h, w):
    gh, gw = _grid(h, w)
    return gh * gw


def _assert_all_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f'entry {i}: {tuple(a.shape)} vs {tuple(e.shape)}'
        assert torch.equal(a, e), f'entry {i} differs by {(a - e).abs().max().item():.3g}'


def _mixers(m):
    return [mod for mod in m.modules() if isinstance(mod, VisionTTTMixer)]


# --------------------------------------------------------------------------- registry / defaults


def test_registered():
    listed = set(timm.list_models('vision_ttt*'))
    assert set(NAMES) <= listed
    for name in NAMES:
        assert timm.is_model(name)


@pytest.mark.parametrize('name', NAMES)
def test_architecture_defaults(name):
    """Width, heads and the default mini-batch size of each variant (depth=1 keeps the build cheap)."""
    dim, heads, mb = WIDTHS[name]
    m = _build(name, depth=1)
    assert isinstance(m, VisionTTT)
    assert m.num_features == m.head_hidden_size == m.embed_dim == dim
    assert m.num_prefix_tokens == 0 and m.cls_token is None and m.global_pool == 'avg'
    mixer = m.blocks[0].mixer
    assert (mixer.num_heads, mixer.head_dim, mixer.mini_batch_size) == (heads, 64, mb)
    assert (mixer.inner_kind, mixer.causal, mixer.scans, mixer.merge) == ('linear', False, ('forward', 'reverse'),
                                                                          'sum')
    # mixer_kwargs are merged into the variant's defaults, and an explicit mini_batch_size wins
    other = _build(name, depth=1, mixer_kwargs=dict(causal=True))
    assert (other.blocks[0].mixer.mini_batch_size, other.blocks[0].mixer.causal) == (mb, True)
    assert _build(name, depth=1, mixer_kwargs=dict(mini_batch_size=3)).blocks[0].mixer.mini_batch_size == 3


def test_full_depth_tiny_defaults():
    m = _shared('avg')
    assert len(m.blocks) == 12
    assert all(mx.mini_batch_size == MB for mx in _mixers(m)) and len(_mixers(m)) == 12
    assert m.num_classes == m.pretrained_cfg['num_classes'] == 1000


# --------------------------------------------------------------------------- forward


# 30, 21 and 20 tokens: none a multiple of the mini-batch size 8; 50×70 is padded to 64×80
SIZES = [(96, 80), (112, 48), (50, 70)]


@pytest.mark.parametrize('name', NAMES)
def test_forward_odd_sizes(name):
    m = _build(name, mixer_kwargs=dict(mini_batch_size=8))
    sizes = SIZES if name != 'vision_ttt_base' else SIZES[:1]  # base is ~10x tiny's cost: one size
    for h, w in sizes:
        assert _num_tokens(h, w) % 8 != 0
        x = _images(2, h, w, seed=h + w)
        with torch.no_grad():
            feats = m.forward_features(x)
            out = m.forward_head(feats)
        assert feats.shape == (2, _num_tokens(h, w), m.num_features)
        assert out.shape == (2, 1000)
        assert torch.isfinite(feats).all() and torch.isfinite(out).all()
        assert not torch.equal(out[0], out[1]), 'different images gave the same logits'


def test_forward_default_mini_batch_two_chunks():
    """vision_ttt_tiny with its default mini-batch 64 on 8×9 = 72 tokens: one full and one short mini-batch."""
    m = _build('vision_ttt_tiny')
    assert m.blocks[0].mixer.mini_batch_size == 64
    x = _images(1, 128, 144, seed=1)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (1, 72, 192)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- backward / training

BACKWARD_CONFIGS = {
    'tiny': dict(),
    'tiny_token': dict(global_pool='token'),
    'mlp_concat_causal': dict(mixer_kwargs=dict(inner='mlp', merge='concat', share_qk=False,
                                                scans=('forward', 'column'), causal=True)),
}


@pytest.mark.parametrize('config', list(BACKWARD_CONFIGS))
def test_backward_all_params_get_finite_grads(config):
    kwargs = copy.deepcopy(BACKWARD_CONFIGS[config])
    kwargs.setdefault('mixer_kwargs', {})['mini_batch_size'] = 4
    m = _build(num_classes=42, **kwargs).train()
    x = _images(2, 72, 40, seed=1).requires_grad_(True)  # 5×3 = 15 tokens (padded): mini-batches 4, 4, 4, 3
    target = torch.randn(2, 42)
    out = m(x)
    assert out.shape == (2, 42)
    (out * target).sum().backward()

    params = dict(m.named_parameters())
    if config == 'tiny_token':
        assert 'cls_token' in params
    if config == 'mlp_concat_causal':
        mixer = m.blocks[0].mixer
        assert mixer.inner_kind == 'mlp' and mixer.causal and mixer.merge_proj is not None
        assert not hasattr(mixer, 'qk') and hasattr(mixer, 'q') and hasattr(mixer, 'k')
        assert 'blocks.0.mixer.states.1.w2' in params
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert no_grad == [], f'parameters without gradient: {no_grad}'
    non_finite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert non_finite == [], f'non-finite gradients: {non_finite}'
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    # with class-token pooling only the class token of the last block reaches the loss, and prefix tokens skip
    # the Q/K convolutions: the last block's Q convolution (patch queries) cannot matter (its K convolution
    # does: patch keys train the state the class token reads)
    expected_zero = ['blocks.11.mixer.q_conv.weight', 'blocks.11.mixer.q_conv.bias'] if config == 'tiny_token' else []
    assert zero == expected_zero, f'identically zero gradients: {zero}'
    # the padded last row and column still reach the output
    assert torch.isfinite(x.grad).all()
    assert x.grad[:, :, -1, :].abs().sum() > 0 and x.grad[:, :, :, -1].abs().sum() > 0


def test_train_one_step_and_a_few():
    m = _build(num_classes=10, mixer_kwargs=dict(mini_batch_size=MB)).train()
    x = _images(4, 64, 64, seed=2)
    y = torch.tensor([0, 3, 7, 9])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}

    losses = []
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0:
            unchanged = [n for n, p in m.named_parameters() if torch.equal(p, before[n])]
            assert unchanged == [], f'one AdamW step left these parameters unchanged: {unchanged}'
            assert all(torch.isfinite(p).all() for p in m.parameters())
    with torch.no_grad():
        losses.append(nn.functional.cross_entropy(m(x), y).item())
    assert losses[1] < losses[0], losses
    assert losses[-1] < losses[0] - 0.1, f'loss on a fixed batch should drop: {losses}'


def test_grad_checkpointing_matches(monkeypatch):
    m = _build(num_classes=42, mixer_kwargs=dict(mini_batch_size=MB)).train()
    x = _images(2, 64, 48, seed=3)  # 4×3 = 12 tokens: mini-batches 5, 5, 2
    target = torch.randn(2, 42)

    ref_out, ref_grads, ck_out, ck_grads, calls, run = checkpointing_runs(m, x, target, monkeypatch)
    assert m.grad_checkpointing
    assert len(calls) == len(m.blocks) == 12, 'every block should run under torch.utils.checkpoint'

    assert torch.equal(ck_out, ref_out)
    assert ck_grads.keys() == ref_grads.keys()
    differ = [n for n in ref_grads if not torch.equal(ck_grads[n], ref_grads[n])]
    assert differ == [], f'gradients differ under checkpointing: {differ}'

    # no checkpointing without grad (eval under no_grad) nor after switching it off
    calls.clear()
    with torch.no_grad():
        m(x)
    assert calls == []
    m.set_grad_checkpointing(False)
    run()
    assert calls == []


# --------------------------------------------------------------------------- timm contract on tokens


def test_forward_features_and_head(tiny):
    p = tiny.num_prefix_tokens
    x = _images(2, 96, 80, seed=4)
    n = _num_tokens(96, 80)
    with torch.no_grad():
        out = tiny(x)
        feats = tiny.forward_features(x)
        logits = tiny.forward_head(feats)
        pre = tiny.forward_head(feats, pre_logits=True)
    assert feats.shape == (2, p + n, tiny.num_features)
    assert torch.equal(logits, out), 'forward != forward_head(forward_features)'
    assert out.shape == (2, 1000)
    assert pre.shape == (2, tiny.head_hidden_size) and tiny.head_hidden_size == tiny.num_features
    if tiny.global_pool == 'token':
        assert p == 1 and tiny.cls_token is not None
        assert torch.equal(pre, feats[:, 0])
    else:
        assert p == 0 and tiny.cls_token is None
        torch.testing.assert_close(pre, feats.mean(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(logits, tiny.head(pre), rtol=0, atol=0)


def test_class_token_reads_every_patch():
    """The class token is placed at the end of every scan: its output depends on the last patches of both the
    forward and the reverse raster order."""
    m = _shared('token')
    x = _images(1, 64, 64, seed=5)
    with torch.no_grad():
        ref = m.forward_features(x)[:, 0]
        for rows, cols in [(slice(0, 16), slice(0, 16)), (slice(48, 64), slice(48, 64))]:
            y = x.clone()
            y[:, :, rows, cols] = torch.randn_like(y[:, :, rows, cols])
            assert (m.forward_features(y)[:, 0] - ref).abs().max() > 1e-3


def test_reset_classifier(tiny):
    x = _images(2, 64, 48, seed=6)
    p, n = tiny.num_prefix_tokens, _num_tokens(64, 48)
    saved = tiny.head, tiny.global_pool, tiny.num_classes
    try:
        with torch.no_grad():
            feats = tiny.forward_features(x)
        tiny.reset_classifier(0)
        assert tiny.num_classes == 0 and isinstance(tiny.get_classifier(), nn.Identity)
        with torch.no_grad():
            pooled = tiny(x)
        assert pooled.shape == (2, tiny.num_features)

        tiny.reset_classifier(0, '')
        assert tiny.global_pool == ''
        with torch.no_grad():
            tokens = tiny(x)
        assert tokens.shape == (2, p + n, tiny.num_features)
        assert torch.equal(tokens, feats)

        tiny.reset_classifier(0, 'avg')
        with torch.no_grad():
            avg = tiny(x)
        torch.testing.assert_close(avg, feats[:, p:].mean(dim=1), rtol=0, atol=0)  # the class token is excluded

        if p:
            tiny.reset_classifier(0, 'token')
            with torch.no_grad():
                assert torch.equal(tiny(x), feats[:, 0])
        else:
            with pytest.raises(ValueError, match='token'):
                tiny.reset_classifier(0, 'token')
            assert tiny.global_pool == 'avg'

        tiny.reset_classifier(7)
        head = tiny.get_classifier()
        assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (tiny.num_features, 7)
        with torch.no_grad():
            assert tiny(x).shape == (2, 7)
        with pytest.raises(ValueError, match='global_pool'):
            tiny.reset_classifier(3, 'max')
        assert tiny.num_classes == 7
    finally:
        tiny.head, tiny.global_pool, tiny.num_classes = saved


def test_build_without_pooling_or_classifier():
    m = _build(global_pool='', num_classes=0, depth=2)
    assert m.num_prefix_tokens == 0 and isinstance(m.get_classifier(), nn.Identity)
    assert not any(k.startswith('head.') for k in m.state_dict())
    x = _images(2, 64, 48, seed=7)
    with torch.no_grad():
        out = m(x)
        feats = m.forward_features(x)
    assert out.shape == (2, 12, 192)
    assert torch.equal(out, feats)


def test_default_cfg(tiny):
    cfg = tiny.pretrained_cfg
    assert cfg['architecture'] == 'vision_ttt_tiny'
    for key in ('input_size', 'crop_pct', 'mean', 'std', 'first_conv', 'classifier', 'num_classes'):
        assert key in cfg, f'pretrained_cfg lacks {key!r}'
    assert cfg.get('pool_size') is None, 'a token model has no pool_size'
    assert not cfg['fixed_input_size']
    sd = tiny.state_dict()
    first_conv, classifier = cfg['first_conv'] + '.weight', cfg['classifier'] + '.weight'
    assert first_conv in sd and sd[first_conv].shape == (192, 3, 16, 16)
    assert classifier in sd and sd[classifier].shape == (cfg['num_classes'], tiny.num_features)
    assert tiny.get_submodule(cfg['classifier']) is tiny.get_classifier()


def test_no_weight_decay(tiny):
    nwd = tiny.no_weight_decay()
    assert isinstance(nwd, set)
    names = {n for n, _ in tiny.named_parameters()}
    assert nwd <= names


# --------------------------------------------------------------------------- features_only / intermediates


def test_features_only_default():
    fm = _build(features_only=True, mixer_kwargs=dict(mini_batch_size=MB))
    assert isinstance(fm, FeatureGetterNet)
    assert list(fm.out_indices) == [2, 5, 8, 11]
    assert fm.feature_info.channels() == [192] * 4
    assert fm.feature_info.reduction() == [16] * 4

    x = _images(2, 100, 76, seed=8)  # 7×5 = 35 tokens, padded
    with torch.no_grad():
        feats = fm(x)
    assert isinstance(feats, list) and len(feats) == 4
    for f in feats:
        assert f.shape == (2, 192, 7, 5)

    # same values as the full model's intermediates with the same weights (only norm/head are left over)
    reference = _shared('avg')
    result = fm.model.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(k.startswith(('norm.', 'head.')) for k in result.unexpected_keys), result.unexpected_keys
    with torch.no_grad():
        feats = fm(x)
        expected = reference.forward_intermediates(x, indices=[2, 5, 8, 11], intermediates_only=True)
    _assert_all_equal(feats, expected)


def test_features_only_out_indices():
    fm = _build(features_only=True, out_indices=(1, -8), global_pool='token', mixer_kwargs=dict(mini_batch_size=MB))
    assert list(fm.out_indices) == [1, 4]
    assert len(fm.model.blocks) == 5, 'blocks after the last wanted index should be pruned'
    assert fm.feature_info.channels() == [192, 192] and fm.feature_info.reduction() == [16, 16]
    reference = _shared('token')
    result = fm.model.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(re.match(r'(norm|head)\.|blocks\.([5-9]|1[01])\.', k) for k in result.unexpected_keys)
    x = _images(2, 48, 33, seed=9)
    with torch.no_grad():
        feats = fm(x)
        expected = reference.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    assert [f.shape for f in feats] == [(2, 192, 3, 3)] * 2  # the class token is not in the maps
    _assert_all_equal(feats, expected)


def test_forward_intermediates(tiny):
    p = tiny.num_prefix_tokens
    x = _images(2, 64, 48, seed=10)
    n = _num_tokens(64, 48)
    with torch.no_grad():
        feats = tiny.forward_features(x)
        final, inter = tiny.forward_intermediates(x)
        only = tiny.forward_intermediates(x, intermediates_only=True)
        nhwc = tiny.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        nlc = tiny.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
        last2 = tiny.forward_intermediates(x, indices=2, intermediates_only=True)
        early_final, early = tiny.forward_intermediates(x, indices=[0, 1], stop_early=True)
        normed = tiny.forward_intermediates(x, indices=[11], norm=True, output_fmt='NLC', intermediates_only=True)

    assert torch.equal(final, feats), 'final output of forward_intermediates != forward_features'
    assert final.shape == (2, p + n, 192)
    assert isinstance(inter, list) and len(inter) == 12
    for t in inter:
        assert t.shape == (2, 192, 4, 3)
    _assert_all_equal(only, inter)
    _assert_all_equal(nhwc, [t.permute(0, 2, 3, 1) for t in inter])
    _assert_all_equal(nlc, [t.flatten(2).transpose(1, 2) for t in inter])
    assert all(t.shape == (2, n, 192) for t in nlc), 'intermediates must exclude the class token'
    _assert_all_equal(last2, inter[-2:])
    _assert_all_equal(early, inter[:2])
    assert early_final.shape == (2, p + n, 192)
    assert torch.equal(early_final[:, p:], tiny.norm(early[1].flatten(2).transpose(1, 2)))
    # the final norm applied to the last block's patch tokens is forward_features without the prefix
    assert torch.equal(normed[0], feats[:, p:])


def test_forward_intermediates_bad_format():
    with pytest.raises(ValueError, match='output_fmt'):
        _shared('avg').forward_intermediates(_images(1, 32, 32), output_fmt='NCL')


def test_prune_intermediate_layers():
    reference = _shared('token')
    m = copy.deepcopy(reference)
    take = m.prune_intermediate_layers([1])
    assert list(take) == [1] and len(m.blocks) == 2
    x = _images(2, 64, 48, seed=11)
    with torch.no_grad():
        pruned = m.forward_intermediates(x, indices=[1], intermediates_only=True)
        expected = reference.forward_intermediates(x, indices=[1], intermediates_only=True)
        out = m(x)
    _assert_all_equal(pruned, expected)
    assert out.shape == (2, 1 + 12, 192), 'the pruned head should give unpooled tokens'


# --------------------------------------------------------------------------- group_matcher


def test_group_matcher(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    for coarse in (False, True):
        gm = tiny.group_matcher(coarse=coarse)
        assert 'stem' in gm and 'blocks' in gm
        groups = group_parameters(tiny, gm)
        flat = [n for g in groups.values() for n in g]
        assert sorted(flat) == sorted(names), 'every parameter must be in exactly one group'
        assert len(groups) == 1 + 12 + 1  # stem, one per block (the final norm joins the last), head
        stem = {'patch_embed.proj.weight', 'patch_embed.proj.bias'}
        if tiny.num_prefix_tokens:
            stem.add('cls_token')
        assert set(groups[min(groups)]) == stem
        assert set(groups[max(groups)]) == {'head.weight', 'head.bias'}
        for i in range(12):
            block = [n for n in names if n.startswith(f'blocks.{i}.')]
            assert any(set(block) <= set(g) for g in groups.values()), f'block {i} is split over groups'
        rev = group_parameters(tiny, gm, reverse=True)
        order = [rev[n] for n in names]
        assert order == sorted(order), 'group ids must not decrease along the network'


# --------------------------------------------------------------------------- any resolution


def test_resolution_sequence_has_no_state(tiny):
    sizes = [(64, 64), (112, 48), (33, 47), (64, 64)]
    xs = {s: _images(2, *s, seed=sum(s)) for s in sizes}
    outs = []
    with torch.no_grad():
        for s in sizes:
            feats = tiny.forward_features(xs[s])
            assert feats.shape == (2, tiny.num_prefix_tokens + _num_tokens(*s), 192)
            out = tiny.forward_head(feats)
            assert out.shape == (2, 1000) and torch.isfinite(out).all()
            outs.append(out)
    assert torch.equal(outs[0], outs[-1])
    # a model that has only ever seen 112×48 gives the same result there
    fresh = _build(**_CONFIGS['token' if tiny.num_prefix_tokens else 'avg'])
    with torch.no_grad():
        assert torch.equal(fresh(xs[(112, 48)]), outs[1])


def test_padding_is_zero_padding():
    """Sides that are not multiples of 16 behave as if zero-padded on the right/bottom."""
    m = _shared('avg')
    x = _images(2, 33, 47, seed=12)
    padded = nn.functional.pad(x, (0, 48 - 47, 0, 48 - 33))
    with torch.no_grad():
        a, b = m.forward_features(x), m.forward_features(padded)
    assert a.shape == b.shape == (2, 9, 192)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('size, grid', [((16, 16), (1, 1)), ((16, 40), (1, 3)), ((40, 17), (3, 2))])
def test_smallest_inputs(size, grid):
    m = _shared('token')
    with torch.no_grad():
        feats = m.forward_features(_images(2, *size, seed=13))
        inter = m.forward_intermediates(_images(2, *size, seed=13), indices=[11], intermediates_only=True)
    assert feats.shape == (2, 1 + grid[0] * grid[1], 192)
    assert inter[0].shape == (2, 192, *grid)
    assert torch.isfinite(feats).all()


# --------------------------------------------------------------------------- batch independence


def test_batch_independence(tiny):
    x = _images(3, 64, 64, seed=14)
    changed = x.clone()
    torch.manual_seed(15)
    changed[2] = torch.randn_like(changed[2])
    tol = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = tiny(x)
        singles = [tiny(x[i:i + 1]) for i in range(3)]
        out_changed = tiny(changed)
        feats = tiny.forward_features(x)
        feats_changed = tiny.forward_features(changed)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], singles[i], **tol)
    torch.testing.assert_close(out_changed[:2], out[:2], **tol)
    torch.testing.assert_close(feats_changed[:2], feats[:2], **tol)
    assert (feats_changed[2] - feats[2]).abs().max() > 0.1, 'the changed image should change its own output'


# --------------------------------------------------------------------------- errors


METHODS = ['forward', 'forward_features', 'forward_intermediates']


def _call(m, method, x):
    with torch.no_grad():
        return getattr(m, method)(x)


@pytest.mark.parametrize('method', METHODS)
def test_wrong_channel_count(method):
    with pytest.raises(ValueError, match='channel'):
        _call(_shared('avg'), method, torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r'3-channel.*got 4 channels'):
        _call(_shared('token'), method, torch.zeros(1, 4, 64, 64))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('size', [(8, 8), (8, 64), (64, 15)], ids=lambda s: f'{s[0]}x{s[1]}')
def test_too_small(size, method):
    with pytest.raises(ValueError, match=r'\b16\b'):
        _call(_shared('avg'), method, torch.zeros(1, 3, *size))


@pytest.mark.parametrize('shape', [(3, 64, 64), (2, 3, 1, 64, 64)], ids=['3d', '5d'])
def test_wrong_ndim(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        _call(_shared('avg'), 'forward', torch.zeros(shape))


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


def test_rmsnorm_builds_and_runs():
    m = _build(norm='rmsnorm', depth=3, mixer_kwargs=dict(mini_batch_size=MB))
    norms = [m.norm] + [mod for b in m.blocks for mod in (b.norm1, b.norm2)]
    assert all(isinstance(mod, RmsNorm) for mod in norms)
    assert not any(isinstance(mod, nn.LayerNorm) for b in m.blocks for mod in (b.norm1, b.norm2))
    x = _images(2, 64, 48, seed=16)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (2, 12, 192) and out.shape == (2, 1000)
    assert torch.isfinite(out).all() and not torch.equal(out[0], out[1])
    m.train()
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_optional_parts_switched_off():
    """qk_conv_kernel=0, share_state, learnable_lr=False, gate=False drop their parameters and still run."""
    m = _build(depth=2, mixer_kwargs=dict(mini_batch_size=MB, qk_conv_kernel=0, share_state=True,
                                          learnable_lr=False, gate=False, scans=('forward', 'column_reverse'),
                                          merge='mean'))
    names = {n for n, _ in m.named_parameters()}
    for part in ('q_conv', 'k_conv', 'lr_proj', 'gate', 'states.1', 'merge_proj'):
        assert not any(f'.mixer.{part}.' in n for n in names), part
    assert 'blocks.0.mixer.states.0.w' in names
    with torch.no_grad():
        out = m(_images(2, 80, 48, seed=17))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- mini-batch size


def test_mini_batch_size_changes_output_up_to_n():
    x = _images(2, 64, 64, seed=18)  # 16 tokens
    outs, states = {}, {}
    for b in (4, 16, 17, 1000):
        m = _build(mixer_kwargs=dict(mini_batch_size=b))
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


def test_mixer_causal_and_minibatch_dependence():
    """On one forward scan without the Q/K convolution, token i's output reads only earlier mini-batches and
    (causal) earlier tokens of its own, or (non-causal) its whole mini-batch."""
    torch.manual_seed(0)
    grid, n = (3, 4), 12
    x = torch.randn(1, n, 32)
    y = x.clone()
    y[:, 6] += torch.randn(32)  # token 6 sits in mini-batch [4, 8)
    for causal in (False, True):
        torch.manual_seed(1)
        mixer = VisionTTTMixer(32, 2, mini_batch_size=4, causal=causal, qk_conv_kernel=0, scans=('forward',)).eval()
        with torch.no_grad():
            diff = (mixer(x, grid) - mixer(y, grid)).abs().amax(dim=-1)[0]
        assert torch.all(diff[:4] == 0), 'earlier mini-batches must not see a later token'
        first_affected = 6 if causal else 4
        assert torch.all(diff[:first_affected] == 0)
        assert torch.all(diff[first_affected:] > 0), diff
