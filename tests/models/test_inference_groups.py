"""Eval inference on CPU runs each block over groups of samples (``run_block``, sized by
``vittt.layers.lean.CHUNK_ELEMENTS``): the same outputs as the whole batch, the split as budgeted, and never while
autograd records, in training mode or off the CPU's eager path."""
import pytest
import timm
import torch

import vittt.layers.lean as lean

ARCHS = {
    'vit3_tiny': dict(depth=2),
    'hvit3_tiny': dict(depths=(1, 1, 1, 1)),
    'vision_ttt_tiny': dict(depth=2),
}


def _batch_sizes(model, x, grad=False, calls=None):
    """Output and the batch size of every block call (``calls``, if given, collects ``(block name, size)``)."""
    sizes = []
    blocks = [(name, m) for name, m in model.named_modules() if name.count('.') == (3 if 'layers.' in name else 1)
              and ('blocks.' in name)]
    hooks = []
    for name, b in blocks:
        def hook(m, args, name=name):
            sizes.append(args[0].shape[0])
            if calls is not None:
                calls.append((name, args[0].shape[0]))
        hooks.append(b.register_forward_pre_hook(hook))
    with torch.set_grad_enabled(grad):
        out = model(x)
    for h in hooks:
        h.remove()
    return out, sizes


@pytest.mark.parametrize('name', list(ARCHS))
def test_sample_groups_equal_whole_batch(monkeypatch, name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **ARCHS[name]).eval()
    x = torch.randn(5, 3, 64, 64)
    monkeypatch.setattr(lean, 'CHUNK_ELEMENTS', 1 << 40)
    whole, whole_sizes = _batch_sizes(model, x)
    assert set(whole_sizes) == {5}
    # two samples of the first blocks fit: they run on groups of 2, 2, 1 (the stem and merges may band too)
    first = model.layers[0].blocks[0] if name == 'hvit3_tiny' else model.blocks[0]
    widest = max(m.out_features for m in first.modules() if isinstance(m, torch.nn.Linear))
    tokens = 16 * 16 if name == 'hvit3_tiny' else 4 * 4
    monkeypatch.setattr(lean, 'CHUNK_ELEMENTS', 2 * widest * tokens)
    calls = []
    grouped, sizes = _batch_sizes(model, x, calls=calls)
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-5)
    # the first grid's blocks run group by group: every block on the first group before any on the next
    first_grid = calls[:3 * ARCHS[name].get('depth', 1)]
    depth = len(first_grid) // 3
    assert [size for _, size in first_grid] == [2] * depth + [2] * depth + [1] * depth
    assert [n for n, _ in first_grid[:depth]] == [n for n, _ in first_grid[depth:2 * depth]]
    assert len({n for n, _ in first_grid[:depth]}) == depth


def test_no_groups_with_autograd_or_in_training(monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model('vit3_tiny', num_classes=10, depth=2)
    x = torch.randn(3, 3, 32, 32)
    monkeypatch.setattr(lean, 'CHUNK_ELEMENTS', 1)                             # one sample a group, if allowed
    model.eval()
    assert set(_batch_sizes(model, x, grad=True)[1]) == {3}                    # autograd on
    model.train()
    assert set(_batch_sizes(model, x)[1]) == {3}                               # training mode (dropout, drop path)
    model.eval()
    assert set(_batch_sizes(model, x)[1]) == {1}


def test_sample_group_sizes(monkeypatch):
    monkeypatch.setattr(lean, 'CHUNK_ELEMENTS', 100)
    assert lean.sample_group(8, 30) == 3
    assert lean.sample_group(8, 500) == 1                                      # at least one
    assert lean.sample_group(2, 10) == 2                                       # at most the batch


def test_no_groups_off_the_cpu(monkeypatch):
    model = timm.create_model('vit3_tiny', num_classes=10, depth=2).eval().to('meta')
    monkeypatch.setattr(lean, 'CHUNK_ELEMENTS', 1)
    assert set(_batch_sizes(model, torch.empty(3, 3, 32, 32, device='meta'))[1]) == {3}
