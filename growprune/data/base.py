"""Common base class and helpers for the growprune data modules.

Every data module in :mod:`growprune.data` derives from :class:`GrowPruneDataModule`. It
knows ``num_classes`` and ``input_shape`` as soon as it is constructed (the command line
links them into the model before any data is loaded), builds its train/validation/test
splits once in :meth:`~GrowPruneDataModule.setup`, and derives every random split from its
``seed`` alone, so two runs with the same seed see exactly the same examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from growprune.validation import check_integer


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= minimum``."""
    check_integer(name, value, minimum)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validate the split fractions of a data set that is split three ways.

    ``val_fraction`` must lie in (0, 1), ``test_fraction`` in [0, 1) and their sum below 1,
    so that the training split keeps at least part of the data.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training data, "
            f"got {val_fraction!r} + {test_fraction!r}"
        )


def split_sizes(num_samples: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Return ``(train, val, test)`` sizes for ``num_samples`` examples.

    Raises ``ValueError`` if a split that was asked for would end up empty.
    """
    val = round(num_samples * val_fraction)
    test = round(num_samples * test_fraction)
    train = num_samples - val - test
    if train < 1 or val < 1 or (test_fraction > 0 and test < 1):
        raise ValueError(
            f"{num_samples} samples are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: the splits would be train={train}, val={val}, test={test}"
        )
    return train, val, test


def random_split_indices(num_samples: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Split ``range(num_samples)`` into disjoint random index sets of the given sizes.

    Uses its own generator seeded with ``seed`` (never the global RNG), so the split depends
    on the seed only.
    """
    if sum(sizes) != num_samples:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {num_samples}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, list(sizes)))


class GrowPruneDataModule(pl.LightningDataModule):
    """Base class of the growprune data modules.

    Subclasses implement :attr:`num_classes`, :attr:`input_shape` and :meth:`build_datasets`.
    Datasets yield ``(image, label)`` pairs: a float tensor of shape ``input_shape`` and an
    integer class index. After :meth:`setup`, ``split_indices`` maps ``"train"``, ``"val"``
    (and ``"test"`` where the test split is carved from the same data) to the indices of the
    underlying examples, for inspecting or reproducing a split.

    Args:
        batch_size: Examples per batch.
        num_workers: Worker processes per data loader (0 loads in the main process).
        seed: Seed of the train/validation/test split and of the training-set shuffling.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.split_indices: dict[str, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        """Number of target classes."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example, ``(channels, height, width)`` for images."""
        raise NotImplementedError

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return the ``(train, val, test)`` datasets; called once, by :meth:`setup`."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build all three splits; later calls keep the splits already built."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_datasets()

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "setup() did not build this split"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # A fresh generator per loader: every fit with the same seed sees the same order.
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # page-locked batches copy to a GPU asynchronously; worker processes then keep it busy
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    # Each loader calls setup() itself so that the module also works outside a Trainer;
    # setup() is idempotent, so this costs nothing once the splits exist.

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training split (order fixed by ``seed``)."""
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the validation split, in a fixed order."""
        self.setup("validate")
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over the test split, in a fixed order."""
        self.setup("test")
        return self._loader(self.test_set, shuffle=False)
