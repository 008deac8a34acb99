"""The model registry: zoo models by name, and any torchvision classifier as ``torchvision:NAME``.

Every builder takes ``num_classes`` and ``in_channels`` (set by the task) plus its own
keyword arguments (``width`` for the zoo models).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

from torch import nn

from automlprune.errors import ConfigError
from automlprune.models.cifar_resnet import CifarResNet
from automlprune.models.small import DigitsCNN
from automlprune.models.vgg import VGG
from automlprune.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

for _depth in (20, 32, 56):
    MODELS.register(f"resnet{_depth}", partial(CifarResNet, _depth), family="cifar-resnet",
                    description=f"CIFAR-style ResNet-{_depth} (option-B shortcuts), width multiplier 'width'")
for _depth in (11, 16):
    MODELS.register(f"vgg{_depth}_bn", partial(VGG, _depth), family="vgg",
                    description=f"VGG-{_depth} with batch norm for small images, width multiplier 'width'")
MODELS.register("digits_cnn", DigitsCNN, family="small", description="small 3-conv CNN for 8x8 digits")


@MODELS.register("mobilenet_v2", family="mobilenet", description="MobileNetV2 with the CIFAR stem (stride 1), width_mult")
def cifar_mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    """torchvision's MobileNetV2 with the CIFAR adaptation: stride-1 stem and stride 1 in the
    second stage, so 32x32 inputs end at 4x4 (kuangliu/pytorch-cifar's setting)."""
    from torchvision.models import MobileNetV2

    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    return model


TORCHVISION_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                        "inception_v3": {"aux_logits": False, "init_weights": True}}
"""Builder options automlprune sets for torchvision models whose defaults do not fit a pruned
classifier: auxiliary heads off (they never run in eval and would return tuples in training)."""


def _torchvision_model(name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """A torchvision classifier built without weights, its first conv adapted to ``in_channels``."""
    from torchvision import models as tv

    if name not in tv.list_models(module=tv):
        raise ConfigError(f"torchvision has no classification model '{name}'; see torchvision.models.list_models()")
    model = tv.get_model(name, weights=None, num_classes=num_classes, **{**TORCHVISION_DEFAULTS.get(name, {}), **kwargs})
    if in_channels != 3:
        parent, attr, conv = _first_conv(model)
        setattr(parent, attr, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                        conv.dilation, conv.groups, conv.bias is not None))
    return model


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ConfigError("the model has no Conv2d layer to adapt to the input channels")


def build_model(name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a model by registry name, ``torchvision:NAME`` or ``python:package.module:build_fn``
    (your own builder); kwargs go to its builder."""
    if name.startswith("torchvision:"):
        return _torchvision_model(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if name.startswith("python:"):
        return build_python_model(name[len("python:"):], num_classes, in_channels, **kwargs)
    builder = MODELS.get(name)
    try:
        return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model '{name}' does not accept the options {sorted(kwargs)} ({exc}); fix model.kwargs in the task YAML") from None


def model_names() -> list[str]:
    return MODELS.names() + ["torchvision:<name>"]


def build_python_model(reference: str, num_classes: int, in_channels: int, search: tuple[Path, ...] = (), **kwargs: Any) -> nn.Module:
    """A user's model from ``package.module:build_fn`` (a task's ``model: {python: ...}``):
    ``build_fn(**kwargs)``, given ``num_classes`` and ``in_channels`` too when it takes them."""
    import inspect

    from automlprune.registry import import_object

    build = import_object(reference, search)
    try:
        accepted = inspect.signature(build).parameters
    except (TypeError, ValueError):
        accepted = {}
    extra = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in accepted}
    try:
        model = build(**extra, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{reference} does not accept the options {sorted(kwargs)} ({exc}); fix model.kwargs in the task YAML") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{reference} returned a {type(model).__name__}, not an nn.Module")
    return model
