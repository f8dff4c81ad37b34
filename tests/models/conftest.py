"""Fixtures shared by the model tests: seeded builds, BatchNorm calibration, forward/backward runs with and without
gradient checkpointing, and the comparisons several modules make (``images`` lives in tests/conftest.py)."""
import pytest
import timm  # (tests/conftest.py imports vittt first: it registers the models and must come before timm)
import torch
from helpers import run_with_grads as _run_with_grads  # one copy, also used by assert_fused_equals_composable


@pytest.fixture(scope='session')
def build_model():
    """``build_model(name, **kwargs)``: ``timm.create_model`` after ``torch.manual_seed(0)``, in eval mode (the same
    name and kwargs give the same weights)."""

    def build(name, **kwargs):
        torch.manual_seed(0)
        return timm.create_model(name, **kwargs).eval()

    return build


@pytest.fixture(scope='session')
def run_with_grads():
    """``run_with_grads(model, x, target, call=None)``: forward (through ``call``, default the model itself) and
    backward of ``(out * target).sum()``; returns the detached output and ``{name: grad}`` of the parameters that got
    a gradient."""
    return _run_with_grads


@pytest.fixture
def checkpointing_runs(monkeypatch):
    """``checkpointing_runs(model, x, target)`` runs forward + backward without, then with, gradient checkpointing,
    counting ``torch.utils.checkpoint.checkpoint`` calls. Returns ``(ref_out, ref_grads, ck_out, ck_grads, calls,
    run)``; ``calls`` keeps counting for later ``run()``s (which use the model's current checkpointing setting)."""

    def runs(model, x, target):
        def run():
            out, grads = _run_with_grads(model, x, target)
            missing = [n for n, _ in model.named_parameters() if n not in grads]
            assert missing == [], f'parameters without gradient: {missing}'
            return out, grads

        ref_out, ref_grads = run()
        calls = []
        real_checkpoint = torch.utils.checkpoint.checkpoint

        def counting_checkpoint(*args, **kwargs):
            calls.append(1)
            return real_checkpoint(*args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', counting_checkpoint)
        model.set_grad_checkpointing(True)
        ck_out, ck_grads = run()
        return ref_out, ref_grads, ck_out, ck_grads, calls, run

    return runs


@pytest.fixture(scope='session')
def calibrate_batchnorm(images):
    """``calibrate_batchnorm(model)`` gives every BatchNorm the running statistics of one batch of images and returns
    the model in eval mode (a no-op for models without BatchNorm).

    At initialisation (running mean 0, variance 1) an eval-mode H-ViT³ maps all images to nearly the same features
    (stage-4 outputs of different images differ by ~1e-4), which would make equality checks between outputs almost
    vacuous; with calibrated statistics the outputs depend on the input at O(1)."""

    def calibrate(model):
        bns = [mod for mod in model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the statistics of exactly this batch
        model.train()
        with torch.no_grad():
            model(images(4, 64, 48, seed=1234))
        for bn in bns:
            bn.momentum = 0.1
        return model.eval()

    return calibrate


@pytest.fixture(scope='session')
def assert_all_equal():
    """``assert_all_equal(actual, expected)``: two lists of tensors of the same length, pairwise equal in shape and
    bitwise in value."""

    def check(actual, expected):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert a.shape == e.shape, f'entry {i}: {tuple(a.shape)} vs {tuple(e.shape)}'
            assert torch.equal(a, e), f'entry {i} differs by {(a - e).abs().max().item():.3g}'

    return check


@pytest.fixture(scope='session')
def assert_batch_independent(images):
    """``assert_batch_independent(model, dtype, tol, size=(64, 48))``: on 3 images, each image's features equal its
    single-image run, changing image 2 leaves the features and logits of images 0 and 1 unchanged (within ``tol``),
    and changes image 2's own features by more than 0.1."""

    def check(model, dtype, tol, size=(64, 48)):
        x = images(3, *size, seed=12).to(dtype)
        changed = x.clone()
        torch.manual_seed(13)
        changed[2] = torch.randn_like(changed[2])
        with torch.no_grad():
            feats = model.forward_features(x)
            singles = [model.forward_features(x[i:i + 1]) for i in range(3)]
            feats_changed = model.forward_features(changed)
            logits = model.forward_head(feats)
            logits_single = [model.forward_head(s) for s in singles]
            logits_changed = model.forward_head(feats_changed)
        for i in range(3):
            torch.testing.assert_close(feats[i:i + 1], singles[i], **tol)
            torch.testing.assert_close(logits[i:i + 1], logits_single[i], **tol)
        torch.testing.assert_close(feats_changed[:2], feats[:2], **tol)
        torch.testing.assert_close(logits_changed[:2], logits[:2], **tol)
        assert (feats_changed[2] - feats[2]).abs().max() > 0.1, 'the changed image should change its own output'

    return check
