"""The shipped configs do what the issues promise, end to end through the CLI (shortened runs)."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from growprune.cli import main
from growprune.metrics import dense_flops

REPO = Path(__file__).resolve().parents[1]


def summary_from(output: str) -> dict:
    return json.loads(Path(output.strip().splitlines()[-1].removeprefix("summary: ")).read_text())


def fit_then_validate(config: str, override: str, tmp_path: Path, capsys) -> tuple[dict, dict, dict]:
    short = tmp_path / "short.yaml"
    short.write_text(textwrap.dedent(override))
    options = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["fit", "-c", str(REPO / "configs" / config), "-c", str(short), *options])
    fitted = summary_from(capsys.readouterr().out)
    checkpoint = torch.load(fitted["checkpoint"], weights_only=True)  # torch's safe default loads it
    main(["validate", "-c", str(REPO / "configs" / config), "-c", str(short), *options, "--ckpt_path", fitted["checkpoint"]])
    validated = summary_from(capsys.readouterr().out)
    return fitted, validated, checkpoint


def parameters_of(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of ``model``'s parameters (no buffers), loaded into ``model`` strictly."""
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")})
    return dict(model.named_parameters())


def lenet300_of_shapes(state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh LeNet-300-100 whose layers have the checkpoint's shapes (NNrelief may remove units)."""
    shapes = [tuple(state[f"model.{index}.weight"].shape) for index in (1, 3, 5)]
    layers: list[nn.Module] = [nn.Flatten()]
    for position, (outputs, inputs) in enumerate(shapes):
        layers += [nn.Linear(inputs, outputs)] + ([nn.ReLU()] if position < 2 else [])
    return nn.Sequential(*layers)


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11_bn_of_shapes(state: dict[str, torch.Tensor], in_channels: int = 1) -> nn.Module:
    """A fresh VGG-11-BN whose convolutions have the checkpoint's channel widths."""
    from growprune.models.vgg import VGG

    convs = sorted((int(key.split(".")[2]), value.shape[0]) for key, value in state.items()
                   if key.startswith("model.features.") and key.endswith(".weight") and value.dim() == 4)
    widths = iter(width for _, width in convs)
    return VGG([item if item == "M" else next(widths) for item in VGG11], num_classes=10, in_channels=in_channels)


def vgg_flops_by_hand(model: nn.Module, size: int) -> int:
    """2 x multiply-adds of every 3x3 convolution (padding 1, ceil-mode 2x2 pools) and the classifier."""
    flops = 0
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            flops += 2 * layer.in_channels * layer.out_channels * 9 * size * size
        elif isinstance(layer, nn.MaxPool2d):
            size = math.ceil(size / 2)
    return flops + 2 * model.classifier.in_features * model.classifier.out_features


def test_lenet_nnrelief_config_prunes_reports_and_reloads(tmp_path, capsys):
    fitted, validated, checkpoint = fit_then_validate(
        "lenet300_nnrelief_digits.yaml",
        """
        trainer:
          max_epochs: 3
          callbacks:
            - class_path: growprune.strategies.NNReliefPruning
              init_args: {name: nnrelief, iterations: 2, every: 1, pruning_samples: 256}
        """,
        tmp_path,
        capsys,
    )
    # measured at 5670153, 3 runs, identical (seeded): val/acc 0.9481, compression 2.768 (64 % of the
    # weights pruned after 2 rounds). Tolerance: 1.5 points of accuracy (4 of 270 images), 5 % compression.
    assert fitted["val/acc"] >= 0.948 - 0.015
    assert fitted["compression"] == pytest.approx(2.768, rel=0.05)
    assert fitted["latency/batch1_ms"] > 0
    records = checkpoint["growprune"]["edit_log"]
    assert [r["strategy"] for r in records] == ["nnrelief", "nnrelief"]
    assert checkpoint["growprune"]["masks"]
    # recount from the checkpoint, on a freshly built network of its layer shapes
    state = checkpoint["state_dict"]
    model = lenet300_of_shapes(state)
    parameters = parameters_of(state, model)
    weights = [parameters[f"{index}.weight"] for index in (1, 3, 5)]
    assert dense_flops(model, (1, 8, 8)) == fitted["flops/dense"] == sum(2 * w.numel() for w in weights)
    assert fitted["flops/effective"] == sum(2 * int(torch.count_nonzero(w)) for w in weights)
    nonzero = sum(int(torch.count_nonzero(p)) for p in parameters.values())
    assert fitted["params/nonzero"] == nonzero
    assert fitted["compression"] == pytest.approx(50_610 / nonzero)  # the dense LeNet-300-100 on 8x8 digits
    assert validated["val/acc"] == pytest.approx(fitted["val/acc"])
    assert validated["params/nonzero"] == fitted["params/nonzero"]


def test_polarization_cpu_twin_prunes_channels_reports_and_reloads(tmp_path, capsys):
    fitted, validated, checkpoint = fit_then_validate(
        "vgg11_polarization_digits.yaml",
        """
        trainer:
          max_epochs: 2
          limit_train_batches: 6
          callbacks:
            - class_path: growprune.strategies.PolarizationPruning
              init_args:
                name: polarization
                lambda_: 0.05
                schedule: {class_path: growprune.schedules.OneShot, init_args: {amount: 0.0, at: 1}}
        """,
        tmp_path,
        capsys,
    )
    from growprune.models import create_model

    base = create_model("vgg11_bn", in_channels=1)
    base_flops = dense_flops(base, (1, 16, 16))
    assert base_flops == vgg_flops_by_hand(base, 16)
    # recount from the checkpoint, on a freshly built VGG-11-BN of its channel widths
    state = checkpoint["state_dict"]
    model = vgg11_bn_of_shapes(state)
    parameters = parameters_of(state, model)
    pruned_flops = dense_flops(model, (1, 16, 16))
    assert pruned_flops == vgg_flops_by_hand(model, 16) == fitted["flops/dense"] == validated["flops/dense"]
    nonzero = sum(int(torch.count_nonzero(p)) for p in parameters.values())
    assert fitted["params/nonzero"] == nonzero
    assert fitted["compression"] == pytest.approx(sum(p.numel() for p in base.parameters()) / nonzero)
    record = checkpoint["growprune"]["edit_log"][0]
    assert record["action"] == "prune_channels"
    assert record["flops_reduction"] == pytest.approx(base_flops / pruned_flops, rel=1e-6)
    # measured at 5670153, 3 runs, identical (seeded): 3.977x fewer FLOPs, compression 3.999 (50.4 % of
    # the channels cut). Tolerance 5 %. No accuracy claim: after 12 steps VGG-11 is at chance (measured
    # val/acc 0.096, 10 classes); the full config's accuracy is checked in test_slow_configs.py.
    assert base_flops / pruned_flops == pytest.approx(3.977, rel=0.05)
    assert fitted["compression"] == pytest.approx(3.999, rel=0.05)
    assert record["achieved"] == pytest.approx(0.504, abs=0.03)
    assert fitted["latency/batch1_ms"] > 0
    assert validated["val/acc"] == pytest.approx(fitted["val/acc"])
