"""A pyribs emitter of pruning masks: children of archive elites by mask mutations.

Parents come from ``archive.sample_elites`` (uniformly over the occupied cells, drawn by the
archive's generator); each child is its parent's mask mutated by
:meth:`growprune.evolution.MaskGenotype.mutate` (``kind``: ``"swap"`` keeps the size exactly,
``"flip"`` / ``"magnitude"`` drift towards density 0.5, ``"shrink"`` prunes a fixed share), then,
with probability ``resize_probability``, resized: the kept count is multiplied by
``exp(N(0, resize_sigma))``, pruning small weights or reviving large ones more often (the
magnitude rank of each weight in its layer, as MaskGenotype's swaps). So the density moves both
ways at a scale that does not depend on the network's size: what a density descriptor needs.
While the archive is empty the emitter asks ``task.initial_solutions``.

Lineage (the run stores it in the archive, see :mod:`growprune.qd.run`): after :meth:`ask`,
``last_lineage`` holds per asked solution its ``depth`` (parent's + 1; 0 for initial solutions),
``root_objective`` (the parent's root objective; NaN for roots) and ``parent_objective``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    from ribs.emitters import EmitterBase
except ImportError as error:  # pragma: no cover - exercised by the missing-extra test via the run
    raise ImportError("growprune.qd emitters need pyribs: pip install 'growprune[qd]'") from error

MUTATION_KINDS = ("swap", "flip", "magnitude", "shrink")
_FLOOR = 1e-6


class MaskMutationEmitter(EmitterBase):
    """Mask mutations of archive elites (see the module docstring).

    Args:
        archive: the run's archive (``solution_dim`` bytes of packed ``uint8`` masks).
        task: a task with mask solutions (``genotype``, ``genome``, ``solution``,
            ``initial_solutions``), e.g. :class:`~growprune.qd.SupervisedMaskTask`, bound.
        batch_size: solutions per :meth:`ask`.
        seed: seed of the emitter's generator (``None``: fresh entropy).
        kind: the MaskGenotype mutation: one of ``swap``, ``flip``, ``magnitude``, ``shrink``.
        rate: its rate (about ``rate`` of the genes change).
        resize_probability: probability that a child is also resized, in [0, 1].
        resize_sigma: standard deviation of the log factor of a resize (> 0).

    Raises:
        ValueError: an argument out of range, a task without mask solutions, or an archive whose
            solutions do not fit the task's.
    """

    def __init__(self, archive: Any, *, task: Any, batch_size: int = 32, seed: int | None = None,
                 kind: str = "swap", rate: float = 0.002, resize_probability: float = 0.5,
                 resize_sigma: float = 0.2) -> None:
        if kind not in MUTATION_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MUTATION_KINDS)}, got {kind!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate!r}")
        if not 0.0 <= float(resize_probability) <= 1.0:
            raise ValueError(f"resize_probability must be in [0, 1], got {resize_probability!r}")
        if not float(resize_sigma) > 0.0:
            raise ValueError(f"resize_sigma must be > 0, got {resize_sigma!r}")
        missing = [name for name in ("genotype", "genome", "solution", "initial_solutions") if not hasattr(task, name)]
        if missing:
            raise ValueError(f"MaskMutationEmitter needs a task with mask solutions (such as SupervisedMaskTask); "
                             f"{type(task).__name__} has no {', '.join(missing)}")
        if np.dtype(archive.dtypes["solution"]) != np.uint8 or int(archive.solution_dim) != int(task.solution_dim):
            raise ValueError(f"MaskMutationEmitter: the archive holds {archive.dtypes['solution']} solutions of "
                             f"{archive.solution_dim} values, the task's are uint8 of {task.solution_dim}")
        dim = int(archive.solution_dim)
        # explicit uint8 bounds: EmitterBase's default (+-inf) does not fit an integer dtype
        super().__init__(archive, solution_dim=dim, bounds=None, lower_bounds=np.zeros(dim, np.uint8),
                         upper_bounds=np.full(dim, 255, np.uint8))
        self.task = task
        self.batch_size = batch_size
        self.kind = kind
        self.rate = float(rate)
        self.resize_probability = float(resize_probability)
        self.resize_sigma = float(resize_sigma)
        self._rng = np.random.default_rng(seed)
        self._rank: np.ndarray | None = None  # magnitude rank of every gene in its layer, built on first use
        self.last_lineage: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rank"] = None  # recomputed from the task on first use (deterministic)
        return state

    def _ranks(self) -> np.ndarray:
        if self._rank is None:
            genotype = self.task.genotype
            model = self.task.base_module().model
            ranks = []
            for name, piece in genotype.layer_slices.items():
                values = model.get_parameter(name).detach().abs().flatten().double().cpu().numpy()
                order = np.argsort(values, kind="stable")
                rank = np.empty(values.size)
                rank[order] = np.arange(values.size) / max(values.size - 1, 1)
                ranks.append(rank)
            self._rank = np.concatenate(ranks) if ranks else np.zeros(0)
        return self._rank

    def ask(self) -> np.ndarray:
        """``batch_size`` packed masks: children of sampled elites, or initial masks while the archive is empty."""
        if self.archive.empty:
            solutions = np.asarray(self.task.initial_solutions(self.batch_size, self._rng), dtype=np.uint8)
            nan = np.full(len(solutions), np.nan)
            self.last_lineage = {"depth": np.zeros(len(solutions), np.int64), "root_objective": nan,
                                 "parent_objective": nan.copy()}
            return solutions
        parents = self.archive.sample_elites(self.batch_size)
        count = len(parents["objective"])
        depth = np.asarray(parents.get("depth", np.zeros(count)), dtype=np.int64) + 1
        roots = np.asarray(parents.get("root_objective", np.full(count, np.nan)), dtype=np.float64)
        children = [self._child(solution) for solution in parents["solution"]]
        self.last_lineage = {"depth": depth, "root_objective": roots,
                             "parent_objective": np.asarray(parents["objective"], dtype=np.float64)}
        return np.stack(children).astype(np.uint8)

    def _child(self, solution: np.ndarray) -> np.ndarray:
        genotype = self.task.genotype
        genome = self.task.genome(np.asarray(solution, dtype=np.uint8))
        child, _ = genotype.mutate(genome, self._rng, self.rate, kind=self.kind)
        if self._rng.random() < self.resize_probability:
            child = self._resize(child)
        return self.task.solution(child)

    def _resize(self, genome: np.ndarray) -> np.ndarray:
        """Multiply the kept count by ``exp(N(0, resize_sigma))`` (at least one gene changes when possible)."""
        kept = np.flatnonzero(genome)
        pruned = np.flatnonzero(~genome)
        target = int(round(kept.size * float(np.exp(self._rng.normal(0.0, self.resize_sigma)))))
        target = min(max(target, 1), genome.size)
        if target == kept.size:
            target = kept.size + (1 if self._rng.random() < 0.5 else -1)
            target = min(max(target, 1), genome.size)
        rank = self._ranks()
        child = genome.copy()
        if target < kept.size:
            child[self._draw(kept, 1.0 - rank[kept], kept.size - target)] = False
        elif target > kept.size:
            child[self._draw(pruned, rank[pruned], target - kept.size)] = True
        return child

    def _draw(self, genes: np.ndarray, weights: np.ndarray, count: int) -> np.ndarray:
        """``count`` of ``genes`` without replacement, probability proportional to ``weights``
        (Efraimidis-Spirakis keys ``log(u) / w``, the ``count`` largest)."""
        if count <= 0:
            return genes[:0]
        if count >= genes.size:
            return genes
        keys = np.log1p(-self._rng.random(genes.size)) / np.maximum(weights, _FLOOR)
        return genes[np.argpartition(-keys, count - 1)[:count]]
