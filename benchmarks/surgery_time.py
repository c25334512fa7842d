"""Time of one structured pruning step on ResNet-56 (shortcut B) and VGG-16-BN, CIFAR-sized input.

    python -m benchmarks.surgery_time [--repeats 5] [--threads N] [--no-trainer] [--profile]

(run from the repository root.) Each repeat builds a fresh ``GrowPruneModule`` (seed 0, SGD with momentum whose
state is filled by one training step, so the repair has state to carry) and times, driving
``StructuredPruning(OneShot(amount=0.5), target="flops")`` (global L1 ranking) by hand:

* (i) one-time set-up: the ``ChannelGraph`` construction (DepGraph tracing + the dry run on a copy,
  shown separately) and the whole ``check()`` (graph + dense FLOP count + reachability estimate);
* (ii) one step: scoring every group (L1 filter norm), ``plan`` (global ranking to half the
  FLOPs), ``ChannelGraph.remove``; their sum is the step. Target (issue): under 1 s;
* (iii) the module-level repair done without a Trainer: ``configure_optimizers`` +
  ``carry_optimizer_state`` + ``carry_masks`` (what ``repair_training`` does besides Lightning's
  own optimizer set-up), and the size re-measurement ``act()`` does after surgery.

With the trainer run (default), the same strategy also runs for real inside ``Trainer.fit``
(pruning before epoch 1), and ``check()`` and ``act()`` are timed as Lightning calls them; ``act()``
is everything a user waits for at a pruning step (scoring, planning, surgery, ``repair_training``,
re-measurement). Models are rotated between repeats; the tables give medians (and min-max).
``--profile`` prints cProfile's top functions of one set-up and one step per model. On a machine
shared with other jobs, pass ``--threads 1``: with more torch threads than idle cores every small
tensor operation waits for the OS scheduler, and all phases get several times slower and noisier.

Every measurement (model x repeat x phase, ms; the FLOPs reduction reached as a phase of its own)
is appended with the run's settings and git commit to ``benchmarks/results/surgery_time.csv``
(``--out`` for another file).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import logging
import os
import pstats
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import growprune.module as module_module
import growprune.surgery.optimizer as optimizer_module
from benchmarks import records
from benchmarks.timing import bare_trainer, machine, median, timed_attribute
from growprune import GrowPruneModule
from growprune.metrics import count_parameters, dense_flops
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.surgery.channels import ChannelGraph
from growprune.surgery.optimizer import carry_masks, carry_optimizer_state

INPUT_SHAPE = (3, 32, 32)
MODELS = {"resnet56": {"shortcut": "B"}, "vgg16_bn": {}}
BATCH = 8


def make_module(arch: str) -> GrowPruneModule:
    torch.manual_seed(0)
    return GrowPruneModule(arch, arch_kwargs=MODELS[arch], num_classes=10, input_shape=INPUT_SHAPE,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, *INPUT_SHAPE, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)


def stopwatch(times: dict[str, float], key: str, function: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = function()
    times[key] = time.perf_counter() - start
    return result


def manual_step(arch: str) -> dict[str, float]:
    """Set-up, step and repair driven by hand, each phase timed."""
    module = make_module(arch)
    optimizer = module.configure_optimizers()
    inputs, targets = batch()
    F.cross_entropy(module(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    strategy = StructuredPruning(OneShot(amount=0.5), target="flops", verbose=False)
    times: dict[str, float] = {}
    with timed_attribute(module_module, "ChannelGraph", times, "graph"), \
            timed_attribute(ChannelGraph, "_check_traceable", times, "dry run"):
        stopwatch(times, "check", lambda: strategy.check(None, module))
    graph = strategy.graph

    def score() -> dict[str, torch.Tensor]:
        return {group.root: strategy.criterion.score(graph, group) for group in graph.groups()}

    scores = stopwatch(times, "score", score)
    plan = stopwatch(times, "plan", lambda: strategy.plan(module, graph.groups(), scores, 0.5))
    changes = stopwatch(times, "remove", lambda: graph.remove(plan))
    times["step"] = times["score"] + times["plan"] + times["remove"]

    def repair() -> None:
        new = module.configure_optimizers()
        parameters = dict(module.model.named_parameters())
        carry_optimizer_state(optimizer, new, {parameters[name]: change for name, change in changes.items() if name in parameters})
        carry_masks(module, changes)
        module.invalidate_mask_cache()

    stopwatch(times, "repair", repair)
    stopwatch(times, "measure", lambda: (sum(g.channels for g in graph.groups()), count_parameters(module.model),
                                         dense_flops(module.model, INPUT_SHAPE)))
    assert module.model(inputs).shape == (BATCH, 10)
    times["reduction"] = strategy.original["flops"] / dense_flops(module.model, INPUT_SHAPE)
    return times


class TimedStructuredPruning(StructuredPruning):
    """StructuredPruning that records how long Lightning's calls to ``check`` and ``act`` take."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.times: dict[str, float] = {}

    def check(self, trainer: Any, pl_module: Any) -> None:
        stopwatch(self.times, "check", lambda: super(TimedStructuredPruning, self).check(trainer, pl_module))

    def act(self, trainer: Any, pl_module: Any, target: float) -> dict[str, Any]:
        with timed_attribute(optimizer_module, "repair_training", self.times, "repair_training"):
            return stopwatch(self.times, "act", lambda: super(TimedStructuredPruning, self).act(trainer, pl_module, target))


def trainer_step(arch: str) -> dict[str, float]:
    """The same pruning step run by Lightning: prune before epoch 1 of a 2-epoch, 1-batch-per-epoch fit."""
    module = make_module(arch)
    strategy = TimedStructuredPruning(OneShot(amount=0.5, at=1), target="flops", verbose=False)
    inputs, targets = batch()
    trainer = bare_trainer(2, [strategy])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(inputs, targets), batch_size=BATCH))
    assert len(strategy.history) == 1, "the pruning step did not run"
    return {**strategy.times, "reduction": strategy.history[0]["flops_reduction"]}


def profile(arch: str, top: int) -> None:
    module = make_module(arch)
    strategy = StructuredPruning(OneShot(amount=0.5), target="flops", verbose=False)
    for title, function in (
        ("check (graph + FLOPs + reachability)", lambda: strategy.check(None, module)),
        ("step (score + plan + remove)", lambda: strategy.graph.remove(strategy.plan(
            module, strategy.graph.groups(),
            {g.root: strategy.criterion.score(strategy.graph, g) for g in strategy.graph.groups()}, 0.5))),
    ):
        profiler = cProfile.Profile()
        profiler.runcall(function)
        print(f"\n### cProfile {arch}: {title}, top {top} by cumulative time\n```")
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(top)
        print("```", flush=True)


def cell(values: list[float], scale: float = 1e3) -> str:
    return f"{median(values) * scale:.0f} ({min(values) * scale:.0f}-{max(values) * scale:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (default: what torch picks on this machine)")
    parser.add_argument("--no-trainer", action="store_true", help="skip the run inside Trainer.fit")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions per model")
    parser.add_argument("--top", type=int, default=25, help="functions per cProfile listing")
    parser.add_argument("--out", type=Path, default=records.results_path("surgery_time"),
                        help="CSV the raw measurements are appended to (default: benchmarks/results/surgery_time.csv)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = records.run_info()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no "GPU available" lines per fit
    warnings.filterwarnings("ignore", module="lightning")
    print(f"machine: {machine()}, load average {env['load_start']} at start")
    print(f"StructuredPruning(OneShot(0.5), target='flops'), global L1; input 3x32x32; {args.repeats} repeats, "
          "fresh model each, models rotated; ms: median (min-max)")
    archs = list(MODELS)
    manual: dict[str, list[dict[str, float]]] = {arch: [] for arch in archs}
    in_trainer: dict[str, list[dict[str, float]]] = {arch: [] for arch in archs}
    for repeat in range(args.repeats):
        for arch in archs[repeat % len(archs):] + archs[: repeat % len(archs)]:
            manual[arch].append(manual_step(arch))
            if not args.no_trainer:
                in_trainer[arch].append(trainer_step(arch))
    rows = [
        ("(i) ChannelGraph construction", "graph"),
        ("(i) of which the dry run on a copy", "dry run"),
        ("(i) check() total (graph + FLOP count + reachability)", "check"),
        ("(ii) score all groups (L1 filter norm)", "score"),
        ("(ii) plan (global ranking, FLOPs target 0.5)", "plan"),
        ("(ii) ChannelGraph.remove", "remove"),
        ("**(ii) one step = score + plan + remove**", "step"),
        ("(iii) optimizer repair (configure_optimizers + carry state/masks)", "repair"),
        ("(iii) re-measure size (groups, params, FLOPs) as act() does", "measure"),
    ]
    if not args.no_trainer:
        rows += [
            ("in Trainer.fit: check() at setup", "trainer check"),
            ("**in Trainer.fit: act() = whole pruning step**", "trainer act"),
            ("in Trainer.fit: of which repair_training", "trainer repair_training"),
        ]
    print()
    print("| phase | " + " | ".join(f"{arch} ms" for arch in archs) + " |")
    print("| --- | " + " | ".join("---" for _ in archs) + " |")
    for label, key in rows:
        cells = []
        for arch in archs:
            if key.startswith("trainer "):
                values = [times[key.removeprefix("trainer ")] for times in in_trainer[arch]]
            else:
                values = [times[key] for times in manual[arch]]
            cells.append(cell(values))
        print(f"| {label} | " + " | ".join(cells) + " |")
    reductions = ", ".join(f"{arch} {statistics.median(t['reduction'] for t in manual[arch]):.2f}x" for arch in archs)
    print(f"\nFLOPs reduction reached: {reductions}; load average {os.getloadavg()[0]:.2f} at end")
    settings = {"strategy": "StructuredPruning(OneShot(0.5), target='flops'), global L1", "input": "3x32x32",
                "batch_size": BATCH, "optimizer": "SGD lr=0.01 momentum=0.9", "repeats": args.repeats,
                "trainer": not args.no_trainer}
    rows = []
    for arch in archs:
        for source, runs in (("manual", manual[arch]), ("trainer", in_trainer[arch])):
            for repeat, times in enumerate(runs):
                for phase, value in times.items():
                    rows.append({"model": arch, "repeat": repeat, "phase": phase if source == "manual" else f"trainer {phase}",
                                 "value": round(value, 3) if phase == "reduction" else round(value * 1e3, 3),
                                 "unit": "x" if phase == "reduction" else "ms", **settings, **env})
    print(f"commit {env['commit']}; {records.save_rows(args.out, rows)}")
    if args.profile:
        for arch in archs:
            profile(arch, args.top)


if __name__ == "__main__":
    main()
