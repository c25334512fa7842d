"""Layer- and cell-level growing and pruning: remove whole layers or residual cells, insert new ones.

What counts as a layer, a cell, a stage and an insertion point is defined once, in
:mod:`growprune.surgery.discovery` (:func:`~growprune.surgery.discovery.permissible_elements`).
Every change goes through ``Strategy.apply_edit`` (typed edits ``RemoveLayer``, ``RemoveCell``,
``InsertLayer``, ``InsertCell``), so the optimizer is rebuilt with its state carried (renamed
tensors keep theirs, new tensors start from zero) and the edit log replays the architecture on reload.

* :class:`LayerPruning` / :class:`CellPruning`: the schedule's target is the fraction of the
  removable layers / cells (as this fit found them at set-up) that must be gone; each action removes
  the lowest-scoring ones (default criterion: block influence on data).
* :class:`LayerGrowth` / :class:`CellGrowth`: the schedule's target is the fraction of ``max_layers``
  / ``max_cells`` new layers / cells that must have been inserted. New layers are identity layers
  (batch norm fitted to the data, exact in eval mode); new cells are zero-initialised copies of
  their stage's last block. After every insertion the eval-mode output on the scoring batches is
  compared with the output before: the largest absolute change is recorded (``max_output_change``)
  and a change above ``tolerance`` (relative above output magnitude 1) stops training with an error
  naming the insertion.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn

from growprune.criteria.layers import BlockInfluenceCriterion, LayerCriterion
from growprune.modes import evaluating
from growprune.schedules import Schedule
from growprune.strategies.base import Strategy, broadcast_from_rank_zero, scoring_batches_for
from growprune.surgery.discovery import Element, PermissibleElements, permissible_elements
from growprune.surgery.edits import Edit, EditResult, InsertCell, InsertLayer, RemoveCell, RemoveLayer
from growprune.surgery.layers import calibrate_identity_norm


def _check_fraction_schedule(schedule: Schedule, what: str) -> None:
    amounts = getattr(schedule, "amounts", [schedule.amount, schedule.initial])
    for amount in amounts:
        if not 0.0 <= amount <= 1.0:
            raise ValueError(f"{what} targets are fractions in [0, 1], got {amount}")


def _count(target: float, total: int) -> int:
    """How many of ``total`` a fraction ``target`` asks for (at least that fraction: rounded up)."""
    return min(total, math.ceil(target * total - 1e-9))


def _discover(pl_module: Any) -> PermissibleElements:
    return permissible_elements(pl_module.model, pl_module.example_inputs(), channel_groups=False)


class _ElementPruning(Strategy):
    """Shared machinery of :class:`LayerPruning` and :class:`CellPruning`."""

    kind = "layer"

    def __init__(self, schedule: Schedule, criterion: LayerCriterion | None = None, skip: list[str] | None = None,
                 scoring_batches: int | None = None, name: str | None = None, verbose: bool = True, fit_schedule: bool = False):
        criterion = criterion if criterion is not None else BlockInfluenceCriterion()
        if not isinstance(criterion, LayerCriterion):
            raise TypeError(f"criterion must score layers and cells (a growprune.criteria.layers.LayerCriterion), "
                            f"got {type(criterion).__name__}")
        super().__init__(schedule, name=name, scoring_batches=scoring_batches_for(criterion, scoring_batches, default=2),
                         verbose=verbose, fit_schedule=fit_schedule)
        _check_fraction_schedule(schedule, f"{type(self).__name__}")
        self.criterion = criterion
        self.skip = list(skip or [])

    def candidates(self, pl_module: Any) -> list[Element]:
        """The removable elements of this strategy's kind, minus ``skip`` (and anything inside a skipped module)."""
        found = _discover(pl_module)
        elements = found.layers if self.kind == "layer" else found.cells
        return [element for element in elements if element.removable
                and not any(element.path == s or element.path.startswith(f"{s}.") for s in self.skip)]

    def check(self, trainer: pl.Trainer | None, pl_module: Any) -> None:
        modules = dict(pl_module.model.named_modules())
        unknown = [path for path in self.skip if path not in modules]
        if unknown:
            raise ValueError(f"{self.name}: skip names {unknown[0]!r}, which is no module of the model")
        candidates = self.candidates(pl_module)
        if not candidates:
            raise ValueError(f"{self.name}: the model has no removable {self.kind} (one that runs once and whose output "
                             f"shape equals its input shape{', outside skip' if self.skip else ''})")
        if not self.original:
            self.original = {"elements": [element.path for element in candidates], "count": len(candidates)}

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        total = int(self.original["count"])
        done = sum(len(record.get("removed", [])) for record in self.history)
        wanted = _count(target, total) - done
        candidates = self.candidates(pl_module)
        removed: list[str] = []
        scores: dict[str, float] = {}
        if wanted > 0 and candidates:
            batches = self.collect_batches(trainer, pl_module) if self.criterion.requires_data else None
            scores = self.criterion.score(pl_module.model, candidates, batches)
            order = sorted(candidates, key=lambda element: (scores[element.path], element.path))
            chosen = broadcast_from_rank_zero(trainer, [element.path for element in order[:wanted]])
            by_path = {element.path: element for element in candidates}
            for path in chosen:
                self.apply_edit(pl_module, self.removal(by_path[path]))
                removed.append(path)
        if len(removed) < wanted:
            rank_zero_warn(f"{self.name}: {wanted} more {self.kind}s should go but only {len(removed)} are removable")
        return {
            "action": f"remove_{self.kind}s",
            "criterion": repr(self.criterion),
            "removed": removed,
            "scores": {path: float(scores[path]) for path in removed},
            "achieved": (done + len(removed)) / total,
            "removable_left": len(candidates) - len(removed),
        }

    def removal(self, element: Element) -> Edit:
        raise NotImplementedError


class LayerPruning(_ElementPruning):
    """Remove whole layers (replaced by identity), the lowest-scoring first, on a schedule.

    A layer (see :mod:`growprune.surgery.discovery`) is a weight layer with the norm and activation
    modules that follow it in an ``nn.Sequential``; only layers that keep the shape can go.

    Args:
        schedule: when to act; the target is the fraction (in [0, 1]) of the removable layers, as this
            fit found them at set-up, that must be gone (rounded up to whole layers).
        criterion: a :class:`~growprune.criteria.layers.LayerCriterion` (default: block influence,
            ``1 - cos(input, output)`` on the scoring batches).
        skip: paths of modules whose layers must stay (and everything inside them).
        scoring_batches: training batches for data-driven criteria (default 2 when needed).
        name, verbose, fit_schedule: see :class:`~growprune.strategies.Strategy`.
    """

    kind = "layer"

    def removal(self, element: Element) -> Edit:
        return RemoveLayer(element.path, list(element.members) if len(element.members) > 1 else [])


class CellPruning(_ElementPruning):
    """Remove whole residual cells (replaced by identity), the least influential first, on a schedule.

    Only cells that keep the shape can go (a ResNet's downsampling blocks stay). Arguments as for
    :class:`LayerPruning`, with cells in place of layers.
    """

    kind = "cell"

    def removal(self, element: Element) -> Edit:
        return RemoveCell(element.path)


class _Growth(Strategy):
    """Shared machinery of :class:`LayerGrowth` and :class:`CellGrowth`: output checks around insertions."""

    def __init__(self, schedule: Schedule, scoring_batches: int, tolerance: float, name: str | None, verbose: bool,
                 fit_schedule: bool):
        if scoring_batches < 1:
            raise ValueError(f"{type(self).__name__} checks the output on data: set scoring_batches >= 1")
        super().__init__(schedule, name=name, scoring_batches=scoring_batches, verbose=verbose, fit_schedule=fit_schedule)
        _check_fraction_schedule(schedule, type(self).__name__)
        if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance <= 0:
            raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
        self.tolerance = float(tolerance)

    @staticmethod
    def _outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with evaluating(model):
            return [model(x) for x in inputs]

    def _insert(self, pl_module: Any, edit: Edit, inputs: Sequence[torch.Tensor], calibrate: str | None = None) -> float:
        """Apply ``edit`` (then fit the new layer's batch norms at ``calibrate``); the largest absolute change
        of the eval-mode output on ``inputs``. Raises when it exceeds the tolerance."""
        before = self._outputs(pl_module.model, inputs)
        self.apply_edit(pl_module, edit)
        if calibrate is not None:
            calibrate_identity_norm(pl_module.model, calibrate, inputs)
        after = self._outputs(pl_module.model, inputs)
        change = max(float((a - b).abs().max()) for a, b in zip(after, before))
        # float rounding grows with the outputs' size: above magnitude 1 the tolerance is relative
        scale = max([1.0] + [float(b.abs().max()) for b in before])
        if not change <= self.tolerance * scale:
            raise RuntimeError(f"{self.name}: {edit.to_dict()} changed the eval-mode output by {change:.3g} "
                               f"(> tolerance {self.tolerance:g} x {scale:.3g}): the new element is not function-preserving here")
        return change

    def _inputs(self, trainer: pl.Trainer, pl_module: Any) -> list[torch.Tensor]:
        return [inputs for inputs, _ in self.collect_batches(trainer, pl_module)]


class LayerGrowth(_Growth):
    """Insert identity-initialised layers, on a schedule, so the function is unchanged.

    A new layer runs right after an insertion point (the end of a layer, see
    :mod:`growprune.surgery.discovery`): for a feature map of C channels a ``Conv2d(C, C, kernel_size)``
    (``Conv1d`` for sequences, ``Linear(F, F)`` for vectors) initialised to the identity, followed by a
    batch norm when the model has batch norms (``norm="auto"``), and by a ReLU when the point is after
    a ReLU. The batch norm is fitted to the scoring batches (running mean = shift = channel mean,
    running variance = channel variance, scale = sqrt(variance + eps)): exactly the identity in eval
    mode, close to it in train mode (batch statistics near the fitted ones). The ReLU is exact because
    its input is already >= 0.

    Points are used in network order, one new layer each, then again from the first (a second layer at
    a point runs after the first one). The points and the count are fixed when fit starts (and kept in
    checkpoints).

    Args:
        schedule: when to act; the target is the fraction (in [0, 1]) of ``max_layers`` that must have
            been inserted (rounded up).
        points: paths after which layers may be inserted (each must be an insertion point of the model);
            ``None``: every insertion point.
        max_layers: the number of layers the final target (1.0) means; ``None``: one per point.
        kernel_size: of new convolutions (odd, so ``padding = kernel_size // 2`` keeps the size).
        norm: ``"auto"`` (batch norm if the model has one), ``"batch"`` or ``"none"``.
        scoring_batches: training batches for the batch-norm fit and the output check (default 2).
        tolerance: the largest eval-mode output change an insertion may cause (default 1e-5; times the
            largest output magnitude when that is above 1).
        name, verbose, fit_schedule: see :class:`~growprune.strategies.Strategy`.

    The record lists the new layers' paths at the time of insertion (``<point>.1``); a second layer
    at the same point wraps the first, whose path then becomes ``<point>.0.1``.
    """

    def __init__(self, schedule: Schedule, points: list[str] | None = None, max_layers: int | None = None,
                 kernel_size: int = 3, norm: str = "auto", scoring_batches: int = 2, tolerance: float = 1e-5,
                 name: str | None = None, verbose: bool = True, fit_schedule: bool = False):
        super().__init__(schedule, scoring_batches, tolerance, name, verbose, fit_schedule)
        if max_layers is not None and (not isinstance(max_layers, int) or isinstance(max_layers, bool) or max_layers < 1):
            raise ValueError(f"max_layers must be an integer >= 1, got {max_layers!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        if norm not in ("auto", "batch", "none"):
            raise ValueError(f"norm must be 'auto', 'batch' or 'none', got {norm!r}")
        self.points = None if points is None else list(points)
        self.max_layers = max_layers
        self.kernel_size = kernel_size
        self.norm = norm

    def check(self, trainer: pl.Trainer | None, pl_module: Any) -> None:
        found = _discover(pl_module)
        available = {point.after: point for point in found.layer_insertion_points}
        if not available:
            raise ValueError(f"{self.name}: the model has no layer insertion point (a layer that runs once and does not "
                             "produce the output)")
        if self.points is not None:
            modules = dict(pl_module.model.named_modules())
            for path in self.points:
                if path not in modules:
                    raise ValueError(f"{self.name}: no module named {path!r} in the model")
                if path not in available:
                    raise ValueError(f"{self.name}: {path!r} is no layer insertion point; the points are the ends of "
                                     f"layers: {', '.join(list(available)[:8])}{', ...' if len(available) > 8 else ''}")
        if not self.original:
            points = self.points if self.points is not None else list(available)
            self.original = {"points": points, "count": self.max_layers or len(points),
                             "after_activation": {p: available[p].after_activation for p in points},
                             "has_batch_norm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.model.modules())}

    def on_edit(self, trainer: pl.Trainer, pl_module: Any, edit: Edit, result: EditResult) -> None:
        # a cell inserted into a stage shifts the paths of the stage's later cells by one
        if isinstance(edit, InsertCell) and self.original.get("points"):
            self.original["points"] = [_shifted(path, edit.stage, int(edit.index)) for path in self.original["points"]]
            self.original["after_activation"] = {_shifted(path, edit.stage, int(edit.index)): value
                                                 for path, value in self.original["after_activation"].items()}

    def layer_spec(self, shape: Sequence[int], after_activation: bool) -> list[dict[str, Any]]:
        """The new layer for a point whose output has ``shape`` (batch first)."""
        use_norm = self.norm == "batch" or (self.norm == "auto" and self.original.get("has_batch_norm"))
        width = int(shape[1]) if len(shape) >= 2 else 0
        if len(shape) == 2:
            spec = [{"class_path": "torch.nn.Linear", "init_args": {"in_features": width, "out_features": width, "bias": not use_norm}}]
            norm = "torch.nn.BatchNorm1d"
        elif len(shape) in (3, 4):
            conv = "torch.nn.Conv1d" if len(shape) == 3 else "torch.nn.Conv2d"
            spec = [{"class_path": conv, "init_args": {"in_channels": width, "out_channels": width, "kernel_size": self.kernel_size,
                                                       "padding": self.kernel_size // 2, "bias": not use_norm}}]
            norm = "torch.nn.BatchNorm1d" if len(shape) == 3 else "torch.nn.BatchNorm2d"
        else:
            raise ValueError(f"{self.name}: no identity layer for tensors of shape {tuple(shape)}")
        if use_norm:
            spec.append({"class_path": norm, "init_args": {"num_features": width}})
        if after_activation:
            spec.append({"class_path": "torch.nn.ReLU"})
        return spec

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        points: list[str] = self.original["points"]
        done = sum(len(record.get("inserted", [])) for record in self.history)
        wanted = _count(target, int(self.original["count"])) - done
        inserted: list[str] = []
        changes: list[float] = []
        if wanted > 0:
            inputs = self._inputs(trainer, pl_module)
            for number in range(done, done + wanted):
                after = points[number % len(points)]
                shape = _output_shape(pl_module.model, after, pl_module.example_inputs())
                spec = self.layer_spec(shape, bool(self.original["after_activation"].get(after)))
                changes.append(self._insert(pl_module, InsertLayer(after, spec, init="identity"), inputs, calibrate=f"{after}.1"))
                inserted.append(f"{after}.1")
        return {
            "action": "insert_layers",
            "inserted": inserted,
            "achieved": (done + len(inserted)) / int(self.original["count"]),
            "max_output_change": max(changes, default=0.0),
        }


class CellGrowth(_Growth):
    """Insert zero-initialised residual cells into the model's stages, on a schedule.

    A new cell is a freshly initialised copy of the architecture of its stage's last shape-preserving
    cell (``{"copy_of": ...}``: growprune's and torchvision's ResNets, or any residual block of yours),
    with its last norm's scale and shift at zero, so the branch adds nothing; it goes at the end of
    its stage (no other block is renamed) and, since its input is the previous block's ReLU output,
    the ReLU after its sum changes nothing either.

    Which stage: ``placement="round_robin"`` (default) cycles through the stages in network order (the
    i-th new cell goes to stage i mod the number of stages); ``"fewest"`` puts each new cell into
    the stage that has the fewest cells at that moment (the earliest on ties), evening out depth.
    A stage whose shape-preserving cells were all removed has nothing to copy and is passed over
    (with a warning when no stage is left).

    Args:
        schedule: when to act; the target is the fraction (in [0, 1]) of ``max_cells`` that must have
            been inserted (rounded up).
        stages: paths of the stages to grow (``nn.Sequential`` modules holding residual cells);
            ``None``: every stage with a shape-preserving cell.
        max_cells: the number of cells the final target (1.0) means; ``None``: one per stage.
        placement: ``"round_robin"`` or ``"fewest"``.
        scoring_batches: training batches for the output check (default 2).
        tolerance: the largest eval-mode output change an insertion may cause (default 1e-5; times the
            largest output magnitude when that is above 1).
        name, verbose, fit_schedule: see :class:`~growprune.strategies.Strategy`.
    """

    def __init__(self, schedule: Schedule, stages: list[str] | None = None, max_cells: int | None = None,
                 placement: str = "round_robin", scoring_batches: int = 2, tolerance: float = 1e-5,
                 name: str | None = None, verbose: bool = True, fit_schedule: bool = False):
        super().__init__(schedule, scoring_batches, tolerance, name, verbose, fit_schedule)
        if max_cells is not None and (not isinstance(max_cells, int) or isinstance(max_cells, bool) or max_cells < 1):
            raise ValueError(f"max_cells must be an integer >= 1, got {max_cells!r}")
        if placement not in ("round_robin", "fewest"):
            raise ValueError(f"placement must be 'round_robin' or 'fewest', got {placement!r}")
        self.stages = None if stages is None else list(stages)
        self.max_cells = max_cells
        self.placement = placement

    def _growable(self, found: PermissibleElements) -> dict[str, Any]:
        """Stage -> its last insertion point (the end of the stage), for stages with a template cell."""
        last: dict[str, Any] = {}
        for point in found.cell_insertion_points:
            if point.stage not in last or point.index > last[point.stage].index:
                last[point.stage] = point
        return last

    def check(self, trainer: pl.Trainer | None, pl_module: Any) -> None:
        found = _discover(pl_module)
        growable = self._growable(found)
        model_name = type(pl_module.model).__name__
        if not found.stages:
            raise ValueError(f"{self.name}: {model_name} has no residual stage (an nn.Sequential holding residual blocks "
                             "whose output is input + branch, as in a ResNet): there is nowhere to grow a cell")
        if not growable:
            raise ValueError(f"{self.name}: no stage of {model_name} has a shape-preserving residual cell to copy")
        if self.stages is not None:
            modules = dict(pl_module.model.named_modules())
            for stage in self.stages:
                if stage not in modules:
                    raise ValueError(f"{self.name}: no module named {stage!r} in the model")
                if stage not in growable:
                    raise ValueError(f"{self.name}: {stage!r} is no residual stage with a shape-preserving cell; the stages "
                                     f"are {', '.join(growable)}")
        if not self.original:
            stages = self.stages if self.stages is not None else list(growable)
            self.original = {"stages": stages, "count": self.max_cells or len(stages)}

    def _choose(self, found: PermissibleElements, number: int) -> str | None:
        """The stage of the ``number``-th new cell; ``None`` when no stage has a cell to copy any more."""
        growable = self._growable(found)
        stages = [stage for stage in self.original["stages"] if stage in growable]
        if not stages:
            return None
        if self.placement == "round_robin":
            # cycle over the configured stages; one without a template cell now (all its
            # shape-preserving cells were removed) passes its turn to the next
            configured: list[str] = self.original["stages"]
            for step in range(len(configured)):
                stage = configured[(number + step) % len(configured)]
                if stage in growable:
                    return stage
        return min(stages, key=lambda stage: (len(found.stages.get(stage, [])), self.original["stages"].index(stage)))

    def act(self, trainer: pl.Trainer, pl_module: Any, target: float) -> dict[str, Any]:
        done = sum(len(record.get("inserted", [])) for record in self.history)
        wanted = _count(target, int(self.original["count"])) - done
        inserted: list[str] = []
        changes: list[float] = []
        if wanted > 0:
            inputs = self._inputs(trainer, pl_module)
            for number in range(done, done + wanted):
                found = _discover(pl_module)
                stage = self._choose(found, number)
                if stage is None:
                    rank_zero_warn(f"{self.name}: no stage has a shape-preserving cell to copy any more; "
                                   f"{wanted - len(inserted)} cell(s) not inserted")
                    break
                point = self._growable(found)[stage]
                edit = InsertCell(stage, point.index, point.spec(), init="zero_last_norm")
                changes.append(self._insert(pl_module, edit, inputs))
                inserted.append(f"{stage}.{point.index}" if stage else str(point.index))
        return {
            "action": "insert_cells",
            "inserted": inserted,
            "achieved": (done + len(inserted)) / int(self.original["count"]),
            "max_output_change": max(changes, default=0.0),
        }


def _shifted(path: str, stage: str, index: int) -> str:
    """``path`` after a cell was inserted at ``index`` of ``stage`` (later cells move up by one)."""
    prefix = f"{stage}." if stage else ""
    if not path.startswith(prefix):
        return path
    head, _, rest = path[len(prefix):].partition(".")
    if not head.isdigit() or int(head) < index:
        return path
    return f"{prefix}{int(head) + 1}" + (f".{rest}" if rest else "")


def _output_shape(model: nn.Module, path: str, example_inputs: torch.Tensor) -> tuple[int, ...]:
    try:
        module = model.get_submodule(path)
    except AttributeError as error:
        raise ValueError(f"no module named {path!r} in the model") from error
    shapes: list[tuple[int, ...]] = []
    handle = module.register_forward_hook(lambda _, __, output: shapes.append(tuple(output.shape)))
    try:
        with evaluating(model):
            model(example_inputs)
    finally:
        handle.remove()
    if len(shapes) != 1:
        raise ValueError(f"{path!r} ran {len(shapes)} times in a forward pass; a layer is inserted only after one that runs once")
    return shapes[0]
