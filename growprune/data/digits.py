"""The embedded default data set: scikit-learn's 8x8 handwritten digits (no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

from growprune.data.base import (
    GrowPruneDataModule,
    check_fractions,
    check_int,
    random_split_indices,
    split_sizes,
)

NUM_DIGITS = 1797


class DigitsDataModule(GrowPruneDataModule):
    """The 1,797 real 8x8 handwritten digits (10 classes) that ship with scikit-learn.

    Works offline and trains in seconds on a CPU, which makes it the default data set.
    Pixels (0..16) are scaled to [0, 1], optionally resized, and normalised with the mean
    and standard deviation of the training split. The split into train/validation/test is
    random but fixed by ``seed``.

    Args:
        batch_size: Examples per batch.
        num_workers: Worker processes per data loader (0 loads in the main process).
        seed: Seed of the split and of the training-set shuffling.
        val_fraction: Share of the examples held out for validation, in (0, 1).
        test_fraction: Share held out for testing, in [0, 1); with 0 the test loader
            reuses the validation split.
        image_size: Side of the square images; values other than 8 resize bilinearly
            (e.g. 28 or 32 for models built for MNIST-sized inputs such as LeNet-5).
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        image_size: int = 8,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_fractions(val_fraction, test_fraction)
        check_int("image_size", image_size, 1)
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.image_size = image_size
        # Fails now, not at setup, when the fractions leave a split empty.
        self.split_sizes = split_sizes(NUM_DIGITS, val_fraction, test_fraction)

    @property
    def num_classes(self) -> int:
        """Ten digit classes, 0 to 9."""
        return 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(1, image_size, image_size)``."""
        return (1, self.image_size, self.image_size)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Load the digits into tensors and split them by ``seed``."""
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        if self.image_size != 8:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        train_idx, val_idx, test_idx = random_split_indices(len(labels), self.split_sizes, self.seed)
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        # Statistics of the training split only, so nothing about held-out data leaks in.
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std

        def subset(idx: torch.Tensor) -> TensorDataset:
            return TensorDataset(images[idx], labels[idx])

        val_set = subset(val_idx)
        test_set = subset(test_idx) if len(test_idx) else val_set
        return subset(train_idx), val_set, test_set
