"""Data for the evolutionary loop: whole splits as tensors, and n images per class.

Evaluating a population means running hundreds of candidates over the same samples, so the
evaluator and the PBT retraining take plain ``(inputs, targets)`` tensors instead of data
loaders: :func:`tensors` stacks a data set once, :func:`images_per_class` draws the
"n images of every class" subsets the pruning studies retrain on.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset


def tensors(dataset: Dataset | DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of a data set (or of a data loader's data set), stacked into ``(inputs, targets)``.

    A :class:`~torch.utils.data.DataLoader` contributes its ``dataset`` in index order (not the
    loader's shuffled batch order, so the result does not depend on the loader's sampler or
    consume its random generator); an iterable data set is read in its own order. Samples are
    ``(input, target)`` pairs; integer targets become an ``int64`` tensor.

    Raises:
        ValueError: the data set is empty or a sample is not an ``(input, target)`` pair.
        TypeError: ``dataset`` is neither a Dataset nor a DataLoader.
    """
    if isinstance(dataset, DataLoader):
        dataset = dataset.dataset
    if not isinstance(dataset, Dataset):
        raise TypeError(f"tensors needs a torch Dataset or DataLoader, got {type(dataset).__name__}")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors  # already stacked: no copy, no per-sample loop
        if len(targets) == 0:
            raise ValueError("tensors: the data set is empty")
        return inputs, targets
    samples = iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    inputs_list, targets_list = [], []
    for index, sample in enumerate(samples):
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            kind = f"{type(sample).__name__} of {len(sample)}" if isinstance(sample, (tuple, list)) else type(sample).__name__
            raise ValueError(f"tensors: sample {index} is a {kind}, not an (input, target) pair")
        inputs_list.append(torch.as_tensor(sample[0]))
        targets_list.append(torch.as_tensor(sample[1]))
    if not inputs_list:
        raise ValueError("tensors: the data set is empty")
    return torch.stack(inputs_list), torch.stack(targets_list)


def images_per_class(
    inputs: torch.Tensor, targets: torch.Tensor, per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class present in ``targets``, drawn without replacement.

    The result is grouped by class in ascending class order, each class's samples in the order
    they were drawn; the draw depends only on ``generator`` (one ``randperm`` per class, in
    class order), so a generator seeded the same way gives the same subset.

    Args:
        inputs: samples, first dimension indexing them.
        targets: 1-D integer class labels, one per sample.
        per_class: samples kept of every class (>= 1).
        generator: the source of randomness (a seeded ``torch.Generator``).

    Raises:
        ValueError: ``per_class`` < 1, mismatched or non-integer inputs, or a class with fewer
            than ``per_class`` samples (naming the class and its count); nothing is drawn then.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int):
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    if per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"images_per_class needs a torch.Generator, got {type(generator).__name__}")
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be a 1-D integer tensor, got dtype {targets.dtype} and shape {tuple(targets.shape)}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs hold {inputs.shape[0]} samples but targets {targets.shape[0]}")
    if targets.numel() == 0:
        raise ValueError("images_per_class: there are no samples")
    classes, counts = torch.unique(targets, sorted=True, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, counts) if n < per_class]
    if short:
        listed = ", ".join(f"class {c} has {n}" for c, n in short)
        raise ValueError(f"images_per_class: {per_class} samples per class asked but {listed}")
    chosen = []
    for label in classes:
        candidates = torch.nonzero(targets == label, as_tuple=True)[0]
        draw = torch.randperm(len(candidates), generator=generator)[:per_class]
        chosen.append(candidates[draw])
    index = torch.cat(chosen)
    return inputs[index], targets[index]
