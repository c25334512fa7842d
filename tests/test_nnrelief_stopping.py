"""NNReliefPruning's paper protocol: prune until the validation metric falls more than ``stop_margin``
below the dense network (then restore the last network within it), with weights rewound to their
initial (or pre-trained) values after every pruning step, and both surviving a resume."""

import copy
import functools
import types

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from growprune import GrowPruneModule
from growprune.data import DigitsDataModule
from growprune.schedules import Constant
from growprune.strategies import NNReliefPruning
from growprune.triggers import Trigger
from tests.helpers import StopAfter, tiny_trainer

FAST = {"limit_train_batches": 6}  # 6 x 64 digits per epoch: enough to train, quick on one core


def lenet(scheduler: bool = False, script: dict[int, float] | None = None) -> GrowPruneModule:
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    lr_scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5) if scheduler else None
    module = ScriptedModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8), optimizer=optimizer,
                            lr_scheduler=lr_scheduler)
    module.script = dict(script or {})
    return module


def data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


def strategy(**kwargs) -> NNReliefPruning:
    options = {"every": 1, "iterations": 3, "pruning_samples": 200, "verbose": False}
    options.update(kwargs)
    return NNReliefPruning(**options)


def state_of(module: GrowPruneModule) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.model.state_dict().items()}


def masks_of(module: GrowPruneModule) -> dict[str, torch.Tensor]:
    return {name: mask.detach().clone() for name, mask in module.masks.items()}


def val_accuracy(module: GrowPruneModule, datamodule: DigitsDataModule) -> float:
    """The module's accuracy on the validation split, computed here, independently of Lightning."""
    correct = total = 0
    module.eval()
    with torch.no_grad():
        for inputs, targets in datamodule.val_dataloader():
            correct += int((module(inputs).argmax(dim=1) == targets).sum())
            total += int(targets.numel())
    return correct / total


class Snapshots(pl.Callback):
    """Placed before the strategy: the network at each epoch start, i.e. right before any pruning."""

    def __init__(self):
        self.at_start: dict[int, tuple[dict, dict]] = {}
        self.fit_start: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = state_of(pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_start[trainer.current_epoch] = (state_of(pl_module), masks_of(pl_module))


class ScriptedModule(GrowPruneModule):
    """Logs a scripted validation accuracy in the first validation of the given epochs (a forced
    drop), the real one otherwise (e.g. when the strategy validates a restored network again)."""

    script: dict[int, float] = {}

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self.script.pop(self.current_epoch, None)

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        logits = self(inputs)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        if not self.trainer.sanity_checking and self.current_epoch in self.script:
            accuracy = torch.tensor(self.script[self.current_epoch])
        self.log("val/loss", F.cross_entropy(logits, targets), batch_size=targets.shape[0])
        self.log("val/acc", accuracy, batch_size=targets.shape[0])


# ------------------------------------------------------------------------------ stop margin
def test_huge_margin_runs_to_the_iterations_cap(tmp_path):
    module, pruning, datamodule = lenet(), strategy(stop_margin=1.0), data()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[pruning], **FAST)
    trainer.fit(module, datamodule)
    records = pruning.prune_records
    assert [record["time"] for record in records] == [1, 2, 3]
    assert pruning.accepted_iterations == 3 and all(record["accepted"] is True for record in records)
    assert "training ended after 3 pruning steps" in pruning.stopped_reason
    assert trainer.current_epoch == 4 and not any(r["action"] == "nnrelief_restore" for r in module.edit_log)
    # the reference is the validation right before the first step; each step's retrained metric is
    # the metric the next step (or the end of training) saw
    assert records[0]["reference_metric"] == records[0]["metric_before"] == pruning.reference_metric
    assert [r["metric_retrained"] for r in records[:-1]] == [r["metric_before"] for r in records[1:]]
    assert records[-1]["metric_retrained"] == pytest.approx(float(trainer.callback_metrics["val/acc"]))
    compression = [record["compression"] for record in records]
    assert 1.0 < compression[0] < compression[1] < compression[2]
    weights = [module.masks[f"{layer}.weight"] for layer in ("1", "3", "5")]
    total = sum(mask.numel() for mask in weights)
    assert compression[-1] == pytest.approx(total / sum(int(mask.count_nonzero()) for mask in weights))


def test_drop_below_the_margin_restores_the_network_before_the_last_step(tmp_path):
    # epoch 0: the dense reference; epoch 1 (after step 1): equal, accepted; epoch 2 (after step 2): a drop
    module, pruning, datamodule = lenet(script={0: 0.9, 1: 0.9, 2: 0.2}), strategy(stop_margin=0.0, iterations=5), data()
    spy = Snapshots()
    trainer = tiny_trainer(tmp_path, max_epochs=6, callbacks=[spy, pruning], **FAST)
    trainer.fit(module, datamodule)
    assert [r["action"] for r in pruning.history] == ["nnrelief_prune", "nnrelief_prune", "nnrelief_restore"]
    assert [r["accepted"] for r in pruning.prune_records] == [True, False]
    assert pruning.accepted_iterations == 1
    assert pruning.stopped_reason.startswith("val/acc 0.2000 after pruning step 2 is more than stop_margin=0")
    restore = pruning.history[-1]
    assert (restore["time"], restore["restored_iteration"], restore["rejected_iteration"]) == (3, 1, 2)
    assert module.edit_log[-1] is restore or module.edit_log[-1] == restore
    # the network right before step 2 (epoch 2's start), weights and masks, value by value
    state, masks = spy.at_start[2]
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert masks.keys() == module.masks.keys()
    for name, mask in masks.items():
        assert torch.equal(module.masks[name], mask), name
    assert not torch.equal(module.masks["1.weight"], spy.at_start[3][1]["1.weight"])  # step 2 did prune more
    # training stopped in the epoch of the refused step, which trained nothing
    assert trainer.should_stop and trainer.current_epoch == 4 and 4 not in spy.at_start
    assert restore["achieved"] == pytest.approx(pruning.prune_records[0]["achieved"])
    # the last validation ran on the restored network
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(val_accuracy(module, datamodule), abs=1e-6)
    assert float(trainer.callback_metrics["compression"]) == pytest.approx(module.size_metrics()["compression"])


def test_drop_after_the_first_step_restores_the_dense_network(tmp_path):
    module, pruning, datamodule = lenet(script={0: 0.9, 1: 0.8}), strategy(stop_margin=0.05), data()
    spy = Snapshots()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[spy, pruning], enable_checkpointing=True, **FAST)
    trainer.fit(module, datamodule)
    assert pruning.accepted_iterations == 0 and module.masks == {}
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, spy.at_start[1][0][name]), name
    assert module.size_metrics()["compression"] == pytest.approx(1.0)
    # the checkpoint callback wrote the restored network over the refused one (same optimizer step)
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["growprune"]["masks"] == {} and checkpoint["epoch"] == 2
    for name, value in module.model.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][f"model.{name}"], value), name


def test_the_last_step_is_checked_at_the_end_of_training(tmp_path):
    module, pruning, datamodule = lenet(script={0: 0.9, 1: 0.95, 2: 0.5}), strategy(stop_margin=0.0, iterations=2), data()
    spy = Snapshots()
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[spy, pruning], **FAST)
    trainer.fit(module, datamodule)
    assert [r["accepted"] for r in pruning.prune_records] == [True, False]
    assert pruning.history[-1]["action"] == "nnrelief_restore"
    state, masks = spy.at_start[2]
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(torch.equal(module.masks[name], mask) for name, mask in masks.items())
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(val_accuracy(module, datamodule), abs=1e-6)


def test_a_missing_metric_is_refused_before_the_network_changes(tmp_path):
    module, pruning = lenet(), strategy(stop_margin=0.01, monitor_metric="val/top1")
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[pruning], **FAST)
    with pytest.raises(ValueError, match=r"'val/top1' of epoch 0 .*it was not logged: validation must run every epoch"):
        trainer.fit(module, data())
    assert module.masks == {} and module.edit_log == []


# ---------------------------------------------------------------------------------- rewind
class RewindProbe(pl.Callback):
    """Placed after the strategy: what the network and the optimizer look like right after each step."""

    def __init__(self):
        self.seen: dict[int, dict] = {}
        self._optimizer = None

    def on_train_epoch_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.seen[trainer.current_epoch] = {
            "state": state_of(pl_module), "masks": masks_of(pl_module), "fresh": optimizer is not self._optimizer,
            "optimizer_state": len(optimizer.state), "lr": optimizer.param_groups[0]["lr"],
            "scheduler_epoch": [config.scheduler.last_epoch for config in trainer.lr_scheduler_configs][:1] or [None],
        }
        self._optimizer = optimizer


@pytest.mark.parametrize("rewind", ["init", "pretrained"])
def test_rewind_resets_survivors_and_the_optimizer_after_each_step(tmp_path, rewind):
    module, pruning = lenet(scheduler=True), strategy(rewind=rewind, iterations=2)
    spy, probe = Snapshots(), RewindProbe()
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[spy, pruning, probe], **FAST)
    trainer.fit(module, data())
    reference = spy.fit_start if rewind == "init" else spy.at_start[1][0]
    assert not torch.equal(reference["1.weight"], spy.at_start[1][0]["1.weight"]) or rewind == "pretrained"
    for epoch in (1, 2):  # the pruning epochs
        seen = probe.seen[epoch]
        for name, value in seen["state"].items():
            mask = seen["masks"].get(name)
            expected = reference[name] if mask is None else reference[name] * mask
            assert torch.equal(value, expected), (epoch, name)
        assert seen["masks"]["1.weight"].count_nonzero() < seen["masks"]["1.weight"].numel()
        assert seen["fresh"] and seen["optimizer_state"] == 0  # no momentum from the pre-rewind weights
        assert seen["scheduler_epoch"] == [0] and seen["lr"] == pytest.approx(0.05)  # the LR schedule restarts
    assert probe.seen[0]["optimizer_state"] == 0 and probe.seen[0]["lr"] == pytest.approx(0.05)
    assert all(record["rewound_to"] == rewind for record in pruning.prune_records)
    for name, mask in module.masks.items():  # retraining keeps the pruned weights at zero
        assert torch.all(module.model.get_parameter(name)[mask == 0] == 0)


def test_without_options_the_optimizer_and_weights_carry_on(tmp_path):
    module, pruning = lenet(scheduler=True), strategy(iterations=1)
    spy, probe = Snapshots(), RewindProbe()
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[spy, pruning, probe], **FAST).fit(module, data())
    seen = probe.seen[1]
    assert not seen["fresh"] and seen["optimizer_state"] > 0 and seen["scheduler_epoch"] == [1]
    before = spy.at_start[1][0]
    for name, value in seen["state"].items():
        mask = seen["masks"].get(name)
        assert torch.equal(value, before[name] if mask is None else before[name] * mask), name
    assert set(pruning.prune_records[0]) >= {"achieved"} and "accepted" not in pruning.prune_records[0]
    assert "compression" not in pruning.prune_records[0] and pruning.stopped_reason is None


# ---------------------------------------------------------------------------------- resume
def test_resume_keeps_the_reference_the_snapshots_and_the_init_weights(tmp_path):
    first_module, first, datamodule = lenet(), strategy(stop_margin=1.0, rewind="init", iterations=3), data()
    spy = Snapshots()
    # interrupted after epoch 1 (step 1 done at its start); the next step is at epoch 2, right after the resume
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[spy, first, StopAfter(2)], **FAST)
    trainer.fit(first_module, datamodule)
    checkpoint = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(checkpoint)
    stored = torch.load(checkpoint, weights_only=True)  # the strategy's state loads safely
    assert any("nnrelief" in state for state in stored["callbacks"].values())
    assert first.reference_metric is not None and first.stopped_reason is None

    module, resumed, probe = lenet(), strategy(stop_margin=1.0, rewind="init", iterations=3), RewindProbe()
    resumed_trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[resumed, probe], **FAST)
    resumed_trainer.fit(module, datamodule, ckpt_path=checkpoint)
    assert [record["time"] for record in resumed.prune_records] == [1, 2, 3]
    assert resumed.reference_metric == first.reference_metric
    step2 = resumed.prune_records[1]
    # the validation before the interruption (epoch 1, stored in the checkpoint) judged step 1
    assert step2["metric_before"] == resumed.prune_records[0]["metric_retrained"] == first._last_validation[1]
    assert first._last_validation[0] == 1 and first.prune_records[0]["accepted"] is None
    assert resumed.accepted_iterations == 3
    # the step after the resume rewound to the weights of the FIRST fit's start, not the resumed ones
    seen = probe.seen[2]
    for name, value in seen["state"].items():
        mask = seen["masks"].get(name)
        expected = spy.fit_start[name] if mask is None else spy.fit_start[name] * mask
        assert torch.equal(value, expected), name


def test_resume_restores_the_network_accepted_before_the_interruption(tmp_path):
    script = {0: 0.9, 1: 0.95, 2: 0.1}
    first_module, first, datamodule = lenet(script=script), strategy(stop_margin=0.0, iterations=3), data()
    spy = Snapshots()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[spy, first, StopAfter(3)], **FAST)
    trainer.fit(first_module, datamodule)  # steps 1 and 2 done, step 2's drop not yet seen
    checkpoint = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(checkpoint)
    module, resumed = lenet(script=script), strategy(stop_margin=0.0, iterations=3)
    resumed_trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[resumed], **FAST)
    resumed_trainer.fit(module, datamodule, ckpt_path=checkpoint)
    assert resumed.history[-1]["action"] == "nnrelief_restore" and resumed.accepted_iterations == 1
    state, masks = spy.at_start[2]
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(torch.equal(module.masks[name], mask) for name, mask in masks.items())


@pytest.mark.parametrize("epochs", [1, 2], ids=["before-any-step", "after-a-step"])
def test_resume_without_the_snapshots_is_refused(tmp_path, epochs):
    # before any step too: the resumed weights are trained ones, not the initial weights
    first_module, datamodule = lenet(), data()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[strategy(), StopAfter(epochs)], **FAST)
    trainer.fit(first_module, datamodule)
    checkpoint = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = strategy(rewind="init")
    with pytest.raises(ValueError, match="no snapshots for rewind='init' .*written without them"):
        tiny_trainer(tmp_path, max_epochs=4, callbacks=[resumed], **FAST).fit(lenet(), datamodule, ckpt_path=checkpoint)


# ------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rewind": "initial"}, r"rewind must be one of None, 'init', 'pretrained', got 'initial'"),
        ({"rewind": True}, "rewind must be one of"),
        ({"stop_margin": -0.01}, "stop_margin"),
        ({"stop_margin": 1.5}, "stop_margin"),
        ({"stop_margin": "0.01"}, "stop_margin"),
        ({"stop_margin": float("nan")}, "stop_margin"),
        ({"monitor_metric": ""}, "monitor_metric"),
        ({"stop_margin": 0.01, "schedule": Constant(amount=0.0, start=10, end=30, every=10, unit="step")},
         "stop_margin needs an epoch schedule"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NNReliefPruning(**kwargs)


def test_a_trigger_schedule_is_refused_with_stop_margin():
    trigger = types.new_class("Fake", (Trigger,))
    with pytest.raises(ValueError, match="not a Trigger"):
        NNReliefPruning(schedule=object.__new__(trigger), stop_margin=0.01)


@pytest.mark.parametrize("settings", [{"check_val_every_n_epoch": 2}, {"limit_val_batches": 0}])
def test_validation_that_does_not_run_every_epoch_is_refused_at_setup(settings):
    module, pruning = lenet(), strategy(stop_margin=0.01)
    trainer = types.SimpleNamespace(max_epochs=10, **settings)
    with pytest.raises(ValueError, match="validation must run every epoch"):
        pruning.check(trainer, module)
    assert pruning.original_sizes == {}  # refused before the strategy stored anything
    strategy().check(trainer, module)  # without stop_margin validation is not needed


def test_snapshots_follow_a_structural_edit_of_another_strategy():
    from growprune.strategies.nnrelief import cpu_snapshot
    from growprune.surgery.edits import RemoveChannels

    module, pruning = lenet(), strategy(stop_margin=0.1, rewind="init")
    init = cpu_snapshot(module.model.state_dict())
    module.set_mask("3.weight", (torch.arange(30000).reshape(100, 300) % 3 == 0).float())
    pruning._rewind_state = {name: value + 1 for name, value in init.items()}
    pruning._accepted = {"state": dict(init), "masks": cpu_snapshot(module.masks), "iteration": 0, "metric": 0.5}
    edit = RemoveChannels({"1": [0, 5, 7]})  # three hidden units of the first layer go
    pruning.on_edit(None, module, edit, module.apply_edit(edit))
    keep = [unit for unit in range(300) if unit not in (0, 5, 7)]
    assert torch.equal(pruning._rewind_state["1.weight"], init["1.weight"][keep] + 1)
    assert torch.equal(pruning._rewind_state["3.weight"], init["3.weight"][:, keep] + 1)
    assert torch.equal(pruning._accepted["state"]["1.bias"], init["1.bias"][keep])
    assert torch.equal(pruning._accepted["masks"]["3.weight"], module.masks["3.weight"].cpu())
    current = module.model.state_dict()
    assert all(pruning._rewind_state[name].shape == value.shape for name, value in current.items())
