"""Tests of growprune.data: every data module on tiny fake files, offline."""

from __future__ import annotations

import gzip
import pickle
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import growprune.data as data
from growprune.data import (
    DATAMODULES,
    CIFAR10DataModule,
    DigitsDataModule,
    GrowPruneDataModule,
    IdxDataModule,
    MNISTDataModule,
    SyntheticDataModule,
    TinyImageNetDataModule,
    create_datamodule,
    list_datamodules,
    register_datamodule,
)
from growprune.data.torchvision_sets import DOWNLOAD_TIMEOUT_S

REAL_MNIST = Path("/work/shared/data/mnist-t10k")


# ---------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, dtype_code: int = 0x08, compress: bool = False) -> Path:
    """Write ``array`` as an idx file: 2 zero bytes, dtype code, ndim, big-endian dims, data."""
    header = bytes([0, 0, dtype_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def fake_idx_pair(tmp_path: Path, n: int = 50, size: int = 6, compress: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % 4).astype(np.uint8)  # classes 0..3
    suffix = ".gz" if compress else ""
    return (
        write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images, compress=compress),
        write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", labels, compress=compress),
        images,
        labels,
    )


def make_fake_mnist(root: Path, n_train: int = 64, n_test: int = 32) -> None:
    raw = root / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


def make_fake_cifar10(root: Path, per_batch: int = 12, n_test: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    for i, n in enumerate([per_batch] * 5 + [n_test]):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [j % 10 for j in range(n)]}
        dump(f"data_batch_{i + 1}" if i < 5 else "test_batch", batch)
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})


def make_tiny_imagenet(root: Path, val_layout: str, wnids=("n02", "n01", "n03"), per_class: int = 4) -> Path:
    """A tiny Tiny-ImageNet tree; the first class uses the flat ``train/<wnid>/*.JPEG`` layout."""
    rng = np.random.default_rng(0)

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)

    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / ("" if k == 0 else "images")
        for i in range(per_class):
            image(folder / f"{wnid}_{i}.{'JPEG' if i % 2 else 'png'}")
    val = root / "val"
    annotations = []
    for i, wnid in enumerate(wnids * 2):
        name = f"val_{i}.JPEG"
        if val_layout == "annotations":
            image(val / "images" / name)
            annotations.append(f"{name}\t{wnid}\t0\t0\t8\t8\n")
        else:
            image(val / wnid / name)
    if annotations:
        (val / "val_annotations.txt").write_text("".join(annotations))
    return root


def all_labels(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


# ---------------------------------------------------------------- digits


def test_digits_shapes_splits_and_determinism():
    dm = DigitsDataModule(batch_size=32, seed=3)
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)  # known before setup
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes == [1257, 270, 270]
    idx = dm.split_indices
    union = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert sorted(union.tolist()) == list(range(1797))  # disjoint and complete

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    train_x = dm.train_set.tensors[0]
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-3
    assert set(dm.train_set.tensors[1].tolist()) == set(range(10))

    train_set = dm.train_set
    dm.setup("test")  # idempotent: no re-splitting
    assert dm.train_set is train_set

    same = DigitsDataModule(batch_size=32, seed=3)
    same.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(same.split_indices[split], idx[split])
    # Shuffling is seeded too: a fresh module yields the same first batch.
    assert torch.equal(next(iter(same.train_dataloader()))[1], y)

    other = DigitsDataModule(batch_size=32, seed=4)
    other.setup()
    assert not torch.equal(other.split_indices["val"], idx["val"])


def test_digits_resize_to_28():
    dm = DigitsDataModule(image_size=28, batch_size=16)
    assert dm.input_shape == (1, 28, 28)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)


def test_digits_without_test_fraction_tests_on_validation():
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.0)
    dm.setup()
    assert dm.test_set is dm.val_set and len(dm.train_set) + len(dm.val_set) == 1797


# ---------------------------------------------------------------- idx


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_fake_files(tmp_path, compress):
    images_path, labels_path, images, labels = fake_idx_pair(tmp_path, n=50, size=6, compress=compress)
    dm = IdxDataModule(str(images_path), str(labels_path), batch_size=8, val_fraction=0.2, test_fraction=0.2)
    assert dm.num_classes == 4 and dm.input_shape == (1, 6, 6)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64

    # Example i of the val split is file example split_indices["val"][i], normalised.
    i = int(dm.split_indices["val"][0])
    train_pixels = torch.from_numpy(images[dm.split_indices["train"].numpy()]).float() / 255
    expected = (torch.from_numpy(images[i]).float() / 255 - train_pixels.mean()) / train_pixels.std()
    got_x, got_y = dm.val_set[0]
    assert torch.allclose(got_x[0], expected, atol=1e-5) and int(got_y) == labels[i]


def test_idx_options(tmp_path):
    images_path, labels_path, images, _ = fake_idx_pair(tmp_path, n=40)
    dm = IdxDataModule(str(images_path), str(labels_path), num_classes=7, normalize=False)
    assert dm.num_classes == 7
    dm.setup()
    assert dm.test_set is dm.val_set  # test_fraction=0 tests on the validation split
    x, _ = dm.train_set[0]
    assert torch.allclose(x[0], torch.from_numpy(images[int(dm.split_indices["train"][0])]).float() / 255)

    too_few = IdxDataModule(str(images_path), str(labels_path), num_classes=2)
    with pytest.raises(ValueError, match="num_classes is 2"):
        too_few.setup()


def test_idx_missing_file_names_path(tmp_path):
    images_path, _, _, _ = fake_idx_pair(tmp_path)
    missing = tmp_path / "nowhere" / "labels-idx1-ubyte"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        IdxDataModule(str(images_path), str(missing))


def test_idx_count_mismatch(tmp_path):
    images_path, _, _, _ = fake_idx_pair(tmp_path, n=20)
    labels_path = write_idx(tmp_path / "short-labels", np.zeros(19, dtype=np.uint8))
    with pytest.raises(ValueError, match="20 images but .* 19 labels"):
        IdxDataModule(str(images_path), str(labels_path))


def test_idx_bad_headers(tmp_path):
    images_path, labels_path, _, _ = fake_idx_pair(tmp_path)
    with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
        IdxDataModule(str(labels_path), str(labels_path))  # labels file given as images
    float_images = write_idx(tmp_path / "float-images", np.zeros((50, 4, 4)), dtype_code=0x0D)
    with pytest.raises(ValueError, match="element type 0x0d is not supported"):
        IdxDataModule(str(float_images), str(labels_path))
    not_idx = tmp_path / "image.png"
    not_idx.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    with pytest.raises(ValueError, match="not an idx file"):
        IdxDataModule(str(not_idx), str(labels_path))


@pytest.mark.skipif(not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="real MNIST t10k files absent")
def test_idx_real_mnist_t10k():
    dm = IdxDataModule(
        str(REAL_MNIST / "t10k-images-idx3-ubyte.gz"), str(REAL_MNIST / "t10k-labels-idx1-ubyte.gz"), val_fraction=0.2
    )
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (8000, 2000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and 0 <= int(y.min()) and int(y.max()) <= 9


# ---------------------------------------------------------------- torchvision data sets


def test_mnist_fake_files(tmp_path):
    make_fake_mnist(tmp_path)
    dm = MNISTDataModule(root=str(tmp_path), val_size=16, batch_size=8, seed=1)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (48, 16, 32)
    train_idx, val_idx = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(64))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64

    again = MNISTDataModule(root=str(tmp_path), val_size=16, seed=1)
    again.setup()
    assert again.val_set.indices == dm.val_set.indices
    other = MNISTDataModule(root=str(tmp_path), val_size=16, seed=2)
    other.setup()
    assert other.val_set.indices != dm.val_set.indices


def test_cifar10_fake_files(tmp_path, monkeypatch):
    # The fake pickles cannot match the real md5 sums; torchvision's own tests patch this too.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    make_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=10, batch_size=5)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64

    # Validation images are never augmented; training images are.
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    torch.manual_seed(0)
    draws = [dm.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = CIFAR10DataModule(root=str(tmp_path), val_size=10, augment=False)
    plain.setup()
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


@pytest.mark.parametrize(
    "cls, folder, files",
    [
        (MNISTDataModule, "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        (CIFAR10DataModule, "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]),
    ],
)
def test_missing_torchvision_files_message(tmp_path, cls, folder, files):
    dm = cls(root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str(tmp_path / folder) in message and "download=True" in message
    for name in files:
        assert name in message


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    timeouts = []

    def offline_urlopen(*args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline_urlopen)
    before = socket.getdefaulttimeout()
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message and "simulated: no network" in message
    assert timeouts and all(t == DOWNLOAD_TIMEOUT_S for t in timeouts)  # bounded while downloading
    assert socket.getdefaulttimeout() == before  # and restored afterwards


def test_torchvision_val_size_too_large(tmp_path):
    make_fake_mnist(tmp_path)
    with pytest.raises(ValueError, match="val_size=64"):
        MNISTDataModule(root=str(tmp_path), val_size=64).setup()


# ---------------------------------------------------------------- Tiny-ImageNet


@pytest.mark.parametrize("val_layout", ["annotations", "folders"])
def test_tiny_imagenet_fake_tree(tmp_path, val_layout):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200", val_layout)
    dm = TinyImageNetDataModule(root=str(root), val_size=3, batch_size=4, image_size=8)
    assert dm.num_classes == 3 and dm.input_shape == (3, 8, 8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 6)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    # Classes are numbered in sorted wnid order: n01 -> 0, n02 -> 1, n03 -> 2.
    assert sorted(all_labels(dm.test_set)) == [0, 0, 1, 1, 2, 2]
    assert all_labels(dm.train_set.dataset).count(1) == 4  # flat layout class n02 found too
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_tiny_imagenet_annotation_labels(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny", "annotations")
    dm = TinyImageNetDataModule(root=str(root), val_size=2, image_size=16)
    dm.setup()
    by_name = {Path(p).name: label for p, label in dm.test_set.samples}
    # val_i belongs to wnids[i % 3] = ("n02", "n01", "n03") -> labels (1, 0, 2)
    assert [by_name[f"val_{i}.JPEG"] for i in range(6)] == [1, 0, 2, 1, 0, 2]
    assert dm.test_set[0][0].shape == (3, 16, 16)


def test_tiny_imagenet_missing_root(tmp_path):
    missing = tmp_path / "tiny-imagenet-200"
    with pytest.raises(FileNotFoundError, match=str(missing)) as info:
        TinyImageNetDataModule(root=str(missing))
    assert "train/<wnid>/images" in str(info.value)


# ---------------------------------------------------------------- synthetic


def test_synthetic_determinism_and_shapes():
    kwargs = dict(num_samples=100, input_shape=(3, 4, 4), num_classes=5, batch_size=10)
    a, b, c = SyntheticDataModule(**kwargs), SyntheticDataModule(**kwargs), SyntheticDataModule(**kwargs, seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert a.input_shape == (3, 4, 4) and a.num_classes == 5
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (60, 20, 20)
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (10, 3, 4, 4) and y.dtype == torch.int64


def test_synthetic_is_learnable_by_nearest_class_mean():
    dm = SyntheticDataModule(num_samples=400, num_classes=4, noise=0.5)
    dm.setup()
    x_train, y_train = dm.train_set.tensors
    means = torch.stack([x_train[y_train == k].mean(0) for k in range(4)]).flatten(1)
    x_val, y_val = dm.val_set.tensors
    predicted = torch.cdist(x_val.flatten(1), means).argmin(1)
    assert (predicted == y_val).float().mean() > 0.9


class _TinyClassifier(pl.LightningModule):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), num_classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_with_a_datamodule(tmp_path):
    dm = SyntheticDataModule(num_samples=64, batch_size=16)
    model = _TinyClassifier(dm.input_shape, dm.num_classes)
    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished and dm.train_set is not None


# ---------------------------------------------------------------- registry and validation


def test_registry():
    assert list_datamodules() == sorted(
        ["digits", "idx", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "synthetic"]
    )
    assert all(issubclass(cls, GrowPruneDataModule) for cls in DATAMODULES.values())
    dm = create_datamodule("synthetic", num_samples=50, num_classes=3)
    assert isinstance(dm, SyntheticDataModule) and dm.num_classes == 3
    with pytest.raises(ValueError) as info:
        create_datamodule("imagenet")
    assert "'imagenet'" in str(info.value)
    for name in list_datamodules():
        assert name in str(info.value)


def test_register_datamodule(monkeypatch):
    monkeypatch.setattr(data, "DATAMODULES", dict(DATAMODULES))

    @register_datamodule("my_synthetic")
    class MySynthetic(SyntheticDataModule):
        pass

    assert "my_synthetic" in data.list_datamodules()
    assert isinstance(data.create_datamodule("my_synthetic"), MySynthetic)
    with pytest.raises(ValueError, match="already registered"):
        register_datamodule("digits")(MySynthetic)
    with pytest.raises(TypeError):
        register_datamodule("not_a_module")(dict)


@pytest.mark.parametrize(
    "cls, kwargs, argument",
    [
        (DigitsDataModule, {"val_fraction": 1.5}, "val_fraction"),
        (DigitsDataModule, {"test_fraction": -0.1}, "test_fraction"),
        (DigitsDataModule, {"val_fraction": 0.6, "test_fraction": 0.4}, "val_fraction \\+ test_fraction"),
        (DigitsDataModule, {"batch_size": 0}, "batch_size"),
        (DigitsDataModule, {"image_size": 0}, "image_size"),
        (DigitsDataModule, {"num_workers": -1}, "num_workers"),
        (SyntheticDataModule, {"noise": -1.0}, "noise"),
        (SyntheticDataModule, {"input_shape": ()}, "input_shape"),
        (SyntheticDataModule, {"num_samples": 2}, "too few"),
        (MNISTDataModule, {"val_size": 0}, "val_size"),
        (TinyImageNetDataModule, {"root": ".", "image_size": 0}, "image_size"),
    ],
)
def test_bad_arguments_name_the_argument(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(**kwargs)


def test_idx_bad_num_classes(tmp_path):
    images_path, labels_path, _, _ = fake_idx_pair(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        IdxDataModule(str(images_path), str(labels_path), num_classes=0)
    with pytest.raises(ValueError, match="val_fraction"):
        IdxDataModule(str(images_path), str(labels_path), val_fraction=0.0)


def test_no_global_rng_use():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    dm = SyntheticDataModule(num_samples=64)
    dm.setup()
    DigitsDataModule().setup()
    assert torch.equal(torch.get_rng_state(), state)
