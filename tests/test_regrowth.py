"""Prune-and-regrow at constant sparsity (RigL, SET): counts kept, regrown weights and their
optimizer state start at zero, growth by the dense gradient, distributions, sparse starts, bad input."""

import functools
import math
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from growprune import GrowPruneModule
from growprune.errors import ConfigurationError
from growprune.strategies import Regrowth
from growprune.strategies.regrowth import erk_densities
from tests.helpers import tiny_data, tiny_trainer

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("1", "3", "5")  # LeNet-300-100's linear layers (64 -> 300 -> 100 -> 4 here)


def lenet(optimizer=None, mask_gradients=False):
    optimizer = optimizer or functools.partial(torch.optim.Adam, lr=1e-2)
    return GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8), optimizer=optimizer,
                           mask_gradients=mask_gradients)


def masks_of(module):
    return {name: module.masks[f"{name}.weight"].bool().clone() for name in LAYERS}


class Before(pl.Callback):
    """Put before the strategy: remembers the masks and optimizer state just before each update."""

    def __init__(self):
        self.masks = None
        self.state = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks = masks_of(pl_module) if pl_module.masks else None
        optimizer = trainer.optimizers[0]
        self.state = {name: {key: value.clone() for key, value in optimizer.state.get(
            pl_module.model.get_submodule(name).weight, {}).items() if torch.is_tensor(value) and value.dim() > 0}
            for name in LAYERS}


class After(pl.Callback):
    """Put after the strategy: checks each update right after it happened."""

    def __init__(self, before, strategy):
        self.before, self.strategy = before, strategy
        self.checked = 0
        self.had_state = 0
        self.counts = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        history = self.strategy.history
        if not history or history[-1]["time"] != trainer.global_step or history[-1]["action"] != "prune_regrow":
            if history and history[-1]["time"] == trainer.global_step:
                self.counts = {name: int(mask.sum()) for name, mask in masks_of(pl_module).items()}
            return
        now = masks_of(pl_module)
        optimizer = trainer.optimizers[0]
        regrown_total = 0
        for name in LAYERS:
            regrown = now[name] & ~self.before.masks[name]
            regrown_total += int(regrown.sum())
            weight = pl_module.model.get_submodule(name).weight
            assert int(now[name].sum()) == self.counts[name], "regrowth changed a layer's count of active weights"
            assert torch.all(weight[regrown] == 0), "regrown weights must start at zero"
            for key, value in optimizer.state[weight].items():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    assert torch.all(value[regrown] == 0), f"{key} of regrown weights must be zero"
                    self.had_state += int((self.before.state[name][key][regrown] != 0).sum())
        assert regrown_total == history[-1]["regrown"]
        self.checked += 1


def fit(tmp_path, module, strategy, epochs=2, probes=True, **trainer_kwargs):
    before = Before()
    after = After(before, strategy)
    callbacks = [before, strategy, after] if probes else [strategy]
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, tiny_data())
    return after


@pytest.mark.parametrize("optimizer", [
    functools.partial(torch.optim.Adam, lr=1e-2),
    functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
], ids=["adam", "sgd-momentum"])
@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_cycles_keep_counts_and_regrown_weights_start_at_zero_with_zero_state(tmp_path, optimizer, growth):
    module = lenet(optimizer)
    strategy = Regrowth(density=0.2, growth=growth, update_interval=3, distribution="uniform", verbose=False)
    after = fit(tmp_path, module, strategy, epochs=3)
    updates = [record for record in strategy.history if record["action"] == "prune_regrow"]
    assert strategy.history[0]["action"] == "prune_weights" and strategy.history[0]["time"] == 0
    assert after.checked >= 3 and sum(record["regrown"] for record in updates) > 0
    # without masked gradients the optimizer keeps history for masked weights: it was there, and was zeroed
    assert after.had_state > 0
    for record in updates:
        assert record["dropped"] == record["regrown"]
        assert record["density"] == pytest.approx(0.2, abs=2e-3)
        assert set(record["per_layer"]) == set(LAYERS)
        assert 0.0 <= record["drop_fraction"] <= 0.3
    assert "survival" not in updates[0] and all(0.0 <= record["survival"] <= 1.0 for record in updates[1:])
    # the drop fraction decays along a cosine from 0.3 (at the start step) to 0 at the stop step
    end = strategy.active_schedule.end
    for record in updates:
        assert record["drop_fraction"] == pytest.approx(0.15 * (1 + math.cos(math.pi * record["time"] / end)))
    for name in LAYERS:  # masked weights really are zero after training
        weight = module.model.get_submodule(name).weight
        assert torch.all(weight[~module.masks[f"{name}.weight"].bool()] == 0)


def test_rigl_regrows_the_largest_dense_gradients_even_with_masked_gradients(tmp_path):
    module = lenet(mask_gradients=True)  # the module zeroes masked gradients: the strategy must see them first
    strategy = Regrowth(density=0.1, update_interval=4, drop_fraction=0.5, decay="constant", distribution="uniform",
                        verbose=False)
    checks = []

    class Check(pl.Callback):
        gradients = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # callbacks run before the module's hook: the gradients here are still dense
            self.gradients = {n: pl_module.model.get_submodule(n).weight.grad.detach().clone() for n in LAYERS}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = masks_of(pl_module) if pl_module.masks else None

    class Verify(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record = strategy.history[-1] if strategy.history else None
            if record is None or record["time"] != trainer.global_step or record["action"] != "prune_regrow":
                return
            assert record["gradient"] == "last batch"
            now = masks_of(pl_module)
            for name in LAYERS:
                score = check.gradients[name].abs()
                regrown = now[name] & ~check.before[name]
                inactive = ~now[name]
                assert regrown.any()
                # the regrown weights are the inactive ones with the largest |dL/dw|, all of them nonzero
                assert score[regrown].min() > 0
                assert score[regrown].min() >= score[inactive].max()
            checks.append(record["time"])

    check = Check()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[check, strategy, Verify()])
    trainer.fit(module, tiny_data())
    assert len(checks) >= 2


def test_gradient_steps_regrow_by_the_mean_dense_gradient_of_the_last_batches(tmp_path):
    module = lenet(mask_gradients=True)
    strategy = Regrowth(density=0.1, update_interval=4, drop_fraction=0.5, decay="constant", distribution="uniform",
                        gradient_steps=3, verbose=False)
    checks = []

    class Check(pl.Callback):
        def __init__(self):
            self.gradients = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.gradients.append({n: pl_module.model.get_submodule(n).weight.grad.detach().clone() for n in LAYERS})

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = masks_of(pl_module) if pl_module.masks else None

    class Verify(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record = strategy.history[-1] if strategy.history else None
            if record is None or record["time"] != trainer.global_step or record["action"] != "prune_regrow":
                return
            # 3 batches before the first cycle; the stop step comes 2 batches after the one before it
            count = 3 if not checks else min(3, trainer.global_step - checks[-1])
            assert record["gradient"] == f"last {count} batches"
            now = masks_of(pl_module)
            last = check.gradients[-count:]
            for name in LAYERS:
                score = (sum(g[name] for g in last) / count).abs()
                regrown = now[name] & ~check.before[name]
                assert regrown.any()
                # ranked by the mean of the three batches' gradients, not by the last batch alone
                assert score[regrown].min() >= score[~now[name]].max()
            checks.append(record["time"])

    check = Check()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[check, strategy, Verify()])
    trainer.fit(module, tiny_data())
    assert len(checks) >= 2


def test_random_growth_is_seeded_and_constant_decay_keeps_alpha(tmp_path):
    runs = []
    for attempt in range(2):
        torch.manual_seed(0)
        module = lenet()
        strategy = Regrowth(density=0.2, growth="random", decay="constant", update_interval=4, seed=3, verbose=False)
        fit(tmp_path / str(attempt), module, strategy, epochs=1, probes=False)
        runs.append((masks_of(module), strategy.history))
    assert all(torch.equal(runs[0][0][name], runs[1][0][name]) for name in LAYERS)
    updates = [record for record in runs[0][1] if record["action"] == "prune_regrow" and record["regrown"]]
    assert updates and all(record["drop_fraction"] == 0.3 and "gradient" not in record for record in updates)


def test_erk_uniform_and_global_distributions():
    shapes = {"1": (300, 784), "3": (100, 300), "5": (10, 100)}
    densities = erk_densities(shapes, 0.01)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    assert sum(densities[n] * sizes[n] for n in shapes) == pytest.approx(0.01 * sum(sizes.values()))
    # proportional to (fan-in + fan-out) / weights: the small output layer keeps far more
    assert densities["5"] / densities["1"] == pytest.approx((110 / 1000) / (1084 / 235200))
    # a layer whose share would pass 1 is kept dense and the rest share what is left
    capped = erk_densities({"big": (1000, 1000), "tiny": (2, 2)}, 0.5)
    assert capped["tiny"] == 1.0 and capped["big"] == pytest.approx((0.5 * 1_000_004 - 4) / 1_000_000)

    module = lenet()
    weights = {name: module.model.get_submodule(name).weight for name in LAYERS}
    active = {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in weights.items()}
    total = sum(weight.numel() for weight in weights.values())
    for distribution in ("erk", "uniform", "global"):
        counts = Regrowth(density=0.05, distribution=distribution).layer_counts(weights, active)
        assert sum(counts.values()) == pytest.approx(0.05 * total, abs=3), distribution
        assert all(count >= 1 for count in counts.values())
    uniform = Regrowth(density=0.05, distribution="uniform").layer_counts(weights, active)
    assert uniform == {name: round(0.05 * weight.numel()) for name, weight in weights.items()}
    with torch.no_grad():
        weights["5"].mul_(100.0)  # global magnitude ranking: the scaled layer takes (nearly) all of it
    counts = Regrowth(density=0.05, distribution="global").layer_counts(weights, active)
    assert counts["5"] > 0.9 * weights["5"].numel() > 10 * uniform["5"]
    assert Regrowth(density=0.05).distribution == "erk"  # the documented default


def test_already_sparse_model_keeps_its_masks_and_starts_cycling(tmp_path):
    module = lenet()
    generator = torch.Generator().manual_seed(0)
    module.masks = {f"{name}.weight": (torch.rand(module.model.get_submodule(name).weight.shape, generator=generator)
                                       < 0.1).float() for name in LAYERS}
    counts = {name: int(mask.sum()) for name, mask in masks_of(module).items()}
    strategy = Regrowth(density=None, update_interval=3, verbose=False)
    fit(tmp_path, module, strategy, epochs=1, probes=False)
    assert strategy.history[0]["action"] == "prune_regrow" and strategy.history[0]["time"] == 0
    assert strategy.history[0]["gradient"] == "1 scoring batches"  # no training batch before step 0
    assert {name: int(mask.sum()) for name, mask in masks_of(module).items()} == counts


def test_drop_unused_moves_the_fan_in_of_units_without_fan_out(tmp_path):
    module = lenet()
    generator = torch.Generator().manual_seed(0)
    module.masks = {f"{name}.weight": (torch.rand(module.model.get_submodule(name).weight.shape, generator=generator)
                                       < 0.2).float() for name in LAYERS}
    module.masks["3.weight"][:, :10] = 0.0  # hidden units 0-9 of layer 1 reach nothing: their fan-in is unused
    with torch.no_grad():  # masked weights are zero, as after any pruning
        for name in LAYERS:
            module.model.get_submodule(name).weight.mul_(module.masks[f"{name}.weight"])
    stranded = module.masks["1.weight"][:10].bool().clone()
    counts = {name: int(mask.sum()) for name, mask in masks_of(module).items()}
    # alpha is 0 at a single update (start = stop): only the unused weights move
    strategy = Regrowth(density=None, drop_unused=True, start_step=0, stop_step=0, verbose=False)
    fit(tmp_path, module, strategy, epochs=1, probes=False)
    record = strategy.history[0]
    assert record["action"] == "prune_regrow" and record["drop_fraction"] == 0.0
    assert record["unused"] >= int(stranded.sum()) > 0
    assert record["regrown"] == record["dropped"] == record["unused"]
    now = masks_of(module)
    assert not (now["1"][:10] & stranded).any(), "the fan-in of units without fan-out must be dropped"
    assert {name: int(mask.sum()) for name, mask in now.items()} == counts


def test_density_none_on_a_dense_model_is_refused_before_anything_changes(tmp_path):
    module = lenet()
    state = {key: value.clone() for key, value in module.state_dict().items()}
    strategy = Regrowth(density=None, verbose=False)
    with pytest.raises(ConfigurationError, match=r"regrowth: density=None keeps the model's sparsity, but layer '1' has no mask"):
        fit(tmp_path, module, strategy, epochs=1, probes=False)
    assert not module.masks and all(torch.equal(state[key], value) for key, value in module.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    ({"density": 0.0}, r"density must lie in \(0, 1\), got 0.0"),
    ({"density": 1.0}, r"density must lie in \(0, 1\), got 1.0"),
    ({"density": -0.5}, r"density must lie in \(0, 1\), got -0.5"),
    ({"density": 0.1, "drop_fraction": 1.0}, r"drop_fraction must lie in \(0, 1\), got 1.0"),
    ({"density": 0.1, "drop_fraction": 0}, r"drop_fraction must lie in \(0, 1\), got 0"),
    ({"density": 0.1, "update_interval": 0}, "update_interval must be an integer >= 1, got 0"),
    ({"density": 0.1, "distribution": "erdos"}, "distribution must be one of 'erk', 'uniform', 'global', got 'erdos'"),
    ({"density": 0.1, "growth": "momentum"}, "growth must be one of 'gradient', 'random', got 'momentum'"),
    ({"density": 0.1, "decay": "linear"}, "decay must be one of 'cosine', 'constant', got 'linear'"),
    ({"density": 0.1, "start_step": 5, "stop_step": 2}, "stop_step must be an integer >= 5, got 2"),
    ({"density": 0.1, "stop_fraction": 0.0}, r"stop_fraction must lie in \(0, 1\], got 0.0"),
    ({"density": 0.1, "gradient_steps": 0}, "gradient_steps must be an integer >= 1, got 0"),
    ({"density": 0.1, "growth": "random", "drop_unused": True}, "drop_unused needs growth='gradient'"),
])
def test_bad_arguments_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        Regrowth(**kwargs)
    assert "\n" not in str(error.value)


def test_unknown_layer_is_refused_before_training(tmp_path):
    module = lenet()
    state = {key: value.clone() for key, value in module.state_dict().items()}
    strategy = Regrowth(density=0.1, layers=["fc9"], verbose=False)
    with pytest.raises(ConfigurationError, match=r"regrowth: no prunable layer matches 'fc9'; layers: 1, 3, 5") as error:
        fit(tmp_path, module, strategy, epochs=1, probes=False)
    assert "\n" not in str(error.value)
    assert not module.masks and all(torch.equal(state[key], value) for key, value in module.state_dict().items())


def test_digits_config_runs_and_logs_every_update(tmp_path, capsys, monkeypatch):
    from growprune.cli import main

    monkeypatch.chdir(REPO)
    short = tmp_path / "short.yaml"
    short.write_text(textwrap.dedent(f"""\
        trainer:
          max_epochs: 2
          default_root_dir: {tmp_path}
          logger:
            - class_path: lightning.pytorch.loggers.CSVLogger
              init_args: {{save_dir: {tmp_path}, name: rigl}}
        """))
    main(["fit", "-c", str(REPO / "configs" / "lenet300_rigl_digits.yaml"), "-c", str(short),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    capsys.readouterr()
    metrics = next(tmp_path.glob("rigl/*/metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    for column in ("rigl/drop_fraction", "rigl/regrown", "rigl/survival", "rigl/density", "rigl/per_layer/1"):
        assert any(name == column for name in header), column


def test_resume_continues_cycles_without_repeating_or_pruning_again(tmp_path):
    from tests.helpers import StopAfter

    def strategy():
        return Regrowth(density=0.2, update_interval=3, stop_step=15, distribution="uniform", verbose=False)

    module, first = lenet(), strategy()
    # a 4-epoch run (20 steps) interrupted after 2 epochs (10 steps)
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[first, StopAfter(2)], enable_checkpointing=True)
    trainer.fit(module, tiny_data())
    checkpoint = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["callbacks"]  # the strategy's state loads safely
    counts = {name: int(mask.sum()) for name, mask in masks_of(module).items()}

    resumed_module, resumed = lenet(), strategy()
    tiny_trainer(tmp_path, max_epochs=4, callbacks=[resumed]).fit(resumed_module, tiny_data(), ckpt_path=checkpoint)
    assert [record["time"] for record in resumed_module.edit_log] == [0, 3, 6, 9, 12, 15]
    after = [record for record in resumed.history if record["time"] > 9]
    assert [record["action"] for record in after] == ["prune_regrow", "prune_regrow"]
    assert "survival" in after[0]  # the regrown set of the update before the interruption came along
    assert {name: int(mask.sum()) for name, mask in masks_of(resumed_module).items()} == counts


def test_benchmark_table_compares_with_dense_and_refuses_mixed_settings():
    import argparse

    from benchmarks import records, regrowth_lenet

    env = {"threads": 1, "torch": "2.14.1", "lightning": "2.6.6", "torch_pruning": "1.6.1", "python": "3.11.7"}
    info = {"commit": "abc1234", "run": "r1", "date": "2026-01-01 00:00Z", "machine": "x86_64", "cpus": 2,
            "load_start": "0.1"}

    def row(method, seed, acc, epochs=40, **options):
        args = argparse.Namespace(epochs=epochs, density=0.01, distribution="erk", update_interval=100,
                                  drop_fraction=0.3, stop_fraction=0.75, start_epoch=0, **options)
        return {**regrowth_lenet.settings(method, seed, args, env), "val_acc": acc, "weights_left": 0.01,
                "compression": 90.0, "weight_compression": 100.0, "effective_flops": 1.0, "dense_flops": 100.0,
                "updates": 37, "regrown": 1000, "mean_survival": 0.5, "seconds": 30.0, **info}

    rows = [row("dense", 0, 0.97), row("dense", 1, 0.98), row("rigl", 0, 0.96), row("rigl", 1, 0.95)]
    table = regrowth_lenet.summarise(rows)
    rigl = next(line for line in table if line.startswith("| rigl |"))
    assert "| 95.50 ± 0.71 | -2.00 |" in rigl and "distribution=erk" in rigl and "| 0.50 |" in rigl
    with pytest.raises(records.SettingsMismatch, match="epochs"):
        regrowth_lenet.summarise(rows + [row("rigl", 2, 0.95, epochs=20)])


def test_benchmark_granet_prunes_gradually_then_regrows_at_the_same_steps():
    import argparse

    from benchmarks import regrowth_lenet
    from growprune.strategies import UnstructuredPruning

    args = argparse.Namespace(epochs=40, density=0.01, distribution="erk", update_interval=100, drop_fraction=0.3,
                              stop_fraction=0.75, start_epoch=8, prune_end_fraction=0.7, gradient_steps=10,
                              drop_unused=True)
    pruning, regrowth = regrowth_lenet.make_strategy("granet", args, seed=0)
    # the pruning callback comes first: at a shared step the gradual prune acts before the regrowth cycle
    assert isinstance(pruning, UnstructuredPruning) and isinstance(regrowth, Regrowth)
    assert (pruning.schedule.start, pruning.schedule.end, pruning.schedule.amount) == (2, 28, pytest.approx(0.99))
    assert regrowth.density is None and regrowth.update_interval == regrowth_lenet.STEPS_PER_EPOCH
    assert regrowth.schedule.start == 3 * regrowth_lenet.STEPS_PER_EPOCH
    assert regrowth.gradient_steps == 10 and regrowth.drop_unused
    params = regrowth_lenet.method_params("granet", args)
    assert params["gradient_steps"] == 10 and params["drop_unused"] is True
    # options at their defaults stay out of the recorded parameters (earlier rows keep their grouping)
    args.gradient_steps, args.drop_unused = 1, False
    assert "gradient_steps" not in regrowth_lenet.method_params("granet", args)
    assert "drop_unused" not in regrowth_lenet.method_params("granet", args)
