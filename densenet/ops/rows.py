"""Feature maps as (N*H*W, C) row matrices: the layout the engine computes in.

A channels-last (N, C, H, W) tensor (or (N, C, D, H, W) volume, or (N, C, L) signal) is,
without a copy, a row-major matrix with one row per pixel (voxel, sample) and one column per
channel; a channel slice of a block's buffer is the same matrix with a
longer row stride. Element-wise passes, BN statistics and 1x1 convolutions all work on such
matrices. This module converts between the two views and runs the 1x1 convolutions as products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nchw(t2d: torch.Tensor, n: int, *spatial: int) -> torch.Tensor:
    """An (N*S, C) matrix seen as an (N, C, *spatial) channels-last map (no copy); S is the
    product of the spatial sizes (H, W for images, D, H, W for volumes, L for signals)."""
    d = len(spatial)
    return t2d.view(n, *spatial, t2d.shape[1]).permute(0, d + 1, *range(1, d + 1))


def rows(t: torch.Tensor) -> torch.Tensor:
    """An (N, C, *spatial) map as an (N*S, C) row-major matrix (a copy unless channels-last)."""
    r = t.permute(0, *range(2, t.dim()), 1).reshape(-1, t.shape[1])
    return r if r.stride(1) == 1 or r.shape[1] == 1 else r.contiguous()


def as_map(t2d: torch.Tensor) -> torch.Tensor:
    """An (M, C) row-major matrix as a (1, C, M, 1) channels-last image (no copy)."""
    return t2d.view(1, t2d.shape[0], 1, t2d.shape[1]).permute(0, 3, 1, 2)


def spatial_numel(shape) -> int:
    """The number of positions of a map of ``shape`` (N, C, *spatial): rows per image."""
    out = 1
    for s in shape[2:]:
        out *= s
    return out


def is_channels_last(x: torch.Tensor) -> bool:
    """Channels-last strides (``channels_last``, ``channels_last_3d``, or (N, L, C) memory for
    a 1-D map), not also contiguous."""
    return x.permute(0, *range(2, x.dim()), 1).is_contiguous() and not x.is_contiguous()


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` contiguous, or channels-last (for any number of spatial dimensions); no copy when
    it already is."""
    if not channels_last:
        return t.contiguous()
    d = t.dim() - 2
    if t.shape[1] == 1 and t.is_contiguous():
        # one channel: the same memory either way, but only channels-last strides make a
        # convolution write channels-last maps
        strides, step = [0] * t.dim(), 1
        for i in range(t.dim() - 1, 1, -1):
            strides[i], step = step, step * t.shape[i]
        strides[0], strides[1] = step, 1
        return t.as_strided(t.shape, strides)  # the storage offset stays t's
    return t.permute(0, *range(2, d + 2), 1).contiguous().permute(0, d + 1, *range(1, d + 1))


def like_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s layout: channels-last when ``x`` is, else contiguous."""
    return to_layout(t, is_channels_last(x))


def empty_like_layout(x: torch.Tensor, shape, dtype=None, channels_last: bool | None = None) -> torch.Tensor:
    """An empty map of ``shape`` in ``x``'s layout (or channels-last as ``channels_last`` says)."""
    cl = is_channels_last(x) if channels_last is None else channels_last
    if not cl:
        return x.new_empty(shape, dtype=dtype)
    d = len(shape) - 2
    t = x.new_empty((shape[0], *shape[2:], shape[1]), dtype=dtype)
    return t.permute(0, d + 1, *range(1, d + 1))


def _as_2d_kernel(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 (or 1, or 1x1x1) convolution weight as a (C_out, C_in, 1, 1) one."""
    return w if w.dim() == 4 else w.view(w.shape[0], w.shape[1], 1, 1)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """BN statistics, their sums and the affine parameters stay in float32 under bf16/fp16."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def chunk_rows(t: torch.Tensor, m: int) -> int:
    """Rows per chunk of the 1x1-convolution part: on the CPU, 4096-row slices keep the BN-ReLU
    scratch in cache and run the matrix products 1.3-1.8x faster than one (N*H*W)-row product."""
    return min(m, 4096) if t.device.type == "cpu" else m


def _onednn(t: torch.Tensor) -> bool:
    """Run the forward and weight-gradient 1x1 products as oneDNN 1x1 convolutions (float32 on
    the CPU), as torchvision's convolutions run. Through ``mm`` (MKL) the same products ran at
    the same speed in some processes and for seconds at a time 40% slower in others (bc100: a
    1.75 s step against 1.2 s, reproducibly, while oneDNN held 1.15-1.3 s); in isolation oneDNN
    ran these shapes 10-25% faster. The input gradient stays ``mm``, which writes into scratch."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def product(z: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = z @ w^T: the 1x1 convolution with weight ``w`` (C_out, C_in, 1[, 1[, 1]]) of the rows z."""
    w4d = _as_2d_kernel(w)
    if _onednn(z):
        return out.copy_(F.conv2d(as_map(z), w4d).permute(0, 2, 3, 1).reshape(out.shape))
    return torch.mm(z, w4d.view(w4d.shape[0], -1).t(), out=out)


def weight_grad(dy: torch.Tensor, z: torch.Tensor, w: torch.Tensor, dw: torch.Tensor | None):
    """dw (C_out, C_in) += dy^T @ z (returns the sum; a new tensor when ``dw`` is None)."""
    w4d = _as_2d_kernel(w)
    if _onednn(z):
        g = torch.ops.aten.convolution_backward(
            as_map(dy), as_map(z), w4d, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [False, True, False])[1].view(w4d.shape[0], -1)
        return g if dw is None else dw.add_(g)
    if dw is None:
        return torch.mm(dy.t(), z)
    return dw.addmm_(dy.t(), z)


def like_param(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with exactly ``param``'s strides, as autograd's gradient layout contract and
    DDP's gradient buckets expect (a 1x1 weight's gradient can come back from oneDNN with
    other strides on its size-1 dimensions; DDP then warns and copies it every step)."""
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)
