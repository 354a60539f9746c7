"""densenet: Densely Connected Convolutional Networks (Huang et al., CVPR 2017) for PyTorch."""

from .errors import UsageError
from .model import (DenseNet, DenseNetFeatures, count_parameters, create_model, densenet121,
                    densenet161, densenet169, densenet201, densenet264, densenet_cifar,
                    list_models, model_info)
from .resnet import ResNet, preact_resnet, resnet_cifar, wide_resnet  # registers the baselines

__version__ = "0.1.0"

__all__ = ["DenseNet", "DenseNetFeatures", "UsageError", "count_parameters", "create_model", "densenet121",
           "densenet161", "densenet169", "densenet201", "densenet264", "densenet_cifar",
           "list_models", "model_info", "ResNet", "preact_resnet", "resnet_cifar", "wide_resnet",
           "__version__"]
