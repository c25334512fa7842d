"""Prune-and-regrow (RigL, SET) vs dense and global magnitude pruning, LeNet-300-100 at 100x, real MNIST digits.

    python -m benchmarks.regrowth_lenet [--seeds 0 1 2] [--epochs 40] [--density 0.01]
        [--methods dense magnitude-global rigl] [--distribution erk] [--update-interval 100]
        [--drop-fraction 0.3] [--stop-fraction 0.75] [--start-epoch 8]
        [--prune-end-fraction 0.7] [--gradient-steps 1] [--drop-unused]

Same data, split, model, optimizer and LR schedule as ``benchmarks/compression_lenet.py`` (the
10,000 digits of ../shared/data/mnist-t10k split 8,000 train / 2,000 validation by seed 0; SGD lr
0.05 momentum 0.9 weight decay 1e-4, cosine LR over the epochs, batch 64), so the dense and
global-magnitude rows are re-measured here with the same epochs for a fair comparison. Methods:

* ``dense``: no pruning.
* ``magnitude-global``: gradual global magnitude pruning to ``1 - density`` (cubic schedule from
  epoch 2 to 70 % of the epochs, then fine-tuning), as in ``compression_lenet``.
* ``rigl``: :class:`growprune.strategies.Regrowth` with gradient growth, pruned to ``density`` at
  step 0 (or after ``--start-epoch`` dense epochs), then drop-and-regrow every ``--update-interval``
  steps until ``--stop-fraction`` of them.
* ``set``: the same with random growth and a constant drop fraction (SET).
* ``magnitude-rigl``: gradual global magnitude pruning to ``density`` (cubic, epoch 2 to half the
  epochs), then RigL cycles on that sparse model (``Regrowth(density=None)``) from the next update
  until ``--stop-fraction`` of the steps.
* ``granet``: GraNet-style (Liu et al. 2021): gradual global magnitude pruning from dense to
  ``density`` (cubic, epoch 2 to ``--prune-end-fraction`` of the epochs) AND a RigL cycle
  (``Regrowth(density=None)``) after every pruning step, every epoch from epoch 3 until
  ``--stop-fraction`` of the steps (the pruning callback is listed first, so at a shared step the
  prune comes first). ``--gradient-steps`` and ``--drop-unused`` set the Regrowth options of those
  names (recorded in the row's parameters only when not at their defaults).

Reported: FINAL-epoch validation accuracy (never the best epoch), mean and spread over seeds. Every
run appends one row to ``benchmarks/results/regrowth_lenet.csv`` (``--out`` for another file); a
run whose settings differ from the rows in that file other than method, its parameters and seed
is refused before it trains. ``--summarise A.csv ...`` prints the table of rows already written.
The 80-epoch rows are in ``benchmarks/results/regrowth_lenet_80ep.csv`` (``--epochs 80 --out ...``).
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
from benchmarks.compression_lenet import DATA, MNIST, make_data
from growprune import GrowPruneModule
from growprune.schedules import Cubic
from growprune.strategies import Regrowth, UnstructuredPruning

METHODS = ("dense", "magnitude-global", "rigl", "set", "magnitude-rigl", "granet")
RESULTS = ("val_acc", "weights_left", "compression", "weight_compression", "effective_flops", "dense_flops")
VARYING = ("method", "method_params", "seed")
STEPS_PER_EPOCH = 125  # 8,000 training digits in batches of 64


def method_params(method: str, args: argparse.Namespace) -> dict:
    """The parameters ``make_strategy`` builds ``method`` with (recorded in every row)."""
    if method == "dense":
        return {}
    if method == "magnitude-global":
        return {"density": args.density, "schedule": "Cubic", "start": 2, "end": int(args.epochs * 0.7), "every": 1,
                "scope": "global", "min_density": 0.0}
    if method in ("rigl", "set"):
        return {"density": args.density, "growth": "gradient" if method == "rigl" else "random",
                "decay": "cosine" if method == "rigl" else "constant", "distribution": args.distribution,
                "update_interval": args.update_interval, "drop_fraction": args.drop_fraction,
                "stop_fraction": args.stop_fraction, "start_step": args.start_epoch * STEPS_PER_EPOCH}
    if method == "magnitude-rigl":
        prune_end = int(args.epochs * 0.5)
        return {"density": args.density, "schedule": "Cubic", "start": 2, "end": prune_end, "every": 1,
                "scope": "global", "min_density": 0.0, "then": "Regrowth(density=None)", "growth": "gradient",
                "decay": "cosine", "update_interval": args.update_interval, "drop_fraction": args.drop_fraction,
                "start_step": prune_end * STEPS_PER_EPOCH + args.update_interval, "stop_fraction": args.stop_fraction}
    if method == "granet":
        prune_end = int(args.epochs * args.prune_end_fraction)
        return {"density": args.density, "schedule": "Cubic", "start": 2, "end": prune_end, "every": 1,
                "scope": "global", "min_density": 0.0, "then": "Regrowth(density=None)", "growth": "gradient",
                "decay": "cosine", "update_interval": STEPS_PER_EPOCH, "drop_fraction": args.drop_fraction,
                "start_step": 3 * STEPS_PER_EPOCH, "stop_fraction": args.stop_fraction,
                **({"gradient_steps": args.gradient_steps} if args.gradient_steps != 1 else {}),
                **({"drop_unused": True} if args.drop_unused else {})}
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def make_strategy(method: str, args: argparse.Namespace, seed: int) -> list[pl.Callback]:
    params = method_params(method, args)
    if method == "dense":
        return []
    if method in ("magnitude-rigl", "granet"):
        schedule = Cubic(amount=1.0 - params["density"], start=params["start"], end=params["end"], every=params["every"])
        return [UnstructuredPruning(schedule, scope="global", min_density=0.0, verbose=False),
                Regrowth(density=None, growth="gradient", decay="cosine", update_interval=params["update_interval"],
                         drop_fraction=params["drop_fraction"], start_step=params["start_step"],
                         stop_fraction=params["stop_fraction"], gradient_steps=params.get("gradient_steps", 1),
                         drop_unused=params.get("drop_unused", False),
                         seed=seed, verbose=False)]
    if method == "magnitude-global":
        schedule = Cubic(amount=1.0 - params["density"], start=params["start"], end=params["end"], every=params["every"])
        return [UnstructuredPruning(schedule, scope="global", min_density=0.0, verbose=False)]
    return [Regrowth(density=params["density"], growth=params["growth"], decay=params["decay"],
                    distribution=params["distribution"], update_interval=params["update_interval"],
                    drop_fraction=params["drop_fraction"], stop_fraction=params["stop_fraction"],
                    start_step=params["start_step"], seed=seed,
                    verbose=False)]


def settings(method: str, seed: int, args: argparse.Namespace, env: dict) -> dict:
    """Every setting of one run, in CSV column order (``env``: threads and versions of this process)."""
    return {
        "method": method, "seed": seed,
        "method_params": records.format_params(method_params(method, args)),
        "model": "lenet_300_100",
        "data": "mnist-t10k idx (../shared/data/mnist-t10k)", "split_seed": DATA["seed"],
        "val_fraction": DATA["val_fraction"], "test_fraction": DATA["test_fraction"], "batch_size": DATA["batch_size"],
        "epochs": args.epochs,
        "optimizer": "SGD lr=0.05 momentum=0.9 weight_decay=1e-4", "lr_schedule": "cosine T_max=epochs",
        "accuracy": "final epoch, validation",
        **{key: env[key] for key in ("threads", "torch", "lightning", "torch_pruning", "python")},
    }


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict[str, float | str]:
    pl.seed_everything(seed, verbose=False)
    data = make_data()
    module = GrowPruneModule(
        "lenet_300_100",
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs),
    )
    strategies = make_strategy(method, args, seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=strategies,
        check_val_every_n_epoch=args.epochs,  # validate once: after the final epoch
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    size = module.size_metrics()
    weights = [p for n, p in module.model.named_parameters() if n.endswith("weight")]
    weights_left = sum(int(torch.count_nonzero(p)) for p in weights) / sum(p.numel() for p in weights)
    updates = [record for strategy in strategies for record in getattr(strategy, "history", [])
               if record.get("action") == "prune_regrow"]
    survival = [record["survival"] for record in updates if "survival" in record]
    return {
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "weights_left": weights_left,
        "compression": size["compression"],
        "weight_compression": 1.0 / weights_left,
        "effective_flops": size["flops/effective"],
        "dense_flops": size["flops/dense"],
        "updates": len(updates),
        "regrown": sum(record["regrown"] for record in updates),
        "mean_survival": round(statistics.mean(survival), 4) if survival else "",
        "seconds": round(time.perf_counter() - start, 1),
    }


def check(rows: list[dict]) -> None:
    """Refuse (``records.SettingsMismatch``) rows whose settings differ other than method, its parameters, seed."""
    # a method's parameters vary on purpose (ERK vs uniform, intervals...): each set is its own table row
    records.check_settings(rows, varying=VARYING, results=RESULTS + ("updates", "regrown", "mean_survival"),
                           per_method=(), method_key=("method",))


def summarise(rows: list[dict], latest: bool = False) -> list[str]:
    """The Markdown table of ``rows`` (all of one setting, else ``records.SettingsMismatch``)."""
    rows = records.deduplicate(rows, VARYING, latest)
    check(rows)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["method_params"]), []).append(row)
    dense = [float(r["val_acc"]) for r in rows if r["method"] == "dense"]
    dense_mean = statistics.mean(dense) if dense else float("nan")
    lines = [
        "| method | parameters | weights left % | weight compression | final val acc % (mean ± sd) | vs dense (points) "
        "| mean survival | epochs | seeds | s per run | commit(s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (method, params), group in sorted(groups.items(), key=lambda item: (METHODS.index(item[0][0])
                                                                             if item[0][0] in METHODS else 99, item[0][1])):
        accs = [100 * float(r["val_acc"]) for r in group]
        left = statistics.mean(float(r["weights_left"]) for r in group)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        survival = [float(r["mean_survival"]) for r in group if r.get("mean_survival") not in ("", None)]
        seconds = statistics.mean(float(r["seconds"]) for r in group)
        lines.append(
            f"| {method} | {params} | {100 * left:.2f} | {1 / left:.1f}x | {statistics.mean(accs):.2f} ± {spread:.2f} | "
            f"{round(statistics.mean(accs) - 100 * dense_mean, 2) + 0.0:+.2f} | {f'{statistics.mean(survival):.2f}' if survival else '-'} | "
            f"{group[0]['epochs']} | {records.seeds(group)} | {seconds:.0f} | {records.commits(group)} |"
        )
    caption = records.settings_line(rows, ("model", "data", "split_seed", "val_fraction", "batch_size", "optimizer",
                                           "lr_schedule", "threads", "torch"))
    return [f"settings: {caption}", ""] + lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["dense", "magnitude-global", "rigl"], choices=METHODS)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--density", type=float, default=0.01, help="fraction of the weights kept (0.01: 100x)")
    parser.add_argument("--distribution", default="erk", choices=("erk", "uniform", "global"))
    parser.add_argument("--update-interval", type=int, default=100, help="optimizer steps between regrowth updates")
    parser.add_argument("--drop-fraction", type=float, default=0.3, help="alpha: fraction dropped at the first update")
    parser.add_argument("--start-epoch", type=int, default=8,
                        help="rigl/set: dense epochs before the prune to --density, then regrowth cycles (0: sparse "
                             "from the first step, as in the RigL paper; 8 measured best of 0, 2, 8)")
    parser.add_argument("--stop-fraction", type=float, default=0.75, help="fraction of the steps with updates")
    parser.add_argument("--gradient-steps", type=int, default=1,
                        help="granet: training batches whose mean dense gradient ranks the regrowth (1: the last)")
    parser.add_argument("--drop-unused", action="store_true",
                        help="granet: every update also drops the active weights with zero dense gradient")
    parser.add_argument("--prune-end-fraction", type=float, default=0.7,
                        help="granet: fraction of the epochs by which gradual magnitude pruning reaches --density "
                             "(0.7 measured best of 0.3, 0.5, 0.7, 0.8)")
    parser.add_argument("--out", type=Path, default=records.results_path("regrowth_lenet"),
                        help="CSV the rows are appended to (default: benchmarks/results/regrowth_lenet.csv)")
    parser.add_argument("--summarise", type=Path, nargs="+", help="only print the table of these CSV files")
    parser.add_argument("--latest", action="store_true", help="with --summarise: keep the last row of a repeated run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 lets two runs share 2 cores)")
    args = parser.parse_args(argv)
    if args.summarise:
        try:
            print("\n".join(summarise(records.read_rows(args.summarise), latest=args.latest)))
        except records.SettingsMismatch as error:
            raise SystemExit(f"error: {error}") from None
        return
    if not 0.0 < args.density < 1.0:
        raise SystemExit(f"error: --density must lie in (0, 1), got {args.density}")
    if not 0.0 < args.prune_end_fraction <= 1.0:
        raise SystemExit(f"error: --prune-end-fraction must lie in (0, 1], got {args.prune_end_fraction}")
    if "granet" in args.methods and int(args.epochs * args.prune_end_fraction) <= 2:
        raise SystemExit(f"error: granet prunes from epoch 2 to int(--epochs x --prune-end-fraction) = "
                         f"{int(args.epochs * args.prune_end_fraction)}: it must end after epoch 2")
    if args.gradient_steps < 1:
        raise SystemExit(f"error: --gradient-steps must be >= 1, got {args.gradient_steps}")
    torch.set_num_threads(args.threads)
    env = records.run_info()
    plan = [(method, seed) for method in args.methods for seed in args.seeds]
    extra = ("updates", "regrown", "mean_survival")
    planned = [{**settings(method, seed, args, env), **dict.fromkeys(RESULTS + extra, ""), "seconds": "",
                **{key: env[key] for key in records.INFO_COLUMNS if key in env}} for method, seed in plan]
    appender = records.open_checked(args.out, planned, check)  # before any training
    if not MNIST.is_dir():
        raise SystemExit(f"the MNIST idx files are missing: expected them in {MNIST}")
    rows: list[dict] = []
    started = time.perf_counter()
    for (method, seed), template in zip(plan, planned):
        result = run_one(method, seed, args)
        row = {**template, **result}
        appender.append(row)
        rows.append(row)
        print(f"{method:>17} seed {seed}: val acc {row['val_acc']:.4f}, weights left {100 * row['weights_left']:.2f} %, "
              f"{row['seconds']:.0f} s", flush=True)
    print(f"\nmachine: {records.machine()}; commit {env['commit']}; {args.epochs} epochs per run; {len(rows)} rows "
          f"appended to {args.out}; {time.perf_counter() - started:.0f} s in all\n")
    print("\n".join(summarise(rows)))


if __name__ == "__main__":
    main()
