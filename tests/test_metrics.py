import math

import pytest
import torch
import torch.nn as nn

from growprune.metrics import (
    SizeMeter,
    compression_ratio,
    count_nonzero_parameters,
    count_parameters,
    dense_flops,
    effective_flops,
    layer_flops,
    measure_latency,
)


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
