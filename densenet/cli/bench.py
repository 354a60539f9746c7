"""``densenet bench``."""

from __future__ import annotations

import json
import sys

from ..bench import DEPTHS, MODES, format_report, run_bench
from ..errors import UsageError
from .types import non_negative_int, positive_int

MODE_NAMES = [name for name, _, _ in MODES]


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise UsageError(f"--depths takes comma-separated depths such as 100,190,250, got {text!r}.") from None
    return depths


def _modes(text: str | None):
    if text is None:
        return False
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown or not modes:
        raise UsageError(f"--modes takes some of {','.join(MODE_NAMES)} (comma-separated), got {text!r}.")
    return modes


def _cmd_bench(args) -> int:
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    report = run_bench(model=args.model, batch_size=args.batch_size,
                       infer_batch_size=args.infer_batch_size, steps=args.steps,
                       warmup=args.warmup, repeats=args.repeats, device=args.device,
                       depths=_depths(args.depths), depth_reference=args.depth_reference,
                       depth_only=args.depth_only, plot=args.plot, modes=_modes(args.modes),
                       size=args.size, log=log)
    report["command"] = "densenet " + " ".join(args.argv)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory against torchvision's DenseNet",
                       description="Our DenseNet against torchvision's DenseNet class, same "
                       "architecture and weights: training and inference images/s and peak "
                       "training memory, each configuration in a fresh subprocess, interleaved.")
    p.add_argument("--model", help="one model (default: densenet_bc100_k12 and densenet121)")
    p.add_argument("--batch-size", type=positive_int, help="training batch (default 64 CIFAR, 16 ImageNet)")
    p.add_argument("--infer-batch-size", type=positive_int,
                   help="inference batch (default 256 CIFAR, 16 ImageNet)")
    p.add_argument("--size", type=positive_int,
                   help="image size of the comparison and --modes (default: the model's, 32 CIFAR, "
                   "224 ImageNet; the depth sweep stays at 32)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per run (default 5)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="warm-up steps per run (default 3: "
                   "a fresh process's first steps are slow with page faults, for every variant)")
    p.add_argument("--repeats", type=positive_int, default=2, help="interleaved runs per variant (default 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                   help="DenseNet-BC k=12 depths for the memory-vs-depth sweep ('' to skip)")
    p.add_argument("--depth-reference", action="store_true",
                   help="also sweep the reference (plain) implementation (quadratic memory)")
    p.add_argument("--depth-only", action="store_true", help="only the memory-vs-depth sweep")
    p.add_argument("--plot", help="write the memory-vs-depth plot to this PNG file")
    p.add_argument("--modes", nargs="?", const=",".join(MODE_NAMES), metavar="MODE,...",
                   help="instead: our efficient against our reference path in eager float32, bf16 "
                   "autocast and torch.compile training, or in the modes named (eager, bf16, "
                   "compile; densenet_bc100_k12 unless --model)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_bench)
