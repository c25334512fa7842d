"""Small builders shared by the tests: tiny trainers and data that run in a second on 2 cores."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune.data import SyntheticDataModule


def tiny_data(**kwargs) -> SyntheticDataModule:
    options = {"num_samples": 256, "input_shape": (1, 8, 8), "num_classes": 4, "batch_size": 32, "seed": 0}
    options.update(kwargs)
    return SyntheticDataModule(**options)


def tiny_trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = {
        "default_root_dir": str(tmp_path),
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


class ResidualMLP(nn.Module):
    """fc1 -> ReLU, then a residual add of fc2's ReLU output onto it, then the output layer."""

    def __init__(self, inputs: int = 64, width: int = 8, classes: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.out(h + F.relu(self.fc2(h)))


class StopAfter(pl.Callback):
    """Interrupts training after ``epochs`` epochs, as a crash or a time limit would (the trainer's
    ``max_epochs`` stays the planned length, so strategies accept schedules that end later)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def masked_copy(model: nn.Module, graph, plan: dict) -> nn.Module:
    """A copy of ``model`` whose planned channels are switched off (the producing conv/linear rows
    and the batch-norm scale and shift set to 0) instead of removed: what the pruned model must compute."""
    import copy

    copied = copy.deepcopy(model)
    names = {module: name for name, module in model.named_modules()}
    with torch.no_grad():
        for root, indices in plan.items():
            chosen = set(indices)
            for item in graph.tp_group(root).items:
                module = item.dep.target.module
                if graph.graph.is_out_channel_pruning_fn(item.dep.handler) and isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                    rows = [i for i, r in zip(item.idxs, item.root_idxs) if r in chosen]
                    target = copied.get_submodule(names[module])
                    target.weight[rows] = 0
                    if target.bias is not None:
                        target.bias[rows] = 0
    return copied
