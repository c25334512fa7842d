"""Evolution over pruned networks: the loop around many training runs.

* :mod:`~growprune.evolution.genotypes`: encodings of a pruned network (:class:`MaskGenotype` per weight,
  :class:`WidthGenotype` channels per group, :class:`RatioGenotype` sparsity per layer), decoded through
  the surgery core;
* :mod:`~growprune.evolution.objectives`: accuracy at a sparsity, fewest parameters/MACs above an accuracy
  floor, a Pareto front (NSGA-II, with DEAP);
* :mod:`~growprune.evolution.search`: :class:`GeneticSearch` and the baselines at equal budget
  (:class:`RandomSearch`, :class:`SimulatedAnnealing`, :class:`MagnitudeSearch`);
* :mod:`~growprune.evolution.evaluator`: :class:`PopulationEvaluator`, fast population evaluation
  (racing, cached activations, sparse kernels, batched on a GPU);
* :mod:`~growprune.evolution.loop`: :func:`evolve`, the ask/evaluate/tell loop with its evaluation journal;
* :mod:`~growprune.evolution.pbt`: :class:`PBTCycles`, prune -> retrain -> exploit/explore cycles;
* :mod:`~growprune.evolution.engines`: where tasks run (:class:`LocalEngine`, :class:`RayEngine`);
* :mod:`~growprune.evolution.run`: the ``growprune evolve`` command's run (directory, logs, resume).
"""

from growprune.evolution.data import images_per_class, tensors
from growprune.evolution.engines import Engine, LocalEngine, RayEngine, make_engine
from growprune.evolution.evaluator import PopulationEvaluator
from growprune.evolution.genotypes import Genotype, MaskGenotype, RatioGenotype, WidthGenotype
from growprune.evolution.loop import GenerationRecord, Journal, evolve
from growprune.evolution.objectives import AccuracyAtSparsity, Objective, ParetoFront, SmallestAboveFloor
from growprune.evolution.pbt import PBTCycles
from growprune.evolution.search import GeneticSearch, MagnitudeSearch, RandomSearch, Search, SimulatedAnnealing
from growprune.evolution.types import EvalRequest, EvalResult, Individual, genome_key

__all__ = [
    "AccuracyAtSparsity",
    "Engine",
    "EvalRequest",
    "EvalResult",
    "GenerationRecord",
    "GeneticSearch",
    "Genotype",
    "Individual",
    "Journal",
    "LocalEngine",
    "MagnitudeSearch",
    "MaskGenotype",
    "Objective",
    "PBTCycles",
    "ParetoFront",
    "PopulationEvaluator",
    "RandomSearch",
    "RatioGenotype",
    "RayEngine",
    "Search",
    "SimulatedAnnealing",
    "SmallestAboveFloor",
    "WidthGenotype",
    "evolve",
    "genome_key",
    "images_per_class",
    "make_engine",
    "tensors",
]
