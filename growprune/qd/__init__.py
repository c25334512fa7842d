"""Quality diversity (MAP-Elites, with pyribs) over pruned networks: ``growprune qd``.

* :mod:`~growprune.qd.tasks`: :class:`QDTask` (what is searched: solutions -> objective and
  descriptors), :class:`Evaluation`, :func:`evaluate_chunk` (one engine task);
* :mod:`~growprune.qd.supervised`: :class:`SupervisedMaskTask`, pruning masks of a trained classifier;
* :mod:`~growprune.qd.mask_emitter`: :class:`MaskMutationEmitter`, a pyribs emitter of mask mutations;
* :mod:`~growprune.qd.control`: ``ControlTask``, MLP policies of gymnasium control tasks, and
  :mod:`~growprune.qd.weight_emitter`: ``PruningMutationEmitter``;
* :mod:`~growprune.qd.run`: :class:`QDRun` (the command's run directory, resume, outputs) and
  :func:`load_run`.

pyribs (``pip install 'growprune[qd]'``) is imported only by the names that need it
(the emitters, the run), so ``import growprune.qd`` works without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from growprune.qd.supervised import SupervisedMaskTask
from growprune.qd.tasks import Evaluation, QDTask, evaluate_chunk

# name -> module of names imported on first use (they need pyribs or gymnasium)
_LAZY = {
    "MaskMutationEmitter": "growprune.qd.mask_emitter",
    "QDRun": "growprune.qd.run",
    "LoadedRun": "growprune.qd.run",
    "load_run": "growprune.qd.run",
    "ControlTask": "growprune.qd.control",
    "PruningMutationEmitter": "growprune.qd.weight_emitter",
}

__all__ = ["ControlTask", "Evaluation", "LoadedRun", "MaskMutationEmitter", "PruningMutationEmitter", "QDRun",
           "QDTask", "SupervisedMaskTask", "evaluate_chunk", "load_run"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'growprune.qd' has no attribute {name!r}")
