"""The paper's baselines: the residual networks Table 2 and Figures 3-4 set DenseNets beside.

- ``resnet18`` ... ``resnet152``: the ImageNet ResNets (He et al., CVPR 2016) as torchvision
  builds them (Figure 3); torchvision's state dicts load strictly and give its outputs.
- ``resnet{L}``, L = 6n + 2 (``resnet110``): the CIFAR ResNets of He et al. 2016 (section
  4.2): a 3x3 convolution with 16 maps, three stages of n basic blocks with 16, 32 and 64 maps,
  parameter-free shortcuts (identity; subsampled and zero-padded where the shape changes).
- ``preact_resnet{L}``, L = 9n + 2 (``preact_resnet164``, ``preact_resnet1001``): He et al.,
  ECCV 2016, "Identity Mappings in Deep Residual Networks": BN-ReLU-conv bottleneck units with
  64, 128 and 256 outputs, projection shortcuts where the shape changes.
- ``wrn{L}_{k}``, L = 6n + 4 (``wrn16_8``, ``wrn28_10``): Zagoruyko and Komodakis, BMVC 2016:
  pre-activation basic blocks with 16k, 32k and 64k maps.

Module names are torchvision's inside the network (``conv1``, ``bn1``, ``layer1.0.downsample``)
under this package's two parts, ``features`` and ``classifier``, so that training, freezing,
fine-tuning and export treat both families alike; torchvision's top-level names
(``conv1.weight``, ``fc.weight``) load by mapping (:func:`densenet.weights.canonical_key`).
``drop_rate`` puts dropout before the last convolution of every residual branch, where Wide
ResNets put it ("between convolutions").
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .model import (_CONV, _MAX_POOL, _NORM, IMPLEMENTATIONS, SPATIAL_DIMS, FeatureInfo,
                    ModelInfo, _check_positive_int, _Classifier, register_model, register_pattern)

__all__ = ["ResNet", "resnet_cifar", "preact_resnet", "wide_resnet"]

# torchvision's ImageNet ResNets: (block, units per stage)
IMAGENET_RESNETS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                    152: ("bottleneck", (3, 8, 36, 3))}


def _drop(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each followed by BN, added to the shortcut, then ReLU (He et al.
    2016, Figure 2). The shortcut is a 1x1 convolution and BN where the shape changes
    (``shortcut="projection"``, the ImageNet nets) or the input subsampled and padded with
    zero maps (``"zeros"``, option A, the CIFAR nets: no parameters)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: str, drop_rate: float, d: int):
        super().__init__()
        out = width * self.expansion
        self.conv1 = _CONV[d](in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _NORM[d](width)
        self.relu = nn.ReLU(inplace=True)
        self.drop = _drop(drop_rate)
        self.conv2 = _CONV[d](width, out, 3, padding=1, bias=False)
        self.bn2 = _NORM[d](out)
        self.downsample = _shortcut(in_channels, out, stride, shortcut, d)
        self.stride, self.out_channels = stride, out

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(self.drop(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + _identity(self, x))


class Bottleneck(BasicBlock):
    """1x1 (reduce), 3x3 (with the stride, as torchvision's "ResNet v1.5") and 1x1 (expand
    four times) convolutions, each followed by BN (He et al. 2016, Figure 5, right)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: str, drop_rate: float, d: int):
        nn.Module.__init__(self)
        out = width * self.expansion
        self.conv1 = _CONV[d](in_channels, width, 1, bias=False)
        self.bn1 = _NORM[d](width)
        self.conv2 = _CONV[d](width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _NORM[d](width)
        self.drop = _drop(drop_rate)
        self.conv3 = _CONV[d](width, out, 1, bias=False)
        self.bn3 = _NORM[d](out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride, shortcut, d)
        self.stride, self.out_channels = stride, out

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(self.drop(out)))


class PreActBottleneck(nn.Module):
    """BN-ReLU-1x1 conv, BN-ReLU-3x3 conv, BN-ReLU-1x1 conv; the sum is not activated (He et
    al., ECCV 2016, Figure 1(b) and Table 2). Where the shape changes, the shortcut is a 1x1
    convolution of the pre-activated input."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: str, drop_rate: float, d: int):
        super().__init__()
        out = width * self.expansion
        self.bn1 = _NORM[d](in_channels)
        self.conv1 = _CONV[d](in_channels, width, 1, bias=False)
        self.bn2 = _NORM[d](width)
        self.conv2 = _CONV[d](width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = _NORM[d](width)
        self.drop = _drop(drop_rate)
        self.conv3 = _CONV[d](width, out, 1, bias=False)
        self.downsample = _projection(in_channels, out, stride, d, norm=False)
        self.stride, self.out_channels = stride, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return self.conv3(self.drop(F.relu(self.bn3(out)))) + skip


class PreActBasicBlock(nn.Module):
    """The Wide ResNet block: BN-ReLU-3x3 conv, BN-ReLU-(dropout)-3x3 conv (Zagoruyko and
    Komodakis 2016, Figure 1(d)); a 1x1 convolution of the pre-activated input where the shape
    changes."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: str, drop_rate: float, d: int):
        super().__init__()
        self.bn1 = _NORM[d](in_channels)
        self.conv1 = _CONV[d](in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _NORM[d](width)
        self.drop = _drop(drop_rate)
        self.conv2 = _CONV[d](width, width, 3, padding=1, bias=False)
        self.downsample = _projection(in_channels, width, stride, d, norm=False)
        self.stride, self.out_channels = stride, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        return self.conv2(self.drop(F.relu(self.bn2(out)))) + skip


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact_bottleneck": PreActBottleneck,
          "preact_basic": PreActBasicBlock}
RESIDUAL_BLOCKS = tuple(BLOCKS.values())


def _projection(in_channels: int, out: int, stride: int, d: int, norm: bool) -> nn.Module | None:
    if stride == 1 and in_channels == out:
        return None
    conv = _CONV[d](in_channels, out, 1, stride=stride, bias=False)
    return nn.Sequential(conv, _NORM[d](out)) if norm else conv


def _shortcut(in_channels: int, out: int, stride: int, kind: str, d: int) -> nn.Module | None:
    if kind == "projection":
        return _projection(in_channels, out, stride, d, norm=True)
    if out < in_channels:
        raise UsageError(f"a zero-padded shortcut cannot reduce {in_channels} maps to {out}; "
                         f"use shortcut='projection'.")
    return None


def _identity(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """The shortcut of a post-activation block: its projection, or x subsampled by the stride
    and padded with zero maps up to the block's outputs (option A)."""
    if block.downsample is not None:
        return block.downsample(x)
    if block.stride != 1:
        x = x[(slice(None), slice(None)) + (slice(None, None, block.stride),) * (x.dim() - 2)]
    extra = block.out_channels - x.shape[1]
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra)) if extra else x


class ResNet(_Classifier):
    """Any residual network of the baselines, from its parameters.

    Args:
        block: "basic" or "bottleneck" (post-activation, He et al. 2016), "preact_bottleneck"
            (He et al., ECCV 2016) or "preact_basic" (Wide ResNets).
        layers: units per stage, e.g. (3, 4, 6, 3) for ResNet-50, (18, 18, 18) for ResNet-110.
        widths: maps of each stage's 3x3 convolutions (a bottleneck unit outputs four times as
            many), e.g. (16, 32, 64) on CIFAR, (160, 320, 640) for WRN-28-10.
        stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or "cifar" (one 3x3 conv; BN and
            ReLU after it unless the blocks pre-activate).
        stem_width: maps of the first convolution (64 ImageNet, 16 CIFAR).
        shortcut: "projection" (1x1 conv and BN where the shape changes) or "zeros" (the
            parameter-free option A); pre-activation blocks always project.
        drop_rate: dropout before the last convolution of every residual branch.
        depth: the network's depth as its paper names it (only recorded).
        num_classes, in_channels, spatial_dims: as for :class:`~densenet.DenseNet`.
        implementation: accepted for the training options' sake; a ResNet has one (plain
            PyTorch modules).

    Every stage after the first halves the resolution in its first unit. ``forward_features``
    returns the last map after its ReLU (pre-activation nets end with BN and ReLU, as their
    papers); ``feature_info`` lists the stem's activation (ImageNet stem) and each stage's
    output.
    """

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (64, 128, 256, 512), stem: str = "imagenet",
                 stem_width: int = 64, shortcut: str = "projection", drop_rate: float = 0.0,
                 depth: int | None = None, num_classes: int = 1000, in_channels: int = 3,
                 spatial_dims: int = 2, implementation: str = "reference"):
        super().__init__()
        if block not in BLOCKS:
            raise UsageError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}.")
        if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
            raise UsageError(f"spatial_dims must be 1, 2 or 3 (signals, images, volumes), got {spatial_dims!r}.")
        if isinstance(layers, int) or not layers or len(layers) != len(widths):
            raise UsageError(f"layers and widths must be sequences of the same length (one entry per "
                             f"stage), got {layers!r} and {widths!r}.")
        for n in (*layers, *widths, stem_width):
            _check_positive_int("layers, widths and stem_width entries", n)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if stem not in ("cifar", "imagenet"):
            raise UsageError(f"stem must be 'cifar' or 'imagenet', got {stem!r}.")
        if shortcut not in ("projection", "zeros"):
            raise UsageError(f"shortcut must be 'projection' or 'zeros', got {shortcut!r}.")
        if not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise UsageError(f"drop_rate must be in [0, 1), got {drop_rate!r}.")
        if implementation not in IMPLEMENTATIONS:
            raise UsageError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}.")
        self.block, self.layers, self.widths = block, tuple(layers), tuple(widths)
        self.preact = block.startswith("preact")
        self.stem, self.shortcut, self.drop_rate = stem, shortcut, float(drop_rate)
        self.depth, self.spatial_dims, self.in_channels = depth, spatial_dims, in_channels
        self.implementation = "reference"
        d, cls = spatial_dims, BLOCKS[block]

        taps = []
        if stem == "imagenet":
            stem_layers = [("conv1", _CONV[d](in_channels, stem_width, 7, stride=2, padding=3, bias=False)),
                           ("bn1", _NORM[d](stem_width)), ("relu", nn.ReLU(inplace=True)),
                           ("maxpool", _MAX_POOL[d](kernel_size=3, stride=2, padding=1))]
            taps.append(("relu", dict(num_chs=stem_width, reduction=2, module="features.relu")))
            reduction = 4
        else:
            stem_layers = [("conv1", _CONV[d](in_channels, stem_width, 3, padding=1, bias=False))]
            if not self.preact:
                stem_layers += [("bn1", _NORM[d](stem_width)), ("relu", nn.ReLU(inplace=True))]
            reduction = 1
        self.features = nn.Sequential(OrderedDict(stem_layers))
        channels = stem_width
        for i, (n, width) in enumerate(zip(self.layers, self.widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            units = []
            for j in range(n):
                units.append(cls(channels, width, stride if j == 0 else 1, shortcut, drop_rate, d))
                channels = units[-1].out_channels
            self.features.add_module(f"layer{i + 1}", nn.Sequential(*units))
            taps.append((f"layer{i + 1}", dict(num_chs=channels, reduction=reduction,
                                               module=f"features.layer{i + 1}")))
        if self.preact:  # the last unit's sum is not activated: BN and ReLU before pooling
            self.features.add_module("norm", _NORM[d](channels))
            taps[-1] = ("norm", dict(taps[-1][1], module="features.norm"))
        self._tap_after = tuple(after for after, _ in taps)
        self.feature_info = FeatureInfo([info for _, info in taps])
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def set_implementation(self, implementation: str):
        """ResNets have one implementation; the call only checks the name (so that a training
        option meant for dense blocks is harmless)."""
        if implementation not in IMPLEMENTATIONS:
            raise UsageError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}.")
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map after its ReLU (N, num_features, H', W')."""
        x = self.features(x)
        return F.relu(x) if self.preact else x  # post-activation stages end with a ReLU already

    def last_stage(self) -> nn.Module:
        """The last residual stage (what Grad-CAM explains)."""
        return getattr(self.features, f"layer{len(self.layers)}")

    # torchvision's and timm's ResNets name their parts at the top (conv1, layer1, fc).
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        from .weights import canonical_key
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = prefix + canonical_key(key[len(prefix):])
            if new != key:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------- the families

def _units(depth, per: int, base: int, family: str, examples: Sequence[int]) -> int:
    """Units per stage of a network of ``depth`` = per * n + base."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < per + base or (depth - base) % per:
        raise UsageError(f"depth {depth!r} is impossible for {family}: valid depths are L = {per}n + "
                         f"{base} with n >= 1 units per stage (e.g. {', '.join(map(str, examples))}, ...).")
    return (depth - base) // per


def _cifar_resnet_kwargs(depth: int) -> dict:
    n = _units(depth, 6, 2, "a CIFAR ResNet (basic blocks, He et al. 2016)", (20, 32, 44, 56, 110))
    return dict(block="basic", layers=(n, n, n), widths=(16, 32, 64), stem="cifar", stem_width=16,
                shortcut="zeros", depth=depth, num_classes=10)


def _preact_kwargs(depth: int) -> dict:
    n = _units(depth, 9, 2, "a pre-activation ResNet (bottleneck units, He et al. 2016)", (164, 1001))
    return dict(block="preact_bottleneck", layers=(n, n, n), widths=(16, 32, 64), stem="cifar",
                stem_width=16, shortcut="projection", depth=depth, num_classes=10)


def _wrn_kwargs(depth: int, k: int) -> dict:
    n = _units(depth, 6, 4, "a Wide ResNet", (16, 22, 28, 40))
    _check_positive_int("widening factor k", k)
    return dict(block="preact_basic", layers=(n, n, n), widths=(16 * k, 32 * k, 64 * k), stem="cifar",
                stem_width=16, shortcut="projection", depth=depth, num_classes=10)


def _imagenet_kwargs(depth: int) -> dict:
    block, layers = IMAGENET_RESNETS[depth]
    return dict(block=block, layers=layers, widths=(64, 128, 256, 512), stem="imagenet", stem_width=64,
                shortcut="projection", depth=depth, num_classes=1000)


def resnet_cifar(depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """A CIFAR ResNet of depth L = 6n + 2 (He et al. 2016, section 4.2; ResNet-110 is n = 18)."""
    return ResNet(**{**_cifar_resnet_kwargs(depth), "num_classes": num_classes, **kwargs})


def preact_resnet(depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """A pre-activation bottleneck ResNet of depth L = 9n + 2 (He et al., ECCV 2016)."""
    return ResNet(**{**_preact_kwargs(depth), "num_classes": num_classes, **kwargs})


def wide_resnet(depth: int, k: int, num_classes: int = 10, **kwargs) -> ResNet:
    """WRN-L-k, L = 6n + 4, widening factor k (Zagoruyko and Komodakis 2016)."""
    return ResNet(**{**_wrn_kwargs(depth, k), "num_classes": num_classes, **kwargs})


_FAMILY = {"resnet": "ResNet", "preact": "pre-activation ResNet", "wrn": "Wide ResNet"}


def _info(name: str, paper_key: str | None = None) -> ModelInfo | None:
    """The registry entry a baseline's name describes, or None if it names none."""
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and int(m.group(1)) in IMAGENET_RESNETS:
        depth = int(m.group(1))
        return ModelInfo(name, f"ResNet-{depth} (He et al., CVPR 2016), ImageNet", 224,
                         _imagenet_kwargs(depth), paper_key, ResNet, "ResNet")
    if m:
        depth = int(m.group(1))
        return ModelInfo(name, f"ResNet-{depth} (He et al., CVPR 2016), CIFAR/SVHN", 32,
                         _cifar_resnet_kwargs(depth), paper_key, ResNet, "ResNet")
    m = re.fullmatch(r"preact_resnet(\d+)", name)
    if m:
        depth = int(m.group(1))
        return ModelInfo(name, f"pre-activation ResNet-{depth} (He et al., ECCV 2016), CIFAR/SVHN", 32,
                         _preact_kwargs(depth), paper_key, ResNet, "pre-activation ResNet")
    m = re.fullmatch(r"wrn(\d+)_(\d+)", name)
    if m:
        depth, k = int(m.group(1)), int(m.group(2))
        return ModelInfo(name, f"Wide ResNet WRN-{depth}-{k} (Zagoruyko & Komodakis 2016), CIFAR/SVHN", 32,
                         _wrn_kwargs(depth, k), paper_key, ResNet, "Wide ResNet")
    return None


register_pattern(_info, "resnet{L} (L = 6n+2), preact_resnet{L} (L = 9n+2), wrn{L}_{k} (L = 6n+4)")
for _name in ("resnet110", "preact_resnet164", "preact_resnet1001", "wrn16_4", "wrn16_8", "wrn28_10",
              "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_model(_info(_name, paper_key=_name))
