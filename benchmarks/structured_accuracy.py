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
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.timing import machine
from growprune import GrowPruneModule
from growprune.data import DigitsDataModule
from growprune.metrics import count_parameters, dense_flops
from growprune.schedules import OneShot
from growprune.strategies import StructuredPruning
from growprune.strategies.regularizers import PolarizationPruning

REPO = Path(__file__).resolve().parents[1]
MODELS = {"vgg11_bn": {}, "resnet20": {"shortcut": "B"}}


def make_strategy(method: str, epochs: int) -> pl.Callback | None:
    if method == "dense":
        return None
    if method == "l1-global":
        return StructuredPruning(OneShot(amount=0.5, at=int(0.4 * epochs)), target="flops", verbose=False)
    if method == "l1-latency":
        return StructuredPruning(OneShot(amount=0.5, at=int(0.4 * epochs)), target="flops", cost="latency",
                                 max_fraction=0.6, verbose=False)
    if method == "polarization":
        return PolarizationPruning(lambda_=1e-4, t=1.2, schedule=OneShot(amount=0.0, at=int(0.6 * epochs)), verbose=False)
    raise ValueError(f"unknown method {method!r}")


def run_one(arch: str, method: str, seed: int, epochs: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(image_size=16, batch_size=64, seed=0)
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
        "arch": arch, "method": method, "seed": seed,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "flops_reduction": dense["flops"] / dense_flops(module.model, data.input_shape),
        "params_reduction": dense["params"] / count_parameters(module.model),
    }


def summarise(rows: list[dict]) -> list[str]:
    lines = ["| model | method | FLOPs reduction | params reduction | final val acc % (mean ± sd) | vs dense (points) | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arch in MODELS:
        dense = [100 * float(r["val_acc"]) for r in rows if r["arch"] == arch and r["method"] == "dense"]
        for method in ("dense", "l1-global", "l1-latency", "polarization"):
            group = [r for r in rows if r["arch"] == arch and r["method"] == method]
            if not group:
                continue
            accs = [100 * float(r["val_acc"]) for r in group]
            flops = statistics.mean(float(r["flops_reduction"]) for r in group)
            params = statistics.mean(float(r["params_reduction"]) for r in group)
            delta = statistics.mean(accs) - statistics.mean(dense) if dense else float("nan")
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {arch} | {method} | {flops:.2f}x | {params:.2f}x | {statistics.mean(accs):.2f} ± {spread:.2f} | {delta:+.2f} | {len(group)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["dense", "l1-global", "polarization"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "structured_accuracy.csv")
    parser.add_argument("--summarise", type=Path, nargs="+", help="only print the table of these CSV files")
    args = parser.parse_args()
    if args.summarise:
        print("\n".join(summarise([row for path in args.summarise for row in csv.DictReader(path.open())])))
        return
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with args.out.open("a", newline="") as handle:
        writer = None
        for arch in args.models:
            for method in args.methods:
                for seed in args.seeds:
                    row = run_one(arch, method, seed, args.epochs)
                    rows.append(row)
                    if writer is None:
                        writer = csv.DictWriter(handle, fieldnames=list(row))
                        if handle.tell() == 0:
                            writer.writeheader()
                    writer.writerow(row)
                    handle.flush()
                    print(f"{arch} {method} seed {seed}: val acc {row['val_acc']:.4f}, FLOPs {row['flops_reduction']:.2f}x", flush=True)
    print(f"\nmachine: {machine()}; {args.epochs} epochs per run\n")
    print("\n".join(summarise(rows)))


if __name__ == "__main__":
    main()
