"""Genotypes: how a pruned network is encoded as a 1-D NumPy genome, varied, and decoded.

Three encodings of the same base (trained) network, all decoded through the module's own surgery
(:meth:`growprune.GrowPruneModule.apply_edit`, logged with ``info={"source": "evolution"}``):

* :class:`MaskGenotype`: one bool gene per weight of the selected layers (unstructured masks);
* :class:`WidthGenotype`: one int gene per prunable channel group (channels kept; the highest-L1
  channels stay), decoded with :class:`~growprune.surgery.edits.RemoveChannels`;
* :class:`RatioGenotype`: one float gene per layer (its sparsity), realised by a weight criterion
  (magnitude by default) through :func:`growprune.surgery.keep_masks`.

Variation is vectorised NumPy on the whole genome (a 266,200-gene LeNet-300-100 mask mutates and
crosses over in about a millisecond). Every random choice comes from the ``numpy.random.Generator``
passed in. :meth:`Genotype.size` is closed form from per-layer tables built at :meth:`Genotype.bind`
and agrees with :mod:`growprune.metrics` on the decoded network (``"params"``: nonzero parameters
of the whole network, :func:`~growprune.metrics.count_nonzero_parameters`; ``"macs"``:
:func:`~growprune.metrics.effective_flops` / 2, one multiply-add being 2 FLOPs).

``layers_per_mutation`` (every genotype): ``None`` (default) lets a mutation touch every layer;
an integer ``n`` restricts each mutation to ``n`` layers drawn at random (uniformly, without
replacement), so a child differs from its parent in few layers and the evaluator's activation
cache (keyed by the parent, with ``changed`` layers) can reuse the activations before them.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from growprune.criteria.base import Criterion
from growprune.criteria.channels import FilterNormCriterion
from growprune.criteria.weights import MagnitudeCriterion
from growprune.metrics import count_nonzero_parameters, count_parameters, dense_flops, effective_flops, flop_table
from growprune.surgery.channels import ChannelGroup
from growprune.surgery.edits import MaskWeights, RemoveChannels
from growprune.surgery.masks import keep_masks, select_layers

SOURCE = {"source": "evolution"}
MEASURES = ("params", "macs")
INITIAL_KINDS = ("uniform", "magnitude")
CROSSOVER_KINDS = ("uniform", "layer")
#: default range of the density drawn per individual when ``initial(density=None)``
DENSITY_RANGE = (0.05, 0.95)


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def _check_density(density: float | None) -> None:
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                or not 0.0 <= float(density) <= 1.0):
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"mutation rate must be a number in [0, 1], got {rate!r}")


def _deep_copy_module(module: Any) -> Any:
    """A deep copy of a GrowPruneModule without its trainer and cached channel graph (rebuilt on use)."""
    memo: dict[int, Any] = {}
    for attribute in ("_trainer", "_channel_graph"):
        value = getattr(module, attribute, None)
        if value is not None:
            memo[id(value)] = None
    return copy.deepcopy(module, memo)


def _flop_sites(model: nn.Module, input_shape: Sequence[int]) -> tuple[dict[str, float], float, list[str]]:
    """Per parameter, multiply-adds per nonzero entry (``flops / 2 / numel`` summed over the ops
    reading all of it); the effective MACs of ops reading no parameter; and why a parameter read
    only in part (a view) makes the closed form inapplicable."""
    per_entry: dict[str, float] = {}
    other = 0.0
    problems: list[str] = []
    numels = {name: p.numel() for name, p in model.named_parameters()}
    for site, flops in flop_table(model, input_shape).items():
        if site.parameter is None or site.view is None:
            other += flops / 2
            continue
        size, _, offset = site.view
        # a view of all of it (e.g. ``weight.t()`` in a linear layer) has its density
        if math.prod(size) != numels.get(site.parameter) or offset != 0:
            problems.append(f"{site.parameter!r} is read in parts (view {tuple(size)})")
            continue
        per_entry[site.parameter] = per_entry.get(site.parameter, 0.0) + flops / 2 / math.prod(size)
    return per_entry, other, problems


class Genotype(ABC):
    """An encoding of pruned versions of one base network (see the module docstring).

    Args:
        layers_per_mutation: ``None``: a mutation may change genes of every layer; ``n``: each
            mutation changes genes of ``n`` layers drawn at random only (cheaper evaluation with
            an activation cache).
    """

    #: mutation kinds this genotype implements; the first is the default (``"flip"`` for masks,
    #: ``"perturb"`` for widths and ratios): :attr:`default_mutation`
    mutation_kinds: tuple[str, ...] = ()
    #: genome dtype kind (``numpy.dtype.kind``) and a readable name
    dtype_kind: str = "b"
    dtype_name: str = "bool"

    def __init__(self, layers_per_mutation: int | None = None):
        if layers_per_mutation is not None and (isinstance(layers_per_mutation, bool)
                                                or not isinstance(layers_per_mutation, int) or layers_per_mutation < 1):
            raise ValueError(f"layers_per_mutation must be None or an integer >= 1, got {layers_per_mutation!r}")
        self.layers_per_mutation = layers_per_mutation
        self._module: Any = None
        self._slices: dict[str, slice] = {}
        self._length = 0
        self._original: dict[str, float] = {}
        self._fallback: str | None = None  # why size() decodes instead of using the closed form

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def default_mutation(self) -> str:
        """The mutation kind a search should use when none is configured for this genotype."""
        return self.mutation_kinds[0]

    @property
    def module(self) -> Any:
        """The bound base module (what :meth:`masks` refers to; pass it to :meth:`decode`)."""
        self._require_bound()
        return self._module

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (for worker processes): the bound module travels without its trainer and its
        cached channel graph (autograd nodes of DepGraph's trace; rebuilt when needed)."""
        state = dict(self.__dict__)
        if self._module is not None:
            clone = copy.copy(self._module)  # shallow: shares the network, has its own attribute dict
            clone.__dict__["_channel_graph"] = None
            clone.__dict__["_trainer"] = None
            state["_module"] = clone
        return state

    # ------------------------------------------------------------------------------- binding
    @abstractmethod
    def bind(self, module: Any) -> None:
        """Read the base (trained) network: layers / channel groups / weights (must be called first)."""

    def _bind_common(self, module: Any) -> None:
        if getattr(module, "input_shape", None) is None:
            raise ValueError(f"{self.name}: the module needs input_shape (to count MACs and to edit it)")
        self._module = module
        model = module.model
        self._original = {"params": float(count_parameters(model)),
                          "macs": float(dense_flops(model, module.input_shape)) / 2}

    def _require_bound(self) -> None:
        if self._module is None:
            raise ValueError(f"{self.name}: call bind(module) first")

    def _set_slices(self, sizes: dict[str, int]) -> None:
        self._slices, start = {}, 0
        for name, size in sizes.items():
            self._slices[name] = slice(start, start + size)
            start += size
        self._length = start
        self._starts = np.array([s.start for s in self._slices.values()], dtype=np.int64)
        self._layer_names = list(self._slices)

    @property
    def length(self) -> int:
        """Number of genes."""
        self._require_bound()
        return self._length

    @property
    def layer_slices(self) -> dict[str, slice]:
        """Layer (module name, or group root for widths) -> its genes."""
        self._require_bound()
        return dict(self._slices)

    # ----------------------------------------------------------------------------- checking
    def check(self, genome: np.ndarray) -> None:
        """Raise ``ValueError`` naming what is wrong: not a 1-D array, dtype, length or gene range."""
        self._require_bound()
        if not isinstance(genome, np.ndarray) or genome.ndim != 1:
            shape = getattr(genome, "shape", type(genome).__name__)
            raise ValueError(f"{self.name}: a genome must be a 1-D numpy array, got {shape}")
        if genome.dtype.kind != self.dtype_kind:
            raise ValueError(f"{self.name}: genome dtype must be {self.dtype_name}, got {genome.dtype}")
        if genome.shape[0] != self._length:
            raise ValueError(f"{self.name}: genome length must be {self._length}, got {genome.shape[0]}")
        self._check_range(genome)

    def _check_range(self, genome: np.ndarray) -> None:
        """Gene values (subclasses with bounded genes)."""

    # ---------------------------------------------------------------------------- variation
    def _mutation_layers(self, rng: np.random.Generator) -> np.ndarray | None:
        """Boolean gene mask of the layers this mutation may touch (``None``: all)."""
        if self.layers_per_mutation is None or self.layers_per_mutation >= len(self._slices):
            return None
        chosen = rng.choice(len(self._slices), size=self.layers_per_mutation, replace=False)
        allowed = np.zeros(self._length, dtype=bool)
        for index in chosen:
            allowed[self._slices[self._layer_names[index]]] = True
        return allowed

    def _genes_to_perturb(self, rng: np.random.Generator, probability: float) -> np.ndarray:
        """Boolean gene mask of a ``perturb`` mutation: each gene of the layers the mutation may touch
        with ``probability``, and at least one of them."""
        allowed = self._mutation_layers(rng)
        chosen = rng.random(self._length) < probability
        pool = np.arange(self._length) if allowed is None else np.flatnonzero(allowed)
        if allowed is not None:
            chosen &= allowed
        if not chosen.any():
            chosen[rng.choice(pool)] = True
        return chosen

    def _changed_layers(self, parent: np.ndarray, child: np.ndarray) -> frozenset[str]:
        differs = parent != child
        if not differs.any():
            return frozenset()
        per_layer = np.add.reduceat(differs.astype(np.int64), self._starts)
        return frozenset(name for name, count in zip(self._layer_names, per_layer) if count)

    @abstractmethod
    def mutate(self, genome: np.ndarray, rng: np.random.Generator, rate: float,
               kind: str = "flip") -> tuple[np.ndarray, frozenset[str]]:
        """A mutated copy and the names of the layers whose genes changed."""

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                  kind: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
        """Two children: ``"uniform"`` takes each gene from either parent with probability 1/2
        (the second child gets the other parent's gene); ``"layer"`` does the same per layer."""
        self.check(a)
        self.check(b)
        if kind == "uniform":
            take_a = rng.random(self._length) < 0.5
        elif kind == "layer":
            per_layer = rng.random(len(self._slices)) < 0.5
            take_a = np.repeat(per_layer, [s.stop - s.start for s in self._slices.values()])
        else:
            raise ValueError(f"{self.name}: crossover kind must be one of {CROSSOVER_KINDS}, got {kind!r}")
        return np.where(take_a, a, b), np.where(take_a, b, a)

    # ----------------------------------------------------------------------------- decoding
    @abstractmethod
    def masks(self, genome: np.ndarray) -> dict[str, torch.Tensor] | None:
        """Parameter name -> float 0/1 mask on the bound module (``None``: the genotype changes structure)."""

    def decode(self, module: Any, genome: np.ndarray) -> Any:
        """A deep copy of ``module`` with the genome applied through ``apply_edit``; ``module`` is untouched."""
        self.check(genome)
        edit = self._edit(module, genome)
        decoded = _deep_copy_module(module)
        decoded.apply_edit(edit, info=dict(SOURCE))
        return decoded

    def apply(self, module: Any, genome: np.ndarray) -> None:
        """Apply the genome to ``module`` in place through ``apply_edit`` (e.g. a PBT member)."""
        self.check(genome)
        module.apply_edit(self._edit(module, genome), info=dict(SOURCE))

    @abstractmethod
    def _edit(self, module: Any, genome: np.ndarray) -> Any:
        """The typed edit that realises ``genome`` on ``module`` (checked before anything changes)."""

    # --------------------------------------------------------------------------------- size
    def original_size(self, measure: str = "params") -> float:
        """Size of the bound, unpruned network: all parameters, or dense multiply-adds of one sample."""
        self._require_bound()
        _check_measure(measure)
        return self._original[measure]

    def size(self, genome: np.ndarray, measure: str = "params") -> float:
        """Nonzero parameters of the decoded network, or its effective multiply-adds of one sample."""
        self.check(genome)
        _check_measure(measure)
        if self._fallback is not None:
            return self._measured_size(genome, measure)
        return self._closed_size(genome, measure)

    @abstractmethod
    def _closed_size(self, genome: np.ndarray, measure: str) -> float:
        """:meth:`size` from the tables built at bind."""

    def _measured_size(self, genome: np.ndarray, measure: str) -> float:
        """:meth:`size` by decoding and counting (used when the closed form does not apply; see bind's warning)."""
        model = self.decode(self._module, genome).model
        if measure == "params":
            return float(count_nonzero_parameters(model))
        return effective_flops(model, self._module.input_shape) / 2

    def _warn_fallback(self, reasons: Sequence[str]) -> None:
        self._fallback = "; ".join(reasons)
        warnings.warn(f"{self.name}: size() decodes every genome to count it (slow) because {self._fallback}",
                      stacklevel=3)

    @abstractmethod
    def magnitude(self, density: float) -> np.ndarray:
        """Deterministic magnitude pruning at ``density`` (the magnitude baseline)."""

    @abstractmethod
    def initial(self, rng: np.random.Generator, kind: str = "uniform", density: float | None = None) -> np.ndarray:
        """One genome of an initial population (see each genotype for ``kind``)."""

    @abstractmethod
    def density(self, genome: np.ndarray) -> float:
        """Kept fraction of the genome's prunable weights."""

    @abstractmethod
    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Normalised distance in [0, 1] between two genomes (for diversity logging)."""

    def _draw_density(self, rng: np.random.Generator, density: float | None) -> float:
        _check_density(density)
        return float(rng.uniform(*DENSITY_RANGE)) if density is None else float(density)


# ============================================================================ weight layers
class _WeightLayers(Genotype):
    """Shared by the mask and ratio genotypes: the selected weight layers of the bound network."""

    def __init__(self, layers: Sequence[str] | None = None, skip: Sequence[str] = (), skip_first_and_last: bool = False,
                 layers_per_mutation: int | None = None):
        super().__init__(layers_per_mutation)
        self.layers = list(layers) if layers is not None else None
        self.skip = list(skip)
        self.skip_first_and_last = bool(skip_first_and_last)

    def _select(self, module: Any) -> dict[str, nn.Module]:
        self._bind_common(module)
        try:
            selected = select_layers(module.model, self.layers, self.skip, self.skip_first_and_last)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from error
        self._weights = {f"{name}.weight": layer.weight.detach() for name, layer in selected.items()}
        self._layer_modules = selected
        per_entry, other, problems = _flop_sites(module.model, module.input_shape)
        # constant parts: nonzero entries and effective MACs of everything the genome does not mask
        self._other_params = float(sum(int(torch.count_nonzero(p.detach())) for name, p in module.model.named_parameters()
                                       if name not in self._weights))
        self._other_macs = other + sum(per_entry[name] * int(torch.count_nonzero(p.detach()))
                                       for name, p in module.model.named_parameters()
                                       if name in per_entry and name not in self._weights)
        self._macs_per_entry = np.array([per_entry.get(name, 0.0) for name in self._weights])
        masked_problems = [p for p in problems if any(p.startswith(repr(name)) for name in self._weights)]
        return selected, masked_problems


class MaskGenotype(_WeightLayers):
    """One bool gene per weight of the selected layers (biases are not masked).

    Layers are chosen by :func:`growprune.surgery.select_layers` (``layers``: shell patterns, or all
    weight layers; minus ``skip``; optionally minus the first and last). Genes run layer by layer,
    each layer's weight flattened in row-major order.

    Magnitude bias: a weight's *rank* ``q`` in [0, 1] is the position of ``|w|`` among its layer's
    weights (0: smallest, 1: largest; ties by position). ``initial(kind="magnitude")`` keeps a weight
    with probability ``sigmoid(sharpness * (q - c))``, ``c`` solved so that the mean probability over
    a uniform ``q`` (so the expected density of every layer) is the target density.
    ``mutate(kind="magnitude")`` flips a kept weight with probability ``2 * rate * (1 - q)`` and a
    pruned one with ``2 * rate * q`` (clipped to 1): small weights are pruned, large ones revived,
    more often, and about ``rate`` of the genes flip on average, as with ``"flip"``.

    ``"flip"`` and ``"magnitude"`` change the density: at density ``d`` a child gains about
    ``rate * n * (1 - 2d)`` kept weights (``n`` genes), so repeated mutation drifts towards 0.5.
    The density-preserving kinds (``n`` here: the genes of the layers the mutation may touch,
    ``K`` of them kept):

    * ``"swap"``: draws ``k ~ Binomial(n, rate / 2)`` (so about ``rate * n`` genes change, as
      with ``"flip"``), capped at the kept and at the pruned genes; prunes ``k`` kept genes and
      revives ``k`` pruned ones. The kept count is unchanged, exactly. Magnitude-biased like
      ``"magnitude"``: kept genes are drawn (without replacement) with weight ``1 - q``, pruned
      genes with weight ``q`` (a tiny floor so every gene can be drawn), so small weights are
      pruned and large ones revived more often. A revived gene was pruned before the mutation.
    * ``"shrink"``: ``"swap"`` plus ``round(shrink * K)`` extra prunes (drawn with the same
      weights, together with the ``k``): the child keeps exactly ``round(shrink * K)`` fewer
      weights than its parent (e.g. 1 % fewer at ``shrink=0.01``): a search for the smallest
      network above an accuracy floor moves towards smaller networks instead of drifting.

    Args:
        layers, skip, skip_first_and_last: the layers to mask (see above).
        sharpness: slope of the keep probability in the rank for magnitude-biased initial genomes.
        shrink: fraction of the kept genes (of the layers a mutation may touch) that a ``"shrink"``
            mutation prunes on top of its swaps, in [0, 1].
        layers_per_mutation: see :class:`Genotype`.
    """

    mutation_kinds = ("flip", "magnitude", "swap", "shrink")
    #: the weight floor of the swap draws (so even the largest weight may be pruned)
    SWAP_FLOOR = 1e-6
    dtype_kind, dtype_name = "b", "bool"

    def __init__(self, layers: Sequence[str] | None = None, skip: Sequence[str] = (), skip_first_and_last: bool = False,
                 sharpness: float = 10.0, shrink: float = 0.01, layers_per_mutation: int | None = None):
        super().__init__(layers, skip, skip_first_and_last, layers_per_mutation)
        if isinstance(sharpness, bool) or not isinstance(sharpness, (int, float)) or not sharpness > 0:
            raise ValueError(f"sharpness must be a number > 0, got {sharpness!r}")
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0.0 <= shrink <= 1.0:
            raise ValueError(f"shrink must be a number in [0, 1], got {shrink!r}")
        self.sharpness = float(sharpness)
        self.shrink = float(shrink)

    def bind(self, module: Any) -> None:
        _, problems = self._select(module)
        self._set_slices({name: weight.numel() for name, weight in self._weights.items()})
        magnitudes = [weight.abs().flatten().cpu().double().numpy() for weight in self._weights.values()]
        self._magnitudes = np.concatenate(magnitudes)
        self._nonzero = self._magnitudes != 0
        ranks = []
        for values in magnitudes:
            order = np.argsort(values, kind="stable")
            rank = np.empty(values.size)
            rank[order] = np.arange(values.size) / max(values.size - 1, 1)
            ranks.append(rank)
        self._rank = np.concatenate(ranks)
        self._gene_macs = np.repeat(self._macs_per_entry, [s.stop - s.start for s in self._slices.values()])
        # the global magnitude order (largest first, ties by position) of magnitude()
        self._global_order = np.argsort(-self._magnitudes, kind="stable")
        self._fallback = None
        if problems:
            self._warn_fallback(problems)

    def _check_range(self, genome: np.ndarray) -> None:
        pass  # every bool is a valid gene

    def initial(self, rng: np.random.Generator, kind: str = "uniform", density: float | None = None) -> np.ndarray:
        """``"uniform"``: each weight kept with probability ``density`` (drawn U(0.05, 0.95) when
        ``None``); ``"magnitude"``: kept with the magnitude-biased probability of the class docstring."""
        self._require_bound()
        if kind not in INITIAL_KINDS:
            raise ValueError(f"{self.name}: initial kind must be one of {INITIAL_KINDS}, got {kind!r}")
        target = self._draw_density(rng, density)
        if kind == "uniform":
            return rng.random(self._length) < target
        centre = self._centre(target)
        probability = 1.0 / (1.0 + np.exp(-self.sharpness * (self._rank - centre)))
        return rng.random(self._length) < probability

    def _centre(self, density: float) -> float:
        """``c`` with mean of ``sigmoid(s (q - c))`` over q ~ U(0, 1) equal to ``density`` (bisection)."""
        if density <= 0.0:
            return math.inf
        if density >= 1.0:
            return -math.inf
        s = self.sharpness

        def mean(c: float) -> float:  # closed-form integral of the logistic over [0, 1]
            return (np.logaddexp(0.0, s * (1 - c)) - np.logaddexp(0.0, -s * c)) / s

        low, high = -1.0 - 50.0 / s, 2.0 + 50.0 / s
        for _ in range(100):
            middle = (low + high) / 2
            low, high = (middle, high) if mean(middle) > density else (low, middle)
        return (low + high) / 2

    def magnitude(self, density: float) -> np.ndarray:
        """Keep the ``round(density * length)`` largest ``|w|`` over all selected layers (global ranking)."""
        self._require_bound()
        _check_density(density)
        genome = np.zeros(self._length, dtype=bool)
        genome[self._global_order[: int(round(float(density) * self._length))]] = True
        return genome

    def mutate(self, genome: np.ndarray, rng: np.random.Generator, rate: float,
               kind: str = "flip") -> tuple[np.ndarray, frozenset[str]]:
        """``"flip"``: each gene flips with probability ``rate``; ``"magnitude"``, ``"swap"``,
        ``"shrink"``: see the class docstring. With ``layers_per_mutation`` only genes of that many
        random layers may change."""
        self.check(genome)
        _check_rate(rate)
        if kind not in self.mutation_kinds:
            raise ValueError(f"{self.name}: mutation kind must be one of {self.mutation_kinds}, got {kind!r}")
        allowed = self._mutation_layers(rng)
        if kind in ("swap", "shrink"):
            child = self._swap(genome, rng, rate, self.shrink if kind == "shrink" else 0.0, allowed)
            return child, self._changed_layers(genome, child)
        draws = rng.random(self._length)
        if kind == "flip":
            flips = draws < rate
        else:
            bias = np.where(genome, 1.0 - self._rank, self._rank)
            flips = draws < np.minimum(1.0, 2.0 * rate * bias)
        if allowed is not None:
            flips &= allowed
        child = genome ^ flips
        return child, self._changed_layers(genome, child)

    def _swap(self, genome: np.ndarray, rng: np.random.Generator, rate: float, shrink: float,
              allowed: np.ndarray | None) -> np.ndarray:
        """Prune ``k + round(shrink * kept)`` kept genes and revive ``k`` pruned ones of the allowed
        layers, magnitude-biased (see the class docstring)."""
        kept = np.flatnonzero(genome if allowed is None else genome & allowed)
        pruned = np.flatnonzero(~genome if allowed is None else ~genome & allowed)
        genes = kept.size + pruned.size
        extra = int(round(shrink * kept.size))
        swaps = min(int(rng.binomial(genes, rate / 2)), kept.size - extra, pruned.size)
        child = genome.copy()
        child[self._weighted_draw(kept, 1.0 - self._rank[kept], swaps + extra, rng)] = False
        child[self._weighted_draw(pruned, self._rank[pruned], swaps, rng)] = True
        return child

    def _weighted_draw(self, genes: np.ndarray, weights: np.ndarray, count: int,
                       rng: np.random.Generator) -> np.ndarray:
        """``count`` of ``genes`` drawn without replacement with probability proportional to
        ``weights`` (Efraimidis-Spirakis: the ``count`` largest keys ``log(u) / w``; one pass)."""
        keys = np.log1p(-rng.random(genes.size)) / np.maximum(weights, self.SWAP_FLOOR)  # log(u), u in (0, 1]
        if count <= 0:
            return genes[:0]
        if count >= genes.size:
            return genes
        return genes[np.argpartition(-keys, count - 1)[:count]]

    def masks(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        self.check(genome)
        result = {}
        for name, piece in self._slices.items():
            weight = self._weights[name]
            mask = torch.from_numpy(genome[piece]).view(weight.shape)
            result[name] = mask.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
        return result

    def _edit(self, module: Any, genome: np.ndarray) -> MaskWeights:
        masks = self.masks(genome)
        density = {name: float(genome[piece].mean()) if piece.stop > piece.start else 1.0
                   for name, piece in self._slices.items()}
        return MaskWeights(masks=masks, density=density)

    def _closed_size(self, genome: np.ndarray, measure: str) -> float:
        kept = genome & self._nonzero
        if measure == "params":
            return self._other_params + float(np.count_nonzero(kept))
        per_layer = np.add.reduceat(kept.astype(np.int64), self._starts) if self._length else np.zeros(0)
        return self._other_macs + float(per_layer @ self._macs_per_entry)

    def density(self, genome: np.ndarray) -> float:
        self.check(genome)
        return float(np.count_nonzero(genome)) / max(self._length, 1)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Normalised Hamming distance: fraction of genes that differ."""
        self.check(a)
        self.check(b)
        return float(np.count_nonzero(a != b)) / max(self._length, 1)


class RatioGenotype(_WeightLayers):
    """One float gene per selected layer: its sparsity in ``[0, max_ratio]``.

    A layer with sparsity ``s`` keeps its ``round((1 - s) * n)`` best-scoring weights (``n``
    weights; ``criterion``'s scores, default :class:`~growprune.criteria.MagnitudeCriterion`,
    computed once at bind) through :func:`growprune.surgery.keep_masks` per layer. A compact
    genome for big models.

    ``initial``: ``"uniform"`` draws every gene's sparsity uniformly from
    ``[max(0, 2s - 1), min(1, 2s)]`` (mean ``s = 1 - density``, density drawn U(0.05, 0.95) when
    ``None``), clipped to ``max_ratio``; ``"magnitude"`` starts from :meth:`magnitude` at that
    density and perturbs every gene by N(0, 0.05) (so a population at one density still varies).
    ``mutate(kind="perturb")``: each gene (of the layers ``layers_per_mutation`` allows) is
    perturbed with probability ``gene_probability`` (at least one gene always is) by a gaussian
    step of standard deviation ``rate``, clipped to ``[0, max_ratio]``. The step has mean zero, so
    the sparsity does not drift in the interior; within a few ``rate`` of a bound the clipping
    pushes genes inwards on average (measured on LeNet-300-100, rate 0.05, 30 mutations: density
    0.5 -0.4 +- 1.3 % of the parameters, 0.2 +2.7 +- 1.0 %, 0.05 +10 %, 0.9 -7 %), as any walk that
    may leave a bound does; use a smaller ``rate`` for genomes close to a bound.
    """

    mutation_kinds = ("perturb",)
    dtype_kind, dtype_name = "f", "float"

    def __init__(self, layers: Sequence[str] | None = None, skip: Sequence[str] = (), skip_first_and_last: bool = False,
                 max_ratio: float = 0.99, criterion: Criterion | None = None, gene_probability: float = 0.5,
                 layers_per_mutation: int | None = None):
        super().__init__(layers, skip, skip_first_and_last, layers_per_mutation)
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0.0 < max_ratio < 1.0:
            raise ValueError(f"max_ratio must be a number in (0, 1), got {max_ratio!r}")
        if criterion is not None and (not isinstance(criterion, Criterion) or not criterion.supports("weights")):
            raise TypeError(f"criterion must score single weights (a WeightCriterion), got {type(criterion).__name__}")
        if criterion is not None and criterion.requires_data:
            raise ValueError(f"RatioGenotype scores weights once at bind, without data: {type(criterion).__name__} needs data")
        if isinstance(gene_probability, bool) or not isinstance(gene_probability, (int, float)) or not 0 < gene_probability <= 1:
            raise ValueError(f"gene_probability must be a number in (0, 1], got {gene_probability!r}")
        self.max_ratio = float(max_ratio)
        self.criterion = criterion if criterion is not None else MagnitudeCriterion()
        self.gene_probability = float(gene_probability)

    def bind(self, module: Any) -> None:
        selected, problems = self._select(module)
        self.criterion.prepare(module.model, None)
        self._scores = {f"{name}.weight": score.detach()
                        for name, score in self.criterion.score_weights(module.model, selected).items()}
        self._set_slices({name: 1 for name in self._weights})
        self._sizes = np.array([weight.numel() for weight in self._weights.values()], dtype=np.int64)
        self._fallback = None
        if problems:
            self._warn_fallback(problems)

    def _check_range(self, genome: np.ndarray) -> None:
        if not np.isfinite(genome).all() or genome.min(initial=0.0) < 0.0 or genome.max(initial=0.0) > self.max_ratio:
            raise ValueError(f"{self.name}: every gene (a layer's sparsity) must lie in [0, {self.max_ratio}], got "
                             f"values in [{genome.min():.6g}, {genome.max():.6g}]")

    def _keep_counts(self, genome: np.ndarray) -> dict[str, int]:
        return {name: int(round((1.0 - float(genome[piece.start])) * size))
                for (name, piece), size in zip(self._slices.items(), self._sizes)}

    def initial(self, rng: np.random.Generator, kind: str = "uniform", density: float | None = None) -> np.ndarray:
        self._require_bound()
        if kind not in INITIAL_KINDS:
            raise ValueError(f"{self.name}: initial kind must be one of {INITIAL_KINDS}, got {kind!r}")
        sparsity = 1.0 - self._draw_density(rng, density)
        if kind == "uniform":
            genome = rng.uniform(max(0.0, 2 * sparsity - 1), min(1.0, 2 * sparsity), size=self._length)
        else:
            genome = self.magnitude(1.0 - sparsity) + rng.normal(0.0, 0.05, size=self._length)
        return np.clip(genome, 0.0, self.max_ratio)

    def magnitude(self, density: float) -> np.ndarray:
        """Every layer at sparsity ``1 - density`` (layer-wise), clipped to ``max_ratio``."""
        self._require_bound()
        _check_density(density)
        return np.full(self._length, min(1.0 - float(density), self.max_ratio), dtype=np.float64)

    def mutate(self, genome: np.ndarray, rng: np.random.Generator, rate: float,
               kind: str = "perturb") -> tuple[np.ndarray, frozenset[str]]:
        self.check(genome)
        _check_rate(rate)
        if kind not in self.mutation_kinds:
            raise ValueError(f"{self.name}: mutation kind must be one of {self.mutation_kinds}, got {kind!r}")
        chosen = self._genes_to_perturb(rng, self.gene_probability)
        child = genome.copy()
        child[chosen] = np.clip(genome[chosen] + rng.normal(0.0, rate, size=int(chosen.sum())), 0.0, self.max_ratio)
        return child, self._changed_layers(genome, child)

    def masks(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        self.check(genome)
        keep = self._keep_counts(genome)
        masks = {}
        for name, score in self._scores.items():  # keep_masks per layer: each layer its own count
            masks.update(keep_masks({name: score}, {name: keep[name]}))
        return {name: mask.to(self._weights[name].dtype) for name, mask in masks.items()}

    def _edit(self, module: Any, genome: np.ndarray) -> MaskWeights:
        return MaskWeights(masks=self.masks(genome),
                           density={name: 1.0 - float(genome[piece.start]) for name, piece in self._slices.items()})

    def _closed_size(self, genome: np.ndarray, measure: str) -> float:
        masks = self.masks(genome)
        kept = np.array([int(torch.count_nonzero(masks[name] * (self._weights[name] != 0))) for name in self._weights],
                        dtype=np.float64)
        if measure == "params":
            return self._other_params + float(kept.sum())
        return self._other_macs + float(kept @ self._macs_per_entry)

    def density(self, genome: np.ndarray) -> float:
        self.check(genome)
        keep = self._keep_counts(genome)
        return float(sum(keep.values())) / max(int(self._sizes.sum()), 1)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Mean absolute difference of the layers' sparsities."""
        self.check(a)
        self.check(b)
        return float(np.abs(a - b).mean()) if self._length else 0.0


# ================================================================================== widths
CHANNEL_CRITERIA = {"l1": 1, "l2": 2}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class WidthGenotype(Genotype):
    """One int gene per prunable channel group of the module's channel graph: channels kept.

    A gene of a group with ``C`` channels and step ``t`` (:attr:`ChannelGroup.step`) takes values
    ``k`` with ``min_channels <= k <= C`` and ``(C - k) % t == 0``. Decoding removes the ``C - k``
    lowest-scoring channels (``criterion``: ``"l1"`` or ``"l2"`` filter norm,
    :class:`~growprune.criteria.FilterNormCriterion`, in :meth:`ChannelGroup.removal_order`) with one
    :class:`~growprune.surgery.edits.RemoveChannels` edit.

    ``initial``: ``"uniform"`` keeps in every group a fraction drawn from
    ``[max(0, 2d - 1), min(1, 2d)]`` (mean ``d``, drawn U(0.05, 0.95) when ``None``); ``"magnitude"``
    starts from :meth:`magnitude` at ``d`` and moves every gene by N(0, 0.05 C) channels.
    ``mutate(kind="perturb")``: each gene (of the layers ``layers_per_mutation`` allows) is
    perturbed with probability ``gene_probability`` (at least one always is) by
    ``round(N(0, rate * C))`` channels (at least one step ``t``, random sign), snapped to the
    valid values. Symmetric, so no drift in the interior; near a bound the clipping pushes
    widths inwards on average (LeNet-300-100, rate 0.05, 30 mutations: density 0.5 -0.7 +- 1.4 %
    of the parameters, 0.2 +2.8 +- 1.1 %, 0.9 -8 %).

    Args:
        skip: layer names whose output channels stay (``ChannelGraph.groups(skip)``).
        min_channels: channels every group keeps at least.
        criterion: ``"l1"`` or ``"l2"`` channel norm.
        gene_probability: probability that a mutation perturbs a gene.
        layers_per_mutation: see :class:`Genotype`.
    """

    mutation_kinds = ("perturb",)
    dtype_kind, dtype_name = "i", "int"

    def __init__(self, skip: Sequence[str] = (), min_channels: int = 1, criterion: str = "l1",
                 gene_probability: float = 0.5, layers_per_mutation: int | None = None):
        super().__init__(layers_per_mutation)
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f"min_channels must be an integer >= 1, got {min_channels!r}")
        if criterion not in CHANNEL_CRITERIA:
            raise ValueError(f"criterion must be one of {tuple(CHANNEL_CRITERIA)}, got {criterion!r}")
        if isinstance(gene_probability, bool) or not isinstance(gene_probability, (int, float)) or not 0 < gene_probability <= 1:
            raise ValueError(f"gene_probability must be a number in (0, 1], got {gene_probability!r}")
        self.skip = list(skip)
        self.min_channels = min_channels
        self.criterion = criterion
        self.gene_probability = float(gene_probability)

    # ------------------------------------------------------------------------------- binding
    def _groups(self, module: Any) -> tuple[Any, list[ChannelGroup]]:
        try:
            graph = module.channel_graph()
            groups = graph.groups(self.skip)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"{self.name}: {error}") from error
        return graph, groups

    def _removal_orders(self, graph: Any, groups: list[ChannelGroup]) -> dict[str, list[int]]:
        scorer = FilterNormCriterion(p=CHANNEL_CRITERIA[self.criterion], normalize=False)
        return {group.root: group.removal_order(scorer.score(graph, group)) for group in groups}

    def bind(self, module: Any) -> None:
        self._bind_common(module)
        graph, groups = self._groups(module)
        if not groups:
            raise ValueError(f"{self.name}: the model has no prunable channel group (skip={self.skip})")
        self._group_list = groups
        self._orders = self._removal_orders(graph, groups)
        channels = np.array([g.channels for g in groups], dtype=np.int64)
        steps = np.array([g.step for g in groups], dtype=np.int64)
        # smallest valid count: >= min_channels and channels - k a multiple of step
        low = channels - ((channels - np.minimum(self.min_channels, channels)) // steps) * steps
        self._channels, self._steps, self._low = channels, steps, low
        self._set_slices({g.root: 1 for g in groups})
        self._build_tables(module, graph, groups)

    def _build_tables(self, module: Any, graph: Any, groups: list[ChannelGroup]) -> None:
        """Per parameter: nonzero counts per (dim-0 entry, dim-1 entry) and which channel of which
        group each entry belongs to, so :meth:`size` is a few matrix-vector products."""
        model = module.model
        parameters = dict(model.named_parameters())
        modules = dict(model.named_modules())
        offsets = np.concatenate([[0], np.cumsum(self._channels)])
        # global channel index of every entry of dim 0 / dim 1 of each parameter (-1: not in a group)
        labels: dict[tuple[str, int], np.ndarray] = {}
        problems: list[str] = []

        def label(name: str, dim: int, member_idxs: Sequence[int], root_idxs: Sequence[int], offset: int) -> None:
            size = parameters[name].shape[dim]
            array = labels.setdefault((name, dim), np.full(size, -1, dtype=np.int64))
            idxs = np.asarray(member_idxs, dtype=np.int64)
            roots = np.asarray(root_idxs, dtype=np.int64) + offset
            if idxs.size and idxs.max() >= size:
                problems.append(f"{name!r} dim {dim} has {size} entries but the group indexes {idxs.max() + 1}")
                return
            # DepGraph already expands flattens (a conv channel -> its block of linear inputs)
            positions, values = idxs, roots
            clash = (array[positions] != -1) & (array[positions] != values)
            if clash.any():
                problems.append(f"{name!r} dim {dim} is indexed by two channel groups at once")
                return
            array[positions] = values

        for number, group in enumerate(groups):
            for item in graph.tp_group(group.root).items:
                target = item.dep.target.module
                if isinstance(target, nn.Parameter) or not isinstance(target, nn.Module) or target not in graph._names:
                    if isinstance(target, nn.Parameter):
                        problems.append(f"group {group.root!r} changes a bare parameter")
                    continue
                owner = graph._names[target]
                own = {key for key, _ in target.named_parameters(recurse=False)}
                if not own:
                    continue
                out = graph.graph.is_out_channel_pruning_fn(item.dep.handler)
                prefix = f"{owner}." if owner else ""
                if isinstance(target, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(target, "transposed", False):
                    depthwise = isinstance(target, nn.modules.conv._ConvNd) and target.groups > 1 \
                        and target.groups == target.in_channels == target.out_channels
                    if isinstance(target, nn.modules.conv._ConvNd) and target.groups > 1 and not depthwise:
                        problems.append(f"grouped convolution {owner!r}")
                        continue
                    if out or depthwise:
                        for key in own & {"weight", "bias"}:
                            label(prefix + key, 0, item.idxs, item.root_idxs, offsets[number])
                    else:
                        label(prefix + "weight", 1, item.idxs, item.root_idxs, offsets[number])
                elif isinstance(target, _NORMS):
                    for key in own & {"weight", "bias"}:
                        label(prefix + key, 0, item.idxs, item.root_idxs, offsets[number])
                else:
                    problems.append(f"{type(target).__name__} {owner!r} in group {group.root!r}")
        if graph._couplings:
            problems.append("depthwise convolutions with a channel multiplier")
        per_entry, other_macs, site_problems = _flop_sites(model, module.input_shape)
        problems += site_problems
        self._fallback = None
        if problems:
            self._warn_fallback(sorted(set(problems)))
            return
        # keep rank of every channel: 0 for the best (kept last), so "rank < k" means kept
        rank = np.zeros(int(offsets[-1]) + 1, dtype=np.int64)
        for number, group in enumerate(groups):
            order = self._orders[group.root][::-1]
            rank[offsets[number] + np.asarray(order, dtype=np.int64)] = np.arange(group.channels)
        self._rank, self._offsets = rank, offsets
        self._always = int(offsets[-1])  # a pseudo-channel always kept (rank 0, its "group" keeps 1)
        self._group_of = np.concatenate([np.repeat(np.arange(len(groups)), self._channels), [len(groups)]])
        self._tables: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []
        constant_params, constant_macs = 0.0, other_macs
        prunable = 0.0
        for name, parameter in parameters.items():
            tensor = parameter.detach()
            dims = [labels.get((name, d)) for d in range(min(tensor.dim(), 2))]
            macs = per_entry.get(name, 0.0)
            if all(d is None or (d == -1).all() for d in dims):
                count = int(torch.count_nonzero(tensor))
                constant_params += count
                constant_macs += macs * count
                continue
            nonzero = (tensor != 0).reshape(tensor.shape[0], -1) if tensor.dim() >= 1 else (tensor != 0).reshape(1, 1)
            if tensor.dim() >= 2:
                nonzero = (tensor != 0).reshape(tensor.shape[0], tensor.shape[1], -1).sum(-1)
            else:
                nonzero = nonzero.sum(-1, keepdim=True)
            rows = dims[0] if dims[0] is not None else np.full(tensor.shape[0], -1, dtype=np.int64)
            columns = dims[1] if len(dims) > 1 and dims[1] is not None else np.full(nonzero.shape[1], -1, dtype=np.int64)
            rows = np.where(rows == -1, self._always, rows)
            columns = np.where(columns == -1, self._always, columns)
            table = nonzero.cpu().double().numpy()
            prunable += float(table.sum())
            self._tables.append((table, rows, columns, macs))
        self._constant = {"params": constant_params, "macs": constant_macs}
        self._prunable = prunable

    # ----------------------------------------------------------------------------- checking
    def _check_range(self, genome: np.ndarray) -> None:
        bad = (genome < self._low) | (genome > self._channels) | ((self._channels - genome) % self._steps != 0)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{self.name}: the gene of {self._layer_names[index]!r} must be in "
                             f"{self._low[index]}..{self._channels[index]} (channels kept, in steps of "
                             f"{self._steps[index]}), got {int(genome[index])} ({int(bad.sum())} bad gene(s))")

    def _snap(self, kept: np.ndarray) -> np.ndarray:
        """Nearest valid counts (multiples of step removed, within bounds)."""
        removed = np.rint((self._channels - kept) / self._steps) * self._steps
        kept = self._channels - removed
        return np.clip(kept, self._low, self._channels).astype(np.int64)

    # ---------------------------------------------------------------------------- variation
    def initial(self, rng: np.random.Generator, kind: str = "uniform", density: float | None = None) -> np.ndarray:
        self._require_bound()
        if kind not in INITIAL_KINDS:
            raise ValueError(f"{self.name}: initial kind must be one of {INITIAL_KINDS}, got {kind!r}")
        target = self._draw_density(rng, density)
        if kind == "uniform":
            fraction = rng.uniform(max(0.0, 2 * target - 1), min(1.0, 2 * target), size=self._length)
            return self._snap(fraction * self._channels)
        return self._snap(self.magnitude(target) + rng.normal(0.0, 0.05, size=self._length) * self._channels)

    def magnitude(self, density: float) -> np.ndarray:
        """Every group keeps ``density`` of its channels (layer-wise; the highest-norm ones on decode)."""
        self._require_bound()
        _check_density(density)
        return self._snap(float(density) * self._channels)

    def mutate(self, genome: np.ndarray, rng: np.random.Generator, rate: float,
               kind: str = "perturb") -> tuple[np.ndarray, frozenset[str]]:
        self.check(genome)
        _check_rate(rate)
        if kind not in self.mutation_kinds:
            raise ValueError(f"{self.name}: mutation kind must be one of {self.mutation_kinds}, got {kind!r}")
        chosen = self._genes_to_perturb(rng, self.gene_probability)
        steps = np.rint(rng.normal(0.0, rate, size=self._length) * self._channels / self._steps) * self._steps
        signs = np.where(rng.random(self._length) < 0.5, -1, 1)
        steps = np.where(steps == 0, signs * self._steps, steps)
        proposal = self._snap(genome + np.where(chosen, steps, 0))
        return proposal, self._changed_layers(genome, proposal)

    # ----------------------------------------------------------------------------- decoding
    def masks(self, genome: np.ndarray) -> None:
        """``None``: widths change the structure (evaluate the decoded network)."""
        self.check(genome)
        return None

    def _edit(self, module: Any, genome: np.ndarray) -> RemoveChannels:
        if module is self._module:
            orders = self._orders
        else:  # another network of the same architecture (a PBT member): its own channel norms
            graph, groups = self._groups(module)
            found = {g.root: g.channels for g in groups}
            expected = {g.root: g.channels for g in self._group_list}
            if found != expected:
                raise ValueError(f"{self.name}: the module's channel groups {found} are not those of the bound network "
                                 f"{expected}: a width genome applies to the unpruned architecture")
            orders = self._removal_orders(graph, groups)
        plan = {root: sorted(int(i) for i in orders[root][: int(self._channels[n] - genome[n])])
                for n, root in enumerate(self._layer_names) if genome[n] < self._channels[n]}
        return RemoveChannels(plan)

    # --------------------------------------------------------------------------------- size
    def _kept_entries(self, genome: np.ndarray) -> tuple[float, float, float]:
        """Nonzero parameters and effective MACs of the prunable parameters, and their kept entries."""
        limit = np.concatenate([genome.astype(np.int64), [1]])
        keep = self._rank < limit[self._group_of]
        params = macs = 0.0
        for table, rows, columns, per_entry in self._tables:
            count = float(keep[rows].astype(np.float64) @ table @ keep[columns].astype(np.float64))
            params += count
            macs += per_entry * count
        return params, macs, params

    def _closed_size(self, genome: np.ndarray, measure: str) -> float:
        params, macs, _ = self._kept_entries(genome)
        return self._constant["params"] + params if measure == "params" else self._constant["macs"] + macs

    def density(self, genome: np.ndarray) -> float:
        """Kept fraction of the nonzero parameters that channel groups index (where the closed form
        does not apply, see bind's warning: kept fraction of the prunable channels)."""
        self.check(genome)
        if self._fallback is not None:
            return float(genome.sum()) / float(self._channels.sum())
        return self._kept_entries(genome)[2] / max(self._prunable, 1.0)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Mean over groups of ``|a - b| / channels``."""
        self.check(a)
        self.check(b)
        return float(np.mean(np.abs(a - b) / self._channels))
