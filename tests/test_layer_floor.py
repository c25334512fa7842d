"""Unstructured pruning never empties a layer unless asked to (``min_density``), and says so when one is."""

import functools
import re
import warnings
from pathlib import Path

import pytest
import torch

from growprune import GrowPruneModule
from growprune.criteria import GradientCriterion, MagnitudeCriterion, NNReliefCriterion, RandomCriterion, WeightCriterion
from growprune.errors import ConfigurationError
from growprune.models import create_model
from growprune.schedules import OneShot, Steps
from growprune.strategies import UnstructuredPruning
from growprune.strategies.unstructured import floored_keep_masks
from growprune.surgery.masks import select_layers
from tests.helpers import tiny_data, tiny_trainer

README = Path(__file__).resolve().parents[1] / "README.md"
LAYERS = ("1", "3", "5")  # lenet_300_100's linear layers: 64x300, 300x100, 100x4 on 8x8 inputs


class StarveOutput(WeightCriterion):
    """|w|, but the output layer's weights score below every other weight."""

    def score_layer(self, name, layer):
        score = layer.weight.detach().abs()
        return score * 1e-6 if name == "5" else score + 1.0


def lenet():
    return GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def prune(strategy, tmp_path, epochs=1):
    module = lenet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_trainer(tmp_path, max_epochs=epochs, callbacks=[strategy], limit_train_batches=1, limit_val_batches=0)
        trainer.fit(module, tiny_data(num_samples=64, batch_size=16))
    return module, [str(w.message) for w in caught]


def density(module, layer):
    return float(module.masks[f"{layer}.weight"].mean())


@pytest.mark.parametrize("rewind", [None, 0], ids=["train-on", "rewind"])
def test_default_floor_keeps_a_starved_layer_and_meets_the_target_elsewhere(tmp_path, rewind):
    strategy = UnstructuredPruning(OneShot(amount=0.95, at=0), criterion=StarveOutput(), scope="global",
                                   rewind_epoch=rewind)
    module, said = prune(strategy, tmp_path)
    assert density(module, "5") == pytest.approx(0.01)  # ceil(1 % of 400) = 4 weights
    assert strategy.history[-1]["achieved"] == pytest.approx(0.95, abs=1e-4)
    assert not [message for message in said if "has no weights left" in message]


def test_without_the_floor_the_layer_collapses_and_a_warning_names_it_once(tmp_path):
    strategy = UnstructuredPruning(Steps(steps=[0, 1], amounts=[0.95, 0.96]), criterion=StarveOutput(),
                                   scope="global", min_density=0.0)
    module, said = prune(strategy, tmp_path, epochs=2)
    empty = [message for message in said if "has no weights left" in message]
    assert density(module, "5") == 0.0
    # two pruning steps, one warning per emptied layer ('3' goes too: magnitude at init favours the 64-input layer)
    assert len([m for m in empty if "layer '5' has no weights left (all 400 pruned)" in m]) == 1
    assert len(empty) == len(set(empty))


@pytest.mark.parametrize(
    "criterion",
    [MagnitudeCriterion(), RandomCriterion(seed=1), GradientCriterion(), NNReliefCriterion()],
    ids=["magnitude", "random", "gradient", "nnrelief"],
)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_the_floor_holds_with_every_criterion_and_scope(tmp_path, criterion, scope):
    target = 0.985 if scope == "global" else 0.995
    strategy = UnstructuredPruning(OneShot(amount=target, at=0), criterion=criterion, scope=scope)
    module, said = prune(strategy, tmp_path)
    for layer in LAYERS:
        assert density(module, layer) >= 0.01 - 1e-9, layer
    if scope == "global":
        assert strategy.history[-1]["achieved"] == pytest.approx(target, abs=1e-4)
    else:  # every layer at 99.5 % would fall below 1 %: the floor wins and a warning says so before training
        assert [message for message in said if "below min_density=0.01" in message and "'5' keeps 4 of 400" in message]


def test_a_target_the_floors_make_unreachable_is_refused_before_training(tmp_path):
    module = lenet()
    before = module.model.state_dict()["1.weight"].clone()
    strategy = UnstructuredPruning(OneShot(amount=0.9, at=0), scope="global", min_density=0.2)
    with pytest.raises(ConfigurationError, match=r"min_density=0.2 keeps at least .* so at most 80.00% can go"):
        tiny_trainer(tmp_path, callbacks=[strategy], limit_train_batches=1, limit_val_batches=0).fit(module, tiny_data())
    assert torch.equal(module.model.state_dict()["1.weight"], before) and module.edit_log == []


def readme_criterion():
    """The criterion class of the README's "Your own criterion or strategy" section, run as written."""
    text = README.read_text()
    block = re.search(r"```python\n(# my_methods\.py\n.*?)```", text, re.S)
    assert block, "the README's my_methods.py example is missing"
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    return namespace["RowNormalizedMagnitude"]


class OldRowNormalizedMagnitude(WeightCriterion):
    """The README's example before issue 8: |w| over its unit's L1 norm (scores ~ 1 / fan-in)."""

    def score_layer(self, name, layer):
        weight = layer.weight.detach().abs().flatten(1)
        return (weight / weight.sum(1, keepdim=True).clamp_min(1e-12)).view_as(layer.weight)


def test_the_readme_criterion_does_not_collapse_a_layer_even_without_the_floor():
    torch.manual_seed(0)
    model = create_model("lenet_300_100", num_classes=10, in_channels=1, image_size=(8, 8))
    layers = select_layers(model)
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}

    def densities(criterion):
        masks = floored_keep_masks(criterion.score(model, layers), 0.95, sizes, "global", min_density=0.0)
        return {name: float(mask.mean()) for name, mask in masks.items()}

    assert min(densities(OldRowNormalizedMagnitude()).values()) == 0.0  # the old example emptied the 300-input layer
    kept = densities(readme_criterion()())
    assert min(kept.values()) > 0.02, kept
