"""Checkpoints and run-directory files: atomic writes, checksums, and loading that runs no code.

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

    Temporary file in the same directory, flush + fsync, rename over the target, fsync the
    directory. A full disk (ENOSPC) raises before the rename, leaving the old file intact.
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
        _crash_test_hook()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


_writes = 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _crash_test_hook() -> None:
    """DENSENET_KILL_IN_WRITE=N: SIGKILL this process in its N-th atomic write, after the
    temporary file is complete and before the rename (the kill tests use it)."""
    global _writes
    target = os.environ.get("DENSENET_KILL_IN_WRITE")
    if target:
        _writes += 1
        if _writes == int(target):
            import signal
            os.kill(os.getpid(), signal.SIGKILL)


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one of this package's checkpoints (verified); anything else is a clear error."""
    obj = read_file(path)
    if not (isinstance(obj, dict) and "model" in obj and "state_dict" in obj):
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


# ----------------------------------------------------------------------------- foreign weights

def extract_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights inside a torchvision, timm, Lightning/DDP or densenet file."""
    if isinstance(obj, dict) and "state_dict" in obj and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["state_dict"]  # ours
    elif isinstance(obj, dict):
        for key in ("state_dict_ema", "state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{path}: unknown checkpoint format; expected a state_dict of tensors (torchvision, "
            f"timm) or a densenet checkpoint."
        )
    prefixes = ("module.", "_orig_mod.", "model.")
    out = {}
    for k, v in obj.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load weights from a local file into ``model`` strictly, with a clear error on mismatch."""
    state = extract_state_dict(read_file(path), path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise UsageError(
            f"the weights in {path} do not fit this model ({' '.join(first[:3])[:400]}). "
            f"Check that --model names the architecture the file was trained with."
        ) from None


# ----------------------------------------------------------------------------- models from runs

def build_model(payload: dict) -> torch.nn.Module:
    """The model a densenet checkpoint describes, with its weights loaded (eval mode)."""
    from .model import create_model
    spec = payload["model"]
    model = create_model(spec["name"], **spec.get("overrides", {}))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def load_model(path: str | os.PathLike, prefer: str = "best") -> tuple[torch.nn.Module, dict]:
    """(model, payload) from a run directory or a densenet checkpoint file."""
    payload = load_checkpoint(resolve_checkpoint_path(path, prefer))
    return build_model(payload), payload
