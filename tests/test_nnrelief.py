import functools
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from growprune import GrowPruneModule
from growprune.criteria import NNReliefCriterion, cumulative_keep_mask
from growprune.criteria import nnrelief as criteria_module
from growprune.criteria.nnrelief import collect_statistics, kernel_norm_sums, relief_scores
from growprune.data import DigitsDataModule
from growprune.schedules import OneShot
from growprune.strategies import NNReliefPruning, UnstructuredPruning
from growprune.strategies import nnrelief as nnrelief_module
from growprune.strategies.nnrelief import nnrelief_masks
from tests.helpers import ResidualMLP, tiny_data, tiny_trainer


def sgd():
    return functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


# ------------------------------------------------------------------------------------- scores
def test_linear_scores_match_the_formula_by_hand():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0, -2.0], [3.0, 0.0, 2.0]])  # mean |x| = [2, 1, 2]
    batches = [(x[:1], torch.zeros(1)), (x[1:], torch.zeros(1))]
    criterion = NNReliefCriterion()
    scores = criterion.score(layer, {"": layer}, batches)[""]
    # row 0: contributions |w| * mean|x| = 2, 2, 1 and bias 0.5 -> S = 5.5
    # row 1: 0, 3, 2 and bias 1 -> S = 6
    expected = torch.tensor([[2 / 5.5, 2 / 5.5, 1 / 5.5], [0.0, 3 / 6, 2 / 6]])
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(criterion.bias_scores(layer, {"": layer}, batches)[""], torch.tensor([0.5 / 5.5, 1 / 6]))
    # the same from the definition mean_n |W_ji x_ni| (not the factored form)
    direct = (layer.weight.detach()[None] * x[:, None, :]).abs().mean(dim=0)
    direct = direct / (direct.sum(dim=1, keepdim=True) + layer.bias.detach().abs()[:, None])
    torch.testing.assert_close(scores, direct)


def direct_conv_scores(conv, x):
    """Per-kernel mean_n || conv(|x_ni|, |K_ji|) ||_F, one small convolution at a time."""
    c_out, c_in_group = conv.weight.shape[:2]
    out_per_group = c_out // conv.groups
    weight = conv.weight.detach().abs()
    norms = torch.zeros(c_out, c_in_group, dtype=torch.float64)
    for j in range(c_out):
        for i in range(c_in_group):
            channel = (j // out_per_group) * c_in_group + i
            for n in range(x.shape[0]):
                image = x[n, channel].abs()[None, None]
                if conv.padding_mode != "zeros":
                    image = F.pad(image, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
                    padding = 0
                else:
                    padding = conv.padding
                out = F.conv2d(image, weight[j, i][None, None], None, conv.stride, padding, conv.dilation)
                norms[j, i] += out.norm().double() / x.shape[0]
    bias = conv.bias.detach().abs().double() if conv.bias is not None else torch.zeros(c_out, dtype=torch.float64)
    total = norms.sum(dim=1) + bias
    return norms / total[:, None], bias / total


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, (3, 2), dilation=2, groups=2, bias=False),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["stride-pad-bias", "grouped-dilated", "reflect"],
)
def test_conv_scores_match_a_direct_per_kernel_computation(conv):
    torch.manual_seed(0)
    x = torch.randn(5, conv.in_channels, 9, 8)
    expected_units, expected_bias = direct_conv_scores(conv, x)
    for max_elements in (1, 50, 2**24):  # chunked per channel and sample, partly chunked, in one go
        statistics = collect_statistics(conv, {"c": conv}, [(x[:2], None), (x[2:], None)], max_elements=max_elements)["c"]
        units, bias = relief_scores(conv, statistics)
        torch.testing.assert_close(units, expected_units, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(bias, expected_bias, rtol=1e-5, atol=1e-7)
    # the weight-shaped scores repeat each kernel's score over its kh x kw entries
    weight_scores = NNReliefCriterion().score(conv, {"c": conv}, [(x, None)])["c"]
    assert weight_scores.shape == conv.weight.shape
    torch.testing.assert_close(weight_scores, expected_units.float()[:, :, None, None].expand_as(conv.weight))


def test_kernel_norms_stay_within_the_memory_bound(monkeypatch):
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 8, 10, 10)
    seen = []
    original = F.conv2d

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.numel())
        return out

    monkeypatch.setitem(criteria_module._CONV_FUNCTIONS, 2, spy)
    small = kernel_norm_sums(conv, x, max_elements=16 * 100 * 3)
    monkeypatch.undo()
    assert max(seen) <= 16 * 100 * 3  # 3 input channels of one sample per chunk at most
    torch.testing.assert_close(small, kernel_norm_sums(conv, x))


# ---------------------------------------------------------------------------------- selection
def test_cumulative_keep_mask_on_a_hand_example():
    scores = torch.tensor(
        [
            [0.5, 0.125, 0.25, 0.125],  # 0.5 + 0.25 = 0.75 reaches alpha exactly
            [1.0, 4.0, 2.0, 1.0],  # unnormalised: shares 1/8, 4/8, 2/8, 1/8
            [0.0, 0.0, 0.0, 0.0],  # nothing to keep
        ]
    )
    expected = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(cumulative_keep_mask(scores, 0.75), expected)
    # a little more than 0.75 needs one of the tied 0.125s: the first by position
    torch.testing.assert_close(cumulative_keep_mask(scores[:1], 0.76), torch.tensor([[1.0, 1, 1, 0]]))
    # the largest score alone when alpha is small; alpha = 1 keeps every nonzero score, never a zero
    torch.testing.assert_close(cumulative_keep_mask(scores[:2], 0.01), torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))
    torch.testing.assert_close(cumulative_keep_mask(torch.tensor([[0.3, 0.0, 0.7]]), 1.0), torch.tensor([[1.0, 0, 1]]))
    with pytest.raises(ValueError, match="alpha"):
        cumulative_keep_mask(scores, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        cumulative_keep_mask(scores[0], 0.5)


# ------------------------------------------------------------------------- dead-unit removal
def forced_mlp():
    """4-6-5-3 MLP with unit 2 of layer 0 always dead, unit 4 of layer 2 without outgoing
    weights, and unit 0 of layer 0 feeding only that unit (so the sweep must cascade)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].bias.fill_(5.0)  # every other unit always active
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0  # post-ReLU output exactly 0
        model[2].bias.fill_(5.0)
        model[2].weight[:, 0] = 0.0
        model[2].weight[4, 0] = 1.0  # unit 0 of layer 0 only feeds unit 4 of layer 2
        model[4].weight[:, 4] = 0.0  # unit 4 of layer 2 feeds nothing
    batches = [(torch.randn(32, 4), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    layers = {name: model[int(name)] for name in ("0", "2", "4")}
    return model, layers, batches


def test_zero_activity_removal_and_backward_sweep_on_a_tiny_mlp():
    model, layers, batches = forced_mlp()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kept = nnrelief_masks(model, layers, batches, alpha_fc=1.0, remove_dead_units=False)
    removed = nnrelief_masks(model, layers, batches, alpha_fc=1.0, remove_dead_units=True)
    for name, value in model.state_dict().items():  # computing masks changes no weight
        assert torch.equal(value, before[name]), name
    # alpha = 1 alone: zero weights and never-active inputs go, the dead unit's bias stays
    assert kept.masks["0.bias"][2] == 1 and kept.masks["0.weight"][2].sum() == 0
    assert kept.masks["2.weight"][:, 2].sum() == 0  # inputs from the dead unit score 0
    assert kept.masks["2.weight"][4].sum() > 0 and kept.masks["0.weight"][0].sum() > 0
    assert kept.removed_units == {"0": 0, "2": 0, "4": 0}
    # (1) the dead unit goes entirely; (2) unit 4 of layer 2 has no outgoing weight, and once it is
    # gone unit 0 of layer 0 has none either
    masks = removed.masks
    assert masks["0.bias"][2] == 0
    assert masks["2.weight"][4].sum() == 0 and masks["2.bias"][4] == 0
    assert masks["0.weight"][0].sum() == 0 and masks["0.bias"][0] == 0
    assert removed.dead_units == {"0": 1, "2": 0, "4": 0}
    assert removed.swept_units == {"0": 1, "2": 1, "4": 0}
    assert removed.removed_units == {"0": 2, "2": 1, "4": 0}
    # nothing else touched, and the output layer keeps all its units
    assert masks["0.weight"][[1, 3, 4, 5]].all() and masks["0.bias"][[1, 3, 4, 5]].all()
    assert masks["4.bias"].all() and masks["4.weight"][:, :4].all()
    assert removed.unlinked == {}
    # the removed units' output is now zero on every input and the function of the rest is unchanged
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
        x = batches[0][0]
        assert torch.all(F.relu(model[0](x))[:, [0, 2]] == 0)


def test_non_sequential_links_are_not_guessed(tmp_path):
    model = ResidualMLP()
    with torch.no_grad():
        model.fc2.weight[1] = 0.0
        model.fc2.bias[1] = -10.0  # dead, but its output goes through a residual add
    batches = [(torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))]
    # the links themselves (none here) are tested in tests/test_units.py
    layers = {"fc1": model.fc1, "fc2": model.fc2, "out": model.out}
    result = nnrelief_masks(model, layers, batches, alpha_fc=1.0)
    assert result.masks["fc2.bias"][1] == 1  # not removed: no proven consumer
    assert set(result.unlinked) == {"fc1", "fc2"}
    # the strategy reports it in every record and warns once
    module = GrowPruneModule(ResidualMLP(), num_classes=4, input_shape=(1, 8, 8), optimizer=sgd())
    strategy = NNReliefPruning(iterations=2, every=1, pruning_samples=64, verbose=False)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[strategy])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, tiny_data())
    assert sum("dead-unit removal skips" in str(w.message) for w in caught) == 1
    assert all(set(record["unlinked_layers"]) == {"fc1", "fc2"} for record in module.edit_log)


def test_dead_conv_channel_removes_its_block_of_linear_inputs():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 5), nn.ReLU(), nn.Linear(5, 2))
    # 8 -> 6 -> 3: each channel feeds 9 inputs of the linear layer (the link is tested in tests/test_units.py).
    # Channel 1 always dead: its 9 inputs of the linear layer go, and nothing of channels 0 and 2
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = -1.0
        model[1].bias.copy_(torch.tensor([5.0, -1.0, 5.0]))  # channel 1 negative before the ReLU, others positive
        model[5].weight.abs_()
        model[5].bias.fill_(1.0)  # every linear unit active
    model.eval()
    layers = {"0": model[0], "5": model[5], "7": model[7]}
    result = nnrelief_masks(model, layers, [(torch.randn(20, 1, 8, 8), None)], alpha_fc=1.0, alpha_conv=1.0)
    linear_mask = result.masks["5.weight"]
    assert linear_mask[:, 9:18].sum() == 0 and linear_mask[:, :9].all() and linear_mask[:, 18:].all()
    assert result.masks["0.bias"][1] == 0 and result.dead_units["0"] == 1


# ---------------------------------------------------------------------------------- training
def test_lenet_300_100_iterative_nnrelief_on_digits(tmp_path):
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64)
    module = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=data.input_shape, optimizer=sgd())
    strategy = NNReliefPruning(iterations=3, every=2)
    trainer = tiny_trainer(tmp_path, max_epochs=8, callbacks=[strategy])
    trainer.fit(module, data)
    records = [record for record in module.edit_log if record["strategy"] == strategy.name]
    assert [record["time"] for record in records] == [2, 4, 6]
    assert [record["iteration"] for record in records] == [1, 2, 3]
    achieved = [record["achieved"] for record in records]
    assert 0.2 < achieved[0] < achieved[1] < achieved[2] < 1.0, achieved
    assert all(record["pruning_samples"] == 1000 for record in records)
    assert set(records[-1]["per_layer"]) == {"1", "3", "5"} and records[-1]["removed_units"]["5"] == 0
    for name, mask in module.masks.items():
        parameter = module.model.get_parameter(name)
        assert torch.all(parameter[mask == 0] == 0), name
    weights = [module.masks[f"{layer}.weight"] for layer in ("1", "3", "5")]
    final_sparsity = sum(int((m == 0).sum()) for m in weights) / sum(m.numel() for m in weights)
    assert final_sparsity == pytest.approx(achieved[-1])
    assert trainer.callback_metrics["val/acc"] > 0.85
    assert trainer.callback_metrics["compression"] > 2.0


def test_lenet5_one_iteration_on_16px_digits_prunes_whole_kernels(tmp_path):
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64, image_size=16)
    module = GrowPruneModule("lenet5", num_classes=10, input_shape=data.input_shape, optimizer=sgd())
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[NNReliefPruning(iterations=1, every=2, pruning_samples=500)])
    trainer.fit(module, data)
    (record,) = module.edit_log
    assert record["unlinked_layers"] == {} and record["pruning_samples"] == 500
    assert all(value > 0 for value in record["per_layer"].values()), record["per_layer"]
    mask = module.masks["3.weight"]  # conv 20 -> 50: a kernel is kept or pruned whole
    per_kernel = mask.reshape(50, 20, -1)
    assert torch.all(per_kernel.amin(dim=2) == per_kernel.amax(dim=2))
    for name, mask in module.masks.items():
        assert torch.all(module.model.get_parameter(name)[mask == 0] == 0), name
    assert trainer.callback_metrics["val/acc"] > 0.8


def test_criterion_works_with_unstructured_pruning(tmp_path):
    torch.manual_seed(0)
    module = GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8), optimizer=sgd())
    strategy = UnstructuredPruning(OneShot(amount=0.6, at=1), criterion=NNReliefCriterion(), scoring_batches=4)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[strategy])
    trainer.fit(module, tiny_data())
    assert module.edit_log[-1]["achieved"] == pytest.approx(0.6, abs=1e-3)
    assert "NNReliefCriterion" in module.edit_log[-1]["criterion"]


def test_masks_come_from_rank_zero_and_local_weights_survive(monkeypatch):
    """Under DDP every rank applies rank 0's masks: a rank's own computation must not zero anything."""
    torch.manual_seed(0)
    module = GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8), optimizer=sgd())
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,)))
    trainer = types.SimpleNamespace(train_dataloader=DataLoader(data, batch_size=16), optimizers=[], max_epochs=10, world_size=2)
    strategy = NNReliefPruning(iterations=1, every=1, verbose=False)
    strategy.check(trainer, module)
    before = {name: value.clone() for name, value in module.model.state_dict().items()}
    rank_zero = {}

    def broadcast(trainer, value):  # rank 0 decided: keep every other entry
        rank_zero.update({key: (torch.arange(mask.numel()) % 2).reshape(mask.shape).float() for key, mask in value["masks"].items()})
        return {"masks": rank_zero, "info": value["info"]}

    monkeypatch.setattr(nnrelief_module, "broadcast_from_rank_zero", broadcast)
    record = strategy.act(trainer, module, 0.0)
    assert record["achieved"] == pytest.approx(0.5, abs=1e-3)
    for name, value in module.model.state_dict().items():
        mask = rank_zero.get(name)
        expected = before[name] if mask is None else before[name] * mask
        assert torch.equal(value, expected), name


# ------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"alpha_fc": 0.0}, "alpha_fc"),
        ({"alpha_fc": 1.5}, "alpha_fc"),
        ({"alpha_conv": -0.1}, "alpha_conv"),
        ({"alpha_conv": float("nan")}, "alpha_conv"),
        ({"iterations": 0}, "iterations"),
        ({"every": 0}, "every"),
        ({"pruning_samples": 0}, "pruning_samples"),
    ],
)
def test_bad_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NNReliefPruning(**kwargs)


def test_default_schedule_and_unsupported_layers():
    strategy = NNReliefPruning(iterations=4, every=3)
    assert strategy.schedule.times() == [3, 6, 9, 12]
    assert strategy.schedule.target_at(6) == 0.0 and strategy.schedule.target_at(7) is None
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(16, 2))
    module = GrowPruneModule(model, num_classes=2)
    trainer = types.SimpleNamespace(max_epochs=20)
    with pytest.raises(ValueError, match="'0' is a Embedding"):
        NNReliefPruning().check(trainer, module)
    NNReliefPruning(skip=["0"]).check(trainer, module)
    with pytest.raises(ValueError, match="no prunable layer matches"):
        NNReliefPruning(layers=["nope"]).check(trainer, module)
