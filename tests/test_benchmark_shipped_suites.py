"""The suites shipped in benchmarks/suites: each loads, every entry's config passes its command's
parser, and each keeps the promises of the README's suite table (seeds, baselines, sizes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from growprune.benchmark.suite import BASELINES, load_suite

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "benchmarks" / "suites"
SHIPPED = sorted(path.stem for path in SUITES.glob("*.yaml"))


def test_the_readme_table_lists_every_shipped_suite():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Benchmark suites and leaderboards"):]
    listed = re.findall(r"^\| `([a-z0-9-]+)` \| (fit|evolve|qd|latency) \|", section, flags=re.MULTILINE)
    assert sorted(name for name, _ in listed) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_suite_loads_and_validates(name, monkeypatch):
    monkeypatch.chdir(REPO)  # suites name their base configs and data relative to the repository root
    suite = load_suite(name, SUITES, validate_configs=True)
    entries = suite.entries
    assert entries and suite.name == name
    assert len({entry.key for entry in entries}) == len(entries)
    seeds = {entry.seed for entry in entries}
    assert len(seeds) >= 3, f"{name}: mean and spread need at least 3 seeds"
    # every (model, data, method, target) has every seed
    groups: dict[tuple, set[int]] = {}
    for entry in entries:
        groups.setdefault((entry.model, entry.data, entry.method, entry.target), set()).add(entry.seed)
    assert all(found == seeds for found in groups.values())
    if suite.command == "fit" and suite.require_baselines:
        assert {entry.baseline for entry in entries} >= set(BASELINES)
