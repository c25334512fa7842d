"""Compression vs accuracy of unstructured pruning on LeNet-300-100, real MNIST digits.

    python -m benchmarks.compression_lenet [--seeds 0 1 2] [--targets 0.9 0.95 0.98 0.99] [--epochs 50]

Data: the 10,000 MNIST digits of ../shared/data/mnist-t10k, split 8,000 train / 2,000 validation
with seed 0 (the split is fixed; the seed varies the initialisation, shuffling and random criteria).
Methods: random, layer-wise magnitude, global magnitude (gradual cubic schedule to the target, then
fine-tuning) and NNrelief (iterative, alpha-driven; its compression is an outcome, not a target).
Reported: FINAL-epoch validation accuracy (never the best epoch), mean and spread over seeds, with
the dense model trained the same way as the baseline. Every run is appended to a CSV file.
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.timing import machine
from growprune import GrowPruneModule
from growprune.criteria import MagnitudeCriterion, RandomCriterion
from growprune.data import IdxDataModule
from growprune.schedules import Cubic
from growprune.strategies import UnstructuredPruning

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist-t10k"


def make_data() -> IdxDataModule:
    return IdxDataModule(
        images=str(MNIST / "t10k-images-idx3-ubyte.gz"),
        labels=str(MNIST / "t10k-labels-idx1-ubyte.gz"),
        val_fraction=0.2,
        test_fraction=0.0,
        batch_size=64,
        seed=0,
    )


def make_strategy(method: str, target: float, seed: int, epochs: int) -> pl.Callback | None:
    prune_end = int(epochs * 0.7)
    schedule = Cubic(amount=target, start=2, end=prune_end, every=1)
    if method == "dense":
        return None
    if method == "random":
        return UnstructuredPruning(schedule, criterion=RandomCriterion(seed=seed), scope="layer", verbose=False)
    if method == "magnitude-layer":
        return UnstructuredPruning(schedule, criterion=MagnitudeCriterion(), scope="layer", verbose=False)
    if method == "magnitude-global":
        return UnstructuredPruning(schedule, criterion=MagnitudeCriterion(), scope="global", verbose=False)
    if method.startswith("nnrelief"):
        from growprune.strategies import NNReliefPruning

        every = max(1, prune_end // 5)
        return NNReliefPruning(iterations=5, every=every, pruning_samples=1000, verbose=False)
    raise ValueError(f"unknown method {method!r}")


def run_one(method: str, target: float, seed: int, epochs: int) -> dict[str, float | str]:
    pl.seed_everything(seed, verbose=False)
    data = make_data()
    module = GrowPruneModule(
        "lenet_300_100",
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    strategy = make_strategy(method, target, seed, epochs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[strategy] if strategy is not None else [],
        check_val_every_n_epoch=epochs,  # validate once: after the final epoch
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    size = module.size_metrics()
    prunable = [p for n, p in module.model.named_parameters() if n.endswith("weight")]
    weights_left = sum(int(torch.count_nonzero(p)) for p in prunable) / sum(p.numel() for p in prunable)
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "weights_left": weights_left,
        "compression": size["compression"],
        "weight_compression": 1.0 / weights_left,
        "effective_flops": size["flops/effective"],
        "dense_flops": size["flops/dense"],
        "seconds": time.perf_counter() - start,
    }


def summarise(rows: list[dict]) -> list[str]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["target"])), []).append(row)
    dense = [float(r["val_acc"]) for r in rows if r["method"] == "dense"]
    dense_mean = statistics.mean(dense) if dense else float("nan")
    lines = [
        "| method | target | weights left % | weight compression | compression (all params) | effective FLOPs % | final val acc % (mean ± sd) | vs dense (points) | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (method, target), group in sorted(groups.items(), key=lambda item: (item[0][0] != "dense", item[0][0], item[0][1])):
        accs = [100 * float(r["val_acc"]) for r in group]
        left = statistics.mean(float(r["weights_left"]) for r in group)
        compression = statistics.mean(float(r["compression"]) for r in group)
        flops = statistics.mean(float(r["effective_flops"]) / float(r["dense_flops"]) for r in group)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = statistics.mean(accs) - 100 * dense_mean
        target_text = "-" if method in ("dense",) or method.startswith("nnrelief") else f"{target:.2f}"
        lines.append(
            f"| {method} | {target_text} | {100 * left:.2f} | {1 / left:.1f}x | {compression:.1f}x | {100 * flops:.2f} | "
            f"{statistics.mean(accs):.2f} ± {spread:.2f} | {delta:+.2f} | {len(group)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--methods", nargs="+", default=["dense", "random", "magnitude-layer", "magnitude-global", "nnrelief"])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "compression_lenet.csv")
    parser.add_argument("--summarise", type=Path, nargs="+", help="only print the table of these CSV files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 lets two runs share 2 cores)")
    args = parser.parse_args()
    if args.summarise:
        rows = [row for path in args.summarise for row in csv.DictReader(path.open())]
        print("\n".join(summarise(rows)))
        return
    torch.set_num_threads(args.threads)
    if not MNIST.is_dir():
        raise SystemExit(f"the MNIST idx files are missing: expected them in {MNIST}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    write_header = not args.out.exists()
    with args.out.open("a", newline="") as handle:
        writer = None
        for method in args.methods:
            targets = [0.0] if method == "dense" or method.startswith("nnrelief") else args.targets
            for target in targets:
                for seed in args.seeds:
                    row = run_one(method, target, seed, args.epochs)
                    rows.append(row)
                    if writer is None:
                        writer = csv.DictWriter(handle, fieldnames=list(row))
                        if write_header:
                            writer.writeheader()
                    writer.writerow(row)
                    handle.flush()
                    print(f"{method:>17} target {target:.2f} seed {seed}: val acc {row['val_acc']:.4f}, "
                          f"weights left {100 * row['weights_left']:.2f} %, {row['seconds']:.0f} s", flush=True)
    print(f"\nmachine: {machine()}; {args.epochs} epochs per run; rows appended to {args.out}\n")
    print("\n".join(summarise(rows)))


if __name__ == "__main__":
    main()
