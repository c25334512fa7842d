import functools

import pytest
import torch
import torch.nn as nn

from growprune import GrowPruneModule
from growprune.data import DigitsDataModule
from tests.helpers import tiny_data, tiny_trainer


def test_trains_lenet_on_digits_and_logs_all_metrics(tmp_path):
    data = DigitsDataModule(batch_size=64)
    module = GrowPruneModule(
        "lenet_300_100",
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    trainer = tiny_trainer(tmp_path, max_epochs=3)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert metrics["val/acc"] > 0.9  # real digits: an MLP learns them in a few epochs
    for key in ("train/loss_epoch", "val/loss", "params/total", "params/nonzero", "flops/dense", "flops/effective", "compression"):
        assert key in metrics, key
    assert metrics["params/total"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert metrics["flops/dense"] == 2 * (64 * 300 + 300 * 100 + 100 * 10)
    trainer.test(module, data, verbose=False)
    assert {"test/acc", "test/loss"} <= set(trainer.callback_metrics)


def test_wraps_any_nn_module():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    module = GrowPruneModule(net, num_classes=4, input_shape=(1, 8, 8))
    assert module.model is net
    assert module.size_metrics()["params/total"] == 64 * 4 + 4


def test_shape_mismatch_is_reported_before_training():
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        GrowPruneModule(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="3 classes"):
        GrowPruneModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), num_classes=3, input_shape=(1, 8, 8))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        GrowPruneModule("no_such_net")
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        GrowPruneModule(lr_scheduler_interval="batch")
    with pytest.raises(ValueError, match="arch_kwargs"):
        GrowPruneModule(nn.Linear(2, 2), arch_kwargs={"x": 1})


def test_optimizer_and_scheduler_are_built_from_callables():
    module = GrowPruneModule(
        "lenet_300_100",
        num_classes=10,
        input_shape=(1, 8, 8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1),
    )
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert config["lr_scheduler"]["interval"] == "epoch"
    # Each call builds a fresh optimizer over the current parameters (needed after surgery).
    assert module.configure_optimizers()["optimizer"] is not config["optimizer"]


def test_masks_keep_pruned_weights_zero_during_training_and_survive_checkpoint(tmp_path):
    data = tiny_data()
    module = GrowPruneModule(
        "lenet_300_100",
        num_classes=4,
        input_shape=(1, 8, 8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3),
    )
    mask = (torch.rand(300, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    module.set_mask("1.weight", mask)
    trainer = tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, data)
    weight = module.model.get_parameter("1.weight").detach()
    assert torch.all(weight[mask == 0] == 0)
    assert torch.count_nonzero(weight[mask == 1]) == int(mask.sum())
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)
    restored = GrowPruneModule.load_from_checkpoint(path, weights_only=False)
    assert torch.equal(restored.masks["1.weight"], mask)
    assert restored.size_metrics()["params/nonzero"] == module.size_metrics()["params/nonzero"]


def test_set_mask_rejects_wrong_shape():
    module = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        module.set_mask("1.weight", torch.ones(3, 3))


def test_extra_loss_terms_are_added_to_training_loss():
    module = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    assert module.extra_loss() == 0.0
    module.add_loss_term("l1", lambda m: torch.tensor(2.5))
    assert float(module.extra_loss()) == 2.5
    module.remove_loss_term("l1")
    assert module.extra_loss() == 0.0
