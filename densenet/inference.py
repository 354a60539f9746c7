"""Using a trained DenseNet: ``densenet eval`` (top-1/top-5 error, single crop and the paper's
10-crop) and ``densenet predict`` (top-k classes of image files).

Both read only what a checkpoint carries (docs/run-directory.md): the model name and overrides,
the weights, the class names and the preprocessing. Foreign weights (torchvision, timm) come in
through ``--weights FILE --model NAME`` with the standard ImageNet preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import data as data_mod
from .errors import UsageError
from .metrics import evaluate_batches, evaluate_ten_crop, predict_multilabel
from .model import DenseNet, create_model, model_info
from .labels import options_from_fields
from .multilabel import label_metrics, require_sklearn
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, as_record, to_rgb
from .rundir import load_checkpoint, read_file, resolve_checkpoint_path
from .weights import extract_state_dict, load_strict


# ----------------------------------------------------------------------------- loading

def build_model(payload: dict) -> DenseNet:
    """The model a densenet checkpoint describes, with its weights loaded (eval mode)."""
    spec = payload["model"]
    model = create_model(spec["name"], **spec.get("overrides", {}))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def load_model(path: str | Path, prefer: str = "best") -> tuple[DenseNet, dict]:
    """(model, payload) from a run directory or a densenet checkpoint file."""
    payload = load_checkpoint(resolve_checkpoint_path(path, prefer))
    return build_model(payload), payload


@dataclass
class Loaded:
    """A model ready for inference and what it needs to see its inputs as in training."""
    model: DenseNet
    name: str                  # registered model name
    source: str                # the file the weights came from
    classes: list[str] | None  # label index -> class name; None for foreign weights
    pre: Preprocess            # how training made its inputs (docs/run-directory.md)
    csv_options: dict | None = None  # how training read a CSV manifest (densenet.labels.read_csv)
    thresholds: list[float] | None = None  # multi-label: each label's "yes" threshold (validation)
    task: str = "single-label"       # or "multi-label": a sigmoid per class name (label)

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label"

    @property
    def preprocess(self) -> dict:
        """The record as a checkpoint's ``preprocess`` dict."""
        return self.pre.to_dict()


def load_for_inference(source: str | None = None, *, weights: str | None = None,
                       model: str | None = None) -> Loaded:
    """A run directory or densenet checkpoint (``source``), or ``weights`` + ``model`` for a
    torchvision/timm state-dict file. The model comes back in eval mode on the CPU."""
    if weights is not None:
        if source is not None:
            raise UsageError("give either a run directory/checkpoint or --weights FILE --model "
                             "NAME, not both.")
        if model is None:
            raise UsageError(f"--weights {weights} needs --model NAME (e.g. --model densenet121): "
                             f"a torchvision or timm file holds weights but not the architecture.")
        return _load_foreign(weights, model)
    if source is None:
        raise UsageError("give a run directory or checkpoint file (or --weights FILE --model NAME).")
    if model is not None:
        raise UsageError(f"--model is only for --weights files; {source} names its own model.")
    path = resolve_checkpoint_path(source)
    payload = _unreadable_is_usage_error(load_checkpoint, path)
    pre = Preprocess.from_dict(payload.get("preprocess"), str(path))
    net = build_model(payload)
    classes = payload.get("classes")
    config = payload.get("config")
    return Loaded(_for_inference(net), payload["model"]["name"], str(path),
                  [str(c) for c in classes] if classes is not None else None, pre,
                  options_from_fields(config) if isinstance(config, dict) else None,
                  payload.get("thresholds"), payload.get("task", "single-label"))


def _load_foreign(weights: str, name: str) -> Loaded:
    info = model_info(name)
    state = extract_state_dict(_unreadable_is_usage_error(read_file, weights), weights)
    head = state.get("classifier.weight")
    overrides = {"num_classes": int(head.shape[0])} if head is not None and head.ndim == 2 else {}
    net = create_model(name, **overrides)
    load_strict(net, state, weights)
    if info.input_size >= 64:
        pre = Preprocess.files(info.input_size, IMAGENET_MEAN, IMAGENET_STD)
    else:  # a small-image net: its normalisation is not in the file (eval takes the data's)
        pre = Preprocess.small(info.input_size, info.input_size, None, None)
    return Loaded(_for_inference(net), name, str(weights), None, pre)


def _for_inference(net: DenseNet) -> DenseNet:
    # the same efficient ops as training: without gradients they keep one feature buffer per
    # block and nothing for backward (the plain path concatenates once per layer)
    return net.eval()


def _unreadable_is_usage_error(read, path):
    """``read(path)``; any failure to unpickle the file (torch.load raises KeyError, IndexError,
    ... on arbitrary bytes) is the user's file, not our fault."""
    try:
        return read(path)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint (truncated, corrupt, or another "
                         f"format): {type(e).__name__}: {e}.") from None


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in torchvision's label order (wnids sorted)."""
    from torchvision.models import DenseNet121_Weights
    return list(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])


# ----------------------------------------------------------------------------- images

def open_image(path: str | Path, pre: Preprocess | None = None):
    """An image file as an 8-bit RGB PIL image, whatever its mode, converted as the training
    data of ``pre`` was (:func:`densenet.preprocess.to_rgb` without one); clear errors
    otherwise."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.exists():
        raise UsageError(f"image {path} does not exist.")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not an image file.")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            return to_rgb(img) if pre is None else pre.convert(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise UsageError(f"{path} is not a readable image (corrupt, truncated, or not a format "
                         f"Pillow reads): {str(e).splitlines()[0] if str(e) else type(e).__name__}."
                         ) from None


def image_transform(pre: Preprocess | dict, ten_crop: bool = False):
    """PIL image -> normalised tensor as training fed the model, for a record or a checkpoint's
    ``preprocess`` dict (:meth:`Preprocess.eval_transform`)."""
    return as_record(pre).eval_transform(ten_crop)


class _ImageFileSet(torch.utils.data.Dataset):
    """(path, label) samples decoded with :func:`open_image` and the record's transform."""

    def __init__(self, samples, pre: Preprocess, transform):
        self.samples, self.pre, self.transform = list(samples), pre, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(open_image(path, self.pre)), int(label)


# ----------------------------------------------------------------------------- volumes

def open_volume(path: str | Path, pre: Preprocess) -> torch.Tensor:
    """A volume file (NIfTI, NumPy) as the model's input: float32 (C, D, H, W), resized and
    normalised as training prepared its volumes (a "volume" record); clear errors for a bad
    file or one with another number of channels."""
    from .volumes import prepare_volume, read_volume
    if pre.kind != "volume":
        raise UsageError(f"{path} is a volume but the model was trained on {pre.kind} images; "
                         f"give it image files.")
    array = read_volume(path)
    if array.shape[0] != pre.channels:
        raise UsageError(f"{path} has {array.shape[0]} channel(s) but the model was trained on "
                         f"{pre.channels}-channel volumes.")
    return prepare_volume(array, pre.shape, pre.intensity)


def _open_input(path: Path, pre: Preprocess) -> torch.Tensor:
    """One input file as the model sees it: a volume for a volume model, else an image."""
    if pre.kind == "volume":
        return open_volume(path, pre)
    from .volumes import is_volume_file
    if is_volume_file(path):
        raise UsageError(f"{path} is a volume but the model was trained on 2-D images; give it "
                         f"image files.")
    return pre.eval_transform()(open_image(path, pre))


# ----------------------------------------------------------------------------- predict

def predict(loaded: Loaded, images: Iterable[str | Path], topk: int = 5,
            batch_size: int = 32, device: torch.device | str = "cpu") -> list[dict]:
    """Top-k ``[(class name, probability), ...]`` for each image (or volume) file, in order."""
    pre = loaded.pre
    if pre.mean is None and pre.kind != "volume":
        raise UsageError(f"{loaded.source} does not say how its inputs were normalised (a "
                         f"small-image net from a foreign file); predict needs a checkpoint "
                         f"written by 'densenet train'.")
    names = loaded.classes
    num_classes = loaded.model.classifier.out_features
    if names is None:
        names = imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    paths = [Path(p) for p in images]
    tensors = [_open_input(p, pre) for p in paths]  # every path checked before any work
    model = loaded.model.to(device).eval()
    k = min(topk, num_classes)
    out = []
    if loaded.multi_label:  # every label's probability, and whether it passes its threshold
        thresholds = loaded.thresholds or [0.5] * num_classes
        with torch.no_grad():
            for i in range(0, len(tensors), batch_size):
                probs = model(torch.stack(tensors[i:i + batch_size]).to(device)).float().sigmoid()
                for j, row in enumerate(probs.tolist()):
                    out.append({"image": str(paths[i + j]), "labels": [
                        {"label": n, "probability": q, "threshold": t, "positive": q >= t}
                        for n, q, t in zip(names, row, thresholds)]})
        return out
    with torch.no_grad():
        for i in range(0, len(tensors), batch_size):
            x = torch.stack(tensors[i:i + batch_size]).to(device)
            probs = model(x).float().softmax(1)
            p, idx = probs.topk(k, dim=1)
            for j in range(x.shape[0]):
                out.append({"image": str(paths[i + j]),
                            "top": [(names[c], float(q)) for q, c in zip(p[j].tolist(), idx[j].tolist())]})
    return out


# ----------------------------------------------------------------------------- eval

def class_index_map(data_classes: list[str], model_classes: list[str] | None,
                    num_outputs: int, source: str) -> torch.Tensor:
    """data label -> model label, matched by class name (so class-folder order does not matter)."""
    data_classes = [str(c) for c in data_classes]
    if model_classes is None:  # foreign weights: the data's order is the model's
        if len(data_classes) > num_outputs:
            raise UsageError(f"the data has {len(data_classes)} classes but the model in {source} "
                             f"has only {num_outputs} outputs.")
        return torch.arange(len(data_classes))
    where = {c: i for i, c in enumerate(model_classes)}
    missing = [c for c in data_classes if c not in where]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UsageError(f"the data has class(es) {shown} that the model in {source} was not "
                         f"trained on (its classes: {', '.join(model_classes[:10])}"
                         f"{' ...' if len(model_classes) > 10 else ''}); evaluate on data with "
                         f"the same class names.")
    return torch.tensor([where[c] for c in data_classes])


def _relabelled(batches: Iterable, mapping: torch.Tensor) -> Iterator:
    try:
        for x, y in batches:
            yield x, mapping.to(y.device)[y]
    except UsageError as e:
        # A DataLoader worker's error comes back with the worker's traceback in its message;
        # the user needs only the last line (e.g. which image is corrupt).
        message = str(e).strip()
        if "Original Traceback" in message:
            raise UsageError(message.splitlines()[-1].split("UsageError: ", 1)[-1]) from None
        raise


SPLITS = ("test", "val", "train")


def open_data(data: str, loaded: Loaded):
    """The data set at ``data`` read as ``loaded``'s training read its data: volumes resized
    and normalised by the checkpoint's record, images and CSV manifests as ``densenet train``
    reads them."""
    from .volumes import detect_volumes, open_volumes
    pre = loaded.pre
    is_csv = str(data).lower().endswith(".csv")
    if pre.kind == "volume":
        if Path(data).expanduser().exists() and not detect_volumes(data, csv_options=loaded.csv_options if is_csv else None):
            raise UsageError(f"{loaded.source} is a volume model but {data} holds no volume files "
                             f"(.nii, .nii.gz, .npy, .npz in class folders, or a CSV manifest of "
                             f"them); evaluate it on volumes like its training data.")
        ds = open_volumes(data, shape=pre.shape, intensity=pre.intensity,
                          csv_options=loaded.csv_options if is_csv else None)
        channels = int(ds.train.images.shape[1])
        if channels != pre.channels:
            raise UsageError(f"{data} holds {channels}-channel volumes but {loaded.source} was "
                             f"trained on {pre.channels}-channel ones.")
        return ds
    if Path(data).expanduser().exists() and detect_volumes(data):
        raise UsageError(f"{data} holds volumes but {loaded.source} is a 2-D image model; "
                         f"evaluate a model trained on volumes.")
    return data_mod.open_dataset(data, csv_options=loaded.csv_options)


def _volume_loader(part, device, batch_size: int | None):
    from .volumes import VolumeLoader
    return VolumeLoader(part.to(device), batch_size or 4)


def _pick_split(ds, split: str | None):
    if split is not None:
        part = getattr(ds, split)
        if part is None:
            have = [s for s in SPLITS if getattr(ds, s) is not None]
            raise UsageError(f"the data set has no {split} split (it has: {', '.join(have)}); "
                             f"choose one with --split.")
        return split, part
    for name in SPLITS:  # the held-out part when there is one; a bare class folder otherwise
        if getattr(ds, name) is not None:
            return name, getattr(ds, name)
    raise UsageError("the data set holds no images.")


def evaluate(loaded: Loaded, data: str, split: str | None = None, ten_crop: bool = False,
             batch_size: int | None = None, device: torch.device | str = "cpu",
             workers: int = 2) -> dict:
    """Top-1 / top-5 error (fractions) of ``loaded`` on a data set ``densenet train`` reads.

    Small images are evaluated whole at their native size with the checkpoint's mean/std. Large
    ones: Resize + CenterCrop (single crop) and, with ``ten_crop``, the paper's 10-crop (four
    corners and centre, and their mirrors; softmax averaged); the single-crop numbers then come
    from the centre crop of the same pass.
    """
    ds = open_data(data, loaded)
    split, part = _pick_split(ds, split)
    device = torch.device(device)
    model = loaded.model.to(device).eval()
    if loaded.multi_label or ds.multi_label:
        return _evaluate_multilabel(loaded, ds, data, split, part, batch_size, device, workers)
    mapping = class_index_map(ds.classes, loaded.classes, model.classifier.out_features, loaded.source)
    pre = loaded.pre
    result = {"model": loaded.name, "checkpoint": loaded.source, "data": str(data),
              "dataset": ds.name, "split": split, "n": len(part)}
    if pre.kind == "volume":
        if ten_crop:
            raise UsageError("--ten-crop is the ImageNet protocol (crops of a resized image); "
                             "volumes are evaluated whole. Leave out --ten-crop.")
        r = evaluate_batches(model, _relabelled(_volume_loader(part, device, batch_size), mapping), device)
        result["single_crop"] = {"top1_error": r["error"], "top5_error": r["top5_error"],
                                 "loss": r["loss"]}
        return result
    if ds.small != (pre.kind == "small"):
        raise UsageError(
            f"{loaded.source} was trained on {'small (32 px)' if pre.kind == 'small' else 'large (ImageNet-size)'} "
            f"images but {data} holds {'small' if ds.small else 'large'} ones; evaluate on data "
            f"like the training data.")
    if ds.small:
        if ten_crop:
            raise UsageError("--ten-crop is the ImageNet protocol (224-pixel crops of a 256-pixel "
                             "image); small-image (CIFAR/SVHN) models are evaluated on the whole "
                             "32x32 image, as in the paper. Leave out --ten-crop.")
        if pre.mean is None:  # foreign small-image weights: normalise as training would
            pre = pre.with_stats(*ds.channel_stats())
        if part.images.shape[-1] != pre.image_size:
            raise UsageError(f"{data} holds {part.images.shape[-1]}-pixel images but the model "
                             f"was trained on {pre.image_size}-pixel ones.")
        loader = data_mod.DeviceLoader(part.to(device), batch_size or (32 if pre.upscaled else 500),
                                       preprocess=pre)
        r = evaluate_batches(model, _relabelled(loader, mapping), device)
        result["single_crop"] = {"top1_error": r["error"], "top5_error": r["top5_error"],
                                 "loss": r["loss"]}
        return result
    if ten_crop:
        dataset = _ImageFileSet(part.samples, pre, pre.eval_transform(ten_crop=True))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size or 16,
                                             num_workers=workers, pin_memory=device.type == "cuda")
        single, ten = evaluate_ten_crop(model, _relabelled(loader, mapping), device)
        result["single_crop"] = single
        result["ten_crop"] = ten
        return result
    loader = data_mod.make_file_loader(part, batch_size or 100, train=False, preprocess=pre,
                                       workers=workers)
    r = evaluate_batches(model, _relabelled(loader, mapping), device)
    result["single_crop"] = {"top1_error": r["error"], "top5_error": r["top5_error"], "loss": r["loss"]}
    return result


def _evaluate_multilabel(loaded: Loaded, ds, data, split, part, batch_size, device, workers) -> dict:
    """Per-label AUROC, AP, and F1 / sensitivity / specificity at the checkpoint's thresholds,
    labels matched by name (the data may list them in another order, or only some)."""
    if not (loaded.multi_label and ds.multi_label):
        what = "multi-label" if loaded.multi_label else "single-label"
        raise UsageError(f"{loaded.source} is a {what} model but {data} holds "
                         f"{'multi' if ds.multi_label else 'single'}-label data; evaluate it on "
                         f"data like its training data.")
    require_sklearn()
    where = {n: i for i, n in enumerate(loaded.classes)}
    unknown = [n for n in ds.classes if n not in where]
    if unknown:
        raise UsageError(f"{data} has label(s) {', '.join(unknown)} that {loaded.source} was not "
                         f"trained on (its labels: {', '.join(loaded.classes)}).")
    cols = [where[n] for n in ds.classes]
    pre = loaded.pre
    if pre.kind == "volume":
        loader = _volume_loader(part, device, batch_size)
    elif ds.small:
        loader = data_mod.DeviceLoader(part.to(device), batch_size or 500, preprocess=pre)
    else:
        loader = data_mod.make_file_loader(part, batch_size or 100, train=False, preprocess=pre,
                                           workers=workers)
    out = predict_multilabel(loaded.model, loader, device)
    probs, targets = out["probs"][:, cols], out["targets"]
    thresholds = [(loaded.thresholds or [0.5] * len(where))[c] for c in cols]
    metrics = label_metrics(probs, torch.nan_to_num(targets), ~torch.isnan(targets), ds.classes,
                            thresholds)
    return {"model": loaded.name, "checkpoint": loaded.source, "data": str(data),
            "dataset": ds.name, "split": split, "n": len(part), "task": "multi-label", **metrics}


USER_DATA = ("folder", "csv", "volumes")
"""Data sets read from the user's own files: results name their path, not the reader."""


def _evaluated_on(r: dict) -> str:
    """What a result was computed on: "cifar10 test", or the user's path and split."""
    if r.get("dataset") in USER_DATA:
        return f"{r['data']} ({r['split']} split)"
    return f"{r['dataset']} {r['split']}"


def format_result(r: dict) -> str:
    if r.get("task") == "multi-label":
        return _format_multilabel(r)
    what = "volumes" if r.get("dataset") == "volumes" else "images"
    lines = [f"{r['model']} ({r['checkpoint']}) on {_evaluated_on(r)}: {r['n']:,} {what}",
             f"{'protocol':<12} {'top-1 err':>10} {'top-5 err':>10}"]
    for key, label in (("single_crop", "single crop"), ("ten_crop", "10-crop")):
        if key in r:
            lines.append(f"{label:<12} {100 * r[key]['top1_error']:>9.2f}% "
                         f"{100 * r[key]['top5_error']:>9.2f}%")
    return "\n".join(lines)


def _format_multilabel(r: dict) -> str:
    def num(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.4f}")
    lines = [f"{r['model']} ({r['checkpoint']}) on {_evaluated_on(r)}: {r['n']:,} images",
             f"{'label':<24} {'AUROC':>7} {'AP':>7} {'thresh':>7} {'F1':>7} {'sens':>7} {'spec':>7} "
             f"{'pos':>6} {'neg':>6}"]
    for name, m in r["labels"].items():
        lines.append(f"{name[:24]:<24} {num(m['auroc']):>7} {num(m['ap']):>7} {num(m.get('threshold')):>7} "
                     f"{num(m.get('f1')):>7} {num(m.get('sensitivity'), True):>7} "
                     f"{num(m.get('specificity'), True):>7} {m['positives']:>6} {m['negatives']:>6}")
    lines.append(f"mean AUROC {num(r['mean_auroc'])} (labels with both classes present; '-': undefined)")
    return "\n".join(lines)
