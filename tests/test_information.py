"""Binned plug-in mutual information: known answers, and the layers information_measures reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from growprune.information import (entropy, information_from_activations, information_measures, mutual_information,
                                   symbols)


def _histogram_entropy(x: np.ndarray, bins: int) -> float:
    counts, _ = np.histogram(x, bins=bins)
    p = counts[counts > 0] / len(x)
    return float(-(p * np.log2(p)).sum())


def test_independent_variables_give_about_zero():
    rng = np.random.default_rng(0)
    n, bins = 20000, 10
    x, y = rng.normal(size=n), rng.uniform(size=n)
    # plug-in bias for independent variables: about (bins - 1)^2 / (2 N ln 2) = 0.0029 bits here
    bias = (bins - 1) ** 2 / (2 * n * math.log(2))
    assert 0 <= mutual_information(x, y, bins=bins) < 3 * bias


def test_a_copy_gives_its_entropy_exactly():
    rng = np.random.default_rng(1)
    x = rng.normal(size=5000)
    value = mutual_information(x, x.copy(), bins=30)
    assert value == pytest.approx(entropy(x, bins=30), abs=1e-12)
    assert value == pytest.approx(_histogram_entropy(x, 30), abs=1e-12)  # numpy's equal-width bins agree


def test_deterministic_functions_give_the_entropy_of_the_function():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 8, size=4096)
    folded = labels % 4  # H(f(X)) bits: the information X carries about f(X)
    p = np.bincount(folded) / len(folded)
    assert mutual_information(labels, folded) == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-12)
    x = rng.normal(size=3000)
    # an affine map moves every value to the mirrored bin (up to a few values on bin edges)
    assert mutual_information(x, -3.0 * x + 1.0, bins=20) == pytest.approx(entropy(x, bins=20), abs=0.01)


def test_labels_with_known_entropy():
    labels = np.repeat(np.arange(8), 50)  # uniform over 8 classes: 3 bits
    assert entropy(labels) == pytest.approx(3.0, abs=1e-12)
    assert mutual_information(labels, labels) == pytest.approx(3.0, abs=1e-12)
    two = np.repeat([0, 1], [300, 100])  # 0.75 / 0.25
    assert entropy(two) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), abs=1e-12)
    assert entropy(torch.tensor(labels)) == pytest.approx(3.0, abs=1e-12)  # tensors work too


def test_layers_are_tuples_of_unit_bins_and_saturate_at_log2_n():
    a = np.repeat([0, 1], 200)
    b = np.tile([0, 1], 200)
    both = np.stack([a, b], axis=1)  # 4 equally likely symbols
    assert entropy(both) == pytest.approx(2.0, abs=1e-12)
    assert mutual_information(both, a) == pytest.approx(1.0, abs=1e-12)
    wide = np.random.default_rng(3).normal(size=(256, 50))  # every row its own symbol
    assert entropy(wide) == pytest.approx(8.0, abs=1e-12)
    assert len(np.unique(symbols(wide))) == 256


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same number of samples"):
        mutual_information(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="bins must be an integer >= 1"):
        mutual_information(np.zeros(3), np.zeros(3), bins=0)
    with pytest.raises(ValueError, match="finite"):
        entropy(np.array([0.0, np.nan]))


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.out = nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(self.act(self.fc1(x)))))


def test_information_measures_reads_each_layer_after_its_activation():
    generator = torch.Generator().manual_seed(0)
    model = _Mlp()
    inputs = torch.randn(300, 4, generator=generator)
    targets = torch.randint(0, 3, (300,), generator=generator)
    result = information_measures(model, inputs, targets, bins=4)
    with torch.no_grad():
        h1 = torch.tanh(model.fc1(inputs))
        h2 = torch.relu(model.fc2(h1))
        logits = model.out(h2)
    expected = information_from_activations([h1.numpy(), h2.numpy(), logits.numpy()], targets.numpy(), bins=4)
    renamed = {key.replace("/0", "/fc1").replace("/1", "/fc2").replace("/2", "/out"): v for key, v in expected.items()}
    assert result == pytest.approx(renamed, abs=1e-12)
    assert set(result) == {"mi_label/fc1", "mi_label/fc2", "mi_label/out", "mi_next/fc1", "mi_next/fc2",
                           "mi_label", "mi_consecutive", "mi_label_unit"}
    assert result["mi_label"] == pytest.approx((result["mi_label/fc1"] + result["mi_label/fc2"]) / 2)
    assert result["mi_consecutive"] == pytest.approx((result["mi_next/fc1"] + result["mi_next/fc2"]) / 2)
    assert result["mi_next/fc1"] == pytest.approx(mutual_information(h1.numpy(), h2.numpy(), bins=4))


def test_conv_outputs_are_averaged_over_space_after_bn_and_relu():
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model.train()
    inputs = torch.randn(64, 1, 6, 6, generator=generator)
    targets = torch.randint(0, 2, (64,), generator=generator)
    result = information_measures(model, inputs, targets, bins=5)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        channels = model[2](model[1](model[0](inputs))).mean(dim=(2, 3)).numpy()
    assert result["mi_label/0"] == pytest.approx(mutual_information(channels, targets.numpy(), bins=5), abs=1e-12)


def test_information_from_activations_with_one_layer_has_nan_aggregates():
    labels = np.repeat(np.arange(4), 10)
    result = information_from_activations([np.eye(4)[labels]], labels)
    assert result["mi_label/0"] == pytest.approx(2.0)
    assert math.isnan(result["mi_label"]) and math.isnan(result["mi_consecutive"])
    with pytest.raises(ValueError, match="layer '1' has 5 samples but targets have 40"):
        information_from_activations([np.eye(4)[labels], np.zeros((5, 2))], labels)


def test_unit_information_does_not_saturate_where_the_layer_joint_does():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=400)
    informative = labels[:, None] + 0.01 * rng.standard_normal((400, 50))   # every unit carries the label
    noise = rng.standard_normal((400, 50))                                    # no unit does
    output = np.eye(4)[labels]
    from growprune.information import unit_label_information
    # the joint symbol of 50 noisy units is unique per sample: the layer-level estimate saturates at H(Y)
    for hidden in (informative, noise):
        values = information_from_activations([hidden, output], labels)
        assert values["mi_label"] == pytest.approx(mutual_information(labels, labels), abs=1e-9)
    assert information_from_activations([informative, output], labels)["mi_label_unit"] == pytest.approx(
        mutual_information(labels, labels), abs=0.05)
    assert information_from_activations([noise, output], labels)["mi_label_unit"] < 0.25
    per_unit = unit_label_information(informative[:, :3], labels)
    assert per_unit.shape == (3,) and all(v == pytest.approx(mutual_information(informative[:, i], labels))
                                          for i, v in enumerate(per_unit))
