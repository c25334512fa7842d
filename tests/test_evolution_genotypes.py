"""Genotypes of the evolutionary loop: encoding, variation, decoding through apply_edit, closed-form sizes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from growprune import GrowPruneModule
from growprune.evolution.genotypes import MaskGenotype, RatioGenotype, WidthGenotype
from growprune.metrics import count_nonzero_parameters, effective_flops
from tests.helpers import tiny_trainer

MODELS = {
    "lenet_300_100": ("lenet_300_100", (1, 28, 28), {}),
    "lenet5": ("lenet5", (1, 20, 20), {}),
    "vgg11_bn": ("vgg11_bn", (3, 16, 16), {"width": 0.125}),
    "resnet20": ("resnet20", (3, 16, 16), {"shortcut": "B"}),
}


def make_module(key: str, seed: int = 0) -> GrowPruneModule:
    arch, shape, kwargs = MODELS[key]
    with torch.random.fork_rng():  # the network's initialisation, without touching the global generator
        torch.manual_seed(seed)
        module = GrowPruneModule(arch, arch_kwargs=kwargs, num_classes=10, input_shape=shape)
    with torch.no_grad():  # trained-looking: batch-norm affine parameters away from 1 / 0, a few exact zeros
        generator = torch.Generator().manual_seed(seed)
        for parameter in module.model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            parameter.mul_(torch.rand(parameter.shape, generator=generator) > 0.02)
    return module


@pytest.fixture(scope="module")
def lenet() -> GrowPruneModule:
    return make_module("lenet_300_100")


def bound(genotype, module):
    genotype.bind(module)
    return genotype


# ---------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("kind", ["mask", "ratio", "width"])
def test_size_is_what_growprune_metrics_count_on_the_decoded_network(key, kind):
    module = make_module(key)
    genotype = {"mask": MaskGenotype, "ratio": RatioGenotype, "width": WidthGenotype}[kind]()
    genotype.bind(module)
    assert genotype._fallback is None  # the closed form applies on these models
    rng = np.random.default_rng(1)
    genomes = [genotype.initial(rng, "uniform"), genotype.initial(rng, "magnitude", density=0.3), genotype.magnitude(1.0)]
    for genome in genomes:
        model = genotype.decode(module, genome).model
        assert genotype.size(genome, "params") == count_nonzero_parameters(model)
        assert genotype.size(genome, "macs") == pytest.approx(effective_flops(model, module.input_shape) / 2, rel=1e-9)
    unpruned = module.size_metrics()
    assert genotype.original_size("params") == unpruned["params/total"]
    assert genotype.original_size("macs") == unpruned["flops/dense"] / 2


def test_mask_macs_equal_an_independent_count_of_kept_weights(lenet):
    genotype = bound(MaskGenotype(), lenet)
    genome = genotype.initial(np.random.default_rng(3))
    masks = genotype.masks(genome)
    # LeNet-300-100 at batch 1: a linear layer costs one multiply-add per nonzero kept weight
    expected = sum(int(((lenet.model.get_parameter(name) != 0) & (mask > 0)).sum()) for name, mask in masks.items())
    assert genotype.size(genome, "macs") == expected


# ------------------------------------------------------------------------------------- decoding
def test_mask_decode_computes_the_masked_base_network_and_leaves_it_untouched(lenet):
    genotype = bound(MaskGenotype(skip=["5"]), lenet)
    before = {name: p.detach().clone() for name, p in lenet.state_dict().items()}
    genome = genotype.initial(np.random.default_rng(0), "magnitude", density=0.2)
    decoded = genotype.decode(lenet, genome)
    inputs = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    masks = genotype.masks(genome)
    assert set(masks) == {"1.weight", "3.weight"}
    masked = {name: lenet.model.get_parameter(name) * mask for name, mask in masks.items()}
    with torch.no_grad():
        torch.testing.assert_close(decoded(inputs), functional_call(lenet.model, masked, (inputs,)))
    assert decoded.edit_log[-1]["source"] == "evolution" and decoded.edit_log[-1]["ops"][0]["op"] == "mask_weights"
    assert set(decoded.masks) == set(masks)
    assert lenet.edit_log == [] and lenet.masks == {}
    for name, tensor in lenet.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_width_decode_keeps_exactly_the_counted_highest_l1_channels():
    module = make_module("lenet5")
    genotype = bound(WidthGenotype(), module)
    assert list(genotype.layer_slices) == [g.root for g in module.channel_graph().groups()]
    wanted = {"0": 7, "3": 13, "7": 101}
    genome = np.array([wanted[root] for root in genotype.layer_slices], dtype=np.int64)
    genotype.check(genome)
    decoded = genotype.decode(module, genome)
    kept = {g.root: g.channels for g in decoded.channel_graph().groups()}
    assert kept == wanted
    assert decoded.edit_log[-1]["source"] == "evolution" and decoded.edit_log[-1]["ops"][0]["op"] == "remove_channels"
    # the first conv keeps its 7 filters of largest L1 norm over its group (own filters + next layer's inputs)
    first, second = module.model[0].weight.detach(), module.model[3].weight.detach()
    norms = torch.cat([first.flatten(1), second.transpose(0, 1).flatten(1)], dim=1).abs().mean(1)
    top = sorted(torch.argsort(norms, descending=True)[:7].tolist())
    torch.testing.assert_close(decoded.model[0].weight, first[top])
    assert module.model[0].out_channels == 20  # the original is untouched


def test_apply_in_place_logs_the_edit_and_matches_decode():
    module = make_module("lenet5")
    genotype = bound(WidthGenotype(), module)
    genome = genotype.magnitude(0.5)
    decoded = genotype.decode(module, genome)
    member = make_module("lenet5")  # same weights, another module (a PBT member)
    genotype.apply(member, genome)
    inputs = torch.randn(4, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(member(inputs), decoded(inputs))
    assert member.edit_log[-1]["source"] == "evolution"


@pytest.mark.parametrize("kind", ["mask", "width"])
def test_a_decoded_network_checkpoint_reloads_to_the_same_outputs(tmp_path, kind):
    module = make_module("lenet5")
    genotype = MaskGenotype() if kind == "mask" else WidthGenotype()
    genotype.bind(module)
    decoded = genotype.decode(module, genotype.initial(np.random.default_rng(2), "magnitude", density=0.4))
    trainer = tiny_trainer(tmp_path)
    trainer.strategy.connect(decoded)  # attach without training, then write a real Lightning checkpoint
    trainer.save_checkpoint(tmp_path / "best.ckpt", weights_only=False)  # full checkpoint, hooks included
    loaded = GrowPruneModule.load_from_checkpoint(tmp_path / "best.ckpt", weights_only=True)
    inputs = torch.randn(4, 1, 20, 20, generator=torch.Generator().manual_seed(3))
    decoded.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), decoded(inputs))
    assert loaded.edit_log == decoded.edit_log
    assert set(loaded.masks) == set(decoded.masks)
    # a module attached to a trainer decodes too: the copy leaves the trainer behind
    module.trainer = trainer
    again = genotype.decode(module, genotype.magnitude(1.0))
    assert again._trainer is None and module.trainer is trainer


# ------------------------------------------------------------------------------------ variation
def test_lenet_mask_genome_mutates_and_crosses_over_in_milliseconds(lenet):
    genotype = bound(MaskGenotype(), lenet)
    assert genotype.length == 266_200
    rng = np.random.default_rng(0)
    a, b = genotype.initial(rng), genotype.initial(rng, "magnitude")
    timings = {}
    for name, call in {"flip": lambda: genotype.mutate(a, rng, 0.01), "magnitude": lambda: genotype.mutate(a, rng, 0.01, "magnitude"),
                       "uniform": lambda: genotype.crossover(a, b, rng), "layer": lambda: genotype.crossover(a, b, rng, "layer")}.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    assert max(timings.values()) < 0.05, timings  # measured ~2-4 ms each on one core


def test_flip_rate_and_changed_layers(lenet):
    genotype = bound(MaskGenotype(), lenet)
    rng = np.random.default_rng(0)
    genome = genotype.initial(rng, density=0.5)
    child, changed = genotype.mutate(genome, rng, 0.01)
    flipped = np.count_nonzero(child != genome)
    assert abs(flipped - 2662) < 5 * np.sqrt(2662)  # binomial(266200, 0.01)
    assert changed == frozenset(genotype.layer_slices)
    assert genotype.distance(genome, child) == pytest.approx(flipped / genotype.length)


def test_layers_per_mutation_restricts_a_mutation_to_that_many_layers(lenet):
    genotype = bound(MaskGenotype(layers_per_mutation=1), lenet)
    rng = np.random.default_rng(0)
    genome = genotype.initial(rng)
    seen = set()
    for _ in range(20):
        child, changed = genotype.mutate(genome, rng, 0.05)
        assert len(changed) == 1
        (layer,) = changed
        outside = np.ones(genotype.length, dtype=bool)
        outside[genotype.layer_slices[layer]] = False
        assert np.array_equal(child[outside], genome[outside]) and not np.array_equal(child, genome)
        seen.add(layer)
    assert seen == set(genotype.layer_slices)  # the layer is drawn at random
    widths = bound(WidthGenotype(layers_per_mutation=1, gene_probability=1.0), make_module("lenet5"))
    _, changed = widths.mutate(widths.magnitude(0.5), rng, 0.2)
    assert len(changed) == 1


def test_magnitude_initial_population_keeps_large_weights_at_the_target_density(lenet):
    genotype = bound(MaskGenotype(), lenet)
    genome = genotype.initial(np.random.default_rng(0), "magnitude", density=0.3)
    for name, piece in genotype.layer_slices.items():
        genes = genome[piece]
        magnitude = lenet.model.get_parameter(name).detach().abs().flatten().numpy()
        assert genes.mean() == pytest.approx(0.3, abs=0.02)  # every layer at the target density
        assert magnitude[genes].mean() > 1.5 * magnitude[~genes].mean()


def test_magnitude_flips_prune_small_and_revive_large_weights(lenet):
    genotype = bound(MaskGenotype(), lenet)
    rng = np.random.default_rng(0)
    genome = genotype.initial(rng, density=0.5)
    child, _ = genotype.mutate(genome, rng, 0.05, "magnitude")
    magnitude = np.concatenate([lenet.model.get_parameter(n).detach().abs().flatten().numpy() for n in genotype.layer_slices])
    pruned = genome & ~child
    revived = ~genome & child
    assert magnitude[pruned].mean() < magnitude[genome].mean() < magnitude[revived].mean()
    assert np.count_nonzero(pruned | revived) == pytest.approx(0.05 * genotype.length, rel=0.05)


def test_magnitude_baseline_keeps_the_globally_largest_weights(lenet):
    genotype = bound(MaskGenotype(), lenet)
    genome = genotype.magnitude(0.1)
    magnitude = np.concatenate([lenet.model.get_parameter(n).detach().abs().flatten().numpy() for n in genotype.layer_slices])
    assert genome.sum() == round(0.1 * genotype.length)
    assert magnitude[genome].min() >= magnitude[~genome].max()


def test_crossover_children_take_each_gene_from_a_parent(lenet):
    genotype = bound(MaskGenotype(), lenet)
    rng = np.random.default_rng(0)
    a, b = genotype.initial(rng), genotype.initial(rng)
    c, d = genotype.crossover(a, b, rng)
    assert np.array_equal(c ^ d, a ^ b) and np.array_equal(c & d, a & b)
    assert 0.4 < np.mean(c[a != b] == a[a != b]) < 0.6
    e, f = genotype.crossover(a, b, rng, "layer")
    for piece in genotype.layer_slices.values():
        assert np.array_equal(e[piece], a[piece]) or np.array_equal(e[piece], b[piece])
        assert np.array_equal(f[piece], b[piece] if np.array_equal(e[piece], a[piece]) else a[piece])


def test_width_and_ratio_variation_stay_valid():
    module = make_module("resnet20")
    rng = np.random.default_rng(0)
    widths = bound(WidthGenotype(min_channels=2), module)
    ratios = bound(RatioGenotype(max_ratio=0.9), module)
    for genotype in (widths, ratios):
        genome = genotype.initial(rng)
        for _ in range(50):
            child, changed = genotype.mutate(genome, rng, 0.2, "perturb")
            genotype.check(child)
            assert changed and changed == frozenset(n for n, s in genotype.layer_slices.items() if (child[s] != genome[s]).any())
            genome, _ = genotype.crossover(child, genotype.initial(rng), rng)
            genotype.check(genome)
    assert widths.magnitude(0.0).tolist() == [2] * widths.length  # min_channels
    assert ratios.magnitude(0.0).max() == 0.9


def test_ratio_genome_keeps_each_layers_largest_weights(lenet):
    genotype = bound(RatioGenotype(), lenet)
    genome = np.array([0.9, 0.5, 0.0])
    for (name, mask), sparsity in zip(genotype.masks(genome).items(), genome):
        magnitude = lenet.model.get_parameter(name).detach().abs()
        assert int(mask.sum()) == round((1 - sparsity) * mask.numel())
        if 0 < sparsity:
            assert magnitude[mask > 0].min() >= magnitude[mask == 0].max()
    assert genotype.density(genome) == pytest.approx((0.1 * 235200 + 0.5 * 30000 + 1000) / 266200, abs=1e-5)


# ---------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("make", [MaskGenotype, RatioGenotype, WidthGenotype])
def test_the_same_seed_gives_the_same_genomes(make):
    module = make_module("lenet5")
    genotype = bound(make(), module)
    kind = "flip" if make is MaskGenotype else "perturb"
    assert genotype.default_mutation == kind

    def run(seed):
        rng = np.random.default_rng(seed)
        a, b = genotype.initial(rng), genotype.initial(rng, "magnitude")
        c, _ = genotype.mutate(a, rng, 0.1, kind)
        d, e = genotype.crossover(b, c, rng)
        return [a, b, c, d, e]

    first, again, other = run(5), run(5), run(6)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


# ------------------------------------------------------------------------------------ bad input
def test_bad_genomes_are_refused_naming_expected_and_got(lenet):
    genotype = bound(MaskGenotype(), lenet)
    with pytest.raises(ValueError, match=r"length must be 266200, got 10"):
        genotype.check(np.zeros(10, dtype=bool))
    with pytest.raises(ValueError, match=r"dtype must be bool, got float64"):
        genotype.size(np.zeros(266200))
    with pytest.raises(ValueError, match=r"1-D numpy array, got list"):
        genotype.decode(lenet, [True] * 266200)
    widths = bound(WidthGenotype(), make_module("lenet5"))
    with pytest.raises(ValueError, match=r"gene of '0' must be in 1\.\.20 .* got 21"):
        widths.check(np.array([10 if root != "0" else 21 for root in widths.layer_slices]))
    ratios = bound(RatioGenotype(max_ratio=0.5), lenet)
    with pytest.raises(ValueError, match=r"must lie in \[0, 0\.5\]"):
        ratios.masks(np.array([0.1, 0.6, 0.0]))
    with pytest.raises(ValueError, match=r"mutation kind must be one of \('perturb',\), got 'flip'"):
        ratios.mutate(ratios.magnitude(0.5), np.random.default_rng(0), 0.1, "flip")
    with pytest.raises(ValueError, match=r"call bind\(module\) first"):
        MaskGenotype().length


def test_layer_patterns_matching_nothing_list_the_layers(lenet):
    with pytest.raises(ValueError, match=r"MaskGenotype: no prunable layer matches 'conv\*'; layers: 1, 3, 5"):
        MaskGenotype(layers=["conv*"]).bind(lenet)
    with pytest.raises(ValueError, match=r"RatioGenotype: no prunable layer matches 'fc'"):
        RatioGenotype(skip=["fc"]).bind(lenet)


def test_width_genotype_on_a_model_the_channel_graph_cannot_handle_names_itself():
    module = GrowPruneModule("resnet20", arch_kwargs={"shortcut": "A"}, num_classes=4, input_shape=(3, 16, 16))
    with pytest.raises(ValueError, match=r"^WidthGenotype: channel surgery cannot handle"):
        WidthGenotype().bind(module)


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="layers_per_mutation"):
        MaskGenotype(layers_per_mutation=0)
    with pytest.raises(ValueError, match="min_channels"):
        WidthGenotype(min_channels=0)
    with pytest.raises(ValueError, match=r"criterion must be one of \('l1', 'l2'\), got 'l3'"):
        WidthGenotype(criterion="l3")
    with pytest.raises(ValueError, match="max_ratio"):
        RatioGenotype(max_ratio=1.0)


class GroupedNet(nn.Module):
    """A grouped convolution: the closed-form width tables do not cover it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_where_the_closed_form_does_not_apply_size_says_so_and_still_counts_right():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = GrowPruneModule(GroupedNet(), num_classes=4, input_shape=(3, 8, 8))
    genotype = WidthGenotype()
    with pytest.warns(UserWarning, match=r"size\(\) decodes every genome .* grouped convolution 'conv2'"):
        genotype.bind(module)
    genome = genotype.magnitude(0.5)
    model = genotype.decode(module, genome).model
    assert genotype.size(genome) == count_nonzero_parameters(model)
    assert genotype.size(genome, "macs") == effective_flops(model, (3, 8, 8)) / 2


@pytest.mark.parametrize("make", [MaskGenotype, WidthGenotype])
def test_a_bound_genotype_pickles_for_worker_processes(make):
    import pickle

    module = make_module("lenet5")
    genotype = bound(make(), module)
    module.channel_graph()  # a cached graph holds autograd nodes, which cannot be pickled
    copy = pickle.loads(pickle.dumps(genotype))
    genome = genotype.initial(np.random.default_rng(0), "magnitude", density=0.5)
    assert copy.size(genome, "macs") == genotype.size(genome, "macs")
    inputs = torch.randn(2, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(copy.decode(copy.module, genome)(inputs), genotype.decode(module, genome)(inputs))
    assert module._channel_graph is not None  # the original keeps its graph


# ------------------------------------------------------------------- density-preserving mutation
def test_swap_keeps_the_kept_count_exactly_while_flips_drift_towards_half(lenet):
    genotype = bound(MaskGenotype(), lenet)
    rng = np.random.default_rng(0)
    start = genotype.initial(rng, "magnitude", density=0.2)
    swapped, flipped = start, start
    for _ in range(30):
        child, changed = genotype.mutate(swapped, rng, 0.002, "swap")
        assert np.count_nonzero(child) == np.count_nonzero(start)  # exactly, every mutation
        assert changed == {n for n, p in genotype.layer_slices.items() if (child[p] != swapped[p]).any()}
        # about rate * genes change (k ~ Binomial(n, rate / 2) swaps, two genes each)
        assert abs(np.count_nonzero(child != swapped) - 532.4) < 5 * np.sqrt(266.2) * 2
        swapped = child
        flipped, _ = genotype.mutate(flipped, rng, 0.002, "flip")
    # the flips of the first measurement: +0.8 * 0.002 - 0.2 * 0.002 of the genes per child
    assert np.count_nonzero(flipped) - np.count_nonzero(start) > 0.5 * 30 * 0.002 * 0.6 * genotype.length


def test_swap_prunes_small_and_revives_large_weights(lenet):
    genotype = bound(MaskGenotype(), lenet)
    rng = np.random.default_rng(1)
    genome = genotype.initial(rng, density=0.5)
    child, _ = genotype.mutate(genome, rng, 0.05, "swap")
    magnitude = np.concatenate([lenet.model.get_parameter(n).detach().abs().flatten().numpy() for n in genotype.layer_slices])
    pruned, revived = genome & ~child, ~genome & child
    assert np.count_nonzero(pruned) == np.count_nonzero(revived) > 0.9 * 0.025 * genotype.length
    assert magnitude[pruned].mean() < 0.8 * magnitude[genome].mean()
    assert magnitude[revived].mean() > 1.2 * magnitude[~genome].mean()


def test_shrink_prunes_the_stated_fraction_of_the_kept_weights_more_than_it_revives(lenet):
    genotype = bound(MaskGenotype(shrink=0.05), lenet)
    rng = np.random.default_rng(2)
    genome = genotype.initial(rng, "magnitude", density=0.3)
    for _ in range(5):
        child, _ = genotype.mutate(genome, rng, 0.002, "shrink")
        kept = np.count_nonzero(genome)
        assert np.count_nonzero(child) == kept - round(0.05 * kept)
        assert genotype.size(child) == genotype.size(genome) - round(0.05 * kept) + np.count_nonzero(
            genome & ~genotype._nonzero) - np.count_nonzero(child & ~genotype._nonzero)
        genome = child
    # restricted to one layer: only that layer changes, by its own kept count
    one = bound(MaskGenotype(shrink=0.05, layers_per_mutation=1), lenet)
    seen = set()
    for _ in range(12):
        child, changed = one.mutate(genome, rng, 0.002, "shrink")
        (layer,) = changed
        seen.add(layer)
        piece = one.layer_slices[layer]
        outside = np.ones(one.length, dtype=bool)
        outside[piece] = False
        assert np.array_equal(child[outside], genome[outside])
        assert np.count_nonzero(child[piece]) == np.count_nonzero(genome[piece]) - round(0.05 * np.count_nonzero(genome[piece]))
    assert seen == set(one.layer_slices)
    # "swap" on the same genotype ignores shrink; rate 0 changes nothing
    assert np.count_nonzero(genotype.mutate(genome, rng, 0.01, "swap")[0]) == np.count_nonzero(genome)
    unchanged, changed = genotype.mutate(genome, rng, 0.0, "swap")
    assert np.array_equal(unchanged, genome) and changed == frozenset()
    with pytest.raises(ValueError, match=r"shrink must be a number in \[0, 1\], got 1.5"):
        MaskGenotype(shrink=1.5)


@pytest.mark.parametrize("make", [RatioGenotype, WidthGenotype])
def test_perturb_does_not_drift_away_from_the_bounds(make, lenet):
    """Mean size change over 30 successive mutations from the middle (density 0.5) is zero within noise."""
    genotype = bound(make(), lenet)
    rng = np.random.default_rng(3)
    start = genotype.magnitude(0.5)
    changes = []
    for _ in range(100):
        genome = start
        for _ in range(30):
            genome, _ = genotype.mutate(genome, rng, 0.02, "perturb")
        changes.append(genotype.size(genome) - genotype.size(start))
    changes = np.array(changes)
    assert abs(changes.mean()) < 3 * changes.std() / np.sqrt(len(changes))
    assert changes.std() > 0.01 * genotype.original_size()  # it did move
