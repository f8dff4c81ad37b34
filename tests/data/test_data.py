"""vittt.data: the Fashion-MNIST IDX reader, the class-folder dataset, the dataset factory and the transforms."""
import gzip
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from vittt.data import (FASHION_MNIST_CLASSES, DatasetLayoutError, FashionMNIST, IDXFormatError, ImageFolder,
                        ImageLoadError, ToMode, create_dataset, create_transforms, num_classes_of, read_idx)

FMNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
needs_fmnist = pytest.mark.skipif(not (FMNIST_DIR / 'train-labels-idx1-ubyte.gz').is_file(),
                                  reason='Debian package dataset-fashion-mnist is not installed')
RAND_AUG = {'auto_augment': 'rand-m9-mstd0.5-inc1', 'reprob': 0.25, 'remode': 'pixel', 'recount': 1,
            'interpolation': 'bicubic', 'hflip': 0.5}


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv('VITTT_FASHION_MNIST', raising=False)


@pytest.fixture(scope='module')
def fmnist():
    if not (FMNIST_DIR / 'train-labels-idx1-ubyte.gz').is_file():
        pytest.skip('Debian package dataset-fashion-mnist is not installed')
    return {'train': FashionMNIST('train', root=FMNIST_DIR), 'test': FashionMNIST('test', root=FMNIST_DIR)}


def write_idx(path: Path, magic: int, shape, data: bytes) -> Path:
    with gzip.open(path, 'wb') as f:
        f.write(struct.pack('>I', magic) + struct.pack(f'>{len(shape)}I', *shape) + data)
    return path


def write_fmnist(root: Path, n: int = 5, prefix: str = 'train') -> np.ndarray:
    """A tiny valid Fashion-MNIST split: n images whose pixels all equal their label."""
    root.mkdir(parents=True, exist_ok=True)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = np.repeat(labels, 28 * 28).astype(np.uint8)
    write_idx(root / f'{prefix}-images-idx3-ubyte.gz', 2051, (n, 28, 28), images.tobytes())
    write_idx(root / f'{prefix}-labels-idx1-ubyte.gz', 2049, (n,), labels.tobytes())
    return labels


# ---------------------------------------------------------------- Fashion-MNIST

@needs_fmnist
def test_fashion_mnist_counts(fmnist):
    for split, n in (('train', 60_000), ('test', 10_000)):
        ds = fmnist[split]
        assert len(ds) == n
        assert ds.classes == list(FASHION_MNIST_CLASSES)
        assert len(ds.classes) == 10 and num_classes_of(ds) == 10
        assert ds.classes[0] == 'T-shirt/top' and ds.classes[9] == 'Ankle boot'
        assert ds.data.shape == (n, 28, 28) and ds.data.dtype == np.uint8
        counts = np.bincount(ds.labels, minlength=10)
        assert counts.tolist() == [n // 10] * 10
        assert min(ds.targets) == 0 and max(ds.targets) == 9 and len(ds.targets) == n
        for i in (0, n // 2, n - 1):
            img, label = ds[i]
            assert isinstance(img, Image.Image) and img.mode == 'L' and img.size == (28, 28)
            assert isinstance(label, int) and 0 <= label <= 9
            assert np.array_equal(np.asarray(img), ds.data[i])


@needs_fmnist
def test_fashion_mnist_first_sample_matches_independent_parse(fmnist):
    with gzip.open(FMNIST_DIR / 'train-labels-idx1-ubyte.gz', 'rb') as f:
        magic, count = struct.unpack('>II', f.read(8))
        first_label = f.read(1)[0]
    with gzip.open(FMNIST_DIR / 'train-images-idx3-ubyte.gz', 'rb') as f:
        header = struct.unpack('>IIII', f.read(16))
        first_image = np.frombuffer(f.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    assert (magic, count) == (2049, 60_000)
    assert header == (2051, 60_000, 28, 28)
    img, label = fmnist['train'][0]
    assert label == first_label == 9  # the first training image is an ankle boot
    assert np.array_equal(np.asarray(img), first_image)


def test_idx_wrong_magic_names_the_file(tmp_path):
    write_fmnist(tmp_path)
    bad = write_idx(tmp_path / 'train-images-idx3-ubyte.gz', 2049, (5, 28, 28), bytes(5 * 28 * 28))
    with pytest.raises(IDXFormatError, match='magic') as info:
        FashionMNIST('train', root=tmp_path)[0]
    assert str(bad) in str(info.value)
    with pytest.raises(IDXFormatError, match='magic'):
        read_idx(write_idx(tmp_path / 'x.gz', 0x12345678, (1,), b'\0'))


def test_idx_truncated_and_mismatched(tmp_path):
    write_fmnist(tmp_path)
    short = write_idx(tmp_path / 'train-images-idx3-ubyte.gz', 2051, (5, 28, 28), bytes(4 * 28 * 28))
    with pytest.raises(IDXFormatError, match='truncated') as info:
        len(FashionMNIST('train', root=tmp_path))
    assert str(short) in str(info.value)
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', 2051, (4, 28, 28), bytes(4 * 28 * 28))
    with pytest.raises(IDXFormatError, match='4 images but .* 5 labels'):
        len(FashionMNIST('train', root=tmp_path))
    cut = tmp_path / 'cut.gz'
    cut.write_bytes((tmp_path / 'train-labels-idx1-ubyte.gz').read_bytes()[:-6])  # gzip stream cut short
    with pytest.raises(IDXFormatError, match='cut.gz'):
        read_idx(cut)


def test_fashion_mnist_env_override_and_missing(tmp_path, monkeypatch):
    labels = write_fmnist(tmp_path / 'env', n=7)
    monkeypatch.setenv('VITTT_FASHION_MNIST', str(tmp_path / 'env'))
    ds = FashionMNIST('train')
    assert len(ds) == 7 and ds.root == tmp_path / 'env'
    img, label = ds[3]
    assert label == labels[3] and np.asarray(img).max() == labels[3]
    assert len(create_dataset('fashion_mnist', 'train')) == 7
    write_fmnist(tmp_path / 'arg', n=3)
    assert len(FashionMNIST('train', root=tmp_path / 'arg')) == 3  # root= beats the env var
    with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist') as info:
        FashionMNIST('test')  # the env dir has no t10k files
    assert 't10k-images-idx3-ubyte' in str(info.value)
    monkeypatch.setenv('VITTT_FASHION_MNIST', str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist') as info:
        FashionMNIST('train')
    assert 'nowhere' in str(info.value)
    with pytest.raises(ValueError, match='split'):
        FashionMNIST('val', root=tmp_path / 'arg')


# ---------------------------------------------------------------- class folders

def make_tree(root: Path, splits=('train', 'val'), per_class: int = 3) -> Path:
    """root/<split>/{cat,dog,fish}/ with PNG and JPEG images; dog/ holds a grey image; a stray .txt is ignored."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in ('cat', 'dog', 'fish'):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8))
                if c == 'dog' and i == 0:
                    img = img.convert('L')
                img.save(d / f'{c}{i}.{"png" if i % 2 == 0 else "JPEG"}')
            (d / 'notes.txt').write_text('not an image')
    return root


def test_image_folder_labels_and_rgb(tmp_path):
    make_tree(tmp_path)
    ds = create_dataset(tmp_path, 'train')
    assert isinstance(ds, ImageFolder)
    from torchvision.datasets import ImageFolder as TVImageFolder
    assert isinstance(ds, TVImageFolder)
    assert ds.classes == ['cat', 'dog', 'fish']
    assert ds.class_to_idx == {'cat': 0, 'dog': 1, 'fish': 2}
    assert len(ds) == 9 and ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(not p.endswith('.txt') for p, _ in ds.samples)
    assert num_classes_of(ds) == 3 and num_classes_of(Subset(ds, [0, 1])) == 3
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == 'RGB' and label == ds.targets[i]
    grey = ds.samples.index((str(tmp_path / 'train' / 'dog' / 'dog0.png'), 1))
    arr = np.asarray(ds[grey][0])
    assert arr.shape == (20, 24, 3) and np.array_equal(arr[..., 0], arr[..., 2])
    assert len(create_dataset(str(tmp_path), 'val')) == 9


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing'):
        create_dataset(tmp_path / 'missing', 'train')
    with pytest.raises(FileNotFoundError, match='missing'):
        ImageFolder(tmp_path / 'missing')
    make_tree(tmp_path / 'only_train', splits=('train',))
    with pytest.raises(FileNotFoundError, match='val') as info:
        create_dataset(tmp_path / 'only_train', 'val')
    assert str(tmp_path / 'only_train' / 'val') in str(info.value)
    (tmp_path / 'flat').mkdir()
    Image.new('RGB', (4, 4)).save(tmp_path / 'flat' / 'a.png')
    with pytest.raises(DatasetLayoutError, match='no class sub-folders'):
        ImageFolder(tmp_path / 'flat')
    make_tree(tmp_path / 'holes', splits=('train',))
    for c in ('cat', 'fish'):
        for f in (tmp_path / 'holes' / 'train' / c).iterdir():
            f.unlink() if f.suffix != '.txt' else None  # leave only the .txt: still empty
    with pytest.raises(DatasetLayoutError) as info:
        create_dataset(tmp_path / 'holes', 'train')
    msg = str(info.value)
    assert str(tmp_path / 'holes' / 'train' / 'cat') in msg and str(tmp_path / 'holes' / 'train' / 'fish') in msg
    assert str(tmp_path / 'holes' / 'train' / 'dog') not in msg
    assert isinstance(info.value, ValueError)


def test_image_folder_corrupt_image_names_path(tmp_path):
    make_tree(tmp_path, splits=('train',))
    garbage = tmp_path / 'train' / 'cat' / 'zz_garbage.jpg'
    garbage.write_bytes(b'definitely not a jpeg' * 10)
    good_png = (tmp_path / 'train' / 'fish' / 'fish0.png').read_bytes()
    truncated = tmp_path / 'train' / 'fish' / 'zz_truncated.png'
    truncated.write_bytes(good_png[:len(good_png) // 2])
    ds = create_dataset(tmp_path, 'train')  # construction does not decode images
    assert len(ds) == 11
    for bad in (garbage, truncated):
        with pytest.raises(ImageLoadError) as info:
            ds[ds.samples.index((str(bad), ds.class_to_idx[bad.parent.name]))]
        assert str(bad) in str(info.value)
        assert isinstance(info.value, OSError)
    assert ds[0][0].mode == 'RGB'


# ---------------------------------------------------------------- factory

def test_create_dataset_names(tmp_path):
    with pytest.raises(ValueError) as info:
        create_dataset('imagenet-1k', 'train')
    msg = str(info.value)
    assert 'imagenet-1k' in msg and 'fashion-mnist' in msg and 'torch/' in msg and 'timm:' in msg
    with pytest.raises(ValueError, match='root='):
        create_dataset('torch/cifar10', 'train')
    make_tree(tmp_path)
    # pass-through to timm.data.create_dataset (torchvision ImageFolder, no download involved)
    ds = create_dataset('timm:torch/folder', 'val', root=tmp_path)
    assert len(ds) == 9 and num_classes_of(ds) == 3
    with pytest.raises(ValueError, match='split'):
        create_dataset(tmp_path, 'test')


def test_num_classes_of_variants():
    class Reader:
        class_to_idx = {'a': 0, 'b': 1, 'c': 2, 'd': 3}

    class TimmLike(torch.utils.data.Dataset):
        reader = Reader()

    class TargetsOnly:
        targets = [0, 4, 2]

    assert num_classes_of(TimmLike()) == 4
    assert num_classes_of(torch.utils.data.ConcatDataset([Subset(TimmLike(), [0])] * 2)) == 4
    assert num_classes_of(TargetsOnly()) == 5
    with pytest.raises(TypeError, match='list'):
        num_classes_of([1, 2, 3])


# ---------------------------------------------------------------- transforms

def grey28(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('in_chans', [1, 3])
def test_transform_shapes(size, in_chans):
    img = grey28()
    for train, recipe in ((True, RAND_AUG), (True, None), (False, None), (False, {'crop_pct': 1.0})):
        x = create_transforms(size, in_chans, train, recipe)(img)
        assert x.shape == (in_chans, size, size) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
    rgb = create_transforms(size, in_chans, False)(img.convert('RGB'))
    assert rgb.shape == (in_chans, size, size)


def test_eval_transform_deterministic_and_grey_to_rgb():
    img = grey28()
    tf = create_transforms(32, 3, train=False)
    a, b = tf(img), tf(img)
    assert torch.equal(a, b)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = a * std + mean  # un-normalized: the three channels are the same grey
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)
    one = create_transforms(32, 1, train=False)(img)
    assert torch.allclose(one[0] * 0.5 + 0.5, pixels[0], atol=1e-5)  # (0.5,)/(0.5,) default for one channel


def test_train_transform_is_random_and_seedable():
    img = grey28()
    tf = create_transforms(32, 3, train=True, recipe=RAND_AUG)

    def run(seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return tf(img)

    outs = [run(s) for s in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(run(3), outs[3])


def test_transform_argument_errors():
    with pytest.raises(ValueError, match='1 value'):
        create_transforms(32, 1, True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match='reprobb'):
        create_transforms(32, 3, True, {'reprobb': 0.25})
    with pytest.raises(ValueError, match='in_chans'):
        create_transforms(32, 2, True)
    names = [type(t).__name__ for t in create_transforms(32, 3, True, {'auto_augment': 'none'}).transforms]
    assert 'RandAugment' not in names and 'ColorJitter' in names
    with pytest.raises(TypeError, match='PIL'):
        ToMode('RGB')(torch.zeros(1, 4, 4))


def test_posterize_zero_bits_does_not_crash():
    """RandAugment 'inc1' at magnitude 10 asks posterize for 0 bits, which Pillow >= 12 rejects."""
    tf = create_transforms(32, 3, train=True, recipe=RAND_AUG)
    (op,) = [op for t in tf.transforms for op in getattr(t, 'ops', ()) if op.name == 'PosterizeIncreasing']
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = op(grey28().convert('RGB'))
    assert np.asarray(out).max() == 0  # all bits dropped: black, as older Pillow did


@needs_fmnist
def test_dataloader_workers_pickle():
    tf = create_transforms(32, 3, train=True, recipe=RAND_AUG)
    ds = FashionMNIST('train', transform=tf)
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    assert clone[5][0].shape == (3, 32, 32) and clone[5][1] == clone.labels[5]
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9


@pytest.mark.slow
@needs_fmnist
def test_dataloader_spawned_workers():
    """Spawned workers unpickle the dataset and its transforms (each re-imports torch and timm: ~15 s here)."""
    ds = FashionMNIST('train', transform=create_transforms(32, 3, train=True, recipe=RAND_AUG))
    loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context='spawn')
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == [ds.labels[i] for i in range(8)]
