"""``growprune qd``: the shipped digits config end to end, --resume (in-process, and after a real
``kill -9`` in a subprocess: slow), and bad input refused in one line before anything is written."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from growprune.cli import main

pytest.importorskip("ribs")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qd" / "lenet300_masks_digits.yaml"


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    from growprune.data import DigitsDataModule
    from growprune.qd import SupervisedMaskTask

    folder = tmp_path_factory.mktemp("base")
    SupervisedMaskTask(data=DigitsDataModule(seed=0), base_epochs=2).bind(0, folder)
    return str(folder / "base.ckpt")


def _arguments(base_checkpoint, *extra):
    return ["qd", "-c", str(CONFIG), "--task.init_args.base_checkpoint", base_checkpoint, "--wandb.mode", "disabled",
            *extra]


def _refused(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("growprune: error: "), err
    assert message in err[0], err[0]
    assert not Path("runs").exists()  # nothing written
    return err[0]


def _rows(run_dir):
    rows = list(csv.DictReader((run_dir / "iterations.csv").open()))
    for row in rows:
        row.pop("wall_time")
    return rows


def test_the_digits_config_runs_and_resumes_from_its_run_directory(base_checkpoint, capsys):
    main(_arguments(base_checkpoint, "--iterations", "1"))
    run_dir = Path("runs/qd/lenet300_masks_digits/version_0")
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"summary: {run_dir / 'summary.json'}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["evaluations"] == 32 and summary["descriptors"] == ["density", "assortativity"]
    assert 0.0 < summary["coverage"] <= 32 / 400
    # more iterations on the finished run, with its own config (no -c)
    main(["qd", "--resume", str(run_dir), "--iterations", "2"])
    captured = capsys.readouterr()
    assert f"continuing run {run_dir}" in captured.err
    assert [row["iteration"] for row in _rows(run_dir)] == ["0", "1"]
    assert json.loads((run_dir / "summary.json").read_text())["evaluations"] == 64
    assert sorted(path.name for path in run_dir.parent.iterdir()) == ["version_0"]


def test_print_config_shows_every_section(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["qd", "-c", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("task:", "descriptors:", "archive:", "emitters:", "checkpoint_every:", "engine:"):
        assert key in out
    assert not Path("runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--descriptors", "[density, modularityy]"],
     "descriptors: unknown descriptor 'modularityy' for SupervisedMaskTask; valid: density, sparsity, modularity"),
    (["--descriptors", "[density]"], "archive.dims: one cell count per descriptor (1: density), got [20, 20]"),
    (["--archive.ranges", "[[0.0, 1.0], [0.0, 0.0]]"], "archive.ranges: the range of assortativity is empty"),
    (["--task", "growprune.qd.NoSuchTask"], "(growprune's tasks: growprune.qd.SupervisedMaskTask, growprune.qd.ControlTask"),
    (["--task.init_args.modle", "lenet5"], "task > growprune.qd.SupervisedMaskTask: option 'modle' is not accepted"),
    (["--emitters", "[{class_path: growprune.qd.MaskMutationEmitter, init_args: {batchsize: 4}}]"],
     "emitters[0] > MaskMutationEmitter: unknown init_args key 'batchsize'; valid: batch_size, kind"),
    (["--engine", "spark"], "engine: unknown engine 'spark'"),
    (["--iterations", "0"], "iterations: must be an integer >= 1, got 0"),
])
def test_bad_input_is_one_line_before_anything_is_written(capsys, extra, message):
    _refused(capsys, ["qd", "-c", str(CONFIG), "--wandb.mode", "disabled", *extra], message)


def test_a_missing_pyribs_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ribs", None)  # import ribs -> ImportError
    _refused(capsys, ["qd", "-c", str(CONFIG)], "pip install 'growprune[qd]'")


def test_resume_without_a_run_is_refused(capsys):
    _refused(capsys, ["qd", "-c", str(CONFIG), "--resume"], "resume: no run named 'lenet300_masks_digits'")
    _refused(capsys, ["qd", "--resume", "nowhere/version_3"], "resume: nowhere/version_3 is not a qd run directory")


# ------------------------------------------------------------------------------------- kill -9
ENVIRONMENT = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
RUN = Path("runs/qd/lenet300_masks_digits/version_0")
ITERATIONS = 8


def _completed(run: Path) -> int:
    try:
        with (run / "state.pkl").open("rb") as handle:
            return _iteration_of(handle)
    except (FileNotFoundError, EOFError, pickle.UnpicklingError):
        return -1


def _iteration_of(handle) -> int:
    """The state's iteration, reading the task reference (a persistent id) as None."""

    class Skipping(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

    return int(Skipping(handle).load()["iteration"])


def _command(base_checkpoint, *extra):
    return [sys.executable, "-m", "growprune.cli", *_arguments(base_checkpoint, "--iterations", str(ITERATIONS), *extra)]


@pytest.mark.slow  # three processes of ~10 s start-up each on 2 cores
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, base_checkpoint):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    reference = subprocess.Popen(_command(base_checkpoint), cwd=reference_dir, env=ENVIRONMENT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(_command(base_checkpoint), cwd=killed_dir, env=ENVIRONMENT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _completed(killed_dir / RUN) < 2 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert killed.poll() is None, f"the run ended (exit code {killed.returncode}) before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    completed = _completed(killed_dir / RUN)
    assert 2 <= completed < ITERATIONS and not (killed_dir / RUN / "summary.json").exists()
    resumed = subprocess.run(_command(base_checkpoint, "--resume"), cwd=killed_dir, env=ENVIRONMENT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing run {RUN}" in resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == f"summary: {RUN / 'summary.json'}"
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    first, second = reference_dir / RUN, killed_dir / RUN
    assert _rows(second) == _rows(first)
    assert [int(row["iteration"]) for row in _rows(second)] == list(range(ITERATIONS))
    with (first / "archive.pkl").open("rb") as a, (second / "archive.pkl").open("rb") as b:
        one, two = pickle.load(a).data(), pickle.load(b).data()
    order_one, order_two = np.argsort(one["index"]), np.argsort(two["index"])
    for key in ("index", "objective", "measures", "solution", "depth", "root_objective", "parent_objective", "iteration"):
        assert np.array_equal(np.asarray(one[key])[order_one], np.asarray(two[key])[order_two], equal_nan=True), key
    summary_one = json.loads((first / "summary.json").read_text())
    summary_two = json.loads((second / "summary.json").read_text())
    for key in ("evaluations", "coverage", "qd_score", "best"):
        if key == "best":
            summary_one[key].pop("file"), summary_two[key].pop("file")
        assert summary_one[key] == summary_two[key], key


@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIG.parent.glob("*.yaml")))
def test_the_shipped_configs_pass_every_check(name, monkeypatch):
    from growprune.cli_evolve import config_text, instantiate
    from growprune.cli_qd import parse
    from growprune.qd.run import QDRun

    root = CONFIG.parents[2]
    if "mnist" in name and not (root.parent / "shared" / "data" / "mnist-t10k").is_dir():
        pytest.skip("the MNIST idx files are not in ../shared/data")
    monkeypatch.chdir(root)  # the MNIST configs name their data relative to the repository root
    runs = Path("runs/qd") / name
    before = sorted(runs.iterdir()) if runs.is_dir() else []
    parser, config = parse(["-c", str(CONFIG.parent / f"{name}.yaml")])
    objects = instantiate(parser, config)
    run = QDRun.prepare(config, objects.task, config_text(parser, config))
    run.engine.close()
    assert run.run_dir is None and (sorted(runs.iterdir()) if runs.is_dir() else []) == before
    expected = {"lunar_lander_tutorial": 5, "lunar_lander_netsci": 5, "bipedal_walker": 2}.get(name, 2)
    assert sum(spec.count for spec in run.emitters) == expected
