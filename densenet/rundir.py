"""The run directory on disk: atomic files, the run's JSON files, and checksummed checkpoints.

Everything ``densenet train`` leaves in a run directory (docs/run-directory.md) is written here,
and everything later commands read from one comes through here. Nothing in this module knows
about models or training: it stores bytes, JSON and tensors.

A checkpoint file is ``torch.save`` of a small envelope::

    {"format": "densenet-checkpoint", "format_version": 1, "sha256": HEX, "payload": BYTES}

where ``payload`` is itself a ``torch.save`` of the content (model spec, weights, class names,
normalisation, optimizer state, ...). The checksum covers the payload, so a truncated or altered
file is caught on load; both levels load with ``weights_only=True``, so unpickling never
executes code from the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

FORMAT = "densenet-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


# ----------------------------------------------------------------------------- atomic files

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old or its new content, never a mix.

    Temporary file ``.NAME.*.tmp`` in the same directory, flush + fsync, rename over the target,
    fsync the directory. A full disk (ENOSPC) raises before the rename, leaving the old file
    intact; a kill before the rename leaves the old file and a stale temporary file, which
    :func:`remove_stale_temporaries` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete the temporary files a kill in the middle of an atomic write left behind."""
    for stale in Path(directory).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the run's JSON files

def write_metrics(run_dir: str | os.PathLike, history: list[dict]) -> None:
    """``metrics.jsonl``: one JSON object per finished epoch."""
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({e}).") from None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (blank lines skipped)."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise UsageError(f"{path} line {i + 1} is not JSON.") from None
    return rows


# ----------------------------------------------------------------------------- checkpoints

def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Save ``payload`` atomically with a format version and a SHA-256 of its bytes."""
    data = _torch_bytes(payload)
    envelope = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "sha256": hashlib.sha256(data).hexdigest(), "payload": data}
    atomic_write_bytes(path, _torch_bytes(envelope))


def _safe_torch_load(source, path: Path):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(
            f"refused to load {path}: it holds Python objects other than tensors and plain data "
            f"(loading it could run code from the file). Only load files you trust; if you do "
            f"trust it, re-save its state_dict with torch.save(model.state_dict(), ...). "
            f"Detail: {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # torch raises many types for a file that is not its format
        raise UsageError(
            f"{path} is not a readable PyTorch file (truncated, corrupt, or another format): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}."
        ) from None


def read_file(path: str | os.PathLike) -> Any:
    """Load any supported file safely: our envelope (verified), a torch file, or safetensors."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist; give a run directory or a checkpoint file.")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a checkpoint file.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UsageError(f"{path} is not a readable safetensors file: {e}.") from None
    obj = _safe_torch_load(path, path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _open_envelope(obj, path)
    return obj


def _open_envelope(envelope: dict, path: Path) -> dict:
    version = envelope.get("format_version")
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{path} is a densenet checkpoint of format version {version!r}; this version of the "
            f"package reads version {FORMAT_VERSION}. Use the densenet release that wrote it."
        )
    data = envelope.get("payload")
    if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != envelope.get("sha256"):
        raise UsageError(
            f"{path} failed its checksum: the file is damaged or was altered after it was written. "
            f"Use another checkpoint (a run directory keeps 'last.pt' and 'best.pt')."
        )
    return _safe_torch_load(io.BytesIO(data), path)


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is one of this package's checkpoints (a model description inside)."""
    return isinstance(obj, dict) and "state_dict" in obj and isinstance(obj.get("model"), dict)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one of this package's checkpoints (verified); anything else is a clear error."""
    obj = read_file(path)
    if not is_checkpoint(obj):
        raise UsageError(
            f"{path} is not a densenet checkpoint (no model description inside). For torchvision "
            f"or timm weights use --weights FILE with --model NAME."
        )
    return obj


def resolve_checkpoint_path(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A run directory -> its best (or last) checkpoint; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{prefer}.pt", "best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise UsageError(f"{path} holds no checkpoint (best.pt or last.pt); is it a training run directory?")
    if not path.exists():
        raise UsageError(f"{path} does not exist; give a run directory or a checkpoint file.")
    return path
