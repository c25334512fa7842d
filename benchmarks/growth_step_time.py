"""Time of one growth step (surgery + optimizer repair + initialiser) on VGG-16-BN and ResNet-56.

    python -m benchmarks.growth_step_time [--repeats 3] [--threads N] [--batch 64] [--grow 0.1]
                                          [--methods random gradmax gradmax_opt firefly]

(run from the repository root.) Each repeat builds a fresh ``GrowPruneModule`` (seed 0, CIFAR size
3x32x32, SGD with momentum whose state is filled by one training step) and times, for every
initialiser in its default (safe) form with its default settings, one growth step that widens every
channel group by ``--grow`` (10 %, at least one channel / the group's step) on one random batch of
``--batch`` examples:

* ``surgery``: ``ChannelGraph.add`` (the graph itself is built once per model, reported as ``graph``);
* ``repair``: ``configure_optimizers`` + ``carry_optimizer_state`` (zero-padded state for new entries);
* ``units``: ``new_units``;
* ``init``: ``initializer.initialize``, of which ``probe`` (``group_units``: one forward-mode pass per
  producing layer), ``gradient norm`` (the statistic every initialiser returns: one forward/backward)
  and the rest, the method itself (GradMax: subspace iteration on the mixed Hessian, two backward
  passes per round; GradMax-Opt: a double-backward per step; Firefly: forward/backward per descent
  step and candidate round);
* ``step`` = surgery + repair + units + init (the target for ``random``: under 1 s on 2 cores).

Prints a Markdown table of medians (min-max) in ms and appends every measurement to
``benchmarks/results/growth_step_time.csv``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import growprune.growth.initializers as initializers_module
from benchmarks import records
from benchmarks.timing import machine, timed_attribute
from growprune import GrowPruneModule
from growprune.growth import Firefly, GradMax, GradMaxOpt, RandomInit, new_units
from growprune.surgery.channels import ChannelGraph
from growprune.surgery.optimizer import carry_optimizer_state

INPUT_SHAPE = (3, 32, 32)
MODELS = {"vgg16_bn": {}, "resnet56": {"shortcut": "B"}}
METHODS: dict[str, Callable[[], Any]] = {"random": RandomInit, "gradmax": GradMax, "gradmax_opt": GradMaxOpt, "firefly": Firefly}


def make_module(arch: str) -> GrowPruneModule:
    torch.manual_seed(0)
    return GrowPruneModule(arch, arch_kwargs=MODELS[arch], num_classes=10, input_shape=INPUT_SHAPE,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, *INPUT_SHAPE, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def one_step(arch: str, method: str, batch_size: int, grow: float, statistic: bool = True) -> dict[str, float]:
    module = make_module(arch)
    optimizer = module.configure_optimizers()
    inputs, targets = batch(batch_size)
    module.train()
    F.cross_entropy(module(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times: dict[str, float] = {}
    start = time.perf_counter()
    graph = ChannelGraph(module.model, module.example_inputs())
    times["graph"] = time.perf_counter() - start
    plan = {group.root: max(group.step, int(round(group.channels * grow / group.step)) * group.step) for group in graph.groups()}

    start = time.perf_counter()
    changes = graph.add(plan)
    times["surgery"] = time.perf_counter() - start

    start = time.perf_counter()
    new_optimizer = module.configure_optimizers()
    parameters = dict(module.model.named_parameters())
    carry_optimizer_state(optimizer, new_optimizer, {parameters[name]: change for name, change in changes.items() if name in parameters})
    times["repair"] = time.perf_counter() - start

    start = time.perf_counter()
    units = new_units(module.model, changes)
    times["units"] = time.perf_counter() - start

    initializer = METHODS[method]()
    with timed_attribute(initializers_module, "group_units", times, "probe"), \
            timed_attribute(initializers_module, "new_unit_gradient_norm", times, "gradient norm"):
        start = time.perf_counter()
        # without the statistic a data-free initialiser gets no batches (ChannelGrowth's scoring_batches: 0)
        stats = initializer.initialize(module.model, units, [(inputs, targets)] if statistic else None)
        times["init"] = time.perf_counter() - start
    times.setdefault("probe", 0.0)
    times.setdefault("gradient norm", 0.0)
    times["method"] = times["init"] - times["probe"] - times["gradient norm"]
    times["step"] = times["surgery"] + times["repair"] + times["units"] + times["init"]
    times["added"] = float(sum(plan.values()))
    times["groups"] = float(len(plan))
    times["gradient_norm_value"] = float(stats["gradient_norm"])
    return times


def cell(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.0f} ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--grow", type=float, default=0.1, help="fraction of channels added to every group")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=records.results_path("growth_step_time"))
    parser.add_argument("--without-statistic", action="store_true",
                        help="give data-free initialisers no batches, so no gradient_norm pass (ChannelGrowth with scoring_batches: 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = records.run_info()
    print(f"machine: {machine()}, load average {env['load_start']} at start")
    print(f"one growth step: every group +{args.grow:.0%}, batch {args.batch} of random 3x32x32, safe forms, default "
          f"settings; {args.repeats} repeats, fresh model each; ms: median (min-max)")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for arch in args.models:
            for method in args.methods:
                if args.without_statistic and METHODS[method]().requires_data:
                    parser.error(f"--without-statistic: {method} needs batches")
                times = one_step(arch, method, args.batch, args.grow, statistic=not args.without_statistic)
                results.setdefault((arch, method), []).append(times)
                print(f"  {arch} {method} repeat {repeat}: " + ", ".join(f"{key} {value * 1e3:.0f} ms" for key, value in times.items()
                                                                      if key not in ("added", "groups", "gradient_norm_value")),
                      flush=True)
    phases = ["surgery", "repair", "units", "probe", "gradient norm", "method", "init", "step"]
    print()
    print("| model | initialiser | groups | channels added | " + " | ".join(phases) + " | dominated by |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in phases) + " | --- |")
    for (arch, method), runs in results.items():
        parts = {phase: statistics.median(r[phase] for r in runs) for phase in ("surgery", "repair", "units", "probe", "gradient norm", "method")}
        top = max(parts, key=parts.get)
        print(f"| {arch} | {method} | {runs[0]['groups']:.0f} | {runs[0]['added']:.0f} | "
              + " | ".join(cell([r[p] for r in runs]) for p in phases) + f" | {top} ({parts[top] / sum(parts.values()):.0%}) |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    settings = {"input": "3x32x32", "batch_size": args.batch, "grow": args.grow, "form": "safe", "repeats": args.repeats,
                "optimizer": "SGD lr=0.01 momentum=0.9", "statistic": not args.without_statistic}
    rows = [{"model": arch, "initializer": method, "repeat": repeat, "phase": phase,
             "value": round(value * 1e3, 3) if phase not in ("added", "groups", "gradient_norm_value") else round(value, 6),
             "unit": "ms" if phase not in ("added", "groups", "gradient_norm_value") else "-", **settings, **env}
            for (arch, method), runs in results.items() for repeat, times in enumerate(runs) for phase, value in times.items()]
    print(f"commit {env['commit']}; {records.save_rows(args.out, rows)}")


if __name__ == "__main__":
    main()
