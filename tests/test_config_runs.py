"""The shipped configs do what the issues promise, end to end through the CLI (shortened runs)."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from growprune.cli import main

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
    assert fitted["compression"] > 1.5 and fitted["flops/effective"] < fitted["flops/dense"]
    assert fitted["val/acc"] > 0.8 and fitted["latency/batch1_ms"] > 0
    records = checkpoint["growprune"]["edit_log"]
    assert [r["strategy"] for r in records] == ["nnrelief", "nnrelief"]
    assert checkpoint["growprune"]["masks"]
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
    from growprune.metrics import dense_flops as count_flops
    from growprune.models import create_model

    dense_flops = count_flops(create_model("vgg11_bn", in_channels=1), (1, 16, 16))
    record = checkpoint["growprune"]["edit_log"][0]
    assert record["action"] == "prune_channels" and record["flops_reduction"] > 1.0
    assert fitted["flops/dense"] < dense_flops
    assert fitted["latency/batch1_ms"] > 0
    assert validated["flops/dense"] == fitted["flops/dense"]
    assert validated["val/acc"] == pytest.approx(fitted["val/acc"])
