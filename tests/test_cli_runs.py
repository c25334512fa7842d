"""Runs of the growprune command: distributed fits, resumed runs, what the summary reports.

The two distributed tests run the real command in a subprocess (DDP starts processes of its own);
everything else runs in-process on tiny synthetic data.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import growprune.metrics as metrics
from growprune.cli import main
from growprune.loggers import WandbLogger
from growprune.metrics import measure_latency
from growprune.module import GrowPruneModule
from growprune.runs import RUN_KEY, resume_metrics_csv
from growprune.surgery.edits import RemoveChannels

# Tiny data (4 batches of 32), structured pruning of half of the hidden units at the start.
TINY = """
seed_everything: 0
trainer:
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: runs, name: tiny}
  callbacks:
    - class_path: growprune.strategies.StructuredPruning
      init_args:
        verbose: false
        schedule:
          class_path: growprune.schedules.OneShot
          init_args: {amount: 0.5, at: 0}
data:
  class_path: growprune.data.SyntheticDataModule
  init_args: {num_samples: 128, input_shape: [1, 8, 8], num_classes: 4, batch_size: 32}
"""
WANDB_OFFLINE = """
trainer:
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: runs, name: tiny}
    - class_path: growprune.loggers.WandbLogger
      init_args: {save_dir: runs, project: growprune, mode: offline}
"""


def _config(tmp_path: Path, text: str = TINY, name: str = "tiny.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _summary_path(output: str) -> Path:
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith("summary: "), last_line
    return Path(last_line.removeprefix("summary: "))


def _epoch_rows(path: Path, key: str) -> list[int]:
    """Epochs of the metrics.csv rows that carry ``key`` (one per epoch when nothing is repeated)."""
    return [int(row["epoch"]) for row in csv.DictReader(path.open()) if row.get(key)]


# ------------------------------------------------------------------------------------ distributed
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_distributed_fit_from_the_command_line_writes_one_summary_in_its_run(strategy, tmp_path):
    # Before: ddp exited 1 (rank 1 skipped the collective call that finds the run directory) and
    # ddp_spawn wrote a second, empty run directory with a summary reporting epoch 0.
    command = [sys.executable, "-m", "growprune.cli", "fit", "-c", _config(tmp_path),
               "--trainer.strategy", strategy, "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    environment = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    done = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = sorted(tmp_path.glob("runs/**/summary*.json"))
    assert summaries == [tmp_path / "runs" / "tiny" / "version_0" / "summary.json"]
    assert sorted(path.name for path in (tmp_path / "runs" / "tiny").iterdir()) == ["version_0"]
    assert tmp_path / _summary_path(done.stdout) == summaries[0]
    summary = json.loads(summaries[0].read_text())
    assert summary["epochs"] == 2 and summary["global_step"] == 4  # 2 epochs x 2 batches per rank
    assert 0 <= summary["val/acc"] <= 1
    # pruning happened in the workers and the summary reports their network
    assert summary["flops/dense"] < summary["flops/original"] and summary["flops/reduction"] > 1.5
    checkpoint = tmp_path / summary["checkpoint"]
    assert checkpoint.parent == tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    restored = GrowPruneModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert restored.size_metrics()["params/total"] == summary["params/total"]
    assert restored.original_flops == summary["flops/original"]


# ---------------------------------------------------------------------------------------- resuming
def test_resumed_fit_continues_its_run_directory_metrics_and_wandb_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = [_config(tmp_path), "-c", _config(tmp_path, WANDB_OFFLINE, "wandb.yaml")]
    main(["fit", "-c", *config])
    first = _summary_path(capsys.readouterr().out)
    run = first.parent
    checkpoint = Path(json.loads(first.read_text())["checkpoint"])
    stored = checkpoint.read_bytes()
    run_id = torch.load(checkpoint, weights_only=True)[RUN_KEY]["wandb_run_id"]
    assert run_id

    main(["fit", "-c", *config, "--trainer.max_epochs", "4", "--ckpt_path", str(checkpoint)])
    captured = capsys.readouterr()
    assert f"continuing run {run.resolve()}" in captured.err and f"W&B run {run_id}" in captured.err
    resumed = _summary_path(captured.out)
    # one run directory; the first fit's summary, config and checkpoint are kept as they were
    assert sorted(path.name for path in run.parent.iterdir()) == ["version_0"]
    assert resumed == run / "summary-1.json"
    assert json.loads(first.read_text())["epochs"] == 2
    assert json.loads(resumed.read_text())["epochs"] == 4
    assert (run / "config.yaml").is_file() and (run / "config-1.yaml").is_file()
    assert checkpoint.read_bytes() == stored
    # one metrics.csv with every epoch once
    assert _epoch_rows(run / "metrics.csv", "val/acc") == [0, 1, 2, 3]
    assert _epoch_rows(run / "metrics.csv", "train/loss_epoch") == [0, 1, 2, 3]
    assert not list(run.glob("metrics-before-resume*.csv"))
    # W&B: the second fit logged into the same run (offline: a second folder with the same id)
    folders = sorted(path.name for path in (tmp_path / "runs" / "wandb").glob("offline-run-*"))
    # (W&B names the folder by the start time to the second; a resume started in the same second
    # as the first fit started gets the name with "-1" appended: no folder is overwritten)
    assert len(folders) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", name) for name in folders), folders


def test_checkpoint_outside_a_run_directory_starts_a_new_run(tmp_path, capsys):
    main(["fit", "-c", _config(tmp_path), "--trainer.max_epochs", "1"])
    checkpoint = Path(json.loads(_summary_path(capsys.readouterr().out).read_text())["checkpoint"])
    copied = tmp_path / "copied.ckpt"
    shutil.copy(checkpoint, copied)
    main(["fit", "-c", _config(tmp_path), "--ckpt_path", str(copied)])
    captured = capsys.readouterr()
    assert "is not in a run directory of this configuration" in captured.err and "new run" in captured.err
    summary_path = _summary_path(captured.out)
    assert summary_path.parent.name == "version_1"
    assert json.loads(summary_path.read_text())["epochs"] == 2
    assert _epoch_rows(summary_path.parent / "metrics.csv", "val/acc") == [1]


def test_metrics_logged_after_the_checkpoint_are_dropped_and_kept_aside(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    run = tmp_path / "runs" / "tiny" / "version_0"
    run.mkdir(parents=True)
    rows = [{"epoch": epoch, "step": 4 * epoch + 3, "val/acc": 0.5} for epoch in range(4)]
    with (run / "metrics.csv").open("w", newline="") as file:
        table = csv.DictWriter(file, fieldnames=["epoch", "step", "val/acc"])
        table.writeheader()
        table.writerows(rows)
    original = (run / "metrics.csv").read_text()
    logger = CSVLogger(str(tmp_path / "runs"), name="tiny", version=0)
    backup = resume_metrics_csv(logger, {"epochs": 2, "global_step": 8})
    assert backup == run / "metrics-before-resume.csv" and backup.read_text() == original
    assert _epoch_rows(run / "metrics.csv", "val/acc") == [0, 1]
    # what the logger writes next is appended under the same header
    logger.log_metrics({"val/acc": 0.75, "epoch": 2}, step=11)
    logger.save()
    assert _epoch_rows(run / "metrics.csv", "val/acc") == [0, 1, 2]


def test_validate_and_test_report_the_checkpoints_epochs_and_step(tmp_path, capsys):
    main(["fit", "-c", _config(tmp_path)])
    fitted = json.loads(_summary_path(capsys.readouterr().out).read_text())
    for command in ("validate", "test"):
        main([command, "-c", _config(tmp_path), "--ckpt_path", fitted["checkpoint"]])
        summary = json.loads(_summary_path(capsys.readouterr().out).read_text())
        assert (summary["epochs"], summary["global_step"]) == (2, fitted["global_step"]) == (2, 6)  # 3 batches/epoch
        assert summary["checkpoint"] == fitted["checkpoint"]
        assert summary["flops/original"] == fitted["flops/original"] and summary["flops/reduction"] > 1.5


# ------------------------------------------------------------------------------- summary figures
def test_original_flops_survive_a_checkpoint_reload():
    module = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    original = module.size_metrics(include_original=True)
    assert original["flops/original"] == original["flops/dense"] and original["flops/reduction"] == 1.0
    assert original["params/original"] == original["params/total"]
    module.apply_edit(RemoveChannels({"1": list(range(200))}))
    pruned = module.size_metrics(include_original=True)
    assert pruned["flops/original"] == original["flops/original"]
    assert pruned["flops/reduction"] == pytest.approx(original["flops/dense"] / pruned["flops/dense"])
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    fresh = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.size_metrics(include_original=True) == pruned
    # the count is the checkpoint's, not one of the freshly built network
    checkpoint["growprune"]["original_flops"] = 1e6
    fresh = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.size_metrics(include_original=True)["flops/original"] == 1e6
    # a checkpoint from before the count was stored: the base network is counted before the replay
    del checkpoint["growprune"]["original_flops"]
    fresh = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.size_metrics(include_original=True) == pruned
    # counted lazily, but always on the network before its first edit
    module = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    module.apply_edit(RemoveChannels({"1": list(range(200))}))
    assert module.size_metrics(include_original=True) == pruned


class _VirtualClock:
    """A clock that only the model's forward moves: pass ``i`` takes ``durations[i]`` seconds."""

    def __init__(self, durations: list[float]):
        self.now, self.durations, self.calls = 0.0, durations, 0

    def __call__(self) -> float:
        return self.now

    def forward(self) -> None:
        self.now += self.durations[self.calls]
        self.calls += 1


class _Timed(nn.Module):
    def __init__(self, clock: _VirtualClock):
        super().__init__()
        self.layer, self.clock = nn.Linear(4, 2), clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.forward()
        return self.layer(x)


def test_reported_latency_is_the_fastest_pass_within_a_time_bound(monkeypatch):
    # 3 warm-up passes, then 20 timed ones of which 15 are slowed 50x by other work on the machine
    durations = [1.0] * 3 + [0.05 if index % 4 else 0.001 for index in range(20)]
    clock = _VirtualClock(durations)
    monkeypatch.setattr(metrics, "_clock", lambda device: clock)
    assert measure_latency(_Timed(clock), (4,), repeats=20, warmup=3, statistic="min") == pytest.approx(0.001)
    assert clock.calls == 23
    # the median moves with the load; the minimum does not
    clock = _VirtualClock(durations)
    assert measure_latency(_Timed(clock), (4,), repeats=20, warmup=3) == pytest.approx(0.05)
    # the timed passes stop once their total passes max_seconds (warm-up is not counted)
    clock = _VirtualClock([1.0] * 3 + [0.4] * 20)
    assert measure_latency(_Timed(clock), (4,), repeats=20, warmup=3, statistic="min", max_seconds=1.0) == pytest.approx(0.4)
    assert clock.calls == 3 + 3
    with pytest.raises(ValueError, match="statistic"):
        measure_latency(_Timed(clock), (4,), statistic="mean")


def test_summary_states_latency_threads_and_original_size(tmp_path, capsys):
    main(["fit", "-c", _config(tmp_path), "--trainer.max_epochs", "1"])
    summary = json.loads(_summary_path(capsys.readouterr().out).read_text())
    assert summary["latency/threads"] == torch.get_num_threads()
    assert summary["latency/batch1_ms"] > 0
    assert summary["params/original"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 4 + 4
    assert summary["flops/original"] == 2 * (64 * 300 + 300 * 100 + 100 * 4)


# ------------------------------------------------------------------------------------------- W&B
def test_every_command_finishes_its_own_wandb_run(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    config = [_config(tmp_path), "-c", _config(tmp_path, WANDB_OFFLINE, "wandb.yaml"), "--trainer.max_epochs", "1"]
    # a run that raises once training has started (W&B run open) ends its W&B run too
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with monkeypatch.context() as patch:
        patch.setattr(GrowPruneModule, "on_train_start", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            main(["fit", "-c", *config])
    assert wandb.run is None
    # then, from another directory, a fit and a validate: each its own run with its data file
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    main(["fit", "-c", *config])
    checkpoint = json.loads(_summary_path(capsys.readouterr().out).read_text())["checkpoint"]
    assert wandb.run is None
    main(["validate", "-c", *config, "--ckpt_path", checkpoint])
    assert wandb.run is None
    folders = sorted((tmp_path / "a" / "runs" / "wandb").glob("offline-run-*"))
    folders += sorted((tmp_path / "b" / "runs" / "wandb").glob("offline-run-*"))
    assert len(folders) == 3 and len({folder.name[-8:] for folder in folders}) == 3
    assert all(list(folder.glob("*.wandb")) for folder in folders), "an offline run has no .wandb data file"
    # an offline run leaves the process's W&B mode alone (Lightning's offline=True sets WANDB_MODE=dryrun)
    assert os.environ["WANDB_MODE"] == "offline"


def test_a_new_logger_never_logs_into_a_run_left_open(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    first = WandbLogger(save_dir="runs")
    left_open = first.experiment
    second = WandbLogger(save_dir="runs")
    assert second.experiment.id != left_open.id
    assert wandb.run is second.experiment
    second.finish()
    assert wandb.run is None
    first.finish()  # its run was already finished by the second logger: nothing left to do
    assert Path(second.save_dir).is_absolute() and Path(second.save_dir) == tmp_path / "runs"
