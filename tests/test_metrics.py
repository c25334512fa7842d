import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

from growprune import metrics
from growprune.metrics import (
    SizeMeter,
    compression_ratio,
    count_nonzero_parameters,
    count_parameters,
    dense_flops,
    effective_flops,
    layer_flops,
    layer_times,
    measure_latency,
)
from growprune.models import create_model


def test_linear_flops_by_hand():
    # y = W x + b, W: 30 x 20 -> 20*30 multiply-adds = 1,200 FLOPs for one sample (bias not counted)
    assert dense_flops(nn.Linear(20, 30), (20,)) == 2 * 20 * 30


def test_conv_flops_by_hand():
    # 3 -> 8 channels, 3x3 kernel, padding 1 on 10x10: 8*10*10 outputs, each 3*3*3 multiply-adds
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert dense_flops(conv, (3, 10, 10)) == 2 * (8 * 10 * 10) * (3 * 3 * 3)
    strided = nn.Conv2d(3, 8, kernel_size=3, stride=2)  # 4x4 outputs
    assert dense_flops(strided, (3, 10, 10)) == 2 * (8 * 4 * 4) * 27


def test_layer_flops_names_match_named_modules():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    per_layer = layer_flops(model, (1, 4, 4))
    assert per_layer == {"": 2 * (16 * 8 + 8 * 2), "1": 2 * 16 * 8, "3": 2 * 8 * 2}


def test_effective_flops_scale_with_weight_density():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight[:, :5] = 0  # half the first layer's weights
    assert dense_flops(model, (10,)) == 400
    assert effective_flops(model, (10,)) == pytest.approx(200 * 0.5 + 200)


def test_parameter_counts_and_compression():
    model = nn.Linear(4, 2)  # 8 weights + 2 biases
    with torch.no_grad():
        model.weight[0] = 0
    assert count_parameters(model) == 10
    assert count_nonzero_parameters(model) == 6
    assert compression_ratio(10, 5) == 2.0
    assert math.isinf(compression_ratio(10, 0))


def test_flop_count_keeps_train_mode_and_bn_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model.train()
    before = model[1].running_mean.clone()
    layer_flops(model, (1, 6, 6))
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)


def test_size_meter_reports_all_keys_and_recounts_after_shape_change():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    meter = SizeMeter((1, 2, 2), original_params=15)
    first = meter(model)
    assert first == {
        "params/total": 15.0,
        "params/nonzero": 15.0,
        "flops/dense": 24.0,
        "flops/effective": 24.0,
        "compression": 1.0,
    }
    model[1] = nn.Linear(4, 1)
    assert meter(model)["flops/dense"] == 8.0


def test_latency_is_positive_and_validates_arguments():
    model = nn.Linear(8, 8)
    assert measure_latency(model, (8,), batch_size=4, repeats=3, warmup=1) > 0
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, (8,), repeats=0)


class ProjectThenClassify(nn.Module):
    """Uses its own weight in its forward (``F.linear``) and also has a child layer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 6))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.weight))


def test_parent_weight_used_in_its_own_forward_counts_and_its_mask_too():
    model = nn.Sequential(ProjectThenClassify())
    assert layer_flops(model, (6,)) == {"": 2 * 6 * 8 + 2 * 8 * 4, "0": 2 * 6 * 8, "0.head": 2 * 8 * 4}
    with torch.no_grad():
        model[0].weight[:, :3] = 0  # half of the parent's weight
    assert effective_flops(model, (6,)) == pytest.approx(2 * 6 * 8 / 2 + 2 * 8 * 4, rel=1e-12)


def tiny_vit() -> nn.Module:
    # torchvision's ViT class at a size that builds in milliseconds (vit_b_16 takes seconds).
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=10)


FAMILY = {
    "lenet5": (lambda: create_model("lenet5"), (1, 28, 28)),
    "resnet20-B": (lambda: create_model("resnet20", shortcut="B"), (3, 32, 32)),
    "mobilenet_v2": (lambda: create_model("torchvision.mobilenet_v2", num_classes=10), (3, 32, 32)),
    "vit": (tiny_vit, (3, 32, 32)),
}


def flops_by_hooks(model: nn.Module, input_shape, dense: bool = False) -> int:
    """Independent count: every executed conv/linear does 2 * (outputs per channel) * nnz(weight)
    FLOPs; an nn.MultiheadAttention (self-attention) adds its projections and 4 * L * L * E.
    ``dense`` counts every weight as nonzero (torchvision's ViT head starts at zero)."""
    total = 0

    def size(weight: torch.Tensor) -> int:
        return weight.numel() if dense else int(torch.count_nonzero(weight))

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.MultiheadAttention):
            _, tokens, embed = inputs[0].shape
            total += 2 * tokens * (size(module.in_proj_weight) + size(module.out_proj.weight)) + 4 * tokens**2 * embed
        else:
            channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            total += 2 * (output.numel() // channels) * size(module.weight)

    kinds = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model.eval()(torch.randn(1, *input_shape))
    for handle in hooks:
        handle.remove()
    return total


@pytest.mark.parametrize("name", FAMILY)
def test_effective_flops_match_an_independent_count_with_random_masks(name):
    build, input_shape = FAMILY[name]
    torch.manual_seed(0)
    model = build()
    dense = dense_flops(model, input_shape)
    assert dense == flops_by_hooks(model, input_shape, dense=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(torch.rand_like(parameter) < 0.5)
    expected = flops_by_hooks(model, input_shape)
    assert effective_flops(model, input_shape) == pytest.approx(expected, rel=1e-6)
    assert expected < 0.6 * dense


class ConvAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        return self.attn(tokens, tokens, tokens)[0]


def test_counting_leaves_modes_flags_gradients_and_statistics_unchanged():
    model = ConvAttention().train()
    model.conv.eval()
    model.conv.bias.requires_grad_(False)
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    bn_state = {key: value.clone() for key, value in model.bn.state_dict().items()}
    assert dense_flops(model, (1, 6, 6)) > 0 and effective_flops(model, (1, 6, 6)) > 0
    SizeMeter((1, 6, 6), count_parameters(model))(model)
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.equal(grads[name], model.get_parameter(name).grad) for name in grads)
    assert all(torch.equal(value, model.bn.state_dict()[key]) for key, value in bn_state.items())


def test_size_meter_recomputes_densities_without_recounting(monkeypatch):
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    meter = SizeMeter((10,), original_params=count_parameters(model))
    assert meter(model)["flops/effective"] == 400.0
    monkeypatch.setattr(metrics, "flop_table", lambda *args: pytest.fail("FLOPs recounted for the same shapes"))
    with torch.no_grad():
        model[1].weight[:5] = 0
    assert meter(model)["flops/effective"] == pytest.approx(300.0)


def test_layer_times_cover_leaf_modules_with_parameters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    times = layer_times(model, (1, 6, 6), repeats=3)
    assert set(times) == {"0", "1", "4"}
    assert all(seconds > 0 for seconds in times.values())
    with pytest.raises(ValueError, match="repeats"):
        layer_times(model, (1, 6, 6), repeats=0)
