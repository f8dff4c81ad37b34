"""The generation task on the engine: a step-based run that learns, exact resume from a mid-run checkpoint, sample
grids, `vittt generate train | sample` with the ADM .npz layout."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vittt.cli import main
from vittt.engine import Trainer, load_recipe
from vittt.tasks.generation import GenerationTask, load_generator
from vittt.tasks.generation.data import ToSignedTensor, adm_center_crop, build_generation_datasets

TINY = dict(task='generation', model='dit3_s_4', model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, patch_size=4),
            image_size=32, batch_size=16, lr=1e-3, warmup_steps=2, num_workers=0, val_batches=1, sample_per_class=1,
            sample_classes=4, sample_sampler='ddim3', model_ema_decay=0.9, model_ema_ref_batch=16, train_subset=96,
            val_subset=32)


def _fmnist(recipe):
    train, val, channels, classes = build_generation_datasets('fashion-mnist', recipe)
    return train, val, channels, classes


def test_fashion_mnist_is_padded_to_32_in_signed_range():
    recipe = load_recipe(None, dict(TINY, hflip=0.0))
    train, val, channels, classes = _fmnist(recipe)
    x, y = val[0]
    assert (channels, classes) == (1, 10) and x.shape == (1, 32, 32) and isinstance(y, int)
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(x[:, :2], torch.full((1, 2, 32), -1.0))  # padding = black
    flip = ToSignedTensor('L', 32, pad_to=32, hflip=1.0)
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    assert torch.equal(flip(img), ToSignedTensor('L', 32, pad_to=32)(img).flip(-1))
    wide = adm_center_crop(Image.new('RGB', (300, 100)), 64)
    assert wide.size == (64, 64)


def test_a_short_run_learns_and_writes_samples(tmp_path):
    recipe = load_recipe(None, dict(TINY, steps=40, eval_every=20, lr=3e-3))
    train, val, channels, classes = _fmnist(recipe)
    task = GenerationTask(recipe, channels, classes)
    trainer = Trainer(task, train, val, tmp_path, progress=False)
    history = trainer.fit()
    assert [r['step'] for r in history] == [20, 40] and {'mse', 'vb', 'val_loss', 'ema_val_loss'} <= set(history[0])
    assert history[-1]['mse'] < 0.7 * history[0]['mse']  # measured 0.77 -> 0.32 (ε predicted as 0 at init: ~1)
    assert history[-1]['val_mse'] < history[0]['val_mse']
    grids = sorted(p.name for p in (tmp_path / 'samples').iterdir())
    assert grids == ['step0000020.png', 'step0000020_ema.png', 'step0000040.png', 'step0000040_ema.png']
    assert Image.open(tmp_path / 'samples' / 'step0000040.png').size == (4 * 32 + 5 * 2, 32 + 2 * 2)
    assert (tmp_path / 'best.pth').exists() and (tmp_path / 'curves.png').exists()


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, assert_same_run, kill_at):
    recipe = load_recipe(None, dict(TINY, steps=9, eval_every=0, checkpoint_every=4))
    train, val, channels, classes = _fmnist(recipe)
    full = Trainer(GenerationTask(recipe, channels, classes), train, val, tmp_path / 'full', progress=False)
    full.fit()

    broken = Trainer(GenerationTask(recipe, channels, classes), train, val, tmp_path / 'run', progress=False)
    kill_at(broken, 6)
    assert torch.load(tmp_path / 'run' / 'last.pth', weights_only=True)['num_updates'] == 4
    resumed = Trainer(GenerationTask(recipe, channels, classes), train, val, tmp_path / 'run',
                      resume=tmp_path / 'run' / 'last.pth', progress=False)
    resumed.fit()
    assert_same_run(full, resumed)


def test_generate_train_and_sample_commands(tmp_path, capsys):
    run = tmp_path / 'run'
    overrides = [f'{k}={json.dumps(v)}' for k, v in TINY.items() if k not in ('task', 'model', 'batch_size')]
    assert main(['generate', 'train', '--model', 'dit3_s_4', '--data', 'fashion-mnist', '--output', str(run),
                 '--steps', '4', '--batch-size', '16', '--no-progress', 'eval_every=4', *overrides]) == 0
    assert 'vittt generate train: dit3_s_4 (generation) on fashion-mnist' in capsys.readouterr().out
    grid, npz = tmp_path / 'grid.png', tmp_path / 'samples.npz'
    assert main(['generate', 'sample', '--checkpoint', str(run / 'last.pth'), '--labels', '0', '3', '--per-label',
                 '2', '--sampler', 'ddim4', '--cfg-scale', '2', '--out', str(grid), '--npz', str(npz),
                 '--image-size', '16']) == 0
    arr = np.load(npz)['arr_0']
    assert arr.shape == (4, 16, 16, 1) and arr.dtype == np.uint8
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    again = tmp_path / 'again.npz'
    assert main(['generate', 'sample', '--checkpoint', str(run / 'last.pth'), '--labels', '0', '3', '--per-label',
                 '2', '--sampler', 'ddim4', '--cfg-scale', '2', '--out', str(grid), '--npz', str(again),
                 '--image-size', '16']) == 0
    assert np.array_equal(np.load(again)['arr_0'], arr)  # every draw from the seeded generator
    task, model = load_generator(run / 'last.pth')
    assert task.num_classes == 10 and model.in_chans == 1
    # chunked sampling: chunk i is the unchunked call with seed (seed, i), so it is independent of the other chunks
    from vittt.engine import derive_seed
    chunked = task.sample(model, [0, 1, 2, 3, 4], (16, 16), 2.0, 'ddim3', seed=7, batch_size=2)
    parts = [task.sample(model, labels, (16, 16), 2.0, 'ddim3', seed=derive_seed(7, i))
             for i, labels in enumerate(([0, 1], [2, 3], [4]))]
    assert torch.equal(chunked, torch.cat(parts))
    assert main(['generate', 'sample', '--checkpoint', str(run / 'last.pth'), '--labels', '12', '--out',
                 str(grid)]) == 2
    assert 'labels must be in [0, 9]' in capsys.readouterr().err

    # eval: FD-FMNIST with its floor, label agreement and the classifier score per guidance scale, as JSON
    assert main(['generate', 'eval', '--checkpoint', str(run / 'last.pth'), '--samples', '20', '--cfg-scale', '1',
                 '2', '--sampler', 'ddim2']) == 0
    assert 'FD-FMNIST noise floor (20 real training images)' in capsys.readouterr().out
    result = json.loads((tmp_path / 'run' / 'last.pth.gen-eval.json').read_text())
    assert result['step'] == 4 and result['weights'] == 'ema' and result['fd_fmnist_floor'] > 0
    assert [r['cfg_scale'] for r in result['rows']] == [1.0, 2.0]
    for row in result['rows']:
        assert row['fd_fmnist'] > result['fd_fmnist_floor']  # 4 steps of training: far from real images
        assert 0 <= row['label_agreement'] <= 1 and 1 <= row['classifier_score'] <= 10
    assert main(['generate', 'eval', '--checkpoint', str(run / 'last.pth'), '--samples', '4',
                 '--fid-weights', str(tmp_path / 'missing.pth')]) == 2
    assert 'needs a local weights file' in capsys.readouterr().err


def test_generation_recipes(capsys):
    recipe = load_recipe('imagenet256')
    assert (recipe['model'], recipe['steps'], recipe['lr'], recipe['weight_decay'], recipe['sched']) == \
        ('dit3_b_2', 400_000, 1e-4, 0.0, 'constant')
    assert recipe['model_ema_decay'] == 0.9999 and recipe['clip_grad'] is None and recipe['epochs'] is None
    assert main(['generate', 'train', '--model', 'dit3_b_2', '--print-recipe', '--steps', '1000']) == 0
    printed = capsys.readouterr().out
    assert '# recipe imagenet256' in printed and 'steps: 1000' in printed


def test_generate_demo_quick(tmp_path):
    out = tmp_path / 'demo'
    assert main(['generate', 'demo', '--quick', '--output', str(out), '--no-progress']) == 0
    results = json.loads((out / 'results.json').read_text())
    assert set(results['models']) == {'DiT³', 'DiT'} and results['meta']['quick'] is True
    for r in results['models'].values():
        assert r['steps'] == 3 and {'fd_cfg1', 'fd_cfg3', 'agreement_cfg1', 'agreement_cfg3'} <= set(r)
        for cfg in ('1', '3'):
            assert Image.open(out / f'grid_{r["model"]}_cfg{cfg}.png').size[0] == 10 * 32 + 11 * 2
    report = (out / 'report.md').read_text()
    assert '| DiT³ (`dit3_s_4`)' in report and '| DiT (`dit_s_4`)' in report and 'Noise floor' in report


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, free_port):
    """DDP over gloo: two ranks, each with its own (seed, step, rank) draws; rank 0 alone writes metrics, samples and
    checkpoints; the EMA and step count of a 2-process run."""
    overrides = [f'{k}={json.dumps(v)}' for k, v in TINY.items() if k not in ('task', 'model', 'batch_size')]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                          f'--master_port={free_port}', '-m', 'vittt.cli', 'generate', 'train', '--model', 'dit3_s_4',
                          '--data', 'fashion-mnist', '--output', str(tmp_path / 'two'), '--steps', '4',
                          '--batch-size', '8', '--device', 'cpu', '--no-progress', 'eval_every=4', *overrides],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"step": 4') == 1  # rank 0 alone logs
    ckpt = torch.load(tmp_path / 'two' / 'last.pth', weights_only=True)
    assert ckpt['world_size'] == 2 and ckpt['num_updates'] == 4 and ckpt['ema'] is not None
    rows = [json.loads(line) for line in (tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()]
    assert rows[-1]['step'] == 4 and np.isfinite(rows[-1]['val_loss']) and np.isfinite(rows[-1]['ema_val_loss'])
    assert sorted(p.name for p in (tmp_path / 'two' / 'samples').iterdir()) == ['step0000004.png',
                                                                                 'step0000004_ema.png']
