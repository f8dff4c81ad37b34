"""The latent cache: `vittt generate cache` stores the VAE posterior of every image (and of its mirror), and a run
on the cache equals the run that encodes the images on the fly; wrong VAE / size / flips are refused."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('diffusers')

from vittt.cli import main  # noqa: E402
from vittt.engine import init_distributed, load_recipe  # noqa: E402
from vittt.tasks.generation.run import train  # noqa: E402

RECIPE = dict(task='generation', model='dit3_s_2', model_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
              image_size=16, batch_size=4, lr=1e-3, num_workers=0, val_batches=1, sample_per_class=1,
              sample_classes=2, sample_sampler='ddim2', model_ema_decay=0.9, model_ema_ref_batch=4, steps=3,
              eval_every=0, hflip=0.5)


@pytest.fixture(scope='module')
def setup(tmp_path_factory, tiny_vae):
    root = tmp_path_factory.mktemp('latents')
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 4), ('val', 2)):
        for c in ('cat', 'dog'):
            (root / 'data' / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(pixels).save(root / 'data' / split / c / f'{i}.png')
    vae = tiny_vae(root / 'vae')
    assert main(['generate', 'cache', '--vae', str(vae), '--data', str(root / 'data'), '--output',
                 str(root / 'cache'), '--image-size', '16', '--batch-size', '3', '--no-progress']) == 0
    return root


def test_cache_holds_the_posterior_of_each_image_and_its_mirror(setup):
    from vittt.diffusion.vae import encode_moments, load_vae
    from vittt.tasks.generation.data import build_generation_datasets

    meta = json.loads((setup / 'cache' / 'cache.json').read_text())
    assert meta['splits'] == {'train': 8, 'val': 4} and meta['classes'] == ['cat', 'dog'] and meta['flips']
    moments = np.load(setup / 'cache' / 'train_moments.npy')
    assert moments.shape == (8, 2, 8, 8, 8) and moments.dtype == np.float32  # [N, flips, 2 × 4 channels, 8, 8]
    assert np.load(setup / 'cache' / 'train_labels.npy').tolist() == [0] * 4 + [1] * 4
    images, _, _, _ = build_generation_datasets(setup / 'data', dict(image_size=16, hflip=0.0))
    vae = load_vae(setup / 'vae')
    x = torch.stack([images[i][0] for i in range(8)])
    torch.testing.assert_close(torch.from_numpy(moments[:, 0]), encode_moments(vae, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(moments[:, 1]), encode_moments(vae, x.flip(-1)), atol=1e-5,
                               rtol=1e-5)
    assert not list((setup / 'cache').glob('.*.tmp'))


def test_a_run_on_the_cache_equals_the_run_on_the_images(setup, tmp_path):
    recipe = load_recipe(None, dict(RECIPE, vae=str(setup / 'vae')))
    info = init_distributed('cpu')
    on_images = train(recipe, setup / 'data', tmp_path / 'images', info, progress=False)
    on_cache = train(recipe, setup / 'cache', tmp_path / 'cache', info, progress=False)
    for key in ('train_loss', 'mse', 'vb', 'val_loss', 'ema_val_loss'):
        assert on_cache[-1][key] == pytest.approx(on_images[-1][key], rel=1e-4), key
    a = torch.load(tmp_path / 'images' / 'last.pth', weights_only=True)['model']
    b = torch.load(tmp_path / 'cache' / 'last.pth', weights_only=True)['model']
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


def test_cache_refusals(setup, tmp_path, tiny_vae, capsys):
    info = init_distributed('cpu')
    with pytest.raises(ValueError, match='train with vae='):
        train(load_recipe(None, RECIPE), setup / 'cache', tmp_path / 'a', info, progress=False)
    other = tiny_vae(tmp_path / 'other_vae', seed=1)
    with pytest.raises(ValueError, match='written by another VAE'):
        train(load_recipe(None, dict(RECIPE, vae=str(other))), setup / 'cache', tmp_path / 'b', info, progress=False)
    with pytest.raises(ValueError, match='holds latents of 16² images'):
        train(load_recipe(None, dict(RECIPE, vae=str(setup / 'vae'), image_size=32)), setup / 'cache',
              tmp_path / 'c', info, progress=False)
    assert main(['generate', 'cache', '--vae', str(setup / 'vae'), '--data', str(setup / 'data'), '--output',
                 str(tmp_path / 'noflip'), '--image-size', '16', '--no-flip', '--no-progress']) == 0
    with pytest.raises(ValueError, match='written with --no-flip'):
        train(load_recipe(None, dict(RECIPE, vae=str(setup / 'vae'))), tmp_path / 'noflip', tmp_path / 'd', info,
              progress=False)
    assert main(['generate', 'cache', '--vae', str(setup / 'vae'), '--data', str(setup / 'data'), '--output',
                 str(tmp_path / 'bad'), '--image-size', '13', '--no-progress']) == 2  # not a multiple of 2
    assert 'not divisible by the VAE downsampling factor 2' in capsys.readouterr().err
