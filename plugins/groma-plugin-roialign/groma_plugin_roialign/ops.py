"""RoIAlign in pure PyTorch with the semantics of torchvision's kernel (and mmcv's CUDA kernel).

Each region of interest is cut into ``output_size`` bins; each bin averages ``grid_h x grid_w`` bilinear samples.
Bilinear sampling is separable, so the whole operation is two matrix products per region: an interpolation matrix
along y (bins x rows) and one along x (bins x columns), each already averaged over the samples of a bin. The
kernel's rules are kept exactly:

* ``aligned=True`` shifts the box by half a cell (``x * scale - 0.5``) and allows negative widths and heights;
  ``aligned=False`` forces sizes to at least one cell;
* a sample with ``y < -1``, ``y > height``, ``x < -1`` or ``x > width`` contributes zero; otherwise the coordinate
  is clamped to ``>= 0`` and a sample at or beyond the last row/column reads that row/column only;
* ``sampling_ratio <= 0`` uses ``ceil(size / bins)`` samples per bin (none for an empty or inverted box).

Gradients flow to the features only (the boxes are treated as constants, as in the kernel).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

#: roughly how many elements the intermediate (regions x bins x channels x width) may hold at once
CHUNK_ELEMENTS = 1 << 25

Backend = Literal["torch", "torchvision"]


def _pair(value: int | float | tuple, name: str) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"roi_align: {name} must be a number or a pair (h, w), got {value!r}")
        return tuple(value)
    return (value, value)


def _axis_weights(start: Tensor, end: Tensor, bins: int, sampling_ratio: int, size: int, aligned: bool) -> Tensor:
    """Interpolation matrix (K, bins, size) along one axis: row p averages the samples of bin p."""
    length = end - start
    if not aligned:
        length = length.clamp(min=1.0)
    bin_size = length / bins
    if sampling_ratio > 0:
        grid = torch.full_like(start, sampling_ratio, dtype=torch.long)
        grid_max = sampling_ratio
    else:
        grid = torch.ceil(length / bins).long()
        grid_max = max(int(grid.max()), 1) if grid.numel() else 1
    p = torch.arange(bins, device=start.device, dtype=start.dtype)
    i = torch.arange(grid_max, device=start.device)
    # same expression order as the kernel: start + p * bin + (i + 0.5) * bin / grid
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + (
        (i.to(start.dtype) + 0.5)[None, None, :] * bin_size[:, None, None]
    ) / grid[:, None, None].to(start.dtype)
    keep = (coord >= -1.0) & (coord <= size) & (i[None, None, :] < grid[:, None, None])
    coord = torch.where(keep, coord, torch.zeros_like(coord)).clamp(min=0.0)
    low = coord.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(coord.dtype))
    scale = keep.to(coord.dtype) / grid.clamp(min=1)[:, None, None].to(coord.dtype)
    weights = coord.new_zeros(start.shape[0], bins, size)
    weights.scatter_add_(2, low, (1.0 - frac) * scale)
    weights.scatter_add_(2, high, frac * scale)
    return weights


def _check(features: Tensor, rois: Tensor) -> None:
    if features.ndim != 4:
        raise ValueError(f"roi_align: features must have shape (B, C, H, W), got {tuple(features.shape)}")
    if rois.ndim != 2 or rois.shape[-1] != 5:
        raise ValueError(
            f"roi_align: rois must have shape (K, 5) = [batch_index, x1, y1, x2, y2], got {tuple(rois.shape)}"
        )
    if rois.numel():
        index = rois[:, 0]
        if bool((index < 0).any() or (index >= features.shape[0]).any() or (index != index.round()).any()):
            raise ValueError(
                f"roi_align: rois[:, 0] must hold integer batch indices in [0, {features.shape[0] - 1}], "
                f"got values in [{float(index.min())}, {float(index.max())}]"
            )


def _roi_align_torch(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: tuple[float, float],
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    _, channels, height, width = features.shape
    out_h, out_w = output_size
    count = rois.shape[0]
    if count == 0:
        return features.new_zeros(0, channels, out_h, out_w)
    # sample positions and weights in float32 at least, whatever the features' precision
    exact = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
    boxes = rois.detach().to(exact)
    offset = 0.5 if aligned else 0.0
    scale_h, scale_w = spatial_scale
    x1, y1, x2, y2 = (boxes[:, k] for k in range(1, 5))
    wy = _axis_weights(y1 * scale_h - offset, y2 * scale_h - offset, out_h, sampling_ratio, height, aligned)
    wx = _axis_weights(x1 * scale_w - offset, x2 * scale_w - offset, out_w, sampling_ratio, width, aligned)
    wy, wx = wy.to(features.dtype), wx.to(features.dtype)
    image_index = boxes[:, 0].long()
    chunk = max(1, CHUNK_ELEMENTS // max(1, out_h * channels * width))
    pieces: list[Tensor] = []
    order: list[Tensor] = []
    for b in torch.unique(image_index).tolist():
        members = torch.nonzero(image_index == b).flatten()
        rows_first = features[b].transpose(0, 1).reshape(height, channels * width)  # (H, C*W)
        for part in members.split(chunk):
            k = part.numel()
            along_y = (wy[part].reshape(k * out_h, height) @ rows_first).reshape(k, out_h * channels, width)
            pooled = torch.bmm(along_y, wx[part].transpose(1, 2))  # (k, out_h*C, out_w)
            pieces.append(pooled.reshape(k, out_h, channels, out_w).permute(0, 2, 1, 3))
            order.append(part)
    result = torch.cat(pieces)
    return result[torch.argsort(torch.cat(order))].contiguous()


def _roi_align_torchvision(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: tuple[float, float],
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    if spatial_scale[0] != spatial_scale[1]:
        raise ValueError(f"roi_align: backend='torchvision' needs one spatial_scale, got {spatial_scale}")
    try:
        from torchvision.ops import roi_align as torchvision_roi_align
    except Exception as exc:  # noqa: BLE001 - a broken torchvision fails with RuntimeError, not ImportError
        raise RuntimeError(
            f"roi_align: backend='torchvision' needs a working torchvision ({type(exc).__name__}: {exc}); "
            "use backend='torch'"
        ) from exc
    return torchvision_roi_align(
        features, rois.to(features.dtype), output_size, float(spatial_scale[0]), sampling_ratio, aligned
    )


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float | tuple[float, float] = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    backend: Backend = "torch",
) -> Tensor:
    """Average-pooled RoIAlign of ``features`` (B, C, H, W) over ``rois`` (K, 5) = [batch_index, x1, y1, x2, y2]
    -> (K, C, out_h, out_w).

    Arguments mirror ``torchvision.ops.roi_align``; ``spatial_scale`` may also be a pair (scale_h, scale_w).
    ``backend="torchvision"`` calls torchvision's kernel instead (it must be installed and working).
    """
    _check(features, rois)
    size = tuple(int(v) for v in _pair(output_size, "output_size"))
    scale = tuple(float(v) for v in _pair(spatial_scale, "spatial_scale"))
    if backend == "torch":
        return _roi_align_torch(features, rois, size, scale, sampling_ratio, aligned)
    if backend == "torchvision":
        return _roi_align_torchvision(features, rois, size, scale, sampling_ratio, aligned)
    raise ValueError(f"roi_align: backend must be 'torch' or 'torchvision', got {backend!r}")
