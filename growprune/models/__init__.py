"""Model registry and the built-in architectures (LeNet, VGG, ResNet, any torchvision classifier)."""

from growprune.models import lenet, resnet, vgg  # noqa: F401  (registers the builders)
from growprune.models.registry import create_model, get_model_builder, list_models, register_model, unregister_model

__all__ = ["create_model", "get_model_builder", "list_models", "register_model", "unregister_model"]
