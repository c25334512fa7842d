"""The ``growprune benchmark`` command: run a suite's grid of (model, data, method, target, seed).

    growprune benchmark --list                                  # the suites in benchmarks/suites
    growprune benchmark --suite smoke --dry-run                 # the grid: label, key, status; writes nothing
    growprune benchmark --suite smoke                           # run it (complete entries are skipped)
    growprune benchmark --suite smoke --workers 2               # two entries at a time (spawn processes)
    growprune benchmark --suite smoke --engine ray              # one Ray task per entry
    growprune benchmark --suite smoke --only method=magnitude_global --seeds 0,1
    growprune benchmark --suite smoke --report-only             # rebuild the leaderboard from the results
    growprune benchmark --suite path/to/my_suite.yaml --out runs/mine --wandb disabled

Results go to ``<out>/<suite>/`` (see :mod:`growprune.benchmark.runner`); the last line printed is
``summary: <path>``. Exit code 0 when every entry completed, 1 when some failed (the others still
ran and the leaderboard was written), 2 for bad input (one line ``growprune: error: ...``, nothing
written).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

from growprune.errors import ConfigurationError

EXAMPLES = """examples:
  growprune benchmark --list
  growprune benchmark --suite smoke --dry-run
  growprune benchmark --suite smoke
  growprune benchmark --suite smoke --workers 2
  growprune benchmark --suite smoke --engine ray
  growprune benchmark --suite smoke --only method=magnitude_global --only model=lenet300 --seeds 0,1
  growprune benchmark --suite smoke --report-only

Suites are benchmarks/suites/<name>.yaml under the current directory (format: benchmarks/suites/README.md),
or --suite path/to/file.yaml. Entries already complete (their result.json) are skipped, so rerunning
after an interruption resumes. Exit codes: 0 all completed, 1 some entries failed, 2 bad input.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, not argparse's usage dump
        if message.startswith("unrecognized arguments: "):
            options = [option for action in self._actions for option in action.option_strings if option != "--suites-dir"]
            problems = []
            for token in message.removeprefix("unrecognized arguments: ").split():
                if token.startswith("-"):
                    option = token.split("=", 1)[0]
                    close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    problems.append(f"unknown option '{option}'{hint}; valid options: {', '.join(options)}")
            if problems:
                raise ConfigurationError("; ".join(problems))
        raise ConfigurationError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``growprune benchmark`` argument parser (no abbreviated options)."""
    parser = _Parser(prog="growprune benchmark", allow_abbrev=False, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Run a benchmark suite: a grid of (model, data, method, target, seed) runs, "
                                 "each in its own directory, and a leaderboard over seeds.")
    parser.add_argument("--suite", help="suite name (benchmarks/suites/<name>.yaml) or path to a .yaml file")
    parser.add_argument("--list", action="store_true", help="list the suites (name, command, entries, description)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid (label, key, status) and write nothing")
    parser.add_argument("--engine", default="local", choices=("local", "ray"),
                        help="local: this process or a spawn pool (--workers); ray: one Ray task per entry")
    parser.add_argument("--workers", type=int, default=None,
                        help="local: entries at a time (default 1: in this process); ray: CPUs of the local session (default all)")
    parser.add_argument("--out", default="runs/benchmark", help="benchmark folder; results go to <out>/<suite> (default runs/benchmark)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds of the suite to run, e.g. 0,1")
    parser.add_argument("--only", action="append", default=[], metavar="FIELD=VALUE",
                        help="run only entries with this model/data/method/baseline; repeat (same field: any, "
                             "different fields: all)")
    parser.add_argument("--wandb", default="auto", choices=("auto", "online", "offline", "disabled"),
                        help="W&B mode of every entry and of the leaderboard run (default auto; WANDB_MODE wins)")
    parser.add_argument("--verbose", action="store_true",
                        help="print each entry's own output (Lightning, W&B) instead of writing it to <entry dir>/output.log")
    parser.add_argument("--report-only", action="store_true", help="rebuild the leaderboard from existing results, run nothing")
    parser.add_argument("--suites-dir", default="benchmarks/suites", help=argparse.SUPPRESS)
    return parser


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigurationError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigurationError(f"--seeds: expected comma-separated integers, got {text!r}")
    return seeds


def _only(values: list[str]) -> dict[str, list[str]]:
    from growprune.benchmark.runner import FILTER_FIELDS

    only: dict[str, list[str]] = {}
    for value in values:
        name, sep, wanted = value.partition("=")
        if not sep or not wanted:
            raise ConfigurationError(f"--only: expected FIELD=VALUE with FIELD one of {', '.join(FILTER_FIELDS)}, got {value!r}")
        if name not in FILTER_FIELDS:
            raise ConfigurationError(f"--only: unknown field {name!r}; valid fields: {', '.join(FILTER_FIELDS)}")
        only.setdefault(name, []).append(wanted)
    return only


def _list(directory: str) -> int:
    from growprune.benchmark.suite import list_suites, load_suite

    names = list_suites(directory)
    if not names:
        print(f"no suites in {directory}")
        return 0
    width = max(len(name) for name in names)
    for name in names:
        try:
            suite = load_suite(name, directory, validate_configs=False)
        except ValueError as error:
            print(f"{name:<{width}}  invalid: {error}")
            continue
        first = suite.description.split(". ")[0].strip().rstrip(".")
        first = first if len(first) <= 100 else first[:97] + "..."
        print(f"{name:<{width}}  {suite.command:<7} {len(suite.entries):>4} entries  {first}")
    return 0


def _dry_run(runner: Any) -> int:
    plan = runner.plan()
    width = max(len(entry.label) for entry, _ in plan)
    print(f"suite {runner.suite.name}: {len(plan)} entries ({runner.suite.command}) under {runner.out_dir}")
    for entry, status in plan:
        print(f"{entry.label:<{width}}  {entry.key}  {status}")
    counts = {status: sum(1 for _, s in plan if s == status) for status in ("complete", "failed", "pending")}
    print(f"{counts['complete']} complete, {counts['failed']} failed, {counts['pending']} pending")
    return 0


def _report_only(runner: Any) -> int:
    if not runner.records():
        raise ConfigurationError(f"no results of suite {runner.suite.name} under {runner.out_dir}: run it first")
    for name, path in runner.write_leaderboard().items():
        print(f"{name}: {path}")
    return 0


def benchmark_main(argv: list[str]) -> int:
    """``growprune benchmark ...``; bad input prints one line ``growprune: error: ...``.

    Returns:
        The exit code: 0 all entries completed (or ``--list``/``--dry-run``/``--report-only``
        succeeded), 1 some entries failed, 2 bad input (nothing written).
    """
    from growprune.cli_errors import error_line

    try:
        try:
            args = build_parser().parse_args(list(argv))
        except SystemExit as done:  # --help
            return int(done.code or 0)
        if args.list:
            return _list(args.suites_dir)
        if args.suite is None:
            raise ConfigurationError("--suite is required (or --list to see the suites)")
        if args.workers is not None and args.workers < 1:
            raise ConfigurationError(f"--workers: must be >= 1, got {args.workers}")
        from growprune.benchmark.runner import BenchmarkRunner
        from growprune.benchmark.suite import load_suite

        suite = load_suite(args.suite, args.suites_dir, validate_configs=not args.report_only)
        runner = BenchmarkRunner(suite, out=Path(args.out), engine=args.engine, workers=args.workers,
                                 wandb_mode=args.wandb, seeds=_seeds(args.seeds), only=_only(args.only),
                                 progress=True, capture_output=not args.verbose)
        if args.dry_run:
            return _dry_run(runner)
        if args.report_only:
            return _report_only(runner)
    except (ConfigurationError, ValueError) as error:
        print(f"growprune: error: {error_line(error)}", file=sys.stderr)
        return 2
    return runner.run().exit_code


def main() -> None:
    """``python -m growprune.cli_benchmark``: :func:`benchmark_main` with the process's arguments."""
    raise SystemExit(benchmark_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
