"""Scoring batches come from their own loader: pruning must not disturb the training data stream."""

import random
import types

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from growprune import GrowPruneModule
from growprune.criteria import GradientCriterion
from growprune.schedules import Linear, OneShot
from growprune.scoring import scoring_batches
from growprune.strategies import NNReliefPruning, UnstructuredPruning
from tests.helpers import tiny_data, tiny_trainer


# ------------------------------------------------------------------------------------ helpers
def row_ids(inputs: torch.Tensor) -> list[bytes]:
    """One id per sample: the bytes of its input row (synthetic samples are all distinct)."""
    return [row.numpy().tobytes() for row in inputs.detach().cpu().flatten(1)]


class RecordSamples(Callback):
    """Records, per training epoch, the ids of the samples the training steps receive, in order."""

    def __init__(self):
        self.epochs: dict[int, list[bytes]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).extend(row_ids(batch[0]))


def positions(ids: list[bytes], dataset: TensorDataset) -> list[int]:
    """The training-set index of each recorded sample (readable failure messages)."""
    index = {sample: i for i, sample in enumerate(row_ids(dataset.tensors[0]))}
    return [index[sample] for sample in ids]


def lenet():
    return GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8),
                           optimizer=lambda params: torch.optim.SGD(params, lr=0.05))


def fake_trainer(loader):
    """Just what scoring_batches reads from a trainer whose training data is set up."""
    return types.SimpleNamespace(train_dataloader=loader)


def numbered(n: int, width: int = 3) -> TensorDataset:
    """Sample i has inputs filled with i and target i: batches show which samples they hold."""
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, width), torch.arange(n))


def shuffled_loader(dataset, batch_size=4, seed=0, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed), **kwargs)


def flat(batches) -> list[int]:
    return [int(t) for _, targets in batches for t in targets]


# ------------------------------------------------------------------------ training untouched
def test_step_unit_scoring_with_persistent_workers_keeps_every_epoch_a_permutation(tmp_path):
    # 48 training samples in 6 batches of 8; 2 persistent workers; a gradient criterion scoring
    # before each of steps 1..6 (in on_train_batch_start, in the middle of epoch 0)
    data = tiny_data(num_samples=80, batch_size=8, num_workers=2)
    recorder = RecordSamples()
    strategy = UnstructuredPruning(schedule=Linear(amount=0.5, start=1, end=6, every=1, unit="step"),
                                   criterion=GradientCriterion(), scoring_batches=2, verbose=False)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[strategy, recorder])
    trainer.fit(lenet(), data)
    assert len(strategy.history) == 6
    assert len(set(row_ids(data.train_set.tensors[0]))) == 48
    for epoch in (0, 1):
        seen = positions(recorder.epochs[epoch], data.train_set)
        repeated = len(seen) - len(set(seen))
        missing = 48 - len(set(seen))
        assert sorted(seen) == list(range(48)), (
            f"epoch {epoch} saw {len(seen)} samples, {len(set(seen))} distinct: {repeated} repeated, {missing} missing"
        )


@pytest.mark.parametrize(
    "make_strategy",
    [
        lambda: UnstructuredPruning(OneShot(amount=0.5, at=1), criterion=GradientCriterion(), scoring_batches=2, verbose=False),
        lambda: NNReliefPruning(iterations=2, every=1, pruning_samples=20, verbose=False),
    ],
    ids=["gradient", "nnrelief"],
)
def test_epoch_unit_scoring_keeps_the_training_order_of_the_dense_run(tmp_path, make_strategy):
    orders = []
    for strategies in ([], [make_strategy()]):
        recorder = RecordSamples()
        trainer = tiny_trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[*strategies, recorder])
        data = tiny_data(num_samples=80, batch_size=16)
        trainer.fit(lenet(), data)
        assert all(strategy.history for strategy in strategies)
        orders.append({epoch: positions(ids, data.train_set) for epoch, ids in recorder.epochs.items()})
    dense, pruned = orders
    assert sorted(dense) == sorted(pruned) == [0, 1, 2]
    for epoch in dense:
        assert pruned[epoch] == dense[epoch], f"epoch {epoch}: the pruned run saw the training data in another order"


class CheckScoringLeavesTrainingAlone(Callback):
    """Draws scoring batches at the start of the epoch and checks every random state is unchanged."""

    def __init__(self):
        self.checked = False

    def on_train_epoch_start(self, trainer, pl_module):
        loader = trainer.train_dataloader
        before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), loader.generator.get_state())
        batches = scoring_batches(trainer, batches=2, seed=3)
        after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), loader.generator.get_state())
        assert len(batches) == 2
        assert torch.equal(before[0], after[0]), "the global torch RNG moved"
        assert np.array_equal(before[1], after[1]), "the global numpy RNG moved"
        assert before[2] == after[2], "the global random RNG moved"
        assert torch.equal(before[3], after[3]), "the training loader's generator moved"
        self.checked = True


def test_scoring_in_a_fit_leaves_the_global_rngs_and_the_training_generator_alone(tmp_path):
    check = CheckScoringLeavesTrainingAlone()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[check])
    trainer.fit(lenet(), tiny_data(num_samples=80, batch_size=16))
    assert check.checked


class NoisyDataset(Dataset):
    """A transform that draws from all three global RNGs, as augmentations in the main process do."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        noise = torch.rand(2) + float(np.random.rand()) + random.random()
        return noise + index, index


def test_data_transforms_draw_without_moving_the_global_rngs():
    loader = shuffled_loader(NoisyDataset())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    generator_state = loader.generator.get_state()
    batches = scoring_batches(fake_trainer(loader), samples=7)
    assert flat(batches) and len(flat(batches)) == 7
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert torch.equal(loader.generator.get_state(), generator_state)


class CheckBeforeTrainingData(Callback):
    """In on_fit_start the training loader does not exist yet: scoring reads the data module."""

    def __init__(self):
        self.batches = None

    def on_fit_start(self, trainer, pl_module):
        assert trainer.train_dataloader is None
        self.batches = scoring_batches(trainer, samples=10, seed=0)
        # the training loader was not set up (nor its iterator or workers) by scoring
        assert trainer.train_dataloader is None


def test_before_the_training_loader_exists_scoring_uses_the_data_module(tmp_path):
    check = CheckBeforeTrainingData()
    data = tiny_data(num_samples=80, batch_size=4)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[check])
    trainer.fit(lenet(), data)
    assert [len(inputs) for inputs, _ in check.batches] == [4, 4, 2]
    training_set = set(row_ids(data.train_set.tensors[0]))
    assert set(row_ids(torch.cat([inputs for inputs, _ in check.batches]))) <= training_set


# ------------------------------------------------------------------------- scoring_batches
def test_samples_are_exact_with_the_last_batch_cut():
    trainer = fake_trainer(shuffled_loader(numbered(10), batch_size=4))
    batches = scoring_batches(trainer, samples=7)
    assert [len(inputs) for inputs, _ in batches] == [4, 3]
    assert [len(targets) for _, targets in batches] == [4, 3]
    assert len(set(flat(batches))) == 7  # drawn without replacement
    for inputs, targets in batches:
        assert torch.equal(inputs[:, 0].long(), targets)  # inputs and targets stay paired after the cut
    assert [len(inputs) for inputs, _ in scoring_batches(trainer, samples=8)] == [4, 4]
    # a data set smaller than asked for gives all of it, once
    everything = scoring_batches(trainer, samples=25)
    assert [len(inputs) for inputs, _ in everything] == [4, 4, 2]
    assert sorted(flat(everything)) == list(range(10))


def test_batches_counts_whole_batches_of_the_training_batch_size():
    trainer = fake_trainer(shuffled_loader(numbered(10), batch_size=3))
    assert [len(inputs) for inputs, _ in scoring_batches(trainer, batches=2)] == [3, 3]
    assert [len(inputs) for inputs, _ in scoring_batches(trainer, batches=9)] == [3, 3, 3, 1]


def test_same_seed_same_batches_other_seed_other_batches():
    trainer = fake_trainer(shuffled_loader(numbered(40), batch_size=4))
    first = flat(scoring_batches(trainer, samples=12, seed=5))
    assert flat(scoring_batches(trainer, samples=12, seed=5)) == first
    # independent of the global RNG and of the training loader's own shuffling
    torch.manual_seed(123)
    other_trainer = fake_trainer(shuffled_loader(numbered(40), batch_size=4, seed=99))
    assert flat(scoring_batches(other_trainer, samples=12, seed=5)) == first
    assert flat(scoring_batches(trainer, samples=12, seed=6)) != first
    assert first != list(range(12))  # shuffled, not the data set's first samples


def test_uses_the_training_collate_fn_and_ignores_extra_batch_elements():
    def collate(items):
        inputs = torch.stack([x for x, _ in items])
        targets = torch.stack([y for _, y in items])
        return inputs * 10, targets, {"extra": "kept out"}

    trainer = fake_trainer(shuffled_loader(numbered(6), batch_size=4, collate_fn=collate))
    batches = scoring_batches(trainer, samples=6)
    for inputs, targets in batches:
        assert torch.equal(inputs[:, 0].long(), targets * 10)
    assert all(len(batch) == 2 for batch in batches)


def test_device_placement():
    trainer = fake_trainer(shuffled_loader(numbered(6)))
    assert all(inputs.device.type == "cpu" and targets.device.type == "cpu"
               for inputs, targets in scoring_batches(trainer, batches=1))
    moved = scoring_batches(trainer, batches=2, device=torch.device("meta"))
    assert all(inputs.device.type == "meta" and targets.device.type == "meta" for inputs, targets in moved)


class Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter([(torch.full((2,), float(i)), torch.tensor(i)) for i in range(self.n)])


def test_iterable_dataset_gives_its_first_items():
    loader = DataLoader(Stream(10), batch_size=4)
    batches = scoring_batches(fake_trainer(loader), samples=6, seed=7)
    assert flat(batches) == [0, 1, 2, 3, 4, 5]
    assert [len(inputs) for inputs, _ in batches] == [4, 2]


def test_works_with_workers_without_touching_the_training_workers():
    loader = shuffled_loader(numbered(8), batch_size=4, num_workers=1, persistent_workers=True)
    batches = scoring_batches(fake_trainer(loader), samples=5)
    assert len(flat(batches)) == 5
    assert loader._iterator is None  # no worker iterator was created on the training loader


class Dicts(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"image": torch.zeros(2), "label": index}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of samples= or batches="),
        ({"samples": 4, "batches": 1}, "exactly one of samples= or batches="),
        ({"samples": 0}, "samples must be an integer >= 1, got 0"),
        ({"batches": -1}, "batches must be an integer >= 1, got -1"),
        ({"samples": 2.5}, "samples must be an integer >= 1, got 2.5"),
        ({"batches": True}, "batches must be an integer >= 1, got True"),
    ],
)
def test_count_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scoring_batches(fake_trainer(shuffled_loader(numbered(6))), **kwargs)


def test_no_training_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        scoring_batches(tiny_trainer(tmp_path), batches=1)


def test_empty_data_sets_are_errors():
    with pytest.raises(ValueError, match="training data set is empty"):
        scoring_batches(fake_trainer(DataLoader(numbered(0), batch_size=4)), batches=1)
    with pytest.raises(ValueError, match="gave no samples"):
        scoring_batches(fake_trainer(DataLoader(Stream(0), batch_size=4)), samples=3)


@pytest.mark.parametrize(
    "loader, found",
    [
        (DataLoader(Dicts(), batch_size=2), r"dict with keys \['image', 'label'\]"),
        (DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2), r"list of 1 element \(Tensor\)"),
        (DataLoader(torch.zeros(4, 2), batch_size=2), "Tensor"),
        (DataLoader([(torch.zeros(2), "cat")] * 4, batch_size=2), r"list of 2 elements \(Tensor, tuple\)"),
    ],
    ids=["dict", "one-element", "tensor", "string-targets"],
)
def test_batches_that_are_not_inputs_and_targets_are_named_in_the_error(loader, found):
    with pytest.raises(ValueError, match=f"first two elements.*\\(inputs, targets\\).*got a {found}"):
        scoring_batches(fake_trainer(loader), batches=1)


def test_a_training_iterable_that_is_not_a_dataloader_is_an_error():
    with pytest.raises(ValueError, match="needs a torch DataLoader.*got list"):
        scoring_batches(fake_trainer([(torch.zeros(2, 2), torch.zeros(2))]), batches=1)
