"""growprune.qd core: the supervised mask task, the mask emitter, the run loop (archive, lineage,
outputs, resume, engines) and load_run, on LeNet-300-100 masks of the 8x8 digits."""

from __future__ import annotations

import copy
import csv
import json
import os
import pickle

import networkx as nx
import numpy as np
import pytest
import torch
from jsonargparse import Namespace

from growprune.data import DigitsDataModule
from growprune.errors import ConfigurationError
from growprune.qd import Evaluation, QDTask, SupervisedMaskTask, evaluate_chunk
from growprune.qd.run import derived_seed

pytest.importorskip("ribs")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A LeNet-300-100 trained 2 epochs on the digits by SupervisedMaskTask.bind (its base.ckpt)."""
    folder = tmp_path_factory.mktemp("base")
    task = SupervisedMaskTask(data=DigitsDataModule(seed=0), base_epochs=2)
    task.bind(0, folder)
    return str(folder / "base.ckpt")


@pytest.fixture(scope="module")
def task(base_checkpoint):
    bound = SupervisedMaskTask(data=DigitsDataModule(seed=0), base_checkpoint=base_checkpoint)
    bound.bind(0, None)
    return bound


def _masked_accuracy(task, solution):
    """Accuracy of the base network with the solution's masks multiplied in, on the validation split."""
    model = task.base_module().model
    masks = task.masks_of(solution)
    inputs, targets = task.validation_tensors()
    weights = {name: p.detach() * masks[name] if name in masks else p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = torch.func.functional_call(model, weights, (inputs,))
    return int((logits.argmax(1) == targets).sum()) / len(targets)


# ------------------------------------------------------------------------------------------ task
def test_solutions_are_packed_mask_bits_and_the_objective_is_the_masked_accuracy(task):
    genes = sum(p.numel() for name, p in task.base_module().model.named_parameters() if name.endswith("weight"))
    assert task.solution_dim == (genes + 7) // 8 and task.solution_dtype == np.uint8
    solutions = task.initial_solutions(4, np.random.default_rng(0))
    assert solutions.shape == (4, task.solution_dim) and solutions.dtype == np.uint8
    evaluations = task.evaluate(solutions, ["sparsity", "density"])
    for solution, evaluation in zip(solutions, evaluations):
        genome = np.unpackbits(solution)[:genes].astype(bool)
        assert np.array_equal(task.genome(solution), genome)
        assert np.array_equal(task.solution(genome), solution)
        assert evaluation.measures["density"] == pytest.approx(genome.mean())
        assert evaluation.measures["sparsity"] == pytest.approx(1 - genome.mean())
        assert evaluation.objective == pytest.approx(_masked_accuracy(task, solution), abs=1e-9)
    # initial densities spread over the configured range
    assert np.ptp([e.measures["density"] for e in evaluations]) > 0.1


def test_graph_descriptors_match_networkx_and_only_requested_ones_are_computed(task):
    solutions = task.initial_solutions(2, np.random.default_rng(1))
    evaluations = task.evaluate(solutions, ["assortativity"])
    for solution, evaluation in zip(solutions, evaluations):
        assert set(evaluation.measures) == {"assortativity"}
        graph = task.graph(solution)
        undirected = graph.to_networkx(directed=False)
        assert undirected.number_of_edges() == int(np.count_nonzero(task.genome(solution)))
        assert evaluation.measures["assortativity"] == pytest.approx(nx.degree_assortativity_coefficient(undirected))


def test_information_descriptors_are_measured_on_the_masked_network(task):
    information = pytest.importorskip("growprune.information")
    solution = task.initial_solutions(1, np.random.default_rng(4))[0]
    evaluation = task.evaluate(solution[None], ["mi_consecutive", "mi_label"])[0]
    network = copy.deepcopy(task.base_module().model)
    with torch.no_grad():
        for name, mask in task.masks_of(solution).items():
            network.get_parameter(name).mul_(mask)
    expected = information.information_measures(network, *task.probe_tensors(), bins=task.bins)
    assert evaluation.measures == {"mi_label": expected["mi_label"], "mi_consecutive": expected["mi_consecutive"]}
    assert len(task.probe_tensors()[1]) == min(task.probe_size, len(task.validation_tensors()[1]))


def test_evaluation_does_not_depend_on_chunking_or_the_process(task):
    solutions = task.initial_solutions(5, np.random.default_rng(2))
    whole = task.evaluate(solutions, ["density", "assortativity"])
    pieces = evaluate_chunk(task, (solutions[:2], ("density", "assortativity"))) + \
        evaluate_chunk(pickle.loads(pickle.dumps(task)), (solutions[2:], ("density", "assortativity")))
    assert [(e.objective, e.measures) for e in whole] == [(e.objective, e.measures) for e in pieces]
    assert all(isinstance(e, Evaluation) for e in pieces)


def test_a_pickled_task_leaves_the_data_splits_behind(task):
    copy = pickle.loads(pickle.dumps(task))
    assert copy.data is None
    with pytest.raises(ValueError, match="process that bound"):
        copy.train_tensors()
    inputs, targets = task.train_tensors()
    assert len(inputs) == len(targets) > 0


def test_unknown_descriptor_lists_the_valid_names(task):
    with pytest.raises(ValueError, match=r"unknown descriptor 'modularityy'.*valid: density, sparsity, .*modularity"):
        task.evaluate(task.initial_solutions(1, np.random.default_rng(0)), ["modularityy"])


def test_bad_task_arguments_are_refused():
    with pytest.raises(ValueError, match="selection must be one of val, train"):
        SupervisedMaskTask(selection="test")
    with pytest.raises(ValueError, match="images_per_class=5 needs retrain_steps > 0"):
        SupervisedMaskTask(images_per_class=5)
    with pytest.raises(ValueError, match="initial_density"):
        SupervisedMaskTask(initial_density=(0.9, 0.1))


def test_retraining_gives_the_network_the_objective_saw(base_checkpoint):
    task = SupervisedMaskTask(data=DigitsDataModule(seed=0), base_checkpoint=base_checkpoint, retrain_steps=3,
                              images_per_class=2)
    task.bind(0, None)
    solution = task.initial_solutions(1, np.random.default_rng(3))[0]
    evaluation = task.evaluate(solution[None], ["density"])[0]
    network = task.network(solution)
    inputs, targets = task.validation_tensors()
    with torch.no_grad():
        accuracy = int((network(inputs).argmax(1) == targets).sum()) / len(targets)
    assert accuracy == pytest.approx(evaluation.objective, abs=1e-9)
    kept = task.masks_of(solution)
    for name, mask in kept.items():  # pruned weights stay pruned after retraining
        assert torch.all(network.model.get_parameter(name)[mask == 0] == 0)


# --------------------------------------------------------------------------------------- emitter
def _archive(task, dims=(10,)):
    from growprune.qd.run import build_archive

    section = {"type": "grid", "dims": list(dims), "ranges": [[0.0, 1.0]] * len(dims), "qd_score_offset": 0.0}
    return build_archive(section, task, seed=0)


def test_the_mask_emitter_starts_with_initial_masks_then_mutates_elites_with_lineage(task):
    from growprune.qd import MaskMutationEmitter

    archive = _archive(task)
    emitter = MaskMutationEmitter(archive, task=task, batch_size=6, seed=0, resize_probability=0.0)
    roots = emitter.ask()
    assert roots.shape == (6, task.solution_dim) and roots.dtype == np.uint8
    assert np.array_equal(emitter.last_lineage["depth"], np.zeros(6))
    assert np.isnan(emitter.last_lineage["parent_objective"]).all()
    evaluations = task.evaluate(roots, ["density"])
    objective = np.array([e.objective for e in evaluations])
    archive.add(roots, objective, np.array([[e.measures["density"]] for e in evaluations]),
                depth=np.zeros(6), root_objective=objective, parent_objective=np.full(6, np.nan), iteration=np.zeros(6), nonfinite_measures=np.zeros(6))
    children = emitter.ask()
    lineage = emitter.last_lineage
    assert np.array_equal(lineage["depth"], np.ones(6))
    elites = {bytes(s): o for s, o in zip(archive.data("solution"), archive.data("objective"))}
    densities = {round(float(task.genome(s).mean()), 12): bytes(s) for s in archive.data("solution")}
    for child, parent_objective in zip(children, lineage["parent_objective"]):
        assert parent_objective in elites.values()
        # "swap" without resizing keeps the parent's kept count exactly
        assert round(float(task.genome(child).mean()), 12) in densities
    assert not any(bytes(child) in elites for child in children)


def test_the_mask_emitter_resizes_both_ways_and_is_reproducible(task):
    from growprune.qd import MaskMutationEmitter

    def children(seed):
        archive = _archive(task)
        roots = task.initial_solutions(1, np.random.default_rng(5))
        archive.add(roots, [0.5], [[task.genome(roots[0]).mean()]], depth=[0], root_objective=[0.5],
                    parent_objective=[np.nan], iteration=[0], nonfinite_measures=[0])
        emitter = MaskMutationEmitter(archive, task=task, batch_size=20, seed=seed, resize_probability=1.0,
                                      resize_sigma=0.3)
        return roots[0], emitter.ask()

    parent, first = children(7)
    _, again = children(7)
    assert np.array_equal(first, again)
    kept = task.genome(parent).sum()
    sizes = np.array([task.genome(child).sum() for child in first])
    assert (sizes < kept).any() and (sizes > kept).any()


def test_the_mask_emitter_refuses_a_task_without_masks(task):
    from growprune.qd import MaskMutationEmitter

    with pytest.raises(ValueError, match="kind must be one of swap, flip, magnitude, shrink"):
        MaskMutationEmitter(_archive(task), task=task, kind="cross")
    with pytest.raises(ValueError, match="needs a task with mask solutions"):
        MaskMutationEmitter(_archive(task), task=object())


# ------------------------------------------------------------------------------------------- run
def _config(tmp_path, base_checkpoint, **changes):
    config = {
        "name": "tiny", "seed": 0, "iterations": 4, "root": str(tmp_path / "runs"),
        "descriptors": ["density", "assortativity"],
        "archive": {"type": "grid", "dims": [8, 6], "ranges": [[0.0, 1.0], [-1.0, 0.0]], "cells": None,
                    "samples": 1000, "qd_score_offset": 0.0},
        "emitters": [{"class_path": "growprune.qd.MaskMutationEmitter", "init_args": {"batch_size": 5}, "count": 2}],
        "engine": "local", "engine_options": {}, "chunks": 3, "checkpoint_every": 1,
        "wandb": {"mode": "disabled", "project": "growprune"},
    }
    config.update(changes)
    task_args = {"data": {"class_path": "growprune.data.DigitsDataModule", "init_args": {"seed": 0}},
                 "base_checkpoint": base_checkpoint}
    return config, task_args


def _run(config, task_args, resume=None, task_class="growprune.qd.SupervisedMaskTask"):
    """QDRun.prepare + execute in this process (the CLI's parse and dump in between)."""
    import yaml

    from growprune.cli_qd import instantiate_config
    from growprune.qd.run import QDRun

    text = yaml.safe_dump({**config, "task": {"class_path": task_class, "init_args": task_args}})
    path = config["root"] + ".yaml"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    parsed, objects = instantiate_config(["-c", path] + (["--resume", resume] if resume else []))
    from growprune.cli_evolve import config_text
    from growprune.cli_qd import build_parser

    run = QDRun.prepare(parsed, objects.task, config_text(build_parser(), parsed), resume=parsed.resume)
    return run.execute()


def _rows(run_dir):
    rows = list(csv.DictReader((run_dir / "iterations.csv").open()))
    for row in rows:
        row.pop("wall_time")
    return rows


def _archive_content(run_dir):
    with (run_dir / "archive.pkl").open("rb") as handle:
        archive = pickle.load(handle)
    data = archive.data()
    order = np.argsort(data["index"])
    return {key: np.asarray(value)[order] for key, value in data.items()}


def test_a_run_fills_the_archive_with_lineage_and_writes_every_output(tmp_path, base_checkpoint, capsys):
    config, task_args = _config(tmp_path, base_checkpoint)
    summary_path = _run(config, task_args)
    run_dir = summary_path.parent
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"summary: {summary_path.relative_to(tmp_path)}"
    for name in ("config.yaml", "base.ckpt", "iterations.csv", "state.pkl", "archive.pkl", "archive.csv",
                 "heatmap.png", "summary.json", "best.ckpt", "validate.yaml"):
        assert (run_dir / name).is_file(), name
    rows = _rows(run_dir)
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    assert [int(r["evaluations"]) for r in rows] == [10, 20, 30, 40]
    data = _archive_content(run_dir)
    summary = json.loads(summary_path.read_text())
    assert summary["num_elites"] == len(data["objective"]) == int(rows[-1]["num_elites"])
    assert summary["coverage"] == pytest.approx(len(data["objective"]) / 48)
    assert summary["qd_score"] == pytest.approx(data["objective"].sum())
    assert summary["best"]["objective"] == pytest.approx(data["objective"].max())
    assert summary["evaluations"] == 40
    # lineage: roots carry their own objective; children are one deeper than some earlier elite
    roots = data["depth"] == 0
    assert np.allclose(data["root_objective"][roots], data["objective"][roots])
    assert np.isnan(data["parent_objective"][roots]).all()
    assert (data["depth"] > 0).any() and (data["iteration"][data["depth"] > 0] > 0).all()
    assert not np.isnan(data["parent_objective"][~roots]).any()
    # archive.csv: one row per elite, no solution columns for packed masks
    with (run_dir / "archive.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(data["objective"])
    assert list(table[0]) == ["index", "objective", "density", "assortativity", "depth", "root_objective",
                              "parent_objective", "iteration", "nonfinite_measures"]
    # every elite's measures are what the task measures for its solution
    from growprune.qd.run import load_run

    loaded = load_run(run_dir)
    again = loaded.task.evaluate(data["solution"][:3], ["density", "assortativity"])
    assert [e.objective for e in again] == pytest.approx(list(data["objective"][:3]))
    assert np.allclose([[e.measures["density"], e.measures["assortativity"]] for e in again], data["measures"][:3])
    assert loaded.summary == summary and loaded.config["name"] == "tiny"
    dense = np.packbits(np.ones(loaded.task.genotype.length, dtype=bool))
    assert summary["base_objective"] == pytest.approx(_masked_accuracy(loaded.task, dense), abs=1e-9)
    # the best elite's checkpoint holds its masked weights
    state = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    best = data["solution"][np.argmax(data["objective"])]
    for name, mask in loaded.task.masks_of(best).items():
        assert torch.all(state[f"model.{name}"][mask == 0] == 0)


def test_stopping_and_resuming_gives_the_uninterrupted_archive_and_log(tmp_path, base_checkpoint):
    config, task_args = _config(tmp_path / "a", base_checkpoint)
    whole = _run(config, task_args).parent
    config, task_args = _config(tmp_path / "b", base_checkpoint, iterations=2)
    part = _run(config, task_args).parent
    config["iterations"] = 4
    resumed = _run(config, task_args, resume=str(part)).parent
    assert resumed == part
    assert _rows(resumed) == _rows(whole)
    first, second = _archive_content(whole), _archive_content(resumed)
    for key in ("index", "objective", "measures", "solution", "depth", "root_objective", "iteration"):
        assert np.array_equal(first[key], second[key], equal_nan=True), key


def test_resume_refuses_a_changed_config_and_fewer_iterations(tmp_path, base_checkpoint):
    config, task_args = _config(tmp_path, base_checkpoint, iterations=1)
    run_dir = _run(config, task_args).parent
    with pytest.raises(ConfigurationError, match=r"differs .* in descriptors, seed \(only iterations"):
        _run({**config, "seed": 1, "descriptors": ["density", "connectivity"]}, task_args, resume=str(run_dir))
    longer = _run({**config, "iterations": 2}, task_args, resume=str(run_dir))
    with pytest.raises(ConfigurationError, match="already completed 2 iterations; pass --iterations 2 or more"):
        _run(config, task_args, resume=str(longer.parent))


def test_a_cvt_archive_with_one_descriptor(tmp_path, base_checkpoint):
    config, task_args = _config(tmp_path, base_checkpoint, iterations=2, descriptors=["sparsity"],
                                archive={"type": "cvt", "dims": None, "cells": 12, "ranges": [[0.0, 1.0]],
                                         "samples": 500, "qd_score_offset": 0.5})
    summary_path = _run(config, task_args)
    data = _archive_content(summary_path.parent)
    summary = json.loads(summary_path.read_text())
    assert summary["archive"] == {"type": "cvt", "cells": 12}
    assert summary["qd_score"] == pytest.approx((data["objective"] - 0.5).sum())
    assert (summary_path.parent / "heatmap.png").is_file()


class SphereTask(QDTask):
    """A float task for the generic run paths: maximise -|x|^2, descriptors x0 and x1."""

    def __init__(self, dim: int = 4) -> None:
        self.dim = dim

    def bind(self, seed, run_dir=None):
        pass

    @property
    def solution_dim(self):
        return self.dim

    @property
    def solution_dtype(self):
        return np.dtype(np.float32)

    def descriptor_names(self):
        return ["x0", "x1"]

    def initial_solutions(self, count, rng):
        return rng.normal(size=(count, self.dim)).astype(np.float32)

    def evaluate(self, solutions, descriptors):
        return [Evaluation(-float(np.sum(np.square(x, dtype=np.float64))), {"x0": float(x[0]), "x1": float(x[1])})
                for x in np.asarray(solutions)]

    def network(self, solution):
        layer = torch.nn.Linear(self.dim, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(solution)[None])
        return layer

    def graph(self, solution):
        from growprune.graph import unit_graph_from_weights

        return unit_graph_from_weights([np.asarray(solution)[None]])

    def save_elite(self, solution, path):
        target = path.with_suffix(".npy")
        np.save(target, np.asarray(solution))
        return target


class HoleySphereTask(SphereTask):
    """SphereTask whose x1 descriptor is undefined (NaN) when x0 > 0."""

    def evaluate(self, solutions, descriptors):
        evaluations = super().evaluate(solutions, descriptors)
        for evaluation in evaluations:
            if evaluation.measures["x0"] > 0:
                evaluation.measures["x1"] = float("nan")
        return evaluations


def test_undefined_descriptors_are_clipped_into_the_range_and_counted(tmp_path):
    config = {"name": "holes", "seed": 1, "iterations": 2, "root": str(tmp_path / "runs"), "descriptors": ["x0", "x1"],
              "archive": {"type": "grid", "dims": [4, 4], "ranges": [[-3.0, 3.0], [-3.0, 3.0]], "cells": None,
                          "samples": 1000, "qd_score_offset": -30.0},
              "emitters": [{"class_path": "ribs.emitters.GaussianEmitter", "init_args": {"sigma": 1.0, "batch_size": 20}}],
              "engine": "local", "engine_options": {}, "chunks": 1, "checkpoint_every": 1,
              "wandb": {"mode": "disabled", "project": "growprune"}}
    summary_path = _run(config, {"dim": 2}, task_class="tests.test_qd_core.HoleySphereTask")
    rows = _rows(summary_path.parent)
    data = _archive_content(summary_path.parent)
    holes = data["solution"][:, 0] > 0
    assert holes.any() and sum(int(row["nonfinite_measures"]) for row in rows) >= holes.sum()
    assert np.all(data["measures"][holes, 1] == -3.0)  # NaN -> the range's low end
    # each clipped elite says so in the archive (and archive.csv), measured ones carry 0
    assert np.array_equal(data["nonfinite_measures"], holes.astype(np.int32))
    assert json.loads(summary_path.read_text())["nonfinite_measures"] == sum(int(r["nonfinite_measures"]) for r in rows)


def test_three_descriptors_get_no_heatmap(tmp_path, base_checkpoint, capsys):
    config, task_args = _config(tmp_path, base_checkpoint, iterations=1, descriptors=["density", "sparsity", "num_edges"],
                                archive={"type": "grid", "dims": [4, 4, 4], "ranges": [[0, 1], [0, 1], [0, 60000]],
                                         "cells": None, "samples": 1000, "qd_score_offset": 0.0})
    summary_path = _run(config, task_args)
    assert "no heatmap: 3 descriptors" in capsys.readouterr().out
    assert not (summary_path.parent / "heatmap.png").exists()
    data = _archive_content(summary_path.parent)
    genes = 64 * 300 + 300 * 100 + 100 * 10  # an MLP's unit graph has one edge per kept weight
    assert np.allclose(data["measures"][:, 0] + data["measures"][:, 1], 1.0)
    assert np.allclose(data["measures"][:, 2], np.round(data["measures"][:, 0] * genes))


def test_emitters_get_the_run_parameters_they_take(task):
    from growprune.qd.run import build_archive, parse_emitters

    specs = parse_emitters([{"class_path": "growprune.qd.MaskMutationEmitter", "count": 2},
                            {"class_path": "ribs.emitters.GaussianEmitter", "init_args": {"sigma": 0.1}}])
    archive = build_archive({"type": "grid", "dims": [4], "ranges": [[0, 1]]}, task, seed=0)
    first = specs[0].build(archive, task, seed=3, first_index=0)
    assert [e.task for e in first] == [task, task]
    # different derived seeds per copy: different children
    assert not np.array_equal(first[0].ask(), first[1].ask())
    # x0 for emitters that take it: one initial solution of the task
    sphere = SphereTask()
    float_archive = build_archive({"type": "grid", "dims": [4, 4], "ranges": [[-2, 2], [-2, 2]]}, sphere, seed=0)
    gaussian = specs[1].build(float_archive, sphere, seed=3, first_index=2)[0]
    expected = sphere.initial_solutions(1, np.random.default_rng(derived_seed(3, 2)))[0]
    assert np.array_equal(gaussian._x0, expected)


def test_a_float_task_with_a_ribs_emitter_keeps_its_solutions_in_the_csv(tmp_path):
    config = {"name": "sphere", "seed": 0, "iterations": 3, "root": str(tmp_path / "runs"), "descriptors": ["x0", "x1"],
              "archive": {"type": "grid", "dims": [5, 5], "ranges": [[-2.0, 2.0], [-2.0, 2.0]], "cells": None,
                          "samples": 1000, "qd_score_offset": -10.0},
              # (ribs' CMA-ES would do as well, but compiles its numba kernels for ~10 s first)
              "emitters": [{"class_path": "ribs.emitters.GaussianEmitter",
                            "init_args": {"sigma": 0.5, "batch_size": 6}, "count": 2}],
              "engine": "local", "engine_options": {}, "chunks": 2, "checkpoint_every": 2,
              "wandb": {"mode": "disabled", "project": "growprune"}}
    summary_path = _run(config, {"dim": 3}, task_class="tests.test_qd_core.SphereTask")
    summary = json.loads(summary_path.read_text())
    assert summary["evaluations"] == 36 and summary["best"]["file"].endswith("best.npy")
    with (summary_path.parent / "archive.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == summary["num_elites"] > 0
    for row in table:  # solution columns, and the measures are the solution's first coordinates
        assert float(row["x0"]) == pytest.approx(float(row["solution_0"]), abs=1e-6)
        assert float(row["objective"]) == pytest.approx(-sum(float(row[f"solution_{i}"]) ** 2 for i in range(3)), abs=1e-5)
        assert row["depth"] == "0"  # ribs emitters set no lineage: roots
    assert summary["qd_score"] == pytest.approx(sum(float(row["objective"]) + 10.0 for row in table))


@pytest.mark.parametrize("entry, message", [
    ({"class_path": "growprune.qd.MaskMutationEmitter", "init_args": {"batchsize": 4}},
     r"emitters\[0\] > MaskMutationEmitter: unknown init_args key 'batchsize'; valid: batch_size, kind, rate, "
     r"resize_probability, resize_sigma, seed, task"),
    ({"class_path": "growprune.qd.NoSuchEmitter"}, r"emitters\[0\] > class_path: 'growprune.qd.NoSuchEmitter' does not name a class"),
    ({"class_path": "growprune.qd.SupervisedMaskTask"}, "is not a pyribs emitter"),
    ({"class_path": "ribs.emitters.GaussianEmitter"}, "GaussianEmitter: init_args misses sigma"),
    ({"class_path": "growprune.qd.MaskMutationEmitter", "count": 0}, r"count: must be an integer >= 1"),
    ({"class_path": "growprune.qd.MaskMutationEmitter", "args": {}}, "unknown key"),
])
def test_bad_emitter_entries_are_named(entry, message):
    from growprune.qd.run import parse_emitters

    with pytest.raises(ConfigurationError, match=message):
        parse_emitters([entry])


@pytest.mark.parametrize("section, descriptors, message", [
    ({"type": "grid", "dims": [10], "ranges": [[0, 1], [0, 1]]}, ["density", "modularity"], "archive.dims: one cell count per descriptor"),
    ({"type": "grid", "dims": [10, 0], "ranges": [[0, 1], [0, 1]]}, ["density", "modularity"], "archive.dims: cell counts must be integers >= 1"),
    ({"type": "cvt", "dims": [4], "cells": 5, "ranges": [[0, 1]], "samples": 10}, ["density"], "archive.dims: only for grid"),
    ({"type": "grid", "dims": [10, 10], "ranges": [[0, 1]]}, ["density", "modularity"], "archive.ranges: one"),
    ({"type": "grid", "dims": [10], "ranges": [[0.5, 0.5]]}, ["density"], "range of density is empty"),
    ({"type": "grid", "dims": [10], "ranges": [[0, float("inf")]]}, ["density"], "not finite"),
    ({"type": "cvt", "dims": None, "cells": None, "ranges": [[0, 1]], "samples": 10}, ["density"], "archive.cells"),
    ({"type": "cvt", "dims": None, "cells": 20, "ranges": [[0, 1]], "samples": 10}, ["density"], "archive.samples"),
    ({"type": "hex", "dims": [3], "ranges": [[0, 1]]}, ["density"], "archive.type: must be one of grid, cvt"),
])
def test_bad_archive_sections_are_named(section, descriptors, message):
    from growprune.qd.run import check_archive

    with pytest.raises(ConfigurationError, match=message):
        check_archive(Namespace(**section), descriptors)


@pytest.mark.slow  # Ray start-up alone takes ~10 s here
def test_ray_gives_the_archive_of_the_local_engine(tmp_path, base_checkpoint):
    pytest.importorskip("ray")
    config, task_args = _config(tmp_path / "local", base_checkpoint, iterations=2, engine_options={"threads": 1})
    local = _archive_content(_run(config, task_args).parent)
    config, task_args = _config(tmp_path / "ray", base_checkpoint, iterations=2, engine="ray",
                                engine_options={"num_cpus": 2, "threads": 1})
    remote = _archive_content(_run(config, task_args).parent)
    for key in ("index", "objective", "measures", "solution", "depth"):
        assert np.array_equal(local[key], remote[key]), key
