"""Structured pruning of a torchvision VisionTransformer, residual stream (hidden size) included.

The hidden size couples the patch embedding (``conv_proj``), the class token and position
embedding (bare parameters), every LayerNorm, the attention projections, the MLPs and the head;
the model reshapes by its own ``hidden_dim`` attribute, which follows.
"""

import functools

import torch
from lightning.pytorch.callbacks import Callback
from torchvision.models import VisionTransformer

from growprune import GrowPruneModule
from growprune.metrics import dense_flops
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.surgery import ChannelGraph
from growprune.surgery.changes import kept_index
from tests.helpers import tiny_data, tiny_trainer

SHAPE = (3, 32, 32)
BARE = ("class_token", "encoder.pos_embedding")


def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4)


class Watch(Callback):
    """Put before the strategy: the bare parameters and their Adam state before and after the pruning."""

    def on_train_epoch_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.before = {name: {k: v.clone() for k, v in optimizer.state[pl_module.model.get_parameter(name)].items()} for name in BARE}
        self.values = {name: pl_module.model.get_parameter(name).detach().clone() for name in BARE}
        self.stream = next(g for g in pl_module.channel_graph().groups() if ("class_token", "out") in g.members)

    def on_edit(self, trainer, pl_module, edit, result):
        optimizer = trainer.optimizers[0]
        self.plan = edit.plan
        self.after = {name: {k: v.clone() for k, v in optimizer.state[pl_module.model.get_parameter(name)].items()} for name in BARE}
        self.new = {name: pl_module.model.get_parameter(name).detach().clone() for name in BARE}


def test_vit_prunes_to_half_the_flops_with_hidden_size_heads_and_state_consistent(tmp_path):
    network = vit()
    pl_module = GrowPruneModule(network, num_classes=4, input_shape=SHAPE, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    original = dense_flops(pl_module.model, SHAPE)  # attention (q k^T, attention x v) included
    watch = Watch()
    strategy = StructuredPruning(OneShot(amount=0.5, at=1), target="flops", verbose=False)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[watch, strategy])
    trainer.fit(pl_module, tiny_data(input_shape=SHAPE, num_samples=64, batch_size=16))

    model = pl_module.model
    assert 1.95 <= original / dense_flops(model, SHAPE) <= 2.1
    # the residual stream lost channels: every member and the hidden_dim attribute agree
    hidden = model.conv_proj.out_channels
    removed = watch.plan.get(watch.stream.root, [])
    assert len(removed) > 0 and hidden == 32 - len(removed) and model.hidden_dim == hidden
    assert model.class_token.shape == (1, 1, hidden) and model.encoder.pos_embedding.shape == (1, 17, hidden)
    for layer in model.encoder.layers:
        attention = layer.self_attention
        assert attention.embed_dim == hidden and attention.head_dim * attention.num_heads == hidden
        assert layer.ln_1.normalized_shape == (hidden,) and layer.mlp[0].in_features == hidden
    # the bare parameters' Adam state is the old one at the kept channels, value by value
    kept = kept_index(32, removed)
    for name in BARE:
        assert torch.equal(watch.new[name], watch.values[name][..., kept])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(watch.after[name][key], watch.before[name][key][..., kept]), (name, key)
    # training went on with the new parameters
    parameters = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in parameters for p in model.parameters())
    assert not torch.equal(model.class_token.detach(), watch.new["class_token"])

    path = tmp_path / "vit.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    inputs = torch.randn(3, *SHAPE)
    expected = pl_module.eval().model(inputs)
    replayed = GrowPruneModule(vit(), num_classes=4, input_shape=SHAPE)
    replayed.on_load_checkpoint(checkpoint)
    replayed.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(replayed.eval().model(inputs), expected)
    resized = GrowPruneModule(vit(), num_classes=4, input_shape=SHAPE)  # no edit log: resized to the stored shapes
    resized.load_state_dict(checkpoint["state_dict"])
    assert resized.model.hidden_dim == hidden and torch.equal(resized.eval().model(inputs), expected)


def test_vit_skipping_the_patch_embedding_prunes_only_the_mlp_hidden_units():
    model = vit()
    graph = ChannelGraph(model, torch.zeros(1, *SHAPE), skip=["conv_proj"])
    groups = graph.groups()
    assert sorted(g.root for g in groups) == ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0"]
    graph.remove({g.root: list(range(10)) for g in groups})
    assert model.hidden_dim == 32 and [layer.mlp[0].out_features for layer in model.encoder.layers] == [54, 54]
    assert model(torch.randn(2, *SHAPE)).shape == (2, 4)
