"""The paper's figures as PNG files: training curves (Figure 4, right), error against parameters
or FLOPs (Figures 3 and 4), and the feature-reuse heat map (Figure 5).

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, so no
global state and no display needed) and written atomically, so a reader of ``curves.png`` never
sees half a file while training rewrites it every epoch.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

from .rundir import atomic_write_bytes

__all__ = ["plot_curves", "plot_tradeoff", "plot_feature_reuse"]

DPI = 100
CURVES_SIZE = (10.0, 4.0)  # inches; the PNG is figsize * DPI pixels


def _figure(figsize: tuple[float, float], layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    # No bbox_inches="tight": the file is exactly figsize * DPI pixels, as asked.
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(out_path, buf.getvalue())


def _series(metrics: Sequence[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    """(epochs, values) of one metric, skipping epochs where it is null (no validation data)."""
    xs, ys = [], []
    for i, row in enumerate(metrics):
        value = row.get(key)
        if value is None:
            continue
        xs.append(row.get("epoch", i + 1))
        ys.append(value * scale)
    return xs, ys


def plot_curves(runs: Sequence[tuple[str, Sequence[dict]]], out_path: str | os.PathLike,
                figsize: tuple[float, float] = CURVES_SIZE) -> None:
    """Loss (left) and error in % (right) against epoch; solid = train, dashed = validation;
    for multi-label runs (rows with ``val_auroc``) a third panel of mean validation AUROC.

    ``runs`` is a list of ``(label, metrics)`` with ``metrics`` the rows of ``metrics.jsonl``
    (errors as fractions; ``val_loss``/``val_error`` may be null).
    """
    multi = any(m.get("val_auroc") is not None for _, metrics in runs for m in metrics)
    fig = _figure(figsize if not multi else (figsize[0] * 1.5, figsize[1]))
    axes = fig.subplots(1, 3 if multi else 2)
    ax_loss, ax_err = axes[0], axes[1]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, metrics), color in zip(runs, colors):
        if multi:  # multi-label runs: mean validation AUROC, what picks their best epoch
            xs, ys = _series(metrics, "val_auroc", 1.0)
            if xs:
                axes[2].plot(xs, ys, color=color, linestyle="--", marker="." if len(xs) < 30 else None,
                             label=f"{label} validation")
        for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_err, "error", 100.0)):
            xs, ys = _series(metrics, f"train_{key}", scale)
            if xs:
                ax.plot(xs, ys, color=color, linestyle="-", marker="." if len(xs) < 30 else None,
                        label=f"{label} train")
            xs, ys = _series(metrics, f"val_{key}", scale)
            if xs:
                ax.plot(xs, ys, color=color, linestyle="--", marker="." if len(xs) < 30 else None,
                        label=f"{label} validation")
    if multi:
        ax_loss.set(xlabel="epoch", ylabel="loss (binary cross-entropy)", title="Loss")
        ax_err.set(xlabel="epoch", ylabel="images with a wrong label (%)", title="Error")
        axes[2].set(xlabel="epoch", ylabel="mean AUROC", title="Mean AUROC")
    else:
        ax_loss.set(xlabel="epoch", ylabel="loss (cross-entropy)", title="Loss")
        ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="Error")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, out_path)


def plot_tradeoff(figure: dict, out_path: str | os.PathLike, figsize: tuple[float, float] = (7.5, 5.0)) -> None:
    """Error (%) against parameters or FLOPs (Figures 3 and 4, middle): each series of
    ``figure`` (:func:`densenet.analysis.tradeoff_figure`) as labelled points joined in order
    of x, one colour per family; the paper's points as circles with solid lines, runs as stars
    with dashed lines. The x axis is logarithmic when it spans more than a factor of 20."""
    fig = _figure(figsize)
    ax = fig.subplots()
    families = list(dict.fromkeys(s["family"] for s in figure["series"]))
    xs_all = []
    for s in figure["series"]:
        pts = s["points"]
        if not pts:
            continue
        color = f"C{families.index(s['family']) % 10}"
        paper = s["source"] == "paper"
        xs, ys = [p["x"] for p in pts], [p["error"] for p in pts]
        xs_all += xs
        ax.plot(xs, ys, color=color, linestyle="-" if paper else "--", marker="o" if paper else "*",
                markersize=6 if paper else 11, alpha=0.9, label=s["name"], zorder=3)
        for p in pts:
            ax.annotate(p["label"], (p["x"], p["error"]), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small", color=color)
    if xs_all and max(xs_all) > 20 * min(xs_all):
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
    ax.set(xlabel=figure["xlabel"], ylabel=figure["ylabel"], title=figure.get("title", ""))
    ax.grid(True, alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, out_path)


def plot_feature_reuse(blocks: Sequence[dict], out_path: str | os.PathLike,
                       title: str | None = None, panel_size: float = 4.0) -> None:
    """Figure 5: one heat map per dense block, all on one colour scale.

    Each entry of ``blocks`` is ``{"name", "matrix", "targets"}`` with ``matrix[s][t]`` the mean
    absolute weight from source s (0 = the block's input, s = layer s) to target t (the block's
    layers "layer 1".."layer n", then "transition i" or "classifier"); null where t does not
    read s.
    """
    import numpy as np

    mats = [np.array([[np.nan if v is None else v for v in row] for row in b["matrix"]], dtype=float)
            for b in blocks]
    finite = np.concatenate([m[np.isfinite(m)] for m in mats]) if mats else np.array([])
    # Colours span the observed range (as the paper's figure), shown on the colour bar.
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size and finite.max() > vmin else vmin + 1.0
    fig = _figure((panel_size * len(blocks) + 1.0, panel_size), layout="constrained")
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    cmap = _reuse_cmap()
    image = None
    for ax, block, m in zip(axes, blocks, mats):
        image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax,
                          origin="upper", interpolation="nearest", aspect="auto")
        n_src, n_tgt = m.shape
        ax.set_title(block["name"])
        ax.set_xlabel("target layer (l)")
        if ax is axes[0]:
            ax.set_ylabel("source layer (s)")
        ticks = _ticks(n_tgt)
        ax.set_xticks(ticks)
        ax.set_xticklabels([_short(block["targets"][t]) for t in ticks],
                           fontsize="small")
        src_ticks = _ticks(n_src)
        ax.set_yticks(src_ticks)
        ax.set_yticklabels([str(s) for s in src_ticks], fontsize="small")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="mean |weight|", fraction=0.03, pad=0.02)
    fig.supxlabel("last column: T = transition layer, C = classification layer", fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, out_path)


def _short(target: str) -> str:
    """'layer 3' -> '3', 'transition 1' -> 'T', 'classifier' -> 'C'."""
    if target.startswith("layer "):
        return target[len("layer "):]
    return {"classifier": "C"}.get(target, target[:1].upper())


def _ticks(n: int) -> list[int]:
    """Up to ~8 evenly spaced tick positions that always include the first and last."""
    step = max(1, round(n / 8))
    ticks = list(range(0, n, step))
    if ticks[-1] != n - 1:
        if n - 1 - ticks[-1] < step / 2:
            ticks[-1] = n - 1
        else:
            ticks.append(n - 1)
    return ticks


def _reuse_cmap():
    # The paper uses a red (strong) to blue (weak) scale; unused cells stay white.
    from matplotlib import colormaps
    return colormaps["jet"].with_extremes(bad="white")
