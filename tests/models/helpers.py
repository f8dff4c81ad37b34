"""Shared by the model tests: inputs and a forward/backward run with and without gradient checkpointing."""
import torch


def images(b, h, w, seed=0, c=3):
    torch.manual_seed(seed)
    return torch.randn(b, c, h, w)


def ceil_div(a, b):
    return -(-a // b)


def checkpointing_runs(model, x, target, monkeypatch):
    """Runs forward + backward without, then with, gradient checkpointing (counting torch.utils.checkpoint calls).
    Returns ``(ref_out, ref_grads, ck_out, ck_grads, calls, run)``; ``calls`` keeps counting for later ``run()``s."""

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out * target).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

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


def run_with_grads(model, x, target, call=None):
    """Forward (through ``call``, default the model itself) and backward; the output and the model's gradients."""
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(x)
    (out * target).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def set_fused(model, fused):
    """Switch every fast-path module (ViT³'s inner models, Vision-TTT's mixers) to ``fused``; returns their count."""
    from vittt.layers import DWConvInner, SwiGLUInner, VisionTTTMixer

    switched = [m for m in model.modules() if isinstance(m, (SwiGLUInner, DWConvInner, VisionTTTMixer))]
    for m in switched:
        m.fused = fused
    return len(switched)


def assert_fused_equals_composable(model, x, target):
    """The model on its fast path, then on its composable path: same output and every parameter's gradient."""
    dtype = x.dtype
    set_fused(model, True)
    fast_out, fast_grads = run_with_grads(model, x, target)
    set_fused(model, False)
    ref_out, ref_grads = run_with_grads(model, x, target)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_out, ref_out, **tol)
    assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) == len(list(model.parameters()))
    for key in ref_grads:
        torch.testing.assert_close(fast_grads[key], ref_grads[key], **tol, msg=lambda m: f'{key}: {m}')
