"""One prepared check for a lent GPU: correctness, speed, memory and a short real training run.

    python benchmarks/gpu_check.py --device cuda --out gpu.json    # the H200 run (< 10 min)
    python benchmarks/gpu_check.py --device cpu --quick             # the same code on a CPU (CI)

Sections (``--only`` picks some, comma-separated):

1. ``correctness``: a small DenseNet-BC, efficient path against the reference path, one training
   step from the same weights and the same seed (so dropout masks match): output, input gradient,
   every parameter gradient and the BN running statistics, in float32 (TF32 off) and under bf16
   autocast, with and without dropout; and ``torch.compile`` of the efficient model against the
   eager reference. Every row is PASS or FAIL.
2. ``speed``: DenseNet-BC-100 (k=12) training step, SGD (momentum 0.9, nesterov, wd 1e-4):
   torchvision eager, ours eager, ours ``torch.compile`` (default; on CUDA also reduce-overhead),
   ours with the whole step in one CUDA graph (``densenet.steps.GraphedStep``, what
   ``densenet train --cuda-graph`` runs; uncaptured on a CPU); median ms/step, img/s, peak memory.
3. ``depth``: peak training memory of DenseNet-BC k=12 against depth L, ours and torchvision.
4. ``densenet121``: ImageNet shape training step, ours against torchvision.
5. ``train``: a timed C10+ run on the packaged real CIFAR-10 images (densenet/assets), data kept
   on the device as uint8 and augmented a batch at a time there; test accuracy on the sample's
   held-out images. Then ``densenet train`` itself (quickstart recipe on the same sample), eager
   and, on CUDA, with ``--cuda-graph``, its epoch losses compared with the eager run's.

Progress goes to stderr; one markdown table (| section | row | value | status | notes |) is
printed at the end, and written with the numbers as JSON to ``--out``. Any FAIL or ERROR row
makes the exit status 1 (after the table); ``--device cuda`` where PyTorch sees no GPU exits 2.
The compile rows run last (they are the slow, unpredictable part); on CUDA a row not started by
``--deadline-s`` (default 540 s) is reported SKIP so the run stays inside its device time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

# the densenet package next to this script (the working tree it travels with), installed or not
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = {
    "correctness": "1. correctness",
    "speed": "2. speed",
    "depth": "3. memory vs depth",
    "densenet121": "4. densenet121",
    "train": "5. C10+ training",
}

# float32 rows: normwise relative difference (max |a - b| / max |b|) per tensor
TOL_FP32 = 1e-4
# With dropout, float32 gradients are compared normwise over all of them: a ReLU whose input
# lies within float32 rounding of zero (a few 1e-7) takes either side in any two float32
# computations, and one such element moves one BN bias gradient by up to ~3% of its largest
# entry (measured on the CPU: the plain modules against a float64 step, 2.7e-2 for one seed;
# the efficient path likewise for others). The float64 rows then check that the two paths
# compute the same function, to rounding.
TOL_FP32_NORMWISE = 5e-3
TOL_FP64 = 1e-9
TOL_BF16 = 3e-2        # output and loss under bf16 autocast
TOL_BF16_STATS = 3e-3  # BN running statistics under bf16 autocast
# gradients under bf16: a random net's gradients at initialisation differ from float32 by 5-40%
# on either path, so ours must be as close to the float32 gradients as the reference's bf16 are
# (global normwise error at most BF16_GRAD_RATIO x the reference's + BF16_GRAD_SLACK)
BF16_GRAD_RATIO, BF16_GRAD_SLACK = 1.5, 0.02
TOL_GRAPH_LOSS = 1e-2  # CUDA-graph replayed step's loss against the same step eager
# epoch-mean training losses of a --cuda-graph run against the eager run: the captured SGD
# update rounds once more (1 ulp a step) and cuDNN's backward is not bitwise deterministic, so
# the runs drift apart slowly (on the CPU, 1e-3 after three epochs of a tiny net)
TOL_TRAIN_LOSS = 2e-2


def plan(quick: bool, cuda: bool) -> dict:
    """Sizes of every section: the full check (CUDA, or a slow CPU run) or ``--quick``."""
    if quick:
        return dict(
            corr_model="densenet_bc28_k12", corr_batch=8 if not cuda else 32,
            corr_compile_model="densenet_bc16_k12",
            speed_model="densenet_bc100_k12", speed_batch=16, warmup=2, steps=3,
            compile_model="densenet_bc40_k12", compile_warmup=2, compile_steps=3,
            depths=(40, 64), depth_batch=8, depth_variants=("ours", "tv") if cuda else ("ours",),
            d121_batch=2, d121_size=64, d121_warmup=1, d121_steps=1,
            train_model="densenet_bc28_k12", epochs=1, train_subset=512, train_batch=64)
    return dict(
        corr_model="densenet_bc28_k12", corr_batch=32, corr_compile_model="densenet_bc28_k12",
        speed_model="densenet_bc100_k12", speed_batch=64, warmup=10, steps=30,
        compile_model="densenet_bc100_k12", compile_warmup=5, compile_steps=30,
        depths=(100, 250, 500, 1000) if cuda else (100, 250), depth_batch=64,
        depth_variants=("ours", "tv"),
        d121_batch=64, d121_size=224, d121_warmup=3, d121_steps=10,
        train_model="densenet_bc100_k12", epochs=3, train_subset=None, train_batch=64)


# ----------------------------------------------------------------------------- helpers

class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.section_s: dict[str, float] = {}

    def add(self, section, row, value, status="", notes="", **data):
        r = dict(section=section, row=row, value=value, status=status, notes=notes, data=data)
        self.rows.append(r)
        mark = f" [{status}]" if status else ""
        log(f"  {SECTIONS[section]} | {row} | {value}{mark} {notes}")
        return r

    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] in ("FAIL", "ERROR")]

    def markdown(self) -> str:
        lines = ["| section | row | value | status | notes |", "|---|---|---|---|---|"]
        for key in SECTIONS:  # in section order, whatever order the rows ran in
            for r in self.rows:
                if r["section"] == key:
                    cells = [SECTIONS[key], r["row"], r["value"], r["status"], r["notes"]]
                    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        return "\n".join(lines)


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ").strip()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _error_text(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or "(no message)"
    return f"ERROR: {type(e).__name__}: {msg[:300]}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Env:
    """The device and the bits every section needs from it."""

    def __init__(self, device: str):
        import torch
        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def clean(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
        else:
            with contextlib.suppress(Exception):
                from densenet import kernels
                kernels.release_buffers()

    def start_peak(self):
        """Begin a row's whole-row CUDA peak (params, grads, optimizer state and activations)."""
        self.clean()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def row_peak_mib(self):
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) / 2**20
        return None

    def step_peak_mib(self, step):
        """Memory one more ``step()`` adds at its peak: CUDA max_memory_allocated over what is
        allocated before it; on the CPU densenet.bench's allocator accounting (the profiler's
        allocation events) with the efficient path's buffer pool emptied first, else None."""
        torch = self.torch
        if self.cuda:
            self.sync()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            step()
            self.sync()
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        try:
            from densenet.bench import _peak_step_bytes
        except ImportError:
            return None
        with contextlib.suppress(Exception):
            from densenet import kernels
            kernels.release_buffers()
        return _peak_step_bytes(step) / 2**20

    def time_steps(self, step, warmup: int, steps: int):
        """Seconds of each timed step (synchronised around each), and of the first call."""
        times, first = [], None
        for i in range(warmup + steps):
            self.sync()
            t = time.perf_counter()
            step()
            self.sync()
            dt = time.perf_counter() - t
            if i == 0:
                first = dt
            if i >= warmup:
                times.append(dt)
        return times, first


def _sgd(model, lr=0.1):
    import torch
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _batch(env, model, batch, size, seed=1):
    torch = env.torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(env.device)
    classes = model.classifier.out_features
    y = torch.randint(0, classes, (batch,), generator=g).to(env.device)
    return x, y


def _train_step(model, opt, x, y, before=None):
    import torch.nn.functional as F
    losses = []

    def step():
        if before is not None:
            before()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return step, losses


@contextlib.contextmanager
def _full_fp32(torch):
    """No TF32 anywhere (cuDNN convolutions use it by default): the float32 rows compare float32."""
    cudnn_conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if cudnn_conv is not None and matmul is not None:  # torch >= 2.9 API
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision = cudnn_conv
            torch.backends.cuda.matmul.fp32_precision = matmul
    else:
        old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _tf32_state(torch) -> str:
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    mm = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if conv is not None and mm is not None:
        return f"cudnn conv fp32_precision={conv}, matmul fp32_precision={mm}"
    return (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")


# ----------------------------------------------------------------------------- 1. correctness

def _one_step(env, module, call, x, y, seed, amp):
    """Forward + backward of ``call`` (the module, or its compiled form) at a fixed seed."""
    torch = env.torch
    import torch.nn.functional as F
    module.train()
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # CPU and every CUDA device: the same dropout masks on both sides
    ctx = torch.autocast(env.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        out = call(xi)
        loss = F.cross_entropy(out, y)
    loss.backward()
    grads = {n: (p.grad.detach().double().clone() if p.grad is not None else None)
             for n, p in module.named_parameters()}
    stats = {n: b.detach().double().clone() for n, b in module.named_buffers()
             if n.endswith(("running_mean", "running_var"))}
    return dict(out=out.detach().double(), loss=loss.detach().double().reshape(1),
                xgrad=xi.grad.detach().double(), grads=grads, stats=stats)


def _diff(a, b):
    """(max abs difference, normwise relative difference max|a-b| / max|b|)."""
    if a is None or b is None:
        return (math.inf, math.inf) if (a is None) != (b is None) else (0.0, 0.0)
    if a.shape != b.shape:
        return math.inf, math.inf
    d = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    if not math.isfinite(d):
        return math.inf, math.inf
    return d, d / scale if scale > 0 else (0.0 if d == 0 else math.inf)


def _worst(da: dict, db: dict):
    """Worst tensor of two name -> tensor dicts: (abs, rel, name)."""
    if set(da) != set(db):
        return math.inf, math.inf, "names differ: " + ", ".join(sorted(set(da) ^ set(db)))[:120]
    worst = (0.0, 0.0, "-")
    for name in da:
        d, r = _diff(da[name], db[name])
        if r > worst[1] or (r == worst[1] and d > worst[0]):
            worst = (d, r, name)
    return worst


def _compare_rows(rep, label, test, ref, tol, tol_stats, notes="", normwise_grads=None):
    checks = [("output + loss", *max(_diff(test["out"], ref["out"]), _diff(test["loss"], ref["loss"]),
                                     key=lambda t: t[1]), "", tol)]
    if normwise_grads is None:
        checks += [("input gradient", *_diff(test["xgrad"], ref["xgrad"]), "", tol),
                   ("parameter gradients", *_worst(test["grads"], ref["grads"]), tol)]
    checks.append(("BN running stats", *_worst(test["stats"], ref["stats"]), tol_stats))
    for what, d, r, name, t in checks:
        ok = math.isfinite(r) and r <= t
        where = f"; worst {name}" if name else ""
        rep.add("correctness", f"{label}: {what}", f"max abs {d:.2e}, rel {r:.2e}",
                "PASS" if ok else "FAIL", f"tol {t:g} rel{where}{notes}",
                max_abs=d, max_rel=r, tol=t, worst=name or None)
    if normwise_grads is not None:
        e = _global_error(test, ref)
        rep.add("correctness", f"{label}: gradients (normwise)", f"rel {e:.2e}",
                "PASS" if math.isfinite(e) and e <= normwise_grads else "FAIL",
                f"tol {normwise_grads:g}: norm(ours - reference) / norm(reference) over the input and "
                f"parameter gradients (ReLU inputs within rounding of zero; float64 row below)",
                max_rel=e, tol=normwise_grads)


def _global_error(test: dict, truth: dict) -> float:
    """||test - truth|| / ||truth|| over the input gradient and every parameter gradient."""
    import torch
    names = sorted(n for n in truth["grads"] if truth["grads"][n] is not None)
    t = torch.cat([test["xgrad"].flatten()] + [test["grads"][n].flatten() for n in names]).double()
    r = torch.cat([truth["xgrad"].flatten()] + [truth["grads"][n].flatten() for n in names]).double()
    return ((t - r).norm() / r.norm()).item()


def _bf16_rows(rep, label, test, ref, fp32):
    """Under bf16: output, loss and running statistics against the reference's bf16 step; the
    gradients against the float32 step, as close as the reference's bf16 gradients are."""
    checks = [("output + loss", *max(_diff(test["out"], ref["out"]), _diff(test["loss"], ref["loss"]),
                                     key=lambda t: t[1]), "", TOL_BF16),
              ("BN running stats", *_worst(test["stats"], ref["stats"]), TOL_BF16_STATS)]
    for what, d, r, name, t in checks:
        ok = math.isfinite(r) and r <= t
        where = f"; worst {name}" if name else ""
        rep.add("correctness", f"{label}: {what}", f"max abs {d:.2e}, rel {r:.2e}",
                "PASS" if ok else "FAIL", f"tol {t:g} rel{where}", max_abs=d, max_rel=r, tol=t)
    ours, theirs = _global_error(test, fp32), _global_error(ref, fp32)
    limit = BF16_GRAD_RATIO * theirs + BF16_GRAD_SLACK
    rep.add("correctness", f"{label}: gradients vs float32", f"ours {ours:.3f}, reference {theirs:.3f}",
            "PASS" if math.isfinite(ours) and ours <= limit else "FAIL",
            f"global normwise error of input + parameter gradients against the float32 step; "
            f"limit {BF16_GRAD_RATIO:g} x reference + {BF16_GRAD_SLACK:g} = {limit:.3f}",
            ours=ours, reference=theirs, limit=limit)


def _pair(name, drop):
    from densenet import create_model
    import torch
    torch.manual_seed(0)
    ref = create_model(name, implementation="reference", drop_rate=drop, num_classes=10)
    eff = copy.deepcopy(ref).set_implementation("efficient")
    return eff, ref


def correctness_eager(env, rep, p):
    torch = env.torch
    name, batch = p["corr_model"], p["corr_batch"]
    for amp in (False, True):
        for drop in (0.0, 0.2):
            label = f"{name} b{batch} {'bf16 autocast' if amp else 'fp32'}, dropout {drop:g}"
            try:
                eff, ref = (m.to(env.device) for m in _pair(name, drop))
                x, y = _batch(env, ref, batch, 32)
                fp32 = copy.deepcopy(ref) if amp else None
                with (contextlib.nullcontext() if amp else _full_fp32(torch)):
                    a = _one_step(env, eff, eff, x, y, seed=1234, amp=amp)
                    b = _one_step(env, ref, ref, x, y, seed=1234, amp=amp)
                if amp:
                    with _full_fp32(torch):
                        c = _one_step(env, fp32, fp32, x, y, seed=1234, amp=False)
                    _bf16_rows(rep, label, a, b, c)
                elif drop == 0:
                    _compare_rows(rep, label, a, b, TOL_FP32, TOL_FP32)
                else:
                    _compare_rows(rep, label, a, b, TOL_FP32, TOL_FP32, normwise_grads=TOL_FP32_NORMWISE)
                    eff64, ref64 = (m.double().to(env.device) for m in _pair(name, drop))
                    a = _one_step(env, eff64, eff64, x.double(), y, seed=1234, amp=False)
                    b = _one_step(env, ref64, ref64, x.double(), y, seed=1234, amp=False)
                    _compare_rows(rep, label.replace("fp32", "fp64"), a, b, TOL_FP64, TOL_FP64)
                    eff64 = ref64 = None
            except Exception as e:
                _log_exc()
                rep.add("correctness", label, _error_text(e), "ERROR")
            finally:
                eff = ref = fp32 = None
                env.clean()


def correctness_compile(env, rep, p):
    torch = env.torch
    name, batch = p["corr_compile_model"], p["corr_batch"]
    label = f"{name} b{batch} fp32 torch.compile(efficient) vs eager reference"
    try:
        torch._dynamo.reset()
        eff, ref = (m.to(env.device) for m in _pair(name, 0.0))
        x, y = _batch(env, ref, batch, 32)
        with _full_fp32(torch):
            t = time.perf_counter()
            a = _one_step(env, eff, torch.compile(eff), x, y, seed=1234, amp=False)
            compile_s = time.perf_counter() - t
            b = _one_step(env, ref, ref, x, y, seed=1234, amp=False)
        _compare_rows(rep, label, a, b, TOL_FP32, TOL_FP32, notes=f"; compile + step {compile_s:.0f} s")
    except Exception as e:
        _log_exc()
        rep.add("correctness", label, _error_text(e), "ERROR")
    finally:
        eff = ref = None
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        env.clean()


# ----------------------------------------------------------------------------- 2. speed

def _speed_add(rep, env, label, model_name, batch, times, first, row_peak, step_peak, n_warm,
               extra="", status="", **data):
    med = statistics.median(times)
    ms, ips = med * 1e3, batch / med
    if env.cuda:
        mem = f"peak {row_peak:.0f} MiB (max_memory_allocated, whole row)"
    else:
        mem = (f"peak {step_peak:.0f} MiB (allocator, one step)" if step_peak is not None else
               "peak n/a") + f"; process RSS high-water {_rss_mib():.0f} MiB"
    notes = f"{model_name} b{batch}; {n_warm}+{len(times)} steps; {mem}; first step {first:.2f} s{extra}"
    return rep.add("speed", label, f"{ms:.1f} ms/step, {ips:.0f} img/s", status, notes,
                   model=model_name, batch=batch, ms=ms, img_s=ips, peak_mib=row_peak,
                   step_peak_mib=step_peak, first_step_s=first, times_s=[round(t, 5) for t in times],
                   **data)


def speed_eager(env, rep, p, label, model_name, variant):
    from densenet.bench import build
    try:
        env.start_peak()
        model = build(model_name, variant, str(env.device)).train()
        x, y = _batch(env, model, p["speed_batch"], 32)
        opt = _sgd(model)
        step, losses = _train_step(model, opt, x, y)
        times, first = env.time_steps(step, p["warmup"], p["steps"])
        row_peak = env.row_peak_mib()
        step_peak = None if env.cuda else env.step_peak_mib(step)
        loss = losses[-1].item()
        r = _speed_add(rep, env, label, model_name, p["speed_batch"], times, first, row_peak, step_peak,
                       p["warmup"], extra=f"; loss {loss:.3f}", loss=loss)
        return r["data"]["ms"]
    except Exception as e:
        _log_exc()
        rep.add("speed", label, _error_text(e), "ERROR")
    finally:
        model = opt = step = None
        env.clean()


def speed_graph(env, rep, p, label, model_name):
    """The whole training step (forward, backward, SGD) captured in one CUDA graph by the
    product's ``densenet.steps.GraphedStep`` (what ``densenet train --cuda-graph`` runs): three
    eager warm-up steps, then capture and replays on its static tensors; the loss of the first
    captured step checked against the same step of an eager twin. On a CPU the same static step
    runs uncaptured (``capture=False``), so the code path is exercised everywhere."""
    torch = env.torch
    import torch.nn.functional as F
    from densenet.bench import build
    from densenet.steps import GraphedStep
    warmup = 3
    try:
        # eager twin: warmup + 1 steps with torch's SGD; the loss of the last one
        twin = build(model_name, "ours", str(env.device)).train()
        x, y = _batch(env, twin, p["speed_batch"], 32)
        step, losses = _train_step(twin, _sgd(twin), x, y)
        for _ in range(warmup + 1):
            step()
        eager_loss = losses[-1].item()
        twin = step = losses = None
        env.start_peak()
        model = build(model_name, "ours", str(env.device)).train()
        graphed = GraphedStep(model, _sgd(model), env.device, p["speed_batch"], warmup=warmup,
                              capture=env.cuda)
        for _ in range(warmup):
            graphed(x, y)
        t = time.perf_counter()
        loss, _ = graphed(x, y)  # captured (on CUDA), then replayed for this batch
        env.sync()
        capture_s = time.perf_counter() - t
        first_loss = loss.item()
        rel = abs(first_loss - eager_loss) / max(abs(eager_loss), 1e-12)
        times, first = env.time_steps(lambda: graphed(x, y), p["warmup"], p["steps"])
        ok = (math.isfinite(first_loss) and rel <= TOL_GRAPH_LOSS
              and graphed.replays == 1 + p["warmup"] + len(times))
        what = "capture" if env.cuda else "first static step (uncaptured on the CPU)"
        _speed_add(rep, env, label, model_name, p["speed_batch"], times, first, env.row_peak_mib(),
                   None, p["warmup"], status="PASS" if ok else "FAIL",
                   extra=(f"; {what} {capture_s:.2f} s; its loss {first_loss:.4f} vs eager "
                          f"{eager_loss:.4f} (rel {rel:.1e}, tol {TOL_GRAPH_LOSS:g}); "
                          f"{graphed.replays} static steps"),
                   replay_loss=first_loss, eager_loss=eager_loss, capture_s=capture_s,
                   captured=env.cuda)
    except Exception as e:
        _log_exc()
        rep.add("speed", label, _error_text(e), "ERROR")
    finally:
        model = graphed = twin = step = None
        env.clean()


def speed_compile(env, rep, p, label, mode, eager_ms=None):
    torch = env.torch
    from densenet.bench import build
    model_name = p["compile_model"]
    try:
        torch._dynamo.reset()
        env.start_peak()
        model = build(model_name, "ours", str(env.device)).train()
        x, y = _batch(env, model, p["speed_batch"], 32)
        opt = _sgd(model)
        compiled = torch.compile(model, mode=mode)
        before = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else None
        step, losses = _train_step(compiled, opt, x, y, before=before)
        times, first = env.time_steps(step, p["compile_warmup"], p["compile_steps"])
        row_peak = env.row_peak_mib()
        step_peak = None if env.cuda else env.step_peak_mib(step)
        loss = losses[-1].item()
        extra = f" (compile); loss {loss:.3f}"
        med_ms = statistics.median(times) * 1e3
        if eager_ms:
            extra += f"; {eager_ms / med_ms:.2f}x ours eager at the same size"
        _speed_add(rep, env, label, model_name, p["speed_batch"], times, first, row_peak, step_peak,
                   p["compile_warmup"], extra=extra, loss=loss, mode=mode or "default")
    except Exception as e:
        _log_exc()
        rep.add("speed", label, _error_text(e), "ERROR")
    finally:
        model = compiled = opt = step = None
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        env.clean()


# ----------------------------------------------------------------------------- 3. depth

def _depth_one(env, depth, variant, batch):
    from densenet.bench import build
    model = build(f"densenet_bc{depth}_k12", variant, str(env.device)).train()
    x, y = _batch(env, model, batch, 32)
    step, _ = _train_step(model, _sgd(model), x, y)
    times, _ = env.time_steps(step, 1, 1)
    peak = env.step_peak_mib(step)
    return peak, times[0]


def depth_rows(env, rep, p):
    torch = env.torch
    oom = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    batch = p["depth_batch"]
    kind = ("increase of max_memory_allocated over one step" if env.cuda else
            "allocator peak of one step (densenet.bench)")
    for depth in p["depths"]:
        for variant in p["depth_variants"]:
            label = f"L={depth} {variant}"
            result = None
            try:
                env.clean()
                result = _depth_one(env, depth, variant, batch)
            except oom:
                result = "OOM"
            except Exception as e:
                _log_exc()
                rep.add("depth", label, _error_text(e), "ERROR")
                continue
            finally:
                env.clean()  # after the except block: the traceback's frames are gone
            if result == "OOM":
                rep.add("depth", label, "OOM", notes=f"DenseNet-BC k=12 b{batch} 32x32",
                        depth=depth, variant=variant, oom=True)
            else:
                peak, sec = result
                value = f"{peak:.0f} MiB" if peak is not None else "n/a"
                rep.add("depth", label, value, notes=f"DenseNet-BC k=12 b{batch} 32x32; {kind}; "
                        f"step {sec * 1e3:.0f} ms", depth=depth, variant=variant, peak_mib=peak,
                        step_s=sec)


# ----------------------------------------------------------------------------- 4. densenet121

def densenet121_rows(env, rep, p):
    from densenet.bench import build
    b, size = p["d121_batch"], p["d121_size"]
    ms = {}
    for variant in ("tv", "ours"):
        label = f"{variant} b{b} {size}x{size}"
        try:
            env.start_peak()
            model = build("densenet121", variant, str(env.device)).train()
            x, y = _batch(env, model, b, size)
            step, _ = _train_step(model, _sgd(model), x, y)
            times, first = env.time_steps(step, p["d121_warmup"], p["d121_steps"])
            med = statistics.median(times)
            ms[variant] = med * 1e3
            if env.cuda:
                peak, how = env.row_peak_mib(), "max_memory_allocated, whole row"
            else:
                peak, how = env.step_peak_mib(step), "allocator, one step"
            mem = f"{peak:.0f} MiB ({how})" if peak is not None else "n/a"
            ratio = f"; {ms['tv'] / ms['ours']:.2f}x tv speed" if variant == "ours" and "tv" in ms else ""
            rep.add("densenet121", label, f"{med * 1e3:.1f} ms/step, {b / med:.1f} img/s",
                    notes=f"peak {mem}; {p['d121_warmup']}+{len(times)} steps{ratio}",
                    variant=variant, batch=b, size=size, ms=med * 1e3, img_s=b / med, peak_mib=peak)
        except Exception as e:
            _log_exc()
            rep.add("densenet121", label, _error_text(e), "ERROR")
        finally:
            model = step = None
            env.clean()


# ----------------------------------------------------------------------------- 5. training

def augment(x, generator, pad: int = 4):
    """C10+ augmentation of a normalised float (B, C, H, W) batch on its device: zero padding of
    ``pad`` pixels (after normalisation, as fb.resnet.torch and densenet.data do), a random crop
    back to H x W and a horizontal flip of half the images; one gather for the batch."""
    import torch
    import torch.nn.functional as F
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h                                              # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)    # (B, W)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w)
    return padded.reshape(b, c, -1).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def train_rows(env, rep, p, epochs):
    torch = env.torch
    import torch.nn.functional as F
    from densenet import create_model
    from densenet.sample import load_cifar10_sample
    name, batch = p["train_model"], p["train_batch"]
    label = f"{name} C10+ {epochs} epoch{'s' if epochs != 1 else ''}"
    try:
        t = time.perf_counter()
        data = load_cifar10_sample()
        images, labels = data.train.images, data.train.labels
        if p["train_subset"]:
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:p["train_subset"]]
            images, labels = images[keep], labels[keep]
        x_train, y_train = images.to(env.device), labels.to(env.device)  # uint8 on the device
        x_test, y_test = data.test.images.to(env.device), data.test.labels.to(env.device)
        load_s = time.perf_counter() - t
        scaled = x_train.float().div_(255)
        mean = scaled.mean((0, 2, 3)).view(1, -1, 1, 1)
        std = scaled.std((0, 2, 3)).view(1, -1, 1, 1)
        scaled = None

        def norm(u8):
            return u8.float().div_(255).sub_(mean).div_(std)

        torch.manual_seed(0)
        model = create_model(name, num_classes=len(data.classes)).to(env.device).train()
        opt = _sgd(model, lr=0.1)
        gen = torch.Generator(device=env.device).manual_seed(0)
        n = len(y_train)
        env.sync()
        t0 = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(n, device=env.device, generator=gen)
            loss_sum = torch.zeros((), device=env.device)
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                xb, yb = augment(norm(x_train[idx]), gen), y_train[idx]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(idx)
        env.sync()
        train_s = time.perf_counter() - t0
        train_loss = (loss_sum / n).item()
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y_test), 500):
                correct += (model(norm(x_test[i:i + 500])).argmax(1) == y_test[i:i + 500]).sum().item()
        acc = correct / len(y_test)
        ok = math.isfinite(train_loss)
        rep.add("train", label,
                f"{train_s:.1f} s, {epochs * n / train_s:.0f} img/s, test acc {100 * acc:.1f}%",
                "" if ok else "FAIL",
                f"{n} real CIFAR-10 train images, {len(y_test)} held out (densenet/assets); SGD lr 0.1 "
                f"nesterov wd 1e-4 b{batch}; last-epoch train loss {train_loss:.3f}; data load "
                f"{load_s:.1f} s; chance 10%", wall_s=train_s, img_s=epochs * n / train_s,
                test_acc=acc, train_loss=train_loss, n_train=n, n_test=len(y_test), epochs=epochs)
    except Exception as e:
        _log_exc()
        rep.add("train", label, _error_text(e), "ERROR")
    finally:
        model = opt = None
        env.clean()


def product_train_rows(env, rep, p, epochs):
    """``densenet train`` itself (the API behind the command) on the packaged sample (the
    quickstart recipe: 3,800 real CIFAR-10 training images, 1,000 held out), eagerly and, on
    CUDA, with ``--cuda-graph``; per-epoch training losses of the two compared."""
    import tempfile
    from densenet.train import train
    name = p["train_model"]
    runs = [("eager", False)] + ([("--cuda-graph", True)] if env.cuda else [])
    history = {}
    with tempfile.TemporaryDirectory() as tmp:
        for how, graph in runs:
            label = f"densenet train {how}: {name} quickstart, {epochs} epoch{'s' if epochs != 1 else ''}"
            try:
                env.sync()
                t = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):  # the run's log is progress
                    result = train(name, "quickstart", out=str(Path(tmp) / how.strip("-")),
                                   epochs=epochs, device=str(env.device), cuda_graph=graph,
                                   quiet=True, seed=0)
                env.sync()
                wall = time.perf_counter() - t
                rows = [json.loads(line) for line in
                        (Path(tmp) / how.strip("-") / "metrics.jsonl").read_text().splitlines()]
                history[how] = [r["train_loss"] for r in rows]
                ips = statistics.median(r["images_per_s"] for r in rows)
                extra, status = "", ""
                if graph:
                    rel = max(abs(a - b) / max(abs(b), 1e-12)
                              for a, b in zip(history[how], history["eager"]))
                    ok = len(history[how]) == len(history["eager"]) and rel <= TOL_TRAIN_LOSS
                    status = "PASS" if ok else "FAIL"
                    extra = f"; epoch train losses vs eager: max rel {rel:.1e} (tol {TOL_TRAIN_LOSS:g})"
                acc = 1 - result["test_error"]
                rep.add("train", label,
                        f"{wall:.1f} s, {ips:.0f} img/s (epoch median), test acc {100 * acc:.1f}%",
                        status, f"whole command: data, epochs, checkpoints, test; train losses "
                        + ", ".join(f"{v:.3f}" for v in history[how]) + extra,
                        wall_s=wall, img_s=ips, test_acc=acc, train_losses=history[how],
                        cuda_graph=graph)
            except Exception as e:
                _log_exc()
                rep.add("train", label, _error_text(e), "ERROR")
            finally:
                env.clean()


# ----------------------------------------------------------------------------- driver

def _elementwise_path() -> str:
    """What runs the efficient block's element-wise passes on CUDA."""
    from densenet import gpu_kernels
    if gpu_kernels.available():
        return f"Triton {gpu_kernels.triton.__version__} kernels (densenet/gpu_kernels.py)"
    return "torch ops (Triton missing or DENSENET_TRITON=0)"


def _log_exc():
    traceback.print_exc(file=sys.stderr)


def tasks(env, rep, p, epochs):
    """(section, label, callable) in run order: the compile rows last."""
    bc100 = p["speed_model"]
    state = {}
    out = [("correctness", "eager efficient vs reference", lambda: correctness_eager(env, rep, p)),
           ("speed", "tv eager", lambda: speed_eager(env, rep, p, "tv eager", bc100, "tv")),
           ("speed", "ours eager",
            lambda: state.__setitem__("ours", speed_eager(env, rep, p, "ours eager", bc100, "ours"))),
           ("speed", "ours CUDA graph (whole step)",
            lambda: speed_graph(env, rep, p, "ours CUDA graph (whole step)", bc100))]
    if p["compile_model"] != bc100:  # the comparison the compile row needs at its size
        out.append(("speed", f"ours eager ({p['compile_model']})",
                    lambda: state.__setitem__("small", speed_eager(
                        env, rep, p, f"ours eager ({p['compile_model']})", p["compile_model"], "ours"))))
    out += [("depth", "memory vs depth", lambda: depth_rows(env, rep, p)),
            ("densenet121", "densenet121", lambda: densenet121_rows(env, rep, p)),
            ("train", "C10+ training", lambda: train_rows(env, rep, p, epochs)),
            ("train", "densenet train", lambda: product_train_rows(env, rep, p, epochs))]
    eager_ms = lambda: state.get("ours" if p["compile_model"] == bc100 else "small")  # noqa: E731
    out.append(("speed", "ours torch.compile",
                lambda: speed_compile(env, rep, p, "ours torch.compile (default)", None, eager_ms())))
    if env.cuda:
        out.append(("speed", "ours torch.compile reduce-overhead",
                    lambda: speed_compile(env, rep, p, "ours torch.compile (reduce-overhead)",
                                          "reduce-overhead", eager_ms())))
    out.append(("correctness", "torch.compile vs reference", lambda: correctness_compile(env, rep, p)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: minutes on a CPU (what CI runs)")
    ap.add_argument("--epochs", type=int, help="epochs of the training run (default 3; 1 in --quick)")
    ap.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--out", help="also write the table and the numbers as JSON to this file")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default: torch's; 1 with --quick on the CPU, where "
                         "OpenMP threads on cores shared with other jobs can stall a step 10x)")
    ap.add_argument("--deadline-s", type=float,
                    help="rows not started this many seconds after the start are SKIPped "
                         "(default 540 on CUDA without --quick, else none)")
    args = ap.parse_args(argv)
    only = list(SECTIONS)
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in only if s not in SECTIONS]
        if bad:
            ap.error(f"--only: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be at least 1")

    t_start = time.perf_counter()
    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: --device {device} was asked for but CUDA is not available here (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu.",
              file=sys.stderr)
        return 2
    try:
        env = Env(device)
    except (RuntimeError, ValueError) as e:
        print(f"gpu_check: bad --device {device!r}: {e}", file=sys.stderr)
        return 2
    if env.cuda:
        torch.cuda.set_device(env.device)
    threads = args.threads or (1 if args.quick and not env.cuda else None)
    if threads:
        torch.set_num_threads(threads)
    p = plan(args.quick, env.cuda)
    epochs = args.epochs or p["epochs"]
    deadline = args.deadline_s if args.deadline_s is not None else (
        540.0 if env.cuda and not args.quick else None)

    import torchvision
    dev_name = torch.cuda.get_device_name(env.device) if env.cuda else _cpu_name()
    header = (f"gpu_check: torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"python {platform.python_version()}, device {env.device} ({dev_name}), "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
              + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                 f"{_tf32_state(torch)}, cudnn.benchmark={torch.backends.cudnn.benchmark}, "
                 f"element-wise work: {_elementwise_path()}"
                 if env.cuda else "")
              + f"; {'quick' if args.quick else 'full'} mode")
    print(header, flush=True)

    rep = Report()
    for section, label, fn in tasks(env, rep, p, epochs):
        if section not in only:
            continue
        elapsed = time.perf_counter() - t_start
        if deadline is not None and elapsed > deadline:
            rep.add(section, label, f"skipped: {elapsed:.0f} s > --deadline-s {deadline:g}", "SKIP")
            continue
        log(f"[{elapsed:6.1f} s] {SECTIONS[section]}: {label}")
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # each section guards its rows; this is the last line of defence
            _log_exc()
            rep.add(section, label, _error_text(e), "ERROR")
        rep.section_s[section] = rep.section_s.get(section, 0.0) + time.perf_counter() - t

    total = time.perf_counter() - t_start
    failed = rep.failed()
    table = rep.markdown()
    summary = (f"{len(rep.rows)} rows, {sum(r['status'] == 'PASS' for r in rep.rows)} PASS, "
               f"{sum(r['status'] == 'FAIL' for r in rep.rows)} FAIL, "
               f"{sum(r['status'] == 'ERROR' for r in rep.rows)} ERROR, "
               f"{sum(r['status'] == 'SKIP' for r in rep.rows)} SKIP; total {total:.0f} s ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in rep.section_s.items()) + ")")
    print()
    print(table)
    print()
    print(summary, flush=True)
    if args.out:
        doc = dict(header=header, device=str(env.device), device_name=dev_name, quick=args.quick,
                   torch=torch.__version__, threads=torch.get_num_threads(), plan=p, epochs=epochs,
                   sections={k: dict(title=SECTIONS[k], wall_s=rep.section_s.get(k),
                                     rows=[r for r in rep.rows if r["section"] == k])
                             for k in SECTIONS if k in only},
                   rows=rep.rows, table=table, summary=summary, total_s=total,
                   exit_code=1 if failed else 0)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
