"""The paper's training recipes as data (section 4.2 of the paper).

A recipe holds every hyper-parameter of a training run except where the data lives and where
the run goes. ``densenet recipes --show NAME`` prints one in full, and any field can be
overridden (``--epochs``, ``--lr``, ... or ``--set FIELD=VALUE``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from .errors import UsageError


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model: str                      # default model for the recipe
    dataset: str | None             # data set it is meant for ("cifar10", ...); None: any
    epochs: int
    batch_size: int                 # global batch (split across processes under DDP)
    lr: float
    momentum: float = 0.9
    nesterov: bool = True           # "Nesterov momentum 0.9 without dampening"
    weight_decay: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs` where lr /= 10
    lr_gamma: float = 0.1
    augment: bool = False           # pad-4 random crop + horizontal flip ("+" data sets)
    normalize: str = "meanstd"      # "meanstd" (per-channel), "divide255", "imagenet"
    drop_rate: float = 0.0          # 0.2 in the paper's runs without augmentation
    val_size: int | float = 5000    # training images held out for validation (0: none; < 1: a fraction)
    selection: str = "final"        # model tested: "final" epoch or "best" validation error
    svhn_extra: bool = True         # SVHN: train + extra = 604,388 images
    input_size: int = 32            # large images: crop size; small ones fed to an ImageNet-stem model are upscaled to it
    optimizer: str = "sgd"          # "sgd" (the paper's), "adamw" or "adam"
    schedule: str = "step"          # "step" (lr x lr_gamma at lr_milestones), "cosine" (to 0) or
                                    # "plateau" (lr x lr_gamma when the validation loss stalls)
    plateau_patience: int = 0       # "plateau": epochs without improvement tolerated before a cut
    train_crop: str = "random-resized"  # image files: "random-resized" crops or "center" (Resize + CenterCrop, as evaluated)
    label_smoothing: float = 0.0    # cross-entropy label smoothing
    pretrained_lr_scale: float = 1.0  # lr multiplier for the weights --weights loads (a new head keeps lr)
    # CSV manifests (--data labels.csv; densenet.labels.read_csv): "" means the default
    path_column: str = ""           # the image path column ("": path, Path or Image Index)
    image_root: str = ""            # relative image paths resolve here ("": the CSV's folder)
    label_columns: str = ""         # comma-separated label (or class) columns ("": every other column)
    labels_column: str = ""         # one column of separated label names ("": Finding Labels if present)
    none_value: str = "No Finding"  # in that column: no positive label
    uncertain: str = "ignore"       # -1 cells: "ignore" (masked), "ones" or "zeros" (CheXpert's U-*)
    blank: str = "negative"         # blank cells: "negative" or "ignore"
    group_column: str = ""          # hold out whole groups (e.g. "Patient ID") for validation
    # multi-label data (several labels per image): binary cross-entropy per label
    pos_weight: str = "none"        # "auto": each label's positives weighted negatives / positives
    threshold_rule: str = "f1"      # per-label thresholds on the hold-out: "f1" (max F1) or "youden"
    # volumes (NIfTI / NumPy files; densenet.volumes): read once, resized, normalised per volume
    volume_size: str = "96"         # D,H,W the volumes are resized to ("96" for a cube)
    intensity: str = "percentile"   # "percentile" (0.5-99.5 clipped to [0, 1]) or "zscore"
    flip_axes: str = ""             # augmentation: axes flipped at random, e.g. "0,1,2" (D, H, W)
    crop_pad: int = 0               # augmentation: zero-pad this many voxels, random crop back
    rotate_plane: str = ""          # augmentation: random 90-degree turns in this plane, e.g. "1,2"
    on_bad: str = "error"           # an unreadable or invalid volume: "error" or "skip" (warned)

    def volume_shape(self) -> tuple[int, int, int]:
        """``volume_size`` as (D, H, W)."""
        return _sizes(self.volume_size, "volume_size", 3, expand=True)

    def volume_augment(self) -> dict | None:
        """The keyword arguments of :func:`densenet.volumes.augment_volumes`, or None."""
        if not self.augment:
            return None
        plane = _sizes(self.rotate_plane, "rotate_plane", 2, minimum=0) if self.rotate_plane else None
        return {"flip_axes": _sizes(self.flip_axes, "flip_axes", None, minimum=0) if self.flip_axes else (),
                "pad": self.crop_pad, "rotate_plane": plane}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def holdout_count(self, n: int) -> int:
        """How many of ``n`` training images ``val_size`` holds out."""
        if 0 < self.val_size < 1:
            return max(1, round(self.val_size * n))
        return int(self.val_size)

    def milestone_epochs(self, epochs: int | None = None) -> list[int]:
        epochs = self.epochs if epochs is None else epochs
        # never at epoch 0: a one-epoch run keeps the initial learning rate
        return [max(1, int(round(f * epochs))) for f in self.lr_milestones]


_CIFAR = dict(epochs=300, batch_size=64, lr=0.1, val_size=5000, selection="final")

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("c10", "CIFAR-10 without augmentation, dropout 0.2 (Table 2, column C10)",
           "densenet40_k12", "cifar10", drop_rate=0.2, **_CIFAR),
    Recipe("c10+", "CIFAR-10 with translation + mirroring (Table 2, column C10+)",
           "densenet40_k12", "cifar10", augment=True, **_CIFAR),
    Recipe("c100", "CIFAR-100 without augmentation, dropout 0.2 (Table 2, column C100)",
           "densenet40_k12", "cifar100", drop_rate=0.2, **_CIFAR),
    Recipe("c100+", "CIFAR-100 with translation + mirroring (Table 2, column C100+)",
           "densenet40_k12", "cifar100", augment=True, **_CIFAR),
    Recipe("svhn", "SVHN train+extra, no augmentation, pixels / 255, dropout 0.2, 6,000 held "
           "out, lowest validation error tested (Table 2, column SVHN)",
           "densenet40_k12", "svhn", epochs=40, batch_size=64, lr=0.1, normalize="divide255",
           drop_rate=0.2, val_size=6000, selection="best"),
    Recipe("imagenet", "ImageNet: 90 epochs, batch 256, lr /10 at epochs 30 and 60, scale + "
           "aspect augmentation and flips, single 224 crop validation (Table 3)",
           "densenet121", "imagenet", epochs=90, batch_size=256, lr=0.1,
           lr_milestones=(1 / 3, 2 / 3), augment=True, normalize="imagenet", val_size=0,
           selection="final", input_size=224),
    # Not from the paper: a few minutes on a laptop CPU with the real CIFAR-10 sample shipped
    # in the package; measured accuracy in the README.
    Recipe("quickstart", "Embedded sample of 4,800 real CIFAR-10 images (3,800 train / 1,000 "
           "held out), a small DenseNet-BC, a few epochs on the CPU",
           "densenet_bc28_k12", "cifar10-sample", epochs=8, batch_size=64, lr=0.1,
           lr_milestones=(0.5, 0.75), augment=True, val_size=0, selection="final"),
    # Not from the paper: fine-tuning pretrained weights (--weights) on a user's class folders.
    # SGD + Nesterov momentum at 0.03, under a third of the from-scratch rate, for every layer
    # (a lower rate for the pretrained part, pretrained_lr_scale < 1 as in Howard & Ruder 2018,
    # measured worse), a cosine decay (Loshchilov & Hutter 2017), label smoothing 0.1 (Szegedy
    # et al. 2016), the ImageNet pipeline at 224 (scale/aspect crops + flips). Measured in the
    # README.
    Recipe("finetune", "Fine-tune pretrained weights (--weights FILE) on class folders: SGD lr "
           "0.03, cosine, label smoothing 0.1, 10% held out when there is no val/, crops at 224 "
           "(small images upscaled for an ImageNet model), best epoch tested",
           "densenet121", None, epochs=20, batch_size=32, lr=0.03, schedule="cosine",
           label_smoothing=0.1, pretrained_lr_scale=1.0, augment=True, normalize="imagenet",
           val_size=0.1, selection="best", input_size=224),
    # CheXNet (Rajpurkar et al. 2017): an ImageNet DenseNet-121 (--weights) with one sigmoid
    # output per finding on chest X-rays: 224 px, ImageNet normalisation, random horizontal
    # flips, Adam (0.9, 0.999) at lr 1e-3 divided by 10 each time the validation loss plateaus
    # after an epoch, batch 16, binary cross-entropy weighted by label frequency. The epoch
    # count is not in the paper (20 here); the best epoch by mean validation AUROC is kept.
    Recipe("chexnet", "CheXNet (Rajpurkar et al. 2017): multi-label CSV data, DenseNet-121 from "
           "--weights, 224 px, flips, Adam lr 1e-3 /10 on validation-loss plateaus, batch 16, "
           "weighted BCE, best epoch by mean AUROC",
           "densenet121", None, epochs=20, batch_size=16, lr=1e-3, optimizer="adam",
           weight_decay=0.0, nesterov=False, schedule="plateau", plateau_patience=0,
           augment=True, train_crop="center", normalize="imagenet", val_size=0.1,
           selection="best", input_size=224, pos_weight="auto"),
    # MONAI's 3-D classification tutorial (densenet_training_array: IXI T1 scans, DenseNet121
    # with spatial_dims=3, in_channels=1): intensities scaled to [0, 1] (ScaleIntensity; here a
    # 0.5-99.5 percentile clip, robust to a few bright voxels), resized to 96^3, random
    # 90-degree rotations in the plane of the first two spatial axes (RandRotate90 turns 10% of
    # the volumes; here each gets a random k of 0-3), batch 2, Adam at 1e-4, cross-entropy, 5
    # epochs, the best validation epoch kept. The default for volume data; the model is built
    # 3-D with the volumes' channels.
    Recipe("volume", "3-D volumes (NIfTI / NumPy; MONAI's 3-D classification tutorial): DenseNet-121 "
           "3-D, resized to 96^3, intensities scaled to [0, 1], random 90-degree rotations, Adam "
           "lr 1e-4, batch 2, 5 epochs, 20% held out, best epoch tested",
           "densenet121", "volumes", epochs=5, batch_size=2, lr=1e-4, optimizer="adam",
           weight_decay=0.0, nesterov=False, lr_milestones=(), augment=True, rotate_plane="0,1",
           val_size=0.2,
           selection="best", input_size=96),
]}


def _sizes(text: str, field: str, count: int | None, expand: bool = False, minimum: int = 1) -> tuple:
    """Comma-separated whole numbers (``count`` of them; one expanded to ``count`` with
    ``expand``), each at least ``minimum``."""
    try:
        out = tuple(int(p) for p in str(text).split(","))
    except ValueError:
        out = ()
    if expand and len(out) == 1 and count:
        out = out * count
    if not out or (count is not None and len(out) != count) or min(out) < minimum:
        n = f"{count} " if count else ""
        raise UsageError(f"recipe field {field} must be {n}comma-separated whole numbers >= {minimum}"
                         f"{' (or one, for all)' if expand else ''}, got {text!r}.")
    return out


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UsageError(f"unknown recipe {name!r}. Known recipes: {', '.join(RECIPES)} "
                         f"(see 'densenet recipes --show NAME').") from None


RECIPE_FIELDS = {f.name: f for f in fields(Recipe)}


def coerce_field(name: str, value, where: str = "--set"):
    """Parse ``value`` (a string from the command line or a JSON value) for recipe field ``name``."""
    if name not in RECIPE_FIELDS or name in ("name", "description"):
        settable = [n for n in RECIPE_FIELDS if n not in ("name", "description")]
        raise UsageError(f"{where}: unknown recipe field {name!r}. Fields: {', '.join(settable)}.")
    default = getattr(RECIPES["c10"], name)
    try:
        if name == "val_size":  # a count, or a fraction below 1
            out = float(value)
            if not math.isfinite(out) or (out >= 1 and not out.is_integer()):
                raise ValueError
            return int(out) if out >= 1 or out == 0 else out
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value)) if not isinstance(value, (int, float)) else int(value)
        if isinstance(default, float):
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if isinstance(default, tuple):
            parts = value if isinstance(value, (list, tuple)) else str(value).strip("()[] ").split(",")
            return tuple(float(p) for p in parts if str(p).strip() != "")
        if name == "dataset" and value in (None, "none", "None"):
            return None
        return str(value)
    except (TypeError, ValueError):
        kind = ("count or a fraction below 1" if name == "val_size"
                else type(default).__name__ if default is not None else "str")
        raise UsageError(f"{where}: {name} must be a {kind}, got {value!r}.") from None


def validate_recipe(r: Recipe) -> Recipe:
    """Reject values a run cannot use, naming the field and the allowed range."""
    def bad(field: str, msg: str):
        raise UsageError(f"recipe field {field} {msg}.")

    if r.epochs < 1:
        bad("epochs", f"must be at least 1, got {r.epochs}")
    if r.batch_size < 1:
        bad("batch_size", f"must be at least 1, got {r.batch_size}")
    for name in ("lr", "momentum", "weight_decay", "lr_gamma", "drop_rate"):
        v = getattr(r, name)
        if not math.isfinite(v) or v < 0:
            bad(name, f"must be a finite number >= 0, got {v}")
    if r.lr <= 0:
        bad("lr", f"must be > 0, got {r.lr}")
    if r.drop_rate >= 1:
        bad("drop_rate", f"must be in [0, 1), got {r.drop_rate}")
    if r.momentum >= 1:
        bad("momentum", f"must be in [0, 1), got {r.momentum}")
    if r.nesterov and r.momentum == 0 and r.optimizer == "sgd":
        bad("nesterov", "needs momentum > 0")
    if any(not (0 < f <= 1) for f in r.lr_milestones):
        bad("lr_milestones", f"are fractions of the epochs in (0, 1], got {r.lr_milestones}")
    if not math.isfinite(r.val_size) or r.val_size < 0 or (r.val_size >= 1 and r.val_size != int(r.val_size)):
        bad("val_size", f"must be a count >= 0 or a fraction in (0, 1), got {r.val_size}")
    if r.optimizer not in ("sgd", "adamw", "adam"):
        bad("optimizer", f"must be sgd, adamw or adam, got {r.optimizer!r}")
    if r.schedule not in ("step", "cosine", "plateau"):
        bad("schedule", f"must be step, cosine or plateau, got {r.schedule!r}")
    if r.plateau_patience < 0:
        bad("plateau_patience", f"must be at least 0, got {r.plateau_patience}")
    if r.train_crop not in ("random-resized", "center"):
        bad("train_crop", f"must be random-resized or center, got {r.train_crop!r}")
    if not math.isfinite(r.label_smoothing) or not 0 <= r.label_smoothing < 1:
        bad("label_smoothing", f"must be in [0, 1), got {r.label_smoothing}")
    if not math.isfinite(r.pretrained_lr_scale) or r.pretrained_lr_scale < 0:
        bad("pretrained_lr_scale", f"must be a finite number >= 0, got {r.pretrained_lr_scale}")
    if r.normalize not in ("meanstd", "divide255", "imagenet"):
        bad("normalize", f"must be meanstd, divide255 or imagenet, got {r.normalize!r}")
    if r.selection not in ("final", "best"):
        bad("selection", f"must be 'final' or 'best', got {r.selection!r}")
    if r.uncertain not in ("ignore", "ones", "zeros"):
        bad("uncertain", f"must be ignore, ones or zeros, got {r.uncertain!r}")
    if r.blank not in ("negative", "ignore"):
        bad("blank", f"must be negative or ignore, got {r.blank!r}")
    if r.pos_weight not in ("none", "auto"):
        bad("pos_weight", f"must be none or auto, got {r.pos_weight!r}")
    if r.threshold_rule not in ("f1", "youden"):
        bad("threshold_rule", f"must be f1 or youden, got {r.threshold_rule!r}")
    if r.input_size < 8:
        bad("input_size", f"must be at least 8, got {r.input_size}")
    if r.intensity not in ("percentile", "zscore"):
        bad("intensity", f"must be percentile or zscore, got {r.intensity!r}")
    if r.on_bad not in ("error", "skip"):
        bad("on_bad", f"must be error or skip, got {r.on_bad!r}")
    if r.crop_pad < 0:
        bad("crop_pad", f"must be at least 0, got {r.crop_pad}")
    r.volume_shape()
    if r.augment:
        r.volume_augment()
    return r


def override(recipe: Recipe, **changes) -> Recipe:
    changes = {k: coerce_field(k, v, where=f"--{k.replace('_', '-')}") for k, v in changes.items()
               if v is not None}
    return validate_recipe(dataclasses.replace(recipe, **changes))


def format_recipe(r: Recipe) -> str:
    width = max(len(n) for n in RECIPE_FIELDS)
    lines = [f"{name:<{width}}  {getattr(r, name)}" for name in RECIPE_FIELDS]
    if r.schedule == "cosine":
        lines.append(f"{'lr schedule':<{width}}  cosine from {r.lr} towards 0 over {r.epochs} epochs")
    else:
        lines.append(f"{'lr at epochs':<{width}}  {r.milestone_epochs()} (x{r.lr_gamma} each)")
    return "\n".join(lines)
