"""``densenet models``, ``summary``, ``analyze``, ``plot`` and ``report``."""

from __future__ import annotations

import json

from ..analysis import (analyze, format_report, format_si, format_summary, models_table,
                        plot_runs, report, summary)
from .types import positive_int


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _cmd_models(args) -> int:
    table = models_table()
    if args.json:
        _print_json(table)
        return 0
    print(f"{'name':<20} {'params':>12} {'MACs':>9} {'input':>5}  description")
    for r in table:
        print(f"{r['name']:<20} {r['params']:>12,} {format_si(r['macs']):>9} {r['input_size']:>5}  {r['description']}")
    print("\nMACs: multiply-adds of one forward pass at the input size (convolutions and the "
          "classifier). Any CIFAR shape also works by name: densenet_bc{L}_k{k}, densenet{L}_k{k}.")
    return 0


def _cmd_summary(args) -> int:
    s = summary(args.name, input_size=args.input_size, num_classes=args.num_classes,
                spatial_dims=args.spatial_dims, in_channels=args.in_channels)
    if args.json:
        _print_json(s)
    else:
        print(format_summary(s))
    return 0


def _cmd_analyze(args) -> int:
    result = analyze(args.source, args.out, args.json)
    for b in result["blocks"]:
        print(f"{b['name']}: {b['sources']} sources x {len(b['targets'])} targets (last: {b['targets'][-1]})")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
    return 0


def _cmd_plot(args) -> int:
    plot_runs(args.runs, args.out, args.kind)
    print(f"wrote {args.out}")
    return 0


def _cmd_report(args) -> int:
    rows = report(args.runs)
    if args.json:
        _print_json(rows)
    else:
        print(format_report(rows, markdown=args.markdown))
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="every registered model with parameters and FLOPs",
                       description="Every registered model: parameters, multiply-adds at its "
                       "native input size, input size.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("summary", help="the paper's Table 1 for any model",
                       description="Table 1's layout for any model: each stage with output size, "
                       "channels, layers, parameters and multiply-adds, and the totals.")
    p.add_argument("name", help="model name ('densenet models'), or densenet_bc{L}_k{k} / densenet{L}_k{k}")
    p.add_argument("--input-size", type=positive_int,
                   help="input side in pixels (voxels, samples) in each spatial dimension "
                   "(default: the model's)")
    p.add_argument("--num-classes", type=positive_int, help="classifier outputs (default: the model's)")
    p.add_argument("--spatial-dims", type=int, choices=[1, 2, 3], default=2,
                   help="1 for signals, 2 for images (default), 3 for volumes")
    p.add_argument("--in-channels", type=positive_int,
                   help="input channels (default: the model's, 3)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("analyze", help="feature-reuse heat map of a trained net (Figure 5)",
                       description="Figure 5 of the paper for a run or checkpoint: per dense block, "
                       "the mean absolute weight with which each layer reads each earlier layer, "
                       "with the transition / classification layer as the last column.")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--out", required=True, metavar="FIG.png")
    p.add_argument("--json", metavar="FILE", help="also write the matrices as JSON")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("plot", help="training curves, or error vs parameters/FLOPs, of runs",
                       description="Figure 4 style plots of run directories: training curves "
                       "overlaid (--kind curves), or error against parameters or FLOPs.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="FIG.png")
    p.add_argument("--kind", choices=["curves", "params", "flops"], default="curves")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="Table 2 of your runs beside the paper's numbers",
                       description="One row per run: model, depth L, growth rate k, parameters, "
                       "recipe, validation and test error, and the paper's error for the same "
                       "model and recipe (Table 2, or Table 3 for imagenet).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_report)
