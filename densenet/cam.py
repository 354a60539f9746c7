"""Where the model looks: Grad-CAM heat maps (Selvaraju et al., "Grad-CAM: Visual Explanations
from Deep Networks via Gradient-based Localization", ICCV 2017).

For a class c with logit y^c and the output A of the last dense block (the block input and every
layer's new maps: the last convolutional features, before the final BN-ReLU and global pooling),
the map is ``relu(sum_k alpha_k^c A^k)`` with ``alpha_k^c`` the spatial mean of ``dy^c/dA^k``
(equations 1 and 2 of the paper), upsampled to the input size (linearly, bilinearly or
trilinearly for 1-D, 2-D and 3-D models).

Four levels:

* :func:`grad_cam`: maps of a normalised batch, for any :class:`~densenet.DenseNet` (signals,
  images or volumes); :func:`occlusion` the same for occlusion sensitivity (Zeiler & Fergus,
  ECCV 2014: how far a class's probability falls when a patch of the input is covered), which
  every file-level function below draws with ``method="occlusion"``;
* :func:`cam_for_images`: image files preprocessed as ``densenet predict`` does, a class chosen
  by name or the predicted one;
* :func:`render_panels`: one PNG with the heat maps blended over the images (``densenet cam``);
* :func:`cam_for_volumes`: volume files (NIfTI, NumPy) of a 3-D model, each map written as a
  PNG of three orthogonal slices through its maximum (:func:`render_slices`) and as a NIfTI
  file of the model input's shape.
"""

from __future__ import annotations

import difflib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError
from .inference import Loaded, imagenet_class_names, open_image, open_volume
from .model import DenseNet
from .occlusion import check_patch, occlusion_maps
from .resnet import ResNet
from .preprocess import to_rgb
from .rundir import atomic_write_bytes
from .volumes import INSTALL_HELP, VOLUME_EXTENSIONS, is_volume_file, write_nifti

__all__ = ["GradCAM", "ImageCAM", "VolumeCAM", "grad_cam", "occlusion", "METHODS", "cam_for_images",
           "cam_for_volumes", "render_panels", "render_slices", "slices_through", "class_names",
           "check_out_path", "check_out_dir", "peak_of", "last_block", "CAPTION_HEIGHT", "PLANES"]

CAPTION_HEIGHT = 28  # pixels of the caption strip under each panel
ALPHA = 0.5          # weight of the heat map in the blend
MIN_SIZE, MAX_SIZE = 64, 2048


_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}  # spatial dims -> upsampling
_INPUTS = {1: "signals (N, C, L)", 2: "images (N, C, H, W)", 3: "volumes (N, C, D, H, W)"}


class GradCAM(NamedTuple):
    """What :func:`grad_cam` and :func:`occlusion` return (also unpacks as ``cams, probs,
    classes``)."""
    cams: torch.Tensor     # (N, *spatial) float32 in [0, 1]: (N, H, W) for images, (N, D, H, W)
                           # for volumes, (N, L) for signals; the input's spatial size
    probs: torch.Tensor    # (N, num_classes) softmax of the logits (occlusion with
                           # multi_label: their sigmoids)
    classes: torch.Tensor  # (N,) int64: the class each map explains


def last_block(model: DenseNet | ResNet) -> torch.nn.Module:
    """The last dense block, ``model.features.denseblock{len(block_config)}`` (for a ResNet
    baseline its last residual stage)."""
    if isinstance(model, ResNet):
        return model.last_stage()
    return getattr(model.features, f"denseblock{len(model.block_config)}")


def _check_batch(model, x, name: str) -> int:
    """The model's spatial dimensions, once ``x`` is a batch of its inputs."""
    dims = getattr(model, "spatial_dims", 2)
    if not isinstance(x, torch.Tensor) or x.dim() != dims + 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        model_kind = "" if dims == 2 else f" for this {dims}-D model"
        raise UsageError(f"{name} needs a batch of {_INPUTS[dims]}{model_kind}, got {got}.")
    return dims


def grad_cam(model: DenseNet, x: torch.Tensor,
             target: int | Sequence[int] | torch.Tensor | None = None) -> GradCAM:
    """Grad-CAM maps of the last dense block for a normalised batch ``x``: (N, C, H, W) images
    for a 2-D model, (N, C, D, H, W) volumes for a 3-D one, (N, C, L) signals for a 1-D one.

    Args:
        model: any DenseNet (efficient or reference implementation); it runs in eval mode and
            is put back in the mode it was in.
        x: input batch on the model's device, normalised as in training.
        target: the class to explain: None for each input's predicted class, an int for all
            inputs, or one class index per input.

    Each map is ``relu(sum_k alpha_k A^k)`` (Selvaraju et al., ICCV 2017, equations 1-2), with
    ``alpha_k`` the mean of ``dy^c/dA^k`` over all spatial positions, upsampled to the input's
    spatial size (bilinearly for images, trilinearly for volumes, linearly for signals;
    ``align_corners=False``) and divided by its maximum, so it lies in [0, 1]; a map with no
    positive evidence stays all zero. Only the gradient with respect to the block's output is
    computed (``torch.autograd.grad``, with the detached output as the leaf): nothing before the
    block is differentiated and no parameter's ``.grad`` is touched.
    """
    dims = _check_batch(model, x, "grad_cam")
    kept: list[torch.Tensor] = []

    def keep(module, inputs, output):
        # From here on the forward records a graph, with the block's maps as its leaf: what ran
        # before needs none. The surrounding no_grad() restores the mode after the forward.
        torch.set_grad_enabled(True)
        kept.append(output.detach().requires_grad_(True))
        return kept[-1]

    was_training = model.training
    model.eval()
    handle = last_block(model).register_forward_hook(keep)
    try:
        with torch.inference_mode(False), torch.no_grad():  # a graph, even inside inference_mode
            logits = model(x)
            classes = _target_classes(target, logits)
            score = logits.gather(1, classes[:, None]).sum()  # inputs are independent in eval
            (grad,) = torch.autograd.grad(score, kept[0])
    finally:
        handle.remove()
        model.train(was_training)
    a, grad = kept[0].detach().float(), grad.float()
    spatial = tuple(range(2, a.dim()))
    alpha = grad.mean(dim=spatial, keepdim=True)            # alpha_k^c, equation 1
    cams = F.relu((alpha * a).sum(dim=1, keepdim=True))     # equation 2
    cams = F.interpolate(cams, size=x.shape[2:], mode=_INTERPOLATION[dims],
                         align_corners=False)[:, 0]
    peak = cams.amax(dim=tuple(range(1, cams.dim())), keepdim=True)
    cams = cams / peak.clamp_min(torch.finfo(cams.dtype).tiny)
    return GradCAM(cams.contiguous(), logits.detach().float().softmax(1), classes)


def occlusion(model: torch.nn.Module, x: torch.Tensor,
              target: int | Sequence[int] | torch.Tensor | None = None, *, patch=None,
              stride=None, multi_label: bool = False, batch_size: int | None = None) -> GradCAM:
    """Occlusion-sensitivity maps (Zeiler & Fergus, ECCV 2014) for a normalised batch ``x``,
    the same shapes as :func:`grad_cam` and the same ``target``: for each input, the fall in
    the explained class's probability when a patch of the input is covered with the input's
    mean, averaged over the patch positions covering each voxel, its positive part divided by
    its maximum (:func:`densenet.occlusion.occlusion_maps`).

    ``patch`` and ``stride`` are in input voxels (pixels), an int or one per axis; by default a
    quarter of each side for volumes, an eighth for images and signals, and half the patch.
    ``probs`` are softmax probabilities, or sigmoids with ``multi_label``. It costs one forward
    pass per patch position and input, ``batch_size`` positions at a time (by default as many
    as hold about 2M input values, at most 64)."""
    _check_batch(model, x, "occlusion")
    check_patch(tuple(x.shape[2:]), patch, stride)  # a mistake fails before any forward pass
    was_training = model.training
    with torch.no_grad():
        logits = model.eval()(x)
    model.train(was_training)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    classes = _target_classes(target, logits)
    cams = torch.stack([occlusion_maps(model, xi, [c], patch, stride, multi_label, batch_size)[0][0]
                        for xi, c in zip(x, classes.tolist())])
    probs = logits.sigmoid() if multi_label else logits.softmax(1)
    return GradCAM(cams.contiguous(), probs.float(), classes)


def _target_classes(target, logits: torch.Tensor) -> torch.Tensor:
    n, num_classes = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    classes = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if classes.numel() == 1:
        classes = classes.expand(n)
    if classes.numel() != n:
        raise UsageError(f"target gives {classes.numel()} classes for {n} images; give one "
                         f"class index, or one per image.")
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel():
        raise UsageError(f"target class {int(bad[0])} is out of range: the model has "
                         f"{num_classes} classes (0 to {num_classes - 1}).")
    return classes


METHODS = ("gradcam", "occlusion")  # what cam_for_images / cam_for_volumes draw


def _check_method(method: str, patch, stride, spatial: Sequence[int]) -> None:
    if method not in METHODS:
        raise UsageError(f"the heat-map method must be one of {', '.join(METHODS)}, "
                         f"got {method!r}.")
    if method == "gradcam" and (patch is not None or stride is not None):
        raise UsageError("the patch and its stride are occlusion's settings; Grad-CAM has none. "
                         "Add --method occlusion, or leave out --patch and --stride.")
    if method == "occlusion":
        check_patch(tuple(spatial), patch, stride)


def _batch_maps(method: str, model, x: torch.Tensor, target, patch, stride) -> GradCAM:
    if method == "occlusion":
        return occlusion(model, x, target, patch=patch, stride=stride)
    return grad_cam(model, x, target)


def _label_maps(method: str, model, x1: torch.Tensor, labels: list[int], patch,
                stride) -> torch.Tensor:
    """A multi-label model's maps of ``labels`` in one input ``x1`` (a batch of one)."""
    if method == "occlusion":  # one pass over the patch positions serves every label
        return occlusion_maps(model, x1[0], labels, patch, stride, multi_label=True)[0]
    return grad_cam(model, x1.expand(len(labels), *x1.shape[1:]), torch.tensor(labels)).cams


# ----------------------------------------------------------------------------- image files

@dataclass
class ImageCAM:
    """The Grad-CAM map of one image file."""
    path: str
    image: "PIL.Image.Image"  # as the model saw it (resized / centre-cropped), not normalised
    cam: torch.Tensor         # (H, W) in [0, 1], the size of ``image``
    class_name: str           # the class the map explains
    probability: float        # its softmax probability (a multi-label model's: its sigmoid)

    @property
    def caption(self) -> str:
        return f"{self.class_name} p={self.probability:.2f}"


def class_names(loaded: Loaded) -> list[str]:
    """Label index -> name: the checkpoint's classes; for foreign weights the ImageNet names
    when the head has 1000 outputs, else "0" .. "N-1"."""
    if loaded.classes is not None:
        return list(loaded.classes)
    num_classes = loaded.model.classifier.out_features
    return imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]


def _class_index(name: str, names: list[str], source: str) -> int:
    if name in names:
        return names.index(name)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = (f"did you mean {', '.join(repr(c) for c in close)}? " if close else "")
    shown = ", ".join(repr(c) for c in names[:10]) + (" ..." if len(names) > 10 else "")
    raise UsageError(f"--class {name!r} is not a class of the model in {source}; {hint}"
                     f"its {len(names)} classes: {shown}.")


def cam_for_images(loaded: Loaded, paths: Sequence[str | os.PathLike],
                   class_name: str | None = None, device: torch.device | str = "cpu",
                   batch_size: int = 16, method: str = "gradcam", patch=None,
                   stride=None) -> list[ImageCAM]:
    """Grad-CAM of each image file, preprocessed as ``densenet predict`` does
    (``method="occlusion"``: occlusion sensitivity, :func:`occlusion`, with its ``patch`` and
    ``stride`` in pixels of the model's input).

    ``class_name`` (one of the model's class names) is explained in every image; by default
    each image's predicted class. Every path is read and checked before any work.
    """
    pre = loaded.pre
    if pre.kind == "volume":
        raise UsageError(f"the model in {loaded.source} was trained on volumes; give it volume "
                         f"files ({', '.join(VOLUME_EXTENSIONS)}): cam_for_volumes explains them.")
    if pre.mean is None:
        raise UsageError(f"{loaded.source} does not say how its inputs were normalised (a "
                         f"small-image net from a foreign file); cam needs a checkpoint written "
                         f"by 'densenet train'.")
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("give one or more image files.")
    for p in paths:
        if is_volume_file(p):
            raise UsageError(f"{p} is a volume but the model in {loaded.source} was trained on "
                             f"2-D images; give it image files.")
    names = class_names(loaded)
    target = None if class_name is None else _class_index(class_name, names, loaded.source)
    transform = pre.eval_transform()
    tensors = [transform(open_image(p, pre)) for p in paths]
    _check_method(method, patch, stride, tensors[0].shape[1:])
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    model = loaded.model.to(device)
    if loaded.multi_label:
        return _multilabel_cams(loaded, model, paths, tensors, names, target, mean, std, device,
                                (method, patch, stride))
    out = []
    for i in range(0, len(tensors), batch_size):
        x = torch.stack(tensors[i:i + batch_size])
        cams, probs, classes = _batch_maps(method, model, x.to(device), target, patch, stride)
        for j, c in enumerate(classes.tolist()):
            out.append(ImageCAM(str(paths[i + j]), _to_pil(x[j] * std + mean), cams[j].cpu(),
                                names[c], float(probs[j, c])))
    return out


def _labels_to_explain(loaded, model, t, num_labels: int, target, device):
    """A multi-label model's input ``t`` as a batch of one, its label probabilities, and the
    labels to explain: ``target``, or those over their thresholds (the most probable where none
    is)."""
    thresholds = loaded.thresholds or [0.5] * num_labels
    x = t[None].to(device)
    with torch.no_grad():
        probs = model.eval()(x).float().sigmoid()[0]
    if target is not None:
        return x, probs, [target]
    labels = [c for c, (p, th) in enumerate(zip(probs.tolist(), thresholds)) if p >= th]
    return x, probs, labels or [int(probs.argmax())]


def _multilabel_cams(loaded, model, paths, tensors, names, target, mean, std, device,
                     how) -> list[ImageCAM]:
    """A multi-label model: the map of label ``target`` in every image, or without one a map
    per label over its threshold in each image (the most probable label where none is); the
    caption's probability is the label's sigmoid."""
    out = []
    for path, t in zip(paths, tensors):
        x, probs, labels = _labels_to_explain(loaded, model, t, len(names), target, device)
        method, patch, stride = how
        cams = _label_maps(method, model, x, labels, patch, stride)
        image = _to_pil(t * std + mean)
        out += [ImageCAM(str(path), image, cams[k].cpu(), names[c], float(probs[c]))
                for k, c in enumerate(labels)]
    return out


# ----------------------------------------------------------------------------- rendering

def check_out_path(path: str | os.PathLike) -> Path:
    """``path`` as the PNG file to write, or a UsageError saying why it cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name "
                         f"(e.g. {path / 'cam.png'}).")
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {path}: the heat maps are written as PNG; give a file name "
                         f"ending in .png.")
    return path


def render_panels(images: Sequence, cams: Sequence, captions: Sequence[str],
                  out_path: str | os.PathLike, size: int = 224) -> Path:
    """Write the heat maps over their images as one PNG: a row of panels, one per image.

    Each panel is the image resized to ``size`` x ``size`` with its map, colour-mapped (jet),
    blended on top (alpha 0.5), and under it a ``CAPTION_HEIGHT`` (28) pixel strip with its
    caption. The PNG is exactly ``(len(images) * size) x (size + 28)`` pixels (width x height).

    Args:
        images: PIL images, or (3, H, W) float tensors/arrays in [0, 1].
        cams: (H', W') maps in [0, 1] (tensors or arrays), any size.
        captions: one line of text per panel, e.g. "cat p=0.93".
        out_path: a .png file; missing parent folders are created, and the file is replaced
            atomically (a reader never sees half of it).
        size: panel width and height in pixels.

    Returns the path written.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    out_path = check_out_path(out_path)
    if not len(images) == len(cams) == len(captions):
        raise UsageError(f"render_panels needs as many maps and captions as images, got "
                         f"{len(images)} images, {len(cams)} maps and {len(captions)} captions.")
    if not images:
        raise UsageError("render_panels needs at least one image.")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"the panel size (--size) must be a whole number of pixels from "
                         f"{MIN_SIZE} to {MAX_SIZE}, got {size!r}.")
    jet = colormaps["jet"]
    font = _font()
    canvas = Image.new("RGB", (len(images) * size, size + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, cam, caption) in enumerate(zip(images, cams, captions)):
        picture = np.asarray(_to_pil(image).resize((size, size), Image.BILINEAR), np.float32) / 255
        heat = Image.fromarray(np.asarray(_numpy(cam), np.float32))  # mode "F"
        heat = np.clip(np.asarray(heat.resize((size, size), Image.BILINEAR)), 0.0, 1.0)
        blend = (1 - ALPHA) * picture + ALPHA * jet(heat)[..., :3]
        canvas.paste(Image.fromarray(np.round(blend * 255).astype(np.uint8)), (i * size, 0))
        text = _fit(draw, str(caption), font, size - 8)
        top = size + (CAPTION_HEIGHT - _text_height(draw, text, font)) // 2
        draw.text((i * size + 4, top), text, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    try:
        atomic_write_bytes(out_path, buf.getvalue())
    except OSError as e:
        raise UsageError(f"cannot write {out_path}: {e.strerror or e}; choose a writable --out "
                         f"path.") from None
    return out_path


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _to_pil(image):
    """A PIL image as the model sees its pixels (``preprocess.to_rgb``: a 16-bit image is not
    drawn white); a (3, H, W) float tensor or array in [0, 1] as an 8-bit RGB image."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return to_rgb(image)
    a = _numpy(image)
    if a.ndim != 3 or a.shape[0] != 3:
        raise UsageError(f"an image must be a PIL image or a (3, H, W) array, got shape {a.shape}.")
    a = np.clip(np.nan_to_num(a.transpose(1, 2, 0).astype(np.float32)), 0.0, 1.0)
    return Image.fromarray(np.round(a * 255).astype(np.uint8))


def _font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


def _text_height(draw, text: str, font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), text or " ", font=font)
    return bottom


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with "..." to fit in ``width`` pixels, its last word ("p=0.93") kept."""
    if draw.textlength(text, font=font) <= width:
        return text
    head, _, tail = text.rpartition(" ")
    tail = " " + tail if head else tail
    while head and draw.textlength(head + "..." + tail, font=font) > width:
        head = head[:-1]
    return head + "..." + tail


# ----------------------------------------------------------------------------- volume files

# The plane each slice lies in, for volumes read from NIfTI (reoriented to RAS+, so D, H, W run
# left-to-Right, posterior-to-Anterior, inferior-to-Superior): a fixed D index is a sagittal
# slice, a fixed H a coronal one and a fixed W an axial one. NumPy volumes keep their own axes.
PLANES = ("sagittal", "coronal", "axial")


@dataclass
class VolumeCAM:
    """The Grad-CAM map of one volume file, and the files it was written to."""
    path: str
    volume: torch.Tensor      # (C, D, H, W): the model's input (resized and normalised)
    cam: torch.Tensor         # (D, H, W) in [0, 1], the shape of ``volume``'s spatial axes
    class_name: str           # the class the map explains
    probability: float        # its softmax probability (a multi-label model's: its sigmoid)
    peak: tuple[int, int, int] | None  # (d, h, w) of the map's maximum; None for an all-zero map
    png: Path | None = None   # three orthogonal slices through ``peak`` (render_slices)
    nifti: Path | None = None  # the map as a NIfTI file (.nii.gz)
    method: str = "gradcam"   # "gradcam" or "occlusion": what made the map

    @property
    def caption(self) -> str:
        return f"{self.class_name} p={self.probability:.2f}"

    def to_dict(self) -> dict:
        """The result as plain values (JSON-ready)."""
        return {"volume": self.path, "class": self.class_name, "probability": self.probability,
                "method": self.method,
                "peak": None if self.peak is None else list(self.peak),
                "png": None if self.png is None else str(self.png),
                "nifti": None if self.nifti is None else str(self.nifti)}


def check_out_dir(path: str | os.PathLike) -> Path:
    """``path`` as the folder to write volume heat maps into (created when missing), or a
    UsageError saying why it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; a volume model writes a PNG and a NIfTI heat "
                         f"map per volume, so give a folder (e.g. {path.parent / 'cams'}).")
    if not path.exists() and path.suffix.lower() == ".png":
        raise UsageError(f"--out {path}: a volume model writes a PNG and a NIfTI heat map per "
                         f"volume; give a folder for them, not a .png file name.")
    return path


def cam_for_volumes(loaded: Loaded, paths: Sequence[str | os.PathLike],
                    out_dir: str | os.PathLike | None, class_name: str | None = None,
                    device: torch.device | str = "cpu", batch_size: int = 4,
                    size: int = 224, method: str = "gradcam", patch=None,
                    stride=None) -> list[VolumeCAM]:
    """Grad-CAM of each volume file (``.nii``, ``.nii.gz``, ``.npy``, ``.npz``) for a model
    trained on volumes, each read as ``densenet predict`` reads it
    (:func:`densenet.inference.open_volume`: reoriented, resized and normalised as in training).
    ``method="occlusion"`` draws occlusion sensitivity instead (:func:`occlusion`; ``patch`` and
    ``stride`` in voxels of the model's input, by default a quarter of each side and half that),
    written as ``NAME_CLASS_occlusion.png`` and ``.nii.gz``.

    ``class_name`` (one of the model's class names) is explained in every volume; by default
    each volume's predicted class, or for a multi-label model a map per label over its threshold
    (the most probable label where none is). Every path is read and checked before any work.

    Each map is written into ``out_dir`` (created when missing; None writes nothing) under the
    volume's file name without its extension, the class name and "cam":

    * ``NAME_CLASS_cam.png``: :func:`render_slices`, three orthogonal slices (fixed D, fixed H,
      fixed W) through the map's maximum voxel, the volume in grey with the map blended on top
      (jet, alpha 0.5), ``3 * size`` x ``size + 56`` pixels;
    * ``NAME_CLASS_cam.nii.gz``: the map itself, float32 of the model input's shape (D, H, W),
      for a viewer. For a NIfTI input its affine places it over the original scan (the input's
      affine, reoriented to RAS+ and scaled for the resize to the model's shape); a NumPy input's
      affine maps it onto the input array's voxel indices.

    Two inputs of the same name get "-2", "-3", ... after the name. Returns one
    :class:`VolumeCAM` per map, in order, with the map's maximum (d, h, w) and the files written.
    """
    pre = loaded.pre
    if pre.kind != "volume":
        raise UsageError(f"the model in {loaded.source} was trained on 2-D images, not volumes; "
                         f"give it image files (cam_for_images explains them).")
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("give one or more volume files.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    _check_size(size)
    for p in paths:
        if not is_volume_file(p):
            raise UsageError(f"{p} is not a volume file but the model in {loaded.source} was "
                             f"trained on volumes; give it {', '.join(VOLUME_EXTENSIONS)} files.")
    out = None
    if out_dir is not None:
        out = check_out_dir(out_dir)
        _require_nibabel(out)
    names = class_names(loaded)
    target = None if class_name is None else _class_index(class_name, names, loaded.source)
    _check_method(method, patch, stride, pre.shape)
    tensors = [open_volume(p, pre) for p in paths]
    model = loaded.model.to(device)
    results: list[tuple[int, VolumeCAM]] = []  # (input index, map)
    if loaded.multi_label:
        for i, t in enumerate(tensors):
            x, probs, labels = _labels_to_explain(loaded, model, t, len(names), target, device)
            cams = _label_maps(method, model, x, labels, patch, stride)
            results += [(i, _volume_cam(paths[i], t, cams[k], names[c], float(probs[c]), method))
                        for k, c in enumerate(labels)]
    else:
        for i in range(0, len(tensors), batch_size):
            x = torch.stack(tensors[i:i + batch_size])
            cams, probs, classes = _batch_maps(method, model, x.to(device), target, patch, stride)
            results += [(i + j, _volume_cam(paths[i + j], x[j], cams[j], names[c],
                                            float(probs[j, c]), method))
                        for j, c in enumerate(classes.tolist())]
    if out is not None:
        stems = _unique_stems(paths)
        inputs = {p.resolve() for p in paths}
        for i, r in results:
            base = out / f"{stems[i]}_{_safe(r.class_name)}_{_SUFFIX[method]}"
            r.png, r.nifti = base.with_name(base.name + ".png"), base.with_name(base.name + ".nii.gz")
            if r.nifti.resolve() in inputs:
                raise UsageError(f"writing the heat map of {r.path} would replace the input "
                                 f"{r.nifti}; choose another --out folder.")
            title = (f"{r.class_name} p={r.probability:.2f}, {_TITLE[method]}" + (
                "no positive evidence" if r.peak is None else
                f"peak (d, h, w) = ({r.peak[0]}, {r.peak[1]}, {r.peak[2]})"))
            render_slices(r.volume, r.cam, r.peak, r.png, title=title, size=size)
            _write(r.nifti, lambda target, r=r: write_nifti(
                target, r.cam.numpy(), _heatmap_affine(Path(r.path), tuple(r.cam.shape))))
    return [r for _, r in results]


_SUFFIX = {"gradcam": "cam", "occlusion": "occlusion"}  # NAME_CLASS_{suffix}.png / .nii.gz
_TITLE = {"gradcam": "", "occlusion": "occlusion "}


def _volume_cam(path: Path, volume: torch.Tensor, cam: torch.Tensor, name: str,
                probability: float, method: str) -> VolumeCAM:
    cam = cam.detach().float().cpu().contiguous()
    return VolumeCAM(str(path), volume.detach().cpu(), cam, name, probability, peak_of(cam),
                     method=method)


def peak_of(cam: torch.Tensor) -> tuple[int, int, int] | None:
    """(d, h, w) of a (D, H, W) map's maximum (the first in C order where several are), or
    None when the map is all zero (no positive evidence, nowhere to point)."""
    if not bool((cam > 0).any()):
        return None
    flat = int(torch.argmax(cam.reshape(-1)))
    return tuple(int(v) for v in np.unravel_index(flat, tuple(cam.shape)))


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"the panel size (--size) must be a whole number of pixels from "
                         f"{MIN_SIZE} to {MAX_SIZE}, got {size!r}.")


def _require_nibabel(out: Path) -> None:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        raise UsageError(f"cannot write the NIfTI heat maps into {out}: {INSTALL_HELP}.") from None


def _safe(name: str) -> str:
    """A class name as a part of a file name: anything but letters, digits, '.', '-' and '_'
    becomes '_'."""
    out = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name).strip(".")
    return out or "class"


def _volume_stem(path: Path) -> str:
    name = path.name
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[:-len(ext)] or "volume"
    return path.stem


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """Each volume's name without its extension; a repeated name gets -2, -3, ..."""
    seen: dict[str, int] = {}
    taken = set()
    out = []
    for p in paths:
        stem = _volume_stem(p)
        n = seen.get(stem.lower(), 0) + 1
        candidate = stem if n == 1 else f"{stem}-{n}"
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}"
        seen[stem.lower()] = n
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def _write(path: Path, write) -> None:
    try:
        write(path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}; choose a writable --out "
                         f"folder.") from None


def _heatmap_affine(source: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """The affine (voxel index -> world) of a heat map of ``shape`` made from ``source``: for a
    NIfTI file, the file's affine reoriented to RAS+ as :func:`densenet.volumes.read_volume`
    reorients the array, composed with the trilinear resize (``align_corners=False``: voxel
    ``j`` of the map is at ``(j + 0.5) * S / T - 0.5`` of the source's S voxels), so the map
    lies over the scan in a viewer; for a NumPy file the same scaling onto its array indices."""
    name = source.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        from nibabel.orientations import inv_ornt_aff, io_orientation
        img = nib.load(str(source))  # the header only: the data stays on disk
        src_shape = tuple(int(s) for s in img.shape[:3])
        ornt = io_orientation(img.affine)
        base = img.affine @ inv_ornt_aff(ornt, src_shape)
        canonical = [0, 0, 0]
        for axis, (out_axis, _) in enumerate(ornt):
            canonical[int(out_axis)] = src_shape[axis]
        src_shape = tuple(canonical)
    else:
        base = np.eye(4)
        a = np.load(source, mmap_mode="r", allow_pickle=False) if name.endswith(".npy") else None
        if a is None:
            with np.load(source, allow_pickle=False) as archive:
                key = archive.files[0] if len(archive.files) == 1 else "volume"
                a = archive[key]
        src_shape = tuple(int(s) for s in a.shape[-3:])
    scale = np.array(src_shape, dtype=np.float64) / np.array(shape, dtype=np.float64)
    resize = np.eye(4)
    resize[:3, :3] = np.diag(scale)
    resize[:3, 3] = (scale - 1) / 2
    return base @ resize


def slices_through(volume, peak: Sequence[int]) -> list[np.ndarray]:
    """The three orthogonal slices of a (D, H, W) array through voxel ``peak`` = (d, h, w), as
    they are drawn: fixed D (an (H, W) slice), fixed H (D, W) and fixed W (D, H), each with its
    first remaining axis running left to right and its second bottom to top (for a RAS+ volume:
    superior up in the sagittal and coronal slices, anterior up in the axial one, the patient's
    left on the left)."""
    a = _numpy(volume)
    if a.ndim != 3:
        raise UsageError(f"slices_through takes a (D, H, W) array, got shape {a.shape}.")
    d, h, w = (int(v) for v in peak)
    return [np.flipud(s.T) for s in (a[d], a[:, h], a[:, :, w])]


def render_slices(volume, cam, peak: Sequence[int] | None, out_path: str | os.PathLike,
                  title: str = "", size: int = 224) -> Path:
    """Write a heat map over its volume as one PNG: three panels, the slices at fixed D, fixed H
    and fixed W through ``peak`` (:func:`slices_through`; the centre voxel when ``peak`` is
    None), each the volume's slice in grey with the map's slice colour-mapped (jet) and blended
    on top (alpha 0.5), as :func:`render_panels` draws images.

    Args:
        volume: (C, D, H, W) or (D, H, W), tensor or array; the first channel is drawn, its
            0.5th-99.5th percentile range (over the whole volume) scaled to black-white.
        cam: (D, H, W) map in [0, 1], the volume's spatial shape.
        peak: the voxel (d, h, w) the slices pass through.
        out_path: a .png file; missing parent folders are created, and the file is replaced
            atomically.
        title: a line of text over the panels (e.g. "left p=0.93, peak (d, h, w) = ...").
        size: panel width and height in pixels; a slice keeps its aspect ratio (one voxel is
            drawn square) and is centred in its panel.

    The PNG is exactly ``(3 * size) x (size + 56)`` pixels: a ``CAPTION_HEIGHT`` (28) pixel
    strip with the title, the panels, and a strip naming each slice ("D=5 sagittal").
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    out_path = check_out_path(out_path)
    _check_size(size)
    a, heat = _numpy(volume).astype(np.float32), _numpy(cam).astype(np.float32)
    if a.ndim == 4:
        a = a[0]
    if a.ndim != 3 or heat.shape != a.shape:
        raise UsageError(f"render_slices needs a (C, D, H, W) or (D, H, W) volume and a map of "
                         f"its spatial shape, got {_numpy(volume).shape} and {heat.shape}.")
    if peak is None:
        peak = tuple(s // 2 for s in a.shape)
    if len(peak) != 3 or not all(0 <= int(p) < s for p, s in zip(peak, a.shape)):
        raise UsageError(f"peak {tuple(peak)} is not a voxel of a {a.shape} volume.")
    lo, hi = np.percentile(a, (0.5, 99.5))
    grey = np.clip((a - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(a)
    jet = colormaps["jet"]
    font = _font()
    canvas = Image.new("RGB", (3 * size, size + 2 * CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    captions = [f"{axis}={int(i)} {plane}" for axis, i, plane in zip("DHW", peak, PLANES)]
    for k, (g, m, caption) in enumerate(zip(slices_through(grey, peak), slices_through(heat, peak),
                                            captions)):
        rows, cols = g.shape
        scale = size / max(rows, cols)
        wh = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        picture = np.asarray(Image.fromarray(np.ascontiguousarray(g)).resize(wh, Image.BILINEAR))
        picture = np.clip(picture, 0.0, 1.0)[..., None]
        over = np.clip(np.asarray(Image.fromarray(np.ascontiguousarray(m)).resize(wh, Image.BILINEAR)),
                       0.0, 1.0)
        blend = (1 - ALPHA) * picture + ALPHA * jet(over)[..., :3]
        left, top = k * size + (size - wh[0]) // 2, CAPTION_HEIGHT + (size - wh[1]) // 2
        canvas.paste(Image.fromarray(np.round(blend * 255).astype(np.uint8)), (left, top))
        text = _fit(draw, caption, font, size - 8)
        y = CAPTION_HEIGHT + size + (CAPTION_HEIGHT - _text_height(draw, text, font)) // 2
        draw.text((k * size + 4, y), text, fill="black", font=font)
    if title:
        text = _fit_title(draw, title, font, 3 * size - 8)
        draw.text((4, (CAPTION_HEIGHT - _text_height(draw, text, font)) // 2), text,
                  fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    _write(out_path, lambda target: atomic_write_bytes(target, buf.getvalue()))
    return out_path


def _fit_title(draw, text: str, font, width: int) -> str:
    """``text`` cut at the end with "..." to fit in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
