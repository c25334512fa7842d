"""Run bookkeeping of the ``growprune`` command: summaries, resumed runs and W&B runs.

* :class:`RunSummary` (a callback the command adds to every trainer) writes ``summary.json`` at
  the end of ``fit``, ``validate`` and ``test`` *in the process that ran the stage*: under
  ``ddp`` every rank takes part in finding the run directory (a collective call) and rank 0 writes;
  under ``ddp_spawn`` the spawned rank 0 writes, because only it holds the trained state (epochs,
  masks, the last checkpoint, the logger's version). It also stores the W&B run id in checkpoints.
* :func:`continue_run` makes ``fit --ckpt_path <run>/checkpoints/<file>.ckpt`` continue that run:
  same run directory, the same ``metrics.csv`` (rows the checkpoint had not reached are dropped,
  so no epoch appears twice) and the same W&B run.
* :func:`finish_wandb_runs` ends the W&B runs a command started.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from growprune.errors import ConfigurationError
from growprune.loggers import WandbLogger
from growprune.metrics import measure_latency

# The checkpoint entry that records which run wrote it (read when a fit resumes from it).
RUN_KEY = "growprune_run"
SUMMARY_KEYS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss_epoch")
SIZE_KEYS = (
    "params/total", "params/nonzero", "params/original",
    "flops/dense", "flops/effective", "flops/original", "flops/reduction",
    "compression", "latency/batch1_ms", "latency/threads",
)
# The summary's latency: best of at most 20 timed passes after 3 warm-up ones, stopping after 1 s.
LATENCY_PASSES, LATENCY_WARMUP, LATENCY_SECONDS = 20, 3, 1.0


# ------------------------------------------------------------------------------------ checkpoints
def read_checkpoint(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """The checkpoint's contents (tensors memory-mapped, so reading it costs little)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as error:  # torch raises many types for unreadable files
        raise ConfigurationError(f"cannot read checkpoint {path}: {error}") from error


def checkpoint_progress(checkpoint: dict[str, Any]) -> dict[str, int]:
    """``{"epochs": ..., "global_step": ...}`` of a Lightning checkpoint.

    ``epochs`` counts the epochs whose training batches all ran: what ``trainer.current_epoch``
    is when a fit resumes from it (Lightning's fit-loop progress; the ``epoch`` index for
    checkpoints without one).
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs = progress.get("processed", checkpoint.get("epoch", 0))
    return {"epochs": int(epochs), "global_step": int(checkpoint.get("global_step", 0))}


def _free_path(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem+suffix``, or ``stem-1``, ``stem-2``... when taken: nothing is overwritten."""
    path, index = directory / f"{stem}{suffix}", 1
    while path.exists():
        path, index = directory / f"{stem}-{index}{suffix}", index + 1
    return path


def _logged_before(row: dict[str, str], progress: dict[str, int]) -> bool:
    """Whether a metrics.csv row was logged before the point the checkpoint saved."""
    def number(key: str) -> int | None:
        value = row.get(key)
        return int(float(value)) if value not in (None, "") else None

    epoch, step = number("epoch"), number("step")
    if epoch is not None and epoch != progress["epochs"]:
        return epoch < progress["epochs"]
    return step is not None and step < progress["global_step"]


def resume_metrics_csv(logger: CSVLogger, progress: dict[str, int]) -> Path | None:
    """Make ``logger`` append to its run's metrics.csv from the checkpoint's point on.

    Lightning's CSV writer deletes an existing metrics.csv when it starts. The file is moved
    aside first, the writer started, and the rows logged before the checkpoint written back with
    their header (which the writer then keeps). Rows logged after it (the run went further than
    the checkpoint) would appear twice: they are dropped from metrics.csv and the original file
    is kept as ``metrics-before-resume.csv``, whose path is returned (``None`` when no row was dropped).
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        header, rows = list(reader.fieldnames or []), list(reader)
    kept = [row for row in rows if _logged_before(row, progress)]
    backup = _free_path(path.parent, "metrics-before-resume", ".csv")
    os.replace(path, backup)
    with warnings.catch_warnings():
        # the warning says metrics.csv will be deleted, which is what the move above prevents
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        writer = logger.experiment
    with path.open("w", newline="") as file:
        table = csv.DictWriter(file, fieldnames=header)
        table.writeheader()
        table.writerows(kept)
    writer.metrics_keys = list(header)
    if len(kept) == len(rows):
        backup.unlink()
        return None
    return backup


def continue_run(trainer: pl.Trainer, checkpoint_path: str | Path, checkpoint: dict[str, Any]) -> str:
    """Point the trainer's loggers at the run ``checkpoint_path`` belongs to; return what was done.

    The checkpoint belongs to a run of this configuration when it lies in
    ``<root>/<version>/checkpoints/`` and ``<root>`` is the first logger's folder (a CSV or
    TensorBoard logger: ``runs/<name>``), or, without loggers, in ``<default_root_dir>/checkpoints``.
    Then the run directory, its metrics.csv and the W&B run recorded in the checkpoint continue,
    and this command's config is saved next to the first one (``config-1.yaml``...). Otherwise
    (a copied checkpoint, another config's run) training continues from it in a new run.
    Call before the trainer runs (the loggers must not have started).
    """
    location = Path(checkpoint_path).resolve().parent
    run_dir = location.parent if location.name == "checkpoints" else None
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        root = Path(logger.root_dir).resolve()
        fixed = logger._version is not None and Path(logger.log_dir).resolve() != run_dir
        if run_dir is None or run_dir.parent != root or fixed:
            return (f"{checkpoint_path} is not in a run directory of this configuration ({root}/version_<n>/"
                    f"checkpoints): training continues from it in a new run, {logger.log_dir}")
        match = re.fullmatch(r"version_(\d+)", run_dir.name)
        logger._version = int(match.group(1)) if match else run_dir.name
    elif logger is not None:
        return (f"the first logger, {type(logger).__name__}, has no versioned run directory: training continues "
                f"from {checkpoint_path} in a new run")
    elif run_dir is None or run_dir != Path(trainer.default_root_dir).resolve():
        return f"{checkpoint_path} is not in {trainer.default_root_dir}/checkpoints: training continues from it there"
    notes = [f"continuing run {run_dir} from {Path(checkpoint_path).name}"]
    wandb_id = (checkpoint.get(RUN_KEY) or {}).get("wandb_run_id")
    for candidate in trainer.loggers:
        if isinstance(candidate, WandbLogger):
            if wandb_id:
                candidate.continue_run(wandb_id)
                notes.append(f"W&B run {wandb_id}")
            else:
                notes.append("a new W&B run (the checkpoint records none)")
            break
    if trainer.is_global_zero:
        if isinstance(logger, CSVLogger):
            backup = resume_metrics_csv(logger, checkpoint_progress(checkpoint))
            if backup is not None:
                notes.append(f"metrics logged after the checkpoint are only in {backup.name}")
        for callback in trainer.callbacks:
            # LightningCLI's SaveConfigCallback refuses to overwrite the run's config.yaml
            if isinstance(callback, SaveConfigCallback) and (run_dir / callback.config_filename).exists():
                name = Path(callback.config_filename)
                callback.config_filename = _free_path(run_dir, name.stem, name.suffix).name
    return "; ".join(notes)


# -------------------------------------------------------------------------------------- summaries
def collect_summary(
    trainer: pl.Trainer, module: Any, stage: str, checkpoint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The numbers a run reports: accuracy and loss, size metrics, epochs, checkpoint and latency.

    ``checkpoint`` (``path``, ``epochs``, ``global_step``) is the checkpoint a ``validate`` or
    ``test`` evaluated: its training progress is reported rather than the evaluating trainer's 0.
    """
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
    summary: dict[str, Any] = {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}
    if getattr(module, "input_shape", None) is not None:
        summary.update(module.size_metrics(include_original=True))
        # Best of a few passes within a bounded time: load on the machine only adds time, so the
        # fastest pass is the network's own cost. Lightning has moved the module to the CPU by now.
        seconds = measure_latency(module.model, module.input_shape, batch_size=1, repeats=LATENCY_PASSES,
                                  warmup=LATENCY_WARMUP, statistic="min", max_seconds=LATENCY_SECONDS)
        summary["latency/batch1_ms"] = 1e3 * seconds
        summary["latency/threads"] = torch.get_num_threads()
    if stage != "fit" and checkpoint is not None:
        summary["epochs"] = checkpoint["epochs"]
        summary["global_step"] = checkpoint["global_step"]
        summary["checkpoint"] = str(checkpoint["path"])
        return summary
    summary["epochs"] = trainer.current_epoch
    summary["global_step"] = trainer.global_step
    if stage == "fit" and trainer.checkpoint_callback is not None:
        path = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
        if path:
            summary["checkpoint"] = str(path)
    return summary


def write_summary_file(run_dir: Path, summary: dict[str, Any], written: set[Path]) -> Path:
    """Write ``summary.json`` into ``run_dir`` without overwriting another run's summary.

    A summary written by this process before (``written``: ``fit`` then ``test`` on one trainer)
    is merged into; any other existing file is kept and ``summary-1.json``... is used instead.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / "summary.json").resolve()
    if path in written:
        summary = {**json.loads(path.read_text()), **summary}
    else:
        path = _free_path(run_dir, "summary", ".json").resolve()
    written.add(path)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if value.is_integer() and abs(value) >= 1:
            return f"{int(value):,}"
        return f"{value:.4f}"
    return str(value)


def format_summary(summary: dict[str, Any], stage: str) -> str:
    """A two-column table of the summary, size metrics after accuracy and loss."""
    ordered = [key for key in SUMMARY_KEYS + SIZE_KEYS if key in summary]
    ordered += sorted(key for key in summary if key not in ordered)
    width = max(len(key) for key in ordered)
    lines = [f"growprune {stage} summary", "-" * (width + 20)]
    lines += [f"{key:<{width}}  {_format_value(summary[key])}" for key in ordered]
    return "\n".join(lines)


def publish_to_wandb(trainer: pl.Trainer, summary: dict[str, Any]) -> None:
    """Copy the summary into the summary of each W&B run the trainer logs to."""
    for logger in trainer.loggers:
        if isinstance(logger, LightningWandbLogger) and getattr(logger, "resolved_mode", None) != "disabled":
            logger.experiment.summary.update(summary)


def finish_wandb_runs(loggers: list[Any], exit_code: int = 0) -> None:
    """Finish the W&B runs that these growprune loggers started (one run per command)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.finish(exit_code)


class RunSummary(Callback):
    """Writes the run summary (``summary.json``, a table, ``summary: <path>``) when a stage ends.

    Runs in the process that trained or evaluated, so the numbers are that process's: with
    ``ddp_spawn`` the spawned rank 0 writes (the launching process only gets the weights back).
    All ranks take part in finding the run directory; rank 0 writes, prints and copies the summary
    into the W&B run. Checkpoints get the W&B run id under ``"growprune_run"`` so that a resumed
    fit logs into the same W&B run.

    Attributes:
        checkpoint: the checkpoint a ``validate``/``test`` evaluates (``path``, ``epochs``,
            ``global_step``), set by the command before the stage.
        path, summary: the last summary written by this process (``None`` before, or when another
            process wrote it).
    """

    def __init__(self) -> None:
        self.checkpoint: dict[str, Any] | None = None
        self.path: Path | None = None
        self.summary: dict[str, Any] | None = None
        self._written: set[Path] = set()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        ids = [logger.version for logger in trainer.loggers if isinstance(logger, LightningWandbLogger)]
        checkpoint[RUN_KEY] = {"wandb_run_id": ids[0] if ids else None}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if stage not in ("fit", "validate", "test"):
            return
        # trainer.log_dir broadcasts rank 0's directory: a collective call, so every rank makes it
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        summary = collect_summary(trainer, pl_module, stage, self.checkpoint)
        self.path = write_summary_file(run_dir, summary, self._written)
        self.summary = summary
        publish_to_wandb(trainer, summary)
        print(format_summary(summary, stage), flush=True)
        print(f"summary: {os.path.relpath(self.path)}", flush=True)

