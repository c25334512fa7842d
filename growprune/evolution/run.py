"""One ``growprune evolve`` run: base network, search, run directory, resume, W&B and the outputs.

The run directory is ``<root>/<name>/version_<n>`` (a new one per run, never overwritten):

* ``config.yaml``: the full config; ``validate.yaml``: its model and data sections, so that
  ``growprune validate -c <run>/validate.yaml --ckpt_path <run>/best.ckpt`` reloads the best network.
* ``base.ckpt``: the network being pruned (trained here for ``base.epochs`` or copied from
  ``base.checkpoint``), a Lightning checkpoint.
* ``generations.csv``: one row per generation (or PBT cycle); ``evaluations.jsonl``: every
  evaluation's result keyed by genome (the loop's :class:`~growprune.evolution.loop.Journal`).
* ``state.pt``: the search's state after the last completed generation (written atomically,
  loads with ``torch.load(weights_only=True)``): what ``--resume`` continues from.
* ``summary.json``, ``best.ckpt`` (the best genome decoded and saved with a Lightning trainer) and
  ``front.png`` (accuracy against size of every evaluated network, and the fitness per generation).

Fitness is measured on the data module's validation split; the test split is only used to report
the best network's accuracy at the end (it never takes part in a selection).

Resuming (``--resume``) after a crash or ``kill -9`` continues from the last completed
generation: the search's state (its RNG included) comes from ``state.pt`` and the evaluations the
interrupted generation had finished come from the journal, so no evaluation is repeated or lost
and the result equals that of an uninterrupted run with the same seed. Rows of
``generations.csv`` beyond the state are dropped (the original file is kept as
``generations-before-resume.csv``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from jsonargparse import Namespace

from growprune.cli_errors import check_checkpoint
from growprune.errors import ConfigurationError
from growprune.evolution.data import images_per_class, tensors
from growprune.evolution.types import Individual
from growprune.loggers import resolve_wandb_mode
from growprune.module import GrowPruneModule
from growprune.runs import format_summary

STATE_FILE = "state.pt"
CSV_FILE = "generations.csv"
JOURNAL_FILE = "evaluations.jsonl"
# Keys of the config that a resumed run may change (they do not change its result: engines give
# identical results, more generations extend the run, W&B only records).
RESUMABLE_KEYS = ("engine", "engine_options", "wandb", "generations", "resume", "config", "root")


# ----------------------------------------------------------------------------------- small helpers
def next_version_dir(folder: Path) -> Path:
    """A new ``folder/version_<n>`` (n one above the highest existing), created now."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        versions = [int(match.group(1)) for path in folder.iterdir() if (match := re.fullmatch(r"version_(\d+)", path.name))]
        candidate = folder / f"version_{max(versions, default=-1) + 1}"
        try:
            candidate.mkdir()  # exist_ok=False: two runs starting at once never share a folder
            return candidate
        except FileExistsError:
            continue


def latest_version_dir(folder: Path, containing: str | None = None) -> Path | None:
    """The ``version_<n>`` folder with the highest n in ``folder`` (among those holding the file
    ``containing``, when given), or ``None``."""
    if not folder.is_dir():
        return None
    versions = {int(match.group(1)): path for path in folder.iterdir()
                if (match := re.fullmatch(r"version_(\d+)", path.name))
                and (containing is None or (path / containing).is_file())}
    return versions[max(versions)] if versions else None


def atomic_torch_save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then renamed over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn one.
    """
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint_atomically(trainer: pl.Trainer, path: Path, weights_only: bool) -> None:
    """``trainer.save_checkpoint`` to a temporary file renamed over ``path``: never a torn checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(temporary, weights_only=weights_only)
    os.replace(temporary, path)


def accuracy_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on the samples, by a plain loop in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(targets), batch_size):
            logits = model(inputs[start : start + batch_size])
            correct += int((logits.argmax(dim=1) == targets[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(targets)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "devices": 1, "num_sanity_val_steps": 0}
    options.update(kwargs)
    return pl.Trainer(**options)


def load_lightning_checkpoint(module: GrowPruneModule, path: str | Path) -> None:
    """Load a ``growprune fit`` checkpoint into ``module`` as Lightning does (edits replayed, then weights).

    Raises:
        ConfigurationError: the checkpoint is not Lightning's, or its weights do not fit the model.
    """
    check_checkpoint(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigurationError(f"base.checkpoint: {path} does not fit the configured model: {first}") from error


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute (never ``../..``)."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)


def flatten_summary(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_summary(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _class_path(config: Namespace, key: str) -> str:
    value = config.get(key)
    return value.get("class_path", key) if isinstance(value, (Namespace, dict)) else key


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in RESUMABLE_KEYS}


def retrain_like_the_evaluator(evaluator: Any, genotype: Any, genome: np.ndarray, decoded: GrowPruneModule) -> None:
    """Give ``decoded`` the weights the evaluator scored: its ``retrain_steps`` SGD steps on the
    retraining samples (deterministic), so that ``best.ckpt`` is the network that was selected.

    Uses the evaluator's own retraining (``PopulationEvaluator.retrained_weights``), the one code path
    that produced the selection accuracy.
    """
    masks = genotype.masks(genome)
    if masks is not None:
        weights = evaluator.retrained_weights(evaluator.model, {name: mask.to(evaluator.device) != 0 for name, mask in masks.items()})
    else:
        weights = evaluator.retrained_weights(copy.deepcopy(decoded.model).to(evaluator.device).eval())
    with torch.no_grad():
        for name, weight in weights.items():
            decoded.model.get_parameter(name).copy_(weight.cpu())


# ------------------------------------------------------------------------------------------- CSV
class GenerationLog:
    """``generations.csv``: one row per completed generation, flushed to disk as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: list[str] | None = None
        if path.is_file() and path.stat().st_size:
            with path.open(newline="") as handle:
                self.header = next(csv.reader(handle), None)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def truncate(self, generations: int, key: str = "generation") -> Path | None:
        """Keep the rows whose ``key`` column is below ``generations``; the original file is kept aside
        (``<stem>-before-resume.csv``, e.g. ``generations-before-resume.csv``, returned) when rows are dropped."""
        rows = self.rows()
        kept = [row for row in rows if int(row[key]) < generations]
        if len(kept) == len(rows):
            return None
        backup = self.path.with_name(f"{self.path.stem}-before-resume.csv")
        index = 1
        while backup.exists():
            backup, index = self.path.with_name(f"{self.path.stem}-before-resume-{index}.csv"), index + 1
        os.replace(self.path, backup)
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.header or list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
        return backup

    def append(self, row: dict[str, Any]) -> None:
        new = self.header is None
        if new:
            self.header = list(row)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.header, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------- W&B
class WandbRun:
    """The run's W&B run: started in the run directory, resumed by id, finished also on failure."""

    def __init__(self, mode: str, project: str, run_dir: Path, name: str, config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        self.mode = resolve_wandb_mode(mode)
        options: dict[str, Any] = {"project": project, "dir": str(run_dir.resolve()), "mode": self.mode,
                                   "name": name, "config": config}
        if run_id is not None:
            options.update(id=run_id, resume="allow")
        self.run = wandb.init(**options)
        self.id: str | None = getattr(self.run, "id", None)

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({key: value for key, value in row.items() if isinstance(value, (int, float))}, step=step)

    def summarise(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({key: value for key, value in summary.items() if isinstance(value, (int, float, str))})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


# ------------------------------------------------------------------------------------------- run
@dataclass
class EvolutionRun:
    """A prepared ``growprune evolve`` run; :meth:`execute` runs it.

    Build it with :meth:`prepare`, which does every check that needs no file written.
    """

    config: Namespace
    objects: Namespace
    config_text: str
    run_dir: Path | None
    state: dict[str, Any] | None
    engine: Any
    base_ready: bool
    val_data: tuple[torch.Tensor, torch.Tensor]
    retrain_data: tuple[torch.Tensor, torch.Tensor] | None
    base_accuracy: float | None = None

    # ----------------------------------------------------------------------------- preparation
    @classmethod
    def prepare(cls, config: Namespace, objects: Namespace, config_text: str, resume: str | None = None) -> "EvolutionRun":
        """Check everything that can be checked before anything is written.

        Order: the run to resume (and that its config matches), the genotype against the model,
        the engine, and with ``base.checkpoint`` the checkpoint and the objective against its
        accuracy. Nothing exists on disk when one of them fails.

        Raises:
            ConfigurationError: one line naming the config key and the problem.
        """
        run_dir, state = (None, None)
        if resume is not None:
            run_dir, state = cls._find_resumed(config, config_text, resume)
        module: GrowPruneModule = objects.model
        try:
            objects.genotype.bind(module)
        except ValueError as error:
            raise ConfigurationError(f"genotype > {_class_path(config, 'genotype')}: {error}") from error
        val_data, retrain_data = cls._data(config, objects)
        try:
            # bound again to the trained base later; this finds bad options before anything is written
            objects.evaluation.bind(module.model, *val_data, *(retrain_data or ()))
        except (ValueError, TypeError) as error:
            raise ConfigurationError(f"evaluation: {error}") from error
        cls._check_combination(config, objects)
        engine = cls._make_engine(config)
        try:
            base_ready = False
            base_accuracy = None
            stored = run_dir / "base.ckpt" if run_dir is not None else None
            source = stored if stored is not None and stored.is_file() else config.base.checkpoint
            if source is not None:
                load_lightning_checkpoint(module, source)
                base_ready = True
                base_accuracy = cls._check_objective(config, objects, module, val_data, written=None)
        except BaseException:
            engine.close()
            raise
        return cls(config=config, objects=objects, config_text=config_text, run_dir=run_dir, state=state,
                   engine=engine, base_ready=base_ready, val_data=val_data, retrain_data=retrain_data,
                   base_accuracy=base_accuracy)

    @staticmethod
    def _check_combination(config: Namespace, objects: Namespace) -> None:
        """Sections that are fine alone but do not work together (found before anything is written)."""
        objective, search = objects.objective, objects.search
        if objective.multi and objects.evaluation.method == "race":
            raise ConfigurationError(f"evaluation.method: racing needs a scalar objective, but "
                                     f"{_class_path(config, 'objective')} has several values: use method full")
        try:
            # a throwaway copy: the real search starts on the trained base with the run's generator
            copy.deepcopy(search).start(objects.genotype, objective, np.random.default_rng(0))
        except ValueError as error:
            raise ConfigurationError(f"search > {_class_path(config, 'search')}: {error}") from error
        pbt = objects.pbt
        if pbt is None:
            return
        if getattr(objects.genotype, "dtype_kind", None) != "b":
            raise ConfigurationError(f"pbt: PBT cycles need a genotype with boolean (mask) genomes such as "
                                     f"MaskGenotype, got {_class_path(config, 'genotype')}")
        if pbt.images_per_class is not None:
            try:
                images_per_class(*tensors(objects.data.train_set), pbt.images_per_class, torch.Generator().manual_seed(0))
            except ValueError as error:
                raise ConfigurationError(f"pbt > images_per_class: {error}") from error

    @staticmethod
    def _data(config: Namespace, objects: Namespace) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                            tuple[torch.Tensor, torch.Tensor] | None]:
        """The validation split (fitness) and the evaluator's retraining samples, as tensors."""
        data = objects.data
        data.setup("fit")
        val_data = tensors(data.val_set)
        per_class = config.retraining.images_per_class
        if objects.evaluation.retrain_steps == 0:
            if per_class is not None:
                raise ConfigurationError(f"retraining.images_per_class: {per_class} images per class to retrain on, "
                                         "but evaluation.retrain_steps is 0 (PBT members retrain on "
                                         "pbt.init_args.images_per_class)")
            return val_data, None
        train = tensors(data.train_set)
        if per_class is None:
            return val_data, train
        try:
            # the draw depends on the seed alone
            return val_data, images_per_class(*train, per_class, torch.Generator().manual_seed(config.seed))
        except ValueError as error:
            raise ConfigurationError(f"retraining.images_per_class: {error}") from error
    @staticmethod
    def _find_resumed(config: Namespace, config_text: str, resume: str) -> tuple[Path, dict[str, Any] | None]:
        if resume == "latest":
            # the newest run that got as far as its config (a run refused after its base network was
            # trained leaves a version folder with base.ckpt only: nothing to continue there)
            folder = Path(config.root) / config.name
            run_dir = latest_version_dir(folder, containing="config.yaml") or latest_version_dir(folder)
            if run_dir is None:
                raise ConfigurationError(f"resume: no run named {config.name!r} in {config.root} to resume")
        else:
            run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            # config.yaml is written once the base network is ready: a run stopped before has nothing to continue
            raise ConfigurationError(f"resume: {run_dir} has no config.yaml (not an evolve run, or one stopped before "
                                     "its base network was ready): start a new run")
        stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        current = yaml.safe_load(config_text) or {}
        changed = sorted(key for key in set(_comparable(stored)) | set(_comparable(current))
                         if stored.get(key) != current.get(key))
        if changed:
            raise ConfigurationError(
                f"resume: the config differs from the one {run_dir} ran with in {', '.join(changed)} "
                f"(only engine, engine_options, wandb, root and generations may change)")
        state_path = run_dir / STATE_FILE
        state = torch.load(state_path, map_location="cpu", weights_only=True) if state_path.is_file() else None
        done = state.get("generation") if state is not None and config.pbt is None else None
        if done is not None and int(done) > config.generations:
            raise ConfigurationError(f"generations: {run_dir} already completed {int(done)} generations; pass "
                                     f"--generations {int(done)} or more to resume it (got {config.generations})")
        return run_dir, state

    @staticmethod
    def _make_engine(config: Namespace) -> Any:
        from growprune.evolution.engines import make_engine

        try:
            return make_engine(config.engine, **dict(config.engine_options or {}))
        except ImportError as error:
            raise ConfigurationError(f"engine: {error}") from error
        except (ValueError, TypeError) as error:
            raise ConfigurationError(f"engine: {error}") from error

    @staticmethod
    def _check_objective(config: Namespace, objects: Namespace, module: GrowPruneModule,
                         val_data: tuple[torch.Tensor, torch.Tensor], written: Path | None) -> float:
        """The base network's validation accuracy, checked against the objective (e.g. its floor)."""
        accuracy = accuracy_of(module, *val_data)
        try:
            objects.objective.check(accuracy)
        except ValueError as error:
            where = f"objective > {_class_path(config, 'objective')}"
            note = (f" (nothing was written but the trained base network, {written}; reuse it with "
                    f"--base.checkpoint {written})") if written is not None else ""
            raise ConfigurationError(f"{where}: {error}{note}") from error
        return accuracy

    # --------------------------------------------------------------------------------- running
    def execute(self) -> Path:
        """Run (or continue) the search and write every output; returns the summary's path."""
        wandb_run: WandbRun | None = None
        try:
            self._create_run_dir()
            self._prepare_base()
            wandb_run = self._start_wandb()
            summary_path = self._run(wandb_run)
        except BaseException:
            if wandb_run is not None:
                wandb_run.finish(exit_code=1)
            raise
        finally:
            self.engine.close()
        wandb_run.finish(exit_code=0)
        print(f"summary: {shown_path(summary_path)}", flush=True)
        return summary_path

    def _create_run_dir(self) -> None:
        if self.run_dir is not None:
            print(f"growprune: continuing run {self.run_dir}", file=sys.stderr, flush=True)
            return
        self.run_dir = next_version_dir(Path(self.config.root) / self.config.name)

    def _prepare_base(self) -> None:
        """Train the base network here (unless loaded), save ``base.ckpt`` and check the objective."""
        assert self.run_dir is not None
        module: GrowPruneModule = self.objects.model
        path = self.run_dir / "base.ckpt"
        if not self.base_ready:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)  # dropout etc. during base training; restored after
                # "warn": CUDA kernels without a deterministic version warn instead of failing (CPU runs are exact)
                trainer = quiet_trainer(max_epochs=self.config.base.epochs, accelerator="auto", deterministic="warn")
                trainer.fit(module, datamodule=self.objects.data)
                save_checkpoint_atomically(trainer, path, weights_only=False)  # a fit checkpoint: optimizer state too
            module.cpu()
            self.base_accuracy = self._check_objective(self.config, self.objects, module, self.val_data, written=path)
            self.base_ready = True
        elif not path.is_file():
            # a copy in the run directory: a resumed run must not depend on a file that may change
            shutil.copyfile(self.config.base.checkpoint, path)
        if not (self.run_dir / "config.yaml").is_file():
            (self.run_dir / "config.yaml").write_text(self.config_text)
            (self.run_dir / "validate.yaml").write_text(self._validate_yaml())
        # the genotype reads the trained weights (magnitudes) now
        self.objects.genotype.bind(module)
        print(f"base network: validation accuracy {self.base_accuracy:.4f}", flush=True)

    def _validate_yaml(self) -> str:
        config = yaml.safe_load(self.config_text) or {}
        header = ("# The model and data of this evolve run: reload its best network with\n"
                  f"#   growprune validate -c {self.run_dir}/validate.yaml --ckpt_path {self.run_dir}/best.ckpt\n")
        return header + yaml.safe_dump({"model": config.get("model"), "data": config.get("data")}, sort_keys=False)

    def _start_wandb(self) -> WandbRun:
        assert self.run_dir is not None
        config = yaml.safe_load(self.config_text) or {}
        run_id = (self.state or {}).get("wandb_run_id")
        return WandbRun(self.config.wandb.mode, self.config.wandb.project, self.run_dir,
                        f"{self.config.name}/{self.run_dir.name}", config, run_id)

    def _run(self, wandb_run: WandbRun) -> Path:
        if self.config.pbt is not None:
            return self._run_pbt(wandb_run)
        return self._run_generations(wandb_run)

    # ------------------------------------------------------------------------- plain generations
    def _bind_evaluator(self) -> None:
        self.objects.evaluation.bind(self.objects.model.model, *self.val_data, *(self.retrain_data or ()))

    def _run_generations(self, wandb_run: WandbRun) -> Path:
        from growprune.evolution.loop import Journal, evolve

        assert self.run_dir is not None
        objects, config = self.objects, self.config
        self._bind_evaluator()
        search = objects.search
        search.start(objects.genotype, objects.objective, np.random.default_rng(config.seed))
        counters = {"evaluations": 0, "macs": 0, "macs_full": 0, "wall_seconds": 0.0}
        start_generation = 0
        if self.state is not None:
            search.load_state_dict(self.state["search"])
            start_generation = int(self.state["generation"])
            counters.update(self.state.get("counters", {}))
        log = GenerationLog(self.run_dir / CSV_FILE)
        backup = log.truncate(start_generation)
        if backup is not None:
            print(f"growprune: rows logged after generation {start_generation} are only in {backup.name}",
                  file=sys.stderr, flush=True)
        journal = Journal(self.run_dir / JOURNAL_FILE)
        started = time.perf_counter()
        wall_before = float(counters["wall_seconds"])

        def save_state(generation: int) -> None:
            counters["wall_seconds"] = wall_before + time.perf_counter() - started
            atomic_torch_save({"search": search.state_dict(), "generation": generation, "counters": dict(counters),
                               "wandb_run_id": wandb_run.id, "seed": config.seed}, self.run_dir / STATE_FILE)

        if self.state is None:
            save_state(0)  # the started search: a run killed during generation 0 resumes from here
        with _progress(config.generations, start_generation) as bar:

            def on_generation(record: Any) -> None:
                row = record.as_row()
                row["best_sparsity"] = 1.0 - float(row["best_density"])
                row["wall_seconds"] = round(wall_before + time.perf_counter() - started, 3)
                counters.update(evaluations=int(row["evaluations_total"]), macs=int(row["macs_total"]),
                                macs_full=int(row["macs_full_total"]))
                log.append(row)
                wandb_run.log(row, step=int(row["generation"]))
                save_state(int(row["generation"]) + 1)  # generations completed
                bar.update(1)
                bar.set_postfix(best=f"{float(row['best_fitness']):.4f}")

            with journal:
                evolve(search, objects.genotype, objects.objective, objects.evaluation, self.engine,
                       generations=config.generations, chunks=config.chunks, journal=journal,
                       start_generation=start_generation, on_generation=on_generation)
        counters["wall_seconds"] = wall_before + time.perf_counter() - started
        best = search.best()
        decoded = objects.genotype.decode(objects.model, best.genome)
        if objects.evaluation.retrain_steps > 0:
            retrain_like_the_evaluator(objects.evaluation, objects.genotype, best.genome, decoded)
        front = [(float(item.size), float(item.accuracy)) for item in search.front() if item.size is not None]
        return self._finish(best, decoded, front, counters, wandb_run, generations=config.generations)

    # ------------------------------------------------------------------------------------- PBT
    def _run_pbt(self, wandb_run: WandbRun) -> Path:
        """PBT cycles (:class:`~growprune.evolution.pbt.PBTCycles`) instead of plain generations.

        One ``generations.csv`` row and one ``state.pt`` per cycle; the members' checkpoints go to
        ``members/``, each member's GA journal to ``journals/``. ``generations`` is not used: the
        run has ``pbt.cycles`` cycles.
        """
        from growprune.evolution.pbt import load_member

        assert self.run_dir is not None
        objects, config, pbt = self.objects, self.config, self.objects.pbt
        template = copy.deepcopy(objects.search)  # unstarted: every member's GA starts from a copy
        train = tensors(objects.data.train_set)
        rng = np.random.default_rng(config.seed)
        counters = {"evaluations": 0, "macs": 0, "macs_full": 0, "wall_seconds": 0.0}
        start_cycle, pbt_state = 0, None
        if self.state is not None:
            pbt_state = self.state["pbt"]
            start_cycle = int(self.state["generation"])
            counters.update(self.state.get("counters", {}))
        log = GenerationLog(self.run_dir / CSV_FILE)
        log.truncate(start_cycle)
        started, wall_before = time.perf_counter(), float(counters["wall_seconds"])
        run_dir = self.run_dir

        def save_state(state: dict[str, Any] | None, cycles: int) -> None:
            counters["wall_seconds"] = wall_before + time.perf_counter() - started
            atomic_torch_save({"pbt": state, "generation": cycles, "counters": dict(counters),
                               "wandb_run_id": wandb_run.id, "seed": config.seed}, run_dir / STATE_FILE)

        with _progress(pbt.cycles, start_cycle) as bar:

            def on_cycle(record: dict[str, Any]) -> None:
                cycle = int(record["cycle"])
                spent = journal_totals(run_dir / "journals" / f"cycle_{cycle}")
                counters.update(evaluations=counters["evaluations"] + spent[0], macs=counters["macs"] + spent[1],
                                macs_full=counters["macs_full"] + spent[2])
                row = {"generation": cycle, "best_fitness": record["best_fitness"],
                       "mean_fitness": record["mean_fitness"], "front_size": len(record["accuracies"]),
                       "best_accuracy": record["best_accuracy"], "best_size": record["best_size"],
                       "best_density": record["best_density"], "best_sparsity": 1.0 - record["best_density"],
                       "best_member": record["best_member"], "exploits": len(record["exploits"]),
                       "evaluations": spent[0], "macs": spent[1], "macs_full": spent[2],
                       "evaluations_total": counters["evaluations"], "macs_total": counters["macs"],
                       "macs_full_total": counters["macs_full"],
                       "wall_seconds": round(wall_before + time.perf_counter() - started, 3)}
                log.append(row)
                wandb_run.log(row, step=cycle)
                save_state(record["state"], cycle + 1)
                bar.update(1)
                bar.set_postfix(best=f"{float(row['best_fitness']):.4f}")

            if self.state is None:
                save_state(None, 0)
            final = pbt.run(objects.model, objects.genotype, objects.objective, lambda: copy.deepcopy(template),
                            objects.evaluation, self.engine, train, self.val_data, run_dir, rng,
                            start_cycle=start_cycle, state=pbt_state, on_cycle=on_cycle)
        counters["wall_seconds"] = wall_before + time.perf_counter() - started
        chosen = final["best"]
        best = Individual(genome=chosen["genome"].numpy().copy(), accuracy=chosen["accuracy"], size=chosen["size"],
                          fitness=tuple(chosen["fitness"]), extra={"member": chosen["member"], "cycle": chosen["cycle"]})
        decoded = load_member(objects.model, chosen["path"])
        last = final["history"][-1]
        front = list(zip(last["sizes"], last["accuracies"]))
        return self._finish(best, decoded, front, counters, wandb_run, generations=int(final["cycle"]),
                            extra_paths=("members", "journals"))

    # ---------------------------------------------------------------------------------- outputs
    def _finish(self, best: Individual, decoded: GrowPruneModule, front: list[tuple[float, float]],
                counters: dict[str, Any], wandb_run: WandbRun, generations: int,
                extra_paths: tuple[str, ...] = (JOURNAL_FILE,)) -> Path:
        """Evaluate the best network on the validation and test splits with a Lightning trainer,
        save it as ``best.ckpt``, and write ``summary.json`` and ``front.png``."""
        assert self.run_dir is not None
        objects, config = self.objects, self.config
        genotype, data = objects.genotype, objects.data
        decoded = decoded.cpu()
        trainer = quiet_trainer(accelerator="cpu")
        validation = trainer.validate(decoded, dataloaders=data.val_dataloader(), verbose=False)[0]
        data.setup("test")
        test = (trainer.test(decoded, dataloaders=data.test_dataloader(), verbose=False)[0]
                if data.test_set is not None and len(data.test_set) else {})
        best_path = self.run_dir / "best.ckpt"
        save_checkpoint_atomically(trainer, best_path, weights_only=True)
        sizes = decoded.size_metrics(include_original=True)
        measure = objects.objective.measure
        summary: dict[str, Any] = {
            "name": config.name,
            "engine": config.engine,
            "generations": generations,
            "evaluations": int(counters["evaluations"]),
            "macs": int(counters["macs"]),
            "macs_full": int(counters["macs_full"]),
            "wall_seconds": round(float(counters["wall_seconds"]), 3),
            "base": {"val/acc": self.base_accuracy, "params": sizes["params/original"]},
            "best": {
                "genome_key": best.key,
                "fitness": list(best.fitness) if best.fitness is not None else None,
                "accuracy/selection": best.accuracy,
                "val/acc": float(validation["val/acc"]),
                "test/acc": float(test["test/acc"]) if "test/acc" in test else None,
                "size": best.size,
                "size/measure": measure,
                "size/original": genotype.original_size(measure),
                "density": genotype.density(best.genome),
                "sparsity": 1.0 - genotype.density(best.genome),
                "params/nonzero": sizes["params/nonzero"],
                "flops/effective": sizes["flops/effective"],
                "compression": sizes["compression"],
            },
            "front_size": len(front),
            "mode": "pbt" if config.pbt is not None else "generations",
            "retrained": config.pbt is None and objects.evaluation.retrain_steps > 0,
            "paths": {name: str(self.run_dir / name) for name in
                      ("config.yaml", "validate.yaml", "base.ckpt", "best.ckpt", CSV_FILE, STATE_FILE, "front.png",
                       *extra_paths)},
        }
        plot_front(self.run_dir / "front.png", journal_points(self.run_dir), front, best,
                   GenerationLog(self.run_dir / CSV_FILE).rows(), genotype.original_size(measure), measure)
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        flat = flatten_summary(summary)
        wandb_run.summarise(flat)
        print(format_summary({key: value for key, value in flat.items() if not key.startswith("paths/")}, "evolve"), flush=True)
        return path


@contextlib.contextmanager
def _progress(total: int, initial: int) -> Iterator[Any]:
    """A tqdm bar over the generations (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="generations", unit="gen", disable=None, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------ plot
def _journal_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The entries of a JSON-lines journal (a torn last line after ``kill -9`` is skipped)."""
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            yield entry


def journal_totals(folder: Path) -> tuple[int, int, int]:
    """Evaluations, MACs spent and full-evaluation MACs recorded in the journals under ``folder``."""
    evaluations = macs = macs_full = 0
    for path in sorted(folder.rglob("*.jsonl")) if folder.is_dir() else []:
        for entry in _journal_lines(path):
            evaluations += 1
            macs += int(entry.get("macs", 0))
            macs_full += int(entry.get("macs_full", 0))
    return evaluations, macs, macs_full


def journal_points(run_dir: Path) -> list[tuple[float, float]]:
    """(size, accuracy) of every evaluation in the run's journal(s)."""
    paths = [run_dir / JOURNAL_FILE] if (run_dir / JOURNAL_FILE).is_file() else sorted((run_dir / "journals").rglob("*.jsonl"))
    return [(float(entry["size"]), float(entry["accuracy"])) for path in paths for entry in _journal_lines(path)
            if entry.get("size") is not None and entry.get("accuracy") is not None]


def plot_front(path: Path, points: list[tuple[float, float]], front: list[tuple[float, float]], best: Individual,
               rows: list[dict[str, str]], original: float, measure: str) -> None:
    """``front.png``: accuracy against relative size (every evaluation, the front or the last
    population, the best) and the best and mean fitness per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if points:
        sizes, accuracies = zip(*points)
        left.scatter(np.array(sizes) / original, accuracies, s=6, c="0.7", label="evaluated")
    ranked = sorted(front)
    if ranked:
        left.plot([size / original for size, _ in ranked], [accuracy for _, accuracy in ranked], "o-", c="tab:blue",
                  ms=4, label="front" if len(ranked) > 1 else "best")
    if best.size is not None and best.accuracy is not None:
        left.scatter([best.size / original], [best.accuracy], marker="*", s=160, c="tab:red", zorder=3, label="best")
    left.set_xlabel(f"{measure} / original")
    left.set_ylabel("validation accuracy")
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)
    if rows:
        generations = [int(row["generation"]) for row in rows]
        for key, style in (("best_fitness", "-"), ("mean_fitness", "--")):
            values = [float(row[key]) if row.get(key) not in (None, "") else math.nan for row in rows]
            right.plot(generations, values, style, marker="o", ms=3, label=key.replace("_", " "))
        right.set_xlabel("generation")
        right.set_ylabel("fitness (first value)" if "best_fitness_1" in rows[0] else "fitness")
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    path.write_bytes(buffer.getvalue())
