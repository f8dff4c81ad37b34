"""Import vittt before anything else: it makes the CUDA build of torchvision importable next to CPU torch,
which timm needs (see vittt.compat)."""
import vittt  # noqa: F401

import pytest  # noqa: E402

from vittt.ops import set_dwconv_backend  # noqa: E402


@pytest.fixture
def dwconv_backend():
    """``dwconv_backend(name)`` switches :func:`vittt.ops.set_dwconv_backend` for one test and restores it after."""
    previous = set_dwconv_backend('auto')
    yield set_dwconv_backend
    set_dwconv_backend(previous)
