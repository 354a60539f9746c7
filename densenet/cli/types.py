"""argparse value types with messages that say what was wrong."""

from __future__ import annotations

import argparse
import math

from ..errors import UsageError

DEVICES = ["auto", "cpu", "cuda"]


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_int(text: str) -> int:
    v = non_negative_int(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be at least 1, got 0")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def add_image_source(p) -> None:
    """RUN_DIR_OR_CHECKPOINT IMAGE..., or --weights FILE --model NAME IMAGE... (``predict``,
    ``cam``); :func:`images_and_source` sorts the positionals out after parsing."""
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a training run directory or a checkpoint file (left out with --weights)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--weights", metavar="FILE", help="a torchvision or timm state-dict file (needs --model)")
    p.add_argument("--model", help="the architecture of --weights, e.g. densenet121")


def images_and_source(args, what: str) -> None:
    """With --weights there is no run directory: the first positional is an image."""
    if args.weights is not None:
        args.images, args.source = [args.source, *args.images], None
    if not args.images:
        raise UsageError(f"give one or more IMAGE files to {what}.")


def add_weights_source(p, positional_help: str | None = None) -> None:
    """RUN_DIR_OR_CHECKPOINT, or --weights FILE --model NAME for foreign weights."""
    p.add_argument("source", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT",
                   help=positional_help or "a training run directory (its best.pt) or a checkpoint file")
    p.add_argument("--weights", metavar="FILE",
                   help="a torchvision or timm state-dict file instead (needs --model)")
    p.add_argument("--model", help="the architecture of --weights, e.g. densenet121")
