"""Occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding Convolutional
Networks", ECCV 2014, section 4.2): cover one patch of the input at a time and record how far
each class's probability falls. Where covering the input costs a class probability, the model
took evidence for that class from there.

Grad-CAM (:mod:`densenet.cam`) reads where the last block's maps that raise a class are; those
maps see far beyond their own cell, so where the decisive evidence is a relation (a blob's
distance to a border, its side of the volume) the map can sit beside what decides the class.
Occlusion asks the input itself, at the price of one forward pass per patch position.

:func:`occlusion_maps` is one input's maps for any classes; :func:`densenet.cam.occlusion` is
the batch API beside :func:`densenet.cam.grad_cam`, and ``densenet cam --method occlusion``
the command.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError

__all__ = ["occlusion_maps", "patch_boxes", "default_patch", "check_patch"]

BATCH_VALUES = 2 ** 21  # input values per batch of covered copies, by default


def default_patch(spatial: Sequence[int]) -> tuple[int, ...]:
    """The default patch: a quarter of each side for volumes (7^3 = 343 positions at the
    default stride), an eighth for images and signals (15^2 = 225 positions for an image)."""
    part = 4 if len(spatial) == 3 else 8
    return tuple(max(1, math.ceil(s / part)) for s in spatial)


def check_patch(spatial: Sequence[int], patch, stride) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``patch`` and ``stride`` (None, an int for every axis, or one per axis) as per-axis
    tuples, checked against the input's spatial size (and the stride against the patch, so
    every voxel is covered); None gives :func:`default_patch` and half the patch."""
    dims = len(spatial)

    def per_axis(value, name):
        values = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) \
            else tuple(value) if isinstance(value, (tuple, list)) else None
        if values is None or len(values) != dims or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise UsageError(f"the occlusion {name} must be a whole number of voxels >= 1 (or "
                             f"one per axis, {dims} of them), got {value!r}.")
        return values

    patch = default_patch(spatial) if patch is None else per_axis(patch, "patch")
    too_big = [(p, s) for p, s in zip(patch, spatial) if p > s]
    if too_big:
        raise UsageError(f"the occlusion patch {patch} is larger than the model input "
                         f"{tuple(spatial)}; give at most {min(spatial)} (--patch).")
    stride = tuple(max(1, p // 2) for p in patch) if stride is None else per_axis(stride, "stride")
    if any(st > p for st, p in zip(stride, patch)):
        raise UsageError(f"the occlusion stride {stride} is longer than the patch {patch}: the "
                         f"voxels between patches would never be covered; give a stride of at "
                         f"most the patch (--stride).")
    return patch, stride


def patch_boxes(spatial: Sequence[int], patch: Sequence[int],
                stride: Sequence[int]) -> list[tuple[slice, ...]]:
    """Every patch position, as slices of the spatial axes: starts 0, stride, 2 * stride, ...
    along each axis, and one more that ends at the border where the strides fall short of it,
    so every voxel is covered."""
    axes = []
    for s, p, st in zip(spatial, patch, stride):
        starts = list(range(0, s - p + 1, st))
        if starts[-1] != s - p:
            starts.append(s - p)
        axes.append([slice(a, a + p) for a in starts])
    boxes = [()]
    for axis in axes:
        boxes = [box + (sl,) for box in boxes for sl in axis]
    return boxes


def occlusion_maps(model: torch.nn.Module, x: torch.Tensor, classes: Sequence[int],
                   patch=None, stride=None, multi_label: bool = False,
                   batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion maps of one input ``x`` (C, *spatial), normalised as in training, for each of
    ``classes``.

    Each patch position is filled with the input's mean per channel (the patch then carries no
    structure of its own) and the model's probability of every class is read: softmax, or for
    a multi-label model each label's sigmoid. A voxel's value is the mean fall in the class's
    probability over the positions that cover it; the positive part, divided by its maximum, is
    the map, in [0, 1] (all zero where covering nothing lowers the class). The whole input runs
    as the first row of every batch of covered ones: a kernel chosen for another batch size
    could round it differently, and a patch that changes nothing would show a fall of that
    rounding. ``model`` runs in
    eval mode, ``batch_size`` positions at a time (by default as many as hold about 2M input
    values, 1 to 64: 64 for a 32^3 volume, 2 for 96^3), and is put back in the mode it was in.

    Returns the maps, float32 (len(classes), *spatial) on ``x``'s device, and the probabilities
    of the whole input (num_classes,), float32 (computed in float64 for a float64 model).
    """
    spatial = tuple(x.shape[1:])
    patch, stride = check_patch(spatial, patch, stride)
    if batch_size is None:
        batch_size = min(64, max(1, BATCH_VALUES // x.numel()))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    boxes = patch_boxes(spatial, patch, stride)
    classes = torch.as_tensor(list(classes), dtype=torch.long, device=x.device)
    fill = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)

    def probabilities(batch):
        logits = model(batch)
        if logits.dtype != torch.float64:
            logits = logits.float()  # bf16 / fp16 outputs: the falls are small differences
        return logits.sigmoid() if multi_label else logits.softmax(1)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            falls = []
            for i in range(0, len(boxes), batch_size):
                chunk = boxes[i:i + batch_size]
                covered = x.expand(len(chunk) + 1, *x.shape).clone()  # row 0: the whole input
                for j, box in enumerate(chunk, start=1):
                    covered[(j, slice(None)) + box] = fill
                probs = probabilities(covered)
                full = probs[0]
                falls.append(full[classes] - probs[1:, classes])
    finally:
        model.train(was_training)
    falls = torch.cat(falls)                                  # (positions, len(classes))
    total = torch.zeros(len(classes), *spatial, dtype=falls.dtype, device=x.device)
    count = torch.zeros(spatial, dtype=falls.dtype, device=x.device)
    ones = (1,) * len(spatial)
    for box, fall in zip(boxes, falls):
        total[(slice(None),) + box] += fall.view(-1, *ones)
        count[box] += 1
    maps = F.relu(total / count)
    peak = maps.amax(dim=tuple(range(1, maps.dim())), keepdim=True)
    return (maps / peak.clamp_min(torch.finfo(maps.dtype).tiny)).float(), full.float()
