"""The ``growprune`` command: LightningCLI (``fit``, ``validate``, ``test``, ``predict``) plus listings.

    growprune fit -c configs/quickstart.yaml
    growprune fit -c configs/quickstart.yaml --trainer.max_epochs 3 --model.arch lenet5
    growprune validate -c configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    growprune fit --print_config           # the full config with every default
    growprune models                       # registered model names
    growprune datasets                     # data module names and classes

Every ``fit``, ``validate`` and ``test`` ends with a summary table and writes the same numbers to
``<run dir>/summary.json``; the last line printed is ``summary: <path>``. The run directory is the
first logger's versioned folder (``runs/<name>/version_<n>``), so nothing from an earlier run is
overwritten.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from growprune.data import DigitsDataModule, GrowPruneDataModule, list_datamodules
from growprune.errors import ConfigurationError
from growprune.loggers import WandbLogger
from growprune.metrics import measure_latency
from growprune.module import GrowPruneModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "max_epochs": 10,
    "logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "growprune"}},
        {"class_path": "growprune.loggers.WandbLogger", "init_args": {"save_dir": "runs", "project": "growprune"}},
    ],
}

SUMMARY_KEYS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss_epoch")
SIZE_KEYS = ("params/total", "params/nonzero", "flops/dense", "flops/effective", "compression", "latency/batch1_ms")


class GrowPruneCLI(LightningCLI):
    """LightningCLI wired for growprune: data shapes linked into the model, summaries after each run."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        self._written_summaries: set[Path] = set()
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        super().__init__(
            GrowPruneModule,
            GrowPruneDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__name__}"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
            raise ConfigurationError(str(error)) from error

    # LightningCLI calls after_<subcommand> once the trainer method returns.
    def after_fit(self) -> None:
        self.write_summary("fit")

    def after_validate(self) -> None:
        self.write_summary("validate")

    def after_test(self) -> None:
        self.write_summary("test")

    def write_summary(self, stage: str) -> Path | None:
        """Print the summary table and write ``summary.json`` into the run directory (rank 0 only)."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return None
        summary = collect_summary(trainer, self.model, stage)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = (run_dir / "summary.json").resolve()
        if path in self._written_summaries:
            # Several stages of one process (fit, then test) share a run directory: keep both.
            summary = {**json.loads(path.read_text()), **summary}
        else:
            # Never overwrite the summary of another run (e.g. runs without a logger share a folder).
            index = 1
            while path.exists():
                path = (run_dir / f"summary-{index}.json").resolve()
                index += 1
        self._written_summaries.add(path)
        path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        publish_to_wandb(trainer, summary)
        print(format_summary(summary, stage))
        print(f"summary: {os.path.relpath(path)}")
        return path


def publish_to_wandb(trainer: Any, summary: dict[str, Any]) -> None:
    """Copy the summary into each W&B run's summary and close the run (one run per command)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            if logger.resolved_mode != "disabled":
                logger.experiment.summary.update(summary)
            # Finish even a disabled run: wandb keeps it global and would hand it to the next run.
            logger.experiment.finish()


def collect_summary(trainer: Any, module: GrowPruneModule, stage: str) -> dict[str, Any]:
    """The numbers a run reports: accuracy and loss, size metrics, checkpoint and run directory."""
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
    summary: dict[str, Any] = {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}
    if module.input_shape is not None:
        summary.update(module.size_metrics())
        # CPU/GPU inference time of the network as it is now: the speed-up structural pruning buys
        summary["latency/batch1_ms"] = 1e3 * measure_latency(module.model, module.input_shape, batch_size=1, repeats=20, warmup=3)
    summary["epochs"] = trainer.current_epoch
    summary["global_step"] = trainer.global_step
    if stage == "fit" and trainer.checkpoint_callback is not None:
        checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
        if checkpoint:
            summary["checkpoint"] = str(checkpoint)
    return summary


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


def public_class_path(cls: type) -> str:
    """``growprune.data.DigitsDataModule`` rather than the defining module's path, when exported."""
    import growprune.data

    if getattr(growprune.data, cls.__name__, None) is cls:
        return f"growprune.data.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _print_listing(kind: str) -> None:
    if kind == "models":
        from growprune.models import list_models

        print("\n".join(list_models()))
    else:
        from growprune.data import DATAMODULES

        for name in list_datamodules():
            cls = DATAMODULES[name]
            print(f"{name:<15} {public_class_path(cls)}")


def resolve_data_names(argv: list[str]) -> list[str]:
    """Let ``--data digits`` (a registry name) stand for the data module's class path."""
    from growprune.data import DATAMODULES

    resolved = list(argv)
    for index, token in enumerate(resolved):
        if token == "--data" and index + 1 < len(resolved):
            value_index, value = index + 1, resolved[index + 1]
        elif token.startswith("--data="):
            value_index, value = index, token.split("=", 1)[1]
        else:
            continue
        if value in DATAMODULES:
            class_path = public_class_path(DATAMODULES[value])
            resolved[value_index] = class_path if value_index != index else f"--data={class_path}"
        elif "." not in value and not value.endswith(("DataModule", ".yaml", ".yml", "}")):
            raise ConfigurationError(f"unknown data set {value!r}; valid names: {', '.join(list_datamodules())}")
    return resolved


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``growprune`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("models", "datasets"):
        _print_listing(argv[0])
        return
    try:
        GrowPruneCLI(args=resolve_data_names(argv))
    except ConfigurationError as error:
        print(f"growprune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
