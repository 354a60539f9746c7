"""What a training step minimises and counts, by task: one class per image (softmax
cross-entropy, the paper's) or several labels per image (a sigmoid per label and binary
cross-entropy, as CheXNet trains DenseNet-121, Rajpurkar et al. 2017).

An objective is called as ``objective(logits, y) -> (loss, wrong)``: the batch's mean loss and
the number of images it got wrong, both 0-d tensors on the device, computed without reading
anything back to the host (the training loop reads them every few steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .multilabel import masked_bce


class CrossEntropy:
    """Softmax cross-entropy (with optional label smoothing); wrong = top-1 mistakes."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, y: torch.Tensor):
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, (logits.argmax(1) != y).sum()


class MultiLabelBCE:
    """Binary cross-entropy per label, ``y`` a float (N, L) of 0/1 with NaN where an entry is
    not counted (an uncertain or missing label): such entries give no loss and no gradient
    (:func:`densenet.multilabel.masked_bce`). ``pos_weight`` (L,) weighs each label's positives.
    Wrong = images with a counted label on the wrong side of 0.5."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        self.pos_weight = pos_weight

    def __call__(self, logits: torch.Tensor, y: torch.Tensor):
        mask = ~torch.isnan(y)
        logits = logits.float()
        loss = masked_bce(logits, y, mask, self.pos_weight)
        wrong = (((logits > 0) != (y > 0.5)) & mask).any(1).sum()
        return loss, wrong
