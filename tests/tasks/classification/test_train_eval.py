"""`vittt train` / `vittt eval` / `vittt recipes` as users run them: folder data, files written, a short run that
learns, a real kill + resume, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vittt.cli import main

MODEL = ['--model', 'vit3_tiny', '--img-size', '16', '--batch-size', '8', '--workers', '0', '--no-progress']
ARCH = ['model_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}', 'mixup=0', 'cutmix=0',
        'auto_augment=null', 'reprob=0', 'warmup_epochs=0', 'lr=0.05']


def _folder(root: Path, per_class: int = 8, classes=('ant', 'bee', 'cat'), size: int = 20) -> Path:
    g = torch.Generator().manual_seed(0)
    for split in ('train', 'val'):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 80 + 60 * c).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


def _fashion_folder(root: Path, classes=(0, 1, 8, 9), train_per_class=128, val_per_class=25) -> Path:
    """A small class-folder tree of real Fashion-MNIST images (T-shirt, trouser, bag, ankle boot), PNG files."""
    from vittt.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    for split, source, count in (('train', 'train', train_per_class), ('val', 'test', val_per_class)):
        images, labels = load_fashion_mnist(source)
        for c in classes:
            folder = root / split / FASHION_MNIST_CLASSES[c].replace('/', '-')
            folder.mkdir(parents=True)
            for i, index in enumerate((labels == c).nonzero()[0][:count]):
                Image.fromarray(images[index]).save(folder / f'{i}.png')
    return root


def _cli(*args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, '-m', 'vittt.cli', *args], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


def _weights(path: Path):
    return torch.load(path, weights_only=True)['model']


def test_train_then_eval_on_a_folder_dataset(tmp_path, capsys):
    data = _folder(tmp_path / 'data')
    run = tmp_path / 'run'
    assert main(['train', *MODEL, '--data', str(data), '--output', str(run), '--epochs', '2', *ARCH]) == 0
    assert {'last.pth', 'best.pth', 'metrics.jsonl', 'metrics.csv', 'curves.png', 'recipe.yaml'} <= {
        p.name for p in run.iterdir()}
    rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2] and {'train_loss', 'top1', 'top5', 'val_loss', 'lr'} <= set(rows[0])
    assert (run / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    capsys.readouterr()
    assert main(['eval', '--model', 'vit3_tiny', '--checkpoint', str(run / 'last.pth'), '--data', str(data),
                 '--img-size', '16', '--crop-pct', '0.875', '--workers', '0']) == 0
    result = json.loads((run / 'last.eval.json').read_text())
    assert {'top1', 'top5', 'loss'} <= set(result) and result['count'] == 24
    assert result['top1'] == pytest.approx(rows[-1]['top1']) and result['loss'] == pytest.approx(rows[-1]['val_loss'])


def test_train_and_eval_a_timm_model(tmp_path, capsys):
    """A timm convnet (no img_size argument, no shipped recipe: the defaults, said on the start line)."""
    data = _folder(tmp_path / 'data')
    run = tmp_path / 'run'
    assert main(['train', '--model', 'resnet10t', '--data', str(data), '--output', str(run), '--epochs', '1',
                 '--img-size', '16', '--batch-size', '8', '--workers', '0', '--no-progress', 'mixup=0', 'cutmix=0',
                 'auto_augment=null', 'warmup_epochs=0']) == 0
    assert '(recipe defaults,' in capsys.readouterr().out
    assert main(['eval', '--model', 'resnet10t', '--checkpoint', str(run / 'best.pth'), '--data', str(data),
                 '--workers', '0']) == 0
    result = json.loads((run / 'best.eval.json').read_text())
    assert result['img_size'] == 16 and result['count'] == 24  # the training size, by default


def test_clear_errors(tmp_path, capsys):
    assert main(['train', *MODEL, '--data', str(tmp_path / 'nowhere'), '--output', str(tmp_path / 'r')]) == 2
    assert 'nowhere' in capsys.readouterr().err
    data = _folder(tmp_path / 'data', per_class=4)
    (data / 'train' / 'dog').mkdir()
    assert main(['train', *MODEL, '--data', str(data), '--output', str(tmp_path / 'r')]) == 2
    assert 'dog' in capsys.readouterr().err
    (data / 'train' / 'dog').rmdir()
    (data / 'train' / 'ant' / '0.png').write_bytes(b'not a png')
    assert main(['train', *MODEL, '--data', str(data), '--output', str(tmp_path / 'r'), '--epochs', '1',
                 *ARCH]) == 2  # the unreadable image is met while training
    assert str(data / 'train' / 'ant' / '0.png') in capsys.readouterr().err
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'\x00' * 64)
    assert main(['eval', '--model', 'vit3_tiny', '--checkpoint', str(bad), '--data', str(data), '--workers', '0']) == 2
    assert 'not a readable checkpoint' in capsys.readouterr().err
    assert main(['train', *MODEL, '--data', str(data), '--output', str(tmp_path / 'r'), 'lr=fast']) == 2
    assert 'lr must be a number' in capsys.readouterr().err


def test_a_short_run_of_the_official_recipe_learns(tmp_path, capsys):
    """--epochs 3 on the official 300-epoch recipe: the 20 warm-up epochs shrink to 0.2 (said in one line), so the lr
    reaches its peak and the model learns; before, it stayed inside the warm-up and ended near chance (25 %)."""
    data = _fashion_folder(tmp_path / 'data')
    run = tmp_path / 'run'
    small = ['--img-size', '28', '--batch-size', '16', '--workers', '0', '--no-progress',
             'model_kwargs={patch_size: 7, embed_dim: 48, depth: 2, num_heads: 2}', 'in_chans=1',
             'mixup=0', 'cutmix=0', 'auto_augment=null', 'reprob=0', 'scale=[0.5, 1]', 'lr_base_batch=null', 'lr=3e-3']
    assert main(['train', '--model', 'vit3_tiny', '--data', str(data), '--output', str(run), '--epochs', '3',
                 *small]) == 0
    out = capsys.readouterr().out
    assert out.count('warm-up scaled in proportion, 20 -> 0.2 epochs') == 1
    rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert rows[0]['lr'] > 1e-3  # past the warm-up after the first epoch
    assert rows[-1]['top1'] >= 65.0, rows  # 4 classes: chance is 25 % (measured: 78 %)


def test_recipes_and_print_recipe(capsys):
    assert main(['recipes']) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ('vit3_small', 'hvit3_base', 'fashion_mnist_demo', 'deit_tiny_patch16_224'))
    assert main(['train', '--model', 'hvit3_base', '--print-recipe', '--epochs', '30', 'mesa=0']) == 0
    printed = capsys.readouterr().out
    import yaml
    recipe = yaml.safe_load(printed)
    assert recipe['drop_path'] == 0.6 and recipe['mesa'] == 0 and recipe['epochs'] == 30
    assert recipe['warmup_epochs'] == 2
    assert '# the run is shortened from 300 to 30 epochs' in printed
    assert main(['train', '--model', 'vit3_tiny', '--print-recipe', '--epochs', '5', 'warmup_epochs=5']) == 2
    assert 'is not shorter than the run' in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    data = _folder(tmp_path / 'data', per_class=48, size=16)
    args = [*MODEL, '--data', str(data), '--epochs', '3', *ARCH, 'model_ema=true', 'drop_path=0.1']
    full = _cli('train', *args, '--output', str(tmp_path / 'full'))
    assert full.returncode == 0, full.stderr

    run = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', 'vittt.cli', 'train', *args, '--output', str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / 'last.pth').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the first checkpoint just appeared: epoch 2 is under way
    proc.wait()
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 1, 'the kill must land inside epoch 2'
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] == 1

    resumed = _cli('train', *args, '--output', str(run), '--resume', str(run / 'last.pth'))
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / 'full' / 'last.pth'), _weights(run / 'last.pth')
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_rows = (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()
    run_rows = (run / 'metrics.jsonl').read_text().splitlines()
    drop_time = lambda rows: [{k: v for k, v in json.loads(r).items() if 'time' not in k and 'img_s' not in k}
                              for r in rows]
    assert drop_time(full_rows) == drop_time(run_rows)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, free_port):
    data = _folder(tmp_path / 'data', per_class=8)
    args = ['train', *MODEL, '--data', str(data), '--epochs', '2', '--device', 'cpu', *ARCH]
    one = _cli(*args, '--output', str(tmp_path / 'one'))
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS='1')
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                          f'--master_port={free_port}', '-m', 'vittt.cli', *args, '--output', str(tmp_path / 'two')],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count('"epoch": 2') == 1  # rank 0 alone logs
    rows = {n: [json.loads(line) for line in (tmp_path / n / 'metrics.jsonl').read_text().splitlines()]
            for n in ('one', 'two')}
    assert [list(r) for r in rows['one']] == [list(r) for r in rows['two']]  # same file layout
    assert sorted(p.name for p in (tmp_path / 'one').iterdir()) == sorted(p.name for p in (tmp_path / 'two').iterdir())
    ckpt = torch.load(tmp_path / 'two' / 'last.pth', weights_only=True)
    assert ckpt['world_size'] == 2 and ckpt['num_updates'] == 2 * (24 // 16)  # 24 images, global batch 2 × 8
    assert rows['two'][-1]['top1'] >= 0 and rows['two'][-1]['top5'] == 100.0  # 3 classes: top-5 is everything


def test_eval_official_weights(tmp_path):
    import timm
    model = timm.create_model('vit3_tiny', num_classes=3)
    official = {k.replace('attn.inner.0.w', 'attn.w').replace('attn.inner.1.weight', 'attn.w3'): v
                for k, v in model.state_dict().items()}
    torch.save({'model': official}, tmp_path / 'official.pth')
    data = _folder(tmp_path / 'data', per_class=2)
    out = tmp_path / 'metrics.json'
    assert main(['eval', '--model', 'vit3_tiny', '--checkpoint', str(tmp_path / 'official.pth'), '--data', str(data),
                 '--img-size', '32', '--workers', '0', '--output', str(out)]) == 0
    result = json.loads(out.read_text())
    assert result['count'] == 6 and result['img_size'] == 32 and {'top1', 'top5', 'loss'} <= set(result)
    model.eval()
    from vittt.data import create_dataset, create_transforms
    ds = create_dataset(str(data), 'val', create_transforms(32, 3, train=False, recipe=dict(crop_pct=0.875,
                                                                                          interpolation='bicubic')))
    with torch.no_grad():
        logits = torch.stack([model(ds[i][0][None])[0] for i in range(len(ds))])
    targets = torch.tensor([ds[i][1] for i in range(len(ds))])
    assert result['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)
