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
from .rundir import is_checkpoint, read_file, resolve_checkpoint_path

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


def adapt_input_channels(state: dict[str, torch.Tensor], in_channels: int, key: str) -> dict:
    """``state`` with the first convolution (``key``, (out, c, kh, kw)) made to take
    ``in_channels`` channels: for one channel its input channels are summed (a grey image
    replicated to c channels then gives the same output), otherwise they are repeated
    cyclically and scaled by c / in_channels (the total weight over the input channels keeps
    its size). The state is returned unchanged when the counts agree."""
    w = state[key]
    c = w.shape[1]
    if c == in_channels:
        return state
    if in_channels == 1:
        new = w.sum(1, keepdim=True)
    else:
        new = w[:, torch.arange(in_channels) % c] * (c / in_channels)
    return {**state, key: new.contiguous()}


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch names ``source`` and the keys.
    Only the first convolution's input channels may differ: weights for 3-channel images load
    into a model of ``in_channels`` 1 (or any other count) by :func:`adapt_input_channels`."""
    own = model.state_dict()
    for key in ("features.conv0.weight", "conv0.weight"):
        if key in state and key in own and state[key].dim() == 4 and own[key].dim() == 4 \
                and state[key].shape[0] == own[key].shape[0] and state[key].shape[2:] == own[key].shape[2:]:
            state = adapt_input_channels(state, own[key].shape[1], key)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise UsageError(
            f"the weights in {source} do not fit this model ({' '.join(first[:3])[:400]}). "
            f"Check that --model names the architecture the file was trained with."
        ) from None


def read_pretrained(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str] | None, str | None]:
    """(state dict, class names or None, model name or None) of the weights to start a training
    run from: a torchvision/timm/Lightning file, a densenet checkpoint, or a run directory (its
    best checkpoint). Foreign files name neither their classes nor their architecture."""
    path = resolve_checkpoint_path(path)
    obj = read_file(path)
    classes = model_name = None
    if is_checkpoint(obj):
        classes = [str(c) for c in obj["classes"]] if obj.get("classes") is not None else None
        model_name = obj["model"].get("name")
    return extract_state_dict(obj, path), classes, model_name


def load_pretrained(model: torch.nn.Module, path: str | os.PathLike, classes: list[str],
                    new_head: bool = False) -> tuple[bool, str]:
    """Load the weights in ``path`` into ``model`` (a classifier for ``classes``) to fine-tune
    it: every tensor strictly, except that the file's classifier is kept only when it has the
    same classes (the same count and, when the file names them, the same names; the same names
    in another order reorder its rows); ``new_head`` replaces it anyway (a file that does not
    name its classes, with as many as the data). Returns (whether the head is new, a line)."""
    state, file_classes, _ = read_pretrained(path)
    head = state.get("classifier.weight")
    n_file = int(head.shape[0]) if head is not None and head.ndim == 2 else None
    if new_head:
        n_file = -1 if n_file is None else n_file  # the replacement below, whatever the file holds
    if not new_head and n_file == len(classes) and (file_classes is None or file_classes == list(classes)):
        load_strict(model, state, path)
        return False, f"kept the classifier of {path} ({n_file} classes, as in the data)"
    if (not new_head and n_file == len(classes) and file_classes is not None
            and sorted(file_classes) == sorted(classes)):
        order = torch.tensor([file_classes.index(c) for c in classes])
        state = dict(state)
        for key in ("classifier.weight", "classifier.bias"):
            if key in state:
                state[key] = state[key][order]
        load_strict(model, state, path)
        return False, f"kept the classifier of {path} (the same {n_file} classes, rows put in the data's order)"
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    own = {k for k in model.state_dict() if not k.startswith("classifier.")}
    if set(body) != own:
        missing, unexpected = sorted(own - set(body)), sorted(set(body) - own)
        raise UsageError(
            f"the weights in {path} do not fit this model (missing: {', '.join(missing[:3]) or '-'}"
            f"{' ...' if len(missing) > 3 else ''}; unexpected: {', '.join(unexpected[:3]) or '-'}"
            f"{' ...' if len(unexpected) > 3 else ''}). Check that --model names the architecture "
            f"the file was trained with.")
    try:
        model.load_state_dict(body, strict=False)
    except RuntimeError as e:
        raise UsageError(f"the weights in {path} do not fit this model ({str(e).splitlines()[-1][:300]}). "
                         f"Check that --model names the architecture the file was trained with.") from None
    if new_head:
        why = "--new-head"
    elif n_file is None:
        why = "the file has no classifier"
    elif file_classes is not None and n_file == len(classes):
        why = f"the file's {n_file} classes are not the data's"
    else:
        why = f"the file has {n_file} classes, the data {len(classes)}"
    return True, f"new classifier for the data's {len(classes)} classes ({why}); the rest from {path}"
