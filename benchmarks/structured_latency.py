"""CPU inference latency after structured (channel) pruning to half the FLOPs: does the FLOPs cut
turn into a latency cut? VGG-16-BN and ResNet-56 (shortcut B) on CIFAR-sized inputs, side by side.

    python -m benchmarks.structured_latency [--threads N] [--rounds 9] [--repeats-b1 30] [--repeats-b64 4] [--widths]

(run from the repository root.) Variants, all ``StructuredPruning(OneShot(amount=0.5), target="flops")`` driven
outside a Trainer (``check`` -> score every group -> ``plan`` -> ``ChannelGraph.remove``):

* ``global L1``: global ranking of normalised L1 filter norms (the default a user would pick);
* ``global L1, round_to=8``: the same with channel counts kept at multiples of 8;
* ``global L1 / latency cost, max 60 %``: global ranking of L1 scores divided by each channel's
  share of the measured batch-1 layer time, no group losing more than 60 % of its channels;
* ``uniform (scope=layer)``: every group loses the same fraction (Torch-Pruning-style reference);
* ``uniform 30 % channels``: ``scope="layer", target="channels", amount=0.3``, the setting of the
  Torch-Pruning anchor (CIFAR VGG-16-BN: 2.06x fewer FLOPs, 1.85x / 2.25x lower latency at batch
  1 / 64), for a like-for-like comparison.

Weights are random (seed 0; every variant starts from the same weights). Latency does not depend on
the weight values, but which channels global L1 ranking removes does: a trained network gives other
widths. Latency is ``growprune.metrics.measure_latency`` (eval mode, no grad, median of ``repeats``
forward passes after warm-up); all variants of one model are measured in interleaved rounds with a
rotating order, and the table gives the median of the round medians. Speed-up = dense / pruned
latency; ratio = speed-up / FLOPs reduction (1.0: latency falls exactly like FLOPs).
Target (issue): ratio >= 0.9 at batch 1 for globally ranked pruning.

On a machine shared with other jobs, more torch threads than idle cores measures the OS scheduler
(OpenMP threads wait for each other at every layer): pass ``--threads 1`` there, and compare
ratios only within one run (the load changes how much the dense model suffers from cache contention).

Every round's median (model x variant x batch x round, ms) is appended with the variant's options,
FLOPs, parameters and widths, the run's settings and the git commit to
``benchmarks/results/structured_latency.csv`` (``--out`` for another file).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks import records
from benchmarks.timing import interleaved_medians, machine, median
from growprune import GrowPruneModule
from growprune.metrics import count_parameters, dense_flops, measure_latency
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.surgery.channels import execution_order

INPUT_SHAPE = (3, 32, 32)
MODELS = {"vgg16_bn": {}, "resnet56": {"shortcut": "B"}}
VARIANTS = {
    "dense": None,
    "global L1": dict(amount=0.5, target="flops"),
    "global L1, round_to=8": dict(amount=0.5, target="flops", round_to=8),
    "global L1 / latency cost, max 60 %": dict(amount=0.5, target="flops", cost="latency", max_fraction=0.6),
    "uniform (scope=layer)": dict(amount=0.5, target="flops", scope="layer"),
    "uniform 30 % channels": dict(amount=0.3, target="channels", scope="layer"),
}


def make_module(arch: str) -> GrowPruneModule:
    torch.manual_seed(0)
    return GrowPruneModule(arch, arch_kwargs=MODELS[arch], num_classes=10, input_shape=INPUT_SHAPE)


def pruned(arch: str, options: dict | None) -> tuple[nn.Module, list[int]]:
    """The model pruned one-shot with ``options`` (``None``: dense), and its group widths in execution order."""
    module = make_module(arch)
    if options is None:
        return module.model.eval(), []
    options = dict(options)
    strategy = StructuredPruning(OneShot(amount=options.pop("amount")), verbose=False, **options)
    strategy.check(None, module)
    groups = strategy.graph.groups()
    scores = {group.root: strategy.criterion.score(strategy.graph, group) for group in groups}
    plan = strategy.plan(module, groups, scores, strategy.schedule.amount)
    strategy.graph.remove(plan)
    order = {name: index for index, name in enumerate(execution_order(module.model, torch.zeros(1, *INPUT_SHAPE)))}
    widths = [group.channels for group in sorted(strategy.graph.groups(), key=lambda g: order[g.root])]
    return module.model.eval(), widths


def spread(samples: list[float]) -> float:
    """Half the interquartile range of the round medians, in % of their median."""
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return 50 * (quartiles[2] - quartiles[0]) / median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (default: what torch picks on this machine)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median of round medians)")
    parser.add_argument("--repeats-b1", type=int, default=30, help="forward passes per round at batch 1")
    parser.add_argument("--repeats-b64", type=int, default=4, help="forward passes per round at batch 64")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64], choices=[1, 64])
    parser.add_argument("--widths", action="store_true", help="also print every variant's channel widths")
    parser.add_argument("--out", type=Path, default=records.results_path("structured_latency"),
                        help="CSV the raw samples are appended to (default: benchmarks/results/structured_latency.csv)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = records.run_info()
    rows = []
    print(f"machine: {machine()}, load average {env['load_start']} at start")
    print(f"input 3x32x32, random weights (seed 0); {args.rounds} interleaved rounds; per round "
          f"{args.repeats_b1} passes at batch 1, {args.repeats_b64} at batch 64;\nms: median of the round medians "
          "±half their interquartile range")
    print()
    print("| model | variant | GFLOPs | FLOPs red. | params red. | groups not /8 | b1 ms | b1 speed-up | b1 ratio "
          "| b64 ms | b64 speed-up | b64 ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    all_widths = {}
    for arch in args.models:
        models, widths, flops, params = {}, {}, {}, {}
        for variant, options in VARIANTS.items():
            models[variant], widths[variant] = pruned(arch, options)
            flops[variant] = dense_flops(models[variant], INPUT_SHAPE)
            params[variant] = count_parameters(models[variant])
        latency = {}
        settings = {1: (args.repeats_b1, 10), 64: (args.repeats_b64, 2)}
        for batch, (repeats, warmup) in settings.items():
            if batch not in args.batches:
                continue
            runs = {variant: functools.partial(measure_latency, model, INPUT_SHAPE, batch, repeats, warmup)
                    for variant, model in models.items()}
            latency[batch] = interleaved_medians(runs, args.rounds)
        for variant in VARIANTS:
            flops_reduction = flops["dense"] / flops[variant]
            cells = [arch, variant, f"{flops[variant] / 1e9:.3f}", f"{flops_reduction:.2f}x",
                     f"{params['dense'] / params[variant]:.2f}x",
                     f"{sum(w % 8 != 0 for w in widths[variant])}/{len(widths[variant])}" if widths[variant] else "-"]
            for batch in (1, 64):
                if batch not in latency:
                    cells += ["-", "-", "-"]
                    continue
                ms = median(latency[batch][variant])
                speed_up = median(latency[batch]["dense"]) / ms
                cells += [f"{ms * 1e3:.2f} ±{spread(latency[batch][variant]):.0f}%", f"{speed_up:.2f}x",
                          f"{speed_up / flops_reduction:.2f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
        for batch, per_variant in latency.items():
            passes, warmup = settings[batch]
            for variant, values in per_variant.items():
                row_settings = {"variant_options": records.format_params(VARIANTS[variant] or {}),
                                "flops": flops[variant], "flops_reduction": round(flops["dense"] / flops[variant], 4),
                                "params": params[variant], "params_reduction": round(params["dense"] / params[variant], 4),
                                "widths": " ".join(map(str, widths[variant])) or "-", "input": "3x32x32",
                                "weights": "random, seed 0", "rounds": args.rounds,
                                "passes_per_round": passes, "warmup": warmup, "statistic": "median of passes per round"}
                rows += records.sample_rows({(arch, variant, batch): values}, ("model", "variant", "batch"),
                                            "round_median_ms", row_settings, env)
        all_widths[arch] = widths
    if args.widths:
        print()
        print("| model | variant | channel widths per group (execution order of the root layer) |")
        print("| --- | --- | --- |")
        for arch, widths in all_widths.items():
            for variant, values in widths.items():
                if values:
                    print(f"| {arch} | {variant} | {' '.join(map(str, values))} |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; commit {env['commit']}; {records.save_rows(args.out, rows)}")


if __name__ == "__main__":
    main()
