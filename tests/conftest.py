"""Shared fixtures: W&B off, quiet Lightning, tiny trainers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Each test runs in its own directory so run folders (runs/, wandb/) never collide or leak."""
    monkeypatch.chdir(tmp_path)
    yield
