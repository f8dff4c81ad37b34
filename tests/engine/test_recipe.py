"""Recipes: shipped YAML as package data, typed overrides, "did you mean", run length and the warm-up."""
import pytest

from vittt.engine import (ENGINE_DEFAULTS, RecipeError, find_recipe, list_recipes, load_recipe, parse_overrides,
                          recipe_defaults, scaled_lr)


def test_overrides_are_typed():
    overrides = parse_overrides(['lr=1e-3', 'mixup=0', 'amp=bf16', 'auto_augment=null', 'scale=[0.5, 1.0]'])
    assert overrides['amp'] == 'bf16' and overrides['scale'] == [0.5, 1.0] and overrides['auto_augment'] is None
    assert load_recipe(None, overrides) == dict(recipe_defaults('classification'), lr=1e-3, mixup=0, amp='bf16',
                                                auto_augment=None, scale=[0.5, 1.0])  # '1e-3' becomes a number
    with pytest.raises(RecipeError, match="lr must be a number, got 'fast'"):
        load_recipe(None, parse_overrides(['lr=fast']))
    with pytest.raises(RecipeError, match='key=value'):
        parse_overrides(['lr'])


def test_recipe_layers_and_errors(tmp_path):
    recipe = load_recipe('hvit3_small', dict(epochs=5))
    assert recipe['model'] == 'hvit3_small' and recipe['drop_path'] == 0.4 and recipe['mesa'] == 1.5
    assert recipe['epochs'] == 5 and recipe['weight_decay'] == ENGINE_DEFAULTS['weight_decay']
    with pytest.raises(RecipeError, match=r"'lrr' \(did you mean lr"):
        load_recipe(None, dict(lrr=1.0))
    with pytest.raises(RecipeError, match='amp must be one of'):
        load_recipe(None, dict(amp='fp8'))
    with pytest.raises(RecipeError, match='epochs must be a positive integer'):
        load_recipe(None, dict(epochs=0))
    with pytest.raises(RecipeError, match="unknown task 'panoptic'"):
        load_recipe(None, dict(task='panoptic'))
    bad = tmp_path / 'bad.yaml'
    bad.write_text('- a\n- list\n')
    with pytest.raises(RecipeError, match='a recipe is a mapping'):
        load_recipe(bad)
    with pytest.raises(RecipeError, match='recipe not found'):
        load_recipe(tmp_path / 'missing.yaml')
    with pytest.raises(RecipeError, match='did you mean hvit3_small'):
        load_recipe('hvit3_smal')
    typo = tmp_path / 'typo.yaml'
    typo.write_text('model: vit3_tiny\ndrop_pth: 0.1\n')
    with pytest.raises(RecipeError, match=r"typo.yaml: unknown recipe keys 'drop_pth' \(did you mean drop_path"):
        load_recipe(typo)


def test_shipped_recipes_are_package_data_and_name_their_model():
    import timm
    shipped = list_recipes()
    assert {'vit3_tiny', 'vit3_small', 'vit3_base', 'hvit3_tiny', 'hvit3_small', 'hvit3_base', 'vision_ttt_tiny',
            'vision_ttt_small', 'vision_ttt_base', 'deit_tiny_patch16_224', 'fashion_mnist_demo'} <= set(shipped)
    from vittt.models.dit3 import DIT_CONFIGS
    for name in shipped:
        recipe = load_recipe(name)
        if recipe['task'] == 'generation':
            assert recipe['model'] in DIT_CONFIGS and recipe['steps'] and recipe['epochs'] is None
            continue
        if recipe['task'] in ('detection', 'segmentation'):  # backbones: any timm model
            assert recipe['model'] in timm.list_models() and (recipe['steps'] or recipe['epochs'])
            continue
        assert recipe['task'] == 'classification'
        if name != 'fashion_mnist_demo':
            assert recipe['model'] == name and name in timm.list_models() and find_recipe(name) == name
    assert find_recipe('resnet18') is None
    assert load_recipe(find_recipe('vit3_small'))['drop_path'] == 0.1
    assert load_recipe(find_recipe('hvit3_base'))['drop_path'] == 0.6


def test_a_shortened_run_shrinks_its_warmup_and_says_so():
    notes = []
    recipe = load_recipe('vit3_tiny', dict(epochs=3), notes)
    assert recipe['warmup_epochs'] == pytest.approx(20 * 3 / 300)
    assert len(notes) == 1 and '300 to 3 epochs' in notes[0] and '20 -> 0.2 epochs' in notes[0]
    notes = []
    assert load_recipe('vit3_tiny', dict(epochs=3, warmup_epochs=1), notes)['warmup_epochs'] == 1 and not notes
    assert load_recipe('vit3_tiny', dict(epochs=400), notes)['warmup_epochs'] == 20 and not notes  # longer: kept
    with pytest.raises(RecipeError, match=r'warm-up \(warmup_epochs=20\) is not shorter than the run \(epochs=10\)'):
        load_recipe('vit3_tiny', dict(epochs=10, warmup_epochs=20))


def test_step_based_runs(tmp_path):
    path = tmp_path / 'steps.yaml'
    path.write_text('model: vit3_tiny\nepochs: null\nsteps: 1000\nwarmup_steps: 100\nsched: constant\n')
    notes = []
    recipe = load_recipe(path, dict(steps=50), notes)
    assert recipe['steps'] == 50 and recipe['epochs'] is None and recipe['warmup_steps'] == 5
    assert '1000 to 50 steps' in notes[0]
    with pytest.raises(RecipeError, match=r'warm-up \(warmup_steps=100\) is not shorter than the run \(steps=100\)'):
        load_recipe(path, dict(steps=100, warmup_steps=100))
    switched = load_recipe('vit3_tiny', dict(steps=20, warmup_steps=2))  # steps override clears epochs
    assert switched['steps'] == 20 and switched['epochs'] is None
    assert load_recipe(path, dict(epochs=2, warmup_epochs=0))['steps'] is None
    with pytest.raises(RecipeError, match='sched must be one of'):
        load_recipe(path, dict(sched='linear'))
    both = tmp_path / 'both.yaml'
    both.write_text('model: vit3_tiny\nepochs: 3\nsteps: 10\n')
    with pytest.raises(RecipeError, match='set either epochs or steps, not both'):
        load_recipe(both)


def test_linear_lr_scaling():
    lrs = scaled_lr(load_recipe(None, dict(batch_size=128)), world_size=32)  # global 4096: the paper's 4e-3
    assert lrs['lr'] == pytest.approx(4e-3) and lrs['min_lr'] == pytest.approx(4e-5)
    assert scaled_lr(load_recipe(None, dict(lr_base_batch=None, lr=1e-4)), world_size=8)['lr'] == 1e-4
