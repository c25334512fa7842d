"""Triggers: Plateau and Signal decide when a strategy acts; their state survives a resumed run."""

import functools
from types import SimpleNamespace

import pytest
import torch

from growprune import GrowPruneModule
from growprune.errors import ConfigurationError
from growprune.strategies import StructuredPruning
from growprune.triggers import Plateau, Signal
from tests.helpers import StopAfter, tiny_data, tiny_trainer


def stream(trigger, values, strategy=None, monitor="val/loss", start=1):
    """Poll ``trigger`` once per value (times 1, 2, ...) with that value logged; the targets it returns."""
    strategy = strategy or SimpleNamespace(name="fake", exhausted=None)
    targets = []
    for time, value in enumerate(values, start=start):
        trainer = SimpleNamespace(callback_metrics={monitor: torch.tensor(value)})
        targets.append(trigger.poll(time, trainer, None, strategy))
    return targets


def test_plateau_acts_after_patience_checks_without_an_improvement_of_min_delta():
    trigger = Plateau(monitor="val/loss", patience=2, min_delta=0.01, step=0.25, amount=1.0)
    # 1.0 best; 0.9 improves; 0.895 and 0.893 improve by less than min_delta -> act (0.25);
    # 0.7 improves; two more stalls -> act again (0.5)
    targets = stream(trigger, [1.0, 0.9, 0.895, 0.893, 0.7, 0.71, 0.7])
    assert targets == [None, None, None, 0.25, None, None, 0.5]
    assert trigger.best == pytest.approx(0.7) and trigger.actions == 2


def test_plateau_mode_max_and_cooldown():
    trigger = Plateau(monitor="val/acc", mode="max", patience=1, cooldown=2, step=0.25, amount=1.0)
    # 0.5 best; 0.5 stalls -> act; two cooldown checks do not count; the next stall acts; 0.6 improves
    # during the next cooldown (it becomes the best), and the stall after the cooldown acts
    targets = stream(trigger, [0.5, 0.5, 0.4, 0.4, 0.4, 0.6, 0.6, 0.6], monitor="val/acc")
    assert targets == [None, 0.25, None, None, 0.5, None, None, 0.75]
    assert trigger.best == pytest.approx(0.6)


def test_plateau_stops_at_its_budget_and_at_its_amount():
    budget = Plateau(patience=1, min_delta=100.0, step=0.2, amount=1.0, max_actions=2)
    assert stream(budget, [1.0] * 6) == [None, 0.2, 0.4, None, None, None]
    assert budget.stopped == "max_actions=2 reached"
    ceiling = Plateau(patience=1, min_delta=100.0, step=0.4, amount=1.0)
    assert stream(ceiling, [1.0] * 6) == [None, 0.4, 0.8, 1.0, None, None]  # the last step is cut to amount
    assert ceiling.stopped == "amount=1 reached"


def test_trigger_stops_when_the_strategy_is_exhausted():
    strategy = SimpleNamespace(name="growth", exhausted=None)
    trigger = Plateau(patience=1, min_delta=100.0, step=0.5, amount=3.0)
    assert stream(trigger, [1.0, 1.0], strategy) == [None, 0.5]
    strategy.exhausted = "max_width=2 reached"
    assert stream(trigger, [1.0, 1.0], strategy, start=3) == [None, None]
    assert trigger.stopped == "growth: max_width=2 reached"


def test_plateau_names_a_metric_that_was_never_logged_at_the_first_check():
    trigger = Plateau(monitor="val/los")
    trainer = SimpleNamespace(callback_metrics={"val/loss": torch.tensor(1.0), "val/acc": torch.tensor(0.5)})
    with pytest.raises(ConfigurationError, match=r"monitors 'val/los', which was never logged; logged metrics: "
                                                 r"val/acc, val/loss") as caught:
        trigger.poll(1, trainer, None, SimpleNamespace(name="x", exhausted=None))
    assert "\n" not in str(caught.value)


def test_signal_trigger_acts_above_its_threshold_and_refuses_a_strategy_without_a_signal():
    values = iter([0.1, 0.5, 0.05, 0.9])
    strategy = SimpleNamespace(name="s", exhausted=None, signal=lambda trainer, module: next(values))
    trigger = Signal(threshold=0.2, step=0.5, amount=2.0)
    assert [trigger.poll(t, None, None, strategy) for t in (1, 2, 3, 4)] == [None, 0.5, None, 1.0]
    assert trigger.record()["signal"] == 0.9
    with pytest.raises(ConfigurationError, match="has no signal"):
        trigger.check_strategy(SimpleNamespace(name="p"))


def test_trigger_checks_every_and_from_start_once_per_time():
    trigger = Plateau(patience=1, min_delta=100.0, step=0.1, amount=1.0, start=2, every=2)
    strategy = SimpleNamespace(name="fake", exhausted=None)
    trainer = SimpleNamespace(callback_metrics={"val/loss": torch.tensor(1.0)})
    targets = [trigger.poll(t, trainer, None, strategy) for t in (0, 1, 2, 3, 4, 4, 5, 6)]
    assert targets == [None, None, None, None, 0.1, None, None, 0.2]  # checks at 2, 4, 6; 4 twice counts once
    assert trigger.checks == 3


def test_bad_trigger_arguments_are_refused():
    for kwargs, match in [({"mode": "up"}, "mode must be one of"), ({"patience": 0}, "patience must be an integer >= 1"),
                          ({"step": 0}, "step must be"), ({"max_actions": 0}, "max_actions must be an integer >= 1"),
                          ({"amount": -1}, "amount must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=match):
            Plateau(**kwargs)


def mlp_module():
    return GrowPruneModule("lenet_300_100", num_classes=4, input_shape=(1, 8, 8),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def plateau_pruning():
    # min_delta 100: no loss ever improves that much, so the trigger acts at every check after the first
    return StructuredPruning(Plateau(monitor="val/loss", patience=1, min_delta=100.0, step=0.2, amount=0.6), name="prune",
                             scope="layer", verbose=False)


def test_real_trainer_run_acts_on_plateau_and_a_resumed_run_continues_the_trigger(tmp_path):
    data = functools.partial(tiny_data, num_samples=64, batch_size=16)
    options = {"max_epochs": 6, "limit_train_batches": 2, "limit_val_batches": 1}
    whole = plateau_pruning()
    tiny_trainer(tmp_path / "whole", callbacks=[whole], **options).fit(mlp_module(), data())
    # epoch 1 sets the best; every later check stalls; 0.6 reached at epoch 4, then the trigger stops
    assert [(r["time"], r["target"]) for r in whole.history] == [(2, 0.2), (3, 0.4), (4, 0.6)]
    assert whole.schedule.actions == 0 and whole.schedule.best is None  # the configured trigger is never changed
    assert whole.active_schedule.stopped == "amount=0.6 reached"
    assert whole.history[0]["trigger"] == "Plateau" and whole.history[-1]["trigger_actions"] == 3

    first = plateau_pruning()
    trainer = tiny_trainer(tmp_path / "a", callbacks=[first, StopAfter(3)], enable_checkpointing=True, **options)
    trainer.fit(mlp_module(), data())
    assert [r["time"] for r in first.history] == [2]
    checkpoint = trainer.checkpoint_callback.best_model_path
    stored = torch.load(checkpoint, weights_only=True)["callbacks"]["StructuredPruning[prune]"]["trigger"]
    assert stored["actions"] == 1 and stored["last_checked"] == 2
    resumed = plateau_pruning()
    tiny_trainer(tmp_path / "b", callbacks=[resumed], **options).fit(mlp_module(), data(), ckpt_path=checkpoint)
    # without the stored state a fresh trigger would set its best at epoch 3 and act at 4 with 0.2
    assert [(r["time"], r["target"]) for r in resumed.history] == [(2, 0.2), (3, 0.4), (4, 0.6)]


def test_real_trainer_run_with_an_unlogged_metric_fails_at_the_first_check(tmp_path):
    strategy = StructuredPruning(Plateau(monitor="val/accuracy", step=0.2, amount=0.4), verbose=False)
    module = mlp_module()
    with pytest.raises(ConfigurationError, match=r"'val/accuracy', which was never logged; logged metrics: .*val/acc"):
        tiny_trainer(tmp_path, callbacks=[strategy], max_epochs=3, limit_train_batches=1, limit_val_batches=1).fit(
            module, tiny_data(num_samples=32, batch_size=16))
    assert module.edit_log == []
