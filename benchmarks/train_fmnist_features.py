"""Train the FD-FMNIST feature network (vittt.tasks.generation.metrics.FMNISTNet) on the engine and write its weights
into the package.

    python benchmarks/train_fmnist_features.py [--output runs/fmnist_features] [--epochs 6]

The 60k training split only (the 10k test split is the metric's reference set and stays unseen in training); 28×28
images zero-padded to 32×32 in [-1, 1] (the generator's pixel space), random 2-pixel translation and horizontal flips;
X
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import vittt  # noqa: F401  (before torchvision)
from torchvision import transforms

from vittt.data import FashionMNIST
from vittt.engine import Trainer, init_distributed, load_recipe
from vittt.io import save_safetensors_atomic
from vittt.tasks.classification import ClassificationTask
from vittt.tasks.generation.data import ToSignedTensor
from vittt.tasks.generation.metrics import FEATURE_WEIGHTS, FMNISTNet, feature_net_hash

PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / 'src' / 'vittt' / 'tasks' / 'generation' / FEATURE_WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', default='runs/fmnist_features')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--weights', default=str(PACKAGE_WEIGHTS), help='where to write the trained weights')
    args = parser.parse_args()

    recipe = load_recipe(None, dict(model='fmnist_features', epochs=args.epochs, batch_size=128, lr=2e-3,
                                    lr_base_batch=None, warmup_epochs=0.1, min_lr=1e-5, warmup_lr=1e-6,
                                    label_smoothing=0.0, mixup=0.0, cutmix=0.0, num_workers=0, seed=0,
                                    img_size=32, in_chans=1))
    train_tf = transforms.Compose([ToSignedTensor('L', 32, pad_to=32, hflip=0.5),
                                   transforms.RandomAffine(0, translate=(2 / 32, 2 / 32), fill=-1.0)])
    train_set = FashionMNIST('train', transform=train_tf)
    test_set = FashionMNIST('test', transform=ToSignedTensor('L', 32, pad_to=32))
    task = ClassificationTask(recipe, 10, model_factory=lambda n: FMNISTNet(num_classes=n))
    start = time.perf_counter()
    trainer = Trainer(task, train_set, test_set, args.output, init_distributed('cpu'))
    history = trainer.fit()
    state = {k: v for k, v in trainer.model.state_dict().items()}
    save_safetensors_atomic(state, args.weights, metadata={'top1': f'{history[-1]["top1"]:.2f}',
                                                           'script': 'benchmarks/train_fmnist_features.py'})
    size = Path(args.weights).stat().st_size
    digest = feature_net_hash() if args.weights == str(PACKAGE_WEIGHTS) else '-'
    print(f'test top-1 {history[-1]["top1"]:.2f} % after {args.epochs} epochs in '
          f'{(time.perf_counter() - start) / 60:.1f} min; weights -> {args.weights} ({size} bytes, sha256 {digest})')


if __name__ == '__main__':
    main()
