"""Benchmark reporting: aggregation over seeds, CSV / Markdown / PNG files read back, W&B offline run."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from growprune.benchmark.report import BASELINE_ORDER, aggregate, write_leaderboard

METHODS = (  # (method, baseline kind, targets) in deliberately unsorted order
    ("nnrelief", None, (8, 2.0, 4.0)),
    ("dense", None, (None,)),
    ("small_dense", "dense_same_size", (2.0, 4.0, 8.0)),
    ("magnitude_global", "global_magnitude", (2.0, 4.0, 8.0)),
    ("random", "random", (2.0, 4.0, 8.0)),
    ("magnitude_layer", "layer_magnitude", (2.0, 4.0, 8.0)),
)


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    """W&B off (WANDB_MODE wins over the mode argument, and CI sets it offline); the W&B tests set it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


def fit_records(seeds=(0, 1, 2), models=("lenet300",), seed: int = 0) -> list[dict]:
    """Records shaped like the runner's: identity fields, fit metrics, bookkeeping."""
    rng = np.random.default_rng(seed)
    records = []
    for model in models:
        for method, baseline, targets in METHODS:
            for target in targets:
                for run_seed in seeds:
                    compression = 1.0 if target is None else float(target) * (1 + 0.02 * rng.standard_normal())
                    records.append({
                        "suite": "smoke", "key": f"k{len(records)}",
                        "label": f"{method}/{model}/digits/t{target or 'none'}/s{run_seed}",
                        "status": "completed", "error": None, "command": "fit", "model": model, "data": "digits",
                        "method": method, "baseline": baseline, "target": target, "seed": run_seed,
                        "accuracy": float(0.96 - 0.01 * compression + 0.01 * rng.standard_normal()),
                        "accuracy_split": "test", "params_original": 266610,
                        "params_nonzero": int(266610 / compression), "compression": compression,
                        "speedup": 0.9 * compression, "flops_effective": 532000 / compression,
                        "latency_batch1_ms": float(0.3 + 0.05 * rng.random()), "throughput_batch": 64,
                        "throughput_per_s": float(50000 + 1000 * rng.random()), "wall_seconds": float(3 + rng.random()),
                        "data_source": "digits", "note": f"seed {run_seed}",
                        "entry_dir": f"/runs/{len(records)}", "finished_at": "2026-12-02T16:00:00+00:00",
                    })
    return records


def failed_record(method="nnrelief", target=16.0, seed=0, error="RuntimeError: out of memory") -> dict:
    return {"suite": "smoke", "key": "fail0", "label": f"{method}/lenet300/digits/t{target}/s{seed}", "status": "failed",
            "error": error, "command": "fit", "model": "lenet300", "data": "digits", "method": method,
            "baseline": None, "target": target, "seed": seed, "traceback": "Traceback (most recent call last):\n  boom"}


def qd_records() -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"suite": "qd_smoke", "label": f"{method}/mlp/lander/tnone/s{seed}", "status": "completed", "command": "qd",
             "model": "mlp", "data": "lander", "method": method, "baseline": None, "target": None, "seed": seed,
             "coverage": float(rng.random()), "qd_score": float(100 * rng.random()),
             "best_objective": float(rng.random()), "num_elites": int(rng.integers(5, 50)), "evaluations": 64,
             "wall_seconds": float(rng.random())}
            for method in ("map_elites", "cma_me") for seed in (0, 1, 2)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def group(records, method, target):
    return [r for r in records if r["method"] == method and r["target"] == target and r["status"] == "completed"]


# ------------------------------------------------------------------------------------------ aggregate
def test_aggregate_statistics_order_and_carried_fields():
    records = fit_records()
    records.append(failed_record(method="nnrelief", target=4))  # int target groups with 4.0
    rows = aggregate(records)

    assert len(rows) == sum(len(targets) for _, _, targets in METHODS)
    assert [row["method"] for row in rows[::3]][:4] == ["random", "magnitude_global", "magnitude_layer", "small_dense"]
    assert [row["baseline"] for row in rows[:12:3]] == list(BASELINE_ORDER)
    assert [row["method"] for row in rows[12:]] == ["dense", "nnrelief", "nnrelief", "nnrelief"]
    assert [row["target"] for row in rows[13:]] == [2.0, 4.0, 8.0]  # ascending, int 8 normalised

    for row in rows:
        members = group(records, row["method"], row["target"])
        assert row["n"] == len(members) == 3
        for metric in ("accuracy", "compression", "params_nonzero", "latency_batch1_ms"):
            values = [float(member[metric]) for member in members]
            assert row[f"{metric}_mean"] == pytest.approx(statistics.mean(values))
            assert row[f"{metric}_std"] == pytest.approx(statistics.stdev(values))
            assert row[f"{metric}_min"] == min(values) and row[f"{metric}_max"] == max(values)
        assert row["data_source"] == "digits" and row["accuracy_split"] == "test"
        assert "note" not in row  # differs across seeds
        assert "seed_mean" not in row and "target_mean" not in row
        assert row["failed"] == (1 if (row["method"], row["target"]) == ("nnrelief", 4.0) else 0)


def test_aggregate_single_seed_has_zero_std_and_failed_only_groups_have_no_row():
    records = fit_records(seeds=(5,)) + [failed_record(target=32.0)]
    rows = aggregate(records)
    assert all(row["n"] == 1 and row["accuracy_std"] == 0.0 for row in rows)
    assert not any(row["target"] == 32.0 for row in rows)
    assert aggregate([]) == [] and aggregate([failed_record()]) == []


def test_aggregate_orders_untargeted_first_then_targets_ascending():
    records = [{"model": "m", "data": "d", "method": "mixed", "target": target, "seed": 0, "accuracy": 0.5}
               for target in (16, 4.0, None, 2.5)]
    records += [{"model": "a", "data": "z", "method": "other", "target": None, "seed": 0, "accuracy": 0.5},
                {"model": "m", "data": "c", "method": "other", "target": None, "seed": 0, "accuracy": 0.5}]
    rows = aggregate(records)
    assert [(row["model"], row["data"], row["target"]) for row in rows] == [
        ("a", "z", None), ("m", "c", None), ("m", "d", None), ("m", "d", 2.5), ("m", "d", 4.0), ("m", "d", 16.0)]


def test_aggregate_rejects_records_without_identity():
    with pytest.raises(ValueError, match="lacks method"):
        aggregate([{"model": "m", "data": "d", "accuracy": 0.5}])
    with pytest.raises(ValueError, match="must be a dict"):
        aggregate(["not a record"])


# ---------------------------------------------------------------------------------------- the files
def test_leaderboard_files_read_back(tmp_path):
    records = fit_records() + [failed_record()]
    written = write_leaderboard("smoke", records, tmp_path / "out", {}, {}, "disabled")
    out = tmp_path / "out"
    assert all(path.is_file() for path in written.values())
    assert {"results.csv", "leaderboard.csv", "leaderboard.md"} <= set(written)

    results = read_csv(out / "results.csv")
    assert len(results) == len(records)
    header = list(results[0])
    assert header[:9] == ["suite", "label", "status", "model", "data", "method", "baseline", "target", "seed"]
    failed = [row for row in results if row["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: out of memory"
    assert failed[0]["accuracy"] == ""

    board = read_csv(out / "leaderboard.csv")
    assert list(board[0])[:7] == ["model", "data", "method", "baseline", "target", "n", "failed"]
    assert len(board) == len(aggregate(records))
    for row in board:
        target = float(row["target"]) if row["target"] else None
        members = group(records, row["method"], target)
        accuracies = [member["accuracy"] for member in members]
        assert int(row["n"]) == len(members)
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.mean(accuracies), rel=1e-12)
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(accuracies), rel=1e-12)
        speedups = [member["speedup"] for member in members]
        assert float(row["speedup_mean"]) == pytest.approx(statistics.mean(speedups), rel=1e-12)

    text = (out / "leaderboard.md").read_text()
    assert "| method | target | seeds | accuracy (%) | compression | speed-up |" in text
    assert "Data source: digits." in text and "fewer than 3" not in text
    assert "random (baseline)" in text
    assert "magnitude_global (baseline: global_magnitude)" in text
    for method, _, targets in METHODS:
        for target in targets:
            members = group(records, method, target)
            accuracies = [100 * member["accuracy"] for member in members]
            cell = f"{statistics.mean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f}"
            target_cell = "—" if target is None else f"{float(target):g}x"
            lines = [line for line in text.splitlines()
                     if line.startswith(f"| {method}") and f"| {target_cell} |" in line]
            assert len(lines) == 1 and cell in lines[0], (method, target)
            compression = statistics.mean(member["compression"] for member in members)
            assert f"| {compression:.1f}x" in lines[0]
    assert "## Failed entries (1)" in text
    assert "- `nnrelief/lenet300/digits/t16.0/s0`: RuntimeError: out of memory" in text

    plots = sorted(name for name in written if name.startswith("plots/"))
    assert plots == ["plots/lenet300-digits-accuracy-vs-compression.png", "plots/lenet300-digits-accuracy-vs-speedup.png"]
    import matplotlib.image

    for name in plots:
        assert f"]({name})" in text  # linked from the Markdown
        image = matplotlib.image.imread(written[name])
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # lines and text, not a blank canvas


def test_plot_lines_log_x_and_dense_reference(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    original_close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: figures.append(figure))
    records = fit_records()
    write_leaderboard("smoke", records, tmp_path, {"plots": [["compression", "accuracy"]], "title": "LeNet"}, {})
    assert len(figures) == 1
    axis = figures[0].axes[0]
    try:
        assert axis.get_xscale() == "log"
        assert "compression" in axis.get_xlabel() and "%" in axis.get_ylabel()
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        assert set(legend) == {"dense", "nnrelief", "random (baseline)", "magnitude_global (baseline: global_magnitude)",
                               "magnitude_layer (baseline: layer_magnitude)", "small_dense (baseline: dense_same_size)"}
        dense = statistics.mean(100 * r["accuracy"] for r in group(records, "dense", None))
        reference = [line for line in axis.get_lines() if line.get_label() == "dense"]
        assert len(reference) == 1 and list(reference[0].get_ydata()) == pytest.approx([dense, dense])
        bars = {container.get_label(): container for container in axis.containers}
        assert set(bars) == set(legend) - {"dense"}
        nnrelief = [group(records, "nnrelief", target) for target in (2.0, 4.0, 8.0)]
        data_line = bars["nnrelief"].lines[0]
        assert list(data_line.get_xdata()) == pytest.approx([statistics.mean(r["compression"] for r in g) for g in nnrelief])
        assert list(data_line.get_ydata()) == pytest.approx(
            [statistics.mean(100 * r["accuracy"] for r in g) for g in nnrelief])
        assert bars["nnrelief"].has_yerr and bars["nnrelief"].has_xerr
    finally:
        original_close(figures[0])


def test_explicit_metrics_plots_and_rerun_replaces(tmp_path):
    records = fit_records()
    report = {"metrics": ["accuracy", "params_nonzero", "not_recorded"],
              "plots": [["params_nonzero", "accuracy"], ["flops_dense", "accuracy"]]}
    written = write_leaderboard("smoke", records, tmp_path, report, {})
    text = (tmp_path / "leaderboard.md").read_text()
    assert "| method | target | seeds | accuracy (%) | params nonzero |" in text
    assert "Requested metrics not in any completed record: not_recorded." in text
    assert "plots/lenet300-digits-accuracy-vs-params_nonzero.png" in written
    assert "Plots not drawn: lenet300 / digits: accuracy vs flops_dense (flops_dense not recorded)." in text

    # a rerun with fewer records rewrites every derived file
    write_leaderboard("smoke", records[:3], tmp_path, {"plots": []}, {})
    assert len(read_csv(tmp_path / "results.csv")) == 3
    assert len(read_csv(tmp_path / "leaderboard.csv")) == 1
    assert "fewer than 3" not in (tmp_path / "leaderboard.md").read_text()


def test_fewer_than_three_seeds_warns(tmp_path):
    records = fit_records()
    records = [r for r in records if not (r["method"] == "random" and r["target"] == 4.0 and r["seed"] == 2)]
    records.append(failed_record(method="random", target=4.0, seed=2))
    write_leaderboard("smoke", records, tmp_path, {"plots": []}, {})
    text = (tmp_path / "leaderboard.md").read_text()
    assert "**Warning:** fewer than 3 completed seeds in 1 group(s) (random/lenet300/digits 4x: 2 seed(s))" in text
    assert "| random (baseline) | 4x | 2 (1 failed) |" in text
    assert "- `random/lenet300/digits/t4.0/s2`: RuntimeError: out of memory" in text


def test_one_table_per_model_and_data(tmp_path):
    records = fit_records(seeds=(0,), models=("lenet300", "lenet5"))
    written = write_leaderboard("smoke", records, tmp_path, {}, {})
    text = (tmp_path / "leaderboard.md").read_text()
    assert text.count("| method | target | seeds |") == 2
    assert text.index("## lenet300 / digits") < text.index("## lenet5 / digits")
    assert "every group has only 1 completed seed(s)" in text
    table_lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 2 * (2 + len(aggregate(records)) // 2)
    assert not any("±" in line for line in table_lines)  # one seed has no spread to show
    assert sum(name.startswith("plots/lenet5-") for name in written) == 2


@pytest.mark.parametrize("records", [[], [failed_record(), failed_record(method="random", error="ValueError: bad\nmore")]],
                         ids=["empty", "all_failed"])
def test_no_completed_entries(tmp_path, records):
    written = write_leaderboard("smoke", records, tmp_path / "out", {}, {"project": "x"}, "disabled")
    assert set(written) == {"results.csv", "leaderboard.csv", "leaderboard.md"}
    text = written["leaderboard.md"].read_text()
    assert "**No completed entries**" in text
    assert len(read_csv(written["results.csv"])) == len(records)
    assert read_csv(written["leaderboard.csv"]) == []
    assert written["leaderboard.csv"].read_text().startswith("model,data,method,baseline,target,n,failed")
    if records:
        assert "## Failed entries (2)" in text and "- `random/lenet300/digits/t16.0/s0`: ValueError: bad" in text
    assert not (tmp_path / "out" / "plots").exists()


def test_qd_records_get_qd_columns_and_no_compression_plot(tmp_path):
    records = qd_records()
    written = write_leaderboard("qd_smoke", records, tmp_path, {}, {})
    text = written["leaderboard.md"].read_text()
    assert "| method | target | seeds | coverage (%) | QD score | best objective | elites | evaluations | wall (s) |" in text
    assert "compression" not in text.lower() and "Accuracy" not in text
    assert not any(name.startswith("plots/") for name in written)
    coverage = [100 * r["coverage"] for r in records if r["method"] == "cma_me"]
    assert f"{statistics.mean(coverage):.2f} ± {statistics.stdev(coverage):.2f}" in text
    board = read_csv(written["leaderboard.csv"])
    assert [row["method"] for row in board] == ["cma_me", "map_elites"]
    assert float(board[1]["qd_score_std"]) == pytest.approx(
        statistics.stdev(r["qd_score"] for r in records if r["method"] == "map_elites"))


@pytest.mark.parametrize("arguments, message", [
    ({"report": {"metric": ["accuracy"]}}, "unknown key 'metric'; valid keys: metrics, plots, title"),
    ({"report": {"plots": [["compression"]]}}, "report.plots must be a list of"),
    ({"report": {"metrics": "accuracy"}}, "report.metrics must be a list"),
    ({"wandb_mode": "sometimes"}, "wandb_mode must be one of auto, online, offline, disabled"),
    ({"records": [{"model": "m", "method": "x"}]}, "lacks data"),
    ({"wandb": None}, "wandb must be a dict"),
])
def test_bad_input_raises_before_writing(tmp_path, arguments, message):
    options = {"records": fit_records(seeds=(0,)), "report": {}, "wandb": {}, "wandb_mode": "disabled", **arguments}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_leaderboard("smoke", options["records"], tmp_path / "out", options["report"], options["wandb"],
                          options["wandb_mode"])
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- W&B
def test_wandb_offline_leaderboard_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = []
    real_init = wandb.init

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    records = fit_records() + [failed_record()]
    out = tmp_path / "out"
    written = write_leaderboard("smoke", records, out, {}, {"project": "bench-test"}, "offline")

    assert len(calls) == 1
    assert {key: calls[0][key] for key in ("name", "group", "job_type", "project", "mode")} == {
        "name": "leaderboard", "group": "smoke", "job_type": "leaderboard", "project": "bench-test", "mode": "offline"}
    assert Path(calls[0]["dir"]) == out.resolve()
    run_dir = written["wandb"]
    assert run_dir.is_dir() and run_dir.parent == out.resolve() / "wandb" and run_dir.name.startswith("offline-run-")
    assert wandb.run is None or wandb.run.name != "leaderboard"  # finished

    tables = list(run_dir.glob("files/media/table/leaderboard*.table.json"))
    images = list(run_dir.glob("files/media/images/**/*.png"))
    if not tables:
        pytest.skip("this wandb version keeps offline tables only inside the binary .wandb file")
    table = json.loads(tables[0].read_text())
    board = read_csv(out / "leaderboard.csv")
    assert table["columns"] == list(board[0])
    assert len(table["data"]) == len(board)
    index = table["columns"].index("accuracy_mean")
    assert [row[index] for row in table["data"]] == pytest.approx([float(row["accuracy_mean"]) for row in board])
    assert len(images) == 2


def test_wandb_disabled_by_environment_writes_no_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    written = write_leaderboard("smoke", fit_records(seeds=(0,)), tmp_path, {"plots": []}, {}, "offline")
    assert "wandb" not in written and not (tmp_path / "wandb").exists()


def test_wandb_failures_warn_finish_the_run_and_keep_the_files(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    finished = []

    class BrokenRun:
        dir = str(tmp_path / "wandb" / "offline-run-x" / "files")
        summary: dict = {}

        def log(self, payload):
            raise OSError("disk full")

        def finish(self, exit_code=0):
            finished.append(exit_code)

    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    with pytest.warns(UserWarning, match="W&B leaderboard logging failed: disk full"):
        written = write_leaderboard("smoke", fit_records(seeds=(0,)), tmp_path, {"plots": []}, {}, "offline")
    assert finished == [1] and "wandb" not in written and written["leaderboard.md"].is_file()

    def refuse(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.warns(UserWarning, match="W&B leaderboard run not started: no network"):
        written = write_leaderboard("smoke", fit_records(seeds=(0,)), tmp_path, {"plots": []}, {}, "online")
    assert "wandb" not in written and written["results.csv"].is_file()


def test_an_untargeted_method_that_chose_its_compression_is_a_point_not_a_reference(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    original_close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: figures.append(figure))
    records = [record for record in fit_records() if record["method"] in ("dense", "random")]
    for seed, compression in enumerate((14.0, 17.5, 17.4)):  # e.g. NNrelief run to its stopping rule
        records.append({**records[0], "key": f"stop{seed}", "label": f"stop/lenet300/digits/tnone/s{seed}",
                        "method": "stop", "baseline": None, "target": None, "seed": seed,
                        "compression": compression, "accuracy": 0.95 + 0.001 * seed})
    write_leaderboard("smoke", records, tmp_path, {"plots": [["compression", "accuracy"]]}, {})
    axis = figures[0].axes[0]
    try:
        references = {line.get_label() for line in axis.get_lines() if not line.get_label().startswith("_")}
        assert references == {"dense"}  # only the dense network is a horizontal line
        bars = {container.get_label(): container for container in axis.containers}
        (x,) = bars["stop"].lines[0].get_xdata()
        assert x == pytest.approx(statistics.mean((14.0, 17.5, 17.4)))
    finally:
        original_close(figures[0])


def test_a_metric_missing_for_some_seeds_says_how_many_it_averages(tmp_path):
    records = [record for record in fit_records() if record["method"] == "random" and record["target"] == 2.0]
    records[0]["speedup"] = None  # an infinite ratio is stored as None
    (row,) = aggregate(records)
    assert row["n"] == 3 and row["speedup_n"] == 2
    assert row["speedup_mean"] == pytest.approx(statistics.mean(record["speedup"] for record in records[1:]))
    write_leaderboard("smoke", records, tmp_path, {"metrics": ["accuracy", "speedup"]}, {})
    assert "(n=2)" in (tmp_path / "leaderboard.md").read_text()
