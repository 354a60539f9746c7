"""The element-wise passes on a GPU as fused Triton kernels (the ``CUDA`` kernels of
:mod:`densenet.ops.elementwise`).

Four passes on (M, C) matrices - channel slices of a block's channels-last buffer, so rows are
strided and columns contiguous:

* ``bn_relu``: out = relu(x * scale + shift);
* ``bn_relu_grad``: the ReLU mask applied to the gradient g (written back as g'), the two BN
  gradient sums of g' and (x - mean) * g' per channel, dx += g' * scale, and optionally
  relu(x * scale + shift) recomputed for a weight gradient - one read of x and g;
* ``bn_grad_apply``: out = scale * (g' - a - (x - mean) * b), BN's input gradient from its sums;
* ``col_affine_add``: out = src + x * coef + const, the shared BN mean corrections.

As torch ops these take 2-8 passes each over the matrices; here one. Arithmetic is float32
whatever the maps' dtype (float32, bfloat16, float16), as BatchNorm's own kernels do. The
channel sums are reduced per block of rows into a (row blocks, 2, C) float32 array and then
summed by torch, not with atomics, so a step gives the same result every time. No kernel
reads a value back to the host, so a training step stays capturable in a CUDA graph.

Every wrapper checks shapes, dtypes, strides and devices first and raises ValueError naming the
kernel and the argument (:mod:`densenet.ops.checks`), so no launch can index out of bounds.
Every launch goes through :data:`LAUNCHES`, which lists each kernel's parameters and the
constexpr combinations the wrappers use: the tests compile every kernel from it for real GPU
targets (sm_80, sm_90) on a machine without a GPU. Under Triton's interpreter
(``TRITON_INTERPRET=1`` in the environment before this module is imported) the kernels run on
CPU tensors, which is how their arithmetic is tested without a GPU.
"""

from __future__ import annotations

import itertools
import os

import torch

from .checks import mat, vecs

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU-only wheels come without Triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"  # where the kernels' tensors live
TYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_M, BLOCK_C = 64, 32  # rows x channels per program (not tuned on a GPU)


def available(t: torch.Tensor | None = None) -> bool:
    """True when the kernels can run on ``t`` (a CUDA float32/bfloat16/float16 tensor, Triton
    importable); ``densenet.backends.triton`` is checked where the kernels are registered."""
    if triton is None:
        return False
    return t is None or (t.device.type == DEVICE and t.dtype in TYPES)


if triton is not None:
    @triton.jit
    def _tile(pid_m, pid_c, M, C, BM: tl.constexpr, BC: tl.constexpr):
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rc = pid_c * BC + tl.arange(0, BC)
        return rm, rc, (rm[:, None] < M) & (rc[None, :] < C), rc < C

    @triton.jit
    def _bn_relu_kernel(x_ptr, ldx, scale_ptr, shift_ptr, out_ptr, ldo, M, C,
                        BM: tl.constexpr, BC: tl.constexpr):
        rm, rc, mask, cmask = _tile(tl.program_id(0), tl.program_id(1), M, C, BM, BC)
        x = tl.load(x_ptr + rm[:, None] * ldx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + rc, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + rc, mask=cmask, other=0.0)
        y = tl.maximum(x * scale[None, :] + shift[None, :], 0.0)
        tl.store(out_ptr + rm[:, None] * ldo + rc[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bn_relu_grad_kernel(x_ptr, ldx, g_ptr, ldg, scale_ptr, shift_ptr, mean_ptr, dx_ptr, lddx,
                             z_ptr, ldz, part_ptr, M, C, HAS_DX: tl.constexpr,
                             ASSIGN: tl.constexpr, HAS_Z: tl.constexpr, BM: tl.constexpr,
                             BC: tl.constexpr):
        pid_m = tl.program_id(0)
        rm, rc, mask, cmask = _tile(pid_m, tl.program_id(1), M, C, BM, BC)
        x = tl.load(x_ptr + rm[:, None] * ldx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rm[:, None] * ldg + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + rc, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + rc, mask=cmask, other=0.0)
        mean = tl.load(mean_ptr + rc, mask=cmask, other=0.0)
        a = x * scale[None, :] + shift[None, :]
        g = tl.where(a > 0.0, g, 0.0)  # zero outside the tile too: g loaded as 0 there
        tl.store(g_ptr + rm[:, None] * ldg + rc[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:
            tl.store(z_ptr + rm[:, None] * ldz + rc[None, :],
                     tl.maximum(a, 0.0).to(z_ptr.dtype.element_ty), mask=mask)
        if HAS_DX:
            d = g * scale[None, :]
            if not ASSIGN:
                d += tl.load(dx_ptr + rm[:, None] * lddx + rc[None, :], mask=mask,
                             other=0.0).to(tl.float32)
            tl.store(dx_ptr + rm[:, None] * lddx + rc[None, :], d.to(dx_ptr.dtype.element_ty),
                     mask=mask)
        row = part_ptr + pid_m.to(tl.int64) * 2 * C
        tl.store(row + rc, tl.sum(g, axis=0), mask=cmask)
        tl.store(row + C + rc, tl.sum((x - mean[None, :]) * g, axis=0), mask=cmask)

    @triton.jit
    def _bn_grad_apply_kernel(x_ptr, ldx, g_ptr, ldg, scale_ptr, shift_ptr, mean_ptr, a_ptr, b_ptr,
                              out_ptr, ldo, M, C, BM: tl.constexpr, BC: tl.constexpr):
        rm, rc, mask, cmask = _tile(tl.program_id(0), tl.program_id(1), M, C, BM, BC)
        x = tl.load(x_ptr + rm[:, None] * ldx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rm[:, None] * ldg + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + rc, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + rc, mask=cmask, other=0.0)
        mean = tl.load(mean_ptr + rc, mask=cmask, other=0.0)
        a = tl.load(a_ptr + rc, mask=cmask, other=0.0)
        b = tl.load(b_ptr + rc, mask=cmask, other=0.0)
        g = tl.where(x * scale[None, :] + shift[None, :] > 0.0, g, 0.0)
        y = scale[None, :] * (g - a[None, :] - (x - mean[None, :]) * b[None, :])
        tl.store(out_ptr + rm[:, None] * ldo + rc[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _affine_add_kernel(x_ptr, ldx, coef_ptr, const_ptr, src_ptr, lds, out_ptr, ldo, M, C,
                           BM: tl.constexpr, BC: tl.constexpr):
        rm, rc, mask, cmask = _tile(tl.program_id(0), tl.program_id(1), M, C, BM, BC)
        x = tl.load(x_ptr + rm[:, None] * ldx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        src = tl.load(src_ptr + rm[:, None] * lds + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        coef = tl.load(coef_ptr + rc, mask=cmask, other=0.0)
        const = tl.load(const_ptr + rc, mask=cmask, other=0.0)
        y = src + x * coef[None, :] + const[None, :]
        tl.store(out_ptr + rm[:, None] * ldo + rc[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# Every kernel's parameters in order, by kind: "map" (a matrix pointer of the maps' dtype),
# "f32" (a float32 pointer: per-channel vectors, the partial sums), "int" (a stride or size),
# "constexpr"; and the constexpr combinations the wrappers launch it with. The wrappers take
# their constexprs from here, and tests/test_triton_compile.py compiles every combination.
_BLOCKS = {"BM": BLOCK_M, "BC": BLOCK_C}
LAUNCHES = {
    "bn_relu": dict(kernel="_bn_relu_kernel", params=[
        ("x_ptr", "map"), ("ldx", "int"), ("scale_ptr", "f32"), ("shift_ptr", "f32"),
        ("out_ptr", "map"), ("ldo", "int"), ("M", "int"), ("C", "int"),
        ("BM", "constexpr"), ("BC", "constexpr")],
        constexprs=[dict(_BLOCKS)]),
    "bn_relu_grad": dict(kernel="_bn_relu_grad_kernel", params=[
        ("x_ptr", "map"), ("ldx", "int"), ("g_ptr", "map"), ("ldg", "int"), ("scale_ptr", "f32"),
        ("shift_ptr", "f32"), ("mean_ptr", "f32"), ("dx_ptr", "map"), ("lddx", "int"),
        ("z_ptr", "map"), ("ldz", "int"), ("part_ptr", "f32"), ("M", "int"), ("C", "int"),
        ("HAS_DX", "constexpr"), ("ASSIGN", "constexpr"), ("HAS_Z", "constexpr"),
        ("BM", "constexpr"), ("BC", "constexpr")],
        # ASSIGN only means something with dx: the wrapper passes it as (assign and dx given)
        constexprs=[dict(HAS_DX=dx, ASSIGN=assign, HAS_Z=z, **_BLOCKS)
                    for dx, z in itertools.product((False, True), (False, True))
                    for assign in ((False, True) if dx else (False,))]),
    "bn_grad_apply": dict(kernel="_bn_grad_apply_kernel", params=[
        ("x_ptr", "map"), ("ldx", "int"), ("g_ptr", "map"), ("ldg", "int"), ("scale_ptr", "f32"),
        ("shift_ptr", "f32"), ("mean_ptr", "f32"), ("a_ptr", "f32"), ("b_ptr", "f32"),
        ("out_ptr", "map"), ("ldo", "int"), ("M", "int"), ("C", "int"),
        ("BM", "constexpr"), ("BC", "constexpr")],
        constexprs=[dict(_BLOCKS)]),
    "col_affine_add": dict(kernel="_affine_add_kernel", params=[
        ("x_ptr", "map"), ("ldx", "int"), ("coef_ptr", "f32"), ("const_ptr", "f32"),
        ("src_ptr", "map"), ("lds", "int"), ("out_ptr", "map"), ("ldo", "int"), ("M", "int"),
        ("C", "int"), ("BM", "constexpr"), ("BC", "constexpr")],
        constexprs=[dict(_BLOCKS)]),
}


def _launch(name: str, m: int, c: int, *args, **flags) -> None:
    """Launch kernel ``name`` over an (m, c) matrix with the runtime ``args`` (in the order of
    its parameters) and the constexprs of the combination ``flags`` selects."""
    spec = LAUNCHES[name]
    constexprs = dict(_BLOCKS, **flags)
    if constexprs not in spec["constexprs"]:
        raise ValueError(f"{name}: no compiled combination {flags}")
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(c, BLOCK_C))
    globals()[spec["kernel"]][grid](*args, **constexprs)


def _check(name: str, x) -> int:
    if triton is None:
        raise RuntimeError(f"{name}: Triton is not installed (it comes with PyTorch's CUDA wheels)")
    return mat(name, "x", x, types=TYPES, device=DEVICE)


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = relu(x * scale + shift), column-wise scale and shift."""
    name = "bn_relu"
    ldx = _check(name, x)
    ldo = mat(name, "out", out, x, write=True, types=TYPES, device=DEVICE)
    scale, shift = vecs(name, x, torch.float32, scale=scale, shift=shift)
    m, c = x.shape
    if m and c:
        _launch(name, m, c, x, ldx, scale, shift, out, ldo, m, c)
    return out


def bn_relu_grad(x, g, scale, shift, mean, dx=None, sums=None, z=None, assign=False):
    """For g, the gradient at relu(x * scale + shift): g is overwritten with g' (g where
    x * scale + shift > 0, else 0); the column sums of g' and of (x - mean) * g' are added to
    ``sums`` (a (2, C) float tensor, zeros if not given), which is returned; with ``dx``,
    dx += g' * scale (dx = g' * scale with ``assign``); with ``z``, z = relu(x * scale + shift)."""
    name = "bn_relu_grad"
    ldx = _check(name, x)
    ldg = mat(name, "g", g, x, write=True, types=TYPES, device=DEVICE)
    lddx = mat(name, "dx", dx, x, write=True, types=TYPES, device=DEVICE) if dx is not None else 0
    ldz = mat(name, "z", z, x, write=True, types=TYPES, device=DEVICE) if z is not None else 0
    scale, shift, mean = vecs(name, x, torch.float32, scale=scale, shift=shift, mean=mean)
    m, c = x.shape
    if sums is None:
        sums = torch.zeros(2, c, dtype=torch.float64, device=x.device)
    elif (not isinstance(sums, torch.Tensor) or sums.shape != (2, c) or sums.device != x.device
          or not sums.is_floating_point()):
        raise ValueError(f"{name}: sums must be a floating (2, {c}) tensor on {x.device}, got "
                         f"{tuple(sums.shape) if isinstance(sums, torch.Tensor) else type(sums).__name__}")
    if m and c:
        part = torch.empty(triton.cdiv(m, BLOCK_M), 2, c, dtype=torch.float32, device=x.device)
        _launch(name, m, c, x, ldx, g, ldg, scale, shift, mean, dx if dx is not None else x, lddx,
                z if z is not None else x, ldz, part, m, c, HAS_DX=dx is not None,
                ASSIGN=bool(assign) and dx is not None, HAS_Z=z is not None)
        sums += part.sum(0)
    elif dx is not None and assign:
        dx.zero_()
    return sums


def bn_grad_apply(x, g, scale, shift, mean, a, b, out):
    """out = scale * (g' - a - (x - mean) * b), g' as in ``bn_relu_grad``; ``out`` may be ``g``."""
    name = "bn_grad_apply"
    ldx = _check(name, x)
    ldg = mat(name, "g", g, x, types=TYPES, device=DEVICE)
    ldo = mat(name, "out", out, x, write=True, types=TYPES, device=DEVICE)
    vectors = vecs(name, x, torch.float32, scale=scale, shift=shift, mean=mean, a=a, b=b)
    m, c = x.shape
    if m and c:
        _launch(name, m, c, x, ldx, g, ldg, *vectors, out, ldo, m, c)
    return out


def col_affine_add(x, coef, const, src, out):
    """out = src + x * coef + const, column-wise coef and const; ``out`` may be ``src``."""
    name = "col_affine_add"
    ldx = _check(name, x)
    lds = mat(name, "src", src, x, types=TYPES, device=DEVICE)
    ldo = mat(name, "out", out, x, write=True, types=TYPES, device=DEVICE)
    coef, const = vecs(name, x, torch.float32, coef=coef, const=const)
    m, c = x.shape
    if m and c:
        _launch(name, m, c, x, ldx, coef, const, src, lds, out, ldo, m, c)
    return out
