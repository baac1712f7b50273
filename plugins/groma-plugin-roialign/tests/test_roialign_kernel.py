"""The pure-PyTorch RoIAlign against a literal per-sample port of the kernel, gradients, and torchvision."""

from __future__ import annotations

import math

import groma_plugin_roialign.ops as roi_align_module
import pytest
import torch
from groma_plugin_roialign import roi_align


def _bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """One bilinear sample of (C, H, W) with the kernel's border rules, written loop-style."""
    height, width = fmap.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[:, y_low, x_low]
        + hy * lx * fmap[:, y_low, x_high]
        + ly * hx * fmap[:, y_high, x_low]
        + ly * lx * fmap[:, y_high, x_high]
    )


def slow_roi_align(features, rois, out_h, out_w, scale_h, scale_w, sampling_ratio, aligned):
    """Straightforward loops over regions, bins and samples, as the C++/CUDA kernel does."""
    out = torch.zeros(rois.shape[0], features.shape[1], out_h, out_w, dtype=features.dtype)
    offset = 0.5 if aligned else 0.0
    for k, roi in enumerate(rois.tolist()):
        fmap = features[int(roi[0])]
        start_x, start_y = roi[1] * scale_w - offset, roi[2] * scale_h - offset
        roi_w, roi_h = roi[3] * scale_w - offset - start_x, roi[4] * scale_h - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                total = torch.zeros(features.shape[1], dtype=features.dtype)
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += _bilinear(fmap, y, x)
                out[k, :, ph, pw] = total / count
    return out


def _rois() -> torch.Tensor:
    """Regions on a 2-image batch of 9x11 maps (scale 1): inside, across borders, outside, inverted, empty."""
    fixed = [
        [0, 1.0, 1.5, 6.0, 7.0],  # inside
        [1, -3.0, -2.0, 4.0, 3.5],  # across the top-left border
        [0, 7.0, 5.0, 14.0, 12.0],  # across the bottom-right border
        [1, 20.0, 20.0, 30.0, 25.0],  # fully outside
        [0, -9.0, -9.0, -4.0, -5.0],  # fully outside, negative side
        [0, 6.0, 7.0, 2.0, 1.0],  # inverted: negative width and height (quirk 1 produces these)
        [1, 5.0, 2.0, 1.0, 8.0],  # negative width only
        [0, 4.0, 4.0, 4.0, 4.0],  # empty
        [1, -1.0, -1.0, 12.0, 10.0],  # the whole map and more
        [0, 10.4, 8.4, 10.9, 8.9],  # a sliver on the last row/column
    ]
    generator = torch.Generator().manual_seed(3)
    corners = torch.rand(14, 4, generator=generator, dtype=torch.float64) * 24 - 6
    index = torch.randint(0, 2, (14, 1), generator=generator).double()
    return torch.cat([torch.tensor(fixed, dtype=torch.float64), torch.cat([index, corners], 1)])


def _features(dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 9, 11, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 1, 0])
@pytest.mark.parametrize("scale", [1.0, 0.5, (0.75, 1.25)])
def test_matches_the_kernel_loops(aligned, sampling_ratio, scale):
    features, rois = _features(), _rois()
    scale_h, scale_w = scale if isinstance(scale, tuple) else (scale, scale)
    expected = slow_roi_align(features, rois, 3, 4, scale_h, scale_w, sampling_ratio, aligned)
    got = roi_align(features, rois, (3, 4), spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_float32_matches_the_kernel_loops():
    features, rois = _features(), _rois()
    expected = slow_roi_align(features, rois, 5, 5, 0.5, 0.5, 2, True)
    got = roi_align(features.float(), rois.float(), 5, spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_border_rule_on_single_samples():
    # one sample per box, at the box centre; a ramp map makes the sampled row visible
    ramp = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 3).contiguous()

    def centre_row(y1: float, y2: float) -> float:
        rois = torch.tensor([[0.0, 0.0, y1, 2.0, y2]])
        return float(roi_align(ramp, rois, 1, sampling_ratio=1, aligned=False)[0, 0, 0, 0])

    assert centre_row(-2.0, 0.0) == 0.0  # centre y = -1: still sampled, clamped to row 0 (value 0)
    assert centre_row(-2.4, 0.0) == 0.0  # centre y = -1.2: outside, contributes zero
    assert centre_row(3.0, 4.0) == pytest.approx(3.5)  # interior: linear between rows 3 and 4
    assert centre_row(4.0, 5.0) == 4.0  # centre y = 4.5: beyond the last row centre reads the last row
    assert centre_row(4.0, 6.0) == 4.0  # centre y = 5 = height: still sampled (last row)
    assert centre_row(4.2, 6.0) == 0.0  # centre y = 5.1 > height: zero


def test_empty_and_inverted_boxes_with_adaptive_sampling_give_zero():
    rois = torch.tensor([[0, 4.0, 4.0, 4.0, 4.0], [0, 6.0, 6.0, 2.0, 2.0]], dtype=torch.float64)
    out = roi_align(_features(), rois, 2, sampling_ratio=0, aligned=True)
    assert torch.count_nonzero(out) == 0


def test_chunking_and_batch_order_do_not_change_results(monkeypatch):
    features, rois = _features(torch.float32), _rois().float()
    whole = roi_align(features, rois, (3, 4), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    monkeypatch.setattr(roi_align_module, "CHUNK_ELEMENTS", 1)
    chunked = roi_align(features, rois, (3, 4), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_no_regions():
    out = roi_align(_features(torch.float32), torch.zeros(0, 5), 7, spatial_scale=0.25, sampling_ratio=2)
    assert out.shape == (0, 3, 7, 7)


def test_gradcheck():
    features = _features()[:, :2, :5, :6].clone().requires_grad_(True)
    rois = torch.tensor(
        [[0, 0.3, 0.8, 4.6, 3.9], [1, 5.5, 4.0, -1.0, 1.0], [1, -2.0, 1.0, 3.0, 6.5]], dtype=torch.float64
    )
    for sampling_ratio in (2, 0):
        assert torch.autograd.gradcheck(
            lambda f, r=sampling_ratio: roi_align(f, rois, (2, 3), 0.9, r, True), (features,), eps=1e-6, atol=1e-8
        )


@pytest.mark.parametrize(
    "features, rois, message",
    [
        (torch.zeros(3, 4, 4), torch.zeros(1, 5), "features must have shape"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(2, 4), "rois must have shape"),
        (torch.zeros(1, 3, 4, 4), torch.tensor([[1.0, 0, 0, 1, 1]]), "batch indices in \\[0, 0\\]"),
    ],
)
def test_bad_arguments_are_named(features, rois, message):
    with pytest.raises(ValueError, match=message):
        roi_align(features, rois, 2)


def _torchvision_roi_align():
    try:
        from torchvision.ops import roi_align as torchvision_roi_align
    except Exception as exc:  # noqa: BLE001 - a broken install raises RuntimeError
        pytest.skip(f"torchvision is not usable here ({type(exc).__name__})")
    return torchvision_roi_align


def test_torchvision_backend_matches_pure_path():
    torchvision_roi_align = _torchvision_roi_align()
    features, rois = _features(torch.float32), _rois().float()
    pure = roi_align(features, rois, 14, spatial_scale=0.5, sampling_ratio=2, aligned=True)
    via_backend = roi_align(
        features, rois, 14, spatial_scale=0.5, sampling_ratio=2, aligned=True, backend="torchvision"
    )
    direct = torchvision_roi_align(features, rois, 14, 0.5, 2, True)
    torch.testing.assert_close(pure, direct, rtol=0, atol=1e-5)
    assert torch.equal(via_backend, direct)


def test_bfloat16_features_keep_exact_sample_positions():
    features, rois = _features(), _rois()
    expected = slow_roi_align(features.bfloat16().double(), rois, 3, 3, 0.5, 0.5, 2, True)
    got = roi_align(features.bfloat16(), rois.float(), 3, spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=0.02, atol=0.02)
