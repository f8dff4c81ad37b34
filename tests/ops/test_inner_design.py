"""The design space's inner models (vittt.ops.inner): every closed-form gradient and every composed training against
plain autograd references, and the compositions against the hand-optimised ViT³ ops."""
import pytest
import torch

from vittt.ops import INNER_LOSSES, dwconv_ttt, get_inner_loss, swiglu_ttt
from vittt.ops.inner import inner_fit, inner_stats, inner_step, inner_ttt, make_inner_function
from vittt.ops.inner.reference import reference_forward, reference_grads, reference_inner_ttt
from vittt.ops.scan.reference import reference_ttt_scan

DT = torch.float64
GRID = (3, 4)
MODELS = [('fc', {}), ('silu_fc', {}), ('mlp', {}), ('mlp', dict(ratio=2)), ('mlp', dict(depth=3)),
          ('mlp', dict(depth=3, ratio=2)), ('mlp', dict(residual='add')), ('mlp', dict(residual='identity_w2')),
          ('swiglu', {}), ('swiglu', dict(ratio=2)), ('glu', {}), ('conv3x3', {}), ('dwconv3x3', {})]
IDS = [name + ''.join(f'-{k}{v}' for k, v in kw.items()) for name, kw in MODELS]


def _state(fn, heads, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(*shape, generator=g, dtype=DT) * std).requires_grad_(True)
            for n, shape in fn.state_shapes(heads).items()}


def _qkv(b=2, h=2, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    return [torch.randn(b, h, n, d, generator=g, dtype=DT).requires_grad_(True) for _ in range(3)]


@pytest.mark.parametrize('name', sorted(INNER_LOSSES))
def test_every_loss_gradient_is_autograd_of_its_value(name):
    loss = get_inner_loss(name)
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 7, 4, generator=g, dtype=DT) * 2
    target = torch.randn(2, 3, 7, 4, generator=g, dtype=DT)
    for dims, x in (((-2, -1), pred), ((-3, -2, -1), pred.reshape(2, 3, 4, 7))):
        t = target.reshape(x.shape)
        leaf = x.clone().requires_grad_(True)
        expected, = torch.autograd.grad(loss.value(leaf, t, 0.7, 7, dims=dims), leaf)
        got = loss.grad(x if loss.needs_prediction else None, t, 0.7, 7, dims=dims)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('loss', ['dot', 'mse', 'rmse', 'mae', 'smooth_l1'])
@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_one_step_equals_autograd_reference_with_outer_gradients(name, kwargs, loss):
    d = 3
    fn = make_inner_function(name, d, **kwargs)
    q, k, v = _qkv(d=d)
    state = _state(fn, heads=2)
    settings = dict(loss=get_inner_loss(loss), scale=0.5, inner_lr=0.8, grid_size=GRID)
    out = inner_ttt(fn, q, k, v, state, **settings)
    ref = reference_inner_ttt(name, q, k, v, state, **settings, residual=kwargs.get('residual'),
                              depth=kwargs.get('depth', 2))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    # the outer gradient (gradient of gradient) of every input
    probe = torch.randn_like(out)
    inputs = [q, k, v, *state.values()]
    got = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)
    exp = torch.autograd.grad((ref * probe).sum(), inputs, allow_unused=True)
    for a, b in zip(got, exp):
        if a is None or b is None:
            assert (a is None or not a.abs().max()) and (b is None or not b.abs().max())
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('name,kwargs', [('mlp', {}), ('glu', {}), ('conv3x3', {}), ('dwconv3x3', {})],
                         ids=['mlp', 'glu', 'conv3x3', 'dwconv3x3'])
@pytest.mark.parametrize('epochs', [2, 3])
def test_epochs_equal_the_explicit_loop_of_single_steps(name, kwargs, epochs):
    fn = make_inner_function(name, 3, **kwargs)
    q, k, v = _qkv()
    state = _state(fn, 2)
    settings = dict(loss=get_inner_loss('mse'), scale=0.5, inner_lr=1.0, grid_size=GRID)
    out = inner_ttt(fn, q, k, v, state, epochs=epochs, **settings)
    torch.testing.assert_close(out, reference_inner_ttt(name, q, k, v, state, epochs=epochs, **settings))
    # and = the loop of inner_step over fn.grads, written out here
    kf, vf = fn.features(k, GRID), fn.values(v, GRID)
    s = state
    for _ in range(epochs):
        s = inner_step(fn, s, fn.grads(kf, vf, s, settings['loss'], 0.5), 1.0)
    torch.testing.assert_close(out, fn.unfeatures(fn.apply(fn.features(q, GRID), s), 2))


@pytest.mark.parametrize('batches', [2, 3, 5])
@pytest.mark.parametrize('name', ['mlp', 'fc', 'conv3x3'])
def test_minibatches_equal_the_explicit_sequential_loop(name, batches):
    fn = make_inner_function(name, 3)
    q, k, v = _qkv()
    state = _state(fn, 2)
    settings = dict(loss=get_inner_loss('dot'), scale=0.5, inner_lr=1.0, grid_size=GRID)
    out = inner_ttt(fn, q, k, v, state, batches=batches, **settings)
    torch.testing.assert_close(out, reference_inner_ttt(name, q, k, v, state, batches=batches, **settings))
    assert not torch.allclose(out, inner_ttt(fn, q, k, v, state, **settings))


def test_dynamic_lr_weighs_each_token():
    fn = make_inner_function('mlp', 3)
    q, k, v = _qkv()
    state = _state(fn, 2)
    weights = torch.rand(2, 2, 12, dtype=DT)
    for loss in ('dot', 'mse'):
        settings = dict(loss=get_inner_loss(loss), scale=0.5, inner_lr=1.0, grid_size=GRID, token_weights=weights)
        torch.testing.assert_close(inner_ttt(fn, q, k, v, state, **settings),
                                   reference_inner_ttt('mlp', q, k, v, state, **settings))
    glu = make_inner_function('glu', 3)
    s = _state(glu, 2)
    settings = dict(loss=get_inner_loss('mse'), scale=0.5, grid_size=GRID, token_weights=weights)
    torch.testing.assert_close(inner_ttt(glu, q, k, v, s, **settings),
                               reference_inner_ttt('glu', q, k, v, s, **settings))


@pytest.mark.parametrize('loss', ['dot', 'mse'])
def test_glu_and_dwconv_compositions_equal_the_vit3_ops(loss):
    q, k, v = _qkv(d=4)
    loss = get_inner_loss(loss)
    glu = make_inner_function('glu', 4)
    s = _state(glu, 2)
    torch.testing.assert_close(inner_ttt(glu, q, k, v, s, loss=loss, scale=1 / 3),
                               swiglu_ttt(q, k, v, s['w1'], s['w2'], loss=loss, scale=1 / 3))
    dw = make_inner_function('dwconv3x3', 4)
    s = _state(dw, 2)
    maps = [t.permute(0, 1, 3, 2).reshape(2, 8, *GRID) for t in (q, k, v)]
    expected = dwconv_ttt(*maps, s['weight'].reshape(8, 1, 3, 3), loss=loss, scale=1 / 3)
    got = inner_ttt(dw, q, k, v, s, loss=loss, scale=1 / 3, grid_size=GRID)
    torch.testing.assert_close(got, expected.reshape(2, 2, 4, 12).transpose(-2, -1))


def test_one_epoch_one_batch_is_the_plain_step():
    fn = make_inner_function('mlp', 3)
    q, k, v = _qkv()
    state = _state(fn, 2)
    kw = dict(loss=get_inner_loss('dot'), scale=0.5)
    trained = inner_fit(fn, k, v, state, **kw)
    torch.testing.assert_close(inner_ttt(fn, q, k, v, state, epochs=1, batches=1, **kw), fn.apply(q, trained))


def test_stats_report_a_falling_loss_and_the_update_size():
    fn = make_inner_function('mlp', 3)
    _, k, v = _qkv()
    state = {n: w.detach() for n, w in _state(fn, 2).items()}
    stats = inner_stats(fn, k.detach(), v.detach(), state, loss=get_inner_loss('mse'), scale=0.5, inner_lr=0.1)
    assert set(stats) == {'loss_before', 'loss_after', 'grad_norm', 'grad_norm_normalized', 'update'}
    assert all(t.shape == (2, 2) for t in stats.values())
    assert (stats['loss_after'] < stats['loss_before']).all()          # a small step down the gradient
    assert (stats['grad_norm_normalized'] < stats['grad_norm']).all()   # g / (‖g‖ + 1) shrinks
    assert (stats['update'] > 0).all()


@pytest.mark.parametrize('bad,match', [
    (dict(name='nope'), 'unknown inner model'), (dict(name='glu', ratio=2), 'inner_ratio must be 1'),
    (dict(name='mlp', depth=4), 'inner_depth must be 2 or 3'), (dict(name='fc', depth=3), "inner_model='mlp' only"),
    (dict(name='mlp', residual='x'), 'inner_residual must be one of'),
    (dict(name='mlp', ratio=2, residual='identity_w2'), 'square last layer'), (dict(name='mlp', ratio=0), 'positive')])
def test_bad_switches_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        make_inner_function(bad.pop('name'), 4, **bad)


def test_bad_schedules_are_named():
    q, k, v = _qkv()
    dw = make_inner_function('dwconv3x3', 3)
    with pytest.raises(ValueError, match='token-wise inner model'):
        inner_ttt(dw, q, k, v, _state(dw, 2), loss=get_inner_loss('dot'), scale=1.0, batches=2, grid_size=GRID)
    mlp = make_inner_function('mlp', 3)
    with pytest.raises(ValueError, match='inner_epochs must be a positive integer'):
        inner_ttt(mlp, q, k, v, _state(mlp, 2), loss=get_inner_loss('dot'), scale=1.0, epochs=0)


@pytest.mark.parametrize('name', ['ttt_linear', 'ttt_mlp'])
def test_vision_ttt_inner_models_gradients_and_minibatch_training(name):
    fn = make_inner_function(name, 3, 1 if name == 'ttt_linear' else 2)
    q, k, v = _qkv()
    state = _state(fn, 2)
    weights = torch.rand(2, 2, 12, dtype=DT)
    mse = get_inner_loss('mse')
    got = fn.grads(k, v, state, mse, 1.0, token_weights=weights)
    expected = reference_grads(reference_forward(name), k, v, state, mse, 1.0, weights)
    assert set(got) == set(state) - set(fn.fixed)           # the LayerNorm affine is not stepped
    for n in got:
        torch.testing.assert_close(got[n], expected[n])
    # = Vision-TTT's non-causal mini-batch TTT, token by token (mini-batches of 5: 5, 5, 2 tokens)
    out = inner_ttt(fn, q, k, v, state, loss=mse, scale=1.0, normalize=False, token_weights=weights,
                    mini_batch_size=5)
    per_head = {n: t[0] for n, t in state.items()}
    torch.testing.assert_close(out, reference_ttt_scan(name[4:], q, k, v, weights, per_head, mini_batch_size=5))
