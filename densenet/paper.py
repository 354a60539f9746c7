"""The paper's results as data (Huang et al., CVPR 2017: Tables 2 and 3, Figures 3 and 4).

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

# Table 2's comparison rows, under the registry name of the network each row trained (its
# paper's architecture; densenet.resnet). "source" says where the row's numbers come from, as
# Table 2 cites them. Parameters are the paper's rounding: the exact counts are in the README.
TABLE2_BASELINES: dict[str, dict] = {
    "resnet110": {"model": "ResNet (reported by Huang et al. 2016b)", "family": "ResNet",
                  "label": "ResNet-110", "L": 110, "params": "1.7M",
                  "error": (13.63, 6.41, 44.74, 27.22, 2.01),
                  "source": "He et al. 2016a, trained by Huang et al. 2016b (Deep Networks with "
                            "Stochastic Depth)"},
    "preact_resnet164": {"model": "ResNet (pre-activation)", "family": "pre-activation ResNet",
                         "label": "pre-act ResNet-164", "L": 164, "params": "1.7M",
                         "error": (11.26, 5.46, 35.58, 24.33, None),
                         "source": "He et al. 2016b (Identity Mappings); C10 and C100 run by the "
                                   "DenseNet authors"},
    "preact_resnet1001": {"model": "ResNet (pre-activation)", "family": "pre-activation ResNet",
                          "label": "pre-act ResNet-1001", "L": 1001, "params": "10.2M",
                          "error": (10.56, 4.62, 33.47, 22.71, None),
                          "source": "He et al. 2016b (Identity Mappings); C10 and C100 run by the "
                                    "DenseNet authors"},
    "wrn16_8": {"model": "Wide ResNet", "family": "Wide ResNet", "label": "WRN-16-8", "L": 16, "params": "11.0M",
                "error": (None, 4.81, None, 22.07, None),
                "source": "Zagoruyko and Komodakis 2016"},
    "wrn28_10": {"model": "Wide ResNet", "family": "Wide ResNet", "label": "WRN-28-10", "L": 28, "params": "36.5M",
                 "error": (None, 4.17, None, 20.50, None),
                 "source": "Zagoruyko and Komodakis 2016"},
    "wrn16_4": {"model": "Wide ResNet with Dropout", "family": "Wide ResNet", "label": "WRN-16-4",
                "L": 16, "params": "2.7M",
                "error": (None, None, None, None, 1.64), "drop_rate": 0.4,
                "source": "Zagoruyko and Komodakis 2016 (dropout 0.4 between the convolutions)"},
}

# Table 2's other residual rows: training methods or a first report, not networks of their own.
TABLE2_OTHER_RESNETS: dict[str, dict] = {
    "ResNet-110 (He et al. 2016a)": {"L": 110, "params": "1.7M", "error": (None, 6.61, None, None, None)},
    "ResNet-110 with Stochastic Depth": {"L": 110, "params": "1.7M",
                                         "error": (11.66, 5.23, 37.80, 24.58, 1.75)},
    "ResNet-1202 with Stochastic Depth": {"L": 1202, "params": "10.2M",
                                          "error": (None, 4.91, None, None, None)},
}

# Table 3: ImageNet validation error (%), (single-crop, 10-crop).
TABLE3: dict[str, dict] = {
    "densenet121": {"top1": (25.02, 23.61), "top5": (7.71, 6.66)},
    "densenet169": {"top1": (23.80, 22.08), "top5": (6.85, 5.92)},
    "densenet201": {"top1": (22.58, 21.46), "top5": (6.34, 5.54)},
    "densenet264": {"top1": (22.15, 20.80), "top5": (6.12, 5.29)},
}

# Figure 3's ResNets: single-crop top-1 / top-5 error (%) on the ImageNet validation set of
# the models trained with fb.resnet.torch (Gross and Wilber 2016), the code and recipe the
# DenseNets of Table 3 were trained with; ResNet-18 is not in the figure.
FIGURE3_RESNETS: dict[str, dict] = {
    "resnet18": {"top1": 30.43, "top5": 10.76, "in_figure": False},
    "resnet34": {"top1": 26.73, "top5": 8.74, "in_figure": True},
    "resnet50": {"top1": 24.01, "top5": 7.02, "in_figure": True},
    "resnet101": {"top1": 22.44, "top5": 6.21, "in_figure": True},
    "resnet152": {"top1": 22.16, "top5": 6.16, "in_figure": True},
}
FIGURE3_SOURCE = "fb.resnet.torch pretrained models, 1-crop error rates"

# The training recipe (densenet.recipes) that reproduces each column.
RECIPE_COLUMNS = {"c10": "C10", "c10+": "C10+", "c100": "C100", "c100+": "C100+", "svhn": "SVHN",
                  "imagenet": "ImageNet top-1 (single crop)"}


def paper_error(model: str, recipe: str) -> float | None:
    """The paper's test error (a fraction) of a registered model trained with a recipe, or None.

    For ``imagenet`` it is Table 3's single-crop top-1 error (what ``densenet eval`` measures
    without ``--ten-crop``), or for a ResNet Figure 3's; for the CIFAR and SVHN recipes, Table
    2's row of the model (a DenseNet or a baseline).
    """
    if recipe == "imagenet":
        if model in FIGURE3_RESNETS:
            return FIGURE3_RESNETS[model]["top1"] / 100
        row = TABLE3.get(model)
        return None if row is None else row["top1"][0] / 100
    column = RECIPE_COLUMNS.get(recipe)
    row = TABLE2.get(model) or TABLE2_BASELINES.get(model)
    if row is None or column is None:
        return None
    value = row["error"][TABLE2_COLUMNS.index(column)]
    return None if value is None else value / 100


def paper_points(column: str) -> list[dict]:
    """The paper's (model, error) points of one result column, both families: Table 2's rows
    for a CIFAR/SVHN column ("C10+" is Figure 4, middle), or for "ImageNet" Table 3's
    DenseNets and Figure 3's ResNets (single-crop top-1). Each point: registry name, family,
    label, error (%) and source."""
    points = []
    if column == "ImageNet":
        for name, row in TABLE3.items():
            points.append({"model": name, "family": "DenseNet-BC", "label": f"DenseNet-{name[8:]}",
                           "error": row["top1"][0], "source": "Table 3, single-crop top-1"})
        for name, row in FIGURE3_RESNETS.items():
            if row["in_figure"]:
                points.append({"model": name, "family": "ResNet", "label": f"ResNet-{name[6:]}",
                               "error": row["top1"], "source": FIGURE3_SOURCE})
        return points
    if column not in TABLE2_COLUMNS:
        raise ValueError(f"unknown result column {column!r}; one of {', '.join(TABLE2_COLUMNS)} or ImageNet")
    i = TABLE2_COLUMNS.index(column)
    for name, row in {**TABLE2, **TABLE2_BASELINES}.items():
        if row["error"][i] is None:
            continue
        family = row.get("family", row["model"])  # DenseNet rows: "DenseNet" or "DenseNet-BC"
        label = row.get("label") or f"{row['model']} L={row['L']} k={row['k']}"
        source = f"Table 2, {column}" + (f"; {row['source']}" if "source" in row else "")
        points.append({"model": name, "family": family, "label": label, "error": row["error"][i],
                       "source": source})
    return points
