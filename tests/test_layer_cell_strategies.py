"""Layer and cell strategies (LayerGrowth, CellGrowth, LayerPruning, CellPruning) during real fits,
their criteria, optimizer state value by value, and reload under weights_only=True."""

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback

from growprune import GrowPruneModule
from growprune.criteria import BlockInfluenceCriterion, LayerCriterion, LayerWeightCriterion
from growprune.schedules import OneShot
from growprune.strategies import CellGrowth, CellPruning, LayerGrowth, LayerPruning
from growprune.surgery.discovery import permissible_elements
from growprune.surgery.edits import replay_log
from tests.helpers import tiny_data, tiny_trainer

IMAGE = (3, 16, 16)
ADAM = {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}


def resnet():
    # shortcut B: option A's channel padding cannot be traced by the channel graph
    return GrowPruneModule("resnet20", arch_kwargs={"shortcut": "B"}, num_classes=4, input_shape=IMAGE, optimizer=ADAM)


def outputs(pl_module, inputs):
    pl_module.eval()
    with torch.no_grad():
        return pl_module(inputs)


class AdamSnapshot(Callback):
    """The optimizer's per-parameter state and the parameter objects at the start of one epoch (placed
    before or after the strategies in the callback list: Lightning calls them in that order)."""

    def __init__(self, epoch):
        self.epoch = epoch
        self.state, self.params = {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            optimizer = trainer.optimizers[0]
            self.params = dict(pl_module.model.named_parameters())
            self.state = {name: {k: v.clone() for k, v in optimizer.state.get(p, {}).items()} for name, p in self.params.items()}
            self.trained = {id(p) for group in optimizer.param_groups for p in group["params"]}


def check_carried(before, after):
    """Every parameter that survived keeps its Adam state exactly (under its new name, if renamed);
    every new parameter starts from zero state and is in the optimizer. Returns (renamed, new) counts."""
    by_object = {id(p): name for name, p in after.params.items()}
    renamed = 0
    for name, parameter in before.params.items():
        new_name = by_object.get(id(parameter))
        if new_name is None:
            continue  # removed
        renamed += new_name != name
        assert before.state[name].keys() == after.state[new_name].keys() and before.state[name], name
        for key, value in before.state[name].items():
            assert torch.equal(after.state[new_name][key], value), (name, new_name, key)
    old = {id(p) for p in before.params.values()}
    new = [name for name, p in after.params.items() if id(p) not in old]
    for name in new:
        assert id(after.params[name]) in after.trained, name
        assert all(torch.count_nonzero(v) == 0 for k, v in after.state[name].items() if k != "step"), name
    return renamed, len(new)


def test_grow_then_prune_layers_and_cells_in_a_fit_carries_adam_and_reloads_weights_only(tmp_path):
    torch.manual_seed(0)
    pl_module = resnet()
    layer_growth = LayerGrowth(OneShot(amount=1.0, at=1), points=["conv1", "layers.1.1.conv1"], verbose=False)
    cell_growth = CellGrowth(OneShot(amount=1.0, at=1), max_cells=4, verbose=False)
    layer_pruning = LayerPruning(OneShot(amount=0.25, at=2), verbose=False)
    cell_pruning = CellPruning(OneShot(amount=0.3, at=2), verbose=False)
    grow_before, grow_after, prune_before, prune_after = AdamSnapshot(1), AdamSnapshot(1), AdamSnapshot(2), AdamSnapshot(2)
    callbacks = [grow_before, layer_growth, cell_growth, grow_after, prune_before, layer_pruning, cell_pruning, prune_after]
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(pl_module, tiny_data(input_shape=IMAGE, num_samples=64, batch_size=16))

    grown_layers, grown_cells, pruned_layers, pruned_cells = (record for record in pl_module.edit_log)
    # growth: two identity conv+BN layers, four zero cells (round robin: stages 0, 1, 2, then 0 again)
    assert grown_layers["inserted"] == ["conv1.1", "layers.1.1.conv1.1"]
    assert grown_cells["inserted"] == ["layers.0.3", "layers.1.3", "layers.2.3", "layers.0.4"]
    for record in (grown_layers, grown_cells):
        assert record["achieved"] == 1.0 and record["max_output_change"] < 1e-5
    renamed, new = check_carried(grow_before, grow_after)
    assert renamed == 2 and new == 2 * 3 + 4 * 6  # conv1 and layers.1.1.conv1 moved to <path>.0; conv+BN, BasicBlock tensors
    # the new layers learned in the epoch after growth (the optimizer holds them): the identity conv moved
    assert not torch.equal(prune_before.params["conv1.1.0.weight"], nn.init.dirac_(torch.empty(16, 16, 3, 3)))
    # pruning: 25 % of the 16 removable layers found at set-up -> 4; 30 % of the 7 removable cells -> 3
    assert len(pruned_layers["removed"]) == 4 and pruned_layers["achieved"] == 0.25
    assert len(pruned_cells["removed"]) == 3 and pruned_cells["achieved"] == pytest.approx(3 / 7)
    # the new zero cells have the least block influence: nearly identity maps
    assert set(pruned_cells["removed"]) <= {"layers.0.3", "layers.1.3", "layers.2.3", "layers.0.4"}
    check_carried(prune_before, prune_after)
    assert all(isinstance(pl_module.model.get_submodule(path), nn.Identity) for path in pruned_cells["removed"])

    path = tmp_path / "grown_and_pruned.ckpt"
    trainer.save_checkpoint(path)
    restored = GrowPruneModule.load_from_checkpoint(path, weights_only=True)
    inputs = torch.randn(3, *IMAGE)
    assert torch.equal(outputs(restored, inputs), outputs(pl_module, inputs))
    base = resnet().model
    replay_log(base, pl_module.edit_log, torch.zeros(1, *IMAGE))
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in pl_module.model.state_dict().items()}


def test_layer_growth_after_relus_of_vgg_is_exact_and_removable_again(tmp_path):
    torch.manual_seed(0)
    pl_module = GrowPruneModule("vgg11_bn", num_classes=4, input_shape=IMAGE, optimizer=ADAM)
    growth = LayerGrowth(OneShot(amount=1.0, at=1), max_layers=3, verbose=False)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=0, callbacks=[growth])
    trainer.fit(pl_module, tiny_data(input_shape=IMAGE, num_samples=32, batch_size=16))
    (record,) = pl_module.edit_log
    assert record["inserted"] == ["features.2.1", "features.6.1", "features.10.1"]
    assert record["max_output_change"] < 1e-5
    new = pl_module.model.features[2][1]
    assert [type(m) for m in new] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]  # after a ReLU: conv, BN, ReLU
    found = permissible_elements(pl_module.model, pl_module.example_inputs(), channel_groups=False)
    assert {"features.2.1", "features.6.1", "features.10.1"} <= set(found.removable_layers)


def test_layer_criteria_rank_as_defined():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(8) + 0.01 * torch.randn(8, 8))  # nearly the identity
        model[2].bias.zero_()
        model[3].weight.mul_(10)
    found = permissible_elements(model, torch.zeros(1, 8), channel_groups=False)
    candidates = [layer for layer in found.layers if layer.removable]
    assert [layer.path for layer in candidates] == ["0", "2", "3"] and candidates[0].members == ["0", "1"]
    batches = [(torch.randn(16, 8), torch.zeros(16, dtype=torch.long))]
    influence = BlockInfluenceCriterion().score(model, candidates, batches)
    assert min(influence, key=influence.get) == "2" and influence["2"] < 1e-3
    x = torch.randn(16, 8)
    with torch.no_grad():
        y = model[3](model[2](model[1](model[0](x))))
        h = model[2](model[1](model[0](x)))
    expected = float((1 - torch.nn.functional.cosine_similarity(h.double(), y.double(), dim=1)).mean())
    assert BlockInfluenceCriterion().score(model, candidates[2:], [(x, None)])["3"] == pytest.approx(expected)
    weights = LayerWeightCriterion(p=1).score(model, candidates)
    assert weights["3"] == pytest.approx(float(model[3].weight.abs().mean()))  # per parameter (biases aside)
    assert max(weights, key=weights.get) == "3"
    with pytest.raises(ValueError, match="needs training batches"):
        BlockInfluenceCriterion().score(model, candidates, None)


class LastFirst(LayerCriterion):
    """A user criterion: the later an element, the less important."""

    def score_layers(self, model, candidates, batches):
        return {element.path: -index for index, element in enumerate(candidates)}


def test_user_criterion_and_fewest_placement(tmp_path):
    torch.manual_seed(0)
    pl_module = resnet()
    pruning = CellPruning(OneShot(amount=0.3, at=0), criterion=LastFirst(), verbose=False)
    growth = CellGrowth(OneShot(amount=1.0, at=1), max_cells=2, placement="fewest", verbose=False)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=0, callbacks=[pruning, growth])
    trainer.fit(pl_module, tiny_data(input_shape=IMAGE, num_samples=32, batch_size=16))
    removed, grown = pl_module.edit_log
    assert removed["removed"] == ["layers.2.2", "layers.2.1", "layers.1.2"]  # the last three removable cells
    # "fewest" counts cells (removed ones are identities, not cells). Stage 2 kept only its downsampling
    # block, which cannot be copied (it changes the shape): passed over. Stage 1 has 2 cells, stage 0 has 3
    # -> stage 1 first; then both have 3 and the earlier stage wins -> stage 0
    assert grown["inserted"] == ["layers.1.3", "layers.0.3"]
    # LayerGrowth's points follow cells inserted before them in their stage
    from growprune.strategies.layers import _shifted

    assert [_shifted(p, "layers.1", 1) for p in ("layers.1.0.conv1", "layers.1.1.conv1", "layers.10.conv1", "conv1")] == [
        "layers.1.0.conv1", "layers.1.2.conv1", "layers.10.conv1", "conv1"]


def test_strategies_refuse_bad_configurations_before_training(tmp_path):
    vgg = GrowPruneModule("vgg11_bn", num_classes=4, input_shape=IMAGE, optimizer=ADAM)
    cases = [
        (vgg, CellGrowth(OneShot(amount=1.0, at=0)), "VGG has no residual stage"),
        (vgg, CellPruning(OneShot(amount=0.5, at=0)), "no removable cell"),
        (vgg, LayerGrowth(OneShot(amount=1.0, at=0), points=["features.0"]), "'features.0' is no layer insertion point"),
        (vgg, LayerGrowth(OneShot(amount=1.0, at=0), points=["features.77"]), "no module named 'features.77'"),
        (resnet(), CellGrowth(OneShot(amount=1.0, at=0), stages=["layers"]), "'layers' is no residual stage"),
        (resnet(), LayerPruning(OneShot(amount=0.5, at=0), skip=["nope"]), "skip names 'nope'"),
    ]
    for pl_module, strategy, message in cases:
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[strategy])
        with pytest.raises(ValueError, match=message) as raised:
            trainer.fit(pl_module, tiny_data(input_shape=IMAGE, num_samples=16, batch_size=16))
        assert "\n" not in str(raised.value)
        assert pl_module.edit_log == [] and all(torch.equal(pl_module.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\]"):
        LayerGrowth(OneShot(amount=2.0, at=0))
    with pytest.raises(TypeError, match="LayerCriterion"):
        LayerPruning(OneShot(amount=0.5, at=0), criterion=object())
