"""The engine's element-wise passes as registered operators, one kernel per device.

The dense block, the transitions and the stem spend everything outside their convolutions in a
few element-wise passes over (M, C) row matrices (channel slices of a block's channels-last
buffer: unit column stride, any row stride):

=======================  ================================================================
op (``densenet::``)      computes
=======================  ================================================================
``fused_bn_relu``        out = relu(x * scale + shift)
``fused_bn_relu_grad``   g' = g where x * scale + shift > 0, else 0 (g may be overwritten
                         with it); sums[0] += column sums of g', sums[1] += of (x - mean) g';
                         optionally dx (+)= g' * scale and z = relu(x * scale + shift)
``fused_bn_grad_apply``  out = scale * (g' - a - (x - mean) * b), BN's input gradient
``fused_col_affine_add`` out = src + x * coef + cst (BN's batch-statistics corrections)
``fused_col_stats``      per-column mean and biased variance
``fused_col_stats_acc``  the same merged into a running (count, mean, M2) state (row chunks)
``fused_copy_cols``      dst = src (a block layer's new maps into its buffer slice)
``fused_bn_relu_maxpool`` max pooling of relu(x * scale + shift) over NHWC images, and its
                         backward ``fused_bn_relu_maxpool_grad`` (BN's output gradient, sums)
=======================  ================================================================

Each op is declared once with a schema (mutated arguments marked ``!``), as torchvision
declares its ops, and has a default implementation in torch ops that runs on any device and
dtype (``CompositeExplicitAutograd``). The fused kernels are registered per dispatch key:
the C kernels (:mod:`densenet.ops.cpu`) for ``CPU``, the Triton kernels
(:mod:`densenet.ops.cuda`) for ``CUDA``, so the dispatcher picks the backend from the tensors'
device. A backend kernel hands the call to the default where its backend cannot run: turned off
in :mod:`densenet.backends`, no C compiler, no Triton, or a dtype it does not take (the C
kernels take float32, float64 and bfloat16; Triton float32, bfloat16 and float16).

These ops run inside the block, transition and stem ops (:mod:`densenet.ops.library`), which
autograd, autocast, ``torch.compile`` and ``torch.export`` see as single ops; so they need
neither autograd formulas nor fake implementations, and ``torch.library.triton_op`` would not
help ``torch.compile`` here (it never traces into them). The Python wrappers below call each
op's overload directly (1-2 us of dispatch a call, measured, against about 5 us through
``torch.library.custom_op``; a CPU training step of DenseNet-BC-100 makes about 1,500 calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends

LIB = torch.library.Library("densenet", "FRAGMENT")

SCHEMAS = {
    "fused_bn_relu": "(Tensor x, Tensor scale, Tensor shift, Tensor(a!) out) -> ()",
    "fused_bn_relu_grad": "(Tensor x, Tensor(a!) g, Tensor scale, Tensor shift, Tensor mean, "
                          "Tensor(b!)? dx, Tensor(c!) sums, Tensor(d!)? z, bool assign, "
                          "Tensor(e!)? tmp) -> ()",
    "fused_bn_grad_apply": "(Tensor x, Tensor g, Tensor scale, Tensor shift, Tensor mean, Tensor a, "
                           "Tensor b, Tensor(a!) out, Tensor(b!)? tmp) -> ()",
    "fused_col_affine_add": "(Tensor x, Tensor coef, Tensor cst, Tensor src, Tensor(a!) out) -> ()",
    "fused_col_stats": "(Tensor x, float eps) -> (Tensor, Tensor)",
    "fused_col_stats_acc": "(Tensor x, Tensor(a!) state) -> ()",
    "fused_copy_cols": "(Tensor src, Tensor(a!) dst) -> ()",
    "fused_bn_relu_maxpool": "(Tensor x, Tensor scale, Tensor shift, int[2] kernel, int[2] stride, "
                             "int[2] padding, Tensor(a!) out) -> ()",
    "fused_bn_relu_maxpool_grad": "(Tensor x, Tensor scale, Tensor shift, Tensor mean, int[2] kernel, "
                                  "int[2] stride, int[2] padding, Tensor gout, Tensor(a!) dx, "
                                  "Tensor(b!) sums) -> ()",
}


# ----------------------------------------------------------------------------- torch-op defaults

def _low_precision(x: torch.Tensor) -> bool:
    return x.dtype not in (torch.float32, torch.float64)


def bn_relu_default(x, scale, shift, out):
    torch.addcmul(shift, x, scale, out=out).relu_()


def bn_relu_grad_default(x, g, scale, shift, mean, dx, sums, z, assign, tmp):
    if z is not None:
        bn_relu_default(x, scale, shift, z)
    if tmp is None or tmp is z:
        tmp = torch.empty_like(x)
    g.mul_(torch.addcmul(shift, x, scale, out=tmp).relu_().sign_())
    if _low_precision(x):  # bf16/fp16 maps: products and sums in float32, as BatchNorm's own backward
        sums[0] += g.sum(0, dtype=torch.float32)
        sums[1] += (x.float() - mean).mul_(g).sum(0)
    else:
        sums[0] += g.sum(0)
        sums[1] += torch.sub(x, mean, out=tmp).mul_(g).sum(0)
    if dx is not None:
        if assign:
            torch.mul(g, scale, out=dx)
        else:
            dx.addcmul_(g, scale)


def bn_grad_apply_default(x, g, scale, shift, mean, a, b, out, tmp):
    if tmp is None:
        tmp = torch.empty_like(x)
    keep = torch.addcmul(shift, x, scale, out=tmp).gt_(0)  # g may come masked or not
    if out is not g:
        out.copy_(g)
    out.mul_(keep)
    torch.sub(x, mean, out=tmp).mul_(b).add_(a)
    out.sub_(tmp).mul_(scale)


def col_affine_add_default(x, coef, cst, src, out):
    if out is not src:
        out.copy_(src)
    out.addcmul_(x, coef).add_(cst)


def col_stats_default(x, eps):
    """By BatchNorm's own statistics pass on the matrix seen as a (1, C, M, 1) image: var_mean
    over rows was 8% of a CPU training step, this several times faster on such input."""
    if _low_precision(x):
        x = x.float()
    _, mean, invstd = torch.native_batch_norm(_as_map(x), None, None, None, None, True, 0.0, eps)
    return mean, invstd.pow(-2).sub_(eps)


def col_stats_acc_default(x, state):
    """Chan et al.'s pairwise merge of the chunk's (count, mean, M2) into ``state``, in float64
    tensor ops (no value read back to the host)."""
    c = x.shape[1]
    if x.shape[0] == 0:
        return
    var, mean = torch.var_mean(x.double(), 0, correction=0)
    r = float(x.shape[0])
    count, mu, m2 = state[0], state[1:1 + c], state[1 + c:]
    total = count + r
    d = mean - mu
    mu.add_(d * (r / total))
    m2.add_(var * r + d * d * (count * r / total))
    state[0] = total


def copy_cols_default(src, dst):
    dst.copy_(src)


def bn_relu_maxpool_default(x, scale, shift, kernel, stride, padding, out):
    z = torch.addcmul(shift, x, scale).relu_()
    pooled = F.max_pool2d(z.permute(0, 3, 1, 2), kernel, stride, padding)
    out.copy_(pooled.permute(0, 2, 3, 1))


def bn_relu_maxpool_grad_default(x, scale, shift, mean, kernel, stride, padding, gout, dx, sums):
    """The gradient routed to each window's first maximum, as max pooling routes it, and kept
    where that maximum is positive (the ReLU mask)."""
    z = torch.addcmul(shift, x, scale).relu_()
    zi = z.permute(0, 3, 1, 2)
    _, idx = F.max_pool2d(zi, kernel, stride, padding, return_indices=True)
    gz = torch.ops.aten.max_pool2d_with_indices_backward(gout.permute(0, 3, 1, 2), zi, kernel, stride,
                                                         padding, [1, 1], False, idx)
    dx.copy_(gz.permute(0, 2, 3, 1)).mul_(z > 0)
    g = dx.reshape(-1, x.shape[-1])
    xm = x.reshape(-1, x.shape[-1])
    acc = torch.float32 if _low_precision(x) else x.dtype
    sums[0] += g.sum(0, dtype=acc)
    sums[1] += (xm.to(acc) - mean).mul_(g).sum(0)


def _as_map(t2d):
    return t2d.view(1, t2d.shape[0], 1, t2d.shape[1]).permute(0, 3, 1, 2)


DEFAULTS = {
    "fused_bn_relu": bn_relu_default,
    "fused_bn_relu_grad": bn_relu_grad_default,
    "fused_bn_grad_apply": bn_grad_apply_default,
    "fused_col_affine_add": col_affine_add_default,
    "fused_col_stats": col_stats_default,
    "fused_col_stats_acc": col_stats_acc_default,
    "fused_copy_cols": copy_cols_default,
    "fused_bn_relu_maxpool": bn_relu_maxpool_default,
    "fused_bn_relu_maxpool_grad": bn_relu_maxpool_grad_default,
}

for _name, _schema in SCHEMAS.items():
    LIB.define(_name + _schema)
    LIB.impl(_name, DEFAULTS[_name], "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------- backend kernels

def _block_passes(mod) -> dict:
    """The four passes of the block's inner loops, which both backends have, by op: ``mod``'s
    functions of the op's arguments (the torch-op defaults' scratch ``tmp`` dropped)."""
    return {
        "fused_bn_relu": lambda x, scale, shift, out: mod.bn_relu(x, scale, shift, out),
        "fused_bn_relu_grad": lambda x, g, scale, shift, mean, dx, sums, z, assign, tmp:
            mod.bn_relu_grad(x, g, scale, shift, mean, dx, sums, z, assign),
        "fused_bn_grad_apply": lambda x, g, scale, shift, mean, a, b, out, tmp:
            mod.bn_grad_apply(x, g, scale, shift, mean, a, b, out),
        "fused_col_affine_add": lambda x, coef, cst, src, out: mod.col_affine_add(x, coef, cst, src, out),
    }


def _cpu_kernels() -> dict:
    """The C kernels by op: the block's passes, the statistics, the copy and the stem's pass."""
    from . import cpu
    return {
        **_block_passes(cpu),
        "fused_col_stats": lambda x, eps: cpu.col_stats(x),
        "fused_col_stats_acc": lambda x, state: cpu.col_stats(x, state),
        "fused_copy_cols": lambda src, dst: cpu.copy_cols(src, dst),
        "fused_bn_relu_maxpool": lambda x, scale, shift, kernel, stride, padding, out:
            cpu.bn_relu_maxpool(x, scale, shift, kernel, stride, padding, out),
        "fused_bn_relu_maxpool_grad": lambda x, scale, shift, mean, kernel, stride, padding, gout, dx, sums:
            cpu.bn_relu_maxpool_grad(x, scale, shift, mean, kernel, stride, padding, gout, dx, sums),
    }, cpu.available  # reads densenet.backends.cpu_kernels too


def _cuda_kernels() -> dict:
    """The Triton kernels by op (the four passes of the block's inner loops)."""
    from . import cuda
    return _block_passes(cuda), lambda t: backends.triton and cuda.available(t)


def _dispatching(name: str, kernel, usable):
    default = DEFAULTS[name]
    writes_only = SCHEMAS[name].endswith("-> ()")  # an op that only writes its "!" arguments returns None

    def run(*args):
        out = kernel(*args) if usable(args[0]) else default(*args)
        return None if writes_only else out
    run.__name__ = f"{name}_kernel"
    return run


def register_kernels(key: str, kernels: dict, usable) -> None:
    """Register ``kernels`` (op name -> function of the op's arguments) for dispatch key
    ``key`` ("CPU", "CUDA"); each hands back to the default where ``usable(first tensor)`` is
    False. Registering again for a key replaces the kernels (the interpreted Triton test
    registers the Triton kernels for CPU tensors this way)."""
    lib = torch.library.Library("densenet", "IMPL")
    for name, kernel in kernels.items():
        lib.impl(name, _dispatching(name, kernel, usable), key, allow_override=True)
    _IMPL_LIBS[key] = lib  # a Library unregisters its kernels when it is collected


_IMPL_LIBS: dict = {}
register_kernels("CPU", *_cpu_kernels())
register_kernels("CUDA", *_cuda_kernels())


# ----------------------------------------------------------------------------- calling them

_ops = torch.ops.densenet


def bn_relu(x, scale, shift, out):
    _ops.fused_bn_relu.default(x, scale, shift, out)
    return out


def bn_relu_grad(x, g, scale, shift, mean, dx=None, sums=None, z=None, assign=False, tmp=None):
    """Adds the sums of g' and (x - mean) g' to ``sums`` (float64 (2, C), zeros if None) and
    returns it; see the table above. ``tmp`` is scratch shaped like ``x`` for the default."""
    if sums is None:
        sums = torch.zeros(2, x.shape[1], dtype=torch.float64, device=x.device)
    _ops.fused_bn_relu_grad.default(x, g, scale, shift, mean, dx, sums, z, assign, tmp)
    return sums


def bn_grad_apply(x, g, scale, shift, mean, a, b, out, tmp=None):
    _ops.fused_bn_grad_apply.default(x, g, scale, shift, mean, a, b, out, tmp)
    return out


def col_affine_add(x, coef, cst, src, out):
    _ops.fused_col_affine_add.default(x, coef, cst, src, out)
    return out


def col_stats(x, eps: float):
    """(mean, biased variance) of the columns of ``x``, in float32 for bf16/fp16 maps."""
    return _ops.fused_col_stats.default(x, eps)


def stats_state(c: int, device) -> torch.Tensor:
    """An empty (count, mean[c], M2[c]) float64 state for ``col_stats_acc``."""
    return torch.zeros(1 + 2 * c, dtype=torch.float64, device=device)


def col_stats_acc(x, state):
    _ops.fused_col_stats_acc.default(x, state)
    return state


def stats_from_state(state: torch.Tensor, dtype):
    """(mean, biased variance) from a ``col_stats_acc`` state, without reading it on the host."""
    c = (state.numel() - 1) // 2
    return state[1:1 + c].to(dtype), (state[1 + c:] / state[0].clamp_min(1.0)).to(dtype)


def copy_cols(src, dst):
    _ops.fused_copy_cols.default(src, dst)
    return dst


def bn_relu_maxpool(x, scale, shift, kernel, stride, padding, out):
    _ops.fused_bn_relu_maxpool.default(x, scale, shift, list(kernel), list(stride), list(padding), out)
    return out


def bn_relu_maxpool_grad(x, scale, shift, mean, kernel, stride, padding, gout, dx, sums=None):
    if sums is None:
        sums = torch.zeros(2, x.shape[-1], dtype=torch.float64, device=x.device)
    _ops.fused_bn_relu_maxpool_grad.default(x, scale, shift, mean, list(kernel), list(stride),
                                            list(padding), gout, dx, sums)
    return sums
