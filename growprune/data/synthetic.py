"""Generated classification data for tests and smoke runs."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from growprune.data.base import (
    GrowPruneDataModule,
    check_fractions,
    check_int,
    random_split_indices,
    split_sizes,
)


class SyntheticDataModule(GrowPruneDataModule):
    """Noisy copies of one random prototype per class: learnable, instant, and offline.

    Each class gets a prototype drawn from N(0, 1); every example is its class prototype plus
    ``noise`` times N(0, 1). Classes are balanced (``num_samples`` is dealt out in turn).
    Prototypes, noise and split all come from generators seeded with ``seed``, so the data is
    identical for a given seed. Larger ``noise`` makes the task harder.

    Args:
        num_samples: Total number of examples, before splitting.
        input_shape: Shape of one example, e.g. ``(1, 8, 8)`` or ``(3, 32, 32)``.
        num_classes: Number of classes.
        noise: Standard deviation of the noise added to the prototypes (>= 0).
        batch_size: Examples per batch.
        num_workers: Worker processes per data loader (0 loads in the main process).
        seed: Seed of the data, the split and the training-set shuffling.
        val_fraction: Share of the examples held out for validation, in (0, 1).
        test_fraction: Share held out for testing, in [0, 1); with 0 the test loader
            reuses the validation split.
    """

    def __init__(
        self,
        num_samples: int = 512,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        noise: float = 0.5,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_int("num_samples", num_samples, 1)
        check_int("num_classes", num_classes, 1)
        input_shape = tuple(input_shape)
        if not input_shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape):
            raise ValueError(f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters()
        self.num_samples = num_samples
        self._input_shape = input_shape
        self._num_classes = num_classes
        self.noise = noise
        self.split_sizes = split_sizes(num_samples, val_fraction, test_fraction)

    @property
    def num_classes(self) -> int:
        """``num_classes`` as given."""
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``input_shape`` as given."""
        return self._input_shape

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Generate the examples and split them by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        prototypes = torch.randn((self.num_classes, *self.input_shape), generator=generator)
        labels = torch.arange(self.num_samples) % self.num_classes
        noise = torch.randn((self.num_samples, *self.input_shape), generator=generator)
        inputs = prototypes[labels] + self.noise * noise
        train_idx, val_idx, test_idx = random_split_indices(self.num_samples, self.split_sizes, self.seed)
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}

        def subset(idx: torch.Tensor) -> TensorDataset:
            return TensorDataset(inputs[idx], labels[idx])

        val_set = subset(val_idx)
        test_set = subset(test_idx) if len(test_idx) else val_set
        return subset(train_idx), val_set, test_set
