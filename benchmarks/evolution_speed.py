"""Speed of the evolutionary loop's evaluation (issue 10): full evaluation vs a hand-written loop,
the sparse-kernel crossover, and MACs / elite agreement of racing + activation cache in a GA.

    python -m benchmarks.evolution_speed [--device cuda] [--repeats 5] [--generations 10] [--only timing,crossover,ga]

Model: LeNet-300-100 trained for ``--epochs`` epochs (plain torch, Adam) on 8,000 images of the MNIST
t10k idx files (``../shared/data/mnist-t10k``, split by IdxDataModule seed 0); evaluation on the other
2,000 images. Population: 64 magnitude-biased masks (per layer, densities drawn from U(0.05, 0.5)).

* timing: seconds per full evaluation of the 64 masked copies (median of ``--repeats`` interleaved
  repeats): the hand loop ``x @ (w*m).T + b`` / relu on all 2,000 images at once (with accuracy and
  loss), PopulationEvaluator ``full`` (batch 500 and 2,000, sparse off), ``full`` + sparse kernels
  (default ``sparse_below``) and the vmapped batch. Target: evaluator full <= 1.2x the hand loop.
  With ``--device cuda`` (when ``torch.cuda.is_available()``) the same on the GPU, where the target is
  batched >= 10x the sequential loop; without a GPU those rows are recorded as skipped ('no GPU').
* crossover: full evaluation of 64 copies whose every layer keeps a fraction d of its weights, dense
  vs CSR kernels, for several d: where sparse starts to pay (sets DEFAULT_SPARSE_BELOW).
* ga: a 10-generation GA (the package's GeneticSearch: population 64, elite 4, tournament 3, no
  crossover, bit flips at rate 0.01 restricted to one layer per child; MaskGenotype; fitness
  AccuracyAtSparsity(0.9)). Every generation's new individuals are evaluated twice: ``full`` without
  cache (the reference) and ``race`` + cache (protect = elite), which the run follows. Recorded: MACs
  of each, and whether the selected elite (top-4 set) is the same.

Rows go to ``benchmarks/results/evolution_speed.csv`` (timing), ``evolution_speed_crossover.csv`` and
``evolution_speed_ga.csv`` (``--out-dir`` for others).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import records
from benchmarks.timing import interleaved_medians, machine, median
from growprune.data import IdxDataModule
from growprune.evolution.evaluator import DEFAULT_SPARSE_BELOW, PopulationEvaluator
from growprune.evolution.types import EvalRequest
from growprune.models.lenet import lenet_300_100

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
LAYERS = ("1.weight", "3.weight", "5.weight")


# ----------------------------------------------------------------------------------------- data
def load_mnist(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train (8,000) and evaluation (2,000) tensors of the MNIST t10k files, normalised."""
    data = IdxDataModule(str(DATA / "t10k-images-idx3-ubyte.gz"), str(DATA / "t10k-labels-idx1-ubyte.gz"),
                         val_fraction=0.2, seed=seed)
    data.setup()

    def tensors(subset) -> tuple[torch.Tensor, torch.Tensor]:
        images = subset.images.float().div(255.0).sub(subset.mean).div(subset.std).unsqueeze(1)
        return images, subset.labels.long()

    return (*tensors(data.train_set), *tensors(data.val_set))


def train(inputs: torch.Tensor, targets: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    """LeNet-300-100, initialised and shuffled from ``seed``'s generator, Adam lr 1e-3, batch 128."""
    generator = torch.Generator().manual_seed(seed)
    model = lenet_300_100()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 2 * bound - bound)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 2 * bound - bound)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), 128):
            batch = order[start:start + 128]
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return model.eval()


def magnitude_masks(model: nn.Module, count: int, rng: np.random.Generator, low: float = 0.05,
                    high: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """Masks keeping, per layer, the top ``density`` by |w| rank plus noise (density ~ U(low, high))."""
    population = []
    for _ in range(count):
        masks = {}
        for name in LAYERS:
            weight = model.get_parameter(name).detach()
            rank = weight.abs().flatten().argsort().argsort().double().numpy() / (weight.numel() - 1)
            score = rank + rng.normal(0.0, 0.3, rank.size)
            keep = int(round(rng.uniform(low, high) * rank.size))
            mask = np.zeros(rank.size, dtype=np.float32)
            mask[np.argsort(-score)[:keep]] = 1.0
            masks[name] = torch.from_numpy(mask).view(weight.shape)
        population.append(masks)
    return population


def uniform_density_masks(model: nn.Module, count: int, density: float, rng: np.random.Generator) -> list[dict]:
    return [{name: torch.from_numpy((rng.random(model.get_parameter(name).shape) < density).astype(np.float32))
             for name in LAYERS} for _ in range(count)]


# -------------------------------------------------------------------------------------- timing
def hand_loop(model: nn.Module, population: list[dict], x: torch.Tensor, y: torch.Tensor,
              sync: Callable[[], None]) -> Callable[[], float]:
    """The reference: per member, three masked dense matmuls on all images, argmax and loss."""
    layers = [model.get_submodule(name.rpartition(".")[0]) for name in LAYERS]
    weights = [(layer.weight.detach(), layer.bias.detach()) for layer in layers]
    flat = x.flatten(1)
    device_masks = [[m[name].to(x.device) for name in LAYERS] for m in population]

    def run() -> float:
        start = time.perf_counter()
        results = []
        with torch.no_grad():
            for masks in device_masks:
                h = flat
                for i, ((w, b), m) in enumerate(zip(weights, masks)):
                    h = h @ (w * m).T + b
                    if i < len(weights) - 1:
                        h = torch.relu(h)
                results.append((int((h.argmax(1) == y).sum()), float(F.cross_entropy(h, y, reduction="sum"))))
        sync()
        return time.perf_counter() - start

    return run


def evaluator_run(evaluator: PopulationEvaluator, requests: list[EvalRequest],
                  sync: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        evaluator.evaluate(requests)
        sync()
        return time.perf_counter() - start

    return run


def timing_settings(device: str, members: int, images: int, repeats: int) -> dict:
    return {"device": device, "members": members, "images": images, "model": "lenet_300_100",
            "densities": "magnitude-biased U(0.05,0.5) per layer", "repeats": repeats,
            "statistic": "median over repeats of seconds per full evaluation"}


def timing(model, x, y, population, device: str, repeats: int, env: dict, out: Path) -> list[str]:
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    model = copy.deepcopy(model).to(device)  # nn.Module.to works in place: keep the CPU model for the rest
    xd, yd = x.to(device), y.to(device)
    requests = [EvalRequest(key=str(k), masks=m) for k, m in enumerate(population)]
    variants: dict[str, Callable[[], float]] = {"hand loop (dense matmuls)": hand_loop(model, population, xd, yd, sync)}
    configs = {"evaluator full, batch 500": dict(batch_size=500, sparse_below=0.0, batched=False),
               "evaluator full, batch 2000": dict(batch_size=2000, sparse_below=0.0, batched=False),
               f"evaluator full + sparse (sparse_below {DEFAULT_SPARSE_BELOW})": dict(batch_size=500, batched=False),
               "evaluator full, vmap batch": dict(batch_size=500, batched=True)}
    for label, config in configs.items():
        evaluator = PopulationEvaluator(method="full", cache=False, device=device, **config)
        evaluator.bind(model, xd, yd)
        variants[label] = evaluator_run(evaluator, requests, sync)
    for run in variants.values():  # warm-up (allocations, kernels)
        run()
    samples = interleaved_medians(variants, repeats)
    reference = median(samples["hand loop (dense matmuls)"])
    loop = median(samples["evaluator full, batch 500"])
    lines = [f"| {device} | {label} | {median(values):.3f} | {median(values) / reference:.2f}x | "
             f"{loop / median(values):.2f}x |" for label, values in samples.items()]
    settings = timing_settings(device, len(population), len(y), repeats)
    rows = records.sample_rows({(device, label): values for label, values in samples.items()}, ("device_run", "variant"),
                               "seconds", settings, env, scale=1.0)
    lines.append(records.save_rows(out, rows))
    return lines


def crossover(model, x, y, repeats: int, env: dict, out: Path, rng: np.random.Generator) -> list[str]:
    densities = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12)
    samples, lines = {}, []
    for density in densities:
        requests = [EvalRequest(key=str(k), masks=m) for k, m in enumerate(uniform_density_masks(model, 64, density, rng))]
        variants = {}
        for kernel, below in (("dense", 0.0), ("csr", 1.0)):
            evaluator = PopulationEvaluator(method="full", cache=False, sparse_below=below, batched=False)
            evaluator.bind(model, x, y)
            variants[kernel] = evaluator_run(evaluator, requests, lambda: None)
            variants[kernel]()
        measured = interleaved_medians(variants, repeats)
        for kernel, values in measured.items():
            samples[(density, kernel)] = values
        dense, csr = median(measured["dense"]), median(measured["csr"])
        lines.append(f"| {density:.3f} | {dense:.3f} | {csr:.3f} | {dense / csr:.2f}x |")
    settings = {"members": 64, "images": len(y), "model": "lenet_300_100", "repeats": repeats,
                "statistic": "median over repeats of seconds per full evaluation (every layer at the density)"}
    rows = records.sample_rows(samples, ("density", "kernel"), "seconds", settings, env, scale=1.0)
    lines.append(records.save_rows(out, rows))
    return lines


# ------------------------------------------------------------------------------------------ GA
def ga(model, x, y, generations: int, seed: int, env: dict, out: Path, threads: int | None) -> list[str]:
    from growprune import GrowPruneModule
    from growprune.evolution.genotypes import MaskGenotype
    from growprune.evolution.objectives import AccuracyAtSparsity
    from growprune.evolution.search import GeneticSearch

    module = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 28, 28))
    module.model.load_state_dict(model.state_dict())
    genotype = MaskGenotype(layers_per_mutation=1)
    genotype.bind(module)
    objective = AccuracyAtSparsity(sparsity=0.9)
    elite = 4
    search = GeneticSearch(population=64, elite=elite, tournament=3, crossover_rate=0.0, mutation="flip",
                           mutation_rate=0.01, initial="magnitude", initial_density=None)
    search.start(genotype, objective, np.random.default_rng(seed))
    original = genotype.original_size("params")
    full = PopulationEvaluator(method="full", cache=False, threads=threads)
    race = PopulationEvaluator(method="race", cache=True, threads=threads)
    known_race = PopulationEvaluator(method="race", cache=True, threads=threads)
    for evaluator in (full, race, known_race):
        evaluator.bind(module.model, x, y)
    def score(accuracy: float, size: float) -> float:
        return objective.race_score(accuracy, size, original)
    rows, lines, agree, agree_known = [], [], 0, 0
    spent_total = full_total = known_total = 0
    for generation in range(generations):
        individuals = search.ask()
        new = [i for i in individuals if not i.evaluated]
        requests = [EvalRequest(key=i.key, masks=genotype.masks(i.genome), parent_key=i.extra.get("parent_key"),
                                changed=i.changed, size=genotype.size(i.genome, "params")) for i in new]
        timings, results = {}, {}
        carried = [i.fitness[0] for i in individuals if i.evaluated]
        for name, evaluator, known in (("full", full, []), ("race", race, []), ("known", known_race, carried)):
            start = time.perf_counter()
            results[name] = evaluator.evaluate(requests, score=score, protect=elite, known=known)
            timings[name] = time.perf_counter() - start
        elites = {}
        for name in ("full", "race", "known"):
            scored = [(i.fitness[0], i.key) for i in individuals if i.evaluated]
            scored += [(score(r.accuracy, q.size), q.key) for q, r in zip(requests, results[name])]
            ranked = sorted(range(len(scored)), key=lambda j: (-scored[j][0], j))
            elites[name] = {scored[j][1] for j in ranked[:elite]}
        same = elites["full"] == elites["race"]
        same_known = elites["full"] == elites["known"]
        agree += same
        agree_known += same_known
        spent = sum(r.macs for r in results["race"])
        spent_known = sum(r.macs for r in results["known"])
        known_total += spent_known
        reference = sum(r.macs for r in results["full"])
        assert reference == full.macs_full(requests)  # the evaluator's own reference agrees with what full spent
        dense_reference = len(requests) * len(y) * full._dense_macs
        spent_total += spent
        full_total += reference
        for individual, request, result in zip(new, requests, results["race"]):
            individual.accuracy, individual.loss, individual.size = result.accuracy, result.loss, request.size
            individual.exact, individual.samples, individual.macs = result.exact, result.samples, result.macs
            individual.fitness = objective.fitness(result.accuracy, request.size, original)
        search.tell(individuals)
        best = max(individuals, key=lambda i: i.fitness[0])
        dropped = sum(not r.exact for r in results["race"])
        rows.append({"generation": generation, "evaluated": len(new), "dropped": dropped,
                     "macs_race_cache": spent, "macs_full": reference, "macs_full_dense": dense_reference,
                     "ratio": round(reference / spent, 3), "same_elite": int(same),
                     "macs_race_cache_known": spent_known, "ratio_known": round(reference / spent_known, 3),
                     "same_elite_known": int(same_known), "dropped_known": sum(not r.exact for r in results["known"]),
                     "seconds_race_cache_known": round(timings["known"], 4),
                     "seconds_full": round(timings["full"], 4), "seconds_race_cache": round(timings["race"], 4),
                     "best_fitness": round(best.fitness[0], 5), "best_accuracy": best.accuracy,
                     "best_density": round(genotype.density(best.genome), 4),
                     "cache_bytes": race._cache.bytes, "population": 64, "elite": elite, "tournament": 3,
                     "mutation": "flip 0.01, one layer per child", "crossover_rate": 0.0,
                     "objective": "AccuracyAtSparsity(0.9)", "confidence": race.confidence,
                     "first_fraction": race.first_fraction, "images": len(y), "seed": seed, **env})
        lines.append(f"| {generation} | {len(new)} | {reference / 1e9:.2f} | {dropped} | {spent / 1e9:.2f} | "
                     f"{reference / spent:.2f}x | {'yes' if same else 'NO'} | {rows[-1]['dropped_known']} | "
                     f"{spent_known / 1e9:.2f} | {reference / spent_known:.2f}x | {'yes' if same_known else 'NO'} | "
                     f"{timings['full']:.2f} | {timings['race']:.2f} | {timings['known']:.2f} | "
                     f"{best.accuracy:.4f} @ {genotype.density(best.genome):.3f} |")
    lines.append(f"total: {full_total / 1e9:.2f} G MACs full vs {spent_total / 1e9:.2f} G race+cache = "
                 f"{full_total / spent_total:.2f}x fewer, same elite in {agree}/{generations} generations; with the "
                 f"carried elites' scores known: {known_total / 1e9:.2f} G = {full_total / known_total:.2f}x fewer, "
                 f"same elite in {agree_known}/{generations}")
    lines.append(records.save_rows(out, rows))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda rows are skipped without a GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set, 2 here)")
    parser.add_argument("--only", default="timing,crossover,ga")
    parser.add_argument("--out-dir", type=Path, default=records.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.only.split(","))
    env = records.run_info()
    print(f"machine: {machine()}; load average at start {os.getloadavg()}")
    train_x, train_y, x, y = load_mnist(args.seed)
    model = train(train_x, train_y, args.epochs, args.seed)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    print(f"LeNet-300-100 trained {args.epochs} epochs on {len(train_y)} images: {accuracy:.4f} on the {len(y)} evaluated")
    rng = np.random.default_rng(args.seed)
    population = magnitude_masks(model, 64, rng)
    if "timing" in parts:
        print("\n| device | variant | s per full evaluation (64 x 2,000) | vs hand loop | speed-up vs evaluator loop |")
        print("| --- | --- | --- | --- | --- |")
        for line in timing(model, x, y, population, "cpu", args.repeats, env, args.out_dir / "evolution_speed.csv"):
            print(line)
        if args.device.startswith("cuda"):
            if torch.cuda.is_available():
                for line in timing(model, x, y, population, args.device, args.repeats, env,
                                   args.out_dir / "evolution_speed.csv"):
                    print(line)
            else:
                print(f"| {args.device} | all | skipped: no GPU | - | - |")
                skipped = {"device_run": args.device, "variant": "all: skipped (no GPU)", "repeat": 0, "seconds": "",
                           **timing_settings(args.device, len(population), len(y), args.repeats), **env}
                print(records.save_rows(args.out_dir / "evolution_speed.csv", [skipped]))
    if "crossover" in parts:
        print("\n| density (every layer) | dense s | CSR s | CSR speed-up |")
        print("| --- | --- | --- | --- |")
        for line in crossover(model, x, y, args.repeats, env, args.out_dir / "evolution_speed_crossover.csv", rng):
            print(line)
    if "ga" in parts:
        print("\n| generation | evaluated | G MACs full | race+cache: dropped | G MACs | fewer | same elite | "
              "+known elites: dropped | G MACs | fewer | same elite | s full | s race+cache | s +known | "
              "best acc @ density |")
        print("| --- " * 15 + "|")
        for line in ga(model, x, y, args.generations, args.seed, env, args.out_dir / "evolution_speed_ga.csv",
                       args.threads):
            print(line)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
