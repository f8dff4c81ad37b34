"""The TTT mixer against a from-the-spec reference (A.2.9), RoPE against complex rotation, pluggable inner models,
the inner update in float32 under autocast (ViT³ and Vision-TTT mixers), and what the Vision-TTT mixer's causal
switch and mini-batches let a token read."""
import pytest
import torch
import torch.nn.functional as F

from vittt.layers import DWConvInner, InnerModel, RoPE2d, SwiGLUInner, TTTMixer, VisionTTTMixer, rope_2d_angles
from vittt.ops import DotProductLoss
from vittt.ops.dwconv.reference import reference_dwconv_ttt
from vittt.ops.glu.reference import reference_swiglu_ttt


def spec_mixer(mixer: TTTMixer, x, grid, rope=None):
    """Spec A.2.9 written out with the autograd references: split, (rope), two branches, concat, project."""
    b, n, c = x.shape
    h = mixer.inner[0].num_heads
    d = c // h
    q1, k1, v1, q2, k2, v2 = torch.split(F.linear(x, mixer.qkv.weight, mixer.qkv.bias), [c, c, c, d, d, d], -1)
    if rope is not None:
        q1, k1 = rope(q1, grid), rope(k1, grid)
    heads = lambda t: t.reshape(b, n, h, d).transpose(1, 2)
    o1 = reference_swiglu_ttt(heads(q1), heads(k1), heads(v1), mixer.inner[0].w1, mixer.inner[0].w2,
                              loss=DotProductLoss(), scale=1 / 3)
    o1 = o1.transpose(1, 2).reshape(b, n, c)
    spatial = lambda t: t.transpose(1, 2).reshape(b, d, *grid)
    o2 = reference_dwconv_ttt(spatial(q2), spatial(k2), spatial(v2), mixer.inner[1].weight, loss=DotProductLoss(),
                              scale=1 / 3)
    return F.linear(torch.cat([o1, o2.flatten(2).transpose(1, 2)], -1), mixer.proj.weight, mixer.proj.bias)


@pytest.mark.parametrize('grid', [(4, 6), (7, 3), (1, 5)])
@pytest.mark.parametrize('use_rope', [False, True])
def test_mixer_equals_spec(grid, use_rope):
    torch.manual_seed(0)
    rope = RoPE2d(16) if use_rope else None
    mixer = TTTMixer(16, num_heads=2, rope=rope).double()
    assert mixer.qkv.out_features == 3 * 16 + 3 * 8 and mixer.proj.in_features == 16 + 8
    x = torch.randn(2, grid[0] * grid[1], 16, dtype=torch.float64, requires_grad=True)
    out, ref = mixer(x, grid), spec_mixer(mixer, x, grid, rope)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g_out = torch.autograd.grad(out.square().sum(), [x] + list(mixer.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), [x] + list(mixer.parameters()))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_mixer_options_reach_inner_models():
    m = TTTMixer(32, num_heads=4, scale='head_dim', inner_lr=0.5, grad_norm=False, inner_loss='mse',
                 conv_kernel_size=5)
    assert m.inner[0].scale == pytest.approx(8 ** -0.5) and m.inner[1].scale == pytest.approx(8 ** -0.5)
    assert m.inner[0].inner_lr == 0.5 and not m.inner[1].grad_norm and m.inner[1].loss.name == 'mse'
    assert m.inner[1].weight.shape == (8, 1, 5, 5)
    with pytest.raises(ValueError, match='divisible'):
        TTTMixer(30, num_heads=4)
    with pytest.raises(ValueError, match="'head_dim'"):
        TTTMixer(32, num_heads=4, scale='sqrt')


def test_rope_matches_complex_rotation():
    """Official semantics: channel pairs as complex numbers times exp(i·angle[row, col, pair])."""
    torch.manual_seed(1)
    grid, dim = (3, 5), 16
    x = torch.randn(2, 15, dim)
    angles = rope_2d_angles(grid, dim).reshape(15, dim // 2)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 15, dim // 2, 2)) * torch.polar(
        torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(RoPE2d(dim)(x, grid), expected)
    # first half of the pairs rotate with the row, second half with the column
    assert torch.equal(angles.reshape(3, 5, 8)[:, 0, :4], angles.reshape(3, 5, 8)[:, 4, :4])
    assert torch.equal(angles.reshape(3, 5, 8)[0, :, 4:], angles.reshape(3, 5, 8)[2, :, 4:])


def test_rope_cache_and_dtype():
    rope = RoPE2d(8)
    x = torch.randn(1, 6, 8, dtype=torch.bfloat16)
    assert rope(x, (2, 3)).dtype == torch.bfloat16
    assert rope(torch.randn(1, 6, 8), (3, 2)).shape == (1, 6, 8)
    assert len(rope._cache) == 2
    with pytest.raises(ValueError, match='divisible by 4'):
        RoPE2d(6)


class _LinearAttentionInner(InnerModel):
    """A toy inner model to show plugging: one linear layer trained by a single closed-form dot-product step."""

    def __init__(self, width):
        super().__init__()
        self.width = self.out_width = width
        self.scale = 1.0
        self.w = torch.nn.Parameter(torch.zeros(width, width))

    def forward(self, q, k, v, grid_size):
        return q @ (self.w + k.transpose(-2, -1) @ v / k.shape[1])


def test_pluggable_inner_models():
    mixer = TTTMixer(12, inner_models=[SwiGLUInner(2, 4), _LinearAttentionInner(6), DWConvInner(4)])
    assert mixer.qkv.out_features == 3 * (8 + 6 + 4) and mixer.proj.in_features == 18
    out = mixer(torch.randn(2, 20, 12), (4, 5))
    assert out.shape == (2, 20, 12)
    out.sum().backward()
    assert mixer.inner[1].w.grad is not None and mixer.inner[1].w.grad.abs().sum() > 0


@pytest.mark.parametrize('make', [lambda: TTTMixer(32, num_heads=2, rope=RoPE2d(32)),
                                  lambda: __import__('vittt').layers.VisionTTTMixer(32, 2, mini_batch_size=8)],
                         ids=['vit3', 'vision_ttt'])
def test_inner_update_runs_in_float32_under_autocast(make, monkeypatch):
    """Under bf16 autocast the inner math sees float32 tensors, and the layer stays close to its fp32 output."""
    import vittt.ops.precision as precision
    torch.manual_seed(0)
    mixer = make()
    x = torch.randn(2, 48, 32)
    reference = mixer(x, (6, 8))
    seen = []
    original = precision.in_float32

    def spy(fn, q, *args, **kwargs):
        out = original(lambda *a, **k: (seen.append((a[0].dtype, torch.is_autocast_enabled('cpu'))), fn(*a, **k))[1],
                       q, *args, **kwargs)
        return out

    for module in ('vittt.layers.inner', 'vittt.layers.vision_ttt'):
        monkeypatch.setattr(f'{module}.in_float32', spy)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mixer(x, (6, 8))
    assert seen and all(dtype == torch.float32 and not autocast for dtype, autocast in seen)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 0.05, rel
    bf16 = mixer.to(torch.bfloat16)(x.to(torch.bfloat16), (6, 8))  # a whole bf16 model (no autocast) also works
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()


def test_vision_ttt_mixer_causal_and_minibatch_dependence():
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
