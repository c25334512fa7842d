"""``growprune benchmark``: suites of (model, data, method, target, seed) runs and their leaderboard.

:mod:`growprune.benchmark.suite` reads and expands suite files, :mod:`growprune.benchmark.runner`
runs the grid (skipping complete entries, recording failures), :mod:`growprune.benchmark.entries`
runs one entry and :mod:`growprune.benchmark.report` writes the leaderboard. The command line is
:mod:`growprune.cli_benchmark`.
"""

from growprune.benchmark.runner import BenchmarkRunner, BenchmarkSummary, read_records
from growprune.benchmark.suite import (
    BASELINES,
    COMMANDS,
    Entry,
    MethodSpec,
    Suite,
    list_suites,
    load_suite,
    resolve_suite_path,
)

__all__ = [
    "BASELINES",
    "COMMANDS",
    "BenchmarkRunner",
    "BenchmarkSummary",
    "Entry",
    "MethodSpec",
    "Suite",
    "list_suites",
    "load_suite",
    "read_records",
    "resolve_suite_path",
]
