"""The unit-level graph of a network: where the units (neurons, channels) of each weight layer go.

A *unit* is one output feature of a linear layer or one output channel of a convolution. A *unit
link* ``producer -> consumer`` says that unit ``j`` of the producer reaches exactly one weight
layer, the consumer, and only its input units ``j * block ... (j + 1) * block - 1`` (features of a
linear consumer, channels of a conv consumer), through ops that never mix units. Growth (where a
new unit's fan-out goes), NNrelief's dead-unit removal (which inputs of the consumer a removed unit
feeds) and network-science descriptors (the bipartite graph between two layers) all need this
map; :class:`UnitGraph` builds it once, next to the channel groups of
:class:`~growprune.surgery.channels.ChannelGraph` (which say what must change *together*, not
where a unit's signal goes).

Links are found with ``torch.fx`` (weight layers as leaves) and a shape check on a real batch, and
only accepted along a single chain of ops that keep units apart:

* element-wise activations and dropout (``nn.ReLU``, ``F.relu``, ``x.relu()``, ``nn.GELU``,
  ``nn.Dropout``, ... and ``contiguous``/``clone``): they never mix units;
* per-channel batch / instance norm, PReLU and pooling, when the units are the channels (dim 1):
  channel ``c`` of the output depends on channel ``c`` of the input only;
* one flatten from ``(N, C, *S)`` to ``(N, C * prod(S))`` (``nn.Flatten``, ``torch.flatten``,
  ``view``/``reshape``): channel ``c`` then owns features ``c * prod(S) ... (c + 1) * prod(S) - 1``
  of the next linear layer, so ``block = prod(S)``.

Linear->Linear, Conv->Conv and Conv->Flatten->Linear chains (LeNets, VGG) are linked. Everything
else is refused, with the reason, because a guessed link would remove or grow the wrong inputs:
an output that also goes elsewhere (a residual add, a concatenation, a second branch), an op not
listed above (it may mix units), a layer that runs more than once per forward pass or whose
parameters are used outside its own forward, and a model ``torch.fx`` cannot trace. Links that are
proven (e.g. ``conv1 -> conv2`` inside a residual block) are still reported, so residual nets get
unit-level edits where they are safe and nowhere else.

Where a chain stops, the last node that still holds the producer's units apart is its
:class:`UnitEnd`: the input of the consumer when there is a link, else the last unit-preserving op
before the add / concatenation / output. That is where the network actually sees a unit (after
batch norm, activation, dropout and pooling), so activity-based criteria measure it there.

:func:`forward_order` gives the layers in the order a forward pass runs them, and how often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from growprune.modes import evaluating
from growprune.surgery.masks import weight_layers

__all__ = [
    "LinkReport",
    "UnitEnd",
    "UnitGraph",
    "UnitLink",
    "UnitTraceError",
    "execution_order",
    "forward_order",
    "is_unit_layer",
    "trace_unit_links",
    "unit_layers",
]

# ------------------------------------------------------------------------ unit-preserving ops
# element-wise: output unit j depends on input unit j only, whatever the layout
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
# per channel: output channel c depends on input channel c only (units must be the channels, dim 1)
_CHANNEL_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.PReLU,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
}
_CHANNEL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
# uses of a tensor that read its metadata only (not its values): they do not branch the chain
_METADATA_METHODS = {"size", "dim", "numel"}


def is_unit_layer(module: nn.Module) -> bool:
    """A layer with units: ``nn.Linear`` or a forward (not transposed) convolution of any dimensionality."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def unit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` with units (see :func:`is_unit_layer`), by name, in definition order."""
    return {name: module for name, module in model.named_modules() if is_unit_layer(module)}


# ------------------------------------------------------------------------------- forward order
def forward_order(
    model: nn.Module, example_inputs: torch.Tensor, layers: Mapping[str, nn.Module] | None = None
) -> tuple[list[str], dict[str, int]]:
    """Layers in the order a forward pass on ``example_inputs`` first runs them, and how often each runs.

    Args:
        model: the network (run once in eval mode without gradients; its modes are restored).
        example_inputs: an input batch (one or two samples are enough).
        layers: name -> module of ``model`` to follow. Default: every layer with units
            (:func:`is_unit_layer`); those that never run are left out.

    Returns:
        ``(order, call_counts)``: names by first call, and name -> number of calls (>= 1).

    Raises:
        ValueError: a layer given in ``layers`` never runs (nothing could be measured on it).
    """
    explicit = layers is not None
    layers = dict(layers) if layers is not None else unit_layers(model)
    counts = {name: 0 for name in layers}
    order: list[str] = []

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def record(module: nn.Module, args: tuple) -> None:
            if counts[name] == 0:
                order.append(name)
            counts[name] += 1

        return record

    # pre-hooks: a layer's place is where it starts (what matters when layers are nested)
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with evaluating(model):
            model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if counts[name] == 0]
    if explicit and missing:
        raise ValueError(
            f"layer(s) {', '.join(map(repr, missing))} never ran in the model's forward pass, so nothing can "
            "be measured on them: leave them out of the selected layers (e.g. skip=[...])"
        )
    return order, {name: counts[name] for name in order}


def execution_order(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Names of the layers with units (linear and conv layers) in the order a forward pass calls them."""
    return forward_order(model, example_inputs)[0]


# ---------------------------------------------------------------------------------- unit graph
@dataclass(frozen=True)
class UnitLink:
    """Producer layer -> the weight layer that consumes its units: unit ``j`` of the producer
    feeds the consumer's input units ``j * block ... (j + 1) * block - 1`` (features of a linear
    consumer, channels of a conv consumer) and nothing else."""

    consumer: str
    block: int = 1


@dataclass
class LinkReport:
    """Result of :func:`trace_unit_links`.

    Attributes:
        links: producer name -> :class:`UnitLink`.
        final: layers whose output reaches no other weight layer (the output layers).
        unlinked: layer name -> why no link could be established.
    """

    links: dict[str, UnitLink] = field(default_factory=dict)
    final: set[str] = field(default_factory=set)
    unlinked: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UnitEnd:
    """The last point of a layer's chain where its units are still apart: the output of the traced
    node named ``node``. Unit ``j`` is index ``j`` along dimension ``dim`` or, after a flatten
    (``block > 1``, ``dim == 1``), features ``j * block ... (j + 1) * block - 1``."""

    node: str
    dim: int
    block: int = 1

    def per_unit(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (the node's output) as ``(units, everything else)``: row ``j`` holds every
        entry of unit ``j`` over the batch and positions."""
        if self.block > 1:
            value = value.reshape(value.shape[0], -1, self.block)  # (N, units, block)
        return value.movedim(self.dim, 0).reshape(value.shape[self.dim], -1)


class UnitTraceError(ValueError):
    """``torch.fx`` could not trace the model, or the traced graph could not run the example."""


class _Tracer(torch.fx.Tracer):
    """Keeps the weight layers as leaves (one ``call_module`` node per call, never traced through)."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return id(module) in self.leaves or super().is_leaf_module(module, qualified_name)


class _Recorder(torch.fx.Interpreter):
    """Runs the traced graph and hands the outputs of the watched nodes to ``record``."""

    def __init__(self, module: torch.fx.GraphModule, nodes: set[str], record: Callable[[str, Any], None]):
        super().__init__(module)
        self.nodes = nodes
        self.record = record

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.nodes:
            self.record(node.name, value)
        return value


class UnitGraph:
    """The ``torch.fx`` graph of ``model`` with its weight layers as leaves and the tensor shapes of
    ``example_inputs``, and, per weight layer, where its units go (see the module docstring).

    The model is traced and run in eval mode without gradients, its modes restored; nothing of it
    changes. The traced graph calls the model's own layer objects, so it sees later weight changes,
    but not surgery that replaces or resizes layers: build a new graph then.

    Args:
        model: the network.
        example_inputs: a small input batch (two samples are enough).

    Raises:
        UnitTraceError: ``torch.fx`` cannot trace the model or run the example through the trace.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor):
        self.model = model
        self.layers = weight_layers(model)
        try:
            with evaluating(model):
                graph = _Tracer({id(module) for module in self.layers.values()}).trace(model)
                self.module = torch.fx.GraphModule(model, graph)
                ShapeProp(self.module).propagate(example_inputs)
        except Exception as error:  # any model torch.fx cannot trace or run: no graph, never a guess
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise UnitTraceError(f"torch.fx could not trace the model ({type(error).__name__}: {first_line})") from error
        self._modules = dict(self.module.named_modules())
        self.calls: dict[str, list[torch.fx.Node]] = {name: [] for name in self.layers}
        self._direct_uses: set[str] = set()
        for node in self.module.graph.nodes:
            if node.op == "call_module" and node.target in self.calls:
                self.calls[node.target].append(node)
            elif node.op == "get_attr":
                owner = str(node.target).rpartition(".")[0]
                if owner in self.layers:
                    self._direct_uses.add(owner)
        self._weight_nodes = {node for nodes in self.calls.values() for node in nodes}

    # ------------------------------------------------------------------------------- queries
    def problem(self, name: str) -> str | None:
        """Why layer ``name`` cannot take part in a link (``None`` when it can)."""
        if name in self._direct_uses:
            return f"the parameters of {name!r} are used outside its forward"
        count = len(self.calls.get(name, []))
        if count != 1:
            return f"{name!r} runs {count} times per forward pass"
        return None

    def report(self, names: Sequence[str] | None = None) -> LinkReport:
        """Links (or why none) for the weight layers in ``names`` (default: all); see :func:`trace_unit_links`."""
        report = LinkReport()
        for name in list(self.layers) if names is None else list(names):
            reason = self.problem(name)
            if reason is not None:
                report.unlinked[name] = reason
                continue
            producer = self.calls[name][0]
            if not self._reaches_weight_layer(producer):
                report.final.add(name)
                continue
            outcome, _ = self._follow(producer, self.layers[name])
            if isinstance(outcome, str):
                report.unlinked[name] = outcome
                continue
            consumer_problem = self.problem(outcome.consumer)
            if consumer_problem is not None:
                report.unlinked[name] = f"its consumer is not usable: {consumer_problem}"
                continue
            report.links[name] = outcome
        return report

    def ends(self, name: str) -> list[UnitEnd]:
        """Where the units of layer ``name`` are last seen apart, one :class:`UnitEnd` per call of the
        layer (empty when it never runs as a module call or its output shape is unknown)."""
        ends = []
        for producer in self.calls.get(name, []):
            _, end = self._follow(producer, self.layers[name])
            if end is not None:
                ends.append(end)
        return ends

    def run(self, inputs: torch.Tensor, nodes: Iterable[str], record: Callable[[str, Any], None]) -> Any:
        """Run the traced graph on ``inputs`` in eval mode without gradients (modes restored) and call
        ``record(node name, output)`` for each node named in ``nodes``; returns the graph's output."""
        with evaluating(self.model):
            return _Recorder(self.module, set(nodes), record).run(inputs)

    # ------------------------------------------------------------------------------- walking
    def _reaches_weight_layer(self, start: torch.fx.Node) -> bool:
        seen, stack = set(), list(start.users)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in self._weight_nodes:
                return True
            stack.extend(node.users)
        return False

    def _follow(self, producer: torch.fx.Node, producer_layer: nn.Module) -> tuple[UnitLink | str, UnitEnd | None]:
        """Walk from the producer's output along unit-preserving ops: a link (or the reason there is
        none), and the last node where the units are still apart."""
        shape = _shape(producer)
        if shape is None or len(shape) < 2:
            return "its output shape is unknown", None
        unit_dim = len(shape) - 1 if isinstance(producer_layer, nn.Linear) else 1
        units, block = shape[unit_dim], 1
        node = producer
        while True:
            end = UnitEnd(node.name, unit_dim, block)
            users = [user for user in node.users if not _is_metadata_use(user)]
            if len(users) != 1:
                return f"its output feeds {len(users)} operations (not a single chain)", end
            user = users[0]
            if not user.args or user.args[0] is not node:
                return f"its output is not the main input of {self._describe(user)}", end
            in_shape, out_shape = _shape(node), _shape(user)
            if in_shape is None:
                return f"the input shape of {self._describe(user)} is unknown", end
            if user.op == "call_module" and user.target in self.layers:
                consumer = self.layers[user.target]
                if _other_nodes(user, node):
                    return f"{user.target} takes other inputs too", end
                if isinstance(consumer, nn.Linear):
                    if unit_dim == len(in_shape) - 1 and units * block == consumer.in_features:
                        return UnitLink(str(user.target), block), end
                elif is_unit_layer(consumer):  # a forward conv
                    if unit_dim == 1 and block == 1 and units == consumer.in_channels:
                        return UnitLink(str(user.target), 1), end
                return f"the units do not map onto the inputs of {self._describe(user)}", end
            if out_shape is None:
                return f"{self._describe(user)} does not return a tensor", end
            kind = self._kind(user)
            if kind is None:
                return f"{self._describe(user)} may mix units", end
            if kind != "flatten" and _other_nodes(user, node):
                return f"{self._describe(user)} takes other tensors", end
            if kind == "elementwise" or (kind == "flatten" and out_shape == in_shape):
                if out_shape != in_shape:
                    return f"{self._describe(user)} changes the shape", end
            elif kind == "channel":
                if not (unit_dim == 1 and block == 1 and len(out_shape) == len(in_shape) and out_shape[:2] == in_shape[:2]):
                    return f"{self._describe(user)} is not per-unit here", end
            else:  # flatten
                if not (unit_dim == 1 and block == 1 and len(in_shape) >= 3 and out_shape == (in_shape[0], math.prod(in_shape[1:]))):
                    return f"{self._describe(user)} is not a flatten of (N, C, ...) to (N, C*...)", end
                block = math.prod(in_shape[2:])
            node = user

    def _kind(self, node: torch.fx.Node) -> str | None:
        """``"elementwise"``, ``"channel"`` or ``"flatten"`` for a unit-preserving op, else ``None``."""
        if node.op == "call_module":
            module = self._modules[node.target]
            if isinstance(module, nn.Flatten):
                return "flatten"
            if isinstance(module, _CHANNEL_MODULES):
                return "channel"
            if isinstance(module, _ELEMENTWISE_MODULES):
                return "elementwise"
            return None
        if node.op == "call_function":
            if node.target is torch.flatten:
                return "flatten"
            if node.target in _CHANNEL_FUNCTIONS:
                return "channel"
            if node.target in _ELEMENTWISE_FUNCTIONS:
                return "elementwise"
            return None
        if node.op == "call_method":
            if node.target in _FLATTEN_METHODS:
                return "flatten"
            if node.target in _ELEMENTWISE_METHODS:
                return "elementwise"
        return None

    def _describe(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self._modules[node.target]).__name__})"
        name = getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {name}"


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(size) for size in shape) if shape is not None else None


def _is_metadata_use(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    return node.op == "call_function" and node.target in (getattr, len)


def _other_nodes(node: torch.fx.Node, source: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args[1:], node.kwargs), found.append)
    return [other for other in found if other is not source]


def trace_unit_links(model: nn.Module, example: torch.Tensor, names: Sequence[str] | None = None) -> LinkReport:
    """Which weight layer consumes the units of each weight layer in ``names`` (default: all).

    Traces ``model`` with ``torch.fx`` (weight layers as leaves), propagates the shapes of
    ``example`` (a small input batch) through the graph in eval mode, and follows each layer's
    output through single-use, unit-preserving ops to the next weight layer (see the module
    docstring). Anything else leaves the layer unlinked, with the reason; a model ``torch.fx``
    cannot trace leaves every layer unlinked.
    """
    try:
        graph = UnitGraph(model, example)
    except UnitTraceError as error:
        names = list(weight_layers(model)) if names is None else list(names)
        return LinkReport(unlinked={name: str(error) for name in names})
    return graph.report(names)
