"""Any torchvision classification model, registered as ``torchvision.<name>`` (random init, no download).

torchvision's builders differ in what they accept, so the adapter decides per model class what to pass:

- **Resolution**: only classes whose ``__init__`` takes one get the data's image size: ViT's
  ``image_size`` (one int: square images whose side the patch size divides) and MaxViT's
  ``input_size`` (height, width). The others (ResNet, EfficientNet, ConvNeXt, Swin, ...) end in
  adaptive pooling and take any size large enough; none of them is given a size.
- **Resolution check**: with ``image_size`` given, the model is first built and run once on the
  meta device (shapes only, no weights), so a size it cannot take fails with a one-line
  ``ValueError`` naming the model, the size and the reason before any weights are allocated.
  RegNet's builder cannot run on meta (it computes its widths from tensor values); it is built for
  real and takes any size, so there is nothing to check.
- **Input channels**: the stem convolution (the first ``nn.Conv2d`` the forward pass runs, wherever
  it sits in the module tree) is replaced by one taking ``in_channels``; its weights are drawn from
  the original weights' values so the family's own initialisation scale is kept.
- **Plain logits**: GoogLeNet and Inception-v3 are built with ``aux_logits=False`` (and
  ``init_weights=True``, their behaviour without weights, stated so torchvision does not warn):
  with auxiliary heads they return tuples in train mode, and growprune trains on one logits tensor.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from growprune.modes import evaluating

# The size torchvision's builders are designed for: used to find the stem when no size is given.
_DEFAULT_RESOLUTION = (224, 224)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def _get_model(key: str, kwargs: dict[str, Any], meta: bool = False, size: tuple[int, int] | None = None) -> nn.Module:
    """Build with torchvision's builder (on the meta device with ``meta``). Its errors (some span
    lines) become one line naming the model, and ``size`` when it is the cause; assertions (ViT's
    patch check) become ``ValueError``."""
    import torchvision

    try:
        if not meta:
            return torchvision.models.get_model(key.removeprefix("torchvision."), weights=None, **kwargs)
        # The meta build's warnings are about defaults (GoogLeNet's init_weights) the real build states.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torchvision.models.get_model(key.removeprefix("torchvision."), weights=None, **kwargs)
    except TypeError as error:  # an argument the class does not take
        raise TypeError(f"model {key!r}: {_one_line(error)}") from error
    except (ValueError, AssertionError) as error:
        cause = f" cannot take {size[0]}x{size[1]} inputs" if size is not None else ""
        raise ValueError(f"model {key!r}{cause}: {_one_line(error)}") from error


def _meta_model(key: str, kwargs: dict[str, Any], size: tuple[int, int] | None = None) -> nn.Module | None:
    """The model on the meta device, or ``None`` where the builder itself computes with tensor
    values (RegNet derives its block widths with ``torch`` ops), which the meta device cannot give."""
    try:
        return _get_model(key, kwargs, meta=True, size=size)
    except NotImplementedError:
        return None


def _init_parameters(model_class: type) -> set[str]:
    return set(inspect.signature(model_class.__init__).parameters)


def _resolution_kwargs(key: str, model: nn.Module, image_size: tuple[int, int]) -> dict[str, Any]:
    """The keyword that tells ``model``'s class the input resolution (empty if it takes none)."""
    height, width = image_size
    accepted = _init_parameters(type(model))
    if "image_size" in accepted:  # torchvision's VisionTransformer: one int
        if height != width:
            raise ValueError(f"model {key!r} cannot take {height}x{width} inputs: it takes square images only")
        patch = getattr(model, "patch_size", None)
        if isinstance(patch, int) and height % patch:
            raise ValueError(f"model {key!r} cannot take {height}x{width} inputs: its patch size {patch} does not "
                             f"divide {height}")
        return {"image_size": height}
    if "input_size" in accepted:  # MaxViT: (height, width)
        return {"input_size": (height, width)}
    return {}


def _first_conv_run(key: str, model: nn.Module, image_size: tuple[int, int]) -> str | None:
    """Run ``model`` once on a 3-channel input of ``image_size`` (eval mode, no gradients) and return
    the name of the first ``nn.Conv2d`` it calls: the stem that sees the input channels.

    A size the model cannot take raises a one-line ``ValueError`` naming the model, size and reason.
    """
    called: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _i, name=name: None if called else called.append(name))
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    parameter = next(model.parameters())
    try:
        with evaluating(model):
            model(torch.zeros(1, 3, *image_size, device=parameter.device, dtype=parameter.dtype))
    except (RuntimeError, ValueError, AssertionError) as error:
        raise ValueError(f"model {key!r} cannot take {image_size[0]}x{image_size[1]} inputs: {_one_line(error)}") from error
    finally:
        for hook in hooks:
            hook.remove()
    return called[0] if called else None


def _adapt_in_channels(key: str, model: nn.Module, stem: str, in_channels: int) -> None:
    """Replace the stem convolution ``stem`` by one taking ``in_channels`` input channels.

    The new weights are drawn (with replacement) from the original stem's values: the replacement
    keeps the distribution the family initialises its stem with instead of ``nn.Conv2d``'s default.
    """
    conv = model.get_submodule(stem)
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise ValueError(f"model {key!r}: the stem convolution {stem!r} is grouped (groups={conv.groups}); "
                         "in_channels cannot be adapted")
    replacement = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                            device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        values = conv.weight.detach().flatten()
        replacement.weight.copy_(values[torch.randint(values.numel(), replacement.weight.shape, device=values.device)])
        if conv.bias is not None:
            replacement.bias.copy_(conv.bias)
    parent_name, _, child = stem.rpartition(".")
    setattr(model.get_submodule(parent_name), child, replacement)


def build_torchvision_model(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int | tuple[int, int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's classifier ``name`` with random weights, for ``num_classes`` classes and
    ``in_channels`` input channels; ``image_size`` (the data's ``(height, width)``) is checked and
    passed on to the classes whose layers depend on it (see the module docstring).

    Raises ``ValueError`` (one line, naming the model) when the model cannot take ``image_size``,
    when ``weights`` are asked for (growprune never downloads) or ``aux_logits=True`` is.
    """
    key = f"torchvision.{name}"
    if kwargs.get("weights") is not None:
        raise ValueError("growprune never downloads weights at run time; load a state dict instead")
    kwargs.pop("weights", None)
    if kwargs.get("aux_logits"):
        raise ValueError(f"model {key!r}: aux_logits=True returns a tuple in train mode; growprune trains on one "
                         "logits tensor, so torchvision models are built with aux_logits=False")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {key!r}: {arg} must be a positive int, got {value!r}")
    if in_channels != 3 and kwargs.get("transform_input"):
        raise ValueError(f"model {key!r}: transform_input=True normalises 3 RGB channels; it cannot take "
                         f"in_channels={in_channels}")
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
            raise ValueError(f"model {key!r}: image_size must be a positive int or (height, width), got {image_size!r}")
        image_size = size
    kwargs = {"num_classes": num_classes, **kwargs}

    # The class decides what else to pass; a meta-device build shows it without allocating weights.
    probe = _meta_model(key, kwargs)
    model = probe if probe is not None else _get_model(key, kwargs)
    accepted = _init_parameters(type(model))
    extra = {arg: value for arg, value in (("aux_logits", False), ("init_weights", True))
             if arg in accepted and arg not in kwargs}
    resolution = _resolution_kwargs(key, model, image_size) if image_size is not None else {}
    if resolution:
        clash = sorted(arg for arg in resolution if arg in kwargs and kwargs[arg] != resolution[arg])
        if clash:
            raise ValueError(f"model {key!r}: {', '.join(clash)}={kwargs[clash[0]]!r} does not match the data's "
                             f"image size {image_size}")
    extra.update(resolution)
    kwargs.update(extra)
    size_cause = image_size if resolution else None  # what a failing rebuild is about

    stem = None
    if probe is not None:
        if extra:  # MaxViT checks its input_size in __init__
            probe = _meta_model(key, kwargs, size=size_cause)
        if image_size is not None or in_channels != 3:
            # One pass on the meta device checks the size and finds the stem before weights exist.
            stem = _first_conv_run(key, probe, image_size or _DEFAULT_RESOLUTION)
        model = _get_model(key, kwargs)
    elif extra:
        model = _get_model(key, kwargs, size=size_cause)
    if in_channels != 3:
        if probe is None:  # no meta build (RegNet): one batch-1 pass of the real model finds the stem
            stem = _first_conv_run(key, model, image_size or _DEFAULT_RESOLUTION)
        if stem is None:
            raise ValueError(f"model {key!r} runs no nn.Conv2d on its input: in_channels cannot be adapted")
        _adapt_in_channels(key, model, stem, in_channels)
    return model


def _make_builder(name: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int = 1000, in_channels: int = 3, image_size: int | tuple[int, int] | None = None,
                **kwargs: Any) -> nn.Module:
        return build_torchvision_model(name, num_classes, in_channels, image_size, **kwargs)

    builder.__name__ = f"torchvision.{name}"
    builder.__doc__ = f"torchvision's {name} (random initialisation); see :func:`build_torchvision_model`."
    return builder


def torchvision_builders() -> dict[str, Callable[..., nn.Module]]:
    """Builders for every model in ``torchvision.models`` (classification only)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return {f"torchvision.{name}": _make_builder(name) for name in names}
