"""Cost of the genotype operations a generation calls per child (issue 10).

    python -m benchmarks.evolution_genotype_ops [--threads 1] [--calls 20]

LeNet-300-100 (28x28 inputs) with a ``MaskGenotype`` of 266,200 genes: initial genomes, every
mutation kind, both crossovers, ``size`` (closed form), ``masks`` and ``decode``; ResNet-20
(shortcut B, 3x32x32) with a ``WidthGenotype``: bind, ``size``, ``decode``. Each time is the best of
``--calls`` calls (load only ever adds time). Rows go to benchmarks/results/evolution_genotype_ops.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.records import machine, results_path, run_info, save_rows
from growprune import GrowPruneModule
from growprune.evolution import MaskGenotype, WidthGenotype


def best_ms(function: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=str(results_path("evolution_genotype_ops")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = run_info()
    rng = np.random.default_rng(0)
    times: dict[tuple[str, str], float] = {}

    lenet = GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 28, 28))
    masks = MaskGenotype()
    masks.bind(lenet)
    a, b = masks.initial(rng, "magnitude", density=0.2), masks.initial(rng, "magnitude", density=0.2)
    operations: dict[str, Callable[[], object]] = {
        "initial uniform": lambda: masks.initial(rng),
        "initial magnitude": lambda: masks.initial(rng, "magnitude"),
        **{f"mutate {kind} (rate 0.01)": (lambda kind=kind: masks.mutate(a, rng, 0.01, kind)) for kind in masks.mutation_kinds},
        "crossover uniform": lambda: masks.crossover(a, b, rng),
        "crossover layer": lambda: masks.crossover(a, b, rng, "layer"),
        "size params": lambda: masks.size(a),
        "size macs": lambda: masks.size(a, "macs"),
        "masks": lambda: masks.masks(a),
        "decode": lambda: masks.decode(lenet, a),
    }
    for name, operation in operations.items():
        times[("lenet_300_100 MaskGenotype", name)] = best_ms(operation, args.calls)

    resnet = GrowPruneModule("resnet20", arch_kwargs={"shortcut": "B"}, num_classes=10, input_shape=(3, 32, 32))
    widths = WidthGenotype()
    start = time.perf_counter()
    widths.bind(resnet)
    times[("resnet20 WidthGenotype", "bind")] = (time.perf_counter() - start) * 1e3
    genome = widths.initial(rng)
    times[("resnet20 WidthGenotype", "size params")] = best_ms(lambda: widths.size(genome), args.calls)
    times[("resnet20 WidthGenotype", "size macs")] = best_ms(lambda: widths.size(genome, "macs"), args.calls)
    times[("resnet20 WidthGenotype", "decode")] = best_ms(lambda: widths.decode(resnet, genome), max(3, args.calls // 5))

    print(machine())
    print(f"{'genotype':<28} {'operation':<30} {'ms':>9}")
    for (genotype, name), milliseconds in times.items():
        print(f"{genotype:<28} {name:<30} {milliseconds:>9.2f}")
    rows = [{"genotype": genotype, "operation": name, "best_ms": round(ms, 4), "calls": args.calls,
             "genes": masks.length if genotype.startswith("lenet") else widths.length, **env}
            for (genotype, name), ms in times.items()]
    print(save_rows(Path(args.out), rows))


if __name__ == "__main__":
    main()
