"""What every benchmark records with its numbers, in one place: the git commit, the machine, the
settings of each row, and the committed CSV files under ``benchmarks/results/``.

Rules (see benchmarks/RESULTS.md):

* every run APPENDS its raw rows to a CSV under ``benchmarks/results/`` (committed, small), never
  overwrites one: a file whose header differs from the new rows is refused (the accuracy benchmarks
  stop before training: write to another ``--out``; a timing run, which knows its columns only at
  the end, puts its rows beside the file in ``<stem>.<run>.csv``), and the accuracy benchmarks also
  refuse, BEFORE training, to append rows whose settings differ from the rows already in the file
  (each results file holds one setting);
* every row carries its full setting (epochs, seed, method parameters, data split, threads, torch
  version, ...) and the commit it ran at (``git rev-parse --short HEAD``, ``-dirty`` when tracked
  files outside ``benchmarks/results/`` and ``*.md`` have uncommitted changes);
* ``--summarise`` puts rows into one table only when every setting column agrees
  (:func:`check_settings`); otherwise it stops with the differing columns and their values.
  Scratch runs go to ``benchmarks/out/`` (git-ignored) with ``--out``.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# Columns that describe where and when a row was measured, not what was measured: rows that differ
# only here may share a table (the table lists the commits).
INFO_COLUMNS = ("commit", "run", "date", "machine", "cpus", "load_start", "seconds")
# Columns every accuracy row must have; a CSV without them predates these rules.
REQUIRED_COLUMNS = ("commit", "epochs", "seed", "threads", "torch")


class SettingsMismatch(ValueError):
    """Rows of different settings were about to be put into one table (or one results file)."""


def results_path(name: str) -> Path:
    """The committed CSV of benchmark ``name``: ``benchmarks/results/<name>.csv``."""
    return RESULTS_DIR / f"{name}.csv"


def git_commit(repo: Path = REPO) -> str:
    """Short commit id of HEAD, with ``-dirty`` when tracked files have uncommitted changes.

    Changes under ``benchmarks/results/`` (the CSVs runs append to) and in Markdown files do not
    count: they cannot change a measurement. ``unknown`` outside a git checkout.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True, timeout=30).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)benchmarks/results", ":(exclude)*.md"],
            cwd=repo, capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if changes else commit


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on (torch's exactly as ``torch.__version__``)."""
    import torch

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {"torch": torch.__version__, "lightning": version("lightning"),
            "torch_pruning": version("torch-pruning"), "python": platform.python_version()}


def machine() -> str:
    """One line for the printed tables: architecture, torch threads, CPUs, versions."""
    import torch

    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def run_info() -> dict[str, Any]:
    """The informational and environment columns of one run (call once per run, after setting threads)."""
    import torch

    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "commit": git_commit(),
        "run": f"{now:%Y%m%dT%H%M%SZ}-{os.getpid()}",
        "date": f"{now:%Y-%m-%d %H:%M}Z",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_start": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "-",
        "threads": torch.get_num_threads(),
        **versions(),
    }


def format_params(params: Mapping[str, Any]) -> str:
    """A method's parameters as one stable CSV cell: ``key=value; ...`` (sorted keys)."""
    return "; ".join(f"{key}={params[key]}" for key in sorted(params)) if params else "-"


# --------------------------------------------------------------------------------- CSV files
def open_checked(path: Path, planned: Sequence[Mapping[str, Any]], check: Any) -> "CsvAppender":
    """An appender for ``path``, after checking (before any training) that the planned rows fit the
    file's columns and, with the rows already in it, pass ``check`` (a settings check); exits with
    the reason otherwise."""
    appender = CsvAppender(path)
    try:
        appender.check_columns(list(planned[0]))
        check(read_rows([path]) + list(planned) if path.exists() else list(planned))
    except SettingsMismatch as error:
        raise SystemExit(f"error: {error}\n(write this run to another file with --out)") from None
    return appender


def read_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as handle:
        return next(csv.reader(handle), None)


def read_rows(paths: Iterable[Path]) -> list[dict[str, str]]:
    """All rows of ``paths``, each with its file under the key ``_file`` (never written back)."""
    rows = []
    for path in paths:
        with Path(path).open(newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append({**row, "_file": str(path)})
    return rows


class CsvAppender:
    """Appends rows to ``path`` (header first when the file is new), flushing after each row.

    Never overwrites: an existing file whose header differs from the rows' columns is refused
    with a ``SettingsMismatch`` naming the columns (choose another ``--out``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fieldnames: list[str] | None = None
        self.count = 0

    def check_columns(self, fieldnames: Sequence[str]) -> None:
        header = read_header(self.path)
        if header is not None and list(header) != list(fieldnames):
            missing = [c for c in fieldnames if c not in header]
            extra = [c for c in header if c not in fieldnames]
            raise SettingsMismatch(
                f"{self.path} has other columns than this run writes (new: {missing or '-'}, only in the file: "
                f"{extra or '-'}); refusing to append: pass another --out")

    def append(self, row: Mapping[str, Any]) -> None:
        self.append_many([row])

    def append_many(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        fieldnames = list(rows[0])
        if self.fieldnames is None:
            self.check_columns(fieldnames)
            self.fieldnames = fieldnames
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = read_header(self.path) is None
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fieldnames)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        self.count += len(rows)


# ----------------------------------------------------------------------------- settings check
def _cell(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    return "<missing>" if value is None else str(value)


def _where(rows: Sequence[Mapping[str, Any]]) -> str:
    files = sorted({str(r.get("_file", "this run")) for r in rows})
    return ", ".join(Path(f).name if f != "this run" else f for f in files)


def check_settings(
    rows: Sequence[Mapping[str, Any]],
    *,
    varying: Sequence[str],
    results: Sequence[str],
    per_method: Sequence[str] = ("method_params",),
    method_key: Sequence[str] = ("method", "target"),
    group_by: Sequence[str] = (),
    required: Sequence[str] = REQUIRED_COLUMNS,
) -> None:
    """Raise ``SettingsMismatch`` unless ``rows`` may share one table.

    Every column that is not in ``varying`` (what the table compares, e.g. method, target, seed),
    ``results`` (what was measured) or :data:`INFO_COLUMNS` (commit, date, ...) is a setting and
    must have one value across all rows of each ``group_by`` group (e.g. per model). The
    ``per_method`` columns (a method's own parameters) must agree among the rows of one
    ``method_key`` (e.g. every ``magnitude-global`` row at target 0.9). A column missing from some
    rows counts as a difference; a row lacking a ``required`` column is refused outright.
    """
    if not rows:
        return
    lacking = sorted({c for row in rows for c in required if c not in row or row[c] in (None, "")})
    if lacking:
        raise SettingsMismatch(f"rows of {_where(rows)} lack the setting column(s) {', '.join(lacking)} "
                               "(written before settings were recorded?): refusing to summarise them")
    skip = set(varying) | set(results) | set(INFO_COLUMNS) | set(per_method) | set(group_by) | {"_file"}
    columns = [c for c in dict.fromkeys(c for row in rows for c in row) if c not in skip]
    problems = []
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault(tuple(_cell(row, c) for c in group_by), []).append(row)
    for key, group in groups.items():
        label = (" for " + ", ".join(f"{c}={v}" for c, v in zip(group_by, key))) if group_by else ""
        problems += _differences(group, columns, label)
        by_method: dict[tuple, list] = {}
        for row in group:
            by_method.setdefault(tuple(_cell(row, c) for c in method_key), []).append(row)
        for method, method_rows in by_method.items():
            method_label = label + " for " + ", ".join(f"{c}={v}" for c, v in zip(method_key, method))
            problems += _differences(method_rows, list(per_method), method_label)
    if problems:
        raise SettingsMismatch("refusing to put rows of different settings into one table; differing columns:\n  "
                               + "\n  ".join(problems))


def _differences(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], label: str) -> list[str]:
    problems = []
    for column in columns:
        values: dict[str, list] = {}
        for row in rows:
            values.setdefault(_cell(row, column), []).append(row)
        if len(values) > 1:
            listed = "; ".join(f"{value!r} ({len(rs)} rows, {_where(rs)})" for value, rs in values.items())
            problems.append(f"{column}{label}: {listed}")
    return problems


def deduplicate(rows: Sequence[dict], key: Sequence[str], latest: bool) -> list[dict]:
    """Refuse two rows of one ``key`` (e.g. a run repeated), or with ``latest`` keep the last of each."""
    seen: dict[tuple, dict] = {}
    duplicates = []
    for row in rows:
        k = tuple(_cell(row, c) for c in key)
        if k in seen:
            duplicates.append(k)
        seen[k] = row
    if duplicates and not latest:
        listed = ", ".join("/".join(k) for k in sorted(set(duplicates))[:8])
        raise SettingsMismatch(f"{len(duplicates)} row(s) repeat a ({', '.join(key)}) already seen: {listed}; "
                               "pass --latest to keep only the last row of each")
    return list(seen.values()) if latest else list(rows)


def commits(rows: Iterable[Mapping[str, Any]]) -> str:
    """The distinct commits of ``rows`` in first-seen order, for the table's commit column."""
    return ", ".join(dict.fromkeys(_cell(r, "commit") for r in rows))


def seeds(rows: Iterable[Mapping[str, Any]]) -> str:
    """``n (s1,s2,...)``: how many rows (seeds) and which seeds."""
    values = [_cell(r, "seed") for r in rows]
    return f"{len(values)} ({','.join(sorted(values, key=lambda s: (len(s), s)))})"


def settings_line(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``column value, ...`` for the (agreed) setting ``columns`` of ``rows``, for the table's caption."""
    return ", ".join(f"{c} {_cell(rows[0], c)}" for c in columns if c in rows[0])


# ------------------------------------------------------------------------------ timing runs
def sample_rows(samples: Mapping[Any, Sequence[float]], keys: Sequence[str], value: str,
                settings: Mapping[str, Any], env: Mapping[str, Any], scale: float = 1e3) -> list[dict[str, Any]]:
    """One CSV row per timing sample: ``keys`` (from each tuple key of ``samples``), ``repeat`` (the
    interleaved round), ``value`` (the sample times ``scale``, default seconds -> ms), then the run's
    settings and ``env`` (:func:`run_info`)."""
    rows = []
    for key, values in samples.items():
        key = key if isinstance(key, tuple) else (key,)
        for repeat, sample in enumerate(values):
            rows.append({**dict(zip(keys, key)), "repeat": repeat, value: round(sample * scale, 5), **settings, **env})
    return rows


def save_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    """Append ``rows`` to ``path`` (see :class:`CsvAppender`); the line the benchmark prints about it.

    Timing runs learn their columns only at the end: if ``path`` has other columns, the rows go to
    ``<path stem>.<run>.csv`` beside it instead (never lost, never mixed), and the line says so.
    """
    run = rows[0].get("run", "-") if rows else "-"
    note = ""
    try:
        CsvAppender(path).append_many(rows)
    except SettingsMismatch as error:
        path = Path(path).with_name(f"{Path(path).stem}.{run}.csv")
        CsvAppender(path).append_many(rows)
        note = f" (NOT the default file: {error})"
    try:
        shown = Path(path).resolve().relative_to(REPO)
    except ValueError:
        shown = path
    return f"{len(rows)} raw rows (run {run}) appended to {shown}{note}"
