"""FD-FMNIST on real data (spec dit3.md §5.2): the shipped network's accuracy, the Fréchet math against an
independent formula, the noise floor, monotone degradation, garbage and mode dropping detected."""
import pytest
import torch

from vittt.data import FashionMNIST
from vittt.tasks.generation.data import ToSignedTensor
from vittt.tasks.generation.metrics import (classifier_score, fd_fmnist, feature_net_hash, label_agreement,
                                            load_feature_net)

N = 500


@pytest.fixture(scope='module')
def data():
    tf = ToSignedTensor('L', 32, pad_to=32)
    test, train = FashionMNIST('test', transform=tf), FashionMNIST('train', transform=tf)
    g = torch.Generator().manual_seed(0)
    pick = lambda ds, n: torch.randperm(len(ds), generator=g)[:n].tolist()
    ref_idx, a_idx, b_idx = pick(test, 2000), pick(train, N), pick(train, N)
    stack = lambda ds, idx: (torch.stack([ds[i][0] for i in idx]), torch.tensor([ds[i][1] for i in idx]))
    return dict(ref=stack(test, ref_idx), a=stack(train, a_idx), b=stack(train, b_idx), net=load_feature_net())


def test_the_shipped_network_classifies_the_test_split(data):
    images, labels = data['ref']
    assert label_agreement(images, labels, data['net']) >= 0.90
    assert len(feature_net_hash()) == 12


def test_frechet_math_equals_an_independent_formula(data):
    """Tr √(Σ₁^½ Σ₂ Σ₁^½) by symmetric eigh, float64, on the same features."""
    net = data['net']
    real, fake = data['ref'][0][:1000], data['a'][0]
    with torch.no_grad():
        f1, f2 = net.features(real).double(), net.features(fake).double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    root1 = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0).sqrt().sum()
    expected = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * inner)
    assert fd_fmnist(real, fake, net) == pytest.approx(expected, rel=1e-5)


def test_noise_floor_degradation_garbage_and_mode_dropping(data):
    net, (ref, _) = data['net'], data['ref']
    real_a, labels_a = data['a']
    floor = fd_fmnist(ref, real_a, net)
    assert floor == pytest.approx(fd_fmnist(ref, data['b'][0], net), rel=0.5)  # two draws, one floor
    g = torch.Generator().manual_seed(1)
    noisy = [fd_fmnist(ref, (real_a + s * torch.randn(real_a.shape, generator=g)).clamp(-1, 1), net)
             for s in (0.05, 0.1, 0.2, 0.4)]
    assert floor < noisy[0] and all(a < b for a, b in zip(noisy, noisy[1:]))
    blur = [fd_fmnist(ref, _blur(real_a, sigma), net) for sigma in (0.5, 1.0, 1.5, 2.0)]
    assert floor < blur[0] and all(a < b for a, b in zip(blur, blur[1:]))
    garbage = {'normal': torch.randn(real_a.shape, generator=g).clamp(-1, 1),
               'uniform': torch.rand(real_a.shape, generator=g) * 2 - 1, 'constant': torch.zeros_like(real_a)}
    for name, images in garbage.items():
        assert fd_fmnist(ref, images, net) >= 50 * floor, name
    half = real_a[labels_a < 5]
    assert fd_fmnist(ref, half, net) >= 10 * floor
    real_score = classifier_score(real_a, net)
    assert real_score > 7 and classifier_score(half, net) < 0.7 * real_score  # measured 7.99 for real images


def _blur(images, sigma):
    radius = int(3 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    out = torch.nn.functional.conv2d(images, k.view(1, 1, 1, -1), padding=(0, radius))
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1), padding=(radius, 0))


@pytest.fixture(scope='module')
def random_inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 layout with random weights, saved as a local file (no real weights exist here:
    this checks the plumbing and that FID behaves as a distance, not the published numbers)."""
    fidelity = pytest.importorskip('torch_fidelity.feature_extractor_inceptionv3')
    folder = tmp_path_factory.mktemp('inception')
    torch.save({}, folder / 'empty.pth')
    cls, load = fidelity.FeatureExtractorInceptionV3, fidelity.FeatureExtractorInceptionV3.load_state_dict
    cls.load_state_dict = lambda self, state, *a, **k: None  # keep the random initialisation
    try:
        torch.manual_seed(0)
        skeleton = cls('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(folder / 'empty.pth'))
    finally:
        cls.load_state_dict = load
    torch.save(skeleton.state_dict(), folder / 'pt_inception-random.pth')
    return folder / 'pt_inception-random.pth'


def test_inception_fid_from_a_local_file(data, random_inception_file):
    from vittt.tasks.generation.metrics import inception_fid

    real, other = data['ref'][0][:16], data['a'][0][:16]  # 299² Inception on CPU: few images
    same = inception_fid(real, other, random_inception_file)
    noise = inception_fid(real, torch.rand_like(other) * 2 - 1, random_inception_file)
    assert 0 <= same < noise  # real vs real is closer than real vs uniform noise
    from vittt.tasks.generation.metrics import _as_uint8_rgb
    rgb = _as_uint8_rgb(other)  # what Inception sees: grey repeated to RGB with DiT's quantisation
    assert rgb.dtype == torch.uint8 and rgb.shape == (16, 3, 32, 32)
    assert torch.equal(rgb, _as_uint8_rgb(other.repeat(1, 3, 1, 1))) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(FileNotFoundError, match='needs a local weights file'):
        inception_fid(real, other, None)
    with pytest.raises(ValueError, match='at least 2 images'):
        inception_fid(real, other[:1], random_inception_file)
