"""Rebuilding a trained model from its checkpoint alone (``vittt.engine.load_trained_model`` / ``load_model_weights``):
the task named in the checkpoint rebuilds the model from the recipe and identity, the EMA weights are chosen, and a
checkpoint of another model or task is refused by name. Export, explain and eval load checkpoints this way."""
import pytest
import torch

from vittt.engine import (CHECKPOINT_FORMAT, CheckpointError, Task, load_model_weights, load_recipe,
                          load_trained_model, save_checkpoint)

VIT = dict(depth=1, embed_dim=32, num_heads=2)
DIT = dict(depth=1, embed_dim=32, num_heads=2)


def _classifier_checkpoint(path):
    import timm
    recipe = load_recipe(None, dict(model='vit3_tiny', model_kwargs=VIT, in_chans=1, img_size=28))
    torch.manual_seed(0)
    model = timm.create_model('vit3_tiny', num_classes=10, in_chans=1, img_size=28, **VIT)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    save_checkpoint(dict(task='classification', identity=dict(model_name='vit3_tiny', num_classes=10),
                         recipe=recipe, model=model.state_dict(), ema=ema), path)
    return model, ema


def _generator_checkpoint(path):
    from vittt import create_dit
    recipe = load_recipe(None, dict(task='generation', model='dit3_s_2', model_kwargs=DIT))
    torch.manual_seed(0)
    model = create_dit('dit3_s_2', in_chans=1, num_classes=10, learn_sigma=recipe['learn_sigma'], **DIT)
    save_checkpoint(dict(task='generation', identity=dict(model_name='dit3_s_2', num_classes=10, in_chans=1,
                                                          latent_scale=None),
                         recipe=recipe, model=model.state_dict(), ema=None), path)
    return model


def test_a_classifier_comes_back_with_its_ema_weights_channels_and_size(tmp_path):
    path = tmp_path / 'last.pth'
    model, ema = _classifier_checkpoint(path)
    task, loaded = load_trained_model(path)
    assert task.name == 'classification' and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())
    _, raw = load_trained_model(path, use_ema=False)
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in model.state_dict().items())
    again, in_chans, size = load_model_weights('vit3_tiny', path)
    assert (in_chans, size) == (1, 28) and torch.equal(again.head.weight, ema['head.weight'])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))
    assert load_model_weights('vit3_tiny', path, img_size=56)[2] == 56


def test_a_generator_comes_back_without_its_data_or_vae(tmp_path):
    path = tmp_path / 'gen.pth'
    model = _generator_checkpoint(path)
    task, loaded = load_trained_model(path)
    assert task.name == 'generation' and loaded.in_chans == 1
    args = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(*args), model.eval()(*args))


def test_a_checkpoint_of_another_model_or_task_is_refused_by_name(tmp_path):
    _classifier_checkpoint(tmp_path / 'cls.pth')
    _generator_checkpoint(tmp_path / 'gen.pth')
    with pytest.raises(ValueError, match='holds a vit3_tiny, not a hvit3_tiny'):
        load_trained_model(tmp_path / 'cls.pth', model_name='hvit3_tiny')
    with pytest.raises(ValueError, match='checkpoint of a generation run, not of an image classifier'):
        load_model_weights('dit3_s_2', tmp_path / 'gen.pth')
    torch.save(dict(format='something-else', model={}), tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError, match='not a vittt training checkpoint'):
        load_trained_model(tmp_path / 'odd.pth')
    torch.save(dict(format=CHECKPOINT_FORMAT, task='classification',
                    identity=dict(model_name='vit3_tiny', num_classes=10),
                    recipe=load_recipe(None, dict(model='vit3_tiny', model_kwargs=VIT, in_chans=1, img_size=28)),
                    model={'head.weight': torch.zeros(10, 32)}, ema=None), tmp_path / 'short.pth')
    with pytest.raises(CheckpointError, match='missing'):
        load_trained_model(tmp_path / 'short.pth')


def test_a_task_without_from_checkpoint_says_so():
    class Untrained(Task):
        name = 'untrained'
    with pytest.raises(NotImplementedError, match='the untrained task cannot rebuild its model'):
        Untrained.from_checkpoint({})


def test_export_reads_an_engine_checkpoint(tmp_path):
    from vittt.tasks.export import export_model
    path = tmp_path / 'last.pth'
    _, ema = _classifier_checkpoint(path)
    result = export_model('vit3_tiny', tmp_path / 'm.pt2', checkpoint=path, dynamic=('batch',), log=lambda *_: None)
    assert [c['shape'][1:] for c in result.checks] == [[1, 28, 28]] * len(result.checks)  # the recipe's input
    program = torch.export.load(str(tmp_path / 'm.pt2')).module()
    again, _, _ = load_model_weights('vit3_tiny', path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(program(x), again(x), atol=1e-5)
