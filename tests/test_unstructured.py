import functools
import json
import textwrap
from pathlib import Path

import pytest
import torch

from growprune import GrowPruneModule
from growprune.cli import main
from growprune.criteria import GradientCriterion, RandomCriterion, WeightCriterion
from growprune.schedules import Constant, OneShot, Steps
from growprune.strategies import UnstructuredPruning
from growprune.surgery import export_model, load_exported_state_dict, make_permanent
from tests.helpers import StopAfter, tiny_data, tiny_trainer

WEIGHTS = ("1.weight", "3.weight", "5.weight")


def lenet(optimizer=None, mask_gradients=False):
    optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    return GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8), optimizer=optimizer,
                           mask_gradients=mask_gradients)


def weight_sparsity(module, name):
    weight = module.model.get_parameter(name)
    return float((weight == 0).sum()) / weight.numel()


@pytest.mark.parametrize(
    "optimizer",
    [
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
        functools.partial(torch.optim.Adam, lr=1e-2, weight_decay=1e-3),
        functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adam-wd", "adamw"],
)
@pytest.mark.parametrize("mask_gradients", [False, True], ids=["weights-only", "gradients-too"])
def test_pruned_weights_stay_exactly_zero_for_50_steps(tmp_path, optimizer, mask_gradients):
    from lightning.pytorch.callbacks import Callback

    module = lenet(optimizer, mask_gradients)
    initial = {name: module.model.get_parameter(name).detach().clone() for name in WEIGHTS}
    strategy = UnstructuredPruning(OneShot(amount=0.8, at=1), scope="global")

    class Watch(Callback):
        """After the strategy: the weights right after pruning; then every step's pruned weights."""

        at_pruning: dict = {}
        checked_steps = 0

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                Watch.at_pruning = {n: pl_module.model.get_parameter(n).detach().clone() for n in WEIGHTS}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.masks:
                for n in WEIGHTS:
                    assert torch.all(pl_module.model.get_parameter(n)[pl_module.masks[n] == 0] == 0), (n, trainer.global_step)
                Watch.checked_steps += 1

    # 5 batches per epoch x 12 epochs = 60 steps, 55 of them after pruning
    trainer = tiny_trainer(tmp_path, max_epochs=12, callbacks=[strategy, Watch()])
    trainer.fit(module, tiny_data())
    assert trainer.global_step - 5 >= 50
    assert Watch.checked_steps == trainer.global_step - 5  # pruned weights were exactly zero after EVERY step
    for name in WEIGHTS:
        weight = module.model.get_parameter(name).detach()
        mask = module.masks[name]
        assert torch.all(weight[mask == 0] == 0), name
        assert torch.all(Watch.at_pruning[name][mask == 0] == 0), name  # zeroed at the pruning step itself
        # the surviving weights did train: every one of them moved since initialisation and since pruning
        # (weight decay alone moves each nonzero weight), and none was zeroed
        survivors = mask == 1
        assert torch.all(weight[survivors] != initial[name][survivors]), name
        assert torch.all(weight[survivors] != Watch.at_pruning[name][survivors]), name
        assert torch.count_nonzero(weight[survivors]) == int(mask.sum())
        # and by more than rounding: the survivors' mean absolute update is a sizeable share of their size
        update = (weight[survivors] - Watch.at_pruning[name][survivors]).abs().mean()
        assert update > 0.01 * Watch.at_pruning[name][survivors].abs().mean(), (name, float(update))
    total_pruned = sum(int((module.masks[n] == 0).sum()) for n in WEIGHTS)
    assert total_pruned / sum(module.masks[n].numel() for n in WEIGHTS) == pytest.approx(0.8, abs=1e-4)
    if not mask_gradients:
        return
    # with gradient masking, momentum / Adam moments of pruned weights stay zero throughout
    for name in WEIGHTS:
        state = trainer.optimizers[0].state[module.model.get_parameter(name)]
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == module.masks[name].shape:
                assert torch.all(value[module.masks[name] == 0] == 0)


def test_layer_scope_prunes_each_layer_to_target_and_global_ranks_across_layers(tmp_path):
    layer_module, global_module = lenet(), lenet()
    global_module.model.load_state_dict(layer_module.model.state_dict())
    for module, scope in ((layer_module, "layer"), (global_module, "global")):
        trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[UnstructuredPruning(OneShot(amount=0.7, at=0), scope=scope)])
        trainer.fit(module, tiny_data())
    for name in WEIGHTS:
        assert weight_sparsity(layer_module, name) == pytest.approx(0.7, abs=0.01)
    per_layer = [weight_sparsity(global_module, name) for name in WEIGHTS]
    assert max(per_layer) - min(per_layer) > 0.05  # one global threshold: layers differ
    record = global_module.edit_log[-1]
    assert record["achieved"] == pytest.approx(0.7, abs=1e-4)
    assert set(record["per_layer"]) == {"1", "3", "5"}


def test_targets_are_relative_to_original_size_and_masks_monotone(tmp_path):
    module = lenet()
    strategy = UnstructuredPruning(Constant(amount=0.5, start=0, end=2))
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[strategy])
    trainer.fit(module, tiny_data())
    assert [round(r["achieved"], 3) for r in module.edit_log] == [0.5, 0.5, 0.5]
    assert weight_sparsity(module, "1.weight") == pytest.approx(0.5, abs=0.01)


def test_step_unit_schedule_acts_at_optimizer_steps(tmp_path):
    module = lenet()
    strategy = UnstructuredPruning(Steps(steps=[3, 8], amounts=[0.3, 0.6], unit="step"))
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[strategy])
    trainer.fit(module, tiny_data())
    assert [(r["time"], r["unit"]) for r in module.edit_log] == [(3, "step"), (8, "step")]
    assert module.edit_log[-1]["achieved"] == pytest.approx(0.6, abs=1e-3)


def test_skip_layers_and_first_last(tmp_path):
    module = lenet()
    strategy = UnstructuredPruning(OneShot(amount=0.5), skip_first_and_last=True)
    tiny_trainer(tmp_path, callbacks=[strategy]).fit(module, tiny_data())
    assert set(module.masks) == {"3.weight"}
    module = lenet()
    strategy = UnstructuredPruning(OneShot(amount=0.5), skip=["5"])
    tiny_trainer(tmp_path, callbacks=[strategy]).fit(module, tiny_data())
    assert set(module.masks) == {"1.weight", "3.weight"}


def test_random_criterion_is_reproducible():
    layers = {"a": torch.nn.Linear(4, 4)}
    first = RandomCriterion(seed=3).score(None, layers)["a"]
    second = RandomCriterion(seed=3).score(None, layers)["a"]
    assert torch.equal(first, second)
    assert not torch.equal(first, RandomCriterion(seed=4).score(None, layers)["a"])


def test_gradient_criterion_is_weight_times_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    inputs, targets = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    scores = GradientCriterion().score(model, {"0": model[0]}, [(inputs, targets)])["0"]
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    (gradient,) = torch.autograd.grad(loss, [model[0].weight])
    assert torch.allclose(scores, (model[0].weight * gradient).abs())
    assert model[0].weight.grad is None  # scoring left no gradient behind
    with pytest.raises(ValueError, match="needs training batches"):
        GradientCriterion().score(model, {"0": model[0]}, [])


def test_gradient_criterion_collects_batches_during_training(tmp_path):
    module = lenet()
    strategy = UnstructuredPruning(OneShot(amount=0.5, at=1), criterion=GradientCriterion(), scoring_batches=2)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[strategy]).fit(module, tiny_data())
    assert module.edit_log[0]["achieved"] == pytest.approx(0.5, abs=1e-3)


def test_lottery_rewind_resets_survivors_to_initial_weights_without_aliasing(tmp_path):
    module = lenet()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    strategy = UnstructuredPruning(OneShot(amount=0.5, at=2), rewind_epoch=0)
    # rewind at epoch 2 start; stop right after so the rewound weights are observable
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=8, callbacks=[strategy])

    observed = {}

    class Observe(torch.nn.Module):
        pass

    from lightning.pytorch.callbacks import Callback

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                observed.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    trainer.callbacks.append(Snapshot())  # runs after the strategy
    trainer.fit(module, tiny_data())
    for name in WEIGHTS:
        mask = module.masks[name]
        assert torch.equal(observed[name], initial[name] * mask)
    # the stored snapshot is the initial weights, untouched by training (no aliasing)
    for name, value in strategy.rewind_state.items():
        assert torch.equal(value, initial[name])
    assert not torch.equal(module.model.state_dict()["1.weight"], initial["1.weight"] * module.masks["1.weight"])
    assert module.edit_log[0]["rewound_to_epoch"] == 0


def test_resume_keeps_masks_and_does_not_repeat_actions(tmp_path):
    module = lenet()
    strategy = UnstructuredPruning(Steps(steps=[1, 3], amounts=[0.5, 0.8]))
    # a 4-epoch run interrupted after 2 epochs (a run of max_epochs=2 would be refused: its schedule cannot finish)
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[strategy, StopAfter(2)], enable_checkpointing=True)
    trainer.fit(module, tiny_data())
    checkpoint = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["callbacks"]

    resumed_module = lenet()
    resumed_strategy = UnstructuredPruning(Steps(steps=[1, 3], amounts=[0.5, 0.8]))
    resumed = tiny_trainer(tmp_path, max_epochs=4, callbacks=[resumed_strategy])
    resumed.fit(resumed_module, tiny_data(), ckpt_path=checkpoint)
    assert [r["time"] for r in resumed_module.edit_log] == [1, 3]
    assert resumed_module.edit_log[-1]["achieved"] == pytest.approx(0.8, abs=1e-3)
    first_mask = module.masks["1.weight"]
    # everything pruned before the checkpoint is still pruned
    assert torch.all(resumed_module.masks["1.weight"][first_mask == 0] == 0)


def test_export_dense_and_sparse(tmp_path):
    module = lenet()
    tiny_trainer(tmp_path, callbacks=[UnstructuredPruning(OneShot(amount=0.9))]).fit(module, tiny_data())
    dense_path = export_model(module, tmp_path / "dense.pt")
    sparse_path = export_model(module, tmp_path / "sparse.pt", sparse=True)
    dense, sparse = load_exported_state_dict(dense_path), load_exported_state_dict(sparse_path)
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(dense[name], tensor) and torch.equal(sparse[name], tensor)
    assert sparse_path.stat().st_size < dense_path.stat().st_size
    with pytest.raises(FileExistsError):
        export_model(module, dense_path)
    make_permanent(module)
    assert module.masks == {}
    assert weight_sparsity(module, "1.weight") == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: UnstructuredPruning(OneShot(amount=1.0)), r"\[0, 1\)"),
        (lambda: UnstructuredPruning(Steps(steps=[1, 2], amounts=[0.5, 1.2])), r"\[0, 1\)"),
        (lambda: UnstructuredPruning(OneShot(amount=0.5), scope="row"), "scope"),
        (lambda: UnstructuredPruning(OneShot(amount=0.5), criterion=GradientCriterion(), scoring_batches=0), "needs training data"),
        (lambda: UnstructuredPruning(OneShot(amount=0.5, at=1), rewind_epoch=3), "rewind_epoch"),
    ],
)
def test_bad_configuration_fails_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_layer_fails_before_training(tmp_path):
    module = lenet()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tiny_trainer(tmp_path, callbacks=[UnstructuredPruning(OneShot(amount=0.5), layers=["classifier"])])
    with pytest.raises(ValueError, match="no prunable layer matches 'classifier'; layers: 1, 3, 5"):
        trainer.fit(module, tiny_data())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_two_strategies_in_one_run_need_distinct_names(tmp_path):
    from growprune.strategies import StructuredPruning

    # Different types, one name: Lightning's state keys (class + name) differ, so only growprune's
    # own check in Strategy.setup stands between them and one metric/edit-log prefix for both.
    first = UnstructuredPruning(OneShot(amount=0.5), layers=["1"], name="prune")
    second = StructuredPruning(OneShot(amount=0.5), name="prune")
    assert first.state_key != second.state_key
    module = lenet()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tiny_trainer(tmp_path, callbacks=[first, second])
    with pytest.raises(ValueError, match=r"two strategies are named 'prune'.*: give each its own name="):
        trainer.fit(module, tiny_data())
    assert trainer.global_step == 0 and module.edit_log == [] and module.masks == {}
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    # with distinct names two strategies run side by side, each with its own edit-log entries
    first = UnstructuredPruning(OneShot(amount=0.5), layers=["1"], name="prune")
    other = UnstructuredPruning(OneShot(amount=0.5), layers=["3"], name="second")
    module = lenet()
    tiny_trainer(tmp_path, callbacks=[first, other]).fit(module, tiny_data())
    assert [record["strategy"] for record in module.edit_log] == ["prune", "second"]
    assert set(module.masks) == {"1.weight", "3.weight"}


def test_strategy_logs_what_it_did(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = lenet()
    logger = CSVLogger(tmp_path, name="log")
    strategy = UnstructuredPruning(OneShot(amount=0.6), name="mag")
    tiny_trainer(tmp_path, logger=logger, callbacks=[strategy]).fit(module, tiny_data())
    header = Path(logger.log_dir, "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("mag/target", "mag/achieved", "mag/per_layer/1", "mag/params/nonzero", "mag/flops/effective", "mag/compression"):
        assert key in header, key


class InverseMagnitude(WeightCriterion):
    """A user criterion for the class_path test: prunes the LARGEST weights."""

    def score_layer(self, name, layer):
        return -layer.weight.detach().abs()


def test_user_criterion_plugs_in_by_class_path_from_yaml(tmp_path, capsys, monkeypatch):
    (tmp_path / "user_criteria.py").write_text(
        textwrap.dedent(
            """
            from growprune.criteria import WeightCriterion

            class InverseMagnitude(WeightCriterion):
                def score_layer(self, name, layer):
                    return -layer.weight.detach().abs()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "prune.yaml"
    config.write_text(
        textwrap.dedent(
            """
            trainer:
              max_epochs: 2
              enable_progress_bar: false
              logger: false
              callbacks:
                - class_path: growprune.strategies.UnstructuredPruning
                  init_args:
                    schedule:
                      class_path: growprune.schedules.OneShot
                      init_args: {amount: 0.5, at: 1}
                    criterion:
                      class_path: user_criteria.InverseMagnitude
            data:
              class_path: growprune.data.SyntheticDataModule
              init_args: {num_samples: 128}
            """
        )
    )
    main(["fit", "-c", str(config)])
    summary = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    assert summary["compression"] > 1.5
    checkpoint = torch.load(summary["checkpoint"], weights_only=True)
    log = checkpoint["growprune"]["edit_log"]
    assert log[0]["criterion"].startswith("InverseMagnitude")
