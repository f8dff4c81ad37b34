"""Recipes, the training engine in-process (synthetic data), checkpoints and their errors."""
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from vittt.io import atomic_write
from vittt.models import CheckpointError
from vittt.train import DEFAULTS, RecipeError, Trainer, init_distributed, load_recipe, parse_overrides, scaled_lr

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
TINY = dict(model='vit3_tiny', model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), in_chans=1,
            img_size=32, batch_size=16, warmup_epochs=1, num_workers=0)


def _data(n=96, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 32, 32, generator=g) + y[:, None, None, None] * 0.5  # learnable: mean encodes the class
    return TensorDataset(x, y)


def test_overrides_are_typed():
    overrides = parse_overrides(['lr=1e-3', 'mixup=0', 'amp=bf16', 'auto_augment=null', 'scale=[0.5, 1.0]'])
    assert overrides['amp'] == 'bf16' and overrides['scale'] == [0.5, 1.0] and overrides['auto_augment'] is None
    assert load_recipe(None, overrides) == dict(DEFAULTS, lr=1e-3, mixup=0, amp='bf16', auto_augment=None,
                                                scale=[0.5, 1.0])  # YAML's '1e-3' string becomes a number
    with pytest.raises(RecipeError, match="lr must be a number, got 'fast'"):
        load_recipe(None, parse_overrides(['lr=fast']))
    with pytest.raises(RecipeError, match='key=value'):
        parse_overrides(['lr'])


def test_recipe_layers_and_errors(tmp_path):
    recipe = load_recipe(CONFIGS / 'hvit3_small.yaml', dict(epochs=5))
    assert recipe['model'] == 'hvit3_small' and recipe['drop_path'] == 0.4 and recipe['mesa'] == 1.5
    assert recipe['epochs'] == 5 and recipe['weight_decay'] == DEFAULTS['weight_decay']
    with pytest.raises(RecipeError, match=r"'lrr' \(did you mean lr"):
        load_recipe(None, dict(lrr=1.0))
    with pytest.raises(RecipeError, match='amp must be one of'):
        load_recipe(None, dict(amp='fp8'))
    with pytest.raises(RecipeError, match='epochs must be a positive integer'):
        load_recipe(None, dict(epochs=0))
    bad = tmp_path / 'bad.yaml'
    bad.write_text('- a\n- list\n')
    with pytest.raises(RecipeError, match='a recipe is a mapping'):
        load_recipe(bad)
    with pytest.raises(RecipeError, match='recipe file not found'):
        load_recipe(tmp_path / 'missing.yaml')


@pytest.mark.parametrize('path', sorted(CONFIGS.glob('*.yaml')), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_names_its_model(path):
    import timm
    recipe = load_recipe(path)
    assert recipe['model'] in timm.list_models() and path.stem in recipe['model']


def test_linear_lr_scaling():
    lrs = scaled_lr(load_recipe(None, dict(batch_size=128)), world_size=32)  # global 4096: the paper's 4e-3
    assert lrs['lr'] == pytest.approx(4e-3) and lrs['min_lr'] == pytest.approx(4e-5)


def test_training_steps_change_weights_and_lower_the_loss(tmp_path):
    data = _data(16)
    recipe = load_recipe(None, dict(TINY, epochs=6, mixup=0, cutmix=0, label_smoothing=0, lr=0.5, warmup_epochs=0,
                                    clip_grad=None))
    trainer = Trainer(recipe, data, data, 4, tmp_path, init_distributed('cpu'), progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.fit()
    changed = [k for k, v in trainer.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) == len([v for v in before.values() if v.is_floating_point()])
    assert history[-1]['train_loss'] < 0.7 * history[0]['train_loss']


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    data = _data()
    recipe = load_recipe(None, dict(TINY, epochs=3, mixup=0.8, cutmix=1.0, model_ema=True, mesa=1.0, mesa_start=0.5,
                                    drop_path=0.1, lr=0.05))  # MESA from epoch 2: its teacher state must resume too
    info = init_distributed('cpu')
    full = Trainer(recipe, data, data, 4, tmp_path / 'full', info, progress=False)
    full.fit()

    class Killed(Exception):
        pass

    broken = Trainer(recipe, data, data, 4, tmp_path / 'run', info, progress=False)
    train_epoch = broken.train_epoch

    def dies_in_third_epoch():
        if broken.epoch == 2:
            for step, _ in enumerate(broken.loader):
                broken.optimizer.step()  # state in memory diverges; only the checkpoint on disk may matter
                if step == 2:
                    raise Killed
        return train_epoch()

    broken.train_epoch = dies_in_third_epoch
    with pytest.raises(Killed):
        broken.fit()
    resumed = Trainer(recipe, data, data, 4, tmp_path / 'run', info, resume=tmp_path / 'run' / 'last.pth',
                      progress=False)
    assert resumed.epoch == 2
    resumed.fit()
    for a, b in ((full.model, resumed.model), (full.ema.module, resumed.ema.module)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert [r['train_loss'] for r in full.history] == [r['train_loss'] for r in resumed.history]
    lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
    assert len(lines) == 3 and len((tmp_path / 'run' / 'metrics.csv').read_text().splitlines()) == 4


def test_resume_errors(tmp_path):
    data = _data(32)
    recipe = load_recipe(None, dict(TINY, epochs=1))
    info = init_distributed('cpu')
    Trainer(recipe, data, data, 4, tmp_path / 'a', info, progress=False).fit()
    ckpt = tmp_path / 'a' / 'last.pth'
    with pytest.raises(CheckpointError, match='num_classes=4'):
        Trainer(recipe, data, data, 5, tmp_path / 'b', info, resume=ckpt, progress=False)
    with pytest.raises(CheckpointError, match='recipe batch_size was 16, now 8'):
        Trainer(dict(recipe, batch_size=8), data, data, 4, tmp_path / 'b', info, resume=ckpt, progress=False)
    other = dict(recipe, model_kwargs=dict(TINY['model_kwargs'], embed_dim=64))
    with pytest.raises(CheckpointError, match='does not fit this run'):
        Trainer(other, data, data, 4, tmp_path / 'b', info, resume=ckpt, progress=False)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        Trainer(recipe, data, data, 4, tmp_path / 'b', info, resume=corrupt, progress=False)
    weights = tmp_path / 'weights.pth'
    torch.save({'model': {}}, weights)
    with pytest.raises(CheckpointError, match='not a vittt training checkpoint'):
        Trainer(recipe, data, data, 4, tmp_path / 'b', info, resume=weights, progress=False)


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


def test_too_small_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='fewer than one global batch'):
        Trainer(load_recipe(None, dict(TINY, epochs=1)), _data(8), None, 4, tmp_path, init_distributed('cpu'))


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_training_is_finite(tmp_path, amp):
    data = _data(32)
    for model, kwargs in (('vit3_tiny', TINY['model_kwargs']),
                          ('vision_ttt_tiny', dict(patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                   mixer_kwargs=dict(mini_batch_size=4)))):
        recipe = load_recipe(None, dict(TINY, model=model, model_kwargs=kwargs, epochs=2, amp=amp))
        history = Trainer(recipe, data, data, 4, tmp_path / model, init_distributed('cpu'), progress=False).fit()
        assert all(torch.isfinite(torch.tensor(r['train_loss'])) for r in history)


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _data(32)
    history = Trainer(load_recipe(None, dict(TINY, epochs=2)), data, data, 4, tmp_path, init_distributed('cpu'),
                      progress=False).fit()
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert {'train_loss', 'lr', 'top1', 'top5', 'val_loss'} <= set(events.Tags()['scalars'])
    assert [e.value for e in events.Scalars('top1')] == pytest.approx([r['top1'] for r in history])
