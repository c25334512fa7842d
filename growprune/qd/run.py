"""One ``growprune qd`` run: MAP-Elites (pyribs) over a :class:`~growprune.qd.QDTask`, with its run
directory, checkpoints, resume, W&B and outputs.

The run directory is ``<root>/<name>/version_<n>`` (a new one per run, never overwritten):

* ``config.yaml``: the full config (``--resume <run dir>`` reads it back);
* whatever the task keeps (:class:`~growprune.qd.SupervisedMaskTask`: ``base.ckpt``);
* ``iterations.csv``: one row per iteration (iteration, coverage, qd_score, objective_max,
  objective_mean, num_elites, evaluations, wall_time, and nonfinite_measures: solutions with a
  descriptor value that was NaN (put at the range's low end) or infinite (clipped into the range);
  each elite's own count is the archive field ``nonfinite_measures``); the same row goes to W&B;
* ``state.pkl``: the ribs scheduler (archive and emitters with their generators), the iteration
  and counters, written atomically every ``checkpoint_every`` iterations and after the last;
* at the end: ``archive.pkl`` (the ribs archive; :func:`load_run` reloads it with the task),
  ``archive.csv`` (one row per elite: cell index, objective, descriptors, lineage fields,
  ``nonfinite_measures`` and, for
  float solutions only, the solution), ``heatmap.png`` (``ribs.visualize``; 1 or 2 descriptors),
  the best elite (:meth:`QDTask.save_elite`) and ``summary.json``; the last line printed is
  ``summary: <path>``.

Every iteration asks all emitters, evaluates the solutions in ``chunks`` tasks through the engine
(:func:`~growprune.qd.evaluate_chunk`; evaluation is deterministic and the chunks depend on the
config only, so every engine gives the same archive) and tells the scheduler, with the lineage
fields ``depth``, ``root_objective``, ``parent_objective`` and ``iteration`` stored next to each
elite. Emitters that know their parents set ``last_lineage`` in ``ask`` (see
:class:`~growprune.qd.MaskMutationEmitter`); others count as roots (depth 0). A root's
``root_objective`` is its own objective.

Resume (``--resume``, also after ``kill -9``): the run continues from ``state.pkl``; the iterations
after it run again with the same draws (the generators are part of the state), so the final
archive and ``iterations.csv`` (but its wall times) equal those of an uninterrupted run. Rows of
``iterations.csv`` beyond the state are dropped (the old file is kept as
``iterations-before-resume.csv``). A resumed run may change only ``iterations``, ``engine``,
``engine_options``, ``wandb`` and ``root``.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import inspect
import io
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import yaml
from jsonargparse import Namespace

from growprune.errors import ConfigurationError
from growprune.evolution.run import (
    GenerationLog,
    WandbRun,
    flatten_summary,
    latest_version_dir,
    next_version_dir,
    shown_path,
)
from growprune.qd.tasks import QDTask, evaluate_chunk
from growprune.runs import format_summary

STATE_FILE = "state.pkl"
CSV_FILE = "iterations.csv"
ARCHIVE_FILE = "archive.pkl"
ARCHIVE_CSV = "archive.csv"
HEATMAP_FILE = "heatmap.png"
SUMMARY_FILE = "summary.json"
BEST_FILE = "best.ckpt"
EXTRA_INSTALL = "pip install 'growprune[qd]'"
# Keys a resumed run may change (they do not change its result: engines give identical results,
# more iterations extend the run, W&B only records).
RESUMABLE_KEYS = ("engine", "engine_options", "wandb", "iterations", "resume", "config", "root")
ARCHIVE_TYPES = ("grid", "cvt")
#: cells per descriptor of a grid archive without dims
DEFAULT_CELLS = 20
#: the lineage fields stored next to every elite (see the module docstring)
LINEAGE_FIELDS = {"depth": np.int32, "root_objective": np.float32, "parent_objective": np.float32,
                  "iteration": np.int32}
# per-elite fields stored next to each solution: the lineage, and how many of its descriptor values
# were NaN or infinite and clipped into the archive's range (so a clipped elite is never mistaken
# for a measured one)
EXTRA_FIELDS = {**LINEAGE_FIELDS, "nonfinite_measures": np.int32}
# the run's parameters that emitters get when their __init__ takes them (archive is always passed)
INJECTED = ("archive", "task", "x0", "seed")
# sub-seeds of the run seed (np.random.SeedSequence([seed, key]))
_ARCHIVE_SEED, _X0_SEED, _EMITTER_SEED = 1, 2, 1000


def require_ribs() -> Any:
    """Import pyribs.

    Raises:
        ConfigurationError: pyribs is not installed (the message names the extra to install).
    """
    try:
        import ribs
        import ribs.archives
        import ribs.emitters
        import ribs.schedulers
    except ImportError as error:
        raise ConfigurationError(f"growprune qd needs pyribs, which is not installed: {EXTRA_INSTALL}") from error
    return ribs


def derived_seed(seed: int, key: int) -> int:
    """A seed for one part of the run (archive, an emitter, ...), from the run seed and the part's key."""
    return int(np.random.SeedSequence([int(seed), int(key)]).generate_state(1)[0])


# ------------------------------------------------------------------------------- state pickling
class _TaskPickler(pickle.Pickler):
    """Pickles the scheduler with a reference in place of the task (data, models: rebuilt by bind)."""

    def __init__(self, file: Any, task: QDTask) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._task = task

    def persistent_id(self, obj: Any) -> str | None:
        return "task" if obj is self._task else None


class _TaskUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, task: QDTask) -> None:
        super().__init__(file)
        self._task = task

    def persistent_load(self, pid: Any) -> Any:
        if pid == "task":
            return self._task
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def atomic_pickle(value: Any, path: Path, task: QDTask | None = None) -> None:
    """Pickle ``value`` to a temporary file, flush it to disk, rename it over ``path``: a crash
    leaves the previous file or the new one, never a torn one. References to ``task`` are stored
    as a reference (see :func:`load_pickle`)."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        if task is None:
            pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            _TaskPickler(handle, task).dump(value)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_pickle(path: Path, task: QDTask | None = None) -> Any:
    """Read a file of :func:`atomic_pickle`; task references become ``task``. Only for files this
    program wrote: unpickling runs code."""
    with Path(path).open("rb") as handle:
        return _TaskUnpickler(handle, task).load() if task is not None else pickle.load(handle)


# ------------------------------------------------------------------------------------ emitters
@dataclass
class EmitterSpec:
    """One ``emitters`` entry: the class, its arguments and how many copies."""

    cls: type
    init_args: dict[str, Any]
    count: int
    where: str

    def build(self, archive: Any, task: QDTask, seed: int, first_index: int) -> list[Any]:
        """``count`` emitters on ``archive``; the run's parameters injected where the class takes them.

        Raises:
            ConfigurationError: the class refused its arguments.
        """
        accepted = _parameters(self.cls)
        emitters = []
        for copy_index in range(self.count):
            arguments = dict(self.init_args)
            if "task" in accepted and "task" not in arguments:
                arguments["task"] = task
            if "x0" in accepted and "x0" not in arguments:
                rng = np.random.default_rng(derived_seed(seed, _X0_SEED))
                arguments["x0"] = task.initial_solutions(1, rng)[0]
            if "seed" in accepted and arguments.get("seed") is None:
                arguments["seed"] = derived_seed(seed, _EMITTER_SEED + first_index + copy_index)
            try:
                emitters.append(self.cls(archive, **arguments))
            except (ValueError, TypeError, AttributeError) as error:
                raise ConfigurationError(f"{self.where} > {self.cls.__name__}: {_first_line(error)}") from error
        return emitters


def _parameters(cls: type) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters of ``cls.__init__`` (``None``: it takes ``**kwargs``)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name: p for p in parameters}


def parse_emitters(entries: Sequence[Any]) -> list[EmitterSpec]:
    """Check the ``emitters`` section: class paths, argument names, counts.

    Raises:
        ConfigurationError: one line naming the entry and the problem (an unknown argument: the
            valid ones).
    """
    from ribs.emitters import EmitterBase

    if not entries:
        raise ConfigurationError("emitters: give at least one emitter ({class_path, init_args, count})")
    specs = []
    for index, entry in enumerate(entries):
        where = f"emitters[{index}]"
        entry = dict(entry) if isinstance(entry, (dict, Namespace)) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("class_path"), str):
            raise ConfigurationError(f"{where}: must be a mapping with class_path (and init_args, count), got {entry!r}")
        unknown = sorted(set(entry) - {"class_path", "init_args", "count"})
        if unknown:
            raise ConfigurationError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: class_path, init_args, count")
        path = entry["class_path"]
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name) if module_name else None
        except ImportError as error:
            raise ConfigurationError(f"{where} > class_path: cannot import {path!r}: {_first_line(error)}") from error
        except AttributeError:
            cls = None
        if cls is None:
            raise ConfigurationError(f"{where} > class_path: {path!r} does not name a class")
        if not (inspect.isclass(cls) and issubclass(cls, EmitterBase)):
            raise ConfigurationError(f"{where} > class_path: {path!r} is not a pyribs emitter (ribs.emitters.EmitterBase)")
        init_args = dict(entry.get("init_args") or {})
        accepted = _parameters(cls)
        if accepted is not None:
            valid = sorted(name for name in accepted if name != "archive")
            for key in init_args:
                if key not in accepted or key == "archive":
                    raise ConfigurationError(f"{where} > {cls.__name__}: unknown init_args key {key!r}; valid: "
                                             f"{', '.join(valid)}")
            missing = [name for name, p in accepted.items() if p.default is inspect.Parameter.empty
                       and name not in init_args and name not in INJECTED
                       and p.kind not in (inspect.Parameter.VAR_POSITIONAL,)]
            if missing:
                raise ConfigurationError(f"{where} > {cls.__name__}: init_args misses {', '.join(missing)}")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"{where} > count: must be an integer >= 1, got {count!r}")
        specs.append(EmitterSpec(cls=cls, init_args=init_args, count=count, where=where))
    return specs


# ------------------------------------------------------------------------------------- archive
def grid_dims(section: Any, count: int) -> list[int]:
    """A grid's cells per descriptor: ``archive.dims``, or :data:`DEFAULT_CELLS` each when it is null."""
    dims = section.get("dims")
    return [DEFAULT_CELLS] * count if dims is None else list(dims)


def check_archive(section: Any, descriptors: Sequence[str]) -> None:
    """Check the ``archive`` section against the descriptors (before anything is written).

    Raises:
        ConfigurationError: an unknown type, dims / ranges that do not match the descriptors, an
            empty or non-finite range, a bad cell count.
    """
    kind = section.get("type")
    if kind not in ARCHIVE_TYPES:
        raise ConfigurationError(f"archive.type: must be one of {', '.join(ARCHIVE_TYPES)}, got {kind!r}")
    count = len(descriptors)
    if kind == "grid":
        dims = grid_dims(section, count)
        if len(dims) != count:
            raise ConfigurationError(f"archive.dims: one cell count per descriptor ({count}: {', '.join(descriptors)}), "
                                     f"got {dims}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ConfigurationError(f"archive.dims: cell counts must be integers >= 1, got {list(dims)}")
        if section.get("cells") is not None:
            raise ConfigurationError("archive.cells: only for cvt archives (a grid has dims)")
    else:
        cells = section.get("cells")
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
            raise ConfigurationError(f"archive.cells: a cvt archive needs an integer number of cells >= 1, got {cells!r}")
        if section.get("dims") is not None:
            raise ConfigurationError("archive.dims: only for grid archives (a cvt archive has cells)")
        samples = section.get("samples")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < cells:
            raise ConfigurationError(f"archive.samples: must be an integer >= cells ({cells}), got {samples!r}")
    ranges = section.get("ranges")
    if ranges is None or len(ranges) != count:
        raise ConfigurationError(f"archive.ranges: one (low, high) per descriptor ({count}: {', '.join(descriptors)}), "
                                 f"got {0 if ranges is None else len(ranges)}")
    for name, bounds in zip(descriptors, ranges):
        if len(bounds) != 2:
            raise ConfigurationError(f"archive.ranges: the range of {name} must be (low, high), got {list(bounds)}")
        low, high = (float(value) for value in bounds)
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ConfigurationError(f"archive.ranges: the range of {name} is empty or not finite: low {low} must be "
                                     f"below high {high}")


def build_archive(section: Any, task: QDTask, seed: int) -> Any:
    """The ribs archive of the config (checked by :func:`check_archive`): solutions of the task's
    dimension and dtype, the lineage extra fields; a CVT's centroids by k-means seeded by the run."""
    from ribs.archives import CVTArchive, GridArchive, k_means_centroids

    ranges = [tuple(float(v) for v in bounds) for bounds in section["ranges"]]
    common = {"solution_dim": task.solution_dim, "ranges": ranges, "seed": derived_seed(seed, _ARCHIVE_SEED),
              "qd_score_offset": float(section.get("qd_score_offset") or 0.0), "solution_dtype": task.solution_dtype,
              "extra_fields": {name: ((), dtype) for name, dtype in EXTRA_FIELDS.items()}}
    if section["type"] == "grid":
        return GridArchive(dims=grid_dims(section, len(ranges)), **common)
    centroids, _ = k_means_centroids(centroids=int(section["cells"]), ranges=ranges, samples=int(section["samples"]),
                                     seed=derived_seed(seed, _ARCHIVE_SEED))
    return CVTArchive(centroids=centroids, **common)


def archive_rows(archive: Any, descriptors: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per elite (sorted by cell index): index, objective, descriptors, extra fields and,
    for float solutions, ``solution_<i>``."""
    data = archive.data()
    order = np.argsort(data["index"], kind="stable")
    float_solutions = np.dtype(archive.dtypes["solution"]).kind == "f"
    rows = []
    for position in order:
        row: dict[str, Any] = {"index": int(data["index"][position]), "objective": float(data["objective"][position])}
        row.update({name: float(value) for name, value in zip(descriptors, data["measures"][position])})
        for name in EXTRA_FIELDS:
            if name in data:
                value = data[name][position]
                row[name] = int(value) if np.issubdtype(np.asarray(value).dtype, np.integer) else float(value)
        if float_solutions:
            row.update({f"solution_{i}": float(v) for i, v in enumerate(np.ravel(data["solution"][position]))})
        rows.append(row)
    return rows


def write_archive_csv(archive: Any, descriptors: Sequence[str], path: Path) -> None:
    """``archive.csv`` (see :func:`archive_rows`)."""
    rows = archive_rows(archive, descriptors)
    header = ["index", "objective", *descriptors, *EXTRA_FIELDS]
    if rows:
        header += [key for key in rows[0] if key not in header]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def plot_heatmap(archive: Any, descriptors: Sequence[str], path: Path, title: str) -> bool:
    """``heatmap.png`` of a 1-D or 2-D archive (``ribs.visualize``); returns False (and writes
    nothing) for more descriptors."""
    if len(descriptors) > 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ribs.archives import GridArchive

    figure, axis = plt.subplots(figsize=(6.4, 5.0) if len(descriptors) == 2 else (8.0, 2.6))
    heatmap = _ribs_heatmap(isinstance(archive, GridArchive))
    if heatmap is not None:
        heatmap(archive, ax=axis, cmap="viridis")
    else:
        _plain_heatmap(archive, axis)
    axis.set_xlabel(descriptors[0])
    if len(descriptors) == 2:
        axis.set_ylabel(descriptors[1])
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    path.write_bytes(buffer.getvalue())
    return True


def _ribs_heatmap(grid: bool) -> Any:
    """``ribs.visualize``'s heatmap function for the archive type, or ``None`` when a package it
    needs is missing (pyribs' ``visualize`` extra: seaborn, shapely)."""
    try:
        from ribs.visualize import cvt_archive_heatmap, grid_archive_heatmap
    except ImportError:
        return None
    return grid_archive_heatmap if grid else cvt_archive_heatmap


def _plain_heatmap(archive: Any, axis: Any) -> None:
    """The heatmap without ``ribs.visualize``: a grid's cells (1-D: one row) or a CVT's occupied
    centroids, coloured by their elite's objective."""
    data = archive.data()
    index = np.asarray(data["index"], dtype=np.int64)
    lows, highs = archive.lower_bounds, archive.upper_bounds
    if hasattr(archive, "dims"):
        dims = [int(d) for d in archive.dims]
        values = np.full(int(np.prod(dims)), np.nan)
        values[index] = data["objective"]
        if len(dims) == 1:
            image = axis.pcolormesh(np.linspace(lows[0], highs[0], dims[0] + 1), [0, 1], values[None, :], cmap="viridis")
            axis.set_yticks([])
        else:
            # ribs' integer index is row-major over (dim 0, dim 1): reshape, x = dim 0
            grid = values.reshape(dims).T
            image = axis.pcolormesh(np.linspace(lows[0], highs[0], dims[0] + 1),
                                    np.linspace(lows[1], highs[1], dims[1] + 1), grid, cmap="viridis")
    else:
        centroids = np.asarray(archive.centroids)[index]
        y = centroids[:, 1] if centroids.shape[1] > 1 else np.zeros(len(centroids))
        image = axis.scatter(centroids[:, 0], y, c=data["objective"], cmap="viridis", s=12)
        axis.set_xlim(lows[0], highs[0])
        if centroids.shape[1] > 1:
            axis.set_ylim(lows[1], highs[1])
    axis.figure.colorbar(image, ax=axis)


# ----------------------------------------------------------------------------------------- run
def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in RESUMABLE_KEYS}


@contextlib.contextmanager
def _progress(total: int, initial: int) -> Iterator[Any]:
    """A tqdm bar over the iterations (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="iterations", unit="it", disable=None, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


@dataclass
class QDRun:
    """A prepared ``growprune qd`` run; :meth:`execute` runs it.

    Build it with :meth:`prepare`, which does every check that needs no file written.
    """

    config: Namespace
    task: QDTask
    config_text: str
    run_dir: Path | None
    state: dict[str, Any] | None
    engine: Any
    emitters: list[EmitterSpec]

    @classmethod
    def prepare(cls, config: Namespace, task: QDTask, config_text: str, resume: str | None = None) -> "QDRun":
        """Check the config before anything is written: pyribs, the run to resume (same config,
        enough iterations), the descriptors, the archive, the emitters, the engine.

        Raises:
            ConfigurationError: one line naming the config key and the problem.
        """
        require_ribs()
        if not isinstance(task, QDTask):
            raise ConfigurationError(f"task: {type(task).__name__} is not a growprune.qd.QDTask")
        descriptors = list(config.descriptors or [])
        try:
            task.check_descriptors(descriptors)
        except ValueError as error:
            raise ConfigurationError(f"descriptors: {_first_line(error)}") from error
        check_archive(config.archive, descriptors)
        emitters = parse_emitters(config.emitters or [])
        run_dir, state = (None, None)
        if resume is not None:
            run_dir, state = cls._find_resumed(config, config_text, resume, task)
        from growprune.evolution.engines import make_engine

        try:
            engine = make_engine(config.engine, **dict(config.engine_options or {}))
        except (ImportError, ValueError, TypeError) as error:
            raise ConfigurationError(f"engine: {_first_line(error)}") from error
        return cls(config=config, task=task, config_text=config_text, run_dir=run_dir, state=state, engine=engine,
                   emitters=emitters)

    @staticmethod
    def _find_resumed(config: Namespace, config_text: str, resume: str, task: QDTask) -> tuple[Path, dict[str, Any] | None]:
        if resume == "latest":
            folder = Path(config.root) / config.name
            run_dir = latest_version_dir(folder, containing="config.yaml") or latest_version_dir(folder)
            if run_dir is None:
                raise ConfigurationError(f"resume: no run named {config.name!r} in {config.root} to resume")
        else:
            run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigurationError(f"resume: {run_dir} has no config.yaml (not a qd run, or one stopped before its "
                                     "task was ready): start a new run")
        stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        current = yaml.safe_load(config_text) or {}
        changed = sorted(key for key in set(_comparable(stored)) | set(_comparable(current))
                         if stored.get(key) != current.get(key))
        if changed:
            raise ConfigurationError(f"resume: the config differs from the one {run_dir} ran with in {', '.join(changed)} "
                                     "(only iterations, engine, engine_options, wandb and root may change)")
        path = run_dir / STATE_FILE
        state = load_pickle(path, task) if path.is_file() else None
        if state is not None and int(state["iteration"]) > config.iterations:
            raise ConfigurationError(f"iterations: {run_dir} already completed {int(state['iteration'])} iterations; "
                                     f"pass --iterations {int(state['iteration'])} or more to resume it "
                                     f"(got {config.iterations})")
        return run_dir, state

    # ------------------------------------------------------------------------------------ running
    def execute(self) -> Path:
        """Run (or continue) the search and write every output; returns the summary's path."""
        wandb_run: WandbRun | None = None
        try:
            self._create_run_dir()
            self._bind_task()
            scheduler = self._scheduler()
            wandb_run = self._start_wandb()
            summary_path = self._run(scheduler, wandb_run)
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

    def _bind_task(self) -> None:
        assert self.run_dir is not None
        try:
            self.task.bind(int(self.config.seed), self.run_dir)
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise ConfigurationError(f"task > {type(self.task).__name__}: {_first_line(error)} (the run directory "
                                     f"{self.run_dir} holds what was written before)") from error
        if not (self.run_dir / "config.yaml").is_file():
            (self.run_dir / "config.yaml").write_text(self.config_text)

    def _scheduler(self) -> Any:
        from ribs.schedulers import Scheduler

        if self.state is not None:
            return self.state["scheduler"]
        archive = build_archive(self.config.archive, self.task, int(self.config.seed))
        emitters: list[Any] = []
        for spec in self.emitters:
            emitters += spec.build(archive, self.task, int(self.config.seed), len(emitters))
        try:
            return Scheduler(archive, emitters)
        except (ValueError, TypeError) as error:
            raise ConfigurationError(f"emitters: {_first_line(error)}") from error

    def _start_wandb(self) -> WandbRun:
        assert self.run_dir is not None
        config = yaml.safe_load(self.config_text) or {}
        run_id = (self.state or {}).get("wandb_run_id")
        return WandbRun(self.config.wandb.mode, self.config.wandb.project, self.run_dir,
                        f"{self.config.name}/{self.run_dir.name}", config, run_id)

    def _run(self, scheduler: Any, wandb_run: WandbRun) -> Path:
        assert self.run_dir is not None
        config, task, run_dir = self.config, self.task, self.run_dir
        descriptors = list(config.descriptors)
        archive = scheduler.archive
        lows, highs = archive.lower_bounds, archive.upper_bounds
        counters = {"evaluations": 0, "wall_seconds": 0.0, "nonfinite_measures": 0}
        start = 0
        if self.state is not None:
            start = int(self.state["iteration"])
            counters.update(self.state.get("counters", {}))
        log = GenerationLog(run_dir / CSV_FILE)
        backup = log.truncate(start, key="iteration")
        if backup is not None:
            print(f"growprune: rows logged after iteration {start} are only in {backup.name}", file=sys.stderr, flush=True)
        started, wall_before = time.perf_counter(), float(counters["wall_seconds"])

        def save_state(iteration: int) -> None:
            counters["wall_seconds"] = wall_before + time.perf_counter() - started
            atomic_pickle({"scheduler": scheduler, "iteration": iteration, "counters": dict(counters),
                           "wandb_run_id": wandb_run.id, "seed": int(config.seed)}, run_dir / STATE_FILE, task)

        if self.state is None:
            save_state(0)  # a run killed during iteration 0 resumes from here
        every = int(config.checkpoint_every)
        with _progress(int(config.iterations), start) as bar:
            for iteration in range(start, int(config.iterations)):
                for emitter in scheduler.emitters:
                    if hasattr(emitter, "last_lineage"):
                        emitter.last_lineage = None
                solutions = scheduler.ask()
                evaluations = self._evaluate(solutions, descriptors)
                objective = np.array([e.objective for e in evaluations], dtype=np.float64)
                measures = np.array([[e.measures[name] for name in descriptors] for e in evaluations],
                                    dtype=np.float64).reshape(len(evaluations), len(descriptors))
                bad = ~np.isfinite(measures)
                if bad.any():
                    # a measure undefined for this network (e.g. assortativity of a regular graph):
                    # clipped into the range so that the solution still counts (logged per iteration)
                    measures = np.where(np.isnan(measures), lows, np.clip(measures, lows, highs))
                lineage = self._lineage(scheduler, len(solutions), objective)
                scheduler.tell(objective, measures, iteration=np.full(len(solutions), iteration, np.int32),
                               nonfinite_measures=bad.sum(axis=1).astype(np.int32), **lineage)
                counters["evaluations"] += len(solutions)
                counters["nonfinite_measures"] += int(bad.any(axis=1).sum())
                stats = archive.stats
                row = {"iteration": iteration, "coverage": float(stats.coverage), "qd_score": float(stats.qd_score),
                       "objective_max": _number(stats.obj_max), "objective_mean": _number(stats.obj_mean),
                       "num_elites": int(stats.num_elites), "evaluations": int(counters["evaluations"]),
                       "nonfinite_measures": int(bad.any(axis=1).sum()),
                       "wall_time": round(wall_before + time.perf_counter() - started, 3)}
                log.append(row)
                wandb_run.log(row, step=iteration)
                if (iteration + 1) % every == 0 or iteration + 1 == int(config.iterations):
                    save_state(iteration + 1)
                bar.update(1)
                bar.set_postfix(coverage=f"{row['coverage']:.3f}", best=f"{row['objective_max']:.4f}")
        counters["wall_seconds"] = wall_before + time.perf_counter() - started
        return self._finish(scheduler.archive, counters, wandb_run)

    def _evaluate(self, solutions: np.ndarray, descriptors: list[str]) -> list[Any]:
        """The solutions' evaluations, in ``chunks`` engine tasks (fixed by the config, not by workers)."""
        if len(solutions) == 0:
            return []
        pieces = [piece for piece in np.array_split(solutions, min(int(self.config.chunks), len(solutions))) if len(piece)]
        results = self.engine.map(evaluate_chunk, [(piece, tuple(descriptors)) for piece in pieces], shared=self.task)
        evaluations = [evaluation for chunk in results for evaluation in chunk]
        if len(evaluations) != len(solutions):
            raise RuntimeError(f"{type(self.task).__name__}.evaluate returned {len(evaluations)} evaluations for "
                               f"{len(solutions)} solutions")
        for evaluation in evaluations:
            missing = [name for name in descriptors if name not in evaluation.measures]
            if missing:
                raise RuntimeError(f"{type(self.task).__name__}.evaluate did not measure {', '.join(missing)}")
        return evaluations

    @staticmethod
    def _lineage(scheduler: Any, count: int, objective: np.ndarray) -> dict[str, np.ndarray]:
        """Lineage fields of the asked solutions, from each emitter's ``last_lineage`` (roots otherwise)."""
        depth = np.zeros(count, np.int64)
        root = np.full(count, np.nan)
        parent = np.full(count, np.nan)
        # Scheduler.ask concatenates the emitters' batches in order; _num_emitted holds their sizes
        sizes = list(getattr(scheduler, "_num_emitted", []))
        if len(sizes) == len(scheduler.emitters) and sum(int(n or 0) for n in sizes) == count:
            position = 0
            for emitter, size in zip(scheduler.emitters, sizes):
                size = int(size or 0)
                lineage = getattr(emitter, "last_lineage", None)
                if lineage is not None and all(len(lineage[key]) == size for key in
                                               ("depth", "root_objective", "parent_objective")):
                    depth[position:position + size] = lineage["depth"]
                    root[position:position + size] = lineage["root_objective"]
                    parent[position:position + size] = lineage["parent_objective"]
                position += size
        roots = depth == 0
        root[roots] = objective[roots]
        return {"depth": depth.astype(np.int32), "root_objective": root.astype(np.float32),
                "parent_objective": parent.astype(np.float32)}

    # ------------------------------------------------------------------------------------ outputs
    def _finish(self, archive: Any, counters: dict[str, Any], wandb_run: WandbRun) -> Path:
        """``archive.pkl``, ``archive.csv``, ``heatmap.png``, the best elite and ``summary.json``."""
        assert self.run_dir is not None
        run_dir, config, descriptors = self.run_dir, self.config, list(self.config.descriptors)
        atomic_pickle(archive, run_dir / ARCHIVE_FILE)
        write_archive_csv(archive, descriptors, run_dir / ARCHIVE_CSV)
        stats = archive.stats
        title = (f"{config.name}: coverage {float(stats.coverage):.3f}, QD score {float(stats.qd_score):.4g}, "
                 f"best {_number(stats.obj_max):.4f}")
        drawn = plot_heatmap(archive, descriptors, run_dir / HEATMAP_FILE, title)
        if not drawn:
            print(f"growprune: no heatmap: {len(descriptors)} descriptors (heatmaps show 1 or 2)", flush=True)
        best = archive.best_elite
        best_file = None
        best_summary: dict[str, Any] = {}
        if best is not None:
            best_file = self.task.save_elite(np.asarray(best["solution"]), run_dir / BEST_FILE)
            best_summary = {"objective": float(best["objective"]),
                            "measures": {name: float(value) for name, value in zip(descriptors, best["measures"])},
                            "index": int(best["index"]), "depth": int(best.get("depth", 0)),
                            "iteration": int(best.get("iteration", -1)), "file": str(best_file)}
        files = [name for name in ("config.yaml", CSV_FILE, STATE_FILE, ARCHIVE_FILE, ARCHIVE_CSV) if (run_dir / name).exists()]
        if drawn:
            files.append(HEATMAP_FILE)
        summary: dict[str, Any] = {
            "name": config.name,
            "task": type(self.task).__name__,
            "descriptors": descriptors,
            "archive": {"type": config.archive.type, "cells": int(archive.cells)},
            "engine": config.engine,
            "iterations": int(config.iterations),
            "evaluations": int(counters["evaluations"]),
            "nonfinite_measures": int(counters.get("nonfinite_measures", 0)),
            "wall_seconds": round(float(counters["wall_seconds"]), 3),
            "coverage": float(stats.coverage),
            "qd_score": float(stats.qd_score),
            "num_elites": int(stats.num_elites),
            "objective_max": _number(stats.obj_max),
            "objective_mean": _number(stats.obj_mean),
            # the unpruned network's objective, for tasks that have one (SupervisedMaskTask: its accuracy)
            "base_objective": getattr(self.task, "base_accuracy", None),
            "best": best_summary,
            "paths": {name: str(run_dir / name) for name in files}
                     | ({"best": str(best_file)} if best_file is not None else {}),
        }
        path = run_dir / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        flat = flatten_summary(summary)
        wandb_run.summarise(flat)
        shown = {key: value for key, value in flat.items() if not key.startswith("paths/") and not isinstance(value, list)}
        print(format_summary(shown, "qd"), flush=True)
        return path


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------------------------- load
@dataclass
class LoadedRun:
    """A finished (or interrupted) run read back by :func:`load_run`.

    Attributes:
        task: the run's task, built from its config and bound (its base network from the run
            directory), or unbound with ``bind=False``.
        archive: the ribs archive (``archive.pkl``, or the last state's for an unfinished run).
        config: the run's config (``config.yaml``) as a dict.
        summary: ``summary.json`` as a dict (``None`` for an unfinished run).
        run_dir: the run directory.
    """

    task: QDTask
    archive: Any
    config: dict[str, Any]
    summary: dict[str, Any] | None
    run_dir: Path


def load_run(run_dir: str | Path, bind: bool = True) -> LoadedRun:
    """Read a ``growprune qd`` run directory back.

    Args:
        run_dir: ``<root>/<name>/version_<n>``.
        bind: bind the task (seeded as in the run; a supervised task loads ``base.ckpt``).

    Raises:
        ConfigurationError: not a qd run directory, or neither ``archive.pkl`` nor ``state.pkl`` exists.
    """
    from growprune.cli_qd import instantiate_config

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigurationError(f"{run_dir} is not a qd run directory (no config.yaml in it)")
    require_ribs()
    config, objects = instantiate_config(["-c", str(config_path)])
    task = objects.task
    if bind:
        task.bind(int(config.seed), run_dir)
    if (run_dir / ARCHIVE_FILE).is_file():
        archive = load_pickle(run_dir / ARCHIVE_FILE)
    elif (run_dir / STATE_FILE).is_file():
        archive = load_pickle(run_dir / STATE_FILE, task)["scheduler"].archive
    else:
        raise ConfigurationError(f"{run_dir} has neither {ARCHIVE_FILE} nor {STATE_FILE}: the run stopped before its first iteration")
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return LoadedRun(task=task, archive=archive, config=yaml.safe_load(config_path.read_text()) or {}, summary=summary,
                     run_dir=run_dir)
