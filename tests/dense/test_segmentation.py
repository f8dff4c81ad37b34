"""UPerNet (smp) over DenseBackbone: training and evaluation at odd sizes, the auxiliary head, the mmseg head, plain
models through the multi-tap pyramid, and smp's own timm-universal encoder on H-ViT³."""
import pytest
import torch

import vittt  # noqa: F401  (before timm / torchvision / smp)

pytest.importorskip('segmentation_models_pytorch', reason="needs the dense extra (pip install 'vittt[dense]')")
from vittt.dense import build_upernet  # noqa: E402

MICRO = dict(dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))


@pytest.mark.parametrize('name,kwargs', [('hvit3_tiny', MICRO), ('vit3_tiny', dict(embed_dim=64, depth=4, num_heads=2)),
                                         ('convnext_atto', {})], ids=['hvit3', 'vit3-taps', 'convnext'])
def test_upernet_trains_and_predicts_at_odd_sizes(name, kwargs):
    model = build_upernet(name, 7, decoder_channels=32, backbone_kwargs=kwargs)
    x = torch.rand(2, 3, 97, 131)
    model.train()
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 7, 97, 131)
    (logits.logsumexp(1).mean() + aux.logsumexp(1).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        for h, w in ((150, 97), (33, 45), (64, 64)):
            assert model(torch.rand(1, 3, h, w)).shape == (1, 7, h, w)


def test_upernet_options():
    h3 = build_upernet('hvit3_tiny', 5, decoder_channels=16, aux_head=False, backbone_kwargs=MICRO)
    assert h3.pad is None and h3.aux_head is None  # H-ViT³ runs unpadded, as the official test pipeline
    assert all(n.eps == 1e-5 for n in h3.decoder.feature_norms)
    assert h3.backbone.norms is None  # the decoder's LayerNorms take the official norm0..3
    h3.train()  # (batch >= 2 in training: the PSP's 1x1 pooled map goes through BatchNorm, as in mmseg)
    assert h3(torch.rand(2, 3, 64, 64)).shape == (2, 5, 64, 64)  # no aux: just the logits
    vit = build_upernet('vit3_tiny', 5, decoder_channels=16, backbone_kwargs=dict(embed_dim=64, depth=4, num_heads=2))
    assert vit.pad == 32 and vit.backbone.pyramid.mode == 'taps'
    smp_head = build_upernet('hvit3_tiny', 5, decoder_channels=16, head_mode='smp', backbone_kwargs=MICRO).eval()
    assert smp_head(torch.rand(1, 3, 64, 96)).shape == (1, 5, 64, 96)
    with pytest.raises(ValueError, match="head_mode must be 'mmseg' or 'smp'"):
        build_upernet('hvit3_tiny', 5, head_mode='x', backbone_kwargs=MICRO)


def test_smp_universal_encoder_takes_hvit3():
    import segmentation_models_pytorch as smp
    model = smp.UPerNet(encoder_name='tu-hvit3_tiny', encoder_weights=None, classes=3, decoder_channels=16,
                        **MICRO).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
