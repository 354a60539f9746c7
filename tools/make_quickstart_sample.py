"""Build densenet/assets/cifar10_sample.npz, the real CIFAR-10 images the quickstart trains on.

Takes the first 480 images (by file name) of each class from a class-folder copy of the
CIFAR-10 training set (the project used ../shared/data/cifar10/train, a JPEG copy of the
official images) and stores their JPEG bytes unchanged: 380 per class for training and 100
per class held out for the final accuracy. Run once by a developer; never at run time.

    python tools/make_quickstart_sample.py ../shared/data/cifar10/train densenet/assets/cifar10_sample.npz
"""

import sys
from pathlib import Path

import numpy as np

PER_CLASS, TRAIN_PER_CLASS = 480, 380


def main(src: str, out: str) -> None:
    root = Path(src)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    blobs, labels, is_test, names = [], [], [], []
    for label, cls in enumerate(classes):
        files = sorted((root / cls).glob("*.jpg"))[:PER_CLASS]
        for i, f in enumerate(files):
            blobs.append(np.frombuffer(f.read_bytes(), dtype=np.uint8))
            labels.append(label)
            is_test.append(i >= TRAIN_PER_CLASS)
            names.append(f"{cls}/{f.name}")
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(out, jpeg=np.concatenate(blobs), offsets=offsets, labels=np.array(labels, np.int64),
             is_test=np.array(is_test), classes=np.array(classes), names=np.array(names))
    print(f"{len(blobs)} images, {Path(out).stat().st_size / 1e6:.2f} MB -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
