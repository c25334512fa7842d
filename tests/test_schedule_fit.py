"""Schedules that cannot finish within the training are refused before anything changes, or, with
``fit_schedule``, compressed into it; schedules that fit are left alone."""

import copy
import functools
import logging
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune import GrowPruneModule
from growprune.cli import main
from growprune.errors import ConfigurationError
from growprune.schedules import Cubic, Linear, OneShot, Steps
from growprune.strategies import (NetworkSlimming, NNReliefPruning, PolarizationPruning, StructuredPruning,
                                  UnstructuredPruning)
from tests.helpers import StopAfter, tiny_data, tiny_trainer


class ConvBN(nn.Module):
    """conv-BN-ReLU twice, pooled, linear: channel groups with batch norm for every strategy."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def conv_module():
    return GrowPruneModule(ConvBN(), num_classes=4, input_shape=(1, 8, 8),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def mlp_module():
    return GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def fit(module, callbacks, tmp_path, **kwargs):
    options = {"max_epochs": 3, "limit_train_batches": 2, "limit_val_batches": 0, **kwargs}
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, **options)
    trainer.fit(module, tiny_data(num_samples=64, batch_size=16))
    return trainer


def assert_refused_before_any_change(module, callbacks, tmp_path, match, **kwargs):
    before = copy.deepcopy(module.model.state_dict())
    with pytest.raises(ConfigurationError, match=match) as caught:
        fit(module, callbacks, tmp_path, **kwargs)
    assert "\n" not in str(caught.value)  # the command line prints it as one line
    assert module.edit_log == [] and module.masks == {}
    after = module.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    return str(caught.value)


def test_issue_example_is_refused_with_both_ways_out(tmp_path):
    # Cubic(amount=0.9, end=10) with max_epochs 3 used to stop silently at 44 % sparsity
    strategy = UnstructuredPruning(Cubic(amount=0.9, end=10), scope="global")
    message = assert_refused_before_any_change(mlp_module(), [strategy], tmp_path, "acts last at epoch 10")
    for part in ("UnstructuredPruning 'unstructuredpruning'", "training runs 3 epochs", "max_epochs=3",
                 "stop at 43.9% instead of reaching 90.0%", "end <= 2", "fit_schedule: true"):
        assert part in message


def test_step_schedules_count_limit_train_batches(tmp_path):
    # 3 epochs x 2 batches = 6 optimizer steps; the schedule's last action is at step 9
    strategy = UnstructuredPruning(Linear(amount=0.5, start=0, end=9, every=3, unit="step"))
    message = assert_refused_before_any_change(mlp_module(), [strategy], tmp_path, "acts last at step 9")
    assert "training runs 6 steps" in message and "2 training batches per epoch" in message


def test_max_steps_ends_an_epoch_schedule_early(tmp_path):
    # max_steps=4 at 2 steps per epoch: only epochs 0 and 1 start, although max_epochs is 10
    strategy = UnstructuredPruning(OneShot(amount=0.5, at=2))
    message = assert_refused_before_any_change(mlp_module(), [strategy], tmp_path, "acts last at epoch 2",
                                               max_epochs=10, max_steps=4)
    assert "training runs 2 epochs" in message and "max_steps=4" in message and "at <= 1" in message


STRATEGIES = {
    "unstructured": lambda: UnstructuredPruning(Steps(steps=[1, 5], amounts=[0.3, 0.6])),
    "structured": lambda: StructuredPruning(OneShot(amount=0.25, at=4)),
    "nnrelief-default": lambda: NNReliefPruning(iterations=2, every=2),
    "nnrelief-given": lambda: NNReliefPruning(schedule=OneShot(amount=0.0, at=3)),
    "slimming": lambda: NetworkSlimming(schedule=OneShot(amount=0.0, at=3)),
    "polarization": lambda: PolarizationPruning(schedule=Linear(amount=0.5, start=1, end=4)),
}


@pytest.mark.parametrize("build", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_every_strategy_refuses_a_schedule_that_cannot_finish(build, tmp_path):
    strategy = build()
    message = assert_refused_before_any_change(conv_module(), [strategy], tmp_path, "but training runs 3 epochs")
    assert type(strategy).__name__ in message
    if isinstance(strategy, NNReliefPruning) and strategy._default_schedule:
        assert "iterations * every <= 2, now 2 * 2" in message


def test_a_later_refusal_stops_an_earlier_strategy_from_changing_the_network(tmp_path):
    # polarization sets every BN scale to 0.5 when fit starts: the second strategy's refusal comes first
    polarization = PolarizationPruning(schedule=OneShot(amount=0.0, at=1))
    late = StructuredPruning(OneShot(amount=0.25, at=7), name="late")
    assert_refused_before_any_change(conv_module(), [polarization, late], tmp_path, "'late'")


def test_fit_schedule_compresses_a_copy_and_reaches_the_final_target(tmp_path, caplog):
    configured = Cubic(amount=0.9, end=10)
    strategy = UnstructuredPruning(configured, scope="global", fit_schedule=True)
    module = mlp_module()
    with caplog.at_level(logging.INFO):
        fit(module, [strategy], tmp_path)
    assert [record["time"] for record in module.edit_log] == [0, 1, 2]
    assert module.edit_log[-1]["achieved"] == pytest.approx(0.9, abs=1e-3)
    said = [r.getMessage() for r in caplog.records if "fit_schedule" in r.getMessage()]
    assert len(said) == 1 and "compressed to act at epochs [0, 1, 2]" in said[0]
    assert configured.end == 10 and strategy.schedule is configured  # the configured schedule is untouched
    assert strategy.active_schedule.times() == [0, 1, 2]


def test_fit_schedule_keeps_nnrelief_iterations(tmp_path):
    strategy = NNReliefPruning(iterations=2, every=2, pruning_samples=32, fit_schedule=True)
    module = mlp_module()
    fit(module, [strategy], tmp_path)
    assert [record["time"] for record in module.edit_log] == [1, 2]  # 2 and 4 moved to 1 and 2


def test_valid_schedules_and_unbounded_training_are_left_alone(tmp_path):
    schedule = Linear(amount=0.5, start=0, end=2, every=1)
    strategy = UnstructuredPruning(schedule, fit_schedule=True)
    module = mlp_module()
    fit(module, [strategy], tmp_path)
    assert strategy.active_schedule.times() == schedule.times() == [0, 1, 2]
    assert [record["target"] for record in module.edit_log] == [0.0, 0.25, 0.5]

    # max_epochs=-1 and no max_steps: training has no end, any schedule can finish
    far = UnstructuredPruning(OneShot(amount=0.5, at=50))
    fit(mlp_module(), [far, StopAfter(1)], tmp_path, max_epochs=-1)
    assert far.active_schedule.times() == [50]


def test_a_resumed_run_counts_the_actions_already_done(tmp_path):
    interrupted = tiny_trainer(tmp_path, max_epochs=4, limit_train_batches=2, limit_val_batches=0,
                               callbacks=[UnstructuredPruning(Steps(steps=[1, 3], amounts=[0.3, 0.6])), StopAfter(2)])
    interrupted.fit(mlp_module(), tiny_data(num_samples=64, batch_size=16))
    checkpoint = tmp_path / "interrupted.ckpt"
    interrupted.save_checkpoint(checkpoint)
    # resumed with 3 epochs: the action at epoch 1 is done, the one at epoch 3 cannot happen
    strategy = UnstructuredPruning(Steps(steps=[1, 3], amounts=[0.3, 0.6]))
    resumed = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[strategy])
    with pytest.raises(ConfigurationError, match="training runs 3 epochs .*: 1 of its 2 actions would never happen"):
        resumed.fit(mlp_module(), tiny_data(num_samples=64, batch_size=16), ckpt_path=checkpoint)


def test_regularisers_default_time_counts_the_epochs_max_steps_allows(tmp_path):
    # max_epochs=8 but max_steps=4 at 2 steps per epoch: 2 epochs; 75 % of them -> prune at epoch 1
    slimming = NetworkSlimming(prune_fraction=0.25)
    module = conv_module()
    fit(module, [slimming], tmp_path, max_epochs=8, max_steps=4)
    assert [record["time"] for record in module.edit_log] == [1]


def test_command_line_prints_the_refusal_as_one_line(tmp_path, capsys):
    config = tmp_path / "late.yaml"
    config.write_text(textwrap.dedent(f"""\
        trainer:
          max_epochs: 3
          limit_train_batches: 2
          limit_val_batches: 0
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: growprune.strategies.UnstructuredPruning
              init_args:
                schedule: {{class_path: growprune.schedules.Cubic, init_args: {{amount: 0.9, end: 10}}}}
        """))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("growprune: error:")]
    assert len(lines) == 1 and "acts last at epoch 10" in lines[0] and "Traceback" not in error
