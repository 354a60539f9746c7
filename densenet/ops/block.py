"""The math of a whole dense block with one shared feature buffer (after Pleiss et al. 2017,
arXiv 1707.06990): :func:`forward` and :func:`backward`, called by the ``densenet::dense_block``
op and its backward op (:mod:`densenet.ops.library`).

* The block owns one channels-last buffer ``B`` of shape (N, H, W, C_in + L*k); layer l writes
  its k maps into its slice and reads ``B[..., :C_l]`` in place - no concatenation is ever made.
  Viewed as an (N*H*W, C) matrix, the input of layer l is a strided sub-matrix; the 1x1
  bottleneck convolution runs on it as matrix products (:func:`densenet.ops.rows.product`).
* BN batch statistics of a channel are the same for every later layer that reads it (only the
  affine parameters differ per consumer), so per-channel mean/var are computed once, when the
  maps are written, and shared.
* Backward saves only ``B``, the bottleneck outputs (4k maps per layer; large volumes recompute
  them instead, see :func:`keeps_bottleneck`) and dropout masks - linear in depth. The concatenated BN-ReLU input of each layer (the expensive, quadratic part)
  is recomputed into a scratch buffer reused by all layers.
* The input-gradient of a BN layer in training mode has two per-channel "mean" corrections.
  Every consumer of a channel uses the same batch mean and inverse std, so the corrections of
  all consumers are summed as per-channel scalars and applied once per segment, when all its
  consumers are done - one pass over k maps instead of one pass per consumer.
* The element-wise work is the registered passes of :mod:`densenet.ops.elementwise` (fused
  kernels on the CPU and CUDA). On the CPU the 1x1 part goes through the rows in 4096-row
  chunks so the BN-ReLU scratch stays in cache between the kernel and the product, and BN2's
  statistics are gathered chunk by chunk while each chunk is in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import buffers, rows
from .elementwise import (bn_grad_apply, bn_relu, bn_relu_grad, col_affine_add, col_stats,
                          col_stats_acc, copy_cols, stats_from_state, stats_state)


@dataclass(frozen=True)
class BlockSpec:
    """What a block op computes besides its tensors. ``params`` hold, per layer, (norm1 weight,
    bias, conv1 weight[, norm2 weight, bias, conv2 weight]); ``running`` per layer the running
    (mean, var) of norm1[, norm2] (used when ``batch_stats`` is False); ``masks`` per layer the
    dropout masks (bool) after conv1[, conv2], empty without dropout."""
    growth_rate: int
    bottleneck: bool
    eps: float
    batch_stats: bool   # BN in training mode: normalise with (and return) batch statistics
    drop_rate: float

    @property
    def per_layer(self) -> int:
        """Parameters per layer (three per BN-ReLU-Conv)."""
        return 6 if self.bottleneck else 3

    def num_layers(self, params) -> int:
        return len(params) // self.per_layer

    def masks_per_layer(self, masks) -> int:
        return (2 if self.bottleneck else 1) if masks else 0


@dataclass
class Saved:
    """What forward leaves for backward: the buffer (N, H, W, C), the bottleneck outputs
    (L, N*H*W, 4k) and the batch statistics of the buffer's channels (2, C) and of each
    bottleneck output (L, 2, 4k)."""
    buf: torch.Tensor
    y1: torch.Tensor
    stats1: torch.Tensor
    stats2: torch.Tensor


def _layer_stats(i, c_in, stats1, stats2, running, spec: BlockSpec):
    """(mean1, rstd1, mean2, rstd2) layer i normalises with: the block's batch statistics in
    training, its BNs' running statistics otherwise (mean2/rstd2 None for a basic layer)."""
    eps = spec.eps
    if spec.batch_stats:
        mean1, rstd1 = stats1[0, :c_in], torch.rsqrt(stats1[1, :c_in] + eps)
        if spec.bottleneck:
            return mean1, rstd1, stats2[i, 0], torch.rsqrt(stats2[i, 1] + eps)
        return mean1, rstd1, None, None
    r = running[4 * i:4 * i + 4] if spec.bottleneck else running[2 * i:2 * i + 2]
    mean1, rstd1 = r[0], torch.rsqrt(r[1] + eps)
    if spec.bottleneck:
        return mean1, rstd1, r[2], torch.rsqrt(r[3] + eps)
    return mean1, rstd1, None, None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _spatial_product(sizes) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _scaled_mask(mask: torch.Tensor, drop_rate: float, dtype) -> torch.Tensor:
    """The noise F.dropout multiplies by, from its mask: 0 or 1/(1-p), in ``dtype``."""
    return mask.to(dtype).div_(1 - drop_rate)


KEEP_BOTTLENECK_BYTES = 32 << 20
"""A volume block keeps its bottleneck outputs for backward when they take at most this much."""

CONTIGUOUS_CONV_POSITIONS = 512
"""A volume block's 3x3x3 convolutions run their backward on contiguous maps when each volume
has at most this many positions (8^3)."""


def keeps_bottleneck(shape, num: int, inner: int, element_size: int, bottleneck: bool,
                     save: bool) -> bool:
    """Whether forward keeps every layer's bottleneck output (``num`` layers of ``inner`` maps
    of ``shape``, the block's input shape) for backward. Images and signals do. Volumes do
    while those outputs take at most ``KEEP_BOTTLENECK_BYTES``: beyond that memory is the wall,
    and backward recomputes each layer's output from the buffer (one more 1x1 product per
    layer) instead of keeping 4k maps per layer, three times the buffer's size in
    DenseNet-121's first block (2 volumes of 96^3: 85 MB more at the step's peak). Below it,
    keeping them saves that product (DenseNet-121 3-D, batch 2, 64^3: about 25 ms a step)."""
    if not (bottleneck and save):
        return False
    if len(shape) < 5:
        return True
    m = shape[0] * rows.spatial_numel(shape)
    return num * m * inner * element_size <= KEEP_BOTTLENECK_BYTES


def forward(x, params, running, masks, spec: BlockSpec, save: bool) -> Saved:
    """The block on ``x`` (N, C0, *spatial): its output is ``buf`` (N, *spatial, C0 + L*k). With
    ``save``, the bottleneck outputs of every layer are kept for backward. Images, volumes and
    signals alike: only the 3x3 convolution sees the spatial dimensions."""
    n, c0, *sp = x.shape
    conv = _CONV[len(sp)]
    k, eps, drop_rate, batch_stats = spec.growth_rate, spec.eps, spec.drop_rate, spec.batch_stats
    bottleneck, per = spec.bottleneck, spec.per_layer
    num = spec.num_layers(params)
    c_total = c0 + num * k
    m = n * _spatial_product(sp)
    sd = rows.stat_dtype(x.dtype)
    pooled = x.dim() < 5  # volumes: no pool (densenet.ops.buffers.huge_empty)
    buf = buffers.huge_empty((n, *sp, c_total), x, pooled)
    buf[..., :c0].copy_(x.permute(0, *range(2, x.dim()), 1))
    X = buf.view(m, c_total)

    stats1, stats2 = x.new_empty(0, dtype=sd), x.new_empty(0, dtype=sd)
    if batch_stats:
        stats1 = x.new_empty((2, c_total), dtype=sd)
        stats1[0, :c0], stats1[1, :c0] = col_stats(X[:, :c0], eps)
    inner = params[2].shape[0] if bottleneck else 0
    if bottleneck:
        if batch_stats:
            stats2 = x.new_empty((num, 2, inner), dtype=sd)
        keep = keeps_bottleneck(x.shape, num, inner, x.element_size(), bottleneck, save)
        y1_store = buffers.huge_empty((num if keep else 1, m, inner), x, pooled)
        z2 = buffers.huge_empty((m, inner), x, pooled)
    chunk = rows.chunk_rows(x, m) if bottleneck else m
    scratch = x.new_empty(chunk * (c0 + (num - 1) * k))  # BN-ReLU'd input of the current layer
    masks_per = spec.masks_per_layer(masks)
    for i in range(num):
        p = params[i * per:(i + 1) * per]
        c_in = c0 + i * k
        if batch_stats and bottleneck:
            mean1, rstd1 = stats1[0, :c_in], torch.rsqrt(stats1[1, :c_in] + eps)
        else:
            mean1, rstd1, mean2, rstd2 = _layer_stats(i, c_in, stats1, stats2, running, spec)
        scale1 = p[0] * rstd1
        shift1 = p[1] - mean1 * scale1
        layer_masks = masks[i * masks_per:(i + 1) * masks_per]
        if bottleneck:
            y1 = y1_store[i if keep else 0]
            # BN2's batch statistics gathered chunk by chunk while each y1 chunk is in cache
            # (after dropout they must wait for the masked maps)
            state = (stats_state(inner, x.device) if batch_stats and not layer_masks and chunk < m
                     else None)
            for lo in range(0, m, chunk):
                hi = min(lo + chunk, m)
                z = bn_relu(X[lo:hi, :c_in], scale1, shift1, scratch[: (hi - lo) * c_in].view(hi - lo, c_in))
                rows.product(z, p[2], y1[lo:hi])
                if state is not None:
                    col_stats_acc(y1[lo:hi], state)
            if layer_masks:
                rows.nchw(y1, n, *sp).mul_(_scaled_mask(layer_masks[0], drop_rate, y1.dtype))
            if batch_stats:
                mean2, var2 = (stats_from_state(state, sd) if state is not None
                               else col_stats(y1, eps))
                stats2[i, 0], stats2[i, 1] = mean2, var2
                mean2, rstd2 = stats2[i, 0], torch.rsqrt(stats2[i, 1] + eps)
            scale2 = p[3] * rstd2
            bn_relu(y1, scale2, p[4] - mean2 * scale2, z2)
            new = conv(rows.nchw(z2, n, *sp), p[5], padding=p[5].shape[-1] // 2)
        else:
            z = bn_relu(X[:, :c_in], scale1, shift1, scratch[: m * c_in].view(m, c_in))
            new = conv(rows.nchw(z, n, *sp), p[2], padding=p[2].shape[-1] // 2)
        if layer_masks:
            new = new * _scaled_mask(layer_masks[-1], drop_rate, new.dtype)
        new_rows = rows.rows(new)  # a view: the convolution's output is channels-last
        if batch_stats:
            stats1[0, c_in:c_in + k], stats1[1, c_in:c_in + k] = col_stats(new_rows, eps)
        copy_cols(new_rows, X[:, c_in:c_in + k])
    y1_out = y1_store if bottleneck and keep else x.new_empty(0)
    return Saved(buf, y1_out, stats1, stats2)


def backward(grad, saved: Saved, params, running, masks, spec: BlockSpec,
             channels_last: bool) -> list[torch.Tensor]:
    """[d input, d params...] of :func:`forward` from the gradient ``grad`` at its buffer; the
    input gradient in channels-last or contiguous format as ``channels_last`` says."""
    buf = saved.buf
    n, *sp, c_total = buf.shape
    nd = len(sp)
    m = n * _spatial_product(sp)
    k, eps, drop_rate, batch_stats = spec.growth_rate, spec.eps, spec.drop_rate, spec.batch_stats
    bottleneck, per = spec.bottleneck, spec.per_layer
    num = spec.num_layers(params)
    c0 = params[0].shape[0]
    sd = rows.stat_dtype(buf.dtype)
    X = buf.view(m, c_total)
    pooled = buf.dim() < 5
    dbuf = buffers.huge_empty(buf.shape, buf, pooled)
    dbuf.copy_(grad)
    dX = dbuf.view(m, c_total)
    # Per-channel sums over training-mode consumers of gamma*rstd*mean(g) and
    # gamma*rstd*mean(g*xhat): the two BN mean corrections, applied once per segment.
    corr_a = X.new_zeros(c_total, dtype=sd)
    corr_b = X.new_zeros(c_total, dtype=sd)
    if batch_stats:
        mean_all, rstd_all = saved.stats1[0], torch.rsqrt(saved.stats1[1] + eps)

    def finalize(lo, hi, out):
        """The finished gradient of buffer channels lo:hi into ``out``: dX plus the summed
        BN corrections, dx -= a + xhat * b, xhat = (x - mean) * rstd, folded into one pass."""
        if not batch_stats:
            return out.copy_(dX[:, lo:hi])
        coef = -corr_b[lo:hi] * rstd_all[lo:hi]
        const = corr_b[lo:hi] * rstd_all[lo:hi] * mean_all[lo:hi] - corr_a[lo:hi]
        return col_affine_add(X[:, lo:hi], coef, const, dX[:, lo:hi], out)

    seg = X.new_empty(m, k)  # the finished gradient of the current layer's maps
    chunk = rows.chunk_rows(X, m) if bottleneck else m
    scratch = X.new_empty(chunk * (c0 + (num - 1) * k))
    gscratch = X.new_empty(chunk * (c0 + (num - 1) * k))
    if bottleneck:
        inner = params[2].shape[0]
        z2 = buffers.huge_empty((m, inner), X, pooled)
        if saved.y1.numel() == 0:  # not kept: recomputed layer by layer into one buffer
            y1_again = buffers.huge_empty((m, inner), X, pooled)
    masks_per = spec.masks_per_layer(masks)
    # oneDNN's backward of a 3x3x3 convolution on small channels-last volumes is slower than
    # on contiguous ones by more than the two layout copies (DenseNet-121 3-D at 2^3-8^3)
    contiguous_conv = nd == 3 and m // n <= CONTIGUOUS_CONV_POSITIONS
    grads = []
    for i in reversed(range(num)):
        p = params[i * per:(i + 1) * per]
        layer_masks = masks[i * masks_per:(i + 1) * masks_per]
        c_in = c0 + i * k
        mean1, rstd1, mean2, rstd2 = _layer_stats(i, c_in, saved.stats1, saved.stats2, running, spec)
        # every consumer of layer i's maps is done: their gradient, contiguous for the conv
        d_new = rows.nchw(finalize(c_in, c_in + k, seg), n, *sp)
        if layer_masks:
            d_new = d_new * layer_masks[-1] / (1 - drop_rate)
        layer_grads = [None] * per
        if bottleneck:
            w2 = p[5]
            if saved.y1.numel():
                y1 = saved.y1[i]
            else:
                y1 = _bottleneck_again(X, c_in, p, mean1, rstd1, layer_masks, drop_rate, chunk,
                                       scratch, y1_again, (n, *sp))
            scale2 = p[3] * rstd2
            shift2 = p[4] - mean2 * scale2
            bn_relu(y1, scale2, shift2, z2)
            pad = w2.shape[-1] // 2
            z2map = rows.nchw(z2, n, *sp)
            if contiguous_conv:
                d_new, z2map = d_new.contiguous(), z2map.contiguous()
            dz2, dw2, _ = torch.ops.aten.convolution_backward(
                d_new, z2map, w2, None, [1] * nd, [pad] * nd,
                [1] * nd, False, [0] * nd, 1, [True, True, False])
            dy1 = rows.rows(dz2)  # a view when dz2 is channels-last, else a copy
            sum_g, sum_xg = bn_relu_grad(y1, dy1, scale2, shift2, mean2, tmp=z2).to(sd)
            dg2 = sum_xg * rstd2
            layer_grads[3:] = [dg2, sum_g, rows.like_param(dw2, w2)]
            if batch_stats:
                a2, b2 = sum_g / m, dg2 * rstd2 / m
            else:
                a2 = b2 = torch.zeros_like(sum_g)
            # BN2's input gradient, dy1: with dropout here in full, else chunk by chunk below
            # just before each chunk's products read it
            apply2 = (scale2, shift2, mean2, a2, b2)
            if layer_masks:
                bn_grad_apply(y1, dy1, *apply2, out=dy1, tmp=z2)
                dy1 = rows.rows(rows.nchw(dy1, n, *sp) * layer_masks[0] / (1 - drop_rate))
                apply2 = None
        else:
            dy1, apply2 = d_new, None

        w1 = p[2]
        scale1 = p[0] * rstd1
        shift1 = p[1] - mean1 * scale1
        sums = torch.zeros(2, c_in, dtype=torch.float64, device=X.device)
        if bottleneck:
            w1_2d = w1.view(inner, c_in)
            dw1 = None
            for lo in range(0, m, chunk):  # row chunks: the scratch stays in cache
                hi = min(lo + chunk, m)
                z = scratch[: (hi - lo) * c_in].view(hi - lo, c_in)
                if apply2 is not None:  # in place, z2 as scratch
                    d = dy1[lo:hi]
                    bn_grad_apply(y1[lo:hi], d, *apply2, out=d, tmp=z2[lo:hi])
                g = torch.mm(dy1[lo:hi], w1_2d, out=gscratch[: (hi - lo) * c_in].view(hi - lo, c_in))
                # one pass: ReLU mask, BN sums, dX += g' * scale and z = relu(bn(X)) for dW
                bn_relu_grad(X[lo:hi, :c_in], g, scale1, shift1, mean1, dx=dX[lo:hi, :c_in],
                             sums=sums, z=z)
                dw1 = rows.weight_grad(dy1[lo:hi], z, w1, dw1)
            dw1 = dw1.view_as(w1)
        else:
            Xi = X[:, :c_in]
            z = bn_relu(Xi, scale1, shift1, scratch[: m * c_in].view(m, c_in))
            pad = w1.shape[-1] // 2
            dg, dw1, _ = torch.ops.aten.convolution_backward(
                dy1, rows.nchw(z, n, *sp), w1, None, [1] * nd, [pad] * nd, [1] * nd, False, [0] * nd, 1,
                [True, True, False])
            g = gscratch[: m * c_in].view(m, c_in)
            g.copy_(rows.rows(dg))
            bn_relu_grad(Xi, g, scale1, shift1, mean1, dx=dX[:, :c_in], sums=sums, tmp=z)
        dbeta, sum_xg = sums.to(sd)
        dgamma = sum_xg * rstd1  # a tensor of its own: no two gradients may share storage
        layer_grads[:3] = [dgamma, dbeta, rows.like_param(dw1, w1)]
        if batch_stats:
            corr_a[:c_in].add_(scale1 * dbeta / m)
            corr_b[:c_in].add_(scale1 * dgamma / m)
        grads = layer_grads + grads
    finalize(0, c0, dX[:, :c0])
    dx = rows.to_layout(rows.nchw(dbuf.view(m, c_total)[:, :c0], n, *sp), channels_last)
    return [dx, *grads]


def _bottleneck_again(X, c_in, p, mean1, rstd1, layer_masks, drop_rate, chunk, scratch, out, shape):
    """Layer's bottleneck output conv1(relu(bn1(X[:, :c_in]))) (with its dropout) into ``out``,
    as forward computed it."""
    scale1 = p[0] * rstd1
    shift1 = p[1] - mean1 * scale1
    m = X.shape[0]
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        z = bn_relu(X[lo:hi, :c_in], scale1, shift1, scratch[: (hi - lo) * c_in].view(hi - lo, c_in))
        rows.product(z, p[2], out[lo:hi])
    if layer_masks:
        rows.nchw(out, *shape).mul_(_scaled_mask(layer_masks[0], drop_rate, out.dtype))
    return out


def check_args(x, params, running, masks, spec: BlockSpec) -> None:
    """The block op's tensors fit together (else a ValueError naming what does not)."""
    per = spec.per_layer
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"densenet::dense_block: x must be (N, C, L), (N, C, H, W) or (N, C, D, H, W), "
                         f"got shape {tuple(x.shape)}")
    if not params or len(params) % per:
        raise ValueError(f"densenet::dense_block: params must hold {per} tensors per layer, got {len(params)}")
    if params[0].shape != (x.shape[1],):
        raise ValueError(f"densenet::dense_block: the first layer's norm weight has {tuple(params[0].shape)} "
                         f"elements, the input {x.shape[1]} channels")
    num = len(params) // per
    if not spec.batch_stats and len(running) != num * (per // 3) * 2:
        raise ValueError(f"densenet::dense_block: running statistics must hold {num * (per // 3) * 2} "
                         f"tensors without batch statistics, got {len(running)}")
    if masks and len(masks) != num * (per // 3):
        raise ValueError(f"densenet::dense_block: masks must be empty or hold {num * (per // 3)} tensors, "
                         f"got {len(masks)}")
    for t in (*params, *running, *masks):
        if t.device != x.device:
            raise ValueError(f"densenet::dense_block: all tensors must be on {x.device}, got one on {t.device}")
