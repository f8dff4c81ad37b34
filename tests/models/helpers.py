"""The fused-vs-composable model check shared by tests/models/test_fast_path.py and test_vision_ttt_fused.py.
(The other shared builders are fixtures: tests/conftest.py, tests/models/conftest.py.)"""
import torch


def run_with_grads(model, x, target, call=None):
    """Forward (through ``call``, default the model itself) and backward; the output and the model's gradients."""
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(x)
    (out * target).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def set_fused(model, fused):
    """Switch every fast-path module (ViT³'s inner models, Vision-TTT's mixers) to ``fused``; returns their count."""
    from vittt import set_fast_path

    return set_fast_path(model, fused=fused).counts['fused']


def assert_fused_equals_composable(model, x, target, rtol32=1e-4):
    """The model on its fast path, then on its composable path: same output and every parameter's gradient
    (float32: within ``rtol32``)."""
    from vittt import fast_path

    dtype = x.dtype
    with fast_path(model, fused=True):
        fast_out, fast_grads = run_with_grads(model, x, target)
    with fast_path(model, fused=False):
        ref_out, ref_grads = run_with_grads(model, x, target)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=rtol32, atol=1e-5)
    torch.testing.assert_close(fast_out, ref_out, **tol)
    assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) == len(list(model.parameters()))
    for key in ref_grads:
        torch.testing.assert_close(fast_grads[key], ref_grads[key], **tol, msg=lambda m: f'{key}: {m}')
