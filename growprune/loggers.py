"""Weights & Biases logging that never blocks: online when logged in and reachable, else offline.

Offline runs are written under ``<save_dir>/wandb/offline-run-*`` and uploaded later with
``wandb sync <that folder>``. The ``WANDB_MODE`` environment variable, when set, always wins
(``WANDB_MODE=disabled`` turns W&B off, as ``make test`` does).

Several runs in one process (a benchmark sweep, an evolutionary search) each get their own W&B run:
:meth:`WandbLogger.finish` ends the run a logger started (the ``growprune`` command calls it after
every command, also when training raised), and a new logger never attaches to a run that an
earlier growprune logger left open (Lightning's own logger reuses any open ``wandb.run``).
"""

from __future__ import annotations

import netrc
import os
import socket
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

WANDB_MODES = ("auto", "online", "offline", "disabled")

# Runs started by growprune loggers and not finished yet: a later logger finishes them rather than
# logging into them (weak, so a run that is gone is forgotten).
_STARTED_RUNS: "weakref.WeakSet[Any]" = weakref.WeakSet()


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
            Made absolute at once: W&B's background service keeps the working directory it started
            in, so a relative folder would land elsewhere once the process changes directory.
        **kwargs: passed on to Lightning's ``WandbLogger`` and to ``wandb.init``.
    """

    def __init__(self, mode: str = "auto", project: str = "growprune", save_dir: str = "runs", **kwargs: Any):
        resolved = resolve_wandb_mode(mode)
        if resolved in ("offline", "dryrun") and kwargs.get("log_model"):
            raise ValueError(f"W&B log_model={kwargs['log_model']!r} needs an online run, but W&B is {resolved}")
        # created when the run starts (see experiment): a command that fails earlier leaves no folder
        directory = Path(save_dir).resolve()
        # The mode goes to wandb.init; Lightning's offline=True would set WANDB_MODE for the whole
        # process, and every later logger in it would be offline too.
        kwargs.setdefault("mode", resolved)
        super().__init__(project=project, save_dir=str(directory), **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning passes anonymous=None; current wandb warns about any value of it, None included
            self._wandb_init.pop("anonymous", None)
        self.resolved_mode = resolved
        self._owns_run = False

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run, started on first use (never one that an earlier growprune logger left open)."""
        if self._experiment is None:
            import wandb

            Path(self._save_dir).mkdir(parents=True, exist_ok=True)  # older wandb falls back to a temp folder
            if wandb.run is not None and wandb.run in _STARTED_RUNS:
                wandb.run.finish()
            starts = wandb.run is None and getattr(self, "_attach_id", None) is None
            run = super().experiment
            self._owns_run = starts
            if starts:
                _STARTED_RUNS.add(run)
        return self._experiment

    def continue_run(self, run_id: str) -> None:
        """Log into the existing W&B run ``run_id`` (W&B resumes it) instead of starting a new one.

        Call before the run starts. Offline, W&B writes a second ``offline-run-*-<run_id>`` folder;
        ``wandb sync`` uploads both into the one run.
        """
        if self._experiment is not None:
            raise RuntimeError(f"W&B run {self._experiment.id} has started; continue_run must come before")
        self._id = run_id
        self._wandb_init.update(id=run_id, resume="allow")

    def finish(self, exit_code: int = 0) -> None:
        """Finish the W&B run this logger started (nothing for a run it attached to, or none).

        Using the logger again afterwards continues the same run (W&B resumes it by id).
        """
        run = self._experiment
        if run is None or not self._owns_run:
            return
        _STARTED_RUNS.discard(run)
        self._owns_run = False
        self._experiment = None
        self.continue_run(run.id)
        run.finish(exit_code=exit_code)

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers attach to the run the main process started; only the main one finishes it.
        state = super().__getstate__()
        state["_owns_run"] = False
        return state
