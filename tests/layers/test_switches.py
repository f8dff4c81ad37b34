"""The public switch API of the execution paths (vittt.set_fast_path, vittt.fast_path, vittt.fast_path_settings,
vittt.ops.dwconv_backend): what each switch reaches, exact restoring, the errors, the scoping of the dwconv backend,
and that every path gives the same outputs while really running other code."""
import asyncio
import threading

import pytest
import timm  # (tests/conftest.py imports vittt first: it registers the models and must come before timm)
import torch

import vittt
import vittt.layers.inner as inner_module
import vittt.layers.vision_ttt as vision_ttt_module
import vittt.ops.dwconv.composable as dwconv_module
from vittt.layers import (DWConvInner, FastPathSettings, PerModule, SwiGLUInner, TTTMixer, VisionTTTMixer,
                          fast_path, fast_path_settings, set_fast_path, set_memory_lean)
from vittt.ops import dwconv_inner_grad, dwconv_per_sample, get_dwconv_backend

MODELS = {
    'vit3_tiny': dict(depth=1),
    'hvit3_tiny': dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_heads=(1, 2, 2, 2)),
    'vision_ttt_tiny': dict(depth=1),
}
FUSED_KINDS = {'vit3_tiny': {SwiGLUInner, DWConvInner}, 'hvit3_tiny': {SwiGLUInner, DWConvInner},
               'vision_ttt_tiny': {VisionTTTMixer}}


def _model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **dict(MODELS.get(name, {}), **kwargs)).eval()


def _values(model, switch):
    """{module name: value} of every module having the switch."""
    return {n: getattr(m, switch) for n, m in model.named_modules()
            if (switch == 'fused' and isinstance(m, (SwiGLUInner, DWConvInner, VisionTTTMixer)))
            or (switch != 'fused' and hasattr(m, 'memory_lean'))}


def _all_values(model):
    return {s: _values(model, s) for s in ('fused', 'memory_lean', 'chunk_tokens')}


def test_exported_from_the_package():
    assert vittt.set_fast_path is vittt.layers.set_fast_path is set_fast_path
    assert vittt.fast_path is vittt.layers.fast_path is fast_path
    assert vittt.fast_path_settings is vittt.layers.fast_path_settings is fast_path_settings


# --------------------------------------------------------------------------- what the switches reach


@pytest.mark.parametrize('name', sorted(MODELS))
def test_set_fast_path_switches_every_module_kind(name):
    model = _model(name)
    fused = _values(model, 'fused')
    assert {type(m) for m in model.modules() if isinstance(m, tuple(FUSED_KINDS[name]))} == FUSED_KINDS[name]
    assert fused and all(fused.values())
    previous = set_fast_path(model, fused=False)
    assert isinstance(previous, FastPathSettings) and previous == {'fused': True}
    assert previous.counts == {'fused': len(fused)}
    assert not any(_values(model, 'fused').values())
    assert fast_path_settings(model)['fused'] is False
    set_fast_path(model, **previous)
    assert all(_values(model, 'fused').values())
    assert all(cls.fused is True for cls in FUSED_KINDS[name])  # instances switched, never the class default


@pytest.mark.parametrize('name', sorted(MODELS))
def test_memory_lean_and_chunk_tokens_reach_the_blocks(name):
    model = _model(name)
    blocks = [m for m in model.modules() if hasattr(m, 'memory_lean')]
    previous = set_fast_path(model, memory_lean=True, chunk_tokens=7)
    assert previous.counts == {'memory_lean': len(blocks), 'chunk_tokens': len(blocks)}
    assert all(b.memory_lean and b.chunk_tokens == 7 for b in blocks)
    if blocks:
        assert previous == {'memory_lean': False, 'chunk_tokens': 1024}
        assert fast_path_settings(model).counts['memory_lean'] == len(blocks)
    else:  # Vision-TTT has no memory-lean mode: nothing switched, nothing to restore
        assert previous == {}
    set_fast_path(model, **previous)
    assert all(not b.memory_lean and b.chunk_tokens == 1024 for b in blocks)


def test_timm_model_has_nothing_to_switch():
    model = timm.create_model('deit_tiny_patch16_224', depth=1)
    fused_attn = [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')]
    assert fast_path_settings(model) == {}
    assert fast_path_settings(model).counts == {'fused': 0, 'memory_lean': 0, 'chunk_tokens': 0}
    previous = set_fast_path(model, fused=False, memory_lean=True, chunk_tokens=8)
    assert previous == {} and previous.counts == {'fused': 0, 'memory_lean': 0, 'chunk_tokens': 0}
    set_fast_path(model, **previous)
    with fast_path(model, fused=False, memory_lean=True, dwconv_backend='shifted') as same:
        assert same is model
    assert [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')] == fused_attn  # timm's own switch
    assert set_memory_lean(model, True) == 0


def test_set_memory_lean_is_a_thin_call():
    model = _model('vit3_tiny', depth=2)
    assert set_memory_lean(model, True, chunk_tokens=7) == 2
    assert fast_path_settings(model) == {'fused': True, 'memory_lean': True, 'chunk_tokens': 7}
    assert set_memory_lean(model, False) == 2
    assert fast_path_settings(model) == {'fused': True, 'memory_lean': False, 'chunk_tokens': 1024}
    with pytest.raises(ValueError, match='chunk_tokens must be a positive number of tokens'):
        set_memory_lean(model, True, chunk_tokens=0)


# --------------------------------------------------------------------------- restoring exactly


def _disagreeing_vit3():
    model = _model('vit3_tiny', depth=2)
    model.blocks[0].attn.inner[0].fused = False
    model.blocks[1].memory_lean, model.blocks[1].chunk_tokens = True, 7
    return model


def test_returned_settings_restore_disagreeing_modules_exactly():
    model = _disagreeing_vit3()
    before = _all_values(model)
    assert len(set(before['fused'].values())) == 2  # the modules really disagree
    previous = set_fast_path(model, fused=True, memory_lean=False, chunk_tokens=64)
    assert _all_values(model) == {'fused': dict.fromkeys(before['fused'], True),
                                  'memory_lean': dict.fromkeys(before['memory_lean'], False),
                                  'chunk_tokens': dict.fromkeys(before['chunk_tokens'], 64)}
    assert isinstance(previous['fused'], PerModule) and previous['fused'] == before['fused']
    assert previous['memory_lean'] == {'blocks.0': False, 'blocks.1': True}
    assert previous['chunk_tokens'] == {'blocks.0': 1024, 'blocks.1': 7}
    assert previous.modules == {s: PerModule(v) for s, v in before.items()}
    set_fast_path(model, **previous)
    assert _all_values(model) == before
    # the reader's settings round-trip the same way
    snapshot = fast_path_settings(model)
    assert snapshot.modules == before
    set_fast_path(model, fused=False, memory_lean=True, chunk_tokens=3)
    set_fast_path(model, **snapshot)
    assert _all_values(model) == before


def test_settings_leave_unrequested_switches_alone():
    model = _disagreeing_vit3()
    before = _all_values(model)
    previous = set_fast_path(model, chunk_tokens=5)
    assert set(previous) == {'chunk_tokens'}
    assert _all_values(model) == dict(before, chunk_tokens={'blocks.0': 5, 'blocks.1': 5})
    set_fast_path(model, **previous)
    assert _all_values(model) == before


def test_context_manager_restores_on_exit_and_on_exception():
    model = _disagreeing_vit3()
    before = _all_values(model)
    with fast_path(model, fused=False, memory_lean=True, chunk_tokens=3, dwconv_backend='shifted') as same:
        assert same is model
        assert fast_path_settings(model) == {'fused': False, 'memory_lean': True, 'chunk_tokens': 3}
        assert get_dwconv_backend() == 'shifted'
    assert _all_values(model) == before and get_dwconv_backend() == 'auto'
    with pytest.raises(RuntimeError, match='boom'):
        with fast_path(model, fused=True, memory_lean=False, dwconv_backend='grouped'):
            assert all(_values(model, 'fused').values()) and get_dwconv_backend() == 'grouped'
            raise RuntimeError('boom')
    assert _all_values(model) == before and get_dwconv_backend() == 'auto'
    with fast_path(model):  # nothing asked: nothing changes
        assert _all_values(model) == before
    with fast_path(model, fused=False):  # nests: the inner one restores the outer one's settings
        with fast_path(model, fused=True, chunk_tokens=9):
            assert all(_values(model, 'fused').values())
        assert not any(_values(model, 'fused').values()) and _values(model, 'chunk_tokens') == before['chunk_tokens']
    assert _all_values(model) == before


# --------------------------------------------------------------------------- same results, other code


def _count_calls(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_fused_and_composable_paths_give_the_same_outputs(name, monkeypatch):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    for module, fn in ((inner_module, 'swiglu_ttt_fused'), (inner_module, 'dwconv_ttt_fused'),
                       (vision_ttt_module, 'ttt_scan_fused')):
        _count_calls(monkeypatch, module, fn, calls)
    with torch.no_grad():
        fused = model(x)
        assert calls  # the fused kernels ran ...
        calls.clear()
        with fast_path(model, fused=False):
            composable = model(x)
        assert not calls  # ... and the composable path ran none of them
        assert model(x) is not None and calls  # restored: fused again
    torch.testing.assert_close(composable, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['vit3_tiny', 'hvit3_tiny'])
def test_memory_lean_path_gives_the_same_outputs(name, monkeypatch):
    model = _model(name)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    _count_calls(monkeypatch, TTTMixer, 'forward_lean', calls)
    with torch.inference_mode():
        default = model(x)
        assert not calls
        with fast_path(model, memory_lean=True, chunk_tokens=5):
            lean = model(x)
        assert calls  # the blocks ran their lean path
    torch.testing.assert_close(lean, default, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['vit3_tiny', 'hvit3_tiny'])
def test_dwconv_backend_through_fast_path(name, monkeypatch):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    _count_calls(monkeypatch, dwconv_module, '_shifted_per_sample', calls)
    with torch.no_grad():
        grouped = model(x)
        assert not calls  # eager 'auto' folds the batch into conv groups
        with fast_path(model, dwconv_backend='shifted'):
            shifted = model(x)
        assert calls
    torch.testing.assert_close(shifted, grouped, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize('kwargs,message', [
    (dict(fused=1), r'fused must be True or False .*got 1'),
    (dict(fused='no'), r"fused must be True or False .*got 'no'"),
    (dict(memory_lean=0), r'memory_lean must be True or False .*got 0'),
    (dict(chunk_tokens=0), r'chunk_tokens must be a positive number of tokens .*got 0'),
    (dict(chunk_tokens=-3), r'chunk_tokens must be a positive number of tokens .*got -3'),
    (dict(chunk_tokens=2.5), r'chunk_tokens must be a positive number of tokens .*got 2.5'),
    (dict(chunk_tokens=True), r'chunk_tokens must be a positive number of tokens .*got True'),
    (dict(fused={'blocks.0.attn.inner.0': True}),
     r"fused: the per-module settings must name exactly .*missing: \['blocks.0.attn.inner.1'\]"),
    (dict(fused={'blocks.0.attn.inner.0': True, 'blocks.0.attn.inner.1': True, 'head': False}),
     r"fused: .*not such a module of the model: \['head'\]"),
    (dict(chunk_tokens={'blocks.0': 0}), r"chunk_tokens of module 'blocks.0' must be a positive number"),
], ids=['fused-int', 'fused-str', 'lean-int', 'chunk-0', 'chunk-neg', 'chunk-float', 'chunk-bool',
        'per-module-missing', 'per-module-unknown', 'per-module-value'])
def test_bad_arguments_name_the_problem_and_change_nothing(kwargs, message):
    model = _model('vit3_tiny')
    before = _all_values(model)
    kwargs = dict(dict(fused=False, memory_lean=True, chunk_tokens=9), **kwargs)  # one bad, the others fine
    for switch in (lambda: set_fast_path(model, **kwargs), lambda: fast_path(model, **kwargs).__enter__()):
        with pytest.raises(ValueError, match=message):
            switch()
        assert _all_values(model) == before  # checked before anything is switched


def test_other_errors():
    with pytest.raises(ValueError, match='model must be a torch.nn.Module'):
        set_fast_path('vit3_tiny', fused=True)
    with pytest.raises(TypeError):
        set_fast_path(_model('vit3_tiny'), True)  # keyword-only
    model = _model('vit3_tiny')
    before = _all_values(model)
    with pytest.raises(ValueError, match=r"dwconv backend must be one of \('auto', 'grouped', 'shifted'\), got 'x'"):
        with fast_path(model, fused=False, dwconv_backend='x'):
            pass
    assert _all_values(model) == before and get_dwconv_backend() == 'auto'
    with pytest.raises(ValueError, match='fused must be True or False'):
        with fast_path(model, fused=1, dwconv_backend='shifted'):
            pass
    assert get_dwconv_backend() == 'auto'  # the backend entered first is left again


# --------------------------------------------------------------------------- the dwconv backend's scope


def test_dwconv_backend_nests_and_restores():
    assert get_dwconv_backend() == 'auto'
    with vittt.ops.dwconv_backend('shifted'):
        assert get_dwconv_backend() == 'shifted'
        with vittt.ops.dwconv_backend('grouped'):
            assert get_dwconv_backend() == 'grouped'
        assert get_dwconv_backend() == 'shifted'
        with pytest.raises(KeyError):
            with vittt.ops.dwconv_backend('auto'):
                assert get_dwconv_backend() == 'auto'
                raise KeyError('inside')
        assert get_dwconv_backend() == 'shifted'
    assert get_dwconv_backend() == 'auto'


def test_dwconv_backend_is_invisible_to_other_threads():
    inside, seen, done = threading.Event(), [], threading.Event()

    def other():
        inside.wait(10)
        seen.append(get_dwconv_backend())
        with vittt.ops.dwconv_backend('grouped'):  # and its own setting stays its own
            seen.append(get_dwconv_backend())
            done.set()
            inside.wait(10)

    thread = threading.Thread(target=other)
    thread.start()  # started outside, runs while the main thread is inside
    with vittt.ops.dwconv_backend('shifted'):
        inside.set()
        done.wait(10)
        assert get_dwconv_backend() == 'shifted'
    thread.join(10)
    assert seen == ['auto', 'grouped']
    assert get_dwconv_backend() == 'auto'


def test_dwconv_backend_is_per_asyncio_task():
    async def task(name):
        with vittt.ops.dwconv_backend(name):
            await asyncio.sleep(0)  # let the other task enter its own
            await asyncio.sleep(0)
            return get_dwconv_backend()

    async def both():
        return await asyncio.gather(task('shifted'), task('grouped'))

    assert asyncio.run(both()) == ['shifted', 'grouped']
    assert get_dwconv_backend() == 'auto'


def test_dwconv_backend_changes_the_code_path(monkeypatch):
    calls = []
    _count_calls(monkeypatch, dwconv_module, '_shifted_per_sample', calls)
    _count_calls(monkeypatch, dwconv_module, '_shifted_inner_grad', calls)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 3, 5, 6, generator=g), torch.randn(2, 3, 5, 6, generator=g)
    weight = torch.randn(2, 3, 3, 3, generator=g)

    def run():
        return dwconv_per_sample(x, weight), dwconv_inner_grad(x, e, 3)

    auto = run()
    assert calls == []
    with vittt.ops.dwconv_backend('shifted'):
        shifted = run()
        assert calls == ['_shifted_per_sample', '_shifted_inner_grad']
        with vittt.ops.dwconv_backend('grouped'):
            run()
        assert len(calls) == 2
    run()
    assert len(calls) == 2  # only inside dwconv_backend('shifted')
    for a, b in zip(auto, shifted):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dwconv_backend_under_torch_compile(monkeypatch):
    """torch.compile cannot trace ContextVar.get: the backend is read once per traced graph, no graph break."""
    calls = []
    _count_calls(monkeypatch, dwconv_module, '_shifted_per_sample', calls)
    x, weight = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 3, 3)

    def apply(a, w):
        return dwconv_per_sample(a, w) * 2

    with vittt.ops.dwconv_backend('shifted'):
        out = torch.compile(apply, fullgraph=True, backend='eager')(x, weight)
    assert calls  # traced with the shifted products
    torch.testing.assert_close(out, apply(x, weight), rtol=1e-5, atol=1e-5)
