"""The batch-norm table: every growth initialiser, published/unsafe vs safe form, with and without BN.

    python -m benchmarks.growth_bn_table [--seeds 0 1 2] [--train 2000] [--val 1000] [--epochs 3]
                                         [--grow-epoch 1] [--width 0.125] [--init kaiming|default]
                                         [--lr 0.005] [--lr-no-bn LR] [--methods ...] [--threads N]

(run from the repository root.) A narrow VGG-11 (``vgg11_bn`` / ``vgg11``, ``width`` 0.125: 8 to 64
channels) learns MNIST digits from the idx files in ``/work/shared/data/mnist-t10k`` (a ``--train``
subset for training, a ``--val`` subset for validation, padded to 32x32), conv weights He-normal
(``--init kaiming``; torch's default init leaves the plain VGG-11 at ln 10), SGD (``--lr`` 0.005 for
both halves, ``--lr-no-bn`` to differ; momentum 0.9, batch 64). After ``--grow-epoch`` epochs
every channel group grows by 50 % (one ``ChannelGraph.add``; the optimizer is rebuilt with
zero-padded state like ``apply_edit`` does) and the initialiser gives the new channels values on two
training batches. Recorded per run:

* ``change``: max abs difference of the eval-mode outputs (validation set) right before and after growth;
* ``gradient_norm``: the initialiser's gradient norm of the new entries;
* ``new_grad_after_step``: the loss gradient norm of the new entries after the first step (0: dead units);
* ``val_loss`` right after growth, after one more epoch and at the end; ``val_acc`` at the end.

Forms: ``unsafe`` is the published or study form (GradMax / GradMax-Opt ``"paper"``: zero fan-in;
random and Firefly ``"full"``: non-zero fan-out), ``safe`` the function-preserving BN-safe form
(non-zero fan-in, zero fan-out). A ``none`` row trains the same network without growth. Means and
standard deviations over seeds are printed as a Markdown table; every run is appended to
``benchmarks/results/growth_bn_table.csv`` (with its ``init`` and ``lr``). The first table (torch's
default init, lr 0.05: the plain VGG-11 never learned) is kept in ``growth_bn_table_v1.csv``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import records
from benchmarks.timing import machine
from growprune.data import IdxDataModule
from growprune.growth import Firefly, GradMax, GradMaxOpt, RandomInit, new_units
from growprune.models.registry import create_model
from growprune.surgery.channels import ChannelGraph
from growprune.surgery.optimizer import carry_optimizer_state

DATA = Path("/work/shared/data/mnist-t10k")
FORMS = {  # initialiser -> (unsafe form, safe form)
    "random": (lambda: RandomInit(form="full"), lambda: RandomInit()),
    "gradmax": (lambda: GradMax(form="paper"), lambda: GradMax()),
    "gradmax_opt": (lambda: GradMaxOpt(form="paper"), lambda: GradMaxOpt()),
    "firefly": (lambda: Firefly(form="full"), lambda: Firefly()),
}
LR, MOMENTUM, BATCH = 0.005, 0.9, 64  # 0.05 diverges the plain VGG-11; 0.005 trains both halves
INITS = ("default", "kaiming")
RESULT_COLUMNS = ["change", "gradient_norm", "new_grad_after_step", "val_loss_grown", "val_loss_after_step",
                  "val_loss_1_epoch", "val_loss_end", "val_acc_end", "init_seconds"]


def load(train: int, val: int) -> tuple[torch.Tensor, ...]:
    data = IdxDataModule(str(DATA / "t10k-images-idx3-ubyte.gz"), str(DATA / "t10k-labels-idx1-ubyte.gz"), seed=0)
    train_set, val_set, _ = data.build_datasets()

    def tensors(dataset: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = dataset.images[:count].float().div(255.0).sub(dataset.mean).div(dataset.std)
        return F.pad(images.unsqueeze(1), (2, 2, 2, 2)), dataset.labels[:count].long()

    return (*tensors(train_set, train), *tensors(val_set, val))


def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        outputs = torch.cat([model(inputs[i:i + 500]) for i in range(0, len(inputs), 500)])
    model.train()
    return float(F.cross_entropy(outputs, targets)), float((outputs.argmax(1) == targets).float().mean()), outputs


def new_gradient_norm(model: torch.nn.Module, units: Any) -> float:
    total = 0.0
    for unit_slice in units.slices():
        if unit_slice.buffer:
            continue
        grad = model.get_parameter(unit_slice.name).grad
        if grad is not None:
            total += float(grad[unit_slice.mask.to(grad.device)].double().pow(2).sum())
    return total ** 0.5


def initialise_convs(model: torch.nn.Module, init: str) -> None:
    """Re-initialise every conv weight for ``init`` (``"default"``: torch's own, left alone).

    torch's default conv init (uniform, variance 1 / (3 fan-in)) shrinks the signal about 6x per
    conv + ReLU, so the plain 8-conv VGG-11 sees nearly constant logits and never leaves ln 10;
    He-normal (fan-in, ReLU gain) keeps the forward variance, with or without batch norm.
    """
    if init == "default":
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def learning_rate(bn: bool, args: argparse.Namespace) -> float:
    return args.lr if bn or args.lr_no_bn is None else args.lr_no_bn


def run(bn: bool, method: str, form: str, seed: int, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict[str, float]:
    train_x, train_y, val_x, val_y = data
    torch.manual_seed(seed)
    model = create_model("vgg11_bn" if bn else "vgg11", num_classes=10, in_channels=1, width=args.width)
    initialise_convs(model, args.init)
    lr = learning_rate(bn, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, float] = {}
    units = None
    check_first_step = False
    for epoch in range(args.epochs):
        if epoch == args.grow_epoch and method != "none":
            before = evaluate(model, val_x, val_y)[2]
            graph = ChannelGraph(model, val_x[:1])
            plan = {group.root: max(group.step, group.channels // 2 // group.step * group.step) for group in graph.groups()}
            changes = graph.add(plan)
            new_optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
            parameters = dict(model.named_parameters())
            carry_optimizer_state(optimizer, new_optimizer, {parameters[n]: c for n, c in changes.items() if n in parameters})
            optimizer = new_optimizer
            units = new_units(model, changes)
            initializer = FORMS[method][form == "safe"]()
            order = torch.randperm(len(train_x), generator=generator)[: 2 * BATCH]
            batches = [(train_x[order[:BATCH]], train_y[order[:BATCH]]), (train_x[order[BATCH:]], train_y[order[BATCH:]])]
            start = time.perf_counter()
            stats = initializer.initialize(model, units, batches)
            result["init_seconds"] = time.perf_counter() - start
            loss, _, after = evaluate(model, val_x, val_y)
            result.update(change=float((after - before).abs().max()), gradient_norm=stats["gradient_norm"],
                          val_loss_grown=loss)
            check_first_step = True
        order = torch.randperm(len(train_x), generator=generator)
        model.train()
        for start_index in range(0, len(train_x) - BATCH + 1, BATCH):
            index = order[start_index:start_index + BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(train_x[index]), train_y[index]).backward()
            if check_first_step:
                optimizer.step()  # the first step after growth; then the gradient it leaves the new units
                optimizer.zero_grad()
                F.cross_entropy(model(train_x[index]), train_y[index]).backward()
                result["new_grad_after_step"] = new_gradient_norm(model, units)
                result["val_loss_after_step"] = evaluate(model, val_x, val_y)[0]
                check_first_step = False
                continue
            optimizer.step()
        if method != "none" and epoch == args.grow_epoch:
            result["val_loss_1_epoch"] = evaluate(model, val_x, val_y)[0]
    result["val_loss_end"], result["val_acc_end"], _ = evaluate(model, val_x, val_y)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--grow-epoch", type=int, default=1)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--init", choices=INITS, default="kaiming",
                        help="conv weight init: torch's default, or He-normal (fan-in) so the plain VGG-11 learns")
    parser.add_argument("--lr", type=float, default=LR, help="SGD learning rate (both halves unless --lr-no-bn)")
    parser.add_argument("--lr-no-bn", type=float, default=None, help="learning rate of the no-BN half (default: --lr)")
    parser.add_argument("--methods", nargs="+", default=["none", *FORMS], choices=["none", *FORMS])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=records.results_path("growth_bn_table"))
    args = parser.parse_args()
    if args.lr <= 0 or (args.lr_no_bn is not None and args.lr_no_bn <= 0):
        parser.error(f"learning rates must be > 0, got --lr {args.lr} --lr-no-bn {args.lr_no_bn}")
    torch.set_num_threads(args.threads)
    env = records.run_info()
    data = load(args.train, args.val)
    print(f"machine: {machine()}, load average {env['load_start']} at start")
    print(f"VGG-11 width {args.width} on MNIST (train {args.train}, val {args.val}, 32x32), {args.init} conv init, "
          f"SGD lr {args.lr} (no BN: {learning_rate(False, args)}) momentum {MOMENTUM} batch {BATCH}; every group +50 % after epoch {args.grow_epoch} of {args.epochs}; seeds {args.seeds}")
    runs: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    rows = []
    started = time.perf_counter()
    for bn in (True, False):
        for method in args.methods:
            for form in (("-",) if method == "none" else ("unsafe", "safe")):
                for seed in args.seeds:
                    result = run(bn, method, form, seed, data, args)
                    key = ("BN" if bn else "no BN", method, form if method == "none" else
                           f"{form} ({'paper' if method.startswith('gradmax') and form == 'unsafe' else 'full' if form == 'unsafe' else 'safe'})")
                    runs.setdefault(key, []).append(result)
                    measured = {column: result.get(column, float("nan")) for column in RESULT_COLUMNS}
                    rows.append({"bn": bn, "initializer": method, "form": key[2], "seed": seed, **measured,
                                 "train": args.train, "val": args.val, "epochs": args.epochs, "grow_epoch": args.grow_epoch,
                                 "width": args.width, "init": args.init, "lr": learning_rate(bn, args), **env})
    saved = records.save_rows(args.out, rows)  # before the summary, so a failing summary loses no run
    columns = ["change", "gradient_norm", "new_grad_after_step", "val_loss_grown", "val_loss_after_step",
               "val_loss_1_epoch", "val_loss_end", "val_acc_end"]
    print()
    print("| BN | initialiser | form | " + " | ".join(columns) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for (bn, method, form), results in runs.items():
        cells = []
        for column in columns:
            values = [r[column] for r in results if column in r]
            finite = [value for value in values if math.isfinite(value)]
            # a diverged run (inf / NaN loss) is counted, not averaged: statistics.stdev fails on it
            diverged = f" ({len(values) - len(finite)} of {len(values)} not finite)" if len(finite) < len(values) else ""
            if not finite:
                cells.append("-" + diverged if not values else f"not finite ({len(values)} of {len(values)})")
                continue
            mean = statistics.mean(finite)
            spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
            cells.append(f"{mean:.3g} ± {spread:.2g}{diverged}")
        print(f"| {bn} | {method} | {form} | " + " | ".join(cells) + " |")
    print(f"\n{len(rows)} runs in {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at end")
    print(f"commit {env['commit']}; {saved}")


if __name__ == "__main__":
    main()
