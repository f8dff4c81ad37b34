"""Any-resolution behaviour of ViT³ / H-ViT³: output shapes by the ceil rule, zero padding, the RoPE table cache
over many resolutions, high resolution, strict batch independence. (What every registered model must do at any size,
no state between resolutions, batch independence, smallest inputs, input errors, training at odd sizes and after
no_grad / inference_mode evaluation: tests/models/test_contract.py.)

CPU only: the tiny variants, each built once per module and kept in eval mode; tests that count on a fresh RoPE
cache or change weights work on copies.
"""
import copy

import pytest
import torch

TINY = ['vit3_tiny', 'hvit3_tiny']
SIZES = [(224, 224), (160, 288), (100, 76), (33, 47)]


@pytest.fixture(scope='module')
def shared(build_model, calibrate_batchnorm):
    """``shared(name)``: the one eval-mode instance of ``name`` (BatchNorm calibrated) for read-only tests."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = calibrate_batchnorm(build_model(name))
        return cache[name]

    yield get
    cache.clear()


def _ceil(a, b):
    return -(-a // b)


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
def test_output_shapes(name, size, shared, images):
    m = shared(name)
    h, w = size
    b = 1 if h * w > 200 * 200 else 2
    x = images(b, h, w, seed=h + w)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (b, m.num_features, *_final_grid(name, h, w))
    assert out.shape == (b, m.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('size', SIZES[1:], ids=lambda s: f'{s[0]}x{s[1]}')
def test_hvit3_stage_shapes(size, shared, images):
    m = shared('hvit3_tiny')
    h, w = size
    with torch.no_grad():
        stages = m.forward_intermediates(images(1, h, w, seed=1), intermediates_only=True)
    assert [tuple(t.shape[-2:]) for t in stages] == _hvit3_grids(h, w)
    assert [t.shape[1] for t in stages] == [64, 128, 320, 512]


def test_padding_is_zero_padding_vit3(shared, images):
    """A side that is not a multiple of 16 behaves as if zero-padded on the right/bottom."""
    m = shared('vit3_tiny')
    x = images(2, 40, 50, seed=3)
    padded = torch.nn.functional.pad(x, (0, 64 - 50, 0, 48 - 40))
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(x), m.forward_features(padded), rtol=1e-5, atol=1e-5)


def test_padding_is_zero_padding_hvit3_stem(shared, images):
    """H-ViT³ pads to a multiple of 4 at the stem (later odd grids are padded with zero tokens at each merge)."""
    m = shared('hvit3_tiny')
    x = images(2, 30, 45, seed=4)
    padded = torch.nn.functional.pad(x, (0, 48 - 45, 0, 32 - 30))
    with torch.no_grad():
        a = m.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        b = m.forward_intermediates(padded, indices=[0], intermediates_only=True)[0]
    assert a.shape == b.shape == (2, 64, 8, 12)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- RoPE cache, high resolution


def test_hvit3_many_resolutions_rope_cache(shared, images):
    """More distinct grids than the RoPE table cache holds: results at an earlier size do not change."""
    m = copy.deepcopy(shared('hvit3_tiny'))
    first = images(1, 16, 16, seed=8)
    with torch.no_grad():
        ref = m.forward_features(first)
        for k in range(1, 20):  # 19 more distinct stage-1 grids (4, 4 + k)
            out = m.forward_features(images(1, 16, 16 + 4 * k, seed=k))
            assert out.shape[-2:] == _hvit3_grids(16, 16 + 4 * k)[-1]
        again = m.forward_features(first)
    assert torch.equal(again, ref)


def test_vit3_high_resolution(shared, images):
    # ~1.5 s on 2 CPU cores (6084 tokens), so not marked slow
    m = shared('vit3_tiny')
    x = images(1, 1248, 1248, seed=10)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
    assert feats.shape == (1, 192, 78, 78)
    assert out.shape == (1, 1000)
    assert torch.isfinite(feats).all() and torch.isfinite(out).all()


# --------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize('name', TINY)
def test_batch_independence_strict(name, shared, assert_batch_independent):
    """At initialisation the inner gradients are so small that the per-sample soft normalisation
    g / (||g|| + 1) is nearly linear, and mixing samples inside it would stay below float32 noise. Here the
    inner models' initial states W0 are scaled by 50 (every inner step and its normalisation is non-trivial)
    and the model runs in float64, where batched and single-image results agree to ~1e-14. (The float32 check of
    every registered model: tests/models/test_contract.py::test_batch_independence.)"""
    m = copy.deepcopy(shared(name)).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if '.attn.inner.' in n:
                p.mul_(50.0)
    assert_batch_independent(m, torch.float64, dict(rtol=1e-9, atol=1e-9))
