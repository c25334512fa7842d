"""Torch-Pruning's dependency graph, built and walked with bounds, every failure named by model part.

:class:`~growprune.surgery.channels.ChannelGraph` takes the channel groups from Torch-Pruning's
DepGraph. DepGraph traces one forward pass through autograd and guesses what unknown operations
do to channels; three guesses go wrong on real models, and this module catches each of them:

* **Layer weights used outside the layer** (torchvision's Swin calls ``F.linear`` with
  ``attn.qkv.weight`` inside ``ShiftedWindowAttention.forward``): DepGraph never sees those
  layers, takes the whole block for a channel-preserving operation and links channel counts it
  cannot relate. In Swin-T's last stage it reads the view of the relative position bias table
  (``(169, 24)`` -> ``(49, 49, 24)``, 24 heads) as a flatten of the 768 channels with stride 32,
  and the index lists of the residual-stream group multiply at every such view: 23 GB and more.
  Such a part (the module whose ``forward`` made the call) is traced as a unit: its output is
  tied channel for channel to its input of the same shape, so the channels through it are *held*
  (never changed) and nothing inside it is traced.
* **Channel shuffles** (ShuffleNet: ``view`` to ``(N, g, C/g, H, W)``, ``transpose``, ``view``
  back) permute channels by a rule that depends on the channel count; DepGraph fails in its shape
  inference (``ZeroDivisionError``) or maps indices wrongly. A shuffle is traced as a unit too
  (its output tied to its input), and the channel groups through it are held.
* **Unbounded growth**: every group is enumerated by :func:`dependency_group`, DepGraph's
  propagation with a budget (:class:`GraphLimits`): too many index entries in one group or too
  much time, and :class:`~growprune.errors.ConfigurationError` names the model part where it
  happened, before anything was changed.

Errors Torch-Pruning raises while building (e.g. in its index mapping) are re-raised as
``ConfigurationError`` naming the operation and the module it ran in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers, ops
from torch_pruning.dependency import Dependency, Group, Node
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.pruner import function as tp_function

from growprune.errors import ConfigurationError


@dataclass(frozen=True)
class GraphLimits:
    """Bounds on building the dependency graph and listing its groups.

    Args:
        max_nodes: operations and layers DepGraph may trace.
        max_indices: channel index entries one group may hold, summed over its members (the largest
            group of the torchvision models tried holds 78,000: VGG-16's last stage and its flatten;
            each entry costs about 100 bytes).
        max_total_indices: index entries of all groups together (torchvision models: 0.1-0.3 million).
        max_seconds: wall time for building the graph and listing all of its groups.
    """

    max_nodes: int = 100_000
    max_indices: int = 2_000_000
    max_total_indices: int = 20_000_000
    max_seconds: float = 600.0

    def __post_init__(self) -> None:
        for key in ("max_nodes", "max_indices", "max_total_indices"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"GraphLimits.{key} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, (int, float)) or not self.max_seconds > 0:
            raise ConfigurationError(f"GraphLimits.max_seconds must be a number > 0, got {self.max_seconds!r}")


@dataclass(frozen=True)
class HeldPart:
    """A part of the model traced as a unit: the channels through it never change."""

    name: str  # module path of the part ("" for the model's own forward)
    reason: str


#: shape operations a channel shuffle is made of (between the split and the merge of the channel dimension)
_SHAPE_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "clone",
                        "swapaxes", "swapdims", "movedim", "view_as", "reshape_as"})
_MERGES = frozenset({"view", "reshape", "flatten", "view_as", "reshape_as"})
_SPLITS = frozenset({"view", "reshape", "unflatten"})


def _splits_channels(before: torch.Size, after: torch.Size) -> bool:
    """``(N, C, *rest)`` viewed as ``(N, a, b, *rest)`` with ``a * b = C``, both > 1: a channel shuffle begins."""
    return (len(before) >= 3 and len(after) == len(before) + 1 and after[0] == before[0] and after[1] > 1
            and after[2] > 1 and after[1] * after[2] == before[1] and tuple(after[3:]) == tuple(before[2:]))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _tie(output: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """``output``'s values, with autograd history only to ``sources`` (same shape): channel i to channel i."""
    tied = output.detach()
    for source in sources:
        tied = tied + (source - source.detach())
    return tied


class _TraceWatch(TorchFunctionMode):
    """Watches the forward pass DepGraph traces: names the module of every operation, and traces
    channel shuffles and parts that use layer weights outside the layer as units (see the module doc)."""

    def __init__(self, model: nn.Module, registered: tuple[type, ...]):
        super().__init__()
        self.model = model
        self.names = {module: name for name, module in model.named_modules()}
        self.stack: list[nn.Module] = []
        # a layer DepGraph traces may have its weights used by itself or by a traced ancestor (attention's out_proj)
        self.allowed: dict[int, tuple[str, set[nn.Module]]] = {}
        modules = dict(model.named_modules())
        for name, owner in modules.items():
            if isinstance(owner, registered):
                prefixes = [".".join(name.split(".")[:depth]) for depth in range(name.count(".") + 1)] if name else []
                ancestors = {modules[path] for path in prefixes if isinstance(modules.get(path), registered)}
                for parameter in owner.parameters(recurse=False):  # a tied weight is allowed in each of its layers
                    _, allowed = self.allowed.setdefault(id(parameter), (name, set()))
                    allowed |= ancestors | {owner}
        self.where: dict[Any, str] = {}  # grad_fn -> module path of the forward that created it
        self.held: dict[Any, HeldPart] = {}  # grad_fn of a tie -> the part it stands for
        self.opaque: dict[nn.Module, str] = {}  # part -> why it is traced as a unit
        self._shuffles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, tensor before the split)
        self.cat_sizes: dict[Any, list[int]] = {}  # grad_fn of a concatenation -> sizes of its inputs
        self.chunks: set[Any] = set()  # grad_fns of torch.chunk (equal pieces of any size); other splits have fixed sizes
        self._handles: list[Any] = []

    # ------------------------------------------------------------------------- module stack
    def __enter__(self) -> "_TraceWatch":
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._enter, prepend=True))
            self._handles.append(module.register_forward_hook(self._leave, prepend=True, with_kwargs=True))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shuffles.clear()
        self.stack.clear()
        return super().__exit__(*exc)

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)

    def _leave(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if module not in self.opaque:
            return None
        return self._tie_part(module, args, kwargs, output)

    def part(self) -> str:
        return self.names.get(self.stack[-1], "") if self.stack else ""

    def _label(self, module: nn.Module) -> str:
        name = self.names.get(module, "")
        return f"{name!r} ({type(module).__name__})" if name else f"the forward of {type(module).__name__}"

    def _tie_part(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> torch.Tensor:
        reason = self.opaque[module]
        if not isinstance(output, torch.Tensor):
            raise ConfigurationError(f"{self._label(module)} {reason} (Torch-Pruning cannot follow that) and returns "
                                     f"{type(output).__name__}, not one tensor: growprune cannot hold it whole. Call the "
                                     "layer as a module (layer(x), not F.linear(x, layer.weight))")
        inputs = [value for value in _tensors((args, kwargs)) if value.requires_grad]
        sources = [value for value in inputs if value.shape == output.shape]
        if len(sources) < len(inputs):
            shapes = ", ".join(str(tuple(value.shape)) for value in inputs if value.shape != output.shape)
            raise ConfigurationError(f"{self._label(module)} {reason} (Torch-Pruning cannot follow that) and its inputs "
                                     f"of shape {shapes} differ from its output {tuple(output.shape)}: growprune cannot hold "
                                     "it whole. Call the layer as a module (layer(x), not F.linear(x, layer.weight))")
        tied = _tie(output, sources)
        if tied.grad_fn is not None:
            self.held[tied.grad_fn] = HeldPart(self.names.get(module, ""), f"{self._label(module)}, which {reason}")
        return tied

    # ---------------------------------------------------------------------------- operations
    def __torch_function__(self, func: Any, types_: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if self.stack:
            self._check_weights(name, args, kwargs)
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and isinstance(result, torch.Tensor):
            result = self._follow_shuffle(name, first, result)
        elif name == "chunk" and isinstance(result, (tuple, list)):
            self.chunks.update(piece.grad_fn for piece in result if isinstance(piece, torch.Tensor) and piece.grad_fn is not None)
        elif name in ("cat", "concat", "concatenate") and isinstance(first, (list, tuple)) and \
                isinstance(result, torch.Tensor) and result.grad_fn is not None:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            self.cat_sizes[result.grad_fn] = [int(t.shape[dim]) for t in first if t.numel() or t.dim() > 1]
        part = self.part()
        for tensor in _tensors(result):
            if tensor.grad_fn is not None:
                self.where.setdefault(tensor.grad_fn, part)
        return result

    def _check_weights(self, name: str, args: Sequence[Any], kwargs: dict) -> None:
        for value in _tensors((list(args), kwargs)):
            if not isinstance(value, nn.Parameter) or id(value) not in self.allowed:
                continue
            owner, allowed = self.allowed[id(value)]
            if not any(module in allowed for module in self.stack):
                part = self.stack[-1]
                self.opaque.setdefault(part, f"passes the weights of {owner!r} to {name}() instead of calling that layer")

    def _follow_shuffle(self, name: str, first: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        tracked = self._shuffles.get(id(first))
        if tracked is not None and tracked[0] is first:
            if name not in _SHAPE_OPS:
                return result  # not a pure rearrangement: DepGraph sees it as it is
            origin = tracked[1]
            if name in _MERGES and result.shape == origin.shape:
                tied = _tie(result, [origin] if origin.requires_grad else [])
                if tied.grad_fn is not None:
                    part = self.part()
                    where = f"in {part!r}" if part else f"in the forward of {type(self.model).__name__}"
                    self.held[tied.grad_fn] = HeldPart(part, f"a channel shuffle {where} (view {tuple(origin.shape)} -> "
                                                             f"{tuple(first.shape)} -> {tuple(result.shape)})")
                return tied
            self._shuffles[id(result)] = (result, origin)
        elif name in _SPLITS and _splits_channels(first.shape, result.shape):
            self._shuffles[id(result)] = (result, first)
        return result


@dataclass
class TracedGraph:
    """DepGraph with what the trace saw: the module of every node, and the nodes that stand for held parts."""

    graph: tp.DependencyGraph
    held: dict[Node, HeldPart]
    parts: dict[Node, str]
    limits: GraphLimits
    deadline: float | None  # end of the time for building and the first listing of groups (then: per call)
    chunks: set[Node] = field(default_factory=set)  # split nodes made by torch.chunk: equal pieces of any size
    channel_splits: set[Node] = field(default_factory=set)  # split nodes that cut the channel dimension (dim 1)
    mappings_current: bool = True

    def describe(self, node: Node) -> str:
        """``node`` for a message: the layer's name, or the operation and the module it ran in."""
        return _describe(node, self.parts)

    def update_mappings(self) -> None:
        """DepGraph's index maps of concatenations, splits and reshapes, for the current channel counts."""
        if not self.mappings_current:
            try:
                tp_index_mapping.update_index_mapping(self.graph)
            except Exception as error:
                raise _named(error, "updating its index maps", type(self.graph.model).__name__, self.describe) from error
            self.mappings_current = True


def _failing_node(error: BaseException) -> Node | None:
    """The innermost DepGraph node among the local variables of the frames that raised ``error``."""
    found = None
    tb = error.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, Node):
                found = value
        tb = tb.tb_next
    return found


def _named(error: BaseException, doing: str, owner: str, describe: Callable[[Node], str]) -> ConfigurationError:
    node = _failing_node(error)
    where = f" at {describe(node)}" if node is not None else ""
    return ConfigurationError(
        f"Torch-Pruning failed {doing} for {owner}{where}: {type(error).__name__}: {error}. Skip the layers around it, "
        "or register a layer handler (growprune.surgery.handlers) / Torch-Pruning pruner for a custom layer there"
    )


def _describe(node: Node, parts: dict[Node, str] | Callable[[Node], str]) -> str:
    if node._name:
        return repr(node._name)
    part = parts(node) if callable(parts) else parts.get(node, "")
    op = type(node.grad_fn).__name__ if node.grad_fn is not None else type(node.module).__name__
    return f"{op} in {part!r}" if part else f"{op} in the model's own forward"


def build_dependency_graph(model: nn.Module, example_inputs: Any, limits: GraphLimits | None = None,
                           **build_kwargs: Any) -> TracedGraph:
    """DepGraph of ``model`` (``build_kwargs`` go to ``build_dependency``), traced under :class:`_TraceWatch`.

    Raises :class:`~growprune.errors.ConfigurationError` naming the operation and module when
    DepGraph fails or the graph has more than ``limits.max_nodes`` nodes. The caller restores
    modes (DepGraph leaves the model in eval mode) and enables gradients.
    """
    limits = limits or GraphLimits()
    started = time.monotonic()
    graph = tp.DependencyGraph()
    registered = tuple(cls for cls in (ops.type2class(kind) for kind in graph.REGISTERED_PRUNERS)
                       if isinstance(cls, type) and issubclass(cls, nn.Module) and cls is not ops._ElementWiseOp)
    watch = _TraceWatch(model, registered)
    try:
        with watch:
            graph.build_dependency(model, example_inputs=example_inputs, **build_kwargs)
    except ConfigurationError:
        raise
    except Exception as error:
        raise _named(error, "building its channel dependency graph", type(model).__name__,
                     lambda node: _describe(node, lambda n: watch.where.get(n.grad_fn, ""))) from error
    nodes = list(graph.module2node.values())
    if len(nodes) > limits.max_nodes:
        raise ConfigurationError(f"the channel dependency graph of {type(model).__name__} has {len(nodes):,} nodes, more than "
                                 f"GraphLimits.max_nodes = {limits.max_nodes:,}: raise the limit if the memory allows")
    held = {node: watch.held[node.grad_fn] for node in nodes if node.grad_fn in watch.held}
    parts = {node: watch.where.get(node.grad_fn, "") for node in nodes if node.grad_fn is not None}
    chunks = {node for node in nodes if node.grad_fn in watch.chunks}
    splits = {node for node in nodes if node.type == ops.OPTYPE.SPLIT and _split_sizes(node.grad_fn) is not None}
    traced = TracedGraph(graph, held, parts, limits, started + limits.max_seconds, chunks, splits)
    if _repair_splits_and_concats(nodes, watch.cat_sizes):
        traced.mappings_current = False
        traced.update_mappings()
    return traced


def _split_sizes(grad_fn: Any) -> list[int] | None:
    """The sizes of the pieces of a split/chunk along dimension 1, from what autograd saved (else ``None``)."""
    shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
    dim = getattr(grad_fn, "_saved_dim", None)
    if shape is None or dim is None or len(shape) < 2 or dim % len(shape) != 1:
        return None
    if hasattr(grad_fn, "_saved_split_sizes"):
        return [int(size) for size in grad_fn._saved_split_sizes]
    if hasattr(grad_fn, "_saved_split_size"):
        total, size = int(shape[1]), int(grad_fn._saved_split_size)
        return [size] * (total // size) + ([total % size] if total % size else [])
    return None


def _repair_splits_and_concats(nodes: Sequence[Node], cat_sizes: dict[Any, list[int]]) -> bool:
    """Give DepGraph the true sizes of chunks/splits and concatenations, and each split's outputs in piece order.

    With this torch, DepGraph finds no saved sizes on ``chunk`` (``SplitBackward0`` keeps
    ``_saved_self_sym_sizes``, not the ``_saved_self_sizes`` it looks for) and infers them through
    the graph, which goes wrong around a following concatenation (CSP and ShuffleNet blocks:
    ``a, b = x.chunk(2, 1); cat([a, f(b)], 1)``); and it maps a split's outputs to its pieces in
    the order it met them while tracing backwards, not by piece. Both are read from autograd here
    (``output_nr`` says which piece a consumer took). Returns whether anything changed.
    """
    changed = False
    for node in nodes:
        if node.type == ops.OPTYPE.SPLIT and node.grad_fn is not None:
            sizes = _split_sizes(node.grad_fn)
            if sizes is None:
                continue
            piece: dict[Node, int] = {}
            for consumer in node.outputs:
                taken = {nr for fn, nr in getattr(consumer.grad_fn, "next_functions", ()) if fn is node.grad_fn}
                if len(taken) != 1:
                    break  # a consumer of several pieces (or one DepGraph traced through a module): left as it is
                piece[consumer] = taken.pop()
            else:
                if len(piece) == len(sizes) and len(set(piece.values())) == len(sizes):
                    node.outputs.sort(key=piece.__getitem__)
                    node.module.split_sizes = sizes
                    node.module.offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
                    changed = True
        elif node.type == ops.OPTYPE.CONCAT and node.grad_fn in cat_sizes:
            sizes = cat_sizes[node.grad_fn]
            if len(sizes) == len(node.inputs) and node.module.concat_sizes != sizes:
                node.module.concat_sizes = sizes  # DepGraph traced every input: its inputs are in argument order
                changed = True
    return changed


def _too_big(traced: TracedGraph, root: str, node: Node, total: int) -> ConfigurationError:
    return ConfigurationError(
        f"the channel group of {root!r} grows past {traced.limits.max_indices:,} channel indices "
        f"({total:,}) at {traced.describe(node)}: Torch-Pruning maps its channels to ever more indices there "
        "(an operation it reads as a flatten). Skip that part of the model or hold it whole (a module that calls "
        "its layers' weights through torch.nn.functional is held automatically), or raise GraphLimits.max_indices"
    )


def _too_slow(traced: TracedGraph, root: str) -> ConfigurationError:
    return ConfigurationError(
        f"listing the channel groups took longer than GraphLimits.max_seconds = {traced.limits.max_seconds:g} s "
        f"(at the group of {root!r}): the dependency graph is too large or cyclic there; skip that part of the "
        "model or raise the limit"
    )


def dependency_group(traced: TracedGraph, module: Any, pruning_fn: Any, indices: Sequence[int], root: str,
                     deadline: float | None = None) -> Group:
    """DepGraph's group of ``module``'s channels ``indices`` (as ``get_pruning_group``), within the limits.

    The index maps must be current (:meth:`TracedGraph.update_mappings`); DepGraph's own method
    recomputes them for every group, which dominates its time on large graphs. ``deadline``
    (``time.monotonic()``): default ``max_seconds`` from now.
    """
    deadline = deadline if deadline is not None else time.monotonic() + traced.limits.max_seconds
    graph = traced.graph
    if module not in graph.module2node:
        raise ValueError(f"{root!r} is not in the channel dependency graph")
    if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        pruning_fn = tp_function.prune_depthwise_conv_out_channels  # as DepGraph: a depthwise conv's two sides are one
    start = [_helpers._HybridIndex(idx=int(i), root_idx=int(i)) for i in indices]
    root_node = graph.module2node[module]
    group = Group()
    group.add_dep(Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node), start)
    total = len(start)
    visited: set[Node] = set()
    pending = [(group[0].dep, start)]
    while pending:
        if time.monotonic() > deadline:
            raise _too_slow(traced, root)
        dep, idxs = pending.pop()
        node, fn = dep.target, dep.handler
        visited.add(node)
        for follow in node.dependencies:
            if not follow.is_triggered_by(fn):
                continue
            mapped = idxs
            for mapping in follow.index_mapping:
                if mapping is None:
                    continue
                stride = getattr(mapping, "_stride", 1)  # a flatten multiplies the entries: check before building them
                if not getattr(mapping, "reverse", True) and total + len(mapped) * stride > traced.limits.max_indices:
                    raise _too_big(traced, root, follow.target, total + len(mapped) * stride)
                mapped = mapping(mapped)
            if not mapped:
                continue
            if follow.target in visited and group.has_pruning_op(follow, mapped):
                continue
            total += len(mapped)
            if total > traced.limits.max_indices:
                raise _too_big(traced, root, follow.target, total)
            group.add_dep(follow, mapped)
            if follow.target not in traced.held:  # a held part: the group stays whole, what lies beyond is not needed
                pending.append((follow, mapped))
    merged = Group()
    for dep, idxs in group.items:
        target = dep.target.module
        if isinstance(target, nn.Parameter) and any(target is ignored for ignored in graph.ignored_params):
            continue
        merged.add_and_merge(dep, idxs)
    merged._DG = graph
    for k in range(len(merged)):
        hybrid = merged[k].idxs
        item = _helpers.GroupItem(merged[k].dep, _helpers.to_plain_idxs(hybrid))
        item.root_idxs = _helpers.to_root_idxs(hybrid)
        merged[k] = item
    return merged


def all_groups(traced: TracedGraph, ignored: Sequence[Any], root_types: tuple[type, ...],
               names: dict[Any, str]) -> Iterator[Group]:
    """Every group with all channels, one per root layer (as DepGraph's ``get_all_groups``), within the limits.

    A group that changes the output channels of an ``ignored`` layer is left out.
    """
    graph = traced.graph
    # the first listing shares the time of building the graph; a later one (after an edit) has its own
    deadline = traced.deadline if traced.deadline is not None else time.monotonic() + traced.limits.max_seconds
    traced.deadline = None
    traced.update_mappings()
    ignored_ids = {id(module) for module in ignored}
    seen: set[int] = set()
    total = 0
    for module in list(graph.module2node):
        if id(module) in ignored_ids or id(module) in seen or not isinstance(module, root_types):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        root = names.get(module, type(module).__name__)
        group = dependency_group(traced, module, pruner.prune_out_channels, range(pruner.get_out_channels(module)), root,
                                 deadline)
        total += sum(len(item.idxs) for item in group.items)
        if total > traced.limits.max_total_indices:
            raise ConfigurationError(
                f"the channel groups hold more than GraphLimits.max_total_indices = {traced.limits.max_total_indices:,} "
                f"channel indices together (reached at the group of {root!r}): skip parts of the model or raise the limit")
        keep = True
        for item in group.items:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                seen.add(id(item.dep.target.module))
                keep = keep and id(item.dep.target.module) not in ignored_ids
        if keep:
            yield group


__all__ = ["GraphLimits", "HeldPart", "TracedGraph", "all_groups", "build_dependency_graph", "dependency_group"]
