"""Where the heat maps peak on the synthetic which-half task: Grad-CAM against occlusion.

    .venv/bin/python benchmarks/cam_on_blobs.py --out /tmp/blobs     # trains, then the table
    .venv/bin/python benchmarks/cam_on_blobs.py --out /tmp/blobs --patch 4 --stride 1

Writes the task of the README's volumes section (``synthetic_blobs``: 24 training volumes per
class at seed 0, 10 test volumes per class at seed 1, 16^3; the class is the half of W that
holds a bright Gaussian blob), trains the README's run on it with ``densenet train`` (one
thread, as the test suite does; skipped when OUT/run already holds a finished run), then draws
both maps of every test volume with ``densenet cam`` and compares each map's maximum with the
blob's brightest voxel after a 3x3x3 mean. Per method: how many maps peak within 1 and 2 voxels
of the blob along every axis, the largest distance along D, H and W, and the mean signed
distance along W towards the middle of the volume (negative: the map sits between the blob and
the middle, or beyond it).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from densenet.cli import main  # noqa: E402
from densenet.volumes import read_volume, synthetic_blobs  # noqa: E402

SIZE = 16


def blob_centre(path) -> np.ndarray:
    v = torch.from_numpy(read_volume(path)[0])
    smooth = torch.nn.functional.avg_pool3d(v[None, None], 3, 1, 1)[0, 0]
    return np.array(np.unravel_index(int(smooth.argmax()), smooth.shape))


def peaks(run: Path, files: list[Path], out: Path, method: str, extra: list[str]) -> list[np.ndarray]:
    """The map maxima ``densenet cam`` prints, one per file, in order."""
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["cam", str(run), *map(str, files), "--out", str(out / method),
                     "--method", method, "--size", "64", *extra])
    if code != 0:
        raise SystemExit(f"densenet cam --method {method} failed ({code})")
    lines = buffer.getvalue().splitlines()[:-1]
    return [np.array([int(v) for v in line.split()[4].split(",")]) for line in lines]


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the data, run and maps")
    ap.add_argument("--patch", type=int, help="occlusion patch (default: cam's)")
    ap.add_argument("--stride", type=int, help="occlusion stride (default: cam's)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args(argv)
    train_dir = synthetic_blobs(args.out / "train", 24, SIZE, 0)
    test_dir = synthetic_blobs(args.out / "test", 10, SIZE, 1)
    run = args.out / "run"
    torch.set_num_threads(1)
    if not (run / "last.pt").is_file():
        start = time.perf_counter()
        code = main(["train", "--data", str(train_dir), "--model", "densenet_bc16_k8",
                     "--set", f"volume_size={SIZE}", "--set", "augment=false", "--epochs", "12",
                     "--lr", "3e-3", "--batch-size", "8", "--out", str(run), "--quiet"])
        if code != 0:
            return code
        print(f"trained {run} in {time.perf_counter() - start:.0f} s")
    files = sorted(test_dir.glob("*/*.nii.gz"))
    centres = [blob_centre(p) for p in files]
    middle_sign = np.array([-1 if p.parent.name == "left" else 1 for p in files])  # W towards the border
    occlusion_args = [*(["--patch", str(args.patch)] if args.patch else []),
                      *(["--stride", str(args.stride)] if args.stride else [])]
    try:
        version = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                 text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        version = "?"
    print(f"# {version}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{len(files)} test volumes of {SIZE}^3")
    print("| method | within 1 voxel | within 2 voxels | max |offset| (D, H, W) | mean W offset towards the border |")
    print("|---|---|---|---|---|")
    rows = {}
    for method, extra in (("gradcam", []), ("occlusion", occlusion_args)):
        start = time.perf_counter()
        offsets = np.array([p - c for p, c in zip(peaks(run, files, args.out, method, extra), centres)])
        seconds = time.perf_counter() - start
        dist = np.abs(offsets)
        rows[method] = {"within_1": int((dist <= 1).all(1).sum()),
                        "within_2": int((dist <= 2).all(1).sum()),
                        "max_offset_dhw": dist.max(0).tolist(),
                        "mean_w_towards_border": float((offsets[:, 2] * middle_sign).mean()),
                        "seconds": seconds, "offsets": offsets.tolist()}
        r = rows[method]
        print(f"| {method} | {r['within_1']}/{len(files)} | {r['within_2']}/{len(files)} | "
              f"{tuple(r['max_offset_dhw'])} | {r['mean_w_towards_border']:+.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"version": version, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
