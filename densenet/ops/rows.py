"""Feature maps as (N*H*W, C) row matrices: the layout the engine computes in.

A channels-last (N, C, H, W) tensor is, without a copy, a row-major matrix with one row per
pixel and one column per channel; a channel slice of a block's buffer is the same matrix with a
longer row stride. Element-wise passes, BN statistics and 1x1 convolutions all work on such
matrices. This module converts between the two views and runs the 1x1 convolutions as products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nchw(t2d: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """An (N*H*W, C) matrix seen as an (N, C, H, W) channels-last tensor (no copy)."""
    return t2d.view(n, h, w, t2d.shape[1]).permute(0, 3, 1, 2)


def rows(t4d: torch.Tensor) -> torch.Tensor:
    """An (N, C, H, W) tensor as an (N*H*W, C) row-major matrix (a copy unless channels-last)."""
    r = t4d.permute(0, 2, 3, 1).reshape(-1, t4d.shape[1])
    return r if r.stride(1) == 1 or r.shape[1] == 1 else r.contiguous()


def as_map(t2d: torch.Tensor) -> torch.Tensor:
    """An (M, C) row-major matrix as a (1, C, M, 1) channels-last image (no copy)."""
    return t2d.view(1, t2d.shape[0], 1, t2d.shape[1]).permute(0, 3, 1, 2)


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def empty_like_layout(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    return x.new_empty(shape, dtype=dtype).contiguous(memory_format=layout(x))


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


def product(z: torch.Tensor, w4d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = z @ w^T: the 1x1 convolution with weight ``w4d`` (C_out, C_in, 1, 1) of the rows z."""
    if _onednn(z):
        return out.copy_(F.conv2d(as_map(z), w4d).permute(0, 2, 3, 1).reshape(out.shape))
    return torch.mm(z, w4d.view(w4d.shape[0], -1).t(), out=out)


def weight_grad(dy: torch.Tensor, z: torch.Tensor, w4d: torch.Tensor, dw: torch.Tensor | None):
    """dw (C_out, C_in) += dy^T @ z (returns the sum; a new tensor when ``dw`` is None)."""
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
