import pytest
import torch
import torch.nn as nn

from growprune.models import create_model, get_model_builder, list_models, register_model, unregister_model

# Published sizes for 10 classes (LeNet: Han et al. 2015; CIFAR ResNets: He et al. 2016 option A).
PUBLISHED = {
    "lenet_300_100": (266_610, (1, 28, 28)),
    "lenet5": (431_080, (1, 28, 28)),
    "resnet20": (269_722, (3, 32, 32)),
    "resnet32": (464_154, (3, 32, 32)),
    "resnet44": (658_586, (3, 32, 32)),
    "resnet56": (853_018, (3, 32, 32)),
    "resnet110": (1_727_962, (3, 32, 32)),
    "resnet18": (11_173_962, (3, 32, 32)),
    "resnet34": (21_282_122, (3, 32, 32)),
    "vgg11_bn": (9_231_114, (3, 32, 32)),
    "vgg13_bn": (9_416_010, (3, 32, 32)),
    "vgg16_bn": (14_728_266, (3, 32, 32)),
    "vgg19_bn": (20_040_522, (3, 32, 32)),
    "vgg16": (14_719_818, (3, 32, 32)),
}


def check_registry_unchanged():
    """Generator: snapshot the registry, yield, then fail if a builder was added, removed or replaced."""
    before = {name: get_model_builder(name) for name in list_models()}
    yield
    after = {name: get_model_builder(name) for name in list_models()}
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    replaced = sorted(name for name in set(after) & set(before) if after[name] is not before[name])
    assert not (added or removed or replaced), f"registry changed: added {added}, removed {removed}, replaced {replaced}"


@pytest.fixture(autouse=True)
def registry_unchanged():
    """No test of this module may leave a model registered (or unregistered) behind."""
    yield from check_registry_unchanged()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_and_output_shape(name):
    expected, shape = PUBLISHED[name]
    model = create_model(name, num_classes=10, in_channels=shape[0], image_size=shape[1:])
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5", "vgg11", "resnet20", "resnet18"])
def test_num_classes_and_in_channels_are_arguments(name):
    model = create_model(name, num_classes=7, in_channels=2, image_size=(16, 16))
    assert model(torch.zeros(3, 2, 16, 16)).shape == (3, 7)


def test_lenet_300_100_on_digits_size_inputs():
    model = create_model("lenet_300_100", num_classes=10, in_channels=1, image_size=8)
    assert model[1].in_features == 64


@pytest.mark.parametrize("size", [8, 12, 15])
def test_lenet5_rejects_too_small_images(size):
    with pytest.raises(ValueError, match="at least 16x16"):
        create_model("lenet5", image_size=size)


def test_lenet5_smallest_accepted_image_runs():
    model = create_model("lenet5", image_size=16)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_resnet_option_b_shortcut_has_projection_parameters():
    a = create_model("resnet20", shortcut="A")
    b = create_model("resnet20", shortcut="B")
    assert sum(p.numel() for p in b.parameters()) > sum(p.numel() for p in a.parameters())
    assert b(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_models_by_name_with_in_channels():
    model = create_model("torchvision.resnet18", num_classes=5, in_channels=1)
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 5)
    assert "torchvision.mobilenet_v2" in list_models("torchvision.*")


def test_torchvision_weights_are_refused():
    with pytest.raises(ValueError, match="never downloads"):
        create_model("torchvision.resnet18", weights="IMAGENET1K_V1")


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'lenet_301'.*lenet_300_100"):
        create_model("lenet_301")


def test_unknown_builder_argument_names_accepted_ones():
    with pytest.raises(TypeError, match="depth.*accepts"):
        create_model("resnet20", depth=3)


def test_register_custom_builder_and_reject_duplicate():
    @register_model("test_tiny_mlp")
    def tiny(num_classes: int = 10, in_channels: int = 1, image_size=(8, 8)) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], num_classes))

    try:
        assert "test_tiny_mlp" in list_models()
        assert get_model_builder("test_tiny_mlp") is tiny
        assert create_model("test_tiny_mlp", num_classes=3, image_size=(8, 8))(torch.zeros(1, 1, 8, 8)).shape == (1, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model("test_tiny_mlp")(lambda: nn.Identity())
    finally:
        assert unregister_model("test_tiny_mlp") is tiny
    assert "test_tiny_mlp" not in list_models()


def test_unregister_model_removes_only_that_name_and_allows_registering_again():
    before = list_models()

    @register_model("test_unregister_me")
    def first(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert unregister_model("test_unregister_me") is first
    assert list_models() == before
    with pytest.raises(ValueError, match="unknown model 'test_unregister_me'"):
        create_model("test_unregister_me")
    with pytest.raises(ValueError, match="unknown model 'test_unregister_me'; valid names: .*lenet5"):
        unregister_model("test_unregister_me")

    @register_model("test_unregister_me")  # the name is free again: no "already registered"
    def second(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    try:
        assert create_model("test_unregister_me", num_classes=2)(torch.zeros(1, 4)).shape == (1, 2)
    finally:
        unregister_model("test_unregister_me")


def test_registry_check_catches_a_leaked_registration():
    """The check the autouse ``registry_unchanged`` fixture runs fails a test that leaves a model registered."""
    checker = check_registry_unchanged()
    next(checker)
    register_model("test_leaked")(lambda num_classes=10: nn.Identity())
    try:
        with pytest.raises(AssertionError, match=r"added \['test_leaked'\]"):
            next(checker)
    finally:
        unregister_model("test_leaked")
