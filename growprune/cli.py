"""The ``growprune`` command: LightningCLI (``fit``, ``validate``, ``test``, ``predict``) plus listings.

    growprune fit -c configs/quickstart.yaml
    growprune fit -c configs/quickstart.yaml --trainer.max_epochs 3 --model.arch lenet5
    growprune validate -c configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    growprune fit --print_config           # the full config with every default
    growprune models                       # registered model names
    growprune datasets                     # data module names and classes
    growprune evolve -c configs/evolve/lenet300_ga_digits.yaml   # evolutionary pruning (growprune.cli_evolve)
    growprune qd -c configs/qd/lenet300_masks_digits.yaml        # MAP-Elites (growprune.cli_qd)
    growprune qd-analyze runs/qd/lenet300_masks_digits/version_0 # descriptors vs learning speed (growprune.cli_qd_analyze)
    growprune benchmark --suite smoke                            # a suite's grid and leaderboard (growprune.cli_benchmark)
    growprune export --ckpt_path CKPT                            # plain module, TorchScript, ONNX (growprune.cli_export)

Every ``fit``, ``validate`` and ``test`` ends with a summary table and writes the same numbers to
``<run dir>/summary.json``; the last line printed is ``summary: <path>``. The run directory is the
first logger's versioned folder (``runs/<name>/version_<n>``), so nothing from an earlier run is
overwritten; ``fit --ckpt_path <run dir>/checkpoints/<file>.ckpt`` continues that run (its folder,
metrics.csv and W&B run). Each command finishes the W&B run it started, also when it fails.
The bookkeeping lives in :mod:`growprune.runs`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from growprune.cli_errors import check_checkpoint, error_line, explain_instantiation_error, explain_parser_error
from growprune.cli_output import LIGHTNING_LOG_INTERVAL, ShortEpochStepLogging, quiet_boilerplate
from growprune.data import DigitsDataModule, GrowPruneDataModule, list_datamodules
from growprune.errors import ConfigurationError
from growprune.module import GrowPruneModule
from growprune.runs import RunSummary, checkpoint_progress, continue_run, finish_wandb_runs, read_checkpoint

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "max_epochs": 10,
    "logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "growprune"}},
        {"class_path": "growprune.loggers.WandbLogger", "init_args": {"save_dir": "runs", "project": "growprune"}},
    ],
}


class GrowPruneCLI(LightningCLI):
    """LightningCLI wired for growprune: data shapes linked into the model, summaries after each run."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        self.run_summary: RunSummary | None = None
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        try:
            super().__init__(
                GrowPruneModule,
                GrowPruneDataModule,
                subclass_mode_data=True,
                auto_configure_optimizers=False,
                args=args,
                run=run,
                **kwargs,
            )
        except BaseException:
            # a failed command still ends its W&B run (marked failed), or the next one in this
            # process would log into it
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                finish_wandb_runs(trainer.loggers, exit_code=1)
            raise

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Every parser (main and per subcommand): no prefix matching, so `--trainer.max_epoch 3` is
        # an error rather than max_epochs, and errors raised (not printed with the usage text) so
        # that main() can report them in one line.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__name__}"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args``; a parse error or a checkpoint Lightning could not load is a ConfigurationError.

        Unlike LightningCLI's version this does not warn that ``args`` and ``sys.argv`` are both
        given: :func:`main` passes the process's own arguments (after resolving data names).
        """
        try:
            self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        except ArgumentError as error:
            raise ConfigurationError(explain_parser_error(str(error), self._option_names())) from error
        # before LightningCLI reads the checkpoint's hyper-parameters, and before any run directory
        # or W&B run exists
        self._check_checkpoint()

    def _option_names(self) -> dict[str, list[str]]:
        """Per subcommand, the option names its parser accepts (for "did you mean" hints)."""
        parsers = getattr(self, "_subcommand_parsers", {})
        return {name: [action.dest for action in subparser._actions] for name, subparser in parsers.items()}

    def _subcommand_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _check_checkpoint(self) -> None:
        config = self._subcommand_config()
        path = config.get("ckpt_path")
        if path is None:
            return
        # FSDP, DeepSpeed and model-parallel strategies save checkpoints as directories
        strategy = str(config.get("trainer.strategy", "")).lower()
        sharded = any(name in strategy for name in ("fsdp", "deepspeed", "modelparallel", "model_parallel"))
        check_checkpoint(str(path), directories_allowed=sharded)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
            raise ConfigurationError(explain_instantiation_error(error, self._subcommand_config())) from error
        if self._subcommand_config().get("trainer.log_every_n_steps") is None and self.trainer.log_every_n_steps == LIGHTNING_LOG_INTERVAL:
            # the user left the interval unset: short epochs log every step (see ShortEpochStepLogging)
            self.trainer.callbacks.insert(0, ShortEpochStepLogging())

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with a :class:`~growprune.runs.RunSummary` that writes the run summary."""
        trainer = super().instantiate_trainer(**kwargs)
        self.run_summary = RunSummary()
        trainer.callbacks.append(self.run_summary)
        return trainer

    @property
    def summary_path(self) -> Path | None:
        """Where this process wrote the last summary (``None`` under ``ddp_spawn``: the spawned rank 0 wrote it)."""
        return self.run_summary.path if self.run_summary is not None else None

    # LightningCLI calls before_<subcommand> before the trainer method, after_<subcommand> after it.
    def before_fit(self) -> None:
        self.prepare_checkpoint_run("fit")

    def before_validate(self) -> None:
        self.prepare_checkpoint_run("validate")

    def before_test(self) -> None:
        self.prepare_checkpoint_run("test")

    def after_fit(self) -> None:
        finish_wandb_runs(self.trainer.loggers)

    def after_validate(self) -> None:
        finish_wandb_runs(self.trainer.loggers)

    def after_test(self) -> None:
        finish_wandb_runs(self.trainer.loggers)

    def after_predict(self) -> None:
        finish_wandb_runs(self.trainer.loggers)

    def prepare_checkpoint_run(self, stage: str) -> None:
        """With ``--ckpt_path <file>``: ``fit`` continues the checkpoint's run (same run directory,
        metrics.csv and W&B run; see :func:`~growprune.runs.continue_run`), ``validate``/``test``
        report its epochs and global step. Runs before the trainer starts, in every process."""
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        if path is None or not Path(str(path)).is_file():
            return  # no checkpoint, or one Lightning finds by name ("last", "best")
        checkpoint = read_checkpoint(path, weights_only=config.get("weights_only") is not False)
        if stage == "fit":
            message = continue_run(self.trainer, path, checkpoint)
            if self.trainer.is_global_zero:
                print(f"growprune: {message}", file=sys.stderr, flush=True)
        elif self.run_summary is not None:
            self.run_summary.checkpoint = {"path": str(path), **checkpoint_progress(checkpoint)}


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
    if argv and argv[0] == "evolve":
        from growprune.cli_evolve import evolve_main

        return evolve_main(argv[1:])
    if argv and argv[0] == "qd":
        from growprune.cli_qd import qd_main

        return qd_main(argv[1:])
    if argv and argv[0] == "qd-analyze":
        from growprune.cli_qd_analyze import analyze_main

        return analyze_main(argv[1:])
    if argv and argv[0] == "benchmark":
        from growprune.cli_benchmark import benchmark_main

        code = benchmark_main(argv[1:])
        if code:
            raise SystemExit(code)
        return
    if argv and argv[0] == "export":
        from growprune.cli_export import export_main

        code = export_main(argv[1:])
        if code:
            raise SystemExit(code)
        return
    if argv and argv[0] in ("models", "datasets"):
        _print_listing(argv[0])
        return
    try:
        with quiet_boilerplate():
            GrowPruneCLI(args=resolve_data_names(argv))
    except ConfigurationError as error:
        print(f"growprune: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    except ArgumentError as error:
        # e.g. a checkpoint's stored hyper-parameters that this config cannot take
        print(f"growprune: error: {explain_parser_error(str(error))}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
