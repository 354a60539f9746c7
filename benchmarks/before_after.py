"""This tree's training and inference against another commit's, side by side in one run.

    .venv/bin/python benchmarks/before_after.py --base a5f2d35 [--repeats 3] [--steps 4]

The base commit is checked out into a temporary git worktree and imported from there
(``PYTHONPATH``, ahead of the installed package); each configuration runs in a fresh process
through ``densenet.bench.measure`` - the same measurement ``densenet bench`` makes - and the
two sides alternate (base, this, base, this, ...) so that other load on the machine hits both.
Torchvision's DenseNet with the same weights runs once per repeat, for the ratio to it. Printed:
one markdown table of medians (images/s and peak training memory by the CPU allocator's
accounting), the ratio of the medians this/base and the median of the repeats' own this/base
ratios (each repeat's two runs ran back to back, the side that goes first alternating), and the
JSON of every run with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# label: (model, mode, batch, size, amp, compile)
CONFIGS = {
    "bc100 train fp32": ("densenet_bc100_k12", "train", 64, 32, None, False),
    "bc100 train bf16": ("densenet_bc100_k12", "train", 64, 32, "bf16", False),
    "bc100 train compile": ("densenet_bc100_k12", "train", 64, 32, None, True),
    "bc100 infer fp32": ("densenet_bc100_k12", "infer", 256, 32, None, False),
    "bc100 infer bf16": ("densenet_bc100_k12", "infer", 256, 32, "bf16", False),
    "d121 train fp32": ("densenet121", "train", 16, 224, None, False),
    "d121 infer fp32": ("densenet121", "infer", 16, 224, None, False),
}
TORCHVISION = ("bc100 train fp32", "bc100 infer fp32", "d121 train fp32", "d121 infer fp32")


def run(tree: Path | None, variant: str, config, steps: int, warmup: int) -> dict:
    model, mode, batch, size, amp, comp = config
    spec = dict(model_name=model, variant=variant, mode=mode, batch=batch, size=size,
                layout="channels_last", steps=steps, warmup=max(warmup, 2 if comp else 0),
                device="cpu", amp=amp, compile=comp)
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import json, sys, densenet; from densenet.bench import measure; "
            "r = measure(**json.loads(sys.argv[1])); r['from'] = densenet.__file__; "
            "print('RESULT ' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{spec} failed:\n{proc.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", help="comma-separated labels of CONFIGS")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args()
    labels = args.only.split(",") if args.only else list(CONFIGS)
    base = Path(tempfile.mkdtemp(prefix="densenet-base-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base],
                   check=True, capture_output=True)
    import torch
    print(f"base {args.base} against {subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()} (+ working tree), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; {args.warmup} warm-up + {args.steps} timed "
          f"steps per run, {args.repeats} repeats, fresh process per run", flush=True)
    runs: dict = {}
    try:
        for rep in range(args.repeats):
            for label in labels:
                sides = (("base", base, "ours"), ("this", ROOT, "ours"))
                if rep % 2:  # each side goes first in every other repeat: no order effect
                    sides = sides[::-1]
                if label in TORCHVISION:
                    sides += (("torchvision", ROOT, "tv"),)
                for side, tree, variant in sides:
                    r = run(tree, variant, CONFIGS[label], args.steps, args.warmup)
                    runs.setdefault((label, side), []).append(r)
                    print(f"  rep {rep + 1} {label:20s} {side:11s} {r['images_per_s']:7.2f} img/s"
                          + (f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else "")
                          + f"  ({r['from']})", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                       capture_output=True)
    print("\n| configuration | base img/s | this img/s | this/base | paired this/base | base peak MiB | "
          "this peak MiB | base/torchvision | this/torchvision |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in labels:
        med = {side: statistics.median(r["images_per_s"] for r in runs[(label, side)])
               for side in ("base", "this", "torchvision") if (label, side) in runs}
        peak = {side: statistics.median(r["peak_mib"] for r in runs[(label, side)])
                for side in ("base", "this") if "peak_mib" in runs[(label, side)][0]}
        tv = med.get("torchvision")
        paired = statistics.median(t["images_per_s"] / b["images_per_s"]
                                   for b, t in zip(runs[(label, "base")], runs[(label, "this")]))
        print(f"| {label} | {med['base']:.2f} | {med['this']:.2f} | {med['this'] / med['base']:.3f} | "
              f"{paired:.3f} | "
              + (f"{peak['base']:.0f} | {peak['this']:.0f} | " if peak else "- | - | ")
              + (f"{med['base'] / tv:.2f} | {med['this'] / tv:.2f} |" if tv else "- | - |"))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
