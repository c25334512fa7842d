"""The growing/pruning study's scenarios on CPU, each against a network of its final size trained from scratch.

    python -m benchmarks.growth_scenarios [--seeds 0 1 2] [--epochs 8] [--scenarios grow shrink constant trigger]

Data: the embedded scikit-learn digits at 8x8 (1,257 train / 270 validation, split seed 0). Model:
VGG-11-BN (``width`` scales every layer's channels). Every run trains ``epochs`` epochs with SGD
(lr 0.05, momentum 0.9, weight decay 5e-4, cosine schedule); validation after every epoch.

* ``grow``: quarter width -> full width, +100 % of the original channels at epochs 1, 2, 3
  (``ChannelGrowth``, scope layer, batch-norm-safe GradMax);
* ``shrink``: full width -> quarter width, 25 / 50 / 75 % of every layer's channels gone at epochs
  1, 2, 3 (``StructuredPruning``, L1 filter norm, scope layer);
* ``constant``: half width; +25 % of the original channels at epochs 1, 3, 5 (GradMax) and back to
  the original width by L1 pruning at epochs 2, 4, 6: the size is kept, the channels turn over;
* ``trigger``: quarter width growing by +100 % (GradMax) whenever the validation loss did not improve
  on the previous epoch (``Plateau``, patience 1), up to full width, while ``PolarizationPruning``
  (lambda 0.02, t 1.5) prunes at 75 % of the epochs: the final size is the methods' outcome.

Each scenario run is followed by ``scratch``: a VGG-11-BN with exactly the scenario's final channel
widths (same seed, same epochs) trained from scratch. Reported: final-epoch validation accuracy
(mean ± sd over seeds), final parameters and dense FLOPs (one sample), wall-clock training time.

Every run appends one row to ``benchmarks/results/growth_scenarios.csv`` (``--out`` for another
file) with its full setting and the git commit; runs whose settings differ from the rows already in
the file are refused before training. ``--summarise A.csv`` prints the table of a results file.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn

from benchmarks import records
from growprune import GrowPruneModule
from growprune.data import DigitsDataModule
from growprune.growth.initializers import GradMax
from growprune.metrics import count_parameters, dense_flops
from growprune.models.vgg import _CONFIGS, VGG
from growprune.schedules import Constant, OneShot, Steps
from growprune.strategies import ChannelGrowth, PolarizationPruning, StructuredPruning
from growprune.triggers import Plateau

SCENARIOS = ("grow", "shrink", "constant", "trigger")
DATA = {"image_size": 8, "batch_size": 64, "seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}
START_WIDTH = {"grow": 0.25, "shrink": 1.0, "constant": 0.5, "trigger": 0.25}
VARYING = ("scenario", "kind", "seed")
RESULTS = ("val_acc", "params", "flops", "widths", "growth_steps", "max_output_change")


def scenario_params(scenario: str, epochs: int) -> dict[str, Any]:
    """What ``strategies`` builds ``scenario`` with (recorded in every row)."""
    gradmax = "GradMax(form=safe, iterations=3), scoring_batches=2"
    if scenario == "grow":
        return {"width": 0.25, "growth": "Steps([1, 2, 3], [1.0, 2.0, 3.0]) scope=layer", "initializer": gradmax}
    if scenario == "shrink":
        return {"width": 1.0, "pruning": "Steps([1, 2, 3], [0.25, 0.5, 0.75]) scope=layer L1"}
    if scenario == "constant":
        return {"width": 0.5, "growth": f"Constant(0.25, start=1, end={epochs - 3}, every=2)",
                "pruning": f"Constant(0.0, start=2, end={epochs - 2}, every=2) scope=layer L1", "initializer": gradmax}
    if scenario == "trigger":
        return {"width": 0.25, "growth": "Plateau(val/loss, patience=1, step=1.0, amount=3.0)", "initializer": gradmax,
                "pruning": f"PolarizationPruning(lambda_=0.02, t=1.5, at={int(0.75 * epochs)})"}
    raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


def strategies(scenario: str, epochs: int) -> list[pl.Callback]:
    def gradmax_growth(schedule: Any) -> ChannelGrowth:
        return ChannelGrowth(schedule, initializer=GradMax(form="safe", iterations=3), scoring_batches=2, name="grow",
                             verbose=False)

    if scenario == "grow":
        return [gradmax_growth(Steps(steps=[1, 2, 3], amounts=[1.0, 2.0, 3.0]))]
    if scenario == "shrink":
        return [StructuredPruning(Steps(steps=[1, 2, 3], amounts=[0.25, 0.5, 0.75]), scope="layer", name="prune",
                                  verbose=False)]
    if scenario == "constant":
        return [gradmax_growth(Constant(amount=0.25, start=1, end=epochs - 3, every=2)),
                StructuredPruning(Constant(amount=0.0, start=2, end=epochs - 2, every=2), scope="layer", name="prune",
                                  verbose=False)]
    return [gradmax_growth(Plateau(monitor="val/loss", patience=1, step=1.0, amount=3.0)),
            PolarizationPruning(lambda_=0.02, t=1.5, schedule=OneShot(amount=0.0, at=int(0.75 * epochs)),
                                name="polarization", verbose=False)]


def settings(scenario: str, kind: str, seed: int, epochs: int, env: dict) -> dict:
    """Every setting of one run, in CSV column order."""
    return {
        "scenario": scenario, "kind": kind, "seed": seed,
        "method_params": records.format_params(scenario_params(scenario, epochs)),
        "arch": "vgg11_bn", "data": "digits (scikit-learn, embedded)", "image_size": DATA["image_size"],
        "split_seed": DATA["seed"], "val_fraction": DATA["val_fraction"], "batch_size": DATA["batch_size"],
        "epochs": epochs, "optimizer": "SGD lr=0.05 momentum=0.9 weight_decay=5e-4", "lr_schedule": "cosine T_max=epochs",
        "accuracy": "final epoch, validation",
        **{key: env[key] for key in ("threads", "torch", "lightning", "torch_pruning", "python")},
    }


def conv_widths(model: nn.Module) -> list[int]:
    return [layer.out_channels for layer in model.features if isinstance(layer, nn.Conv2d)]


def train(model: Any, seed: int, epochs: int, callbacks: list[pl.Callback]) -> tuple[GrowPruneModule, float, float]:
    """Train ``model`` (a registered name's width or a module); the module, final val acc and seconds."""
    data = DigitsDataModule(**DATA)
    kwargs = {"arch_kwargs": {"width": model}} if isinstance(model, float) else {}
    module = GrowPruneModule(
        "vgg11_bn" if isinstance(model, float) else model, num_classes=10, input_shape=data.input_shape,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs), **kwargs)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                         callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, data)
    return module, float(trainer.callback_metrics["val/acc"]), time.perf_counter() - start


def run_pair(scenario: str, seed: int, epochs: int) -> list[dict]:
    """The scenario's run and its from-scratch twin of the same final widths (one result row each)."""
    pl.seed_everything(seed, verbose=False)
    callbacks = strategies(scenario, epochs)
    module, accuracy, seconds = train(START_WIDTH[scenario], seed, epochs, callbacks)
    growth = next((c for c in callbacks if isinstance(c, ChannelGrowth)), None)
    grown = [r for r in growth.history if r["added"]] if growth else []
    widths = conv_widths(module.model)
    rows = [{"kind": "method", "val_acc": accuracy, "params": count_parameters(module.model),
             "flops": dense_flops(module.model, module.input_shape), "widths": " ".join(map(str, widths)),
             "growth_steps": len(grown), "max_output_change": max((r["max_output_change"] for r in grown), default=""),
             "seconds": round(seconds, 1)}]
    pl.seed_everything(seed, verbose=False)
    config = iter(widths)
    scratch = VGG([item if item == "M" else next(config) for item in _CONFIGS["vgg11"]], num_classes=10, in_channels=1)
    module, accuracy, seconds = train(scratch, seed, epochs, [])
    rows.append({"kind": "scratch", "val_acc": accuracy, "params": count_parameters(module.model),
                 "flops": dense_flops(module.model, module.input_shape), "widths": " ".join(map(str, widths)),
                 "growth_steps": "", "max_output_change": "", "seconds": round(seconds, 1)})
    return rows


def check(rows: list[dict]) -> None:
    records.check_settings(rows, varying=VARYING, results=RESULTS, method_key=("scenario",))


def summarise(rows: list[dict], latest: bool = False) -> list[str]:
    """The Markdown table of ``rows`` (one setting, else ``records.SettingsMismatch``)."""
    rows = records.deduplicate(rows, VARYING, latest)
    check(rows)
    lines = ["| scenario | run | final val acc % (mean ± sd) | params (mean) | FLOPs (mean) | train time s (mean) "
             "| max output change at growth | epochs | seeds | commit(s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for scenario in SCENARIOS:
        for kind in ("method", "scratch"):
            group = [r for r in rows if r["scenario"] == scenario and r["kind"] == kind]
            if not group:
                continue
            accs = [100 * float(r["val_acc"]) for r in group]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            changes = [float(r["max_output_change"]) for r in group if r["max_output_change"] not in ("", None)]
            change = f"{max(changes):.2g}" if changes else "-"
            label = scenario if kind == "method" else "scratch, same final widths"
            lines.append(
                f"| {scenario} | {label} | {statistics.mean(accs):.2f} ± {spread:.2f} "
                f"| {statistics.mean(float(r['params']) for r in group):,.0f} "
                f"| {statistics.mean(float(r['flops']) for r in group):,.0f} "
                f"| {statistics.mean(float(r['seconds']) for r in group):.1f} | {change} | {group[0]['epochs']} "
                f"| {records.seeds(group)} | {records.commits(group)} |")
    caption = records.settings_line(rows, ("data", "image_size", "split_seed", "val_fraction", "batch_size",
                                           "optimizer", "lr_schedule", "threads", "torch"))
    return [f"settings: {caption}", ""] + lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--out", type=Path, default=records.results_path("growth_scenarios"),
                        help="CSV the rows are appended to (default: benchmarks/results/growth_scenarios.csv)")
    parser.add_argument("--summarise", type=Path, nargs="+", help="only print the table of these CSV files")
    parser.add_argument("--latest", action="store_true", help="with --summarise: keep the last row of a repeated run")
    args = parser.parse_args(argv)
    if args.summarise:
        try:
            print("\n".join(summarise(records.read_rows(args.summarise), latest=args.latest)))
        except records.SettingsMismatch as error:
            raise SystemExit(f"error: {error}") from None
        return
    if args.epochs < 7:
        raise SystemExit("error: --epochs must be >= 7 (the constant scenario acts at epochs 1 to epochs - 2)")
    torch.set_num_threads(args.threads)
    env = records.run_info()
    plan = [(scenario, seed) for scenario in args.scenarios for seed in args.seeds]
    planned = [{**settings(scenario, kind, seed, args.epochs, env), **dict.fromkeys(RESULTS, ""), "seconds": "",
                **{key: env[key] for key in records.INFO_COLUMNS if key in env}}
               for scenario, seed in plan for kind in ("method", "scratch")]
    appender = records.open_checked(args.out, planned, check)  # before any training
    rows = []
    templates = iter(planned)
    for scenario, seed in plan:
        for result in run_pair(scenario, seed, args.epochs):
            row = {**next(templates), **result}
            appender.append(row)
            rows.append(row)
            print(f"{scenario} {row['kind']} seed {seed}: val acc {row['val_acc']:.4f}, params {row['params']:,}, "
                  f"{row['seconds']:.0f} s", flush=True)
    print(f"\nmachine: {records.machine()}; commit {env['commit']}; {args.epochs} epochs per run; "
          f"{len(rows)} rows appended to {args.out}\n")
    print("\n".join(summarise(rows)))


if __name__ == "__main__":
    main()
