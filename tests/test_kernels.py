"""The compiled CPU kernels (densenet/ops/cpu.py, C in densenet/ops/csrc) against the torch ops they
replace, their header-declared signatures, and the large-buffer pool (densenet/ops/buffers.py)."""

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densenet import backends
from densenet.ops import buffers
from densenet.ops import cpu as kernels

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None,
                              reason="no C compiler on this machine: the kernels cannot be built")

DTYPES = [torch.float32, torch.float64]  # bfloat16: its own tests below
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _matrix(m, c, ld, dtype, offset=0.0):
    """An (m, c) column slice of an (m, ld) row-major buffer, like a block buffer's prefix."""
    return (torch.randn(m, ld, dtype=dtype) + offset)[:, :c]


def _close(got, want, dtype):
    scale = want.abs().max().clamp_min(1e-30)
    assert ((got - want).abs().max() / scale).item() < TOL[dtype]


@needs_cc
def test_kernels_are_built_and_loaded_here():
    assert kernels.available(torch.zeros(1)), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None
    assert kernels.available(torch.zeros(1, dtype=torch.bfloat16))
    assert not kernels.available(torch.zeros(1, dtype=torch.float16))  # float32/float64/bfloat16


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c,ld", [(1, 1, 1), (257, 13, 40), (1000, 48, 48), (3001, 70, 133)])
def test_bn_relu_and_its_gradient_match_torch(dtype, m, c, ld):
    torch.manual_seed(m)
    x = _matrix(m, c, ld, dtype)
    g = _matrix(m, c, c + 3, dtype)
    scale, shift, mean = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    pre = x * scale + shift
    z = torch.empty(m, c, dtype=dtype)
    kernels.bn_relu(x, scale, shift, z)
    _close(z, pre.relu(), dtype)

    gm = g * (pre > 0)
    dx_buf = torch.randn(m, ld + 2, dtype=dtype)
    dx_before = dx_buf.clone()
    z2 = torch.full((m, c), float("nan"), dtype=dtype)
    sums = torch.ones(2, c, dtype=torch.float64)  # accumulated into
    kernels.bn_relu_grad(x, g, scale, shift, mean, dx=dx_buf[:, 1:c + 1], sums=sums, z=z2)
    _close(sums[0] - 1, gm.sum(0).double(), dtype)
    _close(sums[1] - 1, ((x - mean) * gm).sum(0).double(), dtype)
    _close(dx_buf[:, 1:c + 1], dx_before[:, 1:c + 1] + gm * scale, dtype)
    assert torch.equal(dx_buf[:, 0], dx_before[:, 0]) and torch.equal(dx_buf[:, c + 1:], dx_before[:, c + 1:])
    _close(z2, pre.relu(), dtype)
    kernels.bn_relu_grad(x, g, scale, shift, mean, dx=dx_buf[:, 1:c + 1], assign=True)  # dx = g' * scale
    _close(dx_buf[:, 1:c + 1], gm * scale, dtype)

    a, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    out = g.clone()
    kernels.bn_grad_apply(x, out, scale, shift, mean, a, b, out)  # in place
    _close(out, scale * (gm - a - (x - mean) * b), dtype)


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@needs_cc
@pytest.mark.parametrize("m,c,ld", [(1, 1, 1), (257, 13, 40), (3001, 70, 133)])
def test_bfloat16_maps_are_computed_in_float32_and_rounded_once(m, c, ld):
    # bfloat16 maps, float32 per-column vectors (as under autocast): every element-wise output
    # is exactly the float32 formula rounded to bfloat16 (to nearest even, as torch rounds)
    torch.manual_seed(m)
    bf = torch.bfloat16
    x, g = _matrix(m, c, ld, bf), _matrix(m, c, c + 3, bf)
    xf, gf = x.float(), g.float()
    scale, shift, mean = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    pre = xf * scale + shift
    gm = torch.where(pre > 0, gf, 0)
    z = torch.empty(m, c, dtype=bf)
    assert torch.equal(kernels.bn_relu(x, scale, shift, z), pre.relu().to(bf))

    dx_buf = torch.randn(m, ld + 2).to(bf)
    dx_before = dx_buf.clone()
    z2 = torch.full((m, c), float("nan"), dtype=bf)
    sums = kernels.bn_relu_grad(x, g, scale, shift, mean, dx=dx_buf[:, 1:c + 1], z=z2)
    assert _rel(sums[0], gm.double().sum(0)) < 1e-5  # float32 partial sums, float64 totals
    assert _rel(sums[1], ((xf.double() - mean.double()) * gm.double()).sum(0)) < 1e-5
    assert torch.equal(dx_buf[:, 1:c + 1], (dx_before[:, 1:c + 1].float() + gm * scale).to(bf))
    assert torch.equal(dx_buf[:, 0], dx_before[:, 0]) and torch.equal(dx_buf[:, c + 1:], dx_before[:, c + 1:])
    assert torch.equal(z2, pre.relu().to(bf))
    kernels.bn_relu_grad(x, g, scale, shift, mean, dx=dx_buf[:, 1:c + 1], assign=True)
    assert torch.equal(dx_buf[:, 1:c + 1], (gm * scale).to(bf))

    a, b = torch.randn(c), torch.randn(c)
    out = g.clone()
    kernels.bn_grad_apply(x, out, scale, shift, mean, a, b, out)
    assert torch.equal(out, (scale * (gm - a - (xf - mean) * b)).to(bf))
    src = _matrix(m, c, ld, bf)
    assert torch.equal(kernels.col_affine_add(x, a, b, src, torch.empty(m, c, dtype=bf)),
                       (src.float() + xf * a + b).to(bf))
    mu, var = kernels.col_stats(x)
    assert mu.dtype == var.dtype == torch.float32  # statistics of bfloat16 maps in float32
    assert _rel(mu, xf.double().mean(0)) < 1e-6 and _rel(var, xf.double().var(0, unbiased=False)) < 1e-6
    dst = torch.zeros(m, c, dtype=bf)
    assert torch.equal(kernels.copy_cols(x, dst), x)


@needs_cc
def test_bfloat16_rounding_is_torchs_including_nan_and_overflow():
    v = torch.tensor([[float("nan"), float("inf"), -float("inf"), 3.3895e38, 1.00390625, 1.01171875,
                       -2.5e-39, 0.0]])
    zero = torch.zeros(v.shape[1])
    got = kernels.col_affine_add(torch.zeros_like(v).bfloat16(), zero, v[0], torch.zeros_like(v).bfloat16(),
                                 torch.empty_like(v).bfloat16())
    want = v.bfloat16()
    assert torch.isnan(got[0, 0])  # (torch's own NaN bits differ between its code paths)
    assert torch.equal(got[:, 1:].view(torch.int16), want[:, 1:].view(torch.int16))  # bit for bit


@needs_cc
@pytest.mark.parametrize("n,h,w,c,k,s,p", [(2, 9, 7, 5, 3, 2, 1), (1, 5, 6, 3, 2, 2, 0)])
def test_bfloat16_stem_pooling_matches_the_float32_formula(n, h, w, c, k, s, p):
    torch.manual_seed(n * h * w)
    bf = torch.bfloat16
    x = torch.randn(n, h, w, c).to(bf)
    scale, shift, mean = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    xt = x.float().permute(0, 3, 1, 2).requires_grad_(True)
    ref = F.max_pool2d((xt * scale[:, None, None] + shift[:, None, None]).relu(), k, s, p)
    oh, ow = ref.shape[-2:]
    out = torch.empty(n, oh, ow, c, dtype=bf)
    kernels.bn_relu_maxpool(x, scale, shift, (k, k), (s, s), (p, p), out)
    assert torch.equal(out, ref.detach().permute(0, 2, 3, 1).to(bf))
    gout = torch.randn(n, oh, ow, c).to(bf)
    ref.backward(gout.float().permute(0, 3, 1, 2))
    gm = xt.grad / scale[:, None, None]  # g' (the gradient at BN's output)
    dx = torch.empty_like(x)
    sums = kernels.bn_relu_maxpool_grad(x, scale, shift, mean, (k, k), (s, s), (p, p), gout, dx)
    # g' may gather several windows' gradients, each sum rounded to bfloat16: within 1 ulp
    assert _rel(dx.float(), gm.permute(0, 2, 3, 1)) < 1e-2
    assert _rel(sums[0], gm.double().sum((0, 2, 3))) < 1e-5


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w,c,k,s,p", [(2, 9, 7, 5, 3, 2, 1), (3, 12, 12, 16, 3, 2, 1),
                                           (1, 5, 6, 3, 2, 2, 0), (2, 8, 8, 4, 3, 1, 1)])
def test_bn_relu_maxpool_and_its_gradient_match_torch(dtype, n, h, w, c, k, s, p):
    torch.manual_seed(n * h * w)
    x = torch.randn(n, h, w, c, dtype=dtype)
    x[0, :3, :3, 0] = 0.7  # a window of equal positive values: the first one gets the gradient
    x[-1, :, :, -1] = -5.0  # a channel that ReLU zeroes: ties at zero, no gradient
    scale, shift, mean = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    xt = x.permute(0, 3, 1, 2)
    pre = (xt * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).requires_grad_()
    want = torch.nn.functional.max_pool2d(pre.relu(), k, s, p)
    gout = torch.randn_like(want)
    (want * gout).sum().backward()
    gm = pre.grad.permute(0, 2, 3, 1)  # g' at BN's output, as torch routes and masks it
    out = torch.full((n,) + want.shape[2:] + (c,), float("nan"), dtype=dtype)
    kernels.bn_relu_maxpool(x, scale, shift, (k, k), (s, s), (p, p), out)
    assert torch.equal(out, want.detach().permute(0, 2, 3, 1))
    dx = torch.full_like(x, float("nan"))  # every element written
    sums = torch.ones(2, c, dtype=torch.float64)  # accumulated into
    kernels.bn_relu_maxpool_grad(x, scale, shift, mean, (k, k), (s, s), (p, p),
                                 gout.permute(0, 2, 3, 1).contiguous(), dx, sums)
    assert torch.equal(dx, gm)
    _close(sums[0] - 1, gm.sum((0, 1, 2)).double(), dtype)
    _close(sums[1] - 1, ((x - mean) * gm).sum((0, 1, 2)).double(), dtype)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.bn_relu_maxpool(xt, scale, shift, (k, k), (s, s), (p, p), out)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c,ld", [(1, 3, 3), (255, 5, 9), (257, 12, 216), (5000, 64, 64)])
def test_column_statistics_are_exact_even_far_from_zero(dtype, m, c, ld):
    # one pass over memory, yet no E[x^2] - E[x]^2 cancellation: data around 1e4 with unit spread
    torch.manual_seed(m)
    x = _matrix(m, c, ld, dtype, offset=1e4)
    mean, var = kernels.col_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=0, unbiased=False)
    _close(mean.double(), ref_mean, dtype)
    # float64: the data (1e4 +- 1) carry a condition number of 1e8, so agreement is 1e-12 at best
    assert ((var.double() - ref_var).abs() / ref_var.clamp_min(1e-30)).max().item() < max(TOL[dtype], 1e-10)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_affine_add_in_place_and_into_another_buffer(dtype):
    torch.manual_seed(0)
    x, src = _matrix(300, 12, 30, dtype), _matrix(300, 12, 20, dtype)
    coef, const = torch.randn(12, dtype=dtype), torch.randn(12, dtype=dtype)
    want = src + x * coef + const
    out = torch.empty(300, 12, dtype=dtype)
    kernels.col_affine_add(x, coef, const, src, out)
    _close(out, want, dtype)
    kernels.col_affine_add(x, coef, const, src, src)
    _close(src, want, dtype)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_cols_into_a_column_slice(dtype):
    src, buf = torch.randn(301, 12, dtype=dtype), torch.zeros(301, 40, dtype=dtype)
    kernels.copy_cols(src, buf[:, 24:36])
    assert torch.equal(buf[:, 24:36], src) and not buf[:, :24].any() and not buf[:, 36:].any()


@needs_cc
def test_kernel_matrices_must_have_unit_column_stride():
    x = torch.randn(10, 8).t()
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.bn_relu(x, torch.ones(10), torch.zeros(10), torch.empty(8, 10))


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c,ld", [(1, 1, 1), (257, 13, 40), (3001, 70, 133)])
def test_element_wise_outputs_are_torchs_bit_for_bit(dtype, m, c, ld):
    # compiled with -ffp-contract=off, each output is the torch formula's own roundings
    torch.manual_seed(m)
    x, g, src = _matrix(m, c, ld, dtype), _matrix(m, c, c + 3, dtype), _matrix(m, c, ld + 1, dtype)
    scale, shift, mean, a, b = (torch.randn(c, dtype=dtype) for _ in range(5))
    pre = x * scale + shift
    gm = torch.where(pre > 0, g, 0)
    assert torch.equal(kernels.bn_relu(x, scale, shift, torch.empty(m, c, dtype=dtype)), pre.relu())
    dx, z = torch.empty(m, c, dtype=dtype), torch.empty(m, c, dtype=dtype)
    kernels.bn_relu_grad(x, g, scale, shift, mean, dx=dx, z=z, assign=True)
    assert torch.equal(dx, gm * scale) and torch.equal(z, pre.relu())
    assert torch.equal(kernels.bn_grad_apply(x, g, scale, shift, mean, a, b, torch.empty(m, c, dtype=dtype)),
                       scale * (gm - a - (x - mean) * b))
    assert torch.equal(kernels.col_affine_add(x, a, b, src, torch.empty(m, c, dtype=dtype)), src + x * a + b)


def test_statistics_come_from_the_state_without_reading_it_back_to_the_host():
    state = kernels.stats_state(3)
    state[:] = torch.tensor([4.0, 1.0, 2.0, 3.0, 8.0, 4.0, 0.5], dtype=torch.float64)
    mean, var = kernels.stats_from_state(state, torch.float32)
    assert torch.equal(mean, torch.tensor([1.0, 2.0, 3.0])) and torch.equal(var, torch.tensor([2.0, 1.0, 0.125]))
    _, var = kernels.stats_from_state(kernels.stats_state(3), torch.float64)  # no rows yet: count taken as 1
    assert torch.equal(var, torch.zeros(3, dtype=torch.float64))
    # a meta tensor has no data to read: an .item() here would raise
    mean, var = kernels.stats_from_state(torch.empty(7, dtype=torch.float64, device="meta"), torch.bfloat16)
    assert mean.shape == var.shape == (3,) and var.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ the C sources

CSRC = Path(kernels.__file__).parent / "csrc"
HEADER = (CSRC / "kernels.h").read_text()
L, I, P = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
_CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def test_the_header_declares_eight_kernels_for_three_element_types():
    header = kernels.parse_header(HEADER)
    assert len(header.prototypes) == len(re.findall(r"_##S\(", HEADER)) == 8
    assert header.types == (("float", "float", "f32"), ("double", "double", "f64"), ("uint16_t", "float", "bf16"))
    assert header.prototypes["bn_relu"] == (None, (L, L, P, L, P, P, P, L, I))
    assert header.prototypes["col_stats_acc"] == (I, (L, L, P, L, P, I))
    assert header.prototypes["bn_relu_grad"] == (I, (L, L, P, L, P, L, P, P, P, P, L, I, P, L, P, I))
    assert header.prototypes["bn_relu_maxpool_grad"] == (I, (L, L, L, L, P, P, P, P, L, L, L, L, L, L, L, L,
                                                            P, P, P, I))


@needs_cc
def test_every_prototype_is_bound_in_the_library():
    header, lib = kernels.parse_header(HEADER), kernels._library()
    bound = 0
    for _, _, suffix in header.types:
        for name, (restype, argtypes) in header.prototypes.items():
            fn = getattr(lib, f"{name}_{suffix}")
            assert fn.restype is restype and tuple(fn.argtypes) == argtypes, f"{name}_{suffix}"
            bound += 1
    assert bound == 24


def _with(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old,new,match", [
    ("long ldx, double *state", "size_t ldx, double *state", r"cannot parse the parameter 'size_t ldx' of col_stats_acc_##S"),
    ("double *state, int nt", "double *state, int", r"cannot parse the parameter 'int' of col_stats_acc_##S"),
    ("double *state, int nt", "double state, int nt", r"cannot parse the parameter 'double state'"),
    ("const T *x, long ldx, double *state", "const T *restrict x, long ldx, double *state", r"'const T\*restrict x'"),
    ("int col_stats_acc_##S", "double col_stats_acc_##S", r"cannot parse the prototype 'double col_stats_acc_##S\("),
    ("int col_stats_acc_##S", "int col_stats_acc", r"cannot parse the prototype 'int col_stats_acc\("),
    ("void copy_cols_##S(long m", "void copy_cols_##S(long m long c,", r"cannot parse the parameter 'long m long c'"),
    ("T *dx, double *sums, int nt);", "T *dx, double *sums, int nt)", r"'int bn_relu_maxpool_grad_##S\(.*' after the last"),
    ("void copy_cols_##S", "void bn_relu_##S", r"bn_relu_##S is declared twice"),
    ("DENSENET_KERNELS(double, double, f64)\n", "", r"no DENSENET_KERNELS\(T, A, f64\) line for torch.float64"),
    ("DENSENET_KERNELS(uint16_t, float, bf16)", "DENSENET_KERNELS(uint16_t, uint16_t, bf16)",
     r"DENSENET_KERNELS\(uint16_t, uint16_t, bf16\) does not store torch.bfloat16 or compute in torch.float32"),
    ("DENSENET_KERNELS(float, float, f32)\n", "DENSENET_KERNELS(float, float, f32)\nDENSENET_KERNELS(long, long, i64)\n",
     r"element types the wrappers do not know: \['i64'\]"),
    ("#define DENSENET_KERNELS(T, A, S)", "#define DENSENET_KERNELS(T,A,S)", r"expected one '#define DENSENET_KERNELS"),
])
def test_a_header_the_parser_cannot_read_is_refused_naming_what(old, new, match):
    with pytest.raises(kernels.HeaderError, match=match):
        kernels._check_types(kernels.parse_header(_with(HEADER, old, new)))


@pytest.mark.skipif(_CC is None, reason="no C compiler on this machine")
def test_the_c_compiles_without_warnings_and_declares_every_export_in_the_header():
    # -Wmissing-prototypes: a function defined without its kernels.h prototype (so never bound)
    # is an error; the header is checked against the definitions by the compile itself
    flags = ["-fsyntax-only", "-fopenmp", "-std=c11", "-Wall", "-Wextra", "-Wpedantic",
             "-Wmissing-prototypes", "-Werror"]
    proc = subprocess.run([_CC, *flags, str(CSRC / "kernels.c")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(_CC is None, reason="no C compiler on this machine")
def test_a_definition_that_disagrees_with_the_header_does_not_compile(tmp_path):
    for f in [*CSRC.glob("*.c"), *CSRC.glob("*.h")]:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "kernels.h").write_text(_with(HEADER, "T *dst, long ldd, int nt", "T *dst, int ldd, int nt"))
    proc = subprocess.run([_CC, "-fsyntax-only", "-fopenmp", str(tmp_path / "kernels.c")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and re.search(r"conflicting types for .copy_cols_f32", proc.stderr)


def test_no_python_file_in_the_package_holds_c_source():
    package = Path(kernels.__file__).parents[1]
    c_line = re.compile(r"^\s*(#pragma omp|#include [<\"]|#define |static inline )", re.M)
    assert c_line.search((CSRC / "kernels_body.h").read_text()) and c_line.search((CSRC / "kernels.c").read_text())
    holding = sorted(str(f.relative_to(package)) for f in package.rglob("*.py") if c_line.search(f.read_text()))
    assert holding == []


# ------------------------------------------------------------------------------ argument checks

M, C = 50, 6  # x is (50, 6) below; images are (2, 9, 7, 6) and pool (3, 3) windows, stride 2, padding 1


def _image_args():
    x = torch.randn(2, 9, 7, C)
    return x, torch.empty(2, 5, 4, C), ((3, 3), (2, 2), (1, 1))  # out is (2, 5, 4, 6)


_v, _w = torch.ones(C), torch.ones(C - 1)  # a right and a wrong per-column vector
_WRONG_SHAPES = {  # kernel: (a call with x a (50, 6) matrix, what the error must say)
    "bn_relu out": (lambda x: kernels.bn_relu(x, _v, _v, torch.empty(M, C - 1)),
                    r"^bn_relu: out must be a \(50, 6\) matrix like x, got \(50, 5\)$"),
    "bn_relu shift": (lambda x: kernels.bn_relu(x, _v, _w, torch.empty(M, C)),
                      r"^bn_relu: shift must have 6 elements \(one per column of x\), got 5 \(5,\)$"),
    "bn_relu x 3-D": (lambda x: kernels.bn_relu(x.view(5, 10, C), _v, _v, torch.empty(M, C)),
                      r"^bn_relu: x must be a 2-D \(m, c\) matrix, got 3-D \(5, 10, 6\)$"),
    "col_stats x": (lambda x: kernels.col_stats(x[0]), r"^col_stats: x must be a 2-D \(m, c\) matrix, got 1-D \(6,\)"),
    "col_stats state": (lambda x: kernels.col_stats(x, kernels.stats_state(C - 1)),
                        r"^col_stats: state must be a contiguous float64 CPU tensor of 1 \+ 2 \* 6 = 13 elements, "
                        r"got a contiguous torch.float64 \(11,\) tensor on cpu$"),
    "copy_cols dst": (lambda x: kernels.copy_cols(x, torch.empty(M + 1, C)),
                      r"^copy_cols: dst must be a \(50, 6\) matrix like src, got \(51, 6\)$"),
    "bn_relu_grad g": (lambda x: kernels.bn_relu_grad(x, x[1:], _v, _v, _v), r"^bn_relu_grad: g must be a \(50, 6\) matrix"),
    "bn_relu_grad dx": (lambda x: kernels.bn_relu_grad(x, x, _v, _v, _v, dx=torch.empty(M, C + 1)),
                        r"^bn_relu_grad: dx must be a \(50, 6\) matrix like x, got \(50, 7\)$"),
    "bn_relu_grad z": (lambda x: kernels.bn_relu_grad(x, x, _v, _v, _v, z=torch.empty(C, M)), r"^bn_relu_grad: z must be"),
    "bn_relu_grad mean": (lambda x: kernels.bn_relu_grad(x, x, _v, _v, torch.ones(2, C)), r"^bn_relu_grad: mean must have 6"),
    "bn_grad_apply out": (lambda x: kernels.bn_grad_apply(x, x, _v, _v, _v, _v, _v, x[:, :-1]),
                          r"^bn_grad_apply: out must be a \(50, 6\) matrix like x, got \(50, 5\)$"),
    "bn_grad_apply b": (lambda x: kernels.bn_grad_apply(x, x, _v, _v, _v, _v, _w, torch.empty(M, C)),
                        r"^bn_grad_apply: b must have 6 elements"),
    "col_affine_add src": (lambda x: kernels.col_affine_add(x, _v, _v, torch.empty(M), torch.empty(M, C)),
                           r"^col_affine_add: src must be a \(50, 6\) matrix like x, got \(50,\)$"),
    "col_affine_add const": (lambda x: kernels.col_affine_add(x, _v, torch.tensor(1.0), x, torch.empty(M, C)),
                             r"^col_affine_add: const must have 6 elements .*, got 1 \(\)$"),
    "bn_relu_maxpool out": (lambda x: kernels.bn_relu_maxpool(_image_args()[0], _v, _v, *_image_args()[2],
                                                              torch.empty(2, 4, 4, C)),
                            r"^bn_relu_maxpool: out must be \(2, 5, 4, 6\) = \(n, oh, ow, c\) for these windows, "
                            r"got \(2, 4, 4, 6\)$"),
    "bn_relu_maxpool scale": (lambda x: kernels.bn_relu_maxpool(_image_args()[0], _w, _v, *_image_args()[2],
                                                                                _image_args()[1]),
                              r"^bn_relu_maxpool: scale must have 6 elements \(one per channel of x\)"),
    "bn_relu_maxpool_grad gout": (lambda x: kernels.bn_relu_maxpool_grad(
        _image_args()[0], _v, _v, _v, *_image_args()[2], torch.empty(2, 5, 5, C), torch.empty(2, 9, 7, C)),
        r"^bn_relu_maxpool_grad: gout must be \(2, 5, 4, 6\) = \(n, oh, ow, c\) for these windows, got \(2, 5, 5, 6\)$"),
    "bn_relu_maxpool_grad dx": (lambda x: kernels.bn_relu_maxpool_grad(
        _image_args()[0], _v, _v, _v, *_image_args()[2], torch.empty(2, 5, 4, C), torch.empty(2, 9, 6, C)),
        r"^bn_relu_maxpool_grad: dx must be \(2, 9, 7, 6\) like x, got \(2, 9, 6, 6\)$"),
}


@needs_cc
@pytest.mark.parametrize("case", _WRONG_SHAPES)
def test_a_wrong_shape_is_refused_naming_the_argument(case):
    call, match = _WRONG_SHAPES[case]
    with pytest.raises(ValueError, match=match):
        call(_matrix(M, C, C + 4, torch.float32))


@needs_cc
def test_a_wrong_dtype_is_refused_but_vectors_are_converted():
    x, out = _matrix(M, C, C + 4, torch.float32), torch.empty(M, C)
    with pytest.raises(ValueError, match=r"^bn_relu: x must be float32 or float64 or bfloat16, got torch.float16$"):
        kernels.bn_relu(x.half(), _v, _v, out.half())
    with pytest.raises(ValueError, match=r"^bn_relu: out must be torch.float32 like x, got torch.float64$"):
        kernels.bn_relu(x, _v, _v, out.double())
    with pytest.raises(ValueError, match=r"^copy_cols: dst must be torch.float64 like src, got torch.float32$"):
        kernels.copy_cols(x.double(), out)
    with pytest.raises(ValueError, match=r"^bn_relu_grad: g must be torch.float32 like x"):
        kernels.bn_relu_grad(x, x.double(), _v, _v, _v)
    with pytest.raises(ValueError, match=r"^bn_relu_maxpool: x must be float32 or float64 or bfloat16, got torch.int64$"):
        kernels.bn_relu_maxpool(torch.zeros(1, 4, 4, C, dtype=torch.long), _v, _v, (3, 3), (2, 2), (1, 1),
                                torch.zeros(1, 2, 2, C, dtype=torch.long))
    scale, shift = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    kernels.bn_relu(x, scale, shift[None], out)  # a float64 (1, C) vector works, converted as before
    _close(out, (x * scale.float() + shift.float()).relu(), torch.float32)


@needs_cc
def test_strides_that_would_read_or_write_wrongly_are_refused():
    x = _matrix(M, C, C + 4, torch.float32)
    with pytest.raises(ValueError, match=r"^bn_relu: out must have unit column stride, got strides \(1, 50\)$"):
        kernels.bn_relu(x, _v, _v, torch.empty(C, M).t())
    with pytest.raises(ValueError, match=r"^copy_cols: src must have unit column stride, got strides \(12, 2\)$"):
        kernels.copy_cols(torch.empty(M, 2 * C)[:, ::2], torch.empty(M, C))
    overlapping = torch.empty(M * C).as_strided((M, C), (C - 2, 1))  # row i's tail is row i+1's head
    with pytest.raises(ValueError, match=r"^col_affine_add: out must have a row stride of at least its 6 columns "
                                         r"\(rows would overlap\), got strides \(4, 1\)$"):
        kernels.col_affine_add(x, _v, _v, x, overlapping)
    with pytest.raises(ValueError, match=r"^bn_relu_grad: g must have a row stride of at least its 6 columns"):
        kernels.bn_relu_grad(x, overlapping, _v, _v, _v)
    broadcast = torch.ones(1, C).expand(M, C)  # row stride 0, as autograd passes the gradient of a sum
    with pytest.raises(ValueError, match=r"^bn_relu_grad: dx must have a row stride .*got strides \(0, 1\)$"):
        kernels.bn_relu_grad(x, x, _v, _v, _v, dx=broadcast)  # written: refused
    sums = kernels.bn_relu_grad(x, broadcast, _v, torch.zeros(C), torch.zeros(C))  # only read: fine
    _close(sums[0], (x > 0).sum(0).double(), torch.float64)
    with pytest.raises(ValueError, match=r"^bn_relu_maxpool_grad: dx must be a contiguous 4-D \(N, H, W, C\) tensor"):
        x4, gout, window = _image_args()
        kernels.bn_relu_maxpool_grad(x4, _v, _v, _v, *window, gout, torch.empty(2, C, 9, 7).permute(0, 2, 3, 1))


@needs_cc
def test_sums_and_state_must_be_contiguous_float64_of_the_right_shape():
    x = _matrix(M, C, C + 4, torch.float32)
    x4, gout, window = _image_args()
    for bad in (torch.zeros(C, 2, dtype=torch.float64), torch.zeros(2, C), torch.zeros(C, 2, dtype=torch.float64).t(),
                torch.zeros(2, C + 1, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"^bn_relu_grad: sums must be a contiguous float64 \(2, 6\) CPU tensor, got "):
            kernels.bn_relu_grad(x, x, _v, _v, _v, sums=bad)
        with pytest.raises(ValueError, match=r"^bn_relu_maxpool_grad: sums must be a contiguous float64 \(2, 6\)"):
            kernels.bn_relu_maxpool_grad(x4, _v, _v, _v, *window, gout, torch.empty_like(x4), bad)
    for bad in (kernels.stats_state(C).float(), kernels.stats_state(2 * C)[::2]):
        with pytest.raises(ValueError, match=r"^col_stats: state must be a contiguous float64 CPU tensor of 1 \+ 2 \* 6"):
            kernels.col_stats(x, bad)


@needs_cc
def test_pooling_windows_are_checked():
    x4, out, window = _image_args()
    for kernel, stride, padding, match in [
            ((0, 3), (2, 2), (0, 0), r"^bn_relu_maxpool: kernel must be positive, got \(0, 3\)$"),
            ((3, 3), (2, 0), (1, 1), r"^bn_relu_maxpool: stride must be positive, got \(2, 0\)$"),
            ((3, 3), (2, 2), (2, 1), r"^bn_relu_maxpool: padding must be in \[0, kernel // 2\] = \[0, 1\] x \[0, 1\]"),
            ((3, 3), (2, 2), (1, -1), r"^bn_relu_maxpool: padding must be in"),
            ((3,), (2, 2), (1, 1), r"^bn_relu_maxpool: kernel must be a pair of ints, got \(3,\)$"),
            ((3, 3), (2.0, 2), (1, 1), r"^bn_relu_maxpool: stride must be a pair of ints"),
            ((9, 9), (1, 1), (0, 0), r"^bn_relu_maxpool: x's images \(9, 7\) are smaller than the kernel \(9, 9\)")]:
        with pytest.raises(ValueError, match=match):
            kernels.bn_relu_maxpool(x4, _v, _v, kernel, stride, padding, out)
    kernels.bn_relu_maxpool(x4, _v, _v, *window, out)  # the same call with a valid window runs


@needs_cc
def test_tensors_off_the_cpu_are_refused():
    x = _matrix(M, C, C + 4, torch.float32)
    meta = torch.empty(M, C, device="meta")
    with pytest.raises(ValueError, match=r"^bn_relu: out must be a CPU tensor, got one on meta$"):
        kernels.bn_relu(x, _v, _v, meta)
    with pytest.raises(ValueError, match=r"^bn_relu: x must be a CPU tensor, got one on meta$"):
        kernels.bn_relu(meta, _v, _v, x)
    with pytest.raises(ValueError, match=r"^col_affine_add: coef must be a CPU tensor, got one on meta$"):
        kernels.col_affine_add(x, torch.ones(C, device="meta"), _v, x, torch.empty(M, C))
    with pytest.raises(ValueError, match=r"^bn_relu_grad: sums must be a contiguous float64 \(2, 6\) CPU tensor"):
        kernels.bn_relu_grad(x, x, _v, _v, _v, sums=torch.zeros(2, C, dtype=torch.float64, device="meta"))


_OUT_OF_MEMORY = """
import resource, torch
from densenet.ops import cpu as kernels
torch.set_num_threads(2)
MB, c = 2**20, 4 * 2**20
def vm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
def limited(headroom, call):  # the call with only headroom more address space than now
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm() + headroom, hard))
    try:
        call()
        return "ran"
    except MemoryError as exc:
        return str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
x, g, v = torch.randn(1, c), torch.randn(1, c), torch.ones(c)
sums = torch.ones(2, c, dtype=torch.float64)
kernels.bn_relu_grad(x, g, v, v, v)  # builds the library and starts the threads before any limit
before = vm()
# its scratch: 128 MiB of partial sums (2 threads x 2c doubles), then 32 MiB in each thread
print(limited(16 * MB, lambda: kernels.bn_relu_grad(x, g, v, v, v, sums=sums)))  # the partial sums fail
for _ in range(3):
    print(limited(144 * MB, lambda: kernels.bn_relu_grad(x, g, v, v, v, sums=sums)))  # both threads' fail
print(bool((sums == 1).all()), (vm() - before) // MB)  # nothing merged into sums, nothing leaked
img, s = torch.randn(1, 1, 1, 10 * 2**20), torch.ones(10 * 2**20)
out = torch.empty_like(img)
kernels.bn_relu_maxpool(img, s, s, (1, 1), (1, 1), (0, 0), out)
print(limited(16 * MB, lambda: kernels.bn_relu_maxpool(img, s, s, (1, 1), (1, 1), (0, 0), out)))  # 40 MiB a thread
print(limited(1024 * MB, lambda: kernels.bn_relu_grad(x, g, v, v, v, sums=sums)))
"""


@needs_cc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the address space with RLIMIT_AS")
def test_scratch_that_cannot_be_allocated_raises_memory_error():
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().split("\n")
    oom = "densenet kernel {}: out of memory allocating scratch"
    assert lines[:4] == [oom.format("bn_relu_grad")] * 4
    assert lines[4] == "True 0"
    assert lines[5:] == [oom.format("bn_relu_maxpool"), "ran"]


def test_huge_empty_gives_a_usable_tensor_of_the_asked_shape():
    like = torch.zeros(1, dtype=torch.float64)
    for shape in [(3, 4), (64, 32, 32, 216)]:
        t = buffers.huge_empty(shape, like)
        assert t.shape == shape and t.dtype == torch.float64 and t.device == like.device
        t.fill_(2.0)
        assert t.sum().item() == 2.0 * t.numel()


DISABLED = "disabled by densenet.backends.cpu_kernels = False (DENSENET_KERNELS=0 sets it)"


def test_disabled_kernels_say_why():
    env = dict(os.environ, DENSENET_KERNELS="0")
    code = ("from densenet.ops import cpu as kernels; import torch; "
            "print(kernels.available(torch.zeros(1)), kernels.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"False {DISABLED}"


@needs_cc
def test_the_setting_turns_the_kernels_off_and_on_at_the_next_call():
    with backends.flags(cpu_kernels=False):
        assert not kernels.available(torch.zeros(1)) and kernels.unavailable_reason() == DISABLED
    assert kernels.available(torch.zeros(1)) and kernels.unavailable_reason() is None


def _without_a_compiler(tmp_path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), DENSENET_CACHE=str(tmp_path / "cache"),
               PATH=str(tmp_path))  # no cc, no gcc
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fused CPU kernels are unavailable (no C compiler found" in proc.stderr  # said once, not silent
    assert proc.stderr.count("RuntimeWarning") == 1
    return proc


def test_without_a_compiler_the_kernels_are_unavailable_and_say_why_once(tmp_path):
    proc = _without_a_compiler(tmp_path, "import torch; from densenet.ops import cpu as kernels\n"
                                         "for _ in range(3):\n"
                                         "    print(kernels.available(torch.zeros(1)), '|', kernels.unavailable_reason())")
    for line in proc.stdout.strip().split("\n"):
        available, reason = [s.strip() for s in line.split("|")]
        assert available == "False" and "no C compiler" in reason


def test_without_a_compiler_the_model_falls_back_to_torch_ops_and_still_trains(tmp_path):
    # the model alone (no kernel module imported here): the one warning is the efficient path's
    proc = _without_a_compiler(tmp_path, "import torch; from densenet import densenet_cifar\n"
                                         "torch.manual_seed(0); m = densenet_cifar(16, growth_rate=4)\n"
                                         "m(torch.randn(2, 3, 8, 8)).sum().backward()\n"
                                         "print(m.features.denseblock1.denselayer1.conv1.weight.grad.abs().sum().item() > 0)")
    assert proc.stdout.strip() == "True"


# ------------------------------------------------------------------------------ the buffer pool

_BIG = (1024, 1024, 4)  # 16 MiB of float32: large enough for the pool


def test_pool_hands_an_idle_buffer_out_again_and_never_one_in_use():
    buffers.release_buffers()
    like = torch.zeros(1)
    a = buffers.huge_empty(_BIG, like)
    ptr = a.data_ptr()
    view = a[3:5]  # a view keeps the storage in use
    del a
    b = buffers.huge_empty((4096, 1024), like)  # same bytes, other shape
    assert b.data_ptr() != ptr
    del view
    c = buffers.huge_empty((4096, 1024), like)
    assert c.data_ptr() == ptr and c.shape == (4096, 1024) and c.is_contiguous()
    assert buffers.huge_empty((1024, 1024, 2), like).data_ptr() not in (ptr, b.data_ptr())  # exact sizes only
    del b, c
    assert buffers.pooled_bytes() == 16 * 2**20 * 2 + 8 * 2**20
    assert buffers.release_buffers() == 16 * 2**20 * 2 + 8 * 2**20
    assert buffers.pooled_bytes() == 0


def test_pool_frees_idle_buffers_no_longer_asked_for():
    buffers.release_buffers()
    like = torch.zeros(1)
    buffers.huge_empty(_BIG, like)  # idle at once
    for _ in range(buffers._BufferPool._KEEP + 1):
        t = buffers.huge_empty((1024, 1024, 3), like)
        del t
    assert buffers.pooled_bytes() == 12 * 2**20  # only the size still in use
    buffers.release_buffers()


def test_pool_leaves_small_and_non_cpu_requests_alone_and_can_be_turned_off():
    buffers.release_buffers()
    buffers.huge_empty((100, 100), torch.zeros(1))
    assert buffers.pooled_bytes() == 0
    with backends.flags(buffer_pool=False):
        a = buffers.huge_empty(_BIG, torch.zeros(1))
    assert buffers.pooled_bytes() == 0 and a.shape == _BIG


def test_training_steps_reuse_the_pooled_buffers_with_unchanged_results():
    from densenet import densenet_cifar
    buffers.release_buffers()
    torch.manual_seed(0)
    model = densenet_cifar(40, growth_rate=12, bottleneck=True, compression=0.5).to(memory_format=torch.channels_last)
    x = torch.randn(48, 3, 32, 32).to(memory_format=torch.channels_last)
    grads = []
    for _ in range(3):
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append(model.features.conv0.weight.grad.clone())
    held = buffers.pooled_bytes()
    assert held > 0
    model.zero_grad()
    model(x).square().mean().backward()
    assert buffers.pooled_bytes() == held  # the second and later steps allocate nothing new
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])  # fresh vs reused memory
    buffers.release_buffers()


def test_only_buffers_that_outlive_a_step_get_huge_page_advice(monkeypatch):
    advised = []
    monkeypatch.setattr(buffers, "_madvise_huge", lambda t: advised.append(t.data_ptr()))
    buffers.release_buffers()
    like = torch.zeros(1)
    a = buffers.huge_empty(_BIG, like)  # pooled (images): kept between steps
    assert advised == [a.data_ptr()]
    b = buffers.huge_empty(_BIG, like, pooled=False)  # a volume's: freed after the step
    assert advised == [a.data_ptr()] and b.shape == _BIG
    del a, b
    buffers.release_buffers()
