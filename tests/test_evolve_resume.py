"""``growprune evolve --resume`` after ``kill -9``: nothing lost, nothing repeated, the same result.

The real command runs in subprocesses: one uninterrupted run, and one killed with SIGKILL as soon
as its state.pt reports a completed generation, then resumed. About a minute on 2 CPU cores; the
same for PBT cycles (marked slow).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

# Digits at 28x28 (LeNet-300-100 with 266k weights, so a generation takes a noticeable time),
# population 6, 4 generations in 3 evaluation chunks each; no activation cache, so the MACs a
# generation spends do not depend on what an earlier process had cached.
CONFIG = """
name: resume
seed: 0
generations: 4
model:
  arch: lenet_300_100
  optimizer:
    class_path: torch.optim.SGD
    init_args: {lr: 0.05, momentum: 0.9}
data:
  class_path: growprune.data.DigitsDataModule
  init_args: {batch_size: 64, seed: 0, image_size: 28, val_fraction: 0.5}
base: {epochs: 1}
genotype:
  class_path: growprune.evolution.MaskGenotype
objective:
  class_path: growprune.evolution.SmallestAboveFloor
  init_args: {floor: 0.5}
search:
  class_path: growprune.evolution.GeneticSearch
  init_args: {population: 6, elite: 1, mutation_rate: 0.02}
evaluation: {method: race, cache: false, batch_size: 100}
chunks: 3
wandb: {mode: disabled}
"""
RUN = Path("runs/evolve/resume/version_0")
ENVIRONMENT = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


# PBT: 4 members, 4 cycles of (GA prune 2 generations of 8, retrain 1 epoch, exploit the best).
PBT_CONFIG = """
name: resume
seed: 0
model:
  arch: lenet_300_100
  optimizer:
    class_path: torch.optim.SGD
    init_args: {lr: 0.05, momentum: 0.9}
data:
  class_path: growprune.data.DigitsDataModule
  init_args: {batch_size: 64, seed: 0}
base: {epochs: 2}
genotype:
  class_path: growprune.evolution.MaskGenotype
objective:
  class_path: growprune.evolution.AccuracyAtSparsity
  init_args: {sparsity: 0.8}
search:
  class_path: growprune.evolution.GeneticSearch
  init_args: {population: 8, elite: 1, initial_density: 0.3}
evaluation: {method: race, cache: false}
pbt:
  class_path: growprune.evolution.PBTCycles
  init_args: {cycles: 4, members: 4, epochs: 1, prune_generations: 2, exploit_fraction: 0.25}
chunks: 2
wandb: {mode: disabled}
"""


def _command(folder: Path, *extra: str, config: str = CONFIG) -> list[str]:
    (folder / "resume.yaml").write_text(textwrap.dedent(config))
    return [sys.executable, "-m", "growprune.cli", "evolve", "-c", "resume.yaml", *extra]


def _rows(run: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((run / "generations.csv").open()))
    for row in rows:
        row.pop("wall_seconds")
    return rows


def _journal(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]


def _completed(run: Path) -> int:
    try:
        return int(torch.load(run / "state.pt", weights_only=True)["generation"])
    except (FileNotFoundError, EOFError, RuntimeError, pickle.UnpicklingError):
        return -1


def _mid_generation(run: Path) -> bool:
    """A generation is complete and the next one has journaled results (a chunk finished)."""
    completed = _completed(run)
    if completed < 1:
        return False
    journal = run / "evaluations.jsonl"
    if not journal.is_file():
        return True  # PBT runs journal per member: kill once a cycle is complete
    lines = journal.read_text().splitlines()
    return any(json.loads(line)["generation"] >= completed for line in lines[:-1])  # the last may be torn


def _kill_resume_and_reference(tmp_path: Path, config: str) -> tuple[Path, Path]:
    """Run ``config`` uninterrupted and, beside it, killed with SIGKILL in the middle of a
    generation (after one completed, once a chunk of the next has finished), then resumed; the two
    run directories (uninterrupted, resumed)."""
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    reference = subprocess.Popen(_command(reference_dir, config=config), cwd=reference_dir, env=ENVIRONMENT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(_command(killed_dir, config=config), cwd=killed_dir, env=ENVIRONMENT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _mid_generation(killed_dir / RUN) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert killed.poll() is None, f"the run ended (exit code {killed.returncode}) before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    completed = _completed(killed_dir / RUN)
    assert killed.returncode == -signal.SIGKILL
    assert 1 <= completed < 4, f"the run was not killed in the middle (state: {completed} generations)"
    assert not (killed_dir / RUN / "summary.json").exists()

    resumed = subprocess.run(_command(killed_dir, "--resume", config=config), cwd=killed_dir, env=ENVIRONMENT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing run {RUN}" in resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == f"summary: {RUN / 'summary.json'}"
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    # one run directory
    assert sorted(path.name for path in (killed_dir / RUN).parent.iterdir()) == ["version_0"]
    return reference_dir / RUN, killed_dir / RUN


def _same_best(first: Path, second: Path) -> None:
    a = json.loads((first / "summary.json").read_text())
    b = json.loads((second / "summary.json").read_text())
    for key in ("genome_key", "accuracy/selection", "val/acc", "test/acc", "size", "params/nonzero", "fitness"):
        assert a["best"][key] == b["best"][key], key
    assert a["evaluations"] == b["evaluations"] and a["macs"] == b["macs"]


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    first, second = _kill_resume_and_reference(tmp_path, CONFIG)
    # every generation once, with the uninterrupted run's numbers
    assert _rows(second) == _rows(first)
    assert [int(row["generation"]) for row in _rows(second)] == [0, 1, 2, 3]
    # no evaluation repeated or lost: the journal holds every genome once, as many as uninterrupted
    journal, expected = _journal(second), _journal(first)
    assert len(journal) == len(expected) == int(_rows(first)[-1]["evaluations_total"])
    assert len({entry["key"] for entry in journal}) == len(journal)
    assert sorted(entry["key"] for entry in journal) == sorted(entry["key"] for entry in expected)
    _same_best(first, second)
    assert torch.load(second / "state.pt", weights_only=True)["generation"] == 4


@pytest.mark.slow  # another minute: the plain run's test above covers the mechanism
def test_pbt_cycles_killed_with_sigkill_resume_to_the_uninterrupted_result(tmp_path):
    first, second = _kill_resume_and_reference(tmp_path, PBT_CONFIG)
    assert _rows(second) == _rows(first)
    assert [int(row["generation"]) for row in _rows(second)] == [0, 1, 2, 3]  # one row per cycle
    _same_best(first, second)
    assert torch.load(second / "state.pt", weights_only=True)["generation"] == 4
