"""The typed edit log: apply_edit from outside a strategy, replay on the base architecture, reload."""

import functools
import json

import pytest
import torch
import torch.nn as nn
import torchvision
from lightning.pytorch.callbacks import Callback

from growprune import GrowPruneModule
from growprune.evaluation import evaluate
from growprune.surgery.edits import (
    AddChannels,
    InsertCell,
    InsertLayer,
    MaskWeights,
    RemoveCell,
    RemoveChannels,
    RemoveLayer,
    edit_from_dict,
    replay_log,
)
from tests.helpers import tiny_data, tiny_trainer

IMAGE = (3, 16, 16)


def module(arch="resnet20", shape=IMAGE, optimizer=None, **arch_kwargs):
    if arch == "resnet20":
        arch_kwargs.setdefault("shortcut", "B")  # option A's channel padding cannot be traced (tested elsewhere)
    optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    return GrowPruneModule(arch, arch_kwargs=arch_kwargs, num_classes=4, input_shape=shape, optimizer=optimizer)


def outputs(pl_module, inputs):
    pl_module.eval()
    with torch.no_grad():
        return pl_module(inputs)


def save_and_reload(pl_module, tmp_path):
    """A checkpoint written by a Trainer after a short fit, loaded into a module built from scratch.

    (Modules built in Python pickle their optimizer callable into the hyper-parameters, so they
    load with weights_only=False; the CLI tests load with weights_only=True.)
    """
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(pl_module, tiny_data(input_shape=pl_module.input_shape, num_samples=32))
    path = tmp_path / "edited.ckpt"
    trainer.save_checkpoint(path)
    return GrowPruneModule.load_from_checkpoint(path, weights_only=False), path


def test_apply_edit_outside_training_logs_a_replayable_record():
    pl_module = module()
    before = pl_module.size_metrics()
    graph = pl_module.channel_graph()
    stream = next(group for group in graph.groups() if ("conv1", "out") in group.members)
    pl_module.apply_edit(RemoveChannels({stream.root: [0, 3]}), info={"why": "by hand"})
    (record,) = pl_module.edit_log
    assert record["why"] == "by hand" and record["ops"] == [{"op": "remove_channels", "plan": {stream.root: [0, 3]}}]
    json.dumps(pl_module.edit_log)  # the log is plain JSON
    assert pl_module.model.conv1.out_channels == 14
    assert pl_module.size_metrics()["params/total"] < before["params/total"]
    assert isinstance(edit_from_dict(record["ops"][0]), RemoveChannels)


def test_mixed_history_reloads_with_identical_outputs_and_replays_on_the_base(tmp_path):
    torch.manual_seed(0)
    pl_module = module()
    graph = pl_module.channel_graph()
    roots = [group.root for group in graph.groups()]
    pl_module.apply_edit(AddChannels({roots[0]: 3, roots[-1]: 2}))
    pl_module.apply_edit(RemoveChannels({roots[1]: [0, 1, 2]}))
    pl_module.apply_edit(InsertLayer("fc", {"class_path": "torch.nn.Identity"}))
    width = pl_module.model.layers[1][0].conv2.out_channels  # the stage's residual stream, as edited so far
    block = {"class_path": "growprune.models.resnet.BasicBlock", "init_args": {"in_channels": width, "channels": width}}
    pl_module.apply_edit(InsertCell("layers.1", 1, block, init="zero_last_norm"))
    pl_module.apply_edit(RemoveCell("layers.2.2"))
    pl_module.apply_edit(AddChannels({"layers.1.1.conv1": 4}))  # a channel group of the inserted cell
    inputs = torch.randn(3, *IMAGE)
    restored, _ = save_and_reload(pl_module, tmp_path)
    assert torch.equal(outputs(restored, inputs), outputs(pl_module, inputs))
    assert restored.edit_log == pl_module.edit_log
    # the log alone rebuilds the architecture from a freshly built base model
    base = module().model  # a freshly built base architecture
    replay_log(base, pl_module.edit_log, torch.zeros(1, *IMAGE))
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in pl_module.model.state_dict().items()}


def test_inserted_identity_layer_and_zero_cell_keep_the_function():
    torch.manual_seed(0)
    pl_module = module("lenet_300_100", shape=(1, 8, 8))
    inputs = torch.randn(4, 1, 8, 8)
    expected = outputs(pl_module, inputs)
    result = pl_module.apply_edit(InsertLayer("3", {"class_path": "torch.nn.Linear", "init_args": {"in_features": 100, "out_features": 100}},
                                              init="identity"))
    assert result.renamed == {"3.weight": "3.0.weight", "3.bias": "3.0.bias"} and result.added == ["3.1.weight", "3.1.bias"]
    assert torch.allclose(outputs(pl_module, inputs), expected, atol=1e-6)
    resnet = module()
    inputs = torch.randn(2, *IMAGE)
    expected = outputs(resnet, inputs)
    block = {"class_path": "growprune.models.resnet.BasicBlock", "init_args": {"in_channels": 16, "channels": 16}}
    result = resnet.apply_edit(InsertCell("layers.0", 0, block, init="zero_last_norm"))
    assert result.renamed["layers.0.0.conv1.weight"] == "layers.0.1.conv1.weight"
    assert torch.equal(outputs(resnet, inputs), expected)  # the cell adds zero; its input is post-ReLU already


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (RemoveChannels({"no.such.layer": [0]}), "not the root"),
        (RemoveLayer("conv1"), "maps shape"),
        (InsertLayer("fc", {"class_path": "torch.nn.Linear", "init_args": {"in_features": 3, "out_features": 3}}), "cannot take"),
        (InsertCell("conv1", 0, {"class_path": "torch.nn.Identity"}), "nn.Sequential"),
        (InsertLayer("fc", {"class_path": "torch.nn.NoSuchLayer"}), "cannot import"),
        (AddChannels({"conv1": -2}), ">= 0"),
        (MaskWeights({"conv1.weight": torch.ones(3)}), "shape"),
    ],
)
def test_bad_edits_fail_before_anything_changes(edit, message):
    pl_module = module()
    state = {name: tensor.clone() for name, tensor in pl_module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        pl_module.apply_edit(edit)
    assert pl_module.edit_log == []
    assert {k: v.shape for k, v in pl_module.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_checkpoint_whose_log_does_not_rebuild_its_shapes_is_refused(tmp_path):
    pl_module = module("lenet_300_100", shape=(1, 8, 8))
    pl_module.apply_edit(RemoveChannels({"1": [0, 1]}))
    _, path = save_and_reload(pl_module, tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["growprune"]["edit_log"][0]["ops"][0]["plan"] = {"1": [0]}  # a log that does not match the weights
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="'1.weight' is of shape \\(299, 64\\) after replay but \\(298, 64\\)"):
        GrowPruneModule.load_from_checkpoint(tmp_path / "bad.ckpt", weights_only=False)


class DepthwiseX2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )

    def forward(self, x):
        return self.features(x)


@pytest.mark.parametrize("family", ["depthwise multiplier 2", "concatenation (densenet)"])
def test_pruned_and_trained_models_of_hard_families_reload_identically(family, tmp_path):
    from growprune.schedules import OneShot
    from growprune.strategies import StructuredPruning

    torch.manual_seed(0)
    if family == "depthwise multiplier 2":
        network, shape = DepthwiseX2(), (3, 8, 8)
    else:
        network = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=4)
        shape = (3, 16, 16)
    pl_module = GrowPruneModule(network, num_classes=4, input_shape=shape,
                                optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    strategy = StructuredPruning(OneShot(amount=0.3, at=1), target="flops")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[strategy])
    trainer.fit(pl_module, tiny_data(input_shape=shape, num_samples=64, batch_size=16))
    # at least the target; the depthwise net has one group of 8 channels, so it moves in steps of ~1/8
    assert 0.3 <= pl_module.edit_log[0]["achieved"] <= 0.3 + 1 / 8
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    # a module built around a fresh copy of the base network: the log is replayed on it
    fresh = DepthwiseX2() if family == "depthwise multiplier 2" else torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=4)
    restored = GrowPruneModule(fresh, num_classes=4, input_shape=shape)
    checkpoint = torch.load(path, weights_only=False)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    inputs = torch.randn(3, *shape)
    assert torch.equal(outputs(restored, inputs), outputs(pl_module, inputs))


def test_evaluate_with_masks_leaves_the_model_alone_and_matches_masked_weights():
    torch.manual_seed(0)
    network = module("lenet_300_100", shape=(1, 8, 8)).model
    data = tiny_data(input_shape=(1, 8, 8), num_classes=4, num_samples=64)
    data.setup("fit")
    batches = list(data.val_dataloader())
    masks = {name: (torch.rand_like(p) > 0.5).float() for name, p in network.named_parameters() if p.dim() == 2}
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    result = evaluate(network, batches, masks)
    assert all(torch.equal(before[name], p) for name, p in network.named_parameters())
    masked_copy = module("lenet_300_100", shape=(1, 8, 8)).model
    masked_copy.load_state_dict(network.state_dict())
    with torch.no_grad():
        for name, mask in masks.items():
            masked_copy.get_parameter(name).mul_(mask)
    expected = evaluate(masked_copy, batches)
    assert result.accuracy == expected.accuracy and result.loss == pytest.approx(expected.loss, rel=1e-6)
    assert result.samples == sum(len(targets) for _, targets in batches)
    with pytest.raises(ValueError, match="no such parameter"):
        evaluate(network, batches, {"nope": torch.ones(1)})


def test_masks_setter_zeroes_the_weights_at_once():
    pl_module = module("lenet_300_100", shape=(1, 8, 8))
    mask = torch.zeros_like(pl_module.model[1].weight)
    mask[:, :10] = 1
    pl_module.masks = {"1.weight": mask}
    # read right after assignment (no optimizer step in between): the masked weights are gone
    assert int(torch.count_nonzero(pl_module.model[1].weight)) == int(mask.sum())
    assert pl_module.size_metrics()["params/nonzero"] == pl_module.size_metrics()["params/total"] - int((mask == 0).sum())
    with pytest.raises(ValueError, match="shape"):
        pl_module.masks = {"1.weight": torch.ones(3)}


class EditMidTraining(Callback):
    """Removes channels by hand at the start of an epoch, the way an outer loop would."""

    def __init__(self, epoch, edit):
        self.epoch, self.edit = epoch, edit
        self.before = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            optimizer = trainer.optimizers[0]
            self.before = {name: {k: v.clone() for k, v in optimizer.state[p].items()}
                           for name, p in pl_module.model.named_parameters()}
            pl_module.apply_edit(self.edit)
            # cloned: training goes on updating the optimizer's tensors in place
            self.after = {name: {k: v.clone() for k, v in trainer.optimizers[0].state[p].items()}
                          for name, p in pl_module.model.named_parameters()}


def test_apply_edit_during_training_carries_adam_state_value_by_value(tmp_path):
    pl_module = module("lenet_300_100", shape=(1, 8, 8), optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    surgery = EditMidTraining(1, RemoveChannels({"1": [0, 5, 7]}))
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[surgery])
    trainer.fit(pl_module, tiny_data(input_shape=(1, 8, 8)))
    kept = [i for i in range(300) if i not in (0, 5, 7)]
    for key in ("exp_avg", "exp_avg_sq"):
        # rows of the pruned layer, columns of its consumer: the old state at the kept positions, exactly
        assert torch.equal(surgery.after["1.weight"][key], surgery.before["1.weight"][key][kept])
        assert torch.equal(surgery.after["1.bias"][key], surgery.before["1.bias"][key][kept])
        assert torch.equal(surgery.after["3.weight"][key], surgery.before["3.weight"][key][:, kept])
        assert torch.equal(surgery.after["5.weight"][key], surgery.before["5.weight"][key])
    assert surgery.after["1.weight"]["step"] == surgery.before["1.weight"]["step"]
