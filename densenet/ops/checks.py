"""Argument checks of the efficient ops' kernels, shared by the C (``cpu.py``) and Triton wrappers.

Matrices are 2-D tensors with unit column stride (column slices of a row-major buffer) whose rows
do not overlap; per-column vectors have one element per column and are used as contiguous
tensors of the matrices' dtype (converted when they are not). Every wrapper checks all its
arguments before it calls a kernel and raises ValueError naming the kernel, the argument, what it
expected and what it got, rather than letting the kernel read or write out of bounds. The checks
compare attributes only (no tensor ops): they run many times per training step.
"""

from __future__ import annotations

import operator

import torch

CPU_TYPES = (torch.float32, torch.float64, torch.bfloat16)  # what the C kernels take


def what(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    if t.layout is not torch.strided:
        return f"a {t.layout} {t.dtype} {tuple(t.shape)} tensor on {t.device}"
    kind = "contiguous" if t.is_contiguous() else f"non-contiguous (strides {t.stride()})"
    return f"a {kind} {t.dtype} {tuple(t.shape)} tensor on {t.device}"


def type_names(types) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in types)


def not_on(name: str, arg: str, t: torch.Tensor, device: str = "cpu"):
    raise ValueError(f"{name}: {arg} must be a {device.upper()} tensor, got one on {t.device}")


def mat(name: str, arg: str, t, like: torch.Tensor | None = None, ref: str = "x",
        write: bool = False, types=CPU_TYPES, device: str = "cpu") -> int:
    """The row stride of the matrix ``t`` (the argument ``arg`` of kernel ``name``), checked:
    with ``like``, shaped and typed like it (the kernel's input, called ``ref``); without, an
    (m, c) matrix of one of ``types`` (the input itself). All on ``device`` (a device type).
    Its rows may not overlap, except in a matrix only read (not ``write``) with row stride 0:
    rows broadcast from one, as autograd hands out the gradient of a sum."""
    if like is None:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = f"{t.dim()}-D {what(t)}" if isinstance(t, torch.Tensor) else what(t)
            raise ValueError(f"{name}: {arg} must be a 2-D (m, c) matrix, got {got}")
        if t.dtype not in types:
            raise ValueError(f"{name}: {arg} must be {type_names(types)}, got {t.dtype}")
    elif not isinstance(t, torch.Tensor) or t.shape != like.shape:
        raise ValueError(f"{name}: {arg} must be a {tuple(like.shape)} matrix like {ref}, got {what(t)}")
    elif t.dtype != like.dtype:
        raise ValueError(f"{name}: {arg} must be {like.dtype} like {ref}, got {t.dtype}")
    if t.device.type != device:
        not_on(name, arg, t, device)
    (ld, cs), (m, c) = t.stride(), t.shape
    if (cs != 1 and c > 1) or (ld < c and m > 1 and (write or ld != 0)):
        if cs != 1 and c > 1:
            raise ValueError(f"{name}: {arg} must have unit column stride, got strides {(ld, cs)}")
        raise ValueError(f"{name}: {arg} must have a row stride of at least its {c} columns (rows "
                         f"would overlap), got strides {(ld, cs)}")
    return ld


def vec(name: str, arg: str, v, like: torch.Tensor, c: int, per: str = "column",
        dtype: torch.dtype | None = None) -> torch.Tensor:
    """The per-column vector ``v`` (``c`` elements, checked, on ``like``'s device) as a
    contiguous tensor of ``dtype`` (default ``like``'s): ``v`` itself when it is one (only its
    data pointer is used: no autograd, no copy - the common case)."""
    if not isinstance(v, torch.Tensor) or v.numel() != c:
        got = f"{v.numel()} {what(v)}" if isinstance(v, torch.Tensor) else what(v)
        raise ValueError(f"{name}: {arg} must have {c} elements (one per {per} of x), got {got}")
    if v.device != like.device:
        not_on(name, arg, v, like.device.type)
    dtype = like.dtype if dtype is None else dtype
    if v.dtype == dtype and v.is_contiguous():
        return v
    return v.detach().to(dtype).contiguous()


def vecs(name: str, x: torch.Tensor, dtype: torch.dtype, per: str = "column",
         **vectors) -> list[torch.Tensor]:
    """``vec`` of each named vector, one element per ``per`` (the last dimension) of ``x``."""
    return [vec(name, arg, v, x, x.shape[-1], per, dtype) for arg, v in vectors.items()]


def float64(name: str, arg: str, t, shape: tuple | None, numel: int, expected: str) -> torch.Tensor:
    """``t``, checked to be a contiguous float64 CPU tensor of ``numel`` elements (and, unless
    None, of ``shape``)."""
    if (not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or not t.is_cpu
            or t.layout is not torch.strided or not t.is_contiguous() or t.numel() != numel
            or (shape is not None and t.shape != shape)):
        raise ValueError(f"{name}: {arg} must be {expected}, got {describe(t)}")
    return t


def sums(name: str, sums, c: int) -> torch.Tensor:
    """The float64 (2, c) accumulator ``sums`` of a gradient kernel, checked; zeros if None."""
    if sums is None:
        return torch.zeros(2, c, dtype=torch.float64)
    return float64(name, "sums", sums, (2, c), 2 * c, f"a contiguous float64 (2, {c}) CPU tensor")


def oom(name: str):
    """Raise the MemoryError of kernel ``name`` whose scratch could not be allocated."""
    raise MemoryError(f"densenet kernel {name}: out of memory allocating scratch")


def image(name: str, arg: str, t, like: torch.Tensor | None = None, shape: tuple | None = None,
          expected: str = "") -> torch.Size:
    """The shape of ``t``, checked to be a contiguous channels-last (N, H, W, C) CPU image batch:
    with ``like``, of its dtype and of ``shape`` (``expected`` says what that is); without, of
    float32, float64 or bfloat16 (the kernel's input)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.layout is not torch.strided or not t.is_contiguous():
        raise ValueError(f"{name}: {arg} must be a contiguous 4-D (N, H, W, C) tensor, got {describe(t)}")
    if like is None:
        if t.dtype not in CPU_TYPES:
            raise ValueError(f"{name}: {arg} must be {type_names(CPU_TYPES)}, got {t.dtype}")
    else:
        if t.shape != shape:
            raise ValueError(f"{name}: {arg} must be {tuple(shape)} {expected}, got {tuple(t.shape)}")
        if t.dtype != like.dtype:
            raise ValueError(f"{name}: {arg} must be {like.dtype} like x, got {t.dtype}")
    if not t.is_cpu:
        not_on(name, arg, t)
    return t.shape


def ints(name: str, arg: str, pair) -> tuple[int, int]:
    try:
        first, second = pair
        return operator.index(first), operator.index(second)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {arg} must be a pair of ints, got {pair!r}") from None


def window(name: str, kernel, stride, padding, h: int, w: int):
    """(kh, kw, sh, sw, ph, pw, oh, ow) of a max pooling of (h, w) images, checked: a positive
    kernel and stride and padding in [0, kernel // 2] (so every window holds a pixel), and at
    least one window each way (floor mode, as F.max_pool2d requires)."""
    (kh, kw), (sh, sw), (ph, pw) = (ints(name, "kernel", kernel), ints(name, "stride", stride),
                                    ints(name, "padding", padding))
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

