"""The paper's results as data (Huang et al., CVPR 2017: Tables 2 and 3).

Errors are stored as the paper prints them, in percent; :func:`paper_error` returns the
fraction used in every file of a run directory.
"""

from __future__ import annotations

# Table 2: test error (%) on CIFAR and SVHN; None where the paper has no entry ("-").
# Columns: C10, C10+, C100, C100+, SVHN ("+" = translation and mirroring augmentation).
TABLE2_COLUMNS = ("C10", "C10+", "C100", "C100+", "SVHN")
TABLE2: dict[str, dict] = {
    "densenet40_k12": {"model": "DenseNet", "L": 40, "k": 12, "params": "1.0M",
                       "error": (7.00, 5.24, 27.55, 24.42, 1.79)},
    "densenet100_k12": {"model": "DenseNet", "L": 100, "k": 12, "params": "7.0M",
                        "error": (5.77, 4.10, 23.79, 20.20, 1.67)},
    "densenet100_k24": {"model": "DenseNet", "L": 100, "k": 24, "params": "27.2M",
                        "error": (5.83, 3.74, 23.42, 19.25, 1.59)},
    "densenet_bc100_k12": {"model": "DenseNet-BC", "L": 100, "k": 12, "params": "0.8M",
                           "error": (5.92, 4.51, 24.15, 22.27, 1.76)},
    "densenet_bc250_k24": {"model": "DenseNet-BC", "L": 250, "k": 24, "params": "15.3M",
                           "error": (5.19, 3.62, 19.64, 17.60, 1.74)},
    "densenet_bc190_k40": {"model": "DenseNet-BC", "L": 190, "k": 40, "params": "25.6M",
                           "error": (None, 3.46, None, 17.18, None)},
}

# Comparison rows of Table 2 (no model of this package; for figures and the README).
TABLE2_BASELINES = {
    "ResNet-110": {"params": "1.7M", "error": (None, 6.41, None, None, None)},
    "pre-activation ResNet-1001": {"params": "10.2M", "error": (None, 4.62, None, 22.71, None)},
}

# Table 3: ImageNet validation error (%), (single-crop, 10-crop).
TABLE3: dict[str, dict] = {
    "densenet121": {"top1": (25.02, 23.61), "top5": (7.71, 6.66)},
    "densenet169": {"top1": (23.80, 22.08), "top5": (6.85, 5.92)},
    "densenet201": {"top1": (22.58, 21.46), "top5": (6.34, 5.54)},
    "densenet264": {"top1": (22.15, 20.80), "top5": (6.12, 5.29)},
}

# The training recipe (densenet.recipes) that reproduces each column.
RECIPE_COLUMNS = {"c10": "C10", "c10+": "C10+", "c100": "C100", "c100+": "C100+", "svhn": "SVHN",
                  "imagenet": "ImageNet top-1 (single crop)"}


def paper_error(model: str, recipe: str) -> float | None:
    """The paper's test error (a fraction) of a registered model trained with a recipe, or None.

    For ``imagenet`` it is Table 3's single-crop top-1 error (what ``densenet eval`` measures
    without ``--ten-crop``).
    """
    if recipe == "imagenet":
        row = TABLE3.get(model)
        return None if row is None else row["top1"][0] / 100
    column = RECIPE_COLUMNS.get(recipe)
    row = TABLE2.get(model)
    if row is None or column is None:
        return None
    value = row["error"][TABLE2_COLUMNS.index(column)]
    return None if value is None else value / 100
