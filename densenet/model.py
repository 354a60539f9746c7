"""DenseNet (Huang et al., CVPR 2017): layers, blocks, the two families, the backbone and the
model registry.

Submodule names follow torchvision (``features.denseblock1.denselayer1.norm1``) because that is
the state-dict format the world's DenseNet checkpoints use. Architecture: the paper's section 3
(dense connectivity, growth rate, bottleneck layers, compression) and Table 1. The backbone
(:class:`DenseNetFeatures`, ``create_model(..., features_only=True)``) and
:meth:`DenseNet.forward_intermediates` follow timm's conventions for multi-scale features.
"""

from __future__ import annotations

import operator
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .errors import UsageError
from .weights import load_weights_into

__all__ = ["DenseNet", "DenseNetFeatures", "FeatureInfo", "create_model", "list_models", "model_info",
           "densenet_cifar"]

IMPLEMENTATIONS = ("efficient", "reference")
SPATIAL_DIMS = (1, 2, 3)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_GLOBAL_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class DenseLayer(nn.Module):
    """H_l: BN-ReLU-Conv3x3 (basic) or BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3 (bottleneck).

    Takes the concatenation [x_0, ..., x_{l-1}] of all earlier feature maps of the block (or
    their list, as torchvision's blocks pass it) and returns the k new maps (section 3).
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool, bn_size: int,
                 drop_rate: float, spatial_dims: int = 2):
        super().__init__()
        conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
        self.bottleneck = bottleneck
        self.drop_rate = float(drop_rate)
        self.norm1 = norm(in_channels)
        self.relu1 = nn.ReLU()
        if bottleneck:
            inner = bn_size * growth_rate
            self.conv1 = conv(in_channels, inner, kernel_size=1, bias=False)
            self.norm2 = norm(inner)
            self.relu2 = nn.ReLU()
            self.conv2 = conv(inner, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = conv(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # The paper drops after every convolution but the network's first (section 4.2).
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x

    def bottleneck_input(self, x: torch.Tensor) -> torch.Tensor:
        """conv1(relu(norm1(x))) with its dropout: the part that reads the concatenation."""
        return self._drop(self.conv1(self.relu1(self.norm1(x))))

    def forward_tail(self, y: torch.Tensor) -> torch.Tensor:
        """From conv1's output to the k new maps (identity for a basic layer)."""
        if not self.bottleneck:
            return y
        return self._drop(self.conv2(self.relu2(self.norm2(y))))

    def forward(self, features: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        x = torch.cat(features, 1) if isinstance(features, (list, tuple)) else features
        return self.forward_tail(self.bottleneck_input(x))

    # The efficient block works out once what a block's layers allow and keeps it; replacing
    # or removing a layer's part (a norm, say) has it worked out again.
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.__dict__.get("_modules", ()):
            ops.note_structure_change()

    def __delattr__(self, name):
        part = name in self._modules
        super().__delattr__(name)
        if part:
            ops.note_structure_change()

    def add_module(self, name, module):
        super().add_module(name, module)
        ops.note_structure_change()

    # Old checkpoints (PyTorch < 0.4, and torchvision's first weights) name these
    # ``norm.1``/``relu.1``/``conv.1``, and MONAI's DenseNets ``layers.norm1``; map them on
    # load so any such file loads strictly.
    _LEGACY_KEY = re.compile(r"^(?:(norm|relu|conv)\.([12])|layers\.(norm|relu|conv)([12]))\."
                             r"(weight|bias|running_mean|running_var|num_batches_tracked)$")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in list(state_dict.keys()):
            if not key.startswith(prefix):
                continue
            match = self._LEGACY_KEY.match(key[len(prefix):])
            if match:
                part, index = (match.group(1), match.group(2)) if match.group(1) else match.group(3, 4)
                new_key = prefix + part + index + "." + match.group(5)
                state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DenseBlock(nn.ModuleDict):
    """L layers, each reading the concatenation of the block input and all earlier outputs:
    the plain formulation, which concatenates for every layer (memory quadratic in L).

    Each layer gets the concatenation as one tensor, so a full backward hook on a layer sees
    its input gradient."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bottleneck: bool,
                 bn_size: int, drop_rate: float, spatial_dims: int = 2):
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, bn_size,
                               drop_rate, spatial_dims)
            self.add_module(f"denselayer{i + 1}", layer)

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self) * self.growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x


class EfficientDenseBlock(DenseBlock):
    """The same block (same parameters and state dict) computed by the ``densenet::dense_block``
    op: one shared feature buffer, BN-ReLU recomputed in backward, memory linear in L
    (``densenet/ops``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dense_block_forward(self, x)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to floor(theta * m) maps - [dropout] - AvgPool 2x2/2 (2 or 2x2x2 in
    1-D or 3-D)."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float, spatial_dims: int = 2):
        super().__init__()
        self.norm = _NORM[spatial_dims](in_channels)
        self.relu = nn.ReLU()
        self.conv = _CONV[spatial_dims](in_channels, out_channels, kernel_size=1, bias=False)
        if drop_rate > 0:
            self.drop = nn.Dropout(drop_rate)
        self.pool = _AVG_POOL[spatial_dims](kernel_size=2, stride=2)


class EfficientTransition(Transition):
    """The same transition computed by the ``densenet::bn_relu_pool_conv`` op (pooling before
    the 1x1 convolution, BN-ReLU recomputed in backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.transition_forward(self, x)


# The classes each implementation builds its blocks and transitions from.
_CLASSES = {"efficient": (EfficientDenseBlock, EfficientTransition), "reference": (DenseBlock, Transition)}


def _as_class(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` module holding ``module``'s children, parameters, buffers and hooks (the
    same objects, nothing copied): the other implementation of the same block or transition."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value!r}.")
    return value


class FeatureInfo:
    """The feature maps a backbone returns, described as timm describes them: per map its
    channels (``num_chs``), its stride with respect to the input (``reduction``), the module
    whose output it is (``module``) and its position among all the model's maps (``index``).

    Iterating, indexing and ``len`` go over the selected maps (``out_indices``) as dicts, in the
    order forward returns them; ``channels()``, ``reduction()`` and ``module_name()`` list them.
    """

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int] | None = None):
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(range(len(self.info)) if out_indices is None else out_indices)

    def from_other(self, out_indices: Sequence[int]) -> "FeatureInfo":
        """The same maps with another selection."""
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str) -> list:
        return [self.info[i][key] for i in self.out_indices]

    def get_dicts(self, keys: Sequence[str] | None = None) -> list[dict]:
        return [{k: d[k] for k in (keys or d)} for d in self]

    def channels(self) -> list[int]:
        return self.get("num_chs")

    def reduction(self) -> list[int]:
        return self.get("reduction")

    def module_name(self) -> list[str]:
        return self.get("module")

    def __getitem__(self, item: int) -> dict:
        return dict(self.info[self.out_indices[item]])

    def __iter__(self) -> Iterator[dict]:
        return (dict(self.info[i]) for i in self.out_indices)

    def __len__(self) -> int:
        return len(self.out_indices)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.get_dicts()})"


def _take_indices(n: int, indices, name: str) -> tuple[int, ...]:
    """``indices`` of the ``n`` feature maps as sorted non-negative indices: None for all, an
    int k for the last k (timm's convention), else a sequence of indices (negative ones count
    from the end), each at most once."""
    valid = f"valid indices are 0 to {n - 1}, or -{n} to -1 from the end"
    if indices is None:
        return tuple(range(n))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= n:
            raise UsageError(f"{name}={indices} asks for the last {indices} feature maps but the model "
                             f"has {n}; give a count from 1 to {n}, or a sequence of indices ({valid}).")
        return tuple(range(n - indices, n))
    try:
        items = [operator.index(i) if not isinstance(i, bool) else None for i in indices]
    except TypeError:
        items = None
    if items is None or None in items:
        raise UsageError(f"{name} must be None, a count or a sequence of integer indices ({valid}), "
                         f"got {indices!r}.")
    if not items:
        raise UsageError(f"{name} is empty; select at least one of the model's {n} feature maps ({valid}).")
    taken: list[int] = []
    for i in items:
        if not -n <= i < n:
            raise UsageError(f"{name} {tuple(items)}: index {i} is out of range for the model's {n} "
                             f"feature maps; {valid}.")
        if i % n in taken:
            raise UsageError(f"{name} {tuple(items)} selects feature map {i % n} twice; give each index once.")
        taken.append(i % n)
    return tuple(sorted(taken))


def _run_plain(mods: list[nn.Module], x: torch.Tensor, relu: bool) -> torch.Tensor:
    for mod in mods:
        x = mod(x)
    return F.relu(x) if relu else x


class _Trunk(nn.Module):
    """What the classifier and the backbone share: ``features`` (torchvision's names), the
    implementation switch and the feature-map taps."""

    features: nn.Sequential
    implementation: str
    feature_info: FeatureInfo
    _tap_after: tuple[str, ...]  # per map, the child of ``features`` it is taken after

    def set_implementation(self, implementation: str):
        """Switch between the efficient and the plain blocks and transitions: each is replaced
        by a module of the other class holding the same layers, parameters and buffers (nothing
        is copied; every state-dict key stays)."""
        if implementation not in IMPLEMENTATIONS:
            raise UsageError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}.")
        block_cls, transition_cls = _CLASSES[implementation]
        swaps = []
        for parent in self.modules():
            for name, child in parent.named_children():
                cls = (block_cls if isinstance(child, DenseBlock) else
                       transition_cls if isinstance(child, Transition) else None)
                if cls is not None and type(child) is not cls:
                    swaps.append((parent, name, _as_class(child, cls)))
        for parent, name, new in swaps:
            setattr(parent, name, new)
        self.implementation = implementation
        return self

    def _forward_taps(self, x: torch.Tensor, take: Sequence[int], to_end: bool):
        """(last output, maps): the maps at the sorted tap indices ``take``; the last output is
        the final features if ``to_end``, else the last map (nothing after it runs). Modules
        between taps run together, so the efficient path fuses what it can within them."""
        children = list(self.features.children())
        names = list(self.features._modules)
        ends = [names.index(self._tap_after[i]) + 1 for i in take]
        if to_end:
            ends.append(len(children))
        use_ops = self.implementation == "efficient"
        if use_ops:
            x = ops.inference_layout(self.features, x)
        maps, start = [], 0
        for end in ends:
            if end > start:
                mods, relu = children[start:end], end == len(children)  # norm5 and the final ReLU
                x = ops.children_forward(mods, x, relu) if use_ops else _run_plain(mods, x, relu)
                start = end
            maps.append(x)
        return x, maps[:len(take)]


class _Classifier(_Trunk):
    """A trunk with its head (global average pooling and a linear classifier): what every model
    of the registry is, DenseNets and the ResNet baselines alike."""

    classifier: nn.Module
    num_features: int
    spatial_dims: int

    def _init_weights(self) -> None:
        # The paper's Torch code (fb.resnet.torch, also the ResNets') draws conv weights from
        # N(0, 2/n) with n = k*k*out_channels, i.e. He init in fan_out mode.
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False):
        """The feature maps at ``indices`` of ``feature_info``, as timm returns them:
        ``(final, maps)``, with ``final`` what :meth:`forward_features` returns, or only ``maps``
        if ``intermediates_only`` (then nothing after the last selected map is computed).

        ``indices``: None for all maps, an int n for the last n, or a sequence of indices
        (negative ones count from the end). The maps come shallow to deep.
        """
        take = _take_indices(len(self.feature_info), indices, "indices")
        final, maps = self._forward_taps(x, take, to_end=not intermediates_only)
        return maps if intermediates_only else (final, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(_GLOBAL_POOL[self.spatial_dims](x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh linear head for fine-tuning (num_classes=0 gives pooled features)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise UsageError(f"num_classes must be a non-negative integer, got {num_classes!r}.")
        p = self.classifier.weight if isinstance(self.classifier, nn.Linear) else next(self.parameters())
        if num_classes == 0:
            self.classifier = nn.Identity()
        else:
            self.classifier = nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype)
            nn.init.zeros_(self.classifier.bias)


class DenseNet(_Classifier):
    """Any DenseNet of the paper, from its parameters.

    Args:
        growth_rate: k, the number of maps each layer adds.
        block_config: layers per dense block, e.g. (6, 12, 24, 16) for DenseNet-121.
        bottleneck: use the 1x1 bottleneck (DenseNet-B) in every layer.
        bn_size: bottleneck width as a multiple of k (4 in the paper).
        compression: theta in (0, 1]; transitions output floor(theta * m) maps.
        num_init_features: stem width (16 for the paper's basic CIFAR nets, 2k otherwise).
        stem: "cifar" (one 3x3 conv) or "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool).
        drop_rate: dropout after every convolution but the first.
        num_classes, in_channels: classifier outputs and image channels.
        spatial_dims: 2 for images (N, C, H, W); 3 for volumes (N, C, D, H, W) and 1 for
            signals (N, C, L): every convolution, BN and pooling then has that many spatial
            dimensions (MONAI's ``spatial_dims``), with the same parameters per kernel position.
        implementation: "efficient" (the default: blocks and transitions as the registered
            ``densenet::`` ops, shared buffer, recomputed BN-ReLU) or "reference" (the plain
            modules, a concatenation per layer); both have the same parameters and state dict.

    ``feature_info`` describes the feature maps :meth:`forward_intermediates` (and the backbone,
    :class:`DenseNetFeatures`) can return: for the ImageNet stem the output of norm0 and relu0
    (stride 2, before the max-pooling), then one map per dense block, the block's output before
    its transition, and for the last block the final features after norm5 and its ReLU.
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 bottleneck: bool = True, bn_size: int = 4, compression: float = 0.5,
                 num_init_features: int | None = None, stem: str = "imagenet",
                 drop_rate: float = 0.0, num_classes: int = 1000, in_channels: int = 3,
                 implementation: str = "efficient", spatial_dims: int = 2):
        super().__init__()
        if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
            raise UsageError(f"spatial_dims must be 1, 2 or 3 (signals, images, volumes), got "
                             f"{spatial_dims!r}.")
        _check_positive_int("growth_rate", growth_rate)
        _check_positive_int("bn_size", bn_size)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if isinstance(block_config, int) or not block_config:
            raise UsageError(f"block_config must be a non-empty sequence of layer counts, got {block_config!r}.")
        for n in block_config:
            _check_positive_int("block_config entries", n)
        if not isinstance(compression, (int, float)) or not 0 < compression <= 1:
            raise UsageError(f"compression (theta) must be in (0, 1], got {compression!r}.")
        if not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise UsageError(f"drop_rate must be in [0, 1), got {drop_rate!r}.")
        if stem not in ("cifar", "imagenet"):
            raise UsageError(f"stem must be 'cifar' or 'imagenet', got {stem!r}.")
        if implementation not in IMPLEMENTATIONS:
            raise UsageError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}.")
        if num_init_features is None:
            num_init_features = 2 * growth_rate
        _check_positive_int("num_init_features", num_init_features)

        self.growth_rate = growth_rate
        self.block_config = tuple(block_config)
        self.bottleneck = bool(bottleneck)
        self.compression = float(compression)
        self.drop_rate = float(drop_rate)
        self.stem = stem
        self.implementation = implementation
        self.spatial_dims = d = spatial_dims
        self.in_channels = in_channels
        block_cls, transition_cls = _CLASSES[implementation]

        taps = []  # (child the map is taken after, feature_info entry)
        if stem == "imagenet":
            taps.append(("relu0", dict(num_chs=num_init_features, reduction=2, module="features.norm0")))
            reduction = 4
            stem_layers = [
                ("conv0", _CONV[d](in_channels, num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", _NORM[d](num_init_features)),
                ("relu0", nn.ReLU()),
                ("pool0", _MAX_POOL[d](kernel_size=3, stride=2, padding=1)),
            ]
        else:
            reduction = 1
            stem_layers = [("conv0", _CONV[d](in_channels, num_init_features, 3, padding=1, bias=False))]
        self.features = nn.Sequential(OrderedDict(stem_layers))

        channels = num_init_features
        for i, num_layers in enumerate(self.block_config):
            block = block_cls(num_layers, channels, growth_rate, self.bottleneck, bn_size, drop_rate, d)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            if i != len(self.block_config) - 1:
                taps.append((f"denseblock{i + 1}", dict(num_chs=channels, reduction=reduction,
                                                        module=f"features.denseblock{i + 1}")))
                out = int(self.compression * channels)  # floor(theta * m)
                self.features.add_module(f"transition{i + 1}", transition_cls(channels, out, drop_rate, d))
                channels = out
                reduction *= 2  # the transition's 2x2 average pooling
        # torchvision calls the final BN "norm5" whatever the number of blocks; keep its name.
        self.features.add_module("norm5", _NORM[d](channels))
        taps.append(("norm5", dict(num_chs=channels, reduction=reduction, module="features.norm5")))
        self._tap_after = tuple(after for after, _ in taps)
        self.feature_info = FeatureInfo([info for _, info in taps])
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map, after the last BN and ReLU (N, num_features, H', W'), with
        one spatial dimension per ``spatial_dims``."""
        if self.implementation == "efficient":
            return ops.features_forward(self.features, x)
        return F.relu(self.features(x))

    # MONAI's DenseNets keep the classifier as ``class_layers.out``: map it on load.
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        head = prefix + "class_layers.out."
        for key in [k for k in state_dict if k.startswith(head)]:
            state_dict[prefix + "classifier." + key[len(head):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DenseNetFeatures(_Trunk):
    """A DenseNet (or a ResNet baseline) without its classifier, as a backbone for detection or segmentation: forward
    returns the list of feature maps at ``out_indices`` (timm's ``features_only``).

    The maps are those of ``model.feature_info``: for the ImageNet stem norm0+relu0 at stride 2,
    then each dense block's output, the last one after norm5 and its ReLU (each block works at
    one resolution and the transitions between them halve it: section 3, "Pooling layers"), at
    strides 4, 8, 16 and 32 for DenseNet-121; for the CIFAR nets the three blocks' outputs at
    strides 1, 2 and 4. Nothing after the last selected map runs. ``feature_info`` describes the
    selected maps.

    The trunk keeps its name ``features``, so the state dict is the classifier's without
    ``classifier.*``; a classifier's state dict (torchvision's, timm's, this package's, any
    number of classes) loads strictly into it, its head ignored.

    Args:
        model: the DenseNet whose ``features`` this uses (shared, not copied).
        out_indices: the maps to return: None for all, an int n for the last n, or a sequence
            of indices into ``model.feature_info`` (negative ones count from the end).
    """

    def __init__(self, model: DenseNet, out_indices: int | Sequence[int] | None = None):
        super().__init__()
        if not isinstance(model, _Classifier):
            raise UsageError(f"DenseNetFeatures wraps a model of the registry (a DenseNet or a ResNet), "
                             f"got {type(model).__name__}.")
        self.out_indices = _take_indices(len(model.feature_info), out_indices, "out_indices")
        self.feature_info = model.feature_info.from_other(self.out_indices)
        self.implementation = model.implementation
        self.spatial_dims = model.spatial_dims
        self.in_channels = model.in_channels
        self._tap_after = model._tap_after
        self.features = model.features
        self.training = model.training

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._forward_taps(x, self.out_indices, to_end=False)[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        from .weights import canonical_key  # torchvision's ResNet names (conv1, layer1, fc)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = prefix + canonical_key(key[len(prefix):])
            if new != key:
                state_dict[new] = state_dict.pop(key)
        for key in [k for k in state_dict if k.startswith((prefix + "classifier.", prefix + "class_layers."))]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    input_size: int
    kwargs: dict = field(default_factory=dict)
    paper_key: str | None = None  # row name in the paper's tables (see densenet.paper)
    build: Callable[..., nn.Module] = DenseNet  # the class ``kwargs`` are given to
    family: str = "DenseNet"  # "DenseNet", "DenseNet-BC", "ResNet", "pre-activation ResNet", ...


_REGISTRY: dict[str, ModelInfo] = {}
# Name patterns beyond the registered names: (parser returning a ModelInfo or None, how to write them).
_PATTERNS: list[tuple[Callable[[str], ModelInfo | None], str]] = []


def register_model(info: ModelInfo) -> None:
    """Add a model to the registry under ``info.name`` (in the order ``list_models`` gives)."""
    _REGISTRY[info.name] = info


def register_pattern(parse: Callable[[str], ModelInfo | None], how: str) -> None:
    """Accept any name ``parse`` turns into a :class:`ModelInfo` (``how`` says how to write one)."""
    _PATTERNS.append((parse, how))


def _register(name: str, description: str, input_size: int, paper_key: str | None = None, **kwargs) -> None:
    family = "DenseNet-BC" if kwargs.get("bottleneck") and kwargs.get("compression", 1) < 1 else "DenseNet"
    register_model(ModelInfo(name, description, input_size, kwargs, paper_key, DenseNet, family))


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, in the paper's order."""
    return list(_REGISTRY)


_CIFAR_NAME = re.compile(r"^densenet(_bc)?(\d+)_k(\d+)$")


def model_info(name: str) -> ModelInfo:
    """Registry entry of ``name``; any ``densenet[_bc]{L}_k{k}`` names a CIFAR net of that shape."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    match = _CIFAR_NAME.match(name) if isinstance(name, str) else None
    if match:
        bc, depth, k = bool(match.group(1)), int(match.group(2)), int(match.group(3))
        kwargs = _cifar_kwargs(depth, k, bc)  # raises for an impossible depth
        return ModelInfo(name, f"DenseNet{'-BC' if bc else ''} (L={depth}, k={k}), CIFAR/SVHN", 32,
                         kwargs, None, DenseNet, "DenseNet-BC" if bc else "DenseNet")
    for parse, _ in _PATTERNS if isinstance(name, str) else ():
        info = parse(name)  # raises for an impossible depth
        if info is not None:
            return info
    shapes = ", ".join(["densenet_bc{L}_k{k} / densenet{L}_k{k}", *(how for _, how in _PATTERNS)])
    raise UsageError(
        f"unknown model name {name!r}. Known models: {', '.join(_REGISTRY)} "
        f"(or any CIFAR shape as {shapes})."
    )


def create_model(name: str, weights: str | None = None, features_only: bool = False,
                 out_indices: int | Sequence[int] | None = None,
                 **overrides) -> DenseNet | DenseNetFeatures:
    """Build a registered model by name; ``overrides`` replace any argument of its class
    (:class:`DenseNet`, or :class:`~densenet.resnet.ResNet` for the baselines).

    ``weights`` is a local checkpoint file (torchvision, timm or this package's own) loaded
    strictly into the model. ``features_only`` gives the backbone instead
    (:class:`DenseNetFeatures`, returning the feature maps at ``out_indices``); its weights may
    come from a classifier of any number of classes.
    """
    info = model_info(name)
    if out_indices is not None and not features_only:
        raise UsageError("out_indices selects the feature maps of a backbone; pass features_only=True "
                         "with it, or leave it out for the classifier.")
    kwargs = {**info.kwargs, **overrides}
    model = info.build(**kwargs)
    if features_only:
        model = DenseNetFeatures(model, out_indices)
    if weights is not None:
        load_weights_into(model, weights)
    return model


def _cifar_layers_per_block(depth: int, bottleneck: bool) -> int:
    per_layer = 6 if bottleneck else 3  # convolutions per layer x 3 blocks
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 4 + per_layer or (depth - 4) % per_layer:
        kind = "DenseNet-BC/-B (bottleneck)" if bottleneck else "basic DenseNet"
        examples = ", ".join(str(4 + per_layer * n) for n in (1, 2, 3, 6, 16))
        raise UsageError(
            f"depth {depth!r} is impossible for a {kind} on CIFAR: depth L counts convolutions and "
            f"the classifier, so valid depths are L = {per_layer}n + 4 with n >= 1 layers per block "
            f"(e.g. {examples}, ...)."
        )
    return (depth - 4) // per_layer


def densenet_cifar(depth: int, growth_rate: int = 12, bottleneck: bool = True,
                   compression: float = 0.5, num_classes: int = 10,
                   num_init_features: int | None = None, **kwargs) -> DenseNet:
    """A 3-block CIFAR/SVHN DenseNet of any valid depth L (section 3 of the paper, "Implementation Details").

    The stem is 16 maps for the basic net and 2k for nets with bottleneck or compression, which
    is what reproduces the paper's parameter counts.
    """
    _check_positive_int("growth_rate", growth_rate)
    n = _cifar_layers_per_block(depth, bottleneck)
    if num_init_features is None:
        num_init_features = 2 * growth_rate if (bottleneck or compression < 1) else 16
    return DenseNet(growth_rate=growth_rate, block_config=(n, n, n), bottleneck=bottleneck,
                    compression=compression, num_init_features=num_init_features, stem="cifar",
                    num_classes=num_classes, **kwargs)


def _cifar_kwargs(depth: int, k: int, bc: bool) -> dict:
    _check_positive_int("growth_rate", k)
    n = _cifar_layers_per_block(depth, bc)
    return dict(growth_rate=k, block_config=(n, n, n), bottleneck=bc,
                compression=0.5 if bc else 1.0, num_init_features=2 * k if bc else 16,
                stem="cifar", num_classes=10)


for _depth, _k, _bc in [(40, 12, False), (100, 12, False), (100, 24, False),
                        (100, 12, True), (250, 24, True), (190, 40, True)]:
    _name = f"densenet{'_bc' if _bc else ''}{_depth}_k{_k}"
    _register(_name, f"DenseNet{'-BC' if _bc else ''} (L={_depth}, k={_k}), CIFAR/SVHN", 32,
              paper_key=f"{'DenseNet-BC' if _bc else 'DenseNet'} L={_depth} k={_k}",
              **_cifar_kwargs(_depth, _k, _bc))

for _name, _k, _blocks, _init in [("densenet121", 32, (6, 12, 24, 16), 64),
                                  ("densenet169", 32, (6, 12, 32, 32), 64),
                                  ("densenet201", 32, (6, 12, 48, 32), 64),
                                  ("densenet264", 32, (6, 12, 64, 48), 64),
                                  ("densenet161", 48, (6, 12, 36, 24), 96)]:
    _register(_name, f"DenseNet-{_name[8:]} (k={_k}), ImageNet", 224, paper_key=f"DenseNet-{_name[8:]}",
              growth_rate=_k, block_config=_blocks, num_init_features=_init, bottleneck=True,
              compression=0.5, stem="imagenet", num_classes=1000)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_channels: int | None = None) -> int:
    """Multiply-adds of one forward pass on one input of ``input_size`` a side in each of the
    model's spatial dimensions (convolutions and linear layers), as the architecture defines
    them: counted on the plain (reference) path, since the efficient one computes the same
    function with fewer (its transitions pool before their 1x1 convolution)."""
    from torch.utils.flop_counter import FlopCounterMode
    p = next(model.parameters())
    dims = getattr(model, "spatial_dims", 2)
    if in_channels is None:
        in_channels = getattr(model, "in_channels", 3)
    x = torch.zeros(1, in_channels, *[input_size] * dims, device=p.device, dtype=p.dtype)
    was_training = model.training
    implementation = getattr(model, "implementation", "reference")
    model.eval()
    try:
        if isinstance(model, DenseNet):
            model.set_implementation("reference")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        if isinstance(model, DenseNet):
            model.set_implementation(implementation)
        model.train(was_training)
    return counter.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add


# Builders as functions too, for users who prefer ``densenet.densenet121()``.
def _builder(name: str) -> Callable[..., DenseNet | DenseNetFeatures]:
    def build(**overrides) -> DenseNet | DenseNetFeatures:
        return create_model(name, **overrides)
    build.__name__ = name
    build.__doc__ = f"{_REGISTRY[name].description}."
    return build


densenet121 = _builder("densenet121")
densenet161 = _builder("densenet161")
densenet169 = _builder("densenet169")
densenet201 = _builder("densenet201")
densenet264 = _builder("densenet264")
