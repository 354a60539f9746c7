"""From a DenseNet's modules to the ops: what ``EfficientDenseBlock``, ``EfficientTransition``
and the trunk's forward call.

Each function reads the parameters and BN settings from the modules, calls one op of
:mod:`densenet.ops.library`, and updates the BN running statistics from the batch statistics
the op returns, exactly as ``nn.BatchNorm2d`` (or 1d, 3d) does (once per step; the checkpointing approach
recomputes BN in training mode and updates them twice). Dropout masks are drawn here in the
plain modules' order, dtype and layout, so one seed gives both paths the same masks.

Cases the ops do not cover (TorchScript tracing or scripting, meta tensors, a SyncBatchNorm or
a BN without affine parameters, norms other than BatchNorm1d/2d/3d or not matching the input's
rank, mixed eps or dropout rates in a block)
run the plain modules, which give the same results. So do the modules the ops would compute
without calling them (a block's layers, a transition's parts, the stem's norm0/relu0/pool0,
norm5) while a hook is registered on one of them or on every module: the hooks then fire.
What a block's structure allows is worked out once per block and kept (:func:`_plan`), so a
forward checks its hooks with one pass over a flat tuple instead of walking the modules.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rows
from .library import (bn_relu_conv_op, bn_relu_maxpool_op, bn_relu_op, bn_relu_pool_conv_op,
                      dense_block_op)

_pair = torch.nn.modules.utils._pair
_ntuple = torch.nn.modules.utils._ntuple

# the BatchNorm of each input rank: (N, C, L), (N, C, H, W) and (N, C, D, H, W)
_BN_DIM = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_AVG_POOL = {3: nn.AvgPool1d, 4: nn.AvgPool2d, 5: nn.AvgPool3d}


# ----------------------------------------------------------------------------- hooks

def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _hook_dicts(m: nn.Module) -> tuple:
    return (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)


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


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward(-pre) or backward(-pre) hook fires on calling one of ``modules``: one
    of their own or one registered for every module."""
    return _global_hooks() or any(_own_hooks(m) for m in modules)


def hooked_within(module: nn.Module) -> bool:
    """Whether a hook fires on calling a module inside ``module`` (its own hooks fire anyway)."""
    return _global_hooks() or any(_own_hooks(m) for m in module.modules() if m is not module)


# ----------------------------------------------------------------------------- BN running statistics

def uses_batch_stats(bn) -> bool:
    # the same rule as nn.BatchNorm2d.forward (and 1d, 3d)
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def update_running_stats(norms, means, variances, n: int) -> None:
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


def _bn_ok(norm, x: torch.Tensor) -> bool:
    """Whether BN ``norm`` on ``x`` can run as one of the ops (else the module runs as it is)."""
    return (not (torch.jit.is_scripting() or torch.jit.is_tracing())
            and _BN_DIM.get(type(norm)) == x.dim()
            and not x.is_sparse and x.device.type != "meta" and x.dtype.is_floating_point
            and norm.affine)


def _bn_inputs(norm):
    """(running statistics to normalise with, whether batch statistics are used)."""
    batch = uses_batch_stats(norm)
    return ([] if batch else [norm.running_mean, norm.running_var]), batch


def _after_bn(norm, x, stats, batch: bool) -> None:
    if batch:
        s = stats.detach()
        update_running_stats([norm], [s[0]], [s[1]], x.shape[0] * rows.spatial_numel(x.shape))


# ----------------------------------------------------------------------------- dense blocks

_structure_version = 0


def note_structure_change() -> None:
    """Called by the model's layer and block classes when a child module is set or removed:
    the kept plans are worked out again."""
    global _structure_version
    _structure_version += 1


@dataclass
class _Plan:
    """What a block's structure allows, worked out once: ``layers`` and ``norms`` in order,
    whether the op computes the block at all, the rank of the inputs it takes (3, 4 or 5, from
    its BatchNorms' kind) and the hook dicts of every module inside it."""
    key: tuple
    layers: tuple
    norms: tuple
    supported: bool
    hook_dicts: tuple
    input_dim: int


_plans: "weakref.WeakKeyDictionary[nn.Module, _Plan]" = weakref.WeakKeyDictionary()


def _norms(layers):
    for layer in layers:
        yield layer.norm1
        if layer.bottleneck:
            yield layer.norm2


def _conv_fits(conv, size: int, dims: int) -> bool:
    return (isinstance(conv, nn.modules.conv._ConvNd) and len(conv.kernel_size) == dims
            and conv.bias is None and conv.groups == 1 and conv.stride == (1,) * dims
            and conv.dilation == (1,) * dims and conv.padding_mode == "zeros"
            and conv.kernel_size == (size,) * dims and conv.padding == (size // 2,) * dims)


def _supported_structure(layers, norms) -> bool:
    if not layers or not norms or type(norms[0]) not in _BN_DIM:
        return False
    if any(type(bn) is not type(norms[0]) or not bn.affine for bn in norms):
        return False
    dims = _BN_DIM[type(norms[0])] - 2
    bottleneck = layers[0].bottleneck
    for layer in layers:
        if layer.bottleneck != bottleneck:
            return False
        if not _conv_fits(layer.conv1, 1 if bottleneck else 3, dims):
            return False
        if bottleneck and not _conv_fits(layer.conv2, 3, dims):
            return False
    return True


def _make_plan(block, layers, key) -> _Plan:
    norms = tuple(_norms(layers))
    inside = [m for m in block.modules() if m is not block]
    supported = _supported_structure(layers, norms)
    return _Plan(key, layers, norms, supported, tuple(d for m in inside for d in _hook_dicts(m)),
                 _BN_DIM[type(norms[0])] if supported else 0)


def _plan(block) -> _Plan:
    layers = tuple(block.values())
    key = (_structure_version, layers)
    if torch.compiler.is_compiling():
        # worked out at trace time and guarded by dynamo; writing the cache from inside a
        # trace would make the next call's guard on the cache fail (a second compilation)
        return _make_plan(block, layers, key)
    plan = _plans.get(block)
    if plan is None or plan.key[0] != key[0] or plan.key[1] != layers:
        plan = _plans[block] = _make_plan(block, layers, key)
    return plan


def _supported(plan: _Plan, x: torch.Tensor) -> bool:
    """Whether the op computes the block on ``x`` as the plain modules do (else they run)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if not plan.supported or x.dim() != plan.input_dim:
        return False
    if x.is_sparse or x.device.type == "meta" or not x.dtype.is_floating_point:
        return False
    if _global_hooks() or any(plan.hook_dicts):
        return False
    norms = plan.norms
    # the shared statistics assume one eps and one mode per block
    return len({bn.eps for bn in norms}) == 1 and len({uses_batch_stats(bn) for bn in norms}) == 1


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _layer_params(layer) -> list[torch.Tensor]:
    p = [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
    if layer.bottleneck:
        p += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    return p


def _dropout_mask(p: float, shape, x: torch.Tensor, dtype, channels_last: bool) -> torch.Tensor:
    noise = rows.empty_like_layout(x, shape, dtype, channels_last)
    return noise.bernoulli_(1 - p) != 0


def plain_block_forward(block, x):
    for layer in block.values():
        x = torch.cat([x, layer(x)], 1)
    return x


def dense_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """Forward of ``block`` (a dense block) on ``x`` through the ``densenet::dense_block`` op; the
    same result, gradients and running statistics as the plain modules."""
    plan = _plan(block)
    if not _supported(plan, x):
        return plain_block_forward(block, x)
    layers = plan.layers
    drops = {layer.drop_rate if layer.training else 0.0 for layer in layers}
    if len(drops) != 1:
        return plain_block_forward(block, x)
    drop = drops.pop()
    bottleneck = layers[0].bottleneck
    norms = plan.norms
    batch_stats = uses_batch_stats(norms[0])
    params, running, masks = [], [], []
    cl = rows.is_channels_last(x)
    n, _, *sp = x.shape
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
                masks.append(_dropout_mask(drop, (n, layer.conv1.out_channels, *sp), x, dtype, cl))
            masks.append(_dropout_mask(drop, (n, block.growth_rate, *sp), x, dtype, cl))
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
        update_running_stats(norms, means, variances, n * rows.spatial_numel(x.shape))
    out = rows.nchw(buf.view(-1, buf.shape[-1]), n, *sp)
    return out if cl else out.contiguous()


# ----------------------------------------------------------------------------- stem, transitions, norm5

def features_forward(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``relu(features(x))`` of a DenseNet, with each BatchNorm2d that a ReLU follows (the
    ImageNet stem's norm0/relu0, and norm5 with the final ReLU) run as the ``bn_relu`` op: its
    output goes into huge-page memory, and backward reads only the BN input. The ImageNet stem's
    BN-ReLU-max-pooling is the ``bn_relu_maxpool`` op (one pass with the fused kernels)."""
    x = inference_layout(features, x)
    if hooked(features):
        return F.relu(features(x))
    return children_forward(list(features.children()), x)


def inference_layout(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout the efficient path computes ``features`` in: channels-last for CPU
    inference, else as it is."""
    if x.dim() not in (4, 5) or x.device.type != "cpu" or torch.jit.is_tracing():
        return x
    if not features.training or (x.dim() == 5 and not _drops(features)):
        # inference: the blocks keep their maps channels-last, and an NCHW input would make
        # every convolution and transition read and write NCHW copies (fresh memory, page
        # faults; 0.55-0.7x the speed, measured at batch 250-500). Training volumes without
        # dropout too: the stem's convolution then writes channels-last maps the ops read in
        # place, where an NCDHW one costs a transposed copy of the largest map of the network
        # each way (a one-channel volume is channels-last as it is). Otherwise training keeps
        # the input's layout, so that dropout draws its masks in the plain modules' layout and
        # order.
        x = rows.to_layout(x, True)
    return x


def _drops(features: nn.Module) -> bool:
    """Whether dropout is active anywhere in ``features`` (a layer's or a transition's)."""
    return any((getattr(m, "drop_rate", 0) > 0 or (type(m) is nn.Dropout and m.p > 0)) and m.training
               for m in features.modules())


def children_forward(mods: list[nn.Module], x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Consecutive children ``mods`` of a DenseNet's ``features`` applied to ``x``, then a ReLU
    if ``relu``; BN-ReLU (and the stem's BN-ReLU-max-pooling) as in :func:`features_forward`."""
    i = 0
    while i < len(mods):
        mod = mods[i]
        last = i == len(mods) - 1
        if (type(mod) in (nn.BatchNorm2d, nn.BatchNorm3d) and i + 2 < len(mods) and type(mods[i + 1]) is nn.ReLU
                and maxpool_fusable(mods[i + 2], x) and _bn_ok(mod, x)
                and not hooked(*mods[i:i + 3])):
            x = bn_relu_maxpool_forward(mod, mods[i + 2], x)
            i += 3
        elif (type(mod) in _BN_DIM and _bn_ok(mod, x)
                and (relu if last else type(mods[i + 1]) is nn.ReLU)
                and not hooked(*mods[i:i + 2])):
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


def bn_relu_maxpool_forward(norm, pool, x: torch.Tensor) -> torch.Tensor:
    """pool(relu(norm(x))) (the ImageNet stem after its convolution) as one op, for images
    and volumes."""
    running, batch = _bn_inputs(norm)
    size = _ntuple(x.dim() - 2)
    out, stats = bn_relu_maxpool_op(x, norm.weight, norm.bias, running, norm.eps, batch,
                                    list(size(pool.kernel_size)), list(size(pool.stride)),
                                    list(size(pool.padding)))
    _after_bn(norm, x, stats, batch)
    return out


def maxpool_fusable(pool, x: torch.Tensor) -> bool:
    """A max pooling the fused stem op computes as ``F.max_pool2d`` does (else the module runs,
    and raises its own errors for invalid settings)."""
    dims = x.dim() - 2
    if ({2: nn.MaxPool2d, 3: nn.MaxPool3d}.get(dims) is not type(pool) or pool.return_indices
            or pool.ceil_mode or _ntuple(dims)(pool.dilation) != (1,) * dims):
        return False
    size = _ntuple(dims)
    k, s, p = size(pool.kernel_size), size(pool.stride), size(pool.padding)
    if not all(kk > 0 and ss > 0 and 0 <= pp <= kk // 2 for kk, ss, pp in zip(k, s, p)):
        return False
    from .bn import pooled_size
    return min(pooled_size(*x.shape[2:], k, s, p)) >= 1


def transition_forward(trans, x: torch.Tensor) -> torch.Tensor:
    """Forward of a transition (BN-ReLU-Conv1x1 [dropout] AvgPool): the BN-ReLU-Conv1x1 part as
    one op that recomputes BN-ReLU in backward, like the block's layers; without active dropout,
    with the pooling before the convolution (``bn_relu_pool_conv``; a 1-D map goes through it
    as an image of height 1)."""
    norm, conv, pool = trans.norm, trans.conv, trans.pool
    dims = x.dim() - 2
    if (not _bn_ok(norm, x) or hooked_within(trans) or not _conv_fits(conv, 1, dims)):
        return nn.Sequential.forward(trans, x)
    running, batch = _bn_inputs(norm)
    if (type(pool) is _AVG_POOL[x.dim()] and getattr(pool, "divisor_override", None) is None
            and not _dropout_active(trans)):
        size = _ntuple(dims)
        kernel, stride, padding = (list(size(v)) for v in (pool.kernel_size, pool.stride, pool.padding))
        xin, weight = x, conv.weight
        if dims == 1:
            xin, weight = x.unsqueeze(2), weight.unsqueeze(2)
            kernel, stride, padding = [1, *kernel], [1, *stride], [0, *padding]
        out, stats = bn_relu_pool_conv_op(xin, norm.weight, norm.bias, running, norm.eps, batch,
                                          weight, kernel, stride, padding, pool.ceil_mode,
                                          pool.count_include_pad)
        _after_bn(norm, x, stats, batch)
        return out.squeeze(2) if dims == 1 else out
    y, stats = bn_relu_conv_op(x, norm.weight, norm.bias, running, norm.eps, batch, conv.weight)
    _after_bn(norm, x, stats, batch)
    if hasattr(trans, "drop"):
        y = trans.drop(y)
    return pool(y)


def _dropout_active(trans) -> bool:
    drop = getattr(trans, "drop", None)
    return drop is not None and drop.training and drop.p > 0
