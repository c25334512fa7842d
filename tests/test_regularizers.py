"""Network slimming and polarization pruning: penalties, thresholds, scale handling, end-to-end shrinking."""

import functools
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from growprune import GrowPruneModule
from growprune.metrics import count_parameters, dense_flops
from growprune.schedules import OneShot
from growprune.strategies import NetworkSlimming, PolarizationPruning
from growprune.strategies.regularizers import histogram_threshold, l1_penalty, polarization_penalty
from tests.helpers import StopAfter, tiny_data, tiny_trainer


class TinyConvNet(nn.Module):
    """conv(3->8)-BN-ReLU, conv(8->6)-BN-ReLU, global pool, linear(6->3): two BN-regularised groups."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyResNet(nn.Module):
    """A stem and one residual block: the stream group holds bn1 and bn4, the inner group bn3."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv4, self.bn4 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def wrap(model, input_shape=(3, 8, 8), num_classes=3, lr=0.05, momentum=0.0):
    optimizer = functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)
    return GrowPruneModule(model, num_classes=num_classes, input_shape=input_shape, optimizer=optimizer)


def set_scales(model, **values):
    with torch.no_grad():
        for name, scale in values.items():
            model.get_submodule(name).weight.copy_(torch.tensor(scale))


def bn_weights(model):
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, nn.BatchNorm2d)}


# ------------------------------------------------------------------------------------ penalties
A = [0.2, -0.4, 0.6, 0.1, 0.9, 0.3, 0.0, 0.5]
B = [1.0, 0.7, -0.2, 0.05, 0.8, 0.95]


def test_penalties_equal_hand_computation_with_one_global_mean():
    module = wrap(TinyConvNet())
    set_scales(module.model, bn1=A, bn2=B)

    slimming = NetworkSlimming(lambda_l1=1e-3)
    slimming.check(None, module)
    assert sorted(slimming.regularised_layers) == ["bn1", "bn2"]
    assert slimming.penalty(module.model).item() == pytest.approx(1e-3 * sum(abs(v) for v in A + B), rel=1e-6)

    polarization = PolarizationPruning(lambda_=2e-3, t=1.4)
    polarization.check(None, module)
    mean = sum(A + B) / len(A + B)
    expected = 2e-3 * sum(1.4 * abs(v) - abs(v - mean) for v in A + B)
    # a per-layer mean would give another value on these scales: the test tells them apart
    per_layer = 2e-3 * sum(1.4 * abs(v) - abs(v - sum(s) / len(s)) for s in (A, B) for v in s)
    assert abs(expected - per_layer) > 1e-4
    value = polarization.penalty(module.model)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()  # the penalty reaches the scales
    assert module.model.bn1.weight.grad is not None and torch.count_nonzero(module.model.bn1.weight.grad) > 0

    # the functions on raw tensors agree
    scales = [torch.tensor(A), torch.tensor(B)]
    assert l1_penalty(scales, 1e-3).item() == pytest.approx(1e-3 * sum(abs(v) for v in A + B), rel=1e-6)
    assert polarization_penalty(scales, 2e-3, 1.4).item() == pytest.approx(expected, rel=1e-6)


def test_group_scale_is_the_mean_abs_gamma_over_the_groups_bn_layers():
    module = wrap(TinyResNet())
    bn1 = [0.1, -0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    bn4 = [0.9, 0.2, -0.1, 0.0, 0.3, 0.2, 0.1, 0.4]
    bn3 = [0.25, -0.5, 0.75, 1.0]
    set_scales(module.model, bn1=bn1, bn3=bn3, bn4=bn4)
    strategy = NetworkSlimming()
    strategy.check(None, module)
    assert sorted(strategy.regularised_layers) == ["bn1", "bn3", "bn4"]
    scales = strategy.group_scales(module)
    roots = {layer: group.root for group in strategy.graph.groups() for layer, _ in group.members}
    assert roots["bn1"] == roots["bn4"] != roots["bn3"] and len(scales) == 2
    stream = torch.tensor([(abs(a) + abs(b)) / 2 for a, b in zip(bn1, bn4)])
    assert torch.allclose(scales[roots["bn1"]], stream)
    assert torch.allclose(scales[roots["bn3"]], torch.tensor([abs(v) for v in bn3]))


# ------------------------------------------------------------------------------- thresholds
def test_histogram_threshold_is_the_first_valley_not_the_deepest():
    first = [0.001, 0.004, 0.012, 0.013, 0.018, 0.025]  # bins 0, 0, 1, 1, 1, 2: counts 2, 3, 1
    second = [0.301, 0.305, 0.312]  # a small mode at 0.3
    third = [0.805] * 10  # the big mode, behind the widest gap
    scales = torch.tensor(first + second + third)
    threshold = histogram_threshold(scales)
    assert threshold == pytest.approx(0.03)
    assert int((scales < threshold).sum()) == len(first)

    # a valley floor that is not empty: its channels stay, only the bins before it go
    scales = torch.tensor([0.005] * 5 + [0.015] * 2 + [0.025] + [0.035] * 3 + [0.605] * 4)
    assert histogram_threshold(scales) == pytest.approx(0.02)

    # 10 bins instead of 100
    assert histogram_threshold(torch.tensor([0.05, 0.05, 0.15, 0.55, 0.65]), bins=10) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "values",
    [[0.5] * 10, [0.005] * 3 + [0.015] * 2 + [0.025], [0.505, 0.515, 0.525, 0.535, 0.545, 0.555], []],
    ids=["all-equal", "one-mode-falling-to-the-end", "one-flat-mode", "empty"],
)
def test_histogram_without_a_valley_gives_none(values):
    assert histogram_threshold(torch.tensor(values, dtype=torch.float32)) is None


def test_polarization_plan_cuts_each_group_at_its_own_valley_and_keeps_min_channels():
    module = wrap(TinyConvNet())
    set_scales(module.model,
               bn1=[0.005, 0.8, 0.004, 0.7, 0.9, 0.006, 0.75, 0.85],
               bn2=[0.003, 0.001, 0.004, 0.002, 0.005, 0.9])
    strategy = PolarizationPruning(min_channels=2)
    strategy.check(None, module)
    groups = strategy.graph.groups()
    plan = strategy.plan(module, groups, strategy.group_scales(module), 0.0)
    # conv2: five channels lie below the valley but two must stay: the four lowest go
    assert plan == {"conv1": [0, 2, 5], "conv2": [0, 1, 2, 3]}
    assert strategy._plan_notes["thresholds"]["conv1"] == pytest.approx(0.01)

    # a group with one mode (no valley) loses nothing
    set_scales(module.model, bn2=[0.505, 0.525, 0.555, 0.515, 0.535, 0.545])
    plan = strategy.plan(module, groups, strategy.group_scales(module), 0.0)
    assert plan == {"conv1": [0, 2, 5]}
    assert strategy._plan_notes["thresholds"]["conv2"] is None


def test_slimming_removes_the_globally_lowest_scales():
    module = wrap(TinyConvNet())
    set_scales(module.model,
               bn1=[0.01, -0.02, 0.03, 0.04, 0.05, 0.9, 0.8, 0.7],
               bn2=[0.06, 0.5, 0.6, -0.07, 0.65, 0.75])
    strategy = NetworkSlimming(prune_fraction=0.5)
    strategy.check(None, module)
    groups = strategy.graph.groups()
    # 7 of 14 channels by one threshold: five of conv1, two of conv2 (a per-layer 50 % would take 4 and 3)
    plan = strategy.plan(module, groups, strategy.group_scales(module), 0.0)
    assert plan == {"conv1": [0, 1, 2, 3, 4], "conv2": [0, 3]}
    assert strategy._plan_notes["threshold"] == pytest.approx(0.07)

    capped = NetworkSlimming(prune_fraction=0.5, min_channels=4)
    capped.check(None, module)
    plan = capped.plan(module, groups, capped.group_scales(module), 0.0)
    assert plan == {"conv1": [0, 1, 2, 3], "conv2": [0, 3]}


# -------------------------------------------------------------------------- scales in training
class ScaleProbe(Callback):
    """Records the BN scales before the first step, their range after every step, and the loss terms."""

    def __init__(self):
        self.first = None
        self.low, self.high = math.inf, -math.inf
        self.terms_at_epoch_start = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = bn_weights(pl_module.model)
        self.terms_at_epoch_start.setdefault(trainer.current_epoch, sorted(getattr(pl_module, "_loss_terms", {})))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for weight in bn_weights(pl_module.model).values():
            self.low, self.high = min(self.low, float(weight.min())), max(self.high, float(weight.max()))


def test_polarization_initialises_scales_to_half_and_clamps_them_to_unit_interval(tmp_path):
    torch.manual_seed(0)
    module = wrap(TinyConvNet(), lr=0.5)
    assert all(torch.all(w == 1.0) for w in bn_weights(module.model).values())  # PyTorch's default
    # strong penalty: scales below the mean fall by lr * lambda * (t + 1) = 0.06 per step, below 0 in 16 steps
    strategy = PolarizationPruning(lambda_=0.05, t=1.5, schedule=OneShot(amount=0.0, at=5), name="polar")
    probe = ScaleProbe()
    trainer = tiny_trainer(tmp_path, max_epochs=6, callbacks=[strategy, probe, StopAfter(2)])  # stopped before pruning
    trainer.fit(module, tiny_data(input_shape=(3, 8, 8), num_classes=3))
    assert all(torch.all(w == 0.5) for w in probe.first.values())
    assert probe.terms_at_epoch_start[0] == ["polar"]
    assert 0.0 <= probe.low and probe.high <= 1.0
    assert probe.low == 0.0  # the clamp did hold scales that the penalty pushed below zero
    assert "polar" not in module._loss_terms  # removed at the end of fit


def test_polarization_does_not_reset_scales_on_resume(tmp_path):
    torch.manual_seed(0)
    data = tiny_data(input_shape=(3, 8, 8), num_classes=3)
    first = wrap(TinyConvNet(), lr=0.2)
    trainer = tiny_trainer(tmp_path, max_epochs=4, enable_checkpointing=True,
                           callbacks=[PolarizationPruning(lambda_=0.01, schedule=OneShot(amount=0.0, at=3)), StopAfter(1)])
    trainer.fit(first, data)
    checkpoint = trainer.checkpoint_callback.best_model_path
    trained = bn_weights(first.model)
    assert not all(torch.all(w == 0.5) for w in trained.values())

    second = wrap(TinyConvNet(), lr=0.2)
    probe = ScaleProbe()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[PolarizationPruning(lambda_=0.01, schedule=OneShot(amount=0.0, at=3)), probe,
                                                              StopAfter(2)])
    trainer.fit(second, data, ckpt_path=checkpoint, weights_only=False)
    for name, weight in trained.items():
        assert torch.equal(probe.first[name], weight), name


# --------------------------------------------------------------------------------- end to end
def vgg(lr=0.01):
    return GrowPruneModule("vgg11_bn", num_classes=4, input_shape=(3, 16, 16),
                           optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9))


def vgg_data():
    return tiny_data(input_shape=(3, 16, 16), num_classes=4, num_samples=64, batch_size=16)


def conv_channels(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_slimming_end_to_end_with_default_schedule_shrinks_vgg(tmp_path):
    torch.manual_seed(0)
    module = vgg()
    params, flops = count_parameters(module.model), dense_flops(module.model, (3, 16, 16))
    before = conv_channels(module.model)
    strategy = NetworkSlimming(lambda_l1=1e-4, prune_fraction=0.5, name="slim")
    probe = ScaleProbe()
    trainer = tiny_trainer(tmp_path, max_epochs=4, limit_train_batches=1, limit_val_batches=1, callbacks=[strategy, probe])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, vgg_data())
    # the record says what the method asked for (its share and threshold) and what it got;
    # no warning compares it with the schedule's amount (it used to say "asked for 0.0 %, got 50.0 %")
    assert not [w for w in caught if "asked for" in str(w.message)]

    (record,) = module.edit_log
    assert record["time"] == 3  # default: after 75 % of the 4 epochs
    assert record["removed"] == sum(before) // 2
    assert sum(conv_channels(module.model)) == sum(before) - sum(before) // 2
    assert record["target"] == 0.5 and record["target_type"] == "regularised_channels"
    assert record["achieved"] == pytest.approx(0.5)
    assert record["threshold"] > 0 and record["ops"][0]["op"] == "remove_channels"
    assert strategy.schedule.start == 0  # the configured (default) schedule was not moved to epoch 3
    # the penalty was on while training with it, and off for the fine-tuning epoch
    assert [probe.terms_at_epoch_start[e] for e in range(4)] == [["slim"], ["slim"], ["slim"], []]
    now_params, now_flops = count_parameters(module.model), dense_flops(module.model, (3, 16, 16))
    assert now_params < params and now_flops < flops
    assert record["flops_reduction"] == pytest.approx(flops / now_flops)
    assert module.model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_polarization_end_to_end_removes_the_polarised_low_channels(tmp_path):
    torch.manual_seed(0)
    module = vgg(lr=1e-3)
    flops = dense_flops(module.model, (3, 16, 16))
    before = conv_channels(module.model)
    with torch.no_grad():  # polarised scales: the even channels near 0, the odd ones near 0.8
        for layer in module.model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.copy_(torch.tensor([0.005 if i % 2 == 0 else 0.8 for i in range(layer.num_features)]))
    strategy = PolarizationPruning(schedule=OneShot(amount=0.0, at=1), initial_scale=None, name="polar")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[strategy])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, vgg_data())
    assert not [w for w in caught if "asked for" in str(w.message)]

    (record,) = module.edit_log
    assert record["time"] == 1 and all(value is not None for value in record["thresholds"].values())
    # polarization asks for no share (its valleys decide): no target, and half the regularised channels went
    assert record["target"] is None and record["achieved"] == pytest.approx(0.5)
    assert conv_channels(module.model) == [c // 2 for c in before]
    for layer in module.model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert torch.all(layer.weight > 0.5)  # exactly the low half went
    assert record["flops_reduction"] > 3.0 and dense_flops(module.model, (3, 16, 16)) < flops
    assert module.model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: NetworkSlimming(lambda_l1=-1e-4), "lambda_l1"),
        (lambda: NetworkSlimming(lambda_l1=float("nan")), "lambda_l1"),
        (lambda: NetworkSlimming(prune_fraction=0.0), "prune_fraction"),
        (lambda: NetworkSlimming(prune_fraction=1.0), "prune_fraction"),
        (lambda: NetworkSlimming(min_channels=0), "min_channels"),
        (lambda: PolarizationPruning(lambda_=-1.0), "lambda_"),
        (lambda: PolarizationPruning(t=1.0), "t must be > 1"),
        (lambda: PolarizationPruning(t=0.5), "t must be > 1"),
        (lambda: PolarizationPruning(initial_scale=1.5), "initial_scale"),
        (lambda: PolarizationPruning(bins=2), "bins"),
        (lambda: PolarizationPruning(round_to=0), "round_to"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


@pytest.mark.parametrize("strategy_class", [NetworkSlimming, PolarizationPruning])
def test_model_without_batch_norm_is_refused(strategy_class):
    module = GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="no prunable channel group has a batch-norm layer"):
        strategy_class().check(None, module)
