"""Whole splits as tensors and n images per class (growprune.evolution.data)."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from growprune.data import DigitsDataModule
from growprune.evolution.data import images_per_class, tensors


class PairList(Dataset):
    """A map-style data set that builds every sample on access (no stacked tensors to reuse)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return torch.full((2, 3), float(index)), index % 3


def test_tensors_stacks_a_dataset_and_a_shuffling_loader_in_index_order():
    inputs, targets = tensors(PairList(7))
    assert inputs.shape == (7, 2, 3) and targets.dtype == torch.int64
    assert [float(x[0, 0]) for x in inputs] == [0, 1, 2, 3, 4, 5, 6]
    assert targets.tolist() == [0, 1, 2, 0, 1, 2, 0]
    loader = DataLoader(PairList(7), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
    loaded_inputs, loaded_targets = tensors(loader)
    assert torch.equal(loaded_inputs, inputs) and torch.equal(loaded_targets, targets)


def test_tensors_of_the_digits_training_split_are_its_samples():
    data = DigitsDataModule(batch_size=50)
    data.setup()
    inputs, targets = tensors(data.train_dataloader())
    assert inputs.shape == (len(data.train_set), 1, 8, 8)
    for index in (0, 17, len(data.train_set) - 1):  # sample by sample, as the data set hands them out
        image, label = data.train_set[index]
        assert torch.equal(inputs[index], image) and int(targets[index]) == int(label)


def test_tensors_refuses_empty_and_non_pairs():
    with pytest.raises(ValueError, match="empty"):
        tensors(TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"sample 0 is a tuple of 1, not an \(input, target\) pair"):
        tensors(TensorDataset(torch.zeros(3, 2)))
    with pytest.raises(TypeError, match="Dataset or DataLoader"):
        tensors([(torch.zeros(2), 0)])


def labelled(counts: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose single feature is the sample's index, so drawn samples can be traced back."""
    labels = torch.tensor([label for label, count in counts.items() for _ in range(count)])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    labels = labels[order]
    return torch.arange(len(labels), dtype=torch.float32).unsqueeze(1), labels


def test_images_per_class_draws_n_distinct_samples_of_each_class_in_class_order():
    inputs, targets = labelled({0: 5, 1: 9, 4: 3})
    chosen_inputs, chosen_targets = images_per_class(inputs, targets, 3, torch.Generator().manual_seed(3))
    assert chosen_targets.tolist() == [0, 0, 0, 1, 1, 1, 4, 4, 4]
    indices = chosen_inputs[:, 0].long()
    assert len(set(indices.tolist())) == 9  # without replacement
    assert torch.equal(targets[indices], chosen_targets)  # each input still carries its own label


def test_images_per_class_is_fixed_by_the_generator_seed_and_varies_with_it():
    inputs, targets = labelled({0: 30, 1: 30, 2: 30})
    first = images_per_class(inputs, targets, 4, torch.Generator().manual_seed(11))
    again = images_per_class(inputs, targets, 4, torch.Generator().manual_seed(11))
    other = images_per_class(inputs, targets, 4, torch.Generator().manual_seed(12))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_images_per_class_of_the_whole_class_is_a_permutation_of_it():
    inputs, targets = labelled({0: 4, 1: 6})
    chosen_inputs, _ = images_per_class(inputs, targets, 4, torch.Generator().manual_seed(0))
    assert sorted(chosen_inputs[:4, 0].long().tolist()) == sorted(torch.nonzero(targets == 0)[:, 0].tolist())


def test_images_per_class_refuses_short_classes_and_bad_counts_naming_them():
    inputs, targets = labelled({0: 5, 1: 2, 2: 1})
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(ValueError, match=r"3 samples per class asked but class 1 has 2, class 2 has 1"):
        images_per_class(inputs, targets, 3, generator)
    assert torch.equal(generator.get_state(), state)  # refused before drawing anything
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
            images_per_class(inputs, targets, bad, generator)
    with pytest.raises(ValueError, match="inputs hold 8 samples but targets 7"):
        images_per_class(inputs, targets[:7], 1, generator)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        images_per_class(inputs, targets.float(), 1, generator)
