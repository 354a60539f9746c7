"""DenseNet-BC-100 (k=12) under bf16 autocast on the CPU: ours against torchvision's DenseNet
class (same weights), training (batch 64) and inference (batch 256) img/s and peak training
memory; every configuration in a fresh process, the variants interleaved, ``--rounds`` times.

    python benchmarks/bench_bf16.py [--rounds 2] [--threads 2]

Prints one markdown table (the median of the rounds).
"""

import argparse
import json
import statistics
import subprocess
import sys

CONFIGS = [("tv", "channels_last"), ("tv", "contiguous"), ("ours", "channels_last")]
CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from densenet.bench import measure
variant, layout, mode = sys.argv[2:5]
r = measure("densenet_bc100_k12", variant, mode, 64 if mode == "train" else 256, 32, layout, 4, 2,
            amp="bf16")
print("RESULT " + json.dumps({"img_s": r["images_per_s"], "peak_mib": r.get("peak_mib")}))
"""


def run(threads, variant, layout, mode):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), variant, layout, mode],
                          capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{variant} {layout} {mode} failed:\n{proc.stderr[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    got = {}
    for _ in range(args.rounds):
        for variant, layout in CONFIGS:
            for mode in ("train", "infer"):
                r = run(args.threads, variant, layout, mode)
                got.setdefault((variant, layout, mode), []).append(r)
                print(f"  {variant} {layout} {mode}: {r['img_s']:.1f} img/s", file=sys.stderr)
    print("| variant | layout | train img/s (runs) | infer img/s (runs) | peak train MiB |")
    print("|---|---|---|---|---|")
    for variant, layout in CONFIGS:
        tr, inf = got[(variant, layout, "train")], got[(variant, layout, "infer")]
        runs = lambda rs: ", ".join(f"{r['img_s']:.1f}" for r in rs)  # noqa: E731
        print(f"| {variant} | {layout} | {statistics.median(r['img_s'] for r in tr):.1f} ({runs(tr)}) "
              f"| {statistics.median(r['img_s'] for r in inf):.1f} ({runs(inf)}) "
              f"| {tr[0]['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
