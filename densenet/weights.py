"""Weights from files other people write: torchvision, timm, Lightning/DDP and our checkpoints.

Every DenseNet checkpoint in the wild uses torchvision's state-dict names
(``features.denseblock1.denselayer1.norm1.weight``), which are this package's names too; files
differ only in how the state dict is wrapped (``state_dict``, ``state_dict_ema``, ``model``) and
prefixed (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``model.`` from
Lightning). Files are read with :func:`densenet.rundir.read_file`, which never runs code.

MONAI's DenseNets (``monai.networks.nets.DenseNet121`` etc., any ``spatial_dims``) name a
layer's parts ``denselayer1.layers.norm1`` and the classifier ``class_layers.out``;
:func:`canonical_state_dict` gives them (and PyTorch < 0.4's ``norm.1``) this package's names.
Weights for images load into a model for volumes (``spatial_dims=3``) by I3D inflation
(:func:`inflate_state_dict`), and weights for RGB into a model of other ``in_channels`` by
:func:`adapt_input_channels`; :func:`load_strict` does both where needed. See
``docs/volume-weights.md``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

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


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike, inflate: bool = True) -> None:
    """Load weights from a local file into ``model`` strictly, with a clear error on mismatch
    (2-D convolutions inflated for a 3-D model unless ``inflate`` is False: :func:`load_strict`)."""
    load_strict(model, read_state_dict(path), path, inflate=inflate)


# A dense layer's parts as MONAI (``denselayer1.layers.norm1``) and PyTorch < 0.4
# (``denselayer1.norm.1``) name them; ``DenseLayer._load_from_state_dict`` maps the same.
_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.)(?:layers\.(norm|relu|conv)([12])|(norm|relu|conv)\.([12]))\."
                        r"(weight|bias|running_mean|running_var|num_batches_tracked)$")
_MONAI_HEAD = "class_layers.out."
# torchvision's and timm's ResNets keep their parts at the top: conv1, bn1, layer1..4, fc.
_RESNET_TOP = re.compile(r"^(conv1|bn1|layer\d+)\.")


def canonical_key(key: str) -> str:
    """``key`` in this package's (torchvision's) names: MONAI's ``...denselayerN.layers.norm1.*``
    and legacy ``...denselayerN.norm.1.*`` become ``...denselayerN.norm1.*``, MONAI's
    ``class_layers.out.*`` becomes ``classifier.*``; a torchvision ResNet's ``conv1.*``,
    ``bn1.*`` and ``layerN.*`` go under ``features.`` and its ``fc.*`` becomes ``classifier.*``;
    any other key is returned as it is."""
    match = _LAYER_KEY.match(key)
    if match:
        head, part, index = match.group(1), match.group(2) or match.group(4), match.group(3) or match.group(5)
        return f"{head}{part}{index}.{match.group(6)}"
    if key.startswith(_MONAI_HEAD):
        return "classifier." + key[len(_MONAI_HEAD):]
    if key.startswith("fc."):
        return "classifier." + key[len("fc."):]
    if _RESNET_TOP.match(key):
        return "features." + key
    return key


def canonical_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every key in this package's names (:func:`canonical_key`); the tensors are
    the same objects."""
    return {canonical_key(k): v for k, v in state.items()}


def _target_state(model_state_or_model) -> Mapping[str, Any]:
    if isinstance(model_state_or_model, torch.nn.Module):
        return model_state_or_model.state_dict()
    return model_state_or_model


def _inflatable(w: torch.Tensor, t) -> bool:
    """A 2-D convolution weight (out, in, kh, kw) meeting a 3-D one (out, in', kd, kh, kw): the
    same outputs and kernel height and width. ``in'`` may differ (the first convolution's input
    channels, which :func:`adapt_input_channels` fits before or after)."""
    shape = tuple(getattr(t, "shape", ()))
    return (isinstance(w, torch.Tensor) and w.dim() == 4 and len(shape) == 5
            and shape[0] == w.shape[0] and shape[3:] == tuple(w.shape[2:]))


def inflate_weight(w: torch.Tensor, depth: int) -> torch.Tensor:
    """A 2-D convolution weight (out, in, kh, kw) as a 3-D one (out, in, depth, kh, kw): the
    kernel repeated ``depth`` times along the new (first spatial) axis and divided by
    ``depth``, so that a volume constant along depth gives at every depth what the 2-D
    convolution gives on one slice (I3D inflation, Carreira and Zisserman, CVPR 2017)."""
    if w.dim() != 4:
        raise ValueError(f"inflate_weight takes a 2-D convolution weight (out, in, kh, kw), "
                         f"got shape {tuple(w.shape)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    return (w.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth).contiguous()


def inflate_state_dict(state: Mapping[str, torch.Tensor], model_state_or_model) -> dict[str, torch.Tensor]:
    """``state`` (weights of a 2-D model) made to fit a 3-D model (``spatial_dims=3``): every
    convolution weight (out, in, kh, kw) whose counterpart in ``model_state_or_model`` (the 3-D
    model or its state dict) is (out, in, kd, kh, kw) is repeated kd times along depth and
    divided by kd (:func:`inflate_weight`; Carreira and Zisserman 2017). Everything else (BN,
    the classifier, keys the model lacks, weights that already fit) is returned unchanged,
    under the same keys; keys are matched in this package's names (:func:`canonical_key`), so
    MONAI's 2-D files inflate too. The input channels may differ (RGB weights for a
    one-channel model): fit them with :func:`adapt_input_channels`, before or after."""
    target = canonical_state_dict(_target_state(model_state_or_model))
    out = {}
    for key, w in state.items():
        t = target.get(canonical_key(key))
        out[key] = inflate_weight(w, int(t.shape[2])) if t is not None and _inflatable(w, t) else w
    return out


def adapt_input_channels(state: dict[str, torch.Tensor], in_channels: int, key: str) -> dict:
    """``state`` with the first convolution (``key``, (out, c, *kernel), any number of spatial
    dimensions) made to take ``in_channels`` channels: for one channel its input channels are
    summed (a grey image replicated to c channels then gives the same output), otherwise they
    are repeated cyclically and scaled by c / in_channels (the total weight over the input
    channels keeps its size). The state is returned unchanged when the counts agree. Both
    rules are linear in the weight, so they commute with :func:`inflate_state_dict`."""
    w = state[key]
    c = w.shape[1]
    if c == in_channels:
        return state
    if in_channels == 1:
        new = w.sum(1, keepdim=True)
    else:
        new = w[:, torch.arange(in_channels) % c] * (c / in_channels)
    return {**state, key: new.contiguous()}


def fit_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                   inflate: bool = True) -> dict[str, torch.Tensor]:
    """``state`` as :func:`load_strict` loads it into ``model``: keys in this package's names
    (:func:`canonical_state_dict`: MONAI's load too), 2-D convolutions inflated where ``model``
    is 3-D (:func:`inflate_state_dict`, unless ``inflate`` is False), then the first
    convolution's input channels fitted to the model's (:func:`adapt_input_channels`). What
    does not fit otherwise is left for the strict load to report."""
    state = canonical_state_dict(state)
    own = model.state_dict()
    if inflate:
        state = inflate_state_dict(state, own)
    for key in ("features.conv0.weight", "conv0.weight", "features.conv1.weight"):
        if key in state and key in own:
            w, t = state[key], own[key]
            if w.dim() == t.dim() >= 3 and w.shape[0] == t.shape[0] and w.shape[2:] == t.shape[2:]:
                state = adapt_input_channels(state, t.shape[1], key)
    return state


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source, inflate: bool = True) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch names ``source`` and the keys.
    Only two differences are bridged (:func:`fit_state_dict`): a 2-D file's convolutions meet a
    3-D model (``spatial_dims=3``) and are inflated (:func:`inflate_state_dict`; ``inflate=False``
    refuses that), and the first convolution's input channels differ: weights for 3-channel
    images load into a model of ``in_channels`` 1 (or any other count) by
    :func:`adapt_input_channels`. MONAI's key names load as well."""
    state = fit_state_dict(model, state, inflate)
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
                    new_head: bool = False, inflate: bool = True) -> tuple[bool, str]:
    """Load the weights in ``path`` into ``model`` (a classifier for ``classes``) to fine-tune
    it: every tensor strictly, except that the file's classifier is kept only when it has the
    same classes (the same count and, when the file names them, the same names; the same names
    in another order reorder its rows); ``new_head`` replaces it anyway (a file that does not
    name its classes, with as many as the data). As in :func:`load_strict`, MONAI's names load,
    2-D weights are inflated for a 3-D model (unless ``inflate`` is False) and the first
    convolution is fitted to the model's input channels. Returns (whether the head is new, a
    line)."""
    state, file_classes, _ = read_pretrained(path)
    state = canonical_state_dict(state)
    head = state.get("classifier.weight")
    n_file = int(head.shape[0]) if head is not None and head.ndim == 2 else None
    if new_head:
        n_file = -1 if n_file is None else n_file  # the replacement below, whatever the file holds
    if not new_head and n_file == len(classes) and (file_classes is None or file_classes == list(classes)):
        load_strict(model, state, path, inflate=inflate)
        return False, f"kept the classifier of {path} ({n_file} classes, as in the data)"
    if (not new_head and n_file == len(classes) and file_classes is not None
            and sorted(file_classes) == sorted(classes)):
        order = torch.tensor([file_classes.index(c) for c in classes])
        state = dict(state)
        for key in ("classifier.weight", "classifier.bias"):
            if key in state:
                state[key] = state[key][order]
        load_strict(model, state, path, inflate=inflate)
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
    body = fit_state_dict(model, body, inflate)
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
