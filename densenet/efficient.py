"""The memory-efficient dense block: one shared feature buffer, BN-ReLU recomputed in backward.

A plain dense block (``DenseBlock`` with ``implementation="reference"``) concatenates all earlier
maps for every layer and autograd keeps every concatenation and every BN output alive until
backward, so training memory grows quadratically with depth. Here the whole
block is one operator registered with PyTorch, ``torch.ops.densenet.dense_block``, with its
backward operator, a fake (meta) implementation and an autocast rule, so that autograd, bf16
autocast, ``torch.compile`` and ``torch.export`` all see it as one op (after Pleiss et al. 2017,
arXiv 1707.06990):

* Each block owns one channels-last buffer ``B`` of shape (N, H, W, C_in + L*k); layer l writes
  its k maps into its slice and reads ``B[..., :C_l]`` in place - no concatenation is ever made.
  Viewed as an (N*H*W, C) matrix, the input of layer l is a strided sub-matrix read in place;
  the 1x1 bottleneck convolution runs on it as matrix products (on CPU float32 the forward and
  weight-gradient products as oneDNN 1x1 convolutions, see ``_onednn``).
* BN batch statistics of a channel are the same for every later layer that reads it (only the
  affine parameters differ per consumer), so per-channel mean/var are computed once, when the
  maps are written, and shared.
* Backward saves only ``B``, the bottleneck outputs (4k maps per layer) and dropout masks -
  linear in depth. The concatenated BN-ReLU input of each layer (the expensive, quadratic part)
  is recomputed into a scratch buffer reused by all layers. BN running statistics are updated
  once, in forward, exactly as ``nn.BatchNorm2d`` does (the checkpointing approach recomputes
  BN in training mode and updates them twice).
* The input-gradient of a BN layer in training mode has two per-channel "mean" corrections.
  Every consumer of a channel uses the same batch mean and inverse std, so the corrections of
  all consumers are summed as per-channel scalars and applied once per segment, when all its
  consumers are done - one pass over k maps instead of one pass per consumer.
* On the CPU the element-wise work runs in fused kernels (``kernels.py``): BN-ReLU in one pass,
  and in backward one pass that applies the ReLU mask, sums both BN gradient terms, adds the
  input gradient and recomputes BN-ReLU for the weight gradient. The 1x1 part goes through the
  rows in 4096-row chunks so the BN-ReLU scratch stays in cache between the kernel and ``mm``.
  On CUDA the same passes are Triton kernels (``gpu_kernels.py``); where neither is
  available (no C compiler, no Triton) the same steps use torch ops.
* Few, large, reused allocations, the large ones backed by transparent huge pages: DenseNets'
  large temporaries are what makes the CPU slow (page faults on fresh memory; with glibc malloc
  torchvision's bc100 takes 100,000-500,000 faults per training step, see benchmarks/RESULTS.md).
* The transitions' BN-ReLU-Conv1x1 is one function of the same kind (``transition_forward``):
  it saves only its input, whose batch statistics it computes in one pass. Without active
  dropout it average-pools before the 1x1 convolution (both are linear and they commute), so
  the convolution does a quarter of the work torchvision's conv-then-pool does.
* The ImageNet stem's BN-ReLU-max-pool is one function and, with the kernels, one pass
  (``bn_relu_maxpool_forward``): max pooling commutes with the monotone ReLU, so neither the
  BN-ReLU output nor pooling indices are stored; backward finds each window's maximum again.

Cases the ops do not cover (TorchScript tracing / scripting, meta tensors, a SyncBatchNorm or
BN without affine parameters, non-BatchNorm2d norms, mixed eps or dropout rates in a block)
run the plain modules, which give the same results. So do the modules the ops would compute
without calling them (a block's layers, a transition's parts, the stem's norm0/relu0/pool0,
norm5) while a hook is registered on one of them or on every module: the hooks then fire.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import gpu_kernels, kernels


def release_buffers() -> int:
    """Free the pooled CPU buffers of this path that no tensor uses any more (bytes freed)."""
    return kernels.release_buffers()


def _batch_mean_var(x4d: torch.Tensor, eps: float):
    """Per-channel batch mean and biased variance, by the BatchNorm kernel's own statistics
    pass: var_mean over dims (0, 2, 3) was 8% of a training step, this is several times faster
    on channels-last input."""
    _, mean, invstd = torch.native_batch_norm(x4d, None, None, None, None, True, 0.0, eps)
    return mean, invstd.pow(-2).sub_(eps)


def _fused(t: torch.Tensor) -> bool:
    """Use the compiled CPU kernels (kernels.py) for ``t``; else the torch ops below."""
    return kernels.available(t)


def _triton(t: torch.Tensor) -> bool:
    """Use the Triton kernels (gpu_kernels.py) for ``t``, a CUDA tensor; they keep the torch-op
    path's contract (the gradient masked in place)."""
    return gpu_kernels.available(t)


def _col_stats(rows: torch.Tensor, eps: float, n: int, h: int, w: int):
    """Per-channel batch (mean, biased variance) of an (N*H*W, C) matrix."""
    if _fused(rows):
        return kernels.col_stats(rows)
    x4d = _nchw(rows, n, h, w)
    if x4d.dtype != _stat_dtype(x4d.dtype):
        x4d = x4d.to(_stat_dtype(x4d.dtype))  # bf16/fp16 maps: statistics in float32
    return _batch_mean_var(x4d, eps)


def _bn_relu(x: torch.Tensor, scale, shift, out: torch.Tensor) -> torch.Tensor:
    """out = relu(x * scale + shift): BN with folded statistics, then ReLU, one pass."""
    if _fused(x):
        return kernels.bn_relu(x, scale, shift, out)
    if _triton(x):
        return gpu_kernels.bn_relu(x, scale, shift, out)
    return torch.addcmul(shift, x, scale, out=out).relu_()


def _bn_relu_grad(x, g, scale, shift, mean, tmp, dx=None, sums=None, z=None, assign=False):
    """Backward through relu(x * scale + shift) for the gradient ``g`` at its output: adds the
    per-channel sums of g' and of (x - mean) * g' (g' = g masked by the ReLU) to ``sums``, a
    float64 (2, C) tensor, and with ``dx`` adds g' * scale to it; with ``z`` it also writes
    relu(x * scale + shift) there (``tmp`` is then unused); with ``assign``, dx = g' * scale.
    Returns ``sums``. ``g`` may be overwritten with g'; ``tmp`` is scratch shaped like ``x``."""
    if sums is None:
        sums = torch.zeros(2, x.shape[1], dtype=torch.float64, device=x.device)
    if _fused(x):
        return kernels.bn_relu_grad(x, g, scale, shift, mean, dx, sums, z, assign)
    if _triton(x):
        return gpu_kernels.bn_relu_grad(x, g, scale, shift, mean, dx, sums, z, assign)
    if assign and dx is not None:
        dx.zero_()
    if z is not None:
        _bn_relu(x, scale, shift, z)
        tmp = x.new_empty(x.shape)
    g.mul_(torch.addcmul(shift, x, scale, out=tmp).relu_().sign_())
    if x.dtype in (torch.float32, torch.float64):
        sums[0] += g.sum(0)
        sums[1] += torch.sub(x, mean, out=tmp).mul_(g).sum(0)
    else:  # bf16/fp16 maps: products and sums in float32, as BatchNorm's own backward does
        sums[0] += g.sum(0, dtype=torch.float32)
        sums[1] += (x.float() - mean).mul_(g).sum(0)
    if dx is not None:
        dx.addcmul_(g, scale)
    return sums


def _affine_add(x, coef, const, src, out):
    """out = src + x * coef + const, per channel (``out`` may be ``src``)."""
    if _fused(x):
        return kernels.col_affine_add(x, coef, const, src, out)
    if _triton(x):
        return gpu_kernels.col_affine_add(x, coef, const, src, out)
    if out is not src:
        out.copy_(src)
    return out.addcmul_(x, coef).add_(const)


def _chunk_rows(t: torch.Tensor, m: int) -> int:
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


def _as_map(t2d: torch.Tensor) -> torch.Tensor:
    """An (M, C) row-major matrix as a (1, C, M, 1) channels-last image (no copy)."""
    return t2d.view(1, t2d.shape[0], 1, t2d.shape[1]).permute(0, 3, 1, 2)


def _product(z: torch.Tensor, w4d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = z @ w^T: the 1x1 convolution with weight ``w4d`` (C_out, C_in, 1, 1) of the rows z."""
    if _onednn(z):
        return out.copy_(F.conv2d(_as_map(z), w4d).permute(0, 2, 3, 1).reshape(out.shape))
    return torch.mm(z, w4d.view(w4d.shape[0], -1).t(), out=out)


def _weight_grad(dy: torch.Tensor, z: torch.Tensor, w4d: torch.Tensor, dw: torch.Tensor | None):
    """dw (C_out, C_in) += dy^T @ z (returns the sum; a new tensor when ``dw`` is None)."""
    if _onednn(z):
        g = torch.ops.aten.convolution_backward(
            _as_map(dy), _as_map(z), w4d, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [False, True, False])[1].view(w4d.shape[0], -1)
        return g if dw is None else dw.add_(g)
    if dw is None:
        return torch.mm(dy.t(), z)
    return dw.addmm_(dy.t(), z)


def _like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with exactly ``param``'s strides, as autograd's gradient layout contract and
    DDP's gradient buckets expect (a 1x1 weight's gradient can come back from oneDNN with
    other strides on its size-1 dimensions; DDP then warns and copies it every step)."""
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def _bn_grad_apply(x, g, scale, shift, mean, a, b, tmp, out=None):
    """out (default: g, in place) = scale * (g' - a - (x - mean) * b): a BN input gradient from
    its sums (``g`` as left by ``_bn_relu_grad``)."""
    if _fused(x):
        return kernels.bn_grad_apply(x, g, scale, shift, mean, a, b, g if out is None else out)
    if _triton(x):
        return gpu_kernels.bn_grad_apply(x, g, scale, shift, mean, a, b, g if out is None else out)
    if out is not None:
        g = out.copy_(g)
    torch.sub(x, mean, out=tmp).mul_(b).add_(a)
    return g.sub_(tmp).mul_(scale)


def _nchw(t2d: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """An (N*H*W, C) matrix seen as an (N, C, H, W) channels-last tensor (no copy)."""
    return t2d.view(n, h, w, t2d.shape[1]).permute(0, 3, 1, 2)


def _rows(t4d: torch.Tensor) -> torch.Tensor:
    """An (N, C, H, W) tensor as an (N*H*W, C) row-major matrix (a copy unless channels-last)."""
    rows = t4d.permute(0, 2, 3, 1).reshape(-1, t4d.shape[1])
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """BN statistics, their sums and the affine parameters stay in float32 under bf16/fp16."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _per_layer(bottleneck: bool) -> int:
    return 6 if bottleneck else 3


def _layer_stats(i, c_in, stats1, stats2, running, bottleneck, eps, batch_stats):
    """(mean1, rstd1, mean2, rstd2) layer i normalises with: the block's batch statistics in
    training, its BNs' running statistics otherwise (mean2/rstd2 None for a basic layer)."""
    if batch_stats:
        mean1, rstd1 = stats1[0, :c_in], torch.rsqrt(stats1[1, :c_in] + eps)
        if bottleneck:
            return mean1, rstd1, stats2[i, 0], torch.rsqrt(stats2[i, 1] + eps)
        return mean1, rstd1, None, None
    r = running[4 * i:4 * i + 4] if bottleneck else running[2 * i:2 * i + 2]
    mean1, rstd1 = r[0], torch.rsqrt(r[1] + eps)
    if bottleneck:
        return mean1, rstd1, r[2], torch.rsqrt(r[3] + eps)
    return mean1, rstd1, None, None


def _scaled_mask(mask: torch.Tensor, drop_rate: float, dtype) -> torch.Tensor:
    """The noise F.dropout multiplies by, from its mask: 0 or 1/(1-p), in ``dtype``."""
    return mask.to(dtype).div_(1 - drop_rate)


def _block_forward(x, params, running, masks, growth_rate, bottleneck, eps, batch_stats, drop_rate,
                   save):
    n, c0, h, w = x.shape
    k = growth_rate
    per = _per_layer(bottleneck)
    num = len(params) // per
    c_total = c0 + num * k
    m = n * h * w
    sd = _stat_dtype(x.dtype)
    buf = kernels.huge_empty((n, h, w, c_total), x)
    buf[..., :c0].copy_(x.permute(0, 2, 3, 1))
    X = buf.view(m, c_total)

    stats1, stats2 = x.new_empty(0, dtype=sd), x.new_empty(0, dtype=sd)
    if batch_stats:
        stats1 = x.new_empty((2, c_total), dtype=sd)
        stats1[0, :c0], stats1[1, :c0] = _col_stats(X[:, :c0], eps, n, h, w)
    inner = params[2].shape[0] if bottleneck else 0
    if bottleneck:
        if batch_stats:
            stats2 = x.new_empty((num, 2, inner), dtype=sd)
        y1_store = kernels.huge_empty((num if save else 1, m, inner), x)
        z2 = kernels.huge_empty((m, inner), x)
    rows = _chunk_rows(x, m) if bottleneck else m
    scratch = x.new_empty(rows * (c0 + (num - 1) * k))  # BN-ReLU'd input of the current layer
    masks_per = (2 if bottleneck else 1) if masks else 0
    for i in range(num):
        p = params[i * per:(i + 1) * per]
        c_in = c0 + i * k
        if batch_stats and bottleneck:
            mean1, rstd1 = stats1[0, :c_in], torch.rsqrt(stats1[1, :c_in] + eps)
        else:
            mean1, rstd1, mean2, rstd2 = _layer_stats(i, c_in, stats1, stats2, running, bottleneck,
                                                      eps, batch_stats)
        scale1 = p[0] * rstd1
        shift1 = p[1] - mean1 * scale1
        layer_masks = masks[i * masks_per:(i + 1) * masks_per]
        if bottleneck:
            y1 = y1_store[i if save else 0]
            # BN2's batch statistics gathered chunk by chunk while each y1 chunk is in cache
            state = (kernels.stats_state(inner) if _fused(y1) and not layer_masks and batch_stats
                     else None)
            for lo in range(0, m, rows):
                hi = min(lo + rows, m)
                z = _bn_relu(X[lo:hi, :c_in], scale1, shift1, scratch[: (hi - lo) * c_in].view(hi - lo, c_in))
                _product(z, p[2], y1[lo:hi])
                if state is not None:
                    kernels.col_stats(y1[lo:hi], state)
            if layer_masks:
                _nchw(y1, n, h, w).mul_(_scaled_mask(layer_masks[0], drop_rate, y1.dtype))
            if batch_stats:
                if state is not None:
                    mean2, var2 = kernels.stats_from_state(state, sd)
                else:
                    mean2, var2 = _col_stats(y1, eps, n, h, w)
                stats2[i, 0], stats2[i, 1] = mean2, var2
                mean2, rstd2 = stats2[i, 0], torch.rsqrt(stats2[i, 1] + eps)
            scale2 = p[3] * rstd2
            _bn_relu(y1, scale2, p[4] - mean2 * scale2, z2)
            new = F.conv2d(_nchw(z2, n, h, w), p[5], padding=p[5].shape[-1] // 2)
        else:
            z = _bn_relu(X[:, :c_in], scale1, shift1, scratch[: m * c_in].view(m, c_in))
            new = F.conv2d(_nchw(z, n, h, w), p[2], padding=p[2].shape[-1] // 2)
        if layer_masks:
            new = new * _scaled_mask(layer_masks[-1], drop_rate, new.dtype)
        new_rows = _rows(new)  # a view: the convolution's output is channels-last
        if batch_stats:
            stats1[0, c_in:c_in + k], stats1[1, c_in:c_in + k] = _col_stats(new_rows, eps, n, h, w)
        if _fused(X):
            kernels.copy_cols(new_rows, X[:, c_in:c_in + k])
        else:
            X[:, c_in:c_in + k].copy_(new_rows)
    y1_out = y1_store if bottleneck and save else x.new_empty(0)
    return buf, y1_out, stats1, stats2


def _block_backward(grad, buf, y1_store, stats1, stats2, params, running, masks, growth_rate,
                    bottleneck, eps, batch_stats, drop_rate, channels_last):
    n, h, w, c_total = buf.shape
    m = n * h * w
    k = growth_rate
    per = _per_layer(bottleneck)
    num = len(params) // per
    c0 = params[0].shape[0]
    sd = _stat_dtype(buf.dtype)
    X = buf.view(m, c_total)
    dbuf = kernels.huge_empty(buf.shape, buf)
    dbuf.copy_(grad)
    dX = dbuf.view(m, c_total)
    # Per-channel sums over training-mode consumers of gamma*rstd*mean(g) and
    # gamma*rstd*mean(g*xhat): the two BN mean corrections, applied once per segment.
    corr_a = X.new_zeros(c_total, dtype=sd)
    corr_b = X.new_zeros(c_total, dtype=sd)
    if batch_stats:
        mean_all, rstd_all = stats1[0], torch.rsqrt(stats1[1] + eps)

    def finalize(lo, hi, out):
        """The finished gradient of buffer channels lo:hi into ``out``: dX plus the summed
        BN corrections, dx -= a + xhat * b, xhat = (x - mean) * rstd, folded into one pass."""
        if not batch_stats:
            return out.copy_(dX[:, lo:hi])
        coef = -corr_b[lo:hi] * rstd_all[lo:hi]
        const = corr_b[lo:hi] * rstd_all[lo:hi] * mean_all[lo:hi] - corr_a[lo:hi]
        return _affine_add(X[:, lo:hi], coef, const, dX[:, lo:hi], out)

    seg = X.new_empty(m, k)  # the finished gradient of the current layer's maps
    rows = _chunk_rows(X, m) if bottleneck else m
    scratch = X.new_empty(rows * (c0 + (num - 1) * k))
    gscratch = X.new_empty(rows * (c0 + (num - 1) * k))
    if bottleneck:
        inner = params[2].shape[0]
        z2 = kernels.huge_empty((m, inner), X)
    masks_per = (2 if bottleneck else 1) if masks else 0
    grads = []
    for i in reversed(range(num)):
        p = params[i * per:(i + 1) * per]
        layer_masks = masks[i * masks_per:(i + 1) * masks_per]
        c_in = c0 + i * k
        mean1, rstd1, mean2, rstd2 = _layer_stats(i, c_in, stats1, stats2, running, bottleneck, eps,
                                                  batch_stats)
        # every consumer of layer i's maps is done: their gradient, contiguous for the conv
        d_new = _nchw(finalize(c_in, c_in + k, seg), n, h, w)
        if layer_masks:
            d_new = d_new * layer_masks[-1] / (1 - drop_rate)
        layer_grads = [None] * per
        if bottleneck:
            w2 = p[5]
            y1 = y1_store[i]
            scale2 = p[3] * rstd2
            shift2 = p[4] - mean2 * scale2
            _bn_relu(y1, scale2, shift2, z2)
            pad = w2.shape[-1] // 2
            dz2, dw2, _ = torch.ops.aten.convolution_backward(
                d_new, _nchw(z2, n, h, w), w2, None, [1, 1], [pad, pad],
                [1, 1], False, [0, 0], 1, [True, True, False])
            dy1 = _rows(dz2)  # a view when dz2 is channels-last, else a copy
            sum_g, sum_xg = _bn_relu_grad(y1, dy1, scale2, shift2, mean2, z2).to(sd)
            dg2 = sum_xg * rstd2
            layer_grads[3:] = [dg2, sum_g, _like(dw2, w2)]
            if batch_stats:
                a2, b2 = sum_g / m, dg2 * rstd2 / m
            else:
                a2 = b2 = torch.zeros_like(sum_g)
            # BN2's input gradient, dy1: with dropout here in full, else chunk by chunk below
            # just before each chunk's products read it
            apply2 = (scale2, shift2, mean2, a2, b2)
            if layer_masks:
                _bn_grad_apply(y1, dy1, *apply2, z2)
                dy1 = _rows(_nchw(dy1, n, h, w) * layer_masks[0] / (1 - drop_rate))
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
            for lo in range(0, m, rows):  # row chunks: the scratch stays in cache
                hi = min(lo + rows, m)
                z = scratch[: (hi - lo) * c_in].view(hi - lo, c_in)
                if apply2 is not None:
                    _bn_grad_apply(y1[lo:hi], dy1[lo:hi], *apply2, z2[lo:hi])
                g = torch.mm(dy1[lo:hi], w1_2d, out=gscratch[: (hi - lo) * c_in].view(hi - lo, c_in))
                # one pass: ReLU mask, BN sums, dX += g' * scale and z = relu(bn(X)) for dW
                _bn_relu_grad(X[lo:hi, :c_in], g, scale1, shift1, mean1, None,
                              dx=dX[lo:hi, :c_in], sums=sums, z=z)
                dw1 = _weight_grad(dy1[lo:hi], z, w1, dw1)
            dw1 = dw1.view_as(w1)
        else:
            Xi = X[:, :c_in]
            z = _bn_relu(Xi, scale1, shift1, scratch[: m * c_in].view(m, c_in))
            pad = w1.shape[-1] // 2
            dg, dw1, _ = torch.ops.aten.convolution_backward(
                dy1, _nchw(z, n, h, w), w1, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
                [True, True, False])
            g = gscratch[: m * c_in].view(m, c_in)
            g.copy_(_rows(dg))
            _bn_relu_grad(Xi, g, scale1, shift1, mean1, z, dx=dX[:, :c_in], sums=sums)
        dbeta, sum_xg = sums.to(sd)
        dgamma = sum_xg * rstd1  # a tensor of its own: no two gradients may share storage
        layer_grads[:3] = [dgamma, dbeta, _like(dw1, w1)]
        if batch_stats:
            corr_a[:c_in].add_(scale1 * dbeta / m)
            corr_b[:c_in].add_(scale1 * dgamma / m)
        grads = layer_grads + grads
    finalize(0, c0, dX[:, :c0])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = dbuf[..., :c0].permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    return [dx, *grads]


@torch.library.custom_op("densenet::dense_block", mutates_args=())
def dense_block_op(x: Tensor, params: list[Tensor], running: list[Tensor], masks: list[Tensor],
                   growth_rate: int, bottleneck: bool, eps: float, batch_stats: bool,
                   drop_rate: float, save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A whole dense block: returns (the block's output as its channels-last (N, H, W, C) buffer,
    the bottleneck outputs kept for backward (when ``save``), the batch statistics of the
    buffer's channels (2, C) and of each bottleneck output (L, 2, 4k), as (mean, biased var)).

    ``params``: per layer (norm1 weight, bias, conv1 weight[, norm2 weight, bias, conv2
    weight]); ``running``: per layer the running (mean, var) of norm1[, norm2], used when
    ``batch_stats`` is False; ``masks``: per layer the dropout masks (bool) after conv1[, conv2],
    empty without dropout. Running statistics are not touched: the caller updates them from
    the returned batch statistics."""
    _check_block_args(x, params, running, masks, bottleneck, batch_stats)
    return _block_forward(x, params, running, masks, growth_rate, bottleneck, eps, batch_stats,
                          drop_rate, save)


@dense_block_op.register_fake
def _(x, params, running, masks, growth_rate, bottleneck, eps, batch_stats, drop_rate, save):
    n, c0, h, w = x.shape
    num = len(params) // _per_layer(bottleneck)
    sd = _stat_dtype(x.dtype)
    buf = x.new_empty((n, h, w, c0 + num * growth_rate))
    inner = params[2].shape[0] if bottleneck else 0
    y1 = x.new_empty((num, n * h * w, inner)) if bottleneck and save else x.new_empty(0)
    stats1 = x.new_empty((2, c0 + num * growth_rate), dtype=sd) if batch_stats else x.new_empty(0, dtype=sd)
    stats2 = (x.new_empty((num, 2, inner), dtype=sd) if batch_stats and bottleneck
              else x.new_empty(0, dtype=sd))
    return buf, y1, stats1, stats2


@torch.library.custom_op("densenet::dense_block_backward", mutates_args=())
def dense_block_backward_op(grad: Tensor, buf: Tensor, y1: Tensor, stats1: Tensor, stats2: Tensor,
                            params: list[Tensor], running: list[Tensor], masks: list[Tensor],
                            growth_rate: int, bottleneck: bool, eps: float, batch_stats: bool,
                            drop_rate: float, channels_last: bool) -> list[Tensor]:
    """The gradients [d input, d params...] of ``dense_block`` from the gradient at its buffer."""
    return _block_backward(grad, buf, y1, stats1, stats2, params, running, masks, growth_rate,
                           bottleneck, eps, batch_stats, drop_rate, channels_last)


@dense_block_backward_op.register_fake
def _(grad, buf, y1, stats1, stats2, params, running, masks, growth_rate, bottleneck, eps,
      batch_stats, drop_rate, channels_last):
    n, h, w, _ = buf.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = buf.new_empty((n, params[0].shape[0], h, w)).contiguous(memory_format=fmt)
    return [dx, *[torch.empty_like(p) for p in params]]


def _block_setup_context(ctx, inputs, output):
    x, params, running, masks, growth_rate, bottleneck, eps, batch_stats, drop_rate, save = inputs
    buf, y1, stats1, stats2 = output
    ctx.save_for_backward(buf, y1, stats1, stats2, *params, *running, *masks)
    ctx.sizes = (len(params), len(running))
    ctx.args = (growth_rate, bottleneck, eps, batch_stats, drop_rate, _channels_last(x))
    ctx.saved = save
    # y1 (every bottleneck output) and the statistics get no gradient: autograd must not
    # materialise zeros of their size for backward
    ctx.set_materialize_grads(False)


def _block_autograd(ctx, grad_buf, grad_y1, grad_stats1, grad_stats2):
    if not ctx.saved:
        raise RuntimeError("densenet::dense_block ran with save=False; call it with save=True "
                           "when a gradient is needed")
    buf, y1, stats1, stats2, *rest = ctx.saved_tensors
    np_, nr = ctx.sizes
    params, running, masks = rest[:np_], rest[np_:np_ + nr], rest[np_ + nr:]
    if grad_buf is None:
        grad_buf = torch.zeros_like(buf)
    dx, *dparams = dense_block_backward_op(grad_buf, buf, y1, stats1, stats2, params, running,
                                           masks, *ctx.args)
    return (dx, dparams, [None] * nr, [None] * (len(ctx.saved_tensors) - 4 - np_ - nr),
            None, None, None, None, None, None)


dense_block_op.register_autograd(_block_autograd, setup_context=_block_setup_context)


def _check_block_args(x, params, running, masks, bottleneck, batch_stats):
    per = _per_layer(bottleneck)
    if x.dim() != 4:
        raise ValueError(f"densenet::dense_block: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if not params or len(params) % per:
        raise ValueError(f"densenet::dense_block: params must hold {per} tensors per layer, got {len(params)}")
    if params[0].shape != (x.shape[1],):
        raise ValueError(f"densenet::dense_block: the first layer's norm weight has {tuple(params[0].shape)} "
                         f"elements, the input {x.shape[1]} channels")
    num = len(params) // per
    if not batch_stats and len(running) != num * (per // 3) * 2:
        raise ValueError(f"densenet::dense_block: running statistics must hold {num * (per // 3) * 2} "
                         f"tensors without batch statistics, got {len(running)}")
    if masks and len(masks) != num * (per // 3):
        raise ValueError(f"densenet::dense_block: masks must be empty or hold {num * (per // 3)} tensors, "
                         f"got {len(masks)}")
    for t in (*params, *running, *masks):
        if t.device != x.device:
            raise ValueError(f"densenet::dense_block: all tensors must be on {x.device}, got one on {t.device}")


# ----------------------------------------------------------------------------- autocast

def _autocast_rule(op, cast_at):
    """Register the autocast rule of ``op`` on CPU and CUDA: the inputs ``cast_at(args, dtype)``
    names (activations and convolution weights) go to the autocast dtype, everything else (BN
    affine parameters and statistics) stays as it is, in float32, and the op runs with autocast
    off, so the products inside it do not cast again."""
    overload = op._opoverload
    name = overload._schema.name.split("::")[1]
    for device in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device)
        key = getattr(torch._C.DispatchKey, key_name)

        def run(*args, _key=key, _device=device):
            args = cast_at(list(args), torch.get_autocast_dtype(_device))
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return overload(*args)

        overload.py_impl(key)(run)
        _lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


def _cast(t, dtype):
    return t.to(dtype) if t.dtype.is_floating_point and t.dtype != dtype else t


def _block_casts(args, dtype):
    x, params, bottleneck = args[0], list(args[1]), args[5]
    per = _per_layer(bottleneck)
    for j in range(len(params)):
        if j % per in (2, 5):  # convolution weights
            params[j] = _cast(params[j], dtype)
    args[0], args[1] = _cast(x, dtype), params
    return args


_lib = torch.library.Library("densenet", "FRAGMENT")  # the autocast registrations


# ----------------------------------------------------------------------------- hooks
# The ops compute modules without calling them, so hooks on those modules would not fire; while
# any is registered, the modules run themselves. The check is a few dict lookups per module.

def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    g = torch.nn.modules.module
    for hooks in (g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks,
                  g._global_backward_pre_hooks):
        if hooks:
            for hook in hooks.values():
                if not _tracker_hook(hook):
                    return True
    return False


def _tracker_hook(hook) -> bool:
    """Whether ``hook`` is one of PyTorch's module trackers' (the ModuleTracker of
    FlopCounterMode, ModTracker, CommDebugMode): they note which module is running, and the ops
    run inside their block's call, so the trackers see them there as they are."""
    return type(getattr(hook, "__self__", None)).__module__.startswith("torch.")


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward(-pre) or backward(-pre) hook fires on calling one of ``modules``: one
    of their own or one registered for every module."""
    return _global_hooks() or any(_own_hooks(m) for m in modules)


def _hooked_within(module: nn.Module) -> bool:
    """Whether a hook fires on calling a module inside ``module`` (its own hooks fire anyway)."""
    return _global_hooks() or _hooks_below(module)


def _hooks_below(module: nn.Module) -> bool:
    for m in module._modules.values():
        if m is not None and (_own_hooks(m) or _hooks_below(m)):
            return True
    return False


# ----------------------------------------------------------------------------- the block module

def _update_running_stats(norms, means, variances, n: int) -> None:
    """What nn.BatchNorm2d does to its buffers in a training step (unbiased running variance),
    for many BNs at once."""
    keep = [i for i, bn in enumerate(norms) if bn.training and bn.track_running_stats]
    if not keep:
        return
    norms = [norms[i] for i in keep]
    means = [means[i] for i in keep]
    unbiased = torch._foreach_mul([variances[i] for i in keep], n / max(n - 1, 1))
    torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
    momenta = {bn.momentum for bn in norms}
    if None not in momenta and len(momenta) == 1:
        mom = momenta.pop()
        rm = [bn.running_mean for bn in norms]
        rv = [bn.running_var for bn in norms]
        torch._foreach_mul_(rm, 1 - mom)
        torch._foreach_add_(rm, means, alpha=mom)
        torch._foreach_mul_(rv, 1 - mom)
        torch._foreach_add_(rv, unbiased, alpha=mom)
        return
    for bn, mean, var in zip(norms, means, unbiased):
        mom = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - mom).add_(mean, alpha=mom)
        bn.running_var.mul_(1 - mom).add_(var, alpha=mom)


def _norms(block):
    for layer in block.values():
        yield layer.norm1
        if layer.bottleneck:
            yield layer.norm2


def _supported(block, x: torch.Tensor) -> bool:
    """Whether the op computes ``block`` on ``x`` as the plain modules do (else they run)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if x.dim() != 4 or x.is_sparse or x.device.type == "meta" or not x.dtype.is_floating_point:
        return False
    if _hooked_within(block):
        return False
    norms = list(_norms(block))
    if any(type(bn) is not nn.BatchNorm2d or not bn.affine for bn in norms):
        return False
    if len({bn.eps for bn in norms}) != 1 or len({_uses_batch_stats(bn) for bn in norms}) != 1:
        return False  # the shared statistics assume one eps and one mode per block
    bottleneck = next(iter(block.values())).bottleneck
    for layer in block.values():
        if layer.bottleneck != bottleneck:
            return False
        for conv, size in ((layer.conv1, 1 if bottleneck else 3), (getattr(layer, "conv2", None), 3)):
            if conv is not None and (conv.bias is not None or conv.groups != 1 or conv.stride != (1, 1)
                                     or conv.dilation != (1, 1) or conv.padding_mode != "zeros"
                                     or conv.kernel_size != (size, size) or conv.padding != (size // 2,) * 2):
                return False
    return True


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    # the same rule as nn.BatchNorm2d.forward
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dense_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """Forward of ``block`` (a ``DenseBlock``) on ``x`` through the ``densenet::dense_block``
    op; the same result, gradients and running statistics as the plain modules."""
    if not _supported(block, x):
        return _reference_forward(block, x)
    layers = list(block.values())
    bottleneck = layers[0].bottleneck
    norms = list(_norms(block))
    batch_stats = _uses_batch_stats(norms[0])
    params, running, masks = [], [], []
    drops = {layer.drop_rate if layer.training else 0.0 for layer in layers}
    if len(drops) != 1:
        return _reference_forward(block, x)
    drop = drops.pop()
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    n, _, h, w = x.shape
    dtype = _compute_dtype(x)
    for layer in layers:
        params += _layer_params(layer)
        if not batch_stats:
            for bn in ((layer.norm1, layer.norm2) if bottleneck else (layer.norm1,)):
                running += [bn.running_mean, bn.running_var]
        if drop > 0:
            # the masks F.dropout would draw, in the same order, dtype and layout: the same seed
            # gives the same masks as the plain modules
            if bottleneck:
                masks.append(_dropout_mask(drop, (n, layer.conv1.out_channels, h, w), x, dtype, fmt))
            masks.append(_dropout_mask(drop, (n, block.growth_rate, h, w), x, dtype, fmt))
    save = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    buf, _, stats1, stats2 = dense_block_op(x, params, running, masks, block.growth_rate, bottleneck,
                                            norms[0].eps, batch_stats, float(drop), save)
    if batch_stats:
        s1, s2 = stats1.detach(), stats2.detach()
        c0, k = x.shape[1], block.growth_rate
        means, variances = [], []
        for i in range(len(layers)):
            means.append(s1[0, :c0 + i * k])
            variances.append(s1[1, :c0 + i * k])
            if bottleneck:
                means.append(s2[i, 0])
                variances.append(s2[i, 1])
        _update_running_stats(norms, means, variances, n * h * w)
    out = buf.permute(0, 3, 1, 2)
    return out if fmt is torch.channels_last else out.contiguous()


def _dropout_mask(p: float, shape, x: torch.Tensor, dtype, fmt) -> torch.Tensor:
    noise = torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)
    return noise.bernoulli_(1 - p) != 0


def _reference_forward(block, x):
    for layer in block.values():
        x = torch.cat([x, layer(x)], 1)
    return x


def _layer_params(layer) -> list[torch.Tensor]:
    p = [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
    if layer.bottleneck:
        p += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    return p


# ----------------------------------------------------------------------------- outside the blocks
# BN-ReLU and the functions around it (the ImageNet stem, the transitions, the final BN-ReLU),
# each an op of the same kind: the input is all that backward keeps.

def _bn_terms(X, gamma, beta, stats, running, eps, batch_stats):
    """(mean, rstd, scale, shift) a BN normalises the rows ``X`` with."""
    if batch_stats:
        mean, rstd = stats[0], torch.rsqrt(stats[1] + eps)
    else:
        mean, rstd = running[0], torch.rsqrt(running[1] + eps)
    scale = gamma * rstd
    return mean, rstd, scale, beta - mean * scale


def _batch_stats_of(X, n, h, w, eps, batch_stats):
    """The (2, C) batch (mean, biased variance) of the rows X, or an empty tensor."""
    sd = _stat_dtype(X.dtype)
    if not batch_stats:
        return X.new_empty(0, dtype=sd)
    mean, var = _col_stats(X, eps, n, h, w)
    return torch.stack([mean.to(sd), var.to(sd)])


def _layout(x: torch.Tensor):
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def _empty_like_layout(x, shape, dtype=None):
    return x.new_empty(shape, dtype=dtype).contiguous(memory_format=_layout(x))


def _bn_grad_end(X, G, sums, mean, rstd, scale, shift, batch_stats, out, shape, fmt, tmp=None):
    """From the gradient G at a BN-ReLU's output (or g', already masked) and the float64 sums of
    g' and (x - mean) * g': out = BN's input gradient; returns [dx in the input's shape and
    layout, dgamma, dbeta]."""
    n, c, h, w = shape
    m = n * h * w
    sum_g, sum_xg = sums.to(_stat_dtype(X.dtype))
    dgamma = sum_xg * rstd
    if batch_stats:
        a, b = sum_g / m, dgamma * rstd / m
    else:
        a = b = torch.zeros_like(sum_g)
    dx = _nchw(_bn_grad_apply(X, G, scale, shift, mean, a, b, tmp, out=out), n, h, w)
    return [dx.contiguous(memory_format=fmt), dgamma, sum_g]


def _bn_input_grad(X, dX, sums, mean, rstd, scale, batch_stats, shape, fmt):
    """From dX = g' * scale and the float64 sums of g' and (x - mean) * g', BN's two
    batch-statistics corrections applied in place, dx -= scale * (mean(g') + xhat * mean(g' xhat));
    returns [dx in the input's layout, dgamma, dbeta]."""
    n, c, h, w = shape
    m = n * h * w
    dbeta, sum_xg = sums.to(_stat_dtype(X.dtype))
    dgamma = sum_xg * rstd
    if batch_stats:
        b = scale * rstd * dgamma / m
        _affine_add(X, -b, b * mean - scale * dbeta / m, dX, dX)
    return [_nchw(dX, n, h, w).contiguous(memory_format=fmt), dgamma, dbeta]


# --- relu(bn(x))

@torch.library.custom_op("densenet::bn_relu", mutates_args=())
def bn_relu_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
               batch_stats: bool) -> tuple[Tensor, Tensor]:
    """relu(bn(x)) and the batch statistics (2, C) it used (empty with running statistics)."""
    n, c, h, w = x.shape
    X = _rows(x)
    stats = _batch_stats_of(X, n, h, w, eps, batch_stats)
    _, _, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    out = kernels.huge_empty((n * h * w, c), X)
    _bn_relu(X, scale, shift, out)
    return _nchw(out, n, h, w).contiguous(memory_format=_layout(x)), stats


@bn_relu_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats):
    sd = _stat_dtype(x.dtype)
    return (_empty_like_layout(x, x.shape),
            x.new_empty((2, x.shape[1]) if batch_stats else (0,), dtype=sd))


@torch.library.custom_op("densenet::bn_relu_backward", mutates_args=())
def bn_relu_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                        running: list[Tensor], eps: float, batch_stats: bool) -> list[Tensor]:
    X = _rows(x)
    mean, rstd, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    dY = _rows(grad)
    if not _fused(X):
        dY = dY.clone()  # the torch-op path masks it in place: never the caller's gradient
    tmp = None if _fused(X) else torch.empty_like(X)
    sums = _bn_relu_grad(X, dY, scale, shift, mean, tmp)
    return _bn_grad_end(X, dY, sums, mean, rstd, scale, shift, batch_stats,
                        kernels.huge_empty(X.shape, X), x.shape, _layout(x), tmp)


@bn_relu_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats):
    return [_empty_like_layout(x, x.shape), torch.empty_like(gamma), torch.empty_like(beta)]


def _bn_setup(ctx, inputs, output):
    x, gamma, beta, running, eps, batch_stats = inputs[:6]
    ctx.save_for_backward(x, gamma, beta, output[1], *running)
    ctx.args = (eps, batch_stats)


def _bn_relu_autograd(ctx, grad, _):
    x, gamma, beta, stats, *running = ctx.saved_tensors
    dx, dgamma, dbeta = bn_relu_backward_op(grad, x, gamma, beta, stats, running, *ctx.args)
    return dx, dgamma, dbeta, [None] * len(running), None, None


bn_relu_op.register_autograd(_bn_relu_autograd, setup_context=_bn_setup)


# --- maxpool(relu(bn(x))): the ImageNet stem, one pass with the fused kernels

@torch.library.custom_op("densenet::bn_relu_maxpool", mutates_args=())
def bn_relu_maxpool_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
                       batch_stats: bool, kernel: list[int], stride: list[int],
                       padding: list[int]) -> tuple[Tensor, Tensor]:
    """maxpool(relu(bn(x))) with the fused CPU kernels. Max pooling commutes with the monotone
    ReLU, so one pass over x gives the output: neither the BN-ReLU output (4x the output's size)
    nor pooling indices are stored; backward finds each window's maximum again from x."""
    n, c, h, w = x.shape
    X = _rows(x)
    stats = _batch_stats_of(X, n, h, w, eps, batch_stats)
    _, _, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    oh, ow = _pooled_size(h, w, kernel, stride, padding)
    out = kernels.bn_relu_maxpool(X.view(n, h, w, c), scale, shift, kernel, stride, padding,
                                  kernels.huge_empty((n, oh, ow, c), X))
    return out.permute(0, 3, 1, 2).contiguous(memory_format=_layout(x)), stats


@bn_relu_maxpool_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats, kernel, stride, padding):
    n, c, h, w = x.shape
    oh, ow = _pooled_size(h, w, kernel, stride, padding)
    return (_empty_like_layout(x, (n, c, oh, ow)),
            x.new_empty((2, c) if batch_stats else (0,), dtype=_stat_dtype(x.dtype)))


@torch.library.custom_op("densenet::bn_relu_maxpool_backward", mutates_args=())
def bn_relu_maxpool_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                                running: list[Tensor], eps: float, batch_stats: bool,
                                kernel: list[int], stride: list[int], padding: list[int]) -> list[Tensor]:
    n, c, h, w = x.shape
    X = _rows(x)
    mean, rstd, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    G = kernels.huge_empty(X.shape, X)  # g', all of it written by the kernel
    sums = kernels.bn_relu_maxpool_grad(X.view(n, h, w, c), scale, shift, mean, kernel, stride, padding,
                                        grad.permute(0, 2, 3, 1).contiguous(), G.view(n, h, w, c))
    return _bn_grad_end(X, G, sums, mean, rstd, scale, shift, batch_stats, G, x.shape, _layout(x))


@bn_relu_maxpool_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats, kernel, stride, padding):
    return [_empty_like_layout(x, x.shape), torch.empty_like(gamma), torch.empty_like(beta)]


def _bn_relu_maxpool_setup(ctx, inputs, output):
    _bn_setup(ctx, inputs, output)
    ctx.args = (*ctx.args, *inputs[6:9])


def _bn_relu_maxpool_autograd(ctx, grad, _):
    x, gamma, beta, stats, *running = ctx.saved_tensors
    dx, dgamma, dbeta = bn_relu_maxpool_backward_op(grad, x, gamma, beta, stats, running, *ctx.args)
    return dx, dgamma, dbeta, [None] * len(running), None, None, None, None, None


bn_relu_maxpool_op.register_autograd(_bn_relu_maxpool_autograd, setup_context=_bn_relu_maxpool_setup)


def _pooled_size(h: int, w: int, kernel, stride, padding):
    return ((h + 2 * padding[0] - kernel[0]) // stride[0] + 1,
            (w + 2 * padding[1] - kernel[1]) // stride[1] + 1)


# --- conv1x1(relu(bn(x))), and avgpool(conv1x1(relu(bn(x)))) computed as conv1x1(avgpool(...))

@torch.library.custom_op("densenet::bn_relu_conv", mutates_args=())
def bn_relu_conv_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
                    batch_stats: bool, weight: Tensor) -> tuple[Tensor, Tensor]:
    """conv1x1(relu(bn(x))), row chunk by row chunk: neither the BN output nor the ReLU output
    is ever stored (backward recomputes them the same way)."""
    n, c, h, w = x.shape
    m = n * h * w
    X = _rows(x)  # a view of channels-last input
    stats = _batch_stats_of(X, n, h, w, eps, batch_stats)
    _, _, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    Y = kernels.huge_empty((m, weight.shape[0]), X)
    rows = _chunk_rows(X, m)
    scratch = X.new_empty(rows * c)
    for lo in range(0, m, rows):
        hi = min(lo + rows, m)
        _product(_bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c)), weight, Y[lo:hi])
    return _nchw(Y, n, h, w).contiguous(memory_format=_layout(x)), stats


@bn_relu_conv_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats, weight):
    n, c, h, w = x.shape
    return (_empty_like_layout(x, (n, weight.shape[0], h, w)),
            x.new_empty((2, c) if batch_stats else (0,), dtype=_stat_dtype(x.dtype)))


@torch.library.custom_op("densenet::bn_relu_conv_backward", mutates_args=())
def bn_relu_conv_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                             running: list[Tensor], eps: float, batch_stats: bool,
                             weight: Tensor) -> list[Tensor]:
    n, c, h, w = x.shape
    m = n * h * w
    X = _rows(x)
    mean, rstd, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    w2d = weight.view(weight.shape[0], c)
    dY = _rows(grad)
    dX = kernels.huge_empty(X.shape, X)  # written (not added to) by the first pass
    dw = None
    sums = torch.zeros(2, c, dtype=torch.float64, device=X.device)
    rows = _chunk_rows(X, m)
    scratch = X.new_empty(rows * c)
    gscratch = X.new_empty(rows * c)
    for lo in range(0, m, rows):
        hi = min(lo + rows, m)
        z = scratch[: (hi - lo) * c].view(hi - lo, c)
        g = torch.mm(dY[lo:hi], w2d, out=gscratch[: (hi - lo) * c].view(hi - lo, c))
        _bn_relu_grad(X[lo:hi], g, scale, shift, mean, None, dx=dX[lo:hi], sums=sums, z=z, assign=True)
        dw = _weight_grad(dY[lo:hi], z, weight, dw)
    dx, dgamma, dbeta = _bn_input_grad(X, dX, sums, mean, rstd, scale, batch_stats, x.shape, _layout(x))
    return [dx, dgamma, dbeta, _like(dw.view_as(weight), weight)]


@bn_relu_conv_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats, weight):
    return [_empty_like_layout(x, x.shape), torch.empty_like(gamma), torch.empty_like(beta),
            torch.empty_like(weight)]


def _conv_setup(ctx, inputs, output):
    x, gamma, beta, running, eps, batch_stats, weight = inputs[:7]
    ctx.save_for_backward(x, gamma, beta, output[1], weight, *running)
    ctx.args = (eps, batch_stats)
    ctx.pool = tuple(inputs[7:])


def _bn_relu_conv_autograd(ctx, grad, _):
    x, gamma, beta, stats, weight, *running = ctx.saved_tensors
    dx, dgamma, dbeta, dw = bn_relu_conv_backward_op(grad, x, gamma, beta, stats, running,
                                                     *ctx.args, weight)
    return dx, dgamma, dbeta, [None] * len(running), None, None, dw


bn_relu_conv_op.register_autograd(_bn_relu_conv_autograd, setup_context=_conv_setup)


def _image_chunks(n: int, h: int, w: int, t: torch.Tensor):
    """Chunks of whole images (for the pooling) of at most ``_chunk_rows`` rows, or one image:
    a list of (first image, end image)."""
    per = max(1, _chunk_rows(t, n * h * w) // (h * w))
    return [(i, min(i + per, n)) for i in range(0, n, per)]


def _avg_pool(z, kernel, stride, padding, ceil_mode, count_include_pad):
    return F.avg_pool2d(z, kernel, stride, padding, ceil_mode, count_include_pad)


@torch.library.custom_op("densenet::bn_relu_pool_conv", mutates_args=())
def bn_relu_pool_conv_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
                         batch_stats: bool, weight: Tensor, kernel: list[int], stride: list[int],
                         padding: list[int], ceil_mode: bool, count_include_pad: bool) -> tuple[Tensor, Tensor]:
    """avgpool(conv1x1(relu(bn(x)))) as conv1x1(avgpool(relu(bn(x)))): a bias-free 1x1
    convolution and average pooling are both linear, one across channels, the other within each
    channel, so they commute, and pooling first does a quarter of the convolution's work.
    BN-ReLU and the pooling run a chunk of whole images at a time (recomputed in backward)."""
    n, c, h, w = x.shape
    X = _rows(x)
    stats = _batch_stats_of(X, n, h, w, eps, batch_stats)
    _, _, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    chunks = _image_chunks(n, h, w, X)
    scratch = X.new_empty((chunks[0][1] - chunks[0][0]) * h * w * c)
    outs = []
    for i0, i1 in chunks:
        lo, hi = i0 * h * w, i1 * h * w
        z = _bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c))
        pooled = _avg_pool(_nchw(z, i1 - i0, h, w), kernel, stride, padding, ceil_mode, count_include_pad)
        outs.append(F.conv2d(pooled, weight))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.contiguous(memory_format=_layout(x)), stats


@bn_relu_pool_conv_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats, weight, kernel, stride, padding, ceil_mode,
      count_include_pad):
    n, c, h, w = x.shape
    pooled = F.avg_pool2d(x.new_empty((1, 1, h, w)), kernel, stride, padding, ceil_mode, count_include_pad)
    return (_empty_like_layout(x, (n, weight.shape[0], *pooled.shape[2:])),
            x.new_empty((2, c) if batch_stats else (0,), dtype=_stat_dtype(x.dtype)))


@torch.library.custom_op("densenet::bn_relu_pool_conv_backward", mutates_args=())
def bn_relu_pool_conv_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                                  running: list[Tensor], eps: float, batch_stats: bool, weight: Tensor,
                                  kernel: list[int], stride: list[int], padding: list[int],
                                  ceil_mode: bool, count_include_pad: bool) -> list[Tensor]:
    n, c, h, w = x.shape
    X = _rows(x)
    mean, rstd, scale, shift = _bn_terms(X, gamma, beta, stats, running, eps, batch_stats)
    pool_args = (kernel, stride, padding, ceil_mode, count_include_pad, None)
    dX = kernels.huge_empty(X.shape, X)  # written (not added to), chunk by chunk
    dw = None
    sums = torch.zeros(2, c, dtype=torch.float64, device=X.device)
    chunks = _image_chunks(n, h, w, X)
    scratch = X.new_empty((chunks[0][1] - chunks[0][0]) * h * w * c)
    for i0, i1 in chunks:
        lo, hi = i0 * h * w, i1 * h * w
        z = _bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c))
        zimg = _nchw(z, i1 - i0, h, w)
        dzp, dwc, _ = torch.ops.aten.convolution_backward(
            grad[i0:i1], _avg_pool(zimg, *pool_args[:5]), weight, None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [True, True, False])
        dw = dwc if dw is None else dw.add_(dwc)
        g = _rows(torch.ops.aten.avg_pool2d_backward(dzp, zimg, *pool_args))  # a new tensor
        _bn_relu_grad(X[lo:hi], g, scale, shift, mean, z, dx=dX[lo:hi], sums=sums, assign=True)
    dx, dgamma, dbeta = _bn_input_grad(X, dX, sums, mean, rstd, scale, batch_stats, x.shape, _layout(x))
    return [dx, dgamma, dbeta, _like(dw, weight)]


@bn_relu_pool_conv_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats, weight, kernel, stride, padding,
      ceil_mode, count_include_pad):
    return [_empty_like_layout(x, x.shape), torch.empty_like(gamma), torch.empty_like(beta),
            torch.empty_like(weight)]


def _bn_relu_pool_conv_autograd(ctx, grad, _):
    x, gamma, beta, stats, weight, *running = ctx.saved_tensors
    dx, dgamma, dbeta, dw = bn_relu_pool_conv_backward_op(grad, x, gamma, beta, stats, running,
                                                          *ctx.args, weight, *ctx.pool)
    return dx, dgamma, dbeta, [None] * len(running), None, None, dw, None, None, None, None, None


bn_relu_pool_conv_op.register_autograd(_bn_relu_pool_conv_autograd, setup_context=_conv_setup)


# ----------------------------------------------------------------------------- autocast rules

def _keep(args, dtype):
    return args


def _cast_x_weight(args, dtype):
    args[0], args[6] = _cast(args[0], dtype), _cast(args[6], dtype)
    return args


for _op, _rule in [(dense_block_op, _block_casts), (dense_block_backward_op, _keep),
                   (bn_relu_op, _keep), (bn_relu_backward_op, _keep),
                   (bn_relu_maxpool_op, _keep), (bn_relu_maxpool_backward_op, _keep),
                   (bn_relu_conv_op, _cast_x_weight), (bn_relu_conv_backward_op, _keep),
                   (bn_relu_pool_conv_op, _cast_x_weight), (bn_relu_pool_conv_backward_op, _keep)]:
    _autocast_rule(_op, _rule)


# ----------------------------------------------------------------------------- the modules' forwards

def _bn_ok(norm, x: torch.Tensor) -> bool:
    """Whether BN ``norm`` on ``x`` can run as one of the ops (else the module runs as it is)."""
    return (not (torch.jit.is_scripting() or torch.jit.is_tracing()) and x.dim() == 4
            and not x.is_sparse and x.device.type != "meta" and x.dtype.is_floating_point
            and type(norm) is nn.BatchNorm2d and norm.affine)


def _bn_inputs(norm):
    """(running statistics to normalise with, whether batch statistics are used)."""
    batch = _uses_batch_stats(norm)
    return ([] if batch else [norm.running_mean, norm.running_var]), batch


def _after_bn(norm, x, stats, batch: bool) -> None:
    if batch:
        s = stats.detach()
        _update_running_stats([norm], [s[0]], [s[1]], x.shape[0] * x.shape[2] * x.shape[3])


def features_forward(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``relu(features(x))`` of a DenseNet, with each BatchNorm2d that a ReLU follows (the
    ImageNet stem's norm0/relu0, and norm5 with the final ReLU) run as the ``bn_relu`` op: its
    output goes into huge-page memory, and backward reads only the BN input. With the fused
    kernels, the ImageNet stem's BN-ReLU-max-pooling is the one-pass ``bn_relu_maxpool`` op."""
    x = inference_layout(features, x)
    if _hooked(features):
        return F.relu(features(x))
    return children_forward(list(features.children()), x)


def inference_layout(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout the efficient path computes ``features`` in: channels-last for CPU
    inference, else as it is."""
    if not features.training and x.dim() == 4 and x.device.type == "cpu" and not torch.jit.is_tracing():
        # inference: the blocks keep their maps channels-last, and an NCHW input would make
        # every convolution and transition read and write NCHW copies (fresh memory, page
        # faults; 0.55-0.7x the speed, measured at batch 250-500). Training keeps the input's
        # layout, so that dropout draws its masks in the plain modules' layout and order.
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def children_forward(mods: list[nn.Module], x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Consecutive children ``mods`` of a DenseNet's ``features`` applied to ``x``, then a ReLU
    if ``relu``; BN-ReLU (and the stem's BN-ReLU-max-pooling) as in :func:`features_forward`."""
    i = 0
    while i < len(mods):
        mod = mods[i]
        last = i == len(mods) - 1
        if (type(mod) is nn.BatchNorm2d and i + 2 < len(mods) and type(mods[i + 1]) is nn.ReLU
                and _maxpool_fusable(mods[i + 2], x) and _bn_ok(mod, x) and _fused(x)
                and not _hooked(*mods[i:i + 3])):
            x = bn_relu_maxpool_forward(mod, mods[i + 2], x)
            i += 3
        elif (type(mod) is nn.BatchNorm2d and _bn_ok(mod, x)
                and (relu if last else type(mods[i + 1]) is nn.ReLU)
                and not _hooked(*mods[i:i + 2])):
            x = bn_relu_forward(mod, x)
            if last:
                return x
            i += 2
        else:
            x = mod(x)
            i += 1
    return F.relu(x) if relu else x


def bn_relu_forward(norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """relu(norm(x)), with nn.BatchNorm2d's running-statistics update."""
    running, batch = _bn_inputs(norm)
    out, stats = bn_relu_op(x, norm.weight, norm.bias, running, norm.eps, batch)
    _after_bn(norm, x, stats, batch)
    return out


def bn_relu_maxpool_forward(norm: nn.BatchNorm2d, pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """pool(relu(norm(x))) (the ImageNet stem after its convolution) with the fused kernels."""
    pair = torch.nn.modules.utils._pair
    running, batch = _bn_inputs(norm)
    out, stats = bn_relu_maxpool_op(x, norm.weight, norm.bias, running, norm.eps, batch,
                                    list(pair(pool.kernel_size)), list(pair(pool.stride)),
                                    list(pair(pool.padding)))
    _after_bn(norm, x, stats, batch)
    return out


def _maxpool_fusable(pool, x: torch.Tensor) -> bool:
    """A max pooling the fused stem kernel computes as ``F.max_pool2d`` does (else the module
    runs, and raises its own errors for invalid settings)."""
    if (type(pool) is not nn.MaxPool2d or pool.return_indices or pool.ceil_mode
            or torch.nn.modules.utils._pair(pool.dilation) != (1, 1)):
        return False
    pair = torch.nn.modules.utils._pair
    k, s, p = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
    if not all(kk > 0 and ss > 0 and 0 <= pp <= kk // 2 for kk, ss, pp in zip(k, s, p)):
        return False
    return min(_pooled_size(*x.shape[2:], k, s, p)) >= 1


def transition_forward(trans, x: torch.Tensor) -> torch.Tensor:
    """Forward of a ``Transition`` (BN-ReLU-Conv1x1 [dropout] AvgPool): the BN-ReLU-Conv1x1
    part as one op that recomputes BN-ReLU in backward, like the block's layers; without
    active dropout, with the pooling before the convolution (``bn_relu_pool_conv``)."""
    norm, conv, pool = trans.norm, trans.conv, trans.pool
    if (not _bn_ok(norm, x) or _hooked_within(trans) or conv.bias is not None
            or conv.groups != 1 or conv.kernel_size != (1, 1) or conv.stride != (1, 1)
            or conv.padding != (0, 0) or conv.dilation != (1, 1)):
        return nn.Sequential.forward(trans, x)
    running, batch = _bn_inputs(norm)
    pair = torch.nn.modules.utils._pair
    if type(pool) is nn.AvgPool2d and pool.divisor_override is None and not _dropout_active(trans):
        out, stats = bn_relu_pool_conv_op(x, norm.weight, norm.bias, running, norm.eps, batch,
                                          conv.weight, list(pair(pool.kernel_size)),
                                          list(pair(pool.stride)), list(pair(pool.padding)),
                                          pool.ceil_mode, pool.count_include_pad)
        _after_bn(norm, x, stats, batch)
        return out
    y, stats = bn_relu_conv_op(x, norm.weight, norm.bias, running, norm.eps, batch, conv.weight)
    _after_bn(norm, x, stats, batch)
    if hasattr(trans, "drop"):
        y = trans.drop(y)
    return pool(y)


def _dropout_active(trans) -> bool:
    drop = getattr(trans, "drop", None)
    return drop is not None and drop.training and drop.p > 0


# ----------------------------------------------------------------------------- FLOP counts
# So that torch.utils.flop_counter.FlopCounterMode counts the ops' convolutions (2 FLOPs per
# multiply-add; backward: the input and weight gradients, twice the forward).

def _conv_flops(m: int, w_shape) -> int:
    co, ci, kh, kw = w_shape
    return 2 * m * co * ci * kh * kw


def _block_flops(x_shape, params, bottleneck):
    n, _, h, w = x_shape
    per = _per_layer(bottleneck)
    return sum(_conv_flops(n * h * w, s) for j, s in enumerate(params) if j % per in (2, 5))


@register_flop_formula(torch.ops.densenet.dense_block)
def _(x_shape, params, *args, out_shape=None, **kwargs) -> int:
    return _block_flops(x_shape, params, args[3])


@register_flop_formula(torch.ops.densenet.dense_block_backward)
def _(grad_shape, buf_shape, y1, s1, s2, params, running, masks, growth_rate, bottleneck, *args,
      out_shape=None, **kwargs) -> int:
    n, h, w, _ = buf_shape
    return 2 * _block_flops((n, 0, h, w), params, bottleneck)


@register_flop_formula([torch.ops.densenet.bn_relu_conv, torch.ops.densenet.bn_relu_pool_conv])
def _(x_shape, gamma, beta, running, eps, batch_stats, w_shape, *args, out_shape=None, **kwargs) -> int:
    n, _, h, w = out_shape[0]
    return _conv_flops(n * h * w, w_shape)


@register_flop_formula([torch.ops.densenet.bn_relu_conv_backward,
                        torch.ops.densenet.bn_relu_pool_conv_backward])
def _(grad_shape, x_shape, gamma, beta, stats, running, eps, batch_stats, w_shape, *args,
      out_shape=None, **kwargs) -> int:
    n, _, h, w = grad_shape
    return 2 * _conv_flops(n * h * w, w_shape)
