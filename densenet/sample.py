"""The quickstart's data: 4,800 real CIFAR-10 training images shipped inside the package.

``assets/cifar10_sample.npz`` holds the unchanged JPEG bytes of the first 480 images (by file
name) of each class of a JPEG copy of the CIFAR-10 training set (Krizhevsky 2009; see the
README for provenance): 380 per class to train on, 100 per class held out as the test split.
Built by ``tools/make_quickstart_sample.py``.
"""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
import torch
from PIL import Image

from .data import Dataset, ImageTensors
from .preprocess import to_rgb

SAMPLE_FILE = "cifar10_sample.npz"


def load_cifar10_sample() -> Dataset:
    with resources.files("densenet").joinpath("assets", SAMPLE_FILE).open("rb") as f:
        npz = np.load(io.BytesIO(f.read()), allow_pickle=False)
    jpeg, offsets = npz["jpeg"], npz["offsets"]
    images = np.stack([
        np.asarray(to_rgb(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes()))))
        for i in range(len(offsets) - 1)
    ])  # decoded once per run: about a second for 4,800 images
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(npz["labels"])
    is_test = torch.from_numpy(npz["is_test"])
    train = ImageTensors(images[~is_test], labels[~is_test])
    test = ImageTensors(images[is_test], labels[is_test])
    return Dataset(name="cifar10-sample", classes=[str(c) for c in npz["classes"]],
                   train=train, val=None, test=test)
