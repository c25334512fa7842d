"""Training stays whole after surgery: optimizer state, LR schedule, modes, and DDP."""

import functools

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback

from growprune import GrowPruneModule
from growprune.criteria import GradientCriterion, TaylorCriterion
from growprune.schedules import OneShot
from growprune.strategies import UnstructuredPruning
from growprune.surgery import ParameterChange, preserved_modes, repair_training
from tests.helpers import tiny_data, tiny_trainer

KEEP = torch.arange(0, 100, 2)  # keep the even hidden units of layer "3" (100 -> 50)


def narrow_hidden_layer(model: nn.Sequential) -> dict:
    """Structural change for the tests: remove half the units of LeNet-300-100's second layer."""
    old_hidden, old_out = model[3], model[5]
    hidden = nn.Linear(old_hidden.in_features, len(KEEP))
    out = nn.Linear(len(KEEP), old_out.out_features)
    with torch.no_grad():
        hidden.weight.copy_(old_hidden.weight[KEEP])
        hidden.bias.copy_(old_hidden.bias[KEEP])
        out.weight.copy_(old_out.weight[:, KEEP])
        out.bias.copy_(old_out.bias)
    model[3], model[5] = hidden, out
    return {
        hidden.weight: ParameterChange(old_hidden.weight, [KEEP, None]),
        hidden.bias: ParameterChange(old_hidden.bias, [KEEP]),
        out.weight: ParameterChange(old_out.weight, [None, KEEP]),
        out.bias: ParameterChange(old_out.bias),
    }


class NarrowAtEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch
        self.seen = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch:
            return
        optimizer = trainer.optimizers[0]
        old_weight = pl_module.model[3].weight
        self.seen["momentum_before"] = optimizer.state[old_weight]["momentum_buffer"].clone()
        self.seen["lr_before"] = optimizer.param_groups[0]["lr"]
        changes = narrow_hidden_layer(pl_module.model)
        repair_training(trainer, pl_module, changes)
        self.seen["new_weight_after_surgery"] = pl_module.model[3].weight.detach().clone()


def make_module():
    return GrowPruneModule(
        "lenet_300_100",
        num_classes=4,
        input_shape=(1, 8, 8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )


def test_changed_layers_keep_learning_with_state_and_lr_carried_over(tmp_path):
    module = make_module()
    surgery = NarrowAtEpoch(epoch=2)
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[surgery])
    trainer.fit(module, tiny_data())

    new_weight = module.model[3].weight
    optimizer = trainer.optimizers[0]
    assert any(p is new_weight for p in optimizer.param_groups[0]["params"]), "optimizer still holds old parameters"
    # the changed layer kept learning after the surgery
    assert (new_weight.detach() - surgery.seen["new_weight_after_surgery"]).abs().sum() > 0
    # the LR schedule went on from where it was (0.1, 0.05, 0.025 at the surgery, 0.0125, then 0.00625
    # after the last epoch); a restarted schedule would end at 0.025
    assert surgery.seen["lr_before"] == pytest.approx(0.025)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.00625)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_momentum_is_sliced_to_kept_units(tmp_path):
    module = make_module()
    surgery = NarrowAtEpoch(epoch=1)

    class CheckRightAfter(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                state = trainer.optimizers[0].state[pl_module.model[3].weight]
                surgery.seen["momentum_after"] = state["momentum_buffer"].clone()

    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[surgery, CheckRightAfter()])
    trainer.fit(module, tiny_data())
    assert torch.equal(surgery.seen["momentum_after"], surgery.seen["momentum_before"][KEEP])


def test_preserved_modes_restores_eval_mode_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model.train()
    model[0].weight.requires_grad_(False)
    with preserved_modes(model):
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    assert model.training and model[1].training
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad


class RecordRankState(Callback):
    """Each rank writes its final weights and masks, for comparison in the parent process."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {
            "weights": {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()},
            "masks": {k: v.cpu() for k, v in pl_module.masks.items()},
            "global_step": trainer.global_step,
            "edit_log": pl_module.edit_log,
        }
        torch.save(state, f"{self.directory}/rank{trainer.global_rank}.pt")


def test_ddp_two_processes_stay_identical_through_pruning_and_structural_change(tmp_path):
    from growprune.strategies import StructuredPruning

    module = make_module()
    # data-driven criteria: each rank scores on its own batches, so masks and plans must come from rank 0
    pruning = UnstructuredPruning(OneShot(amount=0.6, at=1), criterion=GradientCriterion(), scoring_batches=2)
    channels = StructuredPruning(OneShot(amount=0.5, at=2), criterion=TaylorCriterion(), target="channels", scoring_batches=2)
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=4,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[pruning, channels, RecordRankState(str(tmp_path))],
    )
    trainer.fit(module, tiny_data())
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["masks"].keys() == rank1["masks"].keys() == {"1.weight", "3.weight", "5.weight"}
    for name in rank0["masks"]:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
    for name in rank0["weights"]:
        assert torch.allclose(rank0["weights"][name], rank1["weights"][name], atol=1e-6), name
    # the channel surgery (ChannelGraph, through apply_edit) happened on both ranks alike: half the 400 units
    assert rank0["weights"]["1.weight"].shape[0] + rank0["weights"]["3.weight"].shape[0] == 200
    assert rank0["edit_log"] == rank1["edit_log"] and rank0["edit_log"][1]["ops"][0]["op"] == "remove_channels"
    # masks followed the surgery: still the shape of their weights
    assert all(rank0["masks"][name].shape == rank0["weights"][name].shape for name in rank0["masks"])
    # training went on after the change: steps of epochs 3 and 4 were taken
    steps_per_epoch = rank0["global_step"] // 4
    assert steps_per_epoch >= 1 and rank0["global_step"] == 4 * steps_per_epoch
    assert rank0["edit_log"][0]["achieved"] == pytest.approx(0.6, abs=1e-3)


def test_shape_changed_checkpoint_reloads_into_base_architecture_with_identical_outputs(tmp_path):
    module = make_module()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[NarrowAtEpoch(epoch=1)])
    trainer.fit(module, tiny_data())
    path = tmp_path / "narrow.ckpt"
    trainer.save_checkpoint(path)
    restored = GrowPruneModule.load_from_checkpoint(path, weights_only=False)
    assert restored.model[3].weight.shape == (50, 300)
    inputs = torch.randn(5, 1, 8, 8)
    module.eval(), restored.eval()
    assert torch.equal(module(inputs), restored(inputs))
