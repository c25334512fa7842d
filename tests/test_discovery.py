"""Discovery of every permissible element (channel groups, layers, cells, insertion points), the
BN-aware identity layer, copy_of cell specs, and the one-line refusals of layer/cell edits."""

import json

import pytest
import torch
import torch.nn as nn
import torchvision

from growprune import GrowPruneModule
from growprune.models import create_model
from growprune.surgery import PermissibleElements, permissible_elements
from growprune.surgery.edits import InsertCell, InsertLayer, RemoveCell, RemoveLayer, edit_from_dict, replay
from growprune.surgery.layers import calibrate_identity_norm


def module(arch="resnet20", shape=(3, 16, 16), **arch_kwargs):
    if arch == "resnet20":
        arch_kwargs.setdefault("shortcut", "B")  # option A's channel padding cannot be traced by the channel graph
    return GrowPruneModule(arch, arch_kwargs=arch_kwargs, num_classes=4, input_shape=shape)


def outputs(model, inputs):
    was = model.training
    model.eval()
    with torch.no_grad():
        result = model(inputs)
    model.train(was)
    return result


def test_vgg11_elements_counted_by_hand():
    # growprune vgg11 (no BN): features = conv 3-64, M, 64-128, M, 128-256, 256-256, M, 256-512, 512-512, M,
    # 512-512, 512-512, M, each conv followed by its ReLU; then pool and a 512->10 linear classifier.
    # layers: 8 conv+ReLU pairs + the classifier = 9.
    # removable (input shape == output shape): 256-256, and the three 512-512 convs = 4
    #   (features.8, .13, .16, .18; 3-64, 64-128, 128-256 and 256-512 change the channels, the classifier 512->10).
    # cells: none (no residual add anywhere) -> no stages, no cell insertion points.
    # layer insertion points: after each conv's ReLU (8, all after a ReLU); not after the classifier (the output).
    # channel groups: one per conv (the classifier's outputs are the classes and stay) = 8, 2752 channels.
    found = permissible_elements(create_model("vgg11", num_classes=10), torch.zeros(1, 3, 32, 32))
    assert found.summary() == {"channel_groups": 8, "channels": 64 + 128 + 256 * 2 + 512 * 4, "layers": 9,
                               "removable_layers": 4, "cells": 0, "removable_cells": 0, "stages": 0,
                               "layer_insertion_points": 8, "cell_insertion_points": 0}
    assert found.removable_layers == ["features.8", "features.13", "features.16", "features.18"]
    assert found.layer("features.8").members == ["features.8", "features.9"]  # the conv and its ReLU
    assert all(point.after_activation for point in found.layer_insertion_points)
    assert [point.after for point in found.layer_insertion_points][:2] == ["features.1", "features.4"]
    # vgg11_bn: the same, each layer is conv + BN + ReLU
    found_bn = permissible_elements(create_model("vgg11_bn", num_classes=10), torch.zeros(1, 3, 32, 32))
    assert found_bn.summary() == found.summary()
    assert found_bn.layer("features.11").members == ["features.11", "features.12", "features.13"]


def test_resnet20_elements_counted_by_hand():
    # ResNet-20 (shortcut B): stem conv+BN, 3 stages x 3 BasicBlocks (16, 32, 64 channels), pool, fc.
    # cells: 9 basic blocks; the first blocks of stages 2 and 3 downsample (stride 2, 16->32, 32->64)
    #   -> 7 removable cells. stages: layers.0, layers.1, layers.2 (layers itself holds stages, not cells).
    # layers: stem conv1 (its BN/ReLU are called in ResNet.forward: conv alone), conv1 and conv2 of each
    #   block (18), the 2 projection shortcuts (Sequential(conv, BN): a layer as a whole), fc = 22.
    #   removable: conv2 of every block (9: stride 1, width -> width) + conv1 of the 7 non-downsampling
    #   blocks = 16 (stem 3->16, stride-2 conv1s, shortcuts and fc change the shape).
    # layer insertion points: every layer but fc (whose output is the model's) = 21, none after a ReLU module.
    # cell insertion points (where a copy of the stage's last block fits): stage 1 takes 16x16x16 at
    #   positions 0..3 (4); stages 2 and 3 only after their downsampling block, positions 1..3 (3 + 3) = 10.
    # channel groups: 3 residual streams (stem+stage 1, shortcut of stage 2, of stage 3) + the 9 blocks'
    #   inner conv1 outputs = 12; channels 16+32+64 + 3*(16+32+64) = 448.
    pl_module = module("resnet20", shape=(3, 32, 32))
    found = pl_module.permissible_elements()
    assert isinstance(found, PermissibleElements)
    assert found.summary() == {"channel_groups": 12, "channels": 448, "layers": 22, "removable_layers": 16, "cells": 9,
                               "removable_cells": 7, "stages": 3, "layer_insertion_points": 21, "cell_insertion_points": 10}
    assert found.removable_cells == ["layers.0.0", "layers.0.1", "layers.0.2", "layers.1.1", "layers.1.2", "layers.2.1", "layers.2.2"]
    assert found.stages["layers.1"] == ["layers.1.0", "layers.1.1", "layers.1.2"]
    assert [(p.stage, p.index) for p in found.cell_insertion_points if p.stage == "layers.1"] == [("layers.1", i) for i in (1, 2, 3)]
    assert found.layer("layers.1.0.shortcut").members == ["layers.1.0.shortcut"]
    assert not found.layer("layers.1.0.conv1").removable and "maps shape" in found.layer("layers.1.0.conv1").why_not
    # option A (the default; parameter-free shortcuts): the same cells, no shortcut layers (20 layers, 19
    # insertion points); channel groups skipped (channel surgery cannot trace option A's channel padding)
    option_a = module("resnet20", shape=(3, 32, 32), shortcut="A").permissible_elements(channel_groups=False)
    assert option_a.summary() == {**found.summary(), "channel_groups": 0, "channels": 0, "layers": 20, "layer_insertion_points": 19}
    data = json.loads(json.dumps(found.to_dict()))  # plain JSON
    assert data["summary"]["removable_cells"] == 7 and data["cell_insertion_points"][0] == {
        "stage": "layers.0", "index": 0, "shape": [1, 16, 32, 32], "template": "layers.0.2"}


def test_torchvision_resnet18_elements_counted_by_hand():
    # torchvision resnet18: conv1 (7x7, stride 2) + bn1 + relu + maxpool, 4 stages x 2 BasicBlocks
    # (64, 128, 256, 512), avgpool, fc. cells: 8 blocks; the first blocks of layer2..4 downsample -> 5 removable.
    # layers: conv1, 8 x (conv1, conv2), 3 downsample Sequential(conv, BN), fc = 21.
    #   removable: 8 conv2 + conv1 of the 5 non-downsampling blocks = 13.
    # layer insertion points: all layers but fc = 20. cell insertion points: layer1 positions 0..2 (3),
    #   layer2..4 positions 1..2 (2 each) = 9. channel groups: 4 streams + 8 inner = 12,
    #   channels 64+128+256+512 + 2*(64+128+256+512) = 2880.
    found = permissible_elements(torchvision.models.resnet18(num_classes=10), torch.zeros(1, 3, 64, 64))
    assert found.summary() == {"channel_groups": 12, "channels": 2880, "layers": 21, "removable_layers": 13, "cells": 8,
                               "removable_cells": 5, "stages": 4, "layer_insertion_points": 20, "cell_insertion_points": 9}
    assert found.removable_cells == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert found.layer("layer2.0.downsample").members == ["layer2.0.downsample"]  # conv + BN: one layer
    assert found.untraced == {}


def test_copy_of_cell_keeps_torchvision_resnet_output_and_replays():
    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=4)
    pl_module = GrowPruneModule(network, num_classes=4, input_shape=(3, 32, 32))
    inputs = torch.randn(2, 3, 32, 32)
    expected = outputs(pl_module, inputs)
    edit = InsertCell("layer3", 2, {"copy_of": "layer3.1"}, init="zero_last_norm")
    result = pl_module.apply_edit(edit)
    assert type(pl_module.model.layer3[2]) is type(network.layer3[1]) and len(pl_module.model.layer3) == 3
    assert "layer3.2.conv1.weight" in result.added and not result.renamed  # at the end: nothing shifts
    assert torch.equal(outputs(pl_module, inputs), expected)
    # the logged spec rebuilds the cell on a fresh base network
    fresh = torchvision.models.resnet18(num_classes=4)
    replay(fresh, [edit_from_dict(json.loads(json.dumps(edit.to_dict())))], torch.zeros(1, 3, 32, 32))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in pl_module.model.state_dict().items()}


def test_identity_conv_bn_layer_is_exact_in_eval_mode_and_calibrated_close_in_train_mode():
    torch.manual_seed(0)
    pl_module = module("vgg11_bn", shape=(3, 16, 16))
    inputs = torch.randn(16, 3, 16, 16)
    expected = outputs(pl_module, inputs)
    spec = [{"class_path": "torch.nn.Conv2d", "init_args": {"in_channels": 64, "out_channels": 64, "kernel_size": 3, "padding": 1, "bias": False}},
            {"class_path": "torch.nn.BatchNorm2d", "init_args": {"num_features": 64}}]
    # after features.1 (the BN, before the ReLU): inputs of either sign; the data-free BN is exact in eval mode
    pl_module.apply_edit(InsertLayer("features.1", spec, init="identity"))
    layer = pl_module.model.features[1][1]  # Sequential(conv, BN), after the original BN
    bn = layer[1]
    assert float(bn.weight[0].detach()) == pytest.approx((1 + bn.eps) ** 0.5)
    assert (outputs(pl_module, inputs) - expected).abs().max() < 1e-5
    x = outputs(nn.Sequential(pl_module.model.features[0], pl_module.model.features[1][0]), inputs)  # reaches the new layer
    assert (outputs(layer, x) - x).abs().max() <= 1e-6 * x.abs().max()
    # plain gamma 1 / variance 1 would scale by 1/sqrt(1 + eps): measurably not the identity
    with torch.no_grad():
        bn.weight.fill_(1.0)
    assert (outputs(layer, x) - x).abs().max() >= 4e-6 * x.abs().max()
    # fitted to the data: exact in eval mode again, and train mode (batch statistics) close to the identity
    assert calibrate_identity_norm(pl_module.model, "features.1.1", [inputs]) == 16
    assert torch.allclose(bn.running_mean, bn.bias)
    assert (outputs(layer, x) - x).abs().max() <= 1e-6 * x.abs().max()
    assert (outputs(pl_module, inputs) - expected).abs().max() < 1e-5
    layer.train()
    with torch.no_grad():
        trained = layer(x)
    assert (trained - x).abs().max() < 1e-3 * x.abs().max()  # this batch is the calibration data


@pytest.mark.parametrize(
    ("arch", "edit", "message"),
    [
        # a layer insertion whose shapes do not match
        ("resnet20", InsertLayer("layers.1.0.conv1", [{"class_path": "torch.nn.Conv2d", "init_args": {
            "in_channels": 16, "out_channels": 16, "kernel_size": 3, "padding": 1}}], init="identity"), "cannot take"),
        # a cell insertion into a non-residual model
        ("vgg11_bn", InsertCell("features", 3, {"copy_of": "features.0"}), "no residual stage"),
        # removing a layer (with its companions) whose shapes differ
        ("vgg11_bn", RemoveLayer("features.0", ["features.0", "features.1", "features.2"]), "maps shape"),
        ("resnet20", RemoveCell("layers.1.0"), "maps shape"),
        # paths that do not exist
        ("resnet20", RemoveLayer("layers.9.conv1"), "no module named 'layers.9.conv1'"),
        ("resnet20", InsertCell("layers.1", 3, {"copy_of": "layers.1.7"}, init="zero_last_norm"), "no module named 'layers.1.7'"),
        ("vgg11_bn", RemoveLayer("features.4", ["features.4", "features.5", "features.99"]), "no module named 'features.99'"),
        # members that do not chain
        ("vgg11_bn", RemoveLayer("features.4", ["features.4", "features.6"]), "not consecutive"),
        ("vgg11_bn", InsertLayer("features.2", [{"class_path": "torch.nn.Conv2d", "init_args": {
            "in_channels": 64, "out_channels": 64, "kernel_size": 3, "padding": 1}},
            {"class_path": "torch.nn.LayerNorm", "init_args": {"normalized_shape": 16}}], init="identity"), "per-sample norm"),
    ],
)
def test_bad_layer_and_cell_edits_fail_in_one_line_before_anything_changes(arch, edit, message):
    pl_module = module(arch)
    state = {name: tensor.clone() for name, tensor in pl_module.state_dict().items()}
    with pytest.raises(ValueError, match=message) as raised:
        pl_module.apply_edit(edit)
    assert "\n" not in str(raised.value)
    assert pl_module.edit_log == []
    after = pl_module.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_remove_layer_with_members_and_old_log_entries_replay():
    pl_module = module("vgg11_bn", shape=(3, 16, 16))
    found = pl_module.permissible_elements()
    layer = found.layer("features.11")  # conv 256-256 + BN + ReLU
    pl_module.apply_edit(RemoveLayer(layer.path, layer.members))
    assert all(isinstance(pl_module.model.features[i], nn.Identity) for i in (11, 12, 13))
    assert pl_module.edit_log[0]["ops"] == [{"op": "remove_layer", "path": "features.11",
                                             "members": ["features.11", "features.12", "features.13"]}]
    # a log entry of the format written before members existed: only the module at path
    old = edit_from_dict({"op": "remove_layer", "path": "features.18"})
    assert old.to_dict() == {"op": "remove_layer", "path": "features.18"}
    pl_module.apply_edit(old)
    assert isinstance(pl_module.model.features[18], nn.Identity) and isinstance(pl_module.model.features[19], nn.BatchNorm2d)
    fresh = module("vgg11_bn", shape=(3, 16, 16)).model
    replay(fresh, [op for record in pl_module.edit_log for op in record["ops"]], torch.zeros(1, 3, 16, 16))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in pl_module.model.state_dict().items()}
