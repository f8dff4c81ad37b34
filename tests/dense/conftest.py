"""Shared fixtures of the dense tests: the tiny offline dataset, generated once per test module."""
from pathlib import Path

import pytest

FMNIST_DIR = Path('/usr/share/datasets/fashion-mnist')


@pytest.fixture(scope='module')
def tiny_dense(tmp_path_factory) -> Path:
    """The root of a ``make_dense_dataset(tiny=True, seed=0)`` folder (16 train / 8 val at 96x96, Fashion-MNIST
    objects): ``images/``, ``semantic/``, ``annotations/instances_{train,val}.json``, ``meta.json``. Skips without
    the Debian Fashion-MNIST files or pycocotools. Treat it as read-only: it is shared by the tests of a module."""
    pytest.importorskip('pycocotools', reason="the dense dataset needs pycocotools (pip install 'vittt[dense]')")
    if not (FMNIST_DIR / 'train-labels-idx1-ubyte.gz').is_file():
        pytest.skip('Debian package dataset-fashion-mnist is not installed')
    from vittt.data import make_dense_dataset

    root = tmp_path_factory.mktemp('tiny_dense')
    make_dense_dataset(root, tiny=True, seed=0, source_root=FMNIST_DIR)
    return root
