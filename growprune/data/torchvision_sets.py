"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision.

The official training set is split by ``seed`` into training and validation
(``val_size`` examples); the official test set is the test split. The files are read from
``root``; with ``download=True`` torchvision fetches any that are missing.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, ClassVar

import torchvision
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from growprune.data.base import GrowPruneDataModule, check_int, random_split_indices

#: Seconds a single network operation of a download may block; offline machines fail fast.
DOWNLOAD_TIMEOUT_S = 10.0


class TorchvisionDataModule(GrowPruneDataModule):
    """Shared logic of the data modules over a torchvision data set (see the subclasses).

    Args:
        root: Directory that holds (or receives) the data set files.
        download: Let torchvision download missing files (needs internet). Without it, missing
            files raise ``FileNotFoundError`` listing what to put where.
        batch_size: Examples per batch.
        num_workers: Worker processes per data loader (0 loads in the main process).
        seed: Seed of the train/validation split and of the training-set shuffling.
        val_size: Examples of the official training set held out for validation.
        augment: Random augmentation of the training split (never of validation or test).
    """

    dataset_class: ClassVar[type[torchvision.datasets.VisionDataset]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    image_shape: ClassVar[tuple[int, int, int]]
    class_count: ClassVar[int]

    def __init__(
        self,
        root: str = "datasets",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_size: int = 5000,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_int("val_size", val_size, 1)
        self.save_hyperparameters()
        self.root = os.path.abspath(os.path.expanduser(root))
        self.download = download
        self.val_size = val_size
        self.augment = augment

    @property
    def num_classes(self) -> int:
        """Number of classes of the data set."""
        return self.class_count

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(channels, height, width)`` of the images."""
        return self.image_shape

    def expected_files(self) -> tuple[str, list[str]]:
        """The directory that must hold the data set and the file names it must contain."""
        raise NotImplementedError

    def train_augmentation(self) -> list[Callable]:
        """Random transforms applied to training images before ``ToTensor`` (if ``augment``)."""
        return []

    def missing_files(self) -> list[str]:
        """Full paths of the expected files that do not exist."""
        directory, names = self.expected_files()
        return [os.path.join(directory, n) for n in names if not os.path.isfile(os.path.join(directory, n))]

    def _files_help(self) -> str:
        directory, names = self.expected_files()
        return f"{self.dataset_class.__name__} needs these files in {directory}: {', '.join(names)}"

    def prepare_data(self) -> None:
        """Download missing files if ``download`` is set, then check that all files exist."""
        if self.download and self.missing_files():
            self._download()
        if self.missing_files():
            raise FileNotFoundError(
                f"{self._files_help()}. Missing: {', '.join(self.missing_files())}. "
                f"Put the files there, or pass download=True where internet is available."
            )

    def _download(self) -> None:
        # urllib has no timeout by default, so an unreachable mirror could hang forever.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            self.dataset_class(self.root, train=True, download=True)
        except Exception as err:
            raise RuntimeError(
                f"Downloading {self.dataset_class.__name__} into {self.root} failed: {err!r}. "
                f"Without internet, place the files by hand: {self._files_help()}; "
                f"then use download=False."
            ) from err
        finally:
            socket.setdefaulttimeout(previous)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Check the files (downloading if allowed), then load and split the data set."""
        self.prepare_data()
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        eval_transform = T.Compose(normalize)
        train_transform = T.Compose((self.train_augmentation() if self.augment else []) + normalize)
        # Two instances over the same files, so the validation images are never augmented.
        train_full = self.dataset_class(self.root, train=True, transform=train_transform)
        val_full = self.dataset_class(self.root, train=True, transform=eval_transform)
        test_set = self.dataset_class(self.root, train=False, transform=eval_transform)
        total = len(train_full)
        if self.val_size >= total:
            raise ValueError(f"val_size={self.val_size} must be smaller than the {total} training examples")
        train_idx, val_idx = random_split_indices(total, (total - self.val_size, self.val_size), self.seed)
        self.split_indices = {"train": train_idx, "val": val_idx}
        return Subset(train_full, train_idx.tolist()), Subset(val_full, val_idx.tolist()), test_set


class _MNISTFamily(TorchvisionDataModule):
    image_shape = (1, 28, 28)
    class_count = 10

    def expected_files(self) -> tuple[str, list[str]]:
        # torchvision reads the uncompressed files from <root>/<ClassName>/raw.
        directory = os.path.join(self.root, self.dataset_class.__name__, "raw")
        names = [os.path.splitext(name)[0] for name, _ in self.dataset_class.resources]
        return directory, names


class _CIFARFamily(TorchvisionDataModule):
    image_shape = (3, 32, 32)

    def expected_files(self) -> tuple[str, list[str]]:
        cls = self.dataset_class
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return os.path.join(self.root, cls.base_folder), names

    def train_augmentation(self) -> list[Callable]:
        """Random 32x32 crops of the image padded by 4 pixels, and horizontal flips."""
        return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]


class MNISTDataModule(_MNISTFamily):
    """MNIST handwritten digits: 60,000 training and 10,000 test images, 1x28x28, 10 classes.

    Needs ``<root>/MNIST/raw/`` with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (uncompressed). Normalised with
    mean 0.1307 and std 0.3081. No augmentation is defined, so ``augment`` has no effect.
    """

    dataset_class = torchvision.datasets.MNIST
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(_MNISTFamily):
    """Fashion-MNIST clothing images: 60,000 training and 10,000 test, 1x28x28, 10 classes.

    Needs ``<root>/FashionMNIST/raw/`` with the same four uncompressed file names as MNIST.
    Normalised with mean 0.2860 and std 0.3530. No augmentation is defined, so ``augment``
    has no effect.
    """

    dataset_class = torchvision.datasets.FashionMNIST
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(_CIFARFamily):
    """CIFAR-10: 50,000 training and 10,000 test colour images, 3x32x32, 10 classes.

    Needs ``<root>/cifar-10-batches-py/`` with ``data_batch_1`` to ``data_batch_5``,
    ``test_batch`` and ``batches.meta`` (the extracted python version of the data set).
    ``augment`` adds random crops (padding 4) and horizontal flips to the training split.
    """

    dataset_class = torchvision.datasets.CIFAR10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    class_count = 10


class CIFAR100DataModule(_CIFARFamily):
    """CIFAR-100: 50,000 training and 10,000 test colour images, 3x32x32, 100 (fine) classes.

    Needs ``<root>/cifar-100-python/`` with ``train``, ``test`` and ``meta`` (the extracted
    python version of the data set). ``augment`` adds random crops (padding 4) and horizontal
    flips to the training split.
    """

    dataset_class = torchvision.datasets.CIFAR100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    class_count = 100
