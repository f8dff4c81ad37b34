"""The classification task on the engine, in-process (synthetic data): learning, exact resume with Mixup / EMA /
MESA / drop-path, checkpoint refusals, mixed precision, TensorBoard."""
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from vittt.engine import Trainer, init_distributed, load_recipe
from vittt.io import atomic_write
from vittt.models import CheckpointError
from vittt.tasks.classification import ClassificationTask


def _trainer(recipe, train, val, num_classes, output, **kwargs):
    return Trainer(ClassificationTask(recipe, num_classes), train, val, output, init_distributed('cpu'),
                   **dict(dict(progress=False), **kwargs))

TINY = dict(model='vit3_tiny', model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), in_chans=1,
            img_size=32, batch_size=16, warmup_epochs=0.5, num_workers=0)


def _data(n=96, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 32, 32, generator=g) + y[:, None, None, None] * 0.5  # learnable: mean encodes the class
    return TensorDataset(x, y)


def test_training_steps_change_weights_and_lower_the_loss(tmp_path):
    data = _data(16)
    recipe = load_recipe(None, dict(TINY, epochs=6, mixup=0, cutmix=0, label_smoothing=0, lr=0.5, warmup_epochs=0,
                                    clip_grad=None))
    trainer = _trainer(recipe, data, data, 4, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.fit()
    changed = [k for k, v in trainer.model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) == len([v for v in before.values() if v.is_floating_point()])
    assert history[-1]['train_loss'] < 0.7 * history[0]['train_loss']


def test_resume_after_interruption_equals_uninterrupted(tmp_path, assert_same_run, kill_at):
    data = _data()
    recipe = load_recipe(None, dict(TINY, epochs=3, mixup=0.8, cutmix=1.0, model_ema=True, mesa=1.0, mesa_start=0.5,
                                    drop_path=0.1, lr=0.05))  # MESA from epoch 2: its teacher state must resume too
    full = _trainer(recipe, data, data, 4, tmp_path / 'full')
    full.fit()

    broken = _trainer(recipe, data, data, 4, tmp_path / 'run')
    kill_at(broken, 2 * broken.iters_per_epoch + 2)  # in the third epoch
    resumed = _trainer(recipe, data, data, 4, tmp_path / 'run', resume=tmp_path / 'run' / 'last.pth')
    assert resumed.epoch == 2
    resumed.fit()
    assert_same_run(full, resumed)
    lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
    assert len(lines) == 3 and len((tmp_path / 'run' / 'metrics.csv').read_text().splitlines()) == 4


def test_resume_errors(tmp_path):
    data = _data(32)
    recipe = load_recipe(None, dict(TINY, epochs=1))
    _trainer(recipe, data, data, 4, tmp_path / 'a').fit()
    ckpt = tmp_path / 'a' / 'last.pth'
    with pytest.raises(CheckpointError, match='num_classes=4'):
        _trainer(recipe, data, data, 5, tmp_path / 'b', resume=ckpt)
    with pytest.raises(CheckpointError, match='recipe batch_size was 16, now 8'):
        _trainer(dict(recipe, batch_size=8), data, data, 4, tmp_path / 'b', resume=ckpt)
    with pytest.raises(CheckpointError, match='recipe img_size was 32, now 48'):
        _trainer(dict(recipe, img_size=48), data, data, 4, tmp_path / 'b', resume=ckpt)
    other = dict(recipe, model_kwargs=dict(TINY['model_kwargs'], embed_dim=64))
    with pytest.raises(CheckpointError, match='does not fit this run'):
        _trainer(other, data, data, 4, tmp_path / 'b', resume=ckpt)
    with pytest.raises(CheckpointError, match="model_name='vit3_tiny', this run has 'vision_ttt_tiny'"):
        _trainer(dict(recipe, model='vision_ttt_tiny'), data, data, 4, tmp_path / 'b', resume=ckpt)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        _trainer(recipe, data, data, 4, tmp_path / 'b', resume=corrupt)
    weights = tmp_path / 'weights.pth'
    torch.save({'model': {}}, weights)
    with pytest.raises(CheckpointError, match='not a vittt training checkpoint'):
        _trainer(recipe, data, data, 4, tmp_path / 'b', resume=weights)
    old = tmp_path / 'old.pth'
    torch.save(dict(torch.load(ckpt, weights_only=True), format='vittt-train-1'), old)
    with pytest.raises(CheckpointError, match=r"older vittt \(format 'vittt-train-1'\).*still evaluate"):
        _trainer(recipe, data, data, 4, tmp_path / 'b', resume=old)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / 'ckpt.pth'
    target.write_text('old')

    def fails(tmp):
        Path(tmp).write_text('half-written')
        raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        atomic_write(target, fails)
    assert target.read_text() == 'old' and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth']
    atomic_write(target, lambda tmp: Path(tmp).write_text('new'))
    assert target.read_text() == 'new' and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth']


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    import os
    previous = os.umask(0o022)
    try:
        plain = tmp_path / 'plain.txt'
        plain.write_text('x')
        atomic_write(tmp_path / 'atomic.txt', lambda tmp: Path(tmp).write_text('x'))
        assert (tmp_path / 'atomic.txt').stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_training_is_finite(tmp_path, amp):
    data = _data(32)
    for model, kwargs in (('vit3_tiny', TINY['model_kwargs']),
                          ('vision_ttt_tiny', dict(patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                   mixer_kwargs=dict(mini_batch_size=4)))):
        recipe = load_recipe(None, dict(TINY, model=model, model_kwargs=kwargs, epochs=2, amp=amp))
        history = _trainer(recipe, data, data, 4, tmp_path / model).fit()
        assert all(torch.isfinite(torch.tensor(r['train_loss'])) for r in history)


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _data(32)
    history = _trainer(load_recipe(None, dict(TINY, epochs=2, warmup_epochs=0)), data, data, 4, tmp_path).fit()
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert {'train_loss', 'lr', 'top1', 'top5', 'val_loss'} <= set(events.Tags()['scalars'])
    assert [e.value for e in events.Scalars('top1')] == pytest.approx([r['top1'] for r in history])
