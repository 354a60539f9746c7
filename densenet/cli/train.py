"""``densenet train`` and ``densenet recipes``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .. import train as train_api
from ..errors import UsageError
from ..recipes import RECIPES, format_recipe, get_recipe
from .types import DEVICES, non_negative_int, positive_float, positive_int

# Recipe fields with a flag of their own (every one can be given with --set FIELD=VALUE).
RECIPE_OPTIONS = ("epochs", "batch_size", "lr")
# Options passed to densenet.train.train under their own names: those recipe fields and the
# run fields of TrainConfig but its positional arguments.
RUN_OPTIONS = RECIPE_OPTIONS + tuple(k for k in train_api.RUN_FIELDS
                                     if k not in ("model", "recipe", "data", "out"))
# What a resumed run keeps from its config.json, by flag: every recipe field, and the run
# fields that are not resumable.
FIXED_ON_RESUME = {**{k: train_api.option_flag(k) for k in train_api.RUN_FIELDS
                      if k not in train_api.RESUMABLE},
                   **{k: train_api.option_flag(k) for k in RECIPE_OPTIONS}, "set": "--set"}


def _given(args, name: str) -> bool:
    """Whether an option was on the command line: every option's default is None or False
    (compared by identity: ``--seed 0`` is given)."""
    value = getattr(args, name)
    return value is not None and value is not False


def parse_set(items: list[str] | None) -> dict:
    """``--set FIELD=VALUE`` items as a dict of strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r} (e.g. --set val_size=0).")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """``densenet train --nproc N ...``: torchrun on this machine with the same arguments."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "densenet", *argv]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"densenet: error: a training process failed (exit code {proc.returncode}); the "
              f"whole job stopped. The run directory keeps its last checkpoint; continue with "
              f"--resume RUN_DIR.", file=sys.stderr)
    return proc.returncode


def _cmd_train(args) -> int:
    # only what was given: the defaults are TrainConfig's, and --resume tells given from not
    options = {k: getattr(args, k) for k in RUN_OPTIONS if _given(args, k)}
    set_fields = parse_set(args.set)
    if args.image_root:
        if args.resume:
            raise UsageError("--image-root cannot change on --resume: the run reads its CSV as it "
                             "started (its config.json has image_root).")
        set_fields["image_root"] = str(Path(args.image_root).expanduser().resolve())
    if args.nproc:
        if args.nproc > 1 and not (args.out or args.resume):
            raise UsageError("give --out RUN_DIR with --nproc, so that every process writes to "
                             "the same run directory.")
        if not args.resume:  # check the arguments once, before starting any process
            cfg = train_api.make_config(args.model, args.recipe or train_api.default_recipe(args.data), args.data,
                                        args.out, set_fields=set_fields, **options)
            train_api.check_divisible(cfg.recipe.batch_size, args.nproc)
        return launch(args.nproc, _strip_nproc(args.argv))
    if args.resume:
        fixed = [flag for name, flag in FIXED_ON_RESUME.items() if _given(args, name)]
        if fixed:
            anew = ", ".join(train_api.option_flag(k) for k in train_api.RESUMABLE)
            raise UsageError(f"{', '.join(fixed)} cannot change on --resume: the run keeps its own "
                             f"config ({Path(args.resume) / 'config.json'}). Only {anew} can be "
                             f"given anew.")
        train_api.train(resume=args.resume, **options)
        return 0
    train_api.train(args.model, args.recipe or train_api.default_recipe(args.data), args.data, args.out,
                    set_fields=set_fields, **options)
    return 0


def _cmd_recipes(args) -> int:
    if args.show:
        r = get_recipe(args.show)
        if args.json:
            print(json.dumps(r.to_dict(), indent=2))
        else:
            print(f"{r.name}: {r.description}\n")
            print(format_recipe(r))
        return 0
    width = max(len(n) for n in RECIPES)
    for r in RECIPES.values():
        print(f"{r.name:<{width}}  {r.description}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a DenseNet (no arguments: the offline quickstart)",
                       description="Train a DenseNet (or one of the paper's ResNet baselines) with "
                       "one of the paper's recipes into a run directory. With no arguments: the "
                       "quickstart on the embedded CIFAR-10 sample.")
    p.add_argument("--model", help="model name ('densenet models' lists them, DenseNets and ResNet "
                   "baselines); default: the recipe's")
    p.add_argument("--recipe", help="c10, c10+, c100, c100+, svhn, imagenet, finetune, chexnet, "
                   "volume (the default for volume data) or quickstart (the default otherwise)")
    p.add_argument("--data", help="data path: CIFAR archive/folder, SVHN .mat folder, class "
                   "folders of images or of volumes (.nii, .nii.gz, .npy, .npz), or a CSV "
                   "manifest (a path column and class or label columns)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR/SVHN into --data if missing")
    p.add_argument("--image-root", metavar="DIR",
                   help="a CSV manifest's relative image paths resolve here (default: the CSV's "
                   "folder)")
    p.add_argument("--out", help="run directory (default: runs/RECIPE-MODEL-TIME)")
    p.add_argument("--weights", metavar="FILE_OR_RUN",
                   help="start from these weights: a torchvision or timm DenseNet or ResNet file, a densenet "
                   "checkpoint or run directory; the classifier is replaced when the data's "
                   "classes differ (use with --recipe finetune)")
    p.add_argument("--new-head", action="store_true",
                   help="replace the classifier of --weights even when its class count matches "
                   "(a state-dict file does not name its classes)")
    p.add_argument("--freeze", choices=["features"],
                   help="keep the pretrained features fixed and train the classifier only")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, help="global batch size")
    p.add_argument("--lr", type=positive_float, help="initial learning rate")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set val_size=0 --set augment=false")
    p.add_argument("--seed", type=non_negative_int, help="random seed (default 0)")
    p.add_argument("--device", choices=DEVICES, help="default: auto (a GPU if PyTorch sees one)")
    p.add_argument("--amp", choices=["bf16"], help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step (forward, backward, SGD) in one CUDA "
                   "graph and replay it (--device cuda, one process, SGD)")
    p.add_argument("--implementation", choices=["efficient", "reference"],
                   help="dense-block path: memory-efficient (default) or the plain reference")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (smoke runs)")
    p.add_argument("--workers", type=non_negative_int,
                   help="DataLoader workers (large images; default 4)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    p.add_argument("--nproc", type=positive_int,
                   help="processes on this machine (launches torchrun; one per GPU)")
    p.add_argument("--sync-bn", action="store_true",
                   help="synchronise BatchNorm statistics over all processes")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (without it: a bar on a terminal, elsewhere a plain "
                   "line at most every 30 s); one log line per epoch")
    p.add_argument("--log", action="append", metavar="tensorboard|mlflow",
                   help="also log the losses, learning rate, errors and speed: 'tensorboard' "
                   "(event files in RUN_DIR/tensorboard/; pip install 'densenet-torch[tensorboard]') "
                   "or 'mlflow' (config as params, metrics, result.json, curves.png and best.pt as "
                   "artifacts, to MLFLOW_TRACKING_URI, else to sqlite:///RUN_DIR/mlflow.db; pip "
                   "install 'densenet-torch[mlflow]'); both: --log tensorboard --log mlflow or "
                   "--log tensorboard,mlflow. Part of the run: --resume continues the same logs")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("recipes", help="list the training recipes or show one in full")
    p.add_argument("--show", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_recipes)
