"""3-D volumes: medical scans (NIfTI, NumPy) loaded for training 3-D DenseNets.

The setting is MONAI's 3-D classification tutorial: IXI T1 brain scans in ``.nii.gz``, resized
to 96^3 and fed to a 3-D DenseNet two at a time. Scans are a few hundred per data set but
megabytes each, and decoding a gzipped NIfTI takes longer than a training step, so every volume
is read, reoriented, resized and normalised ONCE (:func:`prepare_volume`), cached as one float16
tensor (:class:`VolumeTensors`), kept whole on the training device and augmented a batch at a
time with tensor operations (:func:`augment_volumes`, :class:`VolumeLoader`), as
``densenet.data`` does for small images: no per-volume Python in the training loop.

Axes: a volume is (C, D, H, W). NIfTI files are first turned to the closest canonical (RAS+)
orientation, so D, H, W run along the scanner's left-to-Right, posterior-to-Anterior and
inferior-to-Superior axes whatever order the file stored them in: two scans of one head read
the same way. NumPy files carry no orientation; their axes are taken as they are.

Layouts (:func:`open_volumes`): class folders ROOT/CLASS/FILE (or ROOT/train/CLASS/FILE with
optional ROOT/val and ROOT/test, as for images), or a CSV manifest read by
:func:`densenet.labels.read_csv` whose path column names volume files. nibabel reads NIfTI; it
is optional (``pip install 'densenet-torch[volumes]'``), NumPy files need only NumPy.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import inspect
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import (IMAGE_EXTENSIONS, Dataset, EpochBatches, ImageTensors, _class_dirs,
                   class_folder_splits)
from .errors import UsageError
from .preprocess import INTENSITY_MODES
from .rundir import atomic_write_bytes

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".npy", ".npz")
ON_BAD = ("error", "skip")
CACHE_VERSION = 1
PERCENTILES = (0.5, 99.5)  # the "percentile" mode's clipping range (robust to a few hot voxels)
STD_FLOOR = 1e-8           # "zscore" on a constant volume gives zeros, not inf

INSTALL_HELP = ("NIfTI files are read with nibabel, an optional dependency: "
                "pip install 'densenet-torch[volumes]' (or pip install nibabel)")
VOLUMES_HELP = (
    "class folders of volumes (ROOT/CLASS/FILE, or ROOT/train/CLASS/FILE with optional ROOT/val "
    "and ROOT/test) or a CSV manifest (FILE.csv: a path column and a label column, see "
    f"densenet.labels), the files being {', '.join(VOLUME_EXTENSIONS)} volumes")


def is_volume_file(path) -> bool:
    """Whether ``path``'s name ends in a volume extension (``.nii.gz`` counts; ``.gz`` alone not)."""
    name = os.path.basename(str(path)).lower()
    return name.endswith(VOLUME_EXTENSIONS)


def _nibabel():
    try:
        import nibabel
    except ImportError:
        return None
    return nibabel


# ----------------------------------------------------------------------------- one volume

def read_volume(path) -> np.ndarray:
    """One volume file as float32 (C, D, H, W).

    NIfTI (``.nii``, ``.nii.gz``): reoriented to the closest canonical orientation (RAS+,
    ``nibabel.as_closest_canonical``) so that the array's axes follow the patient whatever the
    scanner's storage order, scaled by the header's slope and intercept (``get_fdata``); a 4-D
    image's last axis holds the channels. ``.npy``: (D, H, W) or (C, D, H, W). ``.npz``: its
    only array, or the one named "volume". A 3-D volume gets one channel.

    A file that cannot be read, or holds no numbers, NaN or inf, or an array that is not 3-D or
    4-D, is a ``UsageError`` naming the file and saying what to do.
    """
    path = Path(path)
    if not is_volume_file(path):
        raise UsageError(f"{path} is not a volume file: volumes end in "
                         f"{', '.join(VOLUME_EXTENSIONS)}. Convert it, or remove it from the data.")
    if not path.is_file():
        raise UsageError(f"volume {path} does not exist{' (it is a folder)' if path.exists() else ''}; "
                         f"put the file there or remove it from the data set.")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        a = _read_nifti(path)
    elif name.endswith(".npy"):
        a = _check_numbers(path, _load_numpy(path), "the array")
    else:
        a = _read_npz(path)
    return _finish(path, a, channels_last=name.endswith((".nii", ".nii.gz")))


def _read_nifti(path: Path) -> np.ndarray:
    nib = _nibabel()
    if nib is None:
        raise UsageError(f"cannot read {path}: {INSTALL_HELP}.")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error, ...
        raise UsageError(f"{path} is not a readable NIfTI file ({type(e).__name__}: {e}); it is "
                         f"corrupt, truncated or not NIfTI. Replace it with a good copy, or "
                         f"remove it (densenet train --set on_bad=skip, or open_volumes(..., "
                         f"on_bad='skip'), skips such files).") from None
    if len(shape) not in (3, 4):
        raise UsageError(f"{path} holds an image of shape {shape}; a volume is 3-D (X, Y, Z) or "
                         f"4-D (X, Y, Z, channels). Convert it, or remove it from the data.")
    try:
        img = nib.as_closest_canonical(img)
        return img.get_fdata(dtype=np.float32)
    except Exception as e:  # truncated data shows only when it is read
        raise UsageError(f"{path} is corrupt or truncated: its data cannot be read "
                         f"({type(e).__name__}: {e}). Replace it with a good copy, or remove it "
                         f"(densenet train --set on_bad=skip, or open_volumes(..., "
                         f"on_bad='skip'), skips such files).") from None


def _load_numpy(path: Path):
    try:
        return np.load(path, allow_pickle=False)  # never unpickle: a .npy could run code
    except Exception as e:
        raise UsageError(f"{path} is not a readable NumPy file ({type(e).__name__}: {e}); it is "
                         f"corrupt, truncated or holds Python objects. Save the volume with "
                         f"numpy.save as a plain numeric array.") from None


def _read_npz(path: Path) -> np.ndarray:
    archive = _load_numpy(path)
    try:
        keys = list(archive.files)
        if not keys:
            raise UsageError(f"{path} holds no arrays; save the volume into it "
                             f"(numpy.savez(path, volume=array)).")
        if len(keys) > 1 and "volume" not in keys:
            raise UsageError(f"{path} holds {len(keys)} arrays ({', '.join(keys[:10])}) and none is "
                             f"named 'volume'; save one array, or name the volume 'volume' "
                             f"(numpy.savez(path, volume=array)).")
        key = keys[0] if len(keys) == 1 else "volume"
        try:
            a = archive[key]
        except Exception as e:
            raise UsageError(f"{path}: the array {key!r} cannot be read ({type(e).__name__}: {e}); "
                             f"the file is corrupt or holds Python objects. Save it again with "
                             f"numpy.savez.") from None
    finally:
        archive.close()
    return _check_numbers(path, a, f"the array {key!r}")


def _check_numbers(path: Path, a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise UsageError(f"{path}: {what} holds {a.dtype} values; a volume holds real numbers "
                         f"(integers or floats). Save it as such.")
    return a


def _finish(path: Path, a: np.ndarray, channels_last: bool) -> np.ndarray:
    if a.ndim not in (3, 4):
        raise UsageError(f"{path} holds an array of shape {tuple(a.shape)}; a volume is 3-D "
                         f"(D, H, W) or 4-D (C, D, H, W{', channels last in NIfTI' if channels_last else ''}). "
                         f"Convert it, or remove it from the data.")
    if a.size == 0:
        raise UsageError(f"{path} is empty (shape {tuple(a.shape)}); remove it from the data or "
                         f"replace it with the scan.")
    if a.ndim == 3:
        a = a[None]
    elif channels_last:
        a = np.moveaxis(a, -1, 0)
    a = np.ascontiguousarray(a, dtype=np.float32)
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise UsageError(f"{path} has {bad} NaN or infinite values (of {a.size}); a volume must be "
                         f"finite. Fix or replace the file, or remove it from the data.")
    return a


def _check_shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),) * 3
    try:
        out = tuple(int(s) for s in shape)
        ok = len(out) == 3 and all(s >= 1 and s == t for s, t in zip(out, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"a volume shape is three positive integers (D, H, W), such as "
                         f"(96, 96, 96); got {shape!r}.")
    return out


def _check_intensity(intensity) -> None:
    if intensity not in INTENSITY_MODES:
        raise UsageError(f"intensity must be one of {', '.join(INTENSITY_MODES)} (zscore: zero mean "
                         f"and unit variance per volume; percentile: the {PERCENTILES[0]}-"
                         f"{PERCENTILES[1]} percentile range scaled to [0, 1]), got {intensity!r}.")


def prepare_volume(array, shape, intensity: str) -> torch.Tensor:
    """A read volume made ready for training: float32 (C, *shape).

    Resized to ``shape`` (D, H, W) by trilinear interpolation (``align_corners=False``; not
    touched when it already has that shape), then normalised per volume and channel, as scanners
    differ in scale: "zscore" subtracts the mean and divides by the standard deviation (floored
    at 1e-8, so a constant channel becomes zeros); "percentile" clips to the 0.5th and 99.5th
    percentiles and scales that range to [0, 1] (a constant channel becomes zeros).
    ``array`` is (C, D, H, W) (or (D, H, W), one channel), NumPy or torch.
    """
    _check_intensity(intensity)
    shape = _check_shape(shape)
    x = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array)
    x = x.detach().to("cpu", torch.float32)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.numel() == 0:
        raise UsageError(f"prepare_volume takes a (C, D, H, W) or (D, H, W) array, got shape "
                         f"{tuple(x.shape)}.")
    if tuple(x.shape[1:]) != shape:
        x = F.interpolate(x[None], size=shape, mode="trilinear", align_corners=False)[0]
    flat = x.reshape(x.shape[0], -1)
    if intensity == "zscore":
        wide = flat.double()  # float32 would lose digits on a narrow range far from zero
        mean = wide.mean(dim=1, keepdim=True)
        std = wide.std(dim=1, correction=0, keepdim=True).clamp_min(STD_FLOOR)
        out = ((wide - mean) / std).float()
    else:
        lo, hi = np.percentile(flat.numpy(), PERCENTILES, axis=1)  # (C,) each; torch.quantile caps the size
        lo = torch.from_numpy(np.asarray(lo, dtype=np.float32))[:, None]
        hi = torch.from_numpy(np.asarray(hi, dtype=np.float32))[:, None]
        span = hi - lo
        out = torch.where(span > 0, (torch.minimum(torch.maximum(flat, lo), hi) - lo)
                          / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.reshape(x.shape).contiguous()


# ----------------------------------------------------------------------------- containers

@dataclass
class VolumeTensors(ImageTensors):
    """A volume split held in memory: float16 (N, C, D, H, W) volumes, already resized and
    normalised (float16 halves the device memory, as uint8 does for images: IXI's 566 scans at
    96^3 take 1 GB), and int64 (N,) labels, or float32 (N, L) rows for multi-label data."""

    def subset(self, indices: torch.Tensor) -> "VolumeTensors":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return VolumeTensors(self.images[idx.to(self.images.device)].contiguous(),
                             self.labels[idx.to(self.labels.device)])

    def to(self, device) -> "VolumeTensors":
        return VolumeTensors(self.images.to(device), self.labels.to(device))


# ----------------------------------------------------------------------------- detection

def detect_volumes(path, *, csv_options: dict | None = None) -> bool:
    """Whether ``path`` is a volume data set, so a ``--data`` path can be routed here or to
    ``densenet.data.open_dataset``: a folder whose class folders (or train/'s) hold volume files
    and no images, or a CSV manifest whose first listed path has a volume extension (its path
    column is ``csv_options["path_column"]``, else the first of labels.PATH_COLUMNS present).
    Never raises: what is not recognised is False, and the opener explains what is wrong."""
    try:
        path = Path(path).expanduser()
        if path.is_file():
            return path.suffix.lower() == ".csv" and _csv_first_path_is_volume(path, csv_options or {})
        if not path.is_dir():
            return False
        root = path / "train" if (path / "train").is_dir() else path
        found = False
        for d in _class_dirs(root):
            kind = _first_file_kind(d)
            if kind == "image":
                return False
            found = found or kind == "volume"
        return found
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def _first_file_kind(folder: Path) -> str | None:
    """"volume" or "image" for the first such file in ``folder`` (stops there: ImageNet's class
    folders hold 1300 files each), None when there is neither."""
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if is_volume_file(e.name) and e.is_file():
                return "volume"
            if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                return "image"
    return None


def _csv_first_path_is_volume(path: Path, options: dict) -> bool:
    from .labels import PATH_COLUMNS
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        wanted = options.get("path_column")
        names = [wanted] if wanted else list(PATH_COLUMNS)
        column = next((header.index(c) for c in names if c in header), None)
        if column is None:
            return False
        for row in reader:
            if len(row) > column and row[column].strip():
                return is_volume_file(row[column].strip())
    return False


# ----------------------------------------------------------------------------- open_volumes

def open_volumes(path, *, shape, intensity: str = "zscore", on_bad: str = "error",
                 cache_dir=None, csv_options: dict | None = None) -> Dataset:
    """Load a volume data set (class folders or a CSV manifest, see the module docstring) as a
    ``Dataset`` named "volumes" whose splits are :class:`VolumeTensors`.

    Every volume is read (:func:`read_volume`) and prepared (:func:`prepare_volume` with
    ``shape`` and ``intensity``) once; the result is cached in ``cache_dir`` (default
    ``$DENSENET_CACHE`` or ``~/.cache/densenet``) keyed on the files' paths, sizes and
    modification times and on shape, intensity and on_bad, so the next run starts at once and a
    changed file or option rebuilds it (as does a damaged cache file). ``on_bad="error"`` stops
    at the first unreadable volume with its ``UsageError``; ``"skip"`` leaves bad volumes out
    with a warning naming each file and why (again on every cached load), and errors only when a
    split has none left. A CSV is read by :func:`densenet.labels.read_csv` with ``csv_options``
    (relative paths against the CSV's folder or ``image_root``; with ``"skip"`` a listed file
    that is missing is skipped unless ``check_files`` is given); multi-label manifests give
    float32 label rows with NaN where an entry is not counted. The ``Dataset``'s channel stats
    are mean 0, std 1: the volumes are normalised already.
    """
    shape = _check_shape(shape)
    _check_intensity(intensity)
    if on_bad not in ON_BAD:
        raise UsageError(f"on_bad must be one of {', '.join(ON_BAD)} (stop at a bad volume, or "
                         f"skip it with a warning), got {on_bad!r}.")
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"data path {path} does not exist. Expected {VOLUMES_HELP}.")
    cache = Path(cache_dir if cache_dir is not None
                 else os.environ.get("DENSENET_CACHE", "~/.cache/densenet")).expanduser()
    options = {"shape": list(shape), "intensity": intensity, "on_bad": on_bad}
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UsageError(f"{path} is a file but not a CSV manifest. Expected {VOLUMES_HELP}.")
        return _open_csv(path, cache, options, dict(csv_options or {}))
    if csv_options:
        raise UsageError(f"csv_options apply to a CSV manifest, but {path} is a folder; drop "
                         f"them or point at the CSV file.")
    return _open_folder(path, cache, options)


def _volume_files(class_dir: Path) -> list[Path]:
    with os.scandir(class_dir) as it:
        files = sorted(Path(e.path) for e in it if not e.name.startswith(".")
                       and is_volume_file(e.name) and e.is_file())
    if not files:
        raise UsageError(f"class folder {class_dir} holds no volumes ({', '.join(VOLUME_EXTENSIONS)}); "
                         f"remove it or add its volumes.")
    return files


def _open_folder(root: Path, cache: Path, options: dict) -> Dataset:
    classes, splits = class_folder_splits(root, _volume_files,
                                          f"FILE volumes ({', '.join(VOLUME_EXTENSIONS)}). "
                                          f"Expected {VOLUMES_HELP}")
    stamps = [[s] + [_stamp(p) for p, _ in splits[s]] for s in splits]
    split_roots = {s: root / s if (root / "train").is_dir() else root for s in splits}

    def build():
        parts, skipped = {}, []
        for s, items in splits.items():
            images, kept, bad = _prepare_all([p for p, _ in items], options,
                                                f"of the {s} split ({split_roots[s]})")
            skipped += bad
            parts[s] = VolumeTensors(images, torch.tensor([items[i][1] for i in kept], dtype=torch.int64))
        return Dataset(name="volumes", classes=classes, train=parts["train"], val=parts.get("val"),
                       test=parts.get("test")), skipped
    return _cached(cache, "folder", root, options, stamps, build)


def _open_csv(path: Path, cache: Path, options: dict, csv_options: dict) -> Dataset:
    from .labels import read_csv
    accepted = [k for k in inspect.signature(read_csv).parameters if k != "path"]
    unknown = sorted(set(csv_options) - set(accepted))
    if unknown:
        raise UsageError(f"csv_options has unknown keys {', '.join(map(repr, unknown))}; "
                         f"densenet.labels.read_csv takes {', '.join(accepted)}.")
    if options["on_bad"] == "skip":
        csv_options.setdefault("check_files", False)  # a missing volume is one more bad file
    table = read_csv(path, **csv_options)
    if table.multi_label:  # float rows, NaN where the mask leaves an entry out
        labels = torch.from_numpy(np.where(table.mask, table.targets, np.nan).astype(np.float32))
    else:
        labels = torch.from_numpy(np.asarray(table.targets, dtype=np.int64))
    stamps = [_stamp(path)] + [_stamp(Path(p)) for p in table.paths]
    slot_options = dict(options, csv={k: v if isinstance(v, (bool, type(None))) else
                                      (list(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
                                      for k, v in sorted(csv_options.items())})

    def build():
        images, kept, skipped = _prepare_all(list(table.paths), options, f"listed in {path}")
        groups = None if table.groups is None else [table.groups[i] for i in kept]
        return Dataset(name="volumes", classes=list(table.names), val=None, test=None,
                       train=VolumeTensors(images, labels[kept].clone()), groups=groups), skipped
    return _cached(cache, "csv", path, slot_options, stamps, build)


def _stamp(p: Path) -> list:
    """[path, size, mtime] of a file ([path, -1, -1] when missing: it is skipped as bad)."""
    try:
        st = p.stat()
    except OSError:
        return [str(p.resolve()), -1, -1]
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _prepare_one(path: str, shape, intensity: str):
    """(float16 prepared volume, None), or (None, the UsageError's message)."""
    try:
        return prepare_volume(read_volume(path), shape, intensity).half(), None
    except UsageError as e:
        return None, str(e)


def _prepare_all(paths: list[str], options: dict, what: str) -> tuple[torch.Tensor, list[int], list]:
    """Read and prepare ``paths`` into one float16 (N, C, *shape) tensor, in order.

    Threads, not processes: gzip, NumPy and torch release the GIL, and forking after torch has
    started its thread pool can hang. Returns the tensor, the indices of the volumes kept and
    [path, message] of those skipped (on_bad="skip")."""
    shape, intensity, skip = tuple(options["shape"]), options["intensity"], options["on_bad"] == "skip"
    images, kept, skipped, first = None, [], [], None
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_prepare_one, str(p), shape, intensity) for p in paths]
        try:
            for i, future in enumerate(futures):
                volume, error = future.result()
                futures[i] = None  # a done future keeps its result: let the volume go once copied
                if volume is not None and images is not None and volume.shape[0] != images.shape[1]:
                    error = (f"{paths[i]} has {volume.shape[0]} channels but {first} has "
                             f"{images.shape[1]}; the volumes of a data set must all have as many "
                             f"channels. Convert it, or remove it from the data.")
                if error is not None:
                    if not skip:
                        raise UsageError(error)
                    # stacklevel: the caller of open_volumes (_prepare_all <- build <- _cached
                    # <- _open_* <- open_volumes)
                    warnings.warn(f"skipping a bad volume: {error}", stacklevel=6)
                    skipped.append([str(paths[i]), error])
                    continue
                if images is None:  # one allocation: no list of volumes stacked at the end
                    images, first = torch.empty((len(paths), *volume.shape), dtype=torch.float16), paths[i]
                images[len(kept)] = volume
                kept.append(i)
        except BaseException:
            for f in futures:
                if f is not None:
                    f.cancel()
            raise
    if not kept:
        raise UsageError(f"none of the {len(paths)} volumes {what} is readable "
                         f"(all were skipped as bad, see the warnings); fix or replace the files.")
    if len(kept) < len(paths):
        images = images[:len(kept)].clone()  # a view would keep (and cache) the whole block
    return images, kept, skipped


# ----------------------------------------------------------------------------- cache

def _cached(cache: Path, layout: str, where: Path, options: dict, stamps: list, build) -> Dataset:
    """The prepared data set from the cache, or built and cached (atomically; a read-only or
    full cache folder only costs the next run the preparation). One cache file per data
    location and options, overwritten when the files change, so stale copies do not pile up;
    a damaged or foreign cache file is rebuilt, never trusted, and loads with
    ``weights_only=True``, so it cannot run code."""
    slot = json.dumps({"kind": "volumes", "layout": layout, "where": str(where.resolve()),
                       "options": options}, sort_keys=True)
    key = hashlib.sha256(json.dumps([CACHE_VERSION, slot, stamps]).encode()).hexdigest()
    cache_file = cache / f"volumes-{hashlib.sha256(slot.encode()).hexdigest()[:16]}.pt"
    cached = None
    if cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                cached = _from_blob(blob, tuple(options["shape"]))
        except Exception:
            pass
    if cached is not None:
        ds, skipped = cached
        for _, error in skipped:  # said again on every load, as when they were read
            warnings.warn(f"skipping a bad volume: {error}", stacklevel=4)
        return ds
    ds, skipped = build()
    blob = {"key": key, "classes": list(ds.classes), "groups": ds.groups, "skipped": skipped}
    for split in ("train", "val", "test"):
        part = getattr(ds, split)
        if part is not None:
            blob[split] = {"images": part.images, "labels": part.labels}
    buf = io.BytesIO()
    torch.save(blob, buf)
    try:
        atomic_write_bytes(cache_file, buf.getvalue())
    except OSError:
        pass
    return _with_stats(ds)


def _from_blob(blob: dict, shape: tuple) -> tuple[Dataset, list]:
    parts = {}
    for s in ("train", "val", "test"):
        if s in blob:
            images, labels = blob[s]["images"], blob[s]["labels"]
            if (images.dtype != torch.float16 or images.dim() != 5 or tuple(images.shape[2:]) != shape
                    or len(labels) != len(images)):
                raise ValueError("cache blob does not match")  # rebuilt by the caller
            parts[s] = VolumeTensors(images, labels)
        else:
            parts[s] = None
    groups = blob.get("groups")
    ds = Dataset(name="volumes", classes=list(blob["classes"]), **parts,
                 groups=None if groups is None else list(groups))
    return _with_stats(ds), [list(x) for x in blob.get("skipped", [])]


def _with_stats(ds: Dataset) -> Dataset:
    # prepared volumes are normalised already; data._channel_stats counts uint8 values and
    # would fail on float16, so the stats are set to the identity
    c = int(ds.train.images.shape[1])
    ds._stats = ([0.0] * c, [1.0] * c)
    return ds


# ----------------------------------------------------------------------------- augmentation

def _check_augment(shape: tuple, flip_axes=(), pad=0, rotate_plane=None) -> tuple:
    """Validated (flip_axes, pad, rotate_plane) for volumes of spatial ``shape`` (D, H, W)."""
    try:
        flip_axes = tuple(flip_axes)
    except TypeError:
        flip_axes = None
    if flip_axes is None or any(isinstance(a, bool) or a not in (0, 1, 2) for a in flip_axes) \
            or len(set(flip_axes)) != len(flip_axes):
        raise UsageError(f"flip_axes lists distinct spatial axes among 0, 1, 2 (D, H, W), such as "
                         f"(2,) or (0, 1, 2); got {flip_axes!r}.")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise UsageError(f"pad is a whole number of voxels, 0 or more; got {pad!r}.")
    if rotate_plane is not None:
        plane = tuple(rotate_plane) if isinstance(rotate_plane, (tuple, list)) else None
        if plane is None or len(plane) != 2 or any(isinstance(a, bool) or a not in (0, 1, 2) for a in plane) \
                or plane[0] == plane[1]:
            raise UsageError(f"rotate_plane is None or two different spatial axes among 0, 1, 2 "
                             f"(D, H, W), such as (1, 2); got {rotate_plane!r}.")
        if shape[plane[0]] != shape[plane[1]]:
            raise UsageError(f"a 90-degree rotation in the plane of axes {plane} needs them of one "
                             f"size, but the volumes are {tuple(shape)} (D, H, W); pick axes of "
                             f"equal size or resize the volumes.")
        rotate_plane = plane
    return flip_axes, int(pad), rotate_plane


def augment_volumes(x: torch.Tensor, generator: torch.Generator, *, flip_axes=(), pad: int = 0,
                    rotate_plane=None) -> torch.Tensor:
    """Random flips, translations and 90-degree rotations of a float (B, C, D, H, W) batch.

    Per sample: each spatial axis in ``flip_axes`` (0, 1, 2 = D, H, W) is flipped with
    probability 0.5; with ``pad`` > 0 the volume is zero-padded by ``pad`` voxels on each side
    and a random crop of the original size taken; with ``rotate_plane`` (two spatial axes of one
    size, such as (1, 2)) it is rotated by k * 90 degrees as ``torch.rot90(v, k, rotate_plane)``,
    k uniform in 0..3. In that order: flip, then crop, then rotate. The random numbers are drawn
    from ``generator`` on its device, in this order: ``rand(B, len(flip_axes))`` (flipped where
    < 0.5, column j for ``flip_axes[j]``), ``randint(0, 2 * pad + 1, (B, 3))`` (crop start per
    axis in the padded volume, when pad > 0), ``randint(0, 4, (B,))`` (k, with a plane).
    All three come from one gather over the batch: each output voxel's source index is computed
    from per-axis index vectors, so no volume is copied once per transform.
    """
    if not torch.is_tensor(x) or x.dim() != 5 or not x.is_floating_point():
        raise UsageError(f"augment_volumes takes a float (B, C, D, H, W) batch, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
                         f"{' of ' + str(x.dtype) if torch.is_tensor(x) else ''}.")
    b, c, *size = x.shape
    flip_axes, pad, rotate_plane = _check_augment(tuple(size), flip_axes, pad, rotate_plane)
    if not flip_axes and pad == 0 and rotate_plane is None:
        return x
    gd, dev = generator.device, x.device
    flips = None
    if flip_axes:
        flips = (torch.rand((b, len(flip_axes)), generator=generator, device=gd) < 0.5).to(dev)
    starts = torch.zeros((b, 3), dtype=torch.long, device=dev)
    if pad:
        starts = torch.randint(0, 2 * pad + 1, (b, 3), generator=generator, device=gd).to(dev)
    k = None
    if rotate_plane is not None:
        k = torch.randint(0, 4, (b,), generator=generator, device=gd).to(dev)

    # Each output voxel's source voxel in x, per axis, as small broadcastable index tensors
    # (only the final flat index is batch-sized): undo the rotation, then the crop, then the flip,
    # and gather from the zero-padded batch.
    shp = [[n if i == a else 1 for i in range(3)] for a, n in enumerate(size)]
    src = [torch.arange(n, device=dev).view(1, *shp[a]) for a, n in enumerate(size)]
    if rotate_plane is not None:
        # rot90(v, k, (p, q)) puts at (i, j) the voxel v[j, n-1-i] (k=1), v[n-1-i, n-1-j]
        # (k=2), v[n-1-j, i] (k=3): swap for odd k, then mirror p for k >= 2, q for k in 1, 2
        p, q = rotate_plane
        n, kk = size[p], k.view(b, 1, 1, 1)
        swap = kk % 2 == 1
        sp, sq = torch.where(swap, src[q], src[p]), torch.where(swap, src[p], src[q])
        src[p] = torch.where(kk >= 2, n - 1 - sp, sp)
        src[q] = torch.where((kk == 1) | (kk == 2), n - 1 - sq, sq)
    padded = [n + 2 * pad for n in size]
    for a in range(3):  # the crop's coordinate -> the padded volume's, mirrored there by a flip
        t = src[a] + starts[:, a].view(b, 1, 1, 1) if pad else src[a]
        if a in flip_axes:  # the padding is symmetric: flip(pad(x)) == pad(flip(x))
            t = torch.where(flips[:, flip_axes.index(a)].view(b, 1, 1, 1), padded[a] - 1 - t, t)
        src[a] = t
    h, w = padded[1], padded[2]
    flat = (src[0] * (h * w) + (src[1] * w + src[2])).expand(b, *size).reshape(b, 1, -1)
    xs = (F.pad(x, (pad,) * 6) if pad else x).reshape(b, c, -1)
    out = xs.gather(2, flat.expand(b, c, flat.shape[2])).view(b, c, *size)
    return out


class VolumeLoader(EpochBatches):
    """Batches of a ``VolumeTensors`` already on the training device, made with tensor ops.

    Yields ``(x, y)``: x float32 (B, C, D, H, W) on the data's device, augmented by
    :func:`augment_volumes` with the keyword arguments ``augment`` (a dict such as
    ``{"flip_axes": (0, 1, 2), "pad": 4}``; None for none), and the labels. The interface of
    ``densenet.data.DeviceLoader``, and its streams: order and augmentation drawn from
    generators seeded by (seed, epoch), the order on the CPU, the augmentation on the data's
    device, so a resumed run sees the same batches; for DDP, rank r of w takes every w-th
    sample of the epoch's order, the tail dropped so every rank has as many batches.
    """

    def __init__(self, data: VolumeTensors, batch_size: int, *, shuffle: bool = False,
                 augment: dict | None = None, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, not {batch_size}.")
        if not isinstance(data, ImageTensors) or data.images.dim() != 5:
            raise UsageError(f"VolumeLoader takes a VolumeTensors of (N, C, D, H, W) volumes, got "
                             f"{type(data).__name__}"
                             f"{' of shape ' + str(tuple(data.images.shape)) if isinstance(data, ImageTensors) else ''}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}.")
        if augment is not None and augment is not False and not isinstance(augment, dict):
            raise UsageError(f"augment is None or a dict of augment_volumes keyword arguments "
                             f"(flip_axes, pad, rotate_plane), got {augment!r}.")
        augment = dict(augment) if augment else None
        if augment is not None:
            unknown = sorted(set(augment) - {"flip_axes", "pad", "rotate_plane"})
            if unknown:
                raise UsageError(f"augment has unknown keys {', '.join(map(repr, unknown))}; "
                                 f"augment_volumes takes flip_axes, pad and rotate_plane.")
            _check_augment(tuple(data.images.shape[2:]), **augment)
        self.augment = augment
        self._setup(data, batch_size, shuffle, seed, drop_last, rank, world_size)

    def __iter__(self):
        for idx, g_aug in self._batches():
            x = self.data.images[idx].float()
            if self.augment:
                x = augment_volumes(x, g_aug, **self.augment)
            yield x, self.data.labels[idx.to(self.data.labels.device)]


# ----------------------------------------------------------------------------- writing, demo data

def write_nifti(path, array, affine=None) -> Path:
    """Write a float (D, H, W) or (C, D, H, W) array as a NIfTI-1 file (``.nii`` or ``.nii.gz``;
    channels go last, as NIfTI stores them), atomically and, for ``.nii.gz``, byte for byte the
    same for the same data (the gzip header carries no time). ``affine`` (4 x 4, voxel index to
    scanner millimetres) defaults to the identity: the array is then RAS+ already and
    :func:`read_volume` gives it back unchanged."""
    path = Path(path)
    atomic_write_bytes(path, _nifti_bytes(path, array, affine))
    return path


def _nifti_bytes(path: Path, array, affine) -> bytes:
    nib = _nibabel()
    if nib is None:
        raise UsageError(f"cannot write {path}: {INSTALL_HELP}.")
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        raise UsageError(f"{path}: a NIfTI file name ends in .nii or .nii.gz.")
    a = np.asarray(array, dtype=np.float32)
    if a.ndim not in (3, 4):
        raise UsageError(f"write_nifti takes a (D, H, W) or (C, D, H, W) array, got shape {a.shape}.")
    if a.ndim == 4:
        a = np.moveaxis(a, 0, -1)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise UsageError(f"an affine is a 4 x 4 matrix, got shape {affine.shape}.")
    img = nib.Nifti1Image(np.ascontiguousarray(a), affine)
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if name.endswith(".gz") else data


def synthetic_blobs(root, n_per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    """A known-answer volume data set: ROOT/left/ and ROOT/right/, ``n_per_class`` ``.nii.gz``
    volumes each of ``size``^3 voxels (identity affine), Gaussian noise (std 0.1) plus one bright
    Gaussian blob (peak 1, sigma size/10) centred in the left (W < size/2) or the right half of
    the W axis, its other coordinates random. The class is the half that holds the blob: a 3-D
    model should learn it in an epoch or two. The same arguments give the same bytes; files that
    already hold them are not rewritten, so a cache of them stays valid."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 4 \
            or isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) \
            or n_per_class < 1:
        raise UsageError(f"synthetic_blobs needs a whole size >= 4 and n_per_class >= 1, got size "
                         f"{size!r} and n_per_class {n_per_class!r}.")
    root = Path(root)
    rng = np.random.default_rng(seed)
    grid = np.arange(size, dtype=np.float64)
    sigma = max(size / 10, 0.75)

    def bump(centre):
        return np.exp(-(grid - centre) ** 2 / (2 * sigma ** 2))
    for cls, (lo, hi) in (("left", (0.15, 0.4)), ("right", (0.6, 0.85))):
        for i in range(n_per_class):
            cd, ch = rng.uniform(0.25 * size, 0.75 * size, 2)
            cw = rng.uniform(lo * size, hi * size)
            blob = bump(cd)[:, None, None] * bump(ch)[None, :, None] * bump(cw)[None, None, :]
            volume = blob + 0.1 * rng.standard_normal((size, size, size))
            target = root / cls / f"{cls}_{i:03d}.nii.gz"
            data = _nifti_bytes(target, volume, None)
            try:
                if target.read_bytes() == data:
                    continue
            except OSError:
                pass
            atomic_write_bytes(target, data)
    return root
