"""Shared timing helpers for the performance benchmarks: steady-state step times, interleaved repeats."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Any, Callable, Iterator

import lightning.pytorch as pl

from benchmarks.records import machine  # noqa: F401  (the machine line, shared with the accuracy benchmarks)


class StepTimer(pl.Callback):
    """Seconds per optimizer step after the first (warm-up) epoch."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.start_step = 0
        self.seconds_per_step = float("nan")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.start, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start is not None:
            self.seconds_per_step = (time.perf_counter() - self.start) / (trainer.global_step - self.start_step)


def bare_trainer(max_epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A Trainer with nothing a timing run does not need (no logging, checkpoints, validation, bar)."""
    return pl.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )


def interleaved_medians(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every variant ``repeats`` times in rotating order (so drift hits all alike); all samples."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            samples[name].append(runs[name]())
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def timed_attribute(owner: Any, name: str, times: dict[str, float], key: str) -> Iterator[None]:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``times[key]``; restore after."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)
