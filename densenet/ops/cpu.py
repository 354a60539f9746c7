"""Fused CPU kernels for the memory-efficient dense block, compiled on first use.

The efficient block spends most of a CPU training step outside the matrix products, in
element-wise passes over the block's feature buffer: BN-ReLU, the ReLU mask, the BN gradient
sums and the accumulation of input gradients. Done with torch ops each of those is one or more
full passes over an (N*H*W, C) matrix. The kernels here do each group in one pass:

* ``bn_relu``      z = max(x * scale + shift, 0)
* ``col_stats``    per-column mean and biased variance (one pass, blockwise, in double)
* ``bn_relu_grad`` g' = g masked where x * scale + shift <= 0; the column sums of g' and of
                   (x - mean) * g'; optionally dx += g' * scale and the recomputed BN-ReLU
                   output - all in one pass
* ``bn_grad_apply`` out = scale * (g' - a - (x - mean) * b): BN's input gradient from those sums
* ``col_affine_add`` out = src + x * coef + const (BN's batch-statistics corrections)
* ``bn_relu_maxpool`` the ImageNet stem's BN-ReLU-max-pooling in one pass, and its backward
                   (``bn_relu_maxpool_grad``) to BN's output gradient and sums in one more

They are plain C (``csrc/kernels.c``, each body written once in ``csrc/kernels_body.h`` and
compiled for each element type) over row-major matrices with a leading dimension, so they read
column slices of the shared buffer in place. They take float, double and bfloat16 (stored as 16
bits, computed in float and rounded once to nearest even, as PyTorch rounds; so bf16 autocast
keeps them). They are parallel over rows with OpenMP - the same ``libgomp`` PyTorch itself
loaded (the library is linked against ``libgomp.so.1``, which the dynamic loader resolves to the
copy already in the process), with ``torch.get_num_threads()`` threads. They are compiled with
the system C compiler (``$CC`` or ``cc``) into ``$DENSENET_CACHE`` (default
``~/.cache/densenet``) the first time they are needed: 2.1-2.9 s for all 24 functions on the
project's 2-core machine, where a ``torch.utils.cpp_extension`` build of just one of them as a
``TORCH_LIBRARY`` op took 5.7-9.0 s (``load_inline``: 34-37 s) and needs a C++ compiler and
ninja besides. Their signatures are declared once, in ``csrc/kernels.h``: the compiler checks
the definitions against it and ``parse_header`` turns it into the ctypes signatures. Without a
compiler, or with ``densenet.backends.cpu_kernels`` False (``DENSENET_KERNELS=0``),
``available()`` is False and the block uses the equivalent torch ops instead (the same results,
slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .. import backends
from . import checks

__all__ = ["available", "unavailable_reason", "bn_relu", "col_stats", "copy_cols", "stats_state",
           "stats_from_state", "bn_relu_grad", "bn_grad_apply", "col_affine_add", "bn_relu_maxpool",
           "bn_relu_maxpool_grad", "parse_header", "HeaderError"]

CSRC = Path(__file__).resolve().parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
_TYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}  # dtype: C suffix
_DISABLED = "disabled by densenet.backends.cpu_kernels = False (DENSENET_KERNELS=0 sets it)"

_lock = threading.Lock()
_lib = None
_error: str | None = None


# ----------------------------------------------------------------------------- the header

class HeaderError(ValueError):
    """kernels.h holds something its parser does not read: a fault in the package, not in the
    user's setup, so it is raised rather than turned into ``available() == False``."""


class Prototype(NamedTuple):
    restype: type | None  # None (void) or ctypes.c_int (a status)
    argtypes: tuple


class Header(NamedTuple):
    prototypes: dict  # kernel name without the type suffix: Prototype
    types: tuple  # (storage type, arithmetic type, suffix) of each DENSENET_KERNELS(T, A, S) line


_RESTYPES = {"void": None, "int": ctypes.c_int}
_SCALARS = {"long": ctypes.c_long, "int": ctypes.c_int}
_MACRO = "#define DENSENET_KERNELS(T, A, S)"
# on a prototype with its spaces around ( ) , * and ## taken out and the others made single
_PROTOTYPE = re.compile(r"(\w+) ([A-Za-z_]\w*)_##S\((.*)\)")
_SCALAR = re.compile(r"(long|int) [A-Za-z_]\w*")
_POINTER = re.compile(r"(?:const )?(?:T|A|double)\*[A-Za-z_]\w*")
_INSTANCE = re.compile(r"DENSENET_KERNELS\((\w+), ?(\w+), ?(\w+)\)")
_C_BYTES = {"float": 4, "double": 8, "uint16_t": 2}  # the storage types a dtype may have
_C_ARITH = {"float": torch.float32, "double": torch.float64}


def parse_header(text: str, path: str = "kernels.h") -> Header:
    """The prototypes and element types of ``kernels.h`` (its text), for ctypes. Strict: the
    grammar is the one the header's opening comment states, and anything else - another type, a
    missing name, a stray token - raises ``HeaderError`` naming the prototype, never a guess."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S).replace("\\\n", " ")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    macros = [line for line in lines if line.startswith(_MACRO)]
    if len(macros) != 1:
        raise HeaderError(f"{path}: expected one '{_MACRO}' holding the prototypes, found {len(macros)}")
    *chunks, rest = macros[0][len(_MACRO):].split(";")
    if rest.strip():
        raise HeaderError(f"{path}: {rest.strip()!r} after the last prototype, without its ';'")
    prototypes = {}
    for chunk in (c.strip() for c in chunks):
        match = _PROTOTYPE.fullmatch(re.sub(r" ?([(),*]|##) ?", r"\1", chunk))
        if match is None or match[1] not in _RESTYPES:
            raise HeaderError(f"{path}: cannot parse the prototype {chunk!r}: expected "
                              "'void|int NAME_##S(PARAMETERS);'")
        restype, name, params = match.groups()
        if name in prototypes:
            raise HeaderError(f"{path}: {name}_##S is declared twice")
        argtypes = []
        for param in params.split(","):
            if _SCALAR.fullmatch(param):
                argtypes.append(_SCALARS[param.split()[0]])
            elif _POINTER.fullmatch(param):
                argtypes.append(ctypes.c_void_p)
            else:
                raise HeaderError(f"{path}: cannot parse the parameter {param!r} of {name}_##S in "
                                  f"{chunk!r}: expected 'long NAME', 'int NAME' or "
                                  "'[const] T|A|double *NAME'")
        prototypes[name] = Prototype(_RESTYPES[restype], tuple(argtypes))
    if not prototypes:
        raise HeaderError(f"{path}: {_MACRO} declares no prototypes")
    types = tuple(m.groups() for m in map(_INSTANCE.fullmatch, lines) if m)
    if not types:
        raise HeaderError(f"{path}: no DENSENET_KERNELS(T, A, S) line instantiates the prototypes")
    return Header(prototypes, types)


def _check_types(header: Header) -> None:
    """The header's element types must be the ones the wrappers pass: the dtypes of ``_TYPES``
    with storage of their size and arithmetic in ``_arith``'s dtype."""
    suffixes = {s: (t, a) for t, a, s in header.types}
    for dtype, s in _TYPES.items():
        t, a = suffixes.pop(s, (None, None))
        if t is None:
            raise HeaderError(f"kernels.h: no DENSENET_KERNELS(T, A, {s}) line for {dtype}")
        if _C_BYTES.get(t) != dtype.itemsize or _C_ARITH.get(a) != _arith_of(dtype):
            raise HeaderError(f"kernels.h: DENSENET_KERNELS({t}, {a}, {s}) does not store {dtype} "
                              f"or compute in {_arith_of(dtype)}")
    if suffixes:
        raise HeaderError(f"kernels.h: element types the wrappers do not know: {sorted(suffixes)}")


# ----------------------------------------------------------------------------- building

def _sources() -> dict[str, bytes]:
    """The C sources by file name: kernels.c and the headers it includes."""
    return {p.name: p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h")}


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
    sources = _sources()
    header = parse_header(sources["kernels.h"].decode(), str(CSRC / "kernels.h"))
    _check_types(header)
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    digest = hashlib.sha256()
    for part in [*(b"%s\0%s" % (n.encode(), s) for n, s in sources.items()), cc.encode(),
                 *(f.encode() for f in _FLAGS), _cpu_id().encode(), torch.__version__.encode()]:
        digest.update(part + b"\0")
    lib_path = _cache_dir() / f"densenet_kernels_{digest.hexdigest()[:16]}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            for name, data in sources.items():  # the bytes hashed are the bytes compiled
                (Path(tmp) / name).write_bytes(data)
            out = Path(tmp) / lib_path.name
            proc = subprocess.run([cc, *_FLAGS, str(Path(tmp) / "kernels.c"), "-o", str(out)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(out, lib_path)  # atomic: a concurrent build or a kill leaves no partial file
    lib = ctypes.CDLL(str(lib_path))  # after torch: its libgomp.so.1 serves the library too
    for _, _, s in header.types:
        for name, proto in header.prototypes.items():
            fn = getattr(lib, f"{name}_{s}")
            fn.argtypes, fn.restype = list(proto.argtypes), proto.restype
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
    if not backends.cpu_kernels:
        return False
    if t is not None and (t.device.type != "cpu" or t.dtype not in _TYPES):
        return False
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (the compiler's error), or None."""
    if not backends.cpu_kernels:
        return _DISABLED
    _library()
    return _error


# ----------------------------------------------------------------------------- wrappers
# Each checks all its arguments (checks.py) before it calls C.

def _fn(name: str, t: torch.Tensor):
    return getattr(_library(), f"{name}_{_TYPES[t.dtype]}")


def _arith_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _arith(t: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in for ``t`` (and of their per-column vectors): float32
    for bfloat16 maps, else ``t``'s own."""
    return _arith_of(t.dtype)


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = relu(x * scale + shift), column-wise scale and shift."""
    name = "bn_relu"
    ldx = checks.mat(name, "x", x)
    m, c = x.shape
    ldo = checks.mat(name, "out", out, x, write=True)
    scale, shift = checks.vecs(name, x, _arith(x), scale=scale, shift=shift)
    _fn(name, x)(m, c, x.data_ptr(), ldx, scale.data_ptr(), shift.data_ptr(),
                 out.data_ptr(), ldo, torch.get_num_threads())
    return out


def col_stats(x: torch.Tensor, state: torch.Tensor | None = None):
    """Per-column (mean, biased variance) of ``x``, in one pass (blocks merged by Chan et al.'s
    update, in double). With ``state`` (float64, 1 + 2C: count, means, squared-deviation sums,
    from ``stats_state``), merges ``x`` into it and returns it instead: feed the rows in chunks,
    then call ``stats_from_state``."""
    ldx = checks.mat("col_stats", "x", x)
    m, c = x.shape
    if state is None:
        acc = stats_state(c)
    else:
        acc = checks.float64("col_stats", "state", state, None, 1 + 2 * c,
                             f"a contiguous float64 CPU tensor of 1 + 2 * {c} = {1 + 2 * c} elements")
    if _fn("col_stats_acc", x)(m, c, x.data_ptr(), ldx, acc.data_ptr(), torch.get_num_threads()):
        checks.oom("col_stats")
    return stats_from_state(acc, _arith(x)) if state is None else acc


def copy_cols(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst = src for two matrices of one shape (a column slice of a buffer, say)."""
    name = "copy_cols"
    lds = checks.mat(name, "src", src)
    m, c = src.shape
    ldd = checks.mat(name, "dst", dst, src, ref="src", write=True)
    _fn(name, src)(m, c, src.data_ptr(), lds, dst.data_ptr(), ldd, torch.get_num_threads())
    return dst


def stats_state(c: int) -> torch.Tensor:
    return torch.zeros(1 + 2 * c, dtype=torch.float64)


def stats_from_state(state: torch.Tensor, dtype):
    """(mean, biased variance) in ``dtype`` from a ``col_stats`` state. The count stays a tensor
    (no ``.item()``), so a training step reads nothing back to the host here."""
    c = (state.numel() - 1) // 2
    count = state[0].clamp_min(1.0)
    return state[1:1 + c].to(dtype), (state[1 + c:] / count).to(dtype)


def bn_relu_grad(x, g, scale, shift, mean, dx=None, sums=None, z=None, assign=False):
    """For g, the gradient at relu(x * scale + shift): g' = g where x * scale + shift > 0, else 0.
    Adds the column sums of g' and of (x - mean) * g' to ``sums`` (a float64 (2, C) tensor,
    zeros if not given) and returns it; with ``dx``, also does dx += g' * scale (the BN input
    gradient without its batch-statistics corrections; dx = g' * scale with ``assign``); with
    ``z``, also writes relu(x * scale + shift) there."""
    name = "bn_relu_grad"
    ldx = checks.mat(name, "x", x)
    m, c = x.shape
    ldg = checks.mat(name, "g", g, x)
    lddx = checks.mat(name, "dx", dx, x, write=True) if dx is not None else 0
    ldz = checks.mat(name, "z", z, x, write=True) if z is not None else 0
    scale, shift, mean = checks.vecs(name, x, _arith(x), scale=scale, shift=shift, mean=mean)
    sums = checks.sums(name, sums, c)
    if _fn(name, x)(m, c, x.data_ptr(), ldx, g.data_ptr(), ldg, scale.data_ptr(), shift.data_ptr(),
                    mean.data_ptr(), dx.data_ptr() if dx is not None else None, lddx, int(assign),
                    z.data_ptr() if z is not None else None, ldz, sums.data_ptr(), torch.get_num_threads()):
        checks.oom(name)
    return sums


def bn_grad_apply(x, g, scale, shift, mean, a, b, out):
    """out = scale * (g' - a - (x - mean) * b), g' as in ``bn_relu_grad``; ``out`` may be ``g``."""
    name = "bn_grad_apply"
    ldx = checks.mat(name, "x", x)
    m, c = x.shape
    ldg = checks.mat(name, "g", g, x)
    ldo = checks.mat(name, "out", out, x, write=True)
    args = checks.vecs(name, x, _arith(x), scale=scale, shift=shift, mean=mean, a=a, b=b)
    _fn(name, x)(m, c, x.data_ptr(), ldx, g.data_ptr(), ldg, *[v.data_ptr() for v in args],
                 out.data_ptr(), ldo, torch.get_num_threads())
    return out


def col_affine_add(x, coef, const, src, out):
    """out = src + x * coef + const, column-wise coef and const; ``out`` may be ``src``."""
    name = "col_affine_add"
    ldx = checks.mat(name, "x", x)
    m, c = x.shape
    lds = checks.mat(name, "src", src, x)
    ldo = checks.mat(name, "out", out, x, write=True)
    coef, const = checks.vecs(name, x, _arith(x), coef=coef, const=const)
    _fn(name, x)(m, c, x.data_ptr(), ldx, coef.data_ptr(), const.data_ptr(),
                 src.data_ptr(), lds, out.data_ptr(), ldo, torch.get_num_threads())
    return out


def bn_relu_maxpool(x, scale, shift, kernel, stride, padding, out):
    """out (N, OH, OW, C) = max pooling of relu(x * scale + shift) over the channels-last images
    x (N, H, W, C) (both contiguous): windows ``kernel``, ``stride``, ``padding`` (pairs), no
    dilation, floor mode - ``F.max_pool2d`` after BN-ReLU, without either intermediate."""
    name = "bn_relu_maxpool"
    n, h, w, c = checks.image(name, "x", x)
    kh, kw, sh, sw, ph, pw, oh, ow = checks.window(name, kernel, stride, padding, h, w)
    checks.image(name, "out", out, x, (n, oh, ow, c), "= (n, oh, ow, c) for these windows")
    scale, shift = checks.vecs(name, x, _arith(x), "channel", scale=scale, shift=shift)
    if _fn(name, x)(n, h, w, c, x.data_ptr(), scale.data_ptr(), shift.data_ptr(), kh, kw, sh, sw, ph, pw,
                    oh, ow, out.data_ptr(), torch.get_num_threads()):
        checks.oom(name)
    return out


def bn_relu_maxpool_grad(x, scale, shift, mean, kernel, stride, padding, gout, dx, sums=None):
    """Backward of ``bn_relu_maxpool`` to the BN output's gradient g' (``gout`` routed to each
    window's first maximum, kept where it is positive): writes g' to all of ``dx`` (like ``x``)
    and adds the column sums of g' and of (x - mean) * g' to ``sums`` (float64 (2, C), zeros if
    not given), which it returns."""
    name = "bn_relu_maxpool_grad"
    n, h, w, c = checks.image(name, "x", x)
    kh, kw, sh, sw, ph, pw, oh, ow = checks.window(name, kernel, stride, padding, h, w)
    checks.image(name, "gout", gout, x, (n, oh, ow, c), "= (n, oh, ow, c) for these windows")
    checks.image(name, "dx", dx, x, x.shape, "like x")
    scale, shift, mean = checks.vecs(name, x, _arith(x), "channel", scale=scale, shift=shift, mean=mean)
    sums = checks.sums(name, sums, c)
    if _fn(name, x)(n, h, w, c, x.data_ptr(), scale.data_ptr(), shift.data_ptr(), mean.data_ptr(),
                    kh, kw, sh, sw, ph, pw, oh, ow, gout.data_ptr(), dx.data_ptr(), sums.data_ptr(),
                    torch.get_num_threads()):
        checks.oom(name)
    return sums
