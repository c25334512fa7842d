"""Population Based Training with the pruning mask as the hyper-parameter.

A population of *members*, each a Lightning checkpoint (weights, masks, edit log, optimizer and
loop state), goes through cycles of: GA prune (an evolutionary search for the best mask of the
member's current weights) -> retrain k epochs with a Lightning ``Trainer`` (optionally on n images
per class) -> rank -> the worst members copy (exploit) a better member's checkpoint and mask and
mutate that mask (explore). See :class:`PBTCycles` for the decisions taken.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from growprune.evaluation import evaluate
from growprune.evolution.data import images_per_class
from growprune.evolution.types import Individual
from growprune.metrics import count_nonzero_parameters, effective_flops
from growprune.module import GrowPruneModule
from growprune.validation import check_integer

MEMBERS = "members"
JOURNALS = "journals"
#: seeds drawn per cycle: one for the training subset, then two per member (GA, training order)
_SEED_HIGH = 2**31 - 1


# ------------------------------------------------------------------------------------ helpers
def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"PBTCycles {name} must be an integer >= {minimum}, got {value!r}")


def _clean_copy(module: GrowPruneModule) -> GrowPruneModule:
    """A deep copy without the trainer and the cached channel graph (rebuilt on use)."""
    memo: dict[int, Any] = {}
    for attribute in ("_trainer", "_channel_graph"):
        value = getattr(module, attribute, None)
        if value is not None:
            memo[id(value)] = None
    return copy.deepcopy(module, memo)


def load_member(template: GrowPruneModule, path: str | Path) -> GrowPruneModule:
    """The member checkpoint at ``path`` as a module: a copy of ``template`` (the base network, so
    any architecture works, an ``nn.Module`` given as ``arch`` included) restored the way Lightning
    restores it: ``on_load_checkpoint`` (edit log replay, masks) then the weights."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module = _clean_copy(template)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module


def mask_genome(genotype: Any, module: GrowPruneModule) -> np.ndarray:
    """The bool genome of ``module``'s current masks for a mask genotype bound to it (unmasked
    layers: all kept). Checked by decoding it back: it must give the module's masks exactly."""
    pieces = []
    weights = dict(module.model.named_parameters())
    for name, piece in genotype.layer_slices.items():
        mask = module.masks.get(name)
        count = piece.stop - piece.start
        if mask is None:
            pieces.append(np.ones(count, dtype=bool))
        else:
            pieces.append(mask.detach().cpu().flatten().numpy() != 0)
        if pieces[-1].size != count or name not in weights:
            raise ValueError(f"PBTCycles: the genotype's genes for {name!r} do not match the module's parameter")
    genome = np.concatenate(pieces) if pieces else np.zeros(0, dtype=bool)
    for name, mask in genotype.masks(genome).items():
        current = module.masks.get(name)
        expected = torch.ones_like(mask) if current is None else current.to(mask.dtype)
        if not torch.equal(mask.cpu(), expected.cpu()):
            raise ValueError(f"PBTCycles: cannot encode the module's mask of {name!r} as a {type(genotype).__name__} genome")
    return genome


def _free_path(path: Path) -> Path:
    """``path``, or ``stem.1.ckpt``, ``stem.2.ckpt``... if taken: files are never overwritten (a cycle
    redone after a crash writes next to its partial files)."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}.{number}{path.suffix}")
    return candidate


def _batches(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(inputs[i:i + size], targets[i:i + size]) for i in range(0, len(targets), size)]


def _measure(module: GrowPruneModule, measure: str) -> float:
    """Nonzero parameters, or effective multiply-adds of one sample, of the trained member."""
    if measure == "params":
        return float(count_nonzero_parameters(module.model))
    return float(effective_flops(module.model, module.input_shape)) / 2


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence what Lightning says at every member's fit that does not apply here (no validation
    loop, tensors in memory need no loader workers, hardware and tips), keeping real warnings."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*validation_step` but have no `val_dataloader.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            yield
    finally:
        logger.setLevel(level)


class _StepsAtStart(pl.Callback):
    """The optimizer's step count once the fit has restored (or created) it: 0 for a fresh
    optimizer, the checkpoint's count when its state was carried over."""

    steps = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = [float(entry["step"]) for optimizer in trainer.optimizers
                  for entry in optimizer.state.values() if "step" in entry]
        self.steps = int(max(counts)) if counts else 0


# ------------------------------------------------------------------------------ the engine task
def retrain_member(shared: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Retrain one member for ``shared["epochs"]`` more epochs and save it (an engine task).

    ``item["module"]`` (a pruned module never trained here) starts with a fresh optimizer; otherwise
    ``item["source"]`` is a pruned member checkpoint that ``Trainer.fit(ckpt_path=...)`` restores
    completely (weights, masks and edit log through the module's hooks, optimizer, LR scheduler and
    loop state), training up to ``item["epochs_before"] + epochs`` epochs. The training data
    ``shared["train"]`` (this cycle's images per class, or the whole split) are shuffled with
    ``item["seed"]``, which also seeds the CPU RNG during the fit (the caller's RNG state is
    restored afterwards).

    Returns:
        ``path`` of the saved checkpoint, selection ``accuracy`` and ``loss``, ``size`` (the
        objective's measure), ``epochs`` trained in all, ``global_step``, ``start_steps`` (the
        optimizer's step count when training started: 0 for a fresh optimizer), ``train_samples``
        and ``train_batches`` (what one epoch saw).
    """
    target = Path(item["target"])
    if target.exists():
        raise FileExistsError(f"PBTCycles: {target} exists; member checkpoints are never overwritten")
    inputs, targets = shared["train"]
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=shared["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(item["seed"]))
    module = item["module"] if item["module"] is not None else _clean_copy(shared["template"])
    devices = [] if shared["accelerator"] == "cpu" else None
    probe = _StepsAtStart()
    with _quiet_lightning(), torch.random.fork_rng(devices=devices):
        trainer = pl.Trainer(
            max_epochs=item["epochs_before"] + shared["epochs"], accelerator=shared["accelerator"], devices=1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(target.parent), callbacks=[probe],
        )
        torch.manual_seed(item["seed"])
        trainer.fit(module, train_dataloaders=loader, ckpt_path=item["source"],
                    weights_only=True if item["source"] is not None else None)
        trainer.save_checkpoint(target, weights_only=False)  # with optimizer, scheduler and loop state
    module = module.cpu()
    selection = evaluate(module.model, _batches(*shared["selection"], shared["batch_size"]))
    return {
        "path": str(target),
        "accuracy": selection.accuracy,
        "loss": selection.loss,
        "size": _measure(module, shared["measure"]),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "start_steps": probe.steps,
        "train_samples": len(loader.dataset),
        "train_batches": int(trainer.num_training_batches),
    }


# ------------------------------------------------------------------------------------ PBTCycles
class PBTCycles:
    """Prune / retrain cycles over a population of checkpoints (PBT, the mask as the hyper-parameter).

    Every cycle ``c`` (folder ``directory/members/cycle_<c>``):

    1. **GA prune.** For each member, the genotype and the evaluator are bound to the member's
       current weights and :func:`growprune.evolution.loop.evolve` runs a fresh ``make_search()``
       for ``prune_generations`` generations (evaluations on the selection data). The best genome
       is ANDed with the member's current mask genome and applied with ``genotype.apply`` (an
       ``apply_edit`` logged in the edit log with ``source: evolution``); an explored copy (step 4)
       gets its mutated mask set before the search, so the search scores the network it will
       prune (the prune edit logs the final mask, a subset of it). *Masks only shrink*
       (prune -> retrain -> prune, as in the studies): a pruned weight is never revived, so its
       optimizer moments never matter again and are left as they are. The AND changes nothing the
       search measured: pruned weights are exactly zero, so a genome keeping them scores (accuracy
       and nonzero size) the same as the ANDed one. A trained member is then written as
       ``member_<m>.pruned.ckpt``: its own checkpoint with the pruned weights and the new masks and
       edit log (optimizer state untouched).
    2. **Retrain.** ``engine.map(retrain_member, ...)``: every member is trained ``epochs`` more
       epochs by a Lightning ``Trainer`` (``fit(ckpt_path=member_<m>.pruned.ckpt)``, so the
       optimizer, LR scheduler and epoch counters carry over; in cycle 0 the base network starts
       a fresh optimizer), on ``images_per_class`` images of every class (one subset per cycle,
       the same for every member, so they are ranked on equal terms) or the whole training split,
       and saved with ``trainer.save_checkpoint`` as ``member_<m>.ckpt``.
    3. **Select.** Fitness ``objective.fitness(selection accuracy, size, original size)`` (size:
       nonzero parameters or effective MACs of the trained member); members are ordered by
       ``objective.rank`` (Pareto objectives: front, then crowding), ties by member index.
    4. **Exploit and explore.** The bottom ``floor(members * exploit_fraction)`` members each take
       a member drawn uniformly from as many top ones: its checkpoint file is copied to
       ``cycle_<c+1>/member_<m>.from_<w>.ckpt`` (weights, masks, edit log, optimizer state, epoch
       counters) and its mask genome is mutated (``genotype.mutate`` with ``mutation`` and
       ``mutation_rate``, the genotype bound to the copied member) and ANDed with the copied mask
       (exploring can only prune). That genome bounds the next cycle's GA prune of the member.
       This also follows the last cycle, so a state after ``n`` cycles continues exactly like a
       longer run.

    Files are never overwritten (a taken name gets ``.1``, ``.2`` ... before ``.ckpt``). Every random
    choice comes from ``rng``: per cycle one seed for the training subset and per member one for its
    search and one for its training order, then the exploit draws and mutations.

    Only genotypes with boolean genomes (:class:`~growprune.evolution.genotypes.MaskGenotype`)
    are accepted: the member's mask must be expressible as a genome to AND with, which
    structural widths and criterion-realised ratios are not.

    Args:
        cycles: prune/retrain cycles in all (a resumed run continues up to this many).
        members: population size.
        epochs: training epochs per member per cycle.
        images_per_class: retrain on this many images of every class (``None``: the whole
            training split).
        batch_size: training (and selection evaluation) batch size.
        prune_generations: GA generations per member per cycle.
        exploit_fraction: share of members replaced by copies of better ones each cycle, in
            [0, 0.5] (bottom and top sets must not overlap).
        mutation: mutation kind for exploring (``"flip"`` or ``"magnitude"`` for masks).
        mutation_rate: mutation rate for exploring, in [0, 1].
        chunks: evaluation chunks per GA generation (see :func:`~growprune.evolution.loop.evolve`).
        accelerator: the retraining Trainer's accelerator (``"cpu"``, ``"gpu"``...).

    Raises:
        ValueError: an argument out of range (at construction).
    """

    def __init__(
        self,
        cycles: int = 3,
        members: int = 4,
        epochs: int = 1,
        images_per_class: int | None = None,
        batch_size: int = 64,
        prune_generations: int = 3,
        exploit_fraction: float = 0.25,
        mutation: str = "flip",
        mutation_rate: float = 0.01,
        chunks: int = 1,
        accelerator: str = "cpu",
    ) -> None:
        _check_int("cycles", cycles, 1)
        _check_int("members", members, 1)
        _check_int("epochs", epochs, 1)
        if images_per_class is not None:
            _check_int("images_per_class", images_per_class, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("prune_generations", prune_generations, 1)
        _check_int("chunks", chunks, 1)
        if isinstance(exploit_fraction, bool) or not isinstance(exploit_fraction, (int, float)) \
                or not 0.0 <= exploit_fraction <= 0.5:
            raise ValueError(f"PBTCycles exploit_fraction must be a number in [0, 0.5], got {exploit_fraction!r}")
        if isinstance(mutation_rate, bool) or not isinstance(mutation_rate, (int, float)) \
                or not 0.0 <= mutation_rate <= 1.0:
            raise ValueError(f"PBTCycles mutation_rate must be a number in [0, 1], got {mutation_rate!r}")
        if not isinstance(mutation, str) or not mutation:
            raise ValueError(f"PBTCycles mutation must be a mutation kind name, got {mutation!r}")
        if not isinstance(accelerator, str) or not accelerator:
            raise ValueError(f"PBTCycles accelerator must be a Lightning accelerator name, got {accelerator!r}")
        self.cycles = cycles
        self.members = members
        self.epochs = epochs
        self.images_per_class = images_per_class
        self.batch_size = batch_size
        self.prune_generations = prune_generations
        self.exploit_fraction = float(exploit_fraction)
        self.mutation = mutation
        self.mutation_rate = float(mutation_rate)
        self.chunks = chunks
        self.accelerator = accelerator

    def __repr__(self) -> str:
        return (f"PBTCycles(cycles={self.cycles}, members={self.members}, epochs={self.epochs}, "
                f"images_per_class={self.images_per_class}, prune_generations={self.prune_generations}, "
                f"exploit_fraction={self.exploit_fraction}, mutation={self.mutation!r}, mutation_rate={self.mutation_rate})")

    @property
    def exploited(self) -> int:
        """Members replaced by copies each cycle: ``floor(members * exploit_fraction)``."""
        return int(math.floor(self.members * self.exploit_fraction + 1e-9))

    # --------------------------------------------------------------------------------- running
    def run(
        self,
        base: GrowPruneModule,
        genotype: Any,
        objective: Any,
        make_search: Callable[[], Any],
        evaluator: Any,
        engine: Any,
        train: tuple[torch.Tensor, torch.Tensor],
        selection: tuple[torch.Tensor, torch.Tensor],
        directory: str | Path,
        rng: np.random.Generator,
        start_cycle: int = 0,
        state: dict[str, Any] | None = None,
        on_cycle: Callable[[dict[str, Any]], None] | None = None,
        journal: Callable[[int, int], Any] | None = None,
    ) -> dict[str, Any]:
        """Run cycles ``start_cycle`` .. ``cycles - 1`` and return the state after the last one.

        Args:
            base: the trained network every member starts from (it is not modified).
            genotype: a mask genotype (bool genomes); it is re-bound to each member.
            objective: fitness and ranking of members and of the GA's candidates.
            make_search: builds a fresh search for each member's GA prune.
            evaluator: the population evaluator of the GA (bound to each member in turn).
            engine: runs the GA's evaluation chunks and the members' retraining.
            train: training ``(inputs, targets)`` tensors.
            selection: ``(inputs, targets)`` the GA and the member ranking are scored on.
            directory: where ``members/`` (checkpoints) and ``journals/`` go.
            rng: the source of every random choice (its state is set from ``state`` on resume).
            start_cycle: the first cycle to run: 0, or ``state["cycle"]`` to resume.
            state: what a previous call returned (or ``on_cycle`` saw as ``record["state"]``).
            on_cycle: called after each cycle with its record, plain values: ``cycle``,
                ``best_member``, ``best_fitness`` (first fitness value), ``mean_fitness``,
                ``best_accuracy``, ``best_size``, ``best_density`` (scalars, for a CSV row);
                per member (lists in member order): ``accuracies``, ``sizes``, ``fitness``,
                ``densities``, ``search`` (the GA's best: accuracy, size, fitness before
                retraining), ``paths`` (retrained checkpoints), ``epochs``, ``global_steps``,
                ``start_steps`` (optimizer steps restored at the start of the fit),
                ``train_samples``, ``train_batches``; ``exploits`` (``[loser, winner]`` pairs);
                and ``state`` (what a resumed run starts from; save it after each cycle).
            journal: ``(cycle, member) -> Journal | None`` for that member's GA; ``None``: a
                :class:`~growprune.evolution.loop.Journal` file
                ``journals/cycle_<c>/member_<m>.jsonl`` (a GA redone after a crash reuses its
                evaluations; journals are per member and cycle because a genome's score depends
                on the member's weights).

        Returns:
            The state: ``cycle`` (cycles done), ``members`` (per member: ``path`` of the checkpoint
            it starts the next cycle from, ``genome`` (bool tensor) bounding its next prune,
            ``epochs`` trained, ``parent`` (member copied in the last exploit, or ``None``)),
            ``best`` (the top-ranked member of the last cycle: ``cycle``, ``member``, ``path``,
            ``accuracy``, ``size``, ``fitness``, ``genome``), ``history`` (the cycle records
            without ``state``) and ``rng`` (the generator's state). Loads with
            ``torch.load(weights_only=True)``.

        Raises:
            ValueError: bad inputs (checked before anything is written), e.g. a genotype with
                non-bool genomes, a class with fewer than ``images_per_class`` training images,
                ``start_cycle`` not matching ``state``, or a fresh run into a directory that
                already holds members.
        """
        directory = Path(directory)
        self._check_run(base, genotype, train, selection, directory, rng, start_cycle, state)
        measure = objective.measure
        template = _clean_copy(base)
        if state is None:
            genotype.bind(template)
            genome = torch.from_numpy(mask_genome(genotype, template))
            state = {"cycle": 0, "history": [], "best": None, "rng": rng.bit_generator.state,
                     "members": [{"path": None, "genome": genome.clone(), "epochs": 0, "parent": None}
                                 for _ in range(self.members)]}
        else:
            state = copy.deepcopy(state)
            rng.bit_generator.state = state["rng"]
        shared = {"template": template, "train": train, "selection": selection, "batch_size": self.batch_size,
                  "epochs": self.epochs, "measure": measure, "accelerator": self.accelerator}
        for cycle in range(start_cycle, self.cycles):
            state = self._cycle(cycle, state, template, genotype, objective, make_search, evaluator, engine,
                                shared, selection, directory, rng, journal)
            if on_cycle is not None:
                on_cycle({**state["history"][-1], "state": state})
        return state

    def _check_run(self, base: Any, genotype: Any, train: Any, selection: Any, directory: Path,
                   rng: Any, start_cycle: int, state: dict[str, Any] | None) -> None:
        if not isinstance(base, GrowPruneModule):
            raise TypeError(f"PBTCycles.run needs a GrowPruneModule as base, got {type(base).__name__}")
        if getattr(genotype, "dtype_kind", None) != "b":
            raise ValueError(f"PBTCycles needs a genotype with boolean (mask) genomes such as MaskGenotype, "
                             f"got {type(genotype).__name__}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"PBTCycles.run needs a numpy.random.Generator, got {type(rng).__name__}")
        for name, pair in (("train", train), ("selection", selection)):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
                raise ValueError(f"PBTCycles.run {name} must be an (inputs, targets) pair of tensors")
            if len(pair[0]) != len(pair[1]) or len(pair[1]) == 0:
                raise ValueError(f"PBTCycles.run {name}: {len(pair[0])} inputs and {len(pair[1])} targets")
        if self.images_per_class is not None:  # refuses short classes now, before any file is written
            images_per_class(*train, self.images_per_class, torch.Generator().manual_seed(0))
        check_integer("start_cycle", start_cycle, 0)
        if start_cycle > self.cycles:
            raise ValueError(f"PBTCycles start_cycle {start_cycle} is beyond cycles={self.cycles}")
        if state is None:
            if start_cycle != 0:
                raise ValueError(f"PBTCycles start_cycle {start_cycle} needs the state of the run to resume")
            members_dir = directory / MEMBERS
            if members_dir.exists() and any(members_dir.iterdir()):
                raise ValueError(f"PBTCycles: {members_dir} already holds members; resume with their state "
                                 f"or use a fresh directory")
        else:
            if int(state.get("cycle", -1)) != start_cycle:
                raise ValueError(f"PBTCycles start_cycle {start_cycle} does not match the state's cycle {state.get('cycle')}")
            if len(state.get("members", [])) != self.members:
                raise ValueError(f"PBTCycles: the state holds {len(state.get('members', []))} members, "
                                 f"members={self.members}")

    # ----------------------------------------------------------------------------------- a cycle
    def _cycle(self, cycle: int, state: dict[str, Any], template: GrowPruneModule, genotype: Any, objective: Any,
               make_search: Callable[[], Any], evaluator: Any, engine: Any, shared: dict[str, Any],
               selection: tuple[torch.Tensor, torch.Tensor], directory: Path, rng: np.random.Generator,
               journal: Callable[[int, int], Any] | None) -> dict[str, Any]:
        folder = directory / MEMBERS / f"cycle_{cycle}"
        folder.mkdir(parents=True, exist_ok=True)
        seeds = rng.integers(0, _SEED_HIGH, size=1 + 2 * self.members)
        data_seed, search_seeds, train_seeds = int(seeds[0]), seeds[1::2], seeds[2::2]
        items, pruned_genomes, searched = [], [], []
        cycle_train = shared["train"]
        if self.images_per_class is not None:  # the subset every member retrains on (and evaluator retraining)
            cycle_train = images_per_class(*cycle_train, self.images_per_class, torch.Generator().manual_seed(data_seed))
        for index, member in enumerate(state["members"]):
            module = _clean_copy(template) if member["path"] is None else load_member(template, member["path"])
            genome, best = self._prune_member(cycle, index, module, member["genome"].numpy().astype(bool), genotype,
                                              objective, make_search, evaluator, engine, selection, cycle_train,
                                              int(search_seeds[index]), directory, journal)
            pruned_genomes.append(genome)
            searched.append({"accuracy": best.accuracy, "size": best.size,
                             "fitness": list(best.fitness) if best.fitness is not None else None})
            item = {"seed": int(train_seeds[index]), "epochs_before": int(member["epochs"]),
                    "target": str(_free_path(folder / f"member_{index}.ckpt")), "module": None, "source": None}
            if member["path"] is None:
                item["module"] = module  # never trained: a fresh optimizer
            else:
                item["source"] = str(self._write_pruned(module, member["path"], folder / f"member_{index}.pruned.ckpt"))
            items.append(item)
        results = engine.map(retrain_member, items, shared={**shared, "train": cycle_train})
        original = genotype.original_size(shared["measure"])
        trained = []
        for index, result in enumerate(results):
            fitness = tuple(objective.fitness(result["accuracy"], result["size"], original))
            trained.append(Individual(genome=pruned_genomes[index], accuracy=result["accuracy"], loss=result["loss"],
                                      size=result["size"], fitness=fitness, extra={"member": index}))
        ranks = np.asarray(objective.rank(trained), dtype=float)
        order = sorted(range(len(trained)), key=lambda i: (-ranks[i], i))
        next_members, exploits = self._exploit(cycle, directory, template, genotype, results, pruned_genomes, order, rng)
        best_index = order[0]
        record = self._record(cycle, trained, results, searched, order, exploits, genotype)
        best = {"cycle": cycle, "member": best_index, "path": results[best_index]["path"],
                "accuracy": float(results[best_index]["accuracy"]), "size": float(results[best_index]["size"]),
                "fitness": [float(v) for v in trained[best_index].fitness],
                "genome": torch.from_numpy(pruned_genomes[best_index].copy())}
        return {"cycle": cycle + 1, "members": next_members, "best": best,
                "history": list(state["history"]) + [record], "rng": rng.bit_generator.state}

    def _prune_member(self, cycle: int, index: int, module: GrowPruneModule, bound: np.ndarray, genotype: Any,
                      objective: Any, make_search: Callable[[], Any], evaluator: Any, engine: Any,
                      selection: tuple[torch.Tensor, torch.Tensor], train: tuple[torch.Tensor, torch.Tensor],
                      seed: int, directory: Path, journal: Callable[[int, int], Any] | None) -> tuple[np.ndarray, Individual]:
        """GA-prune one member in place: returns the applied genome and the search's best individual."""
        from growprune.evolution.loop import Journal, evolve

        genotype.bind(module)
        current = mask_genome(genotype, module)
        bound = bound & current  # whatever the state says, nothing pruned comes back
        if not np.array_equal(current, bound):
            # An explored copy: its mutated mask is set (not logged: the prune edit below logs the
            # final mask, a subset of it) before the search, so the search scores what it gets.
            module.masks = {**module.masks, **genotype.masks(bound)}
            genotype.bind(module)
        if getattr(evaluator, "retrain_steps", 0) > 0:
            evaluator.bind(module.model, *selection, *train)
        else:
            evaluator.bind(module.model, *selection)
        owned = journal is None
        log = Journal(directory / JOURNALS / f"cycle_{cycle}" / f"member_{index}.jsonl") if owned else journal(cycle, index)
        try:
            search = make_search()
            search.start(genotype, objective, np.random.default_rng(seed))
            search = evolve(search, genotype, objective, evaluator, engine, generations=self.prune_generations,
                            chunks=self.chunks, journal=log)
        finally:
            if owned:
                log.close()
        best = search.best()
        genome = np.asarray(best.genome, dtype=bool) & bound  # masks only shrink
        genotype.apply(module, genome)
        return genome, best

    @staticmethod
    def _write_pruned(module: GrowPruneModule, source: str, path: Path) -> Path:
        """The member's checkpoint with the pruned weights, new masks and longer edit log (its
        optimizer, scheduler and loop state as they were), for ``Trainer.fit(ckpt_path=...)``."""
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        checkpoint["state_dict"] = {key: value.detach().cpu() for key, value in module.state_dict().items()}
        module.on_save_checkpoint(checkpoint)  # the "growprune" entry: masks, edit log, original sizes
        path = _free_path(path)
        torch.save(checkpoint, path)
        return path

    def _exploit(self, cycle: int, directory: Path, template: GrowPruneModule, genotype: Any,
                 results: list[dict[str, Any]], genomes: list[np.ndarray], order: list[int],
                 rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[list[int]]]:
        """The members of the next cycle: the top and middle ones as trained, the bottom ones
        copies of top ones with explored (mutated, never revived) masks."""
        count = self.exploited
        top, bottom = order[:count], sorted(order[len(order) - count:]) if count else []
        members = [{"path": results[i]["path"], "genome": torch.from_numpy(genomes[i].copy()),
                    "epochs": int(results[i]["epochs"]), "parent": None} for i in range(len(results))]
        exploits = []
        if not bottom:
            return members, exploits
        folder = directory / MEMBERS / f"cycle_{cycle + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        for loser in bottom:
            winner = int(top[int(rng.integers(len(top)))])
            copy_path = _free_path(folder / f"member_{loser}.from_{winner}.ckpt")
            shutil.copyfile(results[winner]["path"], copy_path)
            genotype.bind(load_member(template, copy_path))  # magnitude-biased mutation reads the copy's weights
            child, _ = genotype.mutate(genomes[winner], rng, self.mutation_rate, kind=self.mutation)
            child = np.asarray(child, dtype=bool) & genomes[winner]  # exploring only prunes
            members[loser] = {"path": str(copy_path), "genome": torch.from_numpy(child.copy()),
                              "epochs": int(results[winner]["epochs"]), "parent": winner}
            exploits.append([int(loser), winner])
        return members, exploits

    @staticmethod
    def _record(cycle: int, trained: list[Individual], results: list[dict[str, Any]], searched: list[dict[str, Any]],
                order: list[int], exploits: list[list[int]], genotype: Any) -> dict[str, Any]:
        """One cycle's summary: plain values only (it goes into the state and the run's CSV)."""
        best = order[0]
        first = [float(individual.fitness[0]) for individual in trained]
        return {
            "cycle": cycle,
            "best_member": best,
            "best_fitness": first[best],
            "mean_fitness": float(np.mean(first)),
            "best_accuracy": float(trained[best].accuracy),
            "best_size": float(trained[best].size),
            "best_density": float(genotype.density(trained[best].genome)),
            "accuracies": [float(individual.accuracy) for individual in trained],
            "sizes": [float(individual.size) for individual in trained],
            "fitness": [[float(v) for v in individual.fitness] for individual in trained],
            "densities": [float(genotype.density(individual.genome)) for individual in trained],
            "search": searched,
            "exploits": exploits,
            "paths": [result["path"] for result in results],
            "epochs": [int(result["epochs"]) for result in results],
            "global_steps": [int(result["global_step"]) for result in results],
            "start_steps": [int(result["start_steps"]) for result in results],
            "train_samples": [int(result["train_samples"]) for result in results],
            "train_batches": [int(result["train_batches"]) for result in results],
        }
