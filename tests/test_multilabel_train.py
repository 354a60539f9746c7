"""Multi-label training from a CSV, end to end on a task with a known answer: label "square" =
a red square somewhere in the image, "disc" = a blue disc somewhere; each present or not,
independently. densenet train learns it, eval reports per-label AUROC with the stored
thresholds, predict marks the labels over them, and cam finds the shape of the label asked for."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from densenet.cam import cam_for_images
from densenet.cli import main
from densenet.errors import UsageError
from densenet.inference import evaluate, load_for_inference, predict
from densenet.rundir import load_checkpoint
from densenet.train import train
from test_train import TINY

SIZE = 32


def draw(rng, square=None, disc=None):
    """A noisy image with a red 8x8 square at ``square`` (y, x) and a blue disc of radius 4 at
    ``disc`` (cy, cx), each left out when None."""
    img = rng.integers(0, 60, size=(SIZE, SIZE, 3)).astype(np.uint8)
    if square is not None:
        y, x = square
        img[y:y + 8, x:x + 8] = (220, 30, 30)
    if disc is not None:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        img[(yy - disc[0]) ** 2 + (xx - disc[1]) ** 2 <= 16] = (30, 30, 220)
    return img


def make_shapes(root, n, seed, uncertain_every=0):
    """``n`` images and ROOT/labels.csv (path, square, disc); with ``uncertain_every`` k, every
    k-th row's disc cell is -1 (uncertain) and the next one's blank."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        sq, dc = rng.random() < 0.5, rng.random() < 0.5
        img = draw(rng, tuple(rng.integers(0, SIZE - 8, 2)) if sq else None,
                   tuple(rng.integers(5, SIZE - 5, 2)) if dc else None)
        Image.fromarray(img).save(root / "img" / f"{i:04d}.png")
        disc = int(dc)
        if uncertain_every and i % uncertain_every == 0:
            disc = -1
        elif uncertain_every and i % uncertain_every == 1:
            disc = ""
        rows.append([f"img/{i:04d}.png", int(sq), disc])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "square", "disc"])
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    data = make_shapes(root / "train", 160, seed=0)
    result = train(TINY, "c10+", str(data), str(root / "run"), epochs=4, batch_size=16, quiet=True,
                   seed=0, set_fields={"val_size": "40", "augment": "false", "pos_weight": "auto"})
    return root, result


def test_the_shapes_are_learned_to_a_high_mean_auroc(trained):
    root, result = trained
    assert result["task"] == "multi-label" and result["best_val_auroc"] > 0.95
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_auroc" in r for r in rows)
    best = max(rows, key=lambda r: r["val_auroc"])  # the first epoch with the highest AUROC
    assert result["best_epoch"] == best["epoch"]
    ckpt = load_checkpoint(root / "run" / "best.pt")
    assert ckpt["task"] == "multi-label" and ckpt["classes"] == ["square", "disc"]
    assert len(ckpt["thresholds"]) == 2 and all(0 <= t <= 1 for t in ckpt["thresholds"])
    assert ckpt["state_dict"]["classifier.weight"].shape[0] == 2  # one logit per label


def test_eval_reports_every_label_on_new_images_with_the_stored_thresholds(trained, capsys):
    root, _ = trained
    test = make_shapes(root / "test", 60, seed=1)
    loaded = load_for_inference(str(root / "run"))
    out = evaluate(loaded, str(test))
    assert out["n"] == 60 and out["mean_auroc"] > 0.95
    assert set(out["labels"]) == {"square", "disc"}
    for name, m in out["labels"].items():
        assert m["threshold"] == loaded.thresholds[loaded.classes.index(name)]
        assert m["positives"] + m["negatives"] == 60 and {"ap", "f1", "sensitivity"} <= set(m)
    assert main(["eval", str(root / "run"), "--data", str(test)]) == 0
    text = capsys.readouterr().out
    assert "square" in text and "AUROC" in text and f"mean AUROC {out['mean_auroc']:.4f}" in text
    assert main(["eval", str(root / "run"), "--data", str(test), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_auroc"] == pytest.approx(out["mean_auroc"])


def test_predict_marks_the_labels_over_their_thresholds(trained, tmp_path, capsys):
    root, _ = trained
    rng = np.random.default_rng(5)
    Image.fromarray(draw(rng, square=(4, 4))).save(tmp_path / "square.png")
    Image.fromarray(draw(rng, disc=(20, 20))).save(tmp_path / "disc.png")
    loaded = load_for_inference(str(root / "run"))
    got = {r["image"].split("/")[-1]: {m["label"]: m["positive"] for m in r["labels"]}
           for r in predict(loaded, [tmp_path / "square.png", tmp_path / "disc.png"])}
    assert got == {"square.png": {"square": True, "disc": False},
                   "disc.png": {"square": False, "disc": True}}
    assert main(["predict", str(root / "run"), str(tmp_path / "square.png")]) == 0
    assert "* square" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_cam_of_a_label_is_hottest_on_its_shape(trained, tmp_path, method):
    root, _ = trained
    rng = np.random.default_rng(7)
    Image.fromarray(draw(rng, square=(2, 2), disc=(25, 25))).save(tmp_path / "both.png")
    loaded = load_for_inference(str(root / "run"))
    for label, quarter in (("square", (slice(0, 16), slice(0, 16))),
                           ("disc", (slice(16, 32), slice(16, 32)))):
        (cam,) = cam_for_images(loaded, [tmp_path / "both.png"], label, method=method)
        assert cam.class_name == label
        assert cam.cam[quarter].max() == cam.cam.max(), (label, cam.cam)
    # one panel per positive label (occlusion: one pass over the patches for both)
    panels = cam_for_images(loaded, [tmp_path / "both.png"], method=method)
    assert sorted(p.class_name for p in panels) == ["disc", "square"]


def test_uncertain_and_missing_labels_train_without_nan(tmp_path):
    data = make_shapes(tmp_path / "train", 48, seed=2, uncertain_every=4)
    result = train(TINY, "c10+", str(data), str(tmp_path / "run"), epochs=1, batch_size=16,
                   quiet=True, set_fields={"val_size": "16", "augment": "false"})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[0]["train_loss"]) and np.isfinite(rows[0]["val_loss"])
    assert result["best_val_auroc"] is not None


def test_label_smoothing_is_refused_for_multi_label_data(tmp_path):
    data = make_shapes(tmp_path / "train", 8, seed=3)
    with pytest.raises(UsageError, match="label_smoothing is for one class per image"):
        train(TINY, "finetune", str(data), str(tmp_path / "run"), epochs=1, quiet=True)


def test_a_multi_label_model_is_not_evaluated_on_single_label_data(trained, tmp_path):
    from test_train import make_folder_data
    root, _ = trained
    folder = make_folder_data(tmp_path / "folder", per_class=2)
    with pytest.raises(UsageError, match="is a multi-label model but .* holds single-label data"):
        evaluate(load_for_inference(str(root / "run")), str(folder))


def test_report_shows_the_auroc_and_export_records_labels_and_thresholds(trained, tmp_path):
    from densenet.analysis import format_report, report
    from densenet.export import export, metadata
    root, result = trained
    (row,) = report([root / "run"])
    assert row["best_val_auroc"] == result["best_val_auroc"]
    text = format_report([row])
    assert "best val AUROC" in text and f"{result['best_val_auroc']:.4f}" in text
    loaded = load_for_inference(str(root / "run"))
    meta = metadata(loaded)
    assert meta["task"] == "multi-label" and meta["classes"] == ["square", "disc"]
    assert meta["thresholds"] == loaded.thresholds and "sigmoid" in meta["output"]
    out = export(loaded, "exported-program", tmp_path / "shapes.pt2")
    assert out["ok"], out


def test_fine_tuning_options_work_for_multi_label_runs(trained, tmp_path):
    root, _ = trained
    data = make_shapes(tmp_path / "more", 48, seed=6)
    before = load_checkpoint(root / "run" / "best.pt")["state_dict"]
    result = train(TINY, "c10+", str(data), str(tmp_path / "run"), weights=str(root / "run"),
                   freeze="features", epochs=1, batch_size=16, quiet=True,
                   set_fields={"val_size": "16", "augment": "false", "optimizer": "adamw"})
    after = load_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    assert result["task"] == "multi-label"
    assert torch.equal(before["features.conv0.weight"], after["features.conv0.weight"])  # frozen
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])  # trained
    loaded = load_for_inference(str(tmp_path / "run"))
    (r,) = predict(loaded, [root / "train" / "img" / "0000.png"])
    assert [m["threshold"] for m in r["labels"]] == loaded.thresholds  # the stored ones
