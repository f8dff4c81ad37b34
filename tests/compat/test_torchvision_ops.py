"""Tests for vittt.compat.torchvision_ops (torchvision without its C++ extension)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import vittt  # noqa: F401  (must come before torchvision/timm)
import torchvision  # noqa: E402
from torchvision.ops import batched_nms, nms  # noqa: E402

from vittt.compat import TORCHVISION_FALLBACK, ensure_torchvision, fallback_installed, nms_reference  # noqa: E402


# --------------------------------------------------------------------------- helpers


def brute_force_nms(boxes, scores, iou_threshold):
    """Independent O(N^2) pure-Python greedy NMS (float64 arithmetic)."""
    b = boxes.double().tolist()
    s = scores.tolist()
    order = sorted(range(len(s)), key=lambda i: -s[i])  # Python's sort is stable

    def iou(p, q):
        area_p = (p[2] - p[0]) * (p[3] - p[1])
        area_q = (q[2] - q[0]) * (q[3] - q[1])
        w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = w * h
        union = area_p + area_q - inter
        return math.nan if union == 0 else inter / union

    keep = []
    for i in order:
        if all(not (iou(b[k], b[i]) > iou_threshold) for k in keep):
            keep.append(i)
    return keep


def random_boxes(gen, n, integer=False, dtype=torch.float64):
    if integer:
        xy = torch.randint(0, 40, (n, 2), generator=gen)
        wh = torch.randint(1, 25, (n, 2), generator=gen)
    else:
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 100
        wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


# Five boxes, worked out by hand (IoU values in the comments):
#   0 [0,0,10,10]   score .60
#   1 [5,0,15,10]   score .90   IoU(1,0) = 50/150 = .333,  IoU(1,3) = 32/132 = .242
#   2 [20,20,30,30] score .30   disjoint from 0, 1, 3
#   3 [1,1,9,9]     score .80   IoU(3,0) = 64/100 = .64
#   4 [21,21,29,29] score .95   IoU(4,2) = 64/100 = .64
# Score order: 4, 1, 3, 0, 2.
FIVE_BOXES = torch.tensor(
    [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [1, 1, 9, 9], [21, 21, 29, 29]],
    dtype=torch.float32,
)
FIVE_SCORES = torch.tensor([0.60, 0.90, 0.30, 0.80, 0.95])


# --------------------------------------------------------------------------- imports


def test_torchvision_and_timm_import():
    import timm

    assert torchvision.__version__
    assert callable(timm.create_model)
    assert "torchvision" in sys.modules and "timm" in sys.modules


def test_import_order_in_fresh_interpreter():
    # vittt first, then torchvision and timm, in a clean process (no pytest imports around).
    code = textwrap.dedent(
        """
        import vittt, torchvision, timm, torch
        keep = torchvision.ops.nms(torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.]]), torch.tensor([.1, .2]), .5)
        assert keep.tolist() == [1], keep
        print("ok", vittt.__version__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {vittt.__version__}"


def test_op_schemas():
    assert str(torch.ops.torchvision.nms.default._schema) == (
        "torchvision::nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )
    assert str(torch.ops.torchvision.qnms.default._schema) == (
        "torchvision::qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )


def test_fallback_matches_extension_state():
    from torchvision import extension
    from torchvision.ops import boxes

    # The fallback is installed exactly when torchvision's own extension did not load,
    # and only then is torchvision.ops.boxes' _assert_has_ops replaced.
    assert TORCHVISION_FALLBACK == (not extension._has_ops())
    assert fallback_installed() == TORCHVISION_FALLBACK
    assert (boxes._assert_has_ops is extension._assert_has_ops) == (not TORCHVISION_FALLBACK)
    if TORCHVISION_FALLBACK:
        # Ops that the fallback does not provide still fail loudly.
        with pytest.raises(RuntimeError, match="Couldn't load custom C"):
            torchvision.ops.roi_pool(torch.zeros(1, 1, 4, 4), [torch.zeros(1, 4)], 2)


def test_ensure_torchvision_idempotent():
    from torchvision.ops import boxes

    from vittt.compat import torchvision_ops

    lib = torchvision_ops._LIB
    patched = boxes._assert_has_ops
    first = ensure_torchvision()
    second = ensure_torchvision()
    assert first is second is TORCHVISION_FALLBACK
    assert torchvision_ops._LIB is lib
    assert boxes._assert_has_ops is patched
    assert (lib is not None) == TORCHVISION_FALLBACK
    # nms still works after the repeated calls.
    assert nms(FIVE_BOXES, FIVE_SCORES, 0.5).tolist() == [4, 1, 3]


def test_no_fallback_when_op_already_registered():
    # Simulates a working install: torchvision::nms is already registered when the module
    # runs, so ensure_torchvision() must leave everything alone (not even import torchvision).
    # The module file is loaded on its own so that whatever vittt/__init__.py imports does not
    # interfere.
    from vittt.compat import torchvision_ops

    code = textwrap.dedent(
        """
        import importlib.util, sys, torch
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        spec = importlib.util.spec_from_file_location("tvops_under_test", sys.argv[1])
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        assert m.ensure_torchvision() is False
        assert m.ensure_torchvision() is False
        assert m.fallback_installed() is False
        assert m._LIB is None
        assert "torchvision" not in sys.modules
        assert not hasattr(torch.ops.torchvision, "qnms")
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, torchvision_ops.__file__], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- nms by hand


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (0.5, [4, 1, 3]),  # 2 suppressed by 4 (.64), 0 suppressed by 3 (.64)
        (0.3, [4, 1, 3]),  # 0 suppressed by 1 (.333) now; 3 survives 1 (.242)
        (0.2, [4, 1]),  # 1 also suppresses 3 (.242)
        (0.7, [4, 1, 3, 0, 2]),  # nothing overlaps that much
        (0.0, [4, 1]),  # any overlap suppresses; 2 overlaps 4, 0 and 3 overlap 1
        (1.0, [4, 1, 3, 0, 2]),  # IoU can never exceed 1
    ],
)
def test_nms_hand_built(threshold, expected):
    keep = nms(FIVE_BOXES, FIVE_SCORES, threshold)
    assert keep.dtype == torch.int64
    assert keep.tolist() == expected


def test_nms_greedy_not_transitive():
    # A-B and B-C overlap (IoU 60/140 = .43), A-C barely (20/180 = .11). B is suppressed
    # by A, so it must not suppress C.
    boxes = torch.tensor([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert nms(boxes, scores, 0.05).tolist() == [0]
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2]


def test_nms_threshold_boundary_is_strict():
    # IoU exactly 0.5 (inter 2, union 4): suppressed only when IoU > threshold.
    boxes = torch.tensor([[0, 0, 3, 1], [1, 0, 4, 1]], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [1, 0]
    assert nms(boxes, scores, 0.4999).tolist() == [1]
    # IoU exactly 1/3 in float64 compared with the same Python float: kept.
    boxes64 = torch.tensor([[0, 0, 2, 1], [1, 0, 3, 1]], dtype=torch.float64)
    assert nms(boxes64, scores, 1 / 3).tolist() == [1, 0]
    assert nms(boxes64, scores, 0.33).tolist() == [1]


def test_nms_edge_cases():
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    one = nms(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.1]), 0.5)
    assert one.tolist() == [0]
    # Zero-area boxes have IoU 0/0 = NaN, which never suppresses.
    degenerate = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5, 5]], dtype=torch.float32)
    assert nms(degenerate, torch.tensor([0.5, 0.6, 0.4]), 0.5).tolist() == [1, 0, 2]
    # Identical boxes: only the best survives, whatever the input order.
    same = torch.tensor([[2.0, 2.0, 6.0, 6.0]] * 4)
    assert nms(same, torch.tensor([0.2, 0.7, 0.5, 0.1]), 0.99).tolist() == [1]
    with pytest.raises(RuntimeError):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(RuntimeError):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


def test_nms_dtypes_and_grad():
    expected = [4, 1, 3]
    for dtype in (torch.float32, torch.float64):
        assert nms(FIVE_BOXES.to(dtype), FIVE_SCORES.to(dtype), 0.5).tolist() == expected, dtype
    boxes = FIVE_BOXES.clone().requires_grad_(True)
    assert nms(boxes, FIVE_SCORES, 0.5).tolist() == expected
    # Half precision: torchvision's CPU kernel only takes float/double, the fallback computes
    # IoU in float32 for low-precision boxes.
    for dtype in (torch.float16, torch.bfloat16):
        assert nms_reference(FIVE_BOXES.to(dtype), FIVE_SCORES.to(dtype), 0.5).tolist() == expected, dtype


def test_nms_reference_ties_are_stable():
    # Equal scores keep input order (stable sort), like torchvision's CPU kernel.
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3 + [[10.0, 10.0, 12.0, 12.0]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert nms_reference(boxes, scores, 0.5).tolist() == [0, 3]


# --------------------------------------------------------------------------- nms vs brute force


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 0.5, 0.7])
def test_nms_matches_brute_force_random(seed, threshold):
    gen = torch.Generator().manual_seed(seed)
    n = 60 + 20 * seed
    scores = torch.rand(n, generator=gen)
    for integer in (False, True):  # integer boxes hit exact IoU ties and thresholds often
        boxes = random_boxes(gen, n, integer=integer)
        expected = brute_force_nms(boxes, scores, threshold)
        assert nms(boxes, scores, threshold).tolist() == expected
        assert nms_reference(boxes, scores, threshold).tolist() == expected


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_nms_float32_random(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 200
    boxes = random_boxes(gen, n, dtype=torch.float32)
    scores = torch.rand(n, generator=gen)
    keep = nms(boxes, scores, 0.45)
    assert keep.tolist() == brute_force_nms(boxes, scores, 0.45)
    assert 0 < keep.numel() < n  # the random layout does overlap
    kept_scores = scores[keep]
    assert torch.all(kept_scores[:-1] >= kept_scores[1:])


@pytest.mark.filterwarnings("ignore:.*quantize.*deprecated:UserWarning")
def test_quantized_nms():
    boxes = FIVE_BOXES
    q_boxes = torch.quantize_per_tensor(boxes, scale=0.5, zero_point=3, dtype=torch.quint8)
    q_scores = torch.quantize_per_tensor(FIVE_SCORES, scale=0.01, zero_point=0, dtype=torch.quint8)
    assert nms(q_boxes, q_scores, 0.5).tolist() == [4, 1, 3]


# --------------------------------------------------------------------------- batched_nms


def test_batched_nms_hand_built():
    # Same geometry as FIVE_BOXES, but box 2 is in another class than box 4 and box 0 in
    # another class than boxes 1 and 3: nothing is suppressed across classes.
    idxs = torch.tensor([1, 0, 1, 0, 0])
    assert batched_nms(FIVE_BOXES, FIVE_SCORES, idxs, 0.5).tolist() == [4, 1, 3, 0, 2]
    # All in one class: same as plain nms.
    assert batched_nms(FIVE_BOXES, FIVE_SCORES, torch.zeros(5, dtype=torch.long), 0.5).tolist() == [4, 1, 3]
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


@pytest.mark.parametrize("n", [150, 1200])  # > 1000 boxes takes torchvision's per-class loop
def test_batched_nms_matches_per_class_brute_force(n):
    gen = torch.Generator().manual_seed(n)
    boxes = random_boxes(gen, n, integer=True, dtype=torch.float32)
    scores = torch.rand(n, generator=gen)
    idxs = torch.randint(0, 5, (n,), generator=gen)
    expected = []
    for c in range(5):
        members = torch.nonzero(idxs == c).flatten()
        expected += members[brute_force_nms(boxes[members], scores[members], 0.5)].tolist()
    expected.sort(key=lambda i: -scores[i].item())
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == expected


# --------------------------------------------------------------------------- transforms


def test_transforms_v2_on_tensor():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    img = torch.arange(3 * 8 * 12, dtype=torch.uint8).reshape(3, 8, 12)
    flipped = v2.RandomHorizontalFlip(p=1.0)(img)
    assert torch.equal(flipped, img.flip(-1))

    pipeline = v2.Compose([v2.Resize((4, 6), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    out = pipeline(img)
    assert out.shape == (3, 4, 6) and out.dtype == torch.float32
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0

    boxes = tv_tensors.BoundingBoxes([[1, 2, 4, 6]], format="XYXY", canvas_size=(8, 12))
    _, flipped_boxes = v2.RandomHorizontalFlip(p=1.0)(img, boxes)
    assert flipped_boxes.tolist() == [[8, 2, 11, 6]]


def test_timm_create_transform():
    from PIL import Image
    from timm.data import create_transform

    eval_tf = create_transform(input_size=32, is_training=False)
    x = eval_tf(Image.new("RGB", (48, 40), color=(255, 0, 0)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # Red channel normalised with ImageNet stats: (1 - .485) / .229 > 2; blue (0 - .406) / .225 < 0.
    assert x[0].min().item() > 2.0 and x[2].max().item() < 0.0

    train_tf = create_transform(input_size=32, is_training=True)
    assert train_tf(Image.new("RGB", (64, 64))).shape == (3, 32, 32)


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('block', [7, 1024])
def test_blocked_nms_equals_the_reference(seed, block):
    from vittt.compat import nms_blocked
    g = torch.Generator().manual_seed(seed)
    n = 300
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 30], dim=1)
    boxes[::17, 2:] = boxes[::17, :2]  # empty boxes: NaN IoU never suppresses
    scores = torch.randint(0, 40, (n,), generator=g).float()  # many ties: stable order
    for threshold in (0.0, 0.3, 0.7):
        expected = nms_reference(boxes, scores, threshold)
        assert torch.equal(nms_blocked(boxes, scores, threshold, block=block), expected), threshold
    assert torch.equal(torchvision.ops.nms(boxes, scores, 0.5), nms_reference(boxes, scores, 0.5))
