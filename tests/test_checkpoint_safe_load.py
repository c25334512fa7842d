"""Checkpoints written from the Python API load with ``weights_only=True``: optimizer and scheduler
callables are stored as ``class_path``/``init_args`` descriptions and rebuilt on load."""

import copy
import functools
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from growprune import GrowPruneModule
from growprune.errors import ConfigurationError
from tests.helpers import tiny_data, tiny_trainer

README = Path(__file__).resolve().parents[1] / "README.md"


def sgd_module(**kwargs):
    return GrowPruneModule(
        "lenet_300_100", num_classes=4, input_shape=(1, 8, 8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), **kwargs)


def train(module, tmp_path, epochs, ckpt_path=None, callbacks=()):
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, limit_train_batches=2, limit_val_batches=0,
                           enable_checkpointing=True, callbacks=list(callbacks))
    trainer.fit(module, tiny_data(num_samples=64, batch_size=16), ckpt_path=ckpt_path)
    return trainer


class OptimizerAtStart(Callback):
    """The optimizer and scheduler state once a (resumed) fit has restored them."""

    def on_train_start(self, trainer, pl_module):
        # copies: state_dict() shares the tensors that the next steps update in place
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.scheduler = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())


def test_python_api_checkpoint_loads_weights_only_rebuilds_and_resumes(tmp_path):
    first = train(sgd_module(), tmp_path, epochs=1)
    path = first.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=True)  # used to fail: functools.partial was pickled
    assert checkpoint["hyper_parameters"]["optimizer"] == {
        "class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}}
    assert checkpoint["hyper_parameters"]["lr_scheduler"] == {
        "class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}

    loaded = GrowPruneModule.load_from_checkpoint(path)  # Lightning loads with torch's default, weights_only=True
    assert loaded.optimizer_factory.func is torch.optim.SGD
    assert loaded.optimizer_factory.keywords == {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
    assert loaded.lr_scheduler_factory.func is torch.optim.lr_scheduler.StepLR
    assert loaded.lr_scheduler_factory.keywords == {"step_size": 1, "gamma": 0.5}

    probe = OptimizerAtStart()
    resumed = train(loaded, tmp_path / "resumed", epochs=2, ckpt_path=path, callbacks=[probe])
    assert resumed.global_step == 4  # the second epoch ran
    stored = checkpoint["optimizer_states"][0]
    assert probe.optimizer["param_groups"][0]["lr"] == stored["param_groups"][0]["lr"] == pytest.approx(0.025)
    assert probe.optimizer["state"].keys() == stored["state"].keys()
    for key, state in stored["state"].items():
        assert torch.equal(probe.optimizer["state"][key]["momentum_buffer"], state["momentum_buffer"])
    assert probe.scheduler["last_epoch"] == checkpoint["lr_schedulers"][0]["last_epoch"] == 1
    # a checkpoint of the resumed run loads safely too
    torch.load(resumed.checkpoint_callback.best_model_path, weights_only=True)


def test_default_optimizer_is_stored_by_its_dotted_path(tmp_path):
    trainer = train(GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8)), tmp_path, epochs=1)
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"] == "growprune.module.default_optimizer"
    from growprune.module import default_optimizer

    assert GrowPruneModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path).optimizer_factory is default_optimizer


def test_a_lambda_is_not_stored_and_loading_asks_for_it_in_one_line(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8),
                                 optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    assert [w for w in caught if "cannot be stored in checkpoints" in str(w.message)]
    path = train(module, tmp_path, epochs=1).checkpoint_callback.best_model_path
    assert torch.load(path, weights_only=True)["hyper_parameters"]["optimizer"]["not_stored"].endswith("<lambda>")
    with pytest.raises(ConfigurationError, match=r"does not hold its optimizer .* pass it again") as error:
        GrowPruneModule.load_from_checkpoint(path)
    assert "\n" not in str(error.value)
    loaded = GrowPruneModule.load_from_checkpoint(path, optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    assert loaded.optimizer_factory.func is torch.optim.SGD


def test_descriptions_name_only_optimizers_and_schedulers():
    for bad in ("os.system", {"class_path": "subprocess.run", "init_args": {"args": "true"}}):
        with pytest.raises(ConfigurationError, match="is not an optimizer class"):
            GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8), optimizer=bad)
    with pytest.raises(ConfigurationError, match="cannot find 'not_a_module.Optimizer' among the imported modules"):
        GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8), optimizer="not_a_module.Optimizer")


def test_the_readme_python_example_checkpoint_loads(tmp_path, monkeypatch):
    block = re.search(r"```python\n(import functools, torch, lightning.pytorch as pl\n.*?)```", README.read_text(), re.S)
    assert block, "the README's training-module example is missing"

    class QuickTrainer(pl.Trainer):  # the README's Trainer, on 2 batches per epoch and quiet
        def __init__(self, **kwargs):
            super().__init__(limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                             enable_model_summary=False, logger=False, default_root_dir=str(tmp_path), **kwargs)

    monkeypatch.setattr(pl, "Trainer", QuickTrainer)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    torch.load(checkpoints[0], weights_only=True)
    loaded = GrowPruneModule.load_from_checkpoint(checkpoints[0])
    assert loaded.optimizer_factory.keywords == {"lr": 0.05, "momentum": 0.9}
