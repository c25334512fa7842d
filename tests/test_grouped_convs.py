"""Grouped convolutions (ResNeXt, RegNet): channels change in equal numbers in every conv group, so
every group keeps its own inputs and outputs and the kept channels compute what they did."""


import pytest
import torch
import torch.nn as nn
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import Bottleneck, ResNet

from growprune import GrowPruneModule
from growprune.metrics import dense_flops
from growprune.planning import balanced_subset
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.surgery.channels import ChannelGraph, ChannelGroup
from growprune.surgery.edits import AddChannels
from tests.helpers import masked_copy

SHAPE = (3, 16, 16)


class TinyResNeXt(nn.Module):
    """A stem, two ResNeXt bottlenecks (1x1, 3x3 with 4 groups of 4 channels, 1x1, residual add), a head."""

    def __init__(self, width: int = 16, groups: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(32, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, 32, 1, bias=False), nn.BatchNorm2d(32))
            for _ in range(2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x)


def tiny_regnet():
    """torchvision's RegNet (grouped 3x3 of group width 8, squeeze-excitation) with two tiny stages."""
    params = BlockParams.from_init_params(depth=2, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return RegNet(params, num_classes=10, stem_width=8)


def tiny_resnext_bottleneck():
    """torchvision's ResNet with ResNeXt bottlenecks (4 groups of 4 channels at the first stage)."""
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10)


MODELS = {"tiny ResNeXt": TinyResNeXt, "torchvision RegNet": tiny_regnet, "torchvision ResNeXt bottleneck": tiny_resnext_bottleneck}


def prepared(build):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # batch-norm statistics away from their defaults, so masking and neutral growth are tested
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def assert_valid(model):
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0, name
            assert conv.weight.shape[:2] == (conv.out_channels, conv.in_channels // conv.groups), name


def test_groups_at_a_grouped_conv_come_in_equal_parts():
    graph = ChannelGraph(TinyResNeXt(), torch.zeros(1, *SHAPE))
    groups = {group.root: group for group in graph.groups()}
    feeding, leaving = groups["blocks.0.0"], groups["blocks.0.3"]  # 1x1 -> grouped 3x3 (inputs); grouped 3x3 (outputs) -> 1x1
    for group in (feeding, leaving):
        assert group.step == 4 and group.parts == tuple(tuple(range(p * 4, p * 4 + 4)) for p in range(4))
    stream = next(group for group in groups.values() if ("stem.0", "out") in group.members)
    assert stream.parts == () and stream.step == 1  # the residual stream meets no grouped conv
    # removal and growth orders are balanced: every prefix of 4 takes one channel of each part
    order = feeding.removal_order(torch.arange(16.0).flip(0))
    assert [sorted(i // 4 for i in order[k:k + 4]) for k in range(0, 16, 4)] == [[0, 1, 2, 3]] * 4


@pytest.mark.parametrize(("family", "scope"), [("tiny ResNeXt", "global"), ("tiny ResNeXt", "layer"),
                                               ("torchvision RegNet", "global"), ("torchvision ResNeXt bottleneck", "global")])
def test_half_the_flops_keeps_grouped_convs_valid_and_the_kept_function(family, scope):
    model = prepared(MODELS[family])
    shape = (3, 8, 8) if family == "torchvision ResNeXt bottleneck" else SHAPE  # its 2048-channel stage is slow enough
    module = GrowPruneModule(model, num_classes=10, input_shape=shape)
    dense = dense_flops(model, shape)
    strategy = StructuredPruning(OneShot(amount=0.5), target="flops", scope=scope)
    strategy.check(None, module)  # the set-up used to fail here ("channel surgery cannot handle ... grouped convolution")
    graph = strategy.graph
    groups = graph.groups()
    scores = {group.root: strategy.criterion.score(graph, group) for group in groups}
    plan = strategy.plan(module, groups, scores, 0.5)
    reference = masked_copy(model, graph, plan)
    graph.remove(plan)
    assert_valid(model)
    ratio = dense_flops(model, shape) / dense
    if scope == "global":
        assert ratio == pytest.approx(0.5, abs=0.015)
    else:  # every group loses the same fraction, rounded to whole parts: at least the target
        assert 0.4 < ratio <= 0.5 + 1e-9
    inputs = torch.randn(2, *shape)
    with torch.no_grad():
        assert (model(inputs) - reference(inputs)).abs().max() < 1e-5
    for group in graph.groups():  # every part kept as many channels as the others
        assert len({len(part) for part in group.parts}) <= 1


def test_adding_channels_back_keeps_groups_valid_and_the_output():
    model = prepared(tiny_regnet)
    module = GrowPruneModule(model, num_classes=10, input_shape=SHAPE)
    graph = module.channel_graph()
    graph.remove({group.root: group.balanced(group.step) for group in graph.groups() if group.channels > group.step})
    inputs = torch.randn(2, *SHAPE)
    with torch.no_grad():
        expected = model(inputs)
    grouped = {name: conv for name, conv in model.named_modules() if isinstance(conv, nn.Conv2d) and conv.groups > 1}
    before = {name: conv.weight.detach().clone() for name, conv in grouped.items()}
    plan = {group.root: 2 * group.step for group in module.channel_graph().groups() if group.parts}
    assert plan
    module.apply_edit(AddChannels(plan))  # the edit the growth strategies use
    assert_valid(model)
    with torch.no_grad():
        assert (model(inputs) - expected).abs().max() < 1e-5
    for name, conv in grouped.items():
        old = before[name]
        per_group_in, old_in = conv.in_channels // conv.groups, old.shape[1]
        assert per_group_in > old_in  # every conv group grew by the same number of inputs ...
        new_inputs = conv.weight[:, old_in:]  # ... appended after its own ones: their weights are zero
        assert torch.count_nonzero(new_inputs) == 0, name
    # grow by ChannelGraph.add directly too, then remove what was added: the network is as before
    graph = module.channel_graph()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    groups = {group.root: group for group in graph.groups()}
    root = next(root for root in plan if groups[root].parts)
    graph.add({root: groups[root].step})
    grown = {group.root: group for group in graph.groups()}[root]
    added = sorted(set(range(grown.channels)) - {i for part in grown.parts for i in part[:-1]})
    graph.remove({root: added})
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_requests_that_break_a_grouped_conv_name_the_layer():
    model = TinyResNeXt()
    graph = ChannelGraph(model, torch.zeros(1, *SHAPE))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'blocks.0.3'.*every group must keep as many.*\[4, 0, 0, 0\]"):
        graph.remove({"blocks.0.0": [0, 1, 2, 3]})  # the whole first part: the conv groups would differ
    with pytest.raises(ValueError, match=r"multiples of 4 \(4 equal parts for grouped convolution layer .blocks.0.3.\), got 2"):
        graph.add({"blocks.0.0": 2})
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())

    class Concatenated(nn.Module):
        """A grouped conv fed by a concatenation of two layers: their groups would have to change together."""

        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

        def forward(self, x):
            return self.head(self.grouped(torch.cat([self.left(x), self.right(x)], 1)))

    with pytest.warns(UserWarning, match="stay whole"):
        graph = ChannelGraph(Concatenated(), torch.zeros(1, *SHAPE))
    assert {"left", "right"} <= set(graph.held) and "grouped" in {group.root for group in graph.groups()}
    with pytest.raises(ValueError, match=r"'left' stay whole.*grouped convolution 'grouped' \(4 groups\) together with"):
        graph.remove({"left": [0]})


def test_round_to_and_min_channels_hold_with_parts():
    model = prepared(TinyResNeXt)
    module = GrowPruneModule(model, num_classes=10, input_shape=SHAPE)
    strategy = StructuredPruning(OneShot(amount=0.4), target="flops", round_to=8, min_channels=8)
    strategy.check(None, module)
    groups = strategy.graph.groups()
    scores = {group.root: strategy.criterion.score(strategy.graph, group) for group in groups}
    strategy.graph.remove(strategy.plan(module, groups, scores, 0.4))
    assert_valid(model)
    for group in strategy.graph.groups():
        assert group.channels % 8 == 0 and group.channels >= 8, group.root


def test_threshold_rules_take_the_same_number_from_every_part():
    # network slimming / polarization pick channels below a threshold: a part with fewer candidates limits all parts
    group = ChannelGroup("x", 8, step=2, parts=((0, 1, 2, 3), (4, 5, 6, 7)))
    assert balanced_subset(group, [0, 1, 2, 4], 4) == [0, 4]
    assert balanced_subset(group, [0, 5, 1, 4, 2, 6], 6) == [0, 1, 2, 5, 4, 6]
    assert balanced_subset(group, [0, 5, 1, 4, 2, 6], 6, multiple=4) == [0, 1, 5, 4]  # keeps 4, a multiple of 4
    assert balanced_subset(ChannelGroup("y", 4), [3, 1, 2], 2) == [3, 1]
