"""Data modules of growprune, and a registry to create them by short name.

>>> from growprune.data import create_datamodule
>>> dm = create_datamodule("digits", batch_size=32)
>>> dm.num_classes, dm.input_shape
(10, (1, 8, 8))

Every module is a :class:`GrowPruneDataModule`: ``num_classes`` and ``input_shape`` are
known right after construction, and the splits are fixed by ``seed``. Register your own
module with :func:`register_datamodule` to make it available by name.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import lightning.pytorch as pl

from growprune.data.base import GrowPruneDataModule
from growprune.data.digits import DigitsDataModule
from growprune.data.idx import IdxDataModule
from growprune.data.synthetic import SyntheticDataModule
from growprune.data.tiny_imagenet import TinyImageNetDataModule
from growprune.data.torchvision_sets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GrowPruneDataModule",
    "IdxDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TinyImageNetDataModule",
    "TorchvisionDataModule",
    "create_datamodule",
    "list_datamodules",
    "register_datamodule",
]

#: Short name -> data module class, for :func:`create_datamodule`.
DATAMODULES: dict[str, type] = {
    "digits": DigitsDataModule,
    "idx": IdxDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "tiny_imagenet": TinyImageNetDataModule,
    "synthetic": SyntheticDataModule,
}

_D = TypeVar("_D", bound=type)


def list_datamodules() -> list[str]:
    """The registered short names, sorted."""
    return sorted(DATAMODULES)


def create_datamodule(name: str, **kwargs: object) -> GrowPruneDataModule:
    """Instantiate the data module registered as ``name`` with ``kwargs``.

    Raises ``ValueError`` listing the valid names if ``name`` is unknown.
    """
    if name not in DATAMODULES:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(list_datamodules())}")
    return DATAMODULES[name](**kwargs)


def register_datamodule(name: str) -> Callable[[_D], _D]:
    """Class decorator that registers a data module under ``name``.

    >>> @register_datamodule("my_data")          # doctest: +SKIP
    ... class MyData(GrowPruneDataModule): ...

    Raises ``ValueError`` if ``name`` already belongs to another class and ``TypeError`` if
    the decorated object is not a ``LightningDataModule`` subclass.
    """

    def decorator(cls: _D) -> _D:
        if not (isinstance(cls, type) and issubclass(cls, pl.LightningDataModule)):
            raise TypeError(f"register_datamodule({name!r}) needs a LightningDataModule subclass, got {cls!r}")
        if DATAMODULES.get(name, cls) is not cls:
            raise ValueError(f"data set name {name!r} is already registered to {DATAMODULES[name].__name__}")
        DATAMODULES[name] = cls
        return cls

    return decorator
