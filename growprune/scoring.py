"""Batches for data-driven criteria, drawn from their own loader so that training is not disturbed.

Data-driven criteria (gradient saliency, NNrelief, Taylor, ...) score the network on a few training
batches. Those batches must not come from the training ``DataLoader`` itself:

* iterating a loader with persistent workers again *resets* its worker iterator, so scoring in
  the middle of an epoch (a step-unit schedule) restarts the running epoch: some samples are
  seen twice and others never;
* every new iteration of a shuffled loader draws from the loader's own ``torch.Generator``, so a
  pruned run would see the training data in another order than the dense run with the same seed;
* data transforms running in the main process draw from the global random number generators.

:func:`scoring_batches` therefore builds a new ``DataLoader`` over the training *data set*, with
the training loader's batch size and ``collate_fn``, its own sampler and generator (seeded by
the caller, so every rank of a distributed run draws the same batches) and no worker processes,
and restores the global torch, numpy and ``random`` states after drawing. The training loader,
its generator and its workers are never touched.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from growprune.validation import check_integer

__all__ = ["scoring_batches"]


def scoring_batches(
    trainer: pl.Trainer,
    *,
    samples: int | None = None,
    batches: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Random training batches for scoring, drawn without touching the training loader.

    Give exactly one of ``samples`` and ``batches``. The batches are drawn from a new loader over
    the training data set, shuffled by a generator seeded with ``seed`` (the same seed gives the
    same batches, on every rank), with the training loader's batch size and ``collate_fn`` and no
    worker processes. The training loader (its generator, iterator and workers) and the global
    torch / numpy / ``random`` states are left as they were.

    The training loader is ``trainer.train_dataloader`` once Lightning has set it up; before that
    (e.g. in ``on_fit_start``) a new one is asked from the data module (or the module's
    ``train_dataloader()`` hook, or the loader given to ``fit``) and only read, never iterated.

    An ``IterableDataset`` cannot be sampled: its first items are taken instead, from a new
    iteration of the data set in the main process (``seed`` has no effect then).

    Args:
        trainer: the trainer whose training data to draw from.
        samples: number of samples; the last batch is cut to fit. A smaller data set gives all of
            its samples (each once).
        batches: number of whole batches (fewer if the data set runs out first).
        seed: seed of the shuffling.
        device: where to put the tensors (default: leave them on the CPU).

    Returns:
        ``(inputs, targets)`` pairs: the first two elements of each batch.

    Raises:
        ValueError: both or neither of ``samples`` / ``batches``, a count that is not a positive
            integer, no training data, an empty data set, or batches that do not start with an
            ``(inputs, targets)`` pair of tensors.
    """
    if (samples is None) == (batches is None):
        raise ValueError(f"give exactly one of samples= or batches=, got samples={samples!r}, batches={batches!r}")
    if samples is not None:
        check_integer("samples", samples, minimum=1)
    if batches is not None:
        check_integer("batches", batches, minimum=1)
    loader = _scoring_loader(_training_loader(trainer), seed)

    result: list[tuple[Tensor, Tensor]] = []
    count = 0
    # Data transforms in the main process draw from the global generators: restore them afterwards
    # so that a pruned run trains exactly like the dense run. devices=[]: the batches are built on
    # the CPU, no CUDA generator is used.
    with torch.random.fork_rng(devices=[]), _numpy_and_random_states_kept():
        for batch in loader:
            inputs, targets = _inputs_and_targets(batch)
            if samples is not None:
                take = min(int(inputs.shape[0]), samples - count)
                inputs, targets = inputs[:take], targets[:take]
            count += int(inputs.shape[0])
            result.append((inputs, targets))
            if len(result) == batches or count == samples:
                break
    if count == 0:
        raise ValueError("the training data gave no samples to score with")
    if device is not None:
        result = [(inputs.to(device), targets.to(device)) for inputs, targets in result]
    return result


def _training_loader(trainer: pl.Trainer) -> DataLoader:
    """The training loader, or a new, unused one from the same source before Lightning set it up."""
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        # Not trainer.fit_loop.setup_data(): it starts the training loader's iterator (and workers).
        # The data module's train_dataloader() only builds a loader; nothing is iterated.
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            loader = datamodule.train_dataloader()
        else:
            # the module's train_dataloader() hook or the loader given to fit(); Lightning keeps
            # it as the fit loop's data source (private, hence the guarded look-up)
            source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
            if source is not None and source.instance is not None and source.is_defined():
                loader = source.dataloader()
    if loader is None:
        raise ValueError("scoring needs training data, but the trainer has no training data: call it during fit()")
    if not isinstance(loader, DataLoader):
        raise ValueError(f"scoring needs a torch DataLoader as the training data, got {type(loader).__name__}")
    return loader


def _scoring_loader(training: DataLoader, seed: int) -> DataLoader:
    """A new loader over the training data set: own sampler and generator, no workers."""
    dataset = training.dataset
    generator = torch.Generator().manual_seed(seed)
    batch_size = training.batch_size
    if batch_size is None and training.batch_sampler is not None:
        # a custom batch sampler: use its batch size if it has one
        batch_size = getattr(training.batch_sampler, "batch_size", None)
        if not isinstance(batch_size, int):
            raise ValueError(
                f"cannot tell the batch size of the training loader: its batch sampler "
                f"{type(training.batch_sampler).__name__} has no integer batch_size"
            )
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, collate_fn=training.collate_fn, num_workers=0,
                          generator=generator)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the training data set is empty: there is nothing to score with")
    # The generator is given to the loader too: its per-iteration base seed is drawn from it, not
    # from the global generator.
    return DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator),
                      collate_fn=training.collate_fn, num_workers=0, generator=generator)


def _inputs_and_targets(batch: Any) -> tuple[Tensor, Tensor]:
    if (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)
            and isinstance(batch[1], Tensor)):
        return batch[0], batch[1]
    raise ValueError(
        f"scoring needs batches whose first two elements are (inputs, targets) tensors, got a {_describe(batch)}"
    )


def _describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return f"dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        kinds = ", ".join(type(item).__name__ for item in batch[:4]) + (", ..." if len(batch) > 4 else "")
        return f"{type(batch).__name__} of {len(batch)} element{'s' if len(batch) != 1 else ''} ({kinds})"
    return type(batch).__name__


@contextmanager
def _numpy_and_random_states_kept() -> Iterator[None]:
    """Restore the global numpy and ``random`` states on exit (torch has ``fork_rng``)."""
    numpy_state, random_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(random_state)


@contextmanager
def loss_gradients(model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Inside: every parameter's ``.grad`` holds the gradient of the cross-entropy loss summed over
    ``batches`` (eval mode: batch-norm statistics stay). On exit the gradients that were there
    before (e.g. being accumulated under ``accumulate_grad_batches``) are put back, unchanged.
    """
    from growprune.modes import evaluating

    parameters = list(model.parameters())
    saved = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    try:
        with evaluating(model, gradients=True):
            for inputs, targets in batches:
                torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        yield
    finally:
        for parameter, grad in zip(parameters, saved):
            parameter.grad = grad
