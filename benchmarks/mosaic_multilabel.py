"""A real multi-label task from CIFAR-10 images: 64-pixel 2x2 mosaics of four real training
images, labelled with the set of classes present (1 to 4 positives of 10), trained the CheXNet
way (sigmoid per label, weighted BCE, per-label AUROC) from weights pretrained here.

    python benchmarks/mosaic_multilabel.py --cifar CIFAR10_JPEG_ROOT --out /tmp/mosaic [--run]

CIFAR10_JPEG_ROOT holds one folder of 32x32 JPEGs per class (CLASS/NNNN.jpg, 5,000 each). The
files of each class, sorted by name, are split three ways so no image is in two parts:

- the first ``--pretrain`` per class: a class folder (OUT/pretrain/CLASS/) for single-label
  pretraining, which makes the "pretrained weights";
- the next ``--train-pool`` per class: the sources of the training mosaics;
- the last ``--test-pool`` per class: the sources of the test mosaics.

Each mosaic takes four images drawn at random from its pool (``--seed``) and puts them in the
quarters top-left, top-right, bottom-left, bottom-right; OUT/train.csv and OUT/test.csv list
``path`` and one 0/1 column per class, and OUT/quarters.csv the class of each quarter. With
``--run`` the script then runs, as commands, the pretraining, the multi-label training (recipe
``chexnet``'s loss, schedule and metrics on a CPU-sized model), the evaluation on the test
mosaics and a Grad-CAM figure per positive label of one test mosaic, printing each command;
then (``--cam-check N``) how often the Grad-CAM of a class present in a test mosaic is hottest
in a quarter that holds it.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def sources(root: Path, pretrain: int, train_pool: int, test_pool: int) -> dict:
    parts = {"pretrain": [], "train": [], "test": []}
    for c, name in enumerate(CLASSES):
        files = sorted((root / name).glob("*.jpg"))
        if len(files) < pretrain + train_pool + test_pool:
            sys.exit(f"{root / name} has {len(files)} images; need {pretrain + train_pool + test_pool}")
        parts["pretrain"] += [(f, c) for f in files[:pretrain]]
        parts["train"] += [(f, c) for f in files[pretrain:pretrain + train_pool]]
        parts["test"] += [(f, c) for f in files[len(files) - test_pool:]]
    return parts


def make_mosaics(pool, n: int, out: Path, rng) -> tuple[list, list]:
    out.mkdir(parents=True, exist_ok=True)
    rows, quarters = [], []
    for i in range(n):
        pick = [pool[j] for j in rng.choice(len(pool), 4, replace=False)]
        tiles = [np.asarray(Image.open(f).convert("RGB")) for f, _ in pick]
        mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        name = f"{out.name}/{i:05d}.png"
        Image.fromarray(mosaic).save(out.parent / name)
        present = {c for _, c in pick}
        rows.append([name] + [int(c in present) for c in range(len(CLASSES))])
        quarters.append([name] + [CLASSES[c] for _, c in pick])
    return rows, quarters


def write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def cam_check(out: Path, n: int) -> dict:
    """Where Grad-CAM points: for each of the first ``n`` test mosaics and each class present
    in it, the map of that label, and whether its hottest pixel lies in a quarter holding
    that class; beside it the chance of that (quarters holding the class / 4)."""
    import torch
    from densenet.cam import cam_for_images
    from densenet.inference import load_for_inference
    loaded = load_for_inference(str(out / "mosaic_run"))
    with open(out / "test_quarters.csv", newline="") as f:
        rows = list(csv.reader(f))[1:n + 1]
    hits, chance, per_label = 0, 0.0, {}
    for path, *quarters in rows:
        for label in sorted(set(quarters)):
            (cam,) = cam_for_images(loaded, [out / path], label)
            h, w = cam.cam.shape
            y, x = divmod(int(torch.argmax(cam.cam)), w)
            hit = quarters[2 * (y >= h // 2) + (x >= w // 2)] == label
            hits += hit
            chance += quarters.count(label) / 4
            got = per_label.setdefault(label, [0, 0])
            got[0] += hit
            got[1] += 1
    total = sum(v[1] for v in per_label.values())
    return {"mosaics": len(rows), "maps": total, "hit_rate": hits / total, "chance": chance / total,
            "per_label": {k: v[0] / v[1] for k, v in sorted(per_label.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--pretrain", type=int, default=1000, help="pretraining images per class")
    p.add_argument("--train-pool", type=int, default=2000, help="training-mosaic sources per class")
    p.add_argument("--test-pool", type=int, default=1000, help="test-mosaic sources per class")
    p.add_argument("--train-mosaics", type=int, default=4000)
    p.add_argument("--test-mosaics", type=int, default=1000)
    p.add_argument("--model", default="densenet_bc40_k12")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", action="store_true", help="also pretrain, train, evaluate and draw")
    p.add_argument("--cam-check", type=int, default=200, metavar="N",
                   help="with --run: how often Grad-CAM of a present class is hottest in its "
                   "quarter, over the first N test mosaics (0: skip)")
    p.add_argument("--cam-check-only", action="store_true",
                   help="only the Grad-CAM check, on the run an earlier --run left in --out")
    args = p.parse_args()
    out = args.out
    if args.cam_check_only:
        print(json.dumps(cam_check(out, args.cam_check), indent=1))
        return
    parts = sources(args.cifar, args.pretrain, args.train_pool, args.test_pool)
    for f, c in parts["pretrain"]:
        link = out / "pretrain" / CLASSES[c] / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(f.resolve())
    rng = np.random.default_rng(args.seed)
    header = ["path", *CLASSES]
    for split, n in (("train", args.train_mosaics), ("test", args.test_mosaics)):
        rows, quarters = make_mosaics(parts[split], n, out / split, rng)
        write_csv(out / f"{split}.csv", header, rows)
        write_csv(out / f"{split}_quarters.csv", ["path", "top_left", "top_right", "bottom_left",
                                                  "bottom_right"], quarters)
        counts = np.array([r[1:] for r in rows]).sum(1)
        print(f"{split}: {n} mosaics, positives per mosaic {counts.min()}-{counts.max()} "
              f"(mean {counts.mean():.2f})", flush=True)
    if not args.run:
        return
    dn = [sys.executable, "-m", "densenet"]
    times = {}
    times["pretrain"] = run(dn + ["train", "--recipe", "c10+", "--model", args.model, "--data",
                                  str(out / "pretrain"), "--epochs", str(args.pretrain_epochs),
                                  "--set", "val_size=0", "--quiet", "--out", str(out / "pretrain_run")])
    times["train"] = run(dn + ["train", "--recipe", "chexnet", "--model", args.model, "--weights",
                               str(out / "pretrain_run"), "--data", str(out / "train.csv"),
                               "--epochs", str(args.epochs), "--batch-size", "32",
                               "--set", "normalize=meanstd", "--set", "val_size=500", "--quiet",
                               "--out", str(out / "mosaic_run")])
    times["eval"] = run(dn + ["eval", str(out / "mosaic_run"), "--data", str(out / "test.csv"),
                              "--json", str(out / "test_eval.json")])
    first = out / "test" / "00000.png"
    run(dn + ["cam", str(out / "mosaic_run"), str(first), "--out", str(out / "cam.png"),
              "--size", "192"])
    (out / "times.json").write_text(json.dumps(times, indent=1))
    print(json.dumps(times))
    if args.cam_check:
        check = cam_check(out, args.cam_check)
        (out / "cam_check.json").write_text(json.dumps(check, indent=1))
        print(json.dumps(check, indent=1))


if __name__ == "__main__":
    main()
