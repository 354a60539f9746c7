"""Data: CIFAR-10/100, SVHN, class-per-folder images and CSV manifests, loaded for training.

Small images (CIFAR, SVHN, any folder of images up to 64 px) are decoded once into a uint8
tensor cache, kept whole on the training device and augmented a batch at a time with tensor
operations (``DeviceLoader``), as airbench does: no per-image Python in the training loop.
ImageNet-size folders go through a ``DataLoader`` with workers and the torchvision transforms
(``make_file_loader``).

Loading never executes code from a data file: CIFAR's pickles go through an unpickler that
admits only plain containers and numpy arrays, the cache is read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .rundir import atomic_write_bytes
from .errors import UsageError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, to_rgb, upscale

SMALL_MAX_SIZE = 64  # images up to this many pixels a side live on the device as one tensor
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 2  # 2: pixels through preprocess.to_rgb (16-bit images were clipped before)

FORMATS_HELP = (
    "CIFAR-10/100 in the official python format (cifar-10-python.tar.gz / cifar-100-python.tar.gz, "
    "the folder holding it, or the extracted cifar-10-batches-py / cifar-100-python folder or its "
    "parent); SVHN's official train_32x32.mat, test_32x32.mat and extra_32x32.mat in one folder; "
    "or a class-per-folder image directory (ROOT/CLASS/IMAGE, or ROOT/train/CLASS/IMAGE with "
    "optional ROOT/val and ROOT/test); a CSV manifest (FILE.csv: an image path column and a "
    "class column, see densenet.labels); add --download to fetch CIFAR-10/100 or SVHN.")


# ----------------------------------------------------------------------------- containers

@dataclass
class ImageTensors:
    """A small-image split held in memory: uint8 (N, C, H, W) images and int64 labels."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ImageTensors":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensors(self.images[idx.to(self.images.device)].contiguous(),
                            self.labels[idx.to(self.labels.device)])

    def to(self, device) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device))


@dataclass
class ImageFiles:
    """A large-image split: (path, label) pairs read by a ``DataLoader``."""
    samples: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices) -> "ImageFiles":
        return ImageFiles([self.samples[int(i)] for i in indices])


@dataclass
class Dataset:
    name: str                                # cifar10 | cifar100 | svhn | folder | imagenet | csv
    classes: list[str]                       # index = label
    train: ImageTensors | ImageFiles
    val: ImageTensors | ImageFiles | None    # only when the data itself has a val split
    test: ImageTensors | ImageFiles | None   # the official test split
    groups: list[str] | None = None          # a CSV's group column, one per training image
    _stats: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def small(self) -> bool:
        return isinstance(self.train, ImageTensors)

    @property
    def multi_label(self) -> bool:
        """Several labels per image: labels are float (N, L) rows of 0/1, NaN where an entry is
        not counted (``classes`` then names the labels)."""
        if self.small:
            return self.train.labels.dim() == 2
        return bool(self.train.samples) and isinstance(self.train.samples[0][1], np.ndarray)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images on the [0, 1] scale (large images:
        the standard ImageNet values)."""
        if not self.small:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        if self._stats is None:
            self._stats = _channel_stats(self.train.images)
        return self._stats


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    # exact, from a 256-bin histogram per channel: no float copy of 600k images
    values = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for c in range(images.shape[1]):
        hist = torch.zeros(256, dtype=torch.float64)
        for chunk in images[:, c].split(65536):
            hist += torch.bincount(chunk.reshape(-1), minlength=256).cpu().double()
        m = (hist * values).sum() / hist.sum()
        var = (hist * (values - m) ** 2).sum() / hist.sum()
        mean.append(float(m / 255))
        std.append(float(var.sqrt() / 255))
    return mean, std


# ----------------------------------------------------------------------------- open_dataset

def open_dataset(path: str | Path, *, download: bool = False, name: str | None = None,
                 svhn_extra: bool = True, cache_dir: str | Path | None = None,
                 csv_options: dict | None = None) -> Dataset:
    """Detect the format under ``path`` and load it.

    ``name`` ("cifar10", "cifar100", "svhn") says which data set to fetch into ``path`` with
    ``download=True``; without it, it only guards against loading another of the three. SVHN's
    training split is train (+ extra with ``svhn_extra``). A ``.csv`` file is a manifest read by
    :func:`densenet.labels.read_csv` with ``csv_options`` (its keyword arguments); every row is
    a training image. Small images are cached as uint8 tensors in ``cache_dir`` (default
    ``$DENSENET_CACHE`` or ``~/.cache/densenet``) keyed on the files' absolute paths, names,
    sizes and modification times.
    """
    if name is not None and name not in DOWNLOADS:
        if download:
            raise UsageError(f"--download fetches {', '.join(DOWNLOADS)}, not {name!r}; put the "
                             f"data under {path} yourself ({FORMATS_HELP})")
        name = None
    path = Path(path).expanduser()
    if download:
        if name is None:
            raise UsageError(f"--download needs to know which data set to fetch "
                             f"({', '.join(DOWNLOADS)}); pick a recipe for one of them.")
        found = _detect(path)
        if found is None:
            _fetch(name, path, svhn_extra=svhn_extra)
        elif found[0] == "svhn" == name:  # fill in what a partly downloaded folder lacks
            _fetch(name, found[1], svhn_extra=svhn_extra)
    if not path.exists():
        raise UsageError(f"data path {path} does not exist. Expected {FORMATS_HELP}")
    found = _detect(path)
    if found is None:
        raise UsageError(f"{path} is not a data set this program reads. Expected {FORMATS_HELP}")
    kind, where = found
    if name is not None and kind in DOWNLOADS and kind != name:
        raise UsageError(f"{path} holds {kind} but {name} was asked for; point --data at the "
                         f"{name} data (or use --download to fetch it into an empty folder).")
    cache = Path(cache_dir if cache_dir is not None
                 else os.environ.get("DENSENET_CACHE", "~/.cache/densenet")).expanduser()
    if kind in ("cifar10", "cifar100"):
        return _cached(cache, kind, where, {}, _file_stamps([where]), lambda: _load_cifar(kind, where))
    if kind == "svhn":
        files = [where / f"{s}_32x32.mat" for s in ("train", "test")]
        if svhn_extra:
            if not (where / "extra_32x32.mat").is_file():
                raise UsageError(
                    f"SVHN's training set in the paper is train + extra; {where / 'extra_32x32.mat'} "
                    f"is missing. Download it from {SVHN_URL}extra_32x32.mat into {where} (or use "
                    f"--download), or train on train_32x32.mat alone with svhn_extra off.")
            files.append(where / "extra_32x32.mat")
        stamps = _file_stamps([f for f in files if f.exists()])
        return _cached(cache, kind, where, {"extra": svhn_extra}, stamps,
                       lambda: _load_svhn(where, svhn_extra))
    if kind == "csv":
        return _open_csv(where, cache, csv_options or {})
    return _open_folder(where, cache)


def _detect(path: Path) -> tuple[str, Path] | None:
    """(kind, location) of the data at ``path``, or None when nothing known is there."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv", path
        for kind, (archive, _, _) in _CIFAR_FILES.items():
            if path.name == archive:
                return kind, path
        if path.name.endswith("_32x32.mat"):
            return "svhn", path.parent
        return None
    if not path.is_dir():
        return None
    for kind, (archive, folder, marker) in _CIFAR_FILES.items():
        if (path / marker).is_file():
            return kind, path
        if (path / folder / marker).is_file():
            return kind, path / folder
        if (path / archive).is_file():
            return kind, path / archive
    if (path / "train_32x32.mat").is_file() or (path / "test_32x32.mat").is_file():
        return "svhn", path
    if _class_dirs(path / "train") if (path / "train").is_dir() else _class_dirs(path):
        return "folder", path
    return None


# ----------------------------------------------------------------------------- cache

def _file_stamps(files: list[Path]) -> list:
    """[path, size, mtime] of each file (of each file under a folder): what the cache keys on."""
    out = []
    for f in files:
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if p.is_file():
                out.append([str(p.resolve()), *_stat(p)])
    return out


def _cached(cache: Path, kind: str, where: Path, options: dict, stamps: list, build) -> Dataset:
    """Load the decoded data set from the cache, or build it and try to cache it.

    One cache file per data location and options, overwritten when the files' stamps change,
    so stale copies do not pile up."""
    slot = json.dumps({"kind": kind, "where": str(where.resolve()), "options": options})
    key = hashlib.sha256(json.dumps([CACHE_VERSION, slot, stamps]).encode()).hexdigest()
    cache_file = cache / f"{kind}-{hashlib.sha256(slot.encode()).hexdigest()[:16]}.pt"
    if cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                return _from_blob(blob)
        except Exception:  # a damaged or foreign cache file is rebuilt, never trusted
            pass
    ds = build()
    blob = {"key": key, "name": ds.name, "classes": list(ds.classes), "groups": ds.groups}
    for split in ("train", "val", "test"):
        part = getattr(ds, split)
        if part is not None:
            blob[split] = {"images": part.images, "labels": part.labels}
    buf = io.BytesIO()
    torch.save(blob, buf)
    try:
        atomic_write_bytes(cache_file, buf.getvalue())
    except OSError:  # a read-only or full cache only costs the next run a decode
        pass
    return ds


def _from_blob(blob: dict) -> Dataset:
    parts = {s: ImageTensors(blob[s]["images"], blob[s]["labels"]) if s in blob else None
             for s in ("train", "val", "test")}
    groups = blob.get("groups")
    return Dataset(name=blob["name"], classes=list(blob["classes"]), **parts,
                   groups=None if groups is None else list(groups))


# ----------------------------------------------------------------------------- CIFAR

# kind: (archive name, extracted folder, a file that marks the extracted folder)
_CIFAR_FILES = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", "meta"),
}


class _Refused(pickle.UnpicklingError):
    """A global the CIFAR unpickler does not admit (as opposed to a damaged pickle)."""


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR python files contain: plain containers and numpy arrays
    (and ``_codecs.encode``, a pure function Python 3 uses to pickle bytes at protocol 2).
    Any other global (os.system, builtins.eval, ...) is refused, so no code runs."""
    _ALLOWED = {
        (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
        for n in ("_reconstruct", "scalar")
    } | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"global {module}.{name} is not allowed in a CIFAR file")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as e:
        raise UsageError(f"refused to load {where}: it is not a CIFAR python batch file ({e}); "
                         f"unpickling it could run code. Use the official archive from "
                         f"https://www.cs.toronto.edu/~kriz/cifar.html.") from None
    except Exception as e:
        raise UsageError(f"{where} is corrupt or truncated ({type(e).__name__}: {e}); replace it "
                         f"with a fresh copy of the official CIFAR file.") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where} is not a CIFAR python batch file (it holds a "
                         f"{type(obj).__name__}, not a dict).")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_files(where: Path, names: list[str]) -> dict[str, bytes]:
    """The raw bytes of the named batch files, from the archive or the extracted folder."""
    if where.is_dir():
        out = {}
        for n in names:
            if not (where / n).is_file():
                raise UsageError(f"{where / n} is missing: an extracted CIFAR folder holds "
                                 f"{', '.join(names)}. Re-extract the official archive.")
            out[n] = (where / n).read_bytes()
        return out
    try:
        with tarfile.open(where, "r:gz") as tar:
            out = {}
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in names:
                    out[base] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UsageError(f"{where} is corrupt or truncated ({type(e).__name__}: {e}); delete it "
                         f"and download it again (--download, or from "
                         f"https://www.cs.toronto.edu/~kriz/cifar.html).") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}: it is not the official CIFAR "
                         f"archive, or it is truncated. Download it again.")
    return out


def _cifar_batch(raw: bytes, label_key: str, where: str) -> ImageTensors:
    batch = _unpickle(raw, where)
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{where} is not a CIFAR python batch file (no usable {e} entry).") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise UsageError(f"{where} has data of shape {data.shape} and {labels.size} labels; a CIFAR "
                         f"batch holds N rows of 3072 bytes (3x32x32) and N labels.")
    return ImageTensors(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def _load_cifar(kind: str, where: Path) -> Dataset:
    if kind == "cifar10":
        train_names, test_name = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
        meta_name, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        train_names, test_name = ["train"], "test"
        meta_name, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    raw = _read_cifar_files(where, train_names + [test_name, meta_name])
    meta = _unpickle(raw[meta_name], f"{where}:{meta_name}")
    if names_key not in meta:
        raise UsageError(f"{where}:{meta_name} has no {names_key}; it is not a {kind} meta file.")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]

    def split(names: list[str]) -> ImageTensors:
        parts = [_cifar_batch(raw[n], label_key, f"{where}:{n}") for n in names]
        labels = torch.cat([p.labels for p in parts])
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
            raise UsageError(f"{where} has labels outside 0..{len(classes) - 1}; the files are "
                             f"corrupt. Download the archive again.")
        return ImageTensors(torch.cat([p.images for p in parts]), labels)

    return Dataset(name=kind, classes=classes, train=split(train_names), val=None,
                   test=split([test_name]))


# ----------------------------------------------------------------------------- SVHN

def _load_svhn_mat(path: Path) -> ImageTensors:
    import scipy.io
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises a mix of ValueError, OSError, TypeError on bad files
        raise UsageError(f"{path} is corrupt or not a MATLAB file ({type(e).__name__}: {e}); "
                         f"replace it with a fresh copy from {SVHN_URL}.") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 \
            or y.size != x.shape[3] or y.ndim > 2:
        raise UsageError(
            f"{path} does not hold SVHN data: X must be uint8 of shape (32, 32, 3, N) and y of "
            f"shape (N, 1); found X {None if x is None else (x.shape, str(x.dtype))}, y "
            f"{None if y is None else y.shape}. Use the official {path.name} from {SVHN_URL}.")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise UsageError(f"{path} has labels outside 1..10 (SVHN writes digit 0 as 10); the file "
                         f"is corrupt.")
    labels[labels == 10] = 0
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return ImageTensors(images, torch.from_numpy(labels))


def _load_svhn(where: Path, extra: bool) -> Dataset:
    train_file = where / "train_32x32.mat"
    if not train_file.is_file():
        raise UsageError(f"{train_file} is missing; download it from {SVHN_URL}train_32x32.mat "
                         f"into {where} (or use --download).")
    train = _load_svhn_mat(train_file)
    if extra:
        more = _load_svhn_mat(where / "extra_32x32.mat")
        train = ImageTensors(torch.cat([train.images, more.images]),
                             torch.cat([train.labels, more.labels]))
    test = _load_svhn_mat(where / "test_32x32.mat") if (where / "test_32x32.mat").is_file() else None
    return Dataset(name="svhn", classes=[str(d) for d in range(10)], train=train, val=None, test=test)


# ----------------------------------------------------------------------------- class folders

def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    # scandir: file types come with the listing, no stat per file (ImageNet has 1.28M)
    with os.scandir(class_dir) as it:
        files = sorted(Path(e.path) for e in it if not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
    if not files:
        raise UsageError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                         f"remove it or add its images.")
    return files


def _list_split(root: Path, classes: list[str] | None, list_files,
                layout: str) -> tuple[list[str], list[tuple[Path, int]]]:
    dirs = _class_dirs(root)
    if not dirs:
        raise UsageError(f"{root} holds no class folders; a class-per-folder data set has "
                         f"{root}/CLASS_NAME/{layout}.")
    if classes is None:
        classes = [d.name for d in dirs]
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for d in dirs:
        if d.name not in index:
            raise UsageError(f"{d} is a class the training data does not have; the class folders "
                             f"of val/ and test/ must be named like those of train/ "
                             f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}).")
        samples += [(f, index[d.name]) for f in list_files(d)]
    return classes, samples


def class_folder_splits(root: Path, list_files=None,
                        layout: str = "IMAGE files") -> tuple[list[str], dict]:
    """(class names, {split: [(file, label), ...]}) of ROOT/CLASS/FILE, or ROOT/train/CLASS/FILE
    with optional ROOT/val and ROOT/test named like train's; ``list_files(class_dir)`` lists a
    class folder's files (images by default), ``layout`` names them in the error for a root
    without class folders."""
    list_files = _image_files if list_files is None else list_files
    split_roots = {"train": root / "train", "val": root / "val", "test": root / "test"}
    if not split_roots["train"].is_dir():
        split_roots = {"train": root}
    classes, samples = _list_split(split_roots["train"], None, list_files, layout)
    splits = {"train": samples}
    for s in ("val", "test"):
        if s in split_roots and split_roots[s].is_dir():
            splits[s] = _list_split(split_roots[s], classes, list_files, layout)[1]
    return classes, splits


def _open_folder(root: Path, cache: Path) -> Dataset:
    classes, splits = class_folder_splits(root)
    samples = splits["train"]
    first = samples[0][0]
    size = _image_size(first)
    if max(size) > SMALL_MAX_SIZE:
        parts = {s: ImageFiles([(str(p), y) for p, y in splits[s]]) if s in splits else None
                 for s in ("train", "val", "test")}
        return Dataset(name="imagenet", classes=classes, **parts)
    stamps = [[s] + [[str(p.relative_to(root)), *_stat(p)] for p, _ in splits[s]] for s in splits]
    return _cached(cache, "folder", root, {}, stamps, lambda: _decode_folder(classes, splits))


def _open_csv(path: Path, cache: Path, options: dict) -> Dataset:
    """A CSV manifest (:func:`densenet.labels.read_csv`): every row a training image, small
    images decoded into the cache like a folder's, large ones read by the file loader."""
    from .labels import read_csv
    table = read_csv(path, **options)
    if table.multi_label:  # float rows, NaN where the mask leaves an entry out
        rows = np.where(table.mask, table.targets, np.nan).astype(np.float32)
        samples = [(Path(p), row) for p, row in zip(table.paths, rows)]
    else:
        samples = [(Path(p), int(y)) for p, y in zip(table.paths, table.targets)]
    groups = None if table.groups is None else list(table.groups)
    size = _image_size(samples[0][0])
    if max(size) > SMALL_MAX_SIZE:
        return Dataset(name="csv", classes=list(table.names), val=None, test=None,
                       train=ImageFiles([(str(p), y) for p, y in samples]), groups=groups)
    stamps = [_file_stamps([path])] + [[str(p), *_stat(p)] for p, _ in samples]

    def build() -> Dataset:
        images = torch.from_numpy(_decode_all([str(p) for p, _ in samples])).permute(0, 3, 1, 2)
        labels = (torch.from_numpy(np.stack([y for _, y in samples])) if table.multi_label
                  else torch.tensor([y for _, y in samples], dtype=torch.int64))
        return Dataset(name="csv", classes=list(table.names), val=None, test=None,
                       train=ImageTensors(images.contiguous(), labels), groups=groups)
    return _cached(cache, "csv", path, options, stamps, build)


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise UsageError(f"{path} is not a readable image ({type(e).__name__}: {e}); delete or "
                         f"replace it.") from None


def _decode_images(paths: list[str]) -> tuple[np.ndarray | None, str | None]:
    """Decode same-size images to one (N, H, W, 3) uint8 array, or return the first error."""
    from PIL import Image
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                a = np.asarray(to_rgb(im))
        except Exception as e:
            return None, f"{p} is corrupt or truncated ({type(e).__name__}: {e}); delete or replace it."
        if arrays and a.shape != arrays[0].shape:
            return None, (f"{p} is {a.shape[1]}x{a.shape[0]} pixels but {paths[0]} is "
                          f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; small-image data "
                          f"(<= {SMALL_MAX_SIZE} px) must all have one size. Resize them.")
        arrays.append(a)
    return np.stack(arrays), None


_DECODE_CHUNK = 2048


def _decode_all(paths: list[str]) -> np.ndarray:
    chunks = [paths[i:i + _DECODE_CHUNK] for i in range(0, len(paths), _DECODE_CHUNK)]
    if len(chunks) > 1:
        # ~50k small JPEGs: decoding is per-image Python, so spread it over the cores, once
        with ProcessPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1)) as pool:
            results = list(pool.map(_decode_images, chunks))
    else:
        results = [_decode_images(c) for c in chunks]
    for _, err in results:
        if err:
            raise UsageError(err)
    arrays = [a for a, _ in results]
    for a, c in zip(arrays, chunks):
        if a.shape[1:] != arrays[0].shape[1:]:
            raise UsageError(f"{c[0]} is {a.shape[2]}x{a.shape[1]} pixels but {chunks[0][0]} is "
                             f"{arrays[0].shape[2]}x{arrays[0].shape[1]}; small-image data must "
                             f"all have one size. Resize them.")
    return np.concatenate(arrays)


def _decode_folder(classes: list[str], splits: dict) -> Dataset:
    paths = [str(p) for s in splits.values() for p, _ in s]
    images = torch.from_numpy(_decode_all(paths)).permute(0, 3, 1, 2).contiguous()
    parts, start = {}, 0
    for s in ("train", "val", "test"):
        if s in splits:
            n = len(splits[s])
            labels = torch.tensor([y for _, y in splits[s]], dtype=torch.int64)
            parts[s] = ImageTensors(images[start:start + n].clone(), labels)
            start += n
    return Dataset(name="folder", classes=classes, train=parts["train"],
                   val=parts.get("val"), test=parts.get("test"))


# ----------------------------------------------------------------------------- hold-out

def holdout_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_indices, val_indices): a random ``val_size`` of ``range(n)`` held out, the same for
    the same seed on every machine (a private torch.Generator); both sorted."""
    if not 0 <= val_size <= n:
        raise UsageError(f"cannot hold out {val_size} of {n} training images for validation.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# ----------------------------------------------------------------------------- device batches

def _epoch_generator(seed: int, epoch: int, device: str | torch.device = "cpu") -> torch.Generator:
    # one stream per (seed, epoch): an epoch's order and augmentation do not depend on what
    # ran before it, so a resumed run sees the same batches
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random translation and mirroring of a float (B, C, H, W) batch, as in the paper: pad
    ``pad`` pixels of zeros on each side, take a random H x W crop, flip half the images
    left-right. One gather for the whole batch; the random numbers are drawn from ``generator``
    on its device (a GPU generator spares each batch a host-to-device copy, which waits)."""
    b, c, h, w = x.shape
    gd = generator.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gd).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gd).to(x.device)
    flip = (torch.rand(b, generator=generator, device=gd) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)                  # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)    # (B, W)
    # flat positions in the padded image; one gather is ~4x faster on CPU than 4-D indexing
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w)
    return padded.reshape(b, c, -1).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


class EpochBatches:
    """What the on-device loaders share: an epoch's order and augmentation stream drawn from
    generators seeded by (seed, epoch) (the order on the CPU, the augmentation on the data's
    device), DDP sharding (rank r of world w takes every w-th sample of the epoch's order, the
    tail dropped so every rank has as many samples) and the batch count. Subclasses turn each
    batch's indices into tensors (``__iter__``)."""

    def _setup(self, data, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int,
               world_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        n = len(data)
        self.per_rank = n if world_size == 1 else n // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def _batches(self):
        """(indices on the data's device, the augmentation generator) of each batch."""
        g = _epoch_generator(self.seed, self.epoch)
        device = self.data.images.device
        g_aug = g if device.type == "cpu" else _epoch_generator(self.seed, self.epoch, device)
        n = len(self.data)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = order[self.rank:self.per_rank * self.world_size:self.world_size]
        order = order.to(device)
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size], g_aug


class DeviceLoader(EpochBatches):
    """Batches of an ``ImageTensors`` already on the training device, made with tensor ops.

    Yields ``(x, y)``: x float32 (B, C, H, W), ``(x / 255 - mean) / std``, optionally augmented
    (``augment_batch``: the zero padding comes after normalisation, so it is the mean colour, as
    in fb.resnet.torch), upscaled to ``resize`` x ``resize`` pixels if given (bilinear, for an
    ImageNet-size model) and channels_last. ``preprocess`` (a small-image ``Preprocess``)
    gives mean, std and the upscaling in one, as training recorded them. Order and augmentation
    are drawn from generators seeded by (seed, epoch): the order on the CPU, the augmentation on
    the data's device (so on a GPU no batch waits for a copy of random numbers; its batches then
    differ from a CPU run's of the same seed). For DDP, rank r of world w takes every w-th sample of the epoch's
    order, the tail dropped so every rank has as many samples, hence batches.
    """

    def __init__(self, data: ImageTensors, batch_size: int, *, shuffle: bool = False,
                 augment: bool = False, mean=None, std=None, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, resize: int | None = None,
                 preprocess: Preprocess | None = None):
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, not {batch_size}.")
        if preprocess is not None:
            if mean is not None or std is not None or resize is not None:
                raise TypeError("DeviceLoader takes preprocess or mean/std/resize, not both")
            if preprocess.kind != "small" or preprocess.mean is None:
                raise UsageError("DeviceLoader needs a small-image Preprocess record with mean "
                                 f"and std; got {preprocess.to_dict()}.")
            mean, std = preprocess.mean, preprocess.std
            resize = preprocess.input_size if preprocess.upscaled else None
        mean = (0.0, 0.0, 0.0) if mean is None else mean
        std = (1.0, 1.0, 1.0) if std is None else std
        self.resize, self.augment, self.channels_last = resize, augment, channels_last
        self._setup(data, batch_size, shuffle, seed, drop_last, rank, world_size)
        device = data.images.device
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __iter__(self):
        for idx, g_aug in self._batches():
            x = self.data.images[idx].float().div_(255).sub_(self.mean).div_(self.std)
            if self.augment:
                x = augment_batch(x, g_aug)
            if self.resize is not None and self.resize != x.shape[-1]:
                x = upscale(x, self.resize)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.data.labels[idx]


# ----------------------------------------------------------------------------- file batches

class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform, convert=to_rgb):
        self.samples, self.transform, self.convert = samples, transform, convert

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = self.convert(im)
        except Exception as e:
            raise UsageError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); delete "
                             f"or replace it.") from None
        return self.transform(img), label


class _EpochSampler(torch.utils.data.Sampler):
    """Per-epoch order from (seed, epoch), sharded like ``DeviceLoader``."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int, world_size: int):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.per_rank = n if world_size == 1 else n // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        order = (torch.randperm(self.n, generator=_epoch_generator(self.seed, self.epoch))
                 if self.shuffle else torch.arange(self.n))
        return iter(order[self.rank:self.per_rank * self.world:self.world].tolist())


class _FileLoader(torch.utils.data.DataLoader):
    """A DataLoader whose ``set_epoch`` fixes both the order and the workers' random streams."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, generator=torch.Generator(), **kwargs)
        self._seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed((self._seed * 1_000_003 + epoch + 1) % (2 ** 63))

    def __iter__(self):
        try:
            yield from super().__iter__()
        except UsageError as e:
            # a worker's error arrives wrapped in its traceback: keep the one-paragraph message
            raise UsageError(str(e).rsplit("UsageError: ", 1)[-1].strip()) from None


def make_file_loader(data: ImageFiles, batch_size: int, *, train: bool,
                     preprocess: Preprocess | None = None, mean=None, std=None,
                     input_size: int = 224, resize: int | None = None, workers: int = 4,
                     seed: int = 0, rank: int = 0, world_size: int = 1,
                     crop: str = "random-resized") -> torch.utils.data.DataLoader:
    """A DataLoader over image files with the transforms of ``preprocess`` (an "imagenet"
    ``Preprocess``; or one made from ``mean``, ``std``, ``input_size`` and ``resize``):
    training = RandomResizedCrop(input_size) + horizontal flip (the scale and aspect
    augmentation of fb.resnet.torch; ``crop="center"``: the evaluation's crop + a flip);
    evaluation = Resize(resize) + CenterCrop(input_size),
    exactly what predict applies to a file. Call ``set_epoch`` each epoch for a reproducible
    order (sharded by rank like ``DeviceLoader``)."""
    if preprocess is None:
        if mean is None or std is None:
            raise TypeError("make_file_loader needs preprocess, or mean and std")
        preprocess = Preprocess.files(input_size, mean, std, resize=resize)
    elif mean is not None or std is not None or resize is not None:
        raise TypeError("make_file_loader takes preprocess or mean/std/input_size/resize, not both")
    transform = preprocess.train_transform(crop) if train else preprocess.eval_transform()
    sampler = _EpochSampler(len(data), train, seed, rank, world_size)
    loader = _FileLoader(_FileDataset(data.samples, transform, preprocess.convert),
                         batch_size=batch_size,
                         sampler=sampler, num_workers=workers, drop_last=train,
                         pin_memory=torch.cuda.is_available(), seed=seed)
    return loader


# ----------------------------------------------------------------------------- download

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# published md5 checksums (CIFAR: https://www.cs.toronto.edu/~kriz/cifar.html; SVHN: the
# values torchvision checks)
DOWNLOADS = {
    "cifar10": [(CIFAR_URL, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
    "cifar100": [(CIFAR_URL, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")],
    "svhn": [(SVHN_URL, "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
             (SVHN_URL, "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
             (SVHN_URL, "extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7")],
}
DOWNLOAD_TIMEOUT_S = 30


def download(name: str, root: Path, *, svhn_extra: bool = True) -> None:
    """Fetch CIFAR-10/100 or SVHN (with its 1.3 GB extra set when ``svhn_extra``) into ``root``
    from the official locations, checking the published md5 of each file. Files already present
    are kept. Offline or on a mismatch, a ``UsageError`` says which file to put where."""
    if name not in DOWNLOADS:
        raise UsageError(f"--download fetches {', '.join(DOWNLOADS)}, not {name!r}.")
    root = Path(root)
    for base, filename, md5 in DOWNLOADS[name]:
        target = root / filename
        if target.is_file() or filename == "extra_32x32.mat" and not svhn_extra:
            continue
        url = base + filename
        by_hand = (f"Download {url} yourself (md5 {md5}) and put it at {target}, then run "
                   f"again without --download.")
        part = root / (filename + ".part")
        try:
            root.mkdir(parents=True, exist_ok=True)
            digest = hashlib.md5()
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                    open(part, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            raise UsageError(f"could not download {url} ({e}). {by_hand}") from None
        if digest.hexdigest() != md5:
            part.unlink(missing_ok=True)
            raise UsageError(f"{url} downloaded with md5 {digest.hexdigest()}, not the published "
                             f"{md5}: the transfer was damaged or the file changed. {by_hand}")
        os.replace(part, target)


_fetch = download  # open_dataset's `download` flag hides the function's name there
