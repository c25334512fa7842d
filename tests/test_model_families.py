"""One model of every architecture family through a structured 2x-FLOPs prune during training.

Each family couples channels differently (residual adds, depthwise and inverted residuals,
grouped convolutions, concatenation, layer-scale parameters, attention, channel shuffle). For each:
the FLOPs really halve (counted here with torch's own counter, independently of growprune's), every
optimizer state tensor follows its parameter through the surgery value by value, training goes on
updating every parameter, and the checkpoint reloads (``weights_only=True``) into a freshly built
network with identical outputs.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torchvision
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.regnet import BlockParams, RegNet

from growprune import GrowPruneModule
from growprune.models import create_model
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from tests.helpers import tiny_data, tiny_trainer

CLASSES = 4

FAMILIES = {
    "residual": (lambda: create_model("resnet20", num_classes=CLASSES, shortcut="B"), (3, 16, 16)),
    "inverted residual, depthwise": (lambda: torchvision.models.MobileNetV2(num_classes=CLASSES, width_mult=0.25), (3, 16, 16)),
    "grouped": (lambda: RegNet(BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8), num_classes=CLASSES),
                (3, 16, 16)),
    "concatenation": (lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                                          num_classes=CLASSES), (3, 16, 16)),
    "layer scale": (lambda: torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                                                       num_classes=CLASSES), (3, 16, 16)),
    "attention": (lambda: torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32,
                                                               mlp_dim=64, num_classes=CLASSES), (3, 16, 16)),
    "channel shuffle": (lambda: torchvision.models.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=CLASSES), (3, 16, 16)),
}


def torch_flops(network: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one sample counted by torch alone, in train mode with gradients (attention's slow path)."""
    was_training = network.training
    network.train()
    counter = FlopCounterMode(display=False)
    with counter:
        network(torch.zeros(2, *shape))  # batch 2: batch norm in train mode needs more than one value
    network.train(was_training)
    return counter.get_total_flops() // 2


class SurgeryRecorder(Callback):
    """Snapshots parameters and optimizer state right before the strategy acts and right after its edit."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.before: dict[str, tuple[torch.Tensor, dict]] = {}
        self.after: dict[str, tuple[torch.Tensor, dict]] = {}
        self.results = []

    @staticmethod
    def snapshot(trainer, pl_module) -> dict[str, tuple[torch.Tensor, dict]]:
        state = trainer.optimizers[0].state
        return {name: (p.detach().clone(), {key: value.clone() for key, value in state[p].items()})
                for name, p in pl_module.model.named_parameters()}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.before = self.snapshot(trainer, pl_module)

    def on_edit(self, trainer, pl_module, edit, result):
        self.results.append(result)
        self.after = self.snapshot(trainer, pl_module)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_structured_flops_halving_carries_optimizer_state_and_reloads(family, tmp_path):
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    network = build()
    dense = torch_flops(build(), shape)
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    pl_module = GrowPruneModule(network, num_classes=CLASSES, input_shape=shape, optimizer=optimizer)
    recorder = SurgeryRecorder(epoch=1)
    strategy = StructuredPruning(OneShot(amount=0.5, at=1), target="flops")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[recorder, strategy])
    trainer.fit(pl_module, tiny_data(input_shape=shape, num_classes=CLASSES, num_samples=32, batch_size=8))

    # FLOPs halved, by torch's own count of the network as it is now
    assert torch_flops(pl_module.model, shape) <= dense / 2 * 1.015

    # every replaced parameter and its Adam moments moved together, value by value
    assert len(recorder.results) == 1
    changes = recorder.results[0].changes
    assert changes, "the prune replaced no tensor"
    for name, (new_value, new_state) in recorder.after.items():
        old_value, old_state = recorder.before[name]
        change = changes.get(name)
        if change is None:
            assert torch.equal(new_value, old_value), name
            continue
        assert torch.equal(change.carry(old_value, new_value.shape), new_value), name
        assert set(new_state) == set(old_state), name
        for key, value in old_state.items():
            if value.dim() == 0:
                assert torch.equal(new_state[key], value), (name, key)
            else:
                assert torch.equal(change.carry(value, new_value.shape), new_state[key]), (name, key)

    # training went on after the prune: every parameter that had a gradient moved
    for name, parameter in pl_module.model.named_parameters():
        if parameter.requires_grad and name in recorder.after:
            assert not torch.equal(parameter.detach(), recorder.after[name][0]), f"{name} stopped learning"

    # the checkpoint loads safely and rebuilds the pruned network on a fresh base network
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    restored = GrowPruneModule(build(), num_classes=CLASSES, input_shape=shape)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    inputs = torch.randn(3, *shape)
    pl_module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(inputs), pl_module(inputs))
