"""The evolutionary loop: evaluation bookkeeping (carried, reused, journaled), resume, engines, records."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from growprune.evolution.engines import LocalEngine
from growprune.evolution.loop import GenerationRecord, Journal, evolve
from growprune.evolution.objectives import AccuracyAtSparsity, ParetoFront, SmallestAboveFloor
from growprune.evolution.search import GeneticSearch, RandomSearch
from growprune.evolution.types import EvalResult, genome_key

# --- fakes: a bool genome over 48 "weights" in 4 layers, scored by a closed-form accuracy -------------


class FakeGenotype:
    """A bound genotype without a network: gene i has importance IMPORTANCE[i] (decreasing)."""

    mutation_kinds = ("flip", "magnitude")
    OTHER = 10  # parameters outside the genome (biases)

    def __init__(self, genes: int = 48, layers: int = 4) -> None:
        self.importance = np.linspace(1.0, 0.05, genes)
        step = genes // layers
        self._slices = {f"layer{i}": slice(i * step, (i + 1) * step) for i in range(layers)}
        self.genes = genes

    @property
    def length(self) -> int:
        return self.genes

    @property
    def layer_slices(self) -> dict[str, slice]:
        return dict(self._slices)

    def check(self, genome: np.ndarray) -> None:
        if genome.dtype != bool or genome.shape != (self.genes,):
            raise ValueError(f"bad genome {genome.dtype} {genome.shape}")

    def initial(self, rng, kind="uniform", density=None):
        density = rng.uniform(0.05, 0.95) if density is None else density
        if kind == "uniform":
            return rng.random(self.genes) < density
        return rng.random(self.genes) < np.clip(2 * density * self.importance, 0, 1)

    def magnitude(self, density):
        genome = np.zeros(self.genes, dtype=bool)
        genome[: int(round(density * self.genes))] = True
        return genome

    def mutate(self, genome, rng, rate, kind="flip"):
        child = genome ^ (rng.random(self.genes) < rate)
        return child, frozenset(n for n, s in self._slices.items() if (child[s] != genome[s]).any())

    def crossover(self, a, b, rng, kind="uniform"):
        take = rng.random(self.genes) < 0.5
        return np.where(take, a, b), np.where(take, b, a)

    def masks(self, genome):
        self.check(genome)
        return {"w": torch.from_numpy(genome.astype(np.float32))}

    def size(self, genome, measure="params"):
        return float(genome.sum()) + self.OTHER

    def original_size(self, measure="params"):
        return float(self.genes + self.OTHER)

    def density(self, genome):
        return float(genome.mean())

    def distance(self, a, b):
        return float((a != b).mean())


def fake_accuracy(genome: np.ndarray, importance: np.ndarray) -> float:
    return float((importance * genome).sum() / importance.sum())


class FakeEvaluator:
    """Scores a mask by the kept importance; counts the requests it evaluates."""

    method = "full"
    SAMPLES = 100

    def __init__(self, importance: np.ndarray) -> None:
        self.importance = importance
        self.calls = 0
        self.keys: list[str] = []
        self.races: list[tuple[int, list[float]]] = []  # (protect, known) of each call

    def evaluate(self, requests, score=None, protect=1, known=()):
        self.races.append((protect, list(known)))
        self.calls += len(requests)
        self.keys += [r.key for r in requests]
        results = []
        for request in requests:
            genome = request.masks["w"].numpy().astype(bool)
            accuracy = fake_accuracy(genome, self.importance)
            results.append(EvalResult(accuracy=accuracy, loss=1.0 - accuracy, samples=self.SAMPLES, exact=True,
                                      macs=self.SAMPLES * int(genome.sum())))
        return results

    def macs_full(self, requests):
        return sum(self.SAMPLES * r.masks["w"].numel() for r in requests)


class InterruptingEngine(LocalEngine):
    """Dies (like kill -9 would) after `after` chunks of generation `generation` were returned."""

    def __init__(self, generation_calls: int, after: int) -> None:
        super().__init__()
        self.generation_calls, self.after, self.calls = generation_calls, after, 0

    def imap(self, function, items, shared=None):
        self.calls += 1
        for count, pair in enumerate(super().imap(function, items, shared)):
            if self.calls == self.generation_calls and count == self.after:
                raise KeyboardInterrupt("killed")
            yield pair


def run(search, generations=4, chunks=2, journal=None, start_generation=0, engine=None, objective=None,
        evaluator=None, seed=0, state=None):
    genotype = FakeGenotype()
    objective = objective or AccuracyAtSparsity(0.5)
    evaluator = evaluator or FakeEvaluator(genotype.importance)
    search.start(genotype, objective, np.random.default_rng(seed))
    if state is not None:
        search.load_state_dict(state)
    records: list[GenerationRecord] = []
    states: list[dict] = []

    def keep(record):
        records.append(record)
        buffer = io.BytesIO()
        torch.save(search.state_dict(), buffer)  # what a run's state.pt holds after each generation
        buffer.seek(0)
        states.append(torch.load(buffer, weights_only=True))

    evolve(search, genotype, objective, evaluator, engine or LocalEngine(), generations, chunks=chunks,
           journal=journal, start_generation=start_generation, on_generation=keep)
    return records, states, evaluator


def test_elites_are_carried_not_reevaluated_and_counts_add_up():
    records, _, evaluator = run(GeneticSearch(population=8, elite=2, tournament=2, mutation_rate=0.05))
    assert [r.generation for r in records] == [0, 1, 2, 3]
    assert records[0].evaluations == 8 and records[0].carried == 0
    for record in records[1:]:
        assert record.carried == 2
        assert record.evaluations + record.reused + record.carried == 8
    assert evaluator.calls == sum(r.evaluations for r in records) == records[-1].evaluations_total
    assert len(set(evaluator.keys)) == evaluator.calls  # no genome evaluated twice
    assert records[-1].macs_total == sum(r.macs for r in records)
    assert records[-1].macs_full_total == FakeEvaluator.SAMPLES * 48 * evaluator.calls
    # best never gets worse (elitism) and is the best of everything evaluated
    assert all(a.best_fitness[0] <= b.best_fitness[0] for a, b in zip(records, records[1:]))


def test_races_protect_the_elite_count_and_know_the_carried_elites_scores():
    # A race must not decide who the elites are: it evaluates at least `elite` individuals in full
    # and is given the carried elites' exact scores, so a child that cannot beat them is dropped early.
    objective = AccuracyAtSparsity(0.5)
    records, _, evaluator = run(GeneticSearch(population=8, elite=3, tournament=2, mutation_rate=0.05),
                                chunks=1, objective=objective)
    assert [protect for protect, _ in evaluator.races] == [3, 3, 3, 3]
    assert evaluator.races[0][1] == []  # generation 0 carries nothing
    original = FakeGenotype().original_size()
    for (_, known), previous in zip(evaluator.races[1:], records):
        assert len(known) == 3
        # the best carried elite's race score, recomputed from the previous generation's best
        assert max(known) == pytest.approx(objective.race_score(previous.best_accuracy, previous.best_size, original))


def test_best_record_matches_an_independent_recomputation():
    search = GeneticSearch(population=8, elite=1, tournament=2, mutation_rate=0.05)
    records, _, evaluator = run(search)
    genotype, best = FakeGenotype(), search.best()
    accuracy = fake_accuracy(best.genome, genotype.importance)
    sparsity = 1 - (best.genome.sum() + 10) / (48 + 10)
    assert records[-1].best_accuracy == pytest.approx(accuracy)
    assert records[-1].best_fitness[0] == pytest.approx(accuracy - max(0.0, 0.5 - sparsity))
    assert records[-1].best_density == pytest.approx(best.genome.mean())
    assert records[-1].best_key == genome_key(best.genome)
    row = records[-1].as_row()
    assert row["best_fitness"] == records[-1].best_fitness[0] and row["elite_keys"] == records[-1].elite_keys[0]


def test_second_run_over_the_same_journal_evaluates_nothing_and_gives_identical_records(tmp_path):
    path = tmp_path / "evaluations.jsonl"
    with Journal(path) as journal:
        first, _, evaluator = run(GeneticSearch(population=8, elite=2, tournament=2, mutation_rate=0.05), journal=journal)
    assert evaluator.calls > 0
    lines = path.read_text().splitlines()
    assert len(lines) == evaluator.calls and all(json.loads(line)["key"] for line in lines)
    with Journal(path) as journal:
        second, _, evaluator = run(GeneticSearch(population=8, elite=2, tournament=2, mutation_rate=0.05),
                                   journal=journal)
    assert evaluator.calls == 0
    assert [r.as_row() for r in second] == [r.as_row() for r in first]


def test_resume_after_a_kill_mid_generation_repeats_no_evaluation(tmp_path):
    def search():
        return GeneticSearch(population=9, elite=1, tournament=3, mutation_rate=0.05)

    reference, _, reference_evaluator = run(search(), chunks=3)
    path = tmp_path / "evaluations.jsonl"
    journal = Journal(path)
    # Killed in generation 2 after its first chunk came back: state.pt holds generation 1's state.
    with pytest.raises(KeyboardInterrupt):
        run(search(), chunks=3, journal=journal, engine=InterruptingEngine(generation_calls=3, after=1))
    journal.close()
    _, states, first_evaluator = run(search(), generations=2, chunks=3)
    with open(path, "a") as handle:
        handle.write('{"key": "torn')  # a line cut by the kill
    journal = Journal(path)
    assert path.read_text().endswith("\n")  # the torn line is gone
    resumed, _, evaluator = run(search(), chunks=3, journal=journal, start_generation=2, state=states[-1])
    assert [r.as_row() for r in resumed] == [r.as_row() for r in reference[2:]]
    # Generation 2's first chunk (3 genomes) was journaled before the kill: not evaluated again.
    assert evaluator.calls == reference_evaluator.calls - first_evaluator.calls - 3
    assert set(evaluator.keys).isdisjoint(first_evaluator.keys)
    assert len(set(evaluator.keys) | set(first_evaluator.keys)) + 3 == reference_evaluator.calls


def test_duplicate_genomes_are_evaluated_once_and_reused_from_the_journal():
    # density 0: every genome is all-False, the same genome
    records, _, evaluator = run(RandomSearch(population=5, initial_density=0.0), generations=3, chunks=2)
    assert evaluator.calls == 1
    assert [(r.evaluations, r.reused) for r in records] == [(1, 4), (0, 5), (0, 5)]


@pytest.mark.slow  # spawning two workers that import torch and growprune: about 20 s on 2 loaded cores
def test_process_pool_engine_gives_identical_records():
    def search():
        return GeneticSearch(population=6, elite=1, tournament=2, mutation_rate=0.05)

    local, _, _ = run(search(), generations=2, chunks=2)
    with LocalEngine(workers=2, threads=1) as engine:
        pooled, _, _ = run(search(), generations=2, chunks=2, engine=engine)
    assert [r.as_row() for r in pooled] == [r.as_row() for r in local]


@pytest.mark.slow  # a Ray session: 20-50 s on 2 loaded cores
def test_ray_engine_gives_identical_records():
    pytest.importorskip("ray")
    from growprune.evolution.engines import RayEngine

    def search():
        return GeneticSearch(population=6, elite=1, tournament=2, mutation_rate=0.05)

    local, _, _ = run(search(), generations=3, chunks=2)
    with RayEngine(num_cpus=2) as engine:
        distributed, _, _ = run(search(), generations=3, chunks=2, engine=engine)
    assert [r.as_row() for r in distributed] == [r.as_row() for r in local]


def test_pareto_objective_records_fronts_and_refuses_racing():
    records, _, _ = run(GeneticSearch(population=8, tournament=2, mutation_rate=0.05), objective=ParetoFront())
    assert all(len(r.best_fitness) == 2 and r.front_size >= 1 for r in records)
    assert "best_fitness_1" in records[0].as_row()
    racing = FakeEvaluator(FakeGenotype().importance)
    racing.method = "race"
    with pytest.raises(ValueError, match="racing needs a scalar objective"):
        run(GeneticSearch(population=8), objective=ParetoFront(), evaluator=racing)


def test_bad_arguments_raise_before_anything_is_evaluated():
    genotype, evaluator = FakeGenotype(), None
    evaluator = FakeEvaluator(genotype.importance)
    search = GeneticSearch(population=4, elite=1, tournament=2)
    search.start(genotype, SmallestAboveFloor(0.5), np.random.default_rng(0))
    for kwargs, message in [({"generations": 2, "start_generation": 3}, "after the last generation"),
                            ({"generations": 2, "chunks": 0}, "chunks must be an integer >= 1, got 0"),
                            ({"generations": -1}, "generations must be an integer >= 0, got -1"),
                            ({"generations": 2, "protect": 0}, "protect must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            evolve(search, genotype, SmallestAboveFloor(0.5), evaluator, LocalEngine(), **kwargs)
    assert evaluator.calls == 0


def test_journal_ignores_a_torn_last_line_and_refuses_a_corrupt_one(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as journal:
        journal.add("a", {"generation": 0, "accuracy": 0.1 + 0.2})
        journal.add("a", {"generation": 1, "accuracy": 0.9})  # the first result of a key counts
        journal.add("b", {"generation": 1, "accuracy": 1 / 3})
    assert len(path.read_text().splitlines()) == 2
    path.write_text(path.read_text() + '{"key": "c", "acc')
    journal = Journal(path)
    assert journal.get("a") == {"generation": 0, "accuracy": 0.1 + 0.2}  # floats round-trip exactly
    assert journal.get("b")["accuracy"] == 1 / 3 and journal.get("c") is None
    assert journal.totals_before(1) == (1, 0, 0)
    journal.add("c", {"generation": 2})
    journal.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        Journal(path)
    memory = Journal()
    memory.add("x", {"generation": 0})
    assert "x" in memory and len(memory) == 1


# --- the real parts: MaskGenotype + PopulationEvaluator on LeNet-300-100 over the digits -----------


@pytest.fixture(scope="module")
def trained_lenet():
    """LeNet-300-100 on the 8x8 digits, trained for 150 full-batch Adam steps (a few seconds)."""
    from growprune import GrowPruneModule
    from growprune.data import DigitsDataModule
    from growprune.evolution.data import tensors

    data = DigitsDataModule(seed=0)
    data.setup()
    torch.manual_seed(0)  # the test's own network initialisation (no library code relies on it)
    module = GrowPruneModule(arch="lenet_300_100", arch_kwargs={"image_size": 8}, num_classes=10, input_shape=(1, 8, 8))
    inputs, targets = tensors(data.train_dataloader())
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-3)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module.model(inputs), targets).backward()
        optimizer.step()
    return module, tensors(data.val_dataloader())


def test_real_genotype_and_evaluator_resume_and_score_the_decoded_network(tmp_path, trained_lenet):
    from growprune.evaluation import evaluate
    from growprune.evolution.evaluator import PopulationEvaluator
    from growprune.evolution.genotypes import MaskGenotype

    module, (inputs, targets) = trained_lenet
    genotype = MaskGenotype()
    genotype.bind(module)
    objective = AccuracyAtSparsity(0.9)

    def go(journal, counter):
        evaluator = PopulationEvaluator(method="race", batch_size=64)
        evaluator.bind(module.model, inputs, targets)
        original = evaluator.evaluate

        def counting(requests, *args, **kwargs):
            counter.append(len(requests))
            return original(requests, *args, **kwargs)

        evaluator.evaluate = counting
        search = GeneticSearch(population=8, elite=2, tournament=3, mutation="magnitude", mutation_rate=0.02,
                               initial_density=0.1)
        search.start(genotype, objective, np.random.default_rng(7))
        records = []
        evolve(search, genotype, objective, evaluator, LocalEngine(), 3, chunks=2, journal=journal,
               on_generation=records.append, protect=2)
        return search, records

    first_calls, second_calls = [], []
    with Journal(tmp_path / "journal.jsonl") as journal:
        search, first = go(journal, first_calls)
    with Journal(tmp_path / "journal.jsonl") as journal:
        _, second = go(journal, second_calls)
    assert sum(first_calls) == first[-1].evaluations_total > 0 and second_calls == []
    assert [r.as_row() for r in second] == [r.as_row() for r in first]
    assert all(r.macs <= r.macs_full for r in first)
    # The best individual, decoded through the module's surgery, scores what the loop recorded.
    best = search.best()
    assert best.exact
    decoded = genotype.decode(module, best.genome)
    check = evaluate(decoded.model, [(inputs, targets)])
    assert check.accuracy == pytest.approx(best.accuracy, abs=1e-9)
    nonzero = sum(int(torch.count_nonzero(p)) for p in decoded.model.parameters())
    assert best.size == nonzero
    assert first[-1].best_accuracy == best.accuracy and best.fitness == objective.fitness(
        best.accuracy, nonzero, sum(p.numel() for p in module.model.parameters()))
    assert module.edit_log == [] and decoded.edit_log[-1]["source"] == "evolution"  # the base is untouched


def test_structural_genotype_is_decoded_by_the_workers_and_scored_exactly(trained_lenet):
    from growprune.evaluation import evaluate
    from growprune.evolution.evaluator import PopulationEvaluator
    from growprune.evolution.genotypes import WidthGenotype

    module, (inputs, targets) = trained_lenet
    genotype = WidthGenotype()
    genotype.bind(module)
    objective = SmallestAboveFloor(0.5)
    evaluator = PopulationEvaluator(method="full", batch_size=128)
    evaluator.bind(module.model, inputs, targets)
    search = GeneticSearch(population=4, elite=1, tournament=2, mutation="perturb", mutation_rate=0.2,
                           initial="uniform")
    search.start(genotype, objective, np.random.default_rng(1))
    records = []
    evolve(search, genotype, objective, evaluator, LocalEngine(), 2, chunks=2, on_generation=records.append)
    best = search.best()
    decoded = genotype.decode(module, best.genome)
    layers = dict(decoded.model.named_modules())
    widths = {name: layers[name].out_features for name in genotype.layer_slices}
    assert widths == {name: int(best.genome[piece][0]) for name, piece in genotype.layer_slices.items()}
    assert sorted(widths.values()) != [100, 300]  # it did prune
    assert evaluate(decoded.model, [(inputs, targets)]).accuracy == pytest.approx(best.accuracy, abs=1e-9)
    assert best.size == sum(int(torch.count_nonzero(p)) for p in decoded.model.parameters())
    assert records[-1].evaluations_total == sum(r.evaluations for r in records) >= 4
