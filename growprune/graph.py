"""Unweighted unit graphs of networks (neurons / channels as nodes) and network-science measures on them.

A :class:`UnitGraph` is a DAG whose nodes are *units*: the input units, then the output channels
(convolutions) or output neurons (linear layers) of every weight layer, in execution order. There is
an edge ``u -> v`` when unit ``v`` reads a channel that carries ``u``'s signal through at least one
nonzero weight (for convolutions: at least one nonzero element of the kernel ``W[v, i]``). Ops between
weight layers only route channels: batch norm, activations, pooling and dropout keep a channel's
sources, a residual addition takes the union, a concatenation stacks channels, and a flatten into a
linear layer makes feature ``f`` carry the sources of channel ``f // (features per channel)``.

:func:`unit_graph` builds the graph of any ``torch.fx``-traceable model; :func:`unit_graph_from_weights`
builds it from a list of MLP weight matrices. :data:`MEASURES` maps each measure name to a function
``measure(graph, seed) -> float``; :func:`graph_measures` computes several at once.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

__all__ = ["LayerPair", "MEASURES", "UnitGraph", "graph_measures", "louvain_modularity", "partition_modularity",
           "twin_classes", "unit_graph", "unit_graph_from_weights"]


# ------------------------------------------------------------------------------------------- graph


@dataclass
class LayerPair:
    """The edges from one layer's units to another layer's units, as a bipartite graph.

    Attributes:
        producer: name of the layer whose units are the edge tails.
        consumer: name of the layer whose units are the edge heads.
        producer_units: unit ids of the producer layer (row order of ``biadjacency``).
        consumer_units: unit ids of the consumer layer (column order of ``biadjacency``).
        biadjacency: ``scipy.sparse.csr_matrix`` of bool, ``[len(producer_units), len(consumer_units)]``.
    """

    producer: str
    consumer: str
    producer_units: np.ndarray
    consumer_units: np.ndarray
    biadjacency: sp.csr_matrix


@dataclass(eq=False)
class UnitGraph:
    """An unweighted DAG of units (neurons / channels); unit ids are ``0 .. num_units - 1``.

    Units are numbered layer by layer in execution order, so every edge goes from a smaller id to a
    larger one (the id order is a topological order).

    Attributes:
        num_units: number of units (nodes), dead ones included.
        sources: int64 ``[E]`` edge tails.
        targets: int64 ``[E]`` edge heads.
        layer_of: int64 ``[num_units]``, index into ``layers`` of each unit's layer.
        layers: layer names, ``"input"`` first, then the weight layers in execution order.
        inputs: unit ids of the input layer.
        outputs: unit ids of the output layer (the units the model's output reads).
        links: ``(producer layer, consumer layer)`` index pairs that the architecture wires together,
            whatever the weights (so a fully pruned pair still counts, as an empty bipartite graph);
            ``None``: only the pairs joined by an edge are known.
    """

    num_units: int
    sources: np.ndarray
    targets: np.ndarray
    layer_of: np.ndarray
    layers: list[str]
    inputs: np.ndarray
    outputs: np.ndarray
    links: list[tuple[int, int]] | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sources = np.asarray(self.sources, dtype=np.int64)
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.layer_of = np.asarray(self.layer_of, dtype=np.int64)
        self.inputs = np.asarray(self.inputs, dtype=np.int64)
        self.outputs = np.asarray(self.outputs, dtype=np.int64)
        if self.sources.shape != self.targets.shape or self.sources.ndim != 1:
            raise ValueError(f"sources and targets must be 1-D arrays of one length, got shapes "
                             f"{self.sources.shape} and {self.targets.shape}")
        if self.layer_of.shape != (self.num_units,):
            raise ValueError(f"layer_of must have num_units={self.num_units} entries, got {self.layer_of.shape}")
        if len(self.sources) and (min(self.sources.min(), self.targets.min()) < 0
                                  or max(self.sources.max(), self.targets.max()) >= self.num_units):
            raise ValueError(f"edge endpoints must be unit ids in [0, {self.num_units})")

    @property
    def num_edges(self) -> int:
        """Number of edges."""
        return int(len(self.sources))

    def adjacency(self) -> sp.csr_matrix:
        """The directed adjacency matrix: ``scipy.sparse.csr_matrix`` bool ``[num_units, num_units]``,
        entry ``[u, v]`` set for each edge ``u -> v`` (cached)."""
        if "adjacency" not in self._cache:
            ones = np.ones(len(self.sources), dtype=bool)
            self._cache["adjacency"] = sp.csr_matrix((ones, (self.sources, self.targets)),
                                                     shape=(self.num_units, self.num_units))
        return self._cache["adjacency"]

    def degrees(self) -> np.ndarray:
        """Undirected degree (in-degree + out-degree) of every unit, int64 ``[num_units]`` (cached)."""
        if "degrees" not in self._cache:
            self._cache["degrees"] = (np.bincount(self.sources, minlength=self.num_units)
                                      + np.bincount(self.targets, minlength=self.num_units)).astype(np.int64)
        return self._cache["degrees"]

    def to_networkx(self, directed: bool = True) -> "nx.DiGraph | nx.Graph":
        """The graph as a networkx ``DiGraph`` (``directed=True``) or ``Graph``; node ids are the unit ids
        (every unit is a node, isolated ones included) and nodes/edges carry no attributes (look the
        layer up in ``layer_of``)."""
        import networkx as nx

        graph = nx.DiGraph() if directed else nx.Graph()
        graph.add_nodes_from(range(self.num_units))
        graph.add_edges_from(zip(self.sources.tolist(), self.targets.tolist()))
        return graph

    def layer_pairs(self) -> list[LayerPair]:
        """Every (producer layer -> consumer layer) pair the architecture wires (:attr:`links`; without
        links: every pair joined by at least one edge), as a bipartite biadjacency matrix, empty when
        pruning removed all its edges; sorted by consumer, then producer (a residual network also has
        pairs that skip layers). Cached."""
        if "layer_pairs" in self._cache:
            return self._cache["layer_pairs"]
        members = [np.flatnonzero(self.layer_of == index) for index in range(len(self.layers))]
        # Position of each unit inside its own layer (units of a layer are contiguous ids).
        position = np.empty(self.num_units, dtype=np.int64)
        for units in members:
            position[units] = np.arange(len(units))
        pairs: list[LayerPair] = []
        chosen_of: dict[int, np.ndarray] = {}
        if self.num_edges:
            key = self.layer_of[self.targets] * len(self.layers) + self.layer_of[self.sources]
            order = np.argsort(key, kind="stable")
            keys, starts = np.unique(key[order], return_index=True)
            ends = np.append(starts[1:], len(order))
            chosen_of = {k: order[a:b] for k, a, b in zip(keys.tolist(), starts.tolist(), ends.tolist())}
        wired = set(chosen_of) if self.links is None else \
            {consumer * len(self.layers) + producer for producer, consumer in self.links} | set(chosen_of)
        for pair_key in sorted(wired):
            consumer, producer = divmod(pair_key, len(self.layers))
            chosen = chosen_of.get(pair_key, np.zeros(0, dtype=np.int64))
            shape = (len(members[producer]), len(members[consumer]))
            matrix = sp.csr_matrix((np.ones(len(chosen), dtype=bool),
                                    (position[self.sources[chosen]], position[self.targets[chosen]])), shape=shape)
            pairs.append(LayerPair(self.layers[producer], self.layers[consumer], members[producer],
                                   members[consumer], matrix))
        self._cache["layer_pairs"] = pairs
        return pairs


def _make_graph(layer_sizes: Sequence[int], names: Sequence[str], edges: Sequence[tuple[np.ndarray, np.ndarray]],
                outputs: np.ndarray, links: Sequence[tuple[int, int]]) -> UnitGraph:
    layer_of = np.repeat(np.arange(len(layer_sizes), dtype=np.int64), np.asarray(layer_sizes, dtype=np.int64))
    sources = np.concatenate([e[0] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    targets = np.concatenate([e[1] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    return UnitGraph(num_units=int(sum(layer_sizes)), sources=sources, targets=targets, layer_of=layer_of,
                     layers=list(names), inputs=np.arange(layer_sizes[0], dtype=np.int64), outputs=outputs,
                     links=sorted(set(links)))


def unit_graph_from_weights(weights: Sequence[np.ndarray | torch.Tensor],
                            names: Sequence[str] | None = None) -> UnitGraph:
    """The unit graph of an MLP given its weight matrices.

    Args:
        weights: ``[out, in]`` matrices in layer order; ``weights[k]`` must have as many columns as
            ``weights[k - 1]`` has rows. A nonzero entry ``W[j, i]`` is an edge from input ``i`` to unit ``j``.
        names: one name per weight matrix (default ``"0"``, ``"1"``, ...); the input layer is ``"input"``.

    Returns:
        A :class:`UnitGraph` with ``weights[0].shape[1]`` input units and the last layer's units as outputs.

    Raises:
        ValueError: no weights, a matrix that is not 2-D, mismatched sizes, or a wrong number of names.
    """
    if len(weights) == 0:
        raise ValueError("unit_graph_from_weights needs at least one [out, in] weight matrix, got none")
    arrays = [w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w) for w in weights]
    names = [str(index) for index in range(len(arrays))] if names is None else [str(n) for n in names]
    if len(names) != len(arrays):
        raise ValueError(f"got {len(names)} names for {len(arrays)} weight matrices; give one name per matrix")
    if "input" in names:
        raise ValueError("'input' is reserved for the input layer; choose other layer names")
    for index, array in enumerate(arrays):
        if array.ndim != 2:
            raise ValueError(f"weights[{index}] must be an [out, in] matrix, got shape {array.shape}")
        if index and array.shape[1] != arrays[index - 1].shape[0]:
            raise ValueError(f"weights[{index}] has {array.shape[1]} inputs but weights[{index - 1}] has "
                             f"{arrays[index - 1].shape[0]} outputs")
    sizes = [arrays[0].shape[1]] + [array.shape[0] for array in arrays]
    offsets = np.cumsum([0] + sizes)
    edges = []
    for index, array in enumerate(arrays):
        rows, cols = np.nonzero(array)
        edges.append((cols.astype(np.int64) + offsets[index], rows.astype(np.int64) + offsets[index + 1]))
    outputs = np.arange(offsets[-2], offsets[-1], dtype=np.int64)
    return _make_graph(sizes, ["input", *names], edges, outputs, [(k, k + 1) for k in range(len(arrays))])


# ------------------------------------------------------------------------------ tracing a model

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules whose output channel c depends only on input channel c (same channel count).
_CHANNEL_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Softmax, nn.LogSoftmax, nn.Threshold,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                  nn.ConstantPad2d, nn.ConstantPad3d, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
_CHANNEL_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish,
    F.hardtanh, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus,
    F.softmax, F.log_softmax, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm,
    F.normalize, torch.clamp, torch.clip, torch.abs, operator.neg, operator.pos, torch.neg, torch.exp,
    torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min,
}
_CHANNEL_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs", "neg", "exp",
    "contiguous", "clone", "detach", "float", "double", "half", "to", "type_as", "mean", "sum", "amax", "amin",
    "max", "min", "softmax", "log_softmax", "requires_grad_", "cpu", "cuda",
}
_UNION_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
}
_UNION_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "expand_as"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.transpose,
                    torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, F.pad,
                    torch.narrow, torch.movedim, operator.getitem, torch.channel_shuffle, F.pixel_shuffle,
                    F.pixel_unshuffle}
_SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "chunk", "split",
                  "narrow", "expand", "repeat", "view_as", "reshape_as", "unflatten", "movedim"}


class _Map:
    """Which units feed each row of a tensor: ``matrix`` is csr bool ``[rows, U]``.

    Normally ``rows`` is the tensor's channel count (dim 1), each row covering ``prod(shape[2:])``
    elements; the input of an MLP keeps one row per element (``rows == prod(shape[1:])``).
    """

    __slots__ = ("matrix",)

    def __init__(self, matrix: sp.csr_matrix):
        self.matrix = matrix


def _widen(matrix: sp.csr_matrix, columns: int) -> sp.csr_matrix:
    if matrix.shape[1] == columns:
        return matrix
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=(matrix.shape[0], columns))


def _bool_product(left: sp.csr_matrix, right: sp.csr_matrix) -> sp.csr_matrix:
    product = (left.astype(np.int32) @ right.astype(np.int32)).tocsr()
    product.data = np.ones(len(product.data), dtype=bool)
    return product


def _elements(value: torch.Tensor) -> int:
    return int(math.prod(value.shape[1:]))


class _Tracer(torch.fx.Interpreter):
    """Runs the traced model on the example inputs and propagates the unit maps alongside."""

    def __init__(self, traced: torch.fx.GraphModule, masks: dict[str, torch.Tensor], per_feature: bool,
                 model_name: str):
        super().__init__(traced)
        self.extra_traceback = False  # keep our errors one line
        self.masks = masks
        self.per_feature = per_feature
        self.model_name = model_name
        self.maps: dict[torch.fx.Node, Any] = {}
        self.sizes: list[int] = []
        self.names: list[str] = []
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.links: list[tuple[int, int]] = []  # (producer, consumer) layer indices, whatever the weights
        self.total = 0
        self.used_masks: set[str] = set()

    # -- helpers
    def fail(self, node: torch.fx.Node, reason: str) -> ValueError:
        return ValueError(f"unit_graph cannot follow node {node.name!r} ({node.op} {_target_name(node)}) of "
                          f"{self.model_name}: {reason}")

    def channel_rows(self, node: torch.fx.Node, value: torch.Tensor) -> sp.csr_matrix:
        """The node's map regrouped to one row per channel (dim 1)."""
        matrix = _widen(self.maps[node].matrix, self.total)
        if matrix.shape[0] == value.shape[1]:
            return matrix
        total = _elements(value)
        block = total // matrix.shape[0]
        per_channel = total // value.shape[1]
        element_rows = np.arange(total) // block
        channel = np.arange(total) // per_channel
        regroup = sp.csr_matrix((np.ones(total, dtype=bool), (channel, element_rows)),
                                shape=(value.shape[1], matrix.shape[0]))
        return _bool_product(regroup, matrix)

    def mapped_inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n in self.maps else None)
        return found

    # -- interpreter hook
    def run_node(self, node: torch.fx.Node) -> Any:
        try:
            value = super().run_node(node)
        except Exception as error:  # the model itself failed on the example inputs
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise self.fail(node, f"running it on the example inputs failed: {message}") from error
        if node.op == "placeholder":
            if not isinstance(value, torch.Tensor) or value.dim() < 2:
                raise self.fail(node, "the example input must be a tensor [batch, ...] with at least 2 dims")
            count = _elements(value) if self.per_feature else int(value.shape[1])
            self.sizes.append(count)
            self.names.append("input")
            self.total = count
            self.maps[node] = _Map(sp.identity(count, dtype=bool, format="csr"))
            return value
        if node.op in ("get_attr", "output"):
            return value
        inputs = self.mapped_inputs(node)
        if not inputs:
            return value  # constants and shape arithmetic carry no units
        result = self.propagate(node, value, inputs)
        if result is not None:
            self.maps[node] = result
        return value

    def propagate(self, node: torch.fx.Node, value: Any, inputs: list[torch.fx.Node]) -> Any:
        if not _holds_tensor(value):
            return None  # shapes, sizes, flags: no units
        if node.op == "call_module":
            module = self.fetch_attr(node.target)
            if isinstance(module, _WEIGHT_LAYERS):
                return self.weight_layer(node, module, value, inputs)
            if isinstance(module, _CHANNEL_MODULES):
                return self.keep(node, value, inputs[0])
            if isinstance(module, _SHAPE_MODULES):
                return self.shape_op(node, value)
            known = sorted({t.__name__ for t in _WEIGHT_LAYERS + _CHANNEL_MODULES + _SHAPE_MODULES})
            raise self.fail(node, f"leaf module type {type(module).__name__} is not understood; understood: "
                                  f"{', '.join(known)}")
        target = node.target
        if node.op == "call_function":
            if target is operator.getitem and not isinstance(self.env[node.args[0]], torch.Tensor):
                container = self.maps[node.args[0]]
                return container[node.args[1]] if isinstance(container, (list, tuple)) else None
            if target in _SHAPE_FUNCTIONS:
                return self.shape_op(node, value)
            if target in _UNION_FUNCTIONS:
                return self.union(node, value, inputs)
            if target in _CHANNEL_FUNCTIONS or _is_stochastic_depth(target):
                return self.keep(node, value, inputs[0])
        elif node.op == "call_method":
            if target in _SHAPE_METHODS:
                return self.shape_op(node, value)
            if target in _UNION_METHODS:
                return self.union(node, value, inputs)
            if target in _CHANNEL_METHODS:
                return self.keep(node, value, inputs[0])
        raise self.fail(node, "this operation is not understood (supported: weight layers Linear/Conv1d/2d/3d, "
                              "channel-wise ops, elementwise arithmetic, cat/flatten/view/reshape/getitem/pad)")

    def keep(self, node: torch.fx.Node, value: Any, source: torch.fx.Node) -> _Map:
        before = self.env[source]
        if not isinstance(value, torch.Tensor) or not isinstance(before, torch.Tensor):
            raise self.fail(node, "expected a tensor in and out")
        if value.shape == before.shape:
            return self.maps[source]
        if value.dim() < 2 or value.shape[0] != before.shape[0] or value.shape[1] != before.shape[1]:
            raise self.fail(node, f"shape {tuple(before.shape)} -> {tuple(value.shape)} does not keep the batch "
                                  "and channel dims")
        return _Map(self.channel_rows(source, before))

    def union(self, node: torch.fx.Node, value: Any, inputs: list[torch.fx.Node]) -> _Map:
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise self.fail(node, "elementwise arithmetic must give a tensor [batch, channels, ...]")
        same = [n for n in inputs if tuple(self.env[n].shape) == tuple(value.shape)]
        if len(same) == len(inputs) and len({self.maps[n].matrix.shape[0] for n in inputs}) == 1:
            matrices = [_widen(self.maps[n].matrix, self.total) for n in inputs]
        else:
            matrices = []
            for n in inputs:
                operand = self.env[n]
                if operand.dim() != value.dim():
                    raise self.fail(node, f"cannot broadcast operand of shape {tuple(operand.shape)} to "
                                          f"{tuple(value.shape)} along the channel dim")
                rows = self.channel_rows(n, operand)
                if operand.shape[1] == value.shape[1]:
                    matrices.append(rows)
                elif operand.shape[1] == 1:
                    matrices.append(_bool_product(sp.csr_matrix(np.ones((value.shape[1], 1), dtype=bool)), rows))
                else:
                    raise self.fail(node, f"channel dims {operand.shape[1]} and {value.shape[1]} do not broadcast")
        combined = matrices[0]
        for matrix in matrices[1:]:
            combined = combined + matrix
        return _Map(combined.tocsr())

    def shape_op(self, node: torch.fx.Node, value: Any) -> Any:
        """Replays the op on 'provenance' tensors whose elements hold (row index + 1) of their map."""
        offset = [0]
        stacked: list[sp.csr_matrix] = []

        def provenance(n: torch.fx.Node) -> Any:
            real = self.env[n]
            if n not in self.maps or not isinstance(real, torch.Tensor):
                return real
            matrix = _widen(self.maps[n].matrix, self.total)
            rows = matrix.shape[0]
            block = _elements(real) // rows
            ids = torch.arange(rows, dtype=torch.float64).repeat_interleave(block) + offset[0] + 1
            offset[0] += rows
            stacked.append(matrix)
            return ids.reshape(real.shape[1:]).unsqueeze(0).expand(real.shape).contiguous()

        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), provenance)
        if node.op == "call_module":
            replayed = self.fetch_attr(node.target)(*args, **kwargs)
        elif node.op == "call_method":
            replayed = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            replayed = node.target(*args, **kwargs)
        every = sp.vstack(stacked, format="csr") if len(stacked) > 1 else stacked[0]

        def to_map(ids: torch.Tensor, real: torch.Tensor) -> _Map:
            if ids.dim() < 2 or real.dim() < 2 or ids.shape[0] != real.shape[0]:
                raise self.fail(node, f"the result shape {tuple(real.shape)} does not keep the batch dim")
            channels = ids.shape[1]
            flat = ids.movedim(1, 0).reshape(channels, -1).to(torch.int64).numpy()
            rows = np.repeat(np.arange(channels), flat.shape[1])
            ids_flat = flat.reshape(-1)
            keep = ids_flat > 0
            pairs = np.unique(rows[keep] * (every.shape[0] + 1) + ids_flat[keep] - 1)
            regroup = sp.csr_matrix((np.ones(len(pairs), dtype=bool),
                                     (pairs // (every.shape[0] + 1), pairs % (every.shape[0] + 1))),
                                    shape=(channels, every.shape[0]))
            return _Map(_bool_product(regroup, every))

        if isinstance(replayed, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                raise self.fail(node, "expected a tensor result")
            return to_map(replayed, value)
        if isinstance(replayed, (tuple, list)):
            return [to_map(ids, real) if isinstance(ids, torch.Tensor) else None for ids, real in zip(replayed, value)]
        raise self.fail(node, "expected a tensor or a tuple of tensors")

    def weight_layer(self, node: torch.fx.Node, module: nn.Module, value: torch.Tensor,
                     inputs: list[torch.fx.Node]) -> _Map:
        name = str(node.target)
        if name in self.names:
            raise self.fail(node, f"module {name!r} is called more than once; shared weight layers are not supported")
        source = inputs[0]
        before = self.env[source]
        weight = module.weight.detach()
        mask = self.masks.get(name)
        if mask is not None:
            self.used_masks.add(name)
            if tuple(mask.shape) != tuple(weight.shape):
                raise self.fail(node, f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
            weight = weight * mask.to(device=weight.device, dtype=weight.dtype)
        if isinstance(module, nn.Linear):
            if before.dim() != 2:
                raise self.fail(node, f"Linear on a {before.dim()}-D input {tuple(before.shape)} is not supported "
                                      "(flatten to [batch, features] first)")
            nonzero = weight != 0
            groups = 1
        else:
            nonzero = weight.reshape(weight.shape[0], weight.shape[1], -1).ne(0).any(dim=2)
            groups = int(module.groups)
        rows = self.channel_rows(source, before)
        out_units, per_group = nonzero.shape
        out_idx, in_idx = (t.cpu().numpy() for t in torch.nonzero(nonzero, as_tuple=True))
        # Grouped convs: output j only reads the input channels of its own group.
        in_idx = in_idx + (out_idx // (out_units // groups)) * per_group
        if rows.shape[0] != per_group * groups:
            raise self.fail(node, f"layer reads {per_group * groups} channels but its input has {rows.shape[0]}")
        pattern = sp.csr_matrix((np.ones(len(out_idx), dtype=bool), (out_idx, in_idx)),
                                shape=(out_units, rows.shape[0]))
        reached = _bool_product(pattern, rows).tocoo()
        # the layers that feed this one through its input channels (a structural fact, kept even
        # when every weight between them is pruned)
        layer_starts = np.cumsum([0] + self.sizes)
        feeding = np.unique(np.searchsorted(layer_starts, np.unique(rows.indices), side="right") - 1)
        self.links += [(int(producer), len(self.sizes)) for producer in feeding]
        first = self.total
        self.edges.append((reached.col.astype(np.int64), reached.row.astype(np.int64) + first))
        self.sizes.append(out_units)
        self.names.append(name)
        self.total += out_units
        identity = sp.csr_matrix((np.ones(out_units, dtype=bool), (np.arange(out_units), np.arange(out_units) + first)),
                                 shape=(out_units, self.total))
        return _Map(identity)


def _is_stochastic_depth(target: Any) -> bool:
    """torchvision's stochastic depth (EfficientNet, ConvNeXt): the identity in eval mode."""
    return getattr(target, "__name__", "") == "stochastic_depth" and \
        getattr(target, "__module__", "").startswith("torchvision")


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(item, torch.Tensor) for item in value)


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _first_weight_layer(traced: torch.fx.GraphModule) -> nn.Module | None:
    for node in traced.graph.nodes:
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            if isinstance(module, _WEIGHT_LAYERS):
                return module
    return None


def _normalise_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Masks keyed by weight-layer module name; accepts parameter names ("fc1.weight"), module names
    ("fc1") and both with the "model." prefix a GrowPruneModule's parameters carry."""
    if not masks:
        return {}
    layers = {name for name, module in model.named_modules() if isinstance(module, _WEIGHT_LAYERS)}
    result: dict[str, torch.Tensor] = {}
    def layer_name(name: str) -> str:
        return name[len("model."):] if name not in layers and name.startswith("model.") else name

    for key, mask in masks.items():
        if key.endswith(".bias") and layer_name(key[:-len(".bias")]) in layers:
            continue  # bias masks do not change which units are connected
        name = layer_name(key[:-len(".weight")] if key.endswith(".weight") else key)
        if name not in layers:
            raise ValueError(f"mask {key!r} names no weight layer of the model; valid names: "
                             f"{', '.join(sorted(f'{n}.weight' for n in layers))}")
        result[name] = torch.as_tensor(mask)
    return result


def unit_graph(model: nn.Module, example_inputs: torch.Tensor,
               masks: dict[str, torch.Tensor] | None = None) -> UnitGraph:
    """The unit graph of a model: units are the input units and every weight layer's outputs.

    Weight layers are ``nn.Linear`` (unit = output neuron) and ``nn.Conv1d/2d/3d`` (unit = output
    channel; grouped and depthwise convolutions connect only within their groups). Input units are
    one per input channel, except when the first weight layer is a ``Linear`` reading the flattened
    input directly (an MLP such as LeNet-300-100): then one per input feature (784 for 1x28x28).
    An edge ``u -> v`` exists when ``v``'s weights towards a channel carrying ``u`` have any nonzero
    element (after multiplying by the mask, when given). Units whose fan-in is all zero stay in the
    graph without in-edges; a structurally pruned model simply gives a smaller graph. Biases are
    ignored.

    The model is traced with ``torch.fx.symbolic_trace`` and run once on ``example_inputs`` (in eval
    mode, without gradients; the model's mode is restored) so that every op sees concrete shapes.

    Args:
        model: an ``nn.Module`` that ``torch.fx`` can trace, or a ``GrowPruneModule`` (its ``model`` is
            traced and its ``masks`` are used unless ``masks`` is given).
        example_inputs: a batch ``[N, C, ...]`` (or ``[N, features]``) the model accepts; one sample is enough.
        masks: optional 0/1 masks keyed by parameter name (``"fc1.weight"``, also with a ``"model."``
            prefix as in ``GrowPruneModule.masks``) or module name (``"fc1"``); bias masks are ignored.

    Returns:
        The :class:`UnitGraph`; ``layers`` are ``"input"`` then the weight layers' module names in
        execution order, ``outputs`` the units the model's output tensor(s) read.

    Raises:
        ValueError: the model cannot be traced, uses a leaf module or op that is not understood, calls
            a weight layer twice, or a mask names no weight layer or has the wrong shape.
    """
    if hasattr(model, "masks") and isinstance(getattr(model, "model", None), nn.Module):
        if masks is None:
            masks = dict(model.masks)
        model = model.model
    model_name = type(model).__name__
    if not isinstance(example_inputs, torch.Tensor):
        raise ValueError(f"example_inputs must be a tensor [batch, ...], got {type(example_inputs).__name__}")
    named_masks = _normalise_masks(model, masks)
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"unit_graph cannot trace {model_name} with torch.fx.symbolic_trace: {message}") from error
    first = _first_weight_layer(traced)
    if first is None:
        raise ValueError(f"{model_name} has no weight layer (Linear/Conv1d/Conv2d/Conv3d)")
    per_feature = isinstance(first, nn.Linear)
    interpreter = _Tracer(traced, named_masks, per_feature, model_name)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = interpreter.run(example_inputs)
    finally:
        model.train(was_training)
    output_node = next(n for n in traced.graph.nodes if n.op == "output")
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(output_node.args, lambda n: found.append(n) if n in interpreter.maps else None)
    columns = []
    for n in found:
        entry = interpreter.maps[n]
        for item in (entry if isinstance(entry, (list, tuple)) else [entry]):
            if item is not None:
                columns.append(item.matrix.indices)
    del output
    outputs = np.unique(np.concatenate(columns)).astype(np.int64) if columns else np.zeros(0, dtype=np.int64)
    return _make_graph(interpreter.sizes, interpreter.names, interpreter.edges, outputs, interpreter.links)


# ---------------------------------------------------------------------------------------- measures


def _edges_by_target_layer(graph: UnitGraph) -> list[np.ndarray]:
    if "by_target_layer" not in graph._cache:
        layer = graph.layer_of[graph.targets]
        order = np.argsort(layer, kind="stable")
        bounds = np.searchsorted(layer[order], np.arange(len(graph.layers) + 1))
        graph._cache["by_target_layer"] = [order[bounds[k]:bounds[k + 1]] for k in range(len(graph.layers))]
    return graph._cache["by_target_layer"]


def _reach(graph: UnitGraph) -> tuple[np.ndarray, np.ndarray]:
    """(reachable from any input, reaches any output), bool ``[num_units]`` each; one pass per direction
    over the layers in topological order."""
    if "reach" in graph._cache:
        return graph._cache["reach"]
    groups = _edges_by_target_layer(graph)
    forward = np.zeros(graph.num_units, dtype=bool)
    forward[graph.inputs] = True
    for chosen in groups:
        if len(chosen):
            live = chosen[forward[graph.sources[chosen]]]
            forward[graph.targets[live]] = True
    backward = np.zeros(graph.num_units, dtype=bool)
    backward[graph.outputs] = True
    for chosen in reversed(groups):
        if len(chosen):
            live = chosen[backward[graph.targets[chosen]]]
            backward[graph.sources[live]] = True
    graph._cache["reach"] = (forward, backward)
    return forward, backward


# Below this many units the path searches use dense matrices: scipy.sparse's per-call overhead
# dominates on small graphs such as control policies (about 40 units).
_DENSE_UNITS = 512


def _dense_distances(graph: UnitGraph, starts: np.ndarray, backward: bool) -> np.ndarray:
    step = np.zeros((graph.num_units, graph.num_units), dtype=np.float32)
    if backward:
        step[graph.targets, graph.sources] = 1.0
    else:
        step[graph.sources, graph.targets] = 1.0
    count = len(starts)
    distance = np.full((count, graph.num_units), np.inf)
    frontier = np.zeros((count, graph.num_units), dtype=np.float32)
    frontier[np.arange(count), starts] = 1.0
    distance[np.arange(count), starts] = 0
    level = 0
    while frontier.any():
        level += 1
        fresh = ((frontier @ step) > 0) & np.isinf(distance)
        distance[fresh] = level
        frontier = fresh.astype(np.float32)
    return distance


def _distances(graph: UnitGraph) -> np.ndarray:
    """Shortest path lengths (edges) from every input unit to every output unit, float ``[inputs, outputs]``
    with ``inf`` for unconnected pairs; breadth-first search from the smaller of the two sides with a
    sparse frontier matrix (one row per search), so each step only touches the frontier's edges."""
    if "distances" in graph._cache:
        return graph._cache["distances"]
    backward = len(graph.outputs) < len(graph.inputs)
    starts, ends = (graph.outputs, graph.inputs) if backward else (graph.inputs, graph.outputs)
    if graph.num_units <= _DENSE_UNITS:
        result = _dense_distances(graph, starts, backward)[:, ends]
        result = result.T if backward else result
        graph._cache["distances"] = result
        return result
    adjacency = graph.adjacency()
    step_matrix = (adjacency.T.tocsr() if backward else adjacency).astype(np.int32)
    count = len(starts)
    distance = np.full((count, graph.num_units), np.inf)
    distance[np.arange(count), starts] = 0
    frontier = sp.csr_matrix((np.ones(count, dtype=np.int32), (np.arange(count), starts)),
                             shape=(count, graph.num_units))
    level = 0
    while frontier.nnz:
        level += 1
        reached = (frontier @ step_matrix).tocoo()
        fresh = np.isinf(distance[reached.row, reached.col])
        rows, cols = reached.row[fresh], reached.col[fresh]
        distance[rows, cols] = level
        frontier = sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(count, graph.num_units))
    result = distance[:, ends]
    result = result.T if backward else result
    graph._cache["distances"] = result
    return result


def _undirected_networkx(graph: UnitGraph) -> "nx.Graph":
    """A private undirected networkx graph of ``graph`` (cached), filled through the adjacency dicts:
    about 2x faster than ``add_edges_from`` and safe because the unit graph has no self-loops or
    duplicate edges; each edge still gets its own (empty) attribute dict as networkx expects."""
    import networkx as nx

    if "networkx_undirected" not in graph._cache:
        undirected = nx.Graph()
        undirected.add_nodes_from(range(graph.num_units))
        adjacency = undirected._adj
        for u, v in zip(graph.sources.tolist(), graph.targets.tolist()):
            adjacency[u][v] = adjacency[v][u] = {}
        graph._cache["networkx_undirected"] = undirected
    return graph._cache["networkx_undirected"]


def partition_modularity(graph: UnitGraph, communities: Sequence[Sequence[int]] | Sequence[set[int]],
                         resolution: float = 1.0) -> float:
    """Newman modularity of a partition of the units on the undirected, unweighted graph:
    ``sum_c [L_c / m - resolution * (d_c / 2m)^2]`` (``L_c`` edges inside community ``c``, ``d_c`` its
    degree sum). The same quantity as ``networkx.community.modularity``, computed with numpy.

    Returns:
        The modularity; NaN for a graph without edges.

    Raises:
        ValueError: the communities do not partition ``0 .. num_units - 1``.
    """
    if graph.num_edges == 0:
        return float("nan")
    label = np.full(graph.num_units, -1, dtype=np.int64)
    for index, members in enumerate(communities):
        members = np.fromiter(members, dtype=np.int64)
        if len(members) and (members.min() < 0 or members.max() >= graph.num_units or (label[members] >= 0).any()):
            raise ValueError("communities must be disjoint sets of unit ids in [0, num_units)")
        label[members] = index
    if (label < 0).any():
        raise ValueError("communities must cover every unit")
    m = graph.num_edges
    inside = np.bincount(label[graph.sources][label[graph.sources] == label[graph.targets]],
                         minlength=len(communities))
    degree_sum = np.bincount(label, weights=graph.degrees(), minlength=len(communities))
    return float((inside / m - resolution * (degree_sum / (2.0 * m)) ** 2).sum())


def twin_classes(graph: UnitGraph) -> np.ndarray:
    """Structural-equivalence classes of the undirected graph: units with exactly the same set of
    neighbours ("twins", e.g. all channels of a dense conv layer) share a class label.

    Twins are never adjacent (a unit is not its own neighbour), so collapsing each class into one node
    whose edges to another class weigh the number of original edges keeps every twin-respecting
    partition's modularity exactly. Isolated units form one class.

    Returns:
        int64 ``[num_units]``: the class of every unit, numbered by first appearance.
    """
    undirected = (graph.adjacency() + graph.adjacency().T).tocsr()
    undirected.sort_indices()
    indptr, indices = undirected.indptr, undirected.indices.astype(np.int64)
    label = np.empty(graph.num_units, dtype=np.int64)
    seen: dict[bytes, int] = {}
    for unit in range(graph.num_units):
        key = indices[indptr[unit]:indptr[unit + 1]].tobytes()  # exact neighbour set: no hash collisions
        label[unit] = seen.setdefault(key, len(seen))
    return label


def _twin_quotient(graph: UnitGraph, label: np.ndarray) -> "nx.Graph":
    """The weighted networkx graph of the twin classes (edge weight = original edges between them)."""
    import networkx as nx

    classes = int(label.max()) + 1 if len(label) else 0
    left, right = label[graph.sources], label[graph.targets]
    low, high = np.minimum(left, right), np.maximum(left, right)
    pairs, weight = np.unique(low * classes + high, return_counts=True)
    quotient = nx.Graph()
    quotient.add_nodes_from(range(classes))
    quotient.add_weighted_edges_from(zip((pairs // classes).tolist(), (pairs % classes).tolist(), weight.tolist()))
    return quotient


def louvain_modularity(graph: UnitGraph, seed: int = 0, resolution: float = 1.0, threshold: float = 1e-7,
                       max_level: int | None = None, merge_twins: bool = True) -> float:
    """Modularity of the Louvain communities of the undirected graph.

    The communities come from ``networkx.community.louvain_communities(G, seed=seed, resolution=...,
    threshold=..., max_level=...)`` (networkx's own implementation); their modularity is computed
    by :func:`partition_modularity` (equal to ``networkx.community.modularity``, faster).

    With ``merge_twins`` (the default), Louvain runs on the graph of :func:`twin_classes`: units with
    identical neighbour sets become one weighted node, so Louvain only considers partitions that keep
    twins together, and the modularity reported is that partition's exact modularity on the full
    graph. This is what makes dense networks affordable: the dense VGG-16-BN channel graph (1.64M
    edges) collapses to one node per layer and takes well under a second, where networkx on the
    full graph took 28-62 s (one core of a busy 2-core machine, benchmarks/graph_measures.py). A graph
    without twins (e.g. random weight masks) is unchanged by the merge and costs what networkx costs on
    it: about 9 ms on an 8-16-16-4 policy graph (448 edges), 1 s on ResNet-20 (73k edges), 0.8 s on a
    90 %-masked LeNet-300-100 (26k edges), 21 s on a 90 %-masked VGG-16-BN (1.0M edges).
    ``merge_twins=False`` runs networkx on the full graph; the two may find different partitions
    (plain Louvain can split twins) and so differ slightly.

    Args:
        graph: the unit graph.
        seed: Louvain's node-order seed.
        resolution, threshold, max_level: passed to ``louvain_communities``.
        merge_twins: run Louvain on the twin-class graph (see above).

    Returns:
        The modularity; NaN for a graph without edges.
    """
    import networkx as nx

    if graph.num_edges == 0:
        return float("nan")
    if not merge_twins:
        communities = nx.community.louvain_communities(_undirected_networkx(graph), seed=seed, resolution=resolution,
                                                       threshold=threshold, max_level=max_level)
        return partition_modularity(graph, communities, resolution)
    label = twin_classes(graph)
    groups = nx.community.louvain_communities(_twin_quotient(graph, label), weight="weight", seed=seed,
                                              resolution=resolution, threshold=threshold, max_level=max_level)
    community_of_class = np.empty(int(label.max()) + 1, dtype=np.int64)
    for index, members in enumerate(groups):
        community_of_class[list(members)] = index
    unit_community = community_of_class[label]
    communities = [np.flatnonzero(unit_community == index) for index in range(len(groups))]
    return partition_modularity(graph, communities, resolution)


def _modularity(graph: UnitGraph, seed: int) -> float:
    """Louvain modularity with networkx's default parameters (see :func:`louvain_modularity`)."""
    return louvain_modularity(graph, seed)


def _assortativity(graph: UnitGraph, seed: int) -> float:
    """Degree assortativity of the undirected graph: Pearson correlation of the degrees at the two ends
    of each edge, both orientations counted (equals networkx ``degree_assortativity_coefficient``);
    NaN when undefined (no edges, or every endpoint has the same degree)."""
    if graph.num_edges == 0:
        return float("nan")
    degree = graph.degrees().astype(np.float64)
    a, b = degree[graph.sources], degree[graph.targets]
    x, y = np.concatenate([a, b]), np.concatenate([b, a])
    x = x - x.mean()
    y = y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denominator) if denominator > 0 else float("nan")


def _density(graph: UnitGraph, seed: int) -> float:
    """Undirected density ``2 E / (n (n - 1))`` (networkx ``density`` of the undirected graph)."""
    n = graph.num_units
    return 2.0 * graph.num_edges / (n * (n - 1)) if n > 1 else 0.0


def _mean_degree(graph: UnitGraph, seed: int) -> float:
    """Mean undirected degree ``2 E / n``."""
    return 2.0 * graph.num_edges / graph.num_units if graph.num_units else 0.0


def _max_degree(graph: UnitGraph, seed: int) -> float:
    """Largest undirected degree."""
    return float(graph.degrees().max()) if graph.num_units else 0.0


def _depth(graph: UnitGraph, seed: int) -> float:
    """Longest input -> output path, in edges (0 when no output is reachable)."""
    if "depth" not in graph._cache:
        longest = np.full(graph.num_units, -1, dtype=np.int64)
        longest[graph.inputs] = 0
        for chosen in _edges_by_target_layer(graph):
            if len(chosen):
                live = chosen[longest[graph.sources[chosen]] >= 0]
                np.maximum.at(longest, graph.targets[live], longest[graph.sources[live]] + 1)
        reached = longest[graph.outputs]
        graph._cache["depth"] = float(reached.max()) if len(reached) and reached.max() >= 0 else 0.0
    return graph._cache["depth"]


def _mean_path_length(graph: UnitGraph, seed: int) -> float:
    """Mean shortest input -> output path length (edges) over connected (input, output) pairs; NaN if none."""
    distance = _distances(graph)
    finite = distance[np.isfinite(distance)]
    return float(finite.mean()) if len(finite) else float("nan")


def _connectivity(graph: UnitGraph, seed: int) -> float:
    """Fraction of (input, output) unit pairs joined by a directed path."""
    distance = _distances(graph)
    return float(np.isfinite(distance).mean()) if distance.size else 0.0


def _dead_fraction(graph: UnitGraph, seed: int) -> float:
    """Fraction of hidden units (neither input nor output) on no input -> output path (0 without hidden units)."""
    forward, backward = _reach(graph)
    hidden = np.ones(graph.num_units, dtype=bool)
    hidden[graph.inputs] = False
    hidden[graph.outputs] = False
    count = int(hidden.sum())
    return float((~(forward & backward) & hidden).sum() / count) if count else 0.0


def _side_clustering(biadjacency: np.ndarray, chunk_entries: int = 1 << 22) -> np.ndarray:
    """Latapy "dot" clustering of each row node of a dense 0/1 ``[rows, cols]`` float32 biadjacency:
    mean over its second neighbours ``v`` of ``|N(u) & N(v)| / |N(u) | N(v)|``; 0 without second neighbours."""
    rows = biadjacency.shape[0]
    degree = biadjacency.sum(axis=1)
    result = np.zeros(rows, dtype=np.float64)
    chunk = max(1, chunk_entries // max(rows, 1))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        common = (biadjacency[start:stop] @ biadjacency.T).astype(np.float64)  # shared neighbours, exact in float32
        common[np.arange(stop - start), np.arange(start, stop)] = 0  # a node is not its own second neighbour
        union = degree[start:stop, None] + degree[None, :] - common
        second = common > 0
        ratio = np.divide(common, union, out=np.zeros_like(common), where=second)
        counts = second.sum(axis=1)
        result[start:stop] = np.divide(ratio.sum(axis=1), counts, out=np.zeros(stop - start), where=counts > 0)
    return result


def _bipartite_clustering(graph: UnitGraph, seed: int) -> float:
    """Mean over layer pairs (:meth:`UnitGraph.layer_pairs`: a fully pruned pair counts, as 0) of the
    pair's average bipartite clustering (Latapy, mode "dot", over all units of both layers; equals
    networkx ``bipartite.average_clustering``); NaN without layer pairs."""
    pairs = graph.layer_pairs()
    if not pairs:
        return float("nan")
    values = []
    for pair in pairs:
        dense = pair.biadjacency.toarray().astype(np.float32)
        total = _side_clustering(dense).sum() + _side_clustering(np.ascontiguousarray(dense.T)).sum()
        values.append(total / (dense.shape[0] + dense.shape[1]))
    return float(np.mean(values))


def _bipartite_density(graph: UnitGraph, seed: int) -> float:
    """Mean over layer pairs (:meth:`UnitGraph.layer_pairs`: a fully pruned pair counts, as 0) of
    ``edges / (producer units x consumer units)``; NaN without layer pairs."""
    pairs = graph.layer_pairs()
    if not pairs:
        return float("nan")
    return float(np.mean([p.biadjacency.nnz / (p.biadjacency.shape[0] * p.biadjacency.shape[1]) for p in pairs]))


MEASURES: dict[str, Callable[[UnitGraph, int], float]] = {
    "modularity": _modularity,
    "assortativity": _assortativity,
    "density": _density,
    "mean_degree": _mean_degree,
    "max_degree": _max_degree,
    "depth": _depth,
    "mean_path_length": _mean_path_length,
    "connectivity": _connectivity,
    "bipartite_clustering": _bipartite_clustering,
    "bipartite_density": _bipartite_density,
    "dead_fraction": _dead_fraction,
    "num_edges": lambda graph, seed: float(graph.num_edges),
    "num_units": lambda graph, seed: float(graph.num_units),
}
"""Measure name -> ``measure(graph, seed) -> float``. Only ``"modularity"`` uses the seed (Louvain).
Degree-based measures, density and modularity use the undirected graph; path measures the directed one."""


def graph_measures(graph: UnitGraph, names: Sequence[str] | None = None, seed: int = 0) -> dict[str, float]:
    """Compute several :data:`MEASURES` of one graph (intermediate results are shared through the graph's cache).

    Args:
        graph: the unit graph.
        names: measure names (default: all, in :data:`MEASURES` order).
        seed: seed of the randomised measures (Louvain modularity).

    Returns:
        ``{name: value}`` in the order of ``names``; undefined values are NaN (see each measure).

    Raises:
        ValueError: an unknown measure name (before anything is computed).
    """
    chosen = list(MEASURES) if names is None else list(names)
    unknown = [name for name in chosen if name not in MEASURES]
    if unknown:
        raise ValueError(f"unknown graph measure(s) {', '.join(map(repr, unknown))}; valid: {', '.join(MEASURES)}")
    return {name: float(MEASURES[name](graph, seed)) for name in chosen}
