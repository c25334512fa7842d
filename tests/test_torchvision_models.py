"""Every torchvision classifier builds through GrowPruneModule, trains on plain logits and has its FLOPs counted.

Sizes: each model runs at the smallest square input it takes, but not below 32x32 (CIFAR size; the
models in ``MIN_SIZE`` need more). Time: building, checking and counting one model costs 0.1-2 s of
CPU (about 170 s for all 80), so the default suite builds the models up to ``FAST_PARAMS``
parameters and skips the larger ones by size, saying so; ``test_large_model`` (marked slow, run by
``make test-slow`` and by ``make test-torchvision``, which CI runs) builds those. Every family still
builds in the default suite through ``test_one_input_channel`` (the large ones on the meta device).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torchvision

from growprune.metrics import dense_flops
from growprune.models import create_model
from growprune.module import GrowPruneModule

NAMES = torchvision.models.list_models(module=torchvision.models)
NUM_CLASSES = 10
# Smallest square side each model takes where that is more than 32 (one pixel less fails, see
# test_one_pixel_below_the_minimum_size_fails_with_one_line): AlexNet's and Inception-v3's pooling
# stacks, MaxViT's 7x7 partitions at every stage, ViT-H/14's patches.
MIN_SIZE = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 221, "vit_h_14": 28}
FAST_PARAMS = 12_000_000


def side(name: str) -> int:
    return MIN_SIZE.get(name, 32)


def published_parameters(name: str) -> int:
    """torchvision's published parameter count (1000 classes): deciding a skip by it builds nothing.
    (A meta-device build costs 0.1-1 s per model here, and RegNet's builder cannot run on meta.)"""
    return next(iter(torchvision.models.get_model_weights(name))).meta["num_params"]


LARGE = [name for name in NAMES if published_parameters(name) > FAST_PARAMS]


def check_model(name: str) -> None:
    shape = (3, side(name), side(name))
    torch.manual_seed(0)
    module = GrowPruneModule(arch=f"torchvision.{name}", num_classes=NUM_CLASSES, input_shape=shape)
    module.train()
    logits = module(torch.randn(2, *shape))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, NUM_CLASSES)  # no aux-logit tuples
    assert dense_flops(module.model, shape) > 0


@pytest.mark.parametrize("name", NAMES)
def test_model(name):
    if name in LARGE:
        pytest.skip(f"{name}: {published_parameters(name) / 1e6:.1f}M parameters > {FAST_PARAMS / 1e6:.0f}M: over "
                    "the default suite's time budget; test_large_model builds it (make test-torchvision, run in CI)")
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_model(name):
    """All fit the CI machine's 24 GB (the largest, regnet_y_128gf, holds 2.6 GB of weights)."""
    check_model(name)


# One model per family, including the stems that are not a bare nn.Conv2d child of the root
# (Conv2dNormActivation, BasicConv2d, ViT's conv_proj, Swin's patch embedding, RegNet without meta).
IN_CHANNELS_SAMPLE = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
                      "maxvit_t", "mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "resnet18",
                      "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "vgg11", "vit_b_32"]


@pytest.mark.parametrize("name", IN_CHANNELS_SAMPLE)
def test_one_input_channel(name):
    """The large ones build and run on the meta device: same code path, no weights."""
    shape = (1, side(name), side(name))
    torch.manual_seed(0)
    with torch.device("meta" if name in LARGE else "cpu"):
        model = GrowPruneModule._build_model(f"torchvision.{name}", {}, NUM_CLASSES, shape)
        stems = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 1]
        assert len(stems) == 1
        assert model.eval()(torch.zeros(2, *shape)).shape == (2, NUM_CLASSES)


def test_new_stem_keeps_the_family_initialisation():
    """The replaced stem's weights come from the original stem's values (ResNet: kaiming normal,
    fan-out, std 0.025), not from nn.Conv2d's default (std 0.082 for a 7x7 one-channel kernel)."""
    torch.manual_seed(0)
    rgb = create_model("torchvision.resnet18", num_classes=NUM_CLASSES).conv1.weight
    torch.manual_seed(0)
    gray = create_model("torchvision.resnet18", num_classes=NUM_CLASSES, in_channels=1).conv1.weight
    assert gray.shape == (64, 1, 7, 7)
    assert set(gray.flatten().tolist()) <= set(rgb.flatten().tolist())
    assert gray.std().item() == pytest.approx(rgb.std().item(), rel=0.1)


# (model, side): one pixel less than its minimum, and for ViT a side its patch does not divide.
TOO_SMALL = [("alexnet", 62), ("inception_v3", 74), ("maxvit_t", 220), ("vit_b_16", 40)]


@pytest.mark.parametrize("name, size", TOO_SMALL)
def test_one_pixel_below_the_minimum_size_fails_with_one_line(name, size):
    with pytest.raises(ValueError, match=rf"^model 'torchvision.{name}' cannot take {size}x{size} inputs: \S") as error:
        create_model(f"torchvision.{name}", num_classes=NUM_CLASSES, image_size=size)
    assert "\n" not in str(error.value)


def test_vit_needs_square_images():
    with pytest.raises(ValueError, match="'torchvision.vit_b_16' cannot take 32x64 inputs: it takes square images"):
        GrowPruneModule(arch="torchvision.vit_b_16", num_classes=NUM_CLASSES, input_shape=(3, 32, 64))


def test_aux_logits_are_refused_and_off_by_default():
    with pytest.raises(ValueError, match="aux_logits=True returns a tuple"):
        create_model("torchvision.googlenet", aux_logits=True)
    with torch.device("meta"):
        assert create_model("torchvision.googlenet").aux_logits is False
        assert create_model("torchvision.inception_v3").aux_logits is False


def test_unknown_argument_names_the_model():
    with pytest.raises(TypeError, match="^model 'torchvision.resnet18': .*unexpected keyword argument 'depth'"):
        create_model("torchvision.resnet18", depth=3)


def test_transform_input_cannot_take_one_channel():
    with pytest.raises(ValueError, match="transform_input=True .* in_channels=1"):
        create_model("torchvision.inception_v3", transform_input=True, in_channels=1)


# torchvision publishes each model's GMACs at its evaluation resolution (weights meta "_ops", rounded to
# 3 decimals; no download: the meta ships in the enum). We count 2 FLOPs per MAC at 1000 classes. The
# default suite checks a few (ViT-B/16: attention through nn.MultiheadAttention); the slow one all 80.
PUBLISHED = ["resnet18", "mobilenet_v2", "googlenet", "inception_v3", "vit_b_16", "regnet_x_400mf"]


@pytest.mark.parametrize("name", [name if name in PUBLISHED else pytest.param(name, marks=pytest.mark.slow)
                                  for name in NAMES])
def test_flops_match_torchvision_published_ops(name):
    weights = next(iter(torchvision.models.get_model_weights(name)))
    crop = weights.transforms.keywords["crop_size"]
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    shape = (3, crop, crop)
    device = "cpu" if name.startswith("regnet") else "meta"  # RegNet's builder cannot run on meta
    with torch.device(device):
        model = GrowPruneModule._build_model(f"torchvision.{name}", {}, 1000, shape)
    aux = 0
    if name == "inception_v3":  # its published count includes the auxiliary head growprune leaves out
        with torch.device("meta"):
            aux = sum(p.numel() for p in torchvision.models.inception_v3(aux_logits=True, init_weights=False)
                      .AuxLogits.parameters())
    assert sum(p.numel() for p in model.parameters()) + aux == weights.meta["num_params"]
    assert dense_flops(model, shape) / 2e9 == pytest.approx(weights.meta["_ops"], abs=5e-4)


def test_cli_fits_a_torchvision_model(capsys):
    """`growprune fit --model.arch torchvision.resnet18` on tiny synthetic images (failed before with
    "unexpected keyword argument 'image_size'")."""
    from growprune.cli import main

    main(["fit", "--model.arch", "torchvision.resnet18", "--data", "synthetic", "--data.num_samples", "32",
          "--data.input_shape", "[1, 16, 16]", "--data.batch_size", "16", "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "runs"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(open(last_line.removeprefix("summary: ")).read())
    assert summary["params/total"] == sum(p.numel() for p in create_model(
        "torchvision.resnet18", num_classes=10, in_channels=1, image_size=16).parameters())
    assert summary["flops/dense"] > 0
