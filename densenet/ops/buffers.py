"""Large CPU buffers for the efficient ops: a pool that keeps them between steps, and
transparent huge pages behind them.

``huge_empty`` is the ops' ``new_empty`` for their big temporaries (a dense block's feature
buffer, its gradient, ...); ``release_buffers`` frees the idle pooled ones and ``pooled_bytes``
says what the pool holds. ``densenet.backends.buffer_pool`` and ``densenet.backends.huge_pages``
switch the two parts, read at every call.
"""

from __future__ import annotations

import ctypes
import platform
import threading

import torch

from .. import backends

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
POOL_MIN_BYTES = 4 * _HUGE  # smaller buffers come from torch's allocator as usual
_libc = None


def _madvise_huge(t: torch.Tensor) -> None:
    """Ask for transparent huge pages behind ``t`` (advice only: failure is harmless)."""
    global _libc
    if platform.system() != "Linux" or not backends.huge_pages:
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
        return self._use_count is not None and backends.buffer_pool

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


def huge_empty(shape, like: torch.Tensor, pooled: bool = True) -> torch.Tensor:
    """``like.new_empty(shape)`` (uninitialised); on the CPU, for a large buffer (8 MB or more),
    served from the buffer pool (``_BufferPool``) and backed by transparent huge pages (madvise
    MADV_HUGEPAGE before first touch: a fresh 56 MB buffer otherwise costs 14,000 page faults,
    each a trip through the kernel, with 2 MB pages 28). ``densenet.backends.buffer_pool`` and
    ``.huge_pages`` (``DENSENET_POOL=0``, ``DENSENET_HUGEPAGES=0``) turn them off. The memory is torch's allocation either way, so
    the allocator's accounting sees it (a pooled buffer from when it was first made).
    ``pooled=False`` (volumes) leaves out both: there the buffers' sizes differ from block to
    block and the idle ones the pool would hold add up to a third of the step's peak
    (DenseNet-121 3-D, 96^3, batch 2: 357 MiB with the pool, 249 without, for 0.94x the speed).
    Such a buffer lives for one step, and huge pages for memory that is mapped and dropped every
    step cost more than they save: where the kernel compacts memory to find a 2 MB page on the
    fault (``defrag`` set to ``madvise``, the project's machine), DenseNet-121 3-D, batch 2, at
    128^3 took 4.1-4.4 s of system CPU time in five training steps without the advice against
    4.9-6.3 s with it, and its steps were 0.5-17% faster in 4 of 4 pairs of fresh processes
    (96^3: faster in 7 of 10; 64^3: no difference)."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes < POOL_MIN_BYTES or like.layout is not torch.strided:
        return like.new_empty(shape)
    if pooled and _pool.usable():
        return _pool.empty(tuple(shape), like.dtype, nbytes)
    t = like.new_empty(shape)
    if pooled:  # images with the pool turned off keep the advice (measured only for volumes)
        _madvise_huge(t)
    return t


def release_buffers() -> int:
    """Free the pooled CPU buffers no tensor uses any more; returns the bytes freed."""
    return _pool.release()


def pooled_bytes() -> int:
    """Bytes the buffer pool holds now, in use or idle."""
    return _pool.held()
