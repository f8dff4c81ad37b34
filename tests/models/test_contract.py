"""timm model contract of every registered model of ours (after timm's tests/test_models.py): ViT³ ``vit3_*``,
H-ViT³ ``hvit3_*`` and Vision-TTT ``vision_ttt_*``, one set of tests over the registry.

What differs between the families is written down once, in ``FAMILIES`` below (output format of
``forward_features``, feature taps and reductions, smallest input, stride, class token, parameter groups, ...); the
tests read their expectations from it. Family-specific behaviour lives elsewhere: tests/models/test_resolution.py
(ViT³ / H-ViT³ any-resolution details), tests/models/test_vision_ttt.py (mini-batch semantics, switches, ...).

CPU only and kept cheap: every registered model is built once (module-scoped, eval mode, never put in train mode);
the tiny ones are kept for the whole module (their BatchNorms calibrated on one batch, see ``calibrate_batchnorm``),
inputs are small, and the tests that train, build several models or compare precisions use ``tiny`` configurations
(1-2 blocks, narrow) or, where the registered architecture itself matters, the registered tiny models.
"""
import copy
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vittt  # noqa: F401  (registers the models; must be imported before timm/torchvision)
import timm  # noqa: E402
from timm.models import group_parameters  # noqa: E402
from timm.models._features import FeatureGetterNet  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from vittt.models import HViT3, ViT3, VisionTTT  # noqa: E402

MB = 8  # Vision-TTT mini-batch size in this module: the test inputs' token counts (6, 12, 15, 35) are not multiples

# --------------------------------------------------------------------------- per-family expectations

FAMILIES = {
    'vit3': dict(
        model_cls=ViT3,
        names=('vit3_tiny', 'vit3_small', 'vit3_base'),
        build={},                                   # kwargs of every build of this family here
        features='NCHW',                            # forward_features: [B, C, h, w] map, pooled by its mean
        intermediate_fmts=('NCHW', 'NHWC', 'NLC'),  # output_fmt values forward_intermediates takes
        class_token=False,                          # global_pool='token' (a class token) is not an option
        unit='blocks',                              # forward_intermediates / features_only index m.blocks
        feature_reductions=[16] * 12,               # feature_info reductions (one tap per block)
        default_out_indices=[2, 5, 8, 11],          # features_only default: the blocks ending each depth quarter
        # features_only=True, out_indices=...: (case, out_indices, taps, reductions, unit length after pruning,
        # left-over keys when loading the full model's weights)
        out_indices=('vit3_tiny', (3, -1), [3, 11], [16, 16], 12, r'(norm|head)\.'),
        min_size=16,                                # patch 16, stride 16; smaller inputs raise a ValueError naming 16
        too_small=[(8, 8), (8, 64), (64, 15)],
        smallest=[((16, 16), (1, 1)), ((16, 40), (1, 3))],  # (input size, final grid)
        first_conv_kernel=(16, 16),
        stem=('patch_embed.',),                     # group_matcher's first group: these parameter-name prefixes
        num_groups=lambda m, coarse: 1 + len(m.blocks) + 1,  # stem, one per block (the final norm joins the last), head
        norm_in_last_group=lambda coarse: False,    # whether the final norm sits with the head (group_matcher)
        stop_early_final='normed',                  # stop_early final output: the final norm of the last block run
        no_weight_decay=None,                       # nothing beyond timm's rule (1-D and .bias): W0 / CPE decayed
        no_decay=r'(^|\.)norm\d?\.|\.bias$',        # what must not be decayed: norms and biases
        must_decay=[r'\.attn\.inner\.0\.w1$', r'\.attn\.inner\.0\.w2$', r'\.attn\.inner\.1\.weight$',
                    r'\.cpe\.weight$'],             # W0 of both inner models, CPE kernels (the official recipe)
        tiny=dict(depth=2, embed_dim=48, num_heads=2),  # training-type tests
        num_blocks=lambda m: len(m.blocks),
    ),
    'hvit3': dict(
        model_cls=HViT3,
        names=('hvit3_tiny', 'hvit3_small', 'hvit3_base'),
        build={},
        features='NCHW',
        intermediate_fmts=('NCHW', 'NHWC'),
        class_token=False,
        unit='layers',                              # ... index the four stages (m.layers)
        feature_reductions=[4, 8, 16, 32],
        default_out_indices=[0, 1, 2, 3],
        out_indices=('hvit3_tiny', (0, 2), [0, 2], [4, 16], 3, r'(norm|head|layers\.3|layers\.2\.downsample)\.'),
        min_size=4,                                 # conv stem of stride 4, then three ÷2 merges (ceil)
        too_small=[(2, 2), (3, 64), (64, 3)],
        smallest=[((4, 4), (1, 1)), ((5, 9), (1, 1)), ((16, 40), (1, 2))],
        first_conv_kernel=(3, 3),
        stem=('patch_embed.',),
        # stem, every block, the merges between stages, head (final norm joins the last block); coarse: one per stage,
        # the final norm joins the head
        num_groups=lambda m, coarse: 1 + (len(m.layers) if coarse else
                                          sum(len(s.blocks) for s in m.layers) + len(m.layers) - 1) + 1,
        norm_in_last_group=lambda coarse: coarse,
        stop_early_final='raw',                     # ... the last stage run's output, neither merged nor normalised
        no_weight_decay=None,
        no_decay=r'(^|\.)norm\d?\.|\.bias$',
        must_decay=[r'\.attn\.inner\.0\.w1$', r'\.attn\.inner\.0\.w2$', r'\.attn\.inner\.1\.weight$',
                    r'\.cpe\.weight$'],
        tiny=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_heads=(1, 2, 2, 2)),
        num_blocks=lambda m: sum(len(s.blocks) for s in m.layers),
    ),
    'vision_ttt': dict(
        model_cls=VisionTTT,
        names=('vision_ttt_tiny', 'vision_ttt_small', 'vision_ttt_base'),
        build=dict(mixer_kwargs=dict(mini_batch_size=MB)),  # several mini-batches, the last one short
        features='NLC',                             # forward_features: tokens [B, P + N, C] (P = 1 with a class token)
        intermediate_fmts=('NCHW', 'NHWC', 'NLC'),  # patch tokens only (no class token in the maps)
        class_token=True,                           # global_pool='token' adds one
        unit='blocks',
        feature_reductions=[16] * 12,
        default_out_indices=[2, 5, 8, 11],
        out_indices=('vision_ttt_tiny-token', (1, -8), [1, 4], [16, 16], 5, r'(norm|head)\.|blocks\.([5-9]|1[01])\.'),
        min_size=16,
        too_small=[(8, 8), (8, 64), (64, 15)],
        smallest=[((16, 16), (1, 1)), ((16, 40), (1, 3)), ((40, 17), (3, 2))],
        first_conv_kernel=(16, 16),
        stem=('patch_embed.', 'cls_token'),
        num_groups=lambda m, coarse: 1 + len(m.blocks) + 1,
        norm_in_last_group=lambda coarse: False,
        stop_early_final='normed',
        no_weight_decay=r'^cls_token$|\.states\.\d+\.(b\d?|ln_weight|ln_bias)$',
        # norms, biases, the class token, and the inner models' initial bias and LayerNorm affine parameters (shaped
        # [heads, 1, d]: timm's 1-D rule does not see them)
        no_decay=r'(^|\.)(norm\d?|post_norm)\.|\.bias$|^cls_token$|\.states\.\d+\.(b\d?|ln_weight|ln_bias)$',
        must_decay=[r'\.mixer\.states\.\d+\.w$', r'\.mixer\.[qk]_conv\.weight$'],
        tiny=dict(depth=2, embed_dim=32, num_heads=2),
        num_blocks=lambda m: len(m.blocks),
    ),
}

# feature_info channels of each registered model (one entry per tap)
FEATURE_CHANNELS = {
    'vit3_tiny': [192] * 12, 'vit3_small': [384] * 12, 'vit3_base': [768] * 12,
    'hvit3_tiny': [64, 128, 320, 512], 'hvit3_small': [64, 128, 320, 512], 'hvit3_base': [96, 192, 448, 640],
    'vision_ttt_tiny': [192] * 12, 'vision_ttt_small': [384] * 12, 'vision_ttt_base': [768] * 12,
}
ALL = [name for fam in FAMILIES.values() for name in fam['names']]

# the models under test: every registered model, plus Vision-TTT's class-token variant
CASES = {name: (name, {}) for name in ALL}
CASES['vision_ttt_tiny-token'] = ('vision_ttt_tiny', dict(global_pool='token'))
CHEAP = ['vit3_tiny', 'vit3_small', 'hvit3_tiny', 'vision_ttt_tiny', 'vision_ttt_tiny-token']  # kept for the module
TINY = ['vit3_tiny', 'hvit3_tiny', 'vision_ttt_tiny', 'vision_ttt_tiny-token']
# parameters that get no gradient by design (checked as identically zero): with class-token pooling only the class
# token of the last block reaches the loss, and prefix tokens skip the Q/K convolutions, so the last block's Q
# convolution (patch queries) cannot matter (its K convolution does: patch keys train the state the class token reads)
ZERO_GRADS = {'vision_ttt_tiny-token': ['blocks.11.mixer.q_conv.weight', 'blocks.11.mixer.q_conv.bias']}
METHODS = ['forward', 'forward_features', 'forward_intermediates']


def family_of(name):
    return name.rsplit('_', 1)[0]  # 'vision_ttt_tiny' -> 'vision_ttt'


def _ceil(a, b):
    return -(-a // b)


def _build_args(case):
    name, kwargs = CASES[case]
    return name, dict(FAMILIES[family_of(name)]['build'], **kwargs)


def _tiny_args(family, **kwargs):
    fam = FAMILIES[family]
    return fam['names'][0], dict(fam['build'], **fam['tiny'], **kwargs)


@dataclass
class Subject:
    case: str
    model: nn.Module

    @property
    def name(self):
        return CASES[self.case][0]

    @property
    def fam(self):
        return FAMILIES[family_of(self.name)]

    @property
    def prefix(self):
        """Number of prefix (class) tokens in front of the patch tokens of ``forward_features``."""
        return getattr(self.model, 'num_prefix_tokens', 0)

    def features_shape(self, b, h, w):
        m = self.model
        r = m.feature_info[-1]['reduction']
        gh, gw = _ceil(h, r), _ceil(w, r)
        if self.fam['features'] == 'NCHW':
            return (b, m.num_features, gh, gw)
        return (b, self.prefix + gh * gw, m.num_features)

    def pool(self, feats, global_pool='avg'):
        """The head's pooling of ``forward_features``, spelled out."""
        if self.fam['features'] == 'NCHW':
            return feats.mean(dim=(2, 3))
        return feats[:, 0] if global_pool == 'token' else feats[:, self.prefix:].mean(dim=1)

    def patch_part(self, feats):
        """``forward_features`` without the prefix tokens (maps as they are)."""
        return feats if self.fam['features'] == 'NCHW' else feats[:, self.prefix:]


@pytest.fixture(scope='module')
def shared(build_model, calibrate_batchnorm):
    """``shared(case)``: the one eval-mode instance of ``case`` kept for the module (never put in train mode)."""
    cache = {}

    def get(case):
        if case not in cache:
            name, kwargs = _build_args(case)
            cache[case] = calibrate_batchnorm(build_model(name, **kwargs))
        return Subject(case, cache[case])

    yield get
    cache.clear()


@pytest.fixture(scope='module', params=list(CASES))
def subject(request, shared, build_model):
    """Every case, built once per module; the large ones are released after their tests."""
    if request.param in CHEAP:
        yield shared(request.param)
    else:
        name, kwargs = _build_args(request.param)
        s = Subject(request.param, build_model(name, **kwargs))
        yield s
        del s


@pytest.fixture(params=CHEAP)
def cheap(request, shared):
    return shared(request.param)


@pytest.fixture(params=TINY)
def tiny(request, shared):
    return shared(request.param)


# --------------------------------------------------------------------------- registry


#: registered models outside the per-family table: the design-space base (tests/models/test_design.py)
EXTRA = {'vit3': ['vit3_design_small']}


def test_registry_holds_exactly_our_models():
    listed = timm.list_models('vit3_*') + timm.list_models('hvit3_*') + timm.list_models('vision_ttt_*')
    extra = [name for names in EXTRA.values() for name in names]
    assert sorted(listed) == sorted(ALL + extra) and len(ALL) == len(set(ALL)) == 9
    for family, fam in FAMILIES.items():
        assert sorted(timm.list_models(f'{family}_*')) == sorted([*fam['names'], *EXTRA.get(family, [])])
        assert all(family_of(name) == family for name in fam['names'])
    for name in ALL:
        assert timm.is_model(name)


def test_model_classes(subject):
    m = subject.model
    assert type(m) is subject.fam['model_cls']
    assert m.pretrained_cfg['architecture'] == subject.name
    assert m.num_classes == m.pretrained_cfg['num_classes'] == 1000


# --------------------------------------------------------------------------- forward / head


def test_forward_and_head(subject, images):
    """40×56 is padded at /16 (12 tokens: Vision-TTT mini-batches 8 and 4)."""
    m, p = subject.model, subject.prefix
    x = images(2, 40, 56)
    with torch.no_grad():
        out = m(x)
        feats = m.forward_features(x)
        logits = m.forward_head(feats)
        pre = m.forward_head(feats, pre_logits=True)
    assert out.shape == (2, m.num_classes)
    assert torch.isfinite(out).all() and torch.isfinite(feats).all()
    assert not torch.equal(out[0], out[1]), 'different images gave the same logits'
    assert feats.shape == subject.features_shape(2, 40, 56)
    assert torch.equal(logits, out), 'forward != forward_head(forward_features)'
    assert m.head_hidden_size == m.num_features
    assert pre.shape == (2, m.head_hidden_size)
    assert torch.equal(pre, subject.pool(feats, m.global_pool))
    assert torch.equal(logits, m.head(pre))
    if m.global_pool == 'token':
        assert subject.fam['class_token'] and p == 1 and m.cls_token is not None
    else:
        assert p == 0 and getattr(m, 'cls_token', None) is None


@pytest.mark.parametrize('case', TINY)
def test_forward_features_at_cfg_input_size(case, shared, images):
    s = shared(case)
    cfg = s.model.pretrained_cfg
    x = images(1, *cfg['input_size'][1:])
    with torch.no_grad():
        feats = s.model.forward_features(x)
    assert feats.shape == s.features_shape(1, *cfg['input_size'][1:])
    if s.fam['features'] == 'NCHW':
        assert feats.shape[2:] == tuple(cfg['pool_size'])
    assert torch.isfinite(feats).all()


def test_default_cfg(subject):
    m = subject.model
    cfg = m.pretrained_cfg
    assert cfg['architecture'] == subject.name
    for key in ('input_size', 'crop_pct', 'mean', 'std', 'first_conv', 'classifier', 'num_classes'):
        assert key in cfg, f'pretrained_cfg lacks {key!r}'
    assert len(cfg['input_size']) == 3 and cfg['input_size'][0] == 3
    assert len(cfg['mean']) == len(cfg['std']) == 3
    assert 0 < cfg['crop_pct'] <= 1
    assert not cfg['fixed_input_size']
    if subject.fam['features'] == 'NCHW':
        r = m.feature_info[-1]['reduction']
        assert tuple(cfg['pool_size']) == tuple(_ceil(s, r) for s in cfg['input_size'][1:])
    else:
        assert cfg.get('pool_size') is None, 'a token model has no pool_size'

    sd = m.state_dict()
    first_conv, classifier = cfg['first_conv'] + '.weight', cfg['classifier'] + '.weight'
    assert first_conv in sd
    assert sd[first_conv].ndim == 4 and sd[first_conv].shape[1] == cfg['input_size'][0]
    assert tuple(sd[first_conv].shape[2:]) == subject.fam['first_conv_kernel']
    if subject.fam['unit'] == 'blocks':  # a patch embedding straight to the model width
        assert sd[first_conv].shape[0] == m.num_features
    assert classifier in sd and sd[classifier].shape == (cfg['num_classes'], m.num_features)
    assert m.get_submodule(cfg['classifier']) is m.get_classifier()


def test_reset_classifier(subject, images):
    """(Two full forwards; the other heads are checked on ``forward_head(forward_features(x))``, which is what
    forward runs: test_forward_and_head.)"""
    m, p = subject.model, subject.prefix
    x = images(2, 32, 48, seed=3)
    saved = m.head, m.global_pool, m.num_classes
    try:
        with torch.no_grad():
            feats = m.forward_features(x)
        m.reset_classifier(0)
        assert m.num_classes == 0 and isinstance(m.get_classifier(), nn.Identity)
        with torch.no_grad():
            pooled = m.forward_head(feats)
        assert pooled.shape == (2, m.num_features)
        assert torch.equal(pooled, subject.pool(feats, saved[1]))

        m.reset_classifier(0, '')
        assert m.global_pool == ''
        with torch.no_grad():
            unpooled = m(x)
        assert unpooled.shape == subject.features_shape(2, 32, 48)
        assert torch.equal(unpooled, feats)

        m.reset_classifier(0, 'avg')
        with torch.no_grad():
            avg = m.forward_head(feats)
        assert torch.equal(avg, subject.pool(feats, 'avg'))  # a class token is excluded from the mean

        if p:
            m.reset_classifier(0, 'token')
            with torch.no_grad():
                assert torch.equal(m.forward_head(feats), feats[:, 0])
            m.reset_classifier(0, 'avg')
        else:
            with pytest.raises(ValueError, match='token'):
                m.reset_classifier(0, 'token')
            assert m.global_pool == 'avg'

        m.reset_classifier(7)
        head = m.get_classifier()
        assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (m.num_features, 7)
        with torch.no_grad():
            assert m.forward_head(feats).shape == (2, 7)

        with pytest.raises(ValueError, match='global_pool'):
            m.reset_classifier(3, 'max')
        assert m.global_pool == 'avg' and m.num_classes == 7
    finally:
        m.head, m.global_pool, m.num_classes = saved


def test_no_weight_decay_and_get_classifier(subject):
    """no_weight_decay() is exactly the set the family declares (the parameter names matching
    FAMILIES[...]['no_weight_decay']: none for ViT³ / H-ViT³, whose 1-D parameters and biases timm's rule already
    exempts while the official recipe decays W0 and the CPE kernels, docs/models.md; for Vision-TTT the class token
    and the inner states' b / ln_weight / ln_bias, shaped [heads, 1, d]), and every name in it is a parameter name."""
    m = subject.model
    nwd = m.no_weight_decay()
    assert isinstance(nwd, set) and all(isinstance(n, str) for n in nwd)
    pattern = subject.fam['no_weight_decay']
    assert nwd == {n for n, _ in m.named_parameters() if pattern and re.search(pattern, n)}
    names = {n for n, _ in m.named_parameters()}
    prefixes = {n.rsplit('.', k)[0] for n in names for k in range(1, n.count('.') + 1)}
    assert nwd <= names | prefixes, f'not parameter names or prefixes: {nwd - names - prefixes}'
    head = m.get_classifier()
    assert head is m.head and isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (m.num_features, m.num_classes)


def _decay_split(model):
    """Parameter names with and without weight decay in the optimizer the training engine builds (timm's
    create_optimizer_v2: 1-D parameters, ``.bias`` and ``model.no_weight_decay()`` are not decayed)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05).param_groups
    decayed = {names[id(p)] for g in groups if g['weight_decay'] > 0 for p in g['params']}
    return decayed, set(names.values()) - decayed


@pytest.mark.parametrize('case', TINY)
def test_weight_decay_split(case, shared):
    """What no_weight_decay() is for: norms, biases (and class tokens, and anything else that acts as one) are not
    decayed, while the weights are, including the inner models' initial states W0 and the CPE / Q-K convolution
    kernels, as in the official ViT³ recipe."""
    s = shared(case)
    fam, m = s.fam, s.model
    decayed, not_decayed = _decay_split(m)
    should_not = {n for n, _ in m.named_parameters() if re.search(fam['no_decay'], n)}
    short = lambda names: sorted({re.sub(r'\.\d+\.', '.*.', n) for n in names})  # blocks.*.x
    assert not_decayed == should_not, (f'decayed but should not be: {short(should_not - not_decayed)}; '
                                       f'not decayed but should be: {short(not_decayed - should_not)}')
    for pattern in fam['must_decay']:
        assert any(re.search(pattern, n) for n in decayed), pattern
        assert not any(re.search(pattern, n) for n in not_decayed), pattern


@pytest.mark.parametrize('pool', ['avg', ''])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_create_model_without_classifier(family, pool, build_model, images):
    name, kwargs = _tiny_args(family, num_classes=0, global_pool=pool)
    m = build_model(name, **kwargs)
    s = Subject(name, m)
    assert m.num_classes == 0 and m.global_pool == pool
    assert isinstance(m.get_classifier(), nn.Identity)
    assert not any(k.startswith('head.') for k in m.state_dict())
    x = images(2, 64, 48, seed=4)
    with torch.no_grad():
        out = m(x)
        feats = m.forward_features(x)
    if pool:
        assert out.shape == (2, m.num_features)
        assert torch.equal(out, s.pool(feats))
    else:
        assert out.shape == s.features_shape(2, 64, 48)
        assert torch.equal(out, feats)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_in_chans_1(family, build_model, images):
    name, kwargs = _tiny_args(family, in_chans=1)
    m = build_model(name, **kwargs)
    with torch.no_grad():
        assert m(images(2, 32, 32, c=1)).shape == (2, 1000)
    with pytest.raises(ValueError, match='1-channel'):
        with torch.no_grad():
            m(torch.zeros(2, 3, 32, 32))


# --------------------------------------------------------------------------- features_only


def _load_into_feature_model(fm, reference, leftover):
    """Give the feature model the reference model's weights; only the pruned parts (``leftover``: a regex matching
    the final norm, the head and what pruning dropped) may be left over."""
    result = fm.model.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(re.match(leftover, k) for k in result.unexpected_keys), result.unexpected_keys


@pytest.mark.parametrize('case', ['vit3_tiny', 'hvit3_tiny', 'vision_ttt_tiny'])
def test_features_only_default(case, shared, build_model, images, assert_all_equal):
    reference = shared(case)
    name, kwargs = _build_args(case)
    fam = reference.fam
    fm = build_model(name, features_only=True, **kwargs)
    assert isinstance(fm, FeatureGetterNet)
    indices = fam['default_out_indices']
    channels = [FEATURE_CHANNELS[name][i] for i in indices]
    reductions = [fam['feature_reductions'][i] for i in indices]
    assert list(fm.out_indices) == indices
    assert fm.feature_info.channels() == channels
    assert fm.feature_info.reduction() == reductions

    x = images(2, 100, 76, seed=5)  # padded at every stride (Vision-TTT: 7×5 = 35 tokens)
    with torch.no_grad():
        feats = fm(x)
    assert isinstance(feats, list) and len(feats) == len(channels)
    for f, c, r in zip(feats, channels, reductions):
        assert f.shape == (2, c, _ceil(100, r), _ceil(76, r))

    # same values as the full model's intermediates with the same weights (only norm / head are left over)
    _load_into_feature_model(fm, reference.model, r'(norm|head)\.')
    with torch.no_grad():
        feats = fm(x)
        expected = reference.model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert_all_equal(feats, expected)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_features_only_out_indices(family, shared, build_model, images, assert_all_equal):
    case, out_indices, taps, reductions, kept, leftover = FAMILIES[family]['out_indices']
    reference = shared(case)
    name, kwargs = _build_args(case)
    fm = build_model(name, features_only=True, out_indices=out_indices, **kwargs)
    channels = [FEATURE_CHANNELS[name][i] for i in taps]
    assert list(fm.out_indices) == taps
    assert fm.feature_info.channels() == channels
    assert fm.feature_info.reduction() == reductions
    assert len(getattr(fm.model, FAMILIES[family]['unit'])) == kept, 'parts after the last wanted index are pruned'

    _load_into_feature_model(fm, reference.model, leftover)
    x = images(2, 100, 76, seed=6)
    with torch.no_grad():
        feats = fm(x)
        expected = reference.model.forward_intermediates(x, indices=taps, intermediates_only=True)
    assert isinstance(feats, list) and len(feats) == len(channels)
    for f, c, r in zip(feats, channels, reductions):  # (a class token is not in the maps)
        assert f.shape == (2, c, _ceil(100, r), _ceil(76, r))
    assert_all_equal(feats, expected)


@pytest.mark.parametrize('name', ['vit3_tiny', 'vision_ttt_tiny'])
@pytest.mark.parametrize('depth,expected', [(1, (0,)), (2, (0, 1)), (3, (0, 1, 2)), (12, (2, 5, 8, 11))])
def test_default_feature_taps_of_shallow_plain_models(name, depth, expected):
    fm = timm.create_model(name, depth=depth, features_only=True)
    assert tuple(fm.feature_info.out_indices) == expected
    assert len(fm(torch.randn(1, 3, 32, 48))) == len(expected) == len(fm.feature_info.channels())


# --------------------------------------------------------------------------- forward_intermediates


def test_forward_intermediates(cheap, images, assert_all_equal):
    m, fam = cheap.model, cheap.fam
    n = len(m.feature_info)
    x = images(2, 64, 48, seed=7)
    own_fmt = fam['features']  # the format forward_features has
    with torch.no_grad():
        feats = m.forward_features(x)
        final, inter = m.forward_intermediates(x)
        only = m.forward_intermediates(x, intermediates_only=True)
        nhwc = m.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        nlc = (m.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
               if 'NLC' in fam['intermediate_fmts'] else None)
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = m.forward_intermediates(x, indices=[0, n - 2], intermediates_only=True)
        early_only = m.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        early_final, early = m.forward_intermediates(x, indices=[0, 1], stop_early=True)
        normed = m.forward_intermediates(x, indices=1, norm=True, output_fmt=own_fmt, intermediates_only=True)
        if fam['stop_early_final'] == 'normed':
            # the final norm applied to the last block run
            tokens = m.norm(early[1].flatten(2).transpose(1, 2))
            expected_early_final = tokens if own_fmt == 'NLC' else tokens.transpose(1, 2).reshape(early[1].shape)
        else:
            # stopped before the last stage: the final map is stage 1's output, neither merged nor normalised
            expected_early_final = early[1]

    assert torch.equal(final, feats), 'final output of forward_intermediates != forward_features'
    assert final.shape == cheap.features_shape(2, 64, 48)
    assert isinstance(inter, list) and len(inter) == n
    for t, info in zip(inter, m.feature_info):
        assert t.shape == (2, info['num_chs'], _ceil(64, info['reduction']), _ceil(48, info['reduction']))

    assert isinstance(only, list)
    assert_all_equal(only, inter)
    assert_all_equal(nhwc, [t.permute(0, 2, 3, 1) for t in inter])
    if nlc is not None:
        assert_all_equal(nlc, [t.flatten(2).transpose(1, 2) for t in inter])
        assert all(t.shape[1] == inter[0].shape[2] * inter[0].shape[3] for t in nlc), 'no class token in NLC'
    assert_all_equal(last2, inter[-2:])
    assert_all_equal(picked, [inter[0], inter[n - 2]])
    assert_all_equal(early_only, inter[:2])
    assert_all_equal(early, inter[:2])
    if own_fmt == 'NLC':
        assert early_final.shape == cheap.features_shape(2, 64, 48)  # all tokens, as forward_features
    assert torch.equal(cheap.patch_part(early_final), expected_early_final)
    # the final norm applied to the last intermediate is forward_features (without prefix tokens)
    assert len(normed) == 1
    assert torch.equal(normed[0], cheap.patch_part(feats))


def test_forward_intermediates_bad_format(tiny, images):
    x = images(1, 32, 32)
    for fmt in ['NCL', 'nchw'] + [f for f in ('NCHW', 'NHWC', 'NLC') if f not in tiny.fam['intermediate_fmts']]:
        with pytest.raises(ValueError, match='output_fmt'):
            tiny.model.forward_intermediates(x, output_fmt=fmt)


def test_prune_intermediate_layers(tiny, images, assert_all_equal):
    reference, fam = tiny.model, tiny.fam
    m = copy.deepcopy(reference)
    x = images(2, 64, 48, seed=9)
    take = m.prune_intermediate_layers([1])
    assert list(take) == [1]
    assert len(getattr(m, fam['unit'])) == 2
    assert m.num_features == FEATURE_CHANNELS[tiny.name][1]
    if fam['unit'] == 'layers':
        assert m.layers[-1].downsample is None
    with torch.no_grad():
        pruned = m.forward_intermediates(x, indices=[1], intermediates_only=True)
        expected = reference.forward_intermediates(x, indices=[1], intermediates_only=True)
        out = m(x)
    assert_all_equal(pruned, expected)
    # the pruned head gives unpooled features: stage 1's map, or all tokens
    r = m.feature_info[1]['reduction']
    gh, gw = _ceil(64, r), _ceil(48, r)
    unpooled = (2, m.num_features, gh, gw) if fam['features'] == 'NCHW' else (2, tiny.prefix + gh * gw, m.num_features)
    assert out.shape == unpooled


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


def test_group_matcher(subject):
    m, fam = subject.model, subject.fam
    names = [n for n, _ in m.named_parameters()]
    head_prefix = m.pretrained_cfg['classifier'] + '.'
    head = {n for n in names if n.startswith(head_prefix)}
    stem = {n for n in names if n.startswith(fam['stem'])}
    norm = {n for n in names if n.startswith('norm.')}
    blocks = {}
    for n in names:
        match = re.match(r'^(?:layers\.\d+\.)?blocks\.\d+\.', n)
        if match:
            blocks.setdefault(match.group(0), set()).add(n)
    assert len(blocks) == fam['num_blocks'](m)

    for coarse in (False, True):
        gm = m.group_matcher(coarse=coarse)
        assert isinstance(gm, dict) and 'stem' in gm and 'blocks' in gm
        if not coarse:
            patterns = _patterns(gm)
            unmatched = [n for n in names if n not in head and not any(re.match(p, n) for p in patterns)]
            assert unmatched == [], f'parameters no group pattern matches: {unmatched}'

        groups = group_parameters(m, gm)
        flat = [n for g in groups.values() for n in g]
        assert sorted(flat) == sorted(names), 'every parameter must be in exactly one group'
        assert len(groups) == fam['num_groups'](m, coarse)
        assert set(groups[min(groups)]) == stem
        assert set(groups[max(groups)]) == head | (norm if fam['norm_in_last_group'](coarse) else set())
        for prefix, block in blocks.items():
            assert any(block <= set(g) for g in groups.values()), f'{prefix} is split over groups'

        # group ids never decrease along the network (layer-wise lr decay relies on it)
        rev = group_parameters(m, gm, reverse=True)
        ids = [rev[n] for n in names]
        assert ids == sorted(ids), 'group ids must not decrease along the network'


def test_feature_info(subject):
    m, fam = subject.model, subject.fam
    info = m.feature_info
    assert isinstance(info, list) and all({'num_chs', 'reduction', 'module'} <= set(i) for i in info)
    assert [i['num_chs'] for i in info] == FEATURE_CHANNELS[subject.name]
    assert [i['reduction'] for i in info] == fam['feature_reductions']
    assert info[-1]['num_chs'] == m.num_features
    assert len(info) == len(getattr(m, fam['unit']))
    for i in info:
        m.get_submodule(i['module'])  # names a real module


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize('case', TINY)
def test_backward_all_params_get_finite_grads(case, build_model, images):
    """The registered tiny models at 72×40 (padded; Vision-TTT: 15 tokens, mini-batches 8 and 7)."""
    name, kwargs = _build_args(case)
    m = build_model(name, num_classes=42, **kwargs).train()
    x = images(2, 72, 40, seed=1).requires_grad_(True)
    target = torch.randn(2, 42)
    out = m(x)
    assert out.shape == (2, 42)
    (out * target).sum().backward()

    params = dict(m.named_parameters())
    assert ('cls_token' in params) == (m.global_pool == 'token')
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert no_grad == [], f'parameters without gradient: {no_grad}'
    non_finite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert non_finite == [], f'non-finite gradients: {non_finite}'
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    assert zero == ZERO_GRADS.get(case, []), f'identically zero gradients: {zero}'
    # the last row and column (inside the padded border patch / stem cell) still reach the output
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert x.grad[:, :, -1, :].abs().sum() > 0 and x.grad[:, :, :, -1].abs().sum() > 0


@pytest.mark.parametrize('family', list(FAMILIES))
def test_grad_checkpointing_matches(family, build_model, images, checkpointing_runs):
    name, kwargs = _tiny_args(family, num_classes=42, drop_path_rate=0.0)
    m = build_model(name, **kwargs).train()
    x = images(2, 64, 48, seed=2)  # Vision-TTT: 12 tokens, mini-batches 8 and 4
    target = torch.randn(2, 42)

    ref_out, ref_grads, ck_out, ck_grads, calls, run = checkpointing_runs(m, x, target)
    assert m.grad_checkpointing
    assert len(calls) == FAMILIES[family]['num_blocks'](m) >= 2, 'every block should run under checkpoint'
    if family == 'hvit3':
        assert all(stage.grad_checkpointing for stage in m.layers)

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


@pytest.mark.parametrize('mode', ['no_grad', 'inference_mode'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_grads_after_no_grad_or_inference_mode_equal_fresh_model(family, mode, build_model, images, run_with_grads):
    """An evaluation under torch.no_grad() / torch.inference_mode() (as e.g. Lightning validates) at the training size
    and another one, then a training step: the output and every parameter's gradient equal those of a twin model (same
    seed and weights) that never ran without grad. Catches tensors cached while not recording (RoPE tables, scan
    indices, ...) leaking into training, or inference tensors that cannot be saved for backward."""
    context = getattr(torch, mode)
    name, kwargs = _tiny_args(family, num_classes=5)
    model, twin = build_model(name, **kwargs), build_model(name, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    x = images(2, 52, 84, seed=9)  # a size no other test uses
    target = torch.randn(2, 5)
    with context():
        model(x)
        model(images(1, 36, 40, seed=10))
    model.train()
    twin.train()
    out, grads = run_with_grads(model, x, target)
    twin_out, twin_grads = run_with_grads(twin, x, target)
    missing = [n for n, _ in model.named_parameters() if n not in grads]
    assert missing == [], f'parameters without gradient: {missing}'
    assert torch.equal(out, twin_out)
    assert grads.keys() == twin_grads.keys()
    differ = [n for n in grads if not torch.equal(grads[n], twin_grads[n])]
    assert differ == [], f'gradients differ from the fresh model: {differ}'
    assert all(torch.isfinite(g).all() for g in grads.values())


BF16_STEPS, BF16_LR = 5, 2e-3
BF16_REL = 2e-2          # bounds of test_bf16_autocast_training_tracks_fp32 (see its docstring)
BF16_DROP = (0.8, 1.25)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_bf16_autocast_training_tracks_fp32(family, build_model, images):
    """A tiny config of the family trained 5 AdamW steps (lr 2e-3) on one fixed random batch, in fp32 and under
    ``torch.autocast('cpu', dtype=torch.bfloat16)`` from the same weights. The fp32 run: one step changes every
    parameter and keeps it finite, the loss drops after one step and by > 0.1 after five.

    Bounds: every step's loss (and the loss after the last step) of the bf16 run is within a relative 2e-2 of the
    fp32 run's, and the bf16 loss drops by 0.8-1.25 times what the fp32 loss drops over the run. Measured (torch
    2.13 CPU): largest relative loss difference 7.9e-4 (ViT³), 4.3e-3 (H-ViT³), 3.0e-4 (Vision-TTT); drop ratios
    1.00 for all three (fp32 drops 0.90, 1.29, 0.63 from ~2.3)."""
    name, kwargs = _tiny_args(family, num_classes=10)
    x = images(8, 32, 32, seed=20)
    y = torch.tensor([0, 3, 7, 9, 1, 2, 5, 8])
    runs = {}
    for precision in ('fp32', 'bf16'):
        m = build_model(name, **kwargs).train()
        opt = torch.optim.AdamW(m.parameters(), lr=BF16_LR)
        autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16')
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        losses = []
        for step in range(BF16_STEPS):
            opt.zero_grad(set_to_none=True)
            with autocast:
                logits = m(x)
                loss = F.cross_entropy(logits.float(), y)
            assert logits.dtype == (torch.bfloat16 if precision == 'bf16' else torch.float32)
            assert torch.isfinite(loss)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step == 0 and precision == 'fp32':
                unchanged = [n for n, p in m.named_parameters() if torch.equal(p, before[n])]
                assert unchanged == [], f'one AdamW step left these parameters unchanged: {unchanged}'
                assert all(torch.isfinite(p).all() for p in m.parameters())
        with torch.no_grad(), autocast:
            losses.append(F.cross_entropy(m(x).float(), y).item())
        assert all(p.dtype == torch.float32 for p in m.parameters())
        runs[precision] = torch.tensor(losses)

    fp32, bf16 = runs['fp32'], runs['bf16']
    assert fp32[1] < fp32[0], fp32
    assert fp32[-1] < fp32[0] - 0.1, f'loss on a fixed batch should drop: {fp32}'
    rel = ((bf16 - fp32).abs() / fp32.abs()).max().item()
    assert rel <= BF16_REL, f'bf16 losses {bf16.tolist()} vs fp32 {fp32.tolist()}: relative {rel:.3g}'
    ratio = ((bf16[0] - bf16[-1]) / (fp32[0] - fp32[-1])).item()
    assert BF16_DROP[0] <= ratio <= BF16_DROP[1], f'bf16 loss drop / fp32 loss drop = {ratio:.3g}: {bf16}, {fp32}'


# --------------------------------------------------------------------------- any resolution, batches


def test_resolution_sequence_has_no_state(tiny, images, build_model):
    m = tiny.model
    # B is A transposed: same token counts, different grids; C is padded
    sizes = [(64, 48), (48, 64), (33, 47), (64, 48), (48, 64)]
    xs = {s: images(2, *s, seed=sum(s)) for s in sizes}
    outs = []
    with torch.no_grad():
        for s in sizes:
            feats = m.forward_features(xs[s])
            assert feats.shape == tiny.features_shape(2, *s)
            out = m.forward_head(feats)
            assert out.shape == (2, 1000) and torch.isfinite(out).all()
            outs.append(out)
    assert torch.equal(outs[0], outs[3])
    assert torch.equal(outs[1], outs[4])
    # a model that has only ever seen size B gives the same result there
    name, kwargs = _build_args(tiny.case)
    fresh = build_model(name, **kwargs)
    fresh.load_state_dict(m.state_dict())  # weights and calibrated BatchNorm statistics; empty caches
    with torch.no_grad():
        assert torch.equal(fresh(xs[(48, 64)]), outs[1])


@pytest.mark.parametrize('case, size, grid', [(c, s, g) for c in TINY for s, g in FAMILIES[family_of(c)]['smallest']],
                         ids=lambda v: f'{v[0]}x{v[1]}' if isinstance(v, tuple) else v)
def test_smallest_inputs(case, size, grid, shared, images):
    s = shared(case)
    x = images(2, *size, seed=13)
    with torch.no_grad():  # (the final output of forward_intermediates is forward_features')
        feats, (last,) = s.model.forward_intermediates(x, indices=1)
    assert feats.shape == s.features_shape(2, *size)
    assert s.features_shape(2, *size) == ((2, s.model.num_features, *grid) if s.fam['features'] == 'NCHW' else
                                          (2, s.prefix + grid[0] * grid[1], s.model.num_features))
    assert last.shape == (2, s.model.feature_info[-1]['num_chs'], *grid)
    assert torch.isfinite(feats).all()


def test_batch_independence(tiny, assert_batch_independent):
    # float32 rounding differs between batch sizes (features are O(1)-O(10) after 12-17 blocks; oneDNN picks its
    # channels-last convolution kernels by batch size, so H-ViT³'s stem rounds differently: seen 1.1e-5)
    assert_batch_independent(tiny.model, torch.float32, dict(rtol=1e-5, atol=3e-5))


# --------------------------------------------------------------------------- input errors


def _call(m, method, x):
    with torch.no_grad():
        return getattr(m, method)(x)


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('case', TINY)
def test_wrong_channel_count(case, method, shared):
    m = shared(case).model
    with pytest.raises(ValueError, match='channel'):
        _call(m, method, torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r'3-channel.*got 4 channels'):
        _call(m, method, torch.zeros(1, 4, 64, 64))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('case', TINY)
@pytest.mark.parametrize('shape', [(3, 64, 64), (2, 3, 1, 64, 64)], ids=['3d', '5d'])
def test_wrong_ndim(case, method, shape, shared):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        _call(shared(case).model, method, torch.zeros(shape))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('case, size', [(c, s) for c in TINY for s in FAMILIES[family_of(c)]['too_small']],
                         ids=lambda v: f'{v[0]}x{v[1]}' if isinstance(v, tuple) else v)
def test_too_small(case, size, method, shared):
    s = shared(case)
    with pytest.raises(ValueError, match=rf"\b{s.fam['min_size']}\b"):
        _call(s.model, method, torch.zeros(1, 3, *size))
