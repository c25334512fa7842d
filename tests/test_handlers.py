"""Per-layer handlers and index maps: removing and adding channels are one mechanism, run both ways."""

import pytest
import torch
import torch.nn as nn

from growprune.surgery.changes import NEW, ParameterChange, inserted_index, kept_index
from growprune.surgery.handlers import LayerHandler, handler_for, register_layer_handler, replace_tensor, unregister_layer_handler
from growprune.surgery.resize import resize_to_state_dict


def layers():
    """One instance of every layer family with a handler, with non-trivial values, in float64."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return {
        "linear": nn.Linear(5, 6),
        "conv2d": nn.Conv2d(5, 6, 3),
        "conv1d": nn.Conv1d(5, 6, 3),
        "conv3d": nn.Conv3d(5, 6, 1),
        "conv_transpose": nn.ConvTranspose2d(5, 6, 3),
        "depthwise": nn.Conv2d(6, 6, 3, groups=6),
        "depthwise_x2": nn.Conv2d(3, 6, 3, groups=3),
        "batchnorm": bn,
        "groupnorm": nn.GroupNorm(3, 6),
        "layernorm": nn.LayerNorm(6),
        "instancenorm": nn.InstanceNorm2d(6, affine=True),
        "prelu": nn.PReLU(6),
        "embedding": nn.Embedding(10, 6),
        "attention": nn.MultiheadAttention(6, 3),
    }


def tensors(module):
    return dict(module.named_parameters()) | dict(module.named_buffers())


@pytest.mark.parametrize("kind", list(layers()))
def test_removing_then_adding_channels_moves_every_value_and_adds_neutral_ones(kind):
    module = layers()[kind].double()
    handler = handler_for(module)
    assert handler is not None, kind
    before = {name: tensor.detach().clone() for name, tensor in tensors(module).items()}
    size = handler.out_channels(module)
    step = handler.channel_step(module)
    removed = list(range(step))  # the first `step` channels (a multiple the layer accepts)
    changes = handler.remap(module, "out", kept_index(size, removed))
    assert handler.out_channels(module) == size - step
    for name, change in changes.items():
        new = tensors(module)[name]
        assert new.dtype == torch.float64, name  # surgery keeps the dtype
        assert torch.equal(change.carry(before[name], new.shape), new.detach()), name
    # growth: insert `step` new channels in the middle; old values move along, new ones are neutral
    middle = handler.out_channels(module) // 2
    grown = handler.remap(module, "out", inserted_index(handler.out_channels(module), middle - 1, step))
    assert handler.out_channels(module) == size
    handler.check(module, kind)
    for name, change in grown.items():
        new = tensors(module)[name].detach()
        norm_scale = kind in ("batchnorm", "groupnorm", "layernorm", "instancenorm") and name == "weight"
        neutral = 1.0 if norm_scale or name == "running_var" else 0.25 if kind == "prelu" else 0.0
        assert torch.equal(change.carry(change.old.detach(), new.shape, fill=neutral), new), name
    sample = {"attention": lambda: module(torch.randn(2, 1, 6, dtype=torch.float64), torch.randn(2, 1, 6, dtype=torch.float64),
                                          torch.randn(2, 1, 6, dtype=torch.float64)),
              "embedding": lambda: module(torch.tensor([1, 2]))}
    if kind in sample:
        sample[kind]()  # the changed layer still runs


def test_linear_and_conv_inputs_change_with_their_own_map():
    linear = nn.Linear(4, 3)
    old = linear.weight.detach().clone()
    change = handler_for(linear).remap(linear, "in", torch.tensor([3, NEW, 0]))["weight"]
    assert linear.in_features == 3 and torch.equal(linear.weight[:, 0], old[:, 3]) and torch.equal(linear.weight[:, 2], old[:, 0])
    assert torch.all(linear.weight[:, 1] == 0)
    assert torch.equal(change.index[1], torch.tensor([3, NEW, 0])) and change.index[0] is None


def test_grouped_convolution_inputs_keep_each_group_and_need_equal_counts():
    conv = nn.Conv2d(8, 4, 1, groups=2)  # two groups of 4 inputs, 2 outputs each
    old = conv.weight.detach().clone()
    change = handler_for(conv).remap(conv, "in", torch.tensor([0, 2, 5, 7]))["weight"]
    assert conv.in_channels == 4 and conv.weight.shape == (4, 2, 1, 1)
    # outputs 0-1 (group 0) keep inputs 0 and 2; outputs 2-3 (group 1) keep inputs 5 and 7 (local 1 and 3)
    assert torch.equal(conv.weight[:2], old[:2, [0, 2]]) and torch.equal(conv.weight[2:], old[2:, [1, 3]])
    assert torch.equal(change.carry(old, conv.weight.shape), conv.weight.detach())  # the flat map says the same
    fresh = nn.Conv2d(8, 4, 1, groups=2)
    with pytest.raises(ValueError, match="equal groups"):
        handler_for(fresh).remap(fresh, "in", torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="another group"):
        handler_for(fresh).remap(fresh, "in", torch.tensor([0, 1, 2, 3]))  # all from group 0
    assert fresh.in_channels == 8


def test_attention_heads_keep_equal_widths():
    attention = nn.MultiheadAttention(6, 3)
    with pytest.raises(ValueError, match="multiples of the head count"):
        handler_for(attention).remap(attention, "out", kept_index(6, [0]))
    assert attention.embed_dim == 6  # refused before anything changed


def test_attention_heads_keep_their_own_dimensions_when_the_embedding_changes_unevenly():
    attention = nn.MultiheadAttention(8, 2)  # heads: dimensions 0-3 and 4-7
    before = {name: tensor.detach().clone() for name, tensor in tensors(attention).items()}
    changes = handler_for(attention).remap(attention, "out", kept_index(8, [0, 1, 2, 4]))  # 3 of head 0, 1 of head 1
    assert attention.embed_dim == 4 and attention.head_dim == 2
    inner = changes["in_proj_weight"].index[0][:4]
    # the residual stream keeps exactly the planned channels; inside, each new head holds only its old head's dimensions
    assert changes["in_proj_weight"].index[1].tolist() == [3, 5, 6, 7] and changes["out_proj.weight"].index[0].tolist() == [3, 5, 6, 7]
    assert (inner // 4).tolist() == [0, 0, 1, 1] and changes["out_proj.weight"].index[1].tolist() == inner.tolist()
    for name, change in changes.items():
        assert torch.equal(change.carry(before[name], tensors(attention)[name].shape), tensors(attention)[name].detach()), name
    # growth by two: one new dimension at the end of each head, never a neighbour's dimension
    grown = handler_for(attention).remap(attention, "out", inserted_index(4, 3, 2))
    assert grown["in_proj_weight"].index[0][:6].tolist() == [0, 1, NEW, 2, 3, NEW]
    assert attention(torch.randn(3, 1, 6), torch.randn(3, 1, 6), torch.randn(3, 1, 6))[0].shape == (3, 1, 6)


def test_index_maps_compose_and_carry_state():
    old = torch.arange(12.0).view(3, 4)
    first = ParameterChange(old, [torch.tensor([0, 2]), torch.tensor([1, NEW, 3])])
    middle = first.carry(old, (2, 3), fill=-1.0)
    assert middle.tolist() == [[1, -1, 3], [9, -1, 11]]
    second = ParameterChange(middle, [torch.tensor([1, NEW]), None])
    composed = first.then(second, (2, 3), (2, 3))
    assert composed.carry(old, (2, 3), fill=-1.0).tolist() == [[9, -1, 11], [-1, -1, -1]]
    flat = ParameterChange(old, flat=first.flat_index((2, 3)))
    assert torch.equal(flat.carry(old, (2, 3), fill=-1.0), middle)
    with pytest.raises(ValueError, match="without an index map"):
        ParameterChange(old).carry(old, (2, 4))


def test_resize_to_a_checkpoint_keeps_type_dtype_and_depthwise_multiplier():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, groups=8), nn.BatchNorm2d(16)).double()
    pruned = nn.Sequential(nn.Conv2d(3, 5, 1), nn.Conv2d(5, 10, 3, groups=5), nn.BatchNorm2d(10)).double()
    assert resize_to_state_dict(model, pruned.state_dict()) == ["0", "1", "2"]
    model.load_state_dict(pruned.state_dict())
    depthwise = model[1]
    # multiplier 2 kept: 5 groups of 1 input and 2 outputs (it used to become 10 groups, or fail)
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (5, 10, 5)
    assert depthwise.weight.dtype == torch.float64  # it used to come back as float32
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.eval(), pruned.eval()
    assert torch.equal(model(x), pruned(x))


def test_custom_layer_handler_plugs_into_resize():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(n))
            self.register_buffer("seen", torch.zeros(n))  # a per-channel buffer: no bare parameter

        def forward(self, x):
            return x * self.scale

    calls = []

    class ScaleHandler(LayerHandler):
        def out_channels(self, module):
            return module.scale.shape[0]

        def remap(self, module, side, index):
            calls.append(side)
            return {"scale": replace_tensor(module, "scale", 0, index, fill=1.0),
                    "seen": replace_tensor(module, "seen", 0, index)}

        def sizes_from_shapes(self, module, shapes):
            return {"out": int(shapes["scale"][0])}

    model = nn.Sequential(nn.Linear(4, 4), Scale(4))
    state = {"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2), "1.scale": torch.full((2,), 3.0), "1.seen": torch.ones(2)}
    with pytest.raises(ValueError, match="layer '1' \\(Scale\\)"):
        resize_to_state_dict(model, state)
    assert model[0].weight.shape == (4, 4)  # nothing changed: every layer is checked first
    register_layer_handler(Scale, ScaleHandler())
    try:
        resize_to_state_dict(model, state)
        model.load_state_dict(state)
        assert model[1].scale.tolist() == [3.0, 3.0] and calls == ["out"]  # the layer handler, not the bare-parameter path
    finally:
        unregister_layer_handler(Scale)
    assert handler_for(Scale(1)) is None
