"""Train a named model and recipe on a class-folder CIFAR copy; print validation error and speed.

    python benchmarks/train_cifar.py --data ../shared/data/cifar10/train \
        --model densenet_bc100_k12 --recipe c10+ --epochs 1

Uses the same `densenet.train.train` as `densenet train` (5,000 images held out for validation
by the recipe), writes the run directory under --out, and prints one table row per epoch plus
the machine, versions and threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from densenet.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="class-folder CIFAR copy (e.g. ../shared/data/cifar10/train)")
    ap.add_argument("--model", default="densenet_bc100_k12")
    ap.add_argument("--recipe", default="c10+")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="run directory (default: a temporary one)")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="train_cifar_")) / "run"
    t0 = time.time()
    result = train(args.model, args.recipe, args.data, str(out), epochs=args.epochs,
                   batch_size=args.batch_size, max_steps=args.max_steps, quiet=True,
                   channels_last=args.channels_last, device=args.device)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"model {args.model}, recipe {args.recipe}, {result['params']:,} parameters, run {out}")
    print("| epoch | train loss | train error % | val loss | val error % | lr | images/s | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        val_err = f"{100 * r['val_error']:.2f}" if r["val_error"] is not None else "-"
        val_loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"| {r['epoch']} | {r['train_loss']:.4f} | {100 * r['train_error']:.2f} | {val_loss} | "
              f"{val_err} | {r['lr']:.4g} | {r['images_per_s']:.1f} | {r['seconds']:.1f} |")
    print(f"wall time {wall:.0f} s (data loading and caching included)")


if __name__ == "__main__":
    main()
