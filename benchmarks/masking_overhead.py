"""Cost of keeping 90 % of the weights masked during training, vs the dense model and vs Lightning's
``ModelPruning`` (``torch.nn.utils.prune`` forward hooks), measured side by side in one run.

    python -m benchmarks.masking_overhead [--epochs 8] [--repeats 5]

Models: LeNet-300-100 and LeNet-5 on MNIST-shaped inputs (1x28x28, batch 128; random tensors:
step time does not depend on the pixel values). Every variant prunes (or not) at the start of
epoch 0; epoch 0 is warm-up, the others are timed. Target (issue 3): growprune masked <= 1.05x dense.
Every sample (model x variant x repeat, ms per step) is appended with the run's settings and git
commit to ``benchmarks/results/masking_overhead.csv`` (``--out`` for another file).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelPruning
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import records
from benchmarks.timing import StepTimer, bare_trainer, interleaved_medians, machine, median
from growprune import GrowPruneModule
from growprune.schedules import OneShot
from growprune.strategies import UnstructuredPruning


def make_module(arch: str) -> GrowPruneModule:
    torch.manual_seed(0)
    return GrowPruneModule(arch, num_classes=10, input_shape=(1, 28, 28),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))


def loader(steps: int, batch_size: int = 128) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(steps * batch_size, 1, 28, 28, generator=generator)
    targets = torch.randint(0, 10, (steps * batch_size,), generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=False)


def run(arch: str, variant: str, data: DataLoader, epochs: int) -> float:
    module = make_module(arch)
    timer = StepTimer()
    callbacks = [timer]
    if variant == "growprune masked 90%":
        callbacks.insert(0, UnstructuredPruning(OneShot(amount=0.9, at=0), scope="global", verbose=False))
    elif variant == "Lightning ModelPruning 90%":
        callbacks.insert(0, ModelPruning("l1_unstructured", amount=0.9, use_global_unstructured=True,
                                         apply_pruning=lambda epoch: epoch == 0, make_pruning_permanent=False,
                                         verbose=0))
    trainer = bare_trainer(epochs, callbacks)
    trainer.fit(module, train_dataloaders=data)
    if variant != "dense":
        nonzero = sum(int(torch.count_nonzero(p)) for n, p in module.model.named_parameters() if n.endswith("weight"))
        total = sum(p.numel() for n, p in module.model.named_parameters() if n.endswith("weight"))
        if variant == "growprune masked 90%":
            assert abs(nonzero / total - 0.1) < 0.01, "masking did not hold"
    return timer.seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--out", type=Path, default=records.results_path("masking_overhead"),
                        help="CSV the raw samples are appended to (default: benchmarks/results/masking_overhead.csv)")
    args = parser.parse_args()
    env = records.run_info()
    data = loader(args.steps)
    rows = []
    print(f"machine: {machine()}")
    print(f"batch 128, {args.steps} steps/epoch, {args.epochs - 1} timed epochs, {args.repeats} interleaved repeats")
    print("| model | variant | median ms/step | vs dense |")
    print("| --- | --- | --- | --- |")
    for arch in ("lenet_300_100", "lenet5"):
        variants = ("dense", "growprune masked 90%", "Lightning ModelPruning 90%")
        samples = interleaved_medians({v: functools.partial(run, arch, v, data, args.epochs) for v in variants}, args.repeats)
        dense = median(samples["dense"])
        for variant, values in samples.items():
            print(f"| {arch} | {variant} | {median(values) * 1e3:.3f} | {median(values) / dense:.3f}x |", flush=True)
        settings = {"input": "1x28x28 random", "batch_size": 128, "steps_per_epoch": args.steps, "epochs": args.epochs,
                    "timed_epochs": args.epochs - 1, "repeats": args.repeats, "amount": 0.9,
                    "optimizer": "SGD lr=0.01 momentum=0.9", "mask_gradients": False,
                    "statistic": "median over repeats of seconds/step"}
        rows += records.sample_rows({(arch, v): s for v, s in samples.items()}, ("model", "variant"), "ms_per_step",
                                    settings, env)
    print(f"\ncommit {env['commit']}; {records.save_rows(args.out, rows)}")


if __name__ == "__main__":
    main()
