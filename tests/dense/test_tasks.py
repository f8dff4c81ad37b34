"""The detection and segmentation tasks on the engine: they learn on the tiny offline set, resume after a kill to the
same run, refuse bad labels, and `vittt dense train | eval` write what they say."""
import json

import pytest
import torch

import vittt  # noqa: F401  (before torchvision)
from vittt.engine import Trainer, load_recipe
from vittt.tasks.dense import TargetError, check_segmentation_labels, segmentation_collate
from vittt.tasks.dense.run import build_task

MICRO = dict(dims=[32, 64, 96, 128], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4])


def _detection(tiny_dense, **overrides):
    from vittt.data import CocoInstances
    recipe = load_recipe('dense_cpu_detection', dict(dict(model_kwargs=MICRO, image_size=96, batch_size=2, steps=5,
                                                          warmup_steps=2, eval_every=0, val_subset=0), **overrides))
    return recipe, CocoInstances(tiny_dense, 'train', train=True), CocoInstances(tiny_dense, 'val')


def _segmentation(tiny_dense, **overrides):
    from vittt.data import SemanticMaps
    recipe = load_recipe('dense_cpu_segmentation', dict(dict(model_kwargs=MICRO, decoder_channels=32, batch_size=4,
                                                             steps=40, lr=2e-3, warmup_steps=5, eval_every=20,
                                                             val_subset=0), **overrides))
    return recipe, SemanticMaps(tiny_dense, 'train', train=True), SemanticMaps(tiny_dense, 'val')


def _untrained(trainer):
    trainer.model.eval()
    with torch.no_grad():
        metrics = trainer.task.evaluate(trainer.model, trainer.val_loader, trainer._context())
    trainer.model.train()
    return metrics


def test_segmentation_learns(tiny_dense, tmp_path):
    recipe, train, val = _segmentation(tiny_dense)
    trainer = Trainer(build_task(recipe, val), train, val, tmp_path, progress=False)
    before = _untrained(trainer)
    history = trainer.fit()
    assert history[1]['train_loss'] < history[0]['train_loss']
    assert history[-1]['mIoU'] > before['mIoU'] + 3  # percent
    assert set(history[-1]) >= {'mIoU', 'aAcc', 'mAcc', 'ce'}


@pytest.mark.slow
def test_detection_learns(tiny_dense, tmp_path):
    """40 updates of Mask R-CNN on the tiny set's training images: the loss falls and box AP50 on those images rises
    from the untrained model's (0)."""
    from vittt.data import CocoInstances
    recipe, train, _ = _detection(tiny_dense, steps=40, batch_size=4, lr=2e-3, warmup_steps=5, eval_every=20)
    seen = CocoInstances(tiny_dense, 'train')
    trainer = Trainer(build_task(recipe, seen), train, seen, tmp_path, progress=False)
    before = _untrained(trainer)
    history = trainer.fit()
    assert history[1]['train_loss'] < history[0]['train_loss']
    assert history[-1]['bbox_AP50'] > before['bbox_AP50'] + 5
    assert history[-1]['segm_AP50'] > before['segm_AP50']


def test_detection_resume_after_a_kill_equals_the_uninterrupted_run(tiny_dense, tmp_path, assert_same_run, kill_at):
    recipe, train, val = _detection(tiny_dense, checkpoint_every=2)
    full = Trainer(build_task(recipe, val), train, val, tmp_path / 'full', progress=False)
    full.fit()

    broken = Trainer(build_task(recipe, val), train, val, tmp_path / 'run', progress=False)
    kill_at(broken, 3)
    assert torch.load(tmp_path / 'run' / 'last.pth', weights_only=True)['num_updates'] == 2
    resumed = Trainer(build_task(recipe, val), train, val, tmp_path / 'run', resume=tmp_path / 'run' / 'last.pth',
                      progress=False)
    resumed.fit()
    assert_same_run(full, resumed)
    assert {'bbox_AP', 'segm_AP50'} <= set(full.history[-1])


def test_segmentation_labels_and_collate():
    check_segmentation_labels(torch.tensor([[0, 10, 255]]), 11)
    with pytest.raises(TargetError, match=r'labels must be in 0\.\.10 or 255'):
        check_segmentation_labels(torch.tensor([[0, 11]]), 11)
    images, labels = segmentation_collate([(torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.long)),
                                           (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.long))])
    assert images.shape == (2, 3, 6, 5) and labels.shape == (2, 6, 5)
    assert images[0, :, 4:].abs().sum() == 0 and (labels[0, 4:] == 255).all() and (labels[1, :, 3:] == 255).all()


def test_cli_train_and_eval(tiny_dense, tmp_path, capsys):
    from vittt.cli import main
    out = tmp_path / 'run'
    kwargs = json.dumps(MICRO).replace(' ', '')
    assert main(['dense', 'train', '--task', 'seg', '--data', str(tiny_dense), '--output', str(out), '--steps', '2',
                 '--batch-size', '2', '--no-progress', f'model_kwargs={kwargs}', 'decoder_channels=16',
                 'warmup_steps=1']) == 0
    assert (out / 'last.pth').is_file() and (out / 'metrics.jsonl').is_file() and (out / 'curves.png').is_file()
    assert main(['dense', 'eval', '--checkpoint', str(out / 'last.pth'), '--data', str(tiny_dense)]) == 0
    result = json.loads((out / 'last.pth.dense-eval.json').read_text())
    assert result['task'] == 'segmentation' and result['images'] == 8 and result['step'] == 2
    assert set(result['metrics']) == {'mIoU', 'aAcc', 'mAcc', 'IoU'} and len(result['metrics']['IoU']) == 11
    assert 'mIoU' in capsys.readouterr().out
    assert main(['dense', 'train', '--task', 'det', '--data', str(tmp_path / 'missing'), '--output', str(out)]) == 2
    assert 'does not exist' in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_detection(tiny_dense, tmp_path, free_port):
    """DDP over gloo: the COCO results of both ranks' validation shards are gathered (every val image scored once);
    rank 0 alone logs and writes."""
    import os
    import subprocess
    import sys
    kwargs = json.dumps(MICRO).replace(' ', '')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                          f'--master_port={free_port}', '-m', 'vittt.cli', 'dense', 'train', '--task', 'det',
                          '--data', str(tiny_dense), '--output', str(tmp_path / 'two'), '--steps', '2',
                          '--batch-size', '2', '--device', 'cpu', '--no-progress', f'model_kwargs={kwargs}',
                          'image_size=96', 'warmup_steps=1', 'val_subset=0'],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"step": 2') == 1
    ckpt = torch.load(tmp_path / 'two' / 'last.pth', weights_only=True)
    assert ckpt['world_size'] == 2 and ckpt['num_updates'] == 2
    from vittt.data import CocoInstances
    from vittt.engine import DistInfo, StepContext, eval_loader
    from vittt.tasks.dense.run import load_dense_checkpoint
    val = CocoInstances(tiny_dense, 'val')
    task, model, _ = load_dense_checkpoint(tmp_path / 'two' / 'last.pth', val)
    info = DistInfo()
    ctx = StepContext(recipe=task.recipe, device=torch.device('cpu'), info=info, epoch=0, step=2, ema=None,
                      autocast=__import__('contextlib').nullcontext)
    single = task.evaluate(model, eval_loader(val, 2, 0, info, task.collate_fn()), ctx)
    row = json.loads((tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()[-1])
    for key, value in single.items():  # the 2-shard evaluation equals a single-process one
        assert row[key] == pytest.approx(value, abs=1e-9), key
