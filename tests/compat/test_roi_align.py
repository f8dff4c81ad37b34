"""Tests for vittt.compat.roi_align (pure-torch RoIAlign installed into torchvision without its C++ extension)."""

import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vittt  # noqa: F401  (must come before torchvision/timm)
import torchvision  # noqa: E402
import torchvision.extension  # noqa: E402
from torchvision.models.detection.roi_heads import project_masks_on_boxes  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign, RoIAlign  # noqa: E402

import vittt.compat.roi_align as ra  # noqa: E402
from vittt.compat import install_roi_align, original_roi_align, roi_align_installed, uninstall_roi_align  # noqa: E402
from vittt.compat.roi_align import roi_align  # noqa: E402

TV_MODULE = sys.modules["torchvision.ops.roi_align"]
NO_OPS = not torchvision.extension._has_ops()
needs_no_ops = pytest.mark.skipif(not NO_OPS, reason="torchvision's compiled ops load here; nothing is installed")


# --------------------------------------------------------------------------- helpers


def rois_inside(gen, n_images, k, height, width, spatial_scale, dtype=torch.float64):
    """``[k, 5]`` RoIs whose samples all lie inside ``[-1, H] x [-1, W]`` (where torchvision's Python fallback and
    the C++ kernel agree), in image coordinates (map coordinates / spatial_scale). Includes sub-pixel boxes."""
    x1 = torch.rand(k, generator=gen, dtype=torch.float64) * (width - 1)
    y1 = torch.rand(k, generator=gen, dtype=torch.float64) * (height - 1)
    w = torch.rand(k, generator=gen, dtype=torch.float64) * (width - x1)
    h = torch.rand(k, generator=gen, dtype=torch.float64) * (height - y1)
    w[0], h[0] = 0.3, 0.6  # smaller than a pixel (clamped to 1 when aligned=False)
    x1[1], y1[1], w[1], h[1] = 0.0, 0.0, width - 1.0, height - 1.0  # the whole map
    batch = torch.randint(0, n_images, (k,), generator=gen).double()
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1) / spatial_scale
    return torch.cat([batch[:, None], boxes], dim=1).to(dtype)


def cpp_roi_align_loops(x, rois, spatial_scale, ph, pw, sampling_ratio, aligned):
    """Literal per-sample transcription of torchvision's C++ RoIAlign forward, in Python floats (tiny cases only)."""
    _, channels, height, width = x.shape
    out = torch.zeros(rois.size(0), channels, ph, pw, dtype=torch.float64)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        off = 0.5 if aligned else 0.0
        sw, sh = x1 * spatial_scale - off, y1 * spatial_scale - off
        rw, rh = x2 * spatial_scale - off - sw, y2 * spatial_scale - off - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)
        img = x[int(b)].double()
        for p in range(ph):
            for q in range(pw):
                acc = torch.zeros(channels, dtype=torch.float64)
                for iy in range(gh):
                    y = sh + p * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = sw + q * bw + (ix + 0.5) * bw / gw
                        if y < -1.0 or y > height or xx < -1.0 or xx > width:
                            continue
                        yy, xc = max(y, 0.0), max(xx, 0.0)
                        y_low, x_low = int(yy), int(xc)
                        if y_low >= height - 1:
                            y_high = y_low = height - 1
                            yy = float(y_low)
                        else:
                            y_high = y_low + 1
                        if x_low >= width - 1:
                            x_high = x_low = width - 1
                            xc = float(x_low)
                        else:
                            x_high = x_low + 1
                        ly, lx = yy - y_low, xc - x_low
                        hy, hx = 1.0 - ly, 1.0 - lx
                        acc += (
                            hy * hx * img[:, y_low, x_low]
                            + hy * lx * img[:, y_low, x_high]
                            + ly * hx * img[:, y_high, x_low]
                            + ly * lx * img[:, y_high, x_high]
                        )
                out[k, :, p, q] = acc / count
    return out


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into our RoIAlign (through a helper it looks up at call time; ``roi_align`` itself stays put)."""
    calls = []
    real = ra._axis_taps

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ra, "_axis_taps", counting)
    return lambda: len(calls) // 2  # two axes per call


# --------------------------------------------------------------------------- against torchvision's Python fallback


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_matches_torchvision_fallback_forward_and_backward(aligned, sampling_ratio, spatial_scale):
    gen = torch.Generator().manual_seed(int(aligned) * 4 + sampling_ratio + int(spatial_scale * 10))
    n, c, h, w, ph, pw = 3, 2, 13, 19, 5, 4
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    rois = rois_inside(gen, n, 10, h, w, spatial_scale)
    upstream = torch.randn(10, c, ph, pw, generator=gen, dtype=torch.float64)
    reference = original_roi_align()

    outs, grads = [], []
    for fn in (roi_align, reference):
        xg = x.clone().requires_grad_()
        out = fn(xg, rois, spatial_scale, ph, pw, sampling_ratio, aligned)
        (grad,) = torch.autograd.grad(out, xg, upstream)
        outs.append(out)
        grads.append(grad)
    assert outs[0].shape == (10, c, ph, pw) and outs[0].dtype == torch.float64
    assert outs[0].abs().sum() > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


def test_reference_is_torchvisions_eager_python():
    reference = original_roi_align()
    assert reference is not roi_align
    assert reference.__module__ == "torchvision.ops.roi_align" and reference.__name__ == "_roi_align"
    assert not hasattr(reference, "__wrapped__")  # the lazy torch.compile hook is peeled off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 11, 12, generator=gen)
    rois = rois_inside(gen, 2, 6, 11, 12, 1.0)
    want = roi_align(x.double(), rois, 1.0, 3, 3, 0, True)
    got = roi_align(x.to(dtype), rois.to(dtype), 1.0, 3, 3, 0, True)
    assert got.dtype == dtype
    # boxes rounded to bf16/fp16 move the samples a little; the output is bounded by ~|x| anyway
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


# --------------------------------------------------------------------------- C++ boundary rules


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_rois_outside_the_map_follow_cpp_kernel(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, -4.0, -3.0, 3.0, 9.0],  # sticks out left, top and bottom by more than a pixel
            [1, 2.0, 1.0, 11.0, 8.0],  # far past the right and bottom edges
            [0, -9.0, -9.0, -2.5, -1.5],  # entirely outside: only the samples within [-1, 0] count
            [1, 5.2, 4.4, 6.9, 5.8],  # straddles the last row/column
            [0, 0.5, 0.5, 0.5, 0.5],  # empty box (no samples with aligned=True, 1 x 1 with aligned=False)
            [1, 3.0, 2.0, 1.0, 1.0],  # inverted box
        ],
        dtype=torch.float64,
    )
    for scale in (1.0, 0.5):
        want = cpp_roi_align_loops(x, rois, scale, 2, 3, sampling_ratio, aligned)
        got = roi_align(x, rois, scale, 2, 3, sampling_ratio, aligned)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and this is where torchvision's Python fallback disagrees (it does not zero samples beyond -1 / H)
    fallback = original_roi_align()(x, rois, 1.0, 2, 3, sampling_ratio, aligned)
    assert not torch.allclose(fallback, cpp_roi_align_loops(x, rois, 1.0, 2, 3, sampling_ratio, aligned))


def test_single_pixel_and_single_row_maps():
    x = torch.arange(2 * 1 * 4, dtype=torch.float64).view(2, 1, 1, 4)
    rois = torch.tensor([[0, -0.5, -0.5, 3.5, 0.9], [1, 1.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    for aligned in (False, True):
        for sr in (0, 3):
            want = cpp_roi_align_loops(x, rois, 1.0, 2, 2, sr, aligned)
            torch.testing.assert_close(roi_align(x, rois, 1.0, 2, 2, sr, aligned), want, rtol=0, atol=1e-12)
    x = torch.full((1, 3, 1, 1), 2.5)
    out = roi_align(x, torch.tensor([[0, 0.0, 0.0, 1.0, 1.0]]), 1.0, 2, 2, 0, False)
    torch.testing.assert_close(out, torch.full((1, 3, 2, 2), 2.5))


def test_empty_rois():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), 0.5, 7, 6, 0, True)
    assert out.shape == (0, 3, 7, 6) and out.dtype == x.dtype
    out.sum().backward()  # still connected to the input
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torchvision.ops.roi_align(x, [torch.zeros(0, 4)], 7).shape == (0, 3, 7, 7)


def test_rois_get_no_gradient():
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0]], requires_grad=True)
    roi_align(x, rois, 1.0, 2, 2, 0, True).sum().backward()
    assert rois.grad is None and x.grad is not None


# --------------------------------------------------------------------------- memory


def test_adaptive_sampling_memory_is_bounded_by_the_largest_grid():
    # mask targets: 8 RoIs on a 192 x 192 mask, 28 x 28 output, adaptive sampling
    gen = torch.Generator().manual_seed(0)
    k, size, p = 8, 192, 28
    masks = (torch.rand(1, 1, size, size, generator=gen) > 0.5).float()
    xy = torch.rand(k, 2, generator=gen) * 20
    wh = torch.rand(k, 2, generator=gen) * 100 + 60
    wh[0] = 171.0  # largest RoI: ceil(171 / 28) = 7 samples per bin and axis
    rois = torch.cat([torch.zeros(k, 1), xy, xy + wh], dim=1)
    g = 7
    with MaxNumel() as mode:
        out = roi_align(masks, rois, 1.0, p, p, 0, False)
    assert out.shape == (k, 1, p, p)
    assert 0 < out.min() and out.max() < 1  # averages of many binary samples
    bound = 4 * k * p * p * g * g  # two taps per sample and axis
    assert mode.max_numel <= bound
    assert mode.max_numel * 100 < k * p * p * size * size  # torchvision's fallback: [K, C, P, P, H, W] per tap


def test_chunking_bounds_memory_and_keeps_results(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 30, 30, generator=gen, dtype=torch.float64)
    rois = rois_inside(gen, 2, 12, 30, 30, 1.0)
    whole = roi_align(x, rois, 1.0, 7, 7, 2, False)
    per_roi = 4 * 7 * 7 * 4 * 2 * 2
    monkeypatch.setattr(ra, "_MAX_CHUNK_ELEMENTS", 3 * per_roi)
    with MaxNumel() as mode:
        chunked = roi_align(x, rois, 1.0, 7, 7, 2, False)
    assert mode.max_numel <= max(3 * per_roi, x.numel())  # the channels-last copy of the input is the other big one
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- installation into torchvision


@needs_no_ops
def test_installed_by_import_vittt():
    assert roi_align_installed()
    assert TV_MODULE._roi_align is roi_align
    assert TV_MODULE.is_compile_supported("cuda") is True  # torchvision's device gate no longer sends us to C++


@needs_no_ops
def test_torchvision_entry_points_reach_ours(spy):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0]]), torch.tensor([[0.0, 0.0, 15.0, 15.0], [3.0, 3.0, 6.0, 7.0]])]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])

    out = torchvision.ops.roi_align(x, boxes, (4, 3), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    assert spy() == 1
    torch.testing.assert_close(out, roi_align(x, rois, 1.0, 4, 3, -1, True))
    assert spy() == 2

    torch.testing.assert_close(RoIAlign((4, 3), 1.0, -1, True)(x, rois), out)
    assert spy() == 3

    pooler = MultiScaleRoIAlign(["p2", "p3"], output_size=5, sampling_ratio=2)
    feats = {"p2": torch.randn(2, 3, 16, 16, generator=gen), "p3": torch.randn(2, 3, 8, 8, generator=gen)}
    big = [torch.tensor([[0.0, 0.0, 60.0, 60.0], [1.0, 1.0, 5.0, 5.0]]), torch.tensor([[2.0, 4.0, 40.0, 30.0]])]
    pooled = pooler(feats, big, [(64, 64), (64, 64)])
    assert pooled.shape == (3, 3, 5, 5) and spy() >= 4

    before = spy()
    masks = (torch.rand(2, 20, 20, generator=gen) > 0.5).float()
    targets = project_masks_on_boxes(masks, torch.tensor([[1.0, 1.0, 15.0, 12.0]]), torch.tensor([1]), 6)
    assert targets.shape == (1, 6, 6) and spy() == before + 1

    # a device torch.compile does not support (meta: torchvision would raise "Couldn't load custom C++ ops")
    meta = torchvision.ops.roi_align(x.to("meta"), rois.to("meta"), 2, sampling_ratio=2)
    assert meta.shape == (3, 3, 2, 2) and meta.device.type == "meta"


def test_installer_leaves_torchvision_alone_when_ops_load(monkeypatch):
    was_installed = roi_align_installed()
    lazy_hook = TV_MODULE._roi_align if not was_installed else ra._REPLACED["_roi_align"]
    gate = TV_MODULE.is_compile_supported if not was_installed else ra._REPLACED["is_compile_supported"]
    try:
        assert uninstall_roi_align() == was_installed
        assert TV_MODULE._roi_align is lazy_hook and TV_MODULE.is_compile_supported is gate
        monkeypatch.setattr(torchvision.extension, "_has_ops", lambda: True)
        assert install_roi_align() is False
        assert TV_MODULE._roi_align is lazy_hook and TV_MODULE.is_compile_supported is gate
        assert not roi_align_installed()
    finally:
        monkeypatch.undo()
        if was_installed:
            assert install_roi_align() is True
    assert roi_align_installed() == was_installed


@needs_no_ops
def test_install_is_idempotent():
    assert install_roi_align() is True and install_roi_align() is True
    assert ra._REPLACED["_roi_align"] is not roi_align
    assert original_roi_align() is not roi_align


# --------------------------------------------------------------------------- end to end


@needs_no_ops
def test_project_masks_on_boxes_matches_fallback(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    masks = (torch.rand(2, 96, 96, generator=gen) > 0.5).float()
    xy = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 40
    wh = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 50 + 5
    boxes = torch.cat([xy, xy + wh], dim=1)  # float64: the masks are cast to the boxes' dtype
    matched = torch.tensor([0, 1, 1])
    ours = project_masks_on_boxes(masks, boxes, matched, 10)
    monkeypatch.setattr(TV_MODULE, "_roi_align", original_roi_align())
    theirs = project_masks_on_boxes(masks, boxes, matched, 10)
    assert ours.shape == (3, 10, 10) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
