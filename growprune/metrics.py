"""Size and cost metrics: parameters (total / nonzero), FLOPs (dense / effective), compression, latency.

FLOPs are counted by (a subclass of) ``torch.utils.flop_counter.FlopCounterMode`` for one input
sample, so one multiply-accumulate counts as 2 FLOPs and only matrix products, convolutions and
attention are counted (not activations, pooling or normalisation), as in most pruning papers.

Counting is per *operation*: each counted op (a convolution, a matrix product, an attention kernel)
is attributed to the parameter tensor it reads, found by storage because ops see views such as
``weight.t()``, not the ``nn.Parameter``. A parameter used in a parent's own forward
(``nn.MultiheadAttention``'s ``in_proj_weight`` and ``out_proj.weight``, ``F.linear(x, self.weight)``,
tied weights) therefore counts as well as one used by its own leaf module. *Effective* FLOPs scale
each op's FLOPs by the fraction of nonzero entries in the part of the parameter it reads: what a
sparse kernel would execute. An op reading several parameters (a weight and its bias) takes the
density of the largest; ops that read none (attention scores, products of two activations) count
in full. :func:`layer_flops` sums the same ops per module that owns the parameter read. Structural
pruning shows in both numbers; unstructured masks only in the effective one.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from growprune.modes import evaluating


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def compression_ratio(original_params: int, nonzero_params: int) -> float:
    """Original total parameters / current nonzero parameters (ShrinkBench's definition)."""
    return float("inf") if nonzero_params == 0 else original_params / nonzero_params


def _example_input(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return torch.zeros(batch_size, *input_shape, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ FLOPs
@dataclass(frozen=True)
class FlopSite:
    """Where counted FLOPs go (the key of :func:`flop_table`).

    ``parameter``: qualified name of the parameter the ops read (``None`` when they read none);
    ``view``: the part of it they read, as ``(size, stride, storage_offset)``, e.g. one third of a
    packed in-projection; ``layer``: the :func:`layer_flops` key, i.e. the module owning
    ``parameter``, or for ops that read no parameter the innermost module whose forward ran them.
    """

    layer: str
    parameter: str | None = None
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None = None


def _storage_key(tensor: torch.Tensor) -> tuple[torch.device, int] | None:
    """Identity of the memory a tensor views (``None`` where there is none: meta, empty, sparse)."""
    if tensor.layout != torch.strided:
        return None
    pointer = tensor.untyped_storage().data_ptr()
    return (tensor.device, pointer) if pointer else None


class _SiteFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that sums each counted op's FLOPs into its :class:`FlopSite`."""

    def __init__(self, model: nn.Module):
        super().__init__(display=False)
        # F.scaled_dot_product_attention runs this kernel on CPU; torch has no formula for it, but it
        # computes what the CUDA flash kernel does, so it shares that formula.
        aten = torch.ops.aten
        self.flop_registry.setdefault(aten._scaled_dot_product_flash_attention_for_cpu,
                                      self.flop_registry[aten._scaled_dot_product_flash_attention])
        self.parameter_names: dict[tuple[torch.device, int], str] = {}
        for name, parameter in model.named_parameters():
            key = _storage_key(parameter)
            if key is not None:
                self.parameter_names.setdefault(key, name)
        self.sites: dict[FlopSite, int] = defaultdict(int)

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        # Called by FlopCounterMode for every executed op; replaces its per-module bookkeeping.
        formula = self.flop_registry.get(func_packet)
        if formula is None:
            return out
        flops = int(formula(*args, **kwargs, out_val=out))
        reads = [(t, name) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                 and (name := self.parameter_names.get(_storage_key(t))) is not None]
        if reads:
            # An op reading several parameters is mostly a weight op with its bias (addmm,
            # convolution): the largest is the weight whose sparsity a sparse kernel would exploit.
            weight, name = max(reads, key=lambda read: read[0].numel())
            view = (tuple(weight.shape), tuple(weight.stride()), weight.storage_offset())
            site = FlopSite(name.rpartition(".")[0], name, view)
        else:
            # ModuleTracker names modules "<RootClass>.<path>" ("Global" outside any); the deepest
            # running one is the innermost, and stripping the root gives its named_modules() name.
            innermost = max(self.mod_tracker.parents, key=lambda qualified: qualified.count("."))
            site = FlopSite(innermost.partition(".")[2])
        self.sites[site] += flops
        return out


def flop_table(model: nn.Module, input_shape: Sequence[int]) -> dict[FlopSite, int]:
    """FLOPs of one forward pass for one sample, summed per :class:`FlopSite`.

    Runs in eval mode under ``no_grad`` (batch-norm statistics, modes, flags and ``.grad`` stay as
    they are) with the fused ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` fast path off:
    it is one opaque kernel that the counter cannot see, so attention would count as 0 FLOPs.
    """
    counter = _SiteFlopCounter(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with evaluating(model), counter:
            model(_example_input(model, input_shape))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return dict(counter.sites)


def layer_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs of one forward pass for one sample: ``{"": total, "<module name>": flops, ...}``.

    ``""`` is the total. Every other key is a ``named_modules()`` name: an op that reads a parameter
    counts for the module that owns that parameter (so ``attn.out_proj`` gets the out-projection of
    an ``nn.MultiheadAttention`` although it is never called; a shared parameter belongs to the
    first module ``named_parameters()`` finds it in), an op that reads none (attention scores) for
    the innermost module running it. Ops on the root's own parameters, or run by the
    root with none, appear in the total only. Modules without counted ops have no key.
    """
    table = flop_table(model, input_shape)
    result = {"": sum(table.values())}
    for site, flops in table.items():
        if site.layer:
            result[site.layer] = result.get(site.layer, 0) + flops
    return result


def dense_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass for one sample, counting every weight as nonzero."""
    return sum(flop_table(model, input_shape).values())


def _density(tensor: torch.Tensor) -> float:
    return int(torch.count_nonzero(tensor.detach())) / tensor.numel() if tensor.numel() else 1.0


def weight_density(module: nn.Module) -> float:
    """Fraction of ``module.weight`` that is nonzero (1.0 for modules without a weight)."""
    weight = getattr(module, "weight", None)
    return _density(weight) if isinstance(weight, torch.Tensor) else 1.0


def effective_flops(model: nn.Module, input_shape: Sequence[int], table: dict[FlopSite, int] | None = None) -> float:
    """FLOPs a sparse kernel would execute: each op's FLOPs times the nonzero fraction of the
    part of the parameter it reads (the largest one if it reads several; 1.0 if it reads none).

    Pass ``table`` (from :func:`flop_table`) to reuse an earlier count of the same architecture;
    only the densities are then computed. Weights computed during the forward (parametrizations,
    ``torch.nn.utils.prune``) are not parameters: their zeros are not seen.
    """
    table = table if table is not None else flop_table(model, input_shape)
    total = 0.0
    for site, flops in table.items():
        if site.parameter is None or site.view is None:
            total += flops
        else:
            size, stride, offset = site.view
            total += flops * _density(model.get_parameter(site.parameter).detach().as_strided(size, stride, offset))
    return total


# ---------------------------------------------------------------------------------------- latency
def _clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter`` that first waits for queued GPU work, so times cover the kernels."""
    if device.type != "cuda":
        return time.perf_counter

    def synchronized() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return synchronized


def _timed_passes(model: nn.Module, example: torch.Tensor, passes: int) -> Iterator[float]:
    """Run ``passes`` eval-mode, no-grad forward passes, yielding each one's wall-clock seconds."""
    clock = _clock(example.device)
    with evaluating(model):
        for _ in range(passes):
            start = clock()
            model(example)
            yield clock() - start


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    repeats: int = 30,
    warmup: int = 5,
    statistic: str = "median",
    max_seconds: float | None = None,
) -> float:
    """Wall-clock seconds of one eval-mode, no-grad forward pass, over ``repeats`` timed passes after ``warmup``.

    ``statistic``: ``"median"`` (default) or ``"min"``. The minimum is the figure to report on a
    machine that may be busy: load only ever adds time, so the fastest pass is the closest to the
    network's own cost (a pass slowed by other work, even most of them, does not move it).
    ``max_seconds`` bounds the timed passes' total: they stop once it is spent (at least one runs),
    so a slow model or a loaded machine cannot make the measurement itself take long.
    The figure depends on ``torch.get_num_threads()``: report it alongside.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    times: list[float] = []
    for index, seconds in enumerate(_timed_passes(model, _example_input(model, input_shape, batch_size), warmup + repeats)):
        if index < warmup:
            continue
        times.append(seconds)
        if max_seconds is not None and sum(times) >= max_seconds:
            break
    return min(times) if statistic == "min" else statistics.median(times)


def layer_times(model: nn.Module, input_shape: Sequence[int], repeats: int = 7) -> dict[str, float]:
    """Median batch-1 forward time in seconds of every leaf module with parameters that runs.

    Measured with forward pre/post hooks over ``repeats`` eval-mode, no-grad passes after one
    warm-up pass; a module called several times in a pass counts the sum of its calls.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    example = _example_input(model, input_shape)
    clock = _clock(example.device)
    started: dict[str, float] = {}
    this_pass: dict[str, float] = defaultdict(float)
    samples: dict[str, list[float]] = defaultdict(list)

    def start(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            started[name] = clock()
        return hook

    def stop(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            this_pass[name] += clock() - started[name]
        return hook

    hooks = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
            hooks += [module.register_forward_pre_hook(start(name)), module.register_forward_hook(stop(name))]
    try:
        for index, _ in enumerate(_timed_passes(model, example, repeats + 1)):
            if index > 0:  # the first pass warms caches and allocators up
                for name, seconds in this_pass.items():
                    samples[name].append(seconds)
            this_pass.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


# ------------------------------------------------------------------------------------- size meter
class SizeMeter:
    """Computes the size metrics of a model, recounting FLOPs only when its shapes change.

    Args:
        input_shape: shape of one input sample.
        original_params: total parameters of the network before any change (``compression`` and
            ``params/original`` refer to it).
        original_flops: dense FLOPs of that network (``flops/original``, ``flops/reduction``);
            ``None`` takes the first count this meter makes, so create the meter (or call
            :meth:`dense_flops`) before the network changes.
    """

    def __init__(self, input_shape: Sequence[int], original_params: int, original_flops: float | None = None):
        self.input_shape = tuple(input_shape)
        self.original_params = original_params
        self.original_flops = original_flops
        self._cached_signature: tuple | None = None
        self._cached_table: dict[FlopSite, int] = {}

    def dense_flops(self, model: nn.Module) -> float:
        """Dense FLOPs of one forward pass for one sample, counted again only after a shape change."""
        signature = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
        if signature != self._cached_signature:
            self._cached_table = flop_table(model, self.input_shape)
            self._cached_signature = signature
        flops = float(sum(self._cached_table.values()))
        if self.original_flops is None:
            self.original_flops = flops
        return flops

    def __call__(self, model: nn.Module, include_original: bool = False) -> dict[str, float]:
        """``params/total``, ``params/nonzero``, ``flops/dense``, ``flops/effective``, ``compression``.

        With ``include_original`` also ``params/original``, ``flops/original`` and
        ``flops/reduction`` (original dense FLOPs / current dense FLOPs: the speed-up structural
        changes bought; unstructured masks do not change it, see ``flops/effective``).
        """
        dense = self.dense_flops(model)
        nonzero = count_nonzero_parameters(model)
        metrics = {
            "params/total": float(count_parameters(model)),
            "params/nonzero": float(nonzero),
            "flops/dense": dense,
            "flops/effective": effective_flops(model, self.input_shape, self._cached_table),
            "compression": compression_ratio(self.original_params, nonzero),
        }
        if include_original:
            original = float(self.original_flops)
            metrics["params/original"] = float(self.original_params)
            metrics["flops/original"] = original
            metrics["flops/reduction"] = original / dense if dense else float("inf")
        return metrics
