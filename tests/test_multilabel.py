"""Multi-label loss and metrics (CheXNet, Rajpurkar et al. 2017): masked entries carry neither
loss nor gradient, the loss never reads back to the host, the class-balance weight, and the
per-label metrics and thresholds against scikit-learn and against brute force."""

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

from densenet.errors import UsageError
from densenet.multilabel import (auto_pos_weight, choose_thresholds, label_metrics, masked_bce,
                                 require_sklearn)


def _batch(seed=0, n=12, labels=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, labels, generator=g)
    targets = (torch.rand(n, labels, generator=g) < 0.4).float()
    mask = torch.rand(n, labels, generator=g) < 0.7
    return logits, targets, mask


def _hand_bce(logits, targets, mask, pos_weight=None):
    """The mean over counted entries, one entry at a time from the formula."""
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if not mask[i, j]:
                continue
            x, y = float(logits[i, j]), float(targets[i, j])
            w = 1.0 if pos_weight is None else float(pos_weight[j])
            p = 1 / (1 + math.exp(-x))
            total += -(w * y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("pos_weight", [None, torch.tensor([0.5, 1.0, 2.0, 3.0, 7.5])])
def test_masked_entries_give_no_loss_and_no_gradient(pos_weight):
    logits, targets, mask = _batch()
    targets[~mask] = float("nan")  # "unknown" written as NaN, as CheXpert loaders often do
    logits.requires_grad_(True)
    loss = masked_bce(logits, targets, mask, pos_weight=pos_weight)
    assert loss.item() == pytest.approx(_hand_bce(logits.detach(), targets, mask, pos_weight),
                                        rel=1e-5)
    loss.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert (grad[mask] != 0).all()
    # Changing a masked logit or target changes nothing.
    other_logits, other_targets = logits.detach().clone(), targets.clone()
    other_logits[~mask] += 10.0
    other_targets[~mask] = 1.0
    assert masked_bce(other_logits, other_targets, mask, pos_weight).item() == \
        pytest.approx(loss.item(), rel=1e-6)


def test_mask_none_counts_everything_and_empty_mask_gives_zero():
    logits, targets, _ = _batch(seed=1)
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(masked_bce(logits, targets), expected)
    torch.testing.assert_close(masked_bce(logits, targets, torch.ones_like(targets).bool()),
                               expected)
    nothing = masked_bce(logits, targets, torch.zeros_like(targets).bool())
    assert nothing.item() == 0.0


def test_masked_bce_reads_nothing_back_to_the_host(monkeypatch):
    logits, targets, mask = _batch(seed=2)
    logits.requires_grad_(True)
    pos_weight = torch.full((5,), 2.0)

    def host_read(*args, **kwargs):
        raise AssertionError("masked_bce read a tensor's value on the host")

    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "tolist"):
            m.setattr(torch.Tensor, name, host_read)
        with pytest.raises(AssertionError, match="on the host"):  # the patch is live
            bool(torch.tensor(True))
        loss = masked_bce(logits, targets, mask, pos_weight=pos_weight)
        loss.backward()
        masked_bce(logits, targets)
    assert math.isfinite(loss.item())


def test_masked_bce_shape_mistakes_are_usage_errors():
    logits, targets, mask = _batch()
    with pytest.raises(UsageError, match="targets have shape"):
        masked_bce(logits, targets[:, :3], mask)
    with pytest.raises(UsageError, match="mask has shape"):
        masked_bce(logits, targets, mask[:4])
    with pytest.raises(UsageError, match="pos_weight"):
        masked_bce(logits, targets, mask, pos_weight=torch.ones(3))


def test_auto_pos_weight_is_negatives_over_positives_of_counted_entries():
    targets = np.array([[1, 0, 1, 0],
                        [0, 0, 1, 0],
                        [0, 1, 1, 0],
                        [1, 0, np.nan, 0],
                        [0, 0, 0, 0]], dtype=np.float32)
    mask = np.array([[1, 1, 1, 1],
                     [1, 0, 1, 1],
                     [1, 1, 1, 1],
                     [0, 1, 0, 1],
                     [1, 1, 1, 1]], dtype=bool)
    # Label 0 counted: 1, 0, 0, 0 -> 3/1; label 1: 0, 1, 0, 0 -> 3/1 (its masked 0 skipped);
    # label 2: 1, 1, 1, 0 -> 1/3 (its masked NaN skipped); label 3: no positive -> 1.0.
    expected = torch.tensor([3.0, 3.0, 1 / 3, 1.0])
    for t, m in ((targets, mask), (torch.from_numpy(targets), torch.from_numpy(mask))):
        w = auto_pos_weight(t, m)
        assert w.dtype == torch.float32 and w.shape == (4,)
        torch.testing.assert_close(w, expected)
    # Unmasked, label 0 is 2 positives, 3 negatives.
    assert auto_pos_weight(np.nan_to_num(targets))[0].item() == pytest.approx(1.5)


def _random_eval(seed=0, n=300, labels=4):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, labels)) < 0.3).astype(np.float32)
    # Informative but noisy probabilities, rounded so that ties occur.
    probs = np.clip(0.3 * targets + 0.7 * rng.random((n, labels)), 0, 1).round(2)
    mask = rng.random((n, labels)) < 0.8
    return probs, targets, mask


def test_label_metrics_match_sklearn_on_the_counted_entries():
    probs, targets, mask = _random_eval()
    targets[~mask] = -1  # would be an error if masked entries were looked at
    names = ["a", "b", "c", "d"]
    out = label_metrics(torch.from_numpy(probs), torch.from_numpy(targets),
                        torch.from_numpy(mask), names)
    for j, name in enumerate(names):
        y, p = targets[mask[:, j], j], probs[mask[:, j], j]
        row = out["labels"][name]
        assert row["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert row["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert (row["positives"], row["negatives"]) == (int((y == 1).sum()), int((y == 0).sum()))
        assert type(row["auroc"]) is float and type(row["positives"]) is int
    aurocs = [out["labels"][n]["auroc"] for n in names]
    assert out["mean_auroc"] == pytest.approx(np.mean(aurocs))
    # The mask matters: all entries give other numbers.
    assert label_metrics(probs, np.where(targets < 0, 0, targets), None,
                         names)["labels"]["a"]["auroc"] != out["labels"]["a"]["auroc"]


def test_one_class_label_is_undefined_and_left_out_of_the_mean():
    probs, targets, mask = _random_eval(seed=1)
    targets[:, 2] = 0.0
    targets[mask[:, 3], 3] = 1.0  # label d: every counted entry positive
    out = label_metrics(probs, targets, mask, ["a", "b", "c", "d"])
    for name in ("c", "d"):
        assert out["labels"][name]["auroc"] is None and out["labels"][name]["ap"] is None
    assert out["labels"]["c"]["positives"] == 0
    assert out["labels"]["d"]["negatives"] == 0
    assert out["mean_auroc"] == pytest.approx(
        (out["labels"]["a"]["auroc"] + out["labels"]["b"]["auroc"]) / 2)
    nothing = label_metrics(probs[:, 2:], targets[:, 2:], mask[:, 2:], ["c", "d"])
    assert nothing["mean_auroc"] is None


def test_threshold_metrics_on_a_tiny_example():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.1], [0.3, 0.8], [0.5, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [1, 0]], dtype=float)
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]], dtype=bool)
    out = label_metrics(probs, targets, mask, ["x", "y"], thresholds=[0.5, 0.5])
    x = out["labels"]["x"]
    # Counted x: probs .9 .6 .4 .3, targets 1 0 1 0; predicted (>= .5) 1 1 0 0:
    # TP 1, FP 1, FN 1, TN 1 (row 4, prob exactly .5, is masked out).
    assert (x["threshold"], x["positives"], x["negatives"]) == (0.5, 2, 2)
    assert x["f1"] == pytest.approx(2 / 4)
    assert x["sensitivity"] == pytest.approx(1 / 2)
    assert x["specificity"] == pytest.approx(1 / 2)
    # y has no positive: sensitivity and AUROC undefined; predicted 1 at .7 and .8 of 5 negatives.
    y = out["labels"]["y"]
    assert y["sensitivity"] is None and y["auroc"] is None
    assert y["specificity"] == pytest.approx(3 / 5)
    assert y["f1"] == 0.0
    # The cut is inclusive: unmasked, x's prob of exactly .5 (a positive) is predicted positive.
    unmasked = label_metrics(probs, targets, None, ["x", "y"], thresholds=[0.5, 0.9])
    assert unmasked["labels"]["x"]["sensitivity"] == pytest.approx(2 / 3)
    with pytest.raises(UsageError, match="2 numbers"):
        label_metrics(probs, targets, mask, ["x", "y"], thresholds=[0.5])


def test_label_metrics_mistakes_are_usage_errors():
    probs, targets, mask = _random_eval()
    with pytest.raises(UsageError, match="4 strings"):
        label_metrics(probs, targets, mask, ["a", "b"])
    with pytest.raises(UsageError, match="given twice"):
        label_metrics(probs, targets, mask, ["a", "b", "a", "d"])
    targets[0, 1], mask[0, 1] = 0.5, True
    with pytest.raises(UsageError, match="label 'b'.*not 0 or 1"):
        label_metrics(probs, targets, mask, ["a", "b", "c", "d"])


def _f1(y, pred):
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0


def _youden(y, pred):
    return (pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum() - 1


@pytest.mark.parametrize("rule,score", [("f1", _f1), ("youden", _youden)])
def test_chosen_threshold_is_the_best_cut(rule, score):
    probs, targets, mask = _random_eval(seed=3, n=200, labels=5)
    probs[:, 4] = np.where(targets[:, 4] == 1, 1.0, probs[:, 4])  # probs of exactly 1.0
    chosen = choose_thresholds(probs, targets, mask, rule=rule)
    assert len(chosen) == 5 and all(type(c) is float and math.isfinite(c) for c in chosen)
    for j, cut in enumerate(chosen):
        y, p = targets[mask[:, j], j] == 1, probs[mask[:, j], j]
        best = max([score(y, p >= u) for u in np.unique(p)] + [score(y, p > 1.0)])
        assert score(y, p >= cut) == pytest.approx(best, abs=1e-12), (rule, j)
        assert 0.0 <= cut <= 1.0


def test_youden_never_returns_infinity():
    # A useless classifier: the best J is 0, at roc_curve's first threshold (inf).
    probs = np.array([[0.5], [0.5], [0.5], [0.5]])
    targets = np.array([[1.0], [0.0], [1.0], [0.0]])
    assert choose_thresholds(probs, targets, rule="youden") == [1.0]


def test_one_class_label_threshold_is_half_and_unknown_rule_is_an_error():
    probs, targets, mask = _random_eval(seed=4)
    targets[:, 1] = 1.0
    assert choose_thresholds(probs, targets, mask)[1] == 0.5
    with pytest.raises(UsageError, match="'f1', 'youden'"):
        choose_thresholds(probs, targets, mask, rule="accuracy")


def test_require_sklearn_names_the_pip_command(monkeypatch):
    require_sklearn()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    pip = r"pip install 'densenet-torch\[multilabel\]'"
    with pytest.raises(UsageError, match="scikit-learn.*" + pip):
        require_sklearn()
    probs, targets, mask = _random_eval()
    with pytest.raises(UsageError, match="scikit-learn"):
        label_metrics(probs, targets, mask, ["a", "b", "c", "d"])
