"""``densenet eval`` and ``densenet predict``."""

from __future__ import annotations

import json
from dataclasses import replace

from ..devices import resolve_device
from ..inference import SPLITS, evaluate, format_result, load_for_inference, predict
from ..rundir import atomic_write_json
from .types import (DEVICES, add_image_source, add_weights_source, images_and_source,
                    non_negative_int, positive_int)


def _cmd_eval(args) -> int:
    loaded = load_for_inference(args.source, weights=args.weights, model=args.model)
    if args.image_root:  # the test CSV's images live elsewhere than the training CSV's
        loaded = replace(loaded, csv_options={**(loaded.csv_options or {}),
                                              "image_root": args.image_root})
    result = evaluate(loaded, args.data, args.split, args.ten_crop, args.batch_size,
                      resolve_device(args.device), args.workers)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(format_result(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _cmd_predict(args) -> int:
    images_and_source(args, "classify")
    loaded = load_for_inference(args.source, weights=args.weights, model=args.model)
    results = predict(loaded, args.images, args.topk, device=resolve_device(args.device))
    if args.json:
        print(json.dumps([r if "labels" in r else
                          {"image": r["image"], "top": [{"class": c, "probability": p} for c, p in r["top"]]}
                          for r in results], indent=2))
        return 0
    for r in results:
        print(r["image"])
        if "labels" in r:  # multi-label: every label, "*" where it passes its threshold
            for m in r["labels"]:
                print(f"  {m['probability']:7.4f} {'*' if m['positive'] else ' '} {m['label']} "
                      f"(threshold {m['threshold']:.3f})")
            continue
        for name, p in r["top"]:
            print(f"  {p:7.4f}  {name}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 error of a trained model (single crop, 10-crop)",
                       description="Top-1 and top-5 error of a run's model on any data set "
                       "'densenet train' reads. Classes are matched by name, so class folders "
                       "may be in any order. Large images: Resize + CenterCrop, and with "
                       "--ten-crop the paper's 10-crop (softmax averaged).")
    add_weights_source(p)
    p.add_argument("--data", required=True, help="CIFAR archive/folder, SVHN folder, class folders or a CSV manifest")
    p.add_argument("--image-root", metavar="DIR",
                   help="a CSV manifest's relative image paths resolve here (default: the CSV's "
                   "folder)")
    p.add_argument("--split", choices=SPLITS,
                   help="which part to evaluate (default: test, else val, else all images)")
    p.add_argument("--ten-crop", action="store_true",
                   help="also the 10-crop error (ImageNet-size images only)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers (large images)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the numbers as JSON (or also write them to FILE)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of image files",
                       description="The top-k class names with probabilities for each image "
                       "(any size, any mode Pillow reads), preprocessed as the training data was.")
    add_image_source(p)
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_predict)
