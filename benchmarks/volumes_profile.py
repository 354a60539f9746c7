"""Where a training step of DenseNet-121 3-D spends its time: ours against MONAI's, by kind of
work, from PyTorch's profiler.

    .venv/bin/python benchmarks/volumes_profile.py --size 64 --steps 3   # the RESULTS table
    .venv/bin/python benchmarks/volumes_profile.py --size 32 --steps 1 --threads 1   # smoke run

Both models are built as ``benchmarks/volumes_vs_monai.py`` builds them (1 input channel, 2
classes, batch 2, SGD with momentum), held in one process and warmed up; they alternate
``--steps`` unprofiled training steps, then each runs ``--steps`` more under
``torch.profiler`` (CPU activity, input shapes recorded).
Every operator's self CPU time falls into one row:

* the 3x3x3 convolutions of the dense layers, forward (``aten::mkldnn_convolution``) and
  backward (``aten::convolution_backward``), one row per block input size (on one thread
  PyTorch runs 1x1 convolutions natively, ``aten::_slow_conv2d_*``: counted alike);
* the 1x1 convolutions (bottlenecks and transitions), forward and backward; ours computes their
  input gradients as ``aten::mm``, which counts here;
* the stem's 7x7x7 convolution, forward and backward;
* our fused element-wise kernels (``densenet::fused_*``); MONAI's BN and ReLU (``aten::
  native_batch_norm*``, ``threshold_backward``, ``relu``, ``clamp_min``); concatenation and
  gradient sums (``aten::cat``, ``aten::add``); pooling;
* everything else: the optimizer's arithmetic, small per-channel tensor operations, copies,
  allocation, the autograd engine.

The profiler adds a few microseconds to every operator, so a model that makes more of them
(ours: the per-layer statistics and views of the shared buffer) reads slower under it than it
runs; the unprofiled step time, the median of ``--steps`` steps alternating with the other
model's just before profiling, is printed beside it.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

_spec = importlib.util.spec_from_file_location(
    "volumes_vs_monai", Path(__file__).resolve().parent / "volumes_vs_monai.py")
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)

ELEMENTWISE_ATEN = {"aten::native_batch_norm", "aten::native_batch_norm_backward",
                    "aten::threshold_backward", "aten::relu", "aten::relu_", "aten::clamp_min",
                    "aten::clamp_min_"}
JOIN = {"aten::cat", "aten::add"}
# the convolution kernels' operators (input, weight, ... / grad, input, weight, ...): oneDNN's,
# and the native ones PyTorch picks for 1x1 convolutions on one thread
CONV_FORWARD = {"aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::slow_conv3d_forward"}
CONV_BACKWARD = {"aten::convolution_backward", "aten::_slow_conv2d_backward",
                 "aten::slow_conv3d_backward"}


def category(name: str, shapes) -> str:
    """The row an operator's self time counts in (``shapes``: the profiler's input shapes)."""
    if name in CONV_FORWARD or name in CONV_BACKWARD:
        forward = name in CONV_FORWARD
        weight, x = (shapes[1], shapes[0]) if forward else (shapes[2], shapes[1])
        way = "forward" if forward else "backward"
        kernel = weight[2:] if len(weight) > 2 else []
        if kernel and all(s == 1 for s in kernel):
            return f"1x1 convolutions, {way}"
        if len(kernel) == 3 and kernel[0] == 3:
            return f"3x3x3 convolutions at {x[2]}^3, {way}"
        return f"stem convolution, {way}"
    if name == "aten::mm":
        return "1x1 convolutions, backward"
    if name.startswith("densenet::fused_"):
        return "fused element-wise kernels (ours)"
    if name in ELEMENTWISE_ATEN:
        return "BN and ReLU (ATen)"
    if name in JOIN:
        return "concatenation, gradient sums (ATen)"
    if "pool" in name:
        return "pooling (ATen)"
    return "everything else"


def profile_both(size: int, batch: int, steps: int, threads: int) -> dict:
    """Both DenseNet-121s in this process: unprofiled step times (alternating), then each one's
    profile by row (``category``): milliseconds a step, operators a step."""
    runs = vs.both_steps(size, batch, threads)  # built and warmed up
    times = {label: [] for label in runs}
    for _ in range(steps):
        for label, step in runs.items():
            t = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - t)
    out = {}
    for label, step in runs.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
        rows = collections.Counter()
        count = 0
        for e in prof.key_averages(group_by_input_shape=True):
            rows[category(e.key, e.input_shapes)] += e.self_cpu_time_total / 1e3 / steps
            count += e.count
        out[label] = dict(step_s=statistics.median(times[label]), rows=dict(rows),
                          profiled_ms=sum(rows.values()), ops=count // steps)
    return dict(size=size, batch=batch, steps=steps, threads=torch.get_num_threads(), runs=out)


def _order(name: str):
    size = name.split(" at ")[1].split("^")[0] if " at " in name else ""
    group = (0 if name.startswith("3x3x3") else 1 if name.startswith("1x1") else
             2 if name.startswith("stem") else 4 if name == "everything else" else 3)
    return group, -int(size) if size else 0, name


def table(r: dict) -> str:
    ours, monai = r["runs"]["ours"], r["runs"]["MONAI"]
    names = sorted(set(ours["rows"]) | set(monai["rows"]), key=_order)
    lines = [f"DenseNet-121 3-D, 1 channel, batch {r['batch']}, {r['size']}^3, {r['threads']} threads: "
             f"self CPU time a step by kind of work (torch.profiler, {r['steps']} steps each)", "",
             "| work | ours ms | MONAI ms | ours - MONAI ms |", "|---|---|---|---|"]
    for n in names:
        a, b = ours["rows"].get(n, 0.0), monai["rows"].get(n, 0.0)
        lines.append(f"| {n} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    lines.append(f"| all, profiled | {ours['profiled_ms']:.1f} | {monai['profiled_ms']:.1f} | "
                 f"{ours['profiled_ms'] - monai['profiled_ms']:+.1f} |")
    lines.append(f"| operators a step | {ours['ops']} | {monai['ops']} | {ours['ops'] - monai['ops']:+d} |")
    lines.append(f"| step, not profiled (median, alternating) | {ours['step_s'] * 1e3:.1f} | "
                 f"{monai['step_s'] * 1e3:.1f} | {(ours['step_s'] - monai['step_s']) * 1e3:+.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64, help="volume side (default 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed and profiled steps of each model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="write the environment and the rows here")
    a = p.parse_args(argv)
    if a.size < 32 or a.steps < 1 or a.batch < 1 or a.threads < 1:
        sys.exit("volumes_profile.py: --size must be at least 32 (DenseNet-121 halves it five "
                 "times) and --steps, --batch, --threads at least 1")
    r = profile_both(a.size, a.batch, a.steps, a.threads)
    env = vs.environment(r["threads"])
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, monai {env['monai']}, "
          f"code {env['commit']}\n")
    print(table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(environment=env, **r), indent=1))


if __name__ == "__main__":
    main()
