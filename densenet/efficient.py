"""The memory-efficient dense block: one shared feature buffer, BN-ReLU recomputed in backward.

A plain dense block (``DenseBlock`` with ``implementation="reference"``) concatenates all earlier
maps for every layer and autograd keeps every concatenation and every BN output alive until
backward, so training memory grows quadratically with depth (SPEC section 8). Here the whole
block is one autograd function (after Pleiss et al. 2017, arXiv 1707.06990):

* Each block owns one channels-last buffer ``B`` of shape (N, H, W, C_in + L*k); layer l writes
  its k maps into its slice and reads ``B[..., :C_l]`` in place - no concatenation is ever made.
  Viewed as an (N*H*W, C) matrix, the input of layer l is a strided sub-matrix that BLAS reads
  directly, so the 1x1 bottleneck convolution is a single ``mm`` with no copy.
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
* Few, large, reused allocations: DenseNets' many large temporaries are what makes glibc malloc
  slow on CPU (docs: shared/notes/torchvision-anchors.md, 40 -> 112 img/s with tcmalloc).

Cases the function does not cover (bf16 autocast, torch.compile / tracing / scripting, a
SyncBatchNorm or BN without affine parameters, non-BatchNorm2d norms) run the reference path,
which gives the same results.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _supported(block, x: torch.Tensor) -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if x.dim() != 4 or x.is_sparse or x.is_meta or not x.dtype.is_floating_point:
        return False
    if torch.is_autocast_enabled(x.device.type):
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


def _norm2_forward(bn: nn.BatchNorm2d, y4d: torch.Tensor):
    """BN of the bottleneck output by the fused kernel, with nn.BatchNorm2d's buffer updates.
    Returns (output, mean, inverse std) - the statistics backward normalises with."""
    if _uses_batch_stats(bn):
        momentum = 0.0
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        return torch.native_batch_norm(y4d, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                       True, momentum, bn.eps)
    out = torch.native_batch_norm(y4d, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                  False, 0.0, bn.eps)[0]
    return out, bn.running_mean, torch.rsqrt(bn.running_var + bn.eps)


def _nchw(t2d: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """An (N*H*W, C) matrix seen as an (N, C, H, W) channels-last tensor (no copy)."""
    return t2d.view(n, h, w, t2d.shape[1]).permute(0, 3, 1, 2)


def _rows(t4d: torch.Tensor) -> torch.Tensor:
    """An (N, C, H, W) tensor as an (N*H*W, C) matrix (a copy unless it is channels-last)."""
    return t4d.permute(0, 2, 3, 1).reshape(-1, t4d.shape[1])


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
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           and not x.is_contiguous() else torch.contiguous_format)
    buf = x.new_empty((n, h, w, c_total))
    buf[..., :c0].copy_(x.permute(0, 2, 3, 1))
    X = buf.view(m, c_total)

    batch_stats = any(_uses_batch_stats(layer.norm1) for layer in layers)
    eps = layers[0].norm1.eps
    mean_all = var_all = None
    if batch_stats:
        mean_all = x.new_empty(c_total)
        var_all = x.new_empty(c_total)
        mean_all[:c0], var_all[:c0] = _batch_mean_var(x, eps)

    bottleneck = layers[0].bottleneck
    inner = layers[0].conv1.out_channels
    scratch = x.new_empty(m * (c0 + (num - 1) * k))  # BN-ReLU'd input of the current layer
    if bottleneck:
        y1_store = x.new_empty((num if save else 1, m, inner))
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
        z = scratch[: m * c_in].view(m, c_in)
        torch.addcmul(shift1, X[:, :c_in], scale1, out=z).relu_()

        rec = {"mean1": mean1, "rstd1": rstd1}
        if bottleneck:
            y1 = y1_store[i if save else 0]
            torch.mm(z, layer.conv1.weight.view(inner, c_in).t(), out=y1)
            if layer.drop_rate > 0 and layer.training:
                noise = _dropout_noise(layer, (n, inner, h, w), x, fmt)
                _nchw(y1, n, h, w).mul_(noise)
                rec["mask1"] = noise != 0
            z2, mean2, rstd2 = _norm2_forward(layer.norm2, _nchw(y1, n, h, w))
            new = F.conv2d(z2.relu_(), layer.conv2.weight, padding=layer.conv2.padding)
            rec.update(mean2=mean2, rstd2=rstd2)
        else:
            new = F.conv2d(_nchw(z, n, h, w), layer.conv1.weight, padding=layer.conv1.padding)
        if layer.drop_rate > 0 and layer.training:
            noise = _dropout_noise(layer, (n, k, h, w), x, fmt)
            new = new * noise
            rec["mask2"] = noise != 0
        buf[..., c_in:c_in + k].copy_(new.permute(0, 2, 3, 1))
        if batch_stats:
            mean_all[c_in:c_in + k], var_all[c_in:c_in + k] = _batch_mean_var(new, eps)
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
        dbuf = torch.empty_like(buf)
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

        def finalize(lo, hi):
            if rstd_all is None:
                return
            # dx -= a + xhat * b, xhat = (x - mean) * rstd, folded into one addcmul + add
            coef = -corr_b[lo:hi] * rstd_all[lo:hi]
            const = corr_b[lo:hi] * rstd_all[lo:hi] * mean_all[lo:hi] - corr_a[lo:hi]
            dX[:, lo:hi].addcmul_(X[:, lo:hi], coef).add_(const)

        scratch = X.new_empty(m * (c0 + (len(layers) - 1) * k))
        gscratch = X.new_empty(m * (c0 + (len(layers) - 1) * k))
        bottleneck = layers[0].bottleneck
        if bottleneck:
            inner = layers[0].conv1.out_channels
            z2 = X.new_empty((m, inner))
        grads = []
        for i in reversed(range(len(layers))):
            layer, rec = layers[i], st["saved"][i]
            c_in = c0 + i * k
            norm1 = layer.norm1
            batch1 = ctx.training[i][0]
            finalize(c_in, c_in + k)  # every consumer of layer i's maps is done
            d_new = _nchw(dX[:, c_in:c_in + k], n, h, w)
            if "mask2" in rec:
                d_new = d_new * rec["mask2"] / (1 - layer.drop_rate)
            layer_grads = [None] * (6 if bottleneck else 3)
            if bottleneck:
                norm2, conv2 = layer.norm2, layer.conv2
                y1 = st["y1"][i]
                scale2 = norm2.weight * rec["rstd2"]
                torch.addcmul(norm2.bias - rec["mean2"] * scale2, y1, scale2, out=z2).relu_()
                dz2, dw2, _ = torch.ops.aten.convolution_backward(
                    d_new, _nchw(z2, n, h, w), conv2.weight, None, [1, 1], list(conv2.padding),
                    [1, 1], False, [0, 0], 1, [True, True, False])
                dz2.mul_(_nchw(z2, n, h, w).sign_())  # ReLU backward (z2 >= 0)
                dy1, dg2, db2 = torch.ops.aten.native_batch_norm_backward(
                    dz2, _nchw(y1, n, h, w), norm2.weight, norm2.running_mean, norm2.running_var,
                    rec["mean2"], rec["rstd2"], ctx.training[i][1], norm2.eps, [True, True, True])
                layer_grads[3:] = [dg2, db2, dw2]
                if "mask1" in rec:
                    dy1 = dy1 * rec["mask1"] / (1 - layer.drop_rate)
                dy1 = _rows(dy1)
            else:
                dy1 = d_new

            mean1, rstd1 = rec["mean1"], rec["rstd1"]
            scale1 = norm1.weight * rstd1
            z = scratch[: m * c_in].view(m, c_in)
            torch.addcmul(norm1.bias - mean1 * scale1, X[:, :c_in], scale1, out=z).relu_()
            if bottleneck:
                w1 = layer.conv1.weight.view(inner, c_in)
                dw1 = torch.mm(dy1.t(), z).view_as(layer.conv1.weight)
                g = torch.mm(dy1, w1, out=gscratch[: m * c_in].view(m, c_in))
            else:
                dg, dw1, _ = torch.ops.aten.convolution_backward(
                    dy1, _nchw(z, n, h, w), layer.conv1.weight, None, [1, 1],
                    list(layer.conv1.padding), [1, 1], False, [0, 0], 1, [True, True, False])
                g = gscratch[: m * c_in].view(m, c_in)
                g.copy_(_rows(dg))
            g.mul_(z.sign_())  # ReLU backward; z is free after this
            dbeta = g.sum(0)
            xhat_g = torch.sub(X[:, :c_in], mean1, out=z).mul_(g)
            dgamma = xhat_g.sum(0).mul_(rstd1)
            layer_grads[:3] = [dgamma, dbeta, dw1]
            dX[:, :c_in].addcmul_(g, scale1)
            if batch1:
                corr_a[:c_in].add_(scale1 * dbeta / m)
                corr_b[:c_in].add_(scale1 * dgamma / m)
            grads = layer_grads + grads
        finalize(0, c0)
        dx = dbuf[..., :c0].permute(0, 3, 1, 2)
        if st["fmt"] is torch.contiguous_format:
            dx = dx.contiguous()
        needs = ctx.needs_input_grad
        grads = [g if needs[2 + j] else None for j, g in enumerate(grads)]
        return (None, dx if needs[1] else None, *grads)
