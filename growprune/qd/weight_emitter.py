"""A pyribs emitter that mutates policy weights and prunes them at a self-adapting rate.

Each child of an elite (drawn uniformly with ``archive.sample_elites``) is made in three steps:

1. its pruning rate gene (``log10`` rate, the last gene of a ``ControlTask(evolve_pruning=True)``
   solution) moves log-normally: ``child = clip(parent + rate_sigma * N(0, 1), *log_rate_bounds)``,
   so rates that produce good children spread through the archive (self-adaptation as in
   evolution strategies);
2. every surviving (nonzero) weight gets ``sigma * N(0, 1)``, biases too;
3. every surviving weight is pruned (set to exactly 0) with probability ``10 ** child_gene``.

Pruned weights stay pruned: step 2 never touches a zero weight, unless ``regrow_probability`` > 0
revives each pruned weight with that probability (at ``sigma * N(0, 1)``). Solutions without a
rate gene are pruned at the fixed ``prune_rate``.

While the archive is empty the emitter returns ``task.initial_solutions`` (roots). It records the
lineage of what it asked in :attr:`PruningMutationEmitter.last_lineage` (depth, root and parent
objectives), read by the ``growprune qd`` run loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from growprune.qd.policies import LOG_RATE_BOUNDS


def _require_ribs() -> Any:
    try:
        import ribs.emitters
    except ImportError:
        from growprune.errors import ConfigurationError

        raise ConfigurationError("PruningMutationEmitter needs pyribs: pip install 'growprune[qd]'") from None
    return ribs.emitters


def _emitter_base() -> type:
    try:
        from ribs.emitters import EmitterBase
    except ImportError:  # the class stays importable; constructing it names the extra
        return object
    return EmitterBase


class PruningMutationEmitter(_emitter_base()):  # type: ignore[misc]
    """Gaussian weight mutation plus pruning at a self-adapting rate (see the module docstring).

    Args:
        archive: the ribs archive (its solution dtype float32 or float64).
        task: the (bound) control task; gives the solution layout and the initial solutions.
        batch_size: solutions per :meth:`ask`.
        sigma: standard deviation of the weight (and bias) perturbation.
        seed: seed of the emitter's generator (None: fresh entropy; the run passes one).
        rate_sigma: standard deviation of the ``log10`` rate gene's step (0 freezes the rates).
        log_rate_bounds: ``(low, high)`` clip range of the gene; within
            :data:`~growprune.qd.policies.LOG_RATE_BOUNDS` (rates 1e-4 to 0.1).
        prune_rate: pruning rate of solutions without a rate gene (``evolve_pruning=False``).
        regrow_probability: chance that a pruned weight is revived in a child (default 0: pruned
            weights stay pruned).

    Raises:
        ValueError: a negative sigma, bounds outside the documented range, probabilities outside
            [0, 1], batch size below 1, or a solution size that differs from the archive's.
        ConfigurationError: pyribs missing (names ``pip install 'growprune[qd]'``).
    """

    def __init__(
        self,
        archive: Any,
        *,
        task: Any,
        batch_size: int = 30,
        sigma: float = 0.1,
        seed: int | None = None,
        rate_sigma: float = 0.3,
        log_rate_bounds: tuple[float, float] = LOG_RATE_BOUNDS,
        prune_rate: float = 0.0,
        regrow_probability: float = 0.0,
    ) -> None:
        _require_ribs()
        low, high = (float(value) for value in log_rate_bounds)
        if int(batch_size) < 1:
            raise ValueError(f"PruningMutationEmitter batch_size must be >= 1, got {batch_size!r}")
        if float(sigma) < 0 or float(rate_sigma) < 0:
            raise ValueError(f"PruningMutationEmitter sigma and rate_sigma must be >= 0, got {sigma!r}, {rate_sigma!r}")
        if not LOG_RATE_BOUNDS[0] <= low <= high <= LOG_RATE_BOUNDS[1]:
            raise ValueError(
                f"PruningMutationEmitter log_rate_bounds must satisfy {LOG_RATE_BOUNDS[0]} <= low <= high <= "
                f"{LOG_RATE_BOUNDS[1]}, got {list(log_rate_bounds)}"
            )
        for name, value in (("prune_rate", prune_rate), ("regrow_probability", regrow_probability)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"PruningMutationEmitter {name} must be in [0, 1], got {value!r}")
        layout = getattr(task, "layout", None)
        if layout is None:
            raise ValueError(f"PruningMutationEmitter mutates policy weights of a ControlTask, not a "
                             f"{type(task).__name__} (use MaskMutationEmitter for masks)")
        if float(getattr(task, "init_std", 1.0)) == 0.0 and float(regrow_probability) == 0.0:
            raise ValueError("PruningMutationEmitter only perturbs nonzero weights: with the task's init_std 0 "
                             "every weight starts at zero and stays there; set task init_std > 0 or regrow_probability > 0")
        archive_dim = archive.solution_dim if hasattr(archive, "solution_dim") else None
        if archive_dim is not None and int(np.prod(archive_dim)) != layout.solution_dim:
            raise ValueError(
                f"PruningMutationEmitter: the archive's solution_dim {archive_dim} differs from the task's {layout.solution_dim}"
            )
        super().__init__(archive, solution_dim=layout.solution_dim, bounds=None, lower_bounds=None, upper_bounds=None)
        self.task = task
        self.layout = layout
        self.batch_size = int(batch_size)
        self.sigma = float(sigma)
        self.rate_sigma = float(rate_sigma)
        self.log_rate_bounds = (low, high)
        self.prune_rate = float(prune_rate)
        self.regrow_probability = float(regrow_probability)
        self._rng = np.random.default_rng(seed)
        self.last_lineage: dict[str, np.ndarray] | None = None

    def ask(self) -> np.ndarray:
        """``[batch_size, solution_dim]`` children of uniformly sampled elites (initial solutions
        while the archive is empty); sets :attr:`last_lineage`.

        Returns:
            The solutions, in the archive's solution dtype.
        """
        dtype = self.archive.dtypes["solution"]
        if self.archive.empty:
            solutions = self.task.initial_solutions(self.batch_size, self._rng)
            nan = np.full(self.batch_size, np.nan, dtype=np.float32)
            self.last_lineage = {
                "depth": np.zeros(self.batch_size, dtype=np.int32),
                "root_objective": nan,
                "parent_objective": nan.copy(),
            }
            return np.asarray(solutions, dtype=dtype)
        elites = self.archive.sample_elites(self.batch_size)
        parents = np.asarray(elites["solution"], dtype=np.float64)
        children = self.mutate(parents)
        depth = np.asarray(elites["depth"], dtype=np.int32) + 1 if "depth" in elites else np.ones(self.batch_size, np.int32)
        parent_objective = np.asarray(elites["objective"], dtype=np.float32)
        if "root_objective" in elites:
            root_objective = np.asarray(elites["root_objective"], dtype=np.float32)
        else:
            root_objective = np.full(self.batch_size, np.nan, dtype=np.float32)
        self.last_lineage = {"depth": depth, "root_objective": root_objective, "parent_objective": parent_objective}
        return children.astype(dtype)

    def mutate(self, parents: np.ndarray) -> np.ndarray:
        """Children of ``parents`` (``[n, solution_dim]``) with this emitter's generator.

        Returns:
            float64 ``[n, solution_dim]``: surviving weights perturbed then pruned at the child's
            rate, pruned weights still 0 (unless regrown), biases perturbed, rate gene stepped.
        """
        layout = self.layout
        children = np.array(parents, dtype=np.float64, copy=True)
        count, weights = children.shape[0], layout.num_weights
        if layout.rate_gene:
            genes = children[:, -1] + self.rate_sigma * self._rng.standard_normal(count)
            children[:, -1] = np.clip(genes, *self.log_rate_bounds)
            rates = 10.0 ** children[:, -1]
        else:
            rates = np.full(count, self.prune_rate)
        w = children[:, :weights]
        alive = w != 0
        noise = self.sigma * self._rng.standard_normal(w.shape)
        pruned = self._rng.random(w.shape) < rates[:, None]
        regrow = self._rng.random(w.shape) < self.regrow_probability
        w = np.where(alive, w + noise, 0.0)
        w[alive & pruned] = 0.0
        revived = ~alive & regrow
        w[revived] = noise[revived]
        children[:, :weights] = w
        if layout.num_biases:
            end = weights + layout.num_biases
            children[:, weights:end] += self.sigma * self._rng.standard_normal((count, layout.num_biases))
        return children
