"""Which library computes the per-label metrics of ``densenet.multilabel``: scikit-learn or
torchmetrics, measured.

    .venv/bin/python benchmarks/auroc_libraries.py [--labels 14] [--samples 25000] [--repeats 5]

The workload is one evaluation of a ChestX-ray14-sized test set (Wang et al., CVPR 2017: 14
labels, about 25,000 test images; CheXNet, Rajpurkar et al. 2017, reports per-label AUROC on
it): AUROC and average precision of each label, exact (no binning). scikit-learn's
``roc_auc_score`` + ``average_precision_score`` on float64 numpy columns (what
``densenet.multilabel.label_metrics`` calls) against torchmetrics' ``binary_auroc`` +
``binary_average_precision`` on CPU tensors, one label at a time, and its vectorised
``multilabel_auroc`` / ``multilabel_average_precision`` (``average=None``). Each is timed as the
median of ``--repeats`` runs after one warm-up, and checked against scikit-learn (max abs diff).

Also measured, for the cost of the dependency rather than of the call: the import time of each
library in a fresh interpreter that has already imported torch (densenet always has), and one
that has also imported densenet-torch's other heavy dependencies (torchvision, scipy, matplotlib),
which torchmetrics imports when they are installed (median of 5 processes, file cache warm),
and the installed size of the library plus the dependencies it brings that densenet-torch does
not already require. torchmetrics is optional here: without it its rows say so.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_data(samples: int, labels: int, seed: int = 0):
    """Probabilities with some signal and ChestX-ray14-like prevalences (1% to 20%)."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.01, 0.20, labels)
    targets = (rng.random((samples, labels)) < prevalence).astype(np.int64)
    logits = rng.normal(size=(samples, labels)) + 1.5 * targets
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    return probs, targets


def timed(fn, repeats: int):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def sklearn_metrics(probs, targets):
    from sklearn.metrics import average_precision_score, roc_auc_score
    p, t = probs.astype(np.float64), targets
    return (np.array([roc_auc_score(t[:, j], p[:, j]) for j in range(p.shape[1])]),
            np.array([average_precision_score(t[:, j], p[:, j]) for j in range(p.shape[1])]))


def torchmetrics_binary(probs, targets):
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision
    p, t = torch.from_numpy(probs), torch.from_numpy(targets)
    return (np.array([binary_auroc(p[:, j], t[:, j]).item() for j in range(p.shape[1])]),
            np.array([binary_average_precision(p[:, j], t[:, j]).item()
                      for j in range(p.shape[1])]))


def torchmetrics_multilabel(probs, targets):
    from torchmetrics.functional.classification import (multilabel_auroc,
                                                        multilabel_average_precision)
    p, t = torch.from_numpy(probs), torch.from_numpy(targets)
    n = p.shape[1]
    return (multilabel_auroc(p, t, num_labels=n, average=None).numpy().astype(np.float64),
            multilabel_average_precision(p, t, num_labels=n, average=None).numpy()
            .astype(np.float64))


def import_seconds(module: str, first: str = "torch", runs: int = 5) -> float | None:
    """Median time to import ``module`` in a fresh interpreter that already imported ``first``."""
    code = (f"import time, {first}; t = time.perf_counter(); import {module}; "
            f"print(time.perf_counter() - t)")
    times = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            return None
        times.append(float(r.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


# densenet-torch's other heavy dependencies, which torchmetrics imports when they are there;
# densenet's training and evaluation import none of them.
DEPS = "torch, torchvision, scipy.stats, matplotlib.pyplot"


def import_times(module: str) -> tuple[float | None, float | None]:
    return import_seconds(module), import_seconds(module, first=DEPS)


def _requires(dist: str) -> list[str]:
    names = []
    for req in md.requires(dist) or []:
        if "extra ==" in req:
            continue
        names.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(dists) -> set[str]:
    seen, todo = set(), [_norm(d) for d in dists]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo.extend(_norm(r) for r in _requires(name))
    return seen


def _core_requirements() -> list[str]:
    """densenet-torch's own (non-optional) dependencies, from pyproject.toml."""
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.match(r"[A-Za-z0-9._-]+", d).group(0) for d in deps]


def _dist_bytes(name: str) -> int:
    files = md.distribution(name).files or []
    return sum(f.locate().stat().st_size for f in files if f.locate().is_file())


def installed_mb(dist: str) -> tuple[float, float, list[str]] | None:
    """(the library's own MB, MB with the dependencies densenet-torch does not already bring,
    those dependencies' names)."""
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return None
    base = _closure(_core_requirements())
    extra = sorted(_closure([dist]) - base - {_norm(dist)})
    own = _dist_bytes(dist)
    return own / 1e6, (own + sum(_dist_bytes(d) for d in extra)) / 1e6, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--samples", type=int, default=25_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    probs, targets = make_data(args.samples, args.labels)

    try:
        import torchmetrics
        tm_version = torchmetrics.__version__
    except ImportError:
        tm_version = None
    import sklearn

    s_time, (s_auroc, s_ap) = timed(lambda: sklearn_metrics(probs, targets), args.repeats)
    rows = [(f"scikit-learn {sklearn.__version__}", "roc_auc_score + average_precision_score",
             s_time, 0.0, 0.0, import_times("sklearn.metrics"), installed_mb("scikit-learn"))]
    if tm_version is None:
        rows.append(("torchmetrics (not installed)", "-", None, None, None, None, None))
    else:
        tm_import = import_times("torchmetrics.functional.classification")
        tm_size = installed_mb("torchmetrics")
        for name, fn in (("binary_auroc + binary_average_precision, per label",
                          torchmetrics_binary),
                         ("multilabel_auroc + multilabel_average_precision",
                          torchmetrics_multilabel)):
            t, (auroc, apv) = timed(lambda: fn(probs, targets), args.repeats)
            rows.append((f"torchmetrics {tm_version}", name, t,
                         float(np.abs(auroc - s_auroc).max()), float(np.abs(apv - s_ap).max()),
                         tm_import, tm_size))

    print(f"{args.labels} labels x {args.samples} samples, median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}; "
          f"mean AUROC {s_auroc.mean():.4f}\n")
    print("| library | functions | time (ms) | max abs diff AUROC | max abs diff AP "
          "| import after torch (ms) | import after densenet's deps (ms) "
          "| installed MB (own / with new deps) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    def ms(imp, i):
        return "-" if imp is None or imp[i] is None else f"{1e3 * imp[i]:.0f}"

    for lib, fns, t, d_auroc, d_ap, imp, size in rows:
        size_s = "-" if size is None else (f"{size[0]:.1f} / {size[1]:.1f}"
                                           + (f" (+{', '.join(size[2])})" if size[2] else ""))
        print(f"| {lib} | {fns} | {f(None if t is None else 1e3 * t, '.1f')} "
              f"| {f(d_auroc, '.1e')} | {f(d_ap, '.1e')} "
              f"| {ms(imp, 0)} | {ms(imp, 1)} | {size_s} |")


if __name__ == "__main__":
    main()
