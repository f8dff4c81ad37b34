"""timm model-API contract of the registered ViT³ / H-ViT³ models (after timm's tests/test_models.py).

CPU only and kept cheap: every registered model is built once (module-scoped fixture, eval mode, never put in
train mode), inputs are small, and the tests that need training, several builds or large inputs run on the tiny
(or otherwise cheap) variants only.
"""
import copy
import re

import pytest
import torch
from torch import nn

import vittt  # noqa: F401  (registers the models; must be imported before timm/torchvision)
import timm  # noqa: E402
from timm.models import group_parameters  # noqa: E402
from timm.models._features import FeatureGetterNet  # noqa: E402

from vittt.models import HViT3, ViT3  # noqa: E402
from helpers import checkpointing_runs, ceil_div, images

ALL = ['vit3_tiny', 'vit3_small', 'vit3_base', 'hvit3_tiny', 'hvit3_small', 'hvit3_base']
CHEAP = ['vit3_tiny', 'vit3_small', 'hvit3_tiny']  # kept alive for the whole module
TINY = ['vit3_tiny', 'hvit3_tiny']

# --------------------------------------------------------------------------- helpers

_SHARED = {}


def _build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _shared(name):
    """The one eval-mode instance of ``name`` used by the read-only tests (never switched to train mode)."""
    if name not in _SHARED:
        _SHARED[name] = _build(name)
    return _SHARED[name]


@pytest.fixture(scope='module', autouse=True)
def _release_shared():
    yield
    _SHARED.clear()


@pytest.fixture(scope='module', params=ALL)
def model(request):
    """Every registered model, built once per module; the large ones are released after their tests."""
    if request.param in CHEAP:
        yield _shared(request.param)
    else:
        m = _build(request.param)
        yield m
        del m


@pytest.fixture(params=CHEAP)
def cheap_model(request):
    return _shared(request.param)


@pytest.fixture(params=TINY)
def tiny_model(request):
    return _shared(request.param)


_images, _ceil = images, ceil_div


def _reduction(model):
    return model.feature_info[-1]['reduction']


def _assert_all_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f'entry {i}: {tuple(a.shape)} vs {tuple(e.shape)}'
        assert torch.equal(a, e), f'entry {i} differs by {(a - e).abs().max().item():.3g}'


# --------------------------------------------------------------------------- registry


def test_list_models():
    vit3 = set(timm.list_models('vit3*'))
    hvit3 = set(timm.list_models('hvit3*'))
    assert {'vit3_tiny', 'vit3_small', 'vit3_base'} <= vit3
    assert {'hvit3_tiny', 'hvit3_small', 'hvit3_base'} <= hvit3
    assert not any(n.startswith('hvit3') for n in vit3)
    for name in ALL:
        assert timm.is_model(name)


def test_model_classes(model):
    name = model.pretrained_cfg['architecture']
    assert name in ALL
    assert isinstance(model, HViT3 if name.startswith('hvit3') else ViT3)
    assert model.num_classes == model.pretrained_cfg['num_classes'] == 1000


# --------------------------------------------------------------------------- forward / head


def test_forward_small(model):
    x = _images(2, 32, 48)
    r = _reduction(model)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1]), 'different images gave the same logits'
    assert feats.shape == (2, model.num_features, _ceil(32, r), _ceil(48, r))
    assert torch.equal(logits, out), 'forward != forward_head(forward_features)'
    assert model.head_hidden_size == model.num_features
    assert pre.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))


@pytest.mark.parametrize('name', CHEAP)
def test_backward_all_params_get_finite_grads(name):
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=42).train()
    x = _images(2, 64, 48, seed=1)
    target = torch.randn(2, 42)
    out = m(x)
    assert out.shape == (2, 42)
    (out * target).sum().backward()
    params = dict(m.named_parameters())
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert no_grad == [], f'parameters without gradient: {no_grad}'
    non_finite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert non_finite == [], f'non-finite gradients: {non_finite}'
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    assert zero == [], f'identically zero gradients: {zero}'


@pytest.mark.parametrize('name', TINY)
def test_grad_checkpointing_matches(name, monkeypatch):
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=42, drop_path_rate=0.0).train()
    x = _images(2, 64, 48, seed=2)
    target = torch.randn(2, 42)

    ref_out, ref_grads, ck_out, ck_grads, calls, run = checkpointing_runs(m, x, target, monkeypatch)
    n_blocks = sum(1 for mod in m.modules() if type(mod).__name__ == 'TTTBlock')
    assert len(calls) == n_blocks, 'every block should run under torch.utils.checkpoint'
    if isinstance(m, HViT3):
        assert all(stage.grad_checkpointing for stage in m.layers)

    torch.testing.assert_close(ck_out, ref_out, rtol=1e-4, atol=1e-5)
    assert ck_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(ck_grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=lambda s: f'{n}: {s}')

    m.set_grad_checkpointing(False)
    calls.clear()
    run()
    assert calls == []


# --------------------------------------------------------------------------- default cfg


def test_default_cfg(model):
    cfg = model.pretrained_cfg
    for key in ('input_size', 'pool_size', 'crop_pct', 'mean', 'std', 'first_conv', 'classifier', 'num_classes'):
        assert key in cfg, f'pretrained_cfg lacks {key!r}'
    assert len(cfg['input_size']) == 3 and cfg['input_size'][0] == 3
    assert len(cfg['mean']) == len(cfg['std']) == 3
    assert 0 < cfg['crop_pct'] <= 1
    r = _reduction(model)
    assert tuple(cfg['pool_size']) == tuple(_ceil(s, r) for s in cfg['input_size'][1:])

    sd = model.state_dict()
    first_conv = cfg['first_conv'] + '.weight'
    classifier = cfg['classifier'] + '.weight'
    assert first_conv in sd
    assert sd[first_conv].ndim == 4 and sd[first_conv].shape[1] == cfg['input_size'][0]
    assert classifier in sd
    assert sd[classifier].shape == (cfg['num_classes'], model.num_features)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()


def test_forward_features_at_cfg_input_size(tiny_model):
    cfg = tiny_model.pretrained_cfg
    x = _images(1, *cfg['input_size'][1:])
    with torch.no_grad():
        feats = tiny_model.forward_features(x)
    assert feats.shape == (1, tiny_model.num_features, *cfg['pool_size'])
    assert torch.isfinite(feats).all()


def test_reset_classifier(model):
    x = _images(2, 32, 32, seed=3)
    saved = model.head, model.global_pool, model.num_classes
    try:
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert isinstance(model.get_classifier(), nn.Identity)
        with torch.no_grad():
            pooled = model(x)
        assert pooled.shape == (2, model.num_features)

        model.reset_classifier(0, '')
        with torch.no_grad():
            unpooled = model(x)
        r = _reduction(model)
        assert unpooled.shape == (2, model.num_features, _ceil(32, r), _ceil(32, r))
        torch.testing.assert_close(unpooled.mean(dim=(2, 3)), pooled)

        model.reset_classifier(7, 'avg')
        head = model.get_classifier()
        assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (model.num_features, 7)
        with torch.no_grad():
            assert model(x).shape == (2, 7)

        with pytest.raises(ValueError, match='global_pool'):
            model.reset_classifier(3, 'max')
        assert model.global_pool == 'avg' and model.num_classes == 7
    finally:
        model.head, model.global_pool, model.num_classes = saved


def test_no_weight_decay_and_get_classifier(model):
    nwd = model.no_weight_decay()
    assert isinstance(nwd, set)
    param_names = {n for n, _ in model.named_parameters()}
    assert all(isinstance(n, str) for n in nwd)
    assert nwd <= param_names | {n.rsplit('.', 1)[0] for n in param_names}
    head = model.get_classifier()
    assert head is model.head
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (model.num_features, model.num_classes)


@pytest.mark.parametrize('name', CHEAP)
def test_create_model_without_classifier(name):
    m = _build(name, num_classes=0)
    assert m.num_classes == 0
    assert isinstance(m.get_classifier(), nn.Identity)
    assert not any(k.startswith('head.') for k in m.state_dict())
    x = _images(2, 32, 48, seed=4)
    with torch.no_grad():
        out = m(x)
        feats = m.forward_features(x)
    assert out.shape == (2, m.num_features)
    torch.testing.assert_close(out, feats.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- features_only


def _expected_feature_layout(name):
    if name.startswith('hvit3'):
        return [0, 1, 2, 3], [64, 128, 320, 512], [4, 8, 16, 32]
    return [2, 5, 8, 11], [192] * 4, [16] * 4


def _load_into_feature_model(fm, reference, pruned=()):
    """Give the feature model the reference model's weights; only the pruned parts (final norm, head and the
    given prefixes) may be left over."""
    result = fm.model.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == []
    allowed = ('norm.', 'head.') + tuple(pruned)
    assert all(k.startswith(allowed) for k in result.unexpected_keys), result.unexpected_keys


@pytest.mark.parametrize('name', TINY)
def test_features_only_default(name):
    torch.manual_seed(0)
    fm = timm.create_model(name, features_only=True).eval()
    assert isinstance(fm, FeatureGetterNet)
    indices, channels, reductions = _expected_feature_layout(name)
    assert list(fm.out_indices) == indices
    assert fm.feature_info.channels() == channels
    assert fm.feature_info.reduction() == reductions

    x = _images(2, 100, 76, seed=5)
    with torch.no_grad():
        feats = fm(x)
    assert isinstance(feats, list)
    assert len(feats) == len(channels)
    for f, c, r in zip(feats, channels, reductions):
        assert f.shape == (2, c, _ceil(100, r), _ceil(76, r))

    # same values as the full model's intermediates with the same weights
    reference = _shared(name)
    _load_into_feature_model(fm, reference)
    with torch.no_grad():
        feats = fm(x)
        expected = reference.forward_intermediates(x, indices=indices, intermediates_only=True)
    _assert_all_equal(feats, expected)


@pytest.mark.parametrize('name, out_indices, expected_indices, channels, reductions, pruned', [
    ('vit3_tiny', (3, -1), [3, 11], [192, 192], [16, 16], ()),
    ('hvit3_tiny', (0, 2), [0, 2], [64, 320], [4, 16], ('layers.3.', 'layers.2.downsample.')),
])
def test_features_only_out_indices(name, out_indices, expected_indices, channels, reductions, pruned):
    torch.manual_seed(0)
    fm = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    assert list(fm.out_indices) == expected_indices
    assert fm.feature_info.channels() == channels
    assert fm.feature_info.reduction() == reductions
    if name.startswith('hvit3'):
        assert len(fm.model.layers) == 3, 'stages after the last wanted index should be pruned'

    reference = _shared(name)
    _load_into_feature_model(fm, reference, pruned)
    x = _images(2, 100, 76, seed=6)
    with torch.no_grad():
        feats = fm(x)
        expected = reference.forward_intermediates(x, indices=expected_indices, intermediates_only=True)
    assert isinstance(feats, list) and len(feats) == len(channels)
    for f, c, r in zip(feats, channels, reductions):
        assert f.shape == (2, c, _ceil(100, r), _ceil(76, r))
    _assert_all_equal(feats, expected)


# --------------------------------------------------------------------------- forward_intermediates


def test_forward_intermediates(cheap_model):
    m = cheap_model
    n = len(m.feature_info)
    x = _images(2, 64, 48, seed=7)
    with torch.no_grad():
        feats = m.forward_features(x)
        final, inter = m.forward_intermediates(x)
        only = m.forward_intermediates(x, intermediates_only=True)
        nhwc = m.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = m.forward_intermediates(x, indices=[0, n - 2], intermediates_only=True)
        early_only = m.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        early_final, early = m.forward_intermediates(x, indices=[0, 1], stop_early=True)
        if isinstance(m, ViT3):
            assert torch.equal(early_final, m.norm(early[1].flatten(2).transpose(1, 2)).transpose(1, 2).reshape(
                early[1].shape))
        else:
            # stopped before the last stage: the final map is stage 1's output, neither merged nor normalised
            assert torch.equal(early_final, early[1])
        normed = m.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)

    assert torch.equal(final, feats), 'final output of forward_intermediates != forward_features'
    assert isinstance(inter, list) and len(inter) == n
    for t, info in zip(inter, m.feature_info):
        assert t.shape == (2, info['num_chs'], _ceil(64, info['reduction']), _ceil(48, info['reduction']))

    assert isinstance(only, list)
    _assert_all_equal(only, inter)
    _assert_all_equal(nhwc, [t.permute(0, 2, 3, 1) for t in inter])
    _assert_all_equal(last2, inter[-2:])
    _assert_all_equal(picked, [inter[0], inter[n - 2]])
    _assert_all_equal(early_only, inter[:2])
    _assert_all_equal(early, inter[:2])
    # the final norm applied to the last intermediate is forward_features
    assert len(normed) == 1
    torch.testing.assert_close(normed[0], feats, rtol=0, atol=0)


def test_forward_intermediates_nlc_vit3():
    m = _shared('vit3_tiny')
    x = _images(2, 64, 48, seed=8)
    with torch.no_grad():
        nchw = m.forward_intermediates(x, indices=[4], intermediates_only=True)[0]
        nlc = m.forward_intermediates(x, indices=[4], output_fmt='NLC', intermediates_only=True)[0]
    assert nlc.shape == (2, 4 * 3, 192)
    assert torch.equal(nlc, nchw.flatten(2).transpose(1, 2))


def test_forward_intermediates_bad_format(tiny_model):
    with pytest.raises(ValueError, match='output_fmt'):
        tiny_model.forward_intermediates(_images(1, 32, 32), output_fmt='NCL')


@pytest.mark.parametrize('name', TINY)
def test_prune_intermediate_layers(name):
    reference = _shared(name)
    m = copy.deepcopy(reference)
    x = _images(2, 64, 48, seed=9)
    take = m.prune_intermediate_layers([1])
    assert list(take) == [1]
    if isinstance(m, HViT3):
        assert len(m.layers) == 2 and m.layers[-1].downsample is None
        assert m.num_features == 128
    else:
        assert len(m.blocks) == 2
    with torch.no_grad():
        pruned = m.forward_intermediates(x, indices=[1], intermediates_only=True)
        expected = reference.forward_intermediates(x, indices=[1], intermediates_only=True)
        out = m(x)
    _assert_all_equal(pruned, expected)
    assert out.ndim == 4 and out.shape[1] == m.num_features, 'the pruned head should give unpooled features'


# --------------------------------------------------------------------------- optimizer-facing API


def _patterns(matcher):
    out = []
    for spec in matcher.values():
        if spec is None:
            continue
        if isinstance(spec, str):
            out.append(spec)
        else:
            out.extend(s[0] for s in spec)
    return out


def _expected_num_groups(model):
    if isinstance(model, HViT3):
        # stem, every block, the merges between stages, the head (final norm joins the last block)
        return 1 + sum(len(s.blocks) for s in model.layers) + (len(model.layers) - 1) + 1
    return 1 + len(model.blocks) + 1


def test_group_matcher(model):
    gm = model.group_matcher()
    assert isinstance(gm, dict)
    assert 'stem' in gm and 'blocks' in gm
    names = [n for n, _ in model.named_parameters()]
    head_prefix = model.pretrained_cfg['classifier'] + '.'

    patterns = _patterns(gm)
    unmatched = [n for n in names if not n.startswith(head_prefix) and not any(re.match(p, n) for p in patterns)]
    assert unmatched == [], f'parameters no group pattern matches: {unmatched}'

    groups = group_parameters(model, gm)
    flat = [n for g in groups.values() for n in g]
    assert sorted(flat) == sorted(names), 'every parameter must be in exactly one group'
    assert len(groups) == _expected_num_groups(model)
    stem = [n for n in names if n.startswith('patch_embed.')]
    assert sorted(groups[min(groups)]) == sorted(stem)
    assert all(n.startswith(head_prefix) for n in groups[max(groups)])

    # group ids never decrease along the network (layer-wise lr decay relies on it)
    rev = group_parameters(model, gm, reverse=True)
    ids = [rev[n] for n in names]
    assert ids == sorted(ids)


def test_group_matcher_coarse(model):
    gm = model.group_matcher(coarse=True)
    assert 'stem' in gm and 'blocks' in gm
    names = [n for n, _ in model.named_parameters()]
    groups = group_parameters(model, gm)
    assert sorted(n for g in groups.values() for n in g) == sorted(names)
    rev = group_parameters(model, gm, reverse=True)
    ids = [rev[n] for n in names]
    assert ids == sorted(ids)
    if isinstance(model, HViT3):
        assert len(groups) == 1 + len(model.layers) + 1  # stem, one per stage, norm + head


def test_feature_info_and_widths(model):
    info = model.feature_info
    assert isinstance(info, list) and all({'num_chs', 'reduction', 'module'} <= set(i) for i in info)
    assert info[-1]['num_chs'] == model.num_features
    for i in info:
        model.get_submodule(i['module'])  # names a real module
    if isinstance(model, HViT3):
        assert [i['reduction'] for i in info] == [4, 8, 16, 32]
    else:
        assert len(info) == len(model.blocks) and {i['reduction'] for i in info} == {16}


@pytest.mark.parametrize('name', ['vit3_tiny', 'vision_ttt_tiny'])
@pytest.mark.parametrize('depth,expected', [(1, (0,)), (2, (0, 1)), (3, (0, 1, 2)), (12, (2, 5, 8, 11))])
def test_default_feature_taps_of_shallow_plain_models(name, depth, expected):
    fm = timm.create_model(name, depth=depth, features_only=True)
    assert tuple(fm.feature_info.out_indices) == expected
    assert len(fm(torch.randn(1, 3, 32, 48))) == len(expected) == len(fm.feature_info.channels())
