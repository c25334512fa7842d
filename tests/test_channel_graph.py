"""ChannelGraph surgery in both directions on every structural family: chains, residual streams,
depthwise (multiplier 1 and 2), concatenation, attention."""

import pytest
import torch
import torch.nn as nn
import torchvision

from growprune.models import create_model
from growprune.surgery.channels import ChannelGraph


class DepthwiseX2(nn.Module):
    """conv -> BN -> depthwise conv with channel multiplier 2 -> BN -> pointwise conv -> classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.pointwise(self.depthwise(self.stem(x))))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(1))


def randomise_norms(model):
    """Batch-norm statistics and scales away from their defaults, so neutral new channels are tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


FAMILIES = {
    "chain (lenet_300_100)": (lambda: create_model("lenet_300_100", num_classes=10, image_size=8), (1, 8, 8)),
    "conv chain with BN (vgg11_bn)": (lambda: create_model("vgg11_bn", num_classes=10), (3, 16, 16)),
    "residual (resnet20, shortcut B)": (lambda: create_model("resnet20", num_classes=10, shortcut="B"), (3, 16, 16)),
    "residual (torchvision resnet18)": (lambda: create_model("torchvision.resnet18", num_classes=10), (3, 32, 32)),
    "inverted residual, depthwise (torchvision mobilenet_v2)": (lambda: create_model("torchvision.mobilenet_v2", num_classes=10), (3, 32, 32)),
    "depthwise, multiplier 2": (DepthwiseX2, (3, 8, 8)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adding_channels_keeps_the_function_and_removing_them_restores_the_network(family):
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    randomise_norms(model)
    inputs = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(inputs)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    # the dry run (check=True) is tested elsewhere; here it would double the time on the big models
    graph = ChannelGraph(model, torch.zeros(1, *shape), check="torchvision" not in family)
    groups = graph.groups()
    added = graph.add({group.root: 2 * group.step for group in groups})
    with torch.no_grad():
        grown = model(inputs)
    assert (grown - expected).abs().max() < 1e-5  # new channels are neutral: the function is unchanged
    assert all(name in added for name, tensor in model.state_dict().items() if tensor.shape != state[name].shape)
    # remove exactly the channels that were added (after each group's old ones)
    groups_now = {group.root: group for group in graph.groups()}
    graph.remove({group.root: list(range(group.channels, group.channels + 2 * group.step)) for group in groups
                  if groups_now[group.root].channels == group.channels + 2 * group.step})
    assert {name: tensor.shape for name, tensor in model.state_dict().items()} == {name: t.shape for name, t in state.items()}
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


def tiny_densenet():
    """torchvision's DenseNet with small widths: the same concatenation structure as densenet121, fast."""
    return torchvision.models.DenseNet(growth_rate=8, block_config=(3, 2), num_init_features=16, bn_size=2, num_classes=10)


def test_densenet_concatenation_grows_in_the_middle_and_prunes_back():
    torch.manual_seed(0)
    model = tiny_densenet().eval()
    randomise_norms(model)
    inputs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(inputs)
    graph = ChannelGraph(model, torch.zeros(1, 3, 16, 16))
    root = "features.denseblock1.denselayer1.conv2"  # its 8 channels are concatenated after the stem's 16
    consumer = model.features.denseblock1.denselayer2.conv1
    before = consumer.weight.detach().clone()
    changes = graph.add({root: 3})
    # the consumer reads [stem 16 | layer1 8 + 3 new]: the new inputs sit at 24..26, zero
    assert consumer.in_channels == 27 and torch.all(consumer.weight[:, 24:27] == 0)
    assert torch.equal(consumer.weight[:, :24], before)
    later = model.features.denseblock1.denselayer3.conv1  # reads [stem | layer1 + new | layer2]: new ones in the middle
    assert later.in_channels == 35 and torch.all(later.weight[:, 24:27] == 0)
    assert changes["features.denseblock1.denselayer3.conv1.weight"].index[1][22:29].tolist() == [22, 23, -1, -1, -1, 24, 25]
    with torch.no_grad():
        assert (model(inputs) - expected).abs().max() < 1e-5
    graph.remove({root: [8, 9, 10]})
    assert consumer.in_channels == 24 and torch.equal(consumer.weight, before)
    with torch.no_grad():
        assert torch.equal(model(inputs), expected)


def test_depthwise_multiplier_two_couples_inputs_and_outputs():
    model = DepthwiseX2()
    graph = ChannelGraph(model, torch.zeros(1, 3, 8, 8))
    groups = {group.root: group for group in graph.groups()}
    # the depthwise conv's outputs belong to the group that feeds it (removing input i removes outputs 2i, 2i+1)
    assert "depthwise.0" not in groups
    assert ("depthwise.0", "out") in groups["stem.0"].members and ("pointwise.0", "in") in groups["stem.0"].members
    old = model.depthwise[0].weight.detach().clone()
    graph.remove({"stem.0": [1, 5]})
    dw = model.depthwise[0]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (6, 12, 6)
    kept_outputs = [i for i in range(16) if i // 2 not in (1, 5)]
    assert torch.equal(dw.weight.detach(), old[kept_outputs])
    assert model.pointwise[0].in_channels == 12 and model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)


def test_attention_groups_change_by_whole_heads_and_map_every_tensor():
    torch.manual_seed(0)
    model = TinyTransformer()
    graph = ChannelGraph(model, torch.zeros(1, 4, 5))
    stream = next(group for group in graph.groups() if ("block.self_attn", "out") in group.members)
    assert stream.step == 2  # two heads: the embedding changes two channels at a time
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    changes = graph.remove({stream.root: [1, 6]})
    attention = model.block.self_attn
    assert attention.embed_dim == 6 and attention.head_dim == 3 and model(torch.randn(2, 4, 5)).shape == (2, 3)
    kept = [0, 2, 3, 4, 5, 7]
    packed = kept + [8 + i for i in kept] + [16 + i for i in kept]
    # the packed q/k/v projection loses its rows in all three parts and its columns (one map per dimension)
    assert torch.equal(attention.in_proj_weight.detach(), before["block.self_attn.in_proj_weight"][packed][:, kept])
    for name, change in changes.items():
        assert torch.equal(change.carry(before[name], model.state_dict()[name].shape), model.state_dict()[name]), name
    assert not graph.unmapped


def test_removing_refuses_bad_plans_before_changing_anything():
    model = create_model("lenet_300_100", image_size=8)
    graph = ChannelGraph(model, torch.zeros(1, 1, 8, 8))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for plan, message in [({"3": list(range(100))}, "whole layer"), ({"5": [0]}, "not the root"),
                          ({"1": [0], "3": [100]}, "0..99")]:
        with pytest.raises(ValueError, match=message):
            graph.remove(plan)
    with pytest.raises(ValueError, match=">= 0"):
        graph.add({"1": -1})
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


def test_grouped_convolution_plans_that_break_a_group_are_refused_before_any_change():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # two groups of 4 channels
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

        def forward(self, x):
            return self.head(self.grouped(torch.relu(self.stem(x))))

    model = Grouped()
    graph = ChannelGraph(model, torch.zeros(1, 3, 6, 6), check=False)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'grouped'.*every group must keep as many"):
        graph.remove({"stem": [0, 1]})  # both from the first group: the groups would keep 2 and 4
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())  # the stem too
    graph.remove({"stem": [0, 5]})  # one from each group: valid
    assert model.grouped.in_channels == 6 and model(torch.zeros(1, 3, 6, 6)).shape == (1, 2)
