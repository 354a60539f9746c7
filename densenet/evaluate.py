"""Measuring a model on data: loss, top-1 and top-5 error."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F


def autocast(device: torch.device, amp: str | None):
    """bfloat16 autocast when asked for, else a no-op context."""
    if amp in (None, "", "none", "off"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable, device: torch.device,
                     amp: str | None = None) -> dict:
    """Mean loss, top-1 and top-5 error (fractions) over ``(x, y)`` batches."""
    was_training = model.training
    model.eval()
    total, loss_sum, wrong1, wrong5 = 0, 0.0, 0, 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            wrong1 += (top[:, 0] != y).sum().item()
            wrong5 += (~(top == y[:, None]).any(dim=1)).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        return {"loss": None, "error": None, "top5_error": None, "n": 0}
    return {"loss": loss_sum / total, "error": wrong1 / total, "top5_error": wrong5 / total,
            "n": total}
