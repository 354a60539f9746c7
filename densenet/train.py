"""Training a DenseNet the way the paper did, into a run directory (docs/run-directory.md).

``train(...)`` is the whole job: config -> data -> model -> epochs -> checkpoints -> result.
The ``densenet train`` command (``densenet/cli/train.py``) is a thin layer over it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import data as data_mod
from .devices import resolve_device
from .distributed import (World, all_reduce_sum, barrier, convert_sync_batchnorm,
                          gather_objects, init_from_env)
from .errors import UsageError
from .metrics import evaluate_batches, predict_multilabel
from .multilabel import auto_pos_weight, choose_thresholds, label_metrics, require_sklearn
from .objectives import CrossEntropy, MultiLabelBCE
from .model import count_macs, count_parameters, create_model, model_info
from .ops import release_buffers
from .labels import holdout_by_group, options_from_fields
from .plots import plot_curves
from .preprocess import Preprocess
from .recipes import RECIPE_FIELDS, Recipe, get_recipe, override
from .rundir import (atomic_write_json, load_checkpoint, remove_stale_temporaries,
                     save_checkpoint, write_metrics)
from .sample import load_cifar10_sample
from .steps import EagerStep, GraphedStep, Step, check_graphable
from .tracking import LOGS, Logs, check_installed, open_logs, parse_logs
from .weights import load_pretrained, read_pretrained

FREEZE = ("features",)
READ_EVERY = 50  # steps between host reads of the losses: each read waits for the device


def _option(default=None, *, on_resume: str = "fixed", factory=None):
    """A run field. ``on_resume`` says what ``--resume`` does with it: "fixed" (the run keeps
    its own value; giving it is an error), "kept" (the run's value unless given anew) or
    "anew" (belongs to one invocation: given, or the default). The command line's flag is
    ``--`` + the name with dashes."""
    meta = {"on_resume": on_resume}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a run: the recipe's fields plus where and how it runs."""
    recipe: Recipe
    model: str
    data: str | None = _option()
    out: str | None = _option()
    weights: str | None = _option()   # start from these weights (torchvision, timm, ours, a run)
    freeze: str | None = _option()    # "features": train the classifier only
    new_head: bool = _option(False)   # replace the classifier of --weights even if it fits
    download: bool = _option(False, on_resume="kept")  # fetch the data again if it is gone
    seed: int = _option(0)
    device: str = _option("auto", on_resume="kept")
    amp: str | None = _option()
    channels_last: bool = _option(False)
    compile: bool = _option(False)
    cuda_graph: bool = _option(False)  # the whole step (forward, backward, SGD) as one CUDA graph
    sync_bn: bool = _option(False, on_resume="kept")  # SyncBatchNorm over all processes (DDP)
    implementation: str = _option("efficient")  # dense-block path; "reference" is the plain one
    max_steps: int | None = _option(on_resume="anew")
    workers: int = _option(4, on_resume="kept")
    quiet: bool = _option(False, on_resume="anew")
    log: tuple[str, ...] = _option(factory=tuple)  # training logs: "tensorboard", "mlflow"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in RUN_FIELDS}
        d["recipe"] = self.recipe.name
        d["log"] = list(self.log)
        d.update({k: v for k, v in self.recipe.to_dict().items() if k not in ("name", "model")})
        d["lr_milestones"] = list(self.recipe.lr_milestones)
        d["lr_milestone_epochs"] = self.recipe.milestone_epochs()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild (and re-validate) a config saved by :meth:`to_dict`."""
        if not isinstance(d, dict) or not isinstance(d.get("recipe"), str) or not isinstance(d.get("model"), str):
            raise UsageError("the run config needs string fields 'recipe' and 'model'.")
        recipe_fields = {k: d[k] for k in RECIPE_FIELDS
                         if k in d and k not in ("name", "model", "description")}
        run_fields = {k: d[k] for k in RUN_FIELDS if k in d and k not in ("recipe", "model", "data", "out")}
        derived = {"lr_milestone_epochs", "model_overrides", "num_classes", "data_name"}
        unknown = set(d) - set(RECIPE_FIELDS) - set(RUN_FIELDS) - derived
        if unknown:
            raise UsageError(f"unknown field(s) {', '.join(sorted(unknown))}.")
        return make_config(d["model"], d["recipe"], d.get("data"), d.get("out"),
                           set_fields=recipe_fields, **run_fields)


# Derived from the fields, so the API and the command line cannot disagree about them.
RUN_FIELDS = tuple(f.name for f in fields(TrainConfig))
ON_RESUME = {f.name: f.metadata.get("on_resume", "fixed") for f in fields(TrainConfig)}
RESUMABLE = tuple(name for name, rule in ON_RESUME.items() if rule != "fixed")


def option_flag(name: str) -> str:
    """The command-line flag of a run field or recipe field."""
    return "--" + name.replace("_", "-")


def make_config(model: str | None = None, recipe: str = "quickstart", data: str | None = None,
                out: str | None = None, *, set_fields: dict | None = None, **kwargs) -> TrainConfig:
    """Resolve a recipe plus overrides into a validated :class:`TrainConfig`."""
    r = get_recipe(recipe)
    recipe_over = {k: kwargs.pop(k) for k in list(kwargs) if k in RECIPE_FIELDS}
    recipe_over.update(set_fields or {})
    r = override(r, **recipe_over)
    unknown = set(kwargs) - set(RUN_FIELDS)
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(sorted(unknown))}.")
    if "log" in kwargs:
        kwargs["log"] = parse_logs(kwargs["log"])
    cfg = TrainConfig(recipe=r, model=model or r.model, data=data, out=out, **kwargs)
    _validate_run_fields(cfg)
    model_info(cfg.model)  # unknown model -> clear error before any work
    return cfg


def _validate_run_fields(cfg: TrainConfig) -> None:
    """Types first, then ranges, each error naming the option."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    checks = [
        ("model", isinstance(cfg.model, str), "a model name"),
        ("data", cfg.data is None or isinstance(cfg.data, str), "a path"),
        ("out", cfg.out is None or isinstance(cfg.out, str), "a path"),
        ("weights", cfg.weights is None or isinstance(cfg.weights, str), "a path"),
        ("freeze", cfg.freeze is None or cfg.freeze in FREEZE, " or ".join(FREEZE)),
        ("device", cfg.device in ("auto", "cpu", "cuda")
         or (isinstance(cfg.device, str) and cfg.device.startswith("cuda:")), "auto, cpu or cuda"),
        ("amp", cfg.amp in (None, "bf16"), "bf16 (or left out)"),
        ("seed", is_int(cfg.seed) and cfg.seed >= 0, "a non-negative integer"),
        ("max_steps", cfg.max_steps is None or (is_int(cfg.max_steps) and cfg.max_steps >= 1),
         "an integer >= 1"),
        ("workers", is_int(cfg.workers) and cfg.workers >= 0, "an integer >= 0"),
        ("implementation", cfg.implementation in ("efficient", "reference"),
         "efficient or reference"),
        ("log", isinstance(cfg.log, tuple) and all(n in LOGS for n in cfg.log),
         " and/or ".join(LOGS)),
    ] + [(name, isinstance(getattr(cfg, name), bool), "true or false")
         for name in ("new_head", "download", "channels_last", "compile", "cuda_graph", "sync_bn",
                     "quiet")]
    for name, ok, expected in checks:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} must be {expected}, got "
                             f"{getattr(cfg, name)!r}.")
    if cfg.freeze and cfg.weights is None:
        raise UsageError(f"--freeze {cfg.freeze} keeps pretrained weights fixed; give them with "
                         f"--weights FILE (a torchvision/timm file, a checkpoint or a run directory).")
    if cfg.cuda_graph and cfg.compile:
        raise UsageError("--cuda-graph and --compile are two ways to run the step; choose one "
                         "(--cuda-graph captures the eager step, whose dense blocks are already "
                         "single ops).")
    if cfg.cuda_graph and cfg.device == "cpu":
        raise UsageError("--cuda-graph captures the training step on a GPU; use --device cuda "
                         "(or auto on a machine with one), or leave --cuda-graph out.")
    if cfg.cuda_graph and cfg.recipe.optimizer != "sgd":
        raise UsageError(f"--cuda-graph steps SGD (the paper's optimizer), not "
                         f"{cfg.recipe.optimizer}; use --set optimizer=sgd or leave --cuda-graph "
                         f"out.")
    if cfg.new_head and cfg.weights is None:
        raise UsageError("--new-head replaces the classifier of pretrained weights; give them with "
                         "--weights FILE (without weights every run starts with a new one).")


def learning_rate(recipe: Recipe, epoch: int, history: list[dict] | None = None) -> float:
    """The learning rate of 0-based ``epoch``: the step schedule, lr * gamma^(number of
    milestones passed), the cosine one, lr * (1 + cos(pi * epoch / epochs)) / 2, or "plateau":
    lr * gamma^(plateaus of the validation loss in ``history``, the rows of the epochs before),
    so a resumed run recomputes it from its metrics."""
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * epoch / recipe.epochs))
    if recipe.schedule == "plateau":
        losses = [row["val_loss"] for row in (history or [])[:epoch]]
        return recipe.lr * recipe.lr_gamma ** plateaus(losses, recipe.plateau_patience)
    passed = sum(epoch >= m for m in recipe.milestone_epochs())
    return recipe.lr * recipe.lr_gamma ** passed


# ----------------------------------------------------------------------------- data

def default_recipe(data: str | None) -> str:
    """The recipe a run without ``--recipe`` uses: "volume" for volume data (NIfTI / NumPy
    class folders or CSV manifest), else the quickstart."""
    from .volumes import detect_volumes
    return "volume" if data is not None and detect_volumes(data) else "quickstart"


def _load_data(cfg: TrainConfig):
    if cfg.recipe.dataset == "cifar10-sample" and cfg.data is None:
        return load_cifar10_sample()
    from .volumes import detect_volumes, open_volumes
    r = cfg.recipe
    if cfg.data is not None and (r.dataset == "volumes" or detect_volumes(cfg.data)):
        if not Path(cfg.data).expanduser().exists():
            raise UsageError(f"data path {cfg.data} does not exist; give a folder of class folders "
                             f"of volume files (.nii, .nii.gz, .npy, .npz) or a CSV manifest of them.")
        if r.dataset == "volumes" and not detect_volumes(cfg.data):
            raise UsageError(f"recipe {r.name!r} trains on volumes, but {cfg.data} holds no volume "
                             f"files (.nii, .nii.gz, .npy, .npz in class folders, or a CSV manifest "
                             f"of them); choose another recipe for images.")
        return open_volumes(cfg.data, shape=r.volume_shape(), intensity=r.intensity,
                            on_bad=r.on_bad, csv_options=options_from_fields(r)
                            if str(cfg.data).lower().endswith(".csv") else None)
    if cfg.data is None:
        raise UsageError(
            f"recipe {cfg.recipe.name!r} needs --data PATH: a CIFAR archive or folder, SVHN .mat "
            f"files, a class-per-folder image directory or a CSV manifest (add --download to fetch "
            f"CIFAR/SVHN). Run 'densenet train' alone for the offline quickstart.")
    r = cfg.recipe
    name = r.dataset if r.dataset in ("cifar10", "cifar100", "svhn") else None
    ds = data_mod.open_dataset(cfg.data, download=cfg.download, name=name,
                               svhn_extra=r.svhn_extra, csv_options=options_from_fields(r))
    if r.schedule == "plateau" and ds.val is None and r.val_size == 0:
        raise UsageError("the plateau schedule cuts the learning rate when the validation loss "
                         "stalls, and this run has no validation data; hold some out with --set "
                         "val_size=0.1 (a fraction or a count), or use --set schedule=step.")
    if r.group_column and ds.groups is None:
        raise UsageError(f"group_column {r.group_column!r} names a column of a CSV manifest, but "
                         f"{cfg.data} is not one; leave out --set group_column.")
    return ds


def _normalisation(cfg: TrainConfig, ds) -> tuple[list[float], list[float]]:
    if cfg.recipe.normalize == "divide255":
        return [0.0] * 3, [1.0] * 3
    if cfg.recipe.normalize == "imagenet" or not ds.small:
        return list(data_mod.IMAGENET_MEAN), list(data_mod.IMAGENET_STD)
    return [float(v) for v in ds.channel_stats()[0]], [float(v) for v in ds.channel_stats()[1]]


class _Splits:
    """train / val / test parts of the data and the loaders over them."""

    def __init__(self, cfg: TrainConfig, ds, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.ds = ds
        r = cfg.recipe
        train, val = ds.train, ds.val
        self.split_record = None
        if val is None and r.val_size > 0:
            n_val = r.holdout_count(len(train))
            if n_val >= len(train):
                raise UsageError(f"val_size {r.val_size} leaves no training images ({len(train)} "
                                 f"in the data); use --set val_size=N with a smaller N, or 0.")
            if r.group_column:  # whole groups (patients) on one side, none on both
                train_idx, val_idx = holdout_by_group(ds.groups, n_val, cfg.seed)
                train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
            else:
                train_idx, val_idx = data_mod.holdout_split(len(train), n_val, cfg.seed)
            train, val = train.subset(train_idx), train.subset(val_idx)
            self.split_record = {"seed": cfg.seed, "val_size": len(val_idx),
                                 "val_indices": val_idx.tolist()}
            if r.group_column:
                self.split_record.update(group_column=r.group_column,
                                         val_groups=sorted({ds.groups[i] for i in val_idx.tolist()}))
        self.train, self.val, self.test = train, val, ds.test
        self.volumes = ds.name == "volumes"
        self.mean, self.std = (None, None) if self.volumes else _normalisation(cfg, ds)
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world_size
        # Small images fed to an ImageNet-stem model (fine-tuning one) are upscaled on the
        # device to the recipe's input size: at 32 px its stride-32 features would be 1x1.
        self.image_size = int(train.images.shape[-1]) if ds.small and not self.volumes else None
        self.upscale = (ds.small and not self.volumes
                        and model_info(cfg.model).kwargs.get("stem") == "imagenet"
                        and r.input_size > self.image_size)
        if ds.small:
            # The whole small-image data set lives on the training device as uint8.
            self.train = self.train.to(device)
            self.val = self.val.to(device) if self.val is not None else None
            self.test = self.test.to(device) if self.test is not None else None

    def model_overrides(self) -> dict:
        """What the data makes of the model besides its classes: volumes build it 3-D with
        their channels."""
        if self.volumes:
            return {"spatial_dims": 3, "in_channels": int(self.train.images.shape[1])}
        return {}

    def loader(self, part, train: bool):
        r, cfg, pre = self.cfg.recipe, self.cfg, self.record()
        if self.volumes:
            from .volumes import VolumeLoader
            return VolumeLoader(part, r.batch_size // self.world if train else max(1, r.batch_size),
                                shuffle=train, augment=r.volume_augment() if train else None,
                                seed=cfg.seed, rank=self.rank if train else 0,
                                world_size=self.world if train else 1)
        if self.ds.small:
            eval_batch = 500 if not self.upscale else max(16, 500 * self.image_size ** 2 // r.input_size ** 2)
            return data_mod.DeviceLoader(part, r.batch_size // self.world if train else eval_batch,
                                         shuffle=train, augment=train and r.augment,
                                         preprocess=pre, seed=cfg.seed,
                                         rank=self.rank if train else 0,
                                         world_size=self.world if train else 1,
                                         drop_last=False, channels_last=cfg.channels_last)
        return data_mod.make_file_loader(part, r.batch_size // self.world if train else 100,
                                         train=train, preprocess=pre, crop=r.train_crop,
                                         workers=cfg.workers, seed=cfg.seed,
                                         rank=self.rank if train else 0,
                                         world_size=self.world if train else 1)

    def record(self) -> Preprocess:
        """How inputs are made (docs/run-directory.md): small images keep their ``image_size``
        and are fed at ``input_size`` (larger when upscaled); large ones Resize + crop. The
        loaders here and every command reading the checkpoint use this one record."""
        r = self.cfg.recipe
        if self.volumes:
            return Preprocess.volume(tuple(self.train.images.shape[2:]), r.intensity,
                                     int(self.train.images.shape[1]))
        if self.ds.small:
            return Preprocess.small(self.image_size, r.input_size if self.upscale else self.image_size,
                                    self.mean, self.std)
        return Preprocess.files(r.input_size, self.mean, self.std)

    def preprocess(self) -> dict:
        """The record as a checkpoint's ``preprocess`` dict."""
        return self.record().to_dict()


def plateaus(losses: list[float | None], patience: int) -> int:
    """How many times ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode "min", relative
    threshold 1e-4, no cooldown) would have cut the rate after these epoch losses: once a
    loss has not improved on the best for more than ``patience`` epochs in a row."""
    best, bad, cuts = math.inf, 0, 0
    for loss in losses:
        if loss is None:
            continue
        if loss < best * (1 - 1e-4):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:
            cuts, bad = cuts + 1, 0
    return cuts


# ----------------------------------------------------------------------------- entry points

def train(model: str | None = None, recipe: str | None = None, data: str | None = None,
          out: str | None = None, *, resume: str | None = None, set_fields: dict | None = None,
          **options) -> dict:
    """Train a DenseNet; returns the result dict also written to ``RUN_DIR/result.json``.

    ``recipe`` defaults to the quickstart. ``options`` are the run fields of
    :class:`TrainConfig` and any recipe field (``epochs``, ``batch_size``, ``lr``, ...);
    ``set_fields`` overrides recipe fields from strings. With ``resume=RUN_DIR`` the run
    continues from ``RUN_DIR/last.pt`` with its own config; only the fields in ``RESUMABLE``
    may be given then (``max_steps`` and ``quiet`` for this invocation, ``device``,
    ``workers``, ``sync_bn`` and ``download`` in place of the run's).
    """
    if resume is not None:
        given = {"model": model, "recipe": recipe, "data": data, "out": out}
        fixed = {k: v for k, v in given.items() if v is not None}
        return _resume(resume, **fixed, **({"set": set_fields} if set_fields else {}), **options)
    recipe = recipe or default_recipe(data)
    if isinstance(options.get("weights"), str):
        # read before a run directory exists, so an unreadable file leaves nothing behind; a
        # checkpoint names its architecture
        named = read_pretrained(options["weights"])[2]
        model = model or named
    cfg = make_config(model, recipe, data, out, set_fields=set_fields, **options)
    check_installed(cfg.log)
    ds = _load_data(cfg)  # data errors before a run directory is created
    world = init_from_env(cfg.device)
    if cfg.cuda_graph:  # before a run directory exists
        check_graphable(_device_for(cfg, world), world.size)
    if world.size > 1 and cfg.out is None:
        raise UsageError("give --out RUN_DIR when training with several processes, so that "
                         "they all write to the same run directory.")
    run_dir = _prepare_run_dir(cfg) if world.is_main else Path(cfg.out)
    barrier()
    return _Run(cfg, run_dir, ds, world).fit(None, resumed=False)


def _resume(run_dir: str, **options) -> dict:
    fixed = [k for k in options if ON_RESUME.get(k, "fixed") == "fixed"]
    if fixed:
        raise UsageError(f"{', '.join(option_flag(k) for k in fixed)} cannot change on --resume "
                         f"(the run keeps its own config); only "
                         f"{', '.join(option_flag(k) for k in RESUMABLE)} can be given anew.")
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {run_dir}: no config.json there; give the directory of a "
                         f"run started by 'densenet train'.")
    try:
        cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (ValueError, OSError) as e:  # UsageError is a ValueError, and so is bad JSON
        raise UsageError(f"--resume {run_dir}: its config.json is not a valid run config "
                         f"({e}). Start a new run instead.") from None
    cfg.out = str(run_dir)
    given = {k: v for k, v in options.items() if v is not None}
    defaults = TrainConfig(recipe=cfg.recipe, model=cfg.model)
    for k in RESUMABLE:
        if k in given:
            setattr(cfg, k, given[k])
        elif ON_RESUME[k] == "anew":  # a step limit and quietness belong to one invocation
            setattr(cfg, k, getattr(defaults, k))
    _validate_run_fields(cfg)
    check_installed(cfg.log)
    remove_stale_temporaries(run_dir)  # left by a kill in the middle of a write
    # a run killed before its first checkpoint starts again from scratch
    checkpoint = load_checkpoint(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None
    ds = _load_data(cfg)
    world = init_from_env(cfg.device)
    if cfg.cuda_graph and (_device_for(cfg, world).type != "cuda" or world.size > 1):
        cfg.cuda_graph = False  # the same steps, uncaptured, where a graph cannot run
    return _Run(cfg, run_dir, ds, world).fit(checkpoint, resumed=True)


def check_divisible(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UsageError(f"the global batch size {batch_size} does not divide over {processes} "
                         f"processes; use a batch size that is a multiple of {processes}.")


# ----------------------------------------------------------------------------- the state

@dataclass
class TrainState:
    """Where training stands: the part of a checkpoint that ``--resume`` continues from (the
    rest is the model: its name, weights, classes and preprocessing). Written to a checkpoint
    by :meth:`to_dict` alone and read back by :meth:`from_dict` alone."""
    epoch: int = 0                  # epochs completed
    step: int = 0                   # optimizer steps done
    step_in_epoch: int = 0          # of the epoch under way (a --max-steps stop in its middle)
    history: list[dict] = field(default_factory=list)  # metrics.jsonl's rows
    best: dict = field(default_factory=lambda: {"val_error": None, "epoch": None})
    pretrained: dict | None = None  # {"weights": path, "new_head": bool} with --weights
    optimizer: dict | None = None   # the optimizer's state_dict()
    rng: list[dict] | None = None   # every process's random state, in rank order

    KEYS = ("epoch", "step", "step_in_epoch", "history", "best", "pretrained", "optimizer", "rng")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_dict(cls, payload: dict, where: str = "the checkpoint") -> "TrainState":
        """The state in a checkpoint's payload, this format's or an earlier one's (the first
        kept one process's random state as a dict, and no ``pretrained``)."""
        missing = [k for k in ("epoch", "step", "history", "optimizer", "rng") if k not in payload]
        if missing:
            raise UsageError(f"{where} holds no training state ({', '.join(missing)} missing): "
                             f"it is not a checkpoint that 'densenet train' wrote. Start a new "
                             f"run instead.")
        rng = payload["rng"]
        return cls(epoch=payload["epoch"], step=payload["step"],
                   step_in_epoch=payload.get("step_in_epoch", 0),
                   history=list(payload["history"]),
                   best=dict(payload.get("best") or {"val_error": None, "epoch": None}),
                   pretrained=payload.get("pretrained"), optimizer=payload["optimizer"],
                   rng=[rng] if isinstance(rng, dict) else list(rng))


# ----------------------------------------------------------------------------- the run

class _Run:
    """One process's part of a training run: model, optimizer, data, run directory, the
    training state (:class:`TrainState`) and the logs."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, ds, world: World):
        self.start_time = time.time()
        self.cfg, self.recipe, self.run_dir, self.ds, self.world = cfg, cfg.recipe, run_dir, ds, world
        check_divisible(self.recipe.batch_size, world.size)
        self.device = _device_for(cfg, world)
        self.log = _logger(run_dir, world.is_main)
        torch.manual_seed(cfg.seed + world.rank)  # dropout differs per process, as it should
        random.seed(cfg.seed)
        self.splits = _Splits(cfg, ds, self.device, world.rank, world.size)
        self.overrides = {"num_classes": len(ds.classes), "drop_rate": self.recipe.drop_rate,
                          **self.splits.model_overrides()}
        self.net = _build_model(cfg, self.overrides, self.device, world)
        self.params = count_parameters(self.net)
        self.optimizer = None  # made once the weights are in (which parts are pretrained)
        self.state = TrainState()
        self.logs = Logs()
        self.multi_label = ds.multi_label
        self.thresholds = None  # multi-label: per-label thresholds chosen on the last validation
        self.objective = self._objective()

    def _objective(self):
        """Softmax cross-entropy, or for multi-label data the masked binary cross-entropy with
        the recipe's positive weights (``pos_weight=auto``: negatives / positives of each label
        in the training split, CheXNet's weighted loss)."""
        r = self.recipe
        if not self.multi_label:
            return CrossEntropy(r.label_smoothing)
        require_sklearn()  # the validation metrics need it: fail before any training
        if r.label_smoothing:
            raise UsageError("label_smoothing is for one class per image; multi-label data trains "
                             "with binary cross-entropy. Use --set label_smoothing=0.")
        pos_weight = None
        if r.pos_weight == "auto":
            labels = self.splits.train.labels if self.ds.small else torch.from_numpy(
                np.stack([y for _, y in self.splits.train.samples]))
            labels = labels.cpu()
            pos_weight = auto_pos_weight(torch.nan_to_num(labels), ~torch.isnan(labels))
            self.log.info("pos_weight (negatives / positives per label): " + ", ".join(
                f"{n} {w:.2f}" for n, w in zip(self.ds.classes, pos_weight.tolist())))
            pos_weight = pos_weight.to(self.device)
        return MultiLabelBCE(pos_weight)

    def fit(self, checkpoint: dict | None, resumed: bool) -> dict:
        """Train from the start (``checkpoint`` None) or from a checkpoint to the last epoch or
        ``max_steps``; returns the result (empty on processes other than the first)."""
        if checkpoint is None:
            self._start()
        else:
            self._restore(checkpoint)
        if self.world.is_main:
            self.logs = open_logs(self.cfg.log, self.run_dir, self._config_record(),
                                  self.state.step if resumed else None)
        try:
            result, complete = self._epochs()
        except BaseException as e:
            self.logs.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.logs.close("FINISHED" if complete else "KILLED")
        return result

    def _epochs(self) -> tuple[dict, bool]:
        train_loader = self.splits.loader(self.splits.train, train=True)
        val_loader = self.splits.loader(self.splits.val, train=False) if self.splits.val is not None else None
        step = self._make_step(train_loader.batch_size)
        max_steps, stopped = self.cfg.max_steps, False
        for epoch in range(self.state.epoch, self.recipe.epochs):
            row, stopped = self._train_epoch(step, train_loader, epoch)
            if stopped:  # --max-steps in the middle of the epoch
                self._checkpoint(("last.pt",))
                self.log.info(f"stopped after --max-steps {max_steps} (epoch {epoch + 1}, "
                              f"step {self.state.step_in_epoch}/{len(train_loader)}); continue "
                              f"with --resume {self.run_dir}")
                break
            row.update(self._validate(val_loader))
            self._end_epoch(row, has_validation=val_loader is not None)
            if max_steps is not None and self.state.step >= max_steps:
                stopped = epoch + 1 < self.recipe.epochs
                if stopped:
                    self.log.info(f"stopped after --max-steps {max_steps}; continue with "
                                  f"--resume {self.run_dir}")
                break
        if not self.world.is_main:
            return {}, not stopped
        return self._finish(complete=not stopped), not stopped

    # --------------------------------------------------------------------- start and restore

    def _config_record(self) -> dict:
        """config.json's content: the config and what the data made of the model."""
        return {**self.cfg.to_dict(), "model_overrides": self.overrides,
                "num_classes": len(self.ds.classes), "data_name": self.ds.name}

    def _start(self) -> None:
        cfg, splits = self.cfg, self.splits
        pretrained_line = None
        if cfg.weights is not None:
            new_head, pretrained_line = load_pretrained(self.net, cfg.weights, list(self.ds.classes),
                                                        new_head=cfg.new_head)
            self.state.pretrained = {"weights": str(cfg.weights), "new_head": new_head}
        self._make_optimizer()
        if self.world.is_main:
            atomic_write_json(self.run_dir / "config.json", self._config_record())
            if splits.split_record is not None:
                atomic_write_json(self.run_dir / "split.json", splits.split_record)
        self.log.info(f"run {self.run_dir}: {cfg.model} ({self.params:,} parameters), recipe "
                      f"{self.recipe.name}, {len(splits.train):,} training images, "
                      f"{len(splits.val) if splits.val is not None else 0:,} validation, "
                      f"{len(splits.test) if splits.test is not None else 0:,} test, device "
                      f"{self.device}" + (f", {self.world.size} processes" if self.world.size > 1 else ""))
        if pretrained_line:
            self.log.info(pretrained_line + (" (features frozen: training the classifier only)"
                                             if cfg.freeze == "features" else ""))
        if splits.upscale:
            self.log.info(f"{splits.image_size}-pixel images upscaled to {self.recipe.input_size} "
                          f"for {cfg.model} (an ImageNet-stem model)")

    def _restore(self, checkpoint: dict) -> None:
        state = TrainState.from_dict(checkpoint, str(self.run_dir / "last.pt"))
        self.net.load_state_dict(checkpoint["state_dict"])
        self.thresholds = checkpoint.get("thresholds")
        self.state = replace(state, optimizer=None, rng=None)  # both live in their owners
        self._make_optimizer()
        self.optimizer.load_state_dict(state.optimizer)
        if len(state.rng) == self.world.size:  # same number of processes: each continues its own stream
            _set_rng_state(state.rng[self.world.rank], self.device)
        else:
            torch.manual_seed(self.cfg.seed + 7919 * state.step + self.world.rank)
        if self.world.is_main:
            write_metrics(self.run_dir, state.history)  # drop any line written after that checkpoint
        self.log.info(f"resumed {self.run_dir} at epoch {state.epoch + 1}, step {state.step}")

    def _make_optimizer(self) -> None:
        """SGD (Nesterov) or AdamW over two groups: the network body and the classifier. With
        --weights the pretrained tensors learn at ``pretrained_lr_scale`` x lr and a new head at
        lr; with --freeze features only the classifier learns."""
        r, net, pretrained = self.recipe, self.net, self.state.pretrained
        if self.cfg.freeze == "features":
            net.features.requires_grad_(False)
        head = [p for p in net.classifier.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        body = [p for p in net.parameters() if id(p) not in head_ids and p.requires_grad]
        scale = r.pretrained_lr_scale if pretrained is not None else 1.0
        new_head = pretrained is None or pretrained["new_head"]
        groups = [{"params": body, "lr_scale": scale},
                  {"params": head, "lr_scale": 1.0 if new_head else scale}]
        groups = [g for g in groups if g["params"]]
        if r.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=r.lr, weight_decay=r.weight_decay)
        elif r.optimizer == "adam":  # betas (0.9, 0.999), as CheXNet
            self.optimizer = torch.optim.Adam(groups, lr=r.lr, betas=(0.9, 0.999),
                                              weight_decay=r.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum,
                                             nesterov=r.nesterov, weight_decay=r.weight_decay)

    def _make_step(self, batch_size: int) -> Step:
        """The step: captured with --cuda-graph; else eager, full batches through the model
        wrapped in DDP for several processes and compiled if asked, a smaller last batch
        through the same without compilation, so that batch is not compiled again."""
        cfg, r = self.cfg, self.recipe
        model = self.net
        if self.world.size > 1:
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.cuda_graph:
            return GraphedStep(model, self.optimizer, self.device, batch_size, amp=cfg.amp,
                               objective=self.objective)
        return EagerStep(torch.compile(model) if cfg.compile else model, self.optimizer,
                         self.device, batch_size, amp=cfg.amp, objective=self.objective,
                         eager_model=model)

    # --------------------------------------------------------------------- one epoch

    def _train_epoch(self, step: Step, loader, epoch: int) -> tuple[dict, bool]:
        """SGD steps over one epoch (from ``step_in_epoch`` on when resuming mid-epoch); returns
        the epoch's training numbers and whether ``max_steps`` stopped it before its end.

        The steps' losses and wrong counts stay on the device and are read back together every
        ``READ_EVERY`` steps and at the end (:meth:`_read`), so the host runs ahead of the
        device in between; every loss of the epoch is checked before any checkpoint of it."""
        cfg, device, state = self.cfg, self.device, self.state
        lr = learning_rate(self.recipe, epoch, self.state.history)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        step.set_lr()
        loader.set_epoch(epoch)
        self.net.train()
        if cfg.freeze == "features":
            # frozen features also keep their BatchNorm statistics: evaluation mode, no
            # gradients, so the efficient ops save nothing for backward
            self.net.features.eval()
        unread = _Unread(READ_EVERY, device)
        totals = {"seen": 0, "loss": 0.0, "wrong": 0}
        progress = _Progress(len(loader), state.step_in_epoch, epoch + 1, self.recipe.epochs,
                             cfg.quiet or not self.world.is_main)
        t0 = time.time()
        stopped = False
        for i, (x, y) in enumerate(loader):
            if i < state.step_in_epoch:  # resuming mid-epoch: same batches, already trained on
                continue
            if x.device != device:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, wrong = step(x, y)
            state.step += 1
            state.step_in_epoch = i + 1
            unread.add(loss, wrong, y.shape[0], state.step)
            progress.step()
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                stopped = state.step_in_epoch < len(loader)
                break
            if unread.full:
                self._read(unread, totals, epoch, lr, progress, t0)
        self._read(unread, totals, epoch, lr, progress, t0, last=True)
        progress.close()
        seconds = time.time() - t0
        if stopped:
            return {}, True
        seen, loss_sum, wrong = all_reduce_sum([totals["seen"], totals["loss"], totals["wrong"]],
                                               device)
        return {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                "train_error": wrong / max(seen, 1), "lr": lr,
                "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds}, False

    def _read(self, unread: "_Unread", totals: dict, epoch: int, lr: float, progress: "_Progress",
              t0: float, last: bool = False) -> None:
        """Read the unread steps' numbers back in one transfer: stop on a non-finite loss, add
        them to the epoch's totals, show the progress and log the loss. ``last``: the epoch's
        end or a --max-steps stop, whose own log line follows."""
        if not unread.steps:
            return
        losses, wrongs = unread.read()
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            self._stop_non_finite(losses[bad], unread.steps[bad], unread.steps[0],
                                  unread.steps[-1], epoch + 1)
        window = sum(v * n for v, n in zip(losses, unread.sizes))
        totals["seen"] += sum(unread.sizes)
        totals["loss"] += window
        totals["wrong"] += int(sum(wrongs))
        seen = totals["seen"]
        progress.read(self.state.step_in_epoch, loss=totals["loss"] / seen,
                      err=100 * totals["wrong"] / seen,
                      ips=self.world.size * seen / max(time.time() - t0, 1e-9), line=not last)
        self.logs.step(self.state.step, window / sum(unread.sizes), lr)
        unread.clear()

    def _validate(self, loader) -> dict:
        """Validation loss and error (on the first process; None without a hold-out); for
        multi-label data also the mean AUROC, and the thresholds chosen on it."""
        val = {"loss": None, "error": None}
        out = {}
        if loader is not None and self.world.is_main:
            # the efficient ops pool large CPU buffers for the next batch of the same size:
            # training's are idle during validation, and validation's until the next one
            release_buffers()
            if self.multi_label:
                val = predict_multilabel(self.net, loader, self.device, self.cfg.amp, self.objective)
                mask = ~torch.isnan(val["targets"])
                targets = torch.nan_to_num(val["targets"])
                self.thresholds = choose_thresholds(val["probs"], targets, mask, self.recipe.threshold_rule)
                out["val_auroc"] = label_metrics(val["probs"], targets, mask, self.ds.classes)["mean_auroc"]
            else:
                val = evaluate_batches(self.net, loader, self.device, self.cfg.amp)
            release_buffers()
        elif self.multi_label:
            out["val_auroc"] = None
        return {"val_loss": val["loss"], "val_error": val["error"], **out}

    def _end_epoch(self, row: dict, has_validation: bool) -> None:
        """Record the epoch: history, best epoch, logs, checkpoints, metrics.jsonl, curves."""
        state, epoch = self.state, row["epoch"]
        keys = ("epoch", "train_loss", "train_error", "val_loss", "val_error")
        keys += ("val_auroc",) * self.multi_label + ("lr", "images_per_s", "seconds")
        row = {k: row[k] for k in keys}
        state.history.append(row)
        state.epoch, state.step_in_epoch = epoch, 0
        if self.multi_label:  # the best epoch has the highest mean validation AUROC
            auroc = row["val_auroc"]
            improved = auroc is not None and (state.best.get("val_auroc") is None
                                              or auroc > state.best["val_auroc"])
        else:
            err = row["val_error"]
            improved = err is not None and (state.best["val_error"] is None or err < state.best["val_error"])
        if improved:
            state.best = {"val_error": row["val_error"], "epoch": epoch,
                          **({"val_auroc": row["val_auroc"]} if self.multi_label else {})}
        # before the checkpoint: a resume from the one before hides these steps in TensorBoard
        self.logs.epoch(state.step, row)
        # without validation data, best = latest
        self._checkpoint(("best.pt", "last.pt") if improved or not has_validation else ("last.pt",))
        if self.world.is_main:
            write_metrics(self.run_dir, state.history)
            plot_curves([(self.run_dir.name, state.history)], self.run_dir / "curves.png")
        self.log.info(_epoch_line(row, self.recipe.epochs) if self.world.is_main else "")

    # --------------------------------------------------------------------- checkpoints

    def _checkpoint(self, names: tuple[str, ...]) -> None:
        """Write the model and the training state to each of ``names`` (first process only;
        all wait)."""
        rng = gather_objects(_rng_state(self.device))  # every process's random state
        if self.world.is_main:
            state = replace(self.state, optimizer=self.optimizer.state_dict(), rng=rng)
            payload = {"model": {"name": self.cfg.model, "overrides": self.overrides},
                       "state_dict": self.net.state_dict(), "classes": list(self.ds.classes),
                       "preprocess": self.splits.preprocess(), "config": self.cfg.to_dict(),
                       "params": self.params, **state.to_dict()}
            if self.multi_label:  # sigmoid outputs, one per label, and where each says "yes"
                payload.update(task="multi-label", thresholds=self.thresholds)
            for name in names:
                _save(self.run_dir / name, payload)
        barrier()

    def _stop_non_finite(self, value: float, step: int, first: int, last: int, epoch: int):
        """Stop the run: the loss of global ``step`` was ``value``; steps ``first`` to ``last``
        were read back together."""
        path = self.run_dir / "last.pt"
        where = (f"The last good checkpoint is {path}; resume with 'densenet train --resume "
                 f"{self.run_dir}' (perhaps after lowering the learning rate)."
                 if path.exists() else "No checkpoint was written yet.")
        msg = (f"the training loss became {value} by step {last} (epoch {epoch}); the run "
               f"stopped. The losses between steps {first} and {last} (epoch {epoch}) were read "
               f"back together: it became {value} at step {step} (epoch {epoch}). {where}")
        self.log.info(msg)
        raise UsageError(msg)

    # --------------------------------------------------------------------- the end

    def _finish(self, complete: bool) -> dict:
        """Test the final (or best) model, write result.json and say how it went."""
        r, splits, net = self.recipe, self.splits, self.net
        test = {"error": None, "top5_error": None}
        if complete and splits.test is not None and not self.multi_label:
            if r.selection == "best" and (self.run_dir / "best.pt").exists():
                net.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["state_dict"])
            release_buffers()  # training's, as before validation
            test = evaluate_batches(net, splits.loader(splits.test, train=False), self.device, self.cfg.amp)
        history, best = self.state.history, self.state.best
        result = {
            "model": self.cfg.model, "recipe": r.name, "dataset": splits.ds.name, "params": self.params,
            "flops": count_macs(net, splits.preprocess()["input_size"]),
            "epochs": len(history), "complete": complete,
            "final_val_error": history[-1]["val_error"] if history else None,
            "best_val_error": best["val_error"], "best_epoch": best["epoch"],
            **({"task": "multi-label", "best_val_auroc": best.get("val_auroc")} if self.multi_label else {}),
            "test_error": test["error"], "test_top5_error": test.get("top5_error"),
            "selection": r.selection,
            "wall_time_s": time.time() - self.start_time,
            "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)) if history else None,
        }
        atomic_write_json(self.run_dir / "result.json", result)
        self.logs.result(self.state.step, result,
                         [self.run_dir / f for f in ("result.json", "curves.png", "best.pt")])
        if complete:
            self.log.info(_done_line(result, len(splits.test) if splits.test is not None else 0))
            self.log.info(f"run directory: {self.run_dir}")
        return result


class _Unread:
    """The losses and wrong-prediction counts of the steps since the last read, kept on the
    device in one tensor (row 0 the losses, row 1 the counts, exact in float32 below 2^24),
    so that reading them back is one transfer; batch sizes and step numbers are known on the
    host."""

    def __init__(self, size: int, device: torch.device):
        self.values = torch.zeros(2, size, device=device)
        self.sizes: list[int] = []
        self.steps: list[int] = []

    @property
    def full(self) -> bool:
        return len(self.sizes) == self.values.shape[1]

    def add(self, loss: torch.Tensor, wrong: torch.Tensor, n: int, step: int) -> None:
        # copied at once: the captured step returns the same tensors at every replay
        k = len(self.sizes)
        self.values[0, k].copy_(loss)
        self.values[1, k].copy_(wrong)
        self.sizes.append(n)
        self.steps.append(step)

    def read(self) -> tuple[list[float], list[float]]:
        """The host read: it waits for the device to finish the steps."""
        losses, wrongs = self.values[:, :len(self.sizes)].tolist()
        return losses, wrongs

    def clear(self) -> None:
        self.sizes.clear()
        self.steps.clear()


def _build_model(cfg: TrainConfig, overrides: dict, device: torch.device, world: World):
    net = create_model(cfg.model, **overrides).to(device)
    net.set_implementation(cfg.implementation)
    if cfg.sync_bn and world.size > 1:
        # the efficient block computes its BatchNorms itself; the plain path uses the modules
        net.set_implementation("reference")
        convert_sync_batchnorm(net)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _device_for(cfg: TrainConfig, world: World) -> torch.device:
    if world.size > 1 and cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return resolve_device(cfg.device)


def _save(path: Path, payload: dict) -> None:
    try:
        save_checkpoint(path, payload)
    except OSError as e:
        raise UsageError(
            f"could not write the checkpoint {path}: {e.strerror or e}. The previous checkpoint "
            f"there is intact; free some space (or fix the permissions) and continue with "
            f"'densenet train --resume {path.parent}'.") from None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- run directory and log

def _default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.recipe.name.replace('+', 'plus')}-{cfg.model}-{stamp}"


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.out) if cfg.out else _default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a directory for the run.")
    if (run_dir / "last.pt").exists() or (run_dir / "config.json").exists():
        raise UsageError(f"{run_dir} already holds a training run. Continue it with "
                         f"'densenet train --resume {run_dir}', or choose another --out.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run directory {run_dir}: {e.strerror}.") from None
    return run_dir


def _logger(run_dir: Path, main: bool = True) -> logging.Logger:
    """The run's log: train.log and stdout, written by the main process only."""
    log = logging.getLogger(f"densenet.train.{run_dir.resolve()}")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    if not main:
        log.addHandler(logging.NullHandler())
        return log
    fh = logging.FileHandler(run_dir / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(sh)
    return log


def _epoch_line(row: dict, epochs: int) -> str:
    val = (f"val loss {row['val_loss']:.4f} err {100 * row['val_error']:.2f}%"
           if row["val_error"] is not None else "no validation")
    if row.get("val_auroc") is not None:
        val += f" mean AUROC {row['val_auroc']:.4f}"
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} err "
            f"{100 * row['train_error']:.2f}%, {val}, lr {row['lr']:.4g}, "
            f"{row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s")


def _done_line(result: dict, test_images: int) -> str:
    parts = []
    if result.get("best_val_auroc") is not None:
        parts.append(f"best mean validation AUROC {result['best_val_auroc']:.4f} "
                     f"(epoch {result['best_epoch']})")
    elif result["best_val_error"] is not None:
        parts.append(f"best validation error {100 * result['best_val_error']:.2f}% "
                     f"(epoch {result['best_epoch']})")
    if result["test_error"] is not None:
        parts.append(f"test error {100 * result['test_error']:.2f}% on {test_images:,} held-out "
                     f"images (accuracy {100 * (1 - result['test_error']):.2f}%)")
    done = f"done in {result['wall_time_s']:.0f} s"
    return f"{done}: " + "; ".join(parts) if parts else done


class _Progress:
    """The epoch's progress on stderr: the running training loss, error and images/s as of the
    last read of the losses, nothing with --quiet or on processes other than the first.

    On a terminal, a tqdm bar that advances every step. Elsewhere (stderr redirected to a file
    under SLURM or nohup, a pipe in CI) a bar would write a redraw for every step into the file,
    so a plain line is printed instead at the epoch's first read (after ``READ_EVERY`` steps, a
    first speed early on) and then at the first read at least ``LINE_SECONDS`` seconds after the
    previous line: at most two lines a minute, however fast the steps. The epoch's end and a
    --max-steps stop print none: their own log line follows on stdout."""

    LINE_SECONDS = 30.0

    def __init__(self, total: int, done: int, epoch: int, epochs: int, quiet: bool):
        self.bar, self.plain = None, False
        self.total, self.epoch, self.epochs = total, epoch, epochs
        self.last_line = None
        if quiet:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}/{epochs}",
                            unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)
        else:
            self.plain = True

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def read(self, done: int, loss: float, err: float, ips: float, line: bool = True) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", err=f"{err:.1f}%", img_s=f"{ips:.0f}",
                                 refresh=False)
        elif self.plain and line:
            now = time.monotonic()
            if self.last_line is None or now - self.last_line >= self.LINE_SECONDS:
                self.last_line = now
                print(f"epoch {self.epoch}/{self.epochs} step {done}/{self.total}: train loss "
                      f"{loss:.4f} err {err:.2f}%, {ips:.0f} img/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
