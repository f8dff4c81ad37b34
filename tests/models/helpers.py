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
