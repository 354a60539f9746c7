"""Where the model looks: Grad-CAM heat maps (Selvaraju et al., "Grad-CAM: Visual Explanations
from Deep Networks via Gradient-based Localization", ICCV 2017).

For a class c with logit y^c and the output A of the last dense block (the block input and every
layer's new maps: the last convolutional features, before the final BN-ReLU and global pooling),
the map is ``relu(sum_k alpha_k^c A^k)`` with ``alpha_k^c`` the spatial mean of ``dy^c/dA^k``
(equations 1 and 2 of the paper), upsampled bilinearly to the input size.

Three levels:

* :func:`grad_cam`: maps of a normalised batch, for any :class:`~densenet.DenseNet`;
* :func:`cam_for_images`: image files preprocessed as ``densenet predict`` does, a class chosen
  by name or the predicted one;
* :func:`render_panels`: one PNG with the heat maps blended over the images (``densenet cam``).
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
from .inference import Loaded, imagenet_class_names, open_image
from .model import DenseNet
from .preprocess import to_rgb
from .rundir import atomic_write_bytes

__all__ = ["GradCAM", "ImageCAM", "grad_cam", "cam_for_images", "render_panels", "class_names",
           "check_out_path", "last_block", "CAPTION_HEIGHT"]

CAPTION_HEIGHT = 28  # pixels of the caption strip under each panel
ALPHA = 0.5          # weight of the heat map in the blend
MIN_SIZE, MAX_SIZE = 64, 2048


class GradCAM(NamedTuple):
    """What :func:`grad_cam` returns (also unpacks as ``cams, probs, classes``)."""
    cams: torch.Tensor     # (N, H, W) float32 in [0, 1], the input's height and width
    probs: torch.Tensor    # (N, num_classes) softmax of the logits
    classes: torch.Tensor  # (N,) int64: the class each map explains


def last_block(model: DenseNet) -> torch.nn.Module:
    """The last dense block, ``model.features.denseblock{len(block_config)}``."""
    return getattr(model.features, f"denseblock{len(model.block_config)}")


def grad_cam(model: DenseNet, x: torch.Tensor,
             target: int | Sequence[int] | torch.Tensor | None = None) -> GradCAM:
    """Grad-CAM maps of the last dense block for a normalised batch ``x`` (N, C, H, W).

    Args:
        model: any DenseNet (efficient or reference implementation); it runs in eval mode and
            is put back in the mode it was in.
        x: input batch on the model's device, normalised as in training.
        target: the class to explain: None for each image's predicted class, an int for all
            images, or one class index per image.

    Each map is ``relu(sum_k alpha_k A^k)`` (Selvaraju et al., ICCV 2017, equations 1-2),
    upsampled bilinearly to (H, W) and divided by its maximum, so it lies in [0, 1]; a map with
    no positive evidence stays all zero. Only the gradient with respect to the block's output is
    computed (``torch.autograd.grad``, with the detached output as the leaf): nothing before the
    block is differentiated and no parameter's ``.grad`` is touched.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise UsageError(f"grad_cam needs a batch of images (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
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
            score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval
            (grad,) = torch.autograd.grad(score, kept[0])
    finally:
        handle.remove()
        model.train(was_training)
    a, grad = kept[0].detach().float(), grad.float()
    alpha = grad.mean(dim=(2, 3), keepdim=True)             # alpha_k^c, equation 1
    cams = F.relu((alpha * a).sum(dim=1, keepdim=True))     # equation 2
    cams = F.interpolate(cams, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cams.amax(dim=(1, 2), keepdim=True)
    cams = cams / peak.clamp_min(torch.finfo(cams.dtype).tiny)
    return GradCAM(cams, logits.detach().float().softmax(1), classes)


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
                   batch_size: int = 16) -> list[ImageCAM]:
    """Grad-CAM of each image file, preprocessed as ``densenet predict`` does.

    ``class_name`` (one of the model's class names) is explained in every image; by default
    each image's predicted class. Every path is read and checked before any work.
    """
    pre = loaded.pre
    if pre.mean is None:
        raise UsageError(f"{loaded.source} does not say how its inputs were normalised (a "
                         f"small-image net from a foreign file); cam needs a checkpoint written "
                         f"by 'densenet train'.")
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("give one or more image files.")
    names = class_names(loaded)
    target = None if class_name is None else _class_index(class_name, names, loaded.source)
    transform = pre.eval_transform()
    tensors = [transform(open_image(p, pre)) for p in paths]
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    model = loaded.model.to(device)
    if loaded.multi_label:
        return _multilabel_cams(loaded, model, paths, tensors, names, target, mean, std, device)
    out = []
    for i in range(0, len(tensors), batch_size):
        x = torch.stack(tensors[i:i + batch_size])
        cams, probs, classes = grad_cam(model, x.to(device), target)
        for j, c in enumerate(classes.tolist()):
            out.append(ImageCAM(str(paths[i + j]), _to_pil(x[j] * std + mean), cams[j].cpu(),
                                names[c], float(probs[j, c])))
    return out


def _multilabel_cams(loaded, model, paths, tensors, names, target, mean, std, device) -> list[ImageCAM]:
    """A multi-label model: the map of label ``target`` in every image, or without one a map
    per label over its threshold in each image (the most probable label where none is); the
    caption's probability is the label's sigmoid."""
    thresholds = loaded.thresholds or [0.5] * len(names)
    out = []
    for path, t in zip(paths, tensors):
        x = t[None].to(device)
        with torch.no_grad():
            probs = model.eval()(x).float().sigmoid()[0]
        if target is not None:
            labels = [target]
        else:
            labels = [c for c, (p, th) in enumerate(zip(probs.tolist(), thresholds)) if p >= th]
            labels = labels or [int(probs.argmax())]
        cams = grad_cam(model, x.expand(len(labels), -1, -1, -1), torch.tensor(labels)).cams
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
