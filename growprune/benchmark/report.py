"""Benchmark reporting as ShrinkBench asks: per-seed records aggregated to mean and spread, a CSV of
every record, a leaderboard (CSV and README-ready Markdown), accuracy-vs-compression plots and a
W&B leaderboard run.

Every file written here is derived from the entry records (``result.json`` / ``failed.json`` of
each grid entry), which are the source of truth: :func:`write_leaderboard` rewrites all of them on
every call, so a rerun of the suite (or ``--report-only``) replaces them.

Accuracy is the record's final-epoch accuracy (a fraction in [0, 1], shown in %); the spread over
seeds is the sample standard deviation (ddof=1, 0 for a single seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from growprune.loggers import WANDB_MODES, resolve_wandb_mode

__all__ = ["BASELINE_ORDER", "aggregate", "write_leaderboard"]

#: Baseline kinds in the order they are listed before every other method.
BASELINE_ORDER = ("random", "global_magnitude", "layer_magnitude", "dense_same_size")

#: Columns that identify a record (first in ``results.csv``), never aggregated as metrics.
IDENTITY_FIELDS = ("suite", "label", "status", "model", "data", "method", "baseline", "target", "seed",
                   "command", "key", "error")
#: Per-entry bookkeeping fields, last in ``results.csv``, never aggregated.
TRAILING_FIELDS = ("entry_dir", "checkpoint", "summary", "finished_at", "traceback")
_NOT_METRICS = frozenset(IDENTITY_FIELDS + TRAILING_FIELDS)

#: Columns of a leaderboard row that identify its group.
GROUP_FIELDS = ("model", "data", "method", "baseline", "target", "n", "failed")

#: Markdown columns by the command the records come from (only those present are shown).
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "fit": ("accuracy", "compression", "speedup", "params_nonzero", "flops_effective", "latency_batch1_ms",
            "throughput_per_s", "wall_seconds"),
    "evolve": ("accuracy", "compression", "speedup", "params_nonzero", "flops_effective", "evaluations",
               "wall_seconds"),
    "qd": ("coverage", "qd_score", "best_objective", "num_elites", "accuracy", "compression", "evaluations",
           "wall_seconds"),
    "latency": ("latency_dense_b1_ms", "latency_pruned_b1_ms", "speedup_b1", "speedup_b64", "flops_reduction",
                "ratio_b1", "ratio_b64", "threads"),
}
#: Plots drawn when the report names none: (x, y) pairs whose metrics exist.
DEFAULT_PLOTS = (("compression", "accuracy"), ("speedup", "accuracy"))
REPORT_KEYS = ("metrics", "plots", "title")

# Fractions shown in percent, ratios shown as "12.3x".
_PERCENT = frozenset({"accuracy", "val_accuracy", "test_accuracy", "coverage"})
_RATIO = frozenset({"compression", "speedup", "flops_reduction", "speedup_b1", "speedup_b64"})
_COUNT = frozenset({"params_total", "params_nonzero", "params_original", "flops_dense", "flops_effective",
                    "flops_original"})
_LABELS = {
    "accuracy": "accuracy (%)",
    "val_accuracy": "val accuracy (%)",
    "coverage": "coverage (%)",
    "compression": "compression",
    "speedup": "speed-up",
    "flops_reduction": "FLOPs reduction",
    "params_nonzero": "params nonzero",
    "params_total": "params total",
    "flops_effective": "FLOPs effective",
    "flops_dense": "FLOPs dense",
    "latency_batch1_ms": "latency b1 (ms)",
    "throughput_per_s": "throughput (samples/s)",
    "wall_seconds": "wall (s)",
    "qd_score": "QD score",
    "best_objective": "best objective",
    "num_elites": "elites",
    "evaluations": "evaluations",
    "latency_dense_b1_ms": "dense b1 (ms)",
    "latency_pruned_b1_ms": "pruned b1 (ms)",
    "speedup_b1": "speed-up b1",
    "speedup_b64": "speed-up b64",
    "ratio_b1": "speed-up / FLOPs red. b1",
    "ratio_b64": "speed-up / FLOPs red. b64",
}
# Axis labels of the plots, with units.
_AXIS_LABELS = {
    "accuracy": "final-epoch accuracy (%)",
    "val_accuracy": "final-epoch validation accuracy (%)",
    "coverage": "archive coverage (%)",
    "compression": "compression (params original / nonzero, x)",
    "speedup": "theoretical speed-up (FLOPs original / effective, x)",
    "flops_reduction": "FLOPs reduction (original / dense, x)",
    "params_nonzero": "nonzero parameters (count)",
    "flops_effective": "effective FLOPs (per sample)",
    "latency_batch1_ms": "latency at batch 1 (ms)",
    "throughput_per_s": "throughput (samples/s)",
    "wall_seconds": "wall time (s)",
}


# ------------------------------------------------------------------------------------ aggregation
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _target(value: Any) -> float | None:
    return None if value is None else float(value)


def _method_order(method: str, baseline: Any) -> tuple[int, int, str]:
    if baseline in BASELINE_ORDER:
        return (0, BASELINE_ORDER.index(baseline), method)
    if baseline:
        return (0, len(BASELINE_ORDER), method)
    return (1, 0, method)


def _target_order(target: float | None) -> tuple[int, float]:
    return (0, 0.0) if target is None else (1, target)


def _row_order(row: dict[str, Any]) -> tuple[Any, ...]:
    return (str(row["model"]), str(row["data"]), _method_order(str(row["method"]), row.get("baseline")),
            _target_order(row.get("target")))


def _check_records(records: Any) -> list[dict[str, Any]]:
    if not isinstance(records, list):
        raise ValueError(f"records must be a list of record dicts, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"records[{index}] must be a dict, got {type(record).__name__}")
        missing = [key for key in ("model", "data", "method") if record.get(key) is None]
        if missing:
            raise ValueError(f"records[{index}] lacks {', '.join(missing)}; every record needs model, data and method")
        target = record.get("target")
        if target is not None and not _is_number(target):
            raise ValueError(f"records[{index}] target must be a number or None, got {target!r}")
    return records


def _completed(record: dict[str, Any]) -> bool:
    return record.get("status", "completed") == "completed"


def _metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Numeric metric fields in first-appearance order."""
    names: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in _NOT_METRICS and _is_number(value):
                names.setdefault(key, None)
    return list(names)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate per-seed records into one row per (model, data, method, target).

    Only completed records (``status == "completed"``; a record without a status counts as
    completed) enter the statistics; a group with no completed record has no row (its failures are
    listed by :func:`write_leaderboard`).

    Args:
        records: entry records (runner fields plus the entry's metrics).

    Returns:
        Rows ordered by model, data, then baseline methods (``random``, ``global_magnitude``,
        ``layer_magnitude``, ``dense_same_size``), then the other methods alphabetically, then
        target ascending with ``None`` first. Each row has ``model``, ``data``, ``method``,
        ``baseline``, ``target``, ``n`` (completed seeds), ``failed`` (failed records of the group)
        and, for every numeric metric the group's records carry, ``<metric>_mean``,
        ``<metric>_std`` (sample std, ddof=1; 0 for one value), ``<metric>_min``, ``<metric>_max``
        over the records that have it. Non-numeric fields (``data_source``, ``accuracy_split``...)
        are carried when identical across the group's seeds.

    Raises:
        ValueError: records is not a list of dicts with model, data and method.
    """
    _check_records(records)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        group_key = (record["model"], record["data"], record["method"], _target(record.get("target")))
        group = groups.setdefault(group_key, {"completed": [], "failed": 0, "baseline": None})
        if record.get("baseline"):
            group["baseline"] = record["baseline"]
        if _completed(record):
            group["completed"].append(record)
        else:
            group["failed"] += 1
    rows = []
    for (model, data, method, target), group in groups.items():
        completed = group["completed"]
        if not completed:
            continue
        row: dict[str, Any] = {"model": model, "data": data, "method": method, "baseline": group["baseline"],
                               "target": target, "n": len(completed), "failed": group["failed"]}
        for key in dict.fromkeys(key for record in completed for key in record):
            if key in _NOT_METRICS or key in row:
                continue
            values = [record.get(key) for record in completed]
            if any(_is_number(value) for value in values):
                numbers = [float(value) for value in values if _is_number(value)]
                row[f"{key}_n"] = len(numbers)  # seeds with a finite value (inf/NaN are stored as None)
                row[f"{key}_mean"] = statistics.fmean(numbers)
                row[f"{key}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
                row[f"{key}_min"] = min(numbers)
                row[f"{key}_max"] = max(numbers)
            elif all(value == values[0] for value in values) and isinstance(values[0], (str, bool)):
                row[key] = values[0]
        rows.append(row)
    rows.sort(key=_row_order)
    return rows


# ------------------------------------------------------------------------------------- file output
def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def _csv_text(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})
    return buffer.getvalue()


def _results_columns(records: Sequence[dict[str, Any]]) -> list[str]:
    present = dict.fromkeys(key for record in records for key in record)
    middle = [key for key in present if key not in _NOT_METRICS]
    return [*IDENTITY_FIELDS, *middle, *(key for key in TRAILING_FIELDS if key in present)]


def _leaderboard_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = dict.fromkeys(key for row in rows for key in row)
    return [*GROUP_FIELDS, *(key for key in present if key not in GROUP_FIELDS)]


# --------------------------------------------------------------------------------------- formatting
def _compact(value: float, digits: int = 3) -> str:
    """1234567 -> '1.23M'; numbers below 1000 with ``digits`` significant digits."""
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.{digits}g}{suffix}"
    # through float so that 100 with 2 digits reads "100", not "1e+02"
    return f"{float(f'{value:.{digits}g}'):g}"


def _format_metric(metric: str, row: dict[str, Any]) -> str:
    """A Markdown cell: mean ± std (accuracy-like in %, ratios as ``12.3x``, counts as ``1.2M``);
    the mean alone for one seed (no spread to show; the table's warning says so) and, for ratios and
    counts, when the spread rounds to nothing."""
    mean = row.get(f"{metric}_mean")
    if mean is None:
        return "—"
    if not math.isfinite(mean):
        return str(mean)
    counted = row.get(f"{metric}_n", row.get("n", 0))
    std = float(row.get(f"{metric}_std") or 0.0) if counted > 1 else None
    if metric in _PERCENT:
        text, spread = f"{100 * mean:.2f}", None if std is None else f"{100 * std:.2f}"
    elif metric in _RATIO:
        text, spread = f"{mean:.1f}x", None if std is None or round(std, 1) == 0 else f"{std:.1f}"
    elif metric in _COUNT:
        text, spread = _compact(mean), None if not std else _compact(std)
    elif metric.endswith("_ms") or metric == "wall_seconds":
        text, spread = _compact(mean), None if std is None else _compact(std, 2)
    else:
        text, spread = _compact(mean, 4), None if std is None else _compact(std, 2)
    text = text if spread is None else f"{text} ± {spread}"
    # a metric some seeds could not give (an infinite ratio) is not a mean over all of them
    return text if counted >= row.get("n", 0) else f"{text} (n={counted})"


def _metric_label(metric: str, records: Sequence[dict[str, Any]]) -> str:
    if metric == "throughput_per_s":
        batches = {record.get("throughput_batch") for record in records if _completed(record)}
        if len(batches) == 1 and _is_number(next(iter(batches))):
            return f"throughput b{int(next(iter(batches)))} (samples/s)"
    return _LABELS.get(metric, metric)


def _method_label(method: str, baseline: Any) -> str:
    if not baseline:
        return method
    return f"{method} (baseline)" if baseline == method else f"{method} (baseline: {baseline})"


def _target_label(target: float | None) -> str:
    return "—" if target is None else f"{target:g}x"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _entry_label(record: dict[str, Any]) -> str:
    if record.get("label"):
        return str(record["label"])
    target = record.get("target")
    return f"{record['method']}/{record['model']}/{record['data']}/t{'none' if target is None else target}/s{record.get('seed')}"


def _chosen_metrics(report: dict[str, Any], records: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(metrics to show, requested metrics that no completed record has)."""
    present = set(_metric_names(record for record in records if _completed(record)))
    if report.get("metrics") is not None:
        requested = list(report["metrics"])
    else:
        commands = [record.get("command") for record in records]
        known = [command for command in dict.fromkeys(commands) if command in DEFAULT_METRICS]
        sources = known or list(DEFAULT_METRICS)
        requested = list(dict.fromkeys(metric for command in sources for metric in DEFAULT_METRICS[command]))
    shown = [metric for metric in requested if metric in present]
    # only names the user asked for are worth a note; with no completed entry nothing is known
    missing = [metric for metric in requested if metric not in present] if present and report.get("metrics") else []
    return shown, missing


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text)).strip("_") or "_"


# -------------------------------------------------------------------------------------------- plots
def _axis_label(metric: str) -> str:
    return _AXIS_LABELS.get(metric, metric)


def _is_reference(row: dict[str, Any], x: str) -> bool:
    """Whether an untargeted method's single row is a reference level (the dense network: no x of
    its own, or a ratio of 1) rather than a point (NNrelief, polarization, a growth scenario: the
    method chose its own compression or size)."""
    value = row.get(f"{x}_mean")
    if value is None or not math.isfinite(value) or value <= 0:
        return True
    return x in _RATIO and abs(value - 1.0) < 1e-3


def _plot(rows: Sequence[dict[str, Any]], x: str, y: str, title: str, path: Path) -> bool:
    """One plot of ``y`` against ``x`` (log-x): a line per targeted method with std error bars (x
    and y), a single point for an untargeted method that chose its own ``x`` (NNrelief's stopping
    rule, polarization, a growth scenario), and a horizontal line with a std band for a reference
    such as the dense network (no ``x`` of its own, or a ratio of 1). Returns False (nothing
    written) when no row has both metrics."""
    scale_y = 100.0 if y in _PERCENT else 1.0
    scale_x = 100.0 if x in _PERCENT else 1.0
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(f"{y}_mean") is not None:
            methods.setdefault(row["method"], []).append(row)
    series, references = [], []
    for method, method_rows in methods.items():
        label = _method_label(method, method_rows[0].get("baseline"))
        if len(method_rows) == 1 and method_rows[0].get("target") is None and _is_reference(method_rows[0], x):
            row = method_rows[0]
            if math.isfinite(row[f"{y}_mean"]):
                references.append((label, row[f"{y}_mean"] * scale_y, row[f"{y}_std"] * scale_y))
            continue
        points = [row for row in method_rows if row.get(f"{x}_mean") is not None
                  and math.isfinite(row[f"{x}_mean"]) and row[f"{x}_mean"] > 0 and math.isfinite(row[f"{y}_mean"])]
        if points:
            points.sort(key=lambda row: row[f"{x}_mean"])
            series.append((label, bool(method_rows[0].get("baseline")), points))
    if not series and not references:
        return False

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure, axis = plt.subplots(figsize=(7.0, 4.8))
    colours = plt.get_cmap("tab10")
    colour_index = 0
    for label, baseline, points in series:
        xs = [row[f"{x}_mean"] * scale_x for row in points]
        ys = [row[f"{y}_mean"] * scale_y for row in points]
        xerr = [row[f"{x}_std"] * scale_x for row in points]
        yerr = [row[f"{y}_std"] * scale_y for row in points]
        axis.errorbar(xs, ys, yerr=yerr, xerr=xerr if any(xerr) else None, label=label, marker="o", markersize=4,
                      capsize=3, linestyle="--" if baseline else "-", color=colours(colour_index % 10))
        colour_index += 1
    for label, mean, std in references:
        colour = colours(colour_index % 10)
        colour_index += 1
        axis.axhline(mean, color=colour, linestyle=":", linewidth=1.5, label=label)
        if std > 0:
            axis.axhspan(mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    axis.set_xscale("log")
    if not series:
        axis.set_xlim(1.0, 10.0)
    if x in _RATIO:
        # targets are usually powers of two; decade ticks alone leave a 2x-64x sweep unlabelled
        axis.xaxis.set_major_locator(LogLocator(base=2.0))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel(_axis_label(x))
    axis.set_ylabel(_axis_label(y))
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    _write_atomic(path, buffer.getvalue())
    return True


# -------------------------------------------------------------------------------------- validation
def _check_report(report: Any, wandb: Any, wandb_mode: Any, suite_name: Any) -> list[tuple[str, str]] | None:
    """Validated plot pairs (None: the default)."""
    if not isinstance(suite_name, str) or not suite_name:
        raise ValueError(f"suite_name must be a non-empty string, got {suite_name!r}")
    if wandb_mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}")
    if not isinstance(wandb, dict):
        raise ValueError(f"wandb must be a dict (e.g. {{'project': 'growprune-benchmark'}}), got {type(wandb).__name__}")
    if not isinstance(report, dict):
        raise ValueError(f"report must be a dict with keys among {', '.join(REPORT_KEYS)}, got {type(report).__name__}")
    unknown = [key for key in report if key not in REPORT_KEYS]
    if unknown:
        raise ValueError(f"report has unknown key {unknown[0]!r}; valid keys: {', '.join(REPORT_KEYS)}")
    metrics = report.get("metrics")
    if metrics is not None and (not isinstance(metrics, (list, tuple)) or not all(isinstance(m, str) for m in metrics)):
        raise ValueError(f"report.metrics must be a list of metric names, got {metrics!r}")
    title = report.get("title")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"report.title must be a string, got {title!r}")
    plots = report.get("plots")
    if plots is None:
        return None
    if not isinstance(plots, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(m, str) for m in pair) for pair in plots):
        raise ValueError(f"report.plots must be a list of [x, y] metric name pairs, got {plots!r}")
    return [(str(pair[0]), str(pair[1])) for pair in plots]


# ------------------------------------------------------------------------------------------ writing
def write_leaderboard(suite_name: str, records: list[dict[str, Any]], out_dir: Path, report: dict[str, Any],
                      wandb: dict[str, Any], wandb_mode: str = "disabled") -> dict[str, Path]:
    """Write the suite's result files into ``out_dir`` (and a W&B leaderboard run).

    Files (all derived from ``records`` and rewritten on every call, so a rerun replaces them):

    * ``results.csv``: every record, failed included; identity columns first, then the metrics;
    * ``leaderboard.csv``: :func:`aggregate`'s rows;
    * ``leaderboard.md``: title, one table per (model, data) with the chosen metrics as mean ± std
      (accuracy in %, ratios as ``12.3x``), baseline methods marked, the data source, a warning
      when a group has fewer than 3 seeds, the plots and the failed entries with their errors;
    * ``plots/<model>-<data>-<y>-vs-<x>.png``: per (x, y) pair of ``report["plots"]`` (default
      compression and speed-up against accuracy, where recorded), log-x, a line with std error
      bars per method, a horizontal line with a std band per method with one untargeted entry.

    With W&B not disabled (``wandb_mode``; ``WANDB_MODE``, when set, wins), one run ``leaderboard``
    (group = suite, job_type ``leaderboard``, project ``wandb["project"]`` or
    ``"growprune-benchmark"``, under ``out_dir``) logs the leaderboard as a ``wandb.Table`` and the
    plots as images; it is finished also when logging fails. A W&B failure is a warning, not an
    error: the files are written already.

    Args:
        suite_name: the suite's name (title, W&B group).
        records: entry records (runner fields plus metrics); empty or all failed is fine.
        out_dir: folder to write into (created).
        report: the suite's ``report`` section: ``metrics`` (Markdown columns; default by command,
            only those recorded), ``plots`` ((x, y) pairs; ``[]`` for none), ``title``.
        wandb: the suite's ``wandb`` section (``project``, optional ``entity``, ``tags``).
        wandb_mode: ``auto``, ``online``, ``offline`` or ``disabled``.

    Returns:
        Name -> path of everything written: ``results.csv``, ``leaderboard.csv``,
        ``leaderboard.md``, ``plots/<file>.png`` per plot, and ``wandb`` (the W&B run folder) when
        a W&B run was written.

    Raises:
        ValueError: bad records, report, wandb section or mode (one line; nothing written).
    """
    plots = _check_report(report, wandb, wandb_mode, suite_name)
    _check_records(records)
    out_dir = Path(out_dir)
    rows = aggregate(records)
    written: dict[str, Path] = {}

    path = out_dir / "results.csv"
    _write_atomic(path, _csv_text(_results_columns(records), records))
    written["results.csv"] = path
    path = out_dir / "leaderboard.csv"
    _write_atomic(path, _csv_text(_leaderboard_columns(rows), rows))
    written["leaderboard.csv"] = path

    plot_paths, skipped = _write_plots(suite_name, rows, out_dir, plots)
    written.update({f"plots/{path.name}": path for paths in plot_paths.values() for path in paths})
    path = out_dir / "leaderboard.md"
    _write_atomic(path, _markdown(suite_name, records, rows, report, plot_paths, skipped, out_dir))
    written["leaderboard.md"] = path

    # as everywhere in growprune, WANDB_MODE wins over the mode passed in
    resolved = resolve_wandb_mode(wandb_mode)
    if resolved != "disabled":
        run_dir = _log_wandb(suite_name, records, rows, report, wandb, resolved, out_dir,
                             [path for paths in plot_paths.values() for path in paths])
        if run_dir is not None:
            written["wandb"] = run_dir
    return written


def _write_plots(suite_name: str, rows: Sequence[dict[str, Any]], out_dir: Path,
                 plots: list[tuple[str, str]] | None) -> tuple[dict[tuple[str, str], list[Path]], list[str]]:
    """Plots per (model, data): {(model, data): paths}, and lines naming requested plots not drawn."""
    written: dict[tuple[str, str], list[Path]] = {}
    skipped: list[str] = []
    tables = _tables(rows)
    for (model, data), table_rows in tables.items():
        present = {key[: -len("_mean")] for row in table_rows for key in row if key.endswith("_mean")}
        pairs = plots if plots is not None else [pair for pair in DEFAULT_PLOTS if set(pair) <= present]
        for x, y in pairs:
            path = out_dir / "plots" / f"{_slug(model)}-{_slug(data)}-{_slug(y)}-vs-{_slug(x)}.png"
            title = f"{suite_name}: {model} / {data}: {_LABELS.get(y, y)} vs {_LABELS.get(x, x)}"
            if {x, y} <= present and _plot(table_rows, x, y, title, path):
                written.setdefault((model, data), []).append(path)
            elif plots is not None:
                missing = [metric for metric in (x, y) if metric not in present]
                reason = f"{' and '.join(missing)} not recorded" if missing else "no positive values to plot on log-x"
                skipped.append(f"{model} / {data}: {y} vs {x} ({reason})")
    return written, skipped


def _tables(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    tables: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        tables.setdefault((row["model"], row["data"]), []).append(row)
    return tables


def _markdown(suite_name: str, records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
              report: dict[str, Any], plot_paths: dict[tuple[str, str], list[Path]], skipped: list[str],
              out_dir: Path) -> str:
    completed = [record for record in records if _completed(record)]
    failed = [record for record in records if not _completed(record)]
    lines = [f"# {report.get('title') or f'Benchmark suite `{suite_name}`'}", ""]
    lines.append(f"{len(records)} entries: {len(completed)} completed, {len(failed)} failed.")
    lines.append("")
    if not rows:
        lines += ["**No completed entries**: nothing to aggregate.", ""]
    else:
        recorded = set(_metric_names(completed))
        notes = ["Values are mean ± sample standard deviation over seeds."]
        if "accuracy" in recorded:
            splits = sorted({str(record["accuracy_split"]) for record in completed if record.get("accuracy_split")})
            split_text = f" on the {' / '.join(splits)} split" if splits else ""
            commands = {record.get("command") for record in completed}
            if commands <= {"fit"}:
                notes.append(f"Accuracy is the final-epoch accuracy{split_text}, never the best epoch on test.")
            elif commands <= {"evolve"}:
                notes.append(f"Accuracy is that of the search's best network, chosen on the validation split and "
                             f"measured{split_text}.")
            else:
                notes.append(f"Accuracy is the best network's{split_text}; for `qd` entries that is the split the "
                             f"archive selected on (the best of many, so optimistic), for `fit` the final epoch's.")
        if "compression" in recorded:
            notes.append("Compression = original / nonzero parameters.")
        if "speedup" in recorded:
            notes.append("Speed-up = original / effective FLOPs (theoretical).")
        lines += [" ".join(notes), ""]
        few = [row for row in rows if row["n"] < 3]
        if few and len(few) == len(rows) and len({row["n"] for row in rows}) == 1:
            lines += [f"> **Warning:** every group has only {rows[0]['n']} completed seed(s), fewer than the 3 "
                      "a spread needs; differences between methods may be noise.", ""]
        elif few:
            named = ", ".join(f"{row['method']}/{row['model']}/{row['data']} {_target_label(row['target'])}: "
                              f"{row['n']} seed(s)" for row in few[:8])
            more = f" and {len(few) - 8} more" if len(few) > 8 else ""
            lines += [f"> **Warning:** fewer than 3 completed seeds in {len(few)} group(s) ({named}{more}); "
                      "their spread is not a reliable estimate.", ""]
        metrics, missing = _chosen_metrics(report, records)
        if missing:
            lines += [f"Requested metrics not in any completed record: {', '.join(missing)}.", ""]
        for (model, data), table_rows in _tables(rows).items():
            table_records = [record for record in completed if record["model"] == model and record["data"] == data]
            shown = [metric for metric in metrics if any(f"{metric}_mean" in row for row in table_rows)]
            lines += [f"## {_md(model)} / {_md(data)}", ""]
            sources = sorted({str(record["data_source"]) for record in table_records if record.get("data_source")})
            lines += [f"Data source: {_md('; '.join(sources)) if sources else 'not recorded'}.", ""]
            header = ["method", "target", "seeds", *(_metric_label(metric, table_records) for metric in shown)]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("| " + " | ".join(["---", "---:", "---:", *(["---:"] * len(shown))]) + " |")
            for row in table_rows:
                seeds = f"{row['n']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
                cells = [_md(_method_label(row["method"], row.get("baseline"))), _target_label(row["target"]), seeds,
                         *(_format_metric(metric, row) for metric in shown)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            for path in plot_paths.get((model, data), []):
                lines += [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})", ""]
    if skipped:
        lines += ["Plots not drawn: " + "; ".join(skipped) + ".", ""]
    if failed:
        lines += [f"## Failed entries ({len(failed)})", ""]
        for record in failed:
            error = str(record.get("error") or "no error recorded").strip().splitlines()
            lines.append(f"- `{_entry_label(record)}`: {_md(error[0] if error else 'no error recorded')}")
        lines.append("")
    return "\n".join(lines)


def _log_wandb(suite_name: str, records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
               report: dict[str, Any], section: dict[str, Any], mode: str, out_dir: Path,
               plots: Sequence[Path]) -> Path | None:
    """The W&B ``leaderboard`` run; returns its folder, or None (with a warning) when W&B failed."""
    try:
        import wandb
    except ImportError:
        warnings.warn("W&B leaderboard run skipped: wandb is not installed (pip install wandb)", stacklevel=3)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {key: section[key] for key in ("entity", "tags", "notes") if section.get(key) is not None}
    try:
        # create_new: never log into (or finish) a run someone else left open in this process
        run = wandb.init(project=section.get("project") or "growprune-benchmark", group=suite_name,
                         job_type="leaderboard", name="leaderboard", dir=str(out_dir.resolve()), mode=mode,
                         config={"suite": suite_name, "report": report}, reinit="create_new", **options)
    except Exception as error:  # noqa: BLE001 - the files exist; W&B is an extra
        warnings.warn(f"W&B leaderboard run not started: {error}", stacklevel=3)
        return None
    exit_code = 1
    try:
        columns = _leaderboard_columns(rows)
        data = [[_wandb_cell(row.get(column)) for column in columns] for row in rows]
        payload: dict[str, Any] = {"leaderboard": wandb.Table(columns=columns, data=data, allow_mixed_types=True)}
        for path in plots:
            payload[f"plots/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        run.summary.update({"entries": len(records), "completed": sum(map(_completed, records)),
                            "failed": sum(not _completed(record) for record in records)})
        exit_code = 0
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"W&B leaderboard logging failed: {error}", stacklevel=3)
    finally:
        run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        run.finish(exit_code=exit_code)
    return run_dir if exit_code == 0 else None


def _wandb_cell(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return json.dumps(value)
