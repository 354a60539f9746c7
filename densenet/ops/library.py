"""The engine's operators as PyTorch sees them: every ``torch.library`` registration of the block,
stem and transition ops in one place - definitions, fake (meta) implementations, autograd
formulas, autocast rules and FLOP formulas.

=========================  ==============================================  =====================
op (``densenet::``)        computes (math in)                              returns
=========================  ==============================================  =====================
``dense_block``            a whole dense block (:mod:`.block`)             buffer, saved, stats
``bn_relu``                relu(bn(x)) (:mod:`.bn`)                        output, batch stats
``bn_relu_maxpool``        maxpool(relu(bn(x))), the ImageNet stem         output, batch stats
``bn_relu_conv``           conv1x1(relu(bn(x))), a transition with dropout output, batch stats
``bn_relu_pool_conv``      conv1x1(avgpool(relu(bn(x)))), a transition     output, batch stats
=========================  ==============================================  =====================

Each has a ``_backward`` op. Autograd, bf16 autocast, ``torch.compile`` (one opaque op, no
graph break) and ``torch.export`` (the op in the graph) all see each as one operator. The ops
return their batch statistics and mutate nothing; :mod:`.modules` updates the BN running
statistics from them. Inside, the element-wise work is the registered passes of
:mod:`.elementwise`, whose kernels the dispatcher picks per device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import block, bn, rows
from .block import BlockSpec, Saved

# ----------------------------------------------------------------------------- the dense block


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
    spec = BlockSpec(growth_rate, bottleneck, eps, batch_stats, drop_rate)
    block.check_args(x, params, running, masks, spec)
    s = block.forward(x, params, running, masks, spec, save)
    return s.buf, s.y1, s.stats1, s.stats2


@dense_block_op.register_fake
def _(x, params, running, masks, growth_rate, bottleneck, eps, batch_stats, drop_rate, save):
    n, c0, *sp = x.shape
    num = len(params) // (6 if bottleneck else 3)
    sd = rows.stat_dtype(x.dtype)
    buf = x.new_empty((n, *sp, c0 + num * growth_rate))
    inner = params[2].shape[0] if bottleneck else 0
    m = n * rows.spatial_numel(x.shape)
    keep = block.keeps_bottleneck(x.shape, num, inner, x.element_size(), bottleneck, save)
    y1 = x.new_empty((num, m, inner)) if keep else x.new_empty(0)
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
    spec = BlockSpec(growth_rate, bottleneck, eps, batch_stats, drop_rate)
    return block.backward(grad, Saved(buf, y1, stats1, stats2), params, running, masks, spec,
                          channels_last)


@dense_block_backward_op.register_fake
def _(grad, buf, y1, stats1, stats2, params, running, masks, growth_rate, bottleneck, eps,
      batch_stats, drop_rate, channels_last):
    n, *sp, _ = buf.shape
    dx = rows.empty_like_layout(buf, (n, params[0].shape[0], *sp), channels_last=channels_last)
    return [dx, *[torch.empty_like(p) for p in params]]


def _block_setup_context(ctx, inputs, output):
    x, params, running, masks, growth_rate, bottleneck, eps, batch_stats, drop_rate, save = inputs
    buf, y1, stats1, stats2 = output
    ctx.save_for_backward(buf, y1, stats1, stats2, *params, *running, *masks)
    ctx.sizes = (len(params), len(running))
    ctx.args = (growth_rate, bottleneck, eps, batch_stats, drop_rate, rows.is_channels_last(x))
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


# ----------------------------------------------------------------------------- relu(bn(x))

def _stats_like(x, batch_stats):
    return x.new_empty((2, x.shape[1]) if batch_stats else (0,), dtype=rows.stat_dtype(x.dtype))


def _bn_grads_like(x, gamma, beta):
    return [rows.empty_like_layout(x, x.shape), torch.empty_like(gamma), torch.empty_like(beta)]


@torch.library.custom_op("densenet::bn_relu", mutates_args=())
def bn_relu_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
               batch_stats: bool) -> tuple[Tensor, Tensor]:
    """relu(bn(x)) and the batch statistics (2, C) it used (empty with running statistics)."""
    return bn.bn_relu_forward(x, gamma, beta, running, eps, batch_stats)


@bn_relu_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats):
    return rows.empty_like_layout(x, x.shape), _stats_like(x, batch_stats)


@torch.library.custom_op("densenet::bn_relu_backward", mutates_args=())
def bn_relu_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                        running: list[Tensor], eps: float, batch_stats: bool) -> list[Tensor]:
    return bn.bn_relu_backward(grad, x, gamma, beta, stats, running, eps, batch_stats)


@bn_relu_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats):
    return _bn_grads_like(x, gamma, beta)


def _bn_setup(ctx, inputs, output):
    x, gamma, beta, running, eps, batch_stats = inputs[:6]
    ctx.save_for_backward(x, gamma, beta, output[1], *running)
    ctx.args = (eps, batch_stats)


def _bn_relu_autograd(ctx, grad, _):
    x, gamma, beta, stats, *running = ctx.saved_tensors
    dx, dgamma, dbeta = bn_relu_backward_op(grad, x, gamma, beta, stats, running, *ctx.args)
    return dx, dgamma, dbeta, [None] * len(running), None, None


bn_relu_op.register_autograd(_bn_relu_autograd, setup_context=_bn_setup)


# ----------------------------------------------------------------------------- maxpool(relu(bn(x)))

@torch.library.custom_op("densenet::bn_relu_maxpool", mutates_args=())
def bn_relu_maxpool_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
                       batch_stats: bool, kernel: list[int], stride: list[int],
                       padding: list[int]) -> tuple[Tensor, Tensor]:
    """maxpool(relu(bn(x))), the ImageNet stem after its convolution, keeping only x."""
    return bn.bn_relu_maxpool_forward(x, gamma, beta, running, eps, batch_stats, kernel, stride, padding)


@bn_relu_maxpool_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats, kernel, stride, padding):
    n, c, *sp = x.shape
    return (rows.empty_like_layout(x, (n, c, *bn.pooled_size(*sp, kernel, stride, padding))),
            _stats_like(x, batch_stats))


@torch.library.custom_op("densenet::bn_relu_maxpool_backward", mutates_args=())
def bn_relu_maxpool_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                                running: list[Tensor], eps: float, batch_stats: bool,
                                kernel: list[int], stride: list[int], padding: list[int]) -> list[Tensor]:
    return bn.bn_relu_maxpool_backward(grad, x, gamma, beta, stats, running, eps, batch_stats, kernel,
                                       stride, padding)


@bn_relu_maxpool_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats, kernel, stride, padding):
    if x.dim() == 5:  # a volume's input gradient comes channels-last (densenet.ops.bn)
        return [rows.empty_like_layout(x, x.shape, channels_last=True), torch.empty_like(gamma),
                torch.empty_like(beta)]
    return _bn_grads_like(x, gamma, beta)


def _bn_relu_maxpool_setup(ctx, inputs, output):
    _bn_setup(ctx, inputs, output)
    ctx.args = (*ctx.args, *inputs[6:9])


def _bn_relu_maxpool_autograd(ctx, grad, _):
    x, gamma, beta, stats, *running = ctx.saved_tensors
    dx, dgamma, dbeta = bn_relu_maxpool_backward_op(grad, x, gamma, beta, stats, running, *ctx.args)
    return dx, dgamma, dbeta, [None] * len(running), None, None, None, None, None


bn_relu_maxpool_op.register_autograd(_bn_relu_maxpool_autograd, setup_context=_bn_relu_maxpool_setup)


# ----------------------------------------------------------------------------- the transitions

@torch.library.custom_op("densenet::bn_relu_conv", mutates_args=())
def bn_relu_conv_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
                    batch_stats: bool, weight: Tensor) -> tuple[Tensor, Tensor]:
    """conv1x1(relu(bn(x))), row chunk by row chunk (BN-ReLU recomputed in backward)."""
    return bn.bn_relu_conv_forward(x, gamma, beta, running, eps, batch_stats, weight)


@bn_relu_conv_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats, weight):
    return rows.empty_like_layout(x, (x.shape[0], weight.shape[0], *x.shape[2:])), _stats_like(x, batch_stats)


@torch.library.custom_op("densenet::bn_relu_conv_backward", mutates_args=())
def bn_relu_conv_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                             running: list[Tensor], eps: float, batch_stats: bool,
                             weight: Tensor) -> list[Tensor]:
    return bn.bn_relu_conv_backward(grad, x, gamma, beta, stats, running, eps, batch_stats, weight)


@bn_relu_conv_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats, weight):
    return [*_bn_grads_like(x, gamma, beta), torch.empty_like(weight)]


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


@torch.library.custom_op("densenet::bn_relu_pool_conv", mutates_args=())
def bn_relu_pool_conv_op(x: Tensor, gamma: Tensor, beta: Tensor, running: list[Tensor], eps: float,
                         batch_stats: bool, weight: Tensor, kernel: list[int], stride: list[int],
                         padding: list[int], ceil_mode: bool, count_include_pad: bool) -> tuple[Tensor, Tensor]:
    """avgpool(conv1x1(relu(bn(x)))) computed as conv1x1(avgpool(relu(bn(x))))."""
    return bn.bn_relu_pool_conv_forward(x, gamma, beta, running, eps, batch_stats, weight, kernel, stride,
                                        padding, ceil_mode, count_include_pad)


@bn_relu_pool_conv_op.register_fake
def _(x, gamma, beta, running, eps, batch_stats, weight, kernel, stride, padding, ceil_mode,
      count_include_pad):
    pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
    pooled = pool(x.new_empty((1, 1, *x.shape[2:])), kernel, stride, padding, ceil_mode, count_include_pad)
    return (rows.empty_like_layout(x, (x.shape[0], weight.shape[0], *pooled.shape[2:])),
            _stats_like(x, batch_stats))


@torch.library.custom_op("densenet::bn_relu_pool_conv_backward", mutates_args=())
def bn_relu_pool_conv_backward_op(grad: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, stats: Tensor,
                                  running: list[Tensor], eps: float, batch_stats: bool, weight: Tensor,
                                  kernel: list[int], stride: list[int], padding: list[int],
                                  ceil_mode: bool, count_include_pad: bool) -> list[Tensor]:
    return bn.bn_relu_pool_conv_backward(grad, x, gamma, beta, stats, running, eps, batch_stats, weight,
                                         kernel, stride, padding, ceil_mode, count_include_pad)


@bn_relu_pool_conv_backward_op.register_fake
def _(grad, x, gamma, beta, stats, running, eps, batch_stats, weight, kernel, stride, padding,
      ceil_mode, count_include_pad):
    return [*_bn_grads_like(x, gamma, beta), torch.empty_like(weight)]


def _bn_relu_pool_conv_autograd(ctx, grad, _):
    x, gamma, beta, stats, weight, *running = ctx.saved_tensors
    dx, dgamma, dbeta, dw = bn_relu_pool_conv_backward_op(grad, x, gamma, beta, stats, running,
                                                          *ctx.args, weight, *ctx.pool)
    return dx, dgamma, dbeta, [None] * len(running), None, None, dw, None, None, None, None, None


bn_relu_pool_conv_op.register_autograd(_bn_relu_pool_conv_autograd, setup_context=_conv_setup)


# ----------------------------------------------------------------------------- autocast rules

_autocast_lib = torch.library.Library("densenet", "FRAGMENT")


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
        _autocast_lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


def _cast(t, dtype):
    return t.to(dtype) if t.dtype.is_floating_point and t.dtype != dtype else t


def _keep(args, dtype):
    return args


def _block_casts(args, dtype):
    x, params, bottleneck = args[0], list(args[1]), args[5]
    per = 6 if bottleneck else 3
    for j in range(len(params)):
        if j % per in (2, 5):  # convolution weights
            params[j] = _cast(params[j], dtype)
    args[0], args[1] = _cast(x, dtype), params
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


# ----------------------------------------------------------------------------- FLOP counts
# So that torch.utils.flop_counter.FlopCounterMode counts the ops' convolutions (2 FLOPs per
# multiply-add; backward: the input and weight gradients, twice the forward).

def _conv_flops(m: int, w_shape) -> int:
    out = 2 * m
    for s in w_shape:
        out *= s
    return out


def _block_flops(x_shape, params, bottleneck):
    per = 6 if bottleneck else 3
    m = x_shape[0] * rows.spatial_numel(x_shape)
    return sum(_conv_flops(m, s) for j, s in enumerate(params) if j % per in (2, 5))


@register_flop_formula(torch.ops.densenet.dense_block)
def _(x_shape, params, *args, out_shape=None, **kwargs) -> int:
    return _block_flops(x_shape, params, args[3])


@register_flop_formula(torch.ops.densenet.dense_block_backward)
def _(grad_shape, buf_shape, y1, s1, s2, params, running, masks, growth_rate, bottleneck, *args,
      out_shape=None, **kwargs) -> int:
    return 2 * _block_flops((buf_shape[0], 0, *buf_shape[1:-1]), params, bottleneck)


@register_flop_formula([torch.ops.densenet.bn_relu_conv, torch.ops.densenet.bn_relu_pool_conv])
def _(x_shape, gamma, beta, running, eps, batch_stats, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(out_shape[0][0] * rows.spatial_numel(out_shape[0]), w_shape)


@register_flop_formula([torch.ops.densenet.bn_relu_conv_backward,
                        torch.ops.densenet.bn_relu_pool_conv_backward])
def _(grad_shape, x_shape, gamma, beta, stats, running, eps, batch_stats, w_shape, *args,
      out_shape=None, **kwargs) -> int:
    return 2 * _conv_flops(grad_shape[0] * rows.spatial_numel(grad_shape), w_shape)
