"""Unit graphs of networks and their measures, checked against hand counts and networkx."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from growprune.graph import _twin_quotient
from growprune.graph import (MEASURES, graph_measures, louvain_modularity, partition_modularity, twin_classes, unit_graph,
                             unit_graph_from_weights)
from growprune.models import create_model
from growprune.surgery.channels import ChannelGraph


def _random_mask(shape, keep: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < keep).float()


def _kernel_pairs(weight: torch.Tensor) -> int:
    """(out, in) pairs of a conv weight whose kernel has a nonzero element."""
    return int((weight.detach().abs().sum(dim=(2, 3)) > 0).sum())


def _ones(model: nn.Module) -> nn.Module:
    """Every weight set to 1: random initialisations hold exact zeros now and then (float32 uniform
    draws), which would make hand counts of "dense" layers flaky."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.fill_(1.0)
    return model


def _edge_set(graph) -> set[tuple[int, int]]:
    return set(zip(graph.sources.tolist(), graph.targets.tolist()))


# ------------------------------------------------------------------------------------ building


def test_mlp_from_weights_edges_are_the_nonzero_weights():
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(5, 4)) * (rng.random((5, 4)) < 0.5),
               rng.normal(size=(3, 5)) * (rng.random((3, 5)) < 0.5)]
    graph = unit_graph_from_weights(weights, names=["hidden", "out"])
    assert graph.layers == ["input", "hidden", "out"]
    assert graph.num_units == 4 + 5 + 3
    expected = {(i, 4 + j) for j, i in zip(*np.nonzero(weights[0]))}
    expected |= {(4 + i, 9 + j) for j, i in zip(*np.nonzero(weights[1]))}
    assert _edge_set(graph) == expected
    assert graph.inputs.tolist() == [0, 1, 2, 3] and graph.outputs.tolist() == [9, 10, 11]
    pairs = graph.layer_pairs()
    assert [(p.producer, p.consumer) for p in pairs] == [("input", "hidden"), ("hidden", "out")]
    assert np.array_equal(pairs[1].biadjacency.toarray(), weights[1].T != 0)


def test_lenet_300_100_dense_and_masked_edge_counts():
    model = _ones(create_model("lenet_300_100"))
    dense = unit_graph(model, torch.zeros(1, 1, 28, 28))
    assert dense.layers == ["input", "1", "3", "5"]
    assert len(dense.inputs) == 784 and dense.num_units == 784 + 300 + 100 + 10
    assert dense.num_edges == 784 * 300 + 300 * 100 + 100 * 10
    # masks in the three accepted spellings: GrowPruneModule prefix, parameter name, module name
    masks = {"model.1.weight": _random_mask((300, 784), 0.1, 1), "3.weight": _random_mask((100, 300), 0.1, 2),
             "5": _random_mask((10, 100), 0.1, 3)}
    sparse = unit_graph(model, torch.zeros(1, 1, 28, 28), masks=masks)
    assert sparse.num_edges == int(sum(mask.sum() for mask in masks.values()))
    bias_only = unit_graph(model, torch.zeros(1, 1, 28, 28), masks={"model.1.bias": torch.zeros(300)})
    assert bias_only.num_edges == dense.num_edges  # biases do not connect units
    first = masks["model.1.weight"]
    js, is_ = torch.nonzero(first, as_tuple=True)
    first_edges = {(s, t) for s, t in _edge_set(sparse) if t < 784 + 300}
    assert first_edges == {(int(i), 784 + int(j)) for j, i in zip(js, is_)}


def test_growprune_module_masks_are_used():
    from growprune.module import GrowPruneModule

    module = GrowPruneModule("lenet_300_100", input_shape=(1, 28, 28))
    _ones(module.model)
    module.masks = {"1.weight": _random_mask((300, 784), 0.2, 4)}
    graph = unit_graph(module, torch.zeros(1, 1, 28, 28))
    assert graph.num_edges == int(module.masks["1.weight"].sum()) + 300 * 100 + 100 * 10


def test_lenet5_edges_count_nonzero_kernels_and_flattened_features():
    model = _ones(create_model("lenet5"))
    with torch.no_grad():
        model[3].weight.mul_(_random_mask((50, 20, 1, 1), 0.3, 5))  # whole kernels off
        model[3].weight[0, 0, 0, 0] = 0.0  # one element off: the kernel still connects
        model[7].weight.mul_(_random_mask((500, 800), 0.05, 6))
    graph = unit_graph(model, torch.zeros(1, 1, 28, 28))
    assert graph.layers == ["input", "0", "3", "7", "9"] and len(graph.inputs) == 1
    fc = model[7].weight.reshape(500, 50, 16)  # feature f of the flatten belongs to channel f // 16
    expected = 20 + _kernel_pairs(model[3].weight) + int((fc != 0).any(dim=2).sum()) + 500 * 10
    assert graph.num_edges == expected


def test_vgg11_bn_with_masks_counts_kernel_pairs():
    model = _ones(create_model("vgg11_bn", width=0.25))
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    masks = {f"{name}.weight": _random_mask(m.weight.shape, 0.2, i) for i, (name, m) in enumerate(convs.items())}
    graph = unit_graph(model, torch.zeros(1, 3, 32, 32), masks=masks)
    expected = sum(_kernel_pairs(m.weight * masks[f"{name}.weight"]) for name, m in convs.items())
    expected += model.classifier.weight.numel()
    assert graph.num_edges == expected
    assert len(graph.layers) == 1 + 8 + 1 and graph.num_units == 3 + sum(m.out_channels for m in convs.values()) + 10


def test_resnet20_residual_stream_unions_sources():
    model = _ones(create_model("resnet20"))
    graph = unit_graph(model, torch.zeros(1, 3, 32, 32))
    # Hand count: each residual-stream channel carries the stem and every block's conv2 since
    # (option-A shortcuts pad new channels with no sources); a dense conv reading the stream
    # connects to every source of every channel.
    stream = [1] * 16
    expected = 3 * 16
    for stage, width in enumerate([16, 32, 64]):
        for block in range(3):
            expected += width * sum(stream) + width * width
            if block == 0 and stage > 0:
                pad = (width - len(stream)) // 2
                stream = [0] * pad + stream + [0] * pad
            stream = [count + 1 for count in stream]
    expected += 10 * sum(stream)
    assert graph.num_edges == expected
    assert graph.num_units == 3 + 16 * 7 + 32 * 6 + 64 * 6 + 10
    values = graph_measures(graph, ["depth", "mean_path_length", "connectivity", "dead_fraction"])
    assert values == {"depth": 20.0, "mean_path_length": 2.0, "connectivity": 1.0, "dead_fraction": 0.0}
    assert ("conv1", "fc") in {(p.producer, p.consumer) for p in graph.layer_pairs()}  # a skip pair


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.c = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c(y), 1), 1))


def test_concatenation_stacks_channels():
    model = _Concat()
    with torch.no_grad():
        model.c.weight.zero_()
        model.c.weight[0, 3] = 1.0  # reads channel 3 of the cat = b's unit 0
        model.c.weight[1, 0] = 1.0  # a's unit 0
    graph = unit_graph(model, torch.zeros(1, 2, 6, 6))
    a0, b0 = 2, 2 + 3  # unit ids: 2 inputs, then a (3), b (2), c (4), fc (2)
    c_edges = {(s, t) for s, t in _edge_set(graph) if 7 <= t < 11}
    assert c_edges == {(b0, 7), (a0, 8)}
    assert graph.num_edges == 6 + 4 + 2 + 8


def test_densenet121_concatenations():
    model = _ones(torchvision.models.densenet121(num_classes=10))
    graph = unit_graph(model, torch.zeros(1, 3, 32, 32))
    weights = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # every channel of a DenseNet comes from exactly one unit, so edges = dense (out, in) pairs
    assert graph.num_edges == sum(m.weight.shape[0] * m.weight.shape[1] for m in weights)
    assert graph.num_units == 3 + sum(m.weight.shape[0] for m in weights)


def test_depthwise_convs_connect_within_groups():
    model = _ones(torchvision.models.mobilenet_v2(num_classes=10))
    graph = unit_graph(model, torch.zeros(1, 3, 32, 32))
    depthwise = {name for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
    checked = 0
    for pair in graph.layer_pairs():
        if pair.consumer in depthwise:
            # the expansion conv before it gives one source per channel: a diagonal biadjacency
            assert np.array_equal(pair.biadjacency.toarray(), np.eye(pair.biadjacency.shape[0], dtype=bool))
            checked += 1
    assert checked == len(depthwise)  # the first one reads the stem conv: one source per channel too
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1))
    small = unit_graph(grouped, torch.zeros(1, 4, 5, 5))
    first = {(s, t) for s, t in _edge_set(small) if t < 10}
    assert first == {(i, 4 + j) for j in range(6) for i in range(4) if i // 2 == j // 3}


def test_structurally_pruned_model_gives_a_smaller_graph():
    model = _ones(create_model("lenet5"))
    ChannelGraph(model, torch.zeros(1, 1, 28, 28)).remove({"0": [0, 1, 2], "3": list(range(10))})
    graph = unit_graph(model, torch.zeros(1, 1, 28, 28))
    assert graph.num_units == 1 + 17 + 40 + 500 + 10
    assert graph.num_edges == 17 + 40 * 17 + 500 * 40 + 500 * 10


def test_dead_units_stay_without_in_edges():
    w1 = np.ones((3, 2))
    w1[1] = 0  # unit 3 has no fan-in
    w2 = np.ones((2, 3))
    w2[:, 2] = 0  # unit 4 has no fan-out
    graph = unit_graph_from_weights([w1, w2])
    assert graph.num_units == 7 and 3 not in set(graph.targets.tolist())
    assert graph_measures(graph, ["dead_fraction"])["dead_fraction"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ measures


def _random_mlp_graph(seed: int, sizes=(6, 8, 8, 3), keep=0.4):
    rng = np.random.default_rng(seed)
    weights = [(rng.random((b, a)) < keep).astype(float) for a, b in zip(sizes[:-1], sizes[1:])]
    return unit_graph_from_weights(weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_degree_measures_match_networkx(seed):
    graph = _random_mlp_graph(seed)
    undirected = graph.to_networkx(directed=False)
    values = graph_measures(graph, ["assortativity", "density", "mean_degree", "max_degree", "num_edges", "num_units"])
    assert values["assortativity"] == pytest.approx(nx.degree_assortativity_coefficient(undirected), abs=1e-12)
    assert values["density"] == pytest.approx(nx.density(undirected))
    assert values["mean_degree"] == pytest.approx(2 * undirected.number_of_edges() / undirected.number_of_nodes())
    assert values["max_degree"] == max(d for _, d in undirected.degree())
    assert values["num_edges"] == undirected.number_of_edges() and values["num_units"] == undirected.number_of_nodes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bipartite_measures_match_networkx(seed):
    graph = _random_mlp_graph(seed, keep=0.3)
    clustering, density = [], []
    for pair in graph.layer_pairs():
        bipartite = nx.bipartite.from_biadjacency_matrix(pair.biadjacency.astype(int))
        clustering.append(nx.bipartite.average_clustering(bipartite, mode="dot"))
        top = range(pair.biadjacency.shape[0])
        density.append(nx.bipartite.density(bipartite, top))
    values = graph_measures(graph, ["bipartite_clustering", "bipartite_density"])
    assert values["bipartite_clustering"] == pytest.approx(np.mean(clustering), abs=1e-12)
    assert values["bipartite_density"] == pytest.approx(np.mean(density), abs=1e-12)


@pytest.mark.parametrize("seed,sizes,keep", [(0, (6, 8, 8, 3), 0.25), (1, (6, 8, 8, 3), 0.25),
                                             (2, (3, 8, 8, 6), 0.25), (3, (300, 200, 100, 10), 0.01)])
def test_path_measures_match_networkx(seed, sizes, keep):
    graph = _random_mlp_graph(seed, sizes=sizes, keep=keep)  # the last one takes the sparse search
    directed = graph.to_networkx(directed=True)
    lengths = []
    for source in graph.inputs.tolist():
        reached = nx.single_source_shortest_path_length(directed, source)
        lengths += [reached[t] for t in graph.outputs.tolist() if t in reached]
    pairs = len(graph.inputs) * len(graph.outputs)
    # longest input->output path by dynamic programming over networkx's topological order
    longest = {u: (0 if u in set(graph.inputs.tolist()) else -math.inf) for u in directed}
    for u in nx.topological_sort(directed):
        for v in directed.successors(u):
            longest[v] = max(longest[v], longest[u] + 1)
    on_path = set()
    for source in graph.inputs.tolist():
        on_path |= (nx.descendants(directed, source) | {source})
    on_path &= set().union(*(nx.ancestors(directed, t) | {t} for t in graph.outputs.tolist()))
    hidden = [u for u in directed if u not in set(graph.inputs.tolist()) | set(graph.outputs.tolist())]
    values = graph_measures(graph, ["depth", "mean_path_length", "connectivity", "dead_fraction"])
    assert values["connectivity"] == pytest.approx(len(lengths) / pairs)
    assert values["mean_path_length"] == pytest.approx(np.mean(lengths) if lengths else math.nan, nan_ok=True)
    assert values["depth"] == max([longest[t] for t in graph.outputs.tolist() if longest[t] >= 0], default=0)
    assert values["dead_fraction"] == pytest.approx(sum(u not in on_path for u in hidden) / len(hidden))


def test_dense_and_sparse_path_searches_agree(monkeypatch):
    import growprune.graph as graph_module

    for sizes in ((6, 8, 8, 3), (3, 8, 8, 6)):
        graph = _random_mlp_graph(4, sizes=sizes, keep=0.3)
        names = ["mean_path_length", "connectivity"]
        dense = graph_measures(graph, names)
        graph._cache.clear()
        monkeypatch.setattr(graph_module, "_DENSE_UNITS", 0)
        assert graph_measures(graph, names) == pytest.approx(dense, nan_ok=True)
        monkeypatch.undo()


def test_skip_connections_shorten_paths():
    # input -> a -> b -> out, added to a skip layer (input -> skip): both feed the model's output
    graph = unit_graph(_SkipNet(), torch.zeros(1, 3))
    assert graph.layers == ["input", "a", "b", "out", "skip"]
    assert graph.outputs.tolist() == [9, 10, 11, 12]  # out's 2 units and the 2 skip units the slice keeps
    values = graph_measures(graph, ["depth", "mean_path_length"])
    assert values["depth"] == 3 and values["mean_path_length"] == (6 * 3 + 6 * 1) / 12


class _SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.skip, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.b(torch.relu(self.a(x)))) + self.skip(x)[:, :2]


@pytest.mark.parametrize("seed", [0, 5])
def test_modularity_is_networkx_louvain_and_modularity(seed):
    graph = _random_mlp_graph(seed, sizes=(10, 16, 16, 4), keep=0.3)
    undirected = graph.to_networkx(directed=False)
    communities = nx.community.louvain_communities(undirected, seed=seed)
    expected = nx.community.modularity(undirected, communities)
    assert partition_modularity(graph, communities) == pytest.approx(expected, abs=1e-12)
    assert louvain_modularity(graph, seed=seed, merge_twins=False) == pytest.approx(expected, abs=1e-12)
    assert louvain_modularity(graph, seed=seed, max_level=1, merge_twins=False) <= expected + 1e-12


def test_twin_classes_are_exact_neighbour_sets_and_keep_modularity_exact():
    graph = _random_mlp_graph(3, sizes=(6, 8, 8, 3), keep=0.5)
    label = twin_classes(graph)
    undirected = graph.to_networkx(directed=False)
    for u in range(graph.num_units):
        for v in range(graph.num_units):
            assert (label[u] == label[v]) == (set(undirected[u]) == set(undirected[v]))
    # dense layers: every unit of a layer is a twin of the others (hidden layers see the same two layers)
    dense = unit_graph_from_weights([np.ones((5, 4)), np.ones((6, 5)), np.ones((3, 6))])
    assert len(set(twin_classes(dense).tolist())) == 4
    # Louvain on the twin graph reports the exact full-graph modularity of the partition it found
    for case in (graph, dense):
        classes = twin_classes(case)
        groups = nx.community.louvain_communities(_twin_quotient(case, classes), weight="weight", seed=0)
        expanded = [{int(u) for u in np.flatnonzero(np.isin(classes, list(group)))} for group in groups]
        expected = nx.community.modularity(case.to_networkx(directed=False), expanded)
        assert louvain_modularity(case, seed=0) == pytest.approx(expected, abs=1e-12)
        assert graph_measures(case, ["modularity"], seed=0)["modularity"] == pytest.approx(expected, abs=1e-12)


def test_all_measures_are_finite_on_a_connected_graph_and_unknown_names_fail():
    graph = _random_mlp_graph(0, keep=0.6)
    values = graph_measures(graph)
    assert list(values) == list(MEASURES) and all(math.isfinite(v) for v in values.values())
    with pytest.raises(ValueError, match="unknown graph measure.*'nope'.*valid: modularity"):
        graph_measures(graph, ["density", "nope"])


def test_empty_graph_gives_nan_where_undefined():
    graph = unit_graph_from_weights([np.zeros((3, 2)), np.zeros((2, 3))])
    values = graph_measures(graph)
    assert values["num_edges"] == 0 and values["connectivity"] == 0 and values["dead_fraction"] == 1
    assert all(math.isnan(values[name]) for name in ("modularity", "assortativity", "mean_path_length"))
    # the layer pairs are wired, just fully pruned
    assert values["bipartite_clustering"] == 0 and values["bipartite_density"] == 0


# ------------------------------------------------------------------------------------ failures


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


def test_untraceable_and_unknown_modules_raise_value_error():
    with pytest.raises(ValueError, match="cannot trace _DataDependent"):
        unit_graph(_DataDependent(), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="node '_1'.*leaf module type ConvTranspose2d is not understood"):
        unit_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 2, 3)), torch.zeros(1, 1, 5, 5))
    model = create_model("lenet_300_100")
    with pytest.raises(ValueError, match="mask 'fc9.weight' names no weight layer.*valid names: 1.weight"):
        unit_graph(model, torch.zeros(1, 1, 28, 28), masks={"fc9.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="node '_1'.*running it on the example inputs failed"):
        unit_graph(nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 2)), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="mask shape"):
        unit_graph(model, torch.zeros(1, 1, 28, 28), masks={"1.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="weights\\[1\\] has 4 inputs"):
        unit_graph_from_weights([np.ones((3, 2)), np.ones((2, 4))])


def test_a_fully_pruned_layer_pair_counts_as_an_empty_pair():
    cut = unit_graph_from_weights([np.ones((4, 4)), np.zeros((4, 4)), np.ones((2, 4))])
    values = graph_measures(cut, ["bipartite_density", "bipartite_clustering", "connectivity"])
    assert values["bipartite_density"] == pytest.approx(2 / 3)
    assert values["bipartite_clustering"] == pytest.approx(2 / 3)
    assert values["connectivity"] == 0.0
    # the same from a traced model whose middle layer is masked to zero
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    traced = unit_graph(model, torch.zeros(1, 4), masks={"3.weight": torch.zeros(4, 4)})
    assert [(p.producer, p.consumer, p.biadjacency.nnz) for p in traced.layer_pairs()] == \
        [("input", "1", 16), ("1", "3", 0), ("3", "5", 8)]
    assert graph_measures(traced, ["bipartite_density"])["bipartite_density"] == pytest.approx(2 / 3)
