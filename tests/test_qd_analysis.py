"""growprune qd-analyze: statistics against scipy, learning speeds, outputs, bad input."""

from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ribs")
from scipy import stats  # noqa: E402

from growprune.qd import analysis  # noqa: E402
from growprune.qd.analysis import (  # noqa: E402
    AnalysisOptions,
    analyze,
    benjamini_hochberg,
    bootstrap_ci,
    correlate,
    lineage_speed,
    permutation_pvalue,
    spearman,
)
from growprune.qd.tasks import Evaluation, QDTask  # noqa: E402

SIZES = (8, 12, 3)  # the fake supervised MLP: 8 inputs, 12 hidden units, 3 classes
CONTROL_SIZES = (4, 6, 2)
GRAPH_DESCRIPTORS = ["density", "modularity", "assortativity", "num_edges", "connectivity"]


# ------------------------------------------------------------------------------------ fake tasks
def _mlp(sizes, weights):
    layers = []
    for index, weight in enumerate(weights):
        linear = nn.Linear(sizes[index], sizes[index + 1], bias=True)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            linear.bias.zero_()
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class FakeMaskTask(QDTask):
    """Masks (one uint8 gene per weight) of a fixed 8-12-3 MLP on a synthetic 3-class problem."""

    def bind(self, seed, run_dir=None):
        generator = torch.Generator().manual_seed(seed)
        rule = torch.randn(SIZES[0], SIZES[-1], generator=generator)
        inputs = torch.randn(450, SIZES[0], generator=generator)
        targets = (inputs @ rule).argmax(dim=1)
        self._train, self._val = (inputs[:300], targets[:300]), (inputs[300:], targets[300:])
        self._weights = [torch.randn(SIZES[i + 1], SIZES[i], generator=generator) * 0.3 for i in range(2)]

    @property
    def solution_dim(self):
        return sum(SIZES[i] * SIZES[i + 1] for i in range(2))

    @property
    def solution_dtype(self):
        return np.dtype(np.uint8)

    def descriptor_names(self):
        return ["density"]

    def initial_solutions(self, count, rng):
        return (rng.random((count, self.solution_dim)) < 0.5).astype(np.uint8)

    def masks_of(self, solution):
        first = SIZES[0] * SIZES[1]
        bits = torch.as_tensor(np.asarray(solution, dtype=np.float32))
        return {"0.weight": bits[:first].view(SIZES[1], SIZES[0]), "2.weight": bits[first:].view(SIZES[2], SIZES[1])}

    def network(self, solution):
        masks = self.masks_of(solution)
        return _mlp(SIZES, [self._weights[0] * masks["0.weight"], self._weights[1] * masks["2.weight"]])

    def graph(self, solution):
        from growprune.graph import unit_graph_from_weights

        return unit_graph_from_weights(list(self.masks_of(solution).values()))

    def evaluate(self, solutions, descriptors):
        return [Evaluation(0.0, {"density": float(np.mean(s))}) for s in solutions]

    def save_elite(self, solution, path):
        raise NotImplementedError

    def train_tensors(self):
        return self._train

    def validation_tensors(self):
        return self._val


class FakeControlTask(QDTask):
    """Float weights of a 4-6-2 MLP policy; information measures come from evaluate(), as in control."""

    evaluated = 0

    def bind(self, seed, run_dir=None):
        pass

    @property
    def solution_dim(self):
        return CONTROL_SIZES[0] * CONTROL_SIZES[1] + CONTROL_SIZES[1] * CONTROL_SIZES[2]

    @property
    def solution_dtype(self):
        return np.dtype(np.float32)

    def descriptor_names(self):
        return ["density", "mi_label", "mi_consecutive"]

    def initial_solutions(self, count, rng):
        return rng.normal(size=(count, self.solution_dim)).astype(np.float32)

    def _weights(self, solution):
        first = CONTROL_SIZES[0] * CONTROL_SIZES[1]
        return [np.asarray(solution[:first]).reshape(CONTROL_SIZES[1], CONTROL_SIZES[0]),
                np.asarray(solution[first:]).reshape(CONTROL_SIZES[2], CONTROL_SIZES[1])]

    def network(self, solution):
        return _mlp(CONTROL_SIZES, self._weights(solution))

    def graph(self, solution):
        from growprune.graph import unit_graph_from_weights

        return unit_graph_from_weights(self._weights(solution))

    def evaluate(self, solutions, descriptors):
        FakeControlTask.evaluated += len(solutions)
        return [Evaluation(0.0, {"mi_label": float(np.abs(s).sum()), "mi_consecutive": float(s[0])}) for s in solutions]

    def save_elite(self, solution, path):
        raise NotImplementedError


def _archive(task, solutions, objectives, depth=None, root_objective=None):
    from ribs.archives import GridArchive

    count = len(solutions)
    archive = GridArchive(solution_dim=task.solution_dim, dims=[count, 1], ranges=[(0, count), (0, 1)],
                          solution_dtype=task.solution_dtype,
                          extra_fields={"depth": ((), np.int32), "root_objective": ((), np.float32),
                                        "parent_objective": ((), np.float32), "iteration": ((), np.int32)})
    depth = np.zeros(count, np.int32) if depth is None else np.asarray(depth, np.int32)
    root_objective = np.full(count, np.nan, np.float32) if root_objective is None else np.asarray(root_objective, np.float32)
    measures = np.stack([np.arange(count) + 0.5, np.full(count, 0.5)], axis=1)
    archive.add(solutions, np.asarray(objectives, np.float64), measures, depth=depth, root_objective=root_objective,
                parent_objective=np.full(count, np.nan, np.float32), iteration=np.zeros(count, np.int32))
    assert len(archive) == count
    return archive


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _fast(**overrides):
    values = dict(bootstrap=200, permutations=200, max_steps=20, eval_every=5, batch_size=32, seed=0)
    values.update(overrides)
    return AnalysisOptions(**values)


@pytest.fixture(scope="module")
def mask_task():
    task = FakeMaskTask()
    task.bind(3)
    return task


@pytest.fixture(scope="module")
def mask_archive(mask_task):
    rng = np.random.default_rng(1)
    keep = rng.uniform(0.1, 0.9, size=8)  # elites of very different density
    solutions = (rng.random((8, mask_task.solution_dim)) < keep[:, None]).astype(np.uint8)
    return _archive(mask_task, solutions, objectives=np.linspace(0.3, 0.6, 8))


# ------------------------------------------------------------------------------------ statistics
def test_monotone_relation_matches_scipy_and_is_significant():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = np.exp(x) + 3.0  # strictly increasing in x: rho = 1
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic) == pytest.approx(1.0)
    low, high = bootstrap_ci(x, y, 500, np.random.default_rng(1))
    assert low > 0.99 and high == pytest.approx(1.0)
    p = permutation_pvalue(x, y, 500, np.random.default_rng(2))
    assert p == pytest.approx(1 / 501)  # no permutation is as extreme: the smallest possible p
    assert spearman(x, -y) == pytest.approx(-1.0)
    assert permutation_pvalue(x, -y, 500, np.random.default_rng(2)) == pytest.approx(1 / 501)  # two-sided


def test_noisy_relation_matches_scipy_bootstrap_and_permutation_test():
    rng = np.random.default_rng(5)
    x = rng.normal(size=30)
    y = x + rng.normal(scale=1.5, size=30)
    rho = spearman(x, y)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)

    reference = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                                vectorized=False, n_resamples=2000,
                                method="percentile", rng=np.random.default_rng(0)).confidence_interval
    low, high = bootstrap_ci(x, y, 2000, np.random.default_rng(1))
    assert low == pytest.approx(reference.low, abs=0.06) and high == pytest.approx(reference.high, abs=0.06)
    assert low < rho < high
    exact = stats.permutation_test((x, y), lambda a, b: stats.spearmanr(a, b).statistic, permutation_type="pairings",
                                   n_resamples=2000, rng=np.random.default_rng(0)).pvalue
    assert permutation_pvalue(x, y, 2000, np.random.default_rng(3)) == pytest.approx(exact, abs=0.02)


def test_independent_data_is_not_significant():
    """On independent data the permutation p-value is calibrated: about 5 % of data sets get p < 0.05,
    and it agrees with scipy's p-value of the same rho."""
    pvalues, reference = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=15), rng.normal(size=15)
        pvalues.append(permutation_pvalue(x, y, 199, np.random.default_rng(seed + 1000)))
        reference.append(stats.spearmanr(x, y).pvalue)
    pvalues, reference = np.array(pvalues), np.array(reference)
    assert 0.01 <= np.mean(pvalues < 0.05) <= 0.10
    assert np.median(pvalues) > 0.3
    assert np.max(np.abs(pvalues - reference)) < 0.1
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=60), rng.normal(size=60)
    p = permutation_pvalue(x, y, 1000, np.random.default_rng(0))
    assert p > 0.2 and p == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.05)
    low, high = bootstrap_ci(x, y, 1000, np.random.default_rng(0))
    assert low < 0 < high


def test_benjamini_hochberg_matches_scipy_and_keeps_nan():
    p = np.array([0.01, 0.04, 0.03, 0.5, 0.002, 0.2])
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"))
    with_nan = benjamini_hochberg([0.01, math.nan, 0.04])
    assert math.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], stats.false_discovery_control([0.01, 0.04]))
    with pytest.raises(ValueError, match="p-values must lie in"):
        benjamini_hochberg([0.5, 1.5])


def test_correlate_constant_descriptor_is_nan_with_note_and_seeded():
    rng = np.random.default_rng(0)
    speed = rng.normal(size=20)
    descriptors = {"constant": np.full(20, 2.0), "signal": speed * 2 + 1, "noise": rng.normal(size=20)}
    rows = correlate(descriptors, speed, "speed", bootstrap=100, permutations=100, seed=4)
    by_name = {row.descriptor: row for row in rows}
    assert math.isnan(by_name["constant"].rho) and math.isnan(by_name["constant"].p_adjusted)
    assert "constant" in by_name["constant"].note
    assert by_name["signal"].rho == pytest.approx(1.0)
    # BH over the two finite p-values only
    finite = [by_name["signal"].p_permutation, by_name["noise"].p_permutation]
    np.testing.assert_allclose([by_name["signal"].p_adjusted, by_name["noise"].p_adjusted],
                               stats.false_discovery_control(finite))
    again = correlate({"noise": descriptors["noise"]}, speed, "speed", bootstrap=100, permutations=100, seed=4)
    # each descriptor has its own generator: the selection does not change its numbers
    assert (again[0].ci_low, again[0].p_permutation) == (by_name["noise"].ci_low, by_name["noise"].p_permutation)


# ------------------------------------------------------------------------------------ learning speed
def test_lineage_speed_on_handcrafted_archive(tmp_path):
    task = FakeControlTask()
    rng = np.random.default_rng(0)
    solutions = rng.normal(size=(9, task.solution_dim)).astype(np.float32)
    objectives = np.array([10.0, 20.0, 40.0, 5.0, 100.0, -30.0, 0.0, 12.0, 60.0])
    depth = np.array([0, 1, 2, 0, 3, 2, 1, 4, 5])
    roots = np.array([10.0, 10.0, 0.0, 5.0, 40.0, -10.0, 2.0, 4.0, 10.0])
    speed, used = lineage_speed(objectives, roots, depth)
    expected = np.array([np.nan, 10.0, 20.0, np.nan, 20.0, -10.0, -2.0, 2.0, 10.0])
    np.testing.assert_allclose(speed, expected)
    assert used.tolist() == [d >= 1 for d in depth]

    archive = _archive(task, solutions, objectives, depth, roots)
    FakeControlTask.evaluated = 0
    result = analyze(task, archive, _fast(descriptors=["modularity", "mi_label"]), run_dir=tmp_path, progress=False)
    assert result.speed_kind == "lineage"
    assert result.summary["excluded_depth0"] == 2 and result.summary["elites_analysed"] == 7
    assert FakeControlTask.evaluated == 7  # information measures came from the task's evaluation
    rows = _read_csv(result.out_dir / "elites.csv")
    got = {int(row["index"]): float(row["return_per_generation"]) for row in rows}
    cells = {i: archive.index_of_single([i + 0.5, 0.5]) for i in range(9)}
    assert got == {int(cells[i]): expected[i] for i in range(9) if depth[i] >= 1}
    mi = {int(row["index"]): float(row["mi_label"]) for row in rows}
    assert mi[int(cells[1])] == pytest.approx(float(np.abs(solutions[1]).sum()), rel=1e-6)
    [rho_row] = [row for row in result.correlations if row.descriptor == "mi_label"]
    used_rows = [i for i in range(9) if depth[i] >= 1]
    assert rho_row.rho == pytest.approx(stats.spearmanr(np.abs(solutions[used_rows]).sum(axis=1),
                                                        expected[used_rows]).statistic)


def test_lineage_needs_enough_elites_of_depth_one(tmp_path):
    task = FakeControlTask()
    solutions = np.ones((6, task.solution_dim), np.float32)
    archive = _archive(task, solutions, np.arange(6.0), depth=[0, 0, 0, 1, 1, 1], root_objective=np.zeros(6))
    with pytest.raises(ValueError, match=r"3 elites with lineage depth >= 1 \(of 6; need at least 5\)"):
        analyze(task, archive, _fast(descriptors=["density"]), run_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_lineage_without_lineage_fields_is_refused(tmp_path):
    from ribs.archives import GridArchive

    task = FakeControlTask()
    archive = GridArchive(solution_dim=task.solution_dim, dims=[6], ranges=[(0, 6)])
    archive.add(np.ones((6, task.solution_dim)), np.arange(6.0), np.arange(6)[:, None] + 0.5)
    with pytest.raises(ValueError, match="no lineage field"):
        analyze(task, archive, _fast(descriptors=["density"]), run_dir=tmp_path, progress=False)


def test_retrain_keeps_masks_and_censors_unreachable_targets(mask_task):
    rng = np.random.default_rng(0)
    solution = (rng.random(mask_task.solution_dim) < 0.4).astype(np.uint8)
    masks = mask_task.masks_of(solution)
    batches = analysis.batch_schedule(300, 32, 30, seed=0)
    assert all(len(b) == 32 for b in batches) and len({tuple(b.tolist()) for b in batches[:9]}) == 9
    network = mask_task.network(solution)
    curve = analysis.retrain(network, mask_task.train_tensors(), mask_task.validation_tensors(), batches,
                             masks=masks, eval_every=10, learning_rate=0.5)
    for name, mask in masks.items():
        weight = network.get_parameter(name).detach()
        assert torch.all(weight[mask == 0] == 0) and torch.count_nonzero(weight[mask == 1]) > 0
    assert curve.steps == [0, 10, 20, 30]
    assert curve.final_accuracy > curve.start_accuracy + 0.1  # it learns
    assert curve.steps_to(1.01) == (31, False)  # never reached: censored at max_steps + 1
    assert curve.steps_to(0.0) == (0, True)
    for target in curve.accuracies:
        first = min(step for step, accuracy in zip(curve.steps, curve.accuracies) if accuracy >= target)
        assert curve.steps_to(target) == (first, True)
    again = analysis.retrain(mask_task.network(solution), mask_task.train_tensors(), mask_task.validation_tensors(),
                             batches, masks=masks, eval_every=10, learning_rate=0.5)
    assert again.accuracies == curve.accuracies  # same seeded batches, same network: same curve


def test_reinit_starts_every_mask_from_the_same_weights(mask_task):
    rng = np.random.default_rng(0)
    first, second = ((rng.random(mask_task.solution_dim) < 0.5).astype(np.uint8) for _ in range(2))
    networks = [mask_task.network(s) for s in (first, second)]
    batches = analysis.batch_schedule(300, 32, 0, seed=0)  # no step: the weights as initialised
    for network, solution in zip(networks, (first, second)):
        analysis.retrain(network, mask_task.train_tensors(), mask_task.validation_tensors(), batches,
                         masks=mask_task.masks_of(solution), reinitialize=7)
    both = mask_task.masks_of(first)["0.weight"] * mask_task.masks_of(second)["0.weight"]
    a, b = (n.get_parameter("0.weight").detach() for n in networks)
    assert torch.equal(a * both, b * both) and torch.count_nonzero(a * both) > 0
    assert not torch.equal(a * both, mask_task.network(first).get_parameter("0.weight").detach() * both)
    assert torch.all(a[mask_task.masks_of(first)["0.weight"] == 0] == 0)


def test_supervised_analysis_outputs_read_back_and_never_overwrite(tmp_path, mask_task, mask_archive):
    options = _fast(descriptors=GRAPH_DESCRIPTORS)
    first = analyze(mask_task, mask_archive, options, run_dir=tmp_path, progress=False)
    second = analyze(mask_task, mask_archive, options, run_dir=tmp_path, progress=False)
    assert first.out_dir == tmp_path / "analysis" and second.out_dir == tmp_path / "analysis_1"
    for name in ("elites.csv", "correlations.csv", "correlations.png", "summary.json"):
        assert (first.out_dir / name).stat().st_size > 0
    assert (first.out_dir / "elites.csv").read_text() == (second.out_dir / "elites.csv").read_text()  # seeded

    rows = _read_csv(first.out_dir / "elites.csv")
    assert len(rows) == 8
    assert {"index", "objective", "steps_to_target", "accuracy_gain", "reached", *GRAPH_DESCRIPTORS} <= set(rows[0])
    solutions = mask_archive.data("solution")
    by_index = dict(zip(mask_archive.data("index").tolist(), solutions))
    for row in rows:
        solution = by_index[int(row["index"])]
        assert float(row["density"]) == pytest.approx(solution.mean())
        assert float(row["num_edges"]) == pytest.approx(float(solution.sum()))
        steps = int(row["steps_to_target"])
        assert (steps <= 20) == bool(int(row["reached"])) and (steps == 21) != bool(int(row["reached"]))
    summary = json.loads((first.out_dir / "summary.json").read_text())
    assert summary["censored"] == sum(1 - int(row["reached"]) for row in rows)
    assert summary["speed_measures"] == ["steps_to_target", "accuracy_gain"]

    correlations = _read_csv(first.out_dir / "correlations.csv")
    assert [row["speed"] for row in correlations] == ["steps_to_target"] * 5 + ["accuracy_gain"] * 5
    density = np.array([float(row["density"]) for row in rows])
    gain = np.array([float(row["accuracy_gain"]) for row in rows])
    steps = np.array([float(row["steps_to_target"]) for row in rows])
    [gain_row] = [r for r in correlations if r["speed"] == "accuracy_gain" and r["descriptor"] == "density"]
    [steps_row] = [r for r in correlations if r["speed"] == "steps_to_target" and r["descriptor"] == "density"]
    assert float(gain_row["rho"]) == pytest.approx(stats.spearmanr(density, gain).statistic)
    if np.ptp(steps) > 0:  # fewer steps is faster: rho is against the negated steps
        assert float(steps_row["rho"]) == pytest.approx(-stats.spearmanr(density, steps).statistic)
    p_adjusted = [float(r["p_adjusted"]) for r in correlations if r["speed"] == "accuracy_gain"]
    p_raw = [float(r["p_permutation"]) for r in correlations if r["speed"] == "accuracy_gain"]
    finite = [i for i, p in enumerate(p_raw) if math.isfinite(p)]
    np.testing.assert_allclose([p_adjusted[i] for i in finite], stats.false_discovery_control([p_raw[i] for i in finite]))


def test_reinit_analysis_uses_the_median_final_accuracy_as_target(tmp_path, mask_task, mask_archive):
    result = analyze(mask_task, mask_archive, _fast(descriptors=["density"], init="reinit", max_steps=10),
                     run_dir=tmp_path, progress=False)
    columns = result.columns
    assert np.all(columns["target_accuracy"] == np.median(columns["final_accuracy"]))
    assert np.ptp(columns["start_accuracy"]) < 0.5  # all start from the same initialisation, masked
    assert 4 <= np.count_nonzero(columns["reached"]) <= 8  # the median: at least half reach it
    assert result.summary["options"]["init"] == "reinit"


def test_max_elites_samples_seeded(tmp_path, mask_task, mask_archive):
    options = _fast(descriptors=["density"], max_elites=5, max_steps=5)
    a = analyze(mask_task, mask_archive, options, run_dir=tmp_path, progress=False)
    b = analyze(mask_task, mask_archive, options, run_dir=tmp_path, progress=False)
    assert len(a.columns["index"]) == 5 and a.columns["index"].tolist() == b.columns["index"].tolist()
    assert a.columns["index"].tolist() == sorted(a.columns["index"].tolist())
    assert a.summary["elites_in_archive"] == 8


def test_information_descriptors_for_supervised_tasks(tmp_path, mask_task, mask_archive):
    pytest.importorskip("growprune.information")
    result = analyze(mask_task, mask_archive, _fast(descriptors=["mi_label", "mi_consecutive"], max_steps=5,
                                                    probe_size=100),
                     run_dir=tmp_path, progress=False)
    from growprune.information import information_measures

    x, y = mask_task.validation_tensors()
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:100]  # the seeded probe batch
    by_index = dict(zip(mask_archive.data("index").tolist(), mask_archive.data("solution")))
    for row, index in enumerate(result.columns["index"].tolist()):
        expected = information_measures(mask_task.network(by_index[index]), x[pick], y[pick])
        for name in ("mi_label", "mi_consecutive"):
            assert result.columns[name][row] == pytest.approx(expected[name])
            assert np.isfinite(result.columns[name][row]) and result.columns[name][row] >= 0


# ------------------------------------------------------------------------------------ bad input
def test_unknown_descriptor_lists_valid_names(tmp_path, mask_task, mask_archive):
    with pytest.raises(ValueError, match=r"unknown descriptor\(s\) 'modularty'; valid: density, modularity, .*mi_label"):
        analyze(mask_task, mask_archive, _fast(descriptors=["modularty"]), run_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_retraining_speed_needs_a_supervised_task(tmp_path):
    task = FakeControlTask()
    archive = _archive(task, np.ones((6, task.solution_dim), np.float32), np.arange(6.0))
    with pytest.raises(ValueError, match="retraining needs a supervised task"):
        analyze(task, archive, _fast(speed="retraining", descriptors=["density"]), run_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------ command line
def _fake_run_dir(tmp_path, monkeypatch, task, archive):
    """A run directory with the archive pickled; load_run answers with the fake task."""
    import growprune.qd as qd_package
    from growprune.qd.run import LoadedRun  # noqa: F401  (the real type must exist)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "archive.pkl").write_bytes(pickle.dumps(archive))
    (run_dir / "config.yaml").write_text("name: fake\n")

    def load_run(path):
        assert Path(path) == run_dir
        return type("Loaded", (), {"task": task, "archive": pickle.loads((Path(path) / "archive.pkl").read_bytes()),
                                   "run_dir": Path(path)})()

    monkeypatch.setattr(qd_package, "load_run", load_run, raising=False)
    return run_dir


def test_cli_runs_and_prints_summary_last(tmp_path, monkeypatch, capsys, mask_task, mask_archive):
    pytest.importorskip("growprune.qd.run")
    from growprune.cli import main

    run_dir = _fake_run_dir(tmp_path, monkeypatch, mask_task, mask_archive)
    main(["qd-analyze", str(run_dir), "--descriptors", "density,modularity", "--max_steps", "10",
          "--bootstrap", "50", "--permutations", "50"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("summary: ") and lines[-1].endswith("analysis/summary.json")
    assert any(line.split()[:2] == ["steps_to_target", "modularity"] for line in lines)
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["options"]["descriptors"] == ["density", "modularity"] and summary["options"]["max_steps"] == 10


@pytest.mark.parametrize("arguments, message", [
    (["--descriptors", "modularity,nope"], "descriptors: unknown descriptor(s) 'nope'; valid: density,"),
    (["--max_stepz", "3"], "unknown option 'max_stepz' (did you mean 'max_steps'?)"),
    (["--bootstrap", "-1"], "bootstrap: must be an integer >= 0, got -1"),
    (["--target_accuracy", "1.5"], "target_accuracy: must lie in (0, 1] or be null, got 1.5"),
])
def test_cli_bad_options_one_line_exit_2(tmp_path, capsys, arguments, message):
    from growprune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["qd-analyze", str(tmp_path), *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("growprune: error: ") and message in error and "\n" not in error
    assert list(tmp_path.iterdir()) == []


def test_cli_not_a_run_dir(tmp_path, capsys):
    from growprune.cli import main

    for path, message in ((tmp_path / "missing", "is not a directory"), (tmp_path, "is not a growprune qd run directory (no config.yaml or archive.pkl in it)")):
        with pytest.raises(SystemExit) as exit_info:
            main(["qd-analyze", str(path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_too_few_lineage_elites(tmp_path, monkeypatch, capsys):
    pytest.importorskip("growprune.qd.run")
    from growprune.cli import main

    task = FakeControlTask()
    archive = _archive(task, np.ones((6, task.solution_dim), np.float32), np.arange(6.0),
                       depth=[0, 0, 0, 0, 1, 2], root_objective=np.zeros(6))
    run_dir = _fake_run_dir(tmp_path, monkeypatch, task, archive)
    with pytest.raises(SystemExit) as exit_info:
        main(["qd-analyze", str(run_dir)])
    assert exit_info.value.code == 2
    assert "2 elites with lineage depth >= 1" in capsys.readouterr().err
    assert not (run_dir / "analysis").exists()


# ------------------------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_real_supervised_run_analysed(tmp_path, capsys):
    """A tiny real ``growprune qd`` run of configs/qd/lenet300_masks_digits.yaml, then ``qd-analyze``."""
    from growprune.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "qd" / "lenet300_masks_digits.yaml"
    main(["qd", "-c", str(config), "--iterations", "3", "--task.init_args.base_epochs", "1",
          "--root", str(tmp_path / "runs"), "--wandb.mode", "disabled"])
    run_dir = tmp_path / "runs" / "lenet300_masks_digits" / "version_0"
    capsys.readouterr()
    main(["qd-analyze", str(run_dir), "--descriptors", "density,modularity,assortativity", "--max_steps", "20",
          "--eval_every", "5", "--bootstrap", "100", "--permutations", "100"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("summary: ")
    rows = _read_csv(run_dir / "analysis" / "elites.csv")
    archive = pickle.loads((run_dir / "archive.pkl").read_bytes())
    assert len(rows) == min(len(archive), 200) >= analysis.MIN_ELITES
    # the archive's own descriptors (computed by the task during the search) match the analysis' ones
    stored = dict(zip(archive.data("index").tolist(), archive.data("measures").tolist()))
    for row in rows:
        density, assortativity = stored[int(row["index"])]
        assert float(row["density"]) == pytest.approx(density, abs=1e-5)
        assert float(row["assortativity"]) == pytest.approx(assortativity, abs=1e-5)
        assert 0.0 <= float(row["start_accuracy"]) <= 1.0
    correlations = _read_csv(run_dir / "analysis" / "correlations.csv")
    assert len(correlations) == 6


@pytest.mark.slow
def test_real_control_run_lineage_analysed(tmp_path, capsys):
    """A tiny LunarLander run with the pruning-mutation emitter (lineage recorded), then ``qd-analyze``."""
    pytest.importorskip("gymnasium")
    from growprune.cli import main

    config = tmp_path / "control.yaml"
    config.write_text(
        "name: control\nseed: 0\niterations: 4\n"
        "task:\n  class_path: growprune.qd.control.ControlTask\n"
        "  init_args: {env: LunarLander-v3, hidden: [6], evolve_pruning: true, initial_prune_rate: 0.2, "
        "init_std: 0.5, max_episode_steps: 100}\n"
        "descriptors: [impact_x, impact_y_velocity]\n"
        "archive: {type: grid, dims: [10, 10], ranges: [[-1.0, 1.0], [-3.0, 0.0]], qd_score_offset: -600}\n"
        "emitters:\n  - class_path: growprune.qd.PruningMutationEmitter\n    init_args: {batch_size: 20}\n    count: 1\n"
        "wandb: {mode: disabled}\n")
    main(["qd", "-c", str(config), "--root", str(tmp_path / "runs")])
    run_dir = tmp_path / "runs" / "control" / "version_0"
    capsys.readouterr()
    main(["qd-analyze", str(run_dir), "--descriptors", "density,modularity,assortativity",
          "--bootstrap", "100", "--permutations", "100"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: ")
    archive = pickle.loads((run_dir / "archive.pkl").read_bytes())
    data = archive.data()
    deep = data["depth"] >= 1
    rows = _read_csv(run_dir / "analysis" / "elites.csv")
    assert len(rows) == int(deep.sum())
    expected = dict(zip(data["index"][deep].tolist(),
                        ((data["objective"] - data["root_objective"]) / np.maximum(data["depth"], 1))[deep].tolist()))
    for row in rows:
        assert float(row["return_per_generation"]) == pytest.approx(expected[int(row["index"])], rel=1e-5)
        solution = data["solution"][data["index"] == int(row["index"])][0]
        weights = solution[: 8 * 6 + 6 * 4]  # LunarLander: 8 observations -> 6 hidden -> 4 actions, no bias
        assert float(row["density"]) == pytest.approx(np.count_nonzero(weights) / weights.size)
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["speed_kind"] == "lineage" and summary["excluded_depth0"] == int((~deep).sum())


def test_nearly_constant_descriptor_gets_a_ci_note():
    rng = np.random.default_rng(0)
    speed = rng.normal(size=40)
    rare = np.zeros(40)
    rare[np.argmax(speed)] = 1.0  # one elite differs: most resamples miss it
    [row] = correlate({"rare": rare}, speed, "speed", bootstrap=300, permutations=100, seed=0)
    assert np.isfinite(row.rho) and "CI unreliable" in row.note and "2 distinct rare values" in row.note
    [plain] = correlate({"x": speed + rng.normal(size=40)}, speed, "speed", bootstrap=300, permutations=100)
    assert plain.note == ""


def test_partial_spearman_removes_a_shared_confounder():
    from growprune.qd.analysis import correlate, partial_spearman

    rng = np.random.default_rng(0)
    density = rng.uniform(size=300)
    # both follow density, nothing else: a strong plain correlation that vanishes with density held fixed
    descriptor = density + 0.05 * rng.standard_normal(300)
    speed = -density + 0.05 * rng.standard_normal(300)
    rho, p = partial_spearman(descriptor, speed, density, 200, np.random.default_rng(1))
    assert abs(rho) < 0.2 and p > 0.01
    # a descriptor that carries speed beyond density keeps its partial correlation
    extra = rng.standard_normal(300)
    rho_extra, p_extra = partial_spearman(extra, speed + 0.2 * extra, density, 200, np.random.default_rng(1))
    assert rho_extra > 0.5 and p_extra < 0.01
    rows = correlate({"descriptor": descriptor, "extra": extra}, speed + 0.2 * extra, "speed", bootstrap=50,
                     permutations=50, control=density)
    assert rows[0].rho < -0.8 and abs(rows[0].rho_partial) < 0.3 and rows[1].rho_partial > 0.5
    assert math.isnan(correlate({"d": descriptor}, speed, "speed", bootstrap=0, permutations=0)[0].rho_partial)
    assert all(math.isnan(v) for v in partial_spearman(density ** 2, speed, density, 50, np.random.default_rng(2)))


def test_the_runs_own_archive_descriptors_can_be_analysed(tmp_path):
    """A behaviour measure the analysis cannot compute (here x0 of a toy archive) is read from the archive."""
    from ribs.archives import GridArchive

    from growprune.qd.analysis import AnalysisOptions, analyze

    rng = np.random.default_rng(0)
    archive = GridArchive(solution_dim=2, dims=[10, 10], ranges=[(-1, 1), (-1, 1)],
                          extra_fields={"depth": ((), np.int32), "root_objective": ((), np.float32)})
    x = rng.uniform(-1, 1, size=(60, 2))
    depth = rng.integers(1, 5, size=60)
    # learning speed (objective - root) / depth grows with the first archive dimension
    objective = 10 * x[:, 0] * depth
    archive.add(x, objective, x, depth=depth, root_objective=np.zeros(60))
    options = AnalysisOptions(max_elites=None, descriptors=["impact_x"], bootstrap=20, permutations=20,
                              control=None)
    result = analyze(object(), archive, options, out_dir=tmp_path / "out", progress=False,
                     archive_descriptors=["impact_x", "impact_y_velocity"])
    (row,) = result.correlations
    assert row.descriptor == "impact_x" and row.rho > 0.99
    with pytest.raises(ValueError, match="unknown descriptor.*'speed'.*impact_x, impact_y_velocity"):
        analyze(object(), archive, AnalysisOptions(descriptors=["speed"]), out_dir=tmp_path / "x",
                archive_descriptors=["impact_x", "impact_y_velocity"])
    assert not (tmp_path / "x").exists()
