"""Import vittt before anything else: it makes the CUDA build of torchvision importable next to CPU torch,
which timm needs (see vittt.compat). Nothing is fetched from the Hugging Face hub during tests."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import vittt  # noqa: E402,F401

import contextlib  # noqa: E402

import pytest  # noqa: E402

import vittt.ops  # noqa: E402


@pytest.fixture
def dwconv_backend():
    """``dwconv_backend(name)`` enters :func:`vittt.ops.dwconv_backend` for the rest of the test (a later call
    overrides an earlier one); all are left at teardown, so the backend is back to what it was."""
    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(vittt.ops.dwconv_backend(name))


@pytest.fixture(scope='session')
def images():
    """``images(b, h, w, seed=0, c=3)``: a ``[b, c, h, w]`` batch of standard-normal images. Seeds the global RNG
    (``torch.manual_seed(seed)``), so what a test draws right after is reproducible too."""
    import torch

    def make(b, h, w, seed=0, c=3):
        torch.manual_seed(seed)
        return torch.randn(b, c, h, w)

    return make


def _same_run(full, resumed):
    """Two Trainers ended in the same state: model and EMA weights bit for bit, and every logged value but times."""
    import json

    import torch

    pairs = [(full.model, resumed.model)] + ([(full.ema.module, resumed.ema.module)] if full.ema else [])
    for a, b in pairs:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ('time_s', 'train_img_s')} for r in rows]
    assert strip(full.history) == strip(resumed.history)
    on_disk = [json.loads(line) for line in (resumed.output / 'metrics.jsonl').read_text().splitlines()]
    assert strip(on_disk) == strip(full.history)


def _kill_at(trainer, update: int) -> None:
    """Run ``trainer.fit()`` until it is killed when ``update`` updates are done; its in-memory state diverges first,
    so only the checkpoint on disk can matter to a resume."""
    class Killed(Exception):
        pass

    step = trainer._update

    def dies(batch):
        if trainer.num_updates == update:
            trainer.optimizer.step()
            raise Killed
        step(batch)

    trainer._update = dies
    with pytest.raises(Killed):
        trainer.fit()


@pytest.fixture(scope='session')
def kill_at():
    """``kill_at(trainer, update)``: see :func:`_kill_at` (the kill-and-resume tests of every task)."""
    return _kill_at


@pytest.fixture(scope='session')
def assert_same_run():
    """``assert_same_run(full, resumed)``: see :func:`_same_run` (the kill-and-resume tests of every task)."""
    return _same_run


@pytest.fixture
def free_port():
    """A TCP port that was free a moment ago (torchrun's --master_port)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def tiny_vae():
    """``make(folder, seed=0)``: a tiny diffusers AutoencoderKL (3 -> 4 latent channels, factor 2) saved to
    ``folder`` with save_pretrained, as a user's local VAE folder; returns the folder."""
    def make(folder, seed: int = 0):
        import torch
        from diffusers import AutoencoderKL
        torch.manual_seed(seed)
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                      up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), latent_channels=4,
                      norm_num_groups=4, layers_per_block=1, sample_size=16).save_pretrained(folder)
        return folder
    return make
