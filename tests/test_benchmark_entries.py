"""One benchmark grid entry: its run, its record, the same-size width and the data description.

Real (tiny) runs in-process on the scikit-learn digits: LeNet-300-100 at a quarter of its width
for 2 epochs, pruned once to a quarter of its weights; the evolve entry copies the smallest
settings of tests/test_evolve_cli.py; the qd entry (slow) runs two MAP-Elites iterations.
"""

from __future__ import annotations

import json
import math
import struct
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from growprune.benchmark.entries import (
    EVOLVE_FIELDS,
    FIT_FIELDS,
    QD_FIELDS,
    data_source,
    run_entry,
    same_size_width,
)
from growprune.benchmark.suite import Entry
from growprune.data import DigitsDataModule, IdxDataModule, MNISTDataModule, SyntheticDataModule
from growprune.models import create_model
from growprune.module import GrowPruneModule

DIGITS = {"class_path": "growprune.data.DigitsDataModule", "init_args": {"batch_size": 64, "seed": 0}}
PRUNE_TO_A_QUARTER = {  # global magnitude pruning to 1/4 of the prunable weights, at the first epoch
    "class_path": "growprune.strategies.UnstructuredPruning",
    "init_args": {"name": "magnitude", "scope": "global",
                  "schedule": {"class_path": "growprune.schedules.OneShot", "init_args": {"amount": 0.75, "at": 0}},
                  "criterion": {"class_path": "growprune.criteria.MagnitudeCriterion"}},
}


def _fit_config(**model: object) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [PRUNE_TO_A_QUARTER]},
        "model": {"arch": "lenet_300_100", "arch_kwargs": {"width": 0.25},
                  "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}, **model},
        "data": DIGITS,
    }


def _entry(config: dict, command: str = "fit", method: str = "magnitude_global", target: float | None = 4.0,
           baseline: str | None = "global_magnitude") -> Entry:
    return Entry(suite="tiny", command=command, model="lenet300", data="digits", method=method, target=target,
                 seed=0, baseline=baseline, config=config, wandb={"project": "growprune-tests"})


def _params(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _wandb_run():
    import wandb

    return wandb.run


# ------------------------------------------------------------------------------------- models
@pytest.mark.parametrize(("arch", "params"), [("lenet_300_100", 266_610), ("lenet5", 431_080)])
def test_lenet_width_default_builds_the_original_network(arch, params):
    default, explicit = create_model(arch), create_model(arch, width=1.0)
    assert _params(default) == _params(explicit) == params
    assert [tuple(p.shape) for p in default.parameters()] == [tuple(p.shape) for p in explicit.parameters()]
    half = create_model(arch, width=0.5)
    hidden = [module for module in half.modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    sizes = [getattr(module, "out_features", None) or module.out_channels for module in hidden]
    assert sizes == ([150, 50, 10] if arch == "lenet_300_100" else [10, 25, 250, 10])
    tiny = [module for module in create_model(arch, width=1e-6).modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    assert [getattr(module, "out_features", None) or module.out_channels for module in tiny] == [1] * (len(tiny) - 1) + [10]


@pytest.mark.parametrize("width", [0, -0.5, math.nan, math.inf, True, "half"])
def test_lenet_width_must_be_a_positive_number(width):
    for arch in ("lenet_300_100", "lenet5"):
        with pytest.raises(ValueError, match=f"{arch} width must be a finite number > 0"):
            create_model(arch, width=width)


# ---------------------------------------------------------------------------------- same size
@pytest.mark.parametrize(("arch", "shape"), [("lenet_300_100", (1, 28, 28)), ("lenet5", (1, 28, 28)),
                                             ("vgg11_bn", (3, 32, 32))])
def test_same_size_width_gives_a_quarter_of_the_parameters(arch, shape):
    width = same_size_width({"arch": arch}, 10, shape, 4.0)
    image = {"image_size": shape[1:]} if arch.startswith("lenet") else {}
    original = _params(create_model(arch, num_classes=10, in_channels=shape[0], **image))
    small = _params(create_model(arch, num_classes=10, in_channels=shape[0], width=width, **image))
    assert 0 < width < 1
    assert abs(small - original / 4) <= 0.05 * original / 4, (small, original / 4)


def test_same_size_width_ignores_the_placeholder_and_keeps_other_arguments():
    with_placeholder = same_size_width({"arch": "vgg11", "arch_kwargs": {"width": "${width}"}}, 10, (3, 32, 32), 8)
    assert with_placeholder == same_size_width({"arch": "vgg11"}, 10, (3, 32, 32), 8)


def test_same_size_width_needs_a_builder_with_width():
    with pytest.raises(ValueError, match=r"model 'resnet18' has no width argument.*models with one: .*lenet5"):
        same_size_width({"arch": "resnet18"}, 10, (3, 32, 32), 4.0)
    with pytest.raises(ValueError, match="target must be a finite number > 0"):
        same_size_width({"arch": "lenet5"}, 10, (1, 28, 28), 0)


# -------------------------------------------------------------------------------- data source
def _idx_files(folder: Path, count: int = 100) -> tuple[Path, Path]:
    images, labels = folder / "t10k-images-idx3-ubyte", folder / "t10k-labels-idx1-ubyte"
    images.write_bytes(struct.pack(">IIII", 0x803, count, 4, 4) + bytes(range(16)) * count)
    labels.write_bytes(struct.pack(">II", 0x801, count) + bytes(index % 10 for index in range(count)))
    return images, labels


def test_data_source_describes_each_kind_of_data(tmp_path):
    images, labels = _idx_files(tmp_path)
    assert data_source(IdxDataModule(str(images), str(labels))) == "MNIST idx t10k (80/20)"
    assert data_source(IdxDataModule(str(images), str(labels), test_fraction=0.1)) == "MNIST idx t10k (70/20/10)"
    assert data_source(MNISTDataModule(root=str(tmp_path))) == "torchvision MNIST"
    assert data_source(DigitsDataModule()) == "sklearn digits"
    assert data_source(SyntheticDataModule()) == "SyntheticDataModule"
    # a fit config's data section, as suites give it
    assert data_source(DIGITS) == "sklearn digits"
    assert data_source({"class_path": "growprune.data.IdxDataModule",
                        "init_args": {"images": str(images), "labels": str(labels)}}) == "MNIST idx t10k (80/20)"


# ------------------------------------------------------------------------------------- entries
def test_unknown_command_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"unknown command 'train'; valid commands: fit, evolve, qd, latency") as raised:
        run_entry(_entry(_fit_config(), command="train"), tmp_path / "entry")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "entry").exists()


def test_fit_entry_record_is_the_final_epoch_of_the_saved_run(tmp_path):
    entry_dir = tmp_path / "entry"
    record = run_entry(_entry(_fit_config()), entry_dir)
    assert set(FIT_FIELDS) <= set(record), set(FIT_FIELDS) - set(record)
    json.dumps(record, allow_nan=False)  # plain JSON
    assert record["accuracy_split"] == "test" and record["epochs"] == 2 and record["width"] is None
    assert record["data_source"] == "sklearn digits" and record["throughput_batch"] == 64
    assert record["throughput_per_s"] > 0 and record["latency_batch1_ms"] > 0 and record["wall_seconds"] > 0
    # training throughput: 2 epochs over the digits' training split, within the fit's own time
    train_size = len(DigitsDataModule(batch_size=64, seed=0).build_datasets()[0])
    assert record["device"] == "cpu" and record["precision"] == "32-true"
    assert 0 < record["train_seconds"] < record["wall_seconds"]
    assert record["train_samples_per_s"] == pytest.approx(2 * train_size / record["train_seconds"])

    # accuracy: the saved final checkpoint, evaluated here on the test split
    checkpoint = Path(record["checkpoint"])
    assert checkpoint.is_file() and entry_dir in checkpoint.parents
    module = GrowPruneModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("test")
    inputs, targets = data.test_set.tensors
    with torch.no_grad():
        accuracy = (module.model(inputs).argmax(dim=1) == targets).float().mean().item()
    assert record["accuracy"] == pytest.approx(accuracy, abs=1e-6)

    # compression: parameters of the network as built / nonzero parameters of the checkpoint
    original = _params(create_model("lenet_300_100", num_classes=10, in_channels=1, image_size=(8, 8), width=0.25))
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    nonzero = sum(int(torch.count_nonzero(value)) for name, value in weights.items() if name.startswith("model."))
    assert record["params_original"] == record["params_total"] == original
    assert record["params_nonzero"] == nonzero
    assert record["compression"] == pytest.approx(original / nonzero)
    assert 3.5 < record["compression"] < 4  # the weights lost 3/4, the biases none
    assert record["speedup"] == pytest.approx(record["flops_original"] / record["flops_effective"])
    assert record["speedup"] > 2 and record["flops_reduction"] == pytest.approx(1.0)

    # config.yaml: outputs under the entry, W&B run grouped by suite; the CLI parser takes it
    written = yaml.safe_load((entry_dir / "config.yaml").read_text())
    wandb_args = written["trainer"]["logger"][1]["init_args"]
    assert (wandb_args["group"], wandb_args["name"], wandb_args["job_type"]) == (
        "tiny", "magnitude_global/lenet300/digits/t4.0/s0", "magnitude_global")
    assert wandb_args["project"] == "growprune-tests" and wandb_args["mode"] == "disabled"
    from growprune.cli import GrowPruneCLI

    with pytest.raises(SystemExit) as raised:
        GrowPruneCLI(args=["fit", "-c", str(entry_dir / "config.yaml"), "--print_config"])
    assert raised.value.code == 0
    assert _wandb_run() is None


def test_dense_same_size_entry_resolves_width_to_a_quarter_of_the_parameters(tmp_path):
    config = _fit_config(arch_kwargs={"width": "${width}"})
    config["trainer"].update(max_epochs=1, callbacks=[])
    config["data"] = {"class_path": "growprune.data.DigitsDataModule", "init_args": {"seed": 0, "test_fraction": 0.0}}
    record = run_entry(_entry(config, method="small_dense", baseline="dense_same_size"), tmp_path / "entry")
    full = _params(create_model("lenet_300_100", num_classes=10, in_channels=1, image_size=(8, 8)))
    assert 0 < record["width"] < 1
    assert abs(record["params_total"] - full / 4) <= 0.05 * full / 4
    assert record["params_nonzero"] == record["params_total"]  # dense
    # compared with the full-width network, like the pruned methods
    assert record["params_original"] == full and record["compression"] == pytest.approx(full / record["params_total"])
    written = yaml.safe_load((tmp_path / "entry" / "config.yaml").read_text())
    assert written["model"]["arch_kwargs"]["width"] == record["width"]
    # no test split of its own: the final epoch's validation accuracy
    assert record["accuracy_split"] == "val" and record["accuracy"] == record["val_accuracy"]


def test_evolve_entry_maps_the_best_network(tmp_path):
    config = yaml.safe_load(textwrap.dedent("""
        seed: 0
        generations: 2
        model:
          arch: lenet_300_100
          optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9}}
        data: {class_path: growprune.data.DigitsDataModule, init_args: {batch_size: 64, seed: 0}}
        base: {epochs: 2}
        genotype: {class_path: growprune.evolution.MaskGenotype}
        objective: {class_path: growprune.evolution.SmallestAboveFloor, init_args: {floor: 0.5}}
        search: {class_path: growprune.evolution.GeneticSearch, init_args: {population: 6, elite: 1, mutation_rate: 0.02}}
        evaluation: {method: full}
        chunks: 2
    """))
    entry_dir = tmp_path / "entry"
    record = run_entry(_entry(config, command="evolve", method="ga", target=None, baseline=None), entry_dir)
    assert set(EVOLVE_FIELDS) <= set(record), set(EVOLVE_FIELDS) - set(record)
    summary_path = Path(record["summary"])
    assert summary_path.parent.parent.parent == entry_dir / "runs"
    summary = json.loads(summary_path.read_text())
    best = summary["best"]
    assert record["accuracy"] == best["test/acc"] and record["accuracy_split"] == "test"
    assert record["val_accuracy"] == best["val/acc"]
    assert record["params_nonzero"] == best["params/nonzero"]
    assert record["compression"] == pytest.approx(best["compression"])
    assert record["flops_effective"] == pytest.approx(best["flops/effective"])
    assert record["evaluations"] == summary["evaluations"] > 0
    assert record["data_source"] == "sklearn digits" and Path(record["checkpoint"]).is_file()
    assert _wandb_run() is None


@pytest.mark.slow  # a few seconds more than the rest: base network, two MAP-Elites iterations, the best elite
def test_qd_entry_maps_the_archive_and_its_best_elite(tmp_path):
    config = {
        "seed": 0, "iterations": 2, "descriptors": ["density"],
        "task": {"class_path": "growprune.qd.SupervisedMaskTask",
                 "init_args": {"model": "lenet_300_100", "model_options": {"width": 0.25}, "data": DIGITS,
                               "base_epochs": 1}},
        "archive": {"type": "grid", "dims": [10], "ranges": [[0.0, 1.0]]},
        "emitters": [{"class_path": "growprune.qd.MaskMutationEmitter", "init_args": {"batch_size": 4}, "count": 1}],
    }
    record = run_entry(_entry(config, command="qd", method="map_elites", target=None, baseline=None), tmp_path / "entry")
    assert set(QD_FIELDS) <= set(record), set(QD_FIELDS) - set(record)
    summary = json.loads(Path(record["summary"]).read_text())
    for field in ("coverage", "qd_score", "num_elites", "evaluations"):
        assert record[field] == summary[field], field
    assert record["evaluations"] == 8 and record["best_objective"] == summary["best"]["objective"]
    # supervised task: the best elite's (validation) accuracy and size
    assert record["accuracy"] == record["best_objective"] and record["accuracy_split"] == "val"
    module = GrowPruneModule.load_from_checkpoint(record["checkpoint"], map_location="cpu", weights_only=True)
    nonzero = sum(int(torch.count_nonzero(parameter)) for parameter in module.model.parameters())
    assert record["params_nonzero"] == nonzero and record["compression"] == pytest.approx(record["params_original"] / nonzero)


def test_latency_entry_is_delegated(tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("growprune.benchmark.latency")
    fake.run_latency_entry = lambda entry, entry_dir: calls.append((entry, entry_dir)) or {"speedup_b1": 2.0}
    monkeypatch.setitem(sys.modules, "growprune.benchmark.latency", fake)
    entry = _entry({"model": {"name": "lenet5"}}, command="latency", method="structured", baseline=None)
    record = run_entry(entry, tmp_path / "entry")
    assert calls == [(entry, (tmp_path / "entry").resolve())]
    assert record["speedup_b1"] == 2.0 and record["wall_seconds"] >= 0


def test_width_placeholder_only_for_fit(tmp_path):
    entry = _entry({"task": {"init_args": {"model_options": {"width": "${width}"}}}}, command="qd", baseline=None)
    with pytest.raises(ValueError, match=r"\$\{width\} is only resolved for command fit, not qd"):
        run_entry(entry, tmp_path / "entry")
    assert not (tmp_path / "entry").exists()


def test_failing_entries_raise_and_leave_no_open_wandb_run(tmp_path, monkeypatch):
    config = _fit_config(arch="no_such_net")
    with pytest.raises(Exception, match="no_such_net"):
        run_entry(_entry(config), tmp_path / "bad-arch")
    assert _wandb_run() is None
    # a failure after the W&B run started (SGD refuses the learning rate when training begins)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = _fit_config(optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": -1.0}})
    with pytest.raises(ValueError, match="Invalid learning rate"):
        run_entry(_entry(config), tmp_path / "bad-lr", wandb_mode="offline")
    assert list((tmp_path / "bad-lr" / "wandb").glob("offline-run-*")), "the W&B run had not started"
    assert _wandb_run() is None
