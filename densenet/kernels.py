"""Fused CPU kernels for the memory-efficient dense block, compiled on first use.

The efficient block (``efficient.py``) spends most of a CPU training step outside the matrix
products, in element-wise passes over the block's feature buffer: BN-ReLU, the ReLU mask, the
BN gradient sums and the accumulation of input gradients. Done with torch ops each of those is
one or more full passes over an (N*H*W, C) matrix. The kernels here do each group in one pass:

* ``bn_relu``      z = max(x * scale + shift, 0)
* ``col_stats``    per-column mean and biased variance (one pass, blockwise, in double)
* ``bn_relu_grad`` g' = g masked where x * scale + shift <= 0; the column sums of g' and of
                   (x - mean) * g'; optionally dx += g' * scale and the recomputed BN-ReLU
                   output - all in one pass
* ``bn_grad_apply`` out = scale * (g' - a - (x - mean) * b): BN's input gradient from those sums
* ``col_affine_add`` out = src + x * coef + const (BN's batch-statistics corrections)
* ``bn_relu_maxpool`` the ImageNet stem's BN-ReLU-max-pooling in one pass, and its backward
                   (``bn_relu_maxpool_grad``) to BN's output gradient and sums in one more

They are plain C over row-major matrices with a leading dimension, so they read column slices
of the shared buffer in place. They take float, double and bfloat16 (stored as 16 bits,
computed in float and rounded once to nearest even, as PyTorch rounds; so bf16 autocast keeps
them). They are parallel over rows with OpenMP - the same ``libgomp`` PyTorch itself loaded (the library is linked against ``libgomp.so.1``, which the
dynamic loader resolves to the copy already in the process), with ``torch.get_num_threads()``
threads. They are compiled with the system C compiler (``$CC`` or ``cc``) into
``$DENSENET_CACHE`` (default ``~/.cache/densenet``) the first time they are needed, which takes
about a second. Without a compiler, or with ``DENSENET_KERNELS=0``, ``available()`` is False and
the block uses the equivalent torch ops instead (the same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from string import Template

import torch

_TEMPLATE = Template(r"""
void bn_relu_$S(long m, long c, const $T *restrict x, long ldx, const $A *restrict scale,
                const $A *restrict shift, $T *restrict z, long ldz, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const $T *xi = x + i * ldx;
        $T *zi = z + i * ldz;
        for (long j = 0; j < c; j++) {
            $A v = LD_$S(xi[j]) * scale[j] + shift[j];
            zi[j] = ST_$S(v > 0 ? v : 0);
        }
    }
}

/* Per-column mean and biased variance in one pass over memory: each thread takes blocks of 256
   rows, gets a block's mean and sum of squared deviations by two passes over the block while it
   is in cache, and merges blocks by Chan et al.'s pairwise update, all in double. */
static inline void merge_$S(long c, double *restrict mu, double *restrict m2, double cnt,
                            const double *restrict bmu, const double *restrict bm2, double r) {
    double tot = cnt + r;
    for (long j = 0; j < c; j++) {
        double d = bmu[j] - mu[j];
        mu[j] += d * (r / tot);
        m2[j] += bm2[j] + d * d * (cnt * r / tot);
    }
}

int col_stats_acc_$S(long m, long c, const $T *restrict x, long ldx, double *restrict state,
                     int nt) {
    /* state = [count, mean[c], m2[c]] (m2: sum of squared deviations), merged into; left as it
       was when scratch cannot be allocated (returns 1) */
    double *part = scratch_calloc((size_t)nt * (2 * c + 1), sizeof(double));
    if (!part) return 1;
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        double *mu = part + (long)t * (2 * c + 1), *m2 = mu + c, cnt = 0;
        double *bmu = scratch_malloc(sizeof(double) * 2 * c);
        if (!bmu) {
            #pragma omp atomic write
            fail = 1;
        } else {
            double *bm2 = bmu + c;
            long hi = m * (t + 1) / n;
            for (long i0 = m * t / n; i0 < hi; i0 += 256) {
                long r = hi - i0 < 256 ? hi - i0 : 256;
                for (long j = 0; j < 2 * c; j++) bmu[j] = 0;
                for (long i = i0; i < i0 + r; i++) {
                    const $T *restrict xi = x + i * ldx;
                    for (long j = 0; j < c; j++) bmu[j] += LD_$S(xi[j]);
                }
                for (long j = 0; j < c; j++) bmu[j] /= r;
                for (long i = i0; i < i0 + r; i++) {
                    const $T *restrict xi = x + i * ldx;
                    for (long j = 0; j < c; j++) { double d = LD_$S(xi[j]) - bmu[j]; bm2[j] += d * d; }
                }
                merge_$S(c, mu, m2, cnt, bmu, bm2, (double)r);
                cnt += r;
            }
            free(bmu);
        }
        m2[c] = cnt;
    }
    if (fail) { free(part); return 1; }
    for (int t = 0; t < nt; t++) {
        double *p = part + (long)t * (2 * c + 1);
        if (p[2 * c] > 0) {
            merge_$S(c, state + 1, state + 1 + c, state[0], p, p + c, p[2 * c]);
            state[0] += p[2 * c];
        }
    }
    free(part);
    return 0;
}

void copy_cols_$S(long m, long c, const $T *restrict src, long lds, $T *restrict dst, long ldd,
                  int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const $T *restrict si = src + i * lds;
        $T *restrict di = dst + i * ldd;
        for (long j = 0; j < c; j++) di[j] = si[j];
    }
}

static inline void grad_rows_$S(long r, long c, const $T *restrict x, long ldx,
                                const $T *restrict g, long ldg, const $A *restrict scale,
                                const $A *restrict shift, const $A *restrict mean,
                                $T *restrict dx, long lddx, int assign, $T *restrict z,
                                long ldz, $A *restrict ag, $A *restrict axg) {
    /* one loop with dx, one without: with the test inside, GCC vectorises the bfloat16 loop
       of neither case */
    for (long i = 0; i < r; i++) {
        const $T *restrict xi = x + i * ldx, *restrict gi = g + i * ldg;
        $T *restrict di = dx ? dx + i * lddx : 0, *restrict zi = z ? z + i * ldz : 0;
        if (di) {
            for (long j = 0; j < c; j++) {
                $A xv = LD_$S(xi[j]), gv = LD_$S(gi[j]);
                $A pre = xv * scale[j] + shift[j];
                $A gm = pre > 0 ? gv : 0;
                ag[j] += gm;
                axg[j] += (xv - mean[j]) * gm;
                $A old = assign ? 0 : LD_$S(di[j]);
                di[j] = ST_$S(old + gm * scale[j]);
                if (zi) zi[j] = ST_$S(pre > 0 ? pre : 0);
            }
        } else {
            for (long j = 0; j < c; j++) {
                $A xv = LD_$S(xi[j]), gv = LD_$S(gi[j]);
                $A pre = xv * scale[j] + shift[j];
                $A gm = pre > 0 ? gv : 0;
                ag[j] += gm;
                axg[j] += (xv - mean[j]) * gm;
                if (zi) zi[j] = ST_$S(pre > 0 ? pre : 0);
            }
        }
    }
}

/* sums (2 x c) += the per-thread partial sums in part (nt x 2 x c), which it frees */
static void add_partial_sums_$S(long c, int nt, double *part, double *restrict sums) {
    for (long j = 0; j < c; j++) {
        double s = 0, sx = 0;
        for (int t = 0; t < nt; t++) { s += part[(long)t * 2 * c + j]; sx += part[(long)t * 2 * c + c + j]; }
        sums[j] += s;
        sums[c + j] += sx;
    }
    free(part);
}

int bn_relu_grad_$S(long m, long c, const $T *restrict x, long ldx, const $T *restrict g,
                    long ldg, const $A *restrict scale, const $A *restrict shift,
                    const $A *restrict mean, $T *restrict dx, long lddx, int assign,
                    $T *restrict z, long ldz, double *restrict sums, int nt) {
    /* per thread: $A partial sums over blocks of 64 rows, added into double totals (sums is
       left as it was when scratch cannot be allocated: returns 1) */
    double *part = scratch_calloc((size_t)nt * 2 * c, sizeof(double));
    if (!part) return 1;
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        double *dg = part + (long)t * 2 * c, *dxg = dg + c;
        $A *ag = scratch_malloc(sizeof($A) * 2 * c);
        if (!ag) {
            #pragma omp atomic write
            fail = 1;
        } else {
            $A *axg = ag + c;
            long hi = m * (t + 1) / n;
            for (long i = m * t / n; i < hi; i += 64) {
                long r = hi - i < 64 ? hi - i : 64;
                for (long j = 0; j < 2 * c; j++) ag[j] = 0;
                grad_rows_$S(r, c, x + i * ldx, ldx, g + i * ldg, ldg, scale, shift, mean,
                             dx ? dx + i * lddx : 0, lddx, assign, z ? z + i * ldz : 0, ldz, ag, axg);
                for (long j = 0; j < c; j++) { dg[j] += ag[j]; dxg[j] += axg[j]; }
            }
            free(ag);
        }
    }
    if (fail) { free(part); return 1; }
    add_partial_sums_$S(c, nt, part, sums);
    return 0;
}

void bn_grad_apply_$S(long m, long c, const $T *restrict x, long ldx, const $T *g, long ldg,
                      const $A *restrict scale, const $A *restrict shift,
                      const $A *restrict mean, const $A *restrict a, const $A *restrict b,
                      $T *out, long ldo, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const $T *xi = x + i * ldx, *gi = g + i * ldg;
        $T *oi = out + i * ldo;
        for (long j = 0; j < c; j++) {
            $A xv = LD_$S(xi[j]), gv = LD_$S(gi[j]);
            $A gm = xv * scale[j] + shift[j] > 0 ? gv : 0;
            oi[j] = ST_$S(scale[j] * (gm - a[j] - (xv - mean[j]) * b[j]));
        }
    }
}

void col_affine_add_$S(long m, long c, const $T *restrict x, long ldx, const $A *restrict coef,
                       const $A *restrict cst, const $T *src, long lds, $T *dst, long ldd, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const $T *xi = x + i * ldx, *si = src + i * lds;
        $T *di = dst + i * ldd;
        for (long j = 0; j < c; j++) di[j] = ST_$S(LD_$S(si[j]) + LD_$S(xi[j]) * coef[j] + cst[j]);
    }
}

/* Max pooling of relu(x * scale + shift) over channels-last images (n, h, w, c): since ReLU is
   monotone, the window maximum of the ReLU'd values is the ReLU of the window maximum of
   x * scale + shift, so neither the BN-ReLU output nor the pooling indices are ever stored.
   A NaN wins its window, as in PyTorch's max pooling. Parallel over output rows. */
int bn_relu_maxpool_$S(long n, long h, long w, long c, const $T *restrict x,
                       const $A *restrict scale, const $A *restrict shift, long kh, long kw,
                       long sh, long sw, long ph, long pw, long oh, long ow, $T *restrict out,
                       int nt) {
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        $A *mx = scratch_malloc(sizeof($A) * c);
        if (!mx) {
            #pragma omp atomic write
            fail = 1;
        }
        #pragma omp for schedule(static)
        for (long r = 0; r < n * oh; r++) {
            if (!mx) continue;  /* every thread still takes part in the worksharing loop */
            long img = r / oh, oy = r % oh;
            long y0 = oy * sh - ph, y1 = y0 + kh;
            if (y0 < 0) y0 = 0;
            if (y1 > h) y1 = h;
            for (long ox = 0; ox < ow; ox++) {
                long x0 = ox * sw - pw, x1 = x0 + kw;
                if (x0 < 0) x0 = 0;
                if (x1 > w) x1 = w;
                for (long j = 0; j < c; j++) mx[j] = -INFINITY;
                for (long yy = y0; yy < y1; yy++)
                    for (long xx = x0; xx < x1; xx++) {
                        const $T *restrict xi = x + ((img * h + yy) * w + xx) * c;
                        for (long j = 0; j < c; j++) {
                            $A v = LD_$S(xi[j]) * scale[j] + shift[j];
                            mx[j] = (v > mx[j] || v != v) ? v : mx[j];
                        }
                    }
                $T *restrict oi = out + ((img * oh + oy) * ow + ox) * c;
                for (long j = 0; j < c; j++) oi[j] = ST_$S((mx[j] > 0 || mx[j] != mx[j]) ? mx[j] : 0);
            }
        }
        free(mx);
    }
    return fail;
}

/* Its backward up to BN's input: g' (the pooled gradient gout routed to the first maximum of
   each window, as PyTorch routes it, and kept only where that maximum is positive - the ReLU
   mask) written to dx, all of dx (zero where nothing is routed); the column sums of g' and of
   (x - mean) * g' added to sums (double, 2 x c). Parallel over images: windows overlap within
   an image only. */
int bn_relu_maxpool_grad_$S(long n, long h, long w, long c, const $T *restrict x,
                            const $A *restrict scale, const $A *restrict shift,
                            const $A *restrict mean, long kh, long kw, long sh, long sw, long ph,
                            long pw, long oh, long ow, const $T *restrict gout,
                            $T *restrict dx, double *restrict sums, int nt) {
    double *part = scratch_calloc((size_t)nt * 2 * c, sizeof(double));
    if (!part) return 1;
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        double *dg = part + (long)t * 2 * c, *dxg = dg + c;
        $A *mx = scratch_malloc(sizeof($A) * 3 * c);
        long *arg = scratch_malloc(sizeof(long) * c);
        int ok = mx && arg;
        if (!ok) {
            #pragma omp atomic write
            fail = 1;
        }
        $A *ag = ok ? mx + c : 0, *axg = ok ? ag + c : 0;
        #pragma omp for schedule(static)
        for (long img = 0; img < n; img++) {
            if (!ok) continue;  /* every thread still takes part in the worksharing loop */
            const $T *restrict xim = x + img * h * w * c;
            $T *restrict dim = dx + img * h * w * c;
            for (long i = 0; i < h * w * c; i++) dim[i] = ST_$S(0);
            for (long oy = 0; oy < oh; oy++) {
                long y0 = oy * sh - ph, y1 = y0 + kh;
                if (y0 < 0) y0 = 0;
                if (y1 > h) y1 = h;
                for (long j = 0; j < 2 * c; j++) ag[j] = 0;
                for (long ox = 0; ox < ow; ox++) {
                    long x0 = ox * sw - pw, x1 = x0 + kw;
                    if (x0 < 0) x0 = 0;
                    if (x1 > w) x1 = w;
                    for (long j = 0; j < c; j++) { mx[j] = -INFINITY; arg[j] = y0 * w + x0; }
                    for (long yy = y0; yy < y1; yy++)
                        for (long xx = x0; xx < x1; xx++) {
                            const $T *restrict xi = xim + (yy * w + xx) * c;
                            long pos = yy * w + xx;
                            for (long j = 0; j < c; j++) {
                                $A v = LD_$S(xi[j]) * scale[j] + shift[j];
                                int take = v > mx[j] || v != v;
                                mx[j] = take ? v : mx[j];
                                arg[j] = take ? pos : arg[j];
                            }
                        }
                    const $T *restrict gi = gout + ((img * oh + oy) * ow + ox) * c;
                    for (long j = 0; j < c; j++) {
                        if (mx[j] > 0) {
                            long at = arg[j] * c + j;
                            $A gv = LD_$S(gi[j]);
                            dim[at] = ST_$S(LD_$S(dim[at]) + gv);
                            ag[j] += gv;
                            axg[j] += (LD_$S(xim[at]) - mean[j]) * gv;
                        }
                    }
                }
                for (long j = 0; j < c; j++) { dg[j] += ag[j]; dxg[j] += axg[j]; }
            }
        }
        free(mx);
        free(arg);
    }
    if (fail) { free(part); return 1; }
    add_partial_sums_$S(c, nt, part, sums);
    return 0;
}
""")

_HEADER = r"""#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* Scratch allocation that never asks for 0 bytes, so that NULL always means out of memory. The
   functions that allocate return 0, or 1 when an allocation failed (then nothing is merged into
   their accumulators; inside a parallel region the thread whose allocation failed skips its
   work and sets the shared flag), and free all they allocated either way. */
static inline void *scratch_malloc(size_t n) { return malloc(n ? n : 1); }
static inline void *scratch_calloc(size_t n, size_t size) { return calloc(n ? n : 1, size ? size : 1); }

/* Element loads and stores: float and double as they are; bfloat16 (stored as uint16_t) widened
   to float on load and rounded to nearest even on store, NaN to 0x7fc0, as PyTorch rounds. */
#define LD_f32(v) (v)
#define ST_f32(v) (v)
#define LD_f64(v) (v)
#define ST_f64(v) (v)
#define LD_bf16(v) bf16_to_float(v)
#define ST_bf16(v) float_to_bf16(v)
/* (branch-free, through a union: so that GCC vectorises the loops that use them) */
typedef union { uint32_t u; float f; } bits32;
static inline float bf16_to_float(uint16_t h) {
    bits32 v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
static inline uint16_t float_to_bf16(float f) {
    bits32 v;
    v.f = f;
    uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}
"""
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
# dtype: (C storage type, C arithmetic type, suffix)
_TYPES = {torch.float32: ("float", "float", "f32"), torch.float64: ("double", "double", "f64"),
          torch.bfloat16: ("uint16_t", "float", "bf16")}
_STATUS = ("col_stats_acc", "bn_relu_grad", "bn_relu_maxpool", "bn_relu_maxpool_grad")

_lock = threading.Lock()
_lib = None
_error: str | None = None


def _source() -> str:
    return _HEADER + "".join(_TEMPLATE.substitute(T=t, A=a, S=s) for t, a, s in _TYPES.values())


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("flags", "model name"))}))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("DENSENET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "densenet")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"densenet-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build() -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    src = _source()
    key = hashlib.sha256("\0".join([src, cc, *_FLAGS, _cpu_id(), torch.__version__]).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"densenet_kernels_{key}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            c_file = Path(tmp) / "kernels.c"
            c_file.write_text(src)
            out = Path(tmp) / lib_path.name
            proc = subprocess.run([cc, *_FLAGS, str(c_file), "-o", str(out)], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(out, lib_path)  # atomic: a concurrent build or a kill leaves no partial file
    lib = ctypes.CDLL(str(lib_path))  # after torch: its libgomp.so.1 serves the library too
    L, I, P = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
    for _, _, s in _TYPES.values():
        getattr(lib, f"bn_relu_{s}").argtypes = [L, L, P, L, P, P, P, L, I]
        getattr(lib, f"col_stats_acc_{s}").argtypes = [L, L, P, L, P, I]
        getattr(lib, f"copy_cols_{s}").argtypes = [L, L, P, L, P, L, I]
        getattr(lib, f"bn_relu_grad_{s}").argtypes = [L, L, P, L, P, L, P, P, P, P, L, I, P, L, P, I]
        getattr(lib, f"bn_grad_apply_{s}").argtypes = [L, L, P, L, P, L, P, P, P, P, P, P, L, I]
        getattr(lib, f"col_affine_add_{s}").argtypes = [L, L, P, L, P, P, P, L, P, L, I]
        getattr(lib, f"bn_relu_maxpool_{s}").argtypes = [L, L, L, L, P, P, P, L, L, L, L, L, L, L, L, P, I]
        getattr(lib, f"bn_relu_maxpool_grad_{s}").argtypes = [L, L, L, L, P, P, P, P, L, L, L, L, L, L,
                                                             L, L, P, P, P, I]
        for name in _STATUS:  # these allocate scratch: 0, or nonzero when out of memory
            getattr(lib, f"{name}_{s}").restype = ctypes.c_int
        for name in ("bn_relu", "copy_cols", "bn_grad_apply", "col_affine_add"):
            getattr(lib, f"{name}_{s}").restype = None
    return lib


def _library():
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _error = str(exc)
                    warnings.warn(f"densenet: the fused CPU kernels are unavailable ({_error}); the "
                                  "efficient path uses torch ops instead (same results, slower). "
                                  "Install a C compiler (gcc) or set CC to use them.",
                                  RuntimeWarning, stacklevel=3)
    return _lib


def available(t: torch.Tensor | None = None) -> bool:
    """True when the kernels can run (on ``t``: a CPU float32/float64/bfloat16 tensor)."""
    if os.environ.get("DENSENET_KERNELS", "1") == "0":
        return False
    if t is not None and (t.device.type != "cpu" or t.dtype not in _TYPES):
        return False
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (the compiler's error), or None."""
    if os.environ.get("DENSENET_KERNELS", "1") == "0":
        return "disabled by DENSENET_KERNELS=0"
    _library()
    return _error


# ----------------------------------------------------------------------------- wrappers
# Matrices are 2-D CPU tensors with unit column stride (column slices of a row-major buffer)
# whose rows do not overlap; per-column vectors have one element per column and are used as
# contiguous tensors of the matrices' dtype (converted when they are not). Every wrapper checks
# all its arguments before it calls C and raises ValueError naming the kernel, the argument,
# what it expected and what it got, rather than letting C read or write out of bounds. The
# checks compare attributes only (no tensor ops): they run many times per training step.

def _what(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    if t.layout is not torch.strided:
        return f"a {t.layout} {t.dtype} {tuple(t.shape)} tensor on {t.device}"
    kind = "contiguous" if t.is_contiguous() else f"non-contiguous (strides {t.stride()})"
    return f"a {kind} {t.dtype} {tuple(t.shape)} tensor on {t.device}"


def _type_names(types) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in types)


def _not_on(name: str, arg: str, t: torch.Tensor, device: str = "cpu"):
    raise ValueError(f"{name}: {arg} must be a {device.upper()} tensor, got one on {t.device}")


def _mat(name: str, arg: str, t, like: torch.Tensor | None = None, ref: str = "x",
         write: bool = False, types=_TYPES, device: str = "cpu") -> int:
    """The row stride of the matrix ``t`` (the argument ``arg`` of kernel ``name``), checked:
    with ``like``, shaped and typed like it (the kernel's input, called ``ref``); without, an
    (m, c) matrix of one of ``types`` (the input itself). All on ``device`` (a device type).
    Its rows may not overlap, except in a matrix only read (not ``write``) with row stride 0:
    rows broadcast from one, as autograd hands out the gradient of a sum."""
    if like is None:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = f"{t.dim()}-D {_what(t)}" if isinstance(t, torch.Tensor) else _what(t)
            raise ValueError(f"{name}: {arg} must be a 2-D (m, c) matrix, got {got}")
        if t.dtype not in types:
            raise ValueError(f"{name}: {arg} must be {_type_names(types)}, got {t.dtype}")
    elif not isinstance(t, torch.Tensor) or t.shape != like.shape:
        raise ValueError(f"{name}: {arg} must be a {tuple(like.shape)} matrix like {ref}, got {_what(t)}")
    elif t.dtype != like.dtype:
        raise ValueError(f"{name}: {arg} must be {like.dtype} like {ref}, got {t.dtype}")
    if t.device.type != device:
        _not_on(name, arg, t, device)
    (ld, cs), (m, c) = t.stride(), t.shape
    if (cs != 1 and c > 1) or (ld < c and m > 1 and (write or ld != 0)):
        if cs != 1 and c > 1:
            raise ValueError(f"{name}: {arg} must have unit column stride, got strides {(ld, cs)}")
        raise ValueError(f"{name}: {arg} must have a row stride of at least its {c} columns (rows "
                         f"would overlap), got strides {(ld, cs)}")
    return ld


def _vec(name: str, arg: str, v, like: torch.Tensor, c: int, per: str = "column",
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """The per-column vector ``v`` (``c`` elements, checked, on ``like``'s device) as a
    contiguous tensor of ``dtype`` (default ``like``'s): ``v`` itself when it is one (only its
    data pointer is used: no autograd, no copy - the common case)."""
    if not isinstance(v, torch.Tensor) or v.numel() != c:
        got = f"{v.numel()} {_what(v)}" if isinstance(v, torch.Tensor) else _what(v)
        raise ValueError(f"{name}: {arg} must have {c} elements (one per {per} of x), got {got}")
    if v.device != like.device:
        _not_on(name, arg, v, like.device.type)
    dtype = like.dtype if dtype is None else dtype
    if v.dtype == dtype and v.is_contiguous():
        return v
    return v.detach().to(dtype).contiguous()


def _vecs(name: str, x: torch.Tensor, dtype: torch.dtype, per: str = "column",
          **vectors) -> list[torch.Tensor]:
    """``_vec`` of each named vector, one element per ``per`` (the last dimension) of ``x``."""
    return [_vec(name, arg, v, x, x.shape[-1], per, dtype) for arg, v in vectors.items()]


def _float64(name: str, arg: str, t, shape: tuple | None, numel: int, expected: str) -> torch.Tensor:
    """``t``, checked to be a contiguous float64 CPU tensor of ``numel`` elements (and, unless
    None, of ``shape``)."""
    if (not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or not t.is_cpu
            or t.layout is not torch.strided or not t.is_contiguous() or t.numel() != numel
            or (shape is not None and t.shape != shape)):
        raise ValueError(f"{name}: {arg} must be {expected}, got {_describe(t)}")
    return t


def _sums(name: str, sums, c: int) -> torch.Tensor:
    if sums is None:
        return torch.zeros(2, c, dtype=torch.float64)
    return _float64(name, "sums", sums, (2, c), 2 * c, f"a contiguous float64 (2, {c}) CPU tensor")


def _oom(name: str):
    raise MemoryError(f"densenet kernel {name}: out of memory allocating scratch")


def _fn(name: str, t: torch.Tensor):
    return getattr(_library(), f"{name}_{_TYPES[t.dtype][2]}")


def _arith(t: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in for ``t`` (and of their per-column vectors): float32
    for bfloat16 maps, else ``t``'s own."""
    return torch.float32 if t.dtype == torch.bfloat16 else t.dtype


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = relu(x * scale + shift), column-wise scale and shift."""
    name = "bn_relu"
    ldx = _mat(name, "x", x)
    m, c = x.shape
    ldo = _mat(name, "out", out, x, write=True)
    scale, shift = _vecs(name, x, _arith(x), scale=scale, shift=shift)
    _fn(name, x)(m, c, x.data_ptr(), ldx, scale.data_ptr(), shift.data_ptr(),
                 out.data_ptr(), ldo, torch.get_num_threads())
    return out


def col_stats(x: torch.Tensor, state: torch.Tensor | None = None):
    """Per-column (mean, biased variance) of ``x``, in one pass (blocks merged by Chan et al.'s
    update, in double). With ``state`` (float64, 1 + 2C: count, means, squared-deviation sums,
    from ``stats_state``), merges ``x`` into it and returns it instead: feed the rows in chunks,
    then call ``stats_from_state``."""
    ldx = _mat("col_stats", "x", x)
    m, c = x.shape
    if state is None:
        acc = stats_state(c)
    else:
        acc = _float64("col_stats", "state", state, None, 1 + 2 * c,
                       f"a contiguous float64 CPU tensor of 1 + 2 * {c} = {1 + 2 * c} elements")
    if _fn("col_stats_acc", x)(m, c, x.data_ptr(), ldx, acc.data_ptr(), torch.get_num_threads()):
        _oom("col_stats")
    return stats_from_state(acc, _arith(x)) if state is None else acc


def copy_cols(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst = src for two matrices of one shape (a column slice of a buffer, say)."""
    name = "copy_cols"
    lds = _mat(name, "src", src)
    m, c = src.shape
    ldd = _mat(name, "dst", dst, src, ref="src", write=True)
    _fn(name, src)(m, c, src.data_ptr(), lds, dst.data_ptr(), ldd, torch.get_num_threads())
    return dst


def stats_state(c: int) -> torch.Tensor:
    return torch.zeros(1 + 2 * c, dtype=torch.float64)


def stats_from_state(state: torch.Tensor, dtype):
    c = (state.numel() - 1) // 2
    count = max(state[0].item(), 1.0)
    return state[1:1 + c].to(dtype), (state[1 + c:] / count).to(dtype)


def bn_relu_grad(x, g, scale, shift, mean, dx=None, sums=None, z=None, assign=False):
    """For g, the gradient at relu(x * scale + shift): g' = g where x * scale + shift > 0, else 0.
    Adds the column sums of g' and of (x - mean) * g' to ``sums`` (a float64 (2, C) tensor,
    zeros if not given) and returns it; with ``dx``, also does dx += g' * scale (the BN input
    gradient without its batch-statistics corrections; dx = g' * scale with ``assign``); with
    ``z``, also writes relu(x * scale + shift) there."""
    name = "bn_relu_grad"
    ldx = _mat(name, "x", x)
    m, c = x.shape
    ldg = _mat(name, "g", g, x)
    lddx = _mat(name, "dx", dx, x, write=True) if dx is not None else 0
    ldz = _mat(name, "z", z, x, write=True) if z is not None else 0
    scale, shift, mean = _vecs(name, x, _arith(x), scale=scale, shift=shift, mean=mean)
    sums = _sums(name, sums, c)
    if _fn(name, x)(m, c, x.data_ptr(), ldx, g.data_ptr(), ldg, scale.data_ptr(), shift.data_ptr(),
                    mean.data_ptr(), dx.data_ptr() if dx is not None else None, lddx, int(assign),
                    z.data_ptr() if z is not None else None, ldz, sums.data_ptr(), torch.get_num_threads()):
        _oom(name)
    return sums


def bn_grad_apply(x, g, scale, shift, mean, a, b, out):
    """out = scale * (g' - a - (x - mean) * b), g' as in ``bn_relu_grad``; ``out`` may be ``g``."""
    name = "bn_grad_apply"
    ldx = _mat(name, "x", x)
    m, c = x.shape
    ldg = _mat(name, "g", g, x)
    ldo = _mat(name, "out", out, x, write=True)
    args = _vecs(name, x, _arith(x), scale=scale, shift=shift, mean=mean, a=a, b=b)
    _fn(name, x)(m, c, x.data_ptr(), ldx, g.data_ptr(), ldg, *[v.data_ptr() for v in args],
                 out.data_ptr(), ldo, torch.get_num_threads())
    return out


def col_affine_add(x, coef, const, src, out):
    """out = src + x * coef + const, column-wise coef and const; ``out`` may be ``src``."""
    name = "col_affine_add"
    ldx = _mat(name, "x", x)
    m, c = x.shape
    lds = _mat(name, "src", src, x)
    ldo = _mat(name, "out", out, x, write=True)
    coef, const = _vecs(name, x, _arith(x), coef=coef, const=const)
    _fn(name, x)(m, c, x.data_ptr(), ldx, coef.data_ptr(), const.data_ptr(),
                 src.data_ptr(), lds, out.data_ptr(), ldo, torch.get_num_threads())
    return out


def _image(name: str, arg: str, t, like: torch.Tensor | None = None, shape: tuple | None = None,
           expected: str = "") -> torch.Size:
    """The shape of ``t``, checked to be a contiguous channels-last (N, H, W, C) CPU image batch:
    with ``like``, of its dtype and of ``shape`` (``expected`` says what that is); without, of
    float32, float64 or bfloat16 (the kernel's input)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.layout is not torch.strided or not t.is_contiguous():
        raise ValueError(f"{name}: {arg} must be a contiguous 4-D (N, H, W, C) tensor, got {_describe(t)}")
    if like is None:
        if t.dtype not in _TYPES:
            raise ValueError(f"{name}: {arg} must be {_type_names(_TYPES)}, got {t.dtype}")
    else:
        if t.shape != shape:
            raise ValueError(f"{name}: {arg} must be {tuple(shape)} {expected}, got {tuple(t.shape)}")
        if t.dtype != like.dtype:
            raise ValueError(f"{name}: {arg} must be {like.dtype} like x, got {t.dtype}")
    if not t.is_cpu:
        _not_on(name, arg, t)
    return t.shape


def _ints(name: str, arg: str, pair) -> tuple[int, int]:
    try:
        first, second = pair
        return operator.index(first), operator.index(second)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {arg} must be a pair of ints, got {pair!r}") from None


def _window(name: str, kernel, stride, padding, h: int, w: int):
    """(kh, kw, sh, sw, ph, pw, oh, ow) of a max pooling of (h, w) images, checked: a positive
    kernel and stride and padding in [0, kernel // 2] (so every window holds a pixel), and at
    least one window each way (floor mode, as F.max_pool2d requires)."""
    (kh, kw), (sh, sw), (ph, pw) = (_ints(name, "kernel", kernel), _ints(name, "stride", stride),
                                    _ints(name, "padding", padding))
    if kh < 1 or kw < 1:
        raise ValueError(f"{name}: kernel must be positive, got {(kh, kw)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"{name}: stride must be positive, got {(sh, sw)}")
    if not (0 <= ph <= kh // 2 and 0 <= pw <= kw // 2):
        raise ValueError(f"{name}: padding must be in [0, kernel // 2] = [0, {kh // 2}] x [0, {kw // 2}] "
                         f"for kernel {(kh, kw)}, got {(ph, pw)}")
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{name}: x's images {(h, w)} are smaller than the kernel {(kh, kw)} with "
                         f"padding {(ph, pw)}: no window fits")
    return kh, kw, sh, sw, ph, pw, oh, ow


def bn_relu_maxpool(x, scale, shift, kernel, stride, padding, out):
    """out (N, OH, OW, C) = max pooling of relu(x * scale + shift) over the channels-last images
    x (N, H, W, C) (both contiguous): windows ``kernel``, ``stride``, ``padding`` (pairs), no
    dilation, floor mode - ``F.max_pool2d`` after BN-ReLU, without either intermediate."""
    name = "bn_relu_maxpool"
    n, h, w, c = _image(name, "x", x)
    kh, kw, sh, sw, ph, pw, oh, ow = _window(name, kernel, stride, padding, h, w)
    _image(name, "out", out, x, (n, oh, ow, c), "= (n, oh, ow, c) for these windows")
    scale, shift = _vecs(name, x, _arith(x), "channel", scale=scale, shift=shift)
    if _fn(name, x)(n, h, w, c, x.data_ptr(), scale.data_ptr(), shift.data_ptr(), kh, kw, sh, sw, ph, pw,
                    oh, ow, out.data_ptr(), torch.get_num_threads()):
        _oom(name)
    return out


def bn_relu_maxpool_grad(x, scale, shift, mean, kernel, stride, padding, gout, dx, sums=None):
    """Backward of ``bn_relu_maxpool`` to the BN output's gradient g' (``gout`` routed to each
    window's first maximum, kept where it is positive): writes g' to all of ``dx`` (like ``x``)
    and adds the column sums of g' and of (x - mean) * g' to ``sums`` (float64 (2, C), zeros if
    not given), which it returns."""
    name = "bn_relu_maxpool_grad"
    n, h, w, c = _image(name, "x", x)
    kh, kw, sh, sw, ph, pw, oh, ow = _window(name, kernel, stride, padding, h, w)
    _image(name, "gout", gout, x, (n, oh, ow, c), "= (n, oh, ow, c) for these windows")
    _image(name, "dx", dx, x, x.shape, "like x")
    scale, shift, mean = _vecs(name, x, _arith(x), "channel", scale=scale, shift=shift, mean=mean)
    sums = _sums(name, sums, c)
    if _fn(name, x)(n, h, w, c, x.data_ptr(), scale.data_ptr(), shift.data_ptr(), mean.data_ptr(),
                    kh, kw, sh, sw, ph, pw, oh, ow, gout.data_ptr(), dx.data_ptr(), sums.data_ptr(),
                    torch.get_num_threads()):
        _oom(name)
    return sums


# ----------------------------------------------------------------------------- huge pages

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
POOL_MIN_BYTES = 4 * _HUGE  # smaller buffers come from torch's allocator as usual
_libc = None


def _madvise_huge(t: torch.Tensor) -> None:
    """Ask for transparent huge pages behind ``t`` (advice only: failure is harmless)."""
    global _libc
    if platform.system() != "Linux" or os.environ.get("DENSENET_HUGEPAGES", "1") == "0":
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        nbytes = t.untyped_storage().nbytes()
        start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_HUGE - 1)
        if end > start:
            _libc.madvise(start, end - start, _MADV_HUGEPAGE)


class _BufferPool:
    """Large CPU buffers kept between uses, the way PyTorch's CUDA caching allocator keeps GPU
    memory: a dense block's feature buffer, its gradient and the other big temporaries have the
    same sizes every step, and freshly mapped memory is expensive on the CPU - every page is
    faulted in and zeroed by the kernel on first touch, and on a VM the host may have to back it
    again (a 56 MB buffer took 5 ms to first touch in forward and 80-120 ms in backward, at the
    step's memory peak, on the project's machine). A buffer is handed out again only when no
    tensor refers to its storage any more (the storage's use count is the pool's own reference),
    and only for a request of exactly its size. Idle buffers not asked for in the last
    ``_KEEP`` requests are freed, so a change of batch size does not pin the old sizes;
    ``release_buffers()`` frees all idle ones at once."""

    _KEEP = 256

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[list] = []  # [storage, request number of its last use]
        self._count = 0
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)

    def usable(self) -> bool:
        return self._use_count is not None and os.environ.get("DENSENET_POOL", "1") != "0"

    def _idle(self, storage) -> bool:
        return self._use_count(storage._cdata) == 1

    def empty(self, shape, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._count += 1
            found = None
            keep = []
            for entry in self._entries:
                storage, last = entry
                idle = self._idle(storage)
                if found is None and idle and storage.nbytes() == nbytes:
                    entry[1] = self._count
                    found = storage
                elif idle and self._count - last > self._KEEP:
                    continue  # dropped: idle and not asked for lately
                keep.append(entry)
            self._entries = keep
            if found is not None:
                return torch.empty(0, dtype=dtype).set_(found, 0, shape)
            t = torch.empty(shape, dtype=dtype)
            _madvise_huge(t)
            self._entries.append([t.untyped_storage(), self._count])
            return t

    def release(self) -> int:
        with self._lock:
            idle = [e for e in self._entries if self._idle(e[0])]
            self._entries = [e for e in self._entries if not self._idle(e[0])]
            return sum(e[0].nbytes() for e in idle)

    def held(self) -> int:
        with self._lock:
            return sum(e[0].nbytes() for e in self._entries)


_pool = _BufferPool()


def huge_empty(shape, like: torch.Tensor) -> torch.Tensor:
    """``like.new_empty(shape)`` (uninitialised); on the CPU, for a large buffer (8 MB or more),
    served from the buffer pool (``_BufferPool``) and backed by transparent huge pages (madvise
    MADV_HUGEPAGE before first touch: a fresh 56 MB buffer otherwise costs 14,000 page faults,
    each a trip through the kernel, with 2 MB pages 28). ``DENSENET_POOL=0`` turns the pool off
    and ``DENSENET_HUGEPAGES=0`` the huge pages. The memory is torch's allocation either way, so
    the allocator's accounting sees it (a pooled buffer from when it was first made)."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes < POOL_MIN_BYTES or like.layout is not torch.strided:
        return like.new_empty(shape)
    if _pool.usable():
        return _pool.empty(tuple(shape), like.dtype, nbytes)
    t = like.new_empty(shape)
    _madvise_huge(t)
    return t


def release_buffers() -> int:
    """Free the pooled CPU buffers no tensor uses any more; returns the bytes freed."""
    return _pool.release()


def pooled_bytes() -> int:
    """Bytes the buffer pool holds now, in use or idle."""
    return _pool.held()
