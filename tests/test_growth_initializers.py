"""Growth initialisers and the map of new units: the maths (GradMax = the paper's SVD), the
bookkeeping (roles, groups, unit order), what an initialiser must leave alone, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import growprune.growth.initializers as initializers_module
from growprune.growth import Firefly, GradMax, GradMaxOpt, NewUnits, RandomInit, group_units, new_units
from growprune.surgery.channels import ChannelGraph
from tests.helpers import ResidualMLP

ALL = [RandomInit(), RandomInit(form="full"), GradMax(iterations=3), GradMax(form="paper", iterations=3),
       GradMaxOpt(steps=2), GradMaxOpt(form="paper", steps=2), Firefly(candidates=2, steps=2), Firefly(form="full", candidates=2, steps=2)]


def conv_net() -> nn.Module:
    """conv -> BN -> ReLU -> depthwise conv -> BN -> ReLU -> conv -> BN -> ReLU -> flatten -> linear.

    Channel groups: "3" (the depthwise conv's group: conv 0's outputs, both norms, conv 6's inputs)
    and "6" (conv 6's outputs, norm 7, the linear layer's inputs after the flatten)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def data(shape=(3, 8, 8), classes=5, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=generator), torch.randint(0, classes, (size,), generator=generator)


def grown(model, plan, inputs):
    model = copy.deepcopy(model)
    return model, new_units(model, ChannelGraph(model, inputs[:1]).add(plan))


def eval_output(model, inputs):
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return model(inputs)


# ---------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("form", ["safe", "paper"])
def test_gradmax_is_the_svd_of_the_cross_covariance(form):
    """Two-layer MLP: M = sum_n (dL/dz2_n) x_n^T. The paper's fan-out is M's top left singular
    vectors; the safe form's fan-in its top right singular vectors (both up to sign)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5))
    inputs, targets = torch.randn(64, 12), torch.randint(0, 5, (64,))
    outputs = model(inputs)
    gradient = torch.autograd.grad(F.cross_entropy(outputs, targets), outputs)[0]
    left, _, right = torch.linalg.svd(gradient.T @ inputs)
    model, units = grown(model, {"0": 2}, inputs)
    GradMax(form=form, iterations=30).initialize(model, units, [(inputs, targets)])
    if form == "safe":
        found, expected = model[0].weight[6:].detach(), right[:2]
        assert torch.count_nonzero(model[2].weight[:, 6:]) == 0
    else:
        found, expected = model[2].weight[:, 6:].detach().T, left[:, :2].T
        assert torch.count_nonzero(model[0].weight[6:]) == 0
    cosines = (F.normalize(found, dim=1) * expected).sum(dim=1).abs()
    assert torch.all(cosines > 0.999), cosines


def test_gradmax_scales_like_the_existing_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5))
    inputs, targets = torch.randn(32, 12), torch.randint(0, 5, (32,))
    rows = model[0].weight.detach().pow(2).mean().sqrt() * 12 ** 0.5
    columns = model[2].weight.detach().pow(2).mean().sqrt() * 5 ** 0.5
    safe, units = grown(model, {"0": 2}, inputs)
    GradMax().initialize(safe, units, [(inputs, targets)])
    assert torch.allclose(safe[0].weight[6:].norm(dim=1), rows.expand(2), rtol=1e-4)
    paper, units = grown(model, {"0": 2}, inputs)
    GradMax(form="paper", scale=0.5).initialize(paper, units, [(inputs, targets)])
    assert torch.allclose(paper[2].weight[:, 6:].norm(dim=0), 0.5 * columns.expand(2), rtol=1e-4)


def test_gradmax_opt_ascends_its_objective_under_batch_norm():
    inputs, targets = data()
    for form in ("safe", "paper"):
        model, units = grown(conv_net(), {"3": 2}, inputs)
        stats = GradMaxOpt(form=form, steps=5).initialize(model, units, [(inputs, targets)])
        assert stats["objective_end"] > stats["objective_start"] > 0


def test_safe_forms_give_the_zero_fan_out_a_gradient_and_the_paper_form_is_dead_behind_relu():
    inputs, targets = data()
    norms = {}
    for init in (RandomInit(), GradMax(), GradMax(form="paper"), GradMaxOpt(steps=3), Firefly(candidates=2, steps=2)):
        model, units = grown(conv_net(), {"3": 2}, inputs)
        model.train()
        norms[repr(init)] = init.initialize(model, units, [(inputs, targets)])["gradient_norm"]
    assert norms["GradMax(form='paper')"] == 0.0  # relu'(0) = 0 in PyTorch: nothing reaches the unit
    for name, norm in norms.items():
        if "paper" not in name:
            assert norm > 0, name
    # GradMax picks the fan-in whose zero fan-out gets the largest gradient: more than random fan-in
    assert norms["GradMax(form='safe')"] > norms["RandomInit(form='safe')"]


@pytest.mark.parametrize("init", ALL, ids=repr)
def test_initialisers_keep_rng_modes_statistics_and_tensors(init):
    inputs, targets = data()
    model, units = grown(conv_net(), {"3": 2, "6": 2}, inputs)
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    before = eval_output(model, inputs)
    tensors = {name: tensor for name, tensor in model.named_parameters()}
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    flags = {name: module.training for name, module in model.named_modules()}
    rng = torch.get_rng_state()
    init.initialize(model, units, [(inputs, targets)])
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert all(tensors[name] is tensor for name, tensor in model.named_parameters())  # the optimizer's tensors
    assert all(torch.equal(buffers[name], buffer) for name, buffer in model.named_buffers())
    change = float((eval_output(model, inputs) - before).abs().max())
    assert init.function_preserving == (init.form != "full")
    if init.function_preserving:
        assert change < 1e-6
    else:
        assert change > 1e-6


def test_initialisers_reach_every_new_entry_they_own():
    inputs, targets = data()
    model, units = grown(conv_net(), {"3": 2}, inputs)
    RandomInit(form="full").initialize(model, units, None)
    for unit_slice in units.fan_out + units.through:
        if unit_slice.name.endswith("weight"):
            assert bool(unit_slice.tensor(model)[unit_slice.mask].ne(0).all()), unit_slice.name
    for unit_slice in units.fan_in:
        values = unit_slice.tensor(model)[unit_slice.mask]
        assert bool(values.ne(0).all()) if unit_slice.name.endswith("weight") else bool(values.eq(0).all())


# ---------------------------------------------------------------------------- units and groups
def test_new_units_sorts_entries_by_role():
    inputs, _ = data()
    model, units = grown(conv_net(), {"3": 2, "6": 1}, inputs)
    roles = {(s.module, s.name.rpartition(".")[2], s.role) for s in units.slices()}
    assert ("0", "weight", "fan_in") in roles and ("0", "bias", "fan_in") in roles
    assert ("3", "weight", "through") in roles  # the depthwise conv passes the new channel on
    assert ("6", "weight", "fan_out") in roles and ("6", "weight", "fan_in") in roles
    assert ("10", "weight", "fan_out") in roles  # the linear layer after the flatten
    assert {s.name for s in units.norms} >= {"1.weight", "1.bias", "1.running_mean", "1.running_var", "7.weight"}
    conv_in = next(s for s in units.fan_in if s.name == "6.weight")
    assert conv_in.index.shape == (1, 6 * 9)  # the new row sees the old 6 inputs, not the 2 new ones (left 0)
    conv_out = next(s for s in units.fan_out if s.name == "6.weight")
    assert conv_out.index.shape == (2, 4 * 9)  # the old rows' 2 new input columns
    assert units.count() == 3


def test_group_units_separates_groups_grown_in_one_edit_and_orders_units():
    inputs, _ = data()
    model, units = grown(conv_net(), {"3": 2, "6": 1}, inputs)
    RandomInit().initialize(model, units, None)  # the depthwise filters must pass the probe
    groups = {group.label: group for group in group_units(model, units, inputs)}
    assert set(groups) == {"0", "6"}
    assert [s.module for s, _ in groups["0"].producers] == ["0"] and groups["0"].count == 2
    assert [s.module for s, _ in groups["0"].consumers] == ["6"]
    linear = dict((s.module, index) for s, index in groups["6"].consumers)["10"]
    assert linear.shape == (1, 5 * 16)  # one unit: its 4x4 positions after the flatten, for 5 outputs


def test_group_units_joins_the_producers_of_a_residual_stream():
    torch.manual_seed(0)
    model = ResidualMLP()
    inputs = torch.randn(4, 1, 8, 8)
    graph = ChannelGraph(model, inputs[:1])
    stream = next(group for group in graph.groups() if {"fc1", "fc2"} <= {name for name, side in group.members if side == "out"})
    units = new_units(model, graph.add({stream.root: 3}))
    assert units.count() == 6  # before grouping: counted once per producer
    groups = group_units(model, units, inputs)
    assert len(groups) == 1 and units.count() == 3
    assert sorted(s.module for s, _ in groups[0].producers) == ["fc1", "fc2"]
    assert sorted(s.module for s, _ in groups[0].consumers) == ["fc2", "out"]


# ---------------------------------------------------------------------------- bad input
def test_unknown_form_is_refused_with_the_forms():
    with pytest.raises(ValueError, match=r"GradMax: no form named 'full'; forms: safe, paper"):
        GradMax(form="full")
    with pytest.raises(ValueError, match=r"RandomInit: no form named 'paper'; forms: safe, full"):
        RandomInit(form="paper")
    with pytest.raises(ValueError, match="Firefly: no form named 'sage'"):
        Firefly(form="sage")


@pytest.mark.parametrize("init", [GradMax(), GradMaxOpt(), Firefly()], ids=repr)
def test_data_driven_initialiser_without_batches_is_refused_before_any_change(init):
    inputs, _ = data()
    model, units = grown(conv_net(), {"3": 2}, inputs)
    state = copy.deepcopy(model.state_dict())
    for batches in (None, []):
        with pytest.raises(ValueError, match=f"{type(init).__name__} needs training batches"):
            init.initialize(model, units, batches)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_growing_the_output_layer_is_refused_by_the_channel_graph():
    inputs, _ = data()
    model = conv_net()
    graph = ChannelGraph(model, inputs[:1])
    with pytest.raises(ValueError, match=r"'10' is not the root of a channel group that may change"):
        graph.add({"10": 2})


def test_units_without_a_producer_are_refused():
    inputs, targets = data()
    model, units = grown(conv_net(), {"3": 2}, inputs)
    consumers_only = NewUnits(fan_out=units.fan_out)
    with pytest.raises(ValueError, match="no producing layer with weights"):
        RandomInit().initialize(model, consumers_only, None)
    with pytest.raises(ValueError, match="empty"):
        RandomInit().initialize(model, NewUnits(), None)


def test_no_gradient_reaching_the_new_units_is_named_and_nothing_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[4].weight.zero_()  # nothing flows back to the group of '0'
    inputs, targets = torch.randn(16, 8), torch.randint(0, 3, (16,))
    model, units = grown(model, {"0": 2}, inputs)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"no loss gradient reaches the new channels of the group of '0'"):
        GradMax().initialize(model, units, [(inputs, targets)])
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_a_failing_initialiser_puts_the_neutral_values_back(monkeypatch):
    inputs, targets = data()
    model, units = grown(conv_net(), {"3": 2}, inputs)
    state = copy.deepcopy(model.state_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(initializers_module, "group_units", broken)
    with pytest.raises(RuntimeError, match="probe failed"):
        GradMax().initialize(model, units, [(inputs, targets)])  # the depthwise filters were already written
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
