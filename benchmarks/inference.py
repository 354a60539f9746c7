"""Inference speed (images/s) of eager, compiled, channels-last and onnxruntime DenseNets.

    python benchmarks/inference.py                      # the table in benchmarks/RESULTS.md
    python benchmarks/inference.py --modes eager onnxruntime --configs densenet121:1

Random weights with measured BatchNorm statistics (speed does not depend on the values), eval
mode, no gradients, the plain dense-block path (the one export uses). Each row: a few warm-up
calls (for "compiled" the first call compiles, timed separately), then at least --iters calls and
--min-seconds of work. onnxruntime gets as many intra-op threads as PyTorch.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from densenet import create_model, model_info
from densenet.inference import Loaded

DEFAULT_CONFIGS = ["densenet_bc100_k12:1", "densenet_bc100_k12:256", "densenet121:1", "densenet121:16"]
MODES = ["eager", "channels-last", "compiled", "onnxruntime"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, x, iters: int, min_seconds: float, warmup: int, sync) -> float:
    """images/s of ``fn(x)`` over at least ``iters`` calls and ``min_seconds``."""
    for _ in range(warmup):
        fn(x)
    sync()
    n, start = 0, time.perf_counter()
    while n < iters or time.perf_counter() - start < min_seconds:
        fn(x)
        n += 1
    sync()
    return n * x.shape[0] / (time.perf_counter() - start)


def model_for(name: str, size: int) -> torch.nn.Module:
    model = create_model(name).set_implementation("reference")
    # measured BatchNorm statistics keep activations at trained-net scale (no overflow/denormals)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="MODEL:BATCH")
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; "
          f"torch {torch.__version__}, python {platform.python_version()}")
    if "onnxruntime" in args.modes:
        import onnxruntime
        print(f"onnxruntime {onnxruntime.__version__}")
    print(f"command: python {' '.join(sys.argv)}")
    # other processes on the cores slow OpenMP threads down many-fold: say how busy it was
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| model | batch | mode | images/s | notes |")
    print("|---|---|---|---|---|")
    models: dict[str, torch.nn.Module] = {}
    for config in args.configs:
        name, batch = config.split(":")
        batch = int(batch)
        size = model_info(name).input_size
        if name not in models:
            models[name] = model_for(name, size)
        model = models[name].to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        for mode in args.modes:
            note = ""
            with torch.inference_mode():
                if mode == "eager":
                    ips = timed(model, x, args.iters, args.min_seconds, args.warmup, sync)
                elif mode == "channels-last":
                    cl = model.to(memory_format=torch.channels_last)
                    ips = timed(cl, x.contiguous(memory_format=torch.channels_last), args.iters,
                                args.min_seconds, args.warmup, sync)
                    model.to(memory_format=torch.contiguous_format)
                elif mode == "compiled":
                    compiled = torch.compile(model)
                    t0 = time.perf_counter()
                    compiled(x)
                    sync()
                    note = f"first call (compile) {time.perf_counter() - t0:.0f} s"
                    ips = timed(compiled, x, args.iters, args.min_seconds, args.warmup, sync)
                    torch._dynamo.reset()
                else:
                    ips, note = onnxruntime_speed(name, model, x, args)
            print(f"| {name} | {batch} | {mode} | {ips:.1f} | {note} |", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def onnxruntime_speed(name, model, x, args) -> tuple[float, str]:
    import onnxruntime as ort
    from densenet.export import export
    size = x.shape[-1]
    pre = {"kind": "small" if size < 64 else "imagenet", "input_size": size, "resize": None,
           "mean": None, "std": None}
    with tempfile.TemporaryDirectory() as tmp:
        report = export(Loaded(model.cpu(), name, "random", None, pre), "onnx",
                        Path(tmp) / "m.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(Path(tmp) / "m.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        feed = x.cpu().numpy()
        ips = timed(lambda _: session.run(None, {"images": feed}), x, args.iters,
                    args.min_seconds, args.warmup, lambda: None)
    model.to(x.device)
    return ips, f"CPU provider; max abs diff vs PyTorch {report['max_abs_diff']:.1g}"


if __name__ == "__main__":
    main()
