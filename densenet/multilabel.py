"""Multi-label classification the CheXNet way: one sigmoid output per label, a weighted binary
cross-entropy that ignores missing labels, and per-label AUROC.

CheXNet (Rajpurkar et al., "CheXNet: Radiologist-Level Pneumonia Detection on Chest X-Rays with
Deep Learning", 2017) puts a DenseNet-121 under a 14-way sigmoid layer, trains it with a binary
cross-entropy whose positive and negative terms are weighted by the label's class balance, and
reports the area under the ROC curve of each of the 14 ChestX-ray14 labels (Wang et al.,
CVPR 2017) and their mean. Other chest X-ray sets (CheXpert, Irvin et al., AAAI 2019) leave some
labels unknown or uncertain for some images; the ``mask`` arguments here say which (image, label)
entries count, so that an unknown label is neither learnt from nor scored.

The loss runs on the device inside the training step and never reads a value back to the host;
the metrics run on the host, after an evaluation pass, with scikit-learn (an optional
dependency: ``pip install 'densenet-torch[multilabel]'``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError

INSTALL = "pip install 'densenet-torch[multilabel]'"
RULES = ("f1", "youden")


# --- the loss (on the device, no host read) ---------------------------------------------------

def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy with logits over the (N, L) entries where ``mask`` is True.

    ``targets`` are 0/1 floats of the same shape; ``mask`` (bool, same shape, None = all count)
    marks the entries whose label is known. A masked entry contributes neither loss nor gradient:
    its target is replaced by 0 before the loss (so a NaN there, a common way of writing
    "unknown", cannot turn the gradient into NaN) and its loss by 0 after it, so ``logits.grad``
    is exactly 0 there. The mean is over the counted entries (sum / max(count, 1), so a batch
    with none counted gives 0, not NaN), each label's entries weighing the same - the loss of
    ``BCEWithLogitsLoss`` restricted to the known labels. ``pos_weight`` (L,) multiplies the
    positive term as in ``BCEWithLogitsLoss`` (see :func:`auto_pos_weight`).

    Everything stays on the device: no ``.item()`` and no Python branch on a tensor's value, so
    the call never waits for the GPU (a host read in every step stalls the pipeline).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise UsageError(f"masked_bce: logits must be an (N, L) tensor, got "
                         f"{_describe(logits)}.")
    shape = tuple(logits.shape)
    targets = torch.as_tensor(targets, device=logits.device)
    if tuple(targets.shape) != shape:
        raise UsageError(f"masked_bce: targets have shape {tuple(targets.shape)}, logits {shape}; "
                         f"they must match (one 0/1 target per image and label).")
    targets = targets.to(logits.dtype)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, device=logits.device, dtype=logits.dtype)
        if tuple(pos_weight.shape) != (shape[1],):
            raise UsageError(f"masked_bce: pos_weight must have one value per label, shape "
                             f"({shape[1]},), got {tuple(pos_weight.shape)}.")
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    mask = torch.as_tensor(mask, device=logits.device)
    if tuple(mask.shape) != shape:
        raise UsageError(f"masked_bce: mask has shape {tuple(mask.shape)}, logits {shape}; "
                         f"they must match (True where the label is known).")
    mask = mask.bool()
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits, safe_targets, reduction="none",
                                              pos_weight=pos_weight)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    count = mask.sum().clamp_min(1).to(loss.dtype)
    return loss.sum() / count


def auto_pos_weight(targets, mask=None) -> torch.Tensor:
    """Per label, negatives / positives over the counted entries, as a float32 (L,) tensor: the
    ``pos_weight`` of ``BCEWithLogitsLoss`` (and :func:`masked_bce`) that gives a label's
    positives and negatives the same total weight.

    CheXNet weights the two terms w+ = |N| / (|P| + |N|) and w- = |P| / (|P| + |N|); dividing
    both by w- gives 1 for negatives and |N| / |P| for positives - the same balance, with each
    label's loss scaled by 1 / w- (which the optimiser's step size absorbs; ``BCEWithLogitsLoss``
    has no per-label negative weight to express w- itself).

    A target counts as positive when it is >= 0.5, negative below; NaN targets count as neither.
    A label with no counted positive, or no counted negative, cannot be balanced (the ratio is
    infinite or 0, which would drop the label from the loss): it gets 1.0, plain unweighted BCE.
    Names are not known here, so nothing is raised or logged for it; the caller, who has the
    names, should warn - such labels are those with ``(targets >= 0.5)[mask].sum(0) == 0`` or
    the same for ``< 0.5``. ``targets`` and ``mask`` are (N, L) numpy arrays or tensors; a
    tensor's result is on its device.
    """
    device = targets.device if isinstance(targets, torch.Tensor) else None
    t = _as_tensor(targets, "targets", device=device).float()
    if t.dim() != 2:
        raise UsageError(f"auto_pos_weight: targets must be (N, L), got shape {tuple(t.shape)}.")
    counted = _tensor_mask(mask, tuple(t.shape), t.device, "auto_pos_weight")
    pos = ((t >= 0.5) & counted).sum(0).float()
    neg = ((t < 0.5) & counted).sum(0).float()
    balanced = (pos > 0) & (neg > 0)
    return torch.where(balanced, neg / pos.clamp_min(1), torch.ones_like(pos))


# --- the metrics (on the host, scikit-learn) ---------------------------------------------------

def require_sklearn() -> None:
    """Raise a UsageError naming the pip command when scikit-learn does not import."""
    try:
        import sklearn.metrics  # noqa: F401
    except ImportError as e:
        raise UsageError(f"Multi-label metrics (AUROC, average precision, thresholds) need "
                         f"scikit-learn, which is not installed ({e}): {INSTALL} "
                         f"(or pip install scikit-learn).") from None


def label_metrics(probs, targets, mask, names: Sequence[str], thresholds=None) -> dict:
    """Per-label ranking and threshold metrics over the counted (image, label) entries.

    ``probs`` (sigmoid outputs), ``targets`` (0/1) and ``mask`` (bool, None = all count) are
    (N, L) numpy arrays or tensors; ``names`` gives the L labels. For each label, over its
    counted entries only:

    - ``auroc``: area under the ROC curve (``sklearn.metrics.roc_auc_score``), the number
      CheXNet and ChestX-ray14 report per label;
    - ``ap``: average precision (``sklearn.metrics.average_precision_score``), the area under
      the precision-recall curve, which unlike AUROC moves with prevalence and so shows how
      a rare finding's positives rank among its many negatives;
    - ``positives``, ``negatives``: how many counted entries of each class;
    - with ``thresholds`` (L floats, e.g. from :func:`choose_thresholds`): ``threshold``,
      ``f1``, ``sensitivity`` (recall of positives) and ``specificity`` (recall of negatives)
      of the prediction ``prob >= threshold``.

    AUROC and AP need both classes: with one class present they are None ("undefined"), not
    0.5 - a label with no positive in the test set has not been measured, and a 0.5 would pull
    the mean towards chance. Likewise sensitivity is None with no positive, specificity with no
    negative, F1 when there is neither a positive nor a positive prediction. ``mean_auroc`` is
    the mean over the labels whose AUROC is defined (None if none is). Every number is a plain
    Python float or int, so the result can go straight to JSON.
    """
    require_sklearn()
    from sklearn.metrics import average_precision_score, roc_auc_score

    p, t, m = _host_arrays(probs, targets, mask, "label_metrics")
    n_labels = p.shape[1]
    names = list(names)
    if len(names) != n_labels or not all(isinstance(n, str) for n in names):
        raise UsageError(f"label_metrics: names must be {n_labels} strings, one per column of "
                         f"probs, got {len(names)}.")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"label_metrics: label name {dup!r} is given twice; names must be "
                         f"distinct.")
    thr = None
    if thresholds is not None:
        thr = [float(x) for x in np.asarray(_numpy(thresholds), dtype=np.float64).ravel()]
        if len(thr) != n_labels:
            raise UsageError(f"label_metrics: thresholds must be {n_labels} numbers, one per "
                             f"label, got {len(thr)}.")

    labels, aurocs = {}, []
    for j, name in enumerate(names):
        y, s = _label_entries(p, t, m, j, name)
        pos, neg = int(y.sum()), int((~y).sum())
        both = pos > 0 and neg > 0
        row = {"auroc": float(roc_auc_score(y, s)) if both else None,
               "ap": float(average_precision_score(y, s)) if both else None,
               "positives": pos, "negatives": neg}
        if row["auroc"] is not None:
            aurocs.append(row["auroc"])
        if thr is not None:
            pred = s >= thr[j]
            tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
            fn, tn = pos - tp, neg - fp
            row.update(threshold=thr[j],
                       f1=_ratio(2 * tp, 2 * tp + fp + fn),
                       sensitivity=_ratio(tp, pos),
                       specificity=_ratio(tn, neg))
        labels[name] = row
    return {"mean_auroc": float(np.mean(aurocs)) if aurocs else None, "labels": labels}


def choose_thresholds(probs, targets, mask=None, rule: str = "f1") -> list[float]:
    """One decision threshold per label, chosen on the counted entries (of a validation set:
    choosing on the test set and scoring there overstates the result).

    ``rule="f1"``: the cut that maximises F1, the balance of precision and recall that suits a
    rare finding (``sklearn.metrics.precision_recall_curve``; the threshold is the probability
    at the best point, so ``prob >= threshold`` reproduces its F1). ``rule="youden"``: the cut
    that maximises Youden's J = sensitivity + specificity - 1 (Youden, Cancer 1950), the ROC
    point farthest above the diagonal (``sklearn.metrics.roc_curve``). ROC's first threshold,
    "predict nothing", is infinite; a threshold is never returned above 1.0. A label with one
    class only (or no counted entry) has no best cut and gets 0.5. Returns L Python floats.
    """
    if rule not in RULES:
        raise UsageError(f"choose_thresholds: unknown rule {rule!r}; use one of "
                         f"{', '.join(repr(r) for r in RULES)}.")
    require_sklearn()
    from sklearn.metrics import precision_recall_curve, roc_curve

    p, t, m = _host_arrays(probs, targets, mask, "choose_thresholds")
    out = []
    for j in range(p.shape[1]):
        y, s = _label_entries(p, t, m, j, f"column {j}")
        if not (y.any() and (~y).any()):
            out.append(0.5)
            continue
        if rule == "f1":
            precision, recall, cuts = precision_recall_curve(y, s)
            precision, recall = precision[:len(cuts)], recall[:len(cuts)]
            denom = precision + recall
            f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom),
                           where=denom > 0)
            best = cuts[int(np.argmax(f1))]
        else:
            fpr, tpr, cuts = roc_curve(y, s, drop_intermediate=False)
            best = cuts[int(np.argmax(tpr - fpr))]
        out.append(float(min(best, 1.0)))
    return out


# --- helpers ----------------------------------------------------------------------------------

def _describe(x) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {tuple(x.shape)}"
    return type(x).__name__


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _as_tensor(x, what: str, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device) if device is not None else x
    try:
        return torch.as_tensor(np.asarray(x), device=device)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{what} must be a numpy array or a tensor, got {type(x).__name__} "
                         f"({e}).") from None


def _tensor_mask(mask, shape: tuple, device, who: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = _as_tensor(mask, "mask", device=device)
    if tuple(m.shape) != shape:
        raise UsageError(f"{who}: mask has shape {tuple(m.shape)}, targets {shape}; they must "
                         f"match (True where the label is known).")
    return m.bool()


def _host_arrays(probs, targets, mask, who: str):
    """(probs float64, targets float64, mask bool) numpy arrays, shapes checked."""
    p = np.asarray(_numpy(probs), dtype=np.float64)
    t = np.asarray(_numpy(targets), dtype=np.float64)
    if p.ndim != 2:
        raise UsageError(f"{who}: probs must be (N, L), one column per label, got shape "
                         f"{p.shape}.")
    if t.shape != p.shape:
        raise UsageError(f"{who}: targets have shape {t.shape}, probs {p.shape}; they must "
                         f"match.")
    if mask is None:
        m = np.ones(p.shape, dtype=bool)
    else:
        m = np.asarray(_numpy(mask)).astype(bool)
        if m.shape != p.shape:
            raise UsageError(f"{who}: mask has shape {m.shape}, probs {p.shape}; they must "
                             f"match (True where the label is known).")
    return p, t, m


def _label_entries(p, t, m, j: int, name: str):
    """Label j's counted (targets as bool, probs), checked: 0/1 targets, finite probs."""
    keep = m[:, j]
    y, s = t[keep, j], p[keep, j]
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise UsageError(f"label {name!r} has {int(bad.sum())} counted target(s) that are not "
                         f"0 or 1 (e.g. {y[bad][0]!r}); mask unknown or uncertain labels out "
                         f"(mask False) or map them to 0 or 1.")
    if not np.isfinite(s).all():
        raise UsageError(f"label {name!r} has {int((~np.isfinite(s)).sum())} counted "
                         f"probabilities that are NaN or infinite; the model's outputs are "
                         f"not finite.")
    return y == 1, s


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None
