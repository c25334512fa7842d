"""The evolutionary loop: ask the search for a generation, evaluate what is new, tell it the scores.

:func:`evolve` runs generations of a started :class:`~growprune.evolution.search.Search`. Per
generation it sorts the individuals the search asks for into

* *carried*: already evaluated (elites); they keep their scores and cost nothing;
* *reused*: their genome was evaluated in an earlier generation (the :class:`Journal` has it), or
  an identical genome appears earlier in this generation;
* *new*: split into ``chunks`` contiguous chunks (a number fixed by the configuration, not by the
  engine's workers, so every engine computes the very same chunks and results) and evaluated with
  ``engine.imap(_evaluate_chunk, chunks, shared=(evaluator, genotype))``. Workers decode the
  genomes themselves (:meth:`Genotype.masks`, or :meth:`Genotype.decode` for structural
  genotypes): only genomes travel.

Each chunk's results are appended to the journal as soon as the chunk returns. The journal records
the generation that evaluated each genome, so a resumed run (same search state, same journal)
replays results of the interrupted generation instead of evaluating them again, and its
:class:`GenerationRecord` rows are identical to the uninterrupted run's. A chunk is replayed only
when all its genomes are journaled (a race over a chunk depends on all its members); a chunk the
kill cut short is evaluated again as a whole.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from growprune.evolution.types import EvalRequest, Individual, genome_key

if TYPE_CHECKING:
    from growprune.evolution.engines import Engine
    from growprune.evolution.evaluator import PopulationEvaluator
    from growprune.evolution.genotypes import Genotype
    from growprune.evolution.objectives import Objective
    from growprune.evolution.search import Search

#: what the journal stores per evaluated genome (besides its key and generation)
RESULT_FIELDS = ("accuracy", "loss", "samples", "exact", "macs", "macs_full", "size")


# --- journal -------------------------------------------------------------------------------------


class Journal:
    """Append-only JSON-lines file of evaluation results, keyed by genome key.

    One line per evaluated genome: ``{"key": ..., "generation": ..., "accuracy": ..., ...}``,
    flushed and fsynced as it is written, so a run killed with ``kill -9`` loses at most the line
    being written. A torn last line (no newline) is ignored and cut off when the journal is opened
    again; a line that is not valid JSON before the last one raises ``ValueError``.

    Args:
        path: the file (created with its folder when missing); ``None`` keeps the journal in
            memory only (a run that cannot resume, but reuses results across generations the same
            way).
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._file = None
        if self.path is not None:
            if self.path.is_dir():
                raise ValueError(f"journal path {str(self.path)!r} is a directory, expected a file")
            self._read()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def _read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1  # bytes up to the last newline: whole lines
        lines = data[:complete].decode("utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"journal {str(self.path)!r} line {number} is not valid JSON: {error}") from error
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise ValueError(f"journal {str(self.path)!r} line {number} has no genome key: {line[:80]!r}")
            self._remember(entry.pop("key"), entry)
        if complete < len(data):
            # A torn last line (killed mid-write): drop it so the next line starts cleanly.
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)

    def _remember(self, key: str, result: dict[str, Any]) -> bool:
        if key in self._entries:
            return False  # the first result of a genome counts
        self._entries[key] = result
        self._order.append(key)
        return True

    def get(self, key: str) -> dict[str, Any] | None:
        """The result stored for ``key`` (a copy), or ``None``."""
        entry = self._entries.get(key)
        return dict(entry) if entry is not None else None

    def add(self, key: str, result: dict[str, Any]) -> None:
        """Store (and append to the file) ``result`` for ``key``; a key already stored is kept as it was."""
        if not self._remember(key, dict(result)):
            return
        if self._file is not None:
            self._file.write(json.dumps({"key": key, **result}, allow_nan=True) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, result)`` in the order they were first stored."""
        for key in self._order:
            yield key, dict(self._entries[key])

    def totals_before(self, generation: int) -> tuple[int, int, int]:
        """Evaluations, MACs spent and full-evaluation MACs of the generations before ``generation``."""
        evaluations = macs = macs_full = 0
        for entry in self._entries.values():
            if int(entry.get("generation", 0)) < generation:
                evaluations += 1
                macs += int(entry.get("macs", 0))
                macs_full += int(entry.get("macs_full", 0))
        return evaluations, macs, macs_full

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Journal({str(self.path) if self.path else None!r}, entries={len(self)})"


# --- records -------------------------------------------------------------------------------------


@dataclass
class GenerationRecord:
    """What one generation did and reached (a row of ``generations.csv``).

    Attributes:
        generation: index, from 0.
        individuals: size of the generation the search asked for.
        evaluations: genomes evaluated for this generation (journal replays of an interrupted run
            count here too, so a resumed run's rows equal the uninterrupted run's).
        carried: individuals the search carried over already evaluated (elites; no cost).
        reused: genomes evaluated in an earlier generation or twice in this one (no cost).
        evaluations_total: evaluations of this and all earlier generations.
        macs: multiply-adds this generation's evaluations spent.
        macs_total: the same, cumulative.
        macs_full: what evaluating the same genomes in full (every sample, dense, no cache) costs.
        macs_full_total: the same, cumulative.
        best_fitness: the search's best individual's fitness (one value per objective).
        mean_fitness: mean fitness of this generation's individuals.
        front_size: individuals on the search's front.
        best_accuracy: accuracy of the search's best individual.
        best_size: its size (the objective's measure).
        best_density: its kept fraction of prunable weights.
        best_exact: whether its accuracy was measured on every evaluation sample.
        best_key: its genome key.
        elite_keys: genome keys of this generation's ``protect`` best (the objective's selection):
            the ones racing always evaluates in full.
    """

    generation: int
    individuals: int
    evaluations: int
    carried: int
    reused: int
    evaluations_total: int
    macs: int
    macs_total: int
    macs_full: int
    macs_full_total: int
    best_fitness: tuple[float, ...]
    mean_fitness: tuple[float, ...]
    front_size: int
    best_accuracy: float
    best_size: float
    best_density: float
    best_exact: bool
    best_key: str
    elite_keys: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, float | int | str]:
        """Flat values for a CSV row: fitness tuples become ``best_fitness``, ``best_fitness_1``, ...;
        ``elite_keys`` one space-separated string."""
        row: dict[str, float | int | str] = {}
        for name, value in self.__dict__.items():
            if name in ("best_fitness", "mean_fitness"):
                for index, component in enumerate(value):
                    row[name if index == 0 else f"{name}_{index}"] = float(component)
            elif name == "elite_keys":
                row[name] = " ".join(value)
            elif isinstance(value, bool):
                row[name] = int(value)
            else:
                row[name] = value
        return row


# --- the chunk task ------------------------------------------------------------------------------


class RaceScore:
    """``score(accuracy, size)`` for the evaluator's race: the objective's race score (picklable)."""

    def __init__(self, objective: "Objective", original: float) -> None:
        self.objective, self.original = objective, original

    def __call__(self, accuracy: float, size: float) -> float:
        return self.objective.race_score(accuracy, size, self.original)


@dataclass
class Chunk:
    """One task: genomes to evaluate together, and what the worker needs besides the shared objects."""

    genomes: list[np.ndarray]
    parent_keys: list[str | None]
    changed: list[frozenset[str] | None]
    measure: str
    score: RaceScore | None
    protect: int
    known: list[float] = field(default_factory=list)


def _request(genotype: "Genotype", genome: np.ndarray, parent_key: str | None,
             changed: frozenset[str] | None, measure: str) -> EvalRequest:
    masks = genotype.masks(genome)
    model = None
    if masks is None:
        # A structural genotype (widths): the decoded network itself is evaluated, decoded from
        # the genotype's bound base module.
        model = genotype.decode(genotype.module, genome).model
    return EvalRequest(key=genome_key(genome), masks=masks, model=model, parent_key=parent_key,
                       changed=changed, size=float(genotype.size(genome, measure)))


def _evaluate_chunk(shared: tuple["PopulationEvaluator", "Genotype"], chunk: Chunk) -> list[dict[str, Any]]:
    """Decode, evaluate and cost one chunk (runs in a worker): one result dict per genome."""
    evaluator, genotype = shared
    requests = [_request(genotype, genome, parent, changed, chunk.measure)
                for genome, parent, changed in zip(chunk.genomes, chunk.parent_keys, chunk.changed)]
    # Per request, so each journal line carries its own reference cost.
    full = [int(evaluator.macs_full([request])) for request in requests]
    results = evaluator.evaluate(requests, score=chunk.score, protect=chunk.protect, known=chunk.known)
    return [
        {"accuracy": float(result.accuracy), "loss": float(result.loss), "samples": int(result.samples),
         "exact": bool(result.exact), "macs": int(result.macs), "macs_full": macs_full, "size": request.size}
        for request, result, macs_full in zip(requests, results, full)
    ]


# --- the loop ------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"evolve: {name} must be an integer >= {minimum}, got {value!r}")


def _split(count: int, chunks: int) -> list[range]:
    """``count`` positions in ``min(chunks, count)`` contiguous, nearly equal parts (larger first)."""
    parts = min(chunks, count)
    sizes = [count // parts + (1 if index < count % parts else 0) for index in range(parts)] if parts else []
    bounds = np.cumsum([0, *sizes])
    return [range(int(bounds[i]), int(bounds[i + 1])) for i in range(parts)]


def _parent_key(individual: Individual, previous: list[Individual] | None) -> str | None:
    """The parent's genome key: set by the search in ``extra``, else looked up by ``parent`` index."""
    if "parent_key" in individual.extra:
        return individual.extra["parent_key"]
    if individual.parent is not None and previous is not None and 0 <= individual.parent < len(previous):
        return previous[individual.parent].key
    return None


def _set_result(individual: Individual, result: dict[str, Any], objective: "Objective", original: float) -> None:
    individual.accuracy = float(result["accuracy"])
    individual.loss = float(result["loss"])
    individual.size = float(result["size"])
    individual.samples = int(result["samples"])
    individual.exact = bool(result["exact"])
    individual.macs = int(result["macs"])
    individual.fitness = tuple(float(v) for v in objective.fitness(individual.accuracy, individual.size, original))


def evolve(
    search: "Search",
    genotype: "Genotype",
    objective: "Objective",
    evaluator: "PopulationEvaluator",
    engine: "Engine",
    generations: int,
    chunks: int = 1,
    journal: Journal | None = None,
    start_generation: int = 0,
    on_generation: Callable[[GenerationRecord], None] | None = None,
    protect: int | None = None,
) -> "Search":
    """Run generations ``start_generation .. generations - 1`` of a started search.

    Args:
        search: started with :meth:`Search.start` (and, to resume, loaded with
            :meth:`Search.load_state_dict` from the state saved after generation
            ``start_generation - 1``).
        genotype: bound to the base network (:meth:`Genotype.bind`).
        objective: turns accuracy and size into fitness (and race scores).
        evaluator: bound to the base network and the evaluation samples; travels to the workers.
        engine: where chunks are evaluated.
        generations: the run's total number of generations (not the number still to run).
        chunks: evaluation tasks per generation (fixed by the configuration; results do not depend
            on the engine, but racing is done within each chunk).
        journal: evaluation results to reuse and append to (``None``: a new in-memory journal).
            Resuming with the journal of the interrupted run evaluates no genome twice.
        start_generation: the first generation to run (0 for a new run).
        on_generation: called with each generation's record after the search was told the scores.
        protect: the best individuals per chunk that a race always evaluates in full (and the
            number of ``elite_keys`` per record); ``None``: the search's ``elite`` count (at least 1),
            so racing decides nothing about who the elites are. The carried individuals' exact race
            scores are passed to the race too (``known``): a child that cannot beat them is dropped early.

    Returns:
        The search (its :meth:`Search.best` / :meth:`Search.front` are the run's result).

    Raises:
        ValueError: a count out of range (``generations`` < ``start_generation`` included); a
            Pareto objective with a racing evaluator.
    """
    _check_int("generations", generations, 0)
    _check_int("chunks", chunks, 1)
    _check_int("start_generation", start_generation, 0)
    if protect is None:
        protect = max(1, int(getattr(search, "elite", 1) or 1))
    _check_int("protect", protect, 1)
    if start_generation > generations:
        raise ValueError(f"evolve: start_generation ({start_generation}) is after the last generation ({generations})")
    if objective.multi and evaluator.method == "race":
        raise ValueError(f"evolve: racing needs a scalar objective, got {type(objective).__name__}: "
                         "use PopulationEvaluator(method='full')")
    journal = journal if journal is not None else Journal()
    original = float(genotype.original_size(objective.measure))
    score = None if objective.multi else RaceScore(objective, original)
    evaluations_total, macs_total, macs_full_total = journal.totals_before(start_generation)
    previous: list[Individual] | None = None
    for generation in range(start_generation, generations):
        individuals = search.ask()
        counts = _evaluate_generation(individuals, generation, previous, genotype, objective, evaluator, engine,
                                      chunks, journal, score, protect, original)
        search.tell(individuals)
        evaluations_total += counts["evaluations"]
        macs_total += counts["macs"]
        macs_full_total += counts["macs_full"]
        record = _record(generation, individuals, counts, search, genotype, objective, protect,
                         (evaluations_total, macs_total, macs_full_total))
        if on_generation is not None:
            on_generation(record)
        previous = individuals
    return search


def _evaluate_generation(
    individuals: list[Individual], generation: int, previous: list[Individual] | None, genotype: "Genotype",
    objective: "Objective", evaluator: "PopulationEvaluator", engine: "Engine", chunks: int, journal: Journal,
    score: RaceScore | None, protect: int, original: float,
) -> dict[str, int]:
    """Score every unevaluated individual in place; returns this generation's counts."""
    counts = {"carried": 0, "reused": 0, "evaluations": 0, "macs": 0, "macs_full": 0}
    new: dict[str, list[Individual]] = {}  # key -> individuals with that genome, first appearance order
    for individual in individuals:
        if individual.evaluated:
            counts["carried"] += 1
            continue
        genotype.check(individual.genome)
        key = individual.key
        entry = journal.get(key)
        if entry is not None and int(entry["generation"]) < generation:
            _set_result(individual, entry, objective, original)
            counts["reused"] += 1
        elif key in new:
            new[key].append(individual)
            counts["reused"] += 1
        else:
            new[key] = [individual]
    keys = list(new)
    # the exact race scores of the carried individuals (elites): the bar a child must pass
    known = [score(individual.accuracy, individual.size) for individual in individuals
             if score is not None and individual.evaluated and individual.exact and individual.key not in new
             and individual.accuracy is not None and individual.size is not None]
    parts = _split(len(keys), chunks)
    results: dict[str, dict[str, Any]] = {}
    pending: list[tuple[list[str], Chunk]] = []
    for part in parts:
        part_keys = [keys[i] for i in part]
        stored = [journal.get(key) for key in part_keys]
        if all(entry is not None for entry in stored):
            # Evaluated for this generation before an interruption: replay, do not repeat.
            results.update(zip(part_keys, stored))
            continue
        firsts = [new[key][0] for key in part_keys]
        pending.append((part_keys, Chunk(
            genomes=[individual.genome for individual in firsts],
            parent_keys=[_parent_key(individual, previous) for individual in firsts],
            changed=[individual.changed for individual in firsts],
            measure=objective.measure, score=score, protect=protect, known=known,
        )))
    if pending:
        for index, chunk_results in engine.imap(_evaluate_chunk, [chunk for _, chunk in pending],
                                                shared=(evaluator, genotype)):
            for key, result in zip(pending[index][0], chunk_results):
                result = {"generation": generation, **result}
                journal.add(key, result)
                results[key] = journal.get(key)
    for key in keys:
        result = results[key]
        counts["evaluations"] += 1
        counts["macs"] += int(result["macs"])
        counts["macs_full"] += int(result["macs_full"])
        for individual in new[key]:
            _set_result(individual, result, objective, original)
    return counts


def _mean(values: list[tuple[float, ...]]) -> tuple[float, ...]:
    return tuple(float(np.mean(component)) for component in zip(*values)) if values else (math.nan,)


def _record(generation: int, individuals: list[Individual], counts: dict[str, int], search: "Search",
            genotype: "Genotype", objective: "Objective", protect: int,
            totals: tuple[int, int, int]) -> GenerationRecord:
    best = search.best()
    elites = objective.select(individuals, min(protect, len(individuals))) if individuals else []
    return GenerationRecord(
        generation=generation,
        individuals=len(individuals),
        evaluations=counts["evaluations"],
        carried=counts["carried"],
        reused=counts["reused"],
        evaluations_total=totals[0],
        macs=counts["macs"],
        macs_total=totals[1],
        macs_full=counts["macs_full"],
        macs_full_total=totals[2],
        best_fitness=tuple(best.fitness),
        mean_fitness=_mean([individual.fitness for individual in individuals]),
        front_size=len(search.front()),
        best_accuracy=float(best.accuracy),
        best_size=float(best.size),
        best_density=float(genotype.density(best.genome)),
        best_exact=bool(best.exact),
        best_key=best.key,
        elite_keys=[individuals[index].key for index in elites],
    )
