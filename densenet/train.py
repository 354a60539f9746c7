"""Training a DenseNet the way the paper did, into a run directory (docs/run-directory.md).

``train(...)`` is the whole job: config -> data -> model -> epochs -> checkpoints -> result.
The ``densenet train`` command is a thin layer over it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import data as data_mod
from . import kernels
from .checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from .distributed import (World, all_reduce_sum, barrier, convert_sync_batchnorm,
                          gather_objects, init_from_env)
from .errors import UsageError
from .evaluate import autocast, evaluate_batches, resolve_device
from .model import count_macs, count_parameters, create_model, model_info
from .recipes import RECIPE_FIELDS, Recipe, get_recipe, override

RUN_FIELDS = ("model", "recipe", "data", "out", "download", "seed", "device", "amp",
              "channels_last", "compile", "sync_bn", "implementation", "max_steps", "workers",
              "quiet")


@dataclass
class TrainConfig:
    """Everything that defines a run: the recipe's fields plus where and how it runs."""
    recipe: Recipe
    model: str
    data: str | None = None
    out: str | None = None
    download: bool = False
    seed: int = 0
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False           # SyncBatchNorm over all processes (DDP)
    implementation: str = "efficient"  # dense-block path; "reference" is the plain one
    max_steps: int | None = None
    workers: int = 4
    quiet: bool = False

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in RUN_FIELDS}
        d["recipe"] = self.recipe.name
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
        ("device", cfg.device in ("auto", "cpu", "cuda")
         or (isinstance(cfg.device, str) and cfg.device.startswith("cuda:")), "auto, cpu or cuda"),
        ("amp", cfg.amp in (None, "bf16"), "bf16 (or left out)"),
        ("seed", is_int(cfg.seed) and cfg.seed >= 0, "a non-negative integer"),
        ("max_steps", cfg.max_steps is None or (is_int(cfg.max_steps) and cfg.max_steps >= 1),
         "an integer >= 1"),
        ("workers", is_int(cfg.workers) and cfg.workers >= 0, "an integer >= 0"),
        ("implementation", cfg.implementation in ("efficient", "reference"),
         "efficient or reference"),
    ] + [(name, isinstance(getattr(cfg, name), bool), "true or false")
         for name in ("download", "channels_last", "compile", "sync_bn", "quiet")]
    for name, ok, expected in checks:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} must be {expected}, got "
                             f"{getattr(cfg, name)!r}.")


def learning_rate(recipe: Recipe, epoch: int) -> float:
    """The step schedule: lr * gamma^(number of milestones passed) for 0-based ``epoch``."""
    passed = sum(epoch >= m for m in recipe.milestone_epochs())
    return recipe.lr * recipe.lr_gamma ** passed


# ----------------------------------------------------------------------------- data

def _load_data(cfg: TrainConfig):
    if cfg.recipe.dataset == "cifar10-sample" and cfg.data is None:
        from .sample import load_cifar10_sample
        return load_cifar10_sample()
    if cfg.data is None:
        raise UsageError(
            f"recipe {cfg.recipe.name!r} needs --data PATH: a CIFAR archive or folder, SVHN .mat "
            f"files, or a class-per-folder image directory (add --download to fetch "
            f"CIFAR/SVHN). Run 'densenet train' alone for the offline quickstart.")
    name = cfg.recipe.dataset if cfg.recipe.dataset in ("cifar10", "cifar100", "svhn") else None
    return data_mod.open_dataset(cfg.data, download=cfg.download, name=name,
                                 svhn_extra=cfg.recipe.svhn_extra)


def _normalisation(cfg: TrainConfig, ds) -> tuple[list[float], list[float]]:
    if cfg.recipe.normalize == "divide255":
        return [0.0] * 3, [1.0] * 3
    if cfg.recipe.normalize == "imagenet" or not ds.small:
        return list(data_mod.IMAGENET_MEAN), list(data_mod.IMAGENET_STD)
    return [float(v) for v in ds.channel_stats()[0]], [float(v) for v in ds.channel_stats()[1]]


class _Splits:
    """train / val / test parts of the data and the loaders over them."""

    def __init__(self, cfg: TrainConfig, ds, device: torch.device, run_dir: Path,
                 rank: int = 0, world_size: int = 1):
        self.ds = ds
        r = cfg.recipe
        train, val = ds.train, ds.val
        self.split_record = None
        if val is None and r.val_size > 0:
            if r.val_size >= len(train):
                raise UsageError(f"val_size {r.val_size} leaves no training images ({len(train)} "
                                 f"in the data); use --set val_size=N with a smaller N, or 0.")
            train_idx, val_idx = data_mod.holdout_split(len(train), r.val_size, cfg.seed)
            train, val = train.subset(train_idx), train.subset(val_idx)
            self.split_record = {"seed": cfg.seed, "val_size": r.val_size,
                                 "val_indices": val_idx.tolist()}
        self.train, self.val, self.test = train, val, ds.test
        self.mean, self.std = _normalisation(cfg, ds)
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world_size
        if ds.small:
            # The whole small-image data set lives on the training device as uint8.
            self.train = self.train.to(device)
            self.val = self.val.to(device) if self.val is not None else None
            self.test = self.test.to(device) if self.test is not None else None

    def loader(self, part, train: bool):
        r, cfg = self.cfg.recipe, self.cfg
        if self.ds.small:
            return data_mod.DeviceLoader(part, r.batch_size // self.world if train else 500,
                                         shuffle=train, augment=train and r.augment,
                                         mean=self.mean, std=self.std, seed=cfg.seed,
                                         rank=self.rank if train else 0,
                                         world_size=self.world if train else 1,
                                         drop_last=False, channels_last=cfg.channels_last)
        return data_mod.make_file_loader(part, r.batch_size // self.world if train else 100,
                                         train=train, mean=self.mean, std=self.std,
                                         input_size=r.input_size, resize=round(r.input_size * 256 / 224),
                                         workers=cfg.workers, seed=cfg.seed,
                                         rank=self.rank if train else 0,
                                         world_size=self.world if train else 1)

    def preprocess(self) -> dict:
        r = self.cfg.recipe
        return {"kind": "small" if self.ds.small else "imagenet", "input_size": r.input_size
                if not self.ds.small else int(self.train.images.shape[-1]),
                "resize": None if self.ds.small else round(r.input_size * 256 / 224),
                "mean": self.mean, "std": self.std}


# ----------------------------------------------------------------------------- the loop

def _logger(run_dir: Path, quiet: bool, main: bool = True) -> logging.Logger:
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


def train(model: str | None = None, recipe: str = "quickstart", data: str | None = None,
          out: str | None = None, *, resume: str | None = None, set_fields: dict | None = None,
          **kwargs) -> dict:
    """Train a DenseNet; returns the result dict also written to ``RUN_DIR/result.json``.

    With ``resume=RUN_DIR`` the run continues from ``RUN_DIR/last.pt`` with its own config
    (``max_steps``, ``quiet``, ``device`` and ``workers`` may be given anew).
    """
    if resume is not None:
        return _resume(resume, **kwargs)
    cfg = make_config(model, recipe, data, out, set_fields=set_fields, **kwargs)
    ds = _load_data(cfg)  # data errors before a run directory is created
    world = init_from_env(cfg.device)
    if world.size > 1 and cfg.out is None:
        raise UsageError("give --out RUN_DIR when training with several processes, so that "
                         "they all write to the same run directory.")
    run_dir = _prepare_run_dir(cfg) if world.is_main else Path(cfg.out)
    barrier()
    return _run(cfg, run_dir, ds, None, world)


def _resume(run_dir: str, **kwargs) -> dict:
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
    for stale in run_dir.glob(".*.tmp"):  # left by a kill in the middle of a write
        stale.unlink(missing_ok=True)
    allowed = {"max_steps", "quiet", "device", "workers", "sync_bn"}
    for k in kwargs:
        if k not in allowed:
            raise UsageError(f"{k} cannot change on resume (the run keeps its own config); "
                             f"only {', '.join(sorted(allowed))} can.")
    # a step limit and quietness belong to one invocation, not to the run
    cfg.max_steps = kwargs.get("max_steps")
    cfg.quiet = bool(kwargs.get("quiet", False))
    for k in ("device", "workers", "sync_bn"):
        if kwargs.get(k) is not None:
            setattr(cfg, k, kwargs[k])
    # a run killed before its first checkpoint starts again from scratch
    state = load_checkpoint(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None
    ds = _load_data(cfg)
    world = init_from_env(cfg.device)
    return _run(cfg, run_dir, ds, state, world)


def _run(cfg: TrainConfig, run_dir: Path, ds, state: dict | None, world: World) -> dict:
    start_time = time.time()
    device = _device_for(cfg, world)
    log = _logger(run_dir, cfg.quiet, world.is_main)
    torch.manual_seed(cfg.seed + world.rank)  # dropout differs per process, as it should
    random.seed(cfg.seed)
    r = cfg.recipe
    _check_divisible(r.batch_size, world.size)

    splits = _Splits(cfg, ds, device, run_dir, world.rank, world.size)
    overrides = {"num_classes": len(ds.classes), "drop_rate": r.drop_rate}
    net = create_model(cfg.model, **overrides).to(device)
    net.set_implementation(cfg.implementation)
    if cfg.sync_bn and world.size > 1:
        # the efficient block computes its BatchNorms itself; the plain path uses the modules
        net.set_implementation("reference")
        convert_sync_batchnorm(net)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    params = count_parameters(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=r.lr, momentum=r.momentum,
                                nesterov=r.nesterov, weight_decay=r.weight_decay)
    history: list[dict] = []
    epoch0, step, step_in_epoch = 0, 0, 0
    best = {"val_error": None, "epoch": None}
    if state is None:
        if world.is_main:
            atomic_write_json(run_dir / "config.json",
                              {**cfg.to_dict(), "model_overrides": overrides,
                               "num_classes": len(ds.classes), "data_name": ds.name})
            if splits.split_record is not None:
                atomic_write_json(run_dir / "split.json", splits.split_record)
        log.info(f"run {run_dir}: {cfg.model} ({params:,} parameters), recipe {r.name}, "
                 f"{len(splits.train):,} training images, "
                 f"{len(splits.val) if splits.val is not None else 0:,} validation, "
                 f"{len(splits.test) if splits.test is not None else 0:,} test, device {device}"
                 + (f", {world.size} processes" if world.size > 1 else ""))
    else:
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        epoch0, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        history = list(state["history"])
        best = dict(state["best"])
        rng = state["rng"]
        if len(rng) == world.size:  # same number of processes: each continues its own stream
            _set_rng_state(rng[world.rank], device)
        else:
            torch.manual_seed(cfg.seed + 7919 * step + world.rank)
        if world.is_main:
            _write_metrics(run_dir, history)  # drop any line written after that checkpoint
        log.info(f"resumed {run_dir} at epoch {epoch0 + 1}, step {step}")

    model_for_step = net
    if world.size > 1:
        model_for_step = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model_for_step = torch.compile(model_for_step)
    train_loader = splits.loader(splits.train, train=True)
    val_loader = splits.loader(splits.val, train=False) if splits.val is not None else None

    def save(names: tuple[str, ...], epoch: int, step_in: int) -> None:
        rng = gather_objects(_rng_state(device))  # every process's random state
        if world.is_main:
            p = {"model": {"name": cfg.model, "overrides": overrides},
                 "state_dict": net.state_dict(), "classes": list(ds.classes),
                 "preprocess": splits.preprocess(), "epoch": epoch, "step": step,
                 "step_in_epoch": step_in, "optimizer": optimizer.state_dict(), "rng": rng,
                 "config": cfg.to_dict(), "history": history, "best": best, "params": params}
            for name in names:
                _save(run_dir / name, p)
        barrier()

    fault = _fault_injection(world)
    stopped = False
    for epoch in range(epoch0, r.epochs):
        lr = learning_rate(r, epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        train_loader.set_epoch(epoch)
        net.train()
        t0 = time.time()
        seen, loss_sum, wrong = 0, 0.0, 0
        progress = _progress(len(train_loader), f"epoch {epoch + 1}/{r.epochs}",
                             cfg.quiet or not world.is_main)
        for i, (x, y) in enumerate(train_loader):
            if i < step_in_epoch:  # resuming mid-epoch: same batches, already trained on
                progress.update(1)
                continue
            if x.device != device:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, cfg.amp):
                logits = model_for_step(x)
                loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                _stop_non_finite(run_dir, log, step + 1, epoch + 1, loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            step_in_epoch = i + 1
            if fault is not None and step == fault:
                os.kill(os.getpid(), signal.SIGKILL)
            seen += y.numel()
            loss_sum += loss.item() * y.numel()
            wrong += (logits.argmax(1) != y).sum().item()
            elapsed = time.time() - t0
            progress.update(1, loss=loss_sum / seen, err=100 * wrong / seen,
                            ips=world.size * seen / max(elapsed, 1e-9))
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = step_in_epoch < len(train_loader)
                break
        progress.close()
        if stopped:
            save(("last.pt",), epoch, step_in_epoch)
            log.info(f"stopped after --max-steps {cfg.max_steps} (epoch {epoch + 1}, step "
                     f"{step_in_epoch}/{len(train_loader)}); continue with --resume {run_dir}")
            break
        seconds = time.time() - t0
        seen, loss_sum, wrong = all_reduce_sum([seen, loss_sum, wrong], device)
        val = {"loss": None, "error": None}
        # the efficient path's pooled buffers are sized for training batches: free them before
        # validation (other sizes) and after it, so the two phases never hold both sets
        kernels.release_buffers()
        if val_loader is not None and world.is_main:
            val = evaluate_batches(net, val_loader, device, cfg.amp)
            kernels.release_buffers()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_error": wrong / max(seen, 1), "val_loss": val["loss"],
               "val_error": val["error"], "lr": lr, "images_per_s": seen / max(seconds, 1e-9),
               "seconds": seconds}
        history.append(row)
        step_in_epoch = 0
        improved = val["error"] is not None and (best["val_error"] is None or val["error"] < best["val_error"])
        if improved:
            best = {"val_error": val["error"], "epoch": epoch + 1}
        # without validation data, best = latest
        save(("best.pt", "last.pt") if improved or val_loader is None else ("last.pt",), epoch + 1, 0)
        if world.is_main:
            _write_metrics(run_dir, history)
            _plot(run_dir, history)
        log.info(_epoch_line(row, r.epochs) if world.is_main else "")
        if cfg.max_steps is not None and step >= cfg.max_steps:
            stopped = epoch + 1 < r.epochs
            if stopped:
                log.info(f"stopped after --max-steps {cfg.max_steps}; continue with --resume {run_dir}")
            break

    if not world.is_main:
        return {}
    return _finish(cfg, run_dir, net, splits, device, history, best, params, start_time,
                   complete=not stopped, log=log)


def _check_divisible(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UsageError(f"the global batch size {batch_size} does not divide over {processes} "
                         f"processes; use a batch size that is a multiple of {processes}.")


def _device_for(cfg: TrainConfig, world: World) -> torch.device:
    if world.size > 1 and cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return resolve_device(cfg.device)


def _fault_injection(world: World) -> int | None:
    """DENSENET_KILL_AT=RANK:STEP kills that process after that step (for the crash tests)."""
    spec = os.environ.get("DENSENET_KILL_AT")
    if not spec:
        return None
    rank, step = (int(v) for v in spec.split(":"))
    return step if rank == world.rank else None


def _finish(cfg, run_dir, net, splits, device, history, best, params, start_time, complete, log):
    r = cfg.recipe
    test = {"error": None, "top5_error": None}
    if complete and splits.test is not None:
        if r.selection == "best" and (run_dir / "best.pt").exists():
            net.load_state_dict(load_checkpoint(run_dir / "best.pt")["state_dict"])
        test = evaluate_batches(net, splits.loader(splits.test, train=False), device, cfg.amp)
    result = {
        "model": cfg.model, "recipe": r.name, "dataset": splits.ds.name, "params": params,
        "flops": count_macs(net, splits.preprocess()["input_size"]),
        "epochs": len(history), "complete": complete,
        "final_val_error": history[-1]["val_error"] if history else None,
        "best_val_error": best["val_error"], "best_epoch": best["epoch"],
        "test_error": test["error"], "test_top5_error": test.get("top5_error"),
        "selection": r.selection,
        "wall_time_s": time.time() - start_time,
        "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)) if history else None,
    }
    atomic_write_json(run_dir / "result.json", result)
    if complete:
        parts = []
        if result["best_val_error"] is not None:
            parts.append(f"best validation error {100 * result['best_val_error']:.2f}% "
                         f"(epoch {result['best_epoch']})")
        if result["test_error"] is not None:
            n = len(splits.test)
            parts.append(f"test error {100 * result['test_error']:.2f}% on {n:,} held-out images "
                         f"(accuracy {100 * (1 - result['test_error']):.2f}%)")
        log.info(f"done in {result['wall_time_s']:.0f} s: " + "; ".join(parts) if parts else
                 f"done in {result['wall_time_s']:.0f} s")
        log.info(f"run directory: {run_dir}")
    return result


def _save(path: Path, payload: dict) -> None:
    try:
        save_checkpoint(path, payload)
    except OSError as e:
        raise UsageError(
            f"could not write the checkpoint {path}: {e.strerror or e}. The previous checkpoint "
            f"there is intact; free some space (or fix the permissions) and continue with "
            f"'densenet train --resume {path.parent}'.") from None


def _stop_non_finite(run_dir: Path, log, step: int, epoch: int, value: float):
    last = run_dir / "last.pt"
    where = (f"The last good checkpoint is {last}; resume with 'densenet train --resume "
             f"{run_dir}' (perhaps after lowering the learning rate)."
             if last.exists() else "No checkpoint was written yet.")
    msg = f"the training loss became {value} at step {step} (epoch {epoch}); the run stopped. {where}"
    log.info(msg)
    raise UsageError(msg)


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _plot(run_dir: Path, history: list[dict]) -> None:
    try:
        from .plots import plot_curves
    except ImportError:
        return
    plot_curves([(run_dir.name, history)], run_dir / "curves.png")


def _epoch_line(row: dict, epochs: int) -> str:
    val = (f"val loss {row['val_loss']:.4f} err {100 * row['val_error']:.2f}%"
           if row["val_error"] is not None else "no validation")
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} err "
            f"{100 * row['train_error']:.2f}%, {val}, lr {row['lr']:.4g}, "
            f"{row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s")


class _progress:
    """A tqdm bar per epoch (loss, error %, images/s); nothing with --quiet."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.bar = None
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, n: int, **postfix):
        if self.bar is None:
            return
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(loss=f"{postfix['loss']:.3f}", err=f"{postfix['err']:.1f}%",
                                 img_s=f"{postfix['ips']:.0f}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- command line

def _parse_set(items: list[str] | None) -> dict:
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


def _cmd_train(args) -> int:
    if args.nproc:
        from .distributed import launch
        if args.nproc > 1 and not (args.out or args.resume):
            raise UsageError("give --out RUN_DIR with --nproc, so that every process writes to "
                             "the same run directory.")
        if not args.resume:  # check the arguments once, before starting any process
            cfg = make_config(args.model, args.recipe or "quickstart", args.data, args.out,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              set_fields=_parse_set(args.set))
            _check_divisible(cfg.recipe.batch_size, args.nproc)
        return launch(args.nproc, _strip_nproc(args.argv))
    if args.resume:
        given = [flag for flag, v in (("--model", args.model), ("--recipe", args.recipe),
                                      ("--data", args.data), ("--out", args.out),
                                      ("--epochs", args.epochs), ("--batch-size", args.batch_size),
                                      ("--lr", args.lr), ("--set", args.set)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} cannot change on --resume: the run keeps its own "
                             f"config ({Path(args.resume) / 'config.json'}). Only --max-steps, "
                             f"--device, --workers and --quiet can be given anew.")
        train(resume=args.resume, max_steps=args.max_steps, quiet=args.quiet,
              device=args.device, workers=args.workers, sync_bn=args.sync_bn or None)
        return 0
    train(args.model, args.recipe or "quickstart", args.data, args.out, epochs=args.epochs,
          batch_size=args.batch_size, lr=args.lr, set_fields=_parse_set(args.set),
          seed=args.seed, device=args.device, amp=args.amp, channels_last=args.channels_last,
          compile=args.compile, sync_bn=args.sync_bn, implementation=args.implementation,
          max_steps=args.max_steps, workers=args.workers,
          quiet=args.quiet, download=args.download)
    return 0


def _cmd_recipes(args) -> int:
    from .recipes import RECIPES, format_recipe
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
    from .cli import non_negative_int, positive_float, positive_int
    p = sub.add_parser("train", help="train a DenseNet (no arguments: the offline quickstart)",
                       description="Train a DenseNet with one of the paper's recipes into a run "
                       "directory. With no arguments: the quickstart on the embedded CIFAR-10 sample.")
    p.add_argument("--model", help="model name (densenet list: 'densenet models'); default: the recipe's")
    p.add_argument("--recipe", help="c10, c10+, c100, c100+, svhn, imagenet or quickstart (the default)")
    p.add_argument("--data", help="data path: CIFAR archive/folder, SVHN .mat folder, or class folders")
    p.add_argument("--download", action="store_true", help="fetch CIFAR/SVHN into --data if missing")
    p.add_argument("--out", help="run directory (default: runs/RECIPE-MODEL-TIME)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, help="global batch size")
    p.add_argument("--lr", type=positive_float, help="initial learning rate")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set val_size=0 --set augment=false")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", choices=["bf16"], help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--implementation", default="efficient", choices=["efficient", "reference"],
                   help="dense-block path: memory-efficient (default) or the plain reference")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (smoke runs)")
    p.add_argument("--workers", type=non_negative_int, default=4, help="DataLoader workers (large images)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    p.add_argument("--nproc", type=positive_int,
                   help="processes on this machine (launches torchrun; one per GPU)")
    p.add_argument("--sync-bn", action="store_true",
                   help="synchronise BatchNorm statistics over all processes")
    p.add_argument("--quiet", action="store_true", help="no progress bars; one log line per epoch")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("recipes", help="list the training recipes or show one in full")
    p.add_argument("--show", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_recipes)
