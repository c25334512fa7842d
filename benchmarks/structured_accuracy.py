"""Accuracy after structured pruning to half the FLOPs: the CPU-sized versions, several seeds.

    python -m benchmarks.structured_accuracy [--seeds 0 1 2] [--epochs 20] [--models resnet20] [--threads 1]

Data: the embedded digits resized to 16x16 (1,257 train / 270 validation, split seed 0). Models:
VGG-11-BN and CIFAR ResNet-20 (shortcut B). Methods, each trained ``epochs`` epochs in total:

* ``dense``: no pruning (the baseline, trained the same way);
* ``l1-global``: ``StructuredPruning`` to half the FLOPs, global L1 ranking, one shot at 40 % of
  training, then fine-tuning;
* ``l1-latency``: the same with ``cost="latency", max_fraction=0.6`` (latency-aware global ranking);
* ``polarization``: ``PolarizationPruning`` (Zhuang et al. 2020; lambda 1e-4 here as the runs are
  short) pruning at 60 % of training, then fine-tuning; its FLOPs reduction is an outcome.

Reported: FINAL-epoch validation accuracy (mean ± sd over seeds), FLOPs and parameter reduction.

Every run appends one row to ``benchmarks/results/structured_accuracy.csv`` (committed; ``--out``
for another file) with its full setting and the git commit; a run whose settings differ, for the
same model, from the rows already in that file is refused before it trains. ``--summarise A.csv
[B.csv ...]`` refuses rows of one model whose settings differ other than method and seed (models
may differ, e.g. in epochs: the table has an epochs column); ``--latest`` keeps only the last row
of a repeated (model, method, seed).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks import records
from growprune import GrowPruneModule
from growprune.data import DigitsDataModule
from growprune.metrics import count_parameters, dense_flops
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.strategies.regularizers import PolarizationPruning

MODELS = {"vgg11_bn": {}, "resnet20": {"shortcut": "B"}}
METHODS = ("dense", "l1-global", "l1-latency", "polarization")
DATA = {"image_size": 16, "batch_size": 64, "seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}  # seed: the split's
VARYING = ("arch", "method", "seed")
RESULTS = ("val_acc", "flops_reduction", "params_reduction")


def method_params(method: str, epochs: int) -> dict:
    """The parameters ``make_strategy`` builds ``method`` with (recorded in every row)."""
    if method == "dense":
        return {}
    if method in ("l1-global", "l1-latency"):
        params = {"schedule": "OneShot", "amount": 0.5, "at": int(0.4 * epochs), "target": "flops",
                  "criterion": "FilterNorm p=1", "scope": "global"}
        return params | ({"cost": "latency", "max_fraction": 0.6} if method == "l1-latency" else {})
    if method == "polarization":
        return {"lambda_": 1e-4, "t": 1.2, "schedule": "OneShot", "at": int(0.6 * epochs)}
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def make_strategy(method: str, epochs: int) -> pl.Callback | None:
    params = method_params(method, epochs)
    if method == "dense":
        return None
    if method == "polarization":
        return PolarizationPruning(lambda_=params["lambda_"], t=params["t"],
                                   schedule=OneShot(amount=0.0, at=params["at"]), verbose=False)
    extra = {"cost": params["cost"], "max_fraction": params["max_fraction"]} if "cost" in params else {}
    return StructuredPruning(OneShot(amount=params["amount"], at=params["at"]), target=params["target"],
                             scope=params["scope"], verbose=False, **extra)


def settings(arch: str, method: str, seed: int, epochs: int, env: dict) -> dict:
    """Every setting of one run, in CSV column order (``env``: threads and versions of this process)."""
    return {
        "arch": arch, "method": method, "seed": seed,
        "method_params": records.format_params(method_params(method, epochs)),
        "arch_kwargs": records.format_params(MODELS[arch]),
        "data": "digits (scikit-learn, embedded)", "image_size": DATA["image_size"], "split_seed": DATA["seed"],
        "val_fraction": DATA["val_fraction"], "test_fraction": DATA["test_fraction"], "batch_size": DATA["batch_size"],
        "epochs": epochs, "optimizer": "SGD lr=0.05 momentum=0.9 weight_decay=5e-4", "lr_schedule": "cosine T_max=epochs",
        "accuracy": "final epoch, validation",
        **{key: env[key] for key in ("threads", "torch", "lightning", "torch_pruning", "python")},
    }


def run_one(arch: str, method: str, seed: int, epochs: int) -> dict:
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(**DATA)
    module = GrowPruneModule(
        arch, arch_kwargs=MODELS[arch], num_classes=10, input_shape=data.input_shape,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    dense = {"flops": dense_flops(module.model, data.input_shape), "params": count_parameters(module.model)}
    strategy = make_strategy(method, epochs)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs, callbacks=[strategy] if strategy else [],
    )
    trainer.fit(module, data)
    return {
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "flops_reduction": dense["flops"] / dense_flops(module.model, data.input_shape),
        "params_reduction": dense["params"] / count_parameters(module.model),
        "seconds": round(time.perf_counter() - start, 1),
    }


def check(rows: list[dict]) -> None:
    """Refuse (``records.SettingsMismatch``) rows of one model whose settings differ other than method/seed."""
    records.check_settings(rows, varying=VARYING, results=RESULTS, method_key=("method",), group_by=("arch",))


def summarise(rows: list[dict], latest: bool = False) -> list[str]:
    """The Markdown table of ``rows`` (one setting per model, else ``records.SettingsMismatch``)."""
    rows = records.deduplicate(rows, VARYING, latest)
    check(rows)
    lines = ["| model | method | FLOPs reduction | params reduction | final val acc % (mean ± sd) | vs dense (points) "
             "| epochs | seeds | commit(s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arch in MODELS:
        dense = [100 * float(r["val_acc"]) for r in rows if r["arch"] == arch and r["method"] == "dense"]
        for method in METHODS:
            group = [r for r in rows if r["arch"] == arch and r["method"] == method]
            if not group:
                continue
            accs = [100 * float(r["val_acc"]) for r in group]
            flops = statistics.mean(float(r["flops_reduction"]) for r in group)
            params = statistics.mean(float(r["params_reduction"]) for r in group)
            delta = statistics.mean(accs) - statistics.mean(dense) if dense else float("nan")
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {arch} | {method} | {flops:.2f}x | {params:.2f}x | {statistics.mean(accs):.2f} ± {spread:.2f} "
                         f"| {delta:+.2f} | {group[0]['epochs']} | {records.seeds(group)} | {records.commits(group)} |")
    caption = records.settings_line(rows, ("data", "image_size", "split_seed", "val_fraction", "batch_size",
                                           "optimizer", "lr_schedule", "threads", "torch"))
    return [f"settings: {caption}", ""] + lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["dense", "l1-global", "polarization"], choices=METHODS)
    parser.add_argument("--out", type=Path, default=records.results_path("structured_accuracy"),
                        help="CSV the rows are appended to (default: the committed benchmarks/results/structured_accuracy.csv)")
    parser.add_argument("--summarise", type=Path, nargs="+", help="only print the table of these CSV files")
    parser.add_argument("--latest", action="store_true", help="with --summarise: keep the last row of a repeated run")
    args = parser.parse_args(argv)
    if args.summarise:
        try:
            print("\n".join(summarise(records.read_rows(args.summarise), latest=args.latest)))
        except records.SettingsMismatch as error:
            raise SystemExit(f"error: {error}") from None
        return
    torch.set_num_threads(args.threads)
    env = records.run_info()
    plan = [(arch, method, seed) for arch in args.models for method in args.methods for seed in args.seeds]
    planned = [{**settings(*run, args.epochs, env), **dict.fromkeys(RESULTS, ""), "seconds": "",
                **{key: env[key] for key in records.INFO_COLUMNS if key in env}} for run in plan]
    appender = records.open_checked(args.out, planned, check)  # before any training
    rows = []
    for (arch, method, seed), template in zip(plan, planned):
        row = {**template, **run_one(arch, method, seed, args.epochs)}
        appender.append(row)
        rows.append(row)
        print(f"{arch} {method} seed {seed}: val acc {row['val_acc']:.4f}, FLOPs {row['flops_reduction']:.2f}x, "
              f"{row['seconds']:.0f} s", flush=True)
    print(f"\nmachine: {records.machine()}; commit {env['commit']}; {args.epochs} epochs per run; "
          f"{len(rows)} rows appended to {args.out}\n")
    print("\n".join(summarise(rows)))


if __name__ == "__main__":
    main()
