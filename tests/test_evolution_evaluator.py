"""PopulationEvaluator: exact full evaluation, racing, the activation cache, MAC accounting, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune.data import DigitsDataModule
from growprune.evaluation import evaluate
from growprune.evolution.evaluator import PopulationEvaluator, chunk_bounds, wilson_bounds
from growprune.evolution.types import EvalRequest
from growprune.models.lenet import lenet5, lenet_300_100


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])


@pytest.fixture(scope="module")
def digits():
    """LeNet-300-100 on 8x8 digits, trained for a moment (about 90 % validation accuracy)."""
    data = DigitsDataModule(seed=0)
    data.setup()
    train_x, train_y = stacked(data.train_set)
    val_x, val_y = stacked(data.val_set)
    generator = torch.Generator().manual_seed(0)
    model = lenet_300_100(image_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / p.shape[-1]) ** 0.5 if p.dim() > 1 else 0 * p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(train_x), train_y).backward()
        optimizer.step()
    return model.eval(), train_x, train_y, val_x, val_y


def weight_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if n.endswith("weight")]


def random_masks(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(model.get_parameter(n).shape, generator=generator) < density).float()
            for n in weight_names(model)}


def flip_one_layer(masks: dict[str, torch.Tensor], layer: str, rate: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    child = {n: m.clone() for n, m in masks.items()}
    flips = torch.rand(child[layer].shape, generator=generator) < rate
    child[layer][flips] = 1.0 - child[layer][flips]
    return child


def plain_loop(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean loss of the masked MLP, one sample at a time, written out by hand."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    correct, loss = 0, 0.0
    for sample, target in zip(x, y.tolist()):
        h = sample.flatten()
        with torch.no_grad():
            for i, (name, layer) in enumerate(linears):
                h = (layer.weight * masks.get(f"{name}.weight", 1.0)) @ h + layer.bias
                h = torch.relu(h) if i < len(linears) - 1 else h
        correct += int(int(h.argmax()) == target)
        loss += float(-torch.log_softmax(h, dim=0)[target])
    return correct / len(y), loss / len(y)


def dense_macs_per_sample(model: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def test_full_evaluation_matches_a_plain_per_sample_loop(digits):
    model, _, _, x, y = digits
    evaluator = PopulationEvaluator(method="full", cache=False, sparse_below=0.0, batch_size=64)
    evaluator.bind(model, x, y)
    requests = [EvalRequest(key=str(k), masks=random_masks(model, d, k)) for k, d in enumerate((1.0, 0.5, 0.2))]
    results = evaluator.evaluate(requests)
    assert evaluator.sequential
    for request, result in zip(requests, results):
        accuracy, loss = plain_loop(model, request.masks, x, y)
        assert result.accuracy == accuracy
        assert result.loss == pytest.approx(loss, rel=1e-5)
        assert result.exact and result.samples == len(y)
    assert results[0].accuracy > 0.8  # the trained model itself: a meaningful check


class Residual(nn.Module):
    """Not a sequence of its children (a skip connection): the generic functional_call path."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.mid = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        return self.out(h + torch.relu(self.mid(h)))


class Wrapper(nn.Module):
    """Holds a sequential net (like GrowPruneModule.model): the evaluator looks through it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.head_note = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("kind", ["lenet5", "residual", "wrapper", "sparse"])
def test_masked_results_equal_growprune_evaluate(kind):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)  # layer initialisation only; inputs come from the generator
    size = 16 if kind == "lenet5" else 8  # lenet5 needs at least 16x16
    model = {"lenet5": lambda: lenet5(image_size=16), "residual": Residual,
             "wrapper": lambda: Wrapper(lenet_300_100(image_size=8)), "sparse": lambda: lenet_300_100(image_size=8)}[kind]()
    x = torch.randn(150, 1, size, size, generator=generator)
    y = torch.randint(0, 10, (150,), generator=generator)
    evaluator = PopulationEvaluator(method="full", batch_size=40, sparse_below=1.0 if kind == "sparse" else 0.03)
    evaluator.bind(model, x, y)
    assert evaluator.sequential == (kind != "residual")
    if kind == "residual":
        assert "running the children of Residual in order" in evaluator.sequential_reason
        assert not evaluator.cache_active
    masks = [random_masks(model, d, k) for k, d in enumerate((0.9, 0.4, 0.05))]
    results = evaluator.evaluate([EvalRequest(key=str(k), masks=m) for k, m in enumerate(masks)])
    for mask, result in zip(masks, results):
        reference = evaluate(model, [(x, y)], masks=mask)
        assert result.accuracy == reference.accuracy
        assert result.loss == pytest.approx(reference.loss, rel=1e-5)
    # a decoded network (model request) is evaluated as it is
    decoded = evaluator.evaluate([EvalRequest(key="m", model=model)])[0]
    assert decoded.accuracy == evaluate(model, [(x, y)]).accuracy


def children_of(parents: list[EvalRequest], model: nn.Module, layers: list[str], seed: int) -> list[EvalRequest]:
    children = []
    for k, parent in enumerate(parents):
        layer = layers[k % len(layers)]
        masks = flip_one_layer(parent.masks, layer, 0.05, seed + k)
        children.append(EvalRequest(key=f"{parent.key}/{k}", masks=masks, parent_key=parent.key,
                                    changed=frozenset({layer.rpartition(".")[0]})))
    return children


@pytest.mark.parametrize("method", ["full", "race"])
def test_cache_gives_bitwise_identical_results_and_spends_fewer_macs(digits, method):
    model, _, _, x, y = digits
    layers = weight_names(model)
    parents = [EvalRequest(key=f"p{k}", masks=random_masks(model, d, k))
               for k, d in enumerate((1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05))]
    children = children_of(parents, model, layers, seed=100)
    grandchildren = children_of(children, model, layers[::-1], seed=200)
    outcomes = {}
    for cache in (False, True):
        evaluator = PopulationEvaluator(method=method, cache=cache, batch_size=50, first_fraction=0.125)
        evaluator.bind(model, x, y)
        outcomes[cache] = [evaluator.evaluate(batch, protect=2) for batch in (parents, children, grandchildren)]
    for without, with_cache in zip(outcomes[False], outcomes[True]):
        for a, b in zip(without, with_cache):
            assert (a.accuracy, a.loss, a.samples, a.exact) == (b.accuracy, b.loss, b.samples, b.exact)
    spent = {cache: sum(r.macs for r in outcomes[cache][1] + outcomes[cache][2]) for cache in (False, True)}
    assert spent[True] < 0.8 * spent[False]
    # the first generation had nothing cached: it costs the same
    assert [r.macs for r in outcomes[True][0]] == [r.macs for r in outcomes[False][0]]


def test_cache_with_partial_coverage_and_a_small_budget_stays_identical(digits):
    model, _, _, x, y = digits
    layers = weight_names(model)
    parents = [EvalRequest(key=f"p{k}", masks=random_masks(model, d, k)) for k, d in enumerate((1.0, 0.5, 0.02, 0.01))]
    children = children_of(parents, model, layers[1:], seed=7)  # later layers changed: cached prefixes pay
    reference = PopulationEvaluator(method="full", cache=False, batch_size=50)
    reference.bind(model, x, y)
    expected = reference.evaluate(children)
    for budget in (512 * 2**20, 20_000):  # the small budget evicts entries mid-run
        evaluator = PopulationEvaluator(method="race", batch_size=50, cache_bytes=budget)
        evaluator.bind(model, x, y)
        raced = evaluator.evaluate(parents, protect=1)
        assert not all(r.exact for r in raced)  # parents cover only a prefix of the samples
        evaluator.method = "full"  # children on every sample; their parents' cache covers a prefix
        got = evaluator.evaluate(children)
        assert [(r.accuracy, r.loss) for r in got] == [(r.accuracy, r.loss) for r in expected]
        assert evaluator._cache.bytes <= budget
        if budget == 20_000:
            assert evaluator._cache.evictions > 0
        else:
            assert sum(r.macs for r in got) < sum(r.macs for r in expected)


def test_race_keeps_the_true_top_on_well_separated_candidates(digits):
    model, _, _, x, y = digits
    densities = (1.0, 0.7, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0)
    requests = [EvalRequest(key=str(k), masks=random_masks(model, d, k), size=float(k)) for k, d in enumerate(densities)]
    full = PopulationEvaluator(method="full", cache=False)
    full.bind(model, x, y)
    exact = full.evaluate(requests)
    race = PopulationEvaluator(method="race", cache=False, first_fraction=0.125, confidence=0.99, sparse_below=0.0)
    race.bind(model, x, y)
    raced = race.evaluate(requests, protect=2)
    top = sorted(range(len(requests)), key=lambda j: -exact[j].accuracy)[:2]
    assert sorted(top) == [0, 1] and exact[1].accuracy > exact[2].accuracy + 0.3  # really well separated
    for j in top:
        assert raced[j].exact and (raced[j].accuracy, raced[j].loss) == (exact[j].accuracy, exact[j].loss)
    assert sorted(range(len(requests)), key=lambda j: -raced[j].accuracy)[:2] == top
    assert sum(not r.exact for r in raced) >= 4
    assert sum(r.macs for r in raced) < 0.5 * race.macs_full(requests)
    # the score decides who is protected: a heavy size penalty makes request 0 (size 0) the best
    raced = race.evaluate(requests, score=lambda accuracy, size: accuracy - 10.0 * size, protect=1)
    assert raced[0].exact and raced[0].accuracy == exact[0].accuracy


def test_macs_are_counted_against_an_independent_count(digits):
    model, _, _, x, y = digits
    dense = dense_macs_per_sample(model)
    masks = random_masks(model, 0.02, 1)
    masks.pop("5.weight")  # an unmasked layer runs dense
    request = EvalRequest(key="a", masks=masks)
    for sparse_below, expected in ((0.0, dense), (0.5, int(masks["1.weight"].sum() + masks["3.weight"].sum()) + 100 * 10)):
        evaluator = PopulationEvaluator(method="full", cache=False, sparse_below=sparse_below)
        evaluator.bind(model, x, y)
        result = evaluator.evaluate([request])[0]
        assert result.macs == len(y) * expected == evaluator.macs_full([request])
    race = PopulationEvaluator(method="race", cache=False, sparse_below=0.0, first_fraction=0.25)
    race.bind(model, x, y)
    requests = [EvalRequest(key=str(k), masks=random_masks(model, d, k)) for k, d in enumerate((1.0, 0.001, 0.0))]
    for result in race.evaluate(requests):
        assert result.macs == result.samples * dense
    assert race.macs_full(requests) == 3 * len(y) * dense


def test_retraining_equals_a_hand_written_masked_sgd_loop(digits):
    model, train_x, train_y, x, y = digits
    masks = random_masks(model, 0.3, 5)
    evaluator = PopulationEvaluator(method="full", cache=False, retrain_steps=3, retrain_lr=0.05, sparse_below=0.0)
    evaluator.bind(model, x, y, retrain_inputs=train_x[:200], retrain_targets=train_y[:200])
    result = evaluator.evaluate([EvalRequest(key="r", masks=masks)])[0]
    # independent: a copy trained with torch.optim.SGD, masks re-applied after every step
    copy_ = lenet_300_100(image_size=8)
    copy_.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(copy_.parameters(), lr=0.05)
    with torch.no_grad():
        for name, mask in masks.items():
            copy_.get_parameter(name).mul_(mask)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(copy_(train_x[:200]), train_y[:200]).backward()
        optimizer.step()
        with torch.no_grad():
            for name, mask in masks.items():
                copy_.get_parameter(name).mul_(mask)
    reference = evaluate(copy_, [(x, y)])
    assert result.accuracy == reference.accuracy
    assert result.loss == pytest.approx(reference.loss, rel=1e-4)
    assert result.loss < evaluate(model, [(x, y)], masks=masks).loss  # retraining helped
    dense = dense_macs_per_sample(model)
    assert result.macs == len(y) * dense + 3 * 3 * 200 * dense == evaluator.macs_full([EvalRequest(key="r", masks=masks)])
    with pytest.raises(ValueError, match="cache=True cannot be combined with retrain_steps=3"):
        PopulationEvaluator(retrain_steps=3)


def test_batched_population_path_agrees_with_the_loop(digits):
    model, _, _, x, y = digits
    requests = [EvalRequest(key=str(k), masks=random_masks(model, d, k)) for k, d in enumerate((0.9, 0.5, 0.1))]
    loop = PopulationEvaluator(method="full", batched=False, sparse_below=0.0)
    batched = PopulationEvaluator(method="full", batched=True)
    for evaluator in (loop, batched):
        evaluator.bind(model, x, y)
    for a, b in zip(loop.evaluate(requests), batched.evaluate(requests)):
        assert a.accuracy == b.accuracy and a.loss == pytest.approx(b.loss, rel=1e-5) and a.macs == b.macs


def test_pickled_evaluator_drops_its_cache_and_gives_identical_results(digits):
    model, _, _, x, y = digits
    evaluator = PopulationEvaluator(method="race", threads=1)
    evaluator.bind(model, x, y)
    requests = [EvalRequest(key=str(k), masks=random_masks(model, d, k)) for k, d in enumerate((0.9, 0.3, 0.01))]
    first = evaluator.evaluate(requests, protect=2)
    assert evaluator._cache.bytes > 0
    clone = pickle.loads(pickle.dumps(evaluator))
    assert clone._cache.bytes == 0 and not clone._cache.entries
    fresh = PopulationEvaluator(method="race", threads=1)
    fresh.bind(model, x, y)
    assert clone.evaluate(requests, protect=2) == fresh.evaluate(requests, protect=2) == first


def test_threads_are_set_inside_and_restored(digits):
    model, _, _, x, y = digits
    before = torch.get_num_threads()
    seen = []
    evaluator = PopulationEvaluator(method="full", threads=1)
    evaluator.bind(model, x, y)
    evaluator.evaluate([EvalRequest(key="a", masks=random_masks(model, 0.5, 0))],
                       score=lambda a, s: seen.append(torch.get_num_threads()) or a)
    evaluator.method = "race"
    evaluator.evaluate([EvalRequest(key=str(k), masks=random_masks(model, 0.5, k)) for k in range(3)],
                       score=lambda a, s: seen.append(torch.get_num_threads()) or a)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_bounds_and_rounds():
    low, high = wilson_bounds(90, 100, 1000, 0.99)
    assert low < 0.9 < high and (low, high) == pytest.approx((0.80, 0.95), abs=0.02)
    assert wilson_bounds(900, 1000, 1000, 0.99) == (0.9, 0.9)  # every sample seen: exact
    chunks, rounds = chunk_bounds(1000, 200, 0.125)
    assert [b for _, b in chunks] == [125, 250, 450, 500, 700, 900, 1000] and rounds == [1, 2, 4, 7]


@pytest.mark.parametrize("arguments, message", [
    ({"method": "fast"}, "method must be one of full, race, got 'fast'"),
    ({"first_fraction": 0.0}, "first_fraction must be in (0, 1], got 0.0"),
    ({"first_fraction": 1.5}, "first_fraction must be in (0, 1], got 1.5"),
    ({"confidence": 1.0}, "confidence must be in (0, 1), got 1.0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"sparse_below": -0.1}, "sparse_below must be in [0, 1], got -0.1"),
    ({"device": "meta"}, "device must be cpu or cuda, got 'meta'"),
    ({"device": "gpu0"}, "device: 'gpu0' is not a torch device"),
] + ([({"device": "cuda"}, "CUDA is not available on this machine")] if not torch.cuda.is_available() else []))
def test_bad_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError) as error:
        PopulationEvaluator(**arguments)
    assert message in str(error.value)


def test_bad_data_and_requests_raise_value_error_before_evaluating(digits):
    model, _, _, x, y = digits
    evaluator = PopulationEvaluator()
    with pytest.raises(RuntimeError, match="bind"):
        evaluator.evaluate([])
    with pytest.raises(ValueError, match="no samples"):
        evaluator.bind(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="targets of shape"):
        evaluator.bind(model, x, y[:-1])
    evaluator.bind(model, x, y)
    good = EvalRequest(key="good", masks=random_masks(model, 0.5, 0))
    bad = [EvalRequest(key="both", masks=good.masks, model=model), EvalRequest(key="neither"),
           EvalRequest(key="name", masks={"9.weight": torch.ones(1)}),
           EvalRequest(key="shape", masks={"1.weight": torch.ones(3, 3)})]
    messages = ["exactly one of masks and model", "exactly one of masks and model", "no such parameter",
                r"has shape \(3, 3\), the parameter \(300, 64\)"]
    for request, message in zip(bad, messages):
        with pytest.raises(ValueError, match=message):
            evaluator.evaluate([good, request])
        assert not evaluator._cache.entries  # nothing was evaluated (the good one came first)
    with pytest.raises(ValueError, match="protect must be an integer >= 1, got 0"):
        evaluator.evaluate([good], protect=0)


def test_known_scores_raise_the_bar_and_keep_the_places_exact(digits):
    model, _, _, x, y = digits
    densities = (0.7, 0.6, 0.5, 0.4, 0.02, 0.01)
    requests = [EvalRequest(key=str(k), masks=random_masks(model, d, k)) for k, d in enumerate(densities)]
    full = PopulationEvaluator(method="full", cache=False)
    full.bind(model, x, y)
    exact = full.evaluate(requests)
    race = PopulationEvaluator(method="race", cache=False, sparse_below=0.0)
    race.bind(model, x, y)
    # two carried elites better than every request: the requests compete for 0 of the 2 places
    best = max(r.accuracy for r in exact)
    alone = race.evaluate(requests, protect=2)
    with_known = race.evaluate(requests, protect=2, known=[best + 0.5, best + 0.4])
    assert sum(r.macs for r in with_known) < sum(r.macs for r in alone)
    # one known score in between: the best request takes the other place and is exact
    with_one = race.evaluate(requests, protect=2, known=[best + 0.5])
    top = max(range(len(exact)), key=lambda j: exact[j].accuracy)
    assert with_one[top].exact and with_one[top].accuracy == exact[top].accuracy
    with pytest.raises(ValueError, match="known scores must be numbers"):
        race.evaluate(requests, known=[float("nan")])
