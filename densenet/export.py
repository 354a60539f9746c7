"""Shipping a trained DenseNet: ONNX, TorchScript or a torch.export ExportedProgram.

Every export is checked by loading the written file back (onnxruntime for ONNX) and comparing
its logits with PyTorch's on random inputs at batch sizes other than the one traced, so the
dynamic batch axis is checked too. The check is relative to the logits' scale: float32 rounding
grows with the numbers rounded, and an untrained net's logits reach 1e5. Each file carries the
model name, class names and preprocessing as metadata (``densenet.json``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import UsageError
from .inference import Loaded, load_for_inference

# Max relative logit difference (see Difference) allowed between the exported file and eager
# PyTorch. ONNX runs other kernels (onnxruntime), so float32 sums come out in another order; the
# others run PyTorch's own.
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5, "exported-program": 1e-5}
FORMATS = tuple(TOLERANCE)
CHECK_BATCHES = (1, 3)  # neither is the traced batch (2): the batch axis must really be dynamic
# The smallest logit scale a difference is divided by: logits all near zero are compared
# absolutely instead of dividing by almost nothing.
SCALE_FLOOR = 1.0


class Difference(NamedTuple):
    """How far the file's logits are from PyTorch's over all the checked batches."""
    max_abs_diff: float  # max |file - PyTorch|
    scale: float         # max |PyTorch logit|

    @property
    def relative(self) -> float:
        """max |file - PyTorch| / max(max |PyTorch logit|, SCALE_FLOOR)."""
        return self.max_abs_diff / max(self.scale, SCALE_FLOOR)


def metadata(loaded: Loaded) -> dict:
    meta = {"model": loaded.name, "classes": loaded.classes, "preprocess": loaded.preprocess,
            "input": "images: float32 (N, 3, H, W), normalised with preprocess mean/std",
            "output": "logits: float32 (N, num_classes)"}
    if loaded.pre.kind == "volume":
        meta["input"] = (f"volumes: float32 (N, {loaded.pre.channels}, D, H, W) = (N, C, "
                         f"{', '.join(map(str, loaded.pre.shape))}), RAS+ orientation, resized "
                         f"and normalised per volume as preprocess says (intensity)")
    if loaded.multi_label:  # a sigmoid per label, and the threshold where each says "yes"
        meta.update(task="multi-label", thresholds=loaded.thresholds,
                    output="logits: float32 (N, num_labels); sigmoid(logit) is the label's "
                    "probability, positive where it is >= thresholds[label]")
    return meta


def export(loaded: Loaded, fmt: str, out: str | os.PathLike, tolerance: float | None = None,
           seed: int = 0) -> dict:
    """Write ``loaded.model`` as ``fmt`` to ``out`` and verify the file; returns the report."""
    if fmt not in TOLERANCE:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name (e.g. {out / 'model.onnx'}).")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The files must run without this package: the plain modules, not the densenet:: ops (an
    # ExportedProgram of the default model would hold them; ONNX and TorchScript know neither).
    model = copy.deepcopy(loaded.model).cpu().float().eval().set_implementation("reference")
    size = input_shape(loaded)
    in_channels = model.in_channels
    example = torch.randn(2, in_channels, *size, generator=torch.Generator().manual_seed(seed))
    meta = json.dumps(metadata(loaded))
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # keep the suffix: torch.export checks it
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # deprecation notes and exporter chatter
            _WRITERS[fmt](model, example, tmp, meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    diff = verify(fmt, out, model, in_channels, size, seed + 1)
    tol = TOLERANCE[fmt] if tolerance is None else tolerance
    return {"format": fmt, "out": str(out), "bytes": out.stat().st_size,
            "max_abs_diff": diff.max_abs_diff, "logit_scale": diff.scale,
            "max_rel_diff": diff.relative, "tolerance": tol,
            "check_batches": list(CHECK_BATCHES), "ok": diff.relative <= tol}


def input_shape(loaded: Loaded) -> tuple[int, ...]:
    """The spatial shape of the model's input: (H, W) for images, (D, H, W) for volumes."""
    if loaded.pre.kind == "volume":
        return tuple(loaded.pre.shape)
    return (loaded.pre.input_size,) * getattr(loaded.model, "spatial_dims", 2)


def _batch_dim():
    return torch.export.Dim("batch", min=1)


def _write_onnx(model, example, path: Path, meta: str) -> None:
    onnx = require_onnx()
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: _batch_dim()},),
                      external_data=False, verbose=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "densenet.json", meta
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _write_torchscript(model, example, path: Path, meta: str) -> None:
    # Tracing, not scripting: DenseLayer takes a list of tensors, which tracing flattens away.
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(path), _extra_files={"densenet.json": meta})


def _write_exported_program(model, example, path: Path, meta: str) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path), extra_files={"densenet.json": meta})


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript,
            "exported-program": _write_exported_program}


def require_onnx():
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: pip install 'densenet-torch[export]' (or pip install "
                         f"{' '.join(missing)}).")
    import onnx
    return onnx


def load_exported(fmt: str, path: str | os.PathLike):
    """A callable ``images (N, C, H, W) float32 tensor -> logits tensor`` from an exported file."""
    path = str(path)
    if fmt == "onnx":
        require_onnx()
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "torchscript":
        module = torch.jit.load(path, map_location="cpu")
        return lambda x: module(x)
    if fmt == "exported-program":
        module = torch.export.load(path).module()
        return lambda x: module(x)
    raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")


@torch.no_grad()
def verify(fmt: str, path: str | os.PathLike, model: torch.nn.Module, in_channels: int,
           size: int | tuple, seed: int = 1) -> Difference:
    """The logit difference between the file and ``model`` on random N(0, 1) inputs (the scale
    of normalised images) at each of CHECK_BATCHES; ``size`` is the side of a square image or
    the input's spatial shape."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = load_exported(fmt, path)
        gen = torch.Generator().manual_seed(seed)
        diff = scale = 0.0
        for n in CHECK_BATCHES:
            x = torch.randn(n, in_channels, *shape, generator=gen)
            expected = model(x).float()
            diff = max(diff, (run(x).float() - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    return Difference(diff, scale)
