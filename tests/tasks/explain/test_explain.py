"""`vittt explain`: the effective receptive field (exact on convolutions, shapes on ViT³ / DeiT), the spread numbers,
gradient × input token importance (exact on a model that reads one patch), and the command line."""
import json

import pytest
import timm
import torch
from torch import nn

from vittt.cli import main
from vittt.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_root
from vittt.tasks.explain import effective_receptive_field, erf_spread, log_scaled, pool_to_tokens, token_importance
from vittt.tasks.explain._common import centred_square, features_as_map, mass_fraction

needs_fmnist = pytest.mark.skipif(not (fashion_mnist_root() / 't10k-labels-idx1-ubyte.gz').is_file(),
                                  reason='Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed')


def _support(erf: torch.Tensor):
    """(first row, last row, first column, last column) of the non-zero entries of an [H, W] map."""
    nz = erf.nonzero()
    return int(nz[:, 0].min()), int(nz[:, 0].max()), int(nz[:, 1].min()), int(nz[:, 1].max())


def _conv(c_in, c_out, seed):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    with torch.no_grad():  # positive weights: no cancellation between paths, the support is the full window
        conv.weight.copy_(torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(seed)) + 0.1)
    return conv


def test_erf_of_one_conv_is_its_window_and_kernel():
    conv = _conv(3, 4, 0)
    result = effective_receptive_field(conv, torch.randn(3, 3, 15, 15), relu=False, batch_size=2)
    erf = result['erf']
    assert erf.shape == (15, 15) and result['feature_grid'] == (15, 15) and result['position'] == (7, 7)
    assert _support(erf) == (6, 8, 6, 8)
    # d y(7, 7) / d x[c, 7 + a, 7 + b] = sum_o w[o, c, 1 + a, 1 + b], whatever the image
    torch.testing.assert_close(erf[6:9, 6:9], conv.weight.detach().sum(0).abs().sum(0))
    # another position of the map: the window moves, clipped at the border
    corner = effective_receptive_field(conv, torch.randn(1, 3, 15, 15), relu=False, position=(0, 14))['erf']
    assert _support(corner) == (0, 1, 13, 14)
    assert result['images'] == 3 and result['input_size'] == (15, 15)
    assert result['area_90'] <= 9 / 225 and result['square_side_90'] == 3 and result['square_ratio_90'] == 9 / 225


def test_erf_of_two_convs_is_5x5_and_nhwc_features_are_handled():
    stack = nn.Sequential(_conv(2, 3, 1), _conv(3, 2, 2))
    x = torch.randn(2, 2, 16, 16)
    erf = effective_receptive_field(stack, x, relu=False)['erf']
    assert _support(erf) == (6, 10, 6, 10)  # centre (8, 8) ± 2

    class ChannelsLast(nn.Module):  # a timm-style model whose features are [B, H, W, C]
        output_fmt = 'NHWC'

        def __init__(self):
            super().__init__()
            self.body = stack

        def forward_features(self, x):
            return self.body(x).permute(0, 2, 3, 1)

    torch.testing.assert_close(effective_receptive_field(ChannelsLast(), x, relu=False)['erf'], erf)
    was_training = stack.train().training
    effective_receptive_field(stack, x)
    assert was_training and stack.training  # evaluated in eval mode, mode restored


def test_spread_numbers():
    delta = torch.zeros(9, 9)
    delta[4, 4] = 2.0
    assert erf_spread(delta) == dict(area_50=1 / 81, square_side_50=1, square_ratio_50=1 / 81, area_90=1 / 81,
                                     square_side_90=1, square_ratio_90=1 / 81)
    values = torch.tensor([[5.0, 3.0], [1.0, 1.0]])  # sorted 5, 3, 1, 1 of 10: 50 % in 1 entry, 90 % in 3
    assert mass_fraction(values, 0.5) == 0.25 and mass_fraction(values, 0.9) == 0.75
    assert mass_fraction(values, 1.0) == 1.0 and mass_fraction(torch.zeros(3, 3), 0.5) is None
    ring = torch.ones(7, 7)  # uniform: a square of side s holds s² / 49 (5² / 49 > 0.5)
    assert centred_square(ring, 0.5) == (5, 25 / 49) and centred_square(ring, 0.18) == (3, 9 / 49)
    shown = log_scaled(torch.tensor([[1.0, 1e-2], [0.0, 1e-6]]))  # 4 decades: 1e-2 at ~1/2 (the 1e-4 floor added)
    torch.testing.assert_close(shown, torch.tensor([[1.0, 0.5], [0.0, 0.0]]), atol=2e-3, rtol=0)


def _check_erf(result, size):
    erf, shown = result['erf'], result['erf_log']
    assert erf.shape == shown.shape == (size, size)
    assert torch.isfinite(erf).all() and (erf >= 0).all() and erf.max() > 0
    assert shown.min() >= 0 and shown.max() == 1
    for key in ('area_50', 'area_90', 'square_ratio_50', 'square_ratio_90'):
        assert 0 < result[key] <= 1, key
    assert result['area_50'] <= result['area_90'] and result['square_side_50'] <= result['square_side_90']


def test_erf_of_vit3_and_deit():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    vit3 = timm.create_model('vit3_tiny', depth=3)  # the family's layout, fewer blocks to keep the test short
    result = effective_receptive_field(vit3, x, batch_size=1)
    assert result['feature_grid'] == (4, 4) and result['position'] == (2, 2)
    _check_erf(result, 64)
    deit = timm.create_model('deit_tiny_patch16_224', img_size=64, depth=3)  # tokens [B, 1 + 16, C]
    assert deit.num_prefix_tokens == 1
    result = effective_receptive_field(deit, x)
    assert result['feature_grid'] == (4, 4)
    _check_erf(result, 64)
    tokens = deit.forward_features(x)
    assert features_as_map(deit, tokens, (64, 64))[:, :, 0, 1].equal(tokens[:, 2])  # class token dropped
    with pytest.raises(ValueError, match='smaller than the 16×16 patch'):
        effective_receptive_field(vit3, torch.randn(1, 3, 8, 8))


class TopLeftReader(nn.Module):
    """Logit 0 is 10 + the sum of the top-left 4×4 pixels of channel 0; logit 1 is 0: class 0 always wins."""
    patch_size = 4

    def forward(self, x):
        score = x[:, 0, :4, :4].sum(dim=(1, 2))
        return torch.stack([10 + score, torch.zeros_like(score)], dim=1)


def test_token_importance_of_a_model_reading_one_patch():
    x = torch.randn(3, 2, 12, 10)  # 10 is not a multiple of 4: the grid is 3 × 3, padded
    result = token_importance(TopLeftReader(), x)
    maps = result['maps']
    assert maps.shape == (3, 3, 3) and result['grid'] == (3, 3) and result['patch_size'] == (4, 4)
    expected = torch.zeros(3, 3, 3)
    expected[:, 0, 0] = 1
    torch.testing.assert_close(maps, expected)
    assert result['targets'].tolist() == result['predicted'].tolist() == [0, 0, 0]
    torch.testing.assert_close(result['pixels'][:, :4, :4], x[:, 0, :4, :4].abs())  # |x · 1| on the patch
    assert result['area_50'] == result['area_90'] == [1 / 9] * 3
    # the explicit patch size wins over the model's; class 1 does not depend on the input: an all-zero map
    other = token_importance(TopLeftReader(), x, target=1, patch_size=2)
    assert other['maps'].shape == (3, 6, 5) and other['maps'].abs().sum() == 0
    pooled = pool_to_tokens(torch.arange(12.0 * 10).reshape(1, 12, 10), (4, 4))
    assert pooled.shape == (1, 3, 3) and pooled.sum() == torch.arange(12.0 * 10).sum()


def test_token_importance_of_deit_and_resnet():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for model, grid in ((timm.create_model('deit_tiny_patch16_224', img_size=64, depth=2, num_classes=10), (4, 4)),
                        (timm.create_model('resnet18', num_classes=10), (2, 2))):  # stride-32 cells
        result = token_importance(model, x, target=[3, 7])
        maps = result['maps']
        assert maps.shape == (2, *grid) and (maps >= 0).all()
        torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2))
        assert result['targets'].tolist() == [3, 7] and result['logits'].shape == (2, 10)


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_erf(tmp_path, capsys):
    code, out, _ = _run(['explain', 'erf', '--models', 'vit3_tiny', 'resnet18', '--data', 'noise', '--img-size', '64',
                         '--images', '2', '--output', str(tmp_path)], capsys)
    assert code == 0 and 'vit3_tiny' in out and 'resnet18' in out
    assert (tmp_path / 'erf.png').stat().st_size > 0 and (tmp_path / 'erf_maps.safetensors').is_file()
    payload = json.loads((tmp_path / 'erf.json').read_text())
    assert list(payload['models']) == ['vit3_tiny', 'resnet18'] and payload['images'] == 2
    for row in payload['models'].values():
        assert 0 < row['area_50'] <= row['area_90'] <= 1 and row['img_size'] == 64
        assert row['square_side_50'] <= row['square_side_90']
    assert payload['models']['vit3_tiny']['feature_grid'] == [4, 4]


def test_cli_errors(tmp_path, capsys):
    base = ['explain', 'erf', '--data', 'noise', '--images', '1', '--output', str(tmp_path)]
    code, _, err = _run([*base, '--models', 'vit3_tiny', 'no_such_net'], capsys)
    assert code == 2 and "'no_such_net'" in err
    code, _, err = _run([*base, '--models', 'vit3_tiny', '--checkpoint', 'resnet18=x.pth'], capsys)
    assert code == 2 and "'resnet18' is not among --models" in err
    code, _, err = _run([*base, '--models', 'vit3_tiny', '--img-size', '8'], capsys)
    assert code == 2 and 'image size 8 is smaller than the 16×16 patch of vit3_tiny' in err
    code, _, err = _run(['explain', 'tokens', '--models', 'vit3_tiny', 'resnet18', '--output', str(tmp_path)], capsys)
    assert code == 2 and 'one model' in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(['explain'])  # a subcommand is required


@needs_fmnist
def test_cli_tokens_on_fashion_mnist(tmp_path, capsys):
    code, out, _ = _run(['explain', 'tokens', '--models', 'resnet18', '--img-size', '64', '--images', '3',
                         '--output', str(tmp_path)], capsys)
    assert code == 0 and 'resnet18' in out
    assert (tmp_path / 'tokens.png').stat().st_size > 0
    payload = json.loads((tmp_path / 'tokens.json').read_text())
    assert payload['grid'] == [2, 2] and payload['class_names'] == list(FASHION_MNIST_CLASSES)
    assert len(payload['per_image']) == 3
    for row in payload['per_image']:
        assert row['label_name'] == FASHION_MNIST_CLASSES[row['label']] and 0 <= row['predicted'] < 10
        assert abs(sum(map(sum, row['map'])) - 1) < 1e-4 and min(map(min, row['map'])) >= 0
