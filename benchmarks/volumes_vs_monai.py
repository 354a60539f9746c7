"""3-D volumes: our DenseNet-121 against MONAI's, and peak training memory against depth.

    .venv/bin/python benchmarks/volumes_vs_monai.py --repeats 3 --json volumes.json \
        --plot benchmarks/memory_vs_depth_3d.png     # the RESULTS tables; on an otherwise idle machine
    .venv/bin/python benchmarks/volumes_vs_monai.py --quick    # smoke run, under a minute
    .venv/bin/python benchmarks/volumes_vs_monai.py --sizes 64 --repeats 6 --steps 5 --paired 12 \
        --depths 40                                  # 64^3 only, with the one-process pairing

Part 1: DenseNet-121 with 1 input channel and 2 classes, batch 2, at 64^3, 96^3 and 128^3
(``--sizes``): ours (``create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)``,
the efficient implementation) and MONAI's (``monai.networks.nets.DenseNet121(spatial_dims=3,
in_channels=1, out_channels=2)``). Part 2: 3-D DenseNet-BC k=12 (``densenet_cifar``), 1 channel,
on 32^3 volumes (``--depth-size``), batch 1 (``--depth-batch``), at L = 40, 64, 88, 112
(``--depths``), efficient against ``implementation="reference"``, with a least-squares line
through the efficient path's memory and its worst relative residual.

One training step = forward, cross-entropy, backward, SGD (lr 0.01, momentum 0.9). Time: the
median of ``--steps`` (3) timed steps after one warm-up step (``--depth-steps``, 1, in the depth
sweep, where memory is the point). Memory: ``densenet.bench._peak_step_bytes``,
the figure ``densenet bench`` reports: the highest live-bytes total of torch's CPU allocator during
one more training step, from the profiler's allocation events (``profile_memory=True``), after our
buffer pool is emptied (``densenet.ops.release_buffers``); what is alive before that step
(parameters, momentum buffers, the input) is not counted: "peak above the model". The step's
gradients count in full (the previous step's, freed by ``zero_grad`` in it, were allocated before
the profiler started, so their release is not seen), as in ``densenet bench``. The process RSS
peak (``ru_maxrss``) is kept in the JSON. Every configuration runs in a fresh process (this
script with ``--worker``), ours and MONAI (or efficient and reference) alternating; the figures
are medians over ``--repeats`` such runs. ``--threads`` (default: every core) sets
``torch.set_num_threads`` in each worker. With ``--paired PAIRS``, one more fresh process per
size holds both DenseNet-121s and alternates their training steps (``measure_paired``): both
see the same machine state, so its ratio moves less than the fresh-process medians do when the
machine's speed drifts by 10-15% over minutes, as this project's does.

The header names the code version (``git describe``) the numbers belong to.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

from densenet import create_model, ops
from densenet.bench import _peak_step_bytes, fit_line
from densenet.model import densenet_cifar

SIZES = (64, 96, 128)
DEPTHS = (40, 64, 88, 112)
LABELS = {("d121", "efficient"): "ours", ("monai", None): "MONAI",
          ("bc", "efficient"): "efficient", ("bc", "reference"): "reference"}


def build(net: str, implementation: str | None = None, depth: int | None = None) -> nn.Module:
    """``d121`` (our DenseNet-121), ``monai`` (MONAI's) or ``bc`` (our DenseNet-BC k=12 of
    ``depth``), all 3-D with 1 input channel and 2 classes."""
    torch.manual_seed(0)
    if net == "monai":
        from monai.networks.nets import DenseNet121
        return DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    if net == "d121":
        return create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2,
                            implementation=implementation)
    return densenet_cifar(depth, growth_rate=12, bottleneck=True, compression=0.5, spatial_dims=3,
                          in_channels=1, num_classes=2, implementation=implementation)


def measure(net: str, implementation: str | None, size: int, batch: int, steps: int,
            threads: int, depth: int | None = None, warmup: int = 1) -> dict:
    """One configuration in this process: step times and the peak memory of one more step."""
    torch.set_num_threads(threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(net, implementation, depth).train()
    torch.manual_seed(1)
    x = torch.randn(batch, 1, size, size, size)
    y = torch.randint(0, 2, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    ops.release_buffers()  # as densenet.bench.measure: pooled buffers count from their allocation
    peak = _peak_step_bytes(step)
    return dict(net=net, implementation=implementation, depth=depth, size=size, batch=batch,
                threads=torch.get_num_threads(), times=[round(t, 4) for t in times],
                step_s=statistics.median(times), peak_mib=peak / 2**20,
                rss_peak_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
                params=sum(p.numel() for p in model.parameters()))


def both_steps(size: int, batch: int, threads: int) -> dict:
    """Ours and MONAI's DenseNet-121 in this one process on one input: {"ours": step, "MONAI":
    step}, each a training step of its model, already run once (warm-up)."""
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    x = torch.randn(batch, 1, size, size, size)
    y = torch.randint(0, 2, (batch,))
    steps = {}
    for label, net, impl in (("ours", "d121", "efficient"), ("MONAI", "monai", None)):
        model = build(net, impl).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        step()
        steps[label] = step
    return steps


def measure_paired(size: int, batch: int, pairs: int, threads: int) -> dict:
    """Ours and MONAI's DenseNet-121 in this one process, their training steps alternating
    (ours, MONAI, MONAI, ours, ...; one warm-up step each): both see the same machine state, so
    the ratio is steadier than one of fresh-process medians when the machine's speed drifts."""
    steps = both_steps(size, batch, threads)
    times = {"ours": [], "MONAI": []}
    for i in range(pairs):
        for label in ("ours", "MONAI") if i % 2 == 0 else ("MONAI", "ours"):
            t = time.perf_counter()
            steps[label]()
            times[label].append(time.perf_counter() - t)
    ratios = [o / m for o, m in zip(times["ours"], times["MONAI"])]
    return dict(size=size, batch=batch, threads=torch.get_num_threads(), pairs=pairs,
                times={k: [round(t, 4) for t in v] for k, v in times.items()},
                ours_s=statistics.median(times["ours"]), monai_s=statistics.median(times["MONAI"]),
                pair_ratio=statistics.median(ratios))


def in_subprocess(**spec) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-2000:]}")


def interleaved(sides, repeats: int, log, **spec) -> dict:
    """Each side (net, implementation) ``repeats`` times in fresh processes, alternating;
    per side the medians over its runs and the runs."""
    runs = {side: [] for side in sides}
    for rep in range(repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:  # the side that goes first alternates
            r = in_subprocess(net=side[0], implementation=side[1], **spec)
            runs[side].append(r)
            log(f"  {LABELS[side]:9s} {spec}: step {r['step_s']:.2f} s, peak {r['peak_mib']:.0f} MiB "
                f"(allocator), RSS peak +{r['rss_peak_mib']:.0f} MiB")
    return {LABELS[side]: dict(step_s=statistics.median(r["step_s"] for r in rs),
                               peak_mib=statistics.median(r["peak_mib"] for r in rs),
                               params=rs[0]["params"], runs=rs) for side, rs in runs.items()}


def environment(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe",
                             "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return dict(cpu=cpu, cores=os.cpu_count(), threads=threads, torch=torch.__version__,
                monai=importlib.metadata.version("monai"), python=platform.python_version(),
                commit=commit or None)


def plot(rows, batch: int, size: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label in ("efficient", "reference"):
        ax.plot([r["depth"] for r in rows], [r[label]["peak_mib"] for r in rows], "o-", label=label)
    ax.set_xlabel("depth L (3-D DenseNet-BC, k=12)")
    ax.set_ylabel("peak training memory (MiB)")
    ax.set_title(f"batch {batch}, {size}^3, CPU allocator accounting")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--batch", type=int, default=2, help="DenseNet-121 batch")
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    p.add_argument("--depth-batch", type=int, default=1)
    p.add_argument("--depth-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="DenseNet-121: timed steps after one warm-up step")
    p.add_argument("--depth-steps", type=int, default=1, help="depth sweep: timed steps")
    p.add_argument("--repeats", type=int, default=1, help="fresh-process runs per configuration")
    p.add_argument("--paired", type=int, default=0, metavar="PAIRS",
                   help="also time ours and MONAI alternating step by step in one process, PAIRS "
                        "steps each, per size (a steadier ratio on a machine whose speed drifts)")
    p.add_argument("--threads", type=int, help="torch threads (default: every core; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32^3; L = 40, 64 at 16^3; one step; one thread")
    p.add_argument("--json", help="write the environment and every run here")
    p.add_argument("--plot", help="save the memory-against-depth plot here (PNG)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        run = measure_paired if spec.pop("paired", False) else measure
        print("RESULT " + json.dumps(run(**spec)), flush=True)
        return
    if args.quick:
        args.sizes, args.steps, args.depths, args.depth_size, args.repeats = [32], 1, [40, 64], 16, 1
    args.threads = args.threads or (1 if args.quick else os.cpu_count())
    env = environment(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731 (progress; tables on stdout)
    print(f"CPU: {env['cpu']}, {env['cores']} cores; threads {env['threads']}; torch {env['torch']}, "
          f"monai {env['monai']}, python {env['python']}; code {env['commit']}; 1 warm-up + "
          f"{args.steps} timed steps ({args.depth_steps} in the depth sweep), {args.repeats} "
          f"fresh-process run(s) per configuration")

    d121 = []
    for size in args.sizes:
        res = interleaved([("d121", "efficient"), ("monai", None)], args.repeats, log, size=size,
                          batch=args.batch, steps=args.steps, threads=args.threads)
        d121.append(dict(size=size, **res))
    print(f"\nDenseNet-121 3-D, 1 channel, 2 classes, batch {args.batch}: one training step "
          f"(median), peak memory above the model (CPU allocator)\n")
    print("| size | ours s | MONAI s | time ours/MONAI | ours MiB | MONAI MiB | memory ours/MONAI |")
    print("|---|---|---|---|---|---|---|")
    for r in d121:
        o, m = r["ours"], r["MONAI"]
        print(f"| {r['size']}^3 | {o['step_s']:.2f} | {m['step_s']:.2f} | {o['step_s'] / m['step_s']:.2f} | "
              f"{o['peak_mib']:,.0f} | {m['peak_mib']:,.0f} | {o['peak_mib'] / m['peak_mib']:.2f} |")
    paired = []
    if args.paired:
        for size in args.sizes:
            r = in_subprocess(paired=True, size=size, batch=args.batch, pairs=args.paired,
                              threads=args.threads)
            log(f"  paired {size}^3: ours {r['times']['ours']}, MONAI {r['times']['MONAI']}")
            paired.append(r)
        print(f"\nThe same, both models in one process, steps alternating ({args.paired} each, "
              f"after one warm-up step each)\n")
        print("| size | ours s | MONAI s | ratio of medians | median of step-pair ratios |")
        print("|---|---|---|---|---|")
        for r in paired:
            print(f"| {r['size']}^3 | {r['ours_s']:.2f} | {r['monai_s']:.2f} | "
                  f"{r['ours_s'] / r['monai_s']:.2f} | {r['pair_ratio']:.3f} |")

    depth = []
    for L in args.depths:
        res = interleaved([("bc", "efficient"), ("bc", "reference")], args.repeats, log,
                          depth=L, size=args.depth_size, batch=args.depth_batch, steps=args.depth_steps,
                          threads=args.threads)
        depth.append(dict(depth=L, **res))
    print(f"\nDenseNet-BC k=12 3-D, {args.depth_size}^3, 1 channel, batch {args.depth_batch}: "
          f"peak training memory against depth (CPU allocator)\n")
    print("| L | params | efficient MiB | reference MiB | efficient/reference | efficient s | reference s |")
    print("|---|---|---|---|---|---|---|")
    for r in depth:
        e, f = r["efficient"], r["reference"]
        print(f"| {r['depth']} | {e['params']:,} | {e['peak_mib']:,.0f} | {f['peak_mib']:,.0f} | "
              f"{e['peak_mib'] / f['peak_mib']:.2f} | {e['step_s']:.2f} | {f['step_s']:.2f} |")
    fit = None
    if len(depth) >= 2:
        a, b, worst = fit_line([r["depth"] for r in depth], [r["efficient"]["peak_mib"] for r in depth])
        fit = dict(intercept_mib=a, mib_per_depth=b, worst_relative_residual=worst)
        print(f"\nleast-squares line (efficient): {a:.1f} MiB + {b:.2f} MiB x L, worst relative "
              f"residual {100 * worst:.1f}%")
    if args.plot:
        plot(depth, args.depth_batch, args.depth_size, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, args=vars(args), densenet121=d121, paired=paired,
                           memory_vs_depth=dict(rows=depth, fit=fit)), f, indent=1)


if __name__ == "__main__":
    main()
