"""An honest offline metric for Fashion-MNIST generators: FD-FMNIST, the Fréchet distance in the 64-d features of a
small classifier trained here on the 60k training images (no Inception weights exist offline), with its companions.

* ``FMNISTNet``: 1×32×32 inputs in [-1, 1] (the generator's pixel space); three stages of two 3×3 conv + BN + ReLU
  (16, 32, 64 channels) with 2× max-pooling between, global average pooling -> the 64-d feature, dropout, linear -> 10
  classes. Trained by ``benchmarks/train_fmnist_features.py`` on the engine; the weights ship in the package
  (``fmnist_features.safetensors``), and their SHA-256 names them in every report.
* ``fd_fmnist``: torchmetrics ``FrechetInceptionDistance`` with this network as its feature extractor (float64
  sums, trace term from the eigenvalues of Σ₁Σ₂), real statistics of the test split.
* ``label_agreement``: the fraction of samples the network classifies as their conditioning label.
* ``classifier_score``: exp E[KL(p(y|x) ‖ p(y))] of the network's softmax (an Inception-Score analogue, at most 10).
* ``inception_fid``: the standard FID (torchmetrics with torch-fidelity's Inception-v3, 2048-d pool features) from a
  local weights file (torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``): nothing is downloaded.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ['FMNISTNet', 'load_feature_net', 'feature_net_hash', 'fd_fmnist', 'label_agreement', 'classifier_score',
           'metric_summary', 'inception_fid', 'FEATURE_WEIGHTS', 'INCEPTION_WEIGHTS']

FEATURE_WEIGHTS = 'fmnist_features.safetensors'
#: the file torch-fidelity (and so torchmetrics) would download for FID; pass a local copy
INCEPTION_WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'


def _stage(cin: int, cout: int) -> nn.Sequential:
    layers = []
    for i in range(2):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FMNISTNet(nn.Module):
    """The feature network; ``forward`` gives logits, ``features`` the 64-d pooled features."""

    num_features = 64  # read by torchmetrics (else it probes the module with a 3×299×299 input)

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop: float = 0.2):
        super().__init__()
        self.stages = nn.Sequential(_stage(in_chans, 16), nn.MaxPool2d(2), _stage(16, 32), nn.MaxPool2d(2),
                                    _stage(32, 64))
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


class _Features(nn.Module):
    """What torchmetrics calls: images -> features (float64-safe), with ``num_features``."""

    def __init__(self, net: FMNISTNet):
        super().__init__()
        self.net, self.num_features = net, net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x.float())


def _weights_resource():
    return resources.files('vittt.tasks.generation').joinpath(FEATURE_WEIGHTS)


def feature_net_hash() -> str:
    """SHA-256 (first 12 hex digits) of the shipped weights: numbers compare only under the same network."""
    return hashlib.sha256(_weights_resource().read_bytes()).hexdigest()[:12]


def load_feature_net(path=None) -> FMNISTNet:
    """The shipped (or a given) feature network, eval mode, no gradients."""
    from safetensors.torch import load

    data = open(path, 'rb').read() if path else _weights_resource().read_bytes()
    net = FMNISTNet()
    net.load_state_dict(load(data))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def fd_fmnist(real: torch.Tensor, fake: torch.Tensor, net: Optional[FMNISTNet] = None,
              batch_size: int = 500) -> float:
    """Fréchet distance between the network's features of ``real`` and ``fake`` images ``[N, 1, 32, 32]`` in
    [-1, 1] (torchmetrics' implementation)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = net or load_feature_net()
    metric = FrechetInceptionDistance(feature=_Features(net), reset_real_features=False)
    for i in range(0, len(real), batch_size):
        metric.update(real[i:i + batch_size], real=True)
    for i in range(0, len(fake), batch_size):
        metric.update(fake[i:i + batch_size], real=False)
    return float(metric.compute())


@torch.no_grad()
def _probs(images: torch.Tensor, net: FMNISTNet, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([net(images[i:i + batch_size].float()).softmax(dim=1)
                      for i in range(0, len(images), batch_size)])


def label_agreement(images: torch.Tensor, labels: torch.Tensor, net: Optional[FMNISTNet] = None) -> float:
    """Fraction of ``images`` the network classifies as ``labels``."""
    net = net or load_feature_net()
    return float((_probs(images, net).argmax(dim=1) == labels.to(torch.long)).double().mean())


def classifier_score(images: torch.Tensor, net: Optional[FMNISTNet] = None) -> float:
    """exp E_x[KL(p(y|x) ‖ p(y))] with p(y) the mean prediction (1 = one class or no confidence, 10 = ideal)."""
    net = net or load_feature_net()
    p = _probs(images, net).double().clamp_min(1e-12)
    marginal = p.mean(dim=0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(dim=1).mean()))


def metric_summary(images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor,
                   net: Optional[FMNISTNet] = None) -> Dict[str, float]:
    net = net or load_feature_net()
    return dict(fd_fmnist=fd_fmnist(real, images, net), label_agreement=label_agreement(images, labels, net),
                classifier_score=classifier_score(images, net), samples=len(images))


def _as_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float or uint8 images ``[N, C, H, W]`` (C = 1 or 3) -> uint8 RGB, DiT's quantisation."""
    if images.dtype != torch.uint8:
        from ...diffusion import to_uint8
        images = to_uint8(images.float())
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}')
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights, batch_size: int = 50) -> float:
    """The standard Inception FID between two image sets (``[N, C, H, W]``, [-1, 1] floats or uint8, grey repeated
    to RGB; torchmetrics resizes to 299² as torch-fidelity does), with Inception-v3 weights from the local file
    ``weights`` (torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``)."""
    import os

    if weights is None or not os.path.isfile(os.fspath(weights)):
        raise FileNotFoundError(f'Inception FID needs a local weights file ({INCEPTION_WEIGHTS}, the file '
                                f'torch-fidelity downloads); {weights!r} is not a file')
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Inception FID uses torchmetrics with torch-fidelity, which is not installed ({e}); "
                          f"pip install 'vittt[fid]'") from e
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(real), len(fake)) < 2:
        raise ValueError(f'FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated')
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=os.fspath(weights))
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            metric.update(_as_uint8_rgb(images[i:i + batch_size]), real=is_real)
    return float(metric.compute())
