"""The math of the functions around the dense blocks, each a BN-ReLU and what follows it, each
saving only its input for backward (the BN-ReLU output is recomputed):

* ``bn_relu``: the final BN-ReLU (norm5) and the ImageNet stem's BN-ReLU when its pooling is not
  one the fused stem covers;
* ``bn_relu_maxpool``: the ImageNet stem's BN-ReLU-max-pooling. Max pooling commutes with the
  monotone ReLU, so with the fused kernel one pass over x gives the output: neither the BN-ReLU
  output (4x the output's size) nor pooling indices are stored; backward finds each window's
  maximum again from x (a volume's stem pools one volume's BN-ReLU output at a time);
* ``bn_relu_conv``: a transition's BN-ReLU-Conv1x1 (with dropout after the convolution), row
  chunk by row chunk, as the dense block's bottleneck runs;
* ``bn_relu_pool_conv``: a transition without active dropout, avgpool(conv1x1(relu(bn(x)))) as
  conv1x1(avgpool(relu(bn(x)))): a bias-free 1x1 convolution and average pooling are both
  linear, one across channels, the other within each channel, so they commute, and pooling
  first does a quarter of the convolution's work.

Every function takes (x, gamma, beta, running, eps, batch_stats, ...): ``running`` is [running
mean, running var] when ``batch_stats`` is False (else empty), and forwards return their batch
statistics (2, C) so that the caller updates the module's running statistics, outside the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import buffers, rows

_CONV = {2: F.conv2d, 3: F.conv3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
_AVG_POOL_BACKWARD = {2: torch.ops.aten.avg_pool2d_backward, 3: torch.ops.aten.avg_pool3d_backward}


def _pool_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype average pooling runs in: float32 for a bf16/fp16 volume on the CPU, which
    PyTorch's avg_pool3d does not implement ("avg_pool3d_out_frame" not implemented for
    'BFloat16'), else the map's own."""
    if t.dim() == 5 and t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype
from .elementwise import (bn_grad_apply, bn_relu, bn_relu_grad, bn_relu_maxpool,
                          bn_relu_maxpool_grad, col_affine_add, col_stats)


def terms(gamma, beta, stats, running, eps, batch_stats):
    """(mean, rstd, scale, shift) a BN normalises with."""
    if batch_stats:
        mean, rstd = stats[0], torch.rsqrt(stats[1] + eps)
    else:
        mean, rstd = running[0], torch.rsqrt(running[1] + eps)
    scale = gamma * rstd
    return mean, rstd, scale, beta - mean * scale


def batch_stats_of(X, eps, batch_stats):
    """The (2, C) batch (mean, biased variance) of the rows X, or an empty tensor."""
    sd = rows.stat_dtype(X.dtype)
    if not batch_stats:
        return X.new_empty(0, dtype=sd)
    mean, var = col_stats(X, eps)
    return torch.stack([mean.to(sd), var.to(sd)])


def _grad_end(X, G, sums, mean, rstd, scale, shift, batch_stats, out, shape, channels_last, tmp=None):
    """From the gradient G at a BN-ReLU's output (or g', already masked) and the float64 sums of
    g' and (x - mean) * g': out = BN's input gradient; returns [dx in the input's shape and
    layout, dgamma, dbeta]."""
    n, c, *sp = shape
    m = n * rows.spatial_numel(shape)
    sum_g, sum_xg = sums.to(rows.stat_dtype(X.dtype))
    dgamma = sum_xg * rstd
    if batch_stats:
        a, b = sum_g / m, dgamma * rstd / m
    else:
        a = b = torch.zeros_like(sum_g)
    dx = rows.nchw(bn_grad_apply(X, G, scale, shift, mean, a, b, out, tmp), n, *sp)
    return [rows.to_layout(dx, channels_last), dgamma, sum_g]


def _input_grad(X, dX, sums, mean, rstd, scale, batch_stats, shape, channels_last):
    """From dX = g' * scale and the float64 sums of g' and (x - mean) * g', BN's two
    batch-statistics corrections applied in place, dx -= scale * (mean(g') + xhat * mean(g' xhat));
    returns [dx in the input's layout, dgamma, dbeta]."""
    n, c, *sp = shape
    m = n * rows.spatial_numel(shape)
    dbeta, sum_xg = sums.to(rows.stat_dtype(X.dtype))
    dgamma = sum_xg * rstd
    if batch_stats:
        b = scale * rstd * dgamma / m
        col_affine_add(X, -b, b * mean - scale * dbeta / m, dX, dX)
    return [rows.to_layout(rows.nchw(dX, n, *sp), channels_last), dgamma, dbeta]


# ----------------------------------------------------------------------------- relu(bn(x))

def bn_relu_forward(x, gamma, beta, running, eps, batch_stats):
    n, c, *sp = x.shape
    X = rows.rows(x)
    stats = batch_stats_of(X, eps, batch_stats)
    _, _, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    out = buffers.huge_empty(X.shape, X, x.dim() < 5)
    bn_relu(X, scale, shift, out)
    return rows.like_layout(rows.nchw(out, n, *sp), x), stats


def bn_relu_backward(grad, x, gamma, beta, stats, running, eps, batch_stats):
    X = rows.rows(x)
    mean, rstd, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    dY = rows.rows(grad).clone()  # masked in place by some backends: never the caller's gradient
    sums = bn_relu_grad(X, dY, scale, shift, mean)
    return _grad_end(X, dY, sums, mean, rstd, scale, shift, batch_stats,
                     buffers.huge_empty(X.shape, X, x.dim() < 5), x.shape, rows.is_channels_last(x))


# ----------------------------------------------------------------------------- maxpool(relu(bn(x)))

def pooled_size(*args):
    """``pooled_size(h, w, kernel, stride, padding)`` (or ``d, h, w, ...``): the output sizes
    of a max pooling without ceil mode or dilation."""
    *sizes, kernel, stride, padding = args
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(sizes, kernel, stride, padding))


def bn_relu_maxpool_forward(x, gamma, beta, running, eps, batch_stats, kernel, stride, padding):
    if x.dim() == 5:
        return _bn_relu_maxpool3d_forward(x, gamma, beta, running, eps, batch_stats, kernel, stride,
                                          padding)
    n, c, h, w = x.shape
    X = rows.rows(x)
    stats = batch_stats_of(X, eps, batch_stats)
    _, _, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    oh, ow = pooled_size(h, w, kernel, stride, padding)
    out = bn_relu_maxpool(X.view(n, h, w, c), scale, shift, kernel, stride, padding,
                          buffers.huge_empty((n, oh, ow, c), X, x.dim() < 5))
    return rows.like_layout(out.permute(0, 3, 1, 2), x), stats


def bn_relu_maxpool_backward(grad, x, gamma, beta, stats, running, eps, batch_stats, kernel, stride,
                             padding):
    if x.dim() == 5:
        return _bn_relu_maxpool3d_backward(grad, x, gamma, beta, stats, running, eps, batch_stats,
                                           kernel, stride, padding)
    n, c, h, w = x.shape
    X = rows.rows(x)
    mean, rstd, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    G = buffers.huge_empty(X.shape, X, x.dim() < 5)  # g', all of it written by the pass
    sums = bn_relu_maxpool_grad(X.view(n, h, w, c), scale, shift, mean, kernel, stride, padding,
                                grad.permute(0, 2, 3, 1).contiguous(), G.view(n, h, w, c))
    return _grad_end(X, G, sums, mean, rstd, scale, shift, batch_stats, G, x.shape, rows.is_channels_last(x))


# A volume's stem: one volume at a time, its BN-ReLU output in a scratch buffer of one volume
# and pooled from there (recomputed in backward, with the pooling's indices, so the gradient
# goes where the plain modules send it). Only x is kept: the BN-ReLU output (8x the pooled
# output's size) and the int64 indices are never stored.

def _bn_relu_maxpool3d_forward(x, gamma, beta, running, eps, batch_stats, kernel, stride, padding):
    n, c, *sp = x.shape
    s = rows.spatial_numel(x.shape)
    X = rows.rows(x)
    stats = batch_stats_of(X, eps, batch_stats)
    _, _, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    out = buffers.huge_empty((n, *pooled_size(*sp, kernel, stride, padding), c), X, x.dim() < 5)
    scratch = X.new_empty(s * c)
    for i in range(n):
        z = bn_relu(X[i * s:(i + 1) * s], scale, shift, scratch.view(s, c))
        pooled = F.max_pool3d(rows.nchw(z, 1, *sp), kernel, stride, padding)
        out[i].copy_(pooled[0].permute(1, 2, 3, 0))
    return rows.like_layout(out.permute(0, 4, 1, 2, 3), x), stats


def _bn_relu_maxpool3d_backward(grad, x, gamma, beta, stats, running, eps, batch_stats, kernel, stride,
                                padding):
    n, c, *sp = x.shape
    s = rows.spatial_numel(x.shape)
    X = rows.rows(x)
    mean, rstd, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    dX = buffers.huge_empty(X.shape, X, x.dim() < 5)  # written (not added to), volume by volume
    sums = torch.zeros(2, c, dtype=torch.float64, device=X.device)
    scratch = X.new_empty(s * c)
    for i in range(n):
        lo, hi = i * s, (i + 1) * s
        z = bn_relu(X[lo:hi], scale, shift, scratch.view(s, c))
        zimg = rows.nchw(z, 1, *sp)
        _, idx = F.max_pool3d(zimg, kernel, stride, padding, return_indices=True)
        # the gradient in zimg's (channels-last) layout, else the kernel copies zimg
        gz = torch.ops.aten.max_pool3d_with_indices_backward(rows.to_layout(grad[i:i + 1], True), zimg,
                                                             kernel, stride, padding, [1, 1, 1], False, idx)
        bn_relu_grad(X[lo:hi], rows.rows(gz), scale, shift, mean, dx=dX[lo:hi], sums=sums, assign=True,
                     tmp=z)
    # channels-last whatever x's layout: a contiguous copy would be one more map of x's size
    # at the step's memory peak (the stem's backward, with x and dX alive); the convolution
    # before takes it as it is
    return _input_grad(X, dX, sums, mean, rstd, scale, batch_stats, x.shape, True)


# ----------------------------------------------------------------------------- conv1x1(relu(bn(x)))

def bn_relu_conv_forward(x, gamma, beta, running, eps, batch_stats, weight):
    """Neither the BN output nor the ReLU output is ever stored (backward recomputes them)."""
    n, c, *sp = x.shape
    m = n * rows.spatial_numel(x.shape)
    X = rows.rows(x)  # a view of channels-last input
    stats = batch_stats_of(X, eps, batch_stats)
    _, _, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    Y = buffers.huge_empty((m, weight.shape[0]), X, x.dim() < 5)
    chunk = rows.chunk_rows(X, m)
    scratch = X.new_empty(chunk * c)
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        z = bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c))
        rows.product(z, weight, Y[lo:hi])
    return rows.like_layout(rows.nchw(Y, n, *sp), x), stats


def bn_relu_conv_backward(grad, x, gamma, beta, stats, running, eps, batch_stats, weight):
    n, c = x.shape[:2]
    m = n * rows.spatial_numel(x.shape)
    X = rows.rows(x)
    mean, rstd, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    w2d = weight.view(weight.shape[0], c)
    dY = rows.rows(grad)
    dX = buffers.huge_empty(X.shape, X, x.dim() < 5)  # written (not added to) by the first pass
    dw = None
    sums = torch.zeros(2, c, dtype=torch.float64, device=X.device)
    chunk = rows.chunk_rows(X, m)
    scratch = X.new_empty(chunk * c)
    gscratch = X.new_empty(chunk * c)
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        z = scratch[: (hi - lo) * c].view(hi - lo, c)
        g = torch.mm(dY[lo:hi], w2d, out=gscratch[: (hi - lo) * c].view(hi - lo, c))
        bn_relu_grad(X[lo:hi], g, scale, shift, mean, dx=dX[lo:hi], sums=sums, z=z, assign=True)
        dw = rows.weight_grad(dY[lo:hi], z, weight, dw)
    dx, dgamma, dbeta = _input_grad(X, dX, sums, mean, rstd, scale, batch_stats, x.shape,
                                    rows.is_channels_last(x))
    return [dx, dgamma, dbeta, rows.like_param(dw.view_as(weight), weight)]


# ----------------------------------------------------------------------------- conv1x1(avgpool(relu(bn(x))))

def _image_chunks(n: int, s: int, t: torch.Tensor):
    """Chunks of whole images (for the pooling) of at most ``chunk_rows`` rows, or one image,
    for images of ``s`` positions: a list of (first image, end image)."""
    per = max(1, rows.chunk_rows(t, n * s) // s)
    return [(i, min(i + per, n)) for i in range(0, n, per)]


def _tiles(sp, kernel, stride, padding) -> bool:
    """Whether a volume's average pooling is non-overlapping windows that tile it exactly
    (kernel = stride, no padding, every size a multiple of the kernel): DenseNet's 2x2x2,
    stride-2 transitions. Those :func:`_tile_mean` and :func:`_tile_mean_grad` compute on the
    channels-last rows themselves: PyTorch's CPU avg_pool3d and its backward turn a
    channels-last volume into a contiguous one and back (two copies of the map each way;
    DenseNet-121 at 64^3: 2.3 ms against 0.1 ms for the first transition's pooling)."""
    return (len(sp) == 3 and list(kernel) == list(stride) and not any(padding)
            and all(s % k == 0 for s, k in zip(sp, kernel)))


def _tile_mean(z, n, sp, kernel):
    """The (n, C, *pooled) channels-last mean of each window of the rows ``z`` (n*S, C), one
    spatial axis at a time, as sums of strided views."""
    c = z.shape[1]
    v = z.view(n, *sp, c)
    for axis, k in enumerate(kernel, start=1):
        w = v.unflatten(axis, (v.shape[axis] // k, k))
        acc = w.select(axis + 1, 0)
        for j in range(1, k):
            acc = acc + w.select(axis + 1, j)
        v = acc
    return (v * (1.0 / (kernel[0] * kernel[1] * kernel[2]))).permute(0, 4, 1, 2, 3)


def _pooled(z, zimg, sp, tiles: bool, pool_args):
    """The average pooling of a chunk's BN-ReLU output (rows ``z``, map ``zimg``) in the dtype
    pooling runs in (:func:`_pool_dtype`)."""
    pd = _pool_dtype(zimg)
    if tiles:
        return _tile_mean(z.to(pd), zimg.shape[0], sp, pool_args[0])
    return _AVG_POOL[len(sp)](zimg.to(pd), *pool_args[:5])


def _tile_mean_grad(dp, kernel, out_rows):
    """The gradient at the rows of :func:`_tile_mean`'s input from ``dp`` at its output: each
    window's gradient divided by its size, spread over the window, written into ``out_rows``."""
    n, c, *pooled = dp.shape
    scale = 1.0 / (kernel[0] * kernel[1] * kernel[2])
    d = dp.permute(0, 2, 3, 4, 1)
    src = (d * scale).reshape(n, pooled[0], 1, pooled[1], 1, pooled[2], 1, c)
    target = out_rows.view(n, pooled[0], kernel[0], pooled[1], kernel[1], pooled[2], kernel[2], c)
    target.copy_(src.expand_as(target))
    return out_rows


def bn_relu_pool_conv_forward(x, gamma, beta, running, eps, batch_stats, weight, kernel, stride,
                              padding, ceil_mode, count_include_pad):
    """BN-ReLU and the pooling run a chunk of whole images at a time (recomputed in backward).
    Images and volumes (a 1-D map comes as an image of height 1)."""
    n, c, *sp = x.shape
    s = rows.spatial_numel(x.shape)
    X = rows.rows(x)
    stats = batch_stats_of(X, eps, batch_stats)
    _, _, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    chunks = _image_chunks(n, s, X)
    scratch = X.new_empty((chunks[0][1] - chunks[0][0]) * s * c)
    tiles = _tiles(sp, kernel, stride, padding)
    pool_args = (kernel, stride, padding, ceil_mode, count_include_pad)
    outs = []
    for i0, i1 in chunks:
        lo, hi = i0 * s, i1 * s
        z = bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c))
        zimg = rows.nchw(z, i1 - i0, *sp)
        pooled = _pooled(z, zimg, sp, tiles, pool_args).to(z.dtype)
        outs.append(_CONV[len(sp)](pooled, weight))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return rows.like_layout(out, x), stats


def bn_relu_pool_conv_backward(grad, x, gamma, beta, stats, running, eps, batch_stats, weight, kernel,
                               stride, padding, ceil_mode, count_include_pad):
    n, c, *sp = x.shape
    d, s = len(sp), rows.spatial_numel(x.shape)
    X = rows.rows(x)
    mean, rstd, scale, shift = terms(gamma, beta, stats, running, eps, batch_stats)
    pool_args = (kernel, stride, padding, ceil_mode, count_include_pad, None)
    dX = buffers.huge_empty(X.shape, X, x.dim() < 5)  # written (not added to), chunk by chunk
    dw = None
    sums = torch.zeros(2, c, dtype=torch.float64, device=X.device)
    chunks = _image_chunks(n, s, X)
    scratch = X.new_empty((chunks[0][1] - chunks[0][0]) * s * c)
    tiles = _tiles(sp, kernel, stride, padding)
    if tiles:
        gscratch = X.new_empty((chunks[0][1] - chunks[0][0]) * s * c)
    for i0, i1 in chunks:
        lo, hi = i0 * s, i1 * s
        z = bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c))
        zimg = rows.nchw(z, i1 - i0, *sp)
        pd = _pool_dtype(zimg)
        dzp, dwc, _ = torch.ops.aten.convolution_backward(
            grad[i0:i1], _pooled(z, zimg, sp, tiles, pool_args).to(z.dtype), weight, None, [1] * d,
            [0] * d, [1] * d, False, [0] * d, 1, [True, True, False])
        dw = dwc if dw is None else dw.add_(dwc)
        if tiles:
            g = _tile_mean_grad(dzp, kernel, gscratch[: (hi - lo) * c].view(hi - lo, c))
        else:
            g = rows.rows(_AVG_POOL_BACKWARD[d](dzp.to(pd), zimg.to(pd), *pool_args).to(z.dtype))  # a new tensor
        bn_relu_grad(X[lo:hi], g, scale, shift, mean, dx=dX[lo:hi], sums=sums, assign=True, tmp=z)
    dx, dgamma, dbeta = _input_grad(X, dX, sums, mean, rstd, scale, batch_stats, x.shape,
                                    rows.is_channels_last(x))
    return [dx, dgamma, dbeta, rows.like_param(dw, weight)]
