"""Information-plane measures of a network's layers: binned plug-in mutual information (bits).

The estimator is the one of Shwartz-Ziv & Tishby (2017): every continuous variable (one unit, or
one feature of a multi-dimensional input) is cut into ``bins`` equal-width bins over its range on
the probe batch; a multi-dimensional variable (a layer) is the tuple of its units' bins, taken as
one discrete symbol; entropies are the plug-in entropies of the symbol frequencies and
``I(X; Y) = H(X) + H(Y) - H(X, Y)``. Integer and bool arrays (class labels, actions) are taken as
discrete symbols as they are, without binning.

Known limits of this estimator (read the numbers with them in mind):

* Saturation: with ``N`` samples every entropy is at most ``log2 N``. A wide layer of a
  deterministic network usually gives every sample its own symbol, so ``H(T) = log2 N`` and
  ``I(T; Y) = H(Y)`` whatever the layer computes; fewer bins or fewer units lower the saturation.
* Bias: for independent variables the plug-in estimate is positive, about
  ``(k_x - 1)(k_y - 1) / (2 N ln 2)`` bits for ``k_x``, ``k_y`` occupied symbols (Miller-Madow).
* The value depends on ``bins`` and on the probe batch (its range sets the bin edges).

Because of the saturation, the layer-level ``mi_label`` of wide layers (LeNet-300-100's 300 and 100
units on a few hundred probe images) is the same, ``H(Y)``, for every network. ``mi_label_unit``
does not saturate: it averages ``I(T_i; Y)`` over the single hidden units ``T_i`` (each binned on
its own), at the price of ignoring what units encode jointly.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn

__all__ = ["entropy", "information_from_activations", "information_measures", "mutual_information", "symbols",
           "unit_label_information"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
                nn.LogSigmoid, nn.Threshold)
_ACTIVATION_FUNCTIONS = {torch.relu, torch.relu_, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.relu_,
                         nn.functional.relu6, nn.functional.leaky_relu, nn.functional.elu, nn.functional.selu,
                         nn.functional.gelu, nn.functional.silu, nn.functional.mish, nn.functional.hardtanh,
                         nn.functional.hardswish, nn.functional.hardsigmoid, nn.functional.sigmoid,
                         nn.functional.tanh, nn.functional.softplus}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def _as_2d(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be an array [N] or [N, d] with N >= 1, got shape {array.shape}")
    return array


def symbols(values: np.ndarray | torch.Tensor, bins: int = 30) -> np.ndarray:
    """One discrete symbol per sample: each column is binned (``bins`` equal-width bins over its range;
    a constant column is one bin; integer/bool columns are kept as they are) and each row's tuple
    of bins becomes one symbol.

    Args:
        values: ``[N]`` or ``[N, d]`` samples.
        bins: bins per continuous column (>= 1).

    Returns:
        int64 ``[N]`` symbol ids ``0 .. K - 1`` (``K`` distinct rows).

    Raises:
        ValueError: a bad shape, ``bins < 1``, or non-finite values.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    array = _as_2d(values, "values")
    if array.dtype.kind in "biu":
        codes = np.empty(array.shape, dtype=np.int64)
        for column in range(array.shape[1]):
            codes[:, column] = np.unique(array[:, column], return_inverse=True)[1].reshape(-1)
    else:
        array = array.astype(np.float64, copy=False)
        if not np.isfinite(array).all():
            raise ValueError("values must be finite (got NaN or inf)")
        low, high = array.min(axis=0), array.max(axis=0)
        width = np.where(high > low, high - low, 1.0)
        codes = np.clip(np.floor((array - low) / width * bins), 0, bins - 1).astype(np.int64)
    if codes.shape[1] == 1:
        return np.unique(codes[:, 0], return_inverse=True)[1].reshape(-1)
    # Rows as raw bytes make np.unique compare whole rows at once.
    narrow = codes.astype(np.uint8 if codes.max(initial=0) < 256 else np.int64)
    narrow = np.ascontiguousarray(narrow)
    rows = narrow.view(np.dtype((np.void, narrow.dtype.itemsize * narrow.shape[1]))).reshape(-1)
    return np.unique(rows, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _entropy_of_symbols(ids: np.ndarray) -> float:
    counts = np.bincount(ids)
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def entropy(values: np.ndarray | torch.Tensor, bins: int = 30) -> float:
    """Plug-in entropy (bits) of the binned variable (see :func:`symbols`); at most ``log2 N``.

    Returns:
        ``H(X)`` in bits.

    Raises:
        ValueError: as :func:`symbols`.
    """
    return _entropy_of_symbols(symbols(values, bins))


def mutual_information(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, bins: int = 30) -> float:
    """Binned plug-in mutual information ``I(X; Y) = H(X) + H(Y) - H(X, Y)`` in bits.

    Each continuous column gets ``bins`` equal-width bins over its range in this sample; a
    multi-dimensional ``x`` or ``y`` is one variable whose symbol is the tuple of its columns' bins;
    integer/bool arrays are used as discrete symbols directly. ``I(X; X) = H(X)`` exactly; for
    independent variables the estimate is about ``(k_x - 1)(k_y - 1) / (2 N ln 2)`` bits (bias);
    it never exceeds ``log2 N`` (saturation, see the module docstring).

    Args:
        x: ``[N]`` or ``[N, d_x]`` samples.
        y: ``[N]`` or ``[N, d_y]`` samples of the same ``N``.
        bins: bins per continuous column.

    Returns:
        The estimate in bits (>= 0).

    Raises:
        ValueError: bad shapes, different sample counts, ``bins < 1`` or non-finite values.
    """
    x_ids, y_ids = symbols(x, bins), symbols(y, bins)
    if len(x_ids) != len(y_ids):
        raise ValueError(f"x and y need the same number of samples, got {len(x_ids)} and {len(y_ids)}")
    joint = x_ids * (int(y_ids.max()) + 1) + y_ids
    joint = np.unique(joint, return_inverse=True)[1].reshape(-1)
    value = _entropy_of_symbols(x_ids) + _entropy_of_symbols(y_ids) - _entropy_of_symbols(joint)
    return max(0.0, value)  # plug-in MI is >= 0; only rounding can make it negative


def information_from_activations(activations: Sequence[np.ndarray | torch.Tensor], targets: np.ndarray | torch.Tensor,
                                 bins: int = 30) -> dict[str, float]:
    """Information measures of layers whose activations were computed elsewhere (e.g. by a control task).

    Layers are named ``"0"``, ``"1"``, ... in the given order; the last one is the output layer.

    Args:
        activations: one ``[N, units]`` (or ``[N]``) array per layer, input to output order.
        targets: ``[N]`` labels (integers are used as symbols as they are; floats are binned).
        bins: bins per continuous unit.

    Returns:
        ``"mi_label/<layer>"`` = ``I(T_l; Y)`` for every layer, ``"mi_next/<layer>"`` =
        ``I(T_l; T_{l+1})`` for every layer but the last, ``"mi_label"`` = mean of ``I(T_l; Y)`` over
        the hidden layers (all but the last; NaN when there is only one layer) and
        ``"mi_consecutive"`` = mean of ``I(T_l; T_{l+1})`` over consecutive pairs (NaN with one layer),
        ``"mi_label_unit"`` = mean of ``I(T_i; Y)`` over the units of the hidden layers (NaN with one
        layer; see :func:`unit_label_information`).

    Raises:
        ValueError: no layers, or arrays whose sample counts differ from ``targets``.
    """
    if len(activations) == 0:
        raise ValueError("information_from_activations needs at least one layer's activations, got none")
    return _measures([str(index) for index in range(len(activations))], list(activations), targets, bins)


def _measures(names: list[str], activations: list[Any], targets: Any, bins: int) -> dict[str, float]:
    target_ids = symbols(targets, bins)
    layer_ids = []
    for name, values in zip(names, activations):
        ids = symbols(values, bins)
        if len(ids) != len(target_ids):
            raise ValueError(f"layer {name!r} has {len(ids)} samples but targets have {len(target_ids)}")
        layer_ids.append(ids)
    result: dict[str, float] = {}
    label = [mutual_information(ids, target_ids) for ids in layer_ids]
    following = [mutual_information(layer_ids[k], layer_ids[k + 1]) for k in range(len(layer_ids) - 1)]
    for name, value in zip(names, label):
        result[f"mi_label/{name}"] = value
    for name, value in zip(names, following):
        result[f"mi_next/{name}"] = value
    result["mi_label"] = float(np.mean(label[:-1])) if len(label) > 1 else math.nan
    result["mi_consecutive"] = float(np.mean(following)) if following else math.nan
    per_unit = [unit_label_information(values, target_ids, bins) for values in activations[:-1]]
    units = np.concatenate(per_unit) if per_unit else np.empty(0)
    result["mi_label_unit"] = float(units.mean()) if len(units) else math.nan
    return result


def unit_label_information(activations: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                           bins: int = 30) -> np.ndarray:
    """``I(T_i; Y)`` in bits for every unit ``T_i`` of a layer, each unit binned on its own.

    Args:
        activations: ``[N, units]`` (or ``[N]``) samples of one layer.
        targets: ``[N]`` labels (integers as symbols, floats binned).
        bins: bins per unit.

    Returns:
        float64 ``[units]``: the per-unit estimates (a constant unit gives 0).

    Raises:
        ValueError: as :func:`mutual_information`.
    """
    array = _as_2d(activations, "activations")
    target_ids = symbols(targets, bins)
    return np.array([mutual_information(array[:, column], target_ids, bins) for column in range(array.shape[1])])


def _is_activation(node: torch.fx.Node, traced: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(traced.get_submodule(node.target), _ACTIVATIONS)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _representation_nodes(traced: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Weight layer name -> the node whose value represents it: the first activation reached from the
    layer through single-user normalisation / dropout / identity modules, else the layer's own output."""
    chosen: dict[str, torch.fx.Node] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(traced.get_submodule(node.target), _WEIGHT_LAYERS):
            continue
        name = str(node.target)
        if name in chosen:
            raise ValueError(f"weight layer {name!r} is called more than once; shared layers are not supported")
        current, picked = node, node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if _is_activation(user, traced):
                picked = user
                break
            if user.op == "call_module" and isinstance(traced.get_submodule(user.target), _PASS_THROUGH):
                current = user
                continue
            break
        chosen[name] = picked
    return chosen


class _Recorder(torch.fx.Interpreter):
    def __init__(self, traced: torch.fx.GraphModule, wanted: dict[torch.fx.Node, list[str]]):
        super().__init__(traced)
        self.extra_traceback = False
        self.wanted = wanted
        self.values: dict[str, np.ndarray] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        for name in self.wanted.get(node, []):
            tensor = value.detach().float()
            # Conv feature maps -> one number per channel (mean over space).
            if tensor.dim() > 2:
                tensor = tensor.flatten(2).mean(dim=2)
            self.values[name] = tensor.cpu().numpy()
        return value


def information_measures(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         bins: int = 30) -> dict[str, float]:
    """Binned mutual information between each weight layer's representation, the labels and the next layer.

    Every ``Linear`` / ``Conv1d/2d/3d`` is one layer (its module name, execution order; the last
    is the output layer). Its representation ``T`` is taken *after its activation*: the first
    activation (``ReLU``, ``Tanh``, ``F.relu``, ...) reached from the layer's output through
    single-user batch-norm / dropout / identity modules; a layer not followed that way by an
    activation (an output layer, a conv whose output goes into a residual addition) contributes its
    own output. Convolution outputs are averaged over space (``[N, C]``). The model runs once on
    ``inputs`` in eval mode without gradients (its mode is restored). Estimator, saturation and bias:
    see :func:`mutual_information` and the module docstring.

    Args:
        model: a ``torch.fx``-traceable model.
        inputs: the probe batch ``[N, ...]``.
        targets: ``[N]`` labels (integers are symbols; floats are binned).
        bins: bins per unit.

    Returns:
        The keys of :func:`information_from_activations`, layers named by module name.

    Raises:
        ValueError: the model cannot be traced, has no weight layer, or sample counts differ.
    """
    if hasattr(model, "masks") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a GrowPruneModule: its masks are already applied to the weights
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"information_measures cannot trace {type(model).__name__} with torch.fx: "
                         f"{message}") from error
    chosen = _representation_nodes(traced)
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no weight layer (Linear/Conv1d/Conv2d/Conv3d)")
    if len(targets) != len(inputs):
        raise ValueError(f"inputs have {len(inputs)} samples but targets have {len(targets)}")
    wanted: dict[torch.fx.Node, list[str]] = {}
    for name, node in chosen.items():
        wanted.setdefault(node, []).append(name)
    recorder = _Recorder(traced, wanted)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            recorder.run(inputs)
    finally:
        model.train(was_training)
    names = list(chosen)
    return _measures(names, [recorder.values[name] for name in names], targets, bins)
