"""The engine with a task that is not classification: the contract, step-based runs, best by a minimum, exact
resume from a mid-epoch checkpoint, and the refusal messages."""

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from vittt.engine import CheckpointError, Task, Trainer, load_recipe, register_task


class NoisyRegression(Dataset):
    """y = x·w + noise, with per-sample augmentation noise drawn from the global RNG (as a transform would)."""

    def __init__(self, n=64, dim=6):
        g = torch.Generator().manual_seed(1)
        self.x, self.w = torch.randn(n, dim, generator=g), torch.randn(dim, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + 0.01 * torch.randn(self.x.shape[1])  # augmentation: must be reproduced on resume
        return x, (self.x[i] @ self.w)


@register_task
class RegressionTask(Task):
    name = 'test-regression'
    defaults = dict(hidden=16, dropout=0.2)
    best_metric, best_mode = 'val_mse', 'min'

    def build_model(self):
        return nn.Sequential(nn.Linear(6, self.recipe['hidden']), nn.Dropout(self.recipe['dropout']),
                             nn.ReLU(), nn.Linear(self.recipe['hidden'], 1))

    def train_step(self, model, batch, ctx):
        x, y = batch
        err = model(x) - y
        return err.pow(2).mean(), dict(abs_err=err.abs().mean().item())

    def evaluate(self, model, loader, ctx):
        errs = torch.cat([model(x) - y for x, y in loader])
        return dict(val_mse=errs.pow(2).mean().item())


def _recipe(**overrides):
    base = dict(task='test-regression', model='mlp', steps=30, warmup_steps=3, sched='constant', lr=0.01,
                lr_base_batch=None, batch_size=8, eval_every=10, num_workers=0, model_ema=True, clip_grad=1.0)
    return load_recipe(None, dict(base, **overrides))


def test_step_based_run_logs_every_eval_and_keeps_the_best_by_minimum(tmp_path):
    data = NoisyRegression()
    trainer = Trainer(RegressionTask(_recipe()), data, data, tmp_path, progress=False)
    history = trainer.fit()
    assert [r['step'] for r in history] == [10, 20, 30] and all('epoch' not in r for r in history)
    assert {'train_loss', 'abs_err', 'lr', 'val_mse', 'ema_val_mse'} <= set(history[0])
    assert history[-1]['val_mse'] < history[0]['val_mse']
    assert trainer.best == min(r['val_mse'] for r in history)
    best = torch.load(tmp_path / 'best.pth', weights_only=True)
    assert best['best'] == trainer.best and best['task'] == 'test-regression'
    assert trainer.num_updates == 30 and trainer.epoch == 30 // (64 // 8)
    assert history[0]['lr'] == pytest.approx(0.01)  # constant after the warm-up
    assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 3


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(tmp_path, workers, assert_same_run,
                                                                         kill_at):
    data = NoisyRegression()
    recipe = _recipe(steps=22, checkpoint_every=3, num_workers=workers)  # 8 updates an epoch: 3, 6 | 9 ... mid-epoch
    full = Trainer(RegressionTask(recipe), data, data, tmp_path / 'full', progress=False)
    full.fit()

    broken = Trainer(RegressionTask(recipe), data, data, tmp_path / 'run', progress=False)
    kill_at(broken, 13)
    ckpt = torch.load(tmp_path / 'run' / 'last.pth', weights_only=True)
    assert ckpt['num_updates'] == 12 and ckpt['num_updates'] % 8  # written mid-epoch, inside a log window
    resumed = Trainer(RegressionTask(recipe), data, data, tmp_path / 'run', resume=tmp_path / 'run' / 'last.pth',
                      progress=False)
    resumed.fit()
    assert_same_run(full, resumed)


def test_resume_refusals(tmp_path):
    data = NoisyRegression()
    Trainer(RegressionTask(_recipe(steps=10)), data, data, tmp_path / 'a', progress=False).fit()
    ckpt = tmp_path / 'a' / 'last.pth'
    with pytest.raises(CheckpointError, match='recipe steps was 10, now 12'):
        Trainer(RegressionTask(_recipe(steps=12)), data, data, tmp_path / 'b', resume=ckpt)
    with pytest.raises(CheckpointError, match='the checkpoint is for model_name=.mlp., this run has .other.'):
        Trainer(RegressionTask(_recipe(steps=10, model='other')), data, data, tmp_path / 'b', resume=ckpt)
    with pytest.raises(CheckpointError, match='does not fit this run'):
        Trainer(RegressionTask(_recipe(steps=10, hidden=8)), data, data, tmp_path / 'b', resume=ckpt)
    with pytest.raises(CheckpointError, match='the run uses EMA but the checkpoint has none'):
        Trainer(RegressionTask(_recipe(steps=10, model_ema=False)), data, data, tmp_path / 'c').fit()
        Trainer(RegressionTask(_recipe(steps=10)), data, data, tmp_path / 'd', resume=tmp_path / 'c' / 'last.pth')


def test_a_non_finite_loss_stops_the_run_with_a_reason(tmp_path):
    data = NoisyRegression()
    data.x[0] = float('nan')
    with pytest.raises(RuntimeError, match='the loss is nan at update'):
        Trainer(RegressionTask(_recipe(steps=10)), data, data, tmp_path, progress=False).fit()


def test_too_small_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='fewer than one global batch'):
        Trainer(RegressionTask(_recipe(batch_size=128)), NoisyRegression(), None, tmp_path)


def test_step_and_poly_schedules_and_warmup_by_updates_in_an_epoch_run(tmp_path):
    """sched=step multiplies the lr by decay_rate at each milestone (epochs in an epoch run); poly decays to min_lr;
    warmup_steps warms up by updates in an epoch-based run too."""
    recipe = _recipe(steps=None, epochs=4, sched='step', decay_milestones=[2, 3], decay_rate=0.1, warmup_steps=2,
                     warmup_lr=0.0, model_ema=False, eval_every=0)
    trainer = Trainer(RegressionTask(recipe), NoisyRegression(), NoisyRegression(16), tmp_path / 'step',
                      progress=False)
    per_epoch = trainer.iters_per_epoch  # 8
    lrs = []
    for update in range(4 * per_epoch):
        trainer.scheduler.step_update(update)
        lrs.append(trainer.optimizer.param_groups[0]['lr'])
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.005)  # warm-up over 2 updates
    assert lrs[2 * per_epoch - 1] == pytest.approx(0.01) and lrs[2 * per_epoch] == pytest.approx(1e-3)
    assert lrs[3 * per_epoch] == pytest.approx(1e-4)
    poly = Trainer(RegressionTask(_recipe(sched='poly', poly_power=1.0, warmup_steps=0, min_lr=0.0)),
                   NoisyRegression(), None, tmp_path / 'poly', progress=False)
    poly.scheduler.step_update(15)
    assert poly.optimizer.param_groups[0]['lr'] == pytest.approx(0.01 * (1 - 15 / 30))


def test_weight_decay_exempt_by_name(tmp_path):
    trainer = Trainer(RegressionTask(_recipe(weight_decay=0.05, weight_decay_exempt=['0.'])), NoisyRegression(),
                      None, tmp_path, progress=False)
    decay = {id(p): g['weight_decay'] for g in trainer.optimizer.param_groups for p in g['params']}
    for name, param in trainer.model.named_parameters():
        assert decay[id(param)] == (0.0 if name.startswith('0.') else 0.05), name
