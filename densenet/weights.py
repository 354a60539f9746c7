"""Weights from files other people write: torchvision, timm, Lightning/DDP and our checkpoints.

Every DenseNet checkpoint in the wild uses torchvision's state-dict names
(``features.denseblock1.denselayer1.norm1.weight``), which are this package's names too; files
differ only in how the state dict is wrapped (``state_dict``, ``state_dict_ema``, ``model``) and
prefixed (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``model.`` from
Lightning). Files are read with :func:`densenet.rundir.read_file`, which never runs code.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import UsageError
from .rundir import is_checkpoint, read_file

_WRAPPERS = ("state_dict_ema", "state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def extract_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights inside a torchvision, timm, Lightning/DDP or densenet file."""
    if is_checkpoint(obj):
        obj = obj["state_dict"]  # ours
    elif isinstance(obj, dict):
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{path}: unknown checkpoint format; expected a state_dict of tensors (torchvision, "
            f"timm) or a densenet checkpoint."
        )
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in any supported weights file."""
    return extract_state_dict(read_file(path), path)


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load weights from a local file into ``model`` strictly, with a clear error on mismatch."""
    load_strict(model, read_state_dict(path), path)


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch names ``source`` and the keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise UsageError(
            f"the weights in {source} do not fit this model ({' '.join(first[:3])[:400]}). "
            f"Check that --model names the architecture the file was trained with."
        ) from None
