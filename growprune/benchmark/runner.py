"""Run a suite's grid: one directory per entry, complete entries skipped, failures recorded.

Layout under ``<out>/<suite>/``::

    entries/<key>/entry.json      the entry (fields, key, label), written before it runs
    entries/<key>/result.json     its record once it completed (written atomically)
    entries/<key>/failed.json     its record when it failed (error line + traceback); a rerun retries
                                  the entry and keeps the earlier file as failed-<n>.json
    results.csv, leaderboard.*, plots/   the leaderboard (growprune.benchmark.report), rebuilt every run
    summary.json                  counts of this run and the leaderboard's paths

An entry is complete when its ``result.json`` says ``"status": "completed"``; a rerun skips it, so a
run killed at any point (even ``kill -9``) resumes where it stopped: ``result.json`` appears in one
``os.replace``, never half-written. Entries run one after another in this process (``engine="local"``,
``workers=1``), in a spawn process pool (``workers > 1``) or as Ray tasks (``engine="ray"``), through
:mod:`growprune.evolution.engines`; a record is written by the process that ran the entry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from growprune.benchmark.suite import Entry, Suite

ENGINES = ("local", "ray")
WANDB_MODES = ("auto", "online", "offline", "disabled")
#: ``--only`` fields: entries whose field has one of the given values run
FILTER_FIELDS = ("model", "data", "method", "baseline")
RESULT, FAILED, ENTRY = "result.json", "failed.json", "entry.json"

RunEntry = Callable[..., dict[str, Any]]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``: readers see
    the old file or the whole new one, never a partial one (also after ``kill -9``)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def entry_status(entry_dir: Path) -> str:
    """``complete`` (a completed ``result.json``), ``failed`` (a ``failed.json``) or ``pending``."""
    result = _read_json(entry_dir / RESULT)
    if result is not None and result.get("status") == "completed":
        return "complete"
    return "failed" if (entry_dir / FAILED).is_file() else "pending"


def read_records(out_dir: Path, entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """The records of ``entries`` under ``out_dir`` (``<out>/<suite>``), in grid order.

    Returns:
        For each entry its ``result.json`` when complete, else its ``failed.json`` when it failed;
        entries that never ran are left out.
    """
    records = []
    for entry in entries:
        entry_dir = out_dir / "entries" / entry.key
        status = entry_status(entry_dir)
        if status == "complete":
            records.append(_read_json(entry_dir / RESULT))
        elif status == "failed":
            record = _read_json(entry_dir / FAILED)
            if record is not None:
                records.append(record)
    return [record for record in records if record is not None]


def _keep_failed(entry_dir: Path) -> None:
    """Rename an earlier ``failed.json`` to the first free ``failed-<n>.json`` (a retry never loses it)."""
    failed = entry_dir / FAILED
    if not failed.is_file():
        return
    taken = [int(match.group(1)) for path in entry_dir.glob("failed-*.json") if (match := re.fullmatch(r"failed-(\d+)\.json", path.name))]
    os.replace(failed, entry_dir / f"failed-{max(taken, default=0) + 1}.json")


def _runner_fields(entry: Entry, entry_dir: Path) -> dict[str, Any]:
    return {
        "suite": entry.suite, "key": entry.key, "label": entry.label, "command": entry.command,
        "model": entry.model, "data": entry.data, "method": entry.method, "baseline": entry.baseline,
        "target": entry.target, "seed": entry.seed, "entry_dir": str(entry_dir),
    }


def _default_run_entry() -> RunEntry:
    from growprune.benchmark.entries import run_entry

    return run_entry


OUTPUT_LOG = "output.log"


@contextlib.contextmanager
def entry_output(path: Path | None) -> Iterator[None]:
    """Send everything the process writes to stdout and stderr into ``path`` (appended) meanwhile.

    Redirects the file descriptors, not only ``sys.stdout``: Lightning's and W&B's log handlers
    hold their own references to the streams, and a library may write from C. ``None`` leaves the
    output where it is.
    """
    if path is None:
        yield
        return
    descriptors = [1, 2]  # the process's own, which C code and subprocesses write to
    for stream in (sys.stdout, sys.stderr):  # and those of Python's streams when they differ
        try:
            descriptors.append(stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    descriptors = sorted(set(descriptors))
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = [os.dup(descriptor) for descriptor in descriptors]
    try:
        with open(path, "ab") as log:
            try:
                for descriptor in descriptors:
                    os.dup2(log.fileno(), descriptor)
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                for descriptor, original in zip(descriptors, saved):
                    os.dup2(original, descriptor)
    finally:
        for original in saved:
            os.close(original)


def console_stream() -> Any:
    """A stream on a copy of this process's stderr descriptor, which :func:`entry_output` leaves alone
    (the progress bar writes there while an entry's output goes to its log)."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        return sys.stderr


def execute_entry(shared: dict[str, Any], item: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """Run one entry and write its record (``result.json`` or ``failed.json``) into its directory.

    Module-level so that pool and Ray workers can run it. An exception of the entry (also
    ``SystemExit`` of a command it ran) becomes a failed record: one-line error and traceback.

    Args:
        shared: ``wandb_mode`` and ``run_entry`` (``None``: :func:`growprune.benchmark.entries.run_entry`).
        item: the entry's :meth:`~growprune.benchmark.suite.Entry.to_dict` and its directory.

    Returns:
        The record written.
    """
    from growprune.cli_errors import error_line

    entry_data, directory = item
    entry, entry_dir = Entry.from_dict(entry_data), Path(directory)
    run_entry = shared.get("run_entry") or _default_run_entry()
    started = time.perf_counter()
    try:
        with entry_output(entry_dir / OUTPUT_LOG if shared.get("capture_output") else None):
            metrics = run_entry(entry, entry_dir, wandb_mode=shared.get("wandb_mode", "disabled"))
        if not isinstance(metrics, dict):
            raise TypeError(f"run_entry returned {type(metrics).__name__}, not a dict of metrics")
        record = {**metrics, **_runner_fields(entry, entry_dir), "status": "completed", "error": None}
    except (Exception, SystemExit) as error:
        record = {**_runner_fields(entry, entry_dir), "status": "failed",
                  "error": f"{type(error).__name__}: {error_line(error)}", "traceback": traceback.format_exc()}
    record.setdefault("wall_seconds", round(time.perf_counter() - started, 3))
    record["finished_at"] = _now()
    write_json_atomic(entry_dir / (RESULT if record["status"] == "completed" else FAILED), record)
    return record


@dataclass
class BenchmarkSummary:
    """What one :meth:`BenchmarkRunner.run` did (``summary.json`` holds the same fields)."""

    suite: str
    entries: int
    completed: int
    skipped: int
    failed: int
    wall_seconds: float
    leaderboard: dict[str, str] = field(default_factory=dict)
    failed_entries: list[dict[str, str]] = field(default_factory=list)
    leaderboard_error: str | None = None
    out_dir: str = ""
    path: str = ""
    finished_at: str = ""

    @property
    def exit_code(self) -> int:
        """0 when no entry failed (and the leaderboard was written), else 1."""
        return 1 if self.failed or self.leaderboard_error else 0


class BenchmarkRunner:
    """Runs the (selected) entries of a suite under ``<out>/<suite>/`` (see the module doc).

    Every argument is checked here, before anything is written.

    Args:
        suite: a loaded suite (:func:`~growprune.benchmark.suite.load_suite`).
        out: the benchmark folder; the suite's results go to ``out/<suite name>``.
        engine: ``local`` or ``ray``.
        workers: local: 1 runs entries in this process, more in a spawn process pool of that size;
            ray: CPUs of the local Ray session it starts (``None``: all).
        wandb_mode: passed to every entry and to the leaderboard (``auto``, ``online``,
            ``offline``, ``disabled``).
        seeds: run only these of the suite's seeds (``None``: all).
        only: run only entries whose field (``model``, ``data``, ``method``, ``baseline``) has one
            of the listed values; several fields must all match.
        run_entry: the function that runs one entry (``None``:
            :func:`growprune.benchmark.entries.run_entry`); it must be importable by name for
            ``workers > 1`` or Ray.
        progress: show a tqdm progress bar.
        capture_output: write what each entry prints (Lightning's tables, W&B's messages) into
            ``<entry dir>/output.log`` instead of the console, which keeps the progress bar and
            the final summary (``growprune benchmark --verbose`` turns it off).

    Raises:
        ValueError: an unknown engine or W&B mode, ``workers`` below 1, a seed or ``only`` value
            the suite does not have (the message lists the valid ones), Ray not installed.
    """

    def __init__(self, suite: Suite, out: str | Path = "runs/benchmark", engine: str = "local", workers: int | None = None,
                 wandb_mode: str = "disabled", seeds: Sequence[int] | None = None,
                 only: dict[str, Sequence[str]] | None = None, run_entry: RunEntry | None = None,
                 progress: bool = True, capture_output: bool = True) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"unknown W&B mode {wandb_mode!r}; valid modes: {', '.join(WANDB_MODES)}")
        if engine == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("engine ray: Ray is not installed: pip install 'growprune[ray]'")
        if seeds is not None:
            unknown = [seed for seed in seeds if seed not in suite.seeds]
            if unknown:
                raise ValueError(f"seeds {unknown} are not in suite {suite.name}; its seeds: {list(suite.seeds)}")
        only = {name: list(values) for name, values in (only or {}).items()}
        for name, values in only.items():
            if name not in FILTER_FIELDS:
                raise ValueError(f"unknown filter field {name!r}; valid fields: {', '.join(FILTER_FIELDS)}")
            valid = sorted({str(getattr(entry, name)) for entry in suite.entries})
            unknown = [value for value in values if value not in valid]
            if unknown:
                raise ValueError(f"no entry of suite {suite.name} has {name}={unknown[0]}; valid values: {', '.join(valid)}")
        self.suite, self.engine, self.workers, self.wandb_mode = suite, engine, workers, wandb_mode
        self.out_dir = Path(out) / suite.name
        self.run_entry, self.progress, self.capture_output = run_entry, progress, capture_output
        self.entries = [
            entry for entry in suite.entries
            if (seeds is None or entry.seed in seeds)
            and all(str(getattr(entry, name)) in values for name, values in only.items())
        ]
        if not self.entries:
            raise ValueError(f"the filters select no entry of suite {suite.name}")

    def entry_dir(self, entry: Entry) -> Path:
        """``<out>/<suite>/entries/<key>``."""
        return self.out_dir / "entries" / entry.key

    def plan(self) -> list[tuple[Entry, str]]:
        """Each selected entry with its status now: ``complete``, ``failed`` or ``pending``."""
        return [(entry, entry_status(self.entry_dir(entry))) for entry in self.entries]

    def _engine(self) -> Any:
        from growprune.evolution.engines import make_engine

        if self.engine == "ray":
            return make_engine("ray", num_cpus=self.workers, threads=1)
        return make_engine("local", workers=self.workers or 1)

    def run(self) -> BenchmarkSummary:
        """Run every selected entry that is not complete, then write the leaderboard and ``summary.json``.

        A failed entry is recorded (``failed.json``) and the others still run. Prints a short
        table; the last line is ``summary: <path>``.

        Returns:
            The counts (:attr:`BenchmarkSummary.exit_code` is the command's exit code).
        """
        started = time.perf_counter()
        plan = self.plan()
        pending = [entry for entry, status in plan if status != "complete"]
        skipped = len(plan) - len(pending)
        # the engine first: a Ray that cannot start must not leave earlier failures renamed
        engine = self._engine() if pending else None
        items = []
        for entry in pending:
            entry_dir = self.entry_dir(entry)
            entry_dir.mkdir(parents=True, exist_ok=True)
            for leftover in entry_dir.glob(".*.tmp"):  # a write cut short by a kill: never a record
                leftover.unlink()
            _keep_failed(entry_dir)
            write_json_atomic(entry_dir / ENTRY, entry.to_dict())
            items.append((entry.to_dict(), str(entry_dir)))
        counts = {"done": 0, "skipped": skipped, "failed": 0}
        failures: list[dict[str, str]] = []
        bar = self._progress_bar(len(plan), skipped, counts)
        finished: set[int] = set()

        def count(record: dict[str, Any]) -> None:
            if record["status"] == "completed":
                counts["done"] += 1
            else:
                counts["failed"] += 1
                failures.append({"label": record["label"], "key": record["key"], "error": record["error"]})
            if bar is not None:
                bar.set_postfix(counts, refresh=False)
                bar.update(1)

        try:
            if items:
                shared = {"wandb_mode": self.wandb_mode, "run_entry": self.run_entry,
                          "capture_output": self.capture_output}
                try:
                    with engine:
                        for index, record in engine.imap(execute_entry, items, shared):
                            finished.add(index)
                            count(record)
                except Exception as error:
                    # A worker process died (out of memory, a crash in C code) or the engine failed:
                    # the entries it took with it are recorded as failed, so the leaderboard and the
                    # summary are still written and a rerun retries exactly those entries.
                    from growprune.cli_errors import error_line

                    reason = f"{type(error).__name__}: the worker running it died or the engine failed: {error_line(error)}"
                    for index, (entry_data, directory) in enumerate(items):
                        if index in finished or entry_status(Path(directory)) == "complete":
                            continue
                        written = _read_json(Path(directory) / FAILED)
                        if written is not None:  # the entry's own failure, written before the engine broke
                            count(written)
                            continue
                        entry = Entry.from_dict(entry_data)
                        record = {**_runner_fields(entry, Path(directory)), "status": "failed", "error": reason,
                                  "traceback": traceback.format_exc(), "finished_at": _now()}
                        write_json_atomic(Path(directory) / FAILED, record)
                        count(record)
        finally:
            if bar is not None:
                bar.close()
                console = getattr(bar, "console", None)
                if console is not None and console is not sys.stderr:
                    console.close()  # the duplicated descriptor of console_stream()
        summary = BenchmarkSummary(suite=self.suite.name, entries=len(plan), completed=counts["done"], skipped=skipped,
                                   failed=counts["failed"], wall_seconds=0.0, failed_entries=failures,
                                   out_dir=str(self.out_dir))
        try:
            summary.leaderboard = {name: str(path) for name, path in self.write_leaderboard().items()}
        except Exception as error:  # the entries' records are safe; say what went wrong and exit 1
            from growprune.cli_errors import error_line

            summary.leaderboard_error = f"{type(error).__name__}: {error_line(error)}"
        summary.wall_seconds = round(time.perf_counter() - started, 3)
        summary.finished_at = _now()
        path = self.out_dir / "summary.json"
        summary.path = str(path)
        write_json_atomic(path, asdict(summary))
        print(format_summary(summary), flush=True)
        return summary

    def _progress_bar(self, total: int, skipped: int, counts: dict[str, int]) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        console = console_stream() if self.capture_output else sys.stderr
        bar = tqdm(total=total, desc=f"benchmark {self.suite.name}", unit="entry", dynamic_ncols=True, file=console)
        bar.console = console
        bar.set_postfix(counts, refresh=False)
        bar.update(skipped)
        return bar

    def records(self) -> list[dict[str, Any]]:
        """The records of the whole suite grid found on disk (not only the selected entries)."""
        return read_records(self.out_dir, self.suite.entries)

    def write_leaderboard(self) -> dict[str, Path]:
        """Rebuild the leaderboard files from the records on disk (:func:`growprune.benchmark.report.write_leaderboard`).

        Returns:
            The leaderboard's files by name.
        """
        from growprune.benchmark.report import write_leaderboard

        self.out_dir.mkdir(parents=True, exist_ok=True)
        # W&B's notices of the leaderboard run go to <out>/leaderboard.log, like an entry's to its output.log
        with entry_output(self.out_dir / "leaderboard.log" if self.capture_output else None):
            return write_leaderboard(self.suite.name, self.records(), self.out_dir, dict(self.suite.report),
                                     dict(self.suite.wandb), wandb_mode=self.wandb_mode)


def format_summary(summary: BenchmarkSummary) -> str:
    """The table printed after a run; its last line is ``summary: <path>``."""
    lines = [
        f"suite {summary.suite}: {summary.entries} entries",
        f"  completed  {summary.completed}",
        f"  skipped    {summary.skipped} (complete before this run)",
        f"  failed     {summary.failed}",
        f"  wall time  {summary.wall_seconds:.1f} s",
    ]
    lines += [f"  failed: {failure['label']} ({failure['key']}): {failure['error']}" for failure in summary.failed_entries]
    lines += [f"  {name}: {path}" for name, path in summary.leaderboard.items()]
    if summary.leaderboard_error:
        lines.append(f"  leaderboard failed: {summary.leaderboard_error}")
    lines.append(f"summary: {summary.path}")
    return "\n".join(lines)
