"""Score a population of masked (or decoded) networks on one set of samples, fast.

:class:`PopulationEvaluator` evaluates :class:`~growprune.evolution.types.EvalRequest` s against a
bound base network. It saves work in three ways, all of them exact where it matters:

* **Racing** (``method="race"``, successive halving): every request first sees ``first_fraction``
  of the samples, then the surviving ones see twice as many, and so on. After each round a request
  is dropped when even the upper end of its accuracy confidence interval scores below the lower end
  of the ``protect``-th best request. The intervals are Wilson score intervals at ``confidence``
  (two-sided) with the finite-population correction: the samples are a fixed set, so a request
  seen on all of them has an interval of width 0. The ``protect`` best requests (by the final
  estimates) are always evaluated on every sample. The intervals are not corrected for testing many
  requests over several rounds; the benchmark ``benchmarks/evolution_speed.py`` measures how often
  the selected elite is the one a full evaluation selects.
* **Activation cache** (``cache=True``; models that run as a sequence of their top-level children):
  the input activations of every masked layer of every evaluated request are kept (an LRU bounded
  by ``cache_bytes``). A request whose ``parent_key`` (or own ``key``) is cached starts at the first
  layer whose masks differ from the cached request's - found by comparing the masks, so a wrong
  ``changed`` cannot change a result - for the samples the cached request was evaluated on (racing
  leaves some requests with a prefix only). Results with and without the cache are bitwise
  identical: the samples are cut into the same chunks every time, so every layer sees the same
  input tensors with the same weights.
* **Sparse kernels**: a masked ``nn.Linear`` whose mask keeps less than ``sparse_below`` of its
  weights runs as a CSR matrix product (``torch.sparse``); its cost is ``nnz x rows`` multiply-adds.

Multiply-adds (MACs) are counted as executed: per layer, rows times the layer's dense MACs per
sample (by ``torch.utils.flop_counter``: matrix products and convolutions; one MAC = 2 FLOPs), or
rows times the kept weights for a sparse layer; a layer input taken from the cache costs 0.
Retraining (``retrain_steps > 0``) costs ``3 x`` the forward MACs of every step (forward, plus
a backward pass estimated at twice the forward) times the retraining samples.

On a GPU (``device="cuda"``) the ``full`` method evaluates the masked requests as one batch
(:func:`torch.func.vmap` over :func:`torch.func.functional_call` with stacked masked weights).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.utils.flop_counter import FlopCounterMode

from growprune.evolution.types import EvalRequest, EvalResult
from growprune.metrics import dense_flops
from growprune.modes import evaluating, preserved_modes, torch_threads

log = logging.getLogger(__name__)

METHODS = ("full", "race")
DEFAULT_CACHE_BYTES = 512 * 2**20
# Sparse-kernel crossover for masked nn.Linear layers, measured by `python -m benchmarks.evolution_speed
# --only crossover` (LeNet-300-100, 64 copies x 2,000 MNIST images, 1 torch thread, CSR conversion of the
# masked weight included): CSR 2.3x faster at 2 % density, 1.6x at 5 %, 1.2x at 8 %, even at 12 %.
DEFAULT_SPARSE_BELOW = 0.08
# Stacked weights of one vmap group at most (the batched GPU path splits larger populations).
_BATCH_WEIGHT_BYTES = 2**30


def wilson_bounds(correct: int, seen: int, total: int, confidence: float) -> tuple[float, float]:
    """Two-sided Wilson score interval of an accuracy over ``total`` samples after seeing ``seen``.

    The finite-population correction (the samples are a fixed set of ``total``) shrinks the interval
    to the observed accuracy once every sample has been seen.
    """
    accuracy = correct / seen
    if seen >= total:
        return accuracy, accuracy
    z = statistics.NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    effective = seen * (total - 1) / (total - seen)
    denominator = 1.0 + z * z / effective
    centre = (accuracy + z * z / (2.0 * effective)) / denominator
    half = z * math.sqrt(accuracy * (1.0 - accuracy) / effective + z * z / (4.0 * effective**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def chunk_bounds(total: int, batch_size: int, first_fraction: float) -> tuple[list[tuple[int, int]], list[int]]:
    """The fixed cut of ``total`` samples into chunks, and the chunk count at the end of each round.

    Round ends are ``ceil(first_fraction * total)`` doubled until ``total``; each round's new samples
    are cut into chunks of at most ``batch_size``. Every method uses this one cut, so a layer always
    sees the same input tensors (bitwise identical results with or without cache and racing).
    """
    ends, end = [], max(1, math.ceil(first_fraction * total))
    while True:
        ends.append(min(end, total))
        if end >= total:
            break
        end *= 2
    chunks, round_chunks, start = [], [], 0
    for end in ends:
        while start < end:
            chunks.append((start, min(start + batch_size, end)))
            start = chunks[-1][1]
        round_chunks.append(len(chunks))
    return chunks, round_chunks


@dataclass
class _Layer:
    """One top-level child of a sequential model."""

    name: str
    module: nn.Module
    params: dict[str, str]  # full parameter name -> the child's own name for it
    macs: int  # dense multiply-adds per sample
    linear: bool  # exactly nn.Linear: the sparse kernel applies


@dataclass
class _Plan:
    """A request prepared for evaluation: its weights, how each layer runs, what it costs."""

    request: EvalRequest
    weights: dict[str, torch.Tensor]  # full parameter name -> weight used (masked / retrained)
    masks: dict[str, torch.Tensor]  # full parameter name -> bool mask (mask requests)
    model: nn.Module | None = None  # decoded network (model requests)
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)  # sequential path
    layer_macs: list[int] = field(default_factory=list)  # per sample, per layer (sequential path)
    cached_layers: frozenset[int] = frozenset()  # layers whose inputs go into the cache
    macs_per_sample: int = 0  # non-sequential paths
    retrain_macs: int = 0


@dataclass
class _Progress:
    """How far a request got: chunks done, correct predictions, summed loss, MACs spent."""

    chunks: int = 0
    seen: int = 0
    correct: int = 0
    loss: float = 0.0
    macs: int = 0
    dropped: bool = False


@dataclass
class _Entry:
    """The cached activations of one evaluated request: masks (to compare) and layer inputs."""

    masks: dict[str, torch.Tensor]
    activations: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (layer, chunk) -> input


class _ActivationCache:
    """An LRU of :class:`_Entry` bounded by bytes; a storage shared by several entries (a parent's
    prefix reused by its child) or by the bound inputs counts once / not at all."""

    def __init__(self, budget: int, free_storages: set[int] | None = None) -> None:
        self.budget = budget
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self.free = set(free_storages or ())
        self._storages: dict[int, list[int]] = {}  # data pointer -> [bytes, references]

    def get(self, key: str | None) -> _Entry | None:
        if key is None or key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key]

    def start(self, key: str, masks: dict[str, torch.Tensor]) -> None:
        """A new (empty) entry for ``key``, replacing an old one."""
        self._drop(key)
        self.entries[key] = _Entry(masks=masks)
        for mask in masks.values():
            self._reference(mask)
        self._evict(keep=key)

    def add(self, key: str, layer: int, chunk: int, tensor: torch.Tensor) -> None:
        entry = self.entries.get(key)
        if entry is None or (layer, chunk) in entry.activations:
            return  # evicted meanwhile (over budget), or already there
        entry.activations[(layer, chunk)] = tensor
        self._reference(tensor)
        self._evict(keep=key)

    def _reference(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in self.free:
            return
        record = self._storages.setdefault(pointer, [storage.nbytes(), 0])
        if record[1] == 0:
            self.bytes += record[0]
        record[1] += 1

    def _release(self, tensor: torch.Tensor) -> None:
        pointer = tensor.untyped_storage().data_ptr()
        record = self._storages.get(pointer)
        if record is None:
            return
        record[1] -= 1
        if record[1] == 0:
            self.bytes -= record[0]
            del self._storages[pointer]

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            for tensor in list(entry.masks.values()) + list(entry.activations.values()):
                self._release(tensor)

    def _evict(self, keep: str) -> None:
        # Oldest first; the entry being written goes last (a single entry over budget is not kept).
        while self.bytes > self.budget and self.entries:
            oldest = next(iter(self.entries))
            if oldest == keep and len(self.entries) > 1:
                self.entries.move_to_end(keep)
                continue
            self._drop(oldest)
            self.evictions += 1


class PopulationEvaluator:
    """Accuracy, loss and cost of many masked versions (or decoded copies) of one network.

    Args:
        method: ``"full"`` (every request on every sample) or ``"race"`` (successive halving, see the
            module docstring).
        batch_size: samples per forward pass (chunks are never larger).
        samples: evaluate on this many of the bound samples (a subset fixed by ``seed``); ``None``: all.
        cache: keep layer inputs for reuse by children (sequential models, no retraining). Without the
            sequential fast path it has no effect (recorded in :attr:`cache_reason`).
        sparse_below: masked ``nn.Linear`` layers keeping less than this fraction of their weights run
            as CSR sparse matrix products (0 disables sparse kernels).
        device: where the model and the samples live (``"cpu"``, ``"cuda"``, ...).
        confidence: confidence level of the racing intervals, in (0, 1).
        first_fraction: share of the samples of the first racing round, in (0, 1].
        threads: evaluate under ``torch.set_num_threads(threads)`` (restored afterwards); ``None``: as is.
        cache_bytes: byte budget of the activation cache (default 512 MiB); least recently used
            requests are evicted first.
        retrain_steps: full-batch SGD steps on the retraining samples before each evaluation (0: none).
            Every request's (masked) weights are fine-tuned from the bound weights with the masks
            re-applied after every step, in eval mode (batch-norm statistics and dropout frozen), so
            the result is deterministic. The cache cannot apply (the weights of every layer change),
            so ``cache=True`` with ``retrain_steps > 0`` raises ``ValueError``.
        retrain_lr: SGD learning rate of the retraining.
        seed: fixes the order the samples are visited in (racing rounds are prefixes of it, so it must
            not follow the classes) and the ``samples`` subset.
        batched: evaluate masked requests of the ``full`` method as one vmapped batch; ``None``: only on
            CUDA devices (on CPU the batch was not faster than the loop).

    Raises:
        ValueError: an argument out of range (named with its value).
    """

    def __init__(
        self,
        method: str = "race",
        batch_size: int = 500,
        samples: int | None = None,
        cache: bool = True,
        sparse_below: float = DEFAULT_SPARSE_BELOW,
        device: str = "cpu",
        confidence: float = 0.99,
        first_fraction: float = 0.125,
        threads: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        retrain_steps: int = 0,
        retrain_lr: float = 0.05,
        seed: int = 0,
        batched: bool | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        _check_int("batch_size", batch_size, 1)
        if samples is not None:
            _check_int("samples", samples, 1)
        if not 0.0 <= sparse_below <= 1.0:
            raise ValueError(f"sparse_below must be in [0, 1], got {sparse_below!r}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        if not 0.0 < first_fraction <= 1.0:
            raise ValueError(f"first_fraction must be in (0, 1], got {first_fraction!r}")
        if threads is not None:
            _check_int("threads", threads, 1)
        _check_int("cache_bytes", cache_bytes, 0)
        _check_int("retrain_steps", retrain_steps, 0)
        if not retrain_lr > 0.0:
            raise ValueError(f"retrain_lr must be > 0, got {retrain_lr!r}")
        try:
            parsed_device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device: {device!r} is not a torch device ({error})") from error
        if parsed_device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if parsed_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch.cuda.is_available() "
                             "is False): use device cpu")
        if retrain_steps > 0 and cache:
            raise ValueError(f"cache=True cannot be combined with retrain_steps={retrain_steps} (retraining changes "
                             "every layer, so no activation can be reused): pass cache=False")
        self.method = method
        self.batch_size = batch_size
        self.samples = samples
        self.cache = bool(cache)
        self.sparse_below = float(sparse_below)
        self.device = parsed_device
        self.confidence = float(confidence)
        self.first_fraction = float(first_fraction)
        self.threads = threads
        self.cache_bytes = int(cache_bytes)
        self.retrain_steps = int(retrain_steps)
        self.retrain_lr = float(retrain_lr)
        self.seed = int(seed)
        self.batched = self.device.type == "cuda" if batched is None else bool(batched)
        self.model: nn.Module | None = None
        self.sequential = False
        self.sequential_reason = "not bound"
        self.cache_reason = "not bound"
        self._layers: list[_Layer] = []
        self._cache = _ActivationCache(self.cache_bytes)

    # ------------------------------------------------------------------------------------ bind
    def bind(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        retrain_inputs: torch.Tensor | None = None,
        retrain_targets: torch.Tensor | None = None,
    ) -> None:
        """Take a copy of ``model`` (on :attr:`device`, eval mode) and the evaluation samples.

        Detects once whether the model runs as the sequence of its top-level children (descending
        into a single child that holds every parameter, e.g. a ``GrowPruneModule``'s ``model``),
        by running both ways on a few samples and comparing the outputs exactly; the result is
        :attr:`sequential`, and :attr:`sequential_reason` says why not. Clears the cache.

        Args:
            model: the base network; requests' masks name its parameters. It is not modified.
            inputs: evaluation samples ``(N, ...)``.
            targets: their class indices ``(N,)``.
            retrain_inputs: samples of the retraining (required with ``retrain_steps > 0``, else refused).
            retrain_targets: their class indices.

        Raises:
            ValueError: no samples, mismatched lengths, non-integer targets, ``samples`` above N,
                retraining tensors missing (or given without ``retrain_steps``).
        """
        _check_data("inputs", inputs, targets)
        if self.samples is not None and self.samples > inputs.shape[0]:
            raise ValueError(f"samples={self.samples} but only {inputs.shape[0]} inputs were given")
        if self.retrain_steps > 0:
            if retrain_inputs is None or retrain_targets is None:
                raise ValueError(f"retrain_steps={self.retrain_steps} needs retrain_inputs and retrain_targets in bind")
            _check_data("retrain_inputs", retrain_inputs, retrain_targets)
        elif retrain_inputs is not None or retrain_targets is not None:
            raise ValueError("retrain_inputs/retrain_targets given but retrain_steps is 0")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        order = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(self.seed))
        if self.samples is not None:
            order = order[: self.samples]
        base = copy.deepcopy(model).to(self.device).eval()
        self._trainable = {name for name, p in base.named_parameters() if p.requires_grad}
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
        inputs = inputs.detach().to("cpu")[order]
        targets = targets.detach().to("cpu")[order]
        self.model = base
        self.input_shape = tuple(inputs.shape[1:])
        self.total = int(inputs.shape[0])
        self.parameters = {name: p.detach() for name, p in base.named_parameters()}
        self._chunk_bounds, self._round_chunks = chunk_bounds(self.total, self.batch_size, self.first_fraction)
        # Every chunk is its own tensor (own, aligned storage): a layer sees bit-identical inputs each time.
        self._chunks = [(inputs[a:b].to(self.device, dtype if inputs.is_floating_point() else inputs.dtype).clone(),
                         targets[a:b].to(self.device, torch.long).clone()) for a, b in self._chunk_bounds]
        self._retrain = None
        if self.retrain_steps > 0:
            self._retrain = (retrain_inputs.detach().to(self.device, dtype if retrain_inputs.is_floating_point()
                                                       else retrain_inputs.dtype),
                             retrain_targets.detach().to(self.device, torch.long))
        self._dense_macs = int(dense_flops(base, self.input_shape)) // 2
        self._layers, self.sequential_reason = self._sequential_layers(base)
        self.sequential = bool(self._layers)
        if not self.cache:
            self.cache_reason = "cache=False"
        elif not self.sequential:
            self.cache_reason = f"no sequential fast path ({self.sequential_reason})"
        else:
            self.cache_reason = ""
        if self.cache and self.cache_reason:
            log.info("PopulationEvaluator: activation cache off: %s", self.cache_reason)
        self._cache = self._new_cache()

    def _new_cache(self) -> _ActivationCache:
        free = {x.untyped_storage().data_ptr() for x, _ in getattr(self, "_chunks", [])}
        return _ActivationCache(self.cache_bytes, free)

    @property
    def cache_active(self) -> bool:
        """The activation cache is in use (``cache=True``, sequential model, bound)."""
        return self.model is not None and self.cache and not self.cache_reason

    def _sequential_layers(self, model: nn.Module) -> tuple[list[_Layer], str]:
        """The top-level children when running them in order reproduces ``model`` exactly, else
        ``([], reason)``. A module whose parameters all live in one child that alone reproduces the
        output (a wrapper) is looked through."""
        probe = self._chunks[0][0][:8]
        with torch.no_grad():
            reference = model(probe)
        module, prefix = model, ""
        for _ in range(8):
            children = list(module.named_children())
            reason = _sequence_problem(module, children, probe, reference)
            if not reason:
                return self._describe_layers(children, prefix, probe), ""
            holders = [(name, child) for name, child in children if any(True for _ in child.parameters())]
            own = sum(1 for _ in module.parameters()) - sum(1 for _, c in holders for _ in c.parameters())
            if len(holders) != 1 or own != 0:
                return [], reason
            name, child = holders[0]
            try:
                with torch.no_grad():
                    same = _same(child(probe), reference)
            except Exception as error:  # noqa: BLE001 - any failure means "not a wrapper"
                return [], f"{reason}; its child {name!r} alone fails: {error}"
            if not same:
                return [], f"{reason}; its child {name!r} alone gives other outputs"
            module, prefix = child, f"{prefix}{name}."
        return [], "wrappers nested too deep"

    def _describe_layers(self, children: list[tuple[str, nn.Module]], prefix: str, probe: torch.Tensor) -> list[_Layer]:
        layers, x = [], probe[:1]
        for name, child in children:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                x = child(x)
            params = {f"{prefix}{name}.{local}": local for local, _ in child.named_parameters()}
            layers.append(_Layer(f"{prefix}{name}", child, params, int(counter.get_total_flops()) // 2,
                                 type(child) is nn.Linear))
        return layers

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(
        self,
        requests: Sequence[EvalRequest],
        score: Callable[[float, float], float] | None = None,
        protect: int = 1,
        known: Sequence[float] = (),
    ) -> list[EvalResult]:
        """Evaluate ``requests`` (results in order) by :attr:`method`.

        Args:
            requests: masked versions of the bound model (``masks``) or decoded networks (``model``).
            score: ``score(accuracy, size)``, non-decreasing in accuracy: what racing compares
                (default: the accuracy). Unused by ``full``.
            protect: racing evaluates at least the ``protect`` best (by final score) on every sample.
            known: exact scores of individuals evaluated before that compete for the same ``protect``
                places (a GA's carried elites): racing drops a request that cannot beat the
                ``protect``-th best of the requests and these, and the requests among the ``protect``
                best of both are evaluated on every sample. Unused by ``full``.

        Raises:
            ValueError: ``protect`` < 1; a request with both or neither of masks and model, a mask
                naming no parameter or of the wrong shape (checked before anything is evaluated).
            RuntimeError: :meth:`bind` was not called.
        """
        self._require_bound()
        if isinstance(protect, bool) or not isinstance(protect, int) or protect < 1:
            raise ValueError(f"protect must be an integer >= 1, got {protect!r}")
        known = [float(value) for value in known]
        if any(math.isnan(value) for value in known):
            raise ValueError(f"known scores must be numbers, got {known!r}")
        for request in requests:
            self._check_request(request)
        score = score or (lambda accuracy, size: accuracy)
        with torch_threads(self.threads), contextlib.ExitStack() as stack:
            for request in requests:
                if request.model is not None:
                    stack.enter_context(evaluating(request.model))
            with torch.no_grad():
                plans = [self._plan(request) for request in requests]
                if self.method == "full" and self.batched:
                    progress = self._full_batched(plans)
                elif self.method == "full":
                    progress = [_Progress() for _ in plans]
                    for plan, state in zip(plans, progress):
                        self._advance(plan, state, len(self._chunks))
                else:
                    progress = self._race(plans, score, protect, known)
        return [EvalResult(accuracy=s.correct / s.seen, loss=s.loss / s.seen, samples=s.seen,
                           exact=s.seen == self.total, macs=s.macs + p.retrain_macs) for p, s in zip(plans, progress)]

    def macs_full(self, requests: Sequence[EvalRequest]) -> int:
        """Multiply-adds a full evaluation of every request costs without the cache and racing (same
        kernels: sparse layers count their kept weights), retraining included: the reference."""
        self._require_bound()
        total = 0
        for request in requests:
            self._check_request(request)
            if request.model is not None:
                per_sample = int(dense_flops(request.model, self.input_shape)) // 2
            elif self.sequential:
                per_sample = sum(self._layer_cost(i, self._layer_masks(request.masks, i))
                                 for i in range(len(self._layers)))
            else:
                per_sample = self._dense_macs
            total += self.total * per_sample + self._retrain_macs(request)
        return total

    # ------------------------------------------------------------------------------ requests
    def _require_bound(self) -> None:
        if self.model is None:
            raise RuntimeError("call bind(model, inputs, targets) before evaluating")

    def _check_request(self, request: EvalRequest) -> None:
        if not isinstance(request, EvalRequest):
            raise TypeError(f"requests must be EvalRequest objects, got {type(request).__name__}")
        if (request.masks is None) == (request.model is None):
            raise ValueError(f"request {request.key!r} must set exactly one of masks and model "
                             f"(masks: {'set' if request.masks is not None else 'None'}, "
                             f"model: {'set' if request.model is not None else 'None'})")
        if request.model is not None and not isinstance(request.model, nn.Module):
            raise TypeError(f"request {request.key!r}: model must be an nn.Module, got {type(request.model).__name__}")
        for name, mask in (request.masks or {}).items():
            if name not in self.parameters:
                raise ValueError(f"request {request.key!r}: mask for {name!r}, the bound model has no such parameter")
            if tuple(mask.shape) != tuple(self.parameters[name].shape):
                raise ValueError(f"request {request.key!r}: mask for {name!r} has shape {tuple(mask.shape)}, "
                                 f"the parameter {tuple(self.parameters[name].shape)}")

    def _layer_masks(self, masks: dict[str, torch.Tensor] | None, index: int) -> dict[str, torch.Tensor]:
        return {name: mask for name, mask in (masks or {}).items() if name in self._layers[index].params}

    def _sparse_weight(self, index: int, masks: dict[str, torch.Tensor]) -> bool:
        """Whether layer ``index`` runs as a sparse product with these masks (mask density below the bar)."""
        layer = self._layers[index]
        name = f"{layer.name}.weight"
        if not layer.linear or name not in masks or self.sparse_below <= 0.0:
            return False
        mask = masks[name]
        return int(torch.count_nonzero(mask)) < self.sparse_below * mask.numel()

    def _layer_cost(self, index: int, masks: dict[str, torch.Tensor]) -> int:
        """Multiply-adds per sample of layer ``index`` with these masks (kept weights if sparse)."""
        if self._sparse_weight(index, masks):
            return int(torch.count_nonzero(masks[f"{self._layers[index].name}.weight"]))
        return self._layers[index].macs

    def _retrain_macs(self, request: EvalRequest) -> int:
        if self.retrain_steps == 0:
            return 0
        per_sample = (int(dense_flops(request.model, self.input_shape)) // 2 if request.model is not None
                      else self._dense_macs)
        return 3 * self.retrain_steps * int(self._retrain[0].shape[0]) * per_sample

    def _plan(self, request: EvalRequest) -> _Plan:
        """Masked (and retrained) weights of ``request`` and how each layer runs."""
        if request.model is not None:
            model = request.model
            if next(model.parameters(), torch.empty(0, device=self.device)).device != self.device:
                model = copy.deepcopy(model).to(self.device).eval()
            weights = self._retrained(model, {}) if self.retrain_steps else {}
            return _Plan(request, weights, {}, model=model, retrain_macs=self._retrain_macs(request),
                         macs_per_sample=int(dense_flops(model, self.input_shape)) // 2)
        masks = {name: mask.to(self.device) != 0 for name, mask in request.masks.items()}
        if self.retrain_steps:
            weights = self._retrained(self.model, masks)
        else:
            weights = {name: self.parameters[name] * mask.to(self.parameters[name].dtype) for name, mask in masks.items()}
        plan = _Plan(request, weights, masks, retrain_macs=self._retrain_macs(request),
                     macs_per_sample=self._dense_macs)
        if self.sequential:
            for index in range(len(self._layers)):
                layer_masks = self._layer_masks(masks, index)
                plan.ops.append(self._layer_op(index, weights, layer_masks))
                plan.layer_macs.append(self._layer_cost(index, layer_masks))
            if self.cache_active:
                plan.cached_layers = frozenset(i for i in range(len(self._layers)) if self._layer_masks(masks, i))
        return plan

    def _layer_op(self, index: int, weights: dict[str, torch.Tensor],
                  masks: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        layer = self._layers[index]
        own = {local: weights[name] for name, local in layer.params.items() if name in weights}
        if not own:
            return layer.module
        if layer.linear:
            weight = own.get("weight", layer.module.weight)
            bias = own.get("bias", layer.module.bias)
            if self._sparse_weight(index, masks):
                with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and tested here
                    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                    sparse = weight.to_sparse_csr()
                if bias is None:
                    return lambda x: torch.sparse.mm(sparse, x.t()).t()
                column = bias.unsqueeze(1)
                return lambda x: torch.addmm(column, sparse, x.t()).t()
            return lambda x: F.linear(x, weight, bias)
        module = layer.module
        return lambda x: functional_call(module, own, (x,))

    def retrained_weights(self, model: nn.Module | None = None,
                          masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trainable parameters after the evaluator's retraining (``retrain_steps`` full-batch SGD
        steps on the bound retraining samples, masks kept), as evaluations see them.

        Args:
            model: the network to retrain (default: the bound model); it is not modified.
            masks: parameter name -> 0/1 mask (default: none).

        Raises:
            RuntimeError: :meth:`bind` was not called.
            ValueError: the evaluator does not retrain (``retrain_steps`` is 0).
        """
        self._require_bound()
        if not self.retrain_steps:
            raise ValueError("retrained_weights: this evaluator does not retrain (retrain_steps is 0)")
        return self._retrained(self.model if model is None else model, dict(masks or {}))

    def _retrained(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's trainable parameters after ``retrain_steps`` full-batch SGD steps with masks kept."""
        inputs, targets = self._retrain
        flags = self._trainable if model is self.model else {n for n, p in model.named_parameters() if p.requires_grad}
        trainable = {name: p for name, p in model.named_parameters() if name in flags}
        factors = {name: masks[name].to(p.dtype) if name in masks else None for name, p in trainable.items()}
        weights = {name: p.detach() * factors[name] if factors[name] is not None else p.detach().clone()
                   for name, p in trainable.items()}
        with preserved_modes(model), torch.enable_grad():
            model.eval()
            for _ in range(self.retrain_steps):
                leaves = {name: w.requires_grad_(True) for name, w in weights.items()}
                loss = F.cross_entropy(functional_call(model, leaves, (inputs,)), targets)
                grads = torch.autograd.grad(loss, list(leaves.values()))
                weights = {}
                for (name, w), grad in zip(leaves.items(), grads):
                    updated = w.detach() - self.retrain_lr * grad
                    weights[name] = updated * factors[name] if factors[name] is not None else updated
        return {name: w.detach() for name, w in weights.items()}

    # ------------------------------------------------------------------------------ running
    def _race(self, plans: list[_Plan], score: Callable[[float, float], float], protect: int,
              known: list[float]) -> list[_Progress]:
        progress = [_Progress() for _ in plans]
        for round_index, end in enumerate(self._round_chunks):
            for plan, state in zip(plans, progress):
                if not state.dropped:
                    self._advance(plan, state, end)
            if round_index < len(self._round_chunks) - 1:
                self._drop(plans, progress, score, protect, known)
        # The protect best by their final estimates (known ones included) must be exact: finish any
        # request a round dropped that is among them. Known scores have index -1: ahead on ties.
        while True:
            scored = [(-value, -1) for value in known]
            scored += [(-score(state.correct / state.seen, plan.request.size), j)
                       for j, (plan, state) in enumerate(zip(plans, progress))]
            unfinished = [j for _, j in sorted(scored)[:protect] if j >= 0 and progress[j].chunks < len(self._chunks)]
            if not unfinished:
                return progress
            for j in unfinished:
                progress[j].dropped = False
                self._advance(plans[j], progress[j], len(self._chunks))

    def _drop(self, plans: list[_Plan], progress: list[_Progress], score: Callable[[float, float], float],
              protect: int, known: list[float]) -> None:
        active = [j for j, state in enumerate(progress) if not state.dropped]
        if len(active) + len(known) <= protect:
            return
        bounds = {j: wilson_bounds(progress[j].correct, progress[j].seen, self.total, self.confidence) for j in active}
        lower = sorted([score(bounds[j][0], plans[j].request.size) for j in active] + known, reverse=True)
        threshold = lower[protect - 1]
        for j in active:
            if score(bounds[j][1], plans[j].request.size) < threshold:
                progress[j].dropped = True

    def _advance(self, plan: _Plan, state: _Progress, end: int) -> None:
        """Evaluate chunks ``state.chunks .. end-1`` of ``plan`` and add them to ``state``."""
        if state.chunks >= end:
            return
        sources: list[tuple[_Entry, int]] = []
        if plan.cached_layers:
            sources = self._cache_sources(plan)
            own = self._cache.entries.get(plan.request.key)
            if own is None or not _masks_equal(plan.masks, own.masks, self.parameters):
                # new, evicted meanwhile, or (a reused key) other masks: entries may cover any chunks
                self._cache.start(plan.request.key, plan.masks)
        for chunk in range(state.chunks, end):
            inputs, targets = self._chunks[chunk]
            if self.sequential and plan.model is None:
                logits, macs = self._run_sequential(plan, chunk, sources)
            else:
                logits, macs = self._run_module(plan, inputs)
            state.macs += macs
            state.correct += int((logits.argmax(dim=1) == targets).sum())
            state.loss += float(F.cross_entropy(logits, targets, reduction="sum"))
            state.seen += int(targets.shape[0])
        state.chunks = end

    def _cache_sources(self, plan: _Plan) -> list[tuple[_Entry, int]]:
        """Cached requests to start from (its own key, its parent), each with the first layer whose
        masks differ from the plan's (the number of layers when none does)."""
        sources = []
        for key in dict.fromkeys((plan.request.key, plan.request.parent_key)):
            entry = self._cache.get(key)
            if entry is None:
                continue
            differs = next((index for index, layer in enumerate(self._layers)
                            if not _masks_equal(plan.masks, entry.masks, layer.params)), len(self._layers))
            sources.append((entry, differs))
        return sources

    def _run_sequential(self, plan: _Plan, chunk: int,
                        sources: list[tuple[_Entry, int]]) -> tuple[torch.Tensor, int]:
        x, start, origin = self._chunks[chunk][0], 0, None
        # Start as late as possible: the last cached input (of this chunk) before the first changed layer.
        for entry, differs in sources:
            last = min(differs, len(self._layers) - 1)
            index = next((i for i in range(last, start, -1) if (i, chunk) in entry.activations), 0)
            if index > start:
                start, origin = index, entry
        if origin is not None:
            x = origin.activations[(start, chunk)]
        rows, macs = int(x.shape[0]), 0
        key = plan.request.key
        for index in range(start, len(self._layers)):
            if index in plan.cached_layers:
                self._cache.add(key, index, chunk, x)
            x = plan.ops[index](x)
            macs += rows * plan.layer_macs[index]
        # The inputs of layers before `start` are the origin's (same masks up to there): share them.
        if origin is not None:
            for index in sorted(plan.cached_layers):
                if index < start and (index, chunk) in origin.activations:
                    self._cache.add(key, index, chunk, origin.activations[(index, chunk)])
        return x, macs

    def _run_module(self, plan: _Plan, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
        model = plan.model if plan.model is not None else self.model
        logits = functional_call(model, plan.weights, (inputs,)) if plan.weights else model(inputs)
        return logits, int(inputs.shape[0]) * plan.macs_per_sample

    def _full_batched(self, plans: list[_Plan]) -> list[_Progress]:
        """``full`` with the masked requests stacked and vmapped (decoded models run one by one)."""
        progress = [_Progress() for _ in plans]
        masked = [j for j, plan in enumerate(plans) if plan.model is None]
        for j, plan in enumerate(plans):
            if plan.model is not None:
                self._advance(plan, progress[j], len(self._chunks))
        per_member = sum(p.numel() * p.element_size() for p in self.parameters.values())
        group_size = max(1, _BATCH_WEIGHT_BYTES // max(per_member, 1))
        model = self.model

        def forward(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, weights, (x,))

        batched = vmap(forward, in_dims=(0, None))
        for start in range(0, len(masked), group_size):
            group = masked[start:start + group_size]
            stacked = {name: torch.stack([plans[j].weights.get(name, base) for j in group])
                       for name, base in self.parameters.items()}
            for inputs, targets in self._chunks:
                logits = batched(stacked, inputs)  # (members, rows, classes)
                rows = int(targets.shape[0])
                losses = F.cross_entropy(logits.flatten(0, 1), targets.repeat(len(group)), reduction="none")
                correct = (logits.argmax(dim=2) == targets).sum(dim=1).tolist()
                summed = losses.view(len(group), rows).sum(dim=1).tolist()
                for j, c, loss in zip(group, correct, summed):
                    state = progress[j]
                    state.correct += int(c)
                    state.loss += float(loss)
                    state.seen += rows
                    state.macs += rows * self._dense_macs
                    state.chunks += 1
        return progress

    # ------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the activation cache (Ray tasks and worker processes get an empty one)."""
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = self._new_cache()


# ---------------------------------------------------------------------------------- helpers
def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_data(name: str, inputs: Any, targets: Any) -> None:
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} and their targets must be tensors, got {type(inputs).__name__} and "
                        f"{type(targets).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"{name}: no samples (shape {tuple(inputs.shape)})")
    if targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"{name}: {inputs.shape[0]} samples but targets of shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must be integer class indices, got {targets.dtype}")


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _sequence_problem(module: nn.Module, children: list[tuple[str, nn.Module]], probe: torch.Tensor,
                      reference: torch.Tensor) -> str:
    """Why running ``children`` in order does not reproduce ``module`` exactly ('' when it does)."""
    name = type(module).__name__
    if not children:
        return f"{name} has no children"
    if len({id(child) for _, child in children}) != len(children):
        return f"{name} uses a child twice"
    inside = sum(1 for _, child in children for _ in child.parameters())
    if inside != sum(1 for _ in module.parameters()):
        return f"{name} has parameters of its own (or shares them between children)"
    x = probe
    try:
        with torch.no_grad():
            for _, child in children:
                x = child(x)
    except Exception as error:  # noqa: BLE001 - any failure means "not a sequence"
        return f"running the children of {name} in order fails: {type(error).__name__}: {error}"
    return "" if _same(x, reference) else f"running the children of {name} in order gives other outputs"


def _masks_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: dict[str, str]) -> bool:
    for name in names:
        if (name in a) != (name in b):
            return False
        if name in a and not torch.equal(a[name], b[name]):
            return False
    return True
