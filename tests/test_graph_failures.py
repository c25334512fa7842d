"""Where Torch-Pruning's dependency graph goes wrong: channel shuffles, chunks, blocks that call their
layers' weights functionally (torchvision's Swin), graphs that grow without bound. Each is handled
(the channels through it stay whole) or refused with a message naming the part, before any change."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning
from torchvision.models.shufflenetv2 import ShuffleNetV2

from growprune import GrowPruneModule
from growprune.errors import ConfigurationError
from growprune.metrics import dense_flops
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.surgery.channels import ChannelGraph
from growprune.surgery.depgraph import GraphLimits
from tests.helpers import masked_copy


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}, model.training, \
        [p.requires_grad for p in model.parameters()]


def unchanged(model, before):
    state, training, flags = before
    return model.training == training and [p.requires_grad for p in model.parameters()] == flags and \
        model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def prune_and_compare(model, shape, amount):
    """Structured global pruning of ``amount`` of the FLOPs; returns (FLOPs kept, max |pruned - masked|)."""
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    module = GrowPruneModule(model, num_classes=10, input_shape=shape)
    dense = dense_flops(model, shape)
    strategy = StructuredPruning(OneShot(amount=amount), target="flops")
    strategy.check(None, module)
    groups = strategy.graph.groups()
    scores = {group.root: strategy.criterion.score(strategy.graph, group) for group in groups}
    plan = strategy.plan(module, groups, scores, amount)
    reference = masked_copy(model, strategy.graph, plan)
    strategy.graph.remove(plan)
    inputs = torch.randn(2, *shape)
    with torch.no_grad():
        return dense_flops(model, shape) / dense, float((model(inputs) - reference(inputs)).abs().max())


# ------------------------------------------------------------------------------ channel shuffle
def tiny_shufflenet():
    return ShuffleNetV2(stages_repeats=[2, 2, 2], stages_out_channels=[8, 16, 32, 64, 128], num_classes=10)


def test_channel_shuffle_groups_stay_whole_and_the_rest_prunes_exactly():
    model = tiny_shufflenet()
    before = snapshot(model)
    # Torch-Pruning alone: ZeroDivisionError in its index mapping (torchvision's shufflenet_v2), or groups
    # mapped through the shuffle as if it kept channels in place (this tiny one: the dry run failed)
    with pytest.warns(UserWarning, match=r"stay whole: .*channel shuffle in 'stage\d\.\d' \(view"):
        graph = ChannelGraph(model, torch.zeros(1, 3, 16, 16))
    assert unchanged(model, before)
    shuffled = [root for root, reason in graph.held.items() if "channel shuffle" in reason]
    assert "stage2.0.branch2.5" in shuffled and any("channel shuffle in 'stage2.0'" in graph.held[root] for root in shuffled)
    assert not set(shuffled) & {group.root for group in graph.groups()}
    with pytest.raises(ValueError, match=r"'stage2.0.branch2.5' stay whole: its channels pass through a channel shuffle in 'stage2.0'"):
        graph.remove({"stage2.0.branch2.5": [0]})
    assert unchanged(model, before)
    with pytest.warns(UserWarning, match="stay whole"):  # the module's own graph says so too
        kept, difference = prune_and_compare(model, (3, 16, 16), 0.4)  # the branches' inner groups, the stem and conv5
    assert 0.45 < kept <= 0.6 and difference < 1e-5  # within a channel's cost: one of the stem's 8 is 4 % here


class CrossStage(nn.Module):
    """A CSP-style block: half the channels pass, half go through a branch, then both are concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        passed, branched = x.chunk(2, dim=1)
        return self.head(self.mix(torch.cat([self.branch(branched), passed], 1)))


def test_chunked_channels_change_in_equal_pieces():
    # Torch-Pruning mis-sized the chunk (and took its pieces in the wrong order): the dry run failed
    graph = ChannelGraph(CrossStage(), torch.zeros(1, 3, 8, 8))
    stem = {group.root: group for group in graph.groups()}["stem.0"]
    assert stem.step == 2 and stem.parts == (tuple(range(8)), tuple(range(8, 16)))
    with pytest.raises(ValueError, match=r"multiples of 2 \(2 equal parts for chunk SplitBackward0"):
        graph.remove({"stem.0": [0]})
    kept, difference = prune_and_compare(CrossStage(), (3, 8, 8), 0.3)
    assert kept < 0.75 and difference < 1e-5


# ---------------------------------------------------------- weights used outside their layer (Swin)
class FunctionalAttention(nn.Module):
    """Attention that passes its layers' weights to F.linear, as torchvision's ShiftedWindowAttention does."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(2, 4, 4))  # a relative-position-bias-like table (2 heads)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(batch, tokens, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) + self.bias, -1)
        out = (attention @ qkv[2]).transpose(1, 2).reshape(batch, tokens, dim)
        return F.linear(out, self.proj.weight, self.proj.bias)


class TinySwinLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = FunctionalAttention(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def test_a_block_that_calls_its_layers_weights_functionally_is_held_whole():
    model = TinySwinLike()
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"'attn' \(FunctionalAttention\), which passes the weights of 'attn.qkv' to linear\(\)"):
        graph = ChannelGraph(model, torch.zeros(1, 4, 6))
    assert unchanged(model, before)
    assert list(graph.held) == ["mlp.2"]  # the residual stream (embed, attn, mlp.2) runs through the block: it stays whole
    assert [group.root for group in graph.groups()] == ["mlp.0"]  # the MLP's hidden units still prune
    inputs = torch.randn(2, 4, 6)
    with torch.no_grad():
        expected = model(inputs)
        model.mlp[0].weight[:4] = 0  # the 4 channels about to go contribute nothing
        model.mlp[0].bias[:4] = 0
        expected = model(inputs)
    graph.remove({"mlp.0": [0, 1, 2, 3]})
    with torch.no_grad():
        assert (model(inputs) - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------- bounded graph building
def small_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (GraphLimits(max_indices=100), r"channel group of '.*' grows past 100 channel indices .* at '.*'"),
        (GraphLimits(max_nodes=10), r"has \d+ nodes, more than GraphLimits.max_nodes = 10"),
        (GraphLimits(max_total_indices=1000), r"more than GraphLimits.max_total_indices = 1,000 .* at the group of '.*'"),
        (GraphLimits(max_seconds=1e-9), r"took longer than GraphLimits.max_seconds = 1e-09 s \(at the group of '.*'\)"),
    ],
)
def test_a_graph_over_its_limits_is_refused_before_any_change(limits, message):
    model = small_resnet()
    model.layer1.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ConfigurationError, match=message):
        ChannelGraph(model, torch.zeros(1, 3, 16, 16), limits=limits)
    assert unchanged(model, before)


def test_a_graph_library_failure_names_the_operation_and_module(monkeypatch):
    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.shape[0], -1))

    def broken(graph, node):  # what Torch-Pruning's reshape mapping did on ShuffleNet
        return 1 // 0

    monkeypatch.setattr(torch_pruning.dependency.index_mapping, "update_reshape_index_mapping", broken)
    model = Flattening()
    before = snapshot(model)
    with pytest.raises(ConfigurationError, match=r"Torch-Pruning failed building its channel dependency graph for "
                                                 r"Flattening at ViewBackward0 in the model's own forward: ZeroDivisionError"):
        ChannelGraph(model, torch.zeros(1, 3, 8, 8))
    assert unchanged(model, before)
    with pytest.raises(ValueError):  # a ConfigurationError is a ValueError: the command line prints it in one line
        ChannelGraph(model, torch.zeros(1, 3, 8, 8), check=False)


def test_the_time_limit_covers_building_not_the_graphs_later_use(monkeypatch):
    import growprune.surgery.depgraph as depgraph

    model = CrossStage()
    graph = ChannelGraph(model, torch.zeros(1, 3, 8, 8), limits=GraphLimits(max_seconds=60))
    later = depgraph.time.monotonic() + 3600.0  # an hour of training later, the graph still works
    monkeypatch.setattr(depgraph.time, "monotonic", lambda: later)
    graph.remove({"stem.0": [0, 8]})
    assert model.stem[0].out_channels == 14 and model(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
