"""Wall time of one GA run on each engine: in-process, a 2-process pool, Ray with 2 CPUs.

    python -m benchmarks.evolution_ray [--population 16] [--generations 6] [--retrain 10] [--repeats 1]

The run: LeNet-300-100 pretrained as in ``benchmarks/evolution_baselines.py`` (MNIST idx digits,
6,000 train / 2,000 selection), ``MaskGenotype``, ``GeneticSearch(population, elite=2)``,
``AccuracyAtSparsity(0.8)``, racing evaluator with ``retrain_steps=20`` on ``--retrain`` training
images per class (so each evaluation is a few hundred ms and the engines have work to share),
``chunks=2`` (fixed: every engine evaluates the same two chunks per generation). Engines:
``LocalEngine(workers=1)``, ``LocalEngine(workers=2, threads=1)`` and ``RayEngine(num_cpus=2,
threads=1)``; wall time includes starting (and stopping) the pool / Ray session. The final best
genome, its accuracy and every generation's record must be identical across engines (asserted;
the run stops otherwise). Rows are appended to ``benchmarks/results/evolution_ray.csv``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks import records
from benchmarks.evolution_baselines import PRETRAIN, RETRAIN, SPARSITY, load_data, make_evaluator, make_search, pretrain
from growprune.evolution.data import images_per_class
from growprune.evolution.engines import Engine, LocalEngine, RayEngine
from growprune.evolution.genotypes import MaskGenotype
from growprune.evolution.loop import evolve
from growprune.evolution.objectives import AccuracyAtSparsity

ENGINES: dict[str, Callable[[], Engine]] = {
    "local-1": lambda: LocalEngine(workers=1, threads=1),
    "local-pool-2": lambda: LocalEngine(workers=2, threads=1),
    "ray-2": lambda: RayEngine(num_cpus=2, threads=1),
}


def run(engine_name: str, module: Any, genotype: MaskGenotype, data: dict, args: argparse.Namespace) -> dict[str, Any]:
    objective = AccuracyAtSparsity(SPARSITY)
    retrain_data = images_per_class(*data["train"], args.retrain, torch.Generator().manual_seed(0)) if args.retrain else ()
    evaluator = make_evaluator(args.retrain)
    evaluator.bind(module.model, *data["selection"], *retrain_data)
    search = make_search("ga", "sparsity", args.population, args.generations)
    search.start(genotype, objective, np.random.default_rng(0))
    rows: list = []
    started = time.perf_counter()
    engine = ENGINES[engine_name]()
    ready = time.perf_counter()
    try:
        evolve(search, genotype, objective, evaluator, engine, args.generations, chunks=2, on_generation=rows.append,
               protect=2)
    finally:
        engine.close()
    finished = time.perf_counter()
    return {"engine": engine_name, "wall_seconds": round(finished - started, 2),
            "startup_seconds": round(ready - started, 2), "best_key": search.best().key,
            "best_accuracy": search.best().accuracy, "evaluations": rows[-1].evaluations_total,
            "records": [{k: v for k, v in r.as_row().items()} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--retrain", type=int, default=10, help="training images per class retrained on (0: none)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--out", type=Path, default=records.results_path("evolution_ray"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = records.run_info()
    data = load_data()
    module = pretrain(data["train"])
    genotype = MaskGenotype()
    genotype.bind(module)
    results = []
    for repeat in range(args.repeats):
        for name in args.engines:
            result = run(name, module, genotype, data, args)
            results.append(result)
            print(f"repeat {repeat} {name:13s} wall {result['wall_seconds']:7.2f} s (engine start "
                  f"{result['startup_seconds']:.2f} s) best accuracy {result['best_accuracy']:.4f} "
                  f"evaluations {result['evaluations']}", flush=True)
    reference = results[0]
    for result in results[1:]:
        if result["best_key"] != reference["best_key"] or result["records"] != reference["records"]:
            raise SystemExit(f"error: {result['engine']} differs from {reference['engine']}: "
                             f"best {result['best_key']} vs {reference['best_key']}")
    print("identical best genome and generation records on every engine")
    settings = {"population": args.population, "generations": args.generations, "chunks": 2, "retrain_per_class": args.retrain,
                "retrain_steps": RETRAIN["steps"] if args.retrain else 0, "pretrain": records.format_params(PRETRAIN),
                "identical": 1}
    rows = [{"engine": r["engine"], "repeat": i // len(args.engines), "wall_seconds": r["wall_seconds"],
             "startup_seconds": r["startup_seconds"], "evaluations": r["evaluations"],
             "best_accuracy": round(r["best_accuracy"], 5), "best_key": r["best_key"], **settings, **info}
            for i, r in enumerate(results)]
    print(records.save_rows(args.out, rows))
    print(f"machine: {records.machine()}, load at start {info['load_start']}")


if __name__ == "__main__":
    main()
