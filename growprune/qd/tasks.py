"""What MAP-Elites searches: a :class:`QDTask` turns solutions (1-D NumPy arrays) into an objective
and descriptor values (:class:`Evaluation`).

A task is configured in the driver, :meth:`QDTask.bind` builds what it needs once (a trained base
network, data, environment specs), and from then on it is picklable: the run sends it to
evaluation workers (in-process, a process pool or Ray tasks) with :func:`evaluate_chunk`.
Evaluation is deterministic, so every engine and every chunking gives the same numbers.

Descriptor names every task understands besides its own (see :func:`common_descriptor_names`):
``"density"`` / ``"sparsity"`` (kept / pruned fraction of the prunable weights), every graph
measure of :data:`growprune.graph.MEASURES` on the network's unit graph (its own ``"density"``
excepted: the task's ``"density"`` is the weight density), ``"mi_label"`` and
``"mi_consecutive"`` (:mod:`growprune.information`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from growprune.graph import UnitGraph

#: descriptors of the weight mask itself (cheap)
SIZE_DESCRIPTORS = ("density", "sparsity")
#: information measures (growprune.information) every task can compute on a probe batch
INFORMATION_DESCRIPTORS = ("mi_label", "mi_consecutive", "mi_label_unit")


@dataclass
class Evaluation:
    """What a task measured for one solution.

    Attributes:
        objective: the value MAP-Elites maximises (accuracy, episode return, ...).
        measures: descriptor name -> value; at least the requested descriptors.
        info: extra numbers (loss, episode length, ...), logged but not searched on.
    """

    objective: float
    measures: dict[str, float]
    info: dict[str, float] = field(default_factory=dict)


def graph_descriptor_names() -> list[str]:
    """The graph measures a task can use as descriptors (``growprune.graph.MEASURES`` without its
    ``"density"``, which tasks use for the weight density); empty when growprune.graph is unavailable."""
    try:
        from growprune.graph import MEASURES
    except ImportError:
        return []
    return [name for name in MEASURES if name not in SIZE_DESCRIPTORS]


def common_descriptor_names() -> list[str]:
    """Descriptors every task accepts: the size measures, the graph measures and the information
    measures (:mod:`growprune.information`)."""
    return list(SIZE_DESCRIPTORS) + graph_descriptor_names() + list(INFORMATION_DESCRIPTORS)


class QDTask(ABC):
    """One kind of problem MAP-Elites searches. Subclasses are picklable after :meth:`bind`."""

    @abstractmethod
    def bind(self, seed: int, run_dir: Path | None = None) -> None:
        """Build what evaluation needs (model, data, environment specs), once, in the driver.

        Args:
            seed: the run's seed (base network, draws of samples, graph measures).
            run_dir: the run directory: a task may keep files there (a trained base network) and
                reuse them when the run resumes. ``None``: keep everything in memory.
        """

    @property
    @abstractmethod
    def solution_dim(self) -> int:
        """Length of a solution array (after :meth:`bind`)."""

    @property
    @abstractmethod
    def solution_dtype(self) -> np.dtype:
        """Data type of solutions: ``np.float32`` (weights) or ``np.uint8`` (packed mask bits)."""

    @abstractmethod
    def descriptor_names(self) -> list[str]:
        """Every descriptor name this task can measure (valid without :meth:`bind`)."""

    @abstractmethod
    def initial_solutions(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` starting solutions, ``[count, solution_dim]`` of :attr:`solution_dtype`."""

    @abstractmethod
    def evaluate(self, solutions: np.ndarray, descriptors: Sequence[str]) -> list[Evaluation]:
        """Objective and the requested descriptors of every solution (deterministic, in order)."""

    @abstractmethod
    def network(self, solution: np.ndarray) -> torch.nn.Module:
        """The pruned network a solution stands for."""

    @abstractmethod
    def graph(self, solution: np.ndarray) -> "UnitGraph":
        """The unit graph of :meth:`network` (pruned connections absent)."""

    @abstractmethod
    def save_elite(self, solution: np.ndarray, path: Path) -> Path:
        """Write the solution's network to ``path`` (a file) and return the file written."""

    def check_descriptors(self, descriptors: Sequence[str]) -> None:
        """Raise ``ValueError`` (one line, listing the valid names) unless every name is known.

        Raises:
            ValueError: an unknown or repeated descriptor, or none at all.
        """
        valid = self.descriptor_names()
        if not descriptors:
            raise ValueError(f"give at least one descriptor; valid: {', '.join(valid)}")
        for name in descriptors:
            if name not in valid:
                raise ValueError(f"unknown descriptor {name!r} for {type(self).__name__}; valid: {', '.join(valid)}")
        repeated = sorted({name for name in descriptors if list(descriptors).count(name) > 1})
        if repeated:
            raise ValueError(f"descriptors repeated: {', '.join(repeated)}")


def evaluate_chunk(task: QDTask, item: tuple[np.ndarray, Sequence[str]]) -> list[Evaluation]:
    """One evaluation task of a run: ``task.evaluate(solutions, descriptors)``.

    Module-level so that engines can send it to other processes (the task is their shared object).

    Args:
        task: a bound task.
        item: ``(solutions, descriptors)``.

    Returns:
        One :class:`Evaluation` per solution, in order.
    """
    solutions, descriptors = item
    return task.evaluate(solutions, list(descriptors))


def split_measures(names: Sequence[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """Split requested descriptors into (size, graph, information, other) names."""
    graph = set(graph_descriptor_names())
    size = [name for name in names if name in SIZE_DESCRIPTORS]
    graphs = [name for name in names if name in graph]
    information = [name for name in names if name in INFORMATION_DESCRIPTORS]
    other = [name for name in names if name not in SIZE_DESCRIPTORS and name not in graph
             and name not in INFORMATION_DESCRIPTORS]
    return size, graphs, information, other

