"""``densenet bench``: our DenseNet against torchvision's, same architecture and same weights.

Every measurement runs in a fresh subprocess (so one configuration's allocator state and peak
cannot leak into another), and the runs are interleaved A B A B so that noise from other jobs on
the machine hits both sides. Reported per variant: training images/s (SGD step, median of the
timed steps), inference images/s (eval, no_grad) and peak training memory.

Peak memory is torch's own CPU-allocator accounting: the highest live-bytes total reached during
one training step (forward, backward, optimizer step), from the allocation events of
``torch.profiler`` with ``profile_memory=True``; parameters and data already alive before the
step are not counted. Our efficient path keeps its large buffers in a pool between steps
(``densenet.ops.buffers``); the pool is emptied before that step, so every buffer it keeps counts
from its allocation in the step on, idle or in use. The process RSS peak (``ru_maxrss``, which includes the allocator's
overhead) is printed beside it. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the step.
"""

from __future__ import annotations

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

from . import ops
from .errors import UsageError
from .model import create_model, model_info

# Configurations: (model, batch for training, batch for inference, image size)
CONFIGS = {
    "densenet_bc100_k12": (64, 256, 32),
    "densenet121": (16, 16, 224),
}
DEPTHS = (100, 190, 250, 400)


# ----------------------------------------------------------------------------- models

def build(model_name: str, variant: str, device: str = "cpu") -> nn.Module:
    """``ours`` (efficient path), ``ours-ref``, ``tv`` (torchvision, plain) or ``tv-me``
    (torchvision, memory_efficient=True); all with the weights of ``create_model(name)`` under
    seed 0, so every variant computes the same function."""
    torch.manual_seed(0)
    ours = create_model(model_name)
    if variant in ("ours", "ours-ref"):
        return ours.set_implementation("efficient" if variant == "ours" else "reference").to(device)
    import torchvision
    tv = torchvision.models.DenseNet(
        growth_rate=ours.growth_rate, block_config=ours.block_config,
        num_init_features=ours.features.conv0.out_channels, bn_size=4, drop_rate=0,
        num_classes=ours.classifier.out_features, memory_efficient=variant == "tv-me")
    if ours.stem == "cifar":  # torchvision's class in the CIFAR shape: 3x3 stem, no pooling
        tv.features.conv0 = nn.Conv2d(3, tv.features.conv0.out_channels, 3, padding=1, bias=False)
        tv.features.norm0 = tv.features.relu0 = tv.features.pool0 = nn.Identity()
    tv.load_state_dict(ours.state_dict(), strict=True)
    return tv.to(device)


def _peak_step_bytes(step) -> int:
    """Highest live bytes during ``step()`` by the CPU allocator's own events (profiler)."""
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def measure(model_name: str, variant: str, mode: str, batch: int, size: int, layout: str,
            steps: int, warmup: int, device: str = "cpu", memory: bool = True,
            amp: str | None = None, compile: bool = False) -> dict:
    """One configuration in this process: ``mode`` "train" or "infer"; ``amp`` "bf16" runs the
    steps under bfloat16 autocast, ``compile`` through ``torch.compile`` (compiled in the first
    warm-up step, whose time is reported as ``first_step_s``)."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(model_name, variant, device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    call = torch.compile(model) if compile else model
    dev_type = torch.device(device).type
    if amp not in (None, "bf16"):
        raise UsageError(f"amp must be None or 'bf16', got {amp!r}.")
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, model.classifier.out_features, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            if mode == "train":
                model.train()
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(call(x).float(), y).backward()
                opt.step()
            else:
                model.eval()
                with torch.no_grad():
                    call(x)

    times, faults, first = [], 0, None
    for i in range(warmup + steps):
        sync()
        if i == warmup:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        step()
        sync()
        if i == 0:
            first = time.perf_counter() - t
        if i >= warmup:
            times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    result = dict(model=model_name, variant=variant, mode=mode, batch=batch, size=size,
                  layout=layout, amp=amp, compile=compile, times=[round(t, 4) for t in times],
                  images_per_s=batch / statistics.median(times), first_step_s=round(first, 3),
                  page_faults_per_step=faults / max(steps, 1))
    if memory and mode == "train":
        if device.startswith("cuda"):
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            # our buffer pool (densenet.ops.buffers) emptied first, so the buffers it keeps count
            # from their allocation in this step on, as live memory, idle or not
            ops.release_buffers()
            result["peak_mib"] = _peak_step_bytes(step) / 2**20
    result["rss_peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return result


def _in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, "-c", "import json, sys; from densenet.bench import measure; "
           "print('RESULT ' + json.dumps(measure(**json.loads(sys.argv[1]))))", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark subprocess failed for {spec}:\n{proc.stderr[-2000:]}")


# ----------------------------------------------------------------------------- runs

def _variants(mode: str):
    """(label, variant, layout): each side in its layouts, the best one is picked."""
    if mode == "train":
        return [("ours", "ours", "channels_last"), ("tv", "tv", "contiguous"),
                ("tv-cl", "tv", "channels_last"), ("tv-me", "tv-me", "channels_last")]
    return [("ours", "ours", "channels_last"), ("tv", "tv", "contiguous"),
            ("tv-cl", "tv", "channels_last")]


def compare(model_name: str, train_batch: int, infer_batch: int, size: int, steps: int,
            warmup: int, repeats: int, device: str, log=print) -> dict:
    rows = {}
    for mode, batch in (("train", train_batch), ("infer", infer_batch)):
        for rep in range(repeats):  # A B C A B C: interleaved
            for label, variant, layout in _variants(mode):
                r = _in_subprocess(dict(model_name=model_name, variant=variant, mode=mode, batch=batch,
                                        size=size, layout=layout, steps=steps, warmup=warmup,
                                        device=device))
                rows.setdefault((mode, label), []).append(r)
                log(f"  {model_name} {mode} b{batch} {label:6s} rep {rep + 1}: "
                    f"{r['images_per_s']:.2f} img/s" +
                    (f", peak {r['peak_mib']:.0f} MiB (allocator), RSS peak +{r['rss_peak_mib']:.0f} MiB"
                     if "peak_mib" in r else ""))
    summary = {}
    for (mode, label), rs in rows.items():
        summary[f"{mode}:{label}"] = dict(
            images_per_s=statistics.median(r["images_per_s"] for r in rs),
            peak_mib=statistics.median(r["peak_mib"] for r in rs) if "peak_mib" in rs[0] else None,
            rss_peak_mib=statistics.median(r["rss_peak_mib"] for r in rs),
            page_faults_per_step=statistics.median(r["page_faults_per_step"] for r in rs),
            runs=[r["images_per_s"] for r in rs])
    s = summary
    tv_best_train = max(s["train:tv"]["images_per_s"], s["train:tv-cl"]["images_per_s"])
    tv_plain_peak = min(s["train:tv"]["peak_mib"], s["train:tv-cl"]["peak_mib"])
    tv_best_infer = max(s["infer:tv"]["images_per_s"], s["infer:tv-cl"]["images_per_s"])
    ratios = dict(
        train_speed_vs_tv_best=s["train:ours"]["images_per_s"] / tv_best_train,
        train_speed_vs_tv_memory_efficient=s["train:ours"]["images_per_s"] / s["train:tv-me"]["images_per_s"],
        peak_vs_tv_plain=s["train:ours"]["peak_mib"] / tv_plain_peak,
        peak_vs_tv_memory_efficient=s["train:ours"]["peak_mib"] / s["train:tv-me"]["peak_mib"],
        infer_speed_vs_tv_best=s["infer:ours"]["images_per_s"] / tv_best_infer,
    )
    return dict(model=model_name, train_batch=train_batch, infer_batch=infer_batch, size=size,
                summary=summary, ratios=ratios)


def memory_vs_depth(depths, batch: int, steps: int, device: str, variants=("ours",), log=print) -> list:
    """Peak training memory per depth and variant; a configuration that runs out of memory (the
    reference's quadratic memory at large depths) is a row with ``oom`` set, not an error."""
    rows = []
    for depth in depths:
        for variant in variants:
            try:
                r = _in_subprocess(dict(model_name=f"densenet_bc{depth}_k12", variant=variant,
                                        mode="train", batch=batch, size=32, layout="channels_last",
                                        steps=steps, warmup=1, device=device))
            except RuntimeError as e:
                if not any(s in str(e).lower() for s in ("out of memory", "not enough memory")):
                    raise
                log(f"  L={depth} {variant}: out of memory")
                rows.append(dict(depth=depth, variant=variant, oom=True))
                continue
            log(f"  L={depth} {variant}: peak {r['peak_mib']:.0f} MiB (allocator), "
                f"{r['images_per_s']:.2f} img/s")
            rows.append(dict(depth=depth, variant=variant, peak_mib=r["peak_mib"],
                             rss_peak_mib=r["rss_peak_mib"], images_per_s=r["images_per_s"]))
    return rows


MODES = (("eager", None, False), ("bf16", "bf16", False), ("compile", None, True))


def compare_modes(model_name: str, batch: int, size: int, steps: int, warmup: int, repeats: int,
                  device: str, log=print, modes=None) -> dict:
    """Our efficient path against our reference path in each way users train: eager float32,
    bf16 autocast and ``torch.compile`` (float32), interleaved; training images/s and peak
    memory, and per mode the efficient/reference ratios. ``modes`` picks some of them by name
    (default: all)."""
    chosen = [m for m in MODES if modes is None or m[0] in modes]
    rows = {}
    for rep in range(repeats):
        for mode, amp, comp in chosen:
            for variant in ("ours", "ours-ref"):
                r = _in_subprocess(dict(model_name=model_name, variant=variant, mode="train", batch=batch,
                                        size=size, layout="channels_last", steps=steps,
                                        warmup=max(warmup, 2 if comp else 0), device=device, amp=amp,
                                        compile=comp))
                rows.setdefault((mode, variant), []).append(r)
                log(f"  {model_name} train b{batch} {mode:7s} {variant:8s} rep {rep + 1}: "
                    f"{r['images_per_s']:.2f} img/s, peak {r['peak_mib']:.0f} MiB (allocator), "
                    f"RSS peak +{r['rss_peak_mib']:.0f} MiB, first step {r['first_step_s']:.1f} s")
    summary = {f"{mode}:{variant}": dict(
        images_per_s=statistics.median(r["images_per_s"] for r in rs),
        peak_mib=statistics.median(r["peak_mib"] for r in rs),
        rss_peak_mib=statistics.median(r["rss_peak_mib"] for r in rs),
        first_step_s=statistics.median(r["first_step_s"] for r in rs),
        runs=[r["images_per_s"] for r in rs]) for (mode, variant), rs in rows.items()}
    ratios = {}
    for mode, _, _ in chosen:
        ours, ref = summary[f"{mode}:ours"], summary[f"{mode}:ours-ref"]
        ratios[f"{mode}_peak_vs_reference"] = ours["peak_mib"] / ref["peak_mib"]
        ratios[f"{mode}_speed_vs_reference"] = ours["images_per_s"] / ref["images_per_s"]
    if "compile:ours" in summary and "eager:ours" in summary:
        ratios["compile_speed_vs_eager"] = (summary["compile:ours"]["images_per_s"]
                                            / summary["eager:ours"]["images_per_s"])
    return dict(model=model_name, batch=batch, size=size, summary=summary, ratios=ratios)


def fit_line(xs, ys):
    """Least squares y = a + b x and the largest relative residual."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
    return a, b, worst


def plot_memory(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant in sorted({r["variant"] for r in rows}):
        pts = [(r["depth"], r["peak_mib"]) for r in rows if r["variant"] == variant and "peak_mib" in r]
        ax.plot(*zip(*pts), "o-", label={"ours": "efficient (default)", "ours-ref": "reference"}.get(variant, variant))
    ax.set_xlabel("depth L (DenseNet-BC, k=12)")
    ax.set_ylabel("peak training memory (MiB)")
    ax.set_title("batch 64, 32x32, CPU allocator accounting")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment(device: str) -> dict:
    return dict(torch=torch.__version__, torchvision=__import__("torchvision").__version__,
                python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), threads=torch.get_num_threads(), device=device,
                gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None)


# ----------------------------------------------------------------------------- command

def run_bench(model: str | None = None, batch_size: int | None = None,
              infer_batch_size: int | None = None, steps: int = 5, warmup: int = 3,
              repeats: int = 2, device: str = "auto", depths=DEPTHS, depth_reference: bool = False,
              depth_only: bool = False, plot: str | None = None, modes=False,
              size: int | None = None, log=print) -> dict:
    """The whole benchmark: each model against torchvision (``compare``), then peak memory
    against depth (``memory_vs_depth``, for the ``depths`` given) with a linear fit and an
    optional plot. With ``modes`` (True, or some of "eager", "bf16", "compile"), instead: our
    efficient against our reference path in those modes (``compare_modes``;
    densenet_bc100_k12 unless ``model`` is given). ``size`` replaces the models' image size.
    Returns the report (``format_report`` prints it); ``log`` gets progress."""
    if steps < 1 or warmup < 0 or repeats < 1:
        raise UsageError("--steps and --repeats must be at least 1, --warmup at least 0.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    if model is not None:
        info = model_info(model)  # raises a UsageError naming the known models
        tb, ib, _ = CONFIGS.get(model, (64, 256, info.input_size))
        configs = {model: (batch_size or tb, infer_batch_size or ib, size or info.input_size)}
    else:
        configs = {m: (batch_size or tb, infer_batch_size or ib, size or s) for m, (tb, ib, s) in CONFIGS.items()}
    env = environment(device)
    log(f"densenet bench: torch {env['torch']}, torchvision {env['torchvision']}, {env['cpu_count']} CPUs, "
        f"{env['threads']} threads, device {device}; {warmup} warm-up + {steps} timed steps, "
        f"{repeats} interleaved repeats")
    report = dict(environment=env, results=[])
    if modes:
        name = model or "densenet_bc100_k12"
        tb, _, size = configs.get(name, CONFIGS["densenet_bc100_k12"])
        report["modes"] = compare_modes(name, tb, size, steps, warmup, repeats, device, log,
                                        None if modes is True else modes)
        return report
    if not depth_only:
        for name, (tb, ib, size) in configs.items():
            report["results"].append(compare(name, tb, ib, size, steps, warmup, repeats, device, log))
    if depths:
        rows = memory_vs_depth(list(depths), 64, 1, device,
                               ("ours", "ours-ref") if depth_reference else ("ours",), log)
        ours = [r for r in rows if r["variant"] == "ours" and "peak_mib" in r]
        fit = None
        if len({r["depth"] for r in ours}) >= 2:  # a line needs two depths
            a, b, worst = fit_line([r["depth"] for r in ours], [r["peak_mib"] for r in ours])
            fit = dict(intercept_mib=a, mib_per_depth=b, worst_relative_residual=worst)
        report["memory_vs_depth"] = dict(rows=rows, fit=fit)
        if plot:
            plot_memory(rows, plot)
    return report


def format_report(report) -> str:
    lines = []
    for res in report["results"]:
        lines.append(f"\n{res['model']}: training batch {res['train_batch']}, inference batch "
                     f"{res['infer_batch']}, {res['size']}x{res['size']}")
        lines.append("| variant | train img/s (runs) | peak train MiB (allocator) | RSS peak MiB | "
                     "page faults per train step | infer img/s (runs) |")
        lines.append("|---|---|---|---|---|---|")
        s = res["summary"]

        def runs(r):
            return f"{r['images_per_s']:.2f} ({', '.join(f'{v:.2f}' for v in r['runs'])})"
        for label in ("ours", "tv", "tv-cl", "tv-me"):
            tr, inf = s.get(f"train:{label}"), s.get(f"infer:{label}")
            lines.append(f"| {label} | {runs(tr)} | {tr['peak_mib']:.0f} | {tr['rss_peak_mib']:.0f} | "
                         f"{tr['page_faults_per_step']:,.0f} | " + (f"{runs(inf)} |" if inf else "- |"))
        lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    if "modes" in report:
        res = report["modes"]
        lines.append(f"\n{res['model']}: training batch {res['batch']}, {res['size']}x{res['size']}, "
                     f"efficient (ours) against reference (ours-ref) in each mode")
        lines.append("| mode | path | train img/s (runs) | peak train MiB (allocator) | RSS peak MiB | "
                     "first step s |")
        lines.append("|---|---|---|---|---|---|")
        for key, r in res["summary"].items():
            mode, variant = key.split(":")
            lines.append(f"| {mode} | {variant} | {r['images_per_s']:.2f} "
                         f"({', '.join(f'{v:.2f}' for v in r['runs'])}) | {r['peak_mib']:.0f} | "
                         f"{r['rss_peak_mib']:.0f} | {r['first_step_s']:.1f} |")
        lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    if "memory_vs_depth" in report:
        m = report["memory_vs_depth"]
        lines.append("\nPeak training memory against depth (DenseNet-BC k=12, batch 64):")
        for r in m["rows"]:
            lines.append(f"  L={r['depth']} {r['variant']}: out of memory" if r.get("oom") else
                         f"  L={r['depth']} {r['variant']}: {r['peak_mib']:.0f} MiB, {r['images_per_s']:.2f} img/s")
        f = m["fit"]
        if f is not None:
            lines.append(f"  linear fit (efficient): {f['intercept_mib']:.0f} MiB + {f['mib_per_depth']:.2f} MiB x L, "
                         f"worst relative residual {f['worst_relative_residual']:.3f}")
    return "\n".join(lines)
