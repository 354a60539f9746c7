"""The paper's analyses on any model or trained run (Table 1, Figures 3-5, Table 2).

- :func:`summary`: Table 1's layout for any model - each stage with its output size, channels,
  layers, parameters and multiply-adds.
- :func:`feature_reuse`: Figure 5's matrices - how strongly each layer reads each earlier layer.
- :func:`load_run` / :func:`report`: a Table-2-style comparison of runs with the paper.

Commands: ``densenet models``, ``summary``, ``analyze``, ``plot``, ``report``.

FLOPs here are multiply-adds (MACs) of the convolutions and the linear layer, as torchvision's
"GFLOPS" (2.834 for DenseNet-121) and the paper's Figure 3 count them; BN, ReLU and pooling are
not counted. They are computed from the layer shapes of a model built on the ``meta`` device
(no memory, no arithmetic), so even DenseNet-264 takes milliseconds; the tests check them
against ``torch.utils.flop_counter`` on a real forward pass.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .errors import UsageError
from .inference import load_model
from .model import DenseBlock, DenseNet, Transition, create_model, list_models, model_info
from .resnet import RESIDUAL_BLOCKS, ResNet
from .paper import RECIPE_COLUMNS, TABLE2_COLUMNS, paper_error, paper_points
from .plots import plot_curves, plot_feature_reuse, plot_tradeoff
from .rundir import atomic_write_json, read_json, read_metrics

__all__ = ["summary", "models_table", "feature_reuse", "load_run", "report"]

# Overrides that leave a paper architecture the paper's (anything else makes it another net).
_ARCH_NEUTRAL = {"num_classes", "drop_rate", "implementation"}


# ----------------------------------------------------------------------------- Table 1

def _meta_model(name: str, **overrides) -> DenseNet:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return model.eval().set_implementation("reference")


def _stages(model: DenseNet | ResNet) -> list[tuple[str, str, list[nn.Module]]]:
    """(name, kind, modules) of Table 1's rows, in forward order; the head's classifier is
    added by the caller (a ResNet without a final norm has a head of the classifier alone)."""
    stages: list[tuple[str, str, list[nn.Module]]] = []
    for child_name, child in model.features.named_children():
        if child_name in ("conv0", "norm0", "relu0", "conv1", "bn1", "relu"):
            if not stages or stages[-1][1] != "conv":
                stages.append(("Convolution", "conv", []))
            stages[-1][2].append(child)
        elif child_name in ("pool0", "maxpool"):
            stages.append(("Pooling", "pool", [child]))
        elif isinstance(child, DenseBlock):
            stages.append((f"Dense Block ({child_name[len('denseblock'):]})", "block", [child]))
        elif isinstance(child, Transition):
            stages.append((f"Transition Layer ({child_name[len('transition'):]})", "transition", [child]))
        elif isinstance(model, ResNet) and child_name.startswith("layer"):
            stages.append((f"Residual Stage ({child_name[len('layer'):]})", "stage", [child]))
        elif child_name in ("norm5", "norm"):
            stages.append(("Classification Layer", "head", [child]))
        else:  # a module this summary does not know: count it where it sits
            stages.append((child_name, "other", [child]))
    if not stages or stages[-1][1] != "head":
        stages.append(("Classification Layer", "head", []))
    return stages


_CONV = nn.modules.conv._ConvNd
_POOL = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_NORM = nn.modules.batchnorm._BatchNorm


def _ntuple(v, n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


def _fmt(size: Sequence[int]) -> str:
    """A size or kernel as Table 1 writes it: '7x7' (2-D), '7x7x7' (3-D), '7' (1-D)."""
    return "x".join(str(s) for s in size)


def _composition(kind: str, modules: list[nn.Module], model: DenseNet, size: tuple[int, ...]) -> str:
    """Table 1's 'layer' column, e.g. '[1x1 conv, 3x3 conv] x 6' ('1x1x1 conv' in 3-D)."""
    m = modules[0] if modules else None
    d = getattr(model, "spatial_dims", 2)
    if kind == "conv":
        stride = _ntuple(m.stride, d)[0]
        return f"{_fmt(_ntuple(m.kernel_size, d))} conv" + (f", stride {stride}" if stride != 1 else "")
    if kind == "pool":
        k = _ntuple(m.kernel_size, d)[0]
        s = _ntuple(m.stride or m.kernel_size, d)[0]
        what = "max" if isinstance(m, nn.modules.pooling._MaxPoolNd) else "average"
        return f"{_fmt((k,) * d)} {what} pool, stride {s}"
    if kind == "block":
        layer = next(iter(m.values()))
        convs = [c for c in layer.modules() if isinstance(c, _CONV)]
        inner = ", ".join(f"{_fmt(_ntuple(c.kernel_size, d))} conv" for c in convs)
        return f"[{inner}] x {len(m)}"
    if kind == "stage":  # the first unit's residual branch (its shortcut aside), x units
        unit = m[0]
        convs = [c for name, c in unit.named_children() if isinstance(c, _CONV) and name != "downsample"]
        inner = ", ".join(f"{_fmt(_ntuple(c.kernel_size, d))} conv" for c in convs)
        return f"[{inner}] x {len(m)}, {unit.out_channels} maps"
    if kind == "transition":
        return f"{_fmt((1,) * d)} conv, {_fmt((2,) * d)} average pool, stride 2"
    if kind == "head":
        classes = getattr(model.classifier, "out_features", None)
        fc = f", {classes}D fully-connected, softmax" if classes else ""
        return f"{_fmt(size)} global average pool" + fc
    return type(m).__name__


def _out_side(n: int, kernel: int, stride: int, padding: int, dilation: int, ceil: bool) -> int:
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    return (-(-span // stride) if ceil else span // stride) + 1


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _trace(module: nn.Module, c: int, size: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """(channels, spatial size, MACs) after ``module`` for an input of ``c`` channels and
    ``size`` (one side per spatial dimension), from the shapes alone (no forward pass):
    convolution MACs = outputs x (in / groups) x kernel volume."""
    if isinstance(module, (_CONV, *_POOL)):
        n = len(size)
        k = _ntuple(module.kernel_size, n)
        s = _ntuple(module.stride or module.kernel_size, n)
        p = _ntuple(module.padding, n)
        d = _ntuple(getattr(module, "dilation", 1), n)
        ceil = getattr(module, "ceil_mode", False)
        out = tuple(_out_side(size[i], k[i], s[i], p[i], d[i], ceil) for i in range(n))
        if min(out) < 1:
            raise UsageError(f"the input is too small: a {_fmt(k)} {type(module).__name__} "
                             f"meets a {_fmt(size)} map. Use a larger --input-size.")
        if isinstance(module, _CONV):
            macs = module.out_channels * _prod(out) * (module.in_channels // module.groups) * _prod(k)
            return module.out_channels, out, macs
        return c, out, 0
    if isinstance(module, nn.Linear):
        return module.out_features, (1,) * len(size), module.in_features * module.out_features
    if isinstance(module, DenseBlock):
        macs = 0
        for i, layer in enumerate(module.values()):
            _, layer_size, m = _trace(layer, module.in_channels + i * module.growth_rate, size)
            if layer_size != size:
                raise UsageError(f"a dense layer changed the map size from {_fmt(size)} to "
                                 f"{_fmt(layer_size)}.")
            macs += m
        return module.out_channels, size, macs
    if isinstance(module, RESIDUAL_BLOCKS):  # the branch, then the shortcut on the same input
        branch = [child for name, child in module.named_children() if name != "downsample"]
        out_c, out_size, macs = _trace(nn.Sequential(*branch), c, size)
        if module.downsample is not None:
            macs += _trace(module.downsample, c, size)[2]
        return out_c, out_size, macs
    if isinstance(module, (_NORM, nn.ReLU, nn.Dropout, nn.Identity)):
        return c, size, 0
    children = list(module.children())  # Sequential, Transition, DenseLayer: in forward order
    if not children:
        raise TypeError(f"summary does not know how to trace {type(module).__name__}")
    macs = 0
    for child in children:
        c, size, m = _trace(child, c, size)
        macs += m
    return c, size, macs


def _depth(modules: Sequence[nn.Module]) -> int:
    """Weighted layers (convolutions, linear) on the main path: a residual unit's projection
    shortcut is not counted, as He et al. count depth."""
    skip = {id(x) for m in modules for unit in m.modules() if isinstance(unit, RESIDUAL_BLOCKS)
            and unit.downsample is not None for x in unit.downsample.modules()}
    return sum(isinstance(x, (_CONV, nn.Linear)) and id(x) not in skip for m in modules for x in m.modules())


def _summarize(model: DenseNet | ResNet, input_size: int, in_channels: int | None = None) -> list[dict]:
    """One row per Table 1 stage: output size, channels, layers, parameters and MACs, for an
    input of ``input_size`` a side in each of the model's spatial dimensions and
    ``in_channels`` channels (default: the model's)."""
    if in_channels is None:
        in_channels = getattr(model, "in_channels", 3)
    dims = getattr(model, "spatial_dims", 2)
    c, size = in_channels, (input_size,) * dims
    rows = []
    for name, kind, modules in _stages(model):
        in_ch, macs = c, 0
        for m in modules:
            c, size, mm = _trace(m, c, size)
            macs += mm
        params = sum(p.numel() for m in modules for p in m.parameters())
        depth = _depth(modules)
        pooled = size
        if kind == "head":  # norm5, then ReLU, global average pool and the classifier
            c, _, mm = _trace(model.classifier, c, (1,) * dims)
            macs += mm
            params += sum(p.numel() for p in model.classifier.parameters())
            depth += isinstance(model.classifier, nn.Linear)
            size = (1,) * dims
        rows.append({
            "stage": name, "kind": kind, "output_size": list(size),
            "in_channels": int(in_ch), "out_channels": int(c),
            "layers": len(modules[0]) if kind in ("block", "stage") else None,
            "depth": int(depth), "params": int(params), "macs": int(macs),
            "composition": _composition(kind, modules, model, pooled),
        })
    return rows


def summary(name: str, input_size: int | None = None, num_classes: int | None = None,
            spatial_dims: int = 2, in_channels: int | None = None) -> dict:
    """Table 1 for any model name: stages, their sizes, parameters and MACs, and totals.

    ``input_size`` defaults to the model's native size (224 ImageNet, 32 CIFAR/SVHN), a side
    in each of the ``spatial_dims`` dimensions (1 signals, 2 images, 3 volumes);
    ``in_channels`` defaults to the model's (3).
    """
    info = model_info(name)
    if input_size is None:
        input_size = info.input_size
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise UsageError(f"input size must be a positive integer, got {input_size!r}.")
    overrides = {"spatial_dims": spatial_dims}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if in_channels is not None:
        overrides["in_channels"] = in_channels
    model = _meta_model(name, **overrides)
    try:
        rows = _summarize(model, input_size)
    except UsageError as e:
        raise UsageError(f"{name} at input size {input_size}: {e}") from None
    depth = sum(r["depth"] for r in rows)
    return {
        "model": name, "description": info.description, "family": info.family,
        "input_size": input_size, "num_classes": model.classifier.out_features,
        "growth_rate": getattr(model, "growth_rate", None),
        "depth": getattr(model, "depth", None) or depth,  # as the model's paper counts it
        "stages": rows,
        "totals": {"params": sum(r["params"] for r in rows), "macs": sum(r["macs"] for r in rows),
                   "depth": depth},
    }


def models_table() -> list[dict]:
    """Every registered model with its parameters and MACs at its native input size."""
    out = []
    for name in list_models():
        s = summary(name)
        out.append({"name": name, "description": s["description"], "params": s["totals"]["params"],
                    "macs": s["totals"]["macs"], "input_size": s["input_size"],
                    "num_classes": s["num_classes"]})
    return out


def format_si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_summary(s: dict) -> str:
    dims = len(s["stages"][0]["output_size"]) if s["stages"] else 2
    k = "" if s.get("growth_rate") is None else f"growth rate k={s['growth_rate']}, "
    head = (f"{s['model']} - {s['description']}: {_fmt((s['input_size'],) * dims)} input, "
            f"{s['num_classes']} classes, {k}depth L={s['depth']}")
    sizes = [_fmt(r["output_size"]) for r in s["stages"]]
    w = max([9, *map(len, sizes)])  # 9 fits any 2-D size up to 9999x9999
    cols = f"{'stage':<24} {'output':>{w}} {'in ch':>6} {'out ch':>6} {'layers':>6} {'depth':>5} {'params':>12} {'MACs':>9}  composition"
    lines = [head, "", cols, "-" * len(cols)]
    for r, size in zip(s["stages"], sizes):
        lines.append(f"{r['stage']:<24} {size:>{w}} {r['in_channels']:>6} {r['out_channels']:>6} "
                     f"{'' if r['layers'] is None else r['layers']:>6} {r['depth']:>5} "
                     f"{r['params']:>12,} {format_si(r['macs']):>9}  {r['composition']}")
    t = s["totals"]
    lines.append("-" * len(cols))
    lines.append(f"{'total':<24} {'':>{w}} {'':>6} {'':>6} {'':>6} {t['depth']:>5} {t['params']:>12,} "
                 f"{format_si(t['macs']):>9}  ({t['macs']:,} multiply-adds)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Figure 5

def _source_bounds(block: DenseBlock) -> list[int]:
    """Channel offsets of the sources in a block's concatenation: source s (0 = the block's
    input, s >= 1 = layer s) is channels bounds[s]:bounds[s + 1]."""
    k0, k = block.in_channels, block.growth_rate
    return [0] + [k0 + j * k for j in range(len(block) + 1)]


def _mean_abs_by_source(weight: torch.Tensor, bounds: list[int], n_sources: int) -> list[float]:
    # Mean |w| over every weight that reads source s (all filters, its maps, the kernel): the
    # L1 norm normalised by the number of weights, as the paper's Figure 5.
    w = weight.detach().float().abs()
    return [w[:, bounds[s]:bounds[s + 1]].mean().item() for s in range(n_sources)]


def feature_reuse(model: DenseNet) -> list[dict]:
    """Figure 5's matrix for every dense block of ``model``.

    ``matrix[s][t]`` is the mean absolute weight of the first convolution of target t that
    reads the maps of source s: s = 0 is the block's input and s = 1..n its layers' outputs;
    t = 0..n-1 are the block's layers (layer t+1 reads sources 0..t; null for the sources it
    cannot see) and the last target is the transition layer after the block or, after the last
    block, the classification layer (both read all n+1 sources).
    """
    if not isinstance(model, DenseNet):
        raise UsageError(f"feature reuse needs a DenseNet, got {type(model).__name__}.")
    children = list(model.features.named_children())
    out = []
    for i, (name, block) in enumerate(children):
        if not isinstance(block, DenseBlock):
            continue
        n = len(block)
        bounds = _source_bounds(block)
        matrix: list[list[float | None]] = [[None] * (n + 1) for _ in range(n + 1)]
        for t, layer in enumerate(block.values()):
            for s, v in enumerate(_mean_abs_by_source(layer.conv1.weight, bounds, t + 1)):
                matrix[s][t] = v
        after = next((m for _, m in children[i + 1:] if isinstance(m, (Transition, DenseBlock))), None)
        if isinstance(after, Transition):
            last, last_weight = f"transition {name[len('denseblock'):]}", after.conv.weight
        elif after is None and isinstance(model.classifier, nn.Linear):
            last, last_weight = "classifier", model.classifier.weight
        else:
            last, last_weight = None, None
        if last_weight is not None:
            for s, v in enumerate(_mean_abs_by_source(last_weight, bounds, n + 1)):
                matrix[s][n] = v
        targets = [f"layer {t + 1}" for t in range(n)] + [last or "none"]
        out.append({"name": f"dense block {name[len('denseblock'):]}", "sources": n + 1,
                    "targets": targets, "matrix": matrix})
    return out


def analyze(source: str | Path, out: str | Path, json_path: str | Path | None = None) -> dict:
    """Figure 5 of a run directory or checkpoint: the heat map PNG and (optionally) its JSON."""
    model, payload = load_model(source)
    name = payload["model"]["name"]
    blocks = feature_reuse(model)
    result = {"model": name, "source": str(source), "epoch": payload.get("epoch"),
              "normalisation": "mean absolute weight over the filters' weights that read each "
                               "source (L1 norm / number of weights)",
              "blocks": blocks}
    plot_feature_reuse(blocks, out, title=f"Feature reuse: {name} ({Path(source).name}"
                       + (f", epoch {payload['epoch']})" if payload.get("epoch") else ")"))
    if json_path is not None:
        atomic_write_json(json_path, result)
    return result


# ----------------------------------------------------------------------------- runs

def load_run(path: str | Path) -> dict:
    """A training run directory: its config, result (None while running) and metrics rows."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"run directory {path} does not exist.")
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory; give a training run directory "
                         f"(made by 'densenet train --out RUN_DIR').")
    config = read_json(path / "config.json") if (path / "config.json").is_file() else None
    result = read_json(path / "result.json") if (path / "result.json").is_file() else None
    metrics = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    if config is None and result is None and not metrics:
        raise UsageError(f"{path} is not a training run directory: it has no config.json, "
                         f"result.json or metrics.jsonl.")
    return {"name": path.name, "path": str(path), "config": config, "result": result,
            "metrics": metrics}


def _run_model(run: dict) -> tuple[str | None, dict]:
    cfg, res = run["config"] or {}, run["result"] or {}
    name = cfg.get("model") or res.get("model")
    overrides = dict(cfg.get("model_overrides") or {})
    if "num_classes" not in overrides:
        classes = cfg.get("num_classes") or {"cifar100": 100}.get(cfg.get("dataset"))
        if classes:
            overrides["num_classes"] = classes
    return name, overrides


def _run_shape(run: dict) -> dict:
    """Depth L, growth rate k, parameters and MACs of a run's model (from result.json where
    it has them, else from the model's definition)."""
    name, overrides = _run_model(run)
    res = run["result"] or {}
    out = {"model": name, "depth": None, "k": None, "params": res.get("params"),
           "macs": res.get("flops")}
    if name is None:
        return out
    try:
        model = _meta_model(name, **{k: v for k, v in overrides.items() if k != "implementation"})
    except UsageError:
        return out
    out["depth"] = getattr(model, "depth", None) or _depth([model])
    out["k"] = getattr(model, "growth_rate", None)
    if out["params"] is None:
        out["params"] = sum(p.numel() for p in model.parameters())
    if out["macs"] is None:
        size = (run["config"] or {}).get("input_size") or model_info(name).input_size
        out["macs"] = sum(r["macs"] for r in _summarize(model, size))
    return out


def _run_errors(run: dict) -> dict:
    res = run["result"] or {}
    last_val = next((m.get("val_error") for m in reversed(run["metrics"])
                     if m.get("val_error") is not None), None)
    best_val = res.get("best_val_error")
    if best_val is None:
        vals = [m["val_error"] for m in run["metrics"] if m.get("val_error") is not None]
        best_val = min(vals) if vals else None
    aurocs = [m["val_auroc"] for m in run["metrics"] if m.get("val_auroc") is not None]
    return {"final_val_error": res.get("final_val_error", last_val), "best_val_error": best_val,
            "test_error": res.get("test_error"),
            "best_val_auroc": res.get("best_val_auroc", max(aurocs) if aurocs else None)}


def report(paths: Sequence[str | Path]) -> list[dict]:
    """One row per run: model, L, k, params, recipe, errors, and the paper's error beside it."""
    rows = []
    for p in paths:
        run = load_run(p)
        shape = _run_shape(run)
        cfg, res = run["config"] or {}, run["result"] or {}
        recipe = cfg.get("recipe") or res.get("recipe")
        _, overrides = _run_model(run)
        paper = None
        if shape["model"] and recipe and set(overrides) <= _ARCH_NEUTRAL:
            paper = paper_error(shape["model"], recipe)
        errors = _run_errors(run)
        measured = errors["test_error"] if errors["test_error"] is not None else errors["final_val_error"]
        rows.append({"run": run["name"], **shape, "recipe": recipe,
                     "epochs": len(run["metrics"]) or res.get("epochs"), **errors,
                     "paper_error": paper, "paper_column": RECIPE_COLUMNS.get(recipe),
                     "difference": None if paper is None or measured is None else measured - paper,
                     "complete": run["result"] is not None})
    return rows


def format_report(rows: list[dict], markdown: bool = False) -> str:
    """The report as an aligned text table or a Markdown table (errors in %)."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    def signed(v):
        return "-" if v is None else f"{100 * v:+.2f}"

    header = ["run", "model", "L", "k", "params", "recipe", "epochs", "best val err %",
              "test err %", "paper err %", "diff"]
    body = [[r["run"] + ("" if r["complete"] else " (running)"), r["model"] or "-",
             str(r["depth"] or "-"), str(r["k"] or "-"),
             "-" if r["params"] is None else f"{r['params']:,}", r["recipe"] or "-",
             str(r["epochs"] or "-"), pct(r["best_val_error"]), pct(r["test_error"]),
             pct(r["paper_error"]), signed(r["difference"])] for r in rows]
    if any(r.get("best_val_auroc") is not None for r in rows):  # multi-label runs
        header.insert(8, "best val AUROC")
        for r, row in zip(rows, body):
            row.insert(8, "-" if r.get("best_val_auroc") is None else f"{r['best_val_auroc']:.4f}")
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i < 2 or i == 5 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]
        fmt = lambda row: "  ".join(c.ljust(w) if i in (0, 1, 5) else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(row, widths)))
        lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    lines.append("")
    lines.append("paper err: Table 2 test error for the run's recipe column (C10, C10+, C100, "
                 "C100+, SVHN) or Table 3 single-crop top-1 (imagenet); diff = test error (else "
                 "final validation error) minus the paper's.")
    return "\n".join(lines)


# A run's recipe -> the paper's result column its error compares with.
_RECIPE_COLUMN = {"c10": "C10", "c10+": "C10+", "c100": "C100", "c100+": "C100+", "svhn": "SVHN",
                  "imagenet": "ImageNet"}
_COLUMNS = (*TABLE2_COLUMNS, "ImageNet")
_FIGURE = {"ImageNet": "Figure 3", "C10+": "Figure 4 (middle)"}


def _run_point(run: dict, kind: str) -> dict:
    """A run as a point of error against parameters or MACs: its test error, else its final
    (else best) validation error."""
    shape = _run_shape(run)
    errors = _run_errors(run)
    for key, what in (("test_error", "test"), ("final_val_error", "validation"),
                      ("best_val_error", "best validation")):
        if errors[key] is not None:
            break
    else:
        raise UsageError(f"run {run['path']} has no error to plot yet (no validation or "
                         f"test error in result.json or metrics.jsonl).")
    x = shape["params"] if kind == "params" else shape["macs"]
    if x is None:
        raise UsageError(f"cannot tell the model of run {run['path']} (no config.json or "
                         f"result.json naming it).")
    try:
        family = model_info(shape["model"]).family
    except UsageError:
        family = "other"
    recipe = (run["config"] or {}).get("recipe") or (run["result"] or {}).get("recipe")
    return {"label": run["name"], "run": run["path"], "model": shape["model"], "family": family,
            "recipe": recipe, "x": int(x), "error": 100.0 * errors[key], "error_kind": what}


def _paper_column(runs: list[dict], paper: str, kind: str) -> str | None:
    """The paper column whose points the figure draws: ``paper`` itself (a column or a
    recipe name), none for "none", or for "auto" the column of the runs' recipe (Figure 3's
    ImageNet for FLOPs and Figure 4's C10+ for parameters when there are no runs)."""
    if paper == "none":
        return None
    if paper != "auto":
        by_name = {c.lower(): c for c in _COLUMNS} | _RECIPE_COLUMN
        if paper.lower() not in by_name:
            raise UsageError(f"--paper {paper!r} is not a result column of the paper; use one of "
                             f"{', '.join(_COLUMNS)}, auto or none.")
        return by_name[paper.lower()]
    if not runs:
        return "ImageNet" if kind == "flops" else "C10+"
    columns = {_RECIPE_COLUMN.get(r["recipe"]) for r in runs} - {None}
    if len(columns) > 1:
        raise UsageError(f"the runs were trained with recipes of different result columns "
                         f"({', '.join(sorted(columns))}); plot them separately, or pick the "
                         f"paper's points with --paper COLUMN (or --paper none).")
    return columns.pop() if columns else None


@functools.lru_cache(maxsize=None)
def _model_size(name: str, num_classes: int) -> tuple[int, int]:
    """(parameters, MACs at the native input size) of a registered model."""
    s = summary(name, num_classes=num_classes)
    return s["totals"]["params"], s["totals"]["macs"]


def tradeoff_figure(paths: Sequence[str | Path] = (), kind: str = "params", paper: str = "auto") -> dict:
    """The data of an error-against-parameters (or -MACs) figure: the paper's points of both
    families for one result column (Figure 3 for ImageNet, Figure 4 middle for C10+; x
    computed from each model's definition) and the runs at ``paths``, one series per family
    (DenseNet-BC, pre-activation ResNet, ...) for each. Errors in %."""
    if kind not in ("params", "flops"):
        raise UsageError(f"kind must be 'params' or 'flops', got {kind!r}.")
    run_points = [_run_point(load_run(p), kind) for p in paths]
    column = _paper_column(run_points, paper, kind)
    series: dict[tuple[str, str], dict] = {}

    def add(family: str, source: str, point: dict) -> None:
        name = f"{family} ({'paper' if source == 'paper' else 'runs'})"
        series.setdefault((source, family), {"name": name, "family": family, "source": source,
                                             "points": []})["points"].append(point)

    if column is not None:
        classes = 1000 if column == "ImageNet" else 100 if column.startswith("C100") else 10
        for p in paper_points(column):
            params, macs = _model_size(p["model"], classes)
            add(p["family"], "paper", {**p, "x": params if kind == "params" else macs})
    for p in run_points:
        add(p["family"], "runs", p)
    for s in series.values():
        s["points"].sort(key=lambda p: p["x"])
    title = None if column is None else (f"{_FIGURE[column]}: {column}" if column in _FIGURE
                                         else f"Table 2: {column}")
    return {"figure": _FIGURE.get(column) if column else None, "column": column, "kind": kind,
            "title": title or "your runs",
            "xlabel": "parameters" if kind == "params" else "FLOPs (multiply-adds per image)",
            "ylabel": "error (%)" if column is None else
            f"error (%), {'top-1 single-crop' if column == 'ImageNet' else column}",
            "series": list(series.values())}


def plot_runs(paths: Sequence[str | Path], out: str | Path, kind: str = "curves",
              paper: str = "auto", json_out: str | Path | None = None) -> dict | None:
    """Training curves of runs overlaid (Figure 4, right), or error against parameters or
    FLOPs (Figures 3 and 4, middle: :func:`tradeoff_figure`), its data also written as JSON
    to ``json_out``."""
    if kind == "curves":
        runs = [load_run(p) for p in paths]
        if not runs:
            raise UsageError("plot --kind curves needs at least one run directory.")
        for run in runs:
            if not run["metrics"]:
                raise UsageError(f"run {run['path']} has no metrics.jsonl rows yet (no finished "
                                 f"epoch); nothing to plot.")
        plot_curves([(run["name"], run["metrics"]) for run in runs], out)
        return None
    figure = tradeoff_figure(paths, kind, paper)
    if not any(s["points"] for s in figure["series"]):
        raise UsageError("nothing to plot: give run directories, or the paper's points with "
                         "--paper COLUMN.")
    plot_tradeoff(figure, out)
    if json_out is not None:
        atomic_write_json(json_out, figure)
    return figure
