import functools
import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from growprune import GrowPruneModule
from growprune.cli import main
from growprune.criteria import (
    ActivityCriterion,
    BNScaleCriterion,
    FilterNormCriterion,
    RandomChannelCriterion,
    TaylorCriterion,
)
from growprune.data import SyntheticDataModule
from growprune.metrics import count_parameters, dense_flops
from growprune.models import create_model
from growprune.schedules import Linear, OneShot
from growprune.strategies import StructuredPruning
from growprune.surgery.channels import ChannelGraph
from growprune.surgery.edits import replay_log
from tests.helpers import StopAfter, tiny_trainer

IMAGE = (3, 16, 16)


def image_data(**kwargs):
    options = {"num_samples": 128, "input_shape": IMAGE, "num_classes": 10, "batch_size": 32}
    options.update(kwargs)
    return SyntheticDataModule(**options)


def conv_module(arch="vgg11_bn", optimizer=None, **arch_kwargs):
    optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    return GrowPruneModule(arch, arch_kwargs=arch_kwargs, num_classes=10, input_shape=IMAGE, optimizer=optimizer)


def fit(module, strategy, tmp_path, epochs=2, **trainer_kwargs):
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, callbacks=[strategy], limit_train_batches=2, limit_val_batches=1, **trainer_kwargs)
    trainer.fit(module, image_data())
    return trainer


# --------------------------------------------------------------------------------- discovery
def test_discovery_lists_groups_as_data():
    graph = ChannelGraph(create_model("lenet_300_100"), torch.zeros(1, 1, 28, 28))
    groups = {group.root: group for group in graph.groups()}
    assert groups["1"].channels == 300 and groups["1"].members == [("1", "out"), ("3", "in")]
    assert groups["3"].channels == 100 and groups["3"].members == [("3", "out"), ("5", "in")]
    assert "5" not in groups  # the output layer keeps its classes


def test_discovery_couples_residual_streams_and_batch_norm():
    model = create_model("resnet20", shortcut="B")
    groups = {group.root: group for group in ChannelGraph(model, torch.zeros(1, *IMAGE)).groups()}
    # every block's first conv is its own group: conv1 -> bn1 -> conv2 (input)
    block = groups["layers.0.0.conv1"]
    assert set(block.members) == {("layers.0.0.conv1", "out"), ("layers.0.0.bn1", "out"), ("layers.0.0.conv2", "in")}
    # the first stage's residual stream: stem and every block's second conv change together
    stream = next(group for group in groups.values() if ("layers.0.2.conv2", "out") in group.members)
    assert {("conv1", "out"), ("layers.0.0.conv2", "out"), ("layers.0.1.conv2", "out")} <= set(stream.members)
    assert len(groups) == 9 + 3  # 9 blocks + 3 residual streams


def test_vgg_groups_include_every_conv():
    model = create_model("vgg11_bn")
    roots = {group.root for group in ChannelGraph(model, torch.zeros(1, *IMAGE)).groups()}
    convs = {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    assert roots == convs


def test_untraceable_custom_layer_is_named_before_anything_changes():
    model = create_model("resnet20", shortcut="A")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.0.shortcut"):
        ChannelGraph(model, torch.zeros(1, *IMAGE))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ surgery
def test_remove_shrinks_model_and_maps_kept_indices_exactly():
    model = create_model("vgg11_bn")
    model.train()
    graph = ChannelGraph(model, torch.zeros(1, *IMAGE))
    groups = graph.groups()
    before = {name: tensor.shape for name, tensor in model.state_dict().items()}
    changes = graph.remove({group.root: list(range(0, group.channels, 2)) for group in groups})
    assert model.training  # DepGraph leaves eval mode on; we restore it
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    # every tensor whose shape changed (parameters AND batch-norm statistics) has its change
    assert set(changes) == {name for name in tensors if tensors[name].shape != before[name]}
    for name, change in changes.items():
        value = change.old.detach()
        for dim, kept in enumerate(change.index):
            if kept is not None:
                value = value.index_select(dim, kept)
        assert torch.equal(value, tensors[name].detach()), name
    assert model(torch.zeros(2, *IMAGE)).shape == (2, 10)
    assert count_parameters(model) < 0.3 * 9_231_114


def test_frozen_parameters_stay_frozen():
    model = create_model("lenet_300_100")
    model[1].weight.requires_grad_(False)
    graph = ChannelGraph(model, torch.zeros(1, 1, 28, 28))
    graph.remove({"1": [0, 1, 2]})
    assert not model[1].weight.requires_grad and model[3].weight.requires_grad


def test_remove_refuses_whole_layer_and_unknown_roots():
    graph = ChannelGraph(create_model("lenet_300_100"), torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="whole layer"):
        graph.remove({"3": list(range(100))})
    with pytest.raises(ValueError, match="not the root"):
        graph.remove({"5": [0]})


@pytest.mark.parametrize(
    ("arch", "shape"),
    [("torchvision.resnet18", (3, 32, 32)), ("torchvision.mobilenet_v2", (3, 32, 32)), ("torchvision.densenet121", (3, 32, 32))],
)
def test_torchvision_models_prune_and_run(arch, shape):
    model = create_model(arch, num_classes=10)
    before = count_parameters(model)
    graph = ChannelGraph(model, torch.zeros(1, *shape))
    groups = graph.groups()
    graph.remove({g.root: list(range(0, g.channels, 4)) for g in groups if g.channels >= 4})
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    assert count_parameters(model) < 0.85 * before


# ------------------------------------------------------------------------------------ targets
def test_channel_target_is_fraction_of_original_channels(tmp_path):
    module = conv_module()
    strategy = StructuredPruning(Linear(amount=0.5, start=0, end=1), target="channels")
    fit(module, strategy, tmp_path)
    original = sum(strategy.original["channels"].values())
    now = sum(module.edit_log[-1]["channels"].values())
    assert now == original - round(0.5 * original)
    assert [round(r["achieved"], 3) for r in module.edit_log] == [0.0, 0.5]


@pytest.mark.parametrize("target", ["flops", "params"])
def test_flops_and_params_targets_are_met_within_3_percent(tmp_path, target):
    module = conv_module()
    dense = {"flops": dense_flops(module.model, IMAGE), "params": count_parameters(module.model)}
    fit(module, StructuredPruning(OneShot(amount=0.5, at=1), target=target), tmp_path)
    now = {"flops": dense_flops(module.model, IMAGE), "params": count_parameters(module.model)}
    assert now[target] / dense[target] == pytest.approx(0.5, abs=0.015)
    assert module.edit_log[-1]["achieved"] == pytest.approx(0.5, abs=0.015)


def test_resnet_flops_target_with_global_ranking(tmp_path):
    module = conv_module("resnet20", shortcut="B")
    dense = dense_flops(module.model, IMAGE)
    fit(module, StructuredPruning(OneShot(amount=0.5, at=1), target="flops"), tmp_path)
    assert dense_flops(module.model, IMAGE) / dense == pytest.approx(0.5, abs=0.015)


def test_round_to_keeps_multiples_and_min_channels_and_skip(tmp_path):
    module = conv_module()
    strategy = StructuredPruning(OneShot(amount=0.6, at=1), target="flops", round_to=8, min_channels=16, skip=["features.0"])
    fit(module, strategy, tmp_path)
    channels = module.edit_log[-1]["channels"]
    assert "features.0" not in channels and module.model.features[0].out_channels == 64
    for root, count in channels.items():
        assert count % 8 == 0 and count >= 16, (root, count)


def test_round_to_does_not_overshoot_flops_target_on_narrow_residual_groups():
    # ResNet stages of 16 channels: a block of 8 is half a group; block-wise ranking must still
    # land near the target instead of jumping far past it
    module = conv_module("resnet20", shortcut="B")
    dense = dense_flops(module.model, IMAGE)
    strategy = StructuredPruning(OneShot(amount=0.5), target="flops", round_to=8)
    strategy.check(None, module)
    groups = strategy.graph.groups()
    scores = {group.root: strategy.criterion.score(strategy.graph, group) for group in groups}
    strategy.graph.remove(strategy.plan(module, groups, scores, 0.5))
    assert dense_flops(module.model, IMAGE) / dense == pytest.approx(0.5, abs=0.015)
    assert all(group.channels % 8 == 0 for group in strategy.graph.groups())


def test_layer_scope_removes_same_fraction_everywhere(tmp_path):
    module = conv_module()
    strategy = StructuredPruning(OneShot(amount=0.25, at=1), target="channels", scope="layer")
    fit(module, strategy, tmp_path)
    for root, count in module.edit_log[-1]["channels"].items():
        assert count == round(0.75 * strategy.original["channels"][root])


def test_unreachable_budget_and_whole_layer_fail_before_training(tmp_path):
    module = conv_module()
    before = count_parameters(module.model)
    convs = [f"features.{i}" for i, layer in enumerate(module.model.features) if isinstance(layer, nn.Conv2d)]
    with pytest.raises(ValueError, match="not reachable"):
        # only the last conv may shrink: halving the FLOPs is out of reach
        fit(module, StructuredPruning(OneShot(amount=0.5, at=1), target="flops", skip=convs[:-1]), tmp_path)
    with pytest.raises(ValueError, match="whole layer"):
        fit(module, StructuredPruning(OneShot(amount=0.995, at=1), target="channels", scope="layer"), tmp_path)
    assert count_parameters(module.model) == before


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StructuredPruning(OneShot(amount=1.0)), r"\[0, 1\)"),
        (lambda: StructuredPruning(OneShot(amount=0.5), target="latency"), "target"),
        (lambda: StructuredPruning(OneShot(amount=0.5), min_channels=0), "min_channels"),
        (lambda: StructuredPruning(OneShot(amount=0.5), round_to=0), "round_to"),
        (lambda: StructuredPruning(OneShot(amount=0.5), criterion=TaylorCriterion(), scoring_batches=0), "needs training data"),
    ],
)
def test_bad_configuration(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_skip_layer_names_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="no layer named 'features.99'"):
        fit(conv_module(), StructuredPruning(OneShot(amount=0.5), skip=["features.99"]), tmp_path)


# ----------------------------------------------------------------------------------- criteria
def test_criteria_scores():
    model = create_model("vgg11_bn")
    graph = ChannelGraph(model, torch.zeros(1, *IMAGE))
    group = next(g for g in graph.groups() if g.root == "features.0")
    with torch.no_grad():
        model.features[1].weight.copy_(torch.linspace(-1, 1, 64))
    bn = BNScaleCriterion().score(graph, group)
    assert torch.allclose(bn, torch.linspace(-1, 1, 64).abs())
    l1 = FilterNormCriterion(p=1, normalize=False).score(graph, group)
    assert l1.shape == (64,) and torch.all(l1 >= 0)
    normalized = FilterNormCriterion(p=1).score(graph, group)
    assert normalized.mean() == pytest.approx(1.0)
    first = RandomChannelCriterion(seed=1).score(graph, group)
    assert torch.equal(first, RandomChannelCriterion(seed=1).score(graph, group))


def test_activity_criterion_scores_dead_and_disconnected_units_zero():
    model = create_model("lenet_300_100", image_size=8)
    with torch.no_grad():
        model[1].bias[0] = -1e6  # unit 0 never fires
        model[3].weight[:, 1] = 0  # unit 1 has no outgoing connection
    graph = ChannelGraph(model, torch.zeros(1, 1, 8, 8))
    criterion = ActivityCriterion()
    criterion.prepare(model, [(torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))])
    scores = criterion.score(graph, next(g for g in graph.groups() if g.root == "1"))
    assert scores[0] == 0 and scores[1] == 0 and torch.all(scores[2:] > 0)


def test_taylor_criterion_prunes_with_data_and_optimizer_state_is_sliced(tmp_path):
    from lightning.pytorch.callbacks import Callback

    class AdamState(Callback):
        """Adam's moments of every parameter at the start of epoch 1 (before or after the strategy)."""

        def __init__(self):
            self.state = None

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                optimizer = trainer.optimizers[0]
                self.state = {name: {key: value.clone() for key, value in optimizer.state[p].items()}
                              for name, p in pl_module.model.named_parameters()}

    module = conv_module(optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    strategy = StructuredPruning(OneShot(amount=0.3, at=1), criterion=TaylorCriterion(), target="flops", scoring_batches=2)
    before, after = AdamState(), AdamState()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[before, strategy, after], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, image_data())
    plan = module.edit_log[0]["ops"][0]["plan"]
    # VGG-BN is a chain conv -> BN -> next conv: a conv keeps the rows of its own kept channels and the
    # columns of the previous conv's; its BN the entries of its own. Expected moments, worked out here:
    convs = [i for i, layer in enumerate(module.model.features) if isinstance(layer, nn.Conv2d)]
    previous = None
    for index in convs:
        root = f"features.{index}"
        size = before.state[f"{root}.weight"]["exp_avg"].shape[0]
        rows = [i for i in range(size) if i not in plan.get(root, [])]
        columns = slice(None) if previous is None else previous
        for key in ("exp_avg", "exp_avg_sq"):
            old = before.state[f"{root}.weight"][key]
            assert torch.equal(after.state[f"{root}.weight"][key], old[rows][:, columns]), (root, key)
            for name in (f"{root}.bias", f"features.{index + 1}.weight", f"features.{index + 1}.bias"):
                assert torch.equal(after.state[name][key], before.state[name][key][rows]), (name, key)
        assert after.state[f"{root}.weight"]["step"] == before.state[f"{root}.weight"]["step"]
        previous = rows
    assert all(after.state[name]["exp_avg"].shape == p.shape for name, p in module.model.named_parameters()
               if name in after.state)


# -------------------------------------------------------------------------------- checkpoints
def test_pruned_checkpoint_reloads_with_identical_outputs_and_edit_log_replays(tmp_path):
    module = conv_module("resnet20", shortcut="B")
    trainer = fit(module, StructuredPruning(OneShot(amount=0.4, at=1), target="flops"), tmp_path)
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    inputs = torch.randn(3, *IMAGE)
    module.eval()
    expected = module(inputs)

    restored = GrowPruneModule.load_from_checkpoint(path, weights_only=False)
    restored.eval()
    assert torch.allclose(restored(inputs), expected, atol=1e-6)

    base = create_model("resnet20", shortcut="B")
    replay_log(base, module.edit_log, torch.zeros(1, *IMAGE))
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in module.model.state_dict().items()}
    base.load_state_dict(module.model.state_dict())
    base.eval()
    assert torch.allclose(base(inputs), expected, atol=1e-6)


def test_cli_fit_prunes_and_validate_reloads_with_weights_only(tmp_path, capsys):
    config = tmp_path / "structured.yaml"
    config.write_text(
        textwrap.dedent(
            """
            trainer:
              max_epochs: 2
              enable_progress_bar: false
              logger:
                - class_path: lightning.pytorch.loggers.CSVLogger
                  init_args: {save_dir: runs, name: structured}
              callbacks:
                - class_path: growprune.strategies.StructuredPruning
                  init_args:
                    schedule:
                      class_path: growprune.schedules.OneShot
                      init_args: {amount: 0.5, at: 1}
                    target: flops
                    round_to: 4
            model:
              arch: vgg11_bn
            data:
              class_path: growprune.data.SyntheticDataModule
              init_args: {num_samples: 96, input_shape: [3, 16, 16]}
            """
        )
    )
    main(["fit", "-c", str(config)])
    summary = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    assert summary["flops/dense"] == pytest.approx(0.5 * dense_flops(create_model("vgg11_bn"), IMAGE), rel=0.015)
    torch.load(summary["checkpoint"], weights_only=True)
    main(["validate", "-c", str(config), "--ckpt_path", summary["checkpoint"]])
    validated = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    assert validated["flops/dense"] == summary["flops/dense"]
    assert validated["val/acc"] == pytest.approx(summary["val/acc"])


def test_resume_of_structurally_pruned_run_continues_schedule(tmp_path):
    from growprune.schedules import Steps

    module = conv_module()
    strategy = StructuredPruning(Steps(steps=[1, 3], amounts=[0.3, 0.5]), target="flops")
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[strategy, StopAfter(2)], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, image_data())  # interrupted after 2 of 4 epochs
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    shapes = {k: v.shape for k, v in module.model.state_dict().items()}

    resumed_module = conv_module()
    strategy = StructuredPruning(Steps(steps=[1, 3], amounts=[0.3, 0.5]), target="flops")
    resumed = tiny_trainer(tmp_path, max_epochs=4, callbacks=[strategy], limit_train_batches=2, limit_val_batches=1)
    resumed.fit(resumed_module, image_data(), ckpt_path=path, weights_only=False)
    assert [r["time"] for r in resumed_module.edit_log] == [1, 3]
    assert resumed_module.edit_log[0]["ops"] == module.edit_log[0]["ops"]
    assert dense_flops(resumed_module.model, IMAGE) / dense_flops(create_model("vgg11_bn"), IMAGE) == pytest.approx(0.5, abs=0.015)
    assert all(resumed_module.model.state_dict()[k].shape[0] <= shapes[k][0] for k in shapes if shapes[k])


def test_bn_scale_criterion_leaves_groups_without_batch_norm_whole(tmp_path):
    # LeNet-5 has no batch norm: every group scores inf and nothing may be removed
    module = GrowPruneModule("lenet5", num_classes=10, input_shape=(1, 16, 16))
    graph = ChannelGraph(module.model, torch.zeros(1, 1, 16, 16))
    group = graph.groups()[0]
    assert torch.isinf(BNScaleCriterion().score(graph, group)).all()
    strategy = StructuredPruning(OneShot(amount=0.3), criterion=BNScaleCriterion())
    groups = graph.groups()
    scores = BNScaleCriterion().score_channels(graph, groups)
    assert strategy.plan(module, groups, scores, 0.3) == {}
    # ... so the set-up check refuses the target before training (it used to pass, then prune nothing)
    with pytest.raises(ValueError, match="not reachable.*3 group.*BNScaleCriterion cannot score"):
        strategy.check(None, module)


def test_reachability_check_counts_max_fraction():
    module = conv_module()
    # no group may lose more than 20 % of its channels: 30 % of all channels cannot go
    with pytest.raises(ValueError, match="not reachable.*at most 20% of each group"):
        StructuredPruning(OneShot(amount=0.3), target="channels", max_fraction=0.2).check(None, module)
    StructuredPruning(OneShot(amount=0.19), target="channels", max_fraction=0.2).check(None, module)


def test_latency_cost_ranking_respects_max_fraction_and_meets_flops_target():
    module = conv_module()
    dense = dense_flops(module.model, IMAGE)
    strategy = StructuredPruning(OneShot(amount=0.5), target="flops", cost="latency", max_fraction=0.6)
    strategy.check(None, module)
    groups = strategy.graph.groups()
    scores = {group.root: strategy.criterion.score(strategy.graph, group) for group in groups}
    strategy.graph.remove(strategy.plan(module, groups, scores, 0.5))
    assert dense_flops(module.model, IMAGE) / dense == pytest.approx(0.5, abs=0.015)
    for group in strategy.graph.groups():
        assert group.channels >= 0.4 * strategy.original["channels"][group.root], group.root


def test_cost_ranking_prunes_costly_groups_first():
    module = conv_module()
    strategy = StructuredPruning(OneShot(amount=0.2), target="channels", cost="params")
    strategy.check(None, module)
    groups = strategy.graph.groups()
    equal = {group.root: torch.ones(group.channels) for group in groups}  # equal importance everywhere
    plan = strategy.plan(module, groups, equal, 0.2)
    # with equal scores, the channels with the most parameters each (the 512-wide convs) go first
    assert set(plan) <= {"features.15", "features.18", "features.22", "features.25"}


@pytest.mark.parametrize(("options", "message"), [({"cost": "speed"}, "cost"), ({"max_fraction": 0.0}, "max_fraction")])
def test_bad_cost_options(options, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(OneShot(amount=0.5), **options)
