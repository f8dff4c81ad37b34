"""torchvision detectors over DenseBackbone: one training step (every parameter gets a gradient), the eval output
format, an image without objects, the presets, mmdet-compatible anchors, and the target checks."""
import pytest
import torch

import vittt  # noqa: F401  (before torchvision)
from vittt.dense import DETECTORS, build_detector, build_maskrcnn
from vittt.tasks.dense import TargetError, check_detection_targets

HVIT3 = ('hvit3_tiny', dict(dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4)))
VIT3 = ('vit3_tiny', dict(embed_dim=64, depth=4, num_heads=2))
RESNET = ('resnet10t', {})


def _batch():
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 112)]
    masks = torch.zeros(2, 96, 96, dtype=torch.uint8)
    masks[0, 10:60, 10:50] = 1
    masks[1, 30:80, 40:90] = 1
    targets = [dict(boxes=torch.tensor([[10., 10, 50, 60], [40, 30, 90, 80]]), labels=torch.tensor([1, 3]),
                    masks=masks),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                    masks=torch.zeros(0, 80, 112, dtype=torch.uint8))]  # an image without objects
    return images, targets


def _step_and_eval(model, with_masks):
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    keys = {'boxes', 'labels', 'scores'} | ({'masks'} if with_masks else set())
    for out, image in zip(outputs, images):
        assert set(out) == keys
        n = len(out['boxes'])
        assert out['boxes'].shape == (n, 4) and out['scores'].shape == (n,) and out['labels'].dtype == torch.int64
        if with_masks:
            assert out['masks'].shape == (n, 1) + tuple(image.shape[-2:])
    return losses


@pytest.mark.parametrize('backbone', [HVIT3, VIT3, RESNET], ids=lambda b: b[0])
def test_maskrcnn_trains_and_predicts(backbone):
    name, kwargs = backbone
    model = build_maskrcnn(name, 10, preset='cpu-small', image_size=96, backbone_kwargs=kwargs)
    assert model.roi_heads.box_predictor.cls_score.out_features == 11  # + background
    losses = _step_and_eval(model, True)
    assert {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'} == set(losses)


@pytest.mark.parametrize('detector', [d for d in DETECTORS if d != 'maskrcnn'])
def test_other_detectors_train_and_predict(detector):
    name, kwargs = HVIT3 if detector != 'fasterrcnn' else VIT3
    model = build_detector(detector, name, 10, preset='cpu-small', image_size=96, backbone_kwargs=kwargs)
    _step_and_eval(model, False)


def test_official_preset_and_mmdet_compat():
    name, kwargs = HVIT3
    model = build_maskrcnn(name, 80, backbone_kwargs=kwargs)
    assert model.transform.min_size == tuple(range(480, 801, 32)) and model.transform.max_size == 1333
    assert model.backbone.out_channels == 256 and model.rpn._pre_nms_top_n['training'] == 2000
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    rounded = model.rpn.anchor_generator.cell_anchors[0]
    assert torch.equal(rounded, rounded.round())
    compat = build_maskrcnn(name, 80, mmdet_compat=True, backbone_kwargs=kwargs)
    anchors = compat.rpn.anchor_generator.cell_anchors[0]
    assert not torch.equal(anchors, anchors.round())  # ratio 0.5: sqrt(2) sides, unrounded as in mmdet
    torch.testing.assert_close(anchors[0], torch.tensor([-16 * 2 ** 0.5, -8 * 2 ** 0.5, 16 * 2 ** 0.5, 8 * 2 ** 0.5]))
    assert compat.roi_heads.box_roi_pool.sampling_ratio == 0


def test_mmdet_compat_pooling_uses_aligned_roi_align():
    from torchvision.ops import roi_align
    from vittt.dense import AlignedMultiScaleRoIAlign
    pool = AlignedMultiScaleRoIAlign(['0'], 7, 0)
    feature = torch.randn(1, 4, 24, 24)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 72.0]])]
    out = pool({'0': feature}, boxes, [(96, 96)])
    ref = roi_align(feature, [boxes[0]], 7, 0.25, 0, aligned=True)
    torch.testing.assert_close(out, ref)


def test_target_errors_name_the_problem():
    images, targets = _batch()
    check_detection_targets(images, targets, 10, masks=True)
    cases = [
        (dict(boxes=torch.tensor([[10., 10, 120, 60]])), 'outside the 96x96 image'),
        (dict(boxes=torch.tensor([[10., 10, 10, 60]])), 'has no area'),
        (dict(labels=torch.tensor([11])), r'labels must be in 1\.\.10'),
        (dict(labels=torch.tensor([0])), r'labels must be in 1\.\.10'),
        (dict(masks=torch.zeros(1, 50, 50, dtype=torch.uint8)), r'masks must be \[N, H, W\] = \[1, 96, 96\]'),
    ]
    for change, message in cases:
        target = dict(boxes=torch.tensor([[10., 10, 50, 60]]), labels=torch.tensor([1]),
                      masks=torch.zeros(1, 96, 96, dtype=torch.uint8), image_id=torch.tensor(7))
        target.update(change)
        with pytest.raises(TargetError, match=message) as err:
            check_detection_targets(images[:1], [target], 10, masks=True)
        assert 'image 7' in str(err.value)
    with pytest.raises(TargetError, match="no 'masks'"):
        check_detection_targets(images[:1], [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0))], 10, masks=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match='detector must be one of'):
        build_detector('yolo', 'resnet10t', 3)
    with pytest.raises(ValueError, match='preset must be one of'):
        build_maskrcnn('resnet10t', 3, preset='huge')
    with pytest.raises(ValueError, match='without background'):
        build_maskrcnn('resnet10t', 0)
    with pytest.raises(ValueError, match='not a registered timm model'):
        build_maskrcnn('no_such_net', 3)


def test_bf16_autocast_training_step_is_finite():
    """AMP on CPU: the detector runs in bf16 with the TTT inner update kept in fp32 (the engine's amp=bf16)."""
    name, kwargs = HVIT3
    model = build_maskrcnn(name, 10, preset='cpu-small', image_size=96, backbone_kwargs=kwargs)
    images, targets = _batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
