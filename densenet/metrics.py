"""Measuring a model on batches of data: loss, top-1 and top-5 error, single crop and 10-crop.

Used by training (validation and test) and by ``densenet eval``."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .devices import autocast


def _outputs(model: torch.nn.Module, batches: Iterable, device: torch.device, amp: str | None):
    """(float32 logits, labels) of each ``(x, y)`` batch on ``device``, the model in evaluation
    mode meanwhile (and back in its own mode after). Call under ``torch.no_grad()``."""
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            yield logits.float(), y
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable, device: torch.device,
                     amp: str | None = None) -> dict:
    """Mean loss, top-1 and top-5 error (fractions) over ``(x, y)`` batches."""
    total, loss_sum, wrong1, wrong5 = 0, 0.0, 0, 0
    for logits, y in _outputs(model, batches, device, amp):
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        wrong1 += (top[:, 0] != y).sum().item()
        wrong5 += (~(top == y[:, None]).any(dim=1)).sum().item()
        total += y.numel()
    if total == 0:
        return {"loss": None, "error": None, "top5_error": None, "n": 0}
    return {"loss": loss_sum / total, "error": wrong1 / total, "top5_error": wrong5 / total,
            "n": total}


def crop_probabilities(model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Softmax of every crop of (N, M, C, H, W) crops -> (N, M, classes)."""
    n, m = crops.shape[:2]
    return model(crops.flatten(0, 1)).float().softmax(1).view(n, m, -1)


def ten_crop_probabilities(model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Class probabilities of (N, 10, C, H, W) crops: the softmax averaged over the ten
    (the paper's 10-crop test, Table 3)."""
    return crop_probabilities(model, crops).mean(1)


def _count_errors(scores: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return (top[:, 0] != y).sum().item(), (~(top == y[:, None]).any(dim=1)).sum().item()


@torch.no_grad()
def evaluate_ten_crop(model: torch.nn.Module, batches: Iterable, device: torch.device,
                      amp: str | None = None) -> tuple[dict, dict]:
    """(single-crop, 10-crop) loss, top-1 and top-5 error over ``(crops, y)`` batches with
    crops (N, 10, C, H, W) in torchvision TenCrop order, whose index 4 is the centre crop."""
    was_training = model.training
    model.eval()
    total = 0
    sums = {"single": [0.0, 0, 0], "ten": [0.0, 0, 0]}
    try:
        for crops, y in batches:
            crops, y = crops.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n = crops.shape[0]
            with autocast(device, amp):
                probs = crop_probabilities(model, crops)
            for key, p in (("single", probs[:, 4]), ("ten", probs.mean(1))):
                s = sums[key]
                s[0] += F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum").item()
                w1, w5 = _count_errors(p, y)
                s[1] += w1
                s[2] += w5
            total += n
    finally:
        model.train(was_training)
    if total == 0:
        empty = {"loss": None, "top1_error": None, "top5_error": None}
        return empty, dict(empty)
    single, ten = ({"top1_error": s[1] / total, "top5_error": s[2] / total, "loss": s[0] / total}
                   for s in (sums["single"], sums["ten"]))
    return single, ten


@torch.no_grad()
def predict_multilabel(model: torch.nn.Module, batches: Iterable, device: torch.device,
                       amp: str | None = None, objective=None) -> dict:
    """Sigmoid probabilities of a multi-label model over ``(x, y)`` batches (``y`` float rows of
    0/1, NaN where not counted): ``probs`` and ``targets`` (N, L) on the CPU, the mean loss of
    ``objective`` (a :class:`densenet.objectives.MultiLabelBCE`) over the batches' counted
    entries, and the fraction of images with a counted label on the wrong side of 0.5."""
    probs, targets, loss_sum, counted, wrong = [], [], 0.0, 0, 0
    for logits, y in _outputs(model, batches, device, amp):
        if objective is not None:
            loss, batch_wrong = objective(logits, y)
            n = int((~torch.isnan(y)).sum())
            loss_sum += loss.item() * n
            counted += n
            wrong += int(batch_wrong)
        probs.append(logits.sigmoid().cpu())
        targets.append(y.float().cpu())
    if not probs:
        return {"probs": None, "targets": None, "loss": None, "error": None, "n": 0}
    p, t = torch.cat(probs), torch.cat(targets)
    return {"probs": p, "targets": t, "loss": loss_sum / counted if counted else None,
            "error": wrong / len(p) if objective is not None else None, "n": len(p)}
