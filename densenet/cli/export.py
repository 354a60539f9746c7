"""``densenet export``."""

from __future__ import annotations

import sys

from ..export import CHECK_BATCHES, FORMATS, SCALE_FLOOR, TOLERANCE, export, require_onnx
from ..inference import load_for_inference
from .types import add_weights_source, positive_float


def _cmd_export(args) -> int:
    if args.format == "onnx":
        require_onnx()  # before any work
    loaded = load_for_inference(args.source, weights=args.weights, model=args.model)
    report = export(loaded, args.format, args.out, args.tolerance)
    mb = report["bytes"] / 1e6
    check = "onnxruntime" if args.format == "onnx" else "the reloaded file"
    print(f"wrote {report['out']} ({args.format}, {mb:.1f} MB, dynamic batch axis)")
    print(f"{check} vs PyTorch on random inputs (batch {' and '.join(map(str, CHECK_BATCHES))}): "
          f"max abs logit difference {report['max_abs_diff']:.3g} on logits up to "
          f"{report['logit_scale']:.3g}, relative {report['max_rel_diff']:.3g} "
          f"(tolerance {report['tolerance']:g}): {'OK' if report['ok'] else 'FAILED'}")
    if not report["ok"]:
        print(f"densenet: error: the exported model differs from PyTorch by more than the "
              f"relative tolerance; do not ship {report['out']} (kept for inspection).",
              file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX, TorchScript or an ExportedProgram, verified",
                       description="Export a run's model (dynamic batch axis) and check the "
                       "written file against PyTorch on random inputs; exits 1 if the max "
                       "logit difference, relative to the logits' scale, exceeds the tolerance.")
    add_weights_source(p, "a training run directory (its best.pt) or a checkpoint file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output file (e.g. model.onnx, model.torchscript.pt, model.pt2)")
    p.add_argument("--tolerance", type=positive_float,
                   help=f"max relative logit difference allowed: max |file - PyTorch| / "
                        f"max(max |PyTorch logit|, {SCALE_FLOOR:g}) (default: "
                        f"{', '.join(f'{k} {v:g}' for k, v in TOLERANCE.items())})")
    p.set_defaults(func=_cmd_export)
