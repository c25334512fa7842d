"""A model registry in the style of timm/torchvision: small builders registered by name.

Every builder takes ``num_classes`` and ``in_channels``; builders whose layer sizes depend on
the input resolution also take ``image_size``. ``create_model`` forwards only the keyword
arguments a builder accepts among these three, so callers can always pass all of them.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Callable, TypeVar

import torch.nn as nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# Arguments the training module always passes; a builder that does not declare one ignores it.
_SHAPE_ARGS = ("num_classes", "in_channels", "image_size")


def register_model(name: str | None = None) -> Callable[[Builder], Builder]:
    """Decorator that registers a model builder under ``name`` (default: the function name).

    >>> @register_model("my_mlp")
    ... def my_mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28): ...
    """

    def decorator(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _MODELS and _MODELS[key] is not builder:
            raise ValueError(f"a model named {key!r} is already registered")
        _MODELS[key] = builder
        return builder

    return decorator


def unregister_model(name: str) -> Callable[..., nn.Module]:
    """Remove the builder registered as ``name`` and return it (e.g. to undo a registration made
    for a test or a notebook session); an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in _MODELS:
        _register_torchvision_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(_MODELS))}")
    return _MODELS.pop(name)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names (sorted), optionally filtered by a shell-style ``pattern``."""
    _register_torchvision_models()
    names = sorted(_MODELS)
    return fnmatch.filter(names, pattern) if pattern else names


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    _register_torchvision_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    ``num_classes``, ``in_channels`` and ``image_size`` are passed on only when the builder
    declares them; every other keyword must be one the builder accepts.
    """
    builder = get_model_builder(name)
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call_kwargs = {}
    for key, value in kwargs.items():
        if key in params or takes_any:
            call_kwargs[key] = value
        elif key not in _SHAPE_ARGS:
            valid = [p for p in params if params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
            raise TypeError(f"model {name!r} got an unknown argument {key!r}; it accepts: {', '.join(valid)}")
    return builder(**call_kwargs)


_torchvision_registered = False


def _register_torchvision_models() -> None:
    """Register every torchvision classification model as ``torchvision.<name>`` (lazily)."""
    global _torchvision_registered
    if _torchvision_registered:
        return
    _torchvision_registered = True
    from growprune.models.torchvision_models import torchvision_builders

    for key, builder in torchvision_builders().items():
        _MODELS.setdefault(key, builder)
