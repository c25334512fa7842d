"""Running one benchmark grid entry and turning its outputs into a metric record.

:func:`run_entry` runs an :class:`~growprune.benchmark.suite.Entry` inside its own directory with
the growprune command the suite names, in this process, and returns the record the runner stores
as ``result.json``:

* ``fit``: writes ``<entry_dir>/config.yaml`` (the entry's resolved config; its loggers, checkpoint
  folder and W&B run point into ``entry_dir``) and runs ``growprune fit -c <entry_dir>/config.yaml``
  through :class:`~growprune.cli.GrowPruneCLI`, so ``growprune fit -c <entry_dir>/config.yaml``
  reruns the same training. When the data has a test split, the trained network is then tested
  once: ``accuracy`` is the FINAL epoch's test accuracy (never that of a best checkpoint).
* ``evolve`` / ``qd``: write ``config.yaml`` (run folder ``<entry_dir>/runs``) and run the command's
  own parse / instantiate / run steps; the record maps the run's ``summary.json``.
* ``latency``: :func:`growprune.benchmark.latency.run_latency_entry`.

Record fields of ``fit`` (:data:`FIT_FIELDS`): ``accuracy``, ``accuracy_split``, ``val_accuracy``,
``params_total``, ``params_nonzero``, ``params_original``, ``flops_dense``, ``flops_effective``,
``flops_original``, ``compression`` (params_original / params_nonzero), ``speedup`` (flops_original /
flops_effective, theoretical), ``flops_reduction`` (flops_original / flops_dense),
``latency_batch1_ms``, ``latency_threads``, ``throughput_batch`` (64), ``throughput_per_s``,
``wall_seconds``, ``epochs``, ``data_source``, ``checkpoint``, ``width`` (None unless ``${width}``
was resolved), ``device`` (``cpu`` or the GPU's name), ``precision``, ``train_seconds`` and
``train_samples_per_s`` (training samples per second of the fit: a GPU suite's throughput). For a ``${width}`` entry (the same-size dense baseline) the ``*_original`` fields are
those of the full-width network, so its compression and speed-up compare with the pruned methods'.

W&B: each entry is one W&B run, grouped by the suite's name, named by the entry's label, with the
method as its job type.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from growprune.loggers import WANDB_MODES

COMMANDS = ("fit", "evolve", "qd", "latency")
WIDTH_PLACEHOLDER = "${width}"
THROUGHPUT_BATCH = 64
DEFAULT_PROJECT = "growprune-benchmark"
# what the growprune module builds when a config names no architecture
DEFAULT_ARCH = "lenet_300_100"
# fields every model-producing entry (fit, evolve, supervised qd) reports
MODEL_FIELDS = (
    "params_total", "params_nonzero", "params_original", "flops_dense", "flops_effective", "flops_original",
    "compression", "speedup", "flops_reduction", "latency_batch1_ms", "latency_threads", "throughput_batch",
    "throughput_per_s",
)
FIT_FIELDS = (
    "accuracy", "accuracy_split", "val_accuracy", *MODEL_FIELDS, "wall_seconds", "epochs", "data_source",
    "checkpoint", "width", "device", "precision", "train_seconds", "train_samples_per_s",
)
EVOLVE_FIELDS = (*FIT_FIELDS[:FIT_FIELDS.index("device")], "evaluations", "generations")
QD_FIELDS = ("coverage", "qd_score", "best_objective", "num_elites", "evaluations", "wall_seconds", "data_source",
             "checkpoint")
#: torch threads of the latency and throughput figures (comparable across entries and machines' load)
LATENCY_THREADS = 1
# latency of the summary and of the throughput figure: best of at most 20 passes after 3 warm-up
# ones, within 1 s (as growprune.runs measures batch 1)
LATENCY_PASSES, LATENCY_WARMUP, LATENCY_SECONDS = 20, 3, 1.0
# bisection steps of same_size_width: the interval shrinks 2**40-fold, far below one channel
BISECTION_STEPS = 40


# ---------------------------------------------------------------------------------------- entry
def run_entry(entry: Any, entry_dir: Path, wandb_mode: str = "disabled") -> dict[str, Any]:
    """Run ``entry`` inside ``entry_dir`` (created) and return its metric record.

    Args:
        entry: a :class:`~growprune.benchmark.suite.Entry`.
        entry_dir: the entry's own directory; every output of the run lands under it.
        wandb_mode: ``auto``, ``online``, ``offline`` or ``disabled`` (``WANDB_MODE`` wins).

    Returns:
        The record: JSON-able numbers and strings, fields per command as listed in the module doc
        (:data:`FIT_FIELDS`, :data:`EVOLVE_FIELDS`, :data:`QD_FIELDS`; ``latency``: growprune.benchmark.latency's).

    Raises:
        ValueError: an unknown command or W&B mode (before anything is written).
        Exception: whatever made the run fail (the runner records it); a W&B run the entry started
            is finished (marked failed) first.
    """
    if entry.command not in COMMANDS:
        raise ValueError(f"entry {entry.label}: unknown command {entry.command!r}; valid commands: {', '.join(COMMANDS)}")
    if wandb_mode not in WANDB_MODES:
        raise ValueError(f"entry {entry.label}: unknown W&B mode {wandb_mode!r}; valid modes: {', '.join(WANDB_MODES)}")
    if entry.command != "fit" and _contains(entry.config, WIDTH_PLACEHOLDER):
        raise ValueError(f"entry {entry.label}: {WIDTH_PLACEHOLDER} is only resolved for command fit, not {entry.command}")
    entry_dir = Path(entry_dir).resolve()
    entry_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if entry.command == "latency":
        from growprune.benchmark.latency import run_latency_entry

        record = dict(run_latency_entry(entry, entry_dir))
    else:
        runner = {"fit": _run_fit, "evolve": _run_evolve, "qd": _run_qd}[entry.command]
        previous = _current_wandb_run()
        try:
            record = runner(entry, entry_dir, wandb_mode)
        except BaseException:
            _finish_new_wandb_run(previous)
            raise
    record["wall_seconds"] = time.perf_counter() - started
    return {key: _json_value(value) for key, value in record.items()}


# ------------------------------------------------------------------------------------------ fit
def _fit_cli_class() -> type:
    """GrowPruneCLI that tests the trained network before the W&B run ends (imported lazily)."""
    from lightning.pytorch.callbacks import Callback

    from growprune.cli import GrowPruneCLI

    class TrainingSpeed(Callback):
        """Training samples per second of a fit (the throughput a GPU suite reports), and its device.

        Counts the samples of every training batch between ``on_train_start`` and ``on_train_end``
        (validation epochs inside that span are included, as they are in any epoch time). On CUDA the
        clock waits for the device, so queued kernels are not left out.
        """

        def __init__(self) -> None:
            self.samples = 0
            self.seconds = 0.0
            self.device = "cpu"
            self.precision = ""
            self._started: float | None = None

        def _now(self, trainer: Any) -> float:
            import torch

            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)
            return time.perf_counter()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            import torch

            device = trainer.strategy.root_device
            self.device = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            self.precision = str(trainer.precision)
            self._started = self._now(trainer)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            first = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.samples += int(first.shape[0]) if hasattr(first, "shape") and first.ndim else 1

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self._started is not None:
                self.seconds += self._now(trainer) - self._started
                self._started = None

        def fields(self) -> dict[str, Any]:
            """``device``, ``precision``, ``train_seconds``, ``train_samples_per_s`` (None without training)."""
            return {"device": self.device, "precision": self.precision, "train_seconds": self.seconds,
                    "train_samples_per_s": self.samples / self.seconds if self.seconds > 0 else None}

    class FitThenTestCLI(GrowPruneCLI):
        """``fit``, then ``test`` of the final weights when the data has its own test split."""

        test_metrics: dict[str, float] | None = None
        training_speed: Any = None

        def before_fit(self) -> None:
            super().before_fit()
            self.training_speed = TrainingSpeed()
            self.trainer.callbacks.append(self.training_speed)

        def after_fit(self) -> None:
            # Runs inside GrowPruneCLI.__init__, whose error handling finishes the W&B run on failure.
            if has_test_split(self.datamodule):
                results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
                self.test_metrics = {key: float(value) for key, value in (results[0] if results else {}).items()}
            super().after_fit()

    return FitThenTestCLI


def _run_fit(entry: Any, entry_dir: Path, wandb_mode: str) -> dict[str, Any]:
    from growprune.cli import resolve_data_names
    from growprune.cli_output import quiet_boilerplate

    config = copy.deepcopy(entry.config)
    width = reference = None
    if _contains(config, WIDTH_PLACEHOLDER):
        if entry.target is None:
            raise ValueError(f"entry {entry.label}: {WIDTH_PLACEHOLDER} needs a target (the method has targets: null)")
        data_module = build_datamodule(config.get("data"))
        model_config = config.get("model") or {}
        shape = tuple(data_module.input_shape)
        width = same_size_width(model_config, data_module.num_classes, shape, float(entry.target))
        reference = _full_width_size(model_config, data_module.num_classes, shape)
        config = _substitute(config, WIDTH_PLACEHOLDER, width)
    config = fit_outputs(config, entry, entry_dir, wandb_mode)
    path = entry_dir / "config.yaml"
    path.write_text(_config_header(entry, "fit", path) + yaml.safe_dump(config, sort_keys=False))
    with quiet_boilerplate():
        cli = _fit_cli_class()(args=resolve_data_names(["fit", "-c", str(path)]))
    if cli.summary_path is None:
        raise RuntimeError(f"entry {entry.label}: the fit wrote no summary.json")
    summary = json.loads(Path(cli.summary_path).read_text())
    module = cli.model
    record: dict[str, Any] = {"val_accuracy": summary.get("val/acc")}
    test = cli.test_metrics or {}
    if "test/acc" in test:
        record.update(accuracy=test["test/acc"], accuracy_split="test")
    else:
        record.update(accuracy=summary.get("val/acc"), accuracy_split="val")
    record.update(model_metrics(module, reference=reference))
    if cli.training_speed is not None:
        record.update(cli.training_speed.fields())
    record.update(epochs=summary.get("epochs"), data_source=data_source(cli.datamodule),
                  checkpoint=summary.get("checkpoint"), width=width, summary=str(cli.summary_path))
    return record


def fit_outputs(config: dict[str, Any], entry: Any, entry_dir: Path, wandb_mode: str) -> dict[str, Any]:
    """``config`` with its outputs in ``entry_dir``: loggers, checkpoints and the default root folder.

    The loggers become a CSVLogger (``<entry_dir>/fit/version_<n>``) and growprune's WandbLogger
    (group: the suite, name: the entry's label, job type: the method). Every ModelCheckpoint saves
    into ``<entry_dir>/checkpoints`` with ``save_last`` (the final epoch's weights); without one,
    one that keeps only ``last.ckpt`` is added. Returns a new dict.
    """
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {}) or {}
    config["trainer"] = trainer
    project = (entry.wandb or {}).get("project") or DEFAULT_PROJECT
    trainer["default_root_dir"] = str(entry_dir)
    trainer["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(entry_dir), "name": "fit"}},
        {"class_path": "growprune.loggers.WandbLogger",
         "init_args": {"save_dir": str(entry_dir), "project": project, "mode": wandb_mode, "group": entry.suite,
                       "name": entry.label, "job_type": entry.method}},
    ]
    callbacks = trainer.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, dict) else list(callbacks)
    checkpoints = [item for item in callbacks
                   if isinstance(item, dict) and str(item.get("class_path", "")).endswith("ModelCheckpoint")]
    for index, item in enumerate(checkpoints):
        init_args = item.setdefault("init_args", {}) or {}
        item["init_args"] = init_args
        init_args["dirpath"] = str(entry_dir / ("checkpoints" if index == 0 else f"checkpoints-{index}"))
        init_args["save_last"] = True
    if not checkpoints:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(entry_dir / "checkpoints"), "save_last": True, "save_top_k": 0}})
    trainer["callbacks"] = callbacks
    # a benchmark needs the final checkpoint; Lightning refuses a ModelCheckpoint without this
    trainer["enable_checkpointing"] = True
    return config


def has_test_split(data_module: Any) -> bool:
    """Whether ``data_module`` has a test split of its own (not the validation split served again)."""
    setup = getattr(data_module, "setup", None)
    if setup is None:
        return False
    setup("test")
    test_set, val_set = getattr(data_module, "test_set", None), getattr(data_module, "val_set", None)
    return test_set is not None and test_set is not val_set and len(test_set) > 0


# --------------------------------------------------------------------------------- evolve and qd
def _run_evolve(entry: Any, entry_dir: Path, wandb_mode: str) -> dict[str, Any]:
    from growprune.cli import resolve_data_names
    from growprune.cli_evolve import config_text, instantiate, parse
    from growprune.cli_output import quiet_boilerplate
    from growprune.evolution.run import EvolutionRun

    path = _write_search_config(entry, entry_dir, wandb_mode, "evolve")
    # evolve_main's steps without its SystemExit: the runner records the one-line error itself
    with quiet_boilerplate(), _wandb_grouping(entry):
        parser, config = parse(resolve_data_names(["-c", str(path)]))
        objects = instantiate(parser, config)
        summary_path = EvolutionRun.prepare(config, objects, config_text(parser, config), resume=None).execute()
    summary = json.loads(Path(summary_path).read_text())
    best = summary["best"]
    record: dict[str, Any] = {"val_accuracy": best.get("val/acc")}
    if best.get("test/acc") is not None:
        record.update(accuracy=best["test/acc"], accuracy_split="test")
    else:
        record.update(accuracy=best.get("val/acc"), accuracy_split="val")
    checkpoint = summary.get("paths", {}).get("best.ckpt")
    if checkpoint and Path(checkpoint).is_file():
        record.update(model_metrics(_load_module(checkpoint)))
    else:
        record.update(params_nonzero=best.get("params/nonzero"), flops_effective=best.get("flops/effective"),
                      compression=best.get("compression"), params_original=summary.get("base", {}).get("params"))
    record.update(evaluations=summary.get("evaluations"), generations=summary.get("generations"),
                  epochs=config.base.epochs, data_source=data_source(objects.data), checkpoint=checkpoint, width=None,
                  summary=str(summary_path))
    return record


def _run_qd(entry: Any, entry_dir: Path, wandb_mode: str) -> dict[str, Any]:
    from growprune.cli_evolve import config_text, instantiate
    from growprune.cli_output import quiet_boilerplate
    from growprune.cli_qd import parse
    from growprune.qd.run import QDRun

    path = _write_search_config(entry, entry_dir, wandb_mode, "qd")
    # qd_main's steps without its SystemExit: the runner records the one-line error itself
    with quiet_boilerplate(), _wandb_grouping(entry):
        parser, config = parse(["-c", str(path)])
        objects = instantiate(parser, config)
        summary_path = QDRun.prepare(config, objects.task, config_text(parser, config), resume=None).execute()
    summary = json.loads(Path(summary_path).read_text())
    best = summary.get("best") or {}
    task = objects.task
    record: dict[str, Any] = {
        "coverage": summary.get("coverage"), "qd_score": summary.get("qd_score"),
        "best_objective": best.get("objective", summary.get("objective_max")), "num_elites": summary.get("num_elites"),
        "evaluations": summary.get("evaluations"), "checkpoint": best.get("file"), "summary": str(summary_path),
        "data_source": data_source(task.data) if getattr(task, "data", None) is not None else type(task).__name__,
    }
    checkpoint = best.get("file")
    from growprune.qd import SupervisedMaskTask

    if isinstance(task, SupervisedMaskTask) and checkpoint and str(checkpoint).endswith(".ckpt"):
        # the supervised objective is the selection split's accuracy of the elite's network
        record.update(accuracy=best.get("objective"), accuracy_split=task.selection)
        record.update(model_metrics(_load_module(checkpoint)))
    return record


def _write_search_config(entry: Any, entry_dir: Path, wandb_mode: str, command: str) -> Path:
    """``<entry_dir>/config.yaml`` of an evolve/qd entry: runs under ``<entry_dir>/runs``."""
    config = copy.deepcopy(entry.config)
    config["root"] = str(entry_dir / "runs")
    config["name"] = re.sub(r"[^A-Za-z0-9_.-]", "_", entry.method).strip(".") or command
    config["wandb"] = {"mode": wandb_mode, "project": (entry.wandb or {}).get("project") or DEFAULT_PROJECT}
    path = entry_dir / "config.yaml"
    path.write_text(_config_header(entry, command, path) + yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def _wandb_grouping(entry: Any) -> Iterator[None]:
    """W&B group (the suite) and job type (the method) of runs started in the block.

    The evolve and qd W&B helpers take no group argument; ``wandb.init`` reads these variables.
    """
    saved = {name: os.environ.get(name) for name in ("WANDB_RUN_GROUP", "WANDB_JOB_TYPE")}
    os.environ["WANDB_RUN_GROUP"], os.environ["WANDB_JOB_TYPE"] = entry.suite, entry.method
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -------------------------------------------------------------------------------------- metrics
def model_metrics(module: Any, reference: tuple[float, float] | None = None) -> dict[str, Any]:
    """Size, theoretical speed-up, batch-1 latency and batch-64 throughput of a growprune module.

    Args:
        module: a :class:`~growprune.module.GrowPruneModule` with its ``input_shape``.
        reference: ``(params, flops)`` of the network the compression refers to; ``None``: the
            module's own original network.

    Returns:
        The :data:`MODEL_FIELDS` (latencies measured on the module's current device, eval mode,
        with :data:`LATENCY_THREADS` torch thread(s)).
    """
    from growprune.metrics import measure_latency
    from growprune.modes import torch_threads

    sizes = module.size_metrics(include_original=True)
    params_original, flops_original = reference or (sizes["params/original"], sizes["flops/original"])
    nonzero, dense, effective = sizes["params/nonzero"], sizes["flops/dense"], sizes["flops/effective"]
    timing = {"repeats": LATENCY_PASSES, "warmup": LATENCY_WARMUP, "statistic": "min", "max_seconds": LATENCY_SECONDS}
    # One torch thread: with more threads than idle cores (other entries, other jobs) every pass
    # waits for a descheduled thread and the figure measures the machine's load, not the network.
    with torch_threads(LATENCY_THREADS):
        batch1 = measure_latency(module.model, module.input_shape, batch_size=1, **timing)
        batch = measure_latency(module.model, module.input_shape, batch_size=THROUGHPUT_BATCH, **timing)
    return {
        "params_total": int(sizes["params/total"]), "params_nonzero": int(nonzero),
        "params_original": int(params_original), "flops_dense": float(dense), "flops_effective": float(effective),
        "flops_original": float(flops_original),
        "compression": params_original / nonzero if nonzero else math.inf,
        "speedup": flops_original / effective if effective else math.inf,
        "flops_reduction": flops_original / dense if dense else math.inf,
        "latency_batch1_ms": 1e3 * batch1, "latency_threads": LATENCY_THREADS,
        "throughput_batch": THROUGHPUT_BATCH, "throughput_per_s": THROUGHPUT_BATCH / batch,
    }


def _load_module(path: str | Path) -> Any:
    from growprune.module import GrowPruneModule

    module = GrowPruneModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    return module.eval()


# --------------------------------------------------------------------------------- same size
def _model_parts(model_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(arch, arch_kwargs without width)`` of a ``model`` config section."""
    arch = (model_config or {}).get("arch", DEFAULT_ARCH)
    if not isinstance(arch, str):
        raise ValueError(f"a same-size width needs a registered model name as model.arch, got {arch!r}")
    kwargs = dict((model_config or {}).get("arch_kwargs") or {})
    kwargs.pop("width", None)
    return arch, kwargs


def _builder_with_width(arch: str) -> Any:
    from growprune.models import get_model_builder, list_models

    builder = get_model_builder(arch)
    if "width" not in inspect.signature(builder).parameters:
        with_width = [name for name in list_models() if not name.startswith("torchvision.")
                      and "width" in inspect.signature(get_model_builder(name)).parameters]
        raise ValueError(f"model {arch!r} has no width argument, so no same-size width; models with one: "
                         f"{', '.join(with_width)}")
    return builder


def _build(arch: str, kwargs: dict[str, Any], num_classes: int, input_shape: tuple[int, ...],
           device: str = "meta") -> torch.nn.Module:
    from growprune.models import create_model

    shape = {"num_classes": num_classes, "in_channels": input_shape[0]}
    if len(input_shape) > 1:
        shape["image_size"] = tuple(input_shape[1:])
    # on the meta device no weights are allocated or initialised: counting is cheap even for VGG
    with torch.device(device):
        return create_model(arch, **{**shape, **kwargs})


def _count(arch: str, kwargs: dict[str, Any], num_classes: int, input_shape: tuple[int, ...], width: float) -> int:
    model = _build(arch, {**kwargs, "width": width}, num_classes, input_shape)
    return sum(parameter.numel() for parameter in model.parameters())


def same_size_width(model_config: dict[str, Any], num_classes: int, input_shape: tuple[int, ...],
                    target: float) -> float:
    """The width multiplier whose dense network has about ``params_original / target`` parameters.

    ``params_original`` is the network of ``model_config`` (its ``arch`` and ``arch_kwargs``) at the
    builder's default width; the width is found by bisection on the builder's ``width`` argument
    (parameter counts grow with it). Of the two widths that bracket the goal, the one whose count
    is closer is returned.

    Args:
        model_config: the ``model`` section of a fit config (``arch``, optional ``arch_kwargs``;
            an ``arch_kwargs.width`` is ignored).
        num_classes: classes of the data.
        input_shape: shape of one input sample, e.g. ``(1, 28, 28)``.
        target: compression factor, a finite number > 0.

    Returns:
        The width, a float > 0.

    Raises:
        ValueError: a bad target, a model that is not a registered name or whose builder has no
            ``width`` argument (the message lists those that have one), or a goal below the
            smallest network the builder makes.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise ValueError(f"same-size target must be a finite number > 0, got {target!r}")
    arch, kwargs = _model_parts(model_config)
    _builder_with_width(arch)
    input_shape = tuple(int(size) for size in input_shape)
    original = sum(p.numel() for p in _build(arch, kwargs, num_classes, input_shape).parameters())
    goal = original / target

    def count(width: float) -> int:
        return _count(arch, kwargs, num_classes, input_shape, width)

    low, high = 1e-6, 1.0
    if count(low) > goal:
        raise ValueError(f"model {arch!r} has at least {count(low):,} parameters at any width, more than "
                         f"{original:,} / {target:g} = {goal:,.0f}")
    while count(high) < goal:
        high *= 2.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2.0
        if count(middle) < goal:
            low = middle
        else:
            high = middle
    width = low if abs(count(low) - goal) < abs(count(high) - goal) else high
    # a short number in config.yaml when it builds the same network
    short = round(width, 6)
    return short if short > 0 and count(short) == count(width) else width


def _full_width_size(model_config: dict[str, Any], num_classes: int, input_shape: tuple[int, ...]) -> tuple[float, float]:
    """``(params, dense FLOPs)`` of ``model_config``'s network at the builder's default width."""
    from growprune.metrics import count_parameters, dense_flops

    arch, kwargs = _model_parts(model_config)
    model = _build(arch, kwargs, num_classes, tuple(input_shape), device="cpu")
    return float(count_parameters(model)), float(dense_flops(model, tuple(input_shape)))


# ---------------------------------------------------------------------------------- data source
def build_datamodule(data_config: dict[str, Any] | str | None) -> Any:
    """The data module of a fit config's ``data`` section (``None``: the CLI's default, the digits).

    Accepts ``{"class_path": ..., "init_args": {...}}``, a class path, or a registry name
    (``growprune datasets``). Builds it only (no data is read but file headers).

    Raises:
        ValueError: an unknown registry name or a class path that does not import.
    """
    from growprune.data import DATAMODULES, DigitsDataModule, list_datamodules

    if data_config is None:
        return DigitsDataModule()
    if isinstance(data_config, str):
        data_config = {"class_path": data_config}
    class_path = str(data_config.get("class_path", ""))
    init_args = dict(data_config.get("init_args") or {})
    if class_path in DATAMODULES:
        return DATAMODULES[class_path](**init_args)
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except ImportError:
        cls = None
    if cls is None:
        raise ValueError(f"data: cannot import {class_path!r}; give a class path or one of: {', '.join(list_datamodules())}")
    return cls(**init_args)


def _count_text(numbers: tuple[int, ...]) -> str:
    return "/".join(f"{number:,}" for number in numbers if number)


def data_source(data: Any) -> str:
    """A short description of the data: ``"MNIST idx t10k (8,000/2,000)"``, ``"torchvision MNIST"``,
    ``"sklearn digits"``, else the data module's class name.

    Args:
        data: a data module, or a fit config's ``data`` section (built with :func:`build_datamodule`).

    Returns:
        The description (idx files: the file stem and the train/val(/test) sizes).
    """
    from growprune.data import DigitsDataModule, IdxDataModule, TorchvisionDataModule

    module = data if not isinstance(data, (dict, str, type(None))) else build_datamodule(data)
    if isinstance(module, IdxDataModule):
        name = Path(module.images_path).name
        stem = re.split(r"[-.]images|[-.]idx|\.", name, maxsplit=1)[0] or name
        return f"MNIST idx {stem} ({_count_text(tuple(module.split_sizes))})"
    if isinstance(module, TorchvisionDataModule):
        return f"torchvision {module.dataset_class.__name__}"
    if isinstance(module, DigitsDataModule):
        return "sklearn digits"
    return type(module).__name__


# -------------------------------------------------------------------------------------- helpers
def _contains(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return text in value
    if isinstance(value, dict):
        return any(_contains(item, text) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains(item, text) for item in value)
    return False


def _substitute(value: Any, placeholder: str, number: float) -> Any:
    """``value`` with ``placeholder`` replaced: a string that is exactly it becomes ``number``."""
    if isinstance(value, str):
        if value.strip() == placeholder:
            return number
        return value.replace(placeholder, str(number))
    if isinstance(value, dict):
        return {key: _substitute(item, placeholder, number) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, placeholder, number) for item in value]
    return value


def _config_header(entry: Any, command: str, path: Path) -> str:
    return (f"# growprune benchmark entry {entry.label} (suite {entry.suite}, key {entry.key}); rerun with\n"
            f"#   growprune {command} -c {path}\n")


def _json_value(value: Any) -> Any:
    """Plain JSON values: numpy/torch scalars to numbers, non-finite floats to None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _current_wandb_run() -> Any:
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def _finish_new_wandb_run(previous: Any) -> None:
    """Finish (as failed) a W&B run that is open now and was not before the entry started."""
    run = _current_wandb_run()
    if run is not None and run is not previous:
        run.finish(exit_code=1)
