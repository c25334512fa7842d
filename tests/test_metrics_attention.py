"""FLOPs of attention: counted under eval + no_grad, attributed to in_proj_weight / out_proj.weight."""

import pytest
import torch
import torch.nn as nn

from growprune.metrics import dense_flops, effective_flops, layer_flops

E, H, L = 16, 4, 5  # embedding, heads, tokens


class SelfAttention(nn.Module):
    def __init__(self, need_weights: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim=E, num_heads=H, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


class CrossAttention(nn.Module):
    """Queries from the first ``L`` tokens, keys/values from the rest: the packed in-projection is split."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim=E, num_heads=H, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, memory = x[:, :L], x[:, L:]
        return self.attn(query, memory, memory, need_weights=False)[0]


def nnz(tensor: torch.Tensor) -> int:
    return int(torch.count_nonzero(tensor))


def self_attention_by_hand(attn: nn.MultiheadAttention) -> int:
    """One multiply-add = 2 FLOPs: in-projection, scores Q K^T, weighted values A V, out-projection."""
    in_projection = 2 * L * nnz(attn.in_proj_weight)  # dense: 2 * L * E * 3E
    scores = weighted_values = 2 * L * L * E
    out_projection = 2 * L * nnz(attn.out_proj.weight)  # dense: 2 * L * E * E
    return in_projection + scores + weighted_values + out_projection


@pytest.mark.parametrize("need_weights", [True, False])  # bmm path / scaled_dot_product_attention path
def test_self_attention_flops_by_hand(need_weights):
    model = SelfAttention(need_weights)
    expected = 2 * L * E * 3 * E + 2 * L * L * E + 2 * L * L * E + 2 * L * E * E
    assert self_attention_by_hand(model.attn) == expected
    assert dense_flops(model, (L, E)) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # the fast path is switched back on


def test_attention_layer_keys_are_the_parameter_owners():
    per_layer = layer_flops(SelfAttention(), (L, E))
    assert per_layer == {
        "": 2 * L * E * 3 * E + 4 * L * L * E + 2 * L * E * E,
        "attn": 2 * L * E * 3 * E + 4 * L * L * E,  # owns in_proj_weight; runs the score products
        "attn.out_proj": 2 * L * E * E,  # never called, but its weight is read by attn's forward
    }


@pytest.mark.parametrize("parameter", ["out_proj.weight", "in_proj_weight"])
def test_masking_half_an_attention_weight_removes_its_share(parameter):
    model = SelfAttention()
    dense = dense_flops(model, (L, E))
    weight = model.attn.get_parameter(parameter)
    with torch.no_grad():
        weight[: weight.shape[0] // 2] = 0
    share = {"out_proj.weight": 2 * L * E * E, "in_proj_weight": 2 * L * E * 3 * E}[parameter]
    assert effective_flops(model, (L, E)) == pytest.approx(dense - share / 2, rel=1e-12)
    assert effective_flops(model, (L, E)) == pytest.approx(self_attention_by_hand(model.attn), rel=1e-12)


def test_masking_the_query_part_of_a_split_in_projection():
    model = CrossAttention()
    memory = 3
    dense = dense_flops(model, (L + memory, E))
    # queries: L*E*E, keys and values: 2*memory*E*E, scores and weighted values, out-projection
    assert dense == 2 * (L * E * E + 2 * memory * E * E + 2 * L * memory * E + L * E * E)
    with torch.no_grad():
        model.attn.in_proj_weight[:E] = 0  # the query projection only
    assert effective_flops(model, (L + memory, E)) == pytest.approx(dense - 2 * L * E * E, rel=1e-12)


def test_attention_counted_in_a_transformer_encoder_layer_under_no_grad():
    layer = nn.TransformerEncoderLayer(d_model=E, nhead=H, dim_feedforward=2 * E, batch_first=True).eval()
    expected = 2 * L * E * 3 * E + 4 * L * L * E + 2 * L * E * E + 2 * (2 * L * E * 2 * E)
    with torch.no_grad():
        assert dense_flops(layer, (L, E)) == expected


class PaddedEncoder(nn.Module):
    """An nn.TransformerEncoder stack run with a key-padding mask: in eval mode under no_grad its fast
    path packs the unpadded tokens into a nested tensor and runs fused kernels the counter cannot see."""

    def __init__(self, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=E, nhead=H, dim_feedforward=2 * E, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        padding[:, -1] = True  # the last token is padding
        return self.encoder(x, src_key_padding_mask=padding)


def test_attention_counted_in_a_transformer_encoder_stack_with_padding():
    """Every token is computed on the slow path (padding only masks attention), so: layers x one layer."""
    model = PaddedEncoder(layers=2)
    per_layer = 2 * L * E * 3 * E + 4 * L * L * E + 2 * L * E * E + 2 * (2 * L * E * 2 * E)
    with torch.no_grad():
        assert dense_flops(model, (L, E)) == 2 * per_layer
    assert torch.backends.mha.get_fastpath_enabled()


def vit_b_16_by_hand(side: int, classes: int) -> int:
    """ViT-B/16 (Dosovitskiy et al. 2021): 16x16 patches, 12 layers, width 768, MLP 3072, one class token."""
    patches, width, mlp, layers = (side // 16) ** 2, 768, 3072, 12
    tokens = patches + 1
    embedding = 2 * patches * width * 3 * 16 * 16
    layer = 2 * tokens * width * 3 * width + 4 * tokens**2 * width + 2 * tokens * width**2 + 2 * 2 * tokens * width * mlp
    return embedding + layers * layer + 2 * width * classes  # the head reads the class token only


def test_torchvision_vit_b_16_at_64x64_counts_its_attention():
    """Issue 8: counted under eval + no_grad with the fast path on, this gave 1.94 GFLOPs instead of 2.91.
    Built for real (about 1 s): on the meta device the fast path never runs, so the bug would not show."""
    from growprune.models import create_model

    model = create_model("torchvision.vit_b_16", num_classes=1000, image_size=64)
    expected = vit_b_16_by_hand(64, 1000)
    assert expected / 1e9 == pytest.approx(2.9188, abs=1e-4)
    with torch.no_grad():
        assert dense_flops(model.eval(), (3, 64, 64)) == expected
