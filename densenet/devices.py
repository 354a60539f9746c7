"""Where a model runs: the ``--device`` choice and bfloat16 autocast."""

from __future__ import annotations

import contextlib

import torch

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when PyTorch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but PyTorch sees no CUDA GPU here; "
                         "use --device cpu (or auto).")
    return torch.device(name)


def autocast(device: torch.device, amp: str | None, cache: bool = True):
    """bfloat16 autocast when asked for, else a no-op context. ``cache=False`` for a step that a
    CUDA graph replays: autocast's cast cache must not outlive one step there."""
    if amp in (None, "", "none", "off"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
