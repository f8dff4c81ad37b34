"""Any-resolution behaviour of ViT³ / H-ViT³: output shapes by the ceil rule, no state carried between
resolutions (RoPE table cache), high resolution, training at odd sizes, batch independence, input errors.

CPU only: the tiny variants, each built once per module and kept in eval mode; tests that train or count on a
fresh RoPE cache work on copies.
"""
import copy
import re

import pytest
import torch

import vittt  # noqa: F401  (registers the models; must be imported before timm/torchvision)
import timm  # noqa: E402
from helpers import ceil_div, images


TINY = ['vit3_tiny', 'hvit3_tiny']
SIZES = [(224, 224), (160, 288), (100, 76), (33, 47)]

_SHARED = {}


def _build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _calibrate_batchnorm(m):
    """Give every BatchNorm the running statistics of one batch of images.

    At initialisation (running mean 0, variance 1) an eval-mode H-ViT³ maps all images to nearly the same
    features (stage-4 outputs of different images differ by ~1e-4), which would make equality checks between
    outputs almost vacuous; with calibrated statistics the outputs depend on the input at O(1)."""
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the statistics of exactly this batch
    m.train()
    with torch.no_grad():
        m(_images(4, 64, 48, seed=1234))
    for bn in bns:
        bn.momentum = 0.1
    return m.eval()


def _shared(name):
    """The one eval-mode instance of ``name`` for read-only tests (never switched to train mode)."""
    if name not in _SHARED:
        _SHARED[name] = _calibrate_batchnorm(_build(name))
    return _SHARED[name]


@pytest.fixture(scope='module', autouse=True)
def _release_shared():
    yield
    _SHARED.clear()


_images, _ceil = images, ceil_div


def _vit3_grid(h, w):
    return _ceil(h, 16), _ceil(w, 16)


def _hvit3_grids(h, w):
    """Stage grids: ceil(H/4) at the stem, then ceil(g/2) at each of the three merges."""
    grids = [(_ceil(h, 4), _ceil(w, 4))]
    for _ in range(3):
        gh, gw = grids[-1]
        grids.append((_ceil(gh, 2), _ceil(gw, 2)))
    return grids


def _final_grid(name, h, w):
    return _hvit3_grids(h, w)[-1] if name.startswith('hvit3') else _vit3_grid(h, w)


# --------------------------------------------------------------------------- shapes


def test_ceil_rule_helpers():
    # the expected grids used below, spelled out for the sizes of this module
    assert _hvit3_grids(33, 47) == [(9, 12), (5, 6), (3, 3), (2, 2)]
    assert _hvit3_grids(100, 76) == [(25, 19), (13, 10), (7, 5), (4, 3)]
    assert _vit3_grid(33, 47) == (3, 3)
    assert _vit3_grid(100, 76) == (7, 5)


@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('name', TINY)
def test_output_shapes(name, size):
    m = _shared(name)
    h, w = size
    b = 1 if h * w > 200 * 200 else 2
    x = _images(b, h, w, seed=h + w)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (b, m.num_features, *_final_grid(name, h, w))
    assert out.shape == (b, m.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('size', SIZES[1:], ids=lambda s: f'{s[0]}x{s[1]}')
def test_hvit3_stage_shapes(size):
    m = _shared('hvit3_tiny')
    h, w = size
    with torch.no_grad():
        stages = m.forward_intermediates(_images(1, h, w, seed=1), intermediates_only=True)
    assert [tuple(t.shape[-2:]) for t in stages] == _hvit3_grids(h, w)
    assert [t.shape[1] for t in stages] == [64, 128, 320, 512]


@pytest.mark.parametrize('name, size, grid', [
    ('vit3_tiny', (16, 16), (1, 1)),      # the smallest ViT³ input: one patch
    ('vit3_tiny', (16, 40), (1, 3)),
    ('hvit3_tiny', (4, 4), (1, 1)),       # the smallest H-ViT³ input: 1×1 at every stage
    ('hvit3_tiny', (5, 9), (1, 1)),
])
def test_smallest_inputs(name, size, grid):
    m = _shared(name)
    with torch.no_grad():
        feats = m.forward_features(_images(2, *size, seed=2))
    assert feats.shape == (2, m.num_features, *grid)
    assert torch.isfinite(feats).all()


def test_padding_is_zero_padding_vit3():
    """A side that is not a multiple of 16 behaves as if zero-padded on the right/bottom."""
    m = _shared('vit3_tiny')
    x = _images(2, 40, 50, seed=3)
    padded = torch.nn.functional.pad(x, (0, 64 - 50, 0, 48 - 40))
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(x), m.forward_features(padded), rtol=1e-5, atol=1e-5)


def test_padding_is_zero_padding_hvit3_stem():
    """H-ViT³ pads to a multiple of 4 at the stem (later odd grids are padded with zero tokens at each merge)."""
    m = _shared('hvit3_tiny')
    x = _images(2, 30, 45, seed=4)
    padded = torch.nn.functional.pad(x, (0, 48 - 45, 0, 32 - 30))
    with torch.no_grad():
        a = m.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        b = m.forward_intermediates(padded, indices=[0], intermediates_only=True)[0]
    assert a.shape == b.shape == (2, 64, 8, 12)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- no state between resolutions


@pytest.mark.parametrize('name', TINY)
def test_resolution_sequence_has_no_state(name):
    m = copy.deepcopy(_shared(name))
    # B is A transposed: same token counts, different grids
    xa, xb = _images(2, 64, 48, seed=5), _images(2, 48, 64, seed=6)
    xc, xd = _images(2, 100, 76, seed=7), _images(1, 33, 47, seed=8)
    with torch.no_grad():
        a1 = m(xa)
        b1 = m(xb)
        c1 = m(xc)
        d1 = m(xd)
        a2 = m(xa)
        b2 = m(xb)
    assert a1.shape == b1.shape == c1.shape == (2, 1000) and d1.shape == (1, 1000)
    assert torch.equal(a1, a2)
    assert torch.equal(b1, b2)

    # a model that has only ever seen size B gives the same result
    fresh = _build(name)
    fresh.load_state_dict(m.state_dict())  # weights and calibrated BatchNorm statistics; empty RoPE cache
    with torch.no_grad():
        torch.testing.assert_close(fresh(xb), b1, rtol=0, atol=0)


def test_hvit3_many_resolutions_rope_cache():
    """More distinct grids than the RoPE table cache holds: results at an earlier size do not change."""
    m = copy.deepcopy(_shared('hvit3_tiny'))
    first = _images(1, 16, 16, seed=8)
    with torch.no_grad():
        ref = m.forward_features(first)
        for k in range(1, 20):  # 19 more distinct stage-1 grids (4, 4 + k)
            out = m.forward_features(_images(1, 16, 16 + 4 * k, seed=k))
            assert out.shape[-2:] == _hvit3_grids(16, 16 + 4 * k)[-1]
        again = m.forward_features(first)
    assert torch.equal(again, ref)


@pytest.mark.parametrize('name', TINY)
def test_train_after_no_grad(name):
    """A no_grad evaluation at a new size, then a training step at that size."""
    m = copy.deepcopy(_shared(name))
    x = _images(2, 44, 92, seed=14)  # a size no other test uses
    with torch.no_grad():
        m(x)
    m.train()
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize('name', ['vit3_tiny', 'hvit3_tiny'])
def test_train_after_inference_mode(name):
    """Validating under torch.inference_mode() (as e.g. Lightning does) must not break the next training step."""
    m = copy.deepcopy(_shared(name))
    x = _images(2, 52, 84, seed=9)  # a size no other test uses: the first run at it happens in inference mode
    with torch.inference_mode():
        m(x)
    m.train()
    out = m(x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# --------------------------------------------------------------------------- high resolution / training


def test_vit3_high_resolution():
    # ~1.5 s on 2 CPU cores (6084 tokens), so not marked slow
    m = _shared('vit3_tiny')
    x = _images(1, 1248, 1248, seed=10)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (1, 192, 78, 78)
    assert out.shape == (1, 1000)
    assert torch.isfinite(feats).all() and torch.isfinite(out).all()


@pytest.mark.parametrize('name', TINY)
def test_train_non_square(name):
    m = copy.deepcopy(_shared(name)).train()
    x = _images(2, 72, 40, seed=11).requires_grad_(True)
    out = m(x)
    assert out.shape == (2, 1000)
    out.logsumexp(dim=1).sum().backward()
    bad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert bad == []
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    # the last row and column (inside the padded border patch / stem cell) still reach the output
    assert x.grad[:, :, -1, :].abs().sum() > 0
    assert x.grad[:, :, :, -1].abs().sum() > 0


# --------------------------------------------------------------------------- batch independence


def _check_batch_independence(m, dtype, tol):
    x = _images(3, 64, 48, seed=12).to(dtype)
    changed = x.clone()
    torch.manual_seed(13)
    changed[2] = torch.randn_like(changed[2])
    with torch.no_grad():
        feats = m.forward_features(x)
        singles = [m.forward_features(x[i:i + 1]) for i in range(3)]
        feats_changed = m.forward_features(changed)
        logits = m.forward_head(feats)
        logits_changed = m.forward_head(feats_changed)
    for i in range(3):
        torch.testing.assert_close(feats[i:i + 1], singles[i], **tol)
    torch.testing.assert_close(feats_changed[:2], feats[:2], **tol)
    torch.testing.assert_close(logits_changed[:2], logits[:2], **tol)
    assert (feats_changed[2] - feats[2]).abs().max() > 0.1, 'the changed image should change its own output'


@pytest.mark.parametrize('name', TINY)
def test_batch_independence(name):
    # float32 rounding differs between batch sizes (features are O(1)-O(10) after 12-17 blocks)
    _check_batch_independence(_shared(name), torch.float32, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize('name', TINY)
def test_batch_independence_strict(name):
    """At initialisation the inner gradients are so small that the per-sample soft normalisation
    g / (||g|| + 1) is nearly linear, and mixing samples inside it would stay below float32 noise. Here the
    inner models' initial states W0 are scaled by 50 (every inner step and its normalisation is non-trivial)
    and the model runs in float64, where batched and single-image results agree to ~1e-14."""
    m = copy.deepcopy(_shared(name)).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if '.attn.inner.' in n:
                p.mul_(50.0)
    _check_batch_independence(m, torch.float64, dict(rtol=1e-9, atol=1e-9))


# --------------------------------------------------------------------------- errors


METHODS = ['forward', 'forward_features', 'forward_intermediates']


def _call(m, method, x):
    with torch.no_grad():
        return getattr(m, method)(x)


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('name', TINY)
def test_wrong_channel_count(name, method):
    with pytest.raises(ValueError, match='channel'):
        _call(_shared(name), method, torch.zeros(2, 1, 64, 64))


@pytest.mark.parametrize('name', TINY)
def test_wrong_channel_count_message(name):
    with pytest.raises(ValueError, match=r'3-channel.*got 4 channels'):
        _call(_shared(name), 'forward', torch.zeros(1, 4, 64, 64))


def test_one_channel_model():
    m = _build('vit3_tiny', in_chans=1)
    with torch.no_grad():
        assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match='1-channel'):
        _call(m, 'forward', torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('name', TINY)
@pytest.mark.parametrize('shape', [(3, 64, 64), (2, 3, 1, 64, 64)], ids=['3d', '5d'])
def test_wrong_ndim(name, method, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        _call(_shared(name), method, torch.zeros(shape))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('size', [(8, 8), (8, 64), (64, 15)], ids=lambda s: f'{s[0]}x{s[1]}')
def test_vit3_too_small(size, method):
    with pytest.raises(ValueError, match=r'\b16\b'):
        _call(_shared('vit3_tiny'), method, torch.zeros(1, 3, *size))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('size', [(2, 2), (3, 64), (64, 3)], ids=lambda s: f'{s[0]}x{s[1]}')
def test_hvit3_too_small(size, method):
    with pytest.raises(ValueError, match=r'\b4\b'):
        _call(_shared('hvit3_tiny'), method, torch.zeros(1, 3, *size))
