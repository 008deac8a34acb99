"""Model zoo (CIFAR ResNets, VGG-BN, MobileNetV2, digits CNN, any torchvision classifier) and checkpoints."""

from automlprune.models.checkpoint import load_weights, read_checkpoint, save_checkpoint
from automlprune.models.zoo import MODELS, build_model, model_names

__all__ = ["MODELS", "build_model", "load_weights", "model_names", "read_checkpoint", "save_checkpoint"]
