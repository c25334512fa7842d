"""The study's analysis of a quality-diversity run: which network descriptors go with faster learning.

Aubert-Kato and Da Rold ran MAP-Elites over pruned policy networks and found that the Louvain
modularity and the degree assortativity of the pruned network correlated with faster learning.
:func:`analyze` repeats that analysis on any ``growprune qd`` archive:

1. **Elites.** All elites of the archive, or a seeded sample of ``max_elites`` of them.
2. **Descriptors** of each elite: ``"density"`` (the weight density, as the QD tasks define it:
   kept fraction of the prunable weights), every other :data:`growprune.graph.MEASURES` name (on
   ``task.graph(solution)``; the graph measure ``"density"`` is called ``"graph_density"`` here),
   plus ``"mi_label"`` and ``"mi_consecutive"`` (:func:`growprune.information.information_measures`
   on a seeded probe batch of validation images for a supervised task; for other tasks the task's
   own evaluation, ``task.evaluate(solutions, names)``, which for control tasks probes with the
   observations of its episodes).
3. **Learning speed**, higher = faster for every measure:

   * ``"retraining"`` (supervised tasks, those with ``train_tensors`` / ``validation_tensors``):
     each elite's masked network is retrained for ``max_steps`` minibatch steps (SGD or Adam, the
     same seeded batch order for every elite, masks re-applied after every step so pruned weights
     stay zero) and evaluated on the validation tensors at step 0 and every ``eval_every`` steps.
     ``init="trained"`` (default) starts from the elite's own weights; ``init="reinit"`` from a
     fresh initialisation (the same seed for every elite), masked: the learning speed of the
     structure alone. Two measures: ``steps_to_target``, the first evaluated step at which the
     validation accuracy reaches the target, correlated with its **negation** so that a positive
     rho still means "learns faster"; and ``accuracy_gain``, validation accuracy after
     ``max_steps`` minus at step 0. The target is ``target_accuracy`` when given; otherwise, with
     ``init="trained"``, each elite's own step-0 accuracy plus ``target_gain`` (default 0.02), and
     with ``init="reinit"`` the median over the analysed elites of the accuracy after
     ``max_steps`` (a common target that about half of them reach). An elite that never reaches
     its target is *censored* at ``max_steps + 1`` (ties in the ranks) and counted.

     Caveat of ``init="trained"``: both measures depend on the start accuracy (an elite at 99 %
     cannot gain 2 points; one at 60 % gains them in a few steps), so descriptors that go with
     accuracy (density, ...) correlate with "speed" through it. ``init="reinit"`` removes that
     dependence; ``elites.csv`` keeps ``start_accuracy`` for any further control.
   * ``"lineage"`` (control tasks, or any archive with the lineage fields ``depth`` and
     ``root_objective``): ``return_per_generation = (objective - root_objective) / depth`` for
     elites with ``depth >= 1``; elites of depth 0 (roots, or born from emitters that do not
     record lineage) are excluded and counted.

4. **Statistics** per descriptor and speed measure: Spearman's rho (:func:`scipy.stats.spearmanr`),
   a seeded percentile bootstrap 95 % CI over elites (pairs resampled with replacement), and a
   seeded two-sided permutation p-value ``(1 + #{|rho_perm| >= |rho|}) / (permutations + 1)``.
   Elites whose descriptor or speed is not finite are left out of that pair's statistics (``n``
   says how many were used). A descriptor (or speed) constant over the elites has no rank
   correlation: rho, CI and p are NaN and the ``note`` says why. p-values are adjusted for the
   multiple comparisons over descriptors with Benjamini-Hochberg (false discovery rate), within
   each speed measure.

Outputs go to ``<run_dir>/analysis/`` (``analysis_1``, ``analysis_2``, ... when it exists: an
earlier analysis is never overwritten): ``elites.csv``, ``correlations.csv``,
``correlations.png`` and ``summary.json``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: descriptors computed from the information of activations, not from the graph
INFORMATION_DESCRIPTORS = ("mi_label", "mi_consecutive", "mi_label_unit")
#: ways to measure learning speed (``"auto"``: retraining when the task has training tensors)
SPEED_KINDS = ("auto", "retraining", "lineage")
OPTIMIZERS = ("sgd", "adam")
#: where the retraining starts: the elite's own weights, or a fresh seeded initialisation
INIT_KINDS = ("trained", "reinit")
#: fewest elites an analysis runs on (a rank correlation of fewer says nothing)
MIN_ELITES = 5
#: archive fields of the lineage protocol that the lineage speed needs
LINEAGE_FIELDS = ("depth", "root_objective")
ANALYSIS_FOLDER = "analysis"
#: the graph measure "density" under the name the analysis gives it ("density" is the weight density)
GRAPH_DENSITY = "graph_density"
DEFAULT_LEARNING_RATE = {"sgd": 0.05, "adam": 1e-3}


def available_descriptors() -> list[str]:
    """Every descriptor name the analysis can compute.

    Returns:
        ``"density"`` (the weight density, as the QD tasks define it), the other
        :data:`growprune.graph.MEASURES` names, ``"graph_density"`` (the graph measure
        ``"density"``), then ``"mi_label"``, ``"mi_consecutive"``.
    """
    from growprune.graph import MEASURES

    names = ["density"] + [name for name in MEASURES if name != "density"]
    if "density" in MEASURES:
        names.append(GRAPH_DENSITY)
    return names + list(INFORMATION_DESCRIPTORS)


def check_descriptors(names: Sequence[str] | None, archive_descriptors: Sequence[str] = ()) -> list[str]:
    """The descriptors to analyse: ``names`` checked, or all of them.

    Args:
        names: the selection (``None``: every computable descriptor, then the archive's own).
        archive_descriptors: the run's archive dimensions (e.g. ``impact_x``, ``prune_rate``): valid
            names too, read from the archive when the analysis cannot compute them itself.

    Returns:
        The names in the order given (duplicates dropped).

    Raises:
        ValueError: an unknown or empty selection (one line listing the valid names).
    """
    computable = available_descriptors()
    valid = computable + [name for name in archive_descriptors if name not in computable]
    if names is None:
        return valid
    chosen = list(dict.fromkeys(str(name) for name in names))
    unknown = [name for name in chosen if name not in valid]
    if unknown or not chosen:
        what = f"unknown descriptor(s) {', '.join(map(repr, unknown))}" if unknown else "no descriptor selected"
        raise ValueError(f"descriptors: {what}; valid: {', '.join(valid)}")
    return chosen


# ------------------------------------------------------------------------------------ statistics
def _rank_rows(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows of ``a`` and ``b`` ([B, n]); NaN for a constant row."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        result = (a * b).sum(axis=-1) / denominator
    # ranks of a constant row are equal, their spread exactly 0; tiny rounding must not fake a value
    return np.where(denominator > 1e-12, np.clip(result, -1.0, 1.0), np.nan)


def _check_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    return x, y


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (:func:`scipy.stats.spearmanr`).

    Returns:
        rho in [-1, 1], or NaN when either variable is constant or fewer than 3 pairs are given.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    from scipy.stats import spearmanr

    x, y = _check_pairs(x, y)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def bootstrap_rhos(x: np.ndarray, y: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Spearman's rho of ``resamples`` bootstrap resamples of the (x, y) pairs.

    Returns:
        ``[resamples]`` rhos; NaN for a resample in which either variable is constant.

    Raises:
        ValueError: lengths differ or ``resamples`` < 0.
    """
    x, y = _check_pairs(x, y)
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    if resamples == 0 or x.size == 0:
        return np.full(resamples, np.nan)
    picks = rng.integers(0, x.size, size=(resamples, x.size))
    return _row_pearson(_rank_rows(x[picks]), _rank_rows(y[picks]))


def percentile_interval(rhos: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of the finite ``rhos``; NaNs when there are none.

    Raises:
        ValueError: ``confidence`` outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rhos = np.asarray(rhos, dtype=np.float64)
    rhos = rhos[np.isfinite(rhos)]
    if rhos.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(rhos, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci(x: np.ndarray, y: np.ndarray, resamples: int, rng: np.random.Generator,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of Spearman's rho, resampling (x, y) pairs.

    Resamples in which either variable is constant (no rank correlation) are left out.

    Args:
        x, y: paired samples.
        resamples: bootstrap resamples (0: no interval).
        rng: the source of the resampling.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        ``(low, high)``; NaNs when ``resamples`` is 0, fewer than 3 pairs, or no resample has a rho.

    Raises:
        ValueError: lengths differ, ``resamples`` < 0 or ``confidence`` outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x, y = _check_pairs(x, y)
    if x.size < 3:
        return math.nan, math.nan
    return percentile_interval(bootstrap_rhos(x, y, resamples, rng), confidence)


#: share of undefined bootstrap resamples (a constant variable) above which the CI gets a note
UNDEFINED_RESAMPLES_NOTE = 0.01


def permutation_pvalue(x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
    """Two-sided permutation p-value of Spearman's rho: ``y`` shuffled against ``x``.

    Returns:
        ``(1 + #{|rho_perm| >= |rho|}) / (permutations + 1)`` (never 0); NaN when ``permutations``
        is 0 or rho is undefined (a constant variable, fewer than 3 pairs).

    Raises:
        ValueError: lengths differ or ``permutations`` < 0.
    """
    x, y = _check_pairs(x, y)
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0, got {permutations}")
    observed = spearman(x, y)
    if permutations == 0 or not math.isfinite(observed):
        return math.nan
    rank_x, rank_y = _rank_rows(x), _rank_rows(y)
    shuffled = rng.permuted(np.broadcast_to(rank_y, (permutations, rank_y.size)), axis=1)
    rhos = _row_pearson(np.broadcast_to(rank_x, shuffled.shape), shuffled)
    # a permuted rho equal to the observed one up to rounding counts as "as extreme"
    extreme = np.count_nonzero(np.abs(rhos) >= abs(observed) - 1e-12)
    return float((1 + extreme) / (permutations + 1))


def _rank_residuals(values: np.ndarray, control_ranks: np.ndarray) -> np.ndarray:
    """Ranks of ``values`` minus their least-squares line on ``control_ranks``."""
    ranks = _rank_rows(values)
    design = np.column_stack([np.ones_like(control_ranks), control_ranks])
    coefficients, *_ = np.linalg.lstsq(design, ranks, rcond=None)
    return ranks - design @ coefficients


def partial_spearman(x: np.ndarray, y: np.ndarray, control: np.ndarray, permutations: int,
                     rng: np.random.Generator) -> tuple[float, float]:
    """Spearman correlation of ``x`` and ``y`` with ``control`` held fixed, and its permutation p-value.

    The ranks of ``x`` and of ``y`` are each regressed on the ranks of ``control``; the partial rho
    is the Pearson correlation of the two residuals (what is left of each once the control's
    monotone trend is removed). The p-value permutes the ``x`` residuals against the ``y`` residuals.

    Returns:
        ``(rho, p)``; NaN for either when undefined (a constant variable, a variable that is a
        monotone function of the control, fewer than 4 pairs, ``permutations`` 0 for p).

    Raises:
        ValueError: lengths differ.
    """
    x, y = _check_pairs(x, y)
    control = np.asarray(control, dtype=np.float64).ravel()
    if control.shape != x.shape:
        raise ValueError(f"control must have one value per pair, got {control.size} for {x.size}")
    if x.size < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    control_ranks = _rank_rows(control)
    residual_x, residual_y = _rank_residuals(x, control_ranks), _rank_residuals(y, control_ranks)
    if min(np.abs(residual_x).max(), np.abs(residual_y).max()) < 1e-8:
        return math.nan, math.nan  # a variable the control fixes completely (e.g. the control itself)
    rho = float(_row_pearson(residual_x[None], residual_y[None])[0])
    if not math.isfinite(rho) or permutations <= 0:
        return rho, math.nan
    shuffled = rng.permuted(np.broadcast_to(residual_x, (permutations, residual_x.size)), axis=1)
    rhos = _row_pearson(shuffled, np.broadcast_to(residual_y, shuffled.shape))
    return rho, float((1 + np.count_nonzero(np.abs(rhos) >= abs(rho) - 1e-12)) / (permutations + 1))


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate); NaNs stay NaN and are not counted.

    Returns:
        An array like ``pvalues``: ``min_{j >= i} p_(j) * m / j`` over the sorted finite p-values
        (``m`` of them), clipped to 1.

    Raises:
        ValueError: a finite p-value outside [0, 1].
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[finite].min()} .. {p[finite].max()}")
    result = np.full(p.shape, np.nan)
    values = p[finite]
    if values.size:
        order = np.argsort(values)
        m = values.size
        scaled = values[order] * m / np.arange(1, m + 1)
        adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
        out = np.empty(m)
        out[order] = np.minimum(adjusted, 1.0)
        result[finite] = out
    return result


@dataclass
class Correlation:
    """One row of ``correlations.csv``: a descriptor against one learning-speed measure."""

    speed: str
    descriptor: str
    n: int
    rho: float
    ci_low: float
    ci_high: float
    p_permutation: float
    p_adjusted: float = math.nan
    note: str = ""
    #: the partial Spearman rho with the control descriptor held fixed (:func:`partial_spearman`)
    rho_partial: float = math.nan
    p_partial: float = math.nan


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on the seed and the names (not on which others were selected)."""
    return np.random.default_rng([int(seed), *(zlib.crc32(key.encode()) for key in keys)])


def correlate(descriptors: Mapping[str, np.ndarray], speed: np.ndarray, speed_name: str, *,
              bootstrap: int = 1000, permutations: int = 1000, seed: int = 0,
              confidence: float = 0.95, control: np.ndarray | None = None) -> list[Correlation]:
    """Spearman rho, bootstrap CI, permutation p and BH-adjusted p of every descriptor vs ``speed``.

    Args:
        descriptors: name -> one value per elite.
        speed: the learning speed per elite, higher = faster (so rho > 0: higher descriptor, faster).
        speed_name: the speed measure's name (the ``speed`` column).
        bootstrap, permutations: resamples of the CI and of the p-value (0: skip, NaN).
        seed: seed of both; each (speed, descriptor) pair draws from its own generator.
        confidence: coverage of the interval.
        control: one value per elite of a confounder (e.g. the weight density) to hold fixed in
            ``rho_partial`` / ``p_partial`` (``None``: not computed).

    Returns:
        One :class:`Correlation` per descriptor, in the given order; pairs with a non-finite
        value are left out (``n``); undefined correlations are NaN with a ``note``.

    Raises:
        ValueError: a descriptor with a different number of values than ``speed``.
    """
    speed = np.asarray(speed, dtype=np.float64).ravel()
    rows = []
    for name, values in descriptors.items():
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.shape != speed.shape:
            raise ValueError(f"descriptor {name!r} has {values.size} values but there are {speed.size} speeds")
        keep = np.isfinite(values) & np.isfinite(speed)
        if control is not None:
            keep &= np.isfinite(np.asarray(control, dtype=np.float64).ravel())
        x, y = values[keep], speed[keep]
        note = ""
        if x.size < 3:
            note = f"only {x.size} elites with a finite {name} and speed (need 3)"
        elif np.ptp(x) == 0:
            note = f"{name} is constant over the elites ({x[0]:.6g}): no rank correlation"
        elif np.ptp(y) == 0:
            note = f"{speed_name} is constant over the elites ({y[0]:.6g}): no rank correlation"
        if note:
            rows.append(Correlation(speed_name, name, int(x.size), math.nan, math.nan, math.nan, math.nan, note=note))
            continue
        rng = _rng(seed, speed_name, name)
        rhos = bootstrap_rhos(x, y, bootstrap, rng)
        low, high = percentile_interval(rhos, confidence)
        p = permutation_pvalue(x, y, permutations, rng)
        notes = []
        skipped = int(np.count_nonzero(~keep))
        if skipped:
            notes.append(f"{skipped} elites without a finite value left out")
        undefined = float(np.mean(~np.isfinite(rhos))) if rhos.size else 0.0
        if undefined > UNDEFINED_RESAMPLES_NOTE:
            # a nearly constant variable: only resamples that caught its rare values have a rho
            notes.append(f"CI unreliable: {undefined:.0%} of bootstrap resamples had a constant variable "
                         f"({np.unique(x).size} distinct {name} values)")
        note = "; ".join(notes)
        row = Correlation(speed_name, name, int(x.size), spearman(x, y), low, high, p, note=note)
        if control is not None:
            row.rho_partial, row.p_partial = partial_spearman(
                x, y, np.asarray(control, dtype=np.float64).ravel()[keep], permutations, _rng(seed, speed_name, name, "partial"))
        rows.append(row)
    adjusted = benjamini_hochberg([row.p_permutation for row in rows])
    for row, value in zip(rows, adjusted):
        row.p_adjusted = float(value)
    return rows


# ------------------------------------------------------------------------------------ elites
def archive_fields(archive: Any) -> dict[str, np.ndarray]:
    """Every field of a ribs archive's elites as arrays (``solution``, ``objective``, ``index``, extras).

    Raises:
        ValueError: ``archive`` is not a ribs archive.
    """
    if not hasattr(archive, "data") or not hasattr(archive, "field_list"):
        raise ValueError(f"expected a ribs archive, got {type(archive).__name__}")
    return {name: np.asarray(values) for name, values in archive.data(return_type="dict").items()}


def select_elites(fields: Mapping[str, np.ndarray], max_elites: int | None, seed: int) -> np.ndarray:
    """Rows of the elites to analyse: all, or a seeded sample of ``max_elites`` in archive-index order.

    Returns:
        Row numbers into the arrays of ``fields``.

    Raises:
        ValueError: ``max_elites`` < 1.
    """
    count = len(fields["objective"])
    if max_elites is not None and max_elites < 1:
        raise ValueError(f"max_elites must be >= 1, got {max_elites}")
    rows = np.arange(count)
    if max_elites is not None and count > max_elites:
        rows = _rng(seed, "elites").choice(count, size=max_elites, replace=False)
    return rows[np.argsort(fields["index"][rows], kind="stable")]


def lineage_speed(objective: np.ndarray, root_objective: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Objective gained per generation since the lineage's root: ``(objective - root) / depth``.

    Returns:
        ``(speed, used)``: the speed of every elite (NaN where not defined) and a bool mask of the
        elites it is defined for (``depth >= 1`` and finite objectives).
    """
    objective = np.asarray(objective, dtype=np.float64)
    root_objective = np.asarray(root_objective, dtype=np.float64)
    depth = np.asarray(depth, dtype=np.int64)
    used = (depth >= 1) & np.isfinite(objective) & np.isfinite(root_objective)
    speed = np.full(objective.shape, np.nan)
    speed[used] = (objective[used] - root_objective[used]) / depth[used]
    return speed, used


# ------------------------------------------------------------------------------------ retraining
@dataclass
class RetrainingCurve:
    """Validation accuracy of one elite during its retraining."""

    steps: list[int]                  # evaluated steps (0 first, the last step last)
    accuracies: list[float]           # validation accuracy at those steps

    @property
    def start_accuracy(self) -> float:
        return self.accuracies[0]

    @property
    def final_accuracy(self) -> float:
        return self.accuracies[-1]

    @property
    def accuracy_gain(self) -> float:
        return self.accuracies[-1] - self.accuracies[0]

    def steps_to(self, target: float) -> tuple[int, bool]:
        """First evaluated step at which the accuracy reaches ``target``.

        Returns:
            ``(step, True)``, or ``(last step + 1, False)`` when it never does (censored).
        """
        for step, accuracy in zip(self.steps, self.accuracies):
            if accuracy >= target - 1e-12:
                return step, True
        return self.steps[-1] + 1, False


def _mask_pairs(network: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, 0/1 mask) pairs to re-apply after every step.

    Masks come from ``masks`` (names relative to the network or to its ``.model``), else from the
    network's own (a :class:`~growprune.module.GrowPruneModule`), else every weight's zeros count
    as pruned (the convention of control policies: a weight that is exactly 0 is pruned).
    """
    if masks is None:
        own = getattr(network, "masks", None)
        if isinstance(own, Mapping) and own:
            masks = own
        else:
            return [(p, (p.detach() != 0).to(p.dtype)) for name, p in network.named_parameters()
                    if p.dim() >= 2]
    pairs = []
    for name, mask in masks.items():
        parameter = None
        for root in (network, getattr(network, "model", None)):
            if root is None:
                continue
            try:
                parameter = root.get_parameter(name)
                break
            except AttributeError:
                continue
        if parameter is None:
            raise ValueError(f"mask {name!r} names no parameter of the network")
        pairs.append((parameter, mask.detach().to(device=parameter.device, dtype=parameter.dtype)))
    return pairs


@torch.no_grad()
def _accuracy(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 4096) -> float:
    network.eval()
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = network(inputs[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == targets[start:start + batch_size]).sum())
    return correct / max(len(inputs), 1)


def batch_schedule(num_samples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of the minibatches of ``steps`` steps: seeded epoch permutations, the same for every elite.

    Raises:
        ValueError: no samples, ``batch_size`` < 1 or ``steps`` < 0.
    """
    if num_samples < 1 or batch_size < 1 or steps < 0:
        raise ValueError(f"batch_schedule needs samples >= 1, batch_size >= 1 and steps >= 0, got "
                         f"{num_samples}, {batch_size}, {steps}")
    generator = torch.Generator().manual_seed(int(seed))
    size = min(batch_size, num_samples)
    batches: list[torch.Tensor] = []
    order = torch.randperm(num_samples, generator=generator)
    position = 0
    while len(batches) < steps:
        if position + size > num_samples:  # drop the ragged tail: every step sees a full batch
            order, position = torch.randperm(num_samples, generator=generator), 0
        batches.append(order[position:position + size])
        position += size
    return batches


def _reinitialize(network: nn.Module, seed: int) -> None:
    """Fresh initial weights from every module's own ``reset_parameters``, seeded (same for every elite)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for module in network.modules():
            if module is not network and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()


def retrain(network: nn.Module, train: tuple[torch.Tensor, torch.Tensor], validation: tuple[torch.Tensor, torch.Tensor],
            batches: Sequence[torch.Tensor], *, masks: Mapping[str, torch.Tensor] | None = None,
            eval_every: int = 10, learning_rate: float = 0.05, optimizer: str = "sgd",
            reinitialize: int | None = None) -> RetrainingCurve:
    """Retrain a (pruned) network in place and record its validation accuracy along the way.

    Cross-entropy, one optimizer step per batch of ``batches``; the masks are multiplied back into
    the weights after every step so pruned weights stay exactly zero. The validation accuracy is
    measured at step 0, every ``eval_every`` steps and after the last step.

    Args:
        network: the network, modified in place (pass a copy).
        train, validation: ``(inputs, targets)`` tensors.
        batches: indices into ``train`` of each step's minibatch (see :func:`batch_schedule`).
        masks: parameter name -> 0/1 mask (default: the network's own masks, else its zero weights).
        eval_every: steps between validation measurements.
        learning_rate: of the optimizer.
        optimizer: ``"sgd"`` (plain SGD) or ``"adam"``.
        reinitialize: a seed: replace the weights by a fresh seeded initialisation (then mask them)
            before training, so the curve measures the structure, not the weights it came with.

    Returns:
        A :class:`RetrainingCurve`.

    Raises:
        ValueError: an unknown optimizer, ``eval_every`` < 1, a learning rate <= 0, or a mask that
            names no parameter.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    pairs = _mask_pairs(network, masks)  # before any re-initialisation: zero weights may be the mask
    parameters, mask_values = [p for p, _ in pairs], [m for _, m in pairs]

    def apply_masks() -> None:
        if parameters:
            with torch.no_grad():
                torch._foreach_mul_(parameters, mask_values)

    if reinitialize is not None:
        _reinitialize(network, reinitialize)
    apply_masks()
    trainable = [p for p in network.parameters() if p.requires_grad]
    if optimizer == "sgd":
        step_rule = torch.optim.SGD(trainable, lr=learning_rate)
    else:
        step_rule = torch.optim.Adam(trainable, lr=learning_rate)
    x_train, y_train = train
    x_val, y_val = validation
    steps, accuracies = [0], [_accuracy(network, x_val, y_val)]
    for step, index in enumerate(batches, start=1):
        network.train()
        step_rule.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(network(x_train[index]), y_train[index])
        loss.backward()
        step_rule.step()
        apply_masks()
        if step % eval_every == 0 or step == len(batches):
            steps.append(step)
            accuracies.append(_accuracy(network, x_val, y_val))
    return RetrainingCurve(steps, accuracies)


# ------------------------------------------------------------------------------------ descriptors
def _is_supervised(task: Any) -> bool:
    return all(callable(getattr(task, name, None)) for name in ("train_tensors", "validation_tensors", "network"))


def _probe(task: Any, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = task.validation_tensors()
    if len(inputs) > size:
        pick = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(int(seed)))[:size]
        inputs, targets = inputs[pick], targets[pick]
    return inputs, targets


def weight_density(task: Any, solution: np.ndarray) -> float:
    """Fraction of the prunable weights a solution keeps.

    From ``task.masks_of(solution)`` when the task has it (supervised mask tasks: exactly the
    genome's density), else the nonzero fraction of the network's weight matrices and kernels
    (control policies: a weight that is exactly 0 is pruned).

    Returns:
        A number in [0, 1] (NaN for a network without weights).
    """
    masks_of = getattr(task, "masks_of", None)
    if callable(masks_of):
        masks = list(masks_of(solution).values())
        kept = sum(float(torch.count_nonzero(mask)) for mask in masks)
        total = sum(mask.numel() for mask in masks)
    else:
        weights = [p.detach() for p in task.network(solution).parameters() if p.dim() >= 2]
        kept = sum(float(torch.count_nonzero(weight)) for weight in weights)
        total = sum(weight.numel() for weight in weights)
    return kept / total if total else math.nan


def compute_descriptors(task: Any, solutions: np.ndarray, names: Sequence[str], *, seed: int = 0,
                        probe_size: int = 500, bins: int = 30,
                        progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Descriptors of each solution (see the module doc for where each comes from).

    Args:
        task: a bound :class:`~growprune.qd.tasks.QDTask`.
        solutions: [N, solution_dim] solutions.
        names: descriptor names (checked with :func:`check_descriptors`).
        seed: seed of the Louvain communities and of the probe batch.
        probe_size: validation images of the probe batch (supervised information measures).
        bins: histogram bins of the mutual information.
        progress: called with 1 after each solution (a progress bar).

    Returns:
        name -> float64 array [N] (NaN where a measure is undefined).

    Raises:
        ValueError: an unknown descriptor; a task that returns no value for an information measure.
    """
    names = check_descriptors(names)
    count = len(solutions)
    # the analysis' name -> the graph measure's name
    graph_names = {name: ("density" if name == GRAPH_DENSITY else name) for name in names
                   if name not in ("density", *INFORMATION_DESCRIPTORS)}
    information_names = [name for name in names if name in INFORMATION_DESCRIPTORS]
    values = {name: np.full(count, np.nan) for name in names}
    supervised = _is_supervised(task)
    probe = _probe(task, probe_size, seed) if supervised and information_names else None
    for row, solution in enumerate(solutions):
        if "density" in values:
            values["density"][row] = weight_density(task, solution)
        if graph_names:
            from growprune.graph import graph_measures

            measured = graph_measures(task.graph(solution), sorted(set(graph_names.values())), seed=seed)
            for name, measure in graph_names.items():
                values[name][row] = float(measured[measure])
        if information_names and supervised:
            from growprune.information import information_measures

            # the plain network inside a GrowPruneModule: information_measures traces it with torch.fx
            network = task.network(solution)
            inner = getattr(network, "model", None)
            network = inner if isinstance(inner, nn.Module) else network
            network.eval()
            with torch.no_grad():
                measured = information_measures(network, probe[0], probe[1], bins=bins)
            for name in information_names:
                values[name][row] = float(measured.get(name, math.nan))
        if progress is not None:
            progress(1)
    if information_names and not supervised and count:
        # control tasks measure information on the observations of their own episodes
        evaluations = task.evaluate(np.asarray(solutions), information_names)
        for row, evaluation in enumerate(evaluations):
            for name in information_names:
                if name not in evaluation.measures:
                    raise ValueError(f"{type(task).__name__}.evaluate returned no {name!r} (it returned "
                                     f"{', '.join(evaluation.measures) or 'nothing'})")
                values[name][row] = float(evaluation.measures[name])
    return values


# ------------------------------------------------------------------------------------ the analysis
@dataclass
class AnalysisOptions:
    """Options of :func:`analyze` (the ``growprune qd-analyze`` command line); see the module doc.

    Attributes:
        max_elites: analyse a seeded sample of this many elites (``None``: all).
        descriptors: descriptor names (``None``: :func:`available_descriptors`).
        speed: ``"auto"`` (retraining for tasks with training tensors, else lineage),
            ``"retraining"`` or ``"lineage"``.
        init: ``"trained"``: retrain the elite's own (masked) weights; ``"reinit"``: train the mask
            from a fresh seeded initialisation, the same for every elite.
        target_accuracy: absolute validation accuracy to reach (``None``: with ``init="trained"``
            each elite's start accuracy + ``target_gain``, with ``"reinit"`` the median over the
            analysed elites of the accuracy after ``max_steps``).
        target_gain: see ``target_accuracy``.
        max_steps, eval_every, learning_rate, optimizer, batch_size: the retraining (learning rate
            ``None``: 0.05 for SGD, 1e-3 for Adam).
        probe_size: validation images of the supervised information probe.
        bootstrap, permutations: resamples of the CI and of the p-value (0: skip).
        seed: seed of the elite sample, batch order, probe, Louvain, bootstrap and permutations.
        control: a descriptor held fixed in the partial correlations (``rho_partial``, ``p_partial``;
            default the weight density, which drives most graph measures of pruned networks;
            ``None``: none). It is computed even when not among ``descriptors``.
    """

    max_elites: int | None = 200
    descriptors: list[str] | None = None
    speed: str = "auto"
    init: str = "trained"
    target_accuracy: float | None = None
    target_gain: float = 0.02
    max_steps: int = 200
    eval_every: int = 10
    learning_rate: float | None = None
    optimizer: str = "sgd"
    batch_size: int = 64
    probe_size: int = 500
    bootstrap: int = 1000
    permutations: int = 1000
    seed: int = 0
    control: str | None = "density"

    def check(self, archive_descriptors: Sequence[str] = ()) -> None:
        """Refuse bad values (one line each).

        Raises:
            ValueError: the first bad option, naming it and what it must be.
        """
        for key, low in (("max_steps", 1), ("eval_every", 1), ("batch_size", 1), ("probe_size", 2),
                         ("bootstrap", 0), ("permutations", 0), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}: must be an integer >= {low}, got {value!r}")
        if self.max_elites is not None and (isinstance(self.max_elites, bool) or not isinstance(self.max_elites, int)
                                            or self.max_elites < MIN_ELITES):
            raise ValueError(f"max_elites: must be an integer >= {MIN_ELITES} or null, got {self.max_elites!r}")
        if self.speed not in SPEED_KINDS:
            raise ValueError(f"speed: must be one of {', '.join(SPEED_KINDS)}, got {self.speed!r}")
        if self.init not in INIT_KINDS:
            raise ValueError(f"init: must be one of {', '.join(INIT_KINDS)}, got {self.init!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy: must lie in (0, 1] or be null, got {self.target_accuracy}")
        if not 0.0 < self.target_gain <= 1.0:
            raise ValueError(f"target_gain: must lie in (0, 1], got {self.target_gain}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0 or null, got {self.learning_rate}")
        check_descriptors(self.descriptors, archive_descriptors)
        if self.control is not None:
            check_descriptors([self.control], archive_descriptors)

    @property
    def resolved_learning_rate(self) -> float:
        return float(self.learning_rate) if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.optimizer]


@dataclass
class AnalysisResult:
    """What :func:`analyze` wrote and found."""

    out_dir: Path
    summary_path: Path
    speed_kind: str
    columns: dict[str, np.ndarray]          # elites.csv, column by column
    correlations: list[Correlation]
    summary: dict[str, Any] = field(default_factory=dict)


def resolve_speed(task: Any, fields: Mapping[str, np.ndarray], speed: str) -> str:
    """The speed measure to use: ``speed``, or for ``"auto"`` retraining when the task has training
    tensors (supervised), else lineage.

    Raises:
        ValueError: retraining asked of a task without training tensors, or lineage of an archive
            without the lineage fields.
    """
    if speed not in SPEED_KINDS:
        raise ValueError(f"speed: must be one of {', '.join(SPEED_KINDS)}, got {speed!r}")
    if speed == "auto":
        speed = "retraining" if _is_supervised(task) else "lineage"
    if speed == "retraining" and not _is_supervised(task):
        raise ValueError(f"speed: retraining needs a supervised task (train_tensors, validation_tensors, network); "
                         f"{type(task).__name__} has none: use speed lineage")
    if speed == "lineage":
        missing = [name for name in LINEAGE_FIELDS if name not in fields]
        if missing:
            raise ValueError(f"speed lineage: the archive has no lineage field(s) {', '.join(missing)} "
                             f"(its fields: {', '.join(fields)}); runs record them with emitters that set last_lineage")
    return speed


def next_output_dir(base: Path) -> Path:
    """Create and return ``base``, or ``base_1``, ``base_2``, ... (the first that does not exist).

    Creation is atomic (``mkdir`` without ``exist_ok``), so two analyses never share a folder.
    """
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = base, 0
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = base.with_name(f"{base.name}_{number}")


def _write_csv(path: Path, columns: Mapping[str, Sequence[Any]]) -> None:
    names = list(columns)
    rows = zip(*(columns[name] for name in names))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in rows:
            writer.writerow([_cell(value) for value in row])


def _cell(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else "nan"
    if isinstance(value, np.integer):
        return int(value)
    return value


def _json_number(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


SPEED_MEASURES = {"retraining": ("steps_to_target", "accuracy_gain"), "lineage": ("return_per_generation",)}


def analyze(task: Any, archive: Any, options: AnalysisOptions | None = None, *, out_dir: Path | None = None,
            run_dir: Path | None = None, progress: bool = True, archive_descriptors: Sequence[str] = ()) -> AnalysisResult:
    """Run the whole analysis on a bound task and its archive, and write its outputs.

    Everything that can be refused is checked before any file is written: the options, the
    descriptors, the speed kind against the task and archive, and the number of elites usable
    (at least :data:`MIN_ELITES`).

    Args:
        task: the run's bound :class:`~growprune.qd.tasks.QDTask`.
        archive: the run's ribs archive.
        options: see :class:`AnalysisOptions` (default: its defaults).
        out_dir: the folder to create (``<run_dir>/analysis`` by default; ``_1``, ``_2``, ... is
            appended while it exists).
        run_dir: the run directory (for the default ``out_dir`` and the summary).
        progress: show a progress bar on stderr.
        archive_descriptors: the names of the archive's measure dimensions (the run's
            ``descriptors``), in order: they can be analysed too (e.g. ``impact_x`` or
            ``prune_rate``), read from the archive when the analysis cannot compute them.

    Returns:
        An :class:`AnalysisResult` (paths, the ``elites.csv`` columns, the correlations).

    Raises:
        ValueError: bad options, an unknown descriptor, too few elites, a speed kind the task or
            archive cannot give.
    """
    options = options or AnalysisOptions()
    options.check(archive_descriptors)
    names = check_descriptors(options.descriptors, archive_descriptors)
    wanted = names + ([options.control] if options.control is not None and options.control not in names else [])
    computable = set(available_descriptors())
    computed = [name for name in wanted if name in computable]
    from_archive = [name for name in wanted if name not in computable]
    if out_dir is None and run_dir is None:
        raise ValueError("analyze needs out_dir or run_dir")
    fields = archive_fields(archive)
    total = len(fields["objective"])
    speed_kind = resolve_speed(task, fields, options.speed)
    candidates = np.arange(total)
    excluded_depth0 = 0
    if speed_kind == "lineage":
        _, used = lineage_speed(fields["objective"], fields["root_objective"], fields["depth"])
        candidates = np.flatnonzero(used)
        excluded_depth0 = int(np.count_nonzero(np.asarray(fields["depth"]) < 1))
        if candidates.size < MIN_ELITES:
            raise ValueError(f"the archive has {candidates.size} elites with lineage depth >= 1 (of {total}; need at "
                             f"least {MIN_ELITES}): run more iterations with an emitter that records lineage")
    elif total < MIN_ELITES:
        raise ValueError(f"the archive has {total} elites (need at least {MIN_ELITES}): run more iterations")
    sub = {name: np.asarray(values)[candidates] for name, values in fields.items()}
    rows = select_elites(sub, options.max_elites, options.seed)
    chosen = {name: values[rows] for name, values in sub.items()}
    solutions = chosen["solution"]

    started = time.perf_counter()
    bar = _progress_bar(len(rows) * (2 if speed_kind == "retraining" else 1), progress)
    try:
        descriptors = compute_descriptors(task, solutions, computed, seed=options.seed, probe_size=options.probe_size,
                                          progress=bar.update if bar is not None else None) if computed else {}
        for name in from_archive:  # the run's own archive dimensions (behaviour measures, prune_rate, ...)
            descriptors[name] = np.asarray(chosen["measures"], dtype=np.float64)[:, list(archive_descriptors).index(name)]
        control = descriptors[options.control] if options.control is not None else None
        descriptors = {name: descriptors[name] for name in names}
        columns: dict[str, np.ndarray] = {"index": chosen["index"].astype(np.int64),
                                          "objective": chosen["objective"].astype(np.float64)}
        for extra in ("depth", "root_objective", "parent_objective", "iteration"):
            if extra in chosen:
                columns[extra] = chosen[extra]
        columns.update(descriptors)
        if options.control is not None and options.control not in names:
            columns[options.control] = control
        speeds: dict[str, np.ndarray] = {}
        censored = 0
        if speed_kind == "retraining":
            speed_columns, censored = _retraining_columns(task, solutions, options, bar)
            columns.update(speed_columns)
            # higher = faster for every correlated measure: fewer steps is faster
            speeds["steps_to_target"] = -speed_columns["steps_to_target"].astype(np.float64)
            speeds["accuracy_gain"] = speed_columns["accuracy_gain"]
        else:
            speed, _ = lineage_speed(chosen["objective"], chosen["root_objective"], chosen["depth"])
            columns["return_per_generation"] = speed
            speeds["return_per_generation"] = speed
    finally:
        if bar is not None:
            bar.close()
    correlations = []
    for speed_name, speed in speeds.items():
        correlations += correlate(descriptors, speed, speed_name, bootstrap=options.bootstrap,
                                  permutations=options.permutations, seed=options.seed, control=control)
    seconds = time.perf_counter() - started

    out_dir = next_output_dir(Path(out_dir) if out_dir is not None else Path(run_dir) / ANALYSIS_FOLDER)
    elites_path, correlations_path = out_dir / "elites.csv", out_dir / "correlations.csv"
    plot_path, summary_path = out_dir / "correlations.png", out_dir / "summary.json"
    _write_csv(elites_path, columns)
    table_columns = ["speed", "descriptor", "n", "rho", "ci_low", "ci_high", "p_permutation", "p_adjusted",
                     "rho_partial", "p_partial", "note"]
    _write_csv(correlations_path, {key: [getattr(row, key) for row in correlations] for key in table_columns})
    plot_correlations(correlations, descriptors, speeds, plot_path)
    options_dict = asdict(options)
    options_dict["descriptors"] = names
    options_dict["learning_rate"] = options.resolved_learning_rate
    summary: dict[str, Any] = {
        "run_dir": str(run_dir) if run_dir is not None else None,
        "task": type(task).__name__,
        "speed_kind": speed_kind,
        "speed_measures": list(speeds),
        "sign_convention": "rho > 0: a higher descriptor goes with faster learning (steps_to_target is negated)",
        "control": options.control,
        "elites_in_archive": total,
        "elites_analysed": int(len(rows)),
        "excluded_depth0": excluded_depth0,
        "censored": censored if speed_kind == "retraining" else None,
        "options": options_dict,
        "correlations": [{key: _json_number(value) for key, value in asdict(row).items()} for row in correlations],
        "seconds": round(seconds, 3),
        "paths": {"elites": str(elites_path), "correlations": str(correlations_path), "plot": str(plot_path)},
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return AnalysisResult(out_dir, summary_path, speed_kind, columns, correlations, summary)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay free of carriage-return spam)
    return tqdm(total=total, desc="qd-analyze", unit="elite-task", leave=False, disable=None)


def _retraining_columns(task: Any, solutions: np.ndarray, options: AnalysisOptions,
                        bar: Any) -> tuple[dict[str, np.ndarray], int]:
    train = task.train_tensors()
    validation = task.validation_tensors()
    batches = batch_schedule(len(train[0]), options.batch_size, options.max_steps, options.seed)
    masks_of = getattr(task, "masks_of", None)
    curves = []
    for solution in solutions:
        # a private copy: the retraining changes weights, the task's cached networks must not change
        network = copy.deepcopy(task.network(solution))
        masks = masks_of(solution) if callable(masks_of) else None
        with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched (dropout)
            torch.manual_seed(options.seed)
            curves.append(retrain(network, train, validation, batches, masks=masks, eval_every=options.eval_every,
                                  learning_rate=options.resolved_learning_rate, optimizer=options.optimizer,
                                  reinitialize=options.seed if options.init == "reinit" else None))
        if bar is not None:
            bar.update(1)
    start = np.array([curve.start_accuracy for curve in curves])
    final = np.array([curve.final_accuracy for curve in curves])
    if options.target_accuracy is not None:
        targets = np.full(len(curves), float(options.target_accuracy))
    elif options.init == "reinit":
        # every elite starts from the same initialisation: one common target that about half reach
        targets = np.full(len(curves), float(np.median(final)) if len(curves) else math.nan)
    else:
        targets = start + options.target_gain
    reached_steps = [curve.steps_to(target) for curve, target in zip(curves, targets)]
    columns = {
        "start_accuracy": start,
        "final_accuracy": final,
        "target_accuracy": targets,
        "steps_to_target": np.array([steps for steps, _ in reached_steps], dtype=np.int64),
        "reached": np.array([reached for _, reached in reached_steps], dtype=bool),
        "accuracy_gain": final - start,
    }
    return columns, int(np.count_nonzero(~columns["reached"]))


# ------------------------------------------------------------------------------------ plot
SCATTER_DESCRIPTORS = ("modularity", "assortativity")


def plot_correlations(correlations: Sequence[Correlation], descriptors: Mapping[str, np.ndarray],
                      speeds: Mapping[str, np.ndarray], path: Path) -> Path:
    """Bar chart of rho with its CI per descriptor (one panel per speed measure) and, below, scatter
    panels of modularity and assortativity against each speed measure.

    ``speeds`` are the correlated values (higher = faster); ``steps_to_target`` is plotted as steps
    (negated back), lower = faster.

    Returns:
        ``path``, written as PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    speed_names = list(speeds)
    scatter = [name for name in SCATTER_DESCRIPTORS if name in descriptors]
    columns = max(len(speed_names), len(scatter), 1)
    rows = 1 + (len(speed_names) if scatter else 0)
    figure = plt.figure(figsize=(6.0 * columns, 4.2 * rows))
    grid = figure.add_gridspec(rows, columns)
    span = max(columns // max(len(speed_names), 1), 1)  # one bar chart alone spans the whole row
    for column, speed_name in enumerate(speed_names):
        axis = figure.add_subplot(grid[0, column * span:(column + 1) * span])
        selected = [row for row in correlations if row.speed == speed_name]
        positions = np.arange(len(selected))
        rho = np.array([row.rho for row in selected], dtype=float)
        low = np.array([row.ci_low for row in selected], dtype=float)
        high = np.array([row.ci_high for row in selected], dtype=float)
        errors = np.vstack([np.nan_to_num(rho - low), np.nan_to_num(high - rho)]).clip(min=0)
        colours = ["tab:blue" if np.isfinite(p) and p < 0.05 else "tab:gray" for p in (row.p_adjusted for row in selected)]
        axis.bar(positions, np.nan_to_num(rho), yerr=errors, color=colours, capsize=3)
        for position, value in zip(positions, rho):
            if not np.isfinite(value):
                axis.text(position, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xticks(positions, [row.descriptor for row in selected], rotation=60, ha="right", fontsize=8)
        axis.set_ylim(-1.05, 1.05)
        axis.set_ylabel("Spearman rho (95 % CI)")
        axis.set_title(f"vs {speed_name}: rho > 0 = learns faster (blue: BH p < 0.05)", fontsize=9)
    for line, speed_name in enumerate(speed_names if scatter else [], start=1):
        steps = speed_name == "steps_to_target"
        values = -np.asarray(speeds[speed_name]) if steps else np.asarray(speeds[speed_name])
        for column, name in enumerate(scatter):
            axis = figure.add_subplot(grid[line, column])
            axis.scatter(descriptors[name], values, s=12, alpha=0.7)
            axis.set_xlabel(name)
            axis.set_ylabel(f"{speed_name} (lower = faster)" if steps else speed_name)
            found = next((row for row in correlations if row.speed == speed_name and row.descriptor == name), None)
            if found is not None:
                axis.set_title(f"rho = {found.rho:.3f}, p = {found.p_permutation:.3g}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def _number(value: float, spec: str) -> str:
    return format(value, spec) if np.isfinite(value) else "n/a"


def format_table(correlations: Sequence[Correlation]) -> str:
    """The correlations as a fixed-width text table (the command prints it).

    Returns:
        One header line, a rule and one line per correlation.
    """
    width = max([len(row.descriptor) for row in correlations] + [10])
    speed_width = max([len(row.speed) for row in correlations] + [5])
    header = (f"{'speed':<{speed_width}}  {'descriptor':<{width}}  {'n':>4}  {'rho':>7}  {'95% CI':>17}  "
              f"{'p_perm':>7}  {'p_BH':>7}  {'rho|ctl':>7}  {'p|ctl':>7}  note")
    lines = [header, "-" * len(header)]
    for row in correlations:
        ci = f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}]" if np.isfinite(row.ci_low) else "n/a"
        lines.append(f"{row.speed:<{speed_width}}  {row.descriptor:<{width}}  {row.n:>4}  {_number(row.rho, '+.3f'):>7}  "
                     f"{ci:>17}  {_number(row.p_permutation, '.4f'):>7}  {_number(row.p_adjusted, '.4f'):>7}  "
                     f"{_number(row.rho_partial, '+.3f'):>7}  {_number(row.p_partial, '.4f'):>7}  {row.note}".rstrip())
    return "\n".join(lines)
