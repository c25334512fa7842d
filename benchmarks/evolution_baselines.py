"""Genetic search vs random search, simulated annealing and magnitude pruning at equal evaluation budget.

    python -m benchmarks.evolution_baselines [--seeds 0 1 2] [--population 16] [--generations 8]
        [--retrain 0 1 10] [--objectives sparsity floor] [--out PATH]

Network: LeNet-300-100 (266,610 parameters), pretrained once (seed 0) on the MNIST idx digits of
../shared/data/mnist-t10k split 6,000 train / 2,000 selection / 2,000 test (``IdxDataModule(
val_fraction=0.2, test_fraction=0.2, seed=0)``). Every search scores candidates (one bool gene per
weight of the three weight matrices: ``MaskGenotype``) on the 2,000 SELECTION samples (racing,
``PopulationEvaluator(method="race")``); the row reports the best individual's accuracy on the
2,000 TEST samples, which no search saw, with its size (nonzero parameters of the whole network,
biases included) and compression (all parameters / nonzero).

Objectives: ``AccuracyAtSparsity(0.8)`` (the study's setting: 80 % of the parameters gone, a
shortfall costs accuracy one for one) and ``SmallestAboveFloor(floor)`` with the floor 1 point
below the unpruned network's selection accuracy. Retraining: none, or ``retrain_steps`` full-batch
SGD steps on 1 or 10 training images per class (``images_per_class``, drawn with the seed) inside
every evaluation (the evaluator's deterministic retraining); the test accuracy of the best
individual is measured after the same retraining.

Budget: ``population`` individuals x ``generations`` generations. Random search and simulated
annealing evaluate all of them; the GA carries 2 elites per generation unevaluated (so it uses
``population + (generations - 1) x (population - 2)`` evaluations, fewer); magnitude pruning uses
1 evaluation for the sparsity target and a bisection grid of ``population`` densities per generation
for the floor (genomes repeated once the bracket is narrow are not evaluated again). The
``evaluations`` column has each run's count. GA, random search and annealing draw their initial
genomes from the same magnitude-biased initialiser (``initial="magnitude"``; density 0.2 for the
sparsity objective, drawn per individual in U(0.05, 0.95) for the floor), so "GA vs random" is
evolution vs sampling the initialiser.

GA variation (``--ga-mutation``, recorded in the ``ga_mutation`` column): ``"v2"`` (default) is
the density-preserving mutation: ``"swap"`` for the sparsity target (a child keeps its parent's
kept count), ``"shrink"`` for the floor (a child keeps ``--shrink`` = 2 % fewer weights than its
parent, ``MaskGenotype(shrink=0.02)``), both at the same rate (about 530 changed genes per child);
``"magnitude"`` is the first measurement's density-drifting flips. The GA's generation 0 holds the
magnitude seeds of ``GeneticSearch(initial="magnitude")`` (the magnitude solution at the target
sparsity; a ladder of 8 densities for the floor) unless ``--ga-no-seed`` (the ``ga_seeded`` column)
draws it like the first measurement (biased random only, as random search and annealing do).

Rows are appended to ``benchmarks/results/evolution_baselines.csv`` (``--out`` for another file); a
file holding rows of other settings (population, generations, retraining, pretraining, data, threads,
torch) is refused before anything is trained.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import records
from growprune import GrowPruneModule
from growprune.data import IdxDataModule
from growprune.evaluation import evaluate
from growprune.evolution.data import images_per_class, tensors
from growprune.evolution.engines import LocalEngine
from growprune.evolution.evaluator import PopulationEvaluator
from growprune.evolution.genotypes import MaskGenotype
from growprune.evolution.loop import evolve
from growprune.evolution.objectives import AccuracyAtSparsity, Objective, SmallestAboveFloor
from growprune.evolution.search import GeneticSearch, MagnitudeSearch, RandomSearch, Search, SimulatedAnnealing
from growprune.evolution.types import EvalRequest

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist-t10k"
DATA = {"val_fraction": 0.2, "test_fraction": 0.2, "batch_size": 128, "seed": 0}
PRETRAIN = {"epochs": 8, "lr": 1e-3, "batch_size": 128, "seed": 0}
SPARSITY = 0.8
FLOOR_BELOW = 0.01  # the floor: this far below the unpruned selection accuracy
RETRAIN = {"steps": 20, "lr": 0.05}
MUTATION_RATE = 0.002  # of 266,200 genes: about 530 flips per child
SHRINK = 0.02  # the floor's "shrink" mutation: each child keeps 2 % fewer weights than its parent
GA_MUTATIONS = {"v2": {"sparsity": "swap", "floor": "shrink"},
                "magnitude": {"sparsity": "magnitude", "floor": "magnitude"}}
METHODS = ("ga", "random", "annealing", "magnitude")


def load_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    data = IdxDataModule(images=str(MNIST / "t10k-images-idx3-ubyte.gz"),
                         labels=str(MNIST / "t10k-labels-idx1-ubyte.gz"), **DATA)
    data.setup()
    return {"train": tensors(data.train_dataloader()), "selection": tensors(data.val_dataloader()),
            "test": tensors(data.test_dataloader())}


def pretrain(train: tuple[torch.Tensor, torch.Tensor]) -> GrowPruneModule:
    """LeNet-300-100 trained with Adam, minibatches shuffled by a seeded generator."""
    with torch.random.fork_rng():
        torch.manual_seed(PRETRAIN["seed"])  # the initialisation only; the global state is restored
        module = GrowPruneModule(arch="lenet_300_100", num_classes=10, input_shape=(1, 28, 28))
    inputs, targets = train
    optimizer = torch.optim.Adam(module.model.parameters(), lr=PRETRAIN["lr"])
    generator = torch.Generator().manual_seed(PRETRAIN["seed"])
    module.model.train()
    for _ in range(PRETRAIN["epochs"]):
        for batch in torch.randperm(len(targets), generator=generator).split(PRETRAIN["batch_size"]):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module.model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    module.model.eval()
    return module


class UnseededGeneticSearch(GeneticSearch):
    """Ablation (``--ga-no-seed``): generation 0 without the magnitude seeds, all magnitude-biased
    random genomes at ``initial_density`` (drawn per genome when ``None``), as in the first measurement."""

    def seed_densities(self) -> tuple[list[float], list[float | None]]:
        return [], [self.initial_density] * self.population


def make_search(method: str, objective: str, population: int, generations: int, ga_mutation: str = "v2",
                ga_seeded: bool = True) -> Search:
    density = 1.0 - SPARSITY if objective == "sparsity" else None
    if method == "ga":
        kind = GeneticSearch if ga_seeded else UnseededGeneticSearch
        return kind(population=population, elite=2, tournament=3, crossover="uniform", crossover_rate=0.9,
                    mutation=GA_MUTATIONS[ga_mutation][objective], mutation_rate=MUTATION_RATE, initial="magnitude",
                    initial_density=density)
    if method == "random":
        return RandomSearch(population=population, initial="magnitude", initial_density=density)
    if method == "annealing":
        return SimulatedAnnealing(population=population, start_temperature=0.01, end_temperature=0.0005,
                                  mutation="magnitude", mutation_rate=MUTATION_RATE, initial="magnitude",
                                  initial_density=density, steps=max(1, generations - 1))
    if method == "magnitude":
        return MagnitudeSearch(population=population)
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def make_evaluator(retrain: int, method: str = "race") -> PopulationEvaluator:
    if retrain:
        return PopulationEvaluator(method=method, batch_size=500, cache=False, retrain_steps=RETRAIN["steps"],
                                   retrain_lr=RETRAIN["lr"], threads=1)
    return PopulationEvaluator(method=method, batch_size=500, threads=1)


def test_accuracy(module: GrowPruneModule, genotype: MaskGenotype, genome: np.ndarray, retrain: int,
                  test: tuple[torch.Tensor, torch.Tensor], retrain_data: tuple | None) -> float:
    """The best genome's accuracy on the held-out test samples, after the same retraining."""
    evaluator = make_evaluator(retrain, method="full")
    evaluator.bind(module.model, *test, *(retrain_data or ()))
    request = EvalRequest(key="best", masks=genotype.masks(genome), size=genotype.size(genome))
    return float(evaluator.evaluate([request])[0].accuracy)


def run_one(module: GrowPruneModule, genotype: MaskGenotype, data: dict, method: str, objective_name: str,
            objective: Objective, retrain: int, seed: int, population: int, generations: int, ga_mutation: str = "v2",
            ga_seeded: bool = True) -> dict[str, Any]:
    retrain_data = (images_per_class(*data["train"], retrain, torch.Generator().manual_seed(seed))
                    if retrain else None)
    evaluator = make_evaluator(retrain)
    evaluator.bind(module.model, *data["selection"], *(retrain_data or ()))
    search = make_search(method, objective_name, population, generations, ga_mutation, ga_seeded)
    search.start(genotype, objective, np.random.default_rng(seed))
    records_: list = []
    started = time.perf_counter()
    with LocalEngine() as engine:
        evolve(search, genotype, objective, evaluator, engine, generations, chunks=1, on_generation=records_.append,
               protect=2)
    seconds = time.perf_counter() - started
    best = search.best()
    size = genotype.size(best.genome)
    original = genotype.original_size()
    return {
        "method": method, "objective": objective_name, "retrain_per_class": retrain, "seed": seed,
        "test_acc": round(test_accuracy(module, genotype, best.genome, retrain, data["test"], retrain_data), 5),
        "selection_acc": round(float(best.accuracy), 5), "selection_exact": int(best.exact),
        "nonzero_params": int(size), "compression": round(original / size, 3),
        "sparsity": round(1 - size / original, 5), "fitness": round(float(best.fitness[0]), 5),
        "evaluations": records_[-1].evaluations_total, "macs": records_[-1].macs_total,
        "macs_full": records_[-1].macs_full_total, "search_seconds": round(seconds, 1),
    }


def summarise(rows: list[dict[str, Any]]) -> str:
    lines = ["| objective | retrain / class | method | test acc (mean ± sd) | nonzero params | compression | evaluations |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["objective"], r["retrain_per_class"]) for r in rows}, key=lambda k: (k[0], int(k[1])))
    for objective, retrain in keys:
        for method in METHODS:
            group = [r for r in rows if (r["objective"], r["retrain_per_class"], r["method"]) == (objective, retrain, method)]
            if not group:
                continue
            acc = [100 * float(r["test_acc"]) for r in group]
            spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
            params = statistics.mean(int(r["nonzero_params"]) for r in group)
            compression = statistics.mean(float(r["compression"]) for r in group)
            evaluations = statistics.mean(int(r["evaluations"]) for r in group)
            lines.append(f"| {objective} | {retrain} | {method} | {statistics.mean(acc):.2f}{spread} | "
                         f"{params:,.0f} | {compression:.2f}x | {evaluations:.0f} |")
    return "\n".join(lines)


def refuse_other_settings(path: Path, settings: dict[str, Any]) -> None:
    """Stop (before any training) when ``path`` already holds rows of other settings: one file, one setting."""
    if not path.exists():
        return
    for row in records.read_rows([path]):
        for column, value in settings.items():
            if row.get(column) != str(value):
                raise SystemExit(f"error: {path} holds rows with {column}={row.get(column)!r}, this run has "
                                 f"{value!r}: write this run to another file with --out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--retrain", type=int, nargs="+", default=[0, 1, 10], help="images per class (0: none)")
    parser.add_argument("--objectives", nargs="+", default=["sparsity", "floor"], choices=["sparsity", "floor"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ga-mutation", choices=sorted(GA_MUTATIONS), default="v2",
                        help="v2: swap (sparsity) / shrink (floor); magnitude: the first measurement's flips")
    parser.add_argument("--ga-no-seed", action="store_true", help="GA generation 0 without the magnitude seeds")
    parser.add_argument("--shrink", type=float, default=SHRINK, help="the floor's shrink fraction per child")
    parser.add_argument("--out", type=Path, default=records.results_path("evolution_baselines"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = records.run_info()
    refuse_other_settings(args.out, {
        "population": args.population, "generations": args.generations, "sparsity_target": SPARSITY,
        "retrain_steps": RETRAIN["steps"], "retrain_lr": RETRAIN["lr"], "mutation_rate": MUTATION_RATE,
        "pretrain": records.format_params(PRETRAIN), "data": records.format_params(DATA),
        "threads": info["threads"], "torch": info["torch"], "ga_mutation": args.ga_mutation,
        "ga_seeded": int(not args.ga_no_seed), "shrink": args.shrink})
    started = time.perf_counter()
    data = load_data()
    module = pretrain(data["train"])
    unpruned = {split: evaluate(module.model, [data[split]]).accuracy for split in ("selection", "test")}
    print(f"unpruned LeNet-300-100: selection {unpruned['selection']:.4f}, test {unpruned['test']:.4f} "
          f"({time.perf_counter() - started:.0f} s incl. pretraining)", flush=True)
    genotype = MaskGenotype(shrink=args.shrink)  # shrink: only the GA's "shrink" mutation (floor) reads it
    genotype.bind(module)
    floor = round(unpruned["selection"] - FLOOR_BELOW, 4)
    objectives = {"sparsity": AccuracyAtSparsity(SPARSITY), "floor": SmallestAboveFloor(floor)}
    settings = {"population": args.population, "generations": args.generations, "sparsity_target": SPARSITY,
                "floor": floor, "retrain_steps": RETRAIN["steps"], "retrain_lr": RETRAIN["lr"],
                "mutation_rate": MUTATION_RATE, "pretrain": records.format_params(PRETRAIN),
                "data": records.format_params(DATA), "unpruned_selection_acc": round(unpruned["selection"], 5),
                "unpruned_test_acc": round(unpruned["test"], 5), "unpruned_params": int(genotype.original_size()),
                "ga_mutation": args.ga_mutation, "ga_seeded": int(not args.ga_no_seed), "shrink": args.shrink}
    appender = records.CsvAppender(args.out)
    rows = []
    for objective_name in args.objectives:
        for retrain in args.retrain:
            for seed in args.seeds:
                for method in args.methods:
                    row = run_one(module, genotype, data, method, objective_name, objectives[objective_name], retrain,
                                  seed, args.population, args.generations, args.ga_mutation, not args.ga_no_seed)
                    row = {**row, **settings, **info, "seconds": round(time.perf_counter() - started, 1)}
                    appender.append(row)
                    rows.append(row)
                    print(f"{objective_name:8s} retrain {retrain:2d} seed {seed} {method:9s} test {row['test_acc']:.4f} "
                          f"selection {row['selection_acc']:.4f} params {row['nonzero_params']:7d} "
                          f"evals {row['evaluations']:4d} {row['search_seconds']:6.1f} s", flush=True)
    print(f"\nmachine: {records.machine()}; total {time.perf_counter() - started:.0f} s; rows appended to {args.out}\n")
    print(summarise(rows))


if __name__ == "__main__":
    main()
