"""ChannelGrowth: widening channel groups on a schedule or a trigger, measured, bounded and composable."""

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch

from growprune import GrowPruneModule
from growprune.errors import ConfigurationError
from growprune.growth.initializers import RandomInit
from growprune.metrics import count_parameters, dense_flops
from growprune.models import create_model
from growprune.schedules import Linear, OneShot
from growprune.strategies import ChannelGrowth, StructuredPruning
from growprune.triggers import Plateau, Signal
from tests.helpers import tiny_data, tiny_trainer

QUARTER = [16, 32, 64, 64, 128, 128, 128, 128]  # VGG-11 conv widths at width 0.25
FULL = [64, 128, 256, 256, 512, 512, 512, 512]


def vgg_module(width=0.25):
    return GrowPruneModule("vgg11_bn", arch_kwargs={"width": width}, num_classes=4, input_shape=(1, 8, 8),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9))


def conv_widths(model):
    return [layer.out_channels for layer in model.features if isinstance(layer, torch.nn.Conv2d)]


def fit(module, callbacks, tmp_path, **kwargs):
    options = {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1, **kwargs}
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, **options)
    trainer.fit(module, tiny_data(num_samples=64, batch_size=16))
    return trainer


def test_vgg_width_scales_every_convolution_and_reaches_the_registry():
    assert conv_widths(create_model("vgg11_bn", width=0.25)) == QUARTER
    assert conv_widths(create_model("vgg11", width=1.0)) == FULL
    assert conv_widths(create_model("vgg11_bn", width=0.001)) == [1] * 8  # never below one channel
    assert conv_widths(vgg_module().model) == QUARTER  # arch_kwargs: {width: 0.25}
    with pytest.raises(ValueError, match="VGG width must be a finite number > 0, got 0"):
        create_model("vgg11_bn", width=0)


def test_layer_scope_grows_quarter_width_vgg_to_full_width_function_preserving(tmp_path):
    module = vgg_module()
    growth = ChannelGrowth(OneShot(amount=3.0, at=1), name="grow", verbose=False)
    fit(module, [growth], tmp_path)
    assert conv_widths(module.model) == FULL
    assert module.model.classifier.in_features == 512
    record = growth.history[0]
    assert record["action"] == "grow_channels" and record["target"] == 3.0
    assert record["achieved"] == pytest.approx(3.0) and record["added"] == 3 * sum(QUARTER)
    assert record["max_output_change"] < 1e-5 and record["preserved"]  # measured on the probe batch
    assert record["function_preserving_init"] and "RandomInit" in record["initializer"]
    assert record["gradient_norm"] > 0  # the safe form still lets the new channels learn
    assert record["params"] == count_parameters(module.model)
    assert record["flops"] == dense_flops(module.model, (1, 8, 8))
    assert record["per_layer"]["features.0"] == 64
    assert [op["op"] for op in record["ops"]] == ["add_channels"]
    assert module.edit_log[-1] is record  # replayed on reload


def test_growth_metrics_reach_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = vgg_module()
    logger = CSVLogger(tmp_path, name="log")
    fit(module, [ChannelGrowth(OneShot(amount=1.0, at=1), name="grow", verbose=False)], tmp_path, logger=logger)
    header = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("grow/max_output_change", "grow/gradient_norm", "grow/channels", "grow/params", "grow/flops",
                "grow/added", "grow/per_layer/features.0"):
        assert key in header, key


def test_estimated_size_of_a_plan_matches_the_grown_network():
    module = vgg_module()
    growth = ChannelGrowth(OneShot(amount=1.5, at=0))
    growth.check(None, module)
    groups = growth.groups(module)
    plan = growth.plan(module, groups, 1.5)
    params, flops = growth.estimate(module, groups, plan)
    from growprune.surgery.edits import AddChannels

    module.apply_edit(AddChannels(plan))
    assert params == count_parameters(module.model)
    assert flops == pytest.approx(dense_flops(module.model, (1, 8, 8)))


def test_global_scope_adds_the_network_total_shared_by_score(tmp_path):
    module = vgg_module()
    growth = ChannelGrowth(OneShot(amount=1.0, at=1), scope="global", round_to=4, name="grow", verbose=False)
    fit(module, [growth], tmp_path)
    record = growth.history[0]
    widths = conv_widths(module.model)
    assert sum(widths) == 2 * sum(QUARTER)  # the total doubles
    assert all(width % 4 == 0 and width >= quarter for width, quarter in zip(widths, QUARTER))
    assert set(record["scores"]) == set(record["per_layer"]) and all(s >= 0 for s in record["scores"].values())
    assert widths != [2 * q for q in QUARTER] or len(set(record["scores"].values())) == 1  # shared by score
    assert record["max_output_change"] < 1e-5


def test_a_schedule_over_a_ceiling_is_refused_before_anything_changes(tmp_path):
    quarter_params = count_parameters(vgg_module().model)
    full_params = count_parameters(vgg_module(1.0).model)
    cases = [
        ({"max_params": full_params - 1}, rf"grows the network to {full_params:,} params \(final target 3\) but "
                                          rf"max_params={full_params - 1:,}"),
        ({"max_width": 2.0}, r"grows 'features.0' to 64 channels \(final target 3\) but max_width=2 allows 32"),
        ({"max_flops": 1000.0}, r"flops \(final target 3\) but max_flops=1,000"),
    ]
    for number, (kwargs, match) in enumerate(cases):
        module = vgg_module()
        before = copy.deepcopy(module.model.state_dict())
        growth = ChannelGrowth(Linear(amount=3.0, start=0, end=1), **kwargs)
        with pytest.raises(ConfigurationError, match=match) as caught:
            if number == 0:
                fit(module, [growth], tmp_path)  # through a real fit: refused in setup
            else:
                growth.check(None, module)
        assert "\n" not in str(caught.value)
        assert count_parameters(module.model) == quarter_params and module.edit_log == []
        assert all(torch.equal(before[key], value) for key, value in module.model.state_dict().items())
    # at the ceiling exactly: accepted
    ChannelGrowth(OneShot(amount=3.0, at=0), max_params=full_params, max_width=4.0).check(None, vgg_module())


def test_a_trigger_grows_up_to_the_ceiling_and_stops(tmp_path):
    module = vgg_module()
    # min_delta 100: every check after the first is a plateau; steps of 0.5 up to 3.0, but max_width 2
    growth = ChannelGrowth(Plateau(patience=1, min_delta=100.0, step=0.5, amount=3.0), max_width=2.0, name="grow",
                           verbose=False)
    fit(module, [growth], tmp_path, max_epochs=6)
    assert [(r["time"], r["target"]) for r in growth.history] == [(2, 0.5), (3, 1.0), (4, 1.5)]
    assert conv_widths(module.model) == [2 * q for q in QUARTER]
    assert growth.history[-1]["stopped"] == "max_width=2 reached" and growth.exhausted
    assert growth.active_schedule.stopped == "grow: max_width=2 reached"
    assert all(r["max_output_change"] < 1e-5 for r in growth.history)

    module = vgg_module()
    budget = count_parameters(vgg_module(0.5).model) + 1000
    growth = ChannelGrowth(Plateau(patience=1, min_delta=100.0, step=1.0, amount=3.0), max_params=budget, verbose=False)
    fit(module, [growth], tmp_path, max_epochs=5)
    assert count_parameters(module.model) <= budget
    assert growth.history[-1]["stopped"] == f"max_params={budget:,} reached"
    assert conv_widths(module.model) == [2 * q for q in QUARTER]  # the largest layer-scope step that fits


def test_signal_trigger_grows_when_the_gradient_of_candidate_channels_is_large(tmp_path):
    module = vgg_module()
    growth = ChannelGrowth(Signal(threshold=0.0, step=1.0, amount=1.0), name="grow", verbose=False)
    fit(module, [growth], tmp_path, max_epochs=3)
    assert [(r["time"], r["target"]) for r in growth.history] == [(1, 1.0)]
    assert growth.history[0]["signal"] > 0
    never = ChannelGrowth(Signal(threshold=1e9, step=1.0, amount=1.0), verbose=False)
    fit(vgg_module(), [never], tmp_path, max_epochs=2)
    assert never.history == [] and never.active_schedule.last_signal > 0


def test_bad_layers_are_refused_with_one_line(tmp_path):
    for kwargs, match in [
        ({"layers": ["features.99"]}, r"'features.99' is not the root of a channel group that may grow; roots: "),
        ({"layers": ["features.1"]}, r"'features.1' is not the root .*its channels grow with the group rooted at "
                                     r"'features.0'"),
        ({"layers": ["features.0"], "skip": ["features.0"]}, "is in both layers and skip"),
        ({"skip": ["nope"]}, "no layer named 'nope'"),
    ]:
        module = vgg_module()
        with pytest.raises(ValueError, match=match) as caught:
            fit(module, [ChannelGrowth(OneShot(amount=1.0, at=0), **kwargs)], tmp_path)
        assert "\n" not in str(caught.value) and module.edit_log == []
    module = vgg_module()
    fit(module, [ChannelGrowth(OneShot(amount=1.0, at=0), layers=["features.0", "features.4"], verbose=False)], tmp_path)
    assert conv_widths(module.model) == [32, 64] + QUARTER[2:]
    with pytest.raises(ValueError, match="scope must be one of"):
        ChannelGrowth(OneShot(amount=1.0), scope="net")
    with pytest.raises(ValueError, match="scope='global' scores groups on data: set scoring_batches >= 1"):
        ChannelGrowth(OneShot(amount=1.0), scope="global", scoring_batches=0)


def test_growth_then_pruning_targets_are_fractions_of_the_original_and_the_checkpoint_reloads(tmp_path):
    module = vgg_module()
    growth = ChannelGrowth(OneShot(amount=1.0, at=1), name="grow", verbose=False)
    pruning = StructuredPruning(OneShot(amount=0.5, at=2), scope="layer", name="prune", verbose=False)
    trainer = fit(module, [growth, pruning], tmp_path, max_epochs=3, enable_checkpointing=True)
    # grown to 2x, then pruned to HALF THE ORIGINAL (not half of the grown network)
    assert conv_widths(module.model) == [q // 2 for q in QUARTER]
    assert pruning.history[0]["achieved"] == pytest.approx(0.5)
    # and the constant-size scenario: grow back to the original after pruning
    checkpoint = trainer.checkpoint_callback.best_model_path
    loaded = GrowPruneModule.load_from_checkpoint(checkpoint, weights_only=True)
    probe = torch.randn(4, 1, 8, 8)
    module.eval(), loaded.eval()
    assert conv_widths(loaded.model) == conv_widths(module.model)
    assert torch.allclose(loaded(probe), module(probe), atol=1e-6)


def test_grow_and_prune_in_turns_keeps_the_size(tmp_path):
    module = vgg_module()
    growth = ChannelGrowth(Linear(amount=0.5, initial=0.5, start=1, end=3, every=2), name="grow", verbose=False)
    pruning = StructuredPruning(Linear(amount=0.0, start=2, end=4, every=2), scope="layer", name="prune", verbose=False)
    fit(module, [growth, pruning], tmp_path, max_epochs=5)
    assert [r["time"] for r in growth.history] == [1, 3] and [r["time"] for r in pruning.history] == [2, 4]
    assert all(r["added"] == sum(QUARTER) // 2 for r in growth.history)  # every growth step adds the same
    assert conv_widths(module.model) == QUARTER  # back to the original size after each pruning step


def test_done_when_run_grows_quarter_vgg_to_full_with_gradmax_on_plateau_while_polarizing_and_reloads(tmp_path, capsys,
                                                                                                       monkeypatch):
    """The digits twin of issue 9's "done when" config, through the command line, shortened."""
    from tests.test_config_runs import fit_then_validate, vgg11_bn_of_shapes

    monkeypatch.chdir(tmp_path)
    fitted, validated, checkpoint = fit_then_validate(
        "grow_polarization_vgg11_digits.yaml",
        """
        trainer:
          max_epochs: 4
          limit_train_batches: 3
          limit_val_batches: 2
          callbacks:
            - class_path: growprune.strategies.ChannelGrowth
              init_args:
                name: grow
                scoring_batches: 1
                initializer: {class_path: growprune.growth.initializers.GradMax, init_args: {form: safe, iterations: 2}}
                schedule:
                  class_path: growprune.triggers.Plateau
                  init_args: {monitor: val/loss, patience: 1, min_delta: 100.0, step: 1.5, amount: 3.0}
            - class_path: growprune.strategies.PolarizationPruning
              init_args:
                name: polarization
                lambda_: 0.05
                schedule: {class_path: growprune.schedules.OneShot, init_args: {amount: 0.0, at: 3}}
        data:
          class_path: growprune.data.DigitsDataModule
          init_args: {batch_size: 32, seed: 0, image_size: 8}
        """,
        tmp_path,
        capsys,
    )
    log = checkpoint["growprune"]["edit_log"]
    growth = [record for record in log if record["strategy"] == "grow"]
    # min_delta 100: epoch 1 sets the best, epochs 2 and 3 stall -> +150 % twice = full width
    assert [(r["time"], r["target"]) for r in growth] == [(2, 1.5), (3, 3.0)]
    assert all(r["preserved"] and r["max_output_change"] < 1e-5 for r in growth)  # exactly function-preserving
    assert all(r["initializer"] == "GradMax(form='safe')" and r["gradient_norm"] > 0 for r in growth)
    assert growth[-1]["per_layer"]["features.0"] == 64 and growth[-1]["per_layer"]["features.25"] == 512
    pruned = [record for record in log if record["strategy"] == "polarization"]
    assert [r["time"] for r in pruned] == [3]
    # reload: the checkpoint loads with weights_only=True, the edit log rebuilds the architecture, and the
    # reloaded module computes what a VGG-11-BN built by hand with the checkpoint's widths computes
    state = checkpoint["state_dict"]
    loaded = GrowPruneModule.load_from_checkpoint(fitted["checkpoint"], weights_only=True).eval()
    by_hand = vgg11_bn_of_shapes(state).eval()
    by_hand.load_state_dict({key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")})
    probe = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(probe), by_hand(probe), atol=1e-6)
    assert conv_widths(loaded.model) == conv_widths(by_hand)
    assert validated["val/acc"] == pytest.approx(fitted["val/acc"])
    assert fitted["params/total"] == count_parameters(by_hand)


class DesyncRandomState(pl.Callback):
    """Rank 1 draws random numbers rank 0 does not: the ranks' global random states differ from then on."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            torch.rand(7)


@pytest.mark.slow
def test_ddp_two_processes_grow_the_same_channels_with_the_same_values(tmp_path):
    """Under DDP every rank must add and initialise the same channels (DDP syncs gradients, not weights),
    even when the ranks' global random states differ."""
    from tests.test_repair import RecordRankState

    module = vgg_module(0.125)
    growth = ChannelGrowth(Plateau(patience=1, min_delta=100.0, step=1.0, amount=2.0), initializer=RandomInit(form="full"),
                           name="grow", verbose=False)
    trainer = tiny_trainer(tmp_path, max_epochs=4, limit_val_batches=1, strategy="ddp_spawn", devices=2,
                           callbacks=[growth, DesyncRandomState(), RecordRankState(str(tmp_path))])
    trainer.fit(module, tiny_data())
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    grown = [record for record in rank0["edit_log"] if record["strategy"] == "grow"]
    assert [(r["time"], r["target"]) for r in grown] == [(2, 1.0), (3, 2.0)]
    assert rank0["edit_log"] == rank1["edit_log"]
    assert rank0["weights"]["features.0.weight"].shape[0] == 3 * 8  # 8 channels at width 1/8, grown to 3x
    for name in rank0["weights"]:
        assert torch.allclose(rank0["weights"][name], rank1["weights"][name], atol=1e-6), name
