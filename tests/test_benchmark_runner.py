"""The benchmark runner and ``growprune benchmark``: skip complete, failures, engines, exit codes, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from growprune.benchmark.runner import BenchmarkRunner, read_records
from growprune.benchmark.suite import load_suite
from growprune.cli_benchmark import benchmark_main

REPO = Path(__file__).resolve().parents[1]

FAKE_SUITE = """\
name: fake
description: Fake entries for the runner's tests. More text.
command: latency
seeds: [0, 1]
targets: [2, 4]
config: {seed: "${seed}", input_shape: [1, 28, 28]}
models: {m1: {model: {arch: lenet_300_100}}, m2: {model: {arch: lenet5}}}
datasets: {d: {num_classes: 10}}
methods:
  dense: {targets: null, config: {pruning: {kind: none}}}
  prune: {config: {pruning: {kind: unstructured, sparsity: "${sparsity}"}}}
  bad: {targets: [2], models: [m1], config: {timing: {warmup: 3}}}
"""


def fake_run_entry(entry: Any, entry_dir: Path, wandb_mode: str = "disabled") -> dict[str, Any]:
    """A stand-in for growprune.benchmark.entries.run_entry: leaves a mark per call, fails on ``explode``."""
    calls = len(list(Path(entry_dir).glob("call-*")))
    (Path(entry_dir) / f"call-{calls + 1}").write_text(wandb_mode)
    if entry.method == "bad":
        raise RuntimeError(f"boom in {entry.method}\nsecond line of the message")
    return {"accuracy": 0.5 + entry.seed / 100, "compression": entry.target or 1.0, "pid": os.getpid()}


class FakeLeaderboard:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, suite_name, records, out_dir, report, wandb, wandb_mode="disabled"):
        self.calls.append({"suite": suite_name, "records": records, "out_dir": out_dir, "mode": wandb_mode})
        path = Path(out_dir) / "leaderboard.md"
        path.write_text(f"{len(records)} records\n")
        return {"markdown": path}


@pytest.fixture
def leaderboard(monkeypatch):
    import growprune.benchmark.report as report

    fake = FakeLeaderboard()
    monkeypatch.setattr(report, "write_leaderboard", fake)
    return fake


@pytest.fixture
def fake_entries(monkeypatch):
    import growprune.benchmark.runner as runner

    monkeypatch.setattr(runner, "_default_run_entry", lambda: fake_run_entry)


def write_fake_suite(text: str = FAKE_SUITE, name: str = "fake") -> Path:
    folder = Path("benchmarks/suites")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder / f"{name}.yaml"


def make_runner(**kwargs: Any) -> BenchmarkRunner:
    write_fake_suite()
    kwargs.setdefault("out", Path("out"))
    kwargs.setdefault("progress", False)
    return BenchmarkRunner(load_suite("fake", validate_configs=False), run_entry=fake_run_entry, **kwargs)


def state(out: Path) -> dict[str, tuple[int, str]]:
    """Per file under the entries: (mtime_ns, content)."""
    return {str(path.relative_to(out)): (path.stat().st_mtime_ns, path.read_text())
            for path in sorted(out.glob("fake/entries/*/*")) if path.is_file()}


def test_run_writes_records_summary_and_leaderboard(leaderboard, capsys):
    runner = make_runner()
    summary = runner.run()
    # 2 models x (dense 2 seeds + prune 2 targets x 2 seeds) + bad on m1 only (2 seeds)
    assert len(runner.entries) == 2 * (2 + 4) + 2
    assert (summary.entries, summary.completed, summary.skipped, summary.failed) == (14, 12, 0, 2)
    assert summary.exit_code == 1
    for entry in runner.entries:
        entry_dir = Path("out/fake/entries") / entry.key
        assert json.loads((entry_dir / "entry.json").read_text())["label"] == entry.label
        name = "failed.json" if entry.method == "bad" else "result.json"
        record = json.loads((entry_dir / name).read_text())
        assert {key: record[key] for key in ("suite", "key", "label", "command", "model", "data", "method", "baseline", "target", "seed")} == {
            "suite": "fake", "key": entry.key, "label": entry.label, "command": "latency", "model": entry.model,
            "data": "d", "method": entry.method, "baseline": None, "target": entry.target, "seed": entry.seed}
        assert record["entry_dir"] == str(entry_dir) and record["finished_at"].endswith("+00:00")
        assert not list(entry_dir.glob(".*.tmp"))
        if entry.method == "bad":
            assert record["status"] == "failed"
            assert record["error"] == "RuntimeError: boom in bad second line of the message"
            assert "Traceback" in record["traceback"] and "fake_run_entry" in record["traceback"]
            assert not (entry_dir / "result.json").exists()
        else:
            assert record["status"] == "completed" and record["error"] is None
            assert record["accuracy"] == 0.5 + entry.seed / 100 and record["wall_seconds"] >= 0
    (call,) = leaderboard.calls
    assert call["suite"] == "fake" and len(call["records"]) == 14 and call["mode"] == "disabled"
    on_disk = json.loads(Path("out/fake/summary.json").read_text())
    assert {key: on_disk[key] for key in ("entries", "completed", "skipped", "failed")} == {"entries": 14, "completed": 12, "skipped": 0, "failed": 2}
    assert on_disk["leaderboard"] == {"markdown": str(Path("out/fake/leaderboard.md"))}
    assert Path("out/fake/leaderboard.log").is_file()  # the leaderboard's W&B notices, off the console
    assert sorted(failure["label"] for failure in on_disk["failed_entries"]) == ["bad/m1/d/t2.0/s0", "bad/m1/d/t2.0/s1"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"summary: {Path('out/fake/summary.json')}"


def test_rerun_skips_complete_retries_failed_and_keeps_old_failures(leaderboard):
    make_runner().run()
    before = state(Path("out"))
    summary = make_runner().run()
    assert (summary.completed, summary.skipped, summary.failed) == (0, 12, 2)
    after = state(Path("out"))
    for name, value in before.items():
        if "result.json" in name or name.endswith("call-1") and "failed" not in name:
            assert after[name] == value, name  # completed entries untouched
    bad_dirs = {Path(name).parent for name in after if name.endswith("failed.json")}
    assert len(bad_dirs) == 2
    for directory in bad_dirs:
        files = sorted(path.name for path in (Path("out") / directory).iterdir())
        assert files == ["call-1", "call-2", "entry.json", "failed-1.json", "failed.json", "output.log"]
    # complete entries ran exactly once
    assert sum(1 for name in after if name.endswith("call-2")) == 2
    make_runner().run()
    for directory in bad_dirs:
        assert (Path("out") / directory / "failed-2.json").is_file()
    # the leaderboard of a rerun reads the skipped entries' records back
    assert [len(call["records"]) for call in leaderboard.calls] == [14, 14, 14]
    assert {record["label"] for record in leaderboard.calls[-1]["records"]} == {entry.label for entry in make_runner().entries}


def test_filters_select_entries_but_leaderboard_covers_the_suite(leaderboard):
    runner = make_runner(only={"method": ["prune"], "model": ["m2"]}, seeds=[1])
    assert [entry.label for entry in runner.entries] == ["prune/m2/d/t2.0/s1", "prune/m2/d/t4.0/s1"]
    summary = runner.run()
    assert (summary.entries, summary.completed, summary.exit_code) == (2, 2, 0)
    assert len(list(Path("out/fake/entries").iterdir())) == 2
    runner = make_runner(only={"method": ["prune", "dense"]})
    assert {entry.method for entry in runner.entries} == {"prune", "dense"}
    summary = runner.run()
    assert (summary.completed, summary.skipped) == (10, 2)
    assert len(leaderboard.calls[-1]["records"]) == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"engine": "dask"}, r"unknown engine 'dask'; valid engines: local, ray"),
        ({"workers": 0}, r"workers must be an integer >= 1, got 0"),
        ({"wandb_mode": "on"}, r"unknown W&B mode 'on'; valid modes: auto, online, offline, disabled"),
        ({"seeds": [0, 7]}, r"seeds \[7\] are not in suite fake; its seeds: \[0, 1\]"),
        ({"only": {"method": ["prun"]}}, r"no entry of suite fake has method=prun; valid values: bad, dense, prune"),
        ({"only": {"arch": ["x"]}}, r"unknown filter field 'arch'; valid fields: model, data, method, baseline"),
    ],
)
def test_bad_runner_arguments_write_nothing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_runner(**kwargs)
    assert not Path("out").exists()


def test_cli_dry_run_prints_the_grid_and_writes_nothing(capsys, fake_entries, leaderboard):
    write_fake_suite()
    assert benchmark_main(["--suite", "fake", "--dry-run", "--out", "out", "--only", "model=m2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not Path("out").exists()
    assert lines[0].startswith("suite fake: 6 entries (latency)") and lines[-1] == "0 complete, 0 failed, 6 pending"
    suite = load_suite("fake", validate_configs=False)
    expected = [entry for entry in suite.entries if entry.model == "m2"]
    assert [line.split() for line in lines[1:-1]] == [[entry.label, entry.key, "pending"] for entry in expected]
    # after a run the statuses show
    assert benchmark_main(["--suite", "fake", "--out", "out", "--wandb", "disabled"]) == 1
    capsys.readouterr()
    assert benchmark_main(["--suite", "fake", "--dry-run", "--out", "out", "--only", "method=bad"]) == 0
    out = capsys.readouterr().out
    assert out.count(" failed\n") == 2 and out.splitlines()[-1] == "0 complete, 2 failed, 0 pending"


def test_cli_exit_codes_and_report_only(capsys, fake_entries, leaderboard):
    write_fake_suite()
    assert benchmark_main(["--suite", "fake", "--out", "out", "--wandb", "disabled", "--only", "method=prune"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == f"summary: {Path('out/fake/summary.json')}"
    assert benchmark_main(["--suite", "fake", "--out", "out", "--wandb", "disabled"]) == 1
    summary = json.loads(Path("out/fake/summary.json").read_text())
    assert (summary["completed"], summary["skipped"], summary["failed"]) == (4, 8, 2)
    calls = len(leaderboard.calls)
    before = state(Path("out"))
    assert benchmark_main(["--suite", "fake", "--out", "out", "--report-only", "--wandb", "disabled"]) == 0
    assert len(leaderboard.calls) == calls + 1 and len(leaderboard.calls[-1]["records"]) == 14
    assert state(Path("out")) == before  # nothing ran
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"markdown: {Path('out/fake/leaderboard.md')}"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--suite", "fak"], "growprune: error: unknown suite 'fak' (did you mean 'fake'?); available suites in benchmarks/suites: fake"),
        (["--suite", "fake", "--engin", "ray"], "growprune: error: unknown option '--engin' (did you mean '--engine'?)"),
        (["--suite", "fake", "--engine", "dask"], "growprune: error: argument --engine: invalid choice: 'dask'"),
        (["--suite", "fake", "--seeds", "0,x"], "growprune: error: --seeds: expected comma-separated integers, got '0,x'"),
        (["--suite", "fake", "--seeds", "5"], "growprune: error: seeds [5] are not in suite fake; its seeds: [0, 1]"),
        (["--suite", "fake", "--only", "method"], "growprune: error: --only: expected FIELD=VALUE"),
        (["--suite", "fake", "--only", "method=nope"], "growprune: error: no entry of suite fake has method=nope; valid values: bad, dense, prune"),
        (["--suite", "fake", "--workers", "0"], "growprune: error: --workers: must be >= 1, got 0"),
        (["--suite", "fake", "--report-only"], "growprune: error: no results of suite fake under out/fake: run it first"),
        ([], "growprune: error: --suite is required (or --list to see the suites)"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_written(argv, match, capsys, fake_entries, leaderboard):
    write_fake_suite()
    assert benchmark_main([*argv, "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(match) and err.count("\n") == 1, err
    assert not Path("out").exists() and not leaderboard.calls


def test_cli_typo_in_suite_names_the_line(capsys):
    path = write_fake_suite(FAKE_SUITE.replace("seeds: [0, 1]", "seeds: [0, 1]\ntarget: [3]"))
    assert benchmark_main(["--suite", "fake", "--out", "out"]) == 2
    assert capsys.readouterr().err.startswith(f"growprune: error: {path}:5: unknown key 'target' in the suite (did you mean 'targets'?)")
    assert not Path("out").exists()


def test_cli_typo_in_a_command_config_names_the_line(capsys):
    path = write_fake_suite(FAKE_SUITE.replace("kind: none", "kindd: none"))
    assert benchmark_main(["--suite", "fake", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"growprune: error: {path}:10: latency config of dense/m1/d/tnone/s0: unknown key 'pruning.kindd'"), err
    assert not Path("out").exists()


def test_cli_list(capsys):
    write_fake_suite()
    write_fake_suite("name: broken\nseeds: [0]\nbogus: 1\n", "broken")
    assert benchmark_main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("broken") and "invalid:" in lines[0] and "unknown key 'bogus'" in lines[0]
    assert lines[1].split()[:4] == ["fake", "latency", "14", "entries"]
    assert lines[1].endswith("Fake entries for the runner's tests")


def _records_without_process_details(out: Path) -> list[dict[str, Any]]:
    suite = load_suite("fake", validate_configs=False)
    records = read_records(out / "fake", suite.entries)
    ignored = ("pid", "finished_at", "wall_seconds", "entry_dir", "traceback")
    return [{key: value for key, value in record.items() if key not in ignored} for record in records]


@pytest.mark.slow
def test_process_pool_gives_the_same_records_as_local(leaderboard):
    make_runner(out=Path("local")).run()
    local = _records_without_process_details(Path("local"))
    summary = make_runner(out=Path("pool"), workers=2).run()
    assert (summary.completed, summary.failed) == (12, 2)
    assert _records_without_process_details(Path("pool")) == local
    pool_pids = {json.loads(path.read_text())["pid"] for path in Path("pool").glob("fake/entries/*/result.json")}
    assert os.getpid() not in pool_pids


@pytest.mark.slow
def test_ray_engine_gives_the_same_records_as_local(leaderboard):
    make_runner(out=Path("local")).run()
    local = _records_without_process_details(Path("local"))
    summary = make_runner(out=Path("ray"), engine="ray", workers=2).run()
    assert (summary.completed, summary.failed) == (12, 2)
    assert _records_without_process_details(Path("ray")) == local


def dying_run_entry(entry: Any, entry_dir: Path, wandb_mode: str = "disabled") -> dict[str, Any]:
    """Like fake_run_entry, but the ``bad`` entries kill their worker process (a crash in C code, the OOM killer)."""
    if entry.method == "bad":
        os._exit(9)
    return fake_run_entry(entry, entry_dir, wandb_mode)


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_entries_and_the_run_still_reports(leaderboard):
    write_fake_suite()
    runner = BenchmarkRunner(load_suite("fake", validate_configs=False), out=Path("out"), workers=2,
                             run_entry=dying_run_entry, progress=False)
    summary = runner.run()
    assert summary.entries == 14 and summary.completed + summary.failed == 14
    assert summary.failed >= 2  # the dying entries, and any the broken pool took with it
    assert Path("out/fake/summary.json").is_file() and leaderboard.calls
    statuses = {}
    for entry in runner.entries:
        entry_dir = runner.entry_dir(entry)
        statuses[entry.label] = "complete" if (entry_dir / "result.json").is_file() else "failed"
        if entry.method == "bad":
            record = json.loads((entry_dir / "failed.json").read_text())
            assert "worker running it died" in record["error"] and record["status"] == "failed"
    # a rerun with a healthy entry function retries exactly the failed entries
    rerun = BenchmarkRunner(load_suite("fake", validate_configs=False), out=Path("out"), workers=1,
                            run_entry=fake_run_entry, progress=False).run()
    assert rerun.skipped == sum(1 for status in statuses.values() if status == "complete")
    assert rerun.completed + rerun.failed == sum(1 for status in statuses.values() if status == "failed")


TINY_FIT_SUITE = """\
name: tinyfit
description: Two methods on the digits with a tiny LeNet-300-100, one epoch.
command: fit
require_baselines: false
seeds: [0]
targets: [4]
config:
  seed_everything: "${seed}"
  trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, limit_train_batches: 4}
  model:
    arch: lenet_300_100
    arch_kwargs: {width: 0.1}
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05}}
models: {lenet300: {}}
datasets:
  digits: {data: {class_path: growprune.data.DigitsDataModule, init_args: {batch_size: 64, seed: 0}}}
methods:
  dense: {targets: null, config: {trainer: {callbacks: []}}}
  magnitude:
    config:
      trainer:
        callbacks:
          - class_path: growprune.strategies.UnstructuredPruning
            init_args:
              scope: global
              schedule: {class_path: growprune.schedules.OneShot, init_args: {amount: "${sparsity}", at: 0}}
"""


@pytest.mark.slow
def test_end_to_end_fit_suite_with_the_real_entries_and_leaderboard(capsys):
    write_fake_suite(TINY_FIT_SUITE, "tinyfit")
    code = benchmark_main(["--suite", "tinyfit", "--out", "out", "--wandb", "disabled"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(Path("out/tinyfit/summary.json").read_text())
    assert (summary["entries"], summary["completed"], summary["failed"]) == (2, 2, 0)
    records = {record["method"]: record for record in read_records(Path("out/tinyfit"), load_suite("tinyfit").entries)}
    assert records["dense"]["compression"] == pytest.approx(1.0)
    magnitude = records["magnitude"]
    # weights at 25 % density, biases kept: a little under 4x
    assert magnitude["compression"] == pytest.approx(magnitude["params_original"] / magnitude["params_nonzero"])
    assert 3.0 < magnitude["compression"] <= 4.0
    assert records["dense"]["params_original"] == magnitude["params_original"]
    assert 0.0 <= records["magnitude"]["accuracy"] <= 1.0
    for path in summary["leaderboard"].values():
        assert Path(path).exists()
    assert "magnitude" in Path("out/tinyfit/leaderboard.md").read_text()


def _run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "growprune.cli_benchmark", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_resume_after_kill_9_skips_completed_entries(tmp_path):
    """A real run killed with SIGKILL after its first result: the rerun skips it and finishes the rest."""
    suite = TINY_FIT_SUITE.replace("seeds: [0]", "seeds: [0, 1, 2]").replace("max_epochs: 1,", "max_epochs: 2,")
    write_fake_suite(suite, "tinyfit")
    args = ["--suite", "tinyfit", "--out", "out", "--wandb", "disabled"]
    process = _run_cli(args, tmp_path)
    deadline = time.monotonic() + 300
    try:
        while not list(tmp_path.glob("out/tinyfit/entries/*/result.json")):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    done = {path.parent.name: (path.stat().st_mtime_ns, path.read_text()) for path in tmp_path.glob("out/tinyfit/entries/*/result.json")}
    assert 1 <= len(done) < 6
    assert not (tmp_path / "out/tinyfit/summary.json").exists()

    rerun = _run_cli(args, tmp_path)
    output = rerun.communicate(timeout=600)[0].decode()
    assert rerun.returncode == 0, output
    summary = json.loads((tmp_path / "out/tinyfit/summary.json").read_text())
    assert summary["entries"] == 6 and summary["skipped"] == len(done) and summary["completed"] == 6 - len(done)
    assert summary["failed"] == 0
    for key, value in done.items():
        path = tmp_path / "out/tinyfit/entries" / key / "result.json"
        assert (path.stat().st_mtime_ns, path.read_text()) == value
    assert len(list(tmp_path.glob("out/tinyfit/entries/*/result.json"))) == 6
    assert output.rstrip().splitlines()[-1] == f"summary: {Path('out/tinyfit/summary.json')}"


def test_entry_output_goes_to_its_log_and_the_console_stays_clean(tmp_path, capfd):
    from growprune.benchmark.runner import entry_output

    log = tmp_path / "entry" / "output.log"
    print("before", flush=True)
    with entry_output(log):
        print("python stdout", flush=True)
        print("python stderr", file=sys.stderr, flush=True)
        os.write(1, b"fd 1\n")
        os.write(2, b"fd 2\n")
    print("after", flush=True)
    captured = capfd.readouterr()
    assert captured.out == "before\nafter\n" and captured.err == ""
    assert log.read_text().splitlines() == ["python stdout", "python stderr", "fd 1", "fd 2"]
    with entry_output(log):  # a retry appends: the first attempt's output is kept
        print("second attempt", flush=True)
    assert log.read_text().splitlines()[-1] == "second attempt" and len(log.read_text().splitlines()) == 5
