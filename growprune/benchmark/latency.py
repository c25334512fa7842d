"""The ``latency`` command of benchmark suites: does a FLOPs cut turn into a CPU latency cut once exported?

A suite with ``command: latency`` runs, per entry, :func:`run_latency_entry`: build the model, prune it
(structurally to ``target`` times fewer FLOPs, or unstructured to a sparsity), export dense and pruned
the same way (batch norms folded, frozen TorchScript by default) and time both at each batch size in
interleaved rounds. Random weights: latency does not depend on the values (which channels a global
ranking removes does; a trained network gives other widths). No data is read.

Config keys of an entry (the resolved suite config; every key optional except ``model.arch``)::

    model:
      arch: vgg16_bn              # registry name, or torchvision.<name> (growprune.models.create_model)
      arch_kwargs: {}             # builder arguments, e.g. {shortcut: B} for resnet56
    input_shape: [3, 32, 32]      # one sample's shape (default [3, 32, 32]); ViTs take it as image size
    num_classes: 10
    seed: ${seed}                 # seed of the random weights (default: the entry's seed); a suite
                                  #   needs it in the config so that seeds give different entries
    pruning:
      kind: structured            # structured | unstructured | none
      flops_reduction: 2.0        # structured: original / pruned dense FLOPs (default: the entry's target)
      scope: global               # StructuredPruning options: scope, round_to, min_channels,
      round_to: null              #   max_fraction, cost (null | latency | flops | params), skip
      min_channels: 1
      max_fraction: 1.0
      cost: null
      skip: []
      sparsity: 0.95              # unstructured: fraction of conv/linear weights zeroed (global magnitude;
                                  #   default 1 - 1/target); the pruned model runs CSR sparse kernels
      sparse_threshold: 0.5       # unstructured: layers with at least this zero fraction run sparse
    export:
      format: torchscript         # torchscript (frozen) | eager (the plain module)
      fold_bn: true               # fold batch norms into their producers (growprune.export.fold_batch_norms)
      optimize: auto              # torch.jit.optimize_for_inference: auto (decided on the dense network,
                                  #   the pruned one follows: one runtime for both) | true | false
      channels_last: false        # 4-d weights in channels-last memory format (inputs stay NCHW;
                                  #   the first convolution converts them, and that is timed too)
    timing:
      batch_sizes: [1, 64]
      rounds: 5                   # interleaved rounds; each variant's figure is the median of its round medians
      round_seconds: 0.3          # timed passes per variant and round: until this is spent (1 to 200 passes)
      warmup: 2                   # untimed passes per variant and batch size before the first round
      threads: 1                  # torch.set_num_threads while timing (restored afterwards)
      clock: wall                 # wall (time.perf_counter) | thread: CPU time of the calling thread
                                  #   (time.thread_time; threads: 1 only), which leaves out the time
                                  #   the OS gives other jobs on a shared machine

Record fields (:func:`run_latency_entry`): ``latency_dense_b<N>_ms``, ``latency_pruned_b<N>_ms``,
``speedup_b<N>`` (dense / pruned latency), ``ratio_b<N>`` (speed-up / FLOPs reduction; 1.0: latency
falls exactly as FLOPs do), ``spread_dense_b<N>_pct`` / ``spread_pruned_b<N>_pct`` (half the
interquartile range of the round medians, % of their median), and from the fastest pass instead of
the medians ``latency_dense_b<N>_min_ms``, ``latency_pruned_b<N>_min_ms``, ``ratio_min_b<N>``, for
every batch size N; ``flops_reduction``
(original / pruned dense FLOPs; for unstructured pruning original / effective FLOPs), ``flops_original``,
``flops_pruned``, ``params_original``, ``params_pruned``, ``params_nonzero``, ``compression``,
``widths_not_multiple_of_8`` (structured: groups whose channel count is not a multiple of 8),
``sparse_layers`` (unstructured), ``export_format``, ``folded_batch_norms``, ``unfolded_batch_norms``,
``export_max_abs_diff`` (exported pruned model vs its eager module on a random batch), ``threads``, ``clock``,
``arch``, ``input_shape``, ``pruning_kind``, ``wall_seconds``.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from growprune.modes import torch_threads  # noqa: F401  (also this module's public name, as before)

PRUNING_KINDS = ("structured", "unstructured", "none")
EXPORT_FORMATS = ("torchscript", "eager")
_TOP_KEYS = ("model", "input_shape", "num_classes", "seed", "pruning", "export", "timing")
_MODEL_KEYS = ("arch", "arch_kwargs")
_PRUNING_KEYS = ("kind", "flops_reduction", "scope", "round_to", "min_channels", "max_fraction", "cost", "skip",
                 "sparsity", "sparse_threshold")
_EXPORT_KEYS = ("format", "fold_bn", "optimize", "channels_last")
_TIMING_KEYS = ("batch_sizes", "rounds", "round_seconds", "warmup", "threads", "clock")
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_DEFAULTS: dict[str, Any] = {
    "input_shape": [3, 32, 32],
    "num_classes": 10,
    "pruning": {"kind": "structured", "scope": "global", "round_to": None, "min_channels": 1, "max_fraction": 1.0,
                "cost": None, "skip": [], "sparse_threshold": 0.5},
    "export": {"format": "torchscript", "fold_bn": True, "optimize": "auto", "channels_last": False},
    "timing": {"batch_sizes": [1, 64], "rounds": 5, "round_seconds": 0.3, "warmup": 2, "threads": 1, "clock": "wall"},
}


# ---------------------------------------------------------------------------------------- config
def _check_keys(section: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    import difflib

    for key in section:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"latency config: unknown key {where + str(key)!r}{hint}; valid keys: {', '.join(valid)}")


def resolve_config(config: Mapping[str, Any], target: float | None = None) -> dict[str, Any]:
    """The latency config with defaults filled in and every key and value checked.

    ``target`` (the suite entry's) is the default structured FLOPs reduction and, as
    ``1 - 1/target``, the default unstructured sparsity.

    Returns:
        A new dict with the sections ``model``, ``input_shape``, ``num_classes``, ``pruning``,
        ``export``, ``timing``.

    Raises:
        ValueError: an unknown key (named, with the valid ones), a bad value, or a missing target.
    """
    config = dict(config)
    _check_keys(config, _TOP_KEYS, "")
    model = dict(config.get("model") or {})
    _check_keys(model, _MODEL_KEYS, "model.")
    if not isinstance(model.get("arch"), str):
        raise ValueError("latency config: model.arch (a registry or torchvision.<name> model name) is required")
    resolved: dict[str, Any] = {"model": {"arch": model["arch"], "arch_kwargs": dict(model.get("arch_kwargs") or {})}}
    resolved["input_shape"] = [int(size) for size in config.get("input_shape", _DEFAULTS["input_shape"])]
    resolved["num_classes"] = int(config.get("num_classes", _DEFAULTS["num_classes"]))
    if "seed" in config:
        if isinstance(config["seed"], bool) or not isinstance(config["seed"], int):
            raise ValueError(f"latency config: seed must be an integer, got {config['seed']!r}")
        resolved["seed"] = config["seed"]
    for section, valid in (("pruning", _PRUNING_KEYS), ("export", _EXPORT_KEYS), ("timing", _TIMING_KEYS)):
        given = dict(config.get(section) or {})
        _check_keys(given, valid, f"{section}.")
        resolved[section] = {**copy.deepcopy(_DEFAULTS[section]), **given}
    pruning, export, timing = resolved["pruning"], resolved["export"], resolved["timing"]
    if pruning["kind"] not in PRUNING_KINDS:
        raise ValueError(f"latency config: pruning.kind {pruning['kind']!r} is not one of {', '.join(PRUNING_KINDS)}")
    if pruning["kind"] == "structured":
        reduction = pruning.get("flops_reduction", target)
        if reduction is None or float(reduction) <= 1:
            raise ValueError(f"latency config: structured pruning needs pruning.flops_reduction (or a target) > 1, got {reduction!r}")
        pruning["flops_reduction"] = float(reduction)
    if pruning["kind"] == "unstructured":
        sparsity = pruning.get("sparsity", None if target is None else 1 - 1 / float(target))
        if sparsity is None or not 0 < float(sparsity) < 1:
            raise ValueError(f"latency config: unstructured pruning needs pruning.sparsity (or a target) in (0, 1), got {sparsity!r}")
        pruning["sparsity"] = float(sparsity)
    if export["format"] not in EXPORT_FORMATS:
        raise ValueError(f"latency config: export.format {export['format']!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if export["optimize"] not in (True, False, "auto"):
        raise ValueError(f"latency config: export.optimize must be auto, true or false, got {export['optimize']!r}")
    sizes = timing["batch_sizes"]
    if not sizes or any(not isinstance(size, int) or size < 1 for size in sizes):
        raise ValueError(f"latency config: timing.batch_sizes must be positive integers, got {sizes!r}")
    if int(timing["rounds"]) < 1 or float(timing["round_seconds"]) <= 0 or int(timing["warmup"]) < 0 or int(timing["threads"]) < 1:
        raise ValueError("latency config: timing needs rounds >= 1, round_seconds > 0, warmup >= 0, threads >= 1")
    if timing["clock"] not in CLOCKS:
        raise ValueError(f"latency config: timing.clock {timing['clock']!r} is not one of {', '.join(CLOCKS)}")
    if timing["clock"] == "thread" and int(timing["threads"]) != 1:
        raise ValueError("latency config: timing.clock 'thread' measures one thread's CPU time: it needs timing.threads 1")
    return resolved


# ----------------------------------------------------------------------------------- building
@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for model construction without changing the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_module(config: Mapping[str, Any], seed: int = 0) -> Any:
    """A :class:`~growprune.GrowPruneModule` around the config's model, its weights drawn with ``seed``."""
    from growprune import GrowPruneModule

    with _seeded(seed):
        return GrowPruneModule(config["model"]["arch"], arch_kwargs=config["model"]["arch_kwargs"],
                               num_classes=config["num_classes"], input_shape=tuple(config["input_shape"]))


def prune_structured(module: Any, pruning: Mapping[str, Any]) -> dict[str, Any]:
    """Remove channels of ``module`` (in place) with global L1 ranking so its dense FLOPs fall by
    ``pruning["flops_reduction"]`` (``StructuredPruning(target="flops")``'s plan, the other
    ``pruning`` keys as its options; the same path as ``benchmarks/structured_latency.py``).

    Returns:
        ``widths`` (channels per group) and ``widths_not_multiple_of_8``.

    Raises:
        ValueError: the reduction is not reachable with these options.
    """
    from growprune.schedules import OneShot
    from growprune.strategies import StructuredPruning

    amount = 1 - 1 / float(pruning["flops_reduction"])
    strategy = StructuredPruning(OneShot(amount=amount), target="flops", scope=pruning["scope"],
                                 round_to=pruning["round_to"], min_channels=int(pruning["min_channels"]),
                                 max_fraction=float(pruning["max_fraction"]), cost=pruning["cost"],
                                 skip=list(pruning["skip"]), verbose=False)
    strategy.check(None, module)
    groups = strategy.graph.groups(strategy.skip)
    scores = {group.root: strategy.criterion.score(strategy.graph, group) for group in groups}
    strategy.graph.remove(strategy.plan(module, groups, scores, amount))
    widths = [group.channels for group in strategy.graph.groups()]
    return {"widths": widths, "widths_not_multiple_of_8": sum(width % 8 != 0 for width in widths)}


def prune_unstructured(model: nn.Module, sparsity: float) -> None:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of all conv and linear layers
    together (global magnitude), in place."""
    weights = [layer.weight for layer in model.modules() if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    magnitudes = torch.cat([weight.detach().abs().flatten() for weight in weights])
    count = int(round(sparsity * magnitudes.numel()))
    if count == 0:
        return
    threshold = magnitudes.kthvalue(count).values
    with torch.no_grad():
        for weight in weights:
            weight.mul_((weight.abs() > threshold).to(weight.dtype))


def export_for_timing(model: nn.Module, example: torch.Tensor, export: Mapping[str, Any]) -> tuple[Callable[[torch.Tensor], Any], dict[str, Any]]:
    """``model`` prepared as ``export`` says (batch norms folded, channels-last weights, frozen
    TorchScript or eager); ``model`` itself is not changed.

    Returns:
        The callable to time and a dict: ``folded_batch_norms``, ``unfolded_batch_norms`` (counts),
        ``export_max_abs_diff`` (the callable vs ``model`` on ``example``), ``torchscript`` info.
    """
    from growprune.export import fold_batch_norms, to_torchscript

    model = model.eval()
    info: dict[str, Any] = {"folded_batch_norms": 0, "unfolded_batch_norms": 0}
    prepared: nn.Module = model
    if export["fold_bn"]:
        prepared = fold_batch_norms(model, example)
        info["folded_batch_norms"] = len(prepared.folded_batch_norms)
        info["unfolded_batch_norms"] = len(prepared.unfolded_batch_norms)
    if export.get("channels_last"):
        prepared = copy.deepcopy(prepared) if prepared is model else prepared
        prepared = prepared.to(memory_format=torch.channels_last)
    run: Callable[[torch.Tensor], Any] = prepared
    if export["format"] == "torchscript":
        run, info["torchscript"] = to_torchscript(prepared, example, export["optimize"])
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(example.shape, generator=generator)
    with torch.no_grad():
        info["export_max_abs_diff"] = float((run(batch) - model(batch)).abs().max())
    return run, info


# -------------------------------------------------------------------------------------- timing
def _spread(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    quartiles = statistics.quantiles(samples, n=4)
    return 50 * (quartiles[2] - quartiles[0]) / statistics.median(samples)


def time_interleaved(runs: Mapping[str, Callable[[torch.Tensor], Any]], inputs: Mapping[int, torch.Tensor],
                     rounds: int = 5, round_seconds: float = 0.3, warmup: int = 2,
                     max_passes: int = 200, clock: str = "wall") -> dict[int, dict[str, list[list[float]]]]:
    """Time every callable at every batch in interleaved rounds, no gradients: per batch size,
    ``warmup`` untimed passes of each callable, then ``rounds`` rounds, each timing every callable in
    turn (the order rotates from round to round, so a change of load hits all alike) for
    ``round_seconds`` (at least one pass, at most ``max_passes``). ``clock``: ``"wall"``
    (``time.perf_counter``) or ``"thread"`` (``time.thread_time``: CPU seconds of the calling
    thread, which is where torch computes with one thread; time spent descheduled does not count).

    Returns:
        batch size -> name -> one list of pass times (seconds) per round.

    Raises:
        ValueError: an unknown clock.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    results: dict[int, dict[str, list[list[float]]]] = {}
    names = list(runs)
    with torch.no_grad():
        for batch, example in inputs.items():
            for name in names:
                for _ in range(warmup):
                    runs[name](example)
            samples: dict[str, list[list[float]]] = {name: [] for name in names}
            for index in range(rounds):
                for name in names[index % len(names):] + names[: index % len(names)]:
                    times: list[float] = []
                    while not times or (sum(times) < round_seconds and len(times) < max_passes):
                        start = now()
                        runs[name](example)
                        times.append(now() - start)
                    samples[name].append(times)
            results[batch] = samples
    return results


def summarize(rounds: list[list[float]]) -> dict[str, float]:
    """``median``: the median of the round medians (seconds); ``min``: the fastest pass (load only
    adds time, so it is the figure least moved by other work on the machine); ``spread_pct``: half
    the interquartile range of the round medians in % of their median."""
    medians = [statistics.median(times) for times in rounds]
    return {"median": statistics.median(medians), "min": min(min(times) for times in rounds), "spread_pct": _spread(medians)}


# ------------------------------------------------------------------------------------ the entry
def measure_pruned_latency(config: Mapping[str, Any], target: float | None = None, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, prune, export and time one latency config (see the module docstring for the keys).

    Returns:
        The record (fields in the module docstring) and the raw pass times
        (``{"b<N>": {"dense": [[ms, ...] per round], "pruned": [...]}}``).

    Raises:
        ValueError: a bad config or an unreachable pruning target.
    """
    from growprune.export import sparsify
    from growprune.metrics import count_nonzero_parameters, count_parameters, dense_flops, effective_flops

    started = time.perf_counter()
    config = resolve_config(config, target)
    pruning, export, timing = config["pruning"], config["export"], config["timing"]
    shape = tuple(config["input_shape"])
    example = torch.zeros(1, *shape)
    record: dict[str, Any] = {"arch": config["model"]["arch"], "input_shape": "x".join(map(str, shape)),
                              "pruning_kind": pruning["kind"], "export_format": export["format"],
                              "threads": int(timing["threads"]), "clock": timing["clock"]}
    with torch_threads(int(timing["threads"])):
        dense_module = build_module(config, seed)
        dense = dense_module.model.eval()
        pruned = copy.deepcopy(dense)
        record["flops_original"] = float(dense_flops(dense, shape))
        record["params_original"] = count_parameters(dense)
        if pruning["kind"] == "structured":
            module = build_module(config, seed)
            record.update(prune_structured(module, pruning))
            record["widths"] = " ".join(map(str, record["widths"]))
            pruned = module.model.eval()
            record["flops_pruned"] = float(dense_flops(pruned, shape))
        elif pruning["kind"] == "unstructured":
            prune_unstructured(pruned, pruning["sparsity"])
            record["sparsity"] = pruning["sparsity"]
            record["flops_pruned"] = float(effective_flops(pruned, shape))
        else:
            record["flops_pruned"] = record["flops_original"]
        record["flops_reduction"] = record["flops_original"] / record["flops_pruned"]
        record["params_pruned"] = count_parameters(pruned)
        record["params_nonzero"] = count_nonzero_parameters(pruned)
        record["compression"] = record["params_original"] / max(1, record["params_nonzero"])
        if pruning["kind"] == "unstructured":
            # CSR kernels cannot be traced: both sides run eagerly (batch norms folded as configured)
            eager = {**export, "format": "eager"}
            dense_run, _ = export_for_timing(dense, example, eager)
            folded, info = export_for_timing(pruned, example, eager)
            pruned_run = copy.deepcopy(folded)
            record["sparse_layers"] = len(sparsify(pruned_run, float(pruning["sparse_threshold"])))
            record["export_format"] = "eager, torch.sparse CSR"
            with torch.no_grad():
                batch = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
                info["export_max_abs_diff"] = float((pruned_run(batch) - pruned(batch)).abs().max())
        else:
            dense_run, dense_info = export_for_timing(dense, example, export)
            if "torchscript" in dense_info:
                # one runtime for both sides: "auto" decides on the dense network, the pruned one follows,
                # so the speed-up is not the optimisation's doing
                same = {**export, "optimize": bool(dense_info["torchscript"].get("optimized"))}
                record["dense_torchscript_optimized"] = same["optimize"]
            else:
                same = export
            pruned_run, info = export_for_timing(pruned, example, same)
            if "torchscript" in info:
                record["torchscript_optimized"] = bool(info["torchscript"].get("optimized"))
        record.update({key: info[key] for key in ("folded_batch_norms", "unfolded_batch_norms", "export_max_abs_diff")})
        inputs = {int(size): torch.randn(int(size), *shape, generator=torch.Generator().manual_seed(1))
                  for size in timing["batch_sizes"]}
        samples = time_interleaved({"dense": dense_run, "pruned": pruned_run}, inputs, rounds=int(timing["rounds"]),
                                   round_seconds=float(timing["round_seconds"]), warmup=int(timing["warmup"]),
                                   clock=timing["clock"])
    raw: dict[str, Any] = {}
    for batch, values in samples.items():
        dense_t, pruned_t = summarize(values["dense"]), summarize(values["pruned"])
        record[f"latency_dense_b{batch}_ms"] = dense_t["median"] * 1e3
        record[f"latency_pruned_b{batch}_ms"] = pruned_t["median"] * 1e3
        record[f"speedup_b{batch}"] = dense_t["median"] / pruned_t["median"]
        record[f"ratio_b{batch}"] = record[f"speedup_b{batch}"] / record["flops_reduction"]
        record[f"spread_dense_b{batch}_pct"] = dense_t["spread_pct"]
        record[f"spread_pruned_b{batch}_pct"] = pruned_t["spread_pct"]
        record[f"latency_dense_b{batch}_min_ms"] = dense_t["min"] * 1e3
        record[f"latency_pruned_b{batch}_min_ms"] = pruned_t["min"] * 1e3
        record[f"ratio_min_b{batch}"] = dense_t["min"] / pruned_t["min"] / record["flops_reduction"]
        raw[f"b{batch}"] = {name: [[value * 1e3 for value in times] for times in per_round] for name, per_round in values.items()}
    record["wall_seconds"] = time.perf_counter() - started
    return record, raw


def run_latency_entry(entry: Any, entry_dir: Path) -> dict[str, Any]:
    """Run one ``command: latency`` suite entry (``entry.config``, ``entry.target``, ``entry.seed``).

    Writes ``entry_dir/latency_samples.json`` (the resolved config and every timed pass, ms) and
    returns the record (fields in the module docstring).

    Raises:
        ValueError: a bad config (unknown key, value) or an unreachable pruning target.
    """
    record, raw = measure_pruned_latency(entry.config, entry.target, int(entry.config.get("seed", entry.seed)))
    entry_dir = Path(entry_dir)
    entry_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolve_config(entry.config, entry.target)
    (entry_dir / "latency_samples.json").write_text(json.dumps({"config": resolved, "passes_ms": raw}, indent=2) + "\n")
    return record
