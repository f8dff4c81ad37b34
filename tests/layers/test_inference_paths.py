"""The speed paths of issue 15 compute the same function as the plain modules: RoPE's complex-number rotation
against its real form, the stem's and merges' inference path (BatchNorm folded, ReLU in place) and the MLP's
in-place inference path against the modules run with autograd, the channels-last stem against NCHW, and the
block's out-of-place residuals (training) against the in-place ones (inference)."""
import pytest
import torch
from torch import nn

from vittt.layers import ConvDownsample, ConvStem, RoPE2d, TTTBlock
from vittt.layers.conv import ConvNormAct
from vittt.layers.mlp import TokenMlp


def _randomise_bn(module: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters (a fresh BatchNorm folds to the identity)."""
    torch.manual_seed(3)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize('shape', [(2, 12, 16), (2, 12, 2, 16)])
def test_rope_complex_equals_real_form(shape):
    torch.manual_seed(0)
    rope = RoPE2d(16)
    x = torch.randn(*shape, requires_grad=True)
    out = rope(x, (3, 4))
    ref = rope.rotate_real(x, (3, 4))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-6)


def test_rope_pair_rotates_both_alike_and_handles_strides():
    """q and k rotated as one [B, N, 2, c] view equal each rotated alone; odd offsets and strides of views are
    handled (copied to even ones first); token_offset picks the table rows."""
    torch.manual_seed(1)
    rope = RoPE2d(8)
    y = torch.randn(2, 6, 3 * 8 + 1)
    qk = y[..., 1:17].unflatten(-1, (2, 8))          # odd storage offset, odd row stride
    both = rope(qk, (2, 3))
    torch.testing.assert_close(both[:, :, 0], rope(y[..., 1:9].contiguous(), (2, 3)))
    torch.testing.assert_close(both[:, :, 1], rope(y[..., 9:17].contiguous(), (2, 3)))
    part = rope(y[:, 2:5, :8], (2, 3), token_offset=2)
    torch.testing.assert_close(part, rope(y[..., :8], (2, 3))[:, 2:5])


def test_rope_real_form_under_compile_and_capture(monkeypatch):
    """While a graph is captured the real form runs (ONNX has no complex type)."""
    import vittt.layers.rope as rope_module
    rope = RoPE2d(8)
    x = torch.randn(1, 6, 8)
    calls = []
    monkeypatch.setattr(rope_module, 'symbolic_shapes', lambda: True)
    monkeypatch.setattr(RoPE2d, 'rotate_real', lambda self, *a, **k: calls.append(1) or a[0])
    rope(x, (2, 3))
    assert calls == [1]


@pytest.mark.parametrize('norm,act,stride,groups', [(True, True, 2, 1), (True, False, 1, 1), (False, True, 2, 8)])
def test_conv_norm_act_inference_path(norm, act, stride, groups):
    torch.manual_seed(0)
    m = ConvNormAct(8, 16, 3, stride, 1, groups=groups, bias=not norm, norm=norm, act=act)
    _randomise_bn(m)
    m.eval()
    x = torch.randn(2, 8, 9, 11)
    ref = m(x)                                       # autograd on: the modules
    with torch.no_grad():
        out = m(x)                                   # BatchNorm folded, ReLU in place
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    m.train()                                        # training BatchNorm (batch statistics) is never folded
    with torch.no_grad():
        out_train = m(x)
        plain = m.conv(x)
        plain = m.norm(plain) if norm else plain
        plain = torch.relu(plain) if act else plain
    torch.testing.assert_close(out_train, plain)


def test_stem_channels_last_and_merge_equal_modules():
    torch.manual_seed(0)
    stem, merge = ConvStem(3, 16).eval(), ConvDownsample(16, 32).eval()
    _randomise_bn(stem)
    _randomise_bn(merge)
    x = torch.randn(2, 3, 30, 22)
    with torch.no_grad():
        tokens, grid = stem(x)
        merged, grid2 = merge(tokens, grid)
    ref = stem.conv[4].norm(stem.conv[4].conv(nn.Sequential(*stem.conv[:4])(
        nn.functional.pad(x, (0, 2, 0, 2)))))      # NCHW, plain modules (autograd on)
    assert grid == (8, 6) and grid2 == (4, 3)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    merged_ref, _ = merge(tokens.detach().clone().requires_grad_(), grid)
    torch.testing.assert_close(merged, merged_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('budget', [1, 700, 5000, 40_000, 1 << 22])
@pytest.mark.parametrize('batch,size', [(3, (30, 22)), (1, (33, 17)), (2, (8, 4))])
def test_banded_stem_and_merge_equal_whole_map(monkeypatch, budget, batch, size):
    """Bands of rows and groups of samples (every split from one output row per band to the whole map, odd sides
    included) give the whole-map convolutions' result: the context rows each band reads through the stem's five
    convolutions (two of stride 2) and the merge's three, and the zero rows at the map's edges."""
    import vittt.layers.lean as lean_module
    torch.manual_seed(0)
    stem, merge = ConvStem(3, 16).eval(), ConvDownsample(16, 32).eval()
    _randomise_bn(stem)
    _randomise_bn(merge)
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        monkeypatch.setattr(lean_module, 'CHUNK_ELEMENTS', 1 << 40)             # one band: the whole map
        whole = stem(x)
        merged_whole = merge(*whole)
        monkeypatch.setattr(lean_module, 'CHUNK_ELEMENTS', budget)
        tokens, grid = stem(x)
        merged, grid2 = merge(tokens, grid)
    assert grid == whole[1] and grid2 == merged_whole[1]
    torch.testing.assert_close(tokens, whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, merged_whole[0], atol=1e-5, rtol=1e-5)


def test_banded_convs_split_as_budgeted(monkeypatch):
    """The split follows the budget: a map that fits runs whole, one that does not runs in groups of samples, a
    sample that does not fit in bands of rows; no band's widest map (the merge's 4C' map at full resolution, the
    input of its 3×3 convolution, zero rows included) exceeds the budget."""
    import vittt.layers.lean as lean_module
    torch.manual_seed(0)
    merge = ConvDownsample(8, 8).eval()                                    # 32 channels at the input's 16 × 16
    x = torch.randn(4, 16 * 16, 8)
    original, shapes = ConvNormAct._forward_inference, []

    def recording(self, x, padding=None):
        if self is merge.conv[1]:
            shapes.append(tuple(x.shape))
        return original(self, x, padding)
    monkeypatch.setattr(ConvNormAct, '_forward_inference', recording)
    with torch.no_grad():
        for budget, expected in [(1 << 30, [(4, 32, 16, 16)]),              # whole
                                 (32 * 16 * 16 * 2, [(2, 32, 16, 16)] * 2),   # two samples at a time
                                 # 2 output rows a band: 5 input rows, the top band's 4 (+ the conv's zero row)
                                 (32 * 16 * 5, ([(1, 32, 4, 16)] + [(1, 32, 5, 16)] * 3) * 4)]:
            shapes.clear()
            monkeypatch.setattr(lean_module, 'CHUNK_ELEMENTS', budget)
            merge(x, (16, 16))
            assert shapes == expected, (budget, shapes)


@pytest.mark.parametrize('dwconv', [False, True])
def test_mlp_inference_path(dwconv):
    torch.manual_seed(0)
    mlp = TokenMlp(8, 24, dwconv=dwconv).eval()
    x = torch.randn(2, 12, 8)
    ref = mlp(x, (3, 4))
    with torch.no_grad():
        out = mlp(x, (3, 4))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def _inference_equals_autograd(module: nn.Module, x: torch.Tensor, grid_size, tol: float) -> None:
    """``module(x, grid_size)`` without autograd (the inference paths) equals it with autograd, which still
    differentiates."""
    out = module(x, grid_size)
    with torch.no_grad():
        out_inference = module(x, grid_size)
    torch.testing.assert_close(out_inference, out, atol=tol, rtol=tol)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_block_residuals_same_in_training_and_inference():
    torch.manual_seed(0)
    block = TTTBlock(32, 2, mlp_dwconv=True, rope=RoPE2d(32)).eval()
    _inference_equals_autograd(block, torch.randn(2, 20, 32, requires_grad=True), (4, 5), 1e-5)


class _PlainInner(nn.Module):
    """An inner model without ``out=`` (a user's own): the mixer copies its result into the projection's input."""
    width = out_width = 8
    accepts_rope, lr_width, halo = False, 0, 0

    def forward(self, q, k, v, grid_size, lr_logits=None):
        return q * torch.sigmoid(k) + v


@pytest.mark.parametrize('rope,fused', [(False, True), (True, True), (True, False)])
def test_mixer_writes_inner_outputs_into_one_buffer(rope, fused):
    """Without autograd the inner models write into slices of the projection's input: same output as the
    concatenation under autograd, for the fused SwiGLU (out=), the convolution and a model without out=."""
    from vittt.layers import TTTMixer, vit3_inner_models
    torch.manual_seed(0)
    inner = list(vit3_inner_models(32, 2, 3)) + [_PlainInner()]
    inner[0].fused = fused                      # the SwiGLU inner model's composable path copies into its slice
    mixer = TTTMixer(32, rope=RoPE2d(32) if rope else None, inner_models=inner).eval()
    _inference_equals_autograd(mixer, torch.randn(3, 20, 32, requires_grad=True), (4, 5), 1e-6)


def test_bands_only_on_cpu(monkeypatch):
    """Off the CPU (here the meta device, as for a GPU) the stem and merges run whole: the page faults the bands
    avoid are the CPU allocator's."""
    import vittt.layers.conv as conv_module
    monkeypatch.setattr(conv_module, 'banded_convs', lambda *a, **k: pytest.fail('banded off the CPU'))
    stem, merge = ConvStem(3, 16).eval().to('meta'), ConvDownsample(16, 32).eval().to('meta')
    with torch.no_grad():
        tokens, grid = stem(torch.empty(2, 3, 32, 32, device='meta'))
        merged, _ = merge(tokens, grid)
    assert tokens.shape == (2, 64, 16) and merged.shape == (2, 16, 32)


@pytest.mark.parametrize('budget_rows', [1, 2, 3, 100])
def test_mlp_bands_by_budget_equal_whole(monkeypatch, budget_rows):
    """Outside lean mode the MLP's bands follow ``CHUNK_ELEMENTS`` (hidden activations of ``budget_rows`` grid rows
    of the batch), not ``chunk_tokens``: the same output as one band, for any split, H-ViT³'s conv context included."""
    import vittt.layers.lean as lean
    torch.manual_seed(0)
    block = TTTBlock(16, 2, mlp_dwconv=True).eval()
    block.chunk_tokens = 1                                   # lean mode's setting: not used here
    x, grid = torch.randn(2, 35, 16), (7, 5)
    with torch.no_grad():
        monkeypatch.setattr(lean, 'CHUNK_ELEMENTS', 1 << 40)
        whole = block._mlp_in_bands(x, grid)
        calls = []
        hook = block.mlp.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
        monkeypatch.setattr(lean, 'CHUNK_ELEMENTS', 2 * 64 * 5 * budget_rows)
        banded = block._mlp_in_bands(x, grid)
        hook.remove()
    rows = min(budget_rows, 7)
    assert len(calls) == -(-7 // rows)
    torch.testing.assert_close(banded, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole, x + block.mlp(block.norm2(x), grid), atol=1e-6, rtol=1e-6)


def test_rope_in_place_equals_out_of_place():
    """``inplace=True`` rotates the tensor itself (a view into a projection's output) with the same values; where
    the pairs sit at odd offsets it returns a new tensor and leaves the input alone."""
    torch.manual_seed(2)
    rope = RoPE2d(8)
    y = torch.randn(2, 6, 3 * 8)
    expected = rope(y[..., :16].unflatten(-1, (2, 8)), (2, 3))
    qk = y[..., :16].unflatten(-1, (2, 8))
    out = rope(qk, (2, 3), inplace=True)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(y[..., :16].unflatten(-1, (2, 8)), expected, atol=0, rtol=0)
    z = torch.randn(2, 6, 3 * 8 + 1)
    odd = z[..., 1:17].unflatten(-1, (2, 8))
    before = odd.clone()
    out = rope(odd, (2, 3), inplace=True)
    assert torch.equal(odd, before) and out.data_ptr() != z.data_ptr()
    torch.testing.assert_close(out, rope(before, (2, 3)), atol=0, rtol=0)


@pytest.mark.parametrize('cls_token', [False, True])
def test_vision_ttt_block_inference_path(cls_token):
    """Vittt's block without autograd (residuals in place, the SwiGLU through oneDNN post-ops) equals the block run
    with autograd."""
    from vittt.models.vision_ttt import VisionTTTBlock
    torch.manual_seed(0)
    block = VisionTTTBlock(24, 2, num_prefix_tokens=int(cls_token), mixer_kwargs=dict(mini_batch_size=4)).eval()
    x = torch.randn(2, 20 + int(cls_token), 24, requires_grad=True)
    ref = block(x, (4, 5))
    with torch.no_grad():
        out = block(x, (4, 5))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', ['vit3', 'hvit3', 'vision_ttt'])
def test_training_mode_without_autograd_keeps_drop_path(kind):
    """In training mode a block without autograd (``torch.no_grad()``, e.g. a teacher or a statistics pass) computes
    what it computes with autograd, drop-path included: the eval-only fast paths stay off. The same seed gives the
    same output both ways, and some samples' branches are dropped (the output is not the eval output)."""
    from vittt.models.vision_ttt import VisionTTTBlock
    torch.manual_seed(0)
    if kind == 'vision_ttt':
        block = VisionTTTBlock(24, 2, drop_path=0.5, mixer_kwargs=dict(mini_batch_size=4))
    else:
        block = TTTBlock(24, 2, drop_path=0.5, mlp_dwconv=kind == 'hvit3', rope=RoPE2d(24) if kind == 'hvit3' else None)
    x = torch.randn(8, 20, 24)
    block.train()
    torch.manual_seed(1)
    ref = block(x, (4, 5))
    torch.manual_seed(1)
    with torch.no_grad():
        out = block(x, (4, 5))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(out, block.eval()(x, (4, 5)), atol=1e-3)


def _scaling_hook(module, inputs, output):
    """A forward hook that changes the layer's output: a path that bypassed it would compute another function."""
    return output * 1.5


def _stem_and_merge():
    stem, merge = ConvStem(3, 16), ConvDownsample(16, 32)
    _randomise_bn(stem)
    _randomise_bn(merge)
    return nn.ModuleList([stem, merge]).eval()


def _run_stem_and_merge(model, x):
    return model[1](*model[0](x))[0]


@pytest.mark.parametrize('child', ['cpe', 'mlp.dwc', 'mlp.act', 'mlp.fc1', 'attn.qkv', 'global'])
def test_block_inference_paths_call_hooked_layers(child):
    """Without autograd a hooked child of the block (CPE, the MLP's convolution, activation and linears, the
    QKV projection under memory-lean bands) is called as the module: the same output as with autograd, where
    every module runs; a global hook (here on every ``nn.Conv2d``) likewise."""
    from vittt.layers import set_memory_lean
    torch.manual_seed(0)
    block = TTTBlock(32, 2, mlp_dwconv=True, rope=RoPE2d(32)).eval()
    set_memory_lean(block, True, chunk_tokens=8)
    if child == 'global':
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: o * 1.5 if type(m) is nn.Conv2d else None)
    else:
        handle = block.get_submodule(child).register_forward_hook(_scaling_hook)
    try:
        _inference_equals_autograd(block, torch.randn(2, 20, 32, requires_grad=True), (4, 5), 1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize('child', ['0.conv.1.conv', '0.conv.1.norm', '0.conv.0.act', '0.conv.2', '0.conv',
                                   '1.conv.1.conv', '1.conv.2.norm'])
@pytest.mark.parametrize('budget', [700, 1 << 22])
def test_conv_inference_paths_call_hooked_layers(monkeypatch, child, budget):
    """The stem's and merge's folded (BatchNorm into the convolution) and banded inference paths run only on plain,
    hook-free layers; with a hooked convolution, BatchNorm, ReLU, ConvNormAct or sequence they give the modules'
    result, in bands or whole."""
    import vittt.layers.lean as lean_module
    torch.manual_seed(0)
    model = _stem_and_merge()
    model.get_submodule(child).register_forward_hook(_scaling_hook)
    x = torch.randn(2, 3, 30, 22)
    ref = _run_stem_and_merge(model, x)                                   # autograd on: every module runs
    monkeypatch.setattr(lean_module, 'CHUNK_ELEMENTS', budget)
    with torch.no_grad():
        out = _run_stem_and_merge(model, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('child', ['fc2', 'act'])
def test_mlp_training_path_calls_hooked_layers(child):
    """The training MLP's memory-saving GELU→fc2 function reads fc2's weights: with a hooked fc2 or GELU the
    modules run, and the hook's change reaches output and gradient."""
    torch.manual_seed(0)
    mlp = TokenMlp(8, 24).train()
    getattr(mlp, child).register_forward_hook(_scaling_hook)
    x = torch.randn(2, 12, 8, requires_grad=True)
    out = mlp(x, (3, 4))
    a = nn.functional.gelu(mlp.fc1(x)) * (1.5 if child == 'act' else 1.0)
    ref = nn.functional.linear(a, mlp.fc2.weight, mlp.fc2.bias)
    ref = ref * (1.5 if child == 'fc2' else 1.0)
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (grad_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize('grad', [True, False], ids=['autograd', 'inference'])
def test_cpe_residual_is_one_folded_convolution(grad):
    """``x + DWConv(x)`` as one convolution with the identity in its kernel, with and without autograd: the output
    and every gradient (input, kernel, bias) equal the convolution plus the sum, and no add runs over the map; a
    hooked convolution is called as the module (its hook's change is kept)."""
    from torch.profiler import profile
    from vittt.layers import cpe_residual
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 20, 16, requires_grad=True)

    def plain(t):
        return t + conv(t.transpose(1, 2).reshape(2, 16, 4, 5)).flatten(2).transpose(1, 2)

    with torch.set_grad_enabled(grad), profile(record_shapes=True) as prof:
        out = cpe_residual(conv, x, (4, 5))
    # (the one add is the kernel's: [16, 1, 3, 3] + the centre tap; none over the map)
    assert [e.input_shapes[0] for e in prof.events() if e.name in ('aten::add', 'aten::add_')] == [[16, 1, 3, 3]]
    with torch.set_grad_enabled(grad):
        ref = plain(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    if grad:
        target = torch.randn_like(out)
        ours = torch.autograd.grad((out * target).sum(), (x, conv.weight, conv.bias))
        theirs = torch.autograd.grad((ref * target).sum(), (x, conv.weight, conv.bias))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    conv.register_forward_hook(_scaling_hook)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(cpe_residual(conv, x, (4, 5)), x + 1.5 * (ref - x), atol=1e-5, rtol=1e-5)
