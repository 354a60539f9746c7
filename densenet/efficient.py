"""The memory-efficient dense block: one shared feature buffer, BN-ReLU recomputed in backward.

A plain dense block (``DenseBlock`` with ``implementation="reference"``) concatenates all earlier
maps for every layer and autograd keeps every concatenation and every BN output alive until
backward, so training memory grows quadratically with depth. Here the whole
block is one autograd function (after Pleiss et al. 2017, arXiv 1707.06990):

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
  Where the kernels are unavailable (CUDA, no C compiler) the same steps use torch ops.
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

Cases the function does not cover (bf16 autocast, torch.compile / tracing / scripting, a
SyncBatchNorm or BN without affine parameters, non-BatchNorm2d norms) run the reference path,
which gives the same results.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels


def release_buffers() -> int:
    """Free the pooled CPU buffers of this path that no tensor uses any more (bytes freed)."""
    return kernels.release_buffers()


def _eager_ok(x: torch.Tensor) -> bool:
    """Our autograd functions run on ``x``: eager mode (no scripting, tracing, compiling), a
    dense 4-D floating-point tensor with data, no autocast (else the plain modules run)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if x.dim() != 4 or x.is_sparse or x.is_meta or not x.dtype.is_floating_point:
        return False
    return not torch.is_autocast_enabled(x.device.type)


def _supported(block, x: torch.Tensor) -> bool:
    if not _eager_ok(x):
        return False
    if len({layer.norm1.eps for layer in block.values()}) != 1:
        return False  # the shared per-channel statistics assume one eps per block
    for layer in block.values():
        for name in ("norm1", "norm2"):
            bn = getattr(layer, name, None)
            if bn is not None and (type(bn) is not nn.BatchNorm2d or not bn.affine):
                return False
        for conv in (layer.conv1, getattr(layer, "conv2", None)):
            if conv is not None and (conv.bias is not None or conv.groups != 1 or conv.stride != (1, 1)
                                     or conv.dilation != (1, 1) or conv.padding_mode != "zeros"):
                return False
    return True


def dense_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """Forward of ``block`` (a ``DenseBlock``) on ``x``; same result as the reference path."""
    if not _supported(block, x):
        return _reference_forward(block, x)
    layers = list(block.values())
    params = []
    for layer in layers:
        params += _layer_params(layer)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _DenseBlockFunction.apply(block, x, *params)
    with torch.no_grad():
        out, _ = _forward(block, layers, x, save=False)
    return out


def _reference_forward(block, x):
    features = [x]
    for layer in block.values():
        features.append(layer(features))
    return torch.cat(features, 1)


def _layer_params(layer) -> list[torch.Tensor]:
    p = [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
    if layer.bottleneck:
        p += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    return p


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    # the same rule as nn.BatchNorm2d.forward
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _update_running_stats(bn: nn.BatchNorm2d, mean, var, n: int) -> None:
    """What nn.BatchNorm2d does to its buffers in a training step (unbiased running variance)."""
    if not (bn.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    bn.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)


def _stats(bn: nn.BatchNorm2d, batch_mean, batch_var):
    """(mean, inverse std) this BN normalises with: the batch's in training, else running."""
    if _uses_batch_stats(bn):
        return batch_mean, torch.rsqrt(batch_var + bn.eps)
    return bn.running_mean, torch.rsqrt(bn.running_var + bn.eps)


def _batch_mean_var(x4d: torch.Tensor, eps: float):
    """Per-channel batch mean and biased variance, by the BatchNorm kernel's own statistics
    pass: var_mean over dims (0, 2, 3) was 8% of a training step, this is several times faster
    on channels-last input."""
    _, mean, invstd = torch.native_batch_norm(x4d, None, None, None, None, True, 0.0, eps)
    return mean, invstd.pow(-2).sub_(eps)


def _fused(t: torch.Tensor) -> bool:
    """Use the compiled CPU kernels (kernels.py) for ``t``; else the torch ops below."""
    return kernels.available(t)


def _col_stats(rows: torch.Tensor, eps: float, n: int, h: int, w: int):
    """Per-channel batch (mean, biased variance) of an (N*H*W, C) matrix."""
    if _fused(rows):
        return kernels.col_stats(rows)
    return _batch_mean_var(_nchw(rows, n, h, w), eps)


def _bn_relu(x: torch.Tensor, scale, shift, out: torch.Tensor) -> torch.Tensor:
    """out = relu(x * scale + shift): BN with folded statistics, then ReLU, one pass."""
    if _fused(x):
        return kernels.bn_relu(x, scale, shift, out)
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
    if assign and dx is not None:
        dx.zero_()
    if z is not None:
        _bn_relu(x, scale, shift, z)
        tmp = x.new_empty(x.shape)
    g.mul_(torch.addcmul(shift, x, scale, out=tmp).relu_().sign_())
    sums[0] += g.sum(0)
    sums[1] += torch.sub(x, mean, out=tmp).mul_(g).sum(0)
    if dx is not None:
        dx.addcmul_(g, scale)
    return sums


def _affine_add(x, coef, const, src, out):
    """out = src + x * coef + const, per channel (``out`` may be ``src``)."""
    if _fused(x):
        return kernels.col_affine_add(x, coef, const, src, out)
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


def _dropout_noise(layer, shape, like: torch.Tensor, fmt):
    """The mask F.dropout draws: same RNG calls, shape and layout, so the same seed gives the
    same mask as the reference path. Returns the scaled noise (0 or 1/(1-p))."""
    p = layer.drop_rate
    noise = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    noise.bernoulli_(1 - p)
    return noise.div_(1 - p)


def _forward(block, layers, x: torch.Tensor, save: bool):
    n, c0, h, w = x.shape
    k = block.growth_rate
    num = len(layers)
    c_total = c0 + num * k
    m = n * h * w
    # Dropout noise is drawn in the layout the reference path's convolutions produce.
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    buf = kernels.huge_empty((n, h, w, c_total), x)
    buf[..., :c0].copy_(x.permute(0, 2, 3, 1))
    X = buf.view(m, c_total)

    batch_stats = any(_uses_batch_stats(layer.norm1) for layer in layers)
    eps = layers[0].norm1.eps
    mean_all = var_all = None
    if batch_stats:
        mean_all = x.new_empty(c_total)
        var_all = x.new_empty(c_total)
        mean_all[:c0], var_all[:c0] = _col_stats(X[:, :c0], eps, n, h, w)

    bottleneck = layers[0].bottleneck
    inner = layers[0].conv1.out_channels
    rows = _chunk_rows(x, m) if bottleneck else m
    scratch = x.new_empty(rows * (c0 + (num - 1) * k))  # BN-ReLU'd input of the current layer
    if bottleneck:
        y1_store = kernels.huge_empty((num if save else 1, m, inner), x)
        z2 = kernels.huge_empty((m, inner), x)
    saved = []
    for i, layer in enumerate(layers):
        c_in = c0 + i * k
        norm1 = layer.norm1
        if batch_stats:
            _update_running_stats(norm1, mean_all[:c_in], var_all[:c_in], m)
        mean1, rstd1 = _stats(norm1, mean_all[:c_in] if batch_stats else None,
                              var_all[:c_in] if batch_stats else None)
        scale1 = norm1.weight * rstd1
        shift1 = norm1.bias - mean1 * scale1

        rec = {"mean1": mean1, "rstd1": rstd1}
        if bottleneck:
            y1 = y1_store[i if save else 0]
            drop1 = layer.drop_rate > 0 and layer.training
            # BN2's batch statistics gathered chunk by chunk while each y1 chunk is in cache
            state = (kernels.stats_state(inner) if _fused(y1) and not drop1
                     and _uses_batch_stats(layer.norm2) else None)
            for lo in range(0, m, rows):
                hi = min(lo + rows, m)
                z = _bn_relu(X[lo:hi, :c_in], scale1, shift1, scratch[: (hi - lo) * c_in].view(hi - lo, c_in))
                _product(z, layer.conv1.weight, y1[lo:hi])
                if state is not None:
                    kernels.col_stats(y1[lo:hi], state)
            if drop1:
                noise = _dropout_noise(layer, (n, inner, h, w), x, fmt)
                _nchw(y1, n, h, w).mul_(noise)
                rec["mask1"] = noise != 0
            mean2, rstd2, scale2, shift2 = _bn_stats(layer.norm2, y1, n, h, w, state)
            _bn_relu(y1, scale2, shift2, z2)
            new = F.conv2d(_nchw(z2, n, h, w), layer.conv2.weight, padding=layer.conv2.padding)
            rec.update(mean2=mean2, rstd2=rstd2)
        else:
            z = _bn_relu(X[:, :c_in], scale1, shift1, scratch[: m * c_in].view(m, c_in))
            new = F.conv2d(_nchw(z, n, h, w), layer.conv1.weight, padding=layer.conv1.padding)
        if layer.drop_rate > 0 and layer.training:
            noise = _dropout_noise(layer, (n, k, h, w), x, fmt)
            new = new * noise
            rec["mask2"] = noise != 0
        new_rows = _rows(new)  # a view: the convolution's output is channels-last
        if batch_stats:
            mean_all[c_in:c_in + k], var_all[c_in:c_in + k] = _col_stats(new_rows, eps, n, h, w)
        if _fused(X):
            kernels.copy_cols(new_rows, X[:, c_in:c_in + k])
        else:
            X[:, c_in:c_in + k].copy_(new_rows)
        saved.append(rec)

    out = buf.permute(0, 3, 1, 2)
    if fmt is torch.contiguous_format:
        out = out.contiguous()  # layout in = layout out, as the reference path
    if not save:
        return out, None
    state = dict(saved=saved, mean_all=mean_all, var_all=var_all, fmt=fmt,
                 y1=y1_store if bottleneck else None)
    return out, (buf, state)


class _DenseBlockFunction(torch.autograd.Function):
    """The whole block as one autograd node: every parameter gets its gradient exactly once
    per backward (what DDP's reducer expects), and the block input gets its gradient."""

    @staticmethod
    def forward(ctx, block, x, *params):
        layers = list(block.values())
        out, (buf, state) = _forward(block, layers, x, save=True)
        ctx.block = block
        ctx.state = state
        ctx.save_for_backward(buf)
        ctx.c0 = x.shape[1]
        ctx.training = [(_uses_batch_stats(l.norm1),
                         _uses_batch_stats(l.norm2) if l.bottleneck else None) for l in layers]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (buf,) = ctx.saved_tensors
        layers = list(ctx.block.values())
        st = ctx.state
        n, h, w, c_total = buf.shape
        m = n * h * w
        c0 = ctx.c0
        k = ctx.block.growth_rate
        X = buf.view(m, c_total)
        dbuf = kernels.huge_empty(buf.shape, buf)
        dbuf.copy_(grad_out.permute(0, 2, 3, 1))
        dX = dbuf.view(m, c_total)
        # Per-channel sums over training-mode consumers of gamma*rstd*mean(g) and
        # gamma*rstd*mean(g*xhat): the two BN mean corrections, applied once per segment.
        corr_a = X.new_zeros(c_total)
        corr_b = X.new_zeros(c_total)
        mean_all, var_all = st["mean_all"], st["var_all"]
        rstd_all = None
        if mean_all is not None:
            rstd_all = torch.rsqrt(var_all + layers[0].norm1.eps)

        def finalize(lo, hi, out):
            """The finished gradient of buffer channels lo:hi into ``out``: dX plus the summed
            BN corrections, dx -= a + xhat * b, xhat = (x - mean) * rstd, folded into one pass."""
            if rstd_all is None:
                return out.copy_(dX[:, lo:hi])
            coef = -corr_b[lo:hi] * rstd_all[lo:hi]
            const = corr_b[lo:hi] * rstd_all[lo:hi] * mean_all[lo:hi] - corr_a[lo:hi]
            return _affine_add(X[:, lo:hi], coef, const, dX[:, lo:hi], out)

        seg = X.new_empty(m, k)  # the finished gradient of the current layer's maps
        bottleneck = layers[0].bottleneck
        rows = _chunk_rows(X, m) if bottleneck else m
        scratch = X.new_empty(rows * (c0 + (len(layers) - 1) * k))
        gscratch = X.new_empty(rows * (c0 + (len(layers) - 1) * k))
        if bottleneck:
            inner = layers[0].conv1.out_channels
            z2 = kernels.huge_empty((m, inner), X)
        grads = []
        for i in reversed(range(len(layers))):
            layer, rec = layers[i], st["saved"][i]
            c_in = c0 + i * k
            norm1 = layer.norm1
            batch1 = ctx.training[i][0]
            # every consumer of layer i's maps is done: their gradient, contiguous for the conv
            d_new = _nchw(finalize(c_in, c_in + k, seg), n, h, w)
            if "mask2" in rec:
                d_new = d_new * rec["mask2"] / (1 - layer.drop_rate)
            layer_grads = [None] * (6 if bottleneck else 3)
            if bottleneck:
                norm2, conv2 = layer.norm2, layer.conv2
                y1 = st["y1"][i]
                mean2, rstd2 = rec["mean2"], rec["rstd2"]
                scale2 = norm2.weight * rstd2
                shift2 = norm2.bias - mean2 * scale2
                _bn_relu(y1, scale2, shift2, z2)
                dz2, dw2, _ = torch.ops.aten.convolution_backward(
                    d_new, _nchw(z2, n, h, w), conv2.weight, None, [1, 1], list(conv2.padding),
                    [1, 1], False, [0, 0], 1, [True, True, False])
                dy1 = _rows(dz2)  # a view when dz2 is channels-last, else a copy
                sum_g, sum_xg = _bn_relu_grad(y1, dy1, scale2, shift2, mean2, z2).to(y1.dtype)
                dg2 = sum_xg * rstd2
                layer_grads[3:] = [dg2, sum_g, _like(dw2, conv2.weight)]
                if ctx.training[i][1]:
                    a2, b2 = sum_g / m, dg2 * rstd2 / m
                else:
                    a2 = b2 = torch.zeros_like(sum_g)
                # BN2's input gradient, dy1: with dropout here in full, else chunk by chunk below
                # just before each chunk's products read it
                apply2 = (scale2, shift2, mean2, a2, b2)
                if "mask1" in rec:
                    _bn_grad_apply(y1, dy1, *apply2, z2)
                    dy1 = _rows(_nchw(dy1, n, h, w) * rec["mask1"] / (1 - layer.drop_rate))
                    apply2 = None
            else:
                dy1, apply2 = d_new, None

            mean1, rstd1 = rec["mean1"], rec["rstd1"]
            scale1 = norm1.weight * rstd1
            shift1 = norm1.bias - mean1 * scale1
            sums = torch.zeros(2, c_in, dtype=torch.float64, device=X.device)
            if bottleneck:
                w1 = layer.conv1.weight.view(inner, c_in)
                dw1 = None
                for lo in range(0, m, rows):  # row chunks: the scratch stays in cache
                    hi = min(lo + rows, m)
                    z = scratch[: (hi - lo) * c_in].view(hi - lo, c_in)
                    if apply2 is not None:
                        _bn_grad_apply(y1[lo:hi], dy1[lo:hi], *apply2, z2[lo:hi])
                    g = torch.mm(dy1[lo:hi], w1, out=gscratch[: (hi - lo) * c_in].view(hi - lo, c_in))
                    # one pass: ReLU mask, BN sums, dX += g' * scale and z = relu(bn(X)) for dW
                    _bn_relu_grad(X[lo:hi, :c_in], g, scale1, shift1, mean1, None,
                                  dx=dX[lo:hi, :c_in], sums=sums, z=z)
                    dw1 = _weight_grad(dy1[lo:hi], z, layer.conv1.weight, dw1)
                dw1 = dw1.view_as(layer.conv1.weight)
            else:
                Xi = X[:, :c_in]
                z = _bn_relu(Xi, scale1, shift1, scratch[: m * c_in].view(m, c_in))
                dg, dw1, _ = torch.ops.aten.convolution_backward(
                    dy1, _nchw(z, n, h, w), layer.conv1.weight, None, [1, 1],
                    list(layer.conv1.padding), [1, 1], False, [0, 0], 1, [True, True, False])
                g = gscratch[: m * c_in].view(m, c_in)
                g.copy_(_rows(dg))
                _bn_relu_grad(Xi, g, scale1, shift1, mean1, z, dx=dX[:, :c_in], sums=sums)
            dbeta, sum_xg = sums.to(X.dtype)
            dgamma = sum_xg.mul_(rstd1)
            layer_grads[:3] = [dgamma, dbeta, _like(dw1, layer.conv1.weight)]
            if batch1:
                corr_a[:c_in].add_(scale1 * dbeta / m)
                corr_b[:c_in].add_(scale1 * dgamma / m)
            grads = layer_grads + grads
        finalize(0, c0, dX[:, :c0])
        dx = dbuf[..., :c0].permute(0, 3, 1, 2)
        if st["fmt"] is torch.contiguous_format:
            dx = dx.contiguous()
        needs = ctx.needs_input_grad
        grads = [g if needs[2 + j] else None for j, g in enumerate(grads)]
        return (None, dx if needs[1] else None, *grads)


# ----------------------------------------------------------------------------- outside the blocks

def _plain_bn_ok(norm, x: torch.Tensor) -> bool:
    """Whether BN ``norm`` on ``x`` can run as our function (else the module runs as it is)."""
    return _eager_ok(x) and type(norm) is nn.BatchNorm2d and norm.affine


def features_forward(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``relu(features(x))`` of a DenseNet, with each BatchNorm2d that a ReLU follows (the
    ImageNet stem's norm0/relu0, and norm5 with the final ReLU) run as one BN-ReLU function:
    its output goes into huge-page memory, and backward reads only the BN input. With the fused
    kernels, the ImageNet stem's BN-ReLU-max-pooling is one function and one pass
    (``bn_relu_maxpool_forward``)."""
    mods = list(features.children())
    i = 0
    while i < len(mods):
        mod = mods[i]
        last = i == len(mods) - 1
        if (type(mod) is nn.BatchNorm2d and i + 2 < len(mods) and type(mods[i + 1]) is nn.ReLU
                and _maxpool_fusable(mods[i + 2], x) and _plain_bn_ok(mod, x) and _fused(x)):
            x = bn_relu_maxpool_forward(mod, mods[i + 2], x)
            i += 3
        elif (type(mod) is nn.BatchNorm2d and (last or type(mods[i + 1]) is nn.ReLU)
                and _plain_bn_ok(mod, x)):
            x = bn_relu_forward(mod, x)
            if last:
                return x
            i += 2
        else:
            x = mod(x)
            i += 1
    return F.relu(x, inplace=True)


def bn_relu_forward(norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """relu(norm(x)), with nn.BatchNorm2d's running-statistics update."""
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad):
        return _BnReluFunction.apply(norm, x, norm.weight, norm.bias)
    with torch.no_grad():
        return _bn_relu_forward(norm, x)[0]


def _bn_stats(norm, X, n, h, w, state=None):
    """(mean, inverse std, scale, shift) BN ``norm`` normalises the rows ``X`` with, updating its
    running statistics once when it uses batch statistics (already gathered in ``state`` when
    given: see kernels.col_stats)."""
    if _uses_batch_stats(norm):
        if state is not None:
            mean, var = kernels.stats_from_state(state, X.dtype)
        else:
            mean, var = _col_stats(X, norm.eps, n, h, w)
        _update_running_stats(norm, mean, var, X.shape[0])
        rstd = torch.rsqrt(var + norm.eps)
    else:
        mean, rstd = norm.running_mean, torch.rsqrt(norm.running_var + norm.eps)
    scale = norm.weight * rstd
    return mean, rstd, scale, norm.bias - mean * scale


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _bn_relu_forward(norm, x):
    n, c, h, w = x.shape
    X = _rows(x)
    mean, rstd, scale, shift = _bn_stats(norm, X, n, h, w)
    out = kernels.huge_empty((n * h * w, c), X)
    _bn_relu(X, scale, shift, out)
    out = _nchw(out, n, h, w)
    return (out if _channels_last(x) else out.contiguous()), X, mean, rstd, scale, shift


def _remember(ctx, norm, x, stats) -> None:
    """What the BN-ReLU functions' backward needs besides their input: (mean, inverse std, scale,
    shift, whether batch statistics were used), the input's shape and layout."""
    ctx.stats = (*stats, _uses_batch_stats(norm))
    ctx.shape, ctx.layout = x.shape, _channels_last(x)


class _BnReluFunction(torch.autograd.Function):
    """relu(bn(x)) saving only x: backward needs the ReLU mask, which x gives, not the output."""

    @staticmethod
    def forward(ctx, norm, x, gamma, beta):
        out, X, *stats = _bn_relu_forward(norm, x)
        ctx.save_for_backward(X)
        _remember(ctx, norm, x, stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (X,) = ctx.saved_tensors
        mean, _, scale, shift, _ = ctx.stats
        dY = _rows(grad_out)
        if not _fused(X):
            dY = dY.clone()  # the torch-op path masks its gradient in place
        tmp = None if _fused(X) else torch.empty_like(X)
        sums = _bn_relu_grad(X, dY, scale, shift, mean, tmp)
        dx, dgamma, dbeta = _bn_grad_from_sums(ctx, X, dY, sums, kernels.huge_empty(X.shape, X), tmp)
        needs = ctx.needs_input_grad
        return (None, dx if needs[1] else None, dgamma if needs[2] else None, dbeta if needs[3] else None)


def _bn_grad_from_sums(ctx, X, G, sums, out, tmp=None):
    """The end of a BN-ReLU function's backward (ctx from ``_remember``) from the gradient G at
    its ReLU output (or g', already masked) and the float64 sums of g' and (x - mean) * g':
    out = BN's input gradient (``out`` may be G); returns (it in the input's shape and layout,
    dgamma, dbeta)."""
    mean, rstd, scale, shift, batch = ctx.stats
    n, c, h, w = ctx.shape
    m = n * h * w
    sum_g, sum_xg = sums.to(X.dtype)
    dgamma = sum_xg * rstd
    if batch:
        a, b = sum_g / m, dgamma * rstd / m
    else:
        a = b = torch.zeros_like(sum_g)
    dx = _nchw(_bn_grad_apply(X, G, scale, shift, mean, a, b, tmp, out=out), n, h, w)
    return (dx if ctx.layout else dx.contiguous()), dgamma, sum_g


def _maxpool_fusable(pool, x: torch.Tensor) -> bool:
    """A max pooling the fused stem kernel computes as ``F.max_pool2d`` does (else the module
    runs, and raises its own errors for invalid settings)."""
    if (type(pool) is not nn.MaxPool2d or pool.return_indices or pool.ceil_mode
            or torch.nn.modules.utils._pair(pool.dilation) != (1, 1)):
        return False
    pair = torch.nn.modules.utils._pair
    if not all(kk > 0 and ss > 0 and 0 <= pp <= kk // 2
               for kk, ss, pp in zip(pair(pool.kernel_size), pair(pool.stride), pair(pool.padding))):
        return False
    return min(_pool_geometry(pool, *x.shape[2:])[3:]) >= 1


def _pool_geometry(pool, h: int, w: int):
    pair = torch.nn.modules.utils._pair
    k, s, p = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
    return k, s, p, (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1


def bn_relu_maxpool_forward(norm: nn.BatchNorm2d, pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """pool(relu(norm(x))) (the ImageNet stem after its convolution) with the fused kernels, with
    nn.BatchNorm2d's running-statistics update. Max pooling commutes with the monotone ReLU, so
    one pass over x gives the output: neither the BN-ReLU output (4x the output's size) nor
    pooling indices are stored; backward finds each window's maximum again from x."""
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad):
        return _BnReluMaxPoolFunction.apply(norm, pool, x, norm.weight, norm.bias)
    with torch.no_grad():
        return _bn_relu_maxpool_forward(norm, pool, x)[0]


def _bn_relu_maxpool_forward(norm, pool, x):
    n, c, h, w = x.shape
    X = _rows(x)
    mean, rstd, scale, shift = _bn_stats(norm, X, n, h, w)
    k, s, p, oh, ow = _pool_geometry(pool, h, w)
    out = kernels.bn_relu_maxpool(X.view(n, h, w, c), scale, shift, k, s, p,
                                  kernels.huge_empty((n, oh, ow, c), X))
    out = out.permute(0, 3, 1, 2)
    return (out if _channels_last(x) else out.contiguous()), X, mean, rstd, scale, shift


class _BnReluMaxPoolFunction(torch.autograd.Function):
    """maxpool(relu(bn(x))) saving only x (torch keeps the BN-ReLU output and int64 indices)."""

    @staticmethod
    def forward(ctx, norm, pool, x, gamma, beta):
        out, X, *stats = _bn_relu_maxpool_forward(norm, pool, x)
        ctx.save_for_backward(X)
        ctx.pool = pool
        _remember(ctx, norm, x, stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (X,) = ctx.saved_tensors
        mean, _, scale, shift, _ = ctx.stats
        n, c, h, w = ctx.shape
        k, s, p, _, _ = _pool_geometry(ctx.pool, h, w)
        G = kernels.huge_empty(X.shape, X)  # g', all of it written by the kernel
        sums = kernels.bn_relu_maxpool_grad(X.view(n, h, w, c), scale, shift, mean, k, s, p,
                                            grad_out.permute(0, 2, 3, 1).contiguous(), G.view(n, h, w, c))
        dx, dgamma, dbeta = _bn_grad_from_sums(ctx, X, G, sums, G)
        needs = ctx.needs_input_grad
        return (None, None, dx if needs[2] else None, dgamma if needs[3] else None,
                dbeta if needs[4] else None)


def transition_forward(trans, x: torch.Tensor) -> torch.Tensor:
    """Forward of a ``Transition`` (BN-ReLU-Conv1x1 [dropout] AvgPool): the BN-ReLU-Conv1x1
    part in one function that recomputes BN-ReLU in backward, like the block's layers."""
    norm, conv, pool = trans.norm, trans.conv, trans.pool
    if (not _plain_bn_ok(norm, x) or conv.bias is not None
            or conv.groups != 1 or conv.kernel_size != (1, 1) or conv.stride != (1, 1)):
        y = conv(trans.relu(norm(x)))
    elif type(pool) is nn.AvgPool2d and not _dropout_active(trans):
        # a bias-free 1x1 convolution and average pooling are both linear, one across channels,
        # the other within each channel, so they commute: pooling first gives the same output
        # with a quarter of the convolution's work, forward and backward
        if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad
                                        or norm.bias.requires_grad or conv.weight.requires_grad):
            return _BnReluPoolConvFunction.apply(norm, pool, x, norm.weight, norm.bias, conv.weight)
        with torch.no_grad():
            return _bn_relu_pool_conv_forward(norm, pool, x, conv.weight)[0]
    elif torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad
                                      or norm.bias.requires_grad or conv.weight.requires_grad):
        y = _BnReluConvFunction.apply(norm, x, norm.weight, norm.bias, conv.weight)
    else:
        with torch.no_grad():
            y = _bn_relu_conv_forward(norm, x, conv.weight)[0]
    if hasattr(trans, "drop"):
        y = trans.drop(y)
    return trans.pool(y)


def _bn_relu_conv_forward(norm, x, weight):
    n, c, h, w = x.shape
    m = n * h * w
    X = _rows(x)  # a view of channels-last input
    mean, rstd, scale, shift = _bn_stats(norm, X, n, h, w)
    c_out = weight.shape[0]
    Y = kernels.huge_empty((m, c_out), X)
    rows = _chunk_rows(X, m)
    scratch = X.new_empty(rows * c)
    for lo in range(0, m, rows):
        hi = min(lo + rows, m)
        _product(_bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c)), weight, Y[lo:hi])
    out = _nchw(Y, n, h, w)
    if not _channels_last(x):
        out = out.contiguous()  # layout in = layout out, as nn.Conv2d
    return out, X, mean, rstd, scale, shift


class _BnReluConvFunction(torch.autograd.Function):
    """conv1x1(relu(bn(x))) saving only x: BN-ReLU is recomputed in backward, row chunk by row
    chunk, so neither the BN output nor the ReLU output is ever stored."""

    @staticmethod
    def forward(ctx, norm, x, gamma, beta, weight):
        out, X, *stats = _bn_relu_conv_forward(norm, x, weight)
        ctx.save_for_backward(X, weight)
        _remember(ctx, norm, x, stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        X, weight = ctx.saved_tensors
        mean, _, scale, shift, _ = ctx.stats
        n, c, h, w = ctx.shape
        m = n * h * w
        c_out = weight.shape[0]
        w2d = weight.view(c_out, c)
        dY = _rows(grad_out)
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
        dx, dgamma, dbeta = _bn_input_grad(ctx, X, dX, sums)
        needs = ctx.needs_input_grad
        return (None, dx if needs[1] else None, dgamma if needs[2] else None,
                dbeta if needs[3] else None, _like(dw.view_as(weight), weight) if needs[4] else None)


def _bn_input_grad(ctx, X, dX, sums):
    """The end of a BN-ReLU function's backward (ctx from ``_remember``): from dX = g' * scale
    and the float64 sums of g' and (x - mean) * g', BN's two batch-statistics corrections
    applied in place, dx -= scale * (mean(g') + xhat * mean(g' xhat)); returns (dx in the
    input's layout, dgamma, dbeta)."""
    mean, rstd, scale, shift, batch = ctx.stats
    n, c, h, w = ctx.shape
    m = n * h * w
    dbeta, sum_xg = sums.to(X.dtype)
    dgamma = sum_xg * rstd
    if batch:
        b = scale * rstd * dgamma / m
        _affine_add(X, -b, b * mean - scale * dbeta / m, dX, dX)
    dx = _nchw(dX, n, h, w)
    return (dx if ctx.layout else dx.contiguous()), dgamma, dbeta


def _dropout_active(trans) -> bool:
    drop = getattr(trans, "drop", None)
    return drop is not None and drop.training and drop.p > 0


def _image_chunks(n: int, h: int, w: int, t: torch.Tensor):
    """Chunks of whole images (for the pooling) of at most ``_chunk_rows`` rows, or one image:
    a list of (first image, end image)."""
    per = max(1, _chunk_rows(t, n * h * w) // (h * w))
    return [(i, min(i + per, n)) for i in range(0, n, per)]


def _bn_relu_pool_conv_forward(norm, pool, x, weight):
    n, c, h, w = x.shape
    X = _rows(x)
    mean, rstd, scale, shift = _bn_stats(norm, X, n, h, w)
    chunks = _image_chunks(n, h, w, X)
    scratch = X.new_empty((chunks[0][1] - chunks[0][0]) * h * w * c)
    outs = []
    for i0, i1 in chunks:
        lo, hi = i0 * h * w, i1 * h * w
        z = _bn_relu(X[lo:hi], scale, shift, scratch[: (hi - lo) * c].view(hi - lo, c))
        outs.append(F.conv2d(pool(_nchw(z, i1 - i0, h, w)), weight))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = out.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    return out, X, mean, rstd, scale, shift


class _BnReluPoolConvFunction(torch.autograd.Function):
    """avgpool(conv1x1(relu(bn(x)))) computed as conv1x1(avgpool(relu(bn(x)))), saving only x:
    BN-ReLU and the pooling are recomputed in backward, a chunk of whole images at a time."""

    @staticmethod
    def forward(ctx, norm, pool, x, gamma, beta, weight):
        out, X, *stats = _bn_relu_pool_conv_forward(norm, pool, x, weight)
        ctx.save_for_backward(X, weight)
        ctx.pool = pool
        _remember(ctx, norm, x, stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        X, weight = ctx.saved_tensors
        mean, _, scale, shift, _ = ctx.stats
        pool = ctx.pool
        n, c, h, w = ctx.shape
        pair = torch.nn.modules.utils._pair
        pool_args = (pair(pool.kernel_size), pair(pool.stride), pair(pool.padding), pool.ceil_mode,
                     pool.count_include_pad, pool.divisor_override)
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
                grad_out[i0:i1], pool(zimg), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [True, True, False])
            dw = dwc if dw is None else dw.add_(dwc)
            g = _rows(torch.ops.aten.avg_pool2d_backward(dzp, zimg, *pool_args))  # a new tensor
            _bn_relu_grad(X[lo:hi], g, scale, shift, mean, z, dx=dX[lo:hi], sums=sums, assign=True)
        dx, dgamma, dbeta = _bn_input_grad(ctx, X, dX, sums)
        needs = ctx.needs_input_grad
        return (None, None, dx if needs[2] else None, dgamma if needs[3] else None,
                dbeta if needs[4] else None, _like(dw, weight) if needs[5] else None)
