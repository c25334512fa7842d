"""Cost of unit graphs and their network-science measures (growprune.graph), and of the information measures.

    python -m benchmarks.graph_measures [--repeats 3] [--threads 1] [--models lenet300,vgg16,...]
                                        [--policy-calls 200] [--out CSV]

(run from the repository root.) For each network: the time of ``unit_graph`` (trace + run on one
example + edge construction), of every measure in ``growprune.graph.MEASURES`` computed alone on
a cold graph (the graph's caches are cleared before each one, so shared work such as the
input->output distances is counted in every measure that needs it), of all measures together
(``graph_measures``, caches shared) and of all but modularity. Medians over ``--repeats``.

Networks: LeNet-300-100 dense and with random 90 % weight masks (seeded), LeNet-5, VGG-16-BN
(growprune's CIFAR VGG: 3x3 convs, global pool, one Linear classifier; 32x32 input) dense, with
half of every conv's channels removed (``ChannelGraph.remove``, random channels, seeded) and with
random 90 % weight masks, ResNet-20 (option-A shortcuts). Plus a small MLP policy graph
8-16-16-4 (448 edges, ``unit_graph_from_weights``) as control tasks build it for every evaluation:
its per-call times are means over ``--policy-calls`` calls, median over repeats. On the dense
VGG-16 graph also Louvain alone with networkx's ``threshold`` / ``max_level`` variants. And
``information_measures`` on LeNet-300-100 / LeNet-5 with 1,000 random probe images.

Rows (one per network x measure, seconds) are appended to ``benchmarks/results/graph_measures.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks import records
from growprune.graph import (MEASURES, UnitGraph, graph_measures, louvain_modularity, unit_graph,
                             unit_graph_from_weights)
from growprune.information import information_measures
from growprune.models import create_model

MODELS = ("lenet300", "lenet300_masks90", "lenet5", "vgg16", "vgg16_channels50", "vgg16_masks90", "resnet20")


def _random_masks(model: torch.nn.Module, keep: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"{name}.weight": (torch.rand(module.weight.shape, generator=generator) < keep).float()
            for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def _network(key: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor] | None]:
    torch.manual_seed(0)  # the benchmark process owns its global seed: the same weights in every run
    if key.startswith("lenet300"):
        model, example = create_model("lenet_300_100"), torch.zeros(1, 1, 28, 28)
    elif key == "lenet5":
        model, example = create_model("lenet5"), torch.zeros(1, 1, 28, 28)
    elif key.startswith("vgg16"):
        model, example = create_model("vgg16_bn"), torch.zeros(1, 3, 32, 32)
    elif key == "resnet20":
        model, example = create_model("resnet20"), torch.zeros(1, 3, 32, 32)
    else:
        raise ValueError(f"unknown network {key!r}; valid: {', '.join(MODELS)}")
    masks = _random_masks(model, 0.1, seed=1) if key.endswith("masks90") else None
    if key.endswith("channels50"):
        from growprune.surgery.channels import ChannelGraph

        channels = ChannelGraph(model, example)
        rng = np.random.default_rng(2)
        plan = {group.root: sorted(rng.choice(group.channels, group.channels // 2, replace=False).tolist())
                for group in channels.groups()}
        channels.remove(plan)
    return model, example, masks


def _timed(function: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _measure_rows(name: str, build: Callable[[], UnitGraph], repeats: int, calls: int = 1) -> list[dict]:
    samples: dict[str, list[float]] = {}
    values: dict[str, float] = {}
    graph = None
    for _ in range(repeats):
        seconds = []
        for _ in range(calls):
            elapsed, graph = _timed(build)
            seconds.append(elapsed)
        samples.setdefault("build", []).append(statistics.fmean(seconds))
        for measure in MEASURES:
            seconds = []
            for _ in range(calls):
                graph._cache.clear()
                elapsed, value = _timed(lambda: MEASURES[measure](graph, 0))
                seconds.append(elapsed)
            samples.setdefault(measure, []).append(statistics.fmean(seconds))
            values[measure] = float(value)
        for label, names in (("all", None), ("all_but_modularity", [m for m in MEASURES if m != "modularity"])):
            seconds = []
            for _ in range(calls):
                graph._cache.clear()
                elapsed, _ = _timed(lambda: graph_measures(graph, names, seed=0))
                seconds.append(elapsed)
            samples.setdefault(label, []).append(statistics.fmean(seconds))
        print(f"  {name}: build {samples['build'][-1]:.3f}s, all {samples['all'][-1]:.3f}s, "
              f"modularity {samples['modularity'][-1]:.3f}s", flush=True)
    return [{"network": name, "num_units": graph.num_units, "num_edges": graph.num_edges, "measure": measure,
             "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
             "calls_per_repeat": calls, "value": values.get(measure, "")} for measure, times in samples.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (BLAS threads: set OMP_NUM_THREADS)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--policy-calls", type=int, default=200)
    parser.add_argument("--no-louvain-options", dest="louvain_options", action="store_false",
                        help="skip timing Louvain's threshold / max_level variants on the dense VGG-16 graph")
    parser.add_argument("--out", type=Path, default=records.results_path("graph_measures"))
    args = parser.parse_args(argv)
    keys = [key for key in args.models.split(",") if key]
    unknown = [key for key in keys if key not in MODELS]
    if unknown or args.repeats < 1 or args.policy_calls < 1:
        parser.error(f"unknown network(s) {unknown} (valid: {', '.join(MODELS)}) or repeats/policy-calls < 1")
    torch.set_num_threads(args.threads)
    info = records.run_info()
    rows: list[dict] = []
    for key in keys:
        model, example, masks = _network(key)
        print(f"{key}:", flush=True)
        rows += _measure_rows(key, lambda: unit_graph(model, example, masks=masks), args.repeats)
    if "vgg16" in keys and args.louvain_options:
        # How networkx Louvain's parameters change its time on the dense VGG-16 graph (1.64M edges).
        model, example, masks = _network("vgg16")
        graph = unit_graph(model, example, masks=masks)
        for threshold, max_level in ((1e-7, None), (1e-7, 1), (1e-3, None), (1e-2, None)):
            times, value = [], float("nan")
            for _ in range(args.repeats):
                graph._cache.clear()
                elapsed, value = _timed(lambda: louvain_modularity(graph, 0, threshold=threshold, max_level=max_level))
                times.append(elapsed)
            print(f"  louvain threshold={threshold} max_level={max_level}: {statistics.median(times):.2f}s "
                  f"modularity {value:.4f}", flush=True)
            rows.append({"network": "vgg16", "num_units": graph.num_units, "num_edges": graph.num_edges,
                         "measure": f"modularity[threshold={threshold},max_level={max_level}]",
                         "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                         "repeats": args.repeats, "calls_per_repeat": 1, "value": value})
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=shape) for shape in ((16, 8), (16, 16), (4, 16))]
    print("policy 8-16-16-4:", flush=True)
    rows += _measure_rows("policy_8_16_16_4", lambda: unit_graph_from_weights(weights), args.repeats,
                          calls=args.policy_calls)
    for key, shape in (("lenet300", (1000, 1, 28, 28)), ("lenet5", (1000, 1, 28, 28))):
        model, _, _ = _network(key)
        generator = torch.Generator().manual_seed(4)
        inputs, targets = torch.rand(shape, generator=generator), torch.randint(0, 10, (shape[0],), generator=generator)
        times = [_timed(lambda: information_measures(model, inputs, targets))[0] for _ in range(args.repeats)]
        rows.append({"network": key, "num_units": "", "num_edges": "", "measure": "information_measures_n1000",
                     "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "repeats": args.repeats, "calls_per_repeat": 1, "value": ""})
    rows = [{**info, **row} for row in rows]
    print("| network | units | edges | measure | median s |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['network']} | {row['num_units']} | {row['num_edges']} | {row['measure']} "
              f"| {row['median_s']:.4g} |")
    print(records.save_rows(args.out, rows))


if __name__ == "__main__":
    main()
