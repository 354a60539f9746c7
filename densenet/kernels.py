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

They are plain C (float and double) over row-major matrices with a leading dimension, so they
read column slices of the shared buffer in place, and are parallel over rows with OpenMP - the
same ``libgomp`` PyTorch itself loaded (the library is linked against ``libgomp.so.1``, which the
dynamic loader resolves to the copy already in the process), with ``torch.get_num_threads()``
threads. They are compiled with the system C compiler (``$CC`` or ``cc``) into
``$DENSENET_CACHE`` (default ``~/.cache/densenet``) the first time they are needed, which takes
about a second. Without a compiler, or with ``DENSENET_KERNELS=0``, ``available()`` is False and
the block uses the equivalent torch ops instead (the same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
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
void bn_relu_$S(long m, long c, const $T *restrict x, long ldx, const $T *restrict scale,
                const $T *restrict shift, $T *restrict z, long ldz, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const $T *xi = x + i * ldx;
        $T *zi = z + i * ldz;
        for (long j = 0; j < c; j++) {
            $T v = xi[j] * scale[j] + shift[j];
            zi[j] = v > 0 ? v : 0;
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

void col_stats_acc_$S(long m, long c, const $T *restrict x, long ldx, double *restrict state,
                      int nt) {
    /* state = [count, mean[c], m2[c]] (m2: sum of squared deviations), merged into */
    double *part = calloc((size_t)nt * (2 * c + 1), sizeof(double));
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        double *mu = part + (long)t * (2 * c + 1), *m2 = mu + c, cnt = 0;
        double *bmu = malloc(sizeof(double) * 2 * c), *bm2 = bmu + c;
        long hi = m * (t + 1) / n;
        for (long i0 = m * t / n; i0 < hi; i0 += 256) {
            long r = hi - i0 < 256 ? hi - i0 : 256;
            for (long j = 0; j < 2 * c; j++) bmu[j] = 0;
            for (long i = i0; i < i0 + r; i++) {
                const $T *restrict xi = x + i * ldx;
                for (long j = 0; j < c; j++) bmu[j] += xi[j];
            }
            for (long j = 0; j < c; j++) bmu[j] /= r;
            for (long i = i0; i < i0 + r; i++) {
                const $T *restrict xi = x + i * ldx;
                for (long j = 0; j < c; j++) { double d = xi[j] - bmu[j]; bm2[j] += d * d; }
            }
            merge_$S(c, mu, m2, cnt, bmu, bm2, (double)r);
            cnt += r;
        }
        m2[c] = cnt;
        free(bmu);
    }
    for (int t = 0; t < nt; t++) {
        double *p = part + (long)t * (2 * c + 1);
        if (p[2 * c] > 0) {
            merge_$S(c, state + 1, state + 1 + c, state[0], p, p + c, p[2 * c]);
            state[0] += p[2 * c];
        }
    }
    free(part);
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
                                const $T *restrict g, long ldg, const $T *restrict scale,
                                const $T *restrict shift, const $T *restrict mean,
                                $T *restrict dx, long lddx, int assign, $T *restrict z,
                                long ldz, $T *restrict ag, $T *restrict axg) {
    for (long i = 0; i < r; i++) {
        const $T *restrict xi = x + i * ldx, *restrict gi = g + i * ldg;
        $T *restrict di = dx ? dx + i * lddx : 0, *restrict zi = z ? z + i * ldz : 0;
        for (long j = 0; j < c; j++) {
            $T pre = xi[j] * scale[j] + shift[j];
            $T gm = pre > 0 ? gi[j] : 0;
            ag[j] += gm;
            axg[j] += (xi[j] - mean[j]) * gm;
            if (di) di[j] = (assign ? 0 : di[j]) + gm * scale[j];
            if (zi) zi[j] = pre > 0 ? pre : 0;
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

void bn_relu_grad_$S(long m, long c, const $T *restrict x, long ldx, const $T *restrict g,
                     long ldg, const $T *restrict scale, const $T *restrict shift,
                     const $T *restrict mean, $T *restrict dx, long lddx, int assign,
                     $T *restrict z, long ldz, double *restrict sums, int nt) {
    /* per thread: $T partial sums over blocks of 64 rows, added into double totals */
    double *part = calloc((size_t)nt * 2 * c, sizeof(double));
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        double *dg = part + (long)t * 2 * c, *dxg = dg + c;
        $T *ag = malloc(sizeof($T) * 2 * c), *axg = ag + c;
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
    add_partial_sums_$S(c, nt, part, sums);
}

void bn_grad_apply_$S(long m, long c, const $T *restrict x, long ldx, const $T *g, long ldg,
                      const $T *restrict scale, const $T *restrict shift,
                      const $T *restrict mean, const $T *restrict a, const $T *restrict b,
                      $T *out, long ldo, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const $T *xi = x + i * ldx, *gi = g + i * ldg;
        $T *oi = out + i * ldo;
        for (long j = 0; j < c; j++) {
            $T gm = xi[j] * scale[j] + shift[j] > 0 ? gi[j] : 0;
            oi[j] = scale[j] * (gm - a[j] - (xi[j] - mean[j]) * b[j]);
        }
    }
}

void col_affine_add_$S(long m, long c, const $T *restrict x, long ldx, const $T *restrict coef,
                       const $T *restrict cst, const $T *src, long lds, $T *dst, long ldd, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const $T *xi = x + i * ldx, *si = src + i * lds;
        $T *di = dst + i * ldd;
        for (long j = 0; j < c; j++) di[j] = si[j] + xi[j] * coef[j] + cst[j];
    }
}

/* Max pooling of relu(x * scale + shift) over channels-last images (n, h, w, c): since ReLU is
   monotone, the window maximum of the ReLU'd values is the ReLU of the window maximum of
   x * scale + shift, so neither the BN-ReLU output nor the pooling indices are ever stored.
   A NaN wins its window, as in PyTorch's max pooling. Parallel over output rows. */
void bn_relu_maxpool_$S(long n, long h, long w, long c, const $T *restrict x,
                        const $T *restrict scale, const $T *restrict shift, long kh, long kw,
                        long sh, long sw, long ph, long pw, long oh, long ow, $T *restrict out,
                        int nt) {
    #pragma omp parallel num_threads(nt)
    {
        $T *mx = malloc(sizeof($T) * c);
        #pragma omp for schedule(static)
        for (long r = 0; r < n * oh; r++) {
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
                            $T v = xi[j] * scale[j] + shift[j];
                            mx[j] = (v > mx[j] || v != v) ? v : mx[j];
                        }
                    }
                $T *restrict oi = out + ((img * oh + oy) * ow + ox) * c;
                for (long j = 0; j < c; j++) oi[j] = (mx[j] > 0 || mx[j] != mx[j]) ? mx[j] : 0;
            }
        }
        free(mx);
    }
}

/* Its backward up to BN's input: g' (the pooled gradient gout routed to the first maximum of
   each window, as PyTorch routes it, and kept only where that maximum is positive - the ReLU
   mask) written to dx, all of dx (zero where nothing is routed); the column sums of g' and of
   (x - mean) * g' added to sums (double, 2 x c). Parallel over images: windows overlap within
   an image only. */
void bn_relu_maxpool_grad_$S(long n, long h, long w, long c, const $T *restrict x,
                             const $T *restrict scale, const $T *restrict shift,
                             const $T *restrict mean, long kh, long kw, long sh, long sw, long ph,
                             long pw, long oh, long ow, const $T *restrict gout,
                             $T *restrict dx, double *restrict sums, int nt) {
    double *part = calloc((size_t)nt * 2 * c, sizeof(double));
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        double *dg = part + (long)t * 2 * c, *dxg = dg + c;
        $T *mx = malloc(sizeof($T) * 3 * c), *ag = mx + c, *axg = ag + c;
        long *arg = malloc(sizeof(long) * c);
        #pragma omp for schedule(static)
        for (long img = 0; img < n; img++) {
            const $T *restrict xim = x + img * h * w * c;
            $T *restrict dim = dx + img * h * w * c;
            for (long i = 0; i < h * w * c; i++) dim[i] = 0;
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
                                $T v = xi[j] * scale[j] + shift[j];
                                int take = v > mx[j] || v != v;
                                mx[j] = take ? v : mx[j];
                                arg[j] = take ? pos : arg[j];
                            }
                        }
                    const $T *restrict gi = gout + ((img * oh + oy) * ow + ox) * c;
                    for (long j = 0; j < c; j++) {
                        if (mx[j] > 0) {
                            long at = arg[j] * c + j;
                            dim[at] += gi[j];
                            ag[j] += gi[j];
                            axg[j] += (xim[at] - mean[j]) * gi[j];
                        }
                    }
                }
                for (long j = 0; j < c; j++) { dg[j] += ag[j]; dxg[j] += axg[j]; }
            }
        }
        free(mx);
        free(arg);
    }
    add_partial_sums_$S(c, nt, part, sums);
}
""")

_HEADER = "#include <math.h>\n#include <stdlib.h>\n#include <omp.h>\n"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
_TYPES = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}

_lock = threading.Lock()
_lib = None
_error: str | None = None


def _source() -> str:
    return _HEADER + "".join(_TEMPLATE.substitute(T=t, S=s) for t, s in _TYPES.values())


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
    for _, s in _TYPES.values():
        getattr(lib, f"bn_relu_{s}").argtypes = [L, L, P, L, P, P, P, L, I]
        getattr(lib, f"col_stats_acc_{s}").argtypes = [L, L, P, L, P, I]
        getattr(lib, f"copy_cols_{s}").argtypes = [L, L, P, L, P, L, I]
        getattr(lib, f"bn_relu_grad_{s}").argtypes = [L, L, P, L, P, L, P, P, P, P, L, I, P, L, P, I]
        getattr(lib, f"bn_grad_apply_{s}").argtypes = [L, L, P, L, P, L, P, P, P, P, P, P, L, I]
        getattr(lib, f"col_affine_add_{s}").argtypes = [L, L, P, L, P, P, P, L, P, L, I]
        getattr(lib, f"bn_relu_maxpool_{s}").argtypes = [L, L, L, L, P, P, P, L, L, L, L, L, L, L, L, P, I]
        getattr(lib, f"bn_relu_maxpool_grad_{s}").argtypes = [L, L, L, L, P, P, P, P, L, L, L, L, L, L,
                                                             L, L, P, P, P, I]
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
    """True when the kernels can run (on ``t``: a CPU float32/float64 tensor)."""
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
# Matrices are 2-D tensors with unit column stride (column slices of a row-major buffer);
# per-column vectors are contiguous 1-D tensors of the same dtype.

def _ld(t: torch.Tensor) -> int:
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"kernel matrices need unit column stride, got strides {t.stride()}")
    return t.stride(0)


def _vec(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if v.dtype == like.dtype and v.is_contiguous():
        return v  # only its data pointer is used: no autograd, no copy (the common case)
    return v.detach().to(like.dtype).contiguous()


def _fn(name: str, t: torch.Tensor):
    return getattr(_library(), f"{name}_{_TYPES[t.dtype][1]}")


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = relu(x * scale + shift), column-wise scale and shift."""
    m, c = x.shape
    scale, shift = _vec(scale, x), _vec(shift, x)
    _fn("bn_relu", x)(m, c, x.data_ptr(), _ld(x), scale.data_ptr(), shift.data_ptr(),
                      out.data_ptr(), _ld(out), torch.get_num_threads())
    return out


def col_stats(x: torch.Tensor, state: torch.Tensor | None = None):
    """Per-column (mean, biased variance) of ``x``, in one pass (blocks merged by Chan et al.'s
    update, in double). With ``state`` (float64, 1 + 2C: count, means, squared-deviation sums,
    from ``stats_state``), merges ``x`` into it and returns it instead: feed the rows in chunks,
    then call ``stats_from_state``."""
    m, c = x.shape
    acc = stats_state(c) if state is None else state
    _fn("col_stats_acc", x)(m, c, x.data_ptr(), _ld(x), acc.data_ptr(), torch.get_num_threads())
    return stats_from_state(acc, x.dtype) if state is None else acc


def copy_cols(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst = src for two matrices of one shape (a column slice of a buffer, say)."""
    m, c = src.shape
    _fn("copy_cols", src)(m, c, src.data_ptr(), _ld(src), dst.data_ptr(), _ld(dst), torch.get_num_threads())
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
    m, c = x.shape
    scale, shift, mean = _vec(scale, x), _vec(shift, x), _vec(mean, x)
    if sums is None:
        sums = torch.zeros(2, c, dtype=torch.float64)
    _fn("bn_relu_grad", x)(m, c, x.data_ptr(), _ld(x), g.data_ptr(), _ld(g), scale.data_ptr(),
                           shift.data_ptr(), mean.data_ptr(), dx.data_ptr() if dx is not None else None,
                           _ld(dx) if dx is not None else 0, int(assign), z.data_ptr() if z is not None else None,
                           _ld(z) if z is not None else 0, sums.data_ptr(), torch.get_num_threads())
    return sums


def bn_grad_apply(x, g, scale, shift, mean, a, b, out):
    """out = scale * (g' - a - (x - mean) * b), g' as in ``bn_relu_grad``; ``out`` may be ``g``."""
    m, c = x.shape
    args = [_vec(v, x) for v in (scale, shift, mean, a, b)]
    _fn("bn_grad_apply", x)(m, c, x.data_ptr(), _ld(x), g.data_ptr(), _ld(g),
                            *[v.data_ptr() for v in args], out.data_ptr(), _ld(out), torch.get_num_threads())
    return out


def col_affine_add(x, coef, const, src, out):
    """out = src + x * coef + const, column-wise coef and const; ``out`` may be ``src``."""
    m, c = x.shape
    coef, const = _vec(coef, x), _vec(const, x)
    _fn("col_affine_add", x)(m, c, x.data_ptr(), _ld(x), coef.data_ptr(), const.data_ptr(),
                             src.data_ptr(), _ld(src), out.data_ptr(), _ld(out), torch.get_num_threads())
    return out


def _images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"kernel images need a contiguous (N, H, W, C) tensor, got strides {x.stride()}")
    return x


def bn_relu_maxpool(x, scale, shift, kernel, stride, padding, out):
    """out (N, OH, OW, C) = max pooling of relu(x * scale + shift) over the channels-last images
    x (N, H, W, C) (both contiguous): windows ``kernel``, ``stride``, ``padding`` (pairs), no
    dilation, floor mode - ``F.max_pool2d`` after BN-ReLU, without either intermediate."""
    n, h, w, c = _images(x).shape
    _, oh, ow, _ = _images(out).shape
    scale, shift = _vec(scale, x), _vec(shift, x)
    _fn("bn_relu_maxpool", x)(n, h, w, c, x.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                              *kernel, *stride, *padding, oh, ow, out.data_ptr(), torch.get_num_threads())
    return out


def bn_relu_maxpool_grad(x, scale, shift, mean, kernel, stride, padding, gout, dx, sums=None):
    """Backward of ``bn_relu_maxpool`` to the BN output's gradient g' (``gout`` routed to each
    window's first maximum, kept where it is positive): writes g' to all of ``dx`` (like ``x``)
    and adds the column sums of g' and of (x - mean) * g' to ``sums`` (float64 (2, C), zeros if
    not given), which it returns."""
    n, h, w, c = _images(x).shape
    _, oh, ow, _ = _images(gout).shape
    _images(dx)
    scale, shift, mean = _vec(scale, x), _vec(shift, x), _vec(mean, x)
    if sums is None:
        sums = torch.zeros(2, c, dtype=torch.float64)
    _fn("bn_relu_maxpool_grad", x)(n, h, w, c, x.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                                   mean.data_ptr(), *kernel, *stride, *padding, oh, ow, gout.data_ptr(),
                                   dx.data_ptr(), sums.data_ptr(), torch.get_num_threads())
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
