"""Growth initialisers: the values of freshly added (neutral) channels.

:class:`~growprune.surgery.channels.ChannelGraph.add` appends channels with zero fan-in and
fan-out. An initialiser then writes their entries in place (the optimizer already points at these
tensors) through :class:`~growprune.growth.units.NewUnits`:

=================  =======================================================  ====================
initialiser        ``form="safe"`` (default)                                other form
=================  =======================================================  ====================
:class:`RandomInit`  random fan-in, fan-out 0                               ``"full"``: random fan-out too
:class:`GradMax`     fan-in = top right singular vectors, fan-out 0          ``"paper"``: fan-in 0, fan-out = top left singular vectors
:class:`GradMaxOpt`  fan-in ascends the fan-out's gradient norm, fan-out 0   ``"paper"``: fan-out ascends the fan-in's gradient norm
:class:`Firefly`     best fan-in of a descended candidate pool, fan-out 0   ``"full"``: keeps the descended small fan-out
=================  =======================================================  ====================

Why "safe" is the default (FIELD_NOTES section 6): a new unit with zero fan-in sits at exactly 0
in front of its activation; torch's ``relu'(0) = 0`` gives it no gradient at all (dead), and under
batch norm its zero-variance channel gets gradients scaled by ``gamma / sqrt(eps)`` and one step
blows it up. Non-zero fan-in (a live, normalised activation) with zero fan-out is exactly
function-preserving, batch-norm safe and trainable: the fan-out's gradient is ``G h_new^T != 0``.

GradMax works on any architecture through autograd on the real network: the *mixed Hessian*
``H = d^2 L / d(fan-out) d(fan-in)`` of one unit at the neutral point (both zero, activations
with slope 1 at 0) is, for a plain two-layer block, exactly the paper's cross-covariance
``M = sum (dL/dz_{l+1}) h_{l-1}^T``; its products with a vector are double-backward passes
(residual streams, concatenations, flattening, depthwise convolutions and batch norm included). Its
top left singular vectors are the paper's fan-out; its top right singular vectors maximise the
linearised gradient norm of a zero fan-out, the safe form's fan-in.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from growprune.growth.units import NewUnits, UnitGroup, UnitSlice, group_units, scatter, unit_slope_at_zero
from growprune.modes import preserved_modes

Batches = Sequence[tuple[Tensor, Tensor]]


# ------------------------------------------------------------------------------ helpers
def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _kept_buffers(model: nn.Module) -> Iterator[None]:
    """Forward passes in train mode move batch-norm statistics: put every buffer back afterwards."""
    saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved and saved[name].shape == buffer.shape:
                    buffer.copy_(saved[name])


@contextlib.contextmanager
def _training_passes(model: nn.Module, slope_at_zero: bool = False) -> Iterator[None]:
    """Train-mode passes (as the next optimizer step sees the network) that change nothing but the new entries."""
    with preserved_modes(model), _kept_buffers(model), torch.enable_grad(), \
            (unit_slope_at_zero() if slope_at_zero else contextlib.nullcontext()):
        model.train()
        yield


def _loss(model: nn.Module, batches: Batches, loss_fn: Callable) -> Tensor:
    device = _device(model)
    losses = [loss_fn(model(inputs.to(device)), targets.to(device)) for inputs, targets in batches]
    return torch.stack(losses).mean()


def _existing_rms(model: nn.Module, unit_slice: UnitSlice) -> float:
    """Root mean square of the tensor's old entries: the scale new entries should have."""
    tensor = unit_slice.tensor(model).detach()
    new = unit_slice.new.to(tensor.device)
    count = tensor.numel() - int(new.sum())
    # masked sum, not boolean indexing: indexing a large weight by a mask is slow on CPU
    return float(torch.where(new, 0.0, tensor).pow(2).sum().div(count).sqrt()) if count else 0.0


def _rows_to_norm(values: Tensor, norm: float) -> Tensor:
    """Each row rescaled to Euclidean norm ``norm`` (zero rows stay zero)."""
    lengths = values.norm(dim=1, keepdim=True)
    return torch.where(lengths > 0, values * (norm / lengths.clamp_min(1e-30)), values)


def _target(model: nn.Module, unit_slice: UnitSlice, width: int, scale: float) -> float:
    """Norm of one unit's ``width`` entries when they are as large as the existing entries (times ``scale``)."""
    return scale * _existing_rms(model, unit_slice) * math.sqrt(width)


def _write_rows(model: nn.Module, unit_slice: UnitSlice, index: Tensor, values: Tensor) -> None:
    scatter(model, [(unit_slice, index)], values)


def _random_rows(model: nn.Module, unit_slice: UnitSlice, index: Tensor, scale: float) -> Tensor:
    tensor = unit_slice.tensor(model)
    values = torch.randn(index.shape, dtype=tensor.dtype).to(tensor.device)
    return _rows_to_norm(values, _target(model, unit_slice, index.shape[1], scale))


def _project(model: nn.Module, pairs: Sequence[tuple[UnitSlice, Tensor]], values: Tensor, scale: float) -> Tensor:
    """Per slice, each unit's entries rescaled to that slice's target norm (the norm projection)."""
    pieces, offset = [], 0
    for unit_slice, index in pairs:
        width = index.shape[1]
        pieces.append(_rows_to_norm(values[:, offset:offset + width], _target(model, unit_slice, width, scale)))
        offset += width
    return torch.cat(pieces, dim=1)


def _parameters(model: nn.Module, slices: Sequence[UnitSlice]) -> list[tuple[str, Tensor]]:
    names = list(dict.fromkeys(s.name for s in slices if not s.buffer))
    return [(name, model.get_parameter(name)) for name in names]


def _masked_gradients(model: nn.Module, slices: Sequence[UnitSlice], loss: Tensor, create_graph: bool = False) -> dict[str, Tensor]:
    """Gradient of ``loss`` w.r.t. every tensor of ``slices``, zero outside their new entries."""
    named = _parameters(model, slices)
    if not named:
        return {}
    grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=create_graph, allow_unused=True)
    masks: dict[str, Tensor] = {}
    for s in slices:
        masks[s.name] = masks[s.name] | s.mask if s.name in masks else s.mask
    result = {}
    for (name, parameter), grad in zip(named, grads):
        grad = torch.zeros_like(parameter) if grad is None else grad
        result[name] = grad * masks[name].to(grad.device)
    return result


def new_unit_gradient_norm(model: nn.Module, units: NewUnits, batches: Batches | None,
                           loss_fn: Callable = F.cross_entropy) -> float:
    """Norm of the loss gradient w.r.t. all new entries (train mode, statistics kept); NaN without batches."""
    if not batches:
        return float("nan")
    with _training_passes(model):
        loss = _loss(model, batches, loss_fn)
        grads = _masked_gradients(model, units.slices(), loss)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))) if grads else 0.0


def _zero(model: nn.Module, slices: Sequence[UnitSlice]) -> None:
    with torch.no_grad():
        for s in slices:
            tensor = s.tensor(model)
            tensor.view(-1)[s.index.flatten().to(tensor.device)] = 0


def _random_through(model: nn.Module, units: NewUnits) -> None:
    """Depthwise filters of new channels: random, as large as the existing filters (biases 0).

    A zero filter would cut every new channel off behind it, whatever the fan-in.
    """
    for s in units.through:
        if s.name.endswith("bias"):
            _zero(model, [s])
        else:
            _write_rows(model, s, s.index, _random_rows(model, s, s.index, 1.0))


def _orthonormal_rows(values: Tensor) -> Tensor:
    """Orthonormal rows spanning ``values``' rows; rows beyond the dimension are random unit vectors."""
    count, dim = values.shape
    q, _ = torch.linalg.qr(values.T.double(), mode="reduced")
    rows = q.T[: min(count, dim)]
    if count > dim:
        extra = torch.randn(count - dim, dim, dtype=torch.float64, device=values.device)
        rows = torch.cat([rows, extra / extra.norm(dim=1, keepdim=True)])
    return rows.to(values.dtype)


# ------------------------------------------------------------------------------ base
class GrowthInitializer:
    """Base: sets the values of freshly added (neutral) channels in place. Subclass it (class_path).

    Subclasses implement :meth:`_initialize` and list their ``forms``; :meth:`initialize` checks
    the inputs, keeps the global random state, the modes and the batch-norm statistics, puts the new
    entries back if anything fails, and measures the gradient norm.
    """

    requires_data: bool = False  # True: initialize needs training batches
    forms: ClassVar[tuple[str, ...]] = ("safe",)
    #: forms whose eval-mode output right after initialize equals the output before
    preserving_forms: ClassVar[tuple[str, ...]] = ("safe", "paper")

    def __init__(self, form: str = "safe"):
        if form not in self.forms:
            raise ValueError(f"{type(self).__name__}: no form named {form!r}; forms: {', '.join(self.forms)}")
        self.form = form
        self.function_preserving: bool = form in self.preserving_forms

    def __repr__(self) -> str:
        return f"{type(self).__name__}(form={self.form!r})"

    def initialize(self, model: nn.Module, units: NewUnits, batches: Sequence[tuple[Tensor, Tensor]] | None,
                   loss_fn: Callable = F.cross_entropy) -> dict[str, float]:
        """Write the new entries (no_grad, in place, same tensors: the optimizer keeps pointing at them).
        Returns statistics, at least "gradient_norm": the norm of the loss gradient w.r.t. all new entries
        right after initialisation, measured on `batches` (float('nan') without batches)."""
        name = type(self).__name__
        if not isinstance(units, NewUnits):
            raise TypeError(f"{name}.initialize needs growprune.growth.units.NewUnits, got {type(units).__name__}")
        if not units:
            raise ValueError(f"{name}: the changes add no channels (NewUnits is empty)")
        if self.requires_data and not batches:
            raise ValueError(f"{name} needs training batches to initialise new channels; got batches={batches!r}")
        if not units.producers():
            raise ValueError(f"{name}(form={self.form!r}): the new channels have no producing layer with weights "
                             f"(new entries only in {', '.join(sorted({s.module for s in units.slices()}))})")
        if self.form == "paper" and not units.fan_out:
            raise ValueError(f"{name}(form='paper'): the new channels have no consuming layer with weights "
                             f"(producers: {', '.join(s.module for s in units.producers())})")
        # only the new entries can change: keep their values (not whole tensors) to put back on failure
        saved = [(s, s.tensor(model).detach().reshape(-1)[s.index.reshape(-1).to(s.tensor(model).device)].clone())
                 for s in units.slices()]
        device = _device(model)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), preserved_modes(model):
                stats = dict(self._initialize(model, units, list(batches) if batches else None, loss_fn))
                stats["gradient_norm"] = new_unit_gradient_norm(model, units, batches, loss_fn)
        except BaseException:
            with torch.no_grad():  # a failed initialiser leaves the neutral channels as they were
                for s, values in saved:
                    tensor = s.tensor(model)
                    tensor.view(-1)[s.index.reshape(-1).to(tensor.device)] = values
            raise
        return stats

    def _initialize(self, model: nn.Module, units: NewUnits, batches: list | None, loss_fn: Callable) -> dict[str, float]:
        raise NotImplementedError

    # helpers for data-driven subclasses
    @staticmethod
    def _groups(model: nn.Module, units: NewUnits, batches: list, need_consumers: bool = True) -> list[UnitGroup]:
        _random_through(model, units)
        groups = group_units(model, units, batches[0][0].to(_device(model)))
        for group in groups:
            if need_consumers and not group.consumers:
                raise ValueError(f"the new channels of the group of {group.label!r} reach no layer with weights "
                                 "(no fan-out to score)")
        return groups


# ------------------------------------------------------------------------------ random
class RandomInit(GrowthInitializer):
    """Random fan-in as large as the existing rows; fan-out 0 (``"safe"``) or random too (``"full"``).

    Args:
        form: ``"safe"`` (function-preserving, batch-norm safe) or ``"full"`` (the study's random
            growth: random fan-out too, the function changes).
        fan_in_scale: new rows' norm relative to the existing rows' typical norm.
        fan_out_scale: (``"full"``) new columns' norm relative to the existing columns'.
    """

    forms = ("safe", "full")

    def __init__(self, form: str = "safe", fan_in_scale: float = 1.0, fan_out_scale: float = 1.0):
        super().__init__(form)
        if fan_in_scale <= 0 or fan_out_scale < 0:
            raise ValueError(f"RandomInit: fan_in_scale must be > 0 and fan_out_scale >= 0, got {fan_in_scale}, {fan_out_scale}")
        self.fan_in_scale = fan_in_scale
        self.fan_out_scale = fan_out_scale

    def _initialize(self, model: nn.Module, units: NewUnits, batches: list | None, loss_fn: Callable) -> dict[str, float]:
        _random_through(model, units)
        for s in units.fan_in:
            if s.name.endswith("bias"):
                _zero(model, [s])
            else:
                _write_rows(model, s, s.index, _random_rows(model, s, s.index, self.fan_in_scale))
        for s in units.fan_out:
            if self.form == "full":
                _write_rows(model, s, s.index, _random_rows(model, s, s.index, self.fan_out_scale))
            else:
                _zero(model, [s])
        return {}


# ------------------------------------------------------------------------------ GradMax
class _MixedHessian:
    """Products of each group's per-unit mixed Hessian ``d^2 L / d(fan-out) d(fan-in)`` with vectors.

    Built at the current values (for GradMax: the neutral point) in train mode, with ReLU-type
    activations given slope 1 at 0. One forward pass and one create-graph backward; every product
    is one more backward pass through the retained graph, for all groups at once.
    """

    def __init__(self, model: nn.Module, groups: list[UnitGroup], batches: Batches, loss_fn: Callable):
        self.model, self.groups = model, groups
        self.in_slices = [s for g in groups for s, _ in g.producers]
        self.out_slices = [s for g in groups for s, _ in g.consumers]
        self.inputs = _parameters(model, self.in_slices)
        self.outputs = _parameters(model, self.out_slices)
        loss = _loss(model, batches, loss_fn)
        grads = torch.autograd.grad(loss, [p for _, p in self.inputs + self.outputs], create_graph=True, allow_unused=True)
        self.grad = {name: g for (name, _), g in zip(self.inputs + self.outputs, grads)}

    def _apply(self, vectors: list[Tensor], side: str) -> list[Tensor]:
        source, target = (self.inputs, self.outputs) if side == "in" else (self.outputs, self.inputs)
        full = {name: torch.zeros_like(p) for name, p in source}
        for group, values in zip(self.groups, vectors):
            pairs = group.producers if side == "in" else group.consumers
            offset = 0
            for unit_slice, index in pairs:
                width = index.shape[1]
                full[unit_slice.name].view(-1)[index.reshape(-1).to(values.device)] += \
                    values[:, offset:offset + width].reshape(-1).to(full[unit_slice.name])
                offset += width
        terms = [(self.grad[name] * full[name]).sum() for name, _ in source
                 if self.grad[name] is not None and self.grad[name].requires_grad]
        if not terms:
            products = [None] * len(target)
        else:
            products = torch.autograd.grad(torch.stack(terms).sum(), [p for _, p in target], retain_graph=True, allow_unused=True)
        result = {name: torch.zeros_like(p) if g is None else g.detach() for (name, p), g in zip(target, products)}
        out = []
        for group in self.groups:
            pairs = group.consumers if side == "in" else group.producers
            out.append(torch.cat([result[s.name].reshape(-1)[index.reshape(-1).to(result[s.name].device)].reshape(index.shape)
                                  for s, index in pairs], dim=1))
        return out

    def times_fan_in(self, vectors: list[Tensor]) -> list[Tensor]:
        """``H theta`` per group: fan-in vectors (k, d) -> fan-out vectors (k, e)."""
        return self._apply(vectors, "in")

    def times_fan_out(self, vectors: list[Tensor]) -> list[Tensor]:
        """``H^T u`` per group: fan-out vectors (k, e) -> fan-in vectors (k, d)."""
        return self._apply(vectors, "out")


class GradMax(GrowthInitializer):
    """GradMax (Evci et al., ICLR 2022) on any architecture, with a batch-norm-safe form.

    Per group, the top-k singular vectors of the per-unit mixed Hessian (the cross-covariance of
    the paper, see the module docstring), by ``iterations`` rounds of subspace iteration (each
    two backward passes) and a Rayleigh-Ritz step.

    Args:
        form: ``"safe"``: fan-out 0, fan-in = top right singular vectors (the fan-in that makes the
            zero fan-out's gradient largest, linearised), each producer's part rescaled to the norm of
            its existing rows times ``fan_in_scale``. ``"paper"``: fan-in 0, fan-out = top left
            singular vectors, each consumer's part rescaled to ``scale`` x its existing columns' norm
            (dead under ReLU in PyTorch and broken under batch norm: the baseline).
        iterations: subspace-iteration rounds (each two double-backward passes over the batches: the cost of
            a step grows linearly with it; the shipped configs use 3; the test that matches the paper's
            exact SVD on a two-layer MLP uses 30).
        scale: (``"paper"``) new columns' norm relative to existing columns (the paper: 0.5).
        fan_in_scale: (``"safe"``) new rows' norm relative to existing rows.
    """

    requires_data = True
    forms = ("safe", "paper")

    def __init__(self, form: str = "safe", iterations: int = 3, scale: float = 0.5, fan_in_scale: float = 1.0):
        super().__init__(form)
        if iterations < 1 or scale <= 0 or fan_in_scale <= 0:
            raise ValueError(f"{type(self).__name__}: iterations must be >= 1 and scales > 0, got {iterations}, {scale}, {fan_in_scale}")
        self.iterations, self.scale, self.fan_in_scale = iterations, scale, fan_in_scale

    def _initialize(self, model: nn.Module, units: NewUnits, batches: list | None, loss_fn: Callable) -> dict[str, float]:
        assert batches is not None
        _zero(model, units.fan_in + units.fan_out)
        groups = self._groups(model, units, batches)
        with _training_passes(model, slope_at_zero=True):
            hessian = _MixedHessian(model, groups, batches, loss_fn)
            safe = self.form == "safe"
            forward, backward = (hessian.times_fan_in, hessian.times_fan_out) if safe else \
                (hessian.times_fan_out, hessian.times_fan_in)
            pairs = [g.producers if safe else g.consumers for g in groups]
            device = _device(model)
            vectors = [_orthonormal_rows(torch.randn(g.count, sum(i.shape[1] for _, i in p), device=device))
                       for g, p in zip(groups, pairs)]
            for _ in range(self.iterations):
                vectors = [_orthonormal_rows(v) for v in backward(forward(vectors))]
            images = forward(vectors)
        top = []
        for group, group_pairs, basis, image in zip(groups, pairs, vectors, images):
            # Rayleigh-Ritz: the best combinations of the basis, strongest first
            # (k x k) Gram matrix: its eigenvectors are the right singular vectors of image^T, cheap for wide images
            energies, vectors_k = torch.linalg.eigh(image.double() @ image.double().T)
            order = torch.argsort(energies, descending=True)
            singular, right = energies[order].clamp_min(0).sqrt(), vectors_k[:, order].T
            if float(singular.max()) == 0.0:
                raise ValueError(f"GradMax(form={self.form!r}): no loss gradient reaches the new channels of the "
                                 f"group of {group.label!r} (every direction scores 0)")
            chosen = right.to(basis) @ basis
            if self.form == "safe":
                scatter(model, group_pairs, _project(model, group_pairs, chosen, self.fan_in_scale))
            else:
                scatter(model, group_pairs, _project(model, group_pairs, chosen, self.scale))
            top.append(float(singular.max()))
        for s in units.fan_in:
            if s.name.endswith("bias"):
                _zero(model, [s])
        return {"top_singular_value": max(top)}


class GradMaxOpt(GrowthInitializer):
    """GradMax-Opt: a few projected gradient-ascent steps on the new weights' gradient norm.

    Args:
        form: ``"safe"``: fan-out 0; the fan-in (started random) ascends the exact (train-mode,
            batch-norm, real activation) squared gradient norm of the zero fan-out, each step
            followed by the norm projection (every producer's part of a unit back to its existing
            rows' norm x ``fan_in_scale``). ``"paper"``: fan-in 0; the fan-out ascends the fan-in's
            squared gradient norm (activations with slope 1 at 0), projected to ``scale`` x the
            existing columns' norm.
        steps: ascent steps (each one forward and two backward passes).
        lr: step length relative to a unit's norm (normalised gradient ascent).
    """

    requires_data = True
    forms = ("safe", "paper")

    def __init__(self, form: str = "safe", steps: int = 10, lr: float = 0.5, scale: float = 0.5, fan_in_scale: float = 1.0):
        super().__init__(form)
        if steps < 1 or lr <= 0 or scale <= 0 or fan_in_scale <= 0:
            raise ValueError(f"GradMaxOpt: steps must be >= 1 and lr, scales > 0, got {steps}, {lr}, {scale}, {fan_in_scale}")
        self.steps, self.lr, self.scale, self.fan_in_scale = steps, lr, scale, fan_in_scale

    def _initialize(self, model: nn.Module, units: NewUnits, batches: list | None, loss_fn: Callable) -> dict[str, float]:
        assert batches is not None
        safe = self.form == "safe"
        _zero(model, units.fan_in + units.fan_out)
        groups = self._groups(model, units, batches)
        pairs = [g.producers if safe else g.consumers for g in groups]
        scale = self.fan_in_scale if safe else self.scale
        values = [_project(model, p, torch.randn(g.count, sum(i.shape[1] for _, i in p), device=_device(model)), scale)
                  for g, p in zip(groups, pairs)]
        variables = [s for g in groups for s, _ in (g.producers if safe else g.consumers)]
        scored = [s for g in groups for s, _ in (g.consumers if safe else g.producers)]
        history = []
        with _training_passes(model, slope_at_zero=not safe):
            for step in range(self.steps + 1):
                for p, v in zip(pairs, values):
                    scatter(model, p, v)
                loss = _loss(model, batches, loss_fn)
                grads = _masked_gradients(model, scored, loss, create_graph=True)
                objective = sum((g ** 2).sum() for g in grads.values())
                history.append(float(objective.detach()))
                if step == self.steps or not objective.requires_grad:
                    break
                ascent = _masked_gradients(model, variables, objective)
                for i, (p, v) in enumerate(zip(pairs, values)):
                    direction = torch.cat([ascent[s.name].reshape(-1)[index.reshape(-1)].reshape(index.shape)
                                           for s, index in p], dim=1)
                    lengths = direction.norm(dim=1, keepdim=True)
                    moved = v + self.lr * v.norm(dim=1, keepdim=True) * direction / lengths.clamp_min(1e-30)
                    values[i] = _project(model, p, torch.where(lengths > 0, moved, v), scale)
        if not history or history[-1] == 0.0:
            raise ValueError(f"GradMaxOpt(form={self.form!r}): no loss gradient reaches the new channels "
                             f"({', '.join(g.label for g in groups)})")
        return {"objective_start": history[0], "objective_end": history[-1]}


class Firefly(GrowthInitializer):
    """Firefly-style selection: a pool of candidate units descends the loss; the best ``k`` are kept.

    The pool is ``candidates`` x ``k`` units, evaluated ``k`` at a time in the new slots: each has
    a random fan-in (as large as the existing rows) and a small random fan-out (``epsilon`` x the
    existing columns' norm); ``steps`` plain gradient-descent steps (``lr``) move the fan-outs on
    the training loss (train mode). A candidate's score is how far its fan-out moved: the loss
    reduction it offers. The ``k`` best of each group keep their fan-in; ``"safe"`` sets their
    fan-out to 0 (function-preserving), ``"full"`` keeps the descended small fan-out.
    """

    requires_data = True
    forms = ("safe", "full")

    def __init__(self, form: str = "safe", candidates: int = 4, steps: int = 5, lr: float = 0.1, epsilon: float = 0.01):
        super().__init__(form)
        if candidates < 1 or steps < 1 or lr <= 0 or epsilon <= 0:
            raise ValueError(f"Firefly: candidates and steps must be >= 1, lr and epsilon > 0, got "
                             f"{candidates}, {steps}, {lr}, {epsilon}")
        self.candidates, self.steps, self.lr, self.epsilon = candidates, steps, lr, epsilon

    def _initialize(self, model: nn.Module, units: NewUnits, batches: list | None, loss_fn: Callable) -> dict[str, float]:
        assert batches is not None
        _zero(model, units.fan_in + units.fan_out)
        groups = self._groups(model, units, batches)
        device = _device(model)
        fan_out_slices = [s for g in groups for s, _ in g.consumers]
        pool: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in groups]  # (fan-in, fan-out, score) per round
        decrease = []
        with _training_passes(model):
            for _ in range(self.candidates):
                fan_in = [_project(model, g.producers, torch.randn(g.count, sum(i.shape[1] for _, i in g.producers),
                                                                   device=device), 1.0) for g in groups]
                start = [_project(model, g.consumers, torch.randn(g.count, sum(i.shape[1] for _, i in g.consumers),
                                                                  device=device), self.epsilon) for g in groups]
                fan_out = [v.clone() for v in start]
                for g, v in zip(groups, fan_in):
                    scatter(model, g.producers, v)
                losses = []
                for step in range(self.steps + 1):
                    for g, v in zip(groups, fan_out):
                        scatter(model, g.consumers, v)
                    loss = _loss(model, batches, loss_fn)
                    losses.append(float(loss.detach()))
                    if step == self.steps:
                        break
                    grads = _masked_gradients(model, fan_out_slices, loss)
                    for i, g in enumerate(groups):
                        direction = torch.cat([grads[s.name].reshape(-1)[index.reshape(-1)].reshape(index.shape)
                                               for s, index in g.consumers], dim=1)
                        fan_out[i] = fan_out[i] - self.lr * direction
                decrease.append(losses[0] - losses[-1])
                for i in range(len(groups)):
                    pool[i].append((fan_in[i], fan_out[i], (fan_out[i] - start[i]).norm(dim=1)))
        best, dead = [], []
        for g, rounds in zip(groups, pool):
            fan_in = torch.cat([r[0] for r in rounds])
            fan_out = torch.cat([r[1] for r in rounds])
            scores = torch.cat([r[2] for r in rounds])
            # a candidate whose ReLU is off on every sample scores 0: it ranks last, and is kept only
            # when the whole pool is (``dead_candidates`` says how often)
            chosen = torch.argsort(scores, descending=True, stable=True)[: g.count]
            dead.append(float((scores == 0).float().mean()))
            scatter(model, g.producers, fan_in[chosen])
            if self.form == "full":
                scatter(model, g.consumers, fan_out[chosen])
            else:
                _zero(model, [s for s, _ in g.consumers])
            best.append(float(scores[chosen].mean()))
        for s in units.fan_in:
            if s.name.endswith("bias"):
                _zero(model, [s])
        return {"score_mean": sum(best) / len(best), "loss_decrease_mean": sum(decrease) / len(decrease),
                "dead_candidates": sum(dead) / len(dead)}


INITIALIZERS: dict[str, type[GrowthInitializer]] = {
    "random": RandomInit, "gradmax": GradMax, "gradmax_opt": GradMaxOpt, "firefly": Firefly}
