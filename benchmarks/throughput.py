"""Training throughput of LeNet-300-100 on the digits data: plain PyTorch vs plain Lightning vs growprune.

    python -m benchmarks.throughput [--epochs 12] [--repeats 7]

Each variant trains the same model (same init, same batches, SGD with momentum) for ``epochs``
epochs; the first epoch is warm-up, the rest are timed. Variants run interleaved, ``repeats``
times; the table gives medians. Target (issue 2): growprune within 5 % of plain Lightning.
Every sample (variant x repeat, ms per step) is appended with the run's settings and git commit to
``benchmarks/results/throughput.csv`` (``--out`` for another file).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from benchmarks import records
from benchmarks.timing import StepTimer, bare_trainer, interleaved_medians, machine, median
from growprune import GrowPruneModule
from growprune.data import DigitsDataModule
from growprune.models import create_model


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet_300_100", num_classes=10, in_channels=1, image_size=(8, 8))


def optimizer_for(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class PlainLightning(pl.LightningModule):
    """What a user would write by hand: loss and accuracy logged, one optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_model()

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        logits = self.model(inputs)
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == targets).float().mean(), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return optimizer_for(self.parameters())


def run_plain_pytorch(loader, epochs: int) -> float:
    model = make_model()
    optimizer = optimizer_for(model.parameters())
    model.train()
    steps, start = 0, None
    for epoch in range(epochs):
        if epoch == 1:
            start, steps = time.perf_counter(), 0
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            steps += 1
    return (time.perf_counter() - start) / steps


def run_lightning(module_factory, data, epochs: int) -> float:
    timer = StepTimer()
    trainer = bare_trainer(epochs, [timer])
    trainer.fit(module_factory(), data)
    return timer.seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=records.results_path("throughput"),
                        help="CSV the raw samples are appended to (default: benchmarks/results/throughput.csv)")
    args = parser.parse_args()
    env = records.run_info()

    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    loader = data.train_dataloader()

    def growprune_factory() -> GrowPruneModule:
        return GrowPruneModule(make_model(), num_classes=10, input_shape=(1, 8, 8),
                               optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    samples = interleaved_medians(
        {
            "plain PyTorch loop": lambda: run_plain_pytorch(loader, args.epochs),
            "plain LightningModule": lambda: run_lightning(PlainLightning, data, args.epochs),
            "growprune GrowPruneModule": lambda: run_lightning(growprune_factory, data, args.epochs),
        },
        args.repeats,
    )
    lightning_median = median(samples["plain LightningModule"])
    print(f"machine: {machine()}")
    print(f"LeNet-300-100 on digits, batch 64, {len(loader)} steps/epoch, {args.epochs - 1} timed epochs, {args.repeats} interleaved repeats")
    print("| variant | median ms/step | steps/s | vs plain Lightning |")
    print("| --- | --- | --- | --- |")
    for name, values in samples.items():
        value = median(values)
        print(f"| {name} | {value * 1e3:.3f} | {1 / value:.0f} | {value / lightning_median:.3f}x |")
    settings = {"model": "lenet_300_100", "data": "digits 8x8", "batch_size": 64, "steps_per_epoch": len(loader),
                "epochs": args.epochs, "timed_epochs": args.epochs - 1, "repeats": args.repeats,
                "optimizer": "SGD lr=0.05 momentum=0.9", "statistic": "median over repeats of seconds/step"}
    rows = records.sample_rows(samples, ("variant",), "ms_per_step", settings, env)
    print(f"\ncommit {env['commit']}; {records.save_rows(args.out, rows)}")


if __name__ == "__main__":
    main()
