"""What the growprune command prints: one ``growprune: error:`` line for bad input, no boilerplate on a run.

The error cases run in-process (importing Lightning costs seconds per subprocess); the output test
runs the real console command once, in a subprocess, because Lightning and W&B write their
boilerplate through handlers bound to the process's streams.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from growprune.cli import GrowPruneCLI, main
from growprune.cli_errors import check_checkpoint, explain_parser_error
from growprune.cli_output import ShortEpochStepLogging, quiet_boilerplate
from growprune.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _strategy_config(path: Path, amount: str) -> str:
    path.write_text(
        textwrap.dedent(
            f"""
            trainer:
              callbacks:
                - class_path: growprune.strategies.UnstructuredPruning
                  init_args:
                    schedule:
                      class_path: growprune.schedules.OneShot
                      init_args:
                        {amount}
            """
        )
    )
    return str(path)


def _checkpoint(path: Path, kind: str) -> str:
    """Broken checkpoints of every kind a user meets: each must be refused before anything runs."""
    if kind == "missing":
        return str(path / "missing.ckpt")
    if kind == "directory":
        (path / "a_directory.ckpt").mkdir()
        return str(path / "a_directory.ckpt")
    good = path / "good.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(64, 64)}, "pytorch-lightning_version": "2.6.6"}, good)
    data = good.read_bytes()
    target = path / f"{kind}.ckpt"
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif kind == "corrupted":
        # every 97th byte after the zip signature flipped: the zip directory and the pickle are garbage
        target.write_bytes(bytes(byte ^ 0xFF if index > 8 and index % 97 == 0 else byte for index, byte in enumerate(data)))
    elif kind == "not_lightning":
        torch.save({"weight": torch.zeros(2)}, target)
    elif kind == "objects":
        torch.save({"state_dict": {}, "callback": argparse.Namespace(size=1)}, target)
    elif kind == "text":
        target.write_text("this is not a checkpoint\n")
    return str(target)


ERROR_CASES = {
    # name: (arguments after `fit -c quickstart` given a folder for input files, texts the line must contain)
    "amount_above_one": (
        lambda tmp: ["-c", _strategy_config(tmp / "s.yaml", "amount: 1.5")],
        ["trainer.callbacks[0] > growprune.strategies.UnstructuredPruning: ", "1.5"],
    ),
    "amount_negative": (lambda tmp: ["-c", _strategy_config(tmp / "s.yaml", "amount: -0.1")], ["-0.1"]),
    "yaml_key_typo": (
        lambda tmp: ["-c", _strategy_config(tmp / "s.yaml", "amout: 0.5")],
        ["trainer.callbacks > growprune.strategies.UnstructuredPruning > schedule > growprune.schedules.OneShot: "
         "option 'amout' is not accepted (did you mean 'amount'?)"],
    ),
    "missing_idx_file": (
        lambda tmp: ["--data", "idx", "--data.images", str(tmp / "no-images.gz"), "--data.labels", str(tmp / "no-labels.gz")],
        ["data > growprune.data.IdxDataModule: images file not found: ", "no-images.gz"],
    ),
    "nested_key_typo": (
        lambda tmp: ["--model.optimizer.init_args.lrr", "0.1"],
        ["model.optimizer > torch.optim.SGD: option 'lrr' is not accepted (did you mean 'lr'?)"],
    ),
    "abbreviated_key": (
        lambda tmp: ["--trainer.max_epoch", "3"],
        ["unknown option 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"],
    ),
    "checkpoint_missing": (lambda tmp: ["--ckpt_path", _checkpoint(tmp, "missing")], ["checkpoint not found: ", "missing.ckpt"]),
    "checkpoint_empty": (lambda tmp: ["--ckpt_path", _checkpoint(tmp, "empty")], ["empty.ckpt is empty"]),
    "checkpoint_truncated": (lambda tmp: ["--ckpt_path", _checkpoint(tmp, "truncated")], ["truncated.ckpt cannot be loaded"]),
    "checkpoint_corrupted": (lambda tmp: ["--ckpt_path", _checkpoint(tmp, "corrupted")], ["corrupted.ckpt cannot be loaded"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_gives_one_error_line_exit_2_and_creates_nothing(case, tmp_path_factory, capsys, monkeypatch):
    # offline W&B writes files as soon as a run starts: the test sees it if one does
    monkeypatch.setenv("WANDB_MODE", "offline")
    build, expected = ERROR_CASES[case]
    arguments = build(tmp_path_factory.mktemp("inputs"))  # outside the working directory
    before = set(Path.cwd().iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", QUICKSTART, "--trainer.enable_progress_bar", "false", *arguments])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("growprune: error: ") and len(lines[0]) > len("growprune: error: ") + 10
    for text in expected:
        assert text in lines[0], lines[0]
    assert captured.out == ""
    # nothing created: no run directory, no W&B run, no checkpoint
    assert set(Path.cwd().iterdir()) == before
    assert not list(Path.cwd().glob("**/wandb")) and not list(Path.cwd().glob("**/*.ckpt"))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "checkpoint not found: "),
        ("directory", "is a directory, not a checkpoint file"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "cannot be loaded (truncated or corrupted): "),
        ("corrupted", "cannot be loaded (truncated or corrupted): "),
        ("text", "cannot be loaded: not a PyTorch checkpoint file (it starts with b'this is "),
        ("objects", "cannot be loaded: it holds Python objects that torch.load(weights_only=True) refuses (Unsupported global"),
        ("not_lightning", "is not a Lightning checkpoint: it has no 'state_dict' entry (found: weight)"),
    ],
)
def test_checkpoint_check_names_file_and_problem(kind, message, tmp_path):
    path = _checkpoint(tmp_path, kind)
    with pytest.raises(ConfigurationError) as error:
        check_checkpoint(path)
    assert message in str(error.value) and path in str(error.value)
    assert "\n" not in str(error.value)


def test_checkpoint_check_accepts_valid_and_special_checkpoints(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(3)}, "pytorch-lightning_version": "2.6.6"}, good)
    check_checkpoint(str(good))
    # legacy (non-zip) torch files cannot be memory-mapped: the check must still accept them
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, legacy, _use_new_zipfile_serialization=False)
    check_checkpoint(str(legacy))
    # sharded checkpoints (FSDP, DeepSpeed) are directories
    (tmp_path / "sharded.ckpt").mkdir()
    check_checkpoint(str(tmp_path / "sharded.ckpt"), directories_allowed=True)
    # names Lightning resolves itself, and remote paths, are left to Lightning
    for special in ("last", "best", "hpc", "registry", "registry:model:v1", "s3://bucket/run.ckpt"):
        check_checkpoint(special)


def test_union_dump_reduces_to_the_subtype_the_user_meant():
    # jsonargparse's text for a single callback (not a list): the list and None subtypes fail generically
    message = textwrap.dedent(
        """\
        Parser key "trainer.callbacks":
          Does not validate against any of the Union subtypes
          Subtypes: [list[Callback], <class 'Callback'>, <class 'NoneType'>]
          Errors:
            - Expected a <class 'list'>
            - Problem with given class_path 'my.Callback':
                Parser key "size":
                  Expected a <class 'int'>. Got value: big
            - Expected a <class 'NoneType'>
          Given value type: <class 'dict'>
          Given value: {'class_path': 'my.Callback', 'init_args': {'size': 'big'}}"""
    )
    assert explain_parser_error(message) == "trainer.callbacks > my.Callback > size: expected int, got 'big'"
    # every subtype fails generically: say what was expected instead of an empty message
    message = textwrap.dedent(
        """\
        Parser key "trainer.max_epochs":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'int'>, <class 'NoneType'>]
          Errors:
            - Expected a <class 'int'>
            - Expected a <class 'NoneType'>
          Given value type: <class 'str'>
          Given value: x"""
    )
    assert explain_parser_error(message) == "trainer.max_epochs: expected int or None, got 'x'"
    # an unknown shape: its text on one line, never an empty message
    assert explain_parser_error("\n  Something new went wrong\n  details") == "Something new went wrong details"
    assert explain_parser_error("") == "invalid configuration"


@pytest.mark.parametrize(("arguments", "adapted"), [([], True), (["--trainer.log_every_n_steps", "50"], False)])
def test_short_epochs_log_every_step_unless_the_interval_is_set(arguments, adapted):
    cli = GrowPruneCLI(args=["-c", QUICKSTART, *arguments], run=False)
    assert any(isinstance(callback, ShortEpochStepLogging) for callback in cli.trainer.callbacks) is adapted


def test_boilerplate_filter_drops_only_the_known_lines():
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_boilerplate():
                rank_zero_info("GPU available: False, used: False")
                rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
                rank_zero_info("Restoring states from the checkpoint path at run.ckpt")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use something else", FutureWarning)
                rank_zero_warn("strategy 'prune': its schedule cannot finish within max_epochs=1")
            rank_zero_info("GPU available: True (cuda), used: True")  # outside the command: untouched
    finally:
        logger.removeHandler(handler)
    assert records == ["Restoring states from the checkpoint path at run.ckpt", "GPU available: True (cuda), used: True"]
    assert [str(warning.message) for warning in caught] == ["strategy 'prune': its schedule cannot finish within max_epochs=1"]


# Boilerplate the command must not print (Lightning, W&B); the user's own warnings stay visible.
NOISE = [
    "not recommended to provide both args and command line arguments",
    "anonymous setting has no effect",
    "litlogger",
    "litmodels",
    "💡 Tip",
    "GPU available:",
    "TPU available:",
    "Seed set to",
    "isinstance(treespec, LeafSpec)",
    "smaller than the logging interval",
    "Run history:",  # W&B's end-of-run sparklines (quiet: the summary table has the numbers)
]


def test_a_run_prints_no_boilerplate(tmp_path):
    environment = {**os.environ, "WANDB_MODE": "offline"}
    environment.pop("WANDB_SILENT", None)
    result = subprocess.run(
        [sys.executable, "-m", "growprune.cli", "fit", "-c", QUICKSTART, "--trainer.max_epochs", "1"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    found = [noise for noise in NOISE if noise in output]
    assert not found, f"boilerplate printed: {found}\n{output}"
    assert "growprune fit summary" in result.stdout
    summary = tmp_path / result.stdout.strip().splitlines()[-1].removeprefix("summary: ")
    # the quickstart's 20 batches per epoch are fewer than Lightning's 50-step logging interval:
    # the step loss is still logged (every step), and no column of metrics.csv is empty
    rows = list(csv.DictReader((summary.parent / "metrics.csv").open()))
    empty = [column for column in rows[0] if not any(row[column] for row in rows)]
    assert not empty, f"all-empty columns in metrics.csv: {empty}"
    assert len([row for row in rows if row.get("train/loss_step")]) == 20
