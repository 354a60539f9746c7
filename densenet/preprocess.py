"""How pixels become a model's input: one record, written by training, read by everything else.

A checkpoint's ``preprocess`` entry (docs/run-directory.md) is a :class:`Preprocess`: which
pixel conversion made 8-bit RGB of the files (``mode``), the images' sizes, the resize rule and
the normalisation. Training builds its data path from it (``data.DeviceLoader`` and
``data.make_file_loader`` take it), and eval, predict, export and cam read it back, so an image
becomes the same tensor in all of them: the readers convert with :func:`to_rgb` and the
transforms come from the record's methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
KINDS = ("small", "imagenet", "volume")
INTENSITY_MODES = ("zscore", "percentile")  # a volume's normalisation (densenet.volumes.prepare_volume)


# ----------------------------------------------------------------------------- pixels

def to_rgb(img):
    """8-bit RGB from any Pillow mode: 16/32-bit integer and float greyscale are scaled down,
    palette, alpha, CMYK, YCbCr and 1-bit images converted as ImageFolder's loader does.

    Pillow's own ``convert("RGB")`` clips 16-bit values at 255, which turns a 16-bit PNG (an
    X-ray exported from DICOM, say) all but white."""
    from PIL import Image
    if img.mode == "RGB":
        return img.copy()
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return img.convert("RGB")


# mode name in the record -> the conversion; a new rule gets a new name, so a checkpoint says
# which one its training data went through. The small-image cache is decoded with DEFAULT_MODE:
# a second rule would have to be part of the cache's key.
CONVERSIONS = {"rgb8": to_rgb}
DEFAULT_MODE = "rgb8"


def resize_for(input_size: int) -> int:
    """The short side an image is resized to before a centre crop of ``input_size``: the
    ImageNet convention of resizing to 256 for a 224 crop, scaled."""
    return round(input_size * 256 / 224)


def upscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """A normalised (B, C, h, w) batch resized to size x size (bilinear; the same in training,
    evaluation and prediction)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# Transform steps as classes rather than lambdas, so DataLoader workers started by spawning
# (macOS, Windows) can pickle them.

class _Convert:
    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return CONVERSIONS[self.mode](img)


class _Upscale:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return upscale(x[None], self.size)[0]


class _EachCrop:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.transform(c) for c in crops])


# ----------------------------------------------------------------------------- the record

@dataclass(frozen=True)
class Preprocess:
    """How a model's inputs were made from image files.

    ``kind`` "volume": volume files (NIfTI, NumPy) read as ``channels`` channels, resized to
    ``shape`` (D, H, W) and normalised per volume by ``intensity`` ("zscore" or "percentile",
    :func:`densenet.volumes.prepare_volume`); ``input_size`` is the shape's last size and
    mean/std are None. ``kind`` "small": images of at most 64 px, decoded whole into a uint8 tensor and
    normalised; every input is resized to ``image_size`` and, when that is smaller than
    ``input_size`` (small images fine-tuning an ImageNet-stem model), upscaled bilinearly after
    normalisation. ``kind`` "imagenet": image files resized so their short side is ``resize``
    and centre-cropped to ``input_size`` (training: random resized crops of ``input_size``).
    ``mean``/``std`` are per channel on the [0, 1] scale; both None only for a small-image net
    from a foreign file, whose normalisation nobody recorded. ``mode`` names the pixel
    conversion (:data:`CONVERSIONS`).
    """
    kind: str
    input_size: int
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    image_size: int | None = None
    resize: int | None = None
    mode: str = DEFAULT_MODE
    shape: tuple[int, int, int] | None = None
    intensity: str | None = None
    channels: int | None = None

    def __post_init__(self):
        # lists, tensors and numpy numbers in; plain tuples and ints kept (hashable, comparable)
        object.__setattr__(self, "mean", _stats(self.mean))
        object.__setattr__(self, "std", _stats(self.std))
        for name in ("input_size", "image_size", "resize", "channels"):
            v = getattr(self, name)
            if isinstance(v, np.integer):
                object.__setattr__(self, name, int(v))
        if self.shape is not None and isinstance(self.shape, (list, tuple, np.ndarray, torch.Tensor)):
            object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        _check(self)

    @classmethod
    def small(cls, image_size: int, input_size: int, mean, std) -> "Preprocess":
        """Small images of ``image_size`` px fed at ``input_size`` (larger when upscaled)."""
        return cls("small", input_size, mean, std, image_size=image_size)

    @classmethod
    def volume(cls, shape, intensity: str, channels: int) -> "Preprocess":
        """Volumes of ``channels`` channels resized to ``shape`` and normalised by ``intensity``."""
        shape = tuple(int(v) for v in shape)
        return cls("volume", shape[-1], None, None, shape=shape, intensity=intensity,
                   channels=channels)

    @classmethod
    def files(cls, input_size: int, mean, std, resize: int | None = None) -> "Preprocess":
        """Image files resized to ``resize`` (default :func:`resize_for`) and cropped."""
        return cls("imagenet", input_size, mean, std,
                   resize=resize_for(input_size) if resize is None else resize)

    @classmethod
    def from_dict(cls, d, source: str | None = None) -> "Preprocess":
        """The record of a checkpoint's ``preprocess`` dict, checked. A dict written before the
        ``mode`` field existed reads as ``rgb8``, the nearest rule (its training converted 8-bit
        images alike but clipped 16-bit ones); a small dict without ``image_size`` has images of
        ``input_size``; an "imagenet" dict without ``resize`` uses :func:`resize_for`."""
        where = f"{source}'s 'preprocess' entry" if source else "the 'preprocess' entry"
        if isinstance(d, Preprocess):
            return d
        if d is None:
            raise UsageError(f"{source or 'the checkpoint'} has no 'preprocess' entry (see "
                             f"docs/run-directory.md); it was not written by 'densenet train'.")
        if not isinstance(d, Mapping):
            raise UsageError(f"{where} is a {type(d).__name__}, not a dict (see "
                             f"docs/run-directory.md); the checkpoint was not written by "
                             f"'densenet train'.")
        missing = [k for k in ("kind", "input_size", "mean", "std") if k not in d]
        if missing:
            raise UsageError(f"{where} lacks {', '.join(missing)} (see docs/run-directory.md); "
                             f"the checkpoint was not written by 'densenet train'.")
        kind, size = d["kind"], d["input_size"]
        image_size, resize = d.get("image_size"), d.get("resize")
        if kind == "small" and image_size is None:
            image_size = size
        if kind == "imagenet" and resize is None and _is_size(size):
            resize = resize_for(size)
        try:
            return cls(kind, size, d["mean"], d["std"], image_size=image_size, resize=resize,
                       mode=d.get("mode", DEFAULT_MODE), shape=d.get("shape"),
                       intensity=d.get("intensity"), channels=d.get("channels"))
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        """The checkpoint's ``preprocess`` dict (plain lists and numbers, JSON-ready)."""
        d = {"kind": self.kind, "input_size": self.input_size, "resize": self.resize,
             "mean": None if self.mean is None else list(self.mean),
             "std": None if self.std is None else list(self.std), "mode": self.mode}
        if self.kind == "small":
            d["image_size"] = self.image_size
        if self.kind == "volume":
            d.update(shape=list(self.shape), intensity=self.intensity, channels=self.channels)
        return d

    @property
    def upscaled(self) -> bool:
        """Small images fed to the model larger than they are."""
        return self.kind == "small" and self.input_size != self.image_size

    def with_stats(self, mean, std) -> "Preprocess":
        """The same record with this normalisation (for a net whose file did not say)."""
        return replace(self, mean=mean, std=std)

    def convert(self, img):
        """A PIL image in any mode as the 8-bit RGB image the model's training data was."""
        return CONVERSIONS[self.mode](img)

    def eval_transform(self, ten_crop: bool = False):
        """PIL image (any mode) -> normalised (C, H, W) tensor as training fed the model: small
        images resized to ``image_size`` (CIFAR style), then upscaled to ``input_size`` when
        training upscaled them; large ones Resize(resize) + CenterCrop(input_size), or with
        ``ten_crop`` the four corners, the centre and their mirrors as (10, C, H, W)."""
        from torchvision import transforms as T
        tensor = self._to_tensor()
        if self.kind == "small":
            if ten_crop:
                raise UsageError("the 10-crop is the ImageNet protocol (crops of a resized "
                                 "large image); small images are evaluated whole. Leave out "
                                 "--ten-crop.")
            steps = [_Convert(self.mode), T.Resize((self.image_size, self.image_size)), *tensor]
            if self.upscaled:
                steps.append(_Upscale(self.input_size))
            return T.Compose(steps)
        if ten_crop:
            return T.Compose([_Convert(self.mode), T.Resize(self.resize),
                              T.TenCrop(self.input_size), _EachCrop(T.Compose(tensor))])
        return T.Compose([_Convert(self.mode), T.Resize(self.resize),
                          T.CenterCrop(self.input_size), *tensor])

    def train_transform(self, crop: str = "random-resized"):
        """PIL image (any mode) -> augmented normalised tensor for training on image files:
        RandomResizedCrop(input_size) + horizontal flip (fb.resnet.torch's scale and aspect
        augmentation), or with ``crop="center"`` the evaluation's Resize + CenterCrop and a
        horizontal flip (CheXNet's augmentation). Small images are augmented a batch at a time
        on the device instead (``data.DeviceLoader``)."""
        from torchvision import transforms as T
        if self.kind != "imagenet":
            raise UsageError("small images are augmented on the device a batch at a time "
                             "(data.DeviceLoader); a per-image training transform is for image "
                             "files (kind 'imagenet').")
        if crop == "center":
            return T.Compose([_Convert(self.mode), T.Resize(self.resize), T.CenterCrop(self.input_size),
                              T.RandomHorizontalFlip(), *self._to_tensor()])
        return T.Compose([_Convert(self.mode), T.RandomResizedCrop(self.input_size),
                          T.RandomHorizontalFlip(), *self._to_tensor()])

    def _to_tensor(self) -> list:
        from torchvision import transforms as T
        if self.mean is None:
            raise UsageError("this model's record does not say how its inputs were normalised "
                             "(a small-image net from a foreign file); use a checkpoint written "
                             "by 'densenet train'.")
        return [T.ToTensor(), T.Normalize(list(self.mean), list(self.std))]


def as_record(pre: Preprocess | Mapping) -> Preprocess:
    """A record from a record or a checkpoint's ``preprocess`` dict."""
    return Preprocess.from_dict(pre)


# ----------------------------------------------------------------------------- checks

def _is_size(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _stats(v) -> tuple[float, float, float] | None:
    """Three per-channel numbers as a tuple of floats (None stays None)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)) or len(v) != 3:
        raise UsageError(f"mean and std must each be three numbers (r, g, b), got {v!r}.")
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise UsageError(f"mean and std must each be three numbers (r, g, b), got {v!r}.") from None
    return out


def _check(p: Preprocess) -> None:
    if p.kind not in KINDS:
        raise UsageError(f"kind must be 'small', 'imagenet' or 'volume', not {p.kind!r}.")
    if p.kind == "volume":
        _check_volume(p)
        return
    if p.shape is not None or p.intensity is not None or p.channels is not None:
        raise UsageError(f"shape, intensity and channels describe volumes; an {p.kind!r} record "
                         f"has None.")
    if not _is_size(p.input_size):
        raise UsageError(f"input_size must be a whole number of pixels >= 1, not {p.input_size!r}.")
    if p.kind == "small":
        if not _is_size(p.image_size) or p.image_size > p.input_size:
            raise UsageError(f"a small-image record needs image_size, the training images' size "
                             f"in pixels, at most input_size ({p.input_size}); got "
                             f"{p.image_size!r}.")
        if p.resize is not None:
            raise UsageError(f"small images are not resized and cropped; resize must be None, "
                             f"not {p.resize!r}.")
    else:
        if p.image_size is not None:
            raise UsageError(f"image_size is for small images; an 'imagenet' record has None, "
                             f"not {p.image_size!r}.")
        if not _is_size(p.resize) or p.resize < p.input_size:
            raise UsageError(f"resize must be a whole number of pixels of at least input_size "
                             f"({p.input_size}) to crop from, not {p.resize!r}.")
    if (p.mean is None) != (p.std is None):
        raise UsageError("give both mean and std, or neither.")
    for name, v in (("mean", p.mean), ("std", p.std)):
        if v is not None and not all(math.isfinite(x) for x in v):
            raise UsageError(f"{name} must be three finite numbers (r, g, b), got {list(v)}.")
    if p.std is not None and min(p.std) <= 0:
        raise UsageError(f"std must be positive in every channel, got {list(p.std)}.")
    if p.mode not in CONVERSIONS:
        raise UsageError(f"pixel conversion {p.mode!r} is not one this version knows "
                         f"({', '.join(CONVERSIONS)}); the checkpoint was written by a newer "
                         f"densenet: pip install -U densenet-torch.")


def _check_volume(p: Preprocess) -> None:
    if (not isinstance(p.shape, tuple) or len(p.shape) != 3 or not all(_is_size(v) for v in p.shape)):
        raise UsageError(f"a volume record needs shape, three sizes (D, H, W) >= 1, not {p.shape!r}.")
    if p.input_size != p.shape[-1]:
        raise UsageError(f"a volume record's input_size is its shape's last size ({p.shape[-1]}), "
                         f"not {p.input_size!r}.")
    if p.intensity not in INTENSITY_MODES:
        raise UsageError(f"a volume record's intensity must be one of {', '.join(INTENSITY_MODES)}, "
                         f"not {p.intensity!r}.")
    if not _is_size(p.channels):
        raise UsageError(f"a volume record needs channels, a whole number >= 1, not {p.channels!r}.")
    if p.mean is not None or p.std is not None or p.image_size is not None or p.resize is not None:
        raise UsageError("volumes are normalised per volume (intensity); a volume record has no "
                         "mean, std, image_size or resize.")
