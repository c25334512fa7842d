"""The records the evolutionary loop passes between its parts (genotypes, search, evaluation, runs).

Genomes are 1-D NumPy arrays (bool for masks, int for widths, float for ratios): cheap to mutate,
hash and store. Everything here converts to plain Python / tensors for checkpoints that load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def genome_key(genome: np.ndarray) -> str:
    """A stable identity of a genome (dtype, length and contents): the evaluation journal's key."""
    array = np.ascontiguousarray(genome)
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(f"{array.dtype.str}:{array.shape}".encode())
    return digest.hexdigest()


@dataclass
class Individual:
    """One candidate network: its genome and, once evaluated, what it scored.

    Attributes:
        genome: the encoding (see :mod:`growprune.evolution.genotypes`).
        parent: index (in the previous generation's population) of the parent it was mutated from,
            or ``None``; lets the evaluator reuse the parent's cached activations.
        changed: names of the layers whose genes differ from the parent's (``None``: unknown, all).
        accuracy: accuracy on the evaluation samples (an estimate when ``exact`` is False).
        loss: mean cross-entropy on the evaluation samples.
        size: the objective's size measure of the decoded network (nonzero parameters or MACs).
        fitness: the objective's values, higher is better (one value, or several for a Pareto front).
        exact: evaluated on every evaluation sample (``False``: a race dropped it early).
        samples: evaluation samples it was evaluated on.
        macs: multiply-adds its evaluation cost.
    """

    genome: np.ndarray
    parent: int | None = None
    changed: frozenset[str] | None = None
    accuracy: float | None = None
    loss: float | None = None
    size: float | None = None
    fitness: tuple[float, ...] | None = None
    exact: bool = True
    samples: int = 0
    macs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return genome_key(self.genome)

    @property
    def evaluated(self) -> bool:
        return self.fitness is not None

    def to_state(self) -> dict[str, Any]:
        """Plain values and a tensor: loads with ``torch.load(weights_only=True)``."""
        return {
            "genome": torch.from_numpy(np.ascontiguousarray(self.genome).copy()),
            "parent": self.parent,
            "changed": sorted(self.changed) if self.changed is not None else None,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "size": self.size,
            "fitness": list(self.fitness) if self.fitness is not None else None,
            "exact": self.exact,
            "samples": self.samples,
            "macs": self.macs,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Individual":
        genome = state["genome"]
        return cls(
            genome=genome.numpy().copy() if isinstance(genome, torch.Tensor) else np.asarray(genome),
            parent=state.get("parent"),
            changed=frozenset(state["changed"]) if state.get("changed") is not None else None,
            accuracy=state.get("accuracy"),
            loss=state.get("loss"),
            size=state.get("size"),
            fitness=tuple(state["fitness"]) if state.get("fitness") is not None else None,
            exact=bool(state.get("exact", True)),
            samples=int(state.get("samples", 0)),
            macs=int(state.get("macs", 0)),
            extra=dict(state.get("extra", {})),
        )


@dataclass
class EvalRequest:
    """What the population evaluator is asked to score: a masked base network or a whole network.

    Exactly one of ``masks`` (parameter name -> 0/1 tensor on the evaluator's base model) and
    ``model`` (a decoded network, e.g. after channel removal) is set. ``key`` names the request
    (the genome key) so its activations can be cached and reused by its children; ``parent_key``
    and ``changed`` (layer names whose weights differ from the parent's) allow that reuse.
    """

    key: str
    masks: dict[str, torch.Tensor] | None = None
    model: torch.nn.Module | None = None
    parent_key: str | None = None
    changed: frozenset[str] | None = None
    size: float = 0.0


@dataclass
class EvalResult:
    """Accuracy and loss over ``samples`` evaluation samples, and the multiply-adds it cost."""

    accuracy: float
    loss: float
    samples: int
    exact: bool
    macs: int
