"""Weights & Biases logging that never blocks: online when logged in and reachable, else offline.

Offline runs are written under ``<save_dir>/wandb/offline-run-*`` and uploaded later with
``wandb sync <that folder>``. The ``WANDB_MODE`` environment variable, when set, always wins
(``WANDB_MODE=disabled`` turns W&B off, as the test suite does).
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_host() -> str:
    """Host name of the W&B server in use (``WANDB_BASE_URL`` or the public service)."""
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def wandb_logged_in() -> bool:
    """Whether W&B credentials exist: ``WANDB_API_KEY`` or a netrc entry written by ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(netrc_path)).authenticators(wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((wandb_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``WANDB_MODE`` if set, else ``mode``, with ``"auto"`` resolved to ``"online"`` or ``"offline"``."""
    if mode not in WANDB_MODES:
        raise ValueError(f"W&B mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    environment = os.environ.get("WANDB_MODE")
    if environment:
        return environment
    if mode != "auto":
        return mode
    return "online" if wandb_logged_in() and wandb_reachable() else "offline"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``mode="auto"``: online when logged in and the server answers.

    Args:
        mode: ``"auto"`` (default), ``"online"``, ``"offline"`` or ``"disabled"``.
        project: W&B project name.
        save_dir: folder under which W&B writes its run folders (one per run; nothing is overwritten).
        **kwargs: passed on to Lightning's ``WandbLogger`` and to ``wandb.init``.
    """

    def __init__(self, mode: str = "auto", project: str = "growprune", save_dir: str = "runs", **kwargs: Any):
        resolved = resolve_wandb_mode(mode)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, mode=resolved, offline=resolved in ("offline", "dryrun"), **kwargs)
        self.resolved_mode = resolved
