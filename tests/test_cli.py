"""The growprune command, driven in-process (importing Lightning costs seconds per subprocess)."""

import csv
import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from growprune import GrowPruneModule
from growprune.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FAST = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
NO_WANDB_LOGGER = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "runs"]


def summary_path_from(output: str) -> Path:
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith("summary: ")
    return Path(last_line.removeprefix("summary: "))


def test_fit_quickstart_writes_summary_and_checkpoint_that_validate_reloads(capsys):
    main(["fit", "-c", QUICKSTART, *FAST])
    output = capsys.readouterr().out
    assert "growprune fit summary" in output
    summary = json.loads(summary_path_from(output).read_text())
    for key in ("val/acc", "params/total", "params/nonzero", "flops/dense", "flops/effective", "compression"):
        assert key in summary, key
    assert summary["latency/batch1_ms"] > 0
    assert summary["val/acc"] > 0.8
    assert summary["params/total"] == 50_610  # LeNet-300-100 on 8x8 digits
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_file()
    # the checkpoint loads with torch's safe default (no pickled objects)
    torch.load(checkpoint, weights_only=True)
    # ... and as a module in Python: Lightning re-instantiates it through jsonargparse, whose factory
    # partials must still be described by class path (so the reloaded module's own checkpoints keep them)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(does not have many workers|Checkpoint directory).*")
        reloaded = GrowPruneModule.load_from_checkpoint(checkpoint, weights_only=True)
    assert reloaded.hparams["optimizer"]["class_path"] == "torch.optim.SGD"
    assert reloaded.hparams["optimizer"]["init_args"]["lr"] == 0.05
    assert reloaded.hparams["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.CosineAnnealingLR"

    main(["validate", "-c", QUICKSTART, *FAST, "--ckpt_path", str(checkpoint)])
    output = capsys.readouterr().out
    validated = json.loads(summary_path_from(output).read_text())
    assert validated["val/acc"] == pytest.approx(summary["val/acc"])
    # a new run directory: the fit run's summary is untouched
    assert summary_path_from(output) != Path(summary["checkpoint"]).parents[1] / "summary.json"


def test_test_subcommand_reports_test_accuracy(capsys):
    main(["fit", "-c", QUICKSTART, *FAST])
    checkpoint = json.loads(summary_path_from(capsys.readouterr().out).read_text())["checkpoint"]
    main(["test", "-c", QUICKSTART, *FAST, "--ckpt_path", checkpoint])
    path = summary_path_from(capsys.readouterr().out)
    summary = json.loads(path.read_text())
    # the 2-epoch quickstart checkpoint: measured test/acc 0.9111 at 5670153 (3 runs, identical: seeded
    # and deterministic); margin 3 points (8 of the 270 test images). The untrained network: 0.0963.
    assert summary["test/acc"] > 0.88
    # the summary reports what the run logged: the CSV logger's test/acc of this run directory
    logged = [row["test/acc"] for row in csv.DictReader((path.parent / "metrics.csv").open()) if row.get("test/acc")]
    assert len(logged) == 1 and float(logged[0]) == pytest.approx(summary["test/acc"], abs=1e-6)
    # without a checkpoint `test` evaluates the untrained network: the threshold above separates them
    main(["test", "-c", QUICKSTART, *FAST])
    untrained = json.loads(summary_path_from(capsys.readouterr().out).read_text())
    assert untrained["test/acc"] < 0.3


def test_print_config_shows_linked_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", QUICKSTART, "--print_config"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    assert "arch: lenet_300_100" in output
    assert "growprune.data.DigitsDataModule" in output


def test_layered_configs_later_file_wins(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("trainer:\n  max_epochs: 1\nmodel:\n  arch: lenet5\ndata:\n  init_args:\n    image_size: 16\n")
    main(["fit", "-c", QUICKSTART, "-c", str(override), "--trainer.enable_progress_bar", "false"])
    summary = json.loads(summary_path_from(capsys.readouterr().out).read_text())
    assert summary["epochs"] == 1
    assert summary["params/total"] == 20 * 25 + 20 + 50 * 20 * 25 + 50 + 50 * 500 + 500 + 500 * 10 + 10


def test_user_classes_plug_in_by_class_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn
            from lightning.pytorch.callbacks import Callback

            class TinyNet(nn.Module):
                def __init__(self, hidden: int = 16):
                    super().__init__()
                    self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

                def forward(self, x):
                    return self.net(x)

            class CountEpochs(Callback):
                epochs = 0

                def on_train_epoch_end(self, trainer, pl_module):
                    CountEpochs.epochs += 1
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "plugins.yaml"
    config.write_text(
        textwrap.dedent(
            """
            model:
              arch:
                class_path: my_plugins.TinyNet
                init_args:
                  hidden: 12
            trainer:
              callbacks:
                - class_path: my_plugins.CountEpochs
            """
        )
    )
    main(["fit", "-c", QUICKSTART, "-c", str(config), *FAST])
    summary = json.loads(summary_path_from(capsys.readouterr().out).read_text())
    assert summary["params/total"] == 64 * 12 + 12 + 12 * 10 + 10
    assert sys.modules["my_plugins"].CountEpochs.epochs == 2


def test_data_short_names_resolve(capsys):
    main(["fit", "--data", "synthetic", "--data.num_samples", "128", *FAST, *NO_WANDB_LOGGER])
    summary = json.loads(summary_path_from(capsys.readouterr().out).read_text())
    assert summary["params/total"] == 50_610


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model.arch", "lenet_301"], "unknown model 'lenet_301'; valid names: lenet5, lenet_300_100"),
        (["--data", "digitz"], "unknown data set 'digitz'; valid names: cifar10"),
        (["--model.arch", "lenet5"], "16x16"),
        (["--data", "idx", "--data.images", "/missing/images.gz", "--data.labels", "/missing/labels.gz"], "/missing/images.gz"),
        (["--model.no_such_key", "3"], "no_such_key"),
    ],
)
def test_bad_input_fails_with_clear_message_before_training(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", QUICKSTART, *FAST, *arguments])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("growprune: error: "), captured.err
    assert message in lines[0]
    assert "Epoch" not in captured.out + captured.err
    assert not Path("runs").exists()


def test_listing_commands(capsys):
    main(["models"])
    models = capsys.readouterr().out.split()
    assert {"lenet_300_100", "vgg16_bn", "resnet56", "torchvision.resnet18"} <= set(models)
    main(["datasets"])
    assert "growprune.data.DigitsDataModule" in capsys.readouterr().out


def test_wandb_offline_run_writes_files(capsys, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", "-c", QUICKSTART, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    capsys.readouterr()
    runs = list(Path("runs/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run has no .wandb data file"
    # the command finished its run: the next one in this process starts its own (tests/test_cli_runs.py)
    assert wandb.run is None
