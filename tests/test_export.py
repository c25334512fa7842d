"""growprune.export / ``growprune export``: masks permanent, batch norms folded exactly, files that
reload and reproduce the checkpoint's outputs, refusals before anything is written."""

import json
from pathlib import Path
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune import GrowPruneModule
from growprune.cli_export import export_main
from growprune.export import (SparseConv2d, SparseLinear, export_checkpoint, fold_batch_norms, make_masks_permanent,
                              sparsify)
from growprune.models import create_model
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning, UnstructuredPruning
from tests.helpers import tiny_data, tiny_trainer


def _fit(tmp_path, module, strategy, input_shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[strategy])
        trainer.fit(module, tiny_data(num_samples=64, batch_size=16, input_shape=input_shape))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory):
    """A LeNet-300-100 trained 2 epochs, 90 % of its weights masked after the first."""
    tmp_path = tmp_path_factory.mktemp("lenet")
    module = GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8))
    path = _fit(tmp_path, module, UnstructuredPruning(OneShot(amount=0.9, at=1), verbose=False), (1, 8, 8))
    return path, module.eval()


@pytest.fixture(scope="module")
def vgg_checkpoint(tmp_path_factory):
    """A VGG-11-BN of 1/8 width trained 2 epochs, half its FLOPs removed by channel pruning after the first."""
    tmp_path = tmp_path_factory.mktemp("vgg")
    module = GrowPruneModule("vgg11_bn", arch_kwargs={"width": 0.125}, num_classes=4, input_shape=(3, 16, 16))
    strategy = StructuredPruning(OneShot(amount=0.5, at=1), target="flops", verbose=False)
    path = _fit(tmp_path, module, strategy, (3, 16, 16))
    return path, module.eval()


def _outputs_match(model, reference_module, shape, atol=1e-5):
    batch = torch.randn(5, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_module(batch)
        got = model(batch)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=atol), (got - expected).abs().max()


def test_masked_lenet_exports_reload_and_keep_every_pruned_weight_zero(lenet_checkpoint, tmp_path):
    path, module = lenet_checkpoint
    assert module.masks, "the fixture's fit should have masked weights"
    record = export_checkpoint(path, tmp_path / "out", ["module", "torchscript", "onnx"])
    assert set(record["files"]) == {"module", "torchscript", "onnx"}
    assert all(check["passed"] and check["max_abs_diff"] <= 1e-4 for check in record["verification"].values())
    assert json.loads((tmp_path / "out" / "export.json").read_text())["verification"] == record["verification"]

    saved = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    plain = saved["model"]
    assert saved["metadata"]["input_shape"] == [1, 8, 8]
    for name, mask in module.masks.items():
        weight = plain.get_parameter(name)
        assert torch.all(weight[mask == 0] == 0)  # no pruned weight comes back
        assert isinstance(weight, nn.Parameter) and not name.endswith("_orig")
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in plain.modules())
    _outputs_match(plain, module, (1, 8, 8))
    _outputs_match(torch.jit.load(str(tmp_path / "out" / "model.ts")), module, (1, 8, 8))


def test_a_second_export_goes_to_a_numbered_directory(lenet_checkpoint, tmp_path):
    path, _ = lenet_checkpoint
    first = export_checkpoint(path, tmp_path / "out", ["module"])
    before = (tmp_path / "out" / "model.pt").read_bytes()
    second = export_checkpoint(path, tmp_path / "out", ["module"])
    assert first["out_dir"] == str(tmp_path / "out") and second["out_dir"] == str(tmp_path / "out-1")
    assert (tmp_path / "out" / "model.pt").read_bytes() == before


def test_sparse_export_stores_csr_weights_with_the_same_outputs(lenet_checkpoint, tmp_path):
    path, module = lenet_checkpoint
    record = export_checkpoint(path, tmp_path / "out", ["module", "torchscript"], sparse=True)
    assert record["sparse_layers"] and record["verification"]["torchscript"]["sparse"] is False
    plain = torch.load(tmp_path / "out" / "model.pt", weights_only=False)["model"]
    sparse_layers = [layer for layer in plain.modules() if isinstance(layer, SparseLinear)]
    assert len(sparse_layers) == len(record["sparse_layers"])
    assert all(layer.weight.layout == torch.sparse_csr for layer in sparse_layers)
    _outputs_match(plain, module, (1, 8, 8))


def test_pruned_vgg_exports_with_every_batch_norm_folded(vgg_checkpoint, tmp_path):
    path, module = vgg_checkpoint
    widths = [layer.out_channels for layer in module.model.modules() if isinstance(layer, nn.Conv2d)]
    fresh = create_model("vgg11_bn", num_classes=4, width=0.125)
    assert sum(widths) < sum(layer.out_channels for layer in fresh.modules() if isinstance(layer, nn.Conv2d))
    record = export_checkpoint(path, tmp_path / "out", ["module", "torchscript", "onnx"], batch_size=3)
    assert len(record["folded_batch_norms"]) == 8 and record["unfolded_batch_norms"] == {}
    assert all(check["passed"] for check in record["verification"].values())
    plain = torch.load(tmp_path / "out" / "model.pt", weights_only=False)["model"]
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in plain.modules())
    assert [layer.out_channels for layer in plain.modules() if isinstance(layer, nn.Conv2d)] == widths
    _outputs_match(plain, module, (3, 16, 16))
    _outputs_match(torch.jit.load(str(tmp_path / "out" / "model.ts")), module, (3, 16, 16))


# ------------------------------------------------------------------------------ folding exactness
def _randomise_norms(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator))
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) * 2 + 0.1)
            if layer.affine:
                layer.weight.data.copy_(torch.randn(layer.num_features, generator=generator))
                layer.bias.data.copy_(torch.randn(layer.num_features, generator=generator))
    return model.eval()


class ConvFamilies(nn.Module):
    """Conv without bias + BN, depthwise conv + BN, grouped conv + BN (affine=False), Conv1d + BN1d, linear + BN1d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.bn3 = nn.BatchNorm2d(8, affine=False)
        self.conv1d = nn.Conv1d(8, 6, 3)
        self.bn4 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6 * 14, 5)
        self.bn5 = nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.depthwise(x)))
        x = self.bn3(self.grouped(x))
        x = F.relu(self.bn4(self.conv1d(x.flatten(2)[..., :16])))
        return self.bn5(self.fc(x.flatten(1)))


def _assert_exact_fold(model, shape, expected_folded):
    example = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    folded = fold_batch_norms(model, example[:1])
    assert sorted(folded.folded_batch_norms) == sorted(expected_folded)
    with torch.no_grad():
        reference, got = model(example), folded(example)
    assert (got - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item())
    return folded


def test_folding_is_exact_on_conv_and_linear_families():
    model = _randomise_norms(ConvFamilies())
    folded = _assert_exact_fold(model, (3, 4, 4), ["bn1", "bn2", "bn3", "bn4", "bn5"])
    assert folded.stem.bias is not None  # a bias-free conv gets one
    assert isinstance(model.bn1, nn.BatchNorm2d), "the original model stays untouched"


def test_folding_is_exact_on_resnet_basic_blocks():
    model = _randomise_norms(create_model("resnet20", num_classes=10, shortcut="B"))
    norms = [name for name, layer in model.named_modules() if isinstance(layer, nn.BatchNorm2d)]
    folded = _assert_exact_fold(model, (3, 16, 16), norms)  # incl. the 1x1 projection shortcuts' norms
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in folded.modules())


class Unfoldable(nn.Module):
    """Batch norms that must stay: after a ReLU, on a conv output also used by the residual,
    without running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.after_relu = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.shared = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.batch_stats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        x = self.after_relu(F.relu(self.conv(x)))
        y = self.conv2(x)
        x = self.shared(y) + y
        return self.batch_stats(self.conv3(x))


def test_batch_norms_that_cannot_be_folded_stay_and_are_reported():
    model = _randomise_norms(Unfoldable())
    example = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    folded = fold_batch_norms(model, example[:1])
    assert folded.folded_batch_norms == []
    assert set(folded.unfolded_batch_norms) == {"after_relu", "shared", "batch_stats"}
    assert "also used elsewhere" in folded.unfolded_batch_norms["shared"]
    assert "running statistics" in folded.unfolded_batch_norms["batch_stats"]
    with torch.no_grad():
        assert torch.allclose(folded(example), model(example))


# ------------------------------------------------------------------------------------ pieces
def test_make_masks_permanent_removes_torch_prune_hooks_and_keeps_zeros():
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    mask = model[0].weight_mask.clone()
    plain = make_masks_permanent(model)
    assert not prune.is_pruned(plain) and not plain[0]._forward_pre_hooks
    assert isinstance(plain[0].weight, nn.Parameter) and not hasattr(plain[0], "weight_orig")
    assert torch.all(plain[0].weight[mask == 0] == 0) and int((plain[0].weight == 0).sum()) == int((mask == 0).sum())


def test_sparse_layers_compute_what_the_dense_ones_do():
    generator = torch.Generator().manual_seed(0)
    conv, linear = nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Linear(7, 4)
    with torch.no_grad():
        for layer in (conv, linear):
            layer.weight.mul_((torch.rand(layer.weight.shape, generator=generator) > 0.8).float())
    x, v = torch.randn(2, 3, 9, 9, generator=generator), torch.randn(3, 2, 7, generator=generator)
    with torch.no_grad():
        assert torch.allclose(SparseConv2d(conv)(x), conv(x), atol=1e-6)
        assert torch.allclose(SparseLinear(linear)(v), linear(v), atol=1e-6)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(125, 3))
    assert sparsify(model, threshold=0.5) == ["0"]  # the dense linear layer stays
    with pytest.raises(ValueError, match="threshold"):
        sparsify(model, threshold=0)


# ---------------------------------------------------------------------------------- the command
def test_cli_exports_and_prints_the_summary(lenet_checkpoint, tmp_path, capsys):
    path, _ = lenet_checkpoint
    assert export_main(["--ckpt_path", str(path), "--out", str(tmp_path / "cli"), "--formats", "module,torchscript"]) == 0
    out = capsys.readouterr().out
    assert f"summary: {tmp_path / 'cli'}/export.json" in out and "max abs diff" in out
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["export.json", "model.pt", "model.ts"]


@pytest.mark.parametrize("args, message", [
    (["--ckpt_path", "missing.ckpt"], "checkpoint not found: missing.ckpt"),
    (["--ckpt_path", "garbage.ckpt"], "cannot be loaded"),
    (["--ckpt_path", "{ckpt}", "--formats", "module,tflite"], "unknown export format 'tflite'; valid formats: module, torchscript, onnx"),
    (["--ckpt_path", "{ckpt}", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--ckpt_path", "{ckpt}", "--format", "onnx"], "unrecognized arguments: --format onnx"),  # no abbreviations
    ([], "required: --ckpt_path"),
])
def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(lenet_checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    args = [arg.replace("{ckpt}", str(lenet_checkpoint[0])) for arg in args]
    before = sorted(tmp_path.iterdir())
    assert export_main(args + ["--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("growprune: error: ") and err.count("\n") == 1 and message in err
    assert sorted(tmp_path.iterdir()) == before


def test_onnx_without_the_onnx_package_is_refused_before_anything_is_written(lenet_checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert export_main(["--ckpt_path", str(lenet_checkpoint[0]), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'growprune[export]'" in err and "--formats module,torchscript" in err
    assert not (tmp_path / "never").exists()


def test_a_format_that_fails_keeps_the_others_records_why_and_exits_1(lenet_checkpoint, tmp_path, capsys, monkeypatch):
    import growprune.export as export

    def broken_exporter(*args, **kwargs):
        raise RuntimeError("exporter limit")

    monkeypatch.setattr(export, "_write_onnx", broken_exporter)
    out = tmp_path / "out"
    path, _ = lenet_checkpoint
    assert export_main(["--ckpt_path", str(path), "--out", str(out)]) == 1
    record = json.loads((out / "export.json").read_text())
    assert record["verification"]["onnx"] == {"passed": False, "error": "RuntimeError: exporter limit"}
    for name in ("module", "torchscript"):  # checked on two batch sizes: a trace must not fix the batch
        assert record["verification"][name]["passed"] and record["verification"][name]["batch_sizes"] == [1, 3]
        assert Path(record["files"][name]).is_file()
    assert "onnx: RuntimeError: exporter limit" in capsys.readouterr().err
