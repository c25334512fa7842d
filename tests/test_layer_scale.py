"""Bare parameters (a per-channel ``nn.Parameter`` used directly in ``forward``, e.g. ConvNeXt's layer scale).

They change with their channel group like any layer: optimizer state sliced and padded value by
value, growth, the edit log and checkpoint resizing.
"""

import functools

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt

from growprune import GrowPruneModule
from growprune.metrics import dense_flops
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.surgery import AddChannels, ChannelGraph, RemoveChannels
from growprune.surgery.changes import kept_index
from growprune.surgery.handlers import ParameterHandler, register_parameter_handler, unregister_parameter_handler
from tests.helpers import tiny_data, tiny_trainer

SHAPE = (3, 16, 16)
SCALES = ("features.1.0.layer_scale", "features.3.0.layer_scale")


def convnext(batch_norm: bool = False) -> ConvNeXt:
    """Two stages of one block (16 and 32 channels). ``batch_norm``: no LayerNorm anywhere, so growth keeps the function."""
    torch.manual_seed(0)
    setting = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    if batch_norm:
        return ConvNeXt(setting, layer_scale=0.5, num_classes=4, block=functools.partial(CNBlock, norm_layer=nn.Identity),
                        norm_layer=nn.BatchNorm2d)
    return ConvNeXt(setting, layer_scale=0.5, num_classes=4)


def optimizer_state(trainer, pl_module, names):
    optimizer = trainer.optimizers[0]
    return {name: {key: value.clone() for key, value in optimizer.state[pl_module.model.get_parameter(name)].items()}
            for name in names}


class Watch(Callback):
    """Put before the strategy: snapshots the layer scales and their optimizer state around every edit.

    ``grow_at``: at the start of that epoch, add back as many channels as the pruning removed.
    """

    def __init__(self, grow_at: int | None = None):
        self.grow_at = grow_at
        self.edits = []

    def on_train_epoch_start(self, trainer, pl_module):
        # the strategy runs after this callback: this is the state the edit starts from
        self.state = optimizer_state(trainer, pl_module, SCALES)
        self.values = {name: pl_module.model.get_parameter(name).detach().clone() for name in SCALES}
        self.roots = {name: next(g.root for g in pl_module.channel_graph().groups() if (name, "out") in g.members) for name in SCALES}
        self.channels = {g.root: g.channels for g in pl_module.channel_graph().groups()}
        if trainer.current_epoch == self.grow_at:
            now = {g.root: g.channels for g in pl_module.channel_graph().groups()}
            original = {g.root: g.channels for g in ChannelGraph(convnext(batch_norm=True), torch.zeros(1, *SHAPE)).groups()}
            pl_module.eval()
            inputs = torch.randn(4, *SHAPE)
            with torch.no_grad():
                self.before_growth = pl_module.model(inputs)
            pl_module.apply_edit(AddChannels({root: original[root] - now[root] for root in now}))
            with torch.no_grad():
                self.after_growth = pl_module.model(inputs)
            pl_module.train()

    def on_edit(self, trainer, pl_module, edit, result):
        self.edits.append({
            "edit": edit,
            "before": self.state, "values": self.values, "roots": self.roots, "channels": self.channels,
            "after": optimizer_state(trainer, pl_module, SCALES),
            "new": {name: pl_module.model.get_parameter(name).detach().clone() for name in SCALES},
        })


def fit(network, optimizer, tmp_path, epochs, grow_at=None):
    pl_module = GrowPruneModule(network, num_classes=4, input_shape=SHAPE, optimizer=optimizer)
    original_flops = dense_flops(pl_module.model, SHAPE)
    watch = Watch(grow_at)
    strategy = StructuredPruning(OneShot(amount=0.5, at=1), target="flops", verbose=False)
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, limit_train_batches=2, limit_val_batches=0, callbacks=[watch, strategy])
    trainer.fit(pl_module, tiny_data(input_shape=SHAPE, num_samples=64, batch_size=16))
    return pl_module, trainer, watch, original_flops


def check_removal_carried_state(record, state_keys):
    plan = record["edit"].plan
    for name in SCALES:
        root = record["roots"][name]
        kept = kept_index(record["channels"][root], plan.get(root, []))
        assert torch.equal(record["new"][name], record["values"][name][kept])  # the weights
        for key in state_keys:  # and the optimizer state, value by value
            assert torch.equal(record["after"][name][key], record["before"][name][key][kept]), (name, key)
        if "step" in record["before"][name]:
            assert torch.equal(record["after"][name]["step"], record["before"][name]["step"])


def reload_checks(pl_module, trainer, tmp_path, network):
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    inputs = torch.randn(3, *SHAPE)
    pl_module.eval()
    expected = pl_module.model(inputs)
    # the edit log replayed on the base architecture
    replayed = GrowPruneModule(network(), num_classes=4, input_shape=SHAPE)
    replayed.on_load_checkpoint(checkpoint)
    replayed.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(replayed.eval().model(inputs), expected)
    # no edit log: every layer, the bare parameters included, resized to the stored shapes
    resized = GrowPruneModule(network(), num_classes=4, input_shape=SHAPE)
    resized.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(resized.eval().model(inputs), expected)


def test_layer_scale_adam_state_is_sliced_and_the_checkpoint_reloads(tmp_path):
    pl_module, trainer, watch, original_flops = fit(convnext(), functools.partial(torch.optim.Adam, lr=1e-3), tmp_path, epochs=2)
    assert 1.9 <= original_flops / dense_flops(pl_module.model, SHAPE) <= 2.3  # about half the FLOPs
    [record] = watch.edits
    assert isinstance(record["edit"], RemoveChannels)
    assert all(record["new"][name].shape[0] < record["values"][name].shape[0] for name in SCALES)
    check_removal_carried_state(record, ("exp_avg", "exp_avg_sq"))
    optimizer = trainer.optimizers[0]
    for name in SCALES:  # training went on with the new parameters
        parameter = pl_module.model.get_parameter(name)
        assert any(p is parameter for group in optimizer.param_groups for p in group["params"])
        assert not torch.equal(parameter.detach(), record["new"][name])
    reload_checks(pl_module, trainer, tmp_path, convnext)


def test_layer_scale_grows_back_with_the_function_and_sgd_momentum_kept(tmp_path):
    network = functools.partial(convnext, batch_norm=True)
    pl_module, trainer, watch, _ = fit(network(), functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9), tmp_path,
                                       epochs=3, grow_at=2)
    prune, grow = watch.edits
    check_removal_carried_state(prune, ("momentum_buffer",))
    assert isinstance(grow["edit"], AddChannels)
    # growth keeps the network's function (new channels' input weights are zero, so is their branch output)
    assert torch.allclose(watch.after_growth, watch.before_growth, atol=1e-6, rtol=0)
    for name in SCALES:
        old, new = grow["values"][name], grow["new"][name]
        assert new.shape[0] == 16 if name.startswith("features.1") else new.shape[0] == 32
        added = new.shape[0] - old.shape[0]
        assert added > 0
        # growth appends after the last channel: old entries in place, new ones at their peers' mean scale
        assert torch.equal(new[: old.shape[0]], old)
        assert torch.allclose(new[old.shape[0]:], old.mean().expand(added, 1, 1))
        momentum = grow["after"][name]["momentum_buffer"]
        assert torch.equal(momentum[: old.shape[0]], grow["before"][name]["momentum_buffer"])
        assert not momentum[old.shape[0]:].any()  # zero-padded
    reload_checks(pl_module, trainer, tmp_path, network)


class TokenMixer(nn.Module):
    """Tokens x features with a position embedding of shape (1, tokens, features): ambiguous when both are 8."""

    def __init__(self, tokens: int = 8, features: int = 8):
        super().__init__()
        self.embed = nn.Linear(3, features)
        self.pos = nn.Parameter(torch.randn(1, tokens, features))
        self.head = nn.Linear(features, 2)

    def forward(self, x):
        return self.head(self.embed(x) + self.pos).mean(1)


def test_ambiguous_bare_parameter_is_refused_until_its_dimension_is_registered():
    model = TokenMixer()
    inputs = torch.randn(2, 8, 3)
    message = r"bare parameter 'pos' of shape \(1, 8, 8\): dimensions \[1, 2\].*ambiguous.*register_parameter_handler"
    with pytest.raises(ValueError, match=message):
        ChannelGraph(model, inputs[:1])  # the dry run finds it
    graph = ChannelGraph(model, inputs[:1], check=False)
    with pytest.raises(ValueError, match=message):
        graph.remove({"embed": [0, 1]})
    assert model.pos.shape == (1, 8, 8) and model.embed.out_features == 8  # refused before any change
    register_parameter_handler(TokenMixer, "pos", ParameterHandler(dim=-1))
    try:
        before = model.pos.detach().clone()
        graph = ChannelGraph(model, inputs[:1])
        changes = graph.remove({"embed": [0, 1]})
        assert torch.equal(model.pos.detach(), before[:, :, 2:]) and model(inputs).shape == (2, 2)
        assert torch.equal(changes["pos"].carry(before, model.pos.shape), model.pos.detach())
        assert not graph.unmapped
    finally:
        unregister_parameter_handler(TokenMixer, "pos")
