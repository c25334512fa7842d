"""The unit-level graph (growprune.surgery.units): unit links, chain ends, forward order."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune.models import create_model
from growprune.strategies import nnrelief as nnrelief_module
from growprune.surgery.units import (
    UnitEnd,
    UnitGraph,
    UnitLink,
    UnitTraceError,
    execution_order,
    forward_order,
    is_unit_layer,
    trace_unit_links,
)
from tests.helpers import ResidualMLP


class ResidualBlock(nn.Module):
    """stem -> [conv1 -> bn1 -> relu -> conv2 -> bn2] + identity -> relu -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = F.relu(out + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc2(F.relu(self.fc1(x)))


# ---------------------------------------------------------------------------------- links
def test_non_sequential_links_are_not_guessed():
    report = trace_unit_links(ResidualMLP(), torch.randn(2, 1, 8, 8))
    assert report.links == {} and report.final == {"out"}
    assert set(report.unlinked) == {"fc1", "fc2"}
    assert "2 operations" in report.unlinked["fc1"] and "add" in report.unlinked["fc2"]


def test_conv_flatten_linear_chain_is_linked_by_channel_blocks():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 5), nn.ReLU(), nn.Linear(5, 2))
    report = trace_unit_links(model, torch.randn(2, 1, 8, 8))  # 8 -> 6 -> 3: 3 channels x 9 inputs
    assert report.links == {"0": UnitLink("5", 9), "5": UnitLink("7", 1)}


def test_names_stay_importable_from_the_nnrelief_strategy():
    assert nnrelief_module.UnitLink is UnitLink and nnrelief_module.trace_unit_links is trace_unit_links
    assert nnrelief_module.LinkReport().links == {}


def test_lenet_300_100_is_one_chain_of_links():
    report = trace_unit_links(create_model("lenet_300_100", image_size=8), torch.randn(2, 1, 8, 8))
    assert report.links == {"1": UnitLink("3", 1), "3": UnitLink("5", 1)}
    assert report.final == {"5"} and report.unlinked == {}


def test_lenet5_conv_flatten_linear_link_has_the_spatial_block_size():
    model = create_model("lenet5", image_size=28)  # 28 -> 24 -> 12 -> 8 -> 4: 50 channels x 16 inputs
    inputs = torch.randn(3, 1, 28, 28)
    report = trace_unit_links(model, inputs[:2])
    assert report.links == {"0": UnitLink("3", 1), "3": UnitLink("7", 16), "7": UnitLink("9", 1)}
    assert report.final == {"9"} and report.unlinked == {}
    # the end of conv 3's chain is the consumer's input: the flattened (N, 50 * 16) tensor
    graph = UnitGraph(model, inputs[:2])
    (end,) = graph.ends("3")
    assert (end.dim, end.block) == (1, 16)
    seen = {}
    graph.run(inputs, [end.node], seen.__setitem__)
    with torch.no_grad():
        expected = model[:6](inputs)  # conv, relu, pool, conv, relu, pool: (3, 50, 4, 4)
    assert seen[end.node].shape == (3, 800)
    torch.testing.assert_close(end.per_unit(seen[end.node]), expected.transpose(0, 1).reshape(50, -1))


def test_residual_add_leaves_the_producer_unlinked_with_the_reason():
    model = ResidualBlock()
    model.train()
    report = trace_unit_links(model, torch.randn(2, 3, 6, 6))
    assert report.links == {"conv1": UnitLink("conv2", 1)}  # inside the block: proven
    assert report.final == {"fc"}
    assert set(report.unlinked) == {"stem", "conv2"}
    assert "add" in report.unlinked["conv2"] and "may mix units" in report.unlinked["conv2"]
    assert "2 operations" in report.unlinked["stem"]  # it feeds conv1 and the shortcut
    assert model.training and model.bn1.training  # traced in eval mode, modes restored
    # where each chain ends: the consumer's input, or the last op before the add
    graph = UnitGraph(model, torch.randn(2, 3, 6, 6))
    nodes = {node.name: node for node in graph.module.graph.nodes}
    (conv2_end,) = graph.ends("conv2")
    assert nodes[conv2_end.node].target == "bn2" and conv2_end == UnitEnd(conv2_end.node, 1, 1)
    (conv1_end,) = graph.ends("conv1")
    assert nodes[conv1_end.node].target is F.relu and list(nodes[conv1_end.node].users)[0].target == "conv2"


def test_untraceable_model_has_no_links_and_says_why():
    report = trace_unit_links(Untraceable(), torch.randn(2, 4))
    assert report.links == {} and set(report.unlinked) == {"fc1", "fc2"}
    assert all(reason.startswith("torch.fx could not trace the model") for reason in report.unlinked.values())
    with pytest.raises(UnitTraceError, match="torch.fx could not trace"):
        UnitGraph(Untraceable(), torch.randn(2, 4))


# ---------------------------------------------------------------------------- forward order
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(4, 2)  # defined first, runs last
        self.unused = nn.Linear(4, 4)
        self.fc_in = nn.Linear(3, 4)
        self.fc_shared = nn.Linear(4, 4)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        x = F.relu(self.fc_in(x))
        x = self.dropout(F.relu(self.fc_shared(x)))
        x = F.relu(self.fc_shared(x))
        return self.out(x)


def test_forward_order_gives_order_and_call_counts():
    model = Shared()
    model.train()
    order, counts = forward_order(model, torch.randn(2, 3))
    assert order == ["fc_in", "fc_shared", "out"]  # the unused layer never runs: left out
    assert counts == {"fc_in": 1, "fc_shared": 2, "out": 1}
    assert execution_order(model, torch.randn(2, 3)) == order
    assert model.training and model.dropout.training
    # selected layers: the same, and a selected layer that never runs is an error
    assert forward_order(model, torch.randn(2, 3), {"out": model.out, "fc_in": model.fc_in}) == (["fc_in", "out"], {"fc_in": 1, "out": 1})
    with pytest.raises(ValueError, match="'unused' never ran"):
        forward_order(model, torch.randn(2, 3), {"unused": model.unused, "out": model.out})
    # a layer that runs twice cannot be linked
    assert UnitGraph(model, torch.randn(2, 3)).problem("fc_shared") == "'fc_shared' runs 2 times per forward pass"


def test_unit_layers_are_linear_and_forward_convs_of_any_dimensionality():
    assert all(is_unit_layer(m) for m in (nn.Linear(2, 2), nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1)))
    assert not any(is_unit_layer(m) for m in (nn.ConvTranspose2d(1, 1, 1), nn.Embedding(3, 2), nn.BatchNorm2d(2)))
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.ReLU(), nn.Conv3d(2, 3, 2), nn.Flatten(), nn.Linear(3 * 2 * 2 * 2, 2))
    assert execution_order(model, torch.randn(1, 1, 4, 4, 4)) == ["0", "2", "4"]
    report = trace_unit_links(model, torch.randn(2, 1, 4, 4, 4))
    assert report.links == {"0": UnitLink("2", 1), "2": UnitLink("4", 8)}
