"""Optimizer and LR-scheduler factories in a form that checkpoints can hold and load safely.

``GrowPruneModule(optimizer=..., lr_scheduler=...)`` takes callables. Pickled as they are into the
checkpoint's hyper-parameters, a ``functools.partial`` or a function makes the checkpoint unloadable
with ``torch.load(weights_only=True)``, torch's default (and so Lightning's, for ``fit(ckpt_path=...)``
and ``load_from_checkpoint``). The module therefore stores a *description* instead, in the form the
``growprune`` command (LightningCLI) writes:

* an optimizer/scheduler class, or a ``functools.partial`` of one with plain arguments (numbers,
  strings, booleans, ``None``, lists/tuples/dicts of them): ``{"class_path": "torch.optim.SGD",
  "init_args": {"lr": 0.05, "momentum": 0.9}}``;
* an importable function annotated to return an optimizer (scheduler), such as
  :func:`growprune.module.default_optimizer`: its dotted path, ``"growprune.module.default_optimizer"``
  (with ``init_args`` when it is a partial of that function);
* anything else (a lambda, a local function, a callable object, a partial with a tensor argument):
  the marker ``{"not_stored": "<what it was>"}``, and a warning when the module is built. Loading such
  a checkpoint without passing the callable again (``load_from_checkpoint(path, optimizer=...)``)
  raises a :class:`~growprune.errors.ConfigurationError` saying so.

:func:`build_factory` turns a description back into a callable. It only looks names up in modules
that are already imported, and only accepts optimizer (scheduler) classes and functions annotated to
return one, so a checkpoint cannot make loading import or call anything else.
"""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from typing import Any, Callable

import torch

from growprune.errors import ConfigurationError

#: Key of the marker stored for a callable that cannot be described.
NOT_STORED = "not_stored"

_KINDS: dict[str, tuple[type, ...]] = {
    "optimizer": (torch.optim.Optimizer,),
    "lr_scheduler": (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
}


def describe_factory(factory: Any, kind: str) -> str | dict[str, Any] | None:
    """The checkpoint-safe description of ``factory`` (see the module docstring).

    A string or dict is taken to be a description already (the command line's config) and comes
    back as it is; ``None`` stays ``None``.
    """
    if factory is None or isinstance(factory, (str, dict)):
        return factory
    target, args, kwargs = factory, (), {}
    if isinstance(factory, functools.partial):
        target, args, kwargs = factory.func, factory.args, dict(factory.keywords)
        if _is_jsonargparse_instantiation(target) and len(args) == 2 and inspect.isclass(args[1]):
            # what jsonargparse builds from a config's class_path/init_args (e.g. when Lightning
            # re-instantiates a CLI checkpoint's module): partial(<its call wrapper>, <instantiator>, cls, **init_args)
            target, args = args[1], ()
    path = _import_path(target)
    if path is None or not _produces(target, kind):
        return _marker(factory)
    if args:
        # positional arguments follow the parameters/optimizer argument: name them
        try:
            bound = inspect.signature(target).bind_partial(None, *args)
        except (TypeError, ValueError):
            return _marker(factory)
        named = dict(list(bound.arguments.items())[1:])
        if set(named) & set(kwargs):
            return _marker(factory)
        kwargs = {**named, **kwargs}
    if not all(isinstance(key, str) for key in kwargs) or not _plain(kwargs):
        return _marker(factory)
    if inspect.isclass(target) or kwargs:
        return {"class_path": path, "init_args": kwargs}
    return path


def _is_jsonargparse_instantiation(function: Any) -> bool:
    return getattr(function, "__module__", "").startswith("jsonargparse") and \
        getattr(function, "__name__", "") == "call_without_instantiate_context"


def build_factory(value: Any, kind: str, argument: str) -> Callable[..., Any] | None:
    """The callable for a factory argument: a callable as given, or one built from a description.

    ``argument`` names the module argument (``optimizer`` / ``lr_scheduler``) in error messages.
    """
    if value is None or (callable(value) and not isinstance(value, (str, dict))):
        return value
    if isinstance(value, dict) and NOT_STORED in value:
        raise ConfigurationError(
            f"this checkpoint does not hold its {argument} ({value[NOT_STORED]} cannot be stored safely): pass it "
            f"again, e.g. GrowPruneModule.load_from_checkpoint(path, {argument}=functools.partial(...))"
        )
    if isinstance(value, str):
        path, init_args = value, {}
    elif isinstance(value, dict) and isinstance(value.get("class_path"), str):
        path, init_args = value["class_path"], value.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ConfigurationError(f"{argument}: init_args must be a mapping, got {type(init_args).__name__}")
    else:
        raise ConfigurationError(
            f"{argument} must be a callable, a dotted path or a {{class_path, init_args}} mapping, got {value!r}")
    target = _resolve(path, argument)
    if not _produces(target, kind):
        raise ConfigurationError(
            f"{argument}: {path!r} is not {'an optimizer' if kind == 'optimizer' else 'an LR scheduler'} class or a "
            f"function annotated to return one; pass the callable itself ({argument}=...)"
        )
    return functools.partial(target, **init_args) if init_args or inspect.isclass(target) else target


# ----------------------------------------------------------------------------------- helpers
def _marker(factory: Any) -> dict[str, str]:
    return {NOT_STORED: _short_repr(factory)}


def _short_repr(factory: Any) -> str:
    text = getattr(factory, "__qualname__", None) or repr(factory)
    return text if len(text) <= 120 else text[:117] + "..."


def _import_path(target: Any) -> str | None:
    """The shortest dotted path under which ``target`` can be found again, or ``None``."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None  # lambdas and local functions have no path
    parts = module.split(".")
    for end in range(1, len(parts) + 1):  # prefer the public name (torch.optim.SGD, not torch.optim.sgd.SGD)
        candidate = ".".join(parts[:end])
        if _lookup(candidate, qualname) is target:
            return f"{candidate}.{qualname}"
    return None


def _lookup(module_name: str, qualname: str) -> Any:
    module = sys.modules.get(module_name)
    for name in qualname.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _resolve(path: str, argument: str) -> Any:
    """Find ``path`` in an already imported module (nothing is imported on a checkpoint's say-so)."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:end])
        if module_name in sys.modules:
            found = _lookup(module_name, ".".join(parts[end:]))
            if found is not None:
                return found
            break
    raise ConfigurationError(
        f"{argument}: cannot find {path!r} among the imported modules; import its module before loading, or pass "
        f"{argument}=... yourself"
    )


def _produces(target: Any, kind: str) -> bool:
    """Whether ``target`` is a class of ``kind`` or a function annotated to return one."""
    bases = _KINDS[kind]
    if inspect.isclass(target):
        return issubclass(target, bases)
    if not inspect.isfunction(target):
        return False
    try:
        returned = typing.get_type_hints(target).get("return")
    except Exception:  # unresolvable annotations: not provably a factory
        return False
    return inspect.isclass(returned) and issubclass(returned, bases)


def _plain(value: Any) -> bool:
    """Numbers, strings, booleans, ``None`` and containers of them: what ``weights_only`` loads."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return False
