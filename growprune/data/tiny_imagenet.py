"""Tiny-ImageNet (200 classes of 64x64 colour images) from its extracted folder tree."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader, is_image_file

from growprune.data.base import GrowPruneDataModule, check_int, random_split_indices

EXPECTED_LAYOUT = (
    "expected <root>/train/<wnid>/images/*.JPEG (or <root>/train/<wnid>/*.JPEG) and either "
    "<root>/val/images/*.JPEG with <root>/val/val_annotations.txt or <root>/val/<wnid>/*.JPEG"
)

# Per-channel statistics of the Tiny-ImageNet training images.
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)


def _images_in(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if is_image_file(f))


def _class_dirs(directory: str) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir())


class ImageList(Dataset):
    """``(path, class index)`` pairs loaded with PIL as RGB and passed through ``transform``."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


class TinyImageNetDataModule(GrowPruneDataModule):
    """Tiny-ImageNet read from the extracted ``tiny-imagenet-200/`` folder (no download).

    Classes are the folders under ``<root>/train`` (200 WordNet ids), numbered in sorted
    order. ``val_size`` training images, chosen by ``seed``, form the validation split. The
    official ``val/`` set serves as the **test** split, because the labels of Tiny-ImageNet's
    ``test/`` images are not public. ``val/`` may use the original layout (``val/images/`` plus
    the tab-separated ``val/val_annotations.txt``: file name, wnid, ...) or one folder per
    class (``val/<wnid>/``).

    Args:
        root: The ``tiny-imagenet-200`` directory.
        batch_size: Examples per batch.
        num_workers: Worker processes per data loader (0 loads in the main process).
        seed: Seed of the train/validation split and of the training-set shuffling.
        val_size: Training images held out for validation.
        augment: Random crops (padding ``image_size // 8``) and horizontal flips of the
            training split.
        image_size: Side of the square images fed to the model (images are resized to it).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_size: int = 5000,
        augment: bool = True,
        image_size: int = 64,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_int("val_size", val_size, 1)
        check_int("image_size", image_size, 1)
        self.save_hyperparameters()
        self.root = os.path.abspath(os.path.expanduser(root))
        train_dir = os.path.join(self.root, "train")
        if not os.path.isdir(train_dir):
            missing = train_dir if os.path.isdir(self.root) else self.root
            raise FileNotFoundError(f"Tiny-ImageNet folder not found: {missing}; {EXPECTED_LAYOUT}")
        self.wnids = _class_dirs(train_dir)
        if not self.wnids:
            raise FileNotFoundError(f"no class folders in {train_dir}; {EXPECTED_LAYOUT}")
        self.val_size = val_size
        self.augment = augment
        self.image_size = image_size

    @property
    def num_classes(self) -> int:
        """Number of class folders under ``<root>/train``."""
        return len(self.wnids)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)

    def _train_samples(self) -> list[tuple[str, int]]:
        samples = []
        for label, wnid in enumerate(self.wnids):
            class_dir = os.path.join(self.root, "train", wnid)
            images_dir = os.path.join(class_dir, "images")
            samples += [(p, label) for p in _images_in(images_dir if os.path.isdir(images_dir) else class_dir)]
        return samples

    def _official_val_samples(self) -> list[tuple[str, int]]:
        val_dir = os.path.join(self.root, "val")
        annotations = os.path.join(val_dir, "val_annotations.txt")
        index = {wnid: i for i, wnid in enumerate(self.wnids)}
        if os.path.isfile(annotations):
            samples = []
            with open(annotations) as f:
                for line in f:
                    if not line.strip():
                        continue
                    filename, wnid = line.split("\t")[:2]
                    if wnid not in index:
                        raise ValueError(f"{annotations}: class {wnid!r} of {filename} has no folder in train/")
                    samples.append((os.path.join(val_dir, "images", filename), index[wnid]))
            return samples
        if not os.path.isdir(val_dir):
            raise FileNotFoundError(f"Tiny-ImageNet val folder not found: {val_dir}; {EXPECTED_LAYOUT}")
        samples = []
        for wnid in _class_dirs(val_dir):
            if wnid not in index:
                raise ValueError(f"{os.path.join(val_dir, wnid)}: class {wnid!r} has no folder in train/")
            samples += [(p, index[wnid]) for p in _images_in(os.path.join(val_dir, wnid))]
        return samples

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Index the image files and split the training images by ``seed``."""
        size = self.image_size
        to_model = [T.Resize((size, size)), T.ToTensor(), T.Normalize(MEAN, STD)]
        augmentation = [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()] if self.augment else []
        # Resize before cropping so the crop works on images of the final size.
        train_transform = T.Compose(to_model[:1] + augmentation + to_model[1:])
        eval_transform = T.Compose(to_model)

        train_samples = self._train_samples()
        total = len(train_samples)
        if self.val_size >= total:
            raise ValueError(f"val_size={self.val_size} must be smaller than the {total} training images")
        train_idx, val_idx = random_split_indices(total, (total - self.val_size, self.val_size), self.seed)
        self.split_indices = {"train": train_idx, "val": val_idx}
        train_set = Subset(ImageList(train_samples, train_transform), train_idx.tolist())
        val_set = Subset(ImageList(train_samples, eval_transform), val_idx.tolist())
        test_set = ImageList(self._official_val_samples(), eval_transform)
        return train_set, val_set, test_set
