"""The ``growprune evolve`` command: its config, its one-line errors, its run directory and outputs.

Runs in-process (``growprune.cli.main``) on the scikit-learn digits with LeNet-300-100 at 8x8,
a population of 6 and 2 generations: a whole run takes a few seconds.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from growprune.cli import main
from growprune.data import DigitsDataModule
from growprune.evolution.data import tensors
from growprune.evolution.genotypes import MaskGenotype
from growprune.evolution.types import genome_key
from growprune.module import GrowPruneModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "evolve").glob("*.yaml"))
TINY = """
name: tiny
seed: 0
generations: 2
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
  class_path: growprune.evolution.SmallestAboveFloor
  init_args: {floor: 0.5}
search:
  class_path: growprune.evolution.GeneticSearch
  init_args: {population: 6, elite: 1, mutation_rate: 0.02}
evaluation: {method: full}
chunks: 2
wandb: {mode: disabled}
"""
CSV_COLUMNS = {"generation", "best_fitness", "mean_fitness", "front_size", "best_accuracy", "best_size",
               "best_density", "best_sparsity", "evaluations", "macs", "macs_full", "evaluations_total", "macs_total",
               "macs_full_total", "wall_seconds"}


def _write(folder: Path, text: str = TINY, name: str = "tiny.yaml") -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _fail(arguments: list[str], capsys) -> str:
    """Run the command expecting a configuration error; its stderr (one line)."""
    with pytest.raises(SystemExit) as raised:
        main(["evolve", *arguments])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("growprune: error: ") and "\n" not in error, error
    return error.removeprefix("growprune: error: ")


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# ------------------------------------------------------------------------------------------ config
def test_print_config_shows_every_section_with_its_defaults(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["evolve", "--print_config"])
    assert raised.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for key in ("name", "seed", "generations", "root", "model", "data", "base", "genotype", "objective", "search",
                "evaluation", "retraining", "pbt", "engine", "engine_options", "chunks", "wandb"):
        assert key in printed, key
    assert printed["root"] == "runs/evolve" and printed["engine"] == "local" and printed["pbt"] is None
    assert printed["data"]["class_path"] == "growprune.data.DigitsDataModule"
    assert printed["search"]["class_path"] == "growprune.evolution.GeneticSearch"
    assert printed["base"] == {"checkpoint": None, "epochs": 10}
    # the data module supplies these: they are not options of the model section
    assert "num_classes" not in printed["model"] and "input_shape" not in printed["model"]
    assert printed["wandb"]["mode"] == "auto"


def test_layered_configs_and_dotted_overrides_later_wins(tmp_path, capsys):
    override = _write(tmp_path, "search:\n  init_args: {population: 10}\ngenerations: 7\n", "more.yaml")
    with pytest.raises(SystemExit):
        main(["evolve", "-c", _write(tmp_path), "-c", override, "--search.init_args.elite", "3", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["generations"] == 7
    assert printed["search"]["init_args"]["population"] == 10 and printed["search"]["init_args"]["elite"] == 3
    assert printed["objective"]["init_args"]["floor"] == 0.5  # from the first file


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_shipped_evolve_config_parses(path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["evolve", "-c", str(path), "--print_config"])
    assert raised.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == path.stem
    assert path.read_text().startswith("#")  # the header says what it does and how long it takes


def test_the_shipped_configs_are_all_there():
    assert {path.stem for path in CONFIGS} >= {
        "lenet300_ga_digits", "lenet5_ga_digits", "lenet300_ga_mnist", "lenet5_ga_mnist", "lenet300_fewshot_mnist",
        "lenet300_pbt_digits", "lenet300_pbt_mnist", "lenet300_pareto_digits", "vgg11_ga_cifar10"}


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--search.init_args.population", "2", "--search.init_args.elite", "3"],
         "search > growprune.evolution.GeneticSearch: "),
        (["--genotype.init_args.layers", "[nothing*]"], "genotype > growprune.evolution.MaskGenotype: "),
        (["--engine", "spark"], "engine: unknown engine 'spark': choose one of ['local', 'ray']"),
        (["--search.init_args.populaton", "8"], "did you mean 'population'"),
        (["--generations", "0"], "generations: must be an integer >= 1, got 0"),
        (["--wandb.mode", "sometimes"], "wandb.mode"),
        (["--retraining.images_per_class", "2"],
         "retraining.images_per_class: 2 images per class to retrain on, but evaluation.retrain_steps is 0"),
        (["--objective", "growprune.evolution.ParetoFront", "--evaluation.method", "race"],
         "evaluation.method: racing needs a scalar objective"),
        (["--genotype", "growprune.evolution.RatioGenotype", "--search.init_args.mutation", "flip_not"],
         "search > growprune.evolution.GeneticSearch: "),
        (["--genotype", "growprune.evolution.RatioGenotype", "--search.init_args.mutation", "perturb",
          "--pbt", "growprune.evolution.PBTCycles"],
         "pbt: PBT cycles need a genotype with boolean (mask) genomes"),
        (["--name", "../escaped"], "name: must be a plain folder name (no '/', '..'), got '../escaped'"),
        (["--evaluation.device", "meta"], "device must be cpu or cuda, got 'meta'"),
    ],
    ids=["elite-above-population", "genotype-fits-nothing", "unknown-engine", "typo", "no-generations", "wandb-mode",
         "retraining-without-steps", "pareto-race", "unknown-mutation", "pbt-ratios", "name-with-path", "device"],
)
def test_bad_input_is_one_line_and_nothing_is_written(arguments, expected, tmp_path, capsys):
    config = _write(tmp_path)
    before = _files(tmp_path)
    error = _fail(["-c", config, *arguments], capsys)
    assert expected in error, error
    assert _files(tmp_path) == before and not (tmp_path / "runs").exists()


def test_ray_engine_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    error = _fail(["-c", _write(tmp_path), "--engine", "ray"], capsys)
    assert error == "engine: Ray is not installed: pip install 'growprune[ray]'"
    assert not (tmp_path / "runs").exists()


def test_floor_above_the_base_accuracy_leaves_only_the_base_checkpoint(tmp_path, capsys):
    # the base network is trained first (its accuracy decides), so its checkpoint is all that exists
    error = _fail(["-c", _write(tmp_path), "--objective.init_args.floor", "0.999", "--base.epochs", "1"], capsys)
    run = Path("runs/evolve/tiny/version_0")  # as the config's root says (relative to the working directory)
    assert error.startswith("objective > growprune.evolution.SmallestAboveFloor: accuracy floor 0.999")
    assert f"nothing was written but the trained base network, {run / 'base.ckpt'}" in error
    assert _files(tmp_path / "runs") == ["evolve/tiny/version_0/base.ckpt"]
    # with that checkpoint given, the same refusal comes before anything is written
    error = _fail(["-c", _write(tmp_path), "--objective.init_args.floor", "0.999",
                   "--base.checkpoint", str(run / "base.ckpt")], capsys)
    assert "accuracy floor 0.999" in error and "nothing was written" not in error
    assert _files(tmp_path / "runs") == ["evolve/tiny/version_0/base.ckpt"]


def test_missing_base_checkpoint_and_missing_resume_run(tmp_path, capsys):
    error = _fail(["-c", _write(tmp_path), "--base.checkpoint", "nowhere.ckpt"], capsys)
    assert error == "checkpoint not found: nowhere.ckpt"
    error = _fail(["-c", _write(tmp_path), "--resume"], capsys)
    assert error == "resume: no run named 'tiny' in runs/evolve to resume"
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run (its stdout and run directory), shared by the tests below."""
    folder = tmp_path_factory.mktemp("evolve")
    config = _write(folder)
    import contextlib
    import io
    import os

    output = io.StringIO()
    previous = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(output):
            main(["evolve", "-c", config])
    finally:
        os.chdir(previous)
    return folder, output.getvalue()


def test_a_run_writes_every_output_and_ends_with_the_summary_line(tiny_run):
    folder, stdout = tiny_run
    run = folder / "runs" / "evolve" / "tiny" / "version_0"
    last = stdout.strip().splitlines()[-1]
    assert last == "summary: runs/evolve/tiny/version_0/summary.json"
    # (WANDB_MODE=offline, as CI sets it, wins over the config's `disabled` and adds the run's wandb/ folder)
    assert sorted(path.name for path in run.iterdir() if path.name != "wandb") == sorted([
        "config.yaml", "validate.yaml", "base.ckpt", "generations.csv", "evaluations.jsonl", "state.pt",
        "summary.json", "best.ckpt", "front.png"])
    assert (run / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["search"]["init_args"]["population"] == 6 and "resume" not in config
    validate = yaml.safe_load((run / "validate.yaml").read_text())
    assert set(validate) == {"model", "data"} and validate["model"]["arch"] == "lenet_300_100"


def test_generations_csv_state_and_journal_agree(tiny_run):
    folder, _ = tiny_run
    run = folder / "runs" / "evolve" / "tiny" / "version_0"
    rows = list(csv.DictReader((run / "generations.csv").open()))
    assert [int(row["generation"]) for row in rows] == [0, 1]
    assert CSV_COLUMNS <= set(rows[0]), set(rows[0])
    evaluations = [int(row["evaluations"]) for row in rows]
    assert evaluations[0] == 6  # the whole first population; later ones skip the elite
    assert 1 <= evaluations[1] <= 5
    assert [int(row["evaluations_total"]) for row in rows] == list(np.cumsum(evaluations))
    assert [int(row["macs_total"]) for row in rows] == list(np.cumsum([int(row["macs"]) for row in rows]))
    lines = [line for line in (run / "evaluations.jsonl").read_text().splitlines() if line.strip()]
    assert len(lines) == sum(evaluations)  # one journal entry per evaluation
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["generation"] == 2 and state["counters"]["evaluations"] == sum(evaluations)
    assert "search" in state and "wandb_run_id" in state
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == sum(evaluations) and summary["generations"] == 2
    assert summary["macs"] == int(rows[-1]["macs_total"])
    # best fitness never falls (elitism) and the summary's best is the last generation's best
    best = [float(row["best_fitness"]) for row in rows]
    assert best == sorted(best)
    assert summary["best"]["fitness"][0] == pytest.approx(best[-1])


def test_the_best_checkpoint_holds_the_reported_network(tiny_run):
    folder, _ = tiny_run
    run = folder / "runs" / "evolve" / "tiny" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup()
    module = GrowPruneModule(arch="lenet_300_100", num_classes=data.num_classes, input_shape=data.input_shape)
    checkpoint = torch.load(run / "best.ckpt", weights_only=True)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()

    def accuracy(split) -> float:  # a plain loop, independent of the evaluator and of Lightning
        inputs, targets = tensors(split)
        with torch.no_grad():
            return sum(int(module(x[None]).argmax() == y) for x, y in zip(inputs, targets)) / len(targets)

    best = summary["best"]
    assert accuracy(data.val_set) == pytest.approx(best["val/acc"], abs=1e-6)
    assert accuracy(data.test_set) == pytest.approx(best["test/acc"], abs=1e-6)
    # the evaluator used every validation sample: the selection accuracy is the validation accuracy
    assert best["accuracy/selection"] == pytest.approx(best["val/acc"], abs=1e-6)
    nonzero = sum(int(torch.count_nonzero(p)) for p in module.model.parameters())
    assert nonzero == best["params/nonzero"] == best["size"]
    # the checkpoint's masks are the best genome's: same key, same density
    genotype = MaskGenotype()
    genotype.bind(module)
    genome = np.concatenate([module.masks[name].flatten().bool().numpy() for name in genotype.layer_slices])
    assert genome_key(genome) == best["genome_key"]
    assert genome.mean() == pytest.approx(best["density"])


def test_growprune_validate_reloads_the_best_checkpoint(tiny_run, capsys, monkeypatch):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    run = Path("runs/evolve/tiny/version_0")
    main(["validate", "-c", str(run / "validate.yaml"), "--ckpt_path", str(run / "best.ckpt"),
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(Path(last.removeprefix("summary: ")).read_text())
    best = json.loads((run / "summary.json").read_text())["best"]
    assert report["val/acc"] == pytest.approx(best["val/acc"], abs=1e-6)
    assert report["params/nonzero"] == best["params/nonzero"]


def test_a_second_run_gets_a_new_version(tiny_run, monkeypatch, capsys):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    before = (folder / "runs/evolve/tiny/version_0/summary.json").read_bytes()
    main(["evolve", "-c", str(folder / "tiny.yaml"), "--generations", "1", "--base.checkpoint",
          "runs/evolve/tiny/version_0/base.ckpt"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "summary: runs/evolve/tiny/version_1/summary.json"
    assert (folder / "runs/evolve/tiny/version_0/summary.json").read_bytes() == before
    # the base network was loaded, not trained: both runs prune the same weights
    first = torch.load(folder / "runs/evolve/tiny/version_0/base.ckpt", weights_only=True)["state_dict"]
    second = torch.load(folder / "runs/evolve/tiny/version_1/base.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_resume_of_a_finished_run_extends_it_and_keeps_its_rows(tiny_run, monkeypatch, capsys):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    run = Path("runs/evolve/tiny/version_0")
    rows = list(csv.DictReader((run / "generations.csv").open()))
    journal = (run / "evaluations.jsonl").read_text()
    # a changed search would not continue the same run: refused before anything is touched
    error = _fail(["--resume", str(run), "--search.init_args.mutation_rate", "0.5"], capsys)
    assert error.startswith(f"resume: the config differs from the one {run} ran with in search")
    # --resume <run dir> alone takes the run's own config.yaml; more generations extend the run
    main(["evolve", "--resume", str(run), "--generations", "3"])
    captured = capsys.readouterr()
    assert f"continuing run {run}" in captured.err
    assert captured.out.strip().splitlines()[-1] == f"summary: {run / 'summary.json'}"
    extended = list(csv.DictReader((run / "generations.csv").open()))
    assert [int(row["generation"]) for row in extended] == [0, 1, 2]
    assert [{k: v for k, v in row.items() if k != "wall_seconds"} for row in extended[:2]] == \
        [{k: v for k, v in row.items() if k != "wall_seconds"} for row in rows]
    assert (run / "evaluations.jsonl").read_text().startswith(journal)  # appended to, never rewritten
    assert torch.load(run / "state.pt", weights_only=True)["generation"] == 3
    assert json.loads((run / "summary.json").read_text())["generations"] == 3
    assert sorted(path.name for path in run.parent.iterdir()) == ["version_0", "version_1"]
    # fewer generations than the run completed: refused in one line, nothing touched
    error = _fail(["--resume", str(run), "--generations", "2"], capsys)
    assert error == (f"generations: {run} already completed 3 generations; pass --generations 3 or more to resume "
                     "it (got 2)")
    # a newer folder that a refused run left with only its base network is not what --resume continues
    refused = run.parent / "version_9"
    refused.mkdir()
    (refused / "base.ckpt").write_bytes(b"")
    error = _fail(["-c", str(folder / "tiny.yaml"), "--resume", "--generations", "1"], capsys)
    assert "runs/evolve/tiny/version_1 " in error and "version_9" not in error  # the newest run with a config
    refused.joinpath("base.ckpt").unlink()
    refused.rmdir()


def test_wandb_offline_run_lives_in_the_run_directory_and_its_id_in_the_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["evolve", "-c", _write(tmp_path), "--generations", "1", "--base.epochs", "1"])
    run = tmp_path / "runs/evolve/tiny/version_0"
    run_id = torch.load(run / "state.pt", weights_only=True)["wandb_run_id"]
    assert run_id
    folders = [path.name for path in (run / "wandb").glob("offline-run-*")]
    assert len(folders) == 1 and folders[0].endswith(run_id)


def test_a_failing_run_finishes_its_wandb_run_as_failed(tmp_path, monkeypatch):
    import wandb

    import growprune.evolution.loop as loop

    monkeypatch.setenv("WANDB_MODE", "offline")

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    finished = []
    finish = wandb.sdk.wandb_run.Run.finish

    def recording_finish(self, exit_code=None, **kwargs):
        finished.append(exit_code)
        return finish(self, exit_code=exit_code, **kwargs)

    monkeypatch.setattr(loop, "evolve", broken)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", recording_finish)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        main(["evolve", "-c", _write(tmp_path), "--base.epochs", "1"])
    assert finished == [1] and wandb.run is None


def test_few_shot_retraining_saves_the_retrained_network_that_was_selected(tmp_path, capsys):
    main(["evolve", "-c", _write(tmp_path), "--generations", "1", "--base.epochs", "1", "--evaluation.cache", "false",
          "--evaluation.retrain_steps", "3", "--retraining.images_per_class", "2"])
    summary = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    assert summary["retrained"] is True
    # best.ckpt holds the fine-tuned weights the evaluator scored, not the merely masked base
    assert summary["best"]["val/acc"] == pytest.approx(summary["best"]["accuracy/selection"], abs=1e-6)


def test_width_genomes_give_a_structurally_smaller_best_checkpoint(tmp_path, capsys):
    main(["evolve", "-c", _write(tmp_path), "--generations", "2", "--base.epochs", "1",
          "--genotype", "growprune.evolution.WidthGenotype", "--search.init_args.mutation", "perturb",
          "--search.init_args.mutation_rate", "0.1"])
    summary_path = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    best = json.loads(summary_path.read_text())["best"]
    run = summary_path.parent
    main(["validate", "-c", str(run / "validate.yaml"), "--ckpt_path", str(run / "best.ckpt"),
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    report = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    # channels were removed (RemoveChannels replayed on load), not masked: every parameter counts
    assert report["params/total"] == report["params/nonzero"] == best["params/nonzero"] == best["size"]
    assert report["params/total"] < report["params/original"]
    assert report["val/acc"] == pytest.approx(best["val/acc"], abs=1e-6)


def test_ray_engine_gives_the_local_engines_run(tmp_path, monkeypatch, capsys):
    """The issue's promise: Ray (a local session, ``ray.init(num_cpus=2)``) and the default local
    engine give the same generations and the same best network for the same seed."""
    pytest.importorskip("ray")
    config = _write(tmp_path)
    monkeypatch.chdir(tmp_path)
    main(["evolve", "-c", config, "--root", "local"])
    main(["evolve", "-c", config, "--root", "ray", "--engine", "ray", "--engine_options", "{num_cpus: 2}"])
    local, distributed = (tmp_path / root / "tiny" / "version_0" for root in ("local", "ray"))

    def rows(run: Path) -> list[dict[str, str]]:
        # multiply-adds are cost accounting: the in-process evaluator keeps its activation cache
        # across generations, Ray workers start with an empty one; the results must be identical
        costs = {"wall_seconds", "macs", "macs_total"}
        return [{k: v for k, v in row.items() if k not in costs}
                for row in csv.DictReader((run / "generations.csv").open())]

    assert rows(distributed) == rows(local)
    ours, theirs = (json.loads((run / "summary.json").read_text()) for run in (distributed, local))
    assert ours["engine"] == "ray" and theirs["engine"] == "local"
    for key in ("best", "evaluations", "macs_full"):
        assert ours[key] == theirs[key], key


def test_summary_line_names_a_root_outside_the_working_directory_absolutely(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    main(["evolve", "-c", _write(tmp_path), "--generations", "1", "--root", str(elsewhere)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"summary: {(elsewhere / 'tiny' / 'version_0' / 'summary.json').resolve()}"
