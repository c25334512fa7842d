"""What a ``growprune`` command prints: Lightning's and W&B's boilerplate left out, step losses on short epochs.

A run should show the progress bar, what the strategies do and the summary table. Lightning adds
lines on every run that say nothing about the user's setup (accelerator availability, the seed,
tips to install other packages, a deprecation inside Lightning itself); :func:`quiet_boilerplate`
drops exactly those messages, matched by text, and leaves every other warning visible. W&B is
asked for its essential output only (``WANDB_QUIET``, unless set).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

# Lightning logger -> messages it logs on every run (INFO level, rank zero); an optional
# "[rank: N] " prefix is allowed.
BOILERPLATE_LOG_LINES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        r"GPU available: ",
        r"TPU available: ",
        r"HPU available: ",
        r"💡 Tip: ",  # "try installing litlogger / litmodels"
    ),
    "lightning.fabric.utilities.seed": (r"Seed set to ",),
    "lightning.pytorch.accelerators.cuda": (r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES: ",),
}

# (message regex, category) of warnings that Lightning's own code triggers on every run.
BOILERPLATE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch 2.10+ deprecates LeafSpec, which lightning.pytorch.utilities._pytree still builds
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _BoilerplateFilter(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile(r"(\[rank: \d+\] )?(" + "|".join(patterns) + ")")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@contextlib.contextmanager
def quiet_boilerplate() -> Iterator[None]:
    """Within the block, Lightning's per-run boilerplate (see module doc) is not printed.

    Filters are attached to the loggers that emit those lines and to the warnings filter list,
    and removed again on exit, so nothing changes for code outside the command.
    """
    # W&B's own switch for its non-essential output (the run-history sparklines and summary it
    # prints at the end repeat the summary table); offline runs still say where their data is.
    # A WANDB_QUIET the user set wins.
    set_quiet = "WANDB_QUIET" not in os.environ
    if set_quiet:
        os.environ["WANDB_QUIET"] = "true"
    attached = []
    for name, patterns in BOILERPLATE_LOG_LINES.items():
        logger, log_filter = logging.getLogger(name), _BoilerplateFilter(patterns)
        logger.addFilter(log_filter)
        attached.append((logger, log_filter))
    try:
        with warnings.catch_warnings():
            for message, category in BOILERPLATE_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, log_filter in attached:
            logger.removeFilter(log_filter)
        if set_quiet:
            os.environ.pop("WANDB_QUIET", None)


LIGHTNING_LOG_INTERVAL = 50  # Trainer(log_every_n_steps=None) means 50


class ShortEpochStepLogging(Callback):
    """Log every step when an epoch has fewer batches than Lightning's default logging interval.

    Lightning logs step metrics every 50 optimizer steps; with 20 batches per epoch (the quickstart
    digits) ``train/loss_step`` then gets a value every 2.5 epochs and none at all in a 2-epoch
    run. The command line adds this callback only when the user left ``log_every_n_steps`` unset.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # The number of batches is known only once the loader is built, after Lightning has
            # compared it with the interval (and warned that the epoch is shorter). Interval 1
            # until then: that comparison passes, and on_train_start sets the real value.
            trainer.log_every_n_steps = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapt(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adapt(trainer)  # loaders reloaded every n epochs may change length

    @staticmethod
    def _adapt(trainer: pl.Trainer) -> None:
        batches = trainer.num_training_batches
        trainer.log_every_n_steps = 1 if batches < LIGHTNING_LOG_INTERVAL else LIGHTNING_LOG_INTERVAL
