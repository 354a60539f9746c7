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
          "classifier). Any CIFAR shape also works by name: densenet_bc{L}_k{k}, densenet{L}_k{k}, "
          "and for the baselines resnet{L} (L = 6n+2), preact_resnet{L} (9n+2), wrn{L}_{k} (6n+4).")
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
    figure = plot_runs(args.runs, args.out, args.kind, paper=args.paper, json_out=args.json)
    if figure is not None:
        for s in figure["series"]:
            print(f"{s['name']}: " + ", ".join(f"{p['label']} {format_si(p['x'])} {p['error']:.2f}%"
                                               for p in s["points"]))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
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

    p = sub.add_parser("plot", help="training curves, or error vs parameters/FLOPs (Figures 3-4)",
                       description="Training curves of run directories overlaid (--kind curves, "
                       "Figure 4 right), or error against parameters or FLOPs (--kind params / "
                       "flops): the paper's DenseNets and ResNets (Figure 3 for ImageNet, Figure 4 "
                       "middle for C10+, any Table 2 column) with your runs over them, one line per "
                       "family. With --paper none only your runs are drawn: DenseNet-BC against "
                       "pre-activation ResNet, say, from your own runs.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="FIG.png")
    p.add_argument("--kind", choices=["curves", "params", "flops"], default="curves")
    p.add_argument("--paper", default="auto", metavar="COLUMN",
                   help="the paper's points to draw (params/flops): C10, C10+, C100, C100+, SVHN, "
                   "ImageNet, none, or auto (the runs' recipe; with no runs ImageNet for flops, "
                   "C10+ for params)")
    p.add_argument("--json", metavar="FILE", help="also write the figure's data (every point) as JSON")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="Table 2 of your runs beside the paper's numbers",
                       description="One row per run: model, depth L, growth rate k, parameters, "
                       "recipe, validation and test error, and the paper's error for the same "
                       "model and recipe (Table 2, or Table 3 for imagenet).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_report)
