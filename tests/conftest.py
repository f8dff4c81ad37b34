"""Import vittt before anything else: it makes the CUDA build of torchvision importable next to CPU torch,
which timm needs (see vittt.compat)."""
import vittt  # noqa: F401

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
