"""ActivityCriterion (NNrelief's structured rule): activity is measured where the network sees it."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune.criteria import ActivityCriterion
from growprune.models import create_model
from growprune.surgery.channels import ChannelGraph
from tests.helpers import ResidualMLP


def activity_scores(model, inputs, root, criterion=None):
    """Unnormalised ActivityCriterion scores of the group rooted at ``root``."""
    graph = ChannelGraph(model, inputs[:1])
    criterion = criterion or ActivityCriterion(normalize=False)
    criterion.prepare(model, [(inputs, torch.zeros(len(inputs), dtype=torch.long))])
    return criterion.score(graph, next(group for group in graph.groups() if group.root == root))


def set_dead_and_revived_channels(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Channel 0: post-BN-ReLU output always 0 (BN beta -1e3) although its conv output is often
    positive. Channel 1: conv output always -5, but BN (gamma -1) turns it into +5."""
    with torch.no_grad():
        norm.bias[0] = -1e3
        conv.weight[1] = 0.0
        conv.bias[1] = -5.0
        norm.weight[1] = -1.0
        norm.bias[1] = 0.0


class ConvBNFunctionalReLU(nn.Module):
    """conv -> BN -> F.relu (a function, not an nn.ReLU module) -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.norm(self.conv(x))), 1))


class Untraceable(ConvBNFunctionalReLU):
    """The same network with data-dependent control flow, which torch.fx cannot trace."""

    def forward(self, x):
        if x.sum() > 1e9:  # never true; torch.fx refuses the branch anyway
            x = x * 2
        return super().forward(x)


def test_activity_is_measured_after_batch_norm_and_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    set_dead_and_revived_channels(model[0], model[1])
    model.train()
    scores = activity_scores(model, torch.randn(8, 1, 8, 8), "0")
    assert scores[0] == 0  # the network only ever sees 0 from it
    assert scores[1] == pytest.approx(5.0, rel=1e-3)  # BN in eval mode: -1 * (-5 - 0) / sqrt(1 + eps)
    assert scores[2] > 0
    assert model.training and model[1].training  # modes restored
    assert torch.all(model[1].running_mean == 0)  # and batch-norm statistics untouched


def test_functional_relu_is_part_of_the_chain():
    torch.manual_seed(0)
    model = ConvBNFunctionalReLU()
    set_dead_and_revived_channels(model.conv, model.norm)
    inputs = torch.randn(8, 1, 8, 8)
    scores = activity_scores(model, inputs, "conv")
    assert scores[0] == 0 and scores[1] > 0 and scores[2] > 0
    # the score is the mean of exactly what the linear layer receives, channel by channel
    with torch.no_grad():
        model.eval()
        seen = F.relu(model.norm(model.conv(inputs)))
    torch.testing.assert_close(scores, seen.mean(dim=(0, 2, 3)))


def test_conv3d_layers_are_scored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3 * 3, 2))
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0
    scores = activity_scores(model, torch.randn(4, 1, 4, 4, 4), "0")
    assert scores.shape == (3,)
    assert scores[2] == 0 and torch.all(scores[:2] > 0)


def test_unit_feeding_a_residual_add_is_measured_before_the_add():
    """The add mixes the unit with another signal: its activity is taken at the last unit-preserving op."""

    torch.manual_seed(0)
    model = ResidualMLP(inputs=4, width=6, classes=2)
    with torch.no_grad():
        model.fc2.weight[3] = 0.0
        model.fc2.bias[3] = -1.0  # dead after its ReLU, although the add still carries fc1's unit 3
    inputs = torch.randn(16, 4)
    graph = ChannelGraph(model, inputs[:1])
    (group,) = graph.groups()  # the add couples fc1's and fc2's units; fc2 is the root
    criterion = ActivityCriterion(normalize=False)
    criterion.prepare(model, [(inputs, None)])
    with torch.no_grad():
        expected = F.relu(model.fc2(F.relu(model.fc1(inputs)))).mean(dim=0)
    assert group.root == "fc2"
    torch.testing.assert_close(criterion.score(graph, group), expected)
    assert expected[3] == 0 and expected.sum() > 0


def test_untraceable_models_fall_back_with_one_warning():
    torch.manual_seed(0)
    model = Untraceable()
    set_dead_and_revived_channels(model.conv, model.norm)
    inputs = torch.randn(8, 1, 8, 8)
    criterion = ActivityCriterion(normalize=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = activity_scores(model, inputs, "conv", criterion)
        second = activity_scores(model, inputs, "conv", criterion)
    messages = [str(w.message) for w in caught if "ActivityCriterion" in str(w.message)]
    assert len(messages) == 1 and "torch.fx could not trace" in messages[0], messages
    # the fallback applies the group's batch norm that runs right after the root, then a ReLU
    for scores in (first, second):
        assert scores[0] == 0 and scores[1] > 0 and scores[2] > 0
    # a traceable model does not warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        activity_scores(create_model("lenet5", image_size=16), torch.randn(4, 1, 16, 16), "0")
    assert not [w for w in caught if "ActivityCriterion" in str(w.message)]
