"""Image/label pairs in the idx format of MNIST and its relatives (EMNIST, KMNIST, ...)."""

from __future__ import annotations

import gzip
import os
from typing import IO

import numpy as np
import torch
from torch.utils.data import Dataset

from growprune.data.base import (
    GrowPruneDataModule,
    check_fractions,
    check_int,
    random_split_indices,
    split_sizes,
)

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_UINT8 = 0x08
_GZIP_SIGNATURE = b"\x1f\x8b"


def _open(path: str) -> IO[bytes]:
    # Decide on the content, not the file name, so renamed files still load.
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_SIGNATURE
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def read_idx_header(path: str) -> tuple[int, tuple[int, ...]]:
    """Return the magic number and the dimensions stored in the header of an idx file.

    Reads only the header, so it is cheap even for large (or gzip-compressed) files.
    Raises ``ValueError`` if the element type is not unsigned bytes.
    """
    with _open(path) as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\x00\x00":
            raise ValueError(f"{path} is not an idx file (header starts with {head!r})")
        dtype_code, ndim = head[2], head[3]
        if dtype_code != _UINT8:
            raise ValueError(
                f"{path}: idx element type 0x{dtype_code:02x} is not supported, only 0x08 (uint8)"
            )
        dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise ValueError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    return int.from_bytes(head, "big"), dims


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read a whole uint8 idx file into an array, checking its magic number."""
    magic, dims = read_idx_header(path)
    if magic != expected_magic:
        raise ValueError(f"{path}: idx magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    with _open(path) as f:
        f.seek(4 + 4 * len(dims))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    count = int(np.prod(dims))
    if data.size < count:
        raise ValueError(f"{path}: expected {count} values after the header, found {data.size}")
    return data[:count].reshape(dims)


class NormalizedImages(Dataset):
    """uint8 images ``(N, H, W)`` with labels, served as normalised ``(1, H, W)`` floats.

    Keeps the bytes and converts one example at a time, so large files cost a quarter of the
    memory that storing floats would.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> None:
        self.images = images
        self.labels = labels
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].unsqueeze(0).float().div_(255.0)
        return image.sub_(self.mean).div_(self.std), self.labels[index]


class IdxDataModule(GrowPruneDataModule):
    """Any pair of idx image/label files (the MNIST file format), plain or gzip-compressed.

    The images file must hold unsigned bytes in 3 dimensions (magic number 0x00000803), the
    labels file unsigned bytes in 1 dimension (0x00000801). The examples are split at random,
    fixed by ``seed``, into train/validation(/test). Pixels are scaled to [0, 1] and, with
    ``normalize``, standardised with the mean and standard deviation of the training split.

    Args:
        images: Path of the idx images file, e.g. ``t10k-images-idx3-ubyte.gz``.
        labels: Path of the idx labels file, e.g. ``t10k-labels-idx1-ubyte.gz``.
        batch_size: Examples per batch.
        num_workers: Worker processes per data loader (0 loads in the main process).
        seed: Seed of the split and of the training-set shuffling.
        val_fraction: Share of the examples held out for validation, in (0, 1).
        test_fraction: Share held out for testing, in [0, 1). With 0 (the default) there is
            no separate test split and the test loader serves the validation split.
        num_classes: Number of classes; ``None`` reads the labels and uses ``max + 1``.
        normalize: Standardise pixels with the training-split statistics.
    """

    def __init__(
        self,
        images: str,
        labels: str,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        num_classes: int | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_fractions(val_fraction, test_fraction)
        if num_classes is not None:
            check_int("num_classes", num_classes, 1)
        self.save_hyperparameters()
        self.images_path = os.path.abspath(os.path.expanduser(images))
        self.labels_path = os.path.abspath(os.path.expanduser(labels))
        for name, path in (("images", self.images_path), ("labels", self.labels_path)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name} file not found: {path}")

        image_magic, image_dims = read_idx_header(self.images_path)
        if image_magic != IMAGES_MAGIC:
            raise ValueError(
                f"images file {self.images_path} has idx magic number 0x{image_magic:08x}, "
                f"expected 0x{IMAGES_MAGIC:08x} (uint8, 3-D)"
            )
        label_magic, label_dims = read_idx_header(self.labels_path)
        if label_magic != LABELS_MAGIC:
            raise ValueError(
                f"labels file {self.labels_path} has idx magic number 0x{label_magic:08x}, "
                f"expected 0x{LABELS_MAGIC:08x} (uint8, 1-D)"
            )
        if image_dims[0] != label_dims[0]:
            raise ValueError(
                f"{self.images_path} holds {image_dims[0]} images but "
                f"{self.labels_path} holds {label_dims[0]} labels"
            )
        self.num_samples = image_dims[0]
        self._input_shape = (1, image_dims[1], image_dims[2])
        self.split_sizes = split_sizes(self.num_samples, val_fraction, test_fraction)
        if num_classes is None:
            num_classes = int(read_idx(self.labels_path, LABELS_MAGIC).max()) + 1
        self._num_classes = num_classes
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.normalize = normalize

    @property
    def num_classes(self) -> int:
        """``num_classes`` as given, else the largest label plus one."""
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(1, height, width)`` from the images file header."""
        return self._input_shape

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Read both files and split them by ``seed``."""
        images = torch.from_numpy(read_idx(self.images_path, IMAGES_MAGIC).copy())
        labels = torch.from_numpy(read_idx(self.labels_path, LABELS_MAGIC).astype(np.int64))
        if int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"{self.labels_path} contains label {int(labels.max())}, "
                f"but num_classes is {self.num_classes}"
            )
        train_idx, val_idx, test_idx = random_split_indices(self.num_samples, self.split_sizes, self.seed)
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        mean, std = 0.0, 1.0
        if self.normalize:
            train_pixels = images[train_idx].float().div_(255.0)
            mean, std = train_pixels.mean().item(), train_pixels.std().item()
            std = std or 1.0  # a constant image set would otherwise divide by zero

        def subset(idx: torch.Tensor) -> NormalizedImages:
            return NormalizedImages(images[idx], labels[idx], mean, std)

        val_set = subset(val_idx)
        test_set = subset(test_idx) if len(test_idx) else val_set
        return subset(train_idx), val_set, test_set
