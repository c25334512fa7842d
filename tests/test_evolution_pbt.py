"""PBT prune/retrain cycles (growprune.evolution.pbt): members are Lightning checkpoints whose weights,
masks, optimizer state and edit logs carry over; exploit copies, explore only prunes; resumable."""

import time

import numpy as np
import pytest
import torch

from growprune import GrowPruneModule
from growprune.data import DigitsDataModule
from growprune.evolution.data import tensors
from growprune.evolution.engines import LocalEngine
from growprune.evolution.evaluator import PopulationEvaluator
from growprune.evolution.genotypes import MaskGenotype, RatioGenotype
from growprune.evolution.objectives import AccuracyAtSparsity
from growprune.evolution.pbt import PBTCycles, load_member
from growprune.evolution.search import GeneticSearch

SEED = 7


@pytest.fixture(scope="module")
def digits():
    data = DigitsDataModule()
    data.setup()
    return tensors(data.train_set), tensors(data.val_set)


def base_module() -> GrowPruneModule:
    torch.manual_seed(0)  # the test's base network only; PBTCycles itself never touches the global seed
    return GrowPruneModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))


def run_pbt(digits, directory, cycles=2, members=2, start_cycle=0, state=None, engine=None, records=None, **options):
    train, selection = digits
    pbt = PBTCycles(cycles=cycles, members=members, epochs=1, prune_generations=1, exploit_fraction=0.5,
                    mutation_rate=0.05, **options)
    return pbt.run(base_module(), MaskGenotype(), AccuracyAtSparsity(0.5),
                   lambda: GeneticSearch(population=4, elite=1), PopulationEvaluator(method="full"),
                   engine or LocalEngine(), train, selection, directory, np.random.default_rng(SEED),
                   start_cycle=start_cycle, state=state, on_cycle=None if records is None else records.append)


@pytest.fixture(scope="module")
def two_cycles(digits, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pbt")
    records = []
    state = run_pbt(digits, directory, records=records)
    return directory, state, records


def read(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


def plain_accuracy(module, inputs, targets) -> float:
    module.eval()
    with torch.no_grad():
        return sum(int(module(x.unsqueeze(0)).argmax()) == int(y) for x, y in zip(inputs, targets)) / len(targets)


# ----------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("options, message", [
    ({"cycles": 0}, "cycles must be an integer >= 1, got 0"),
    ({"members": 0}, "members must be an integer >= 1"),
    ({"epochs": 1.5}, "epochs must be an integer >= 1"),
    ({"images_per_class": 0}, "images_per_class must be an integer >= 1"),
    ({"batch_size": True}, "batch_size must be an integer >= 1"),
    ({"prune_generations": 0}, "prune_generations must be an integer >= 1"),
    ({"exploit_fraction": 0.6}, r"exploit_fraction must be a number in \[0, 0.5\], got 0.6"),
    ({"mutation_rate": -0.1}, r"mutation_rate must be a number in \[0, 1\]"),
    ({"mutation": ""}, "mutation must be a mutation kind name"),
])
def test_bad_arguments_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        PBTCycles(**options)


def test_bad_runs_are_refused_before_any_file_is_written(digits, tmp_path):
    train, selection = digits
    pbt = PBTCycles(cycles=1, members=2, images_per_class=5)
    arguments = dict(objective=AccuracyAtSparsity(0.5), make_search=lambda: GeneticSearch(population=4),
                     evaluator=PopulationEvaluator(method="full"), engine=LocalEngine(), train=train,
                     selection=selection, directory=tmp_path / "run", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs a genotype with boolean .mask. genomes .* got RatioGenotype"):
        pbt.run(base_module(), RatioGenotype(), **arguments)
    few = (train[0][:30], train[1][:30])  # some digits appear fewer than 5 times among 30 images
    counts = torch.bincount(few[1], minlength=10)
    short = int(torch.nonzero(counts < 5)[0])
    with pytest.raises(ValueError, match=f"5 samples per class asked but .*class {short} has {int(counts[short])}"):
        pbt.run(base_module(), MaskGenotype(), **{**arguments, "train": few})
    with pytest.raises(ValueError, match="start_cycle 1 needs the state of the run to resume"):
        pbt.run(base_module(), MaskGenotype(), **arguments, start_cycle=1)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run" / "members" / "cycle_0").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds members; resume with their state or use a fresh directory"):
        pbt.run(base_module(), MaskGenotype(), **arguments)


def test_exploited_count_is_the_floor_of_the_fraction():
    assert PBTCycles(members=4, exploit_fraction=0.25).exploited == 1
    assert PBTCycles(members=7, exploit_fraction=0.25).exploited == 1
    assert PBTCycles(members=2, exploit_fraction=0.5).exploited == 1
    assert PBTCycles(members=3, exploit_fraction=0.0).exploited == 0


# ------------------------------------------------------------------------------------- cycles
def test_exploit_copies_checkpoint_and_optimizer_state_and_retraining_continues_it(two_cycles):
    directory, state, records = two_cycles
    first, second = records[0], records[1]
    [[loser, winner]] = first["exploits"]
    assert first["fitness"][winner][0] >= first["fitness"][loser][0]  # the worse member copies the better
    source = read(first["paths"][winner])
    copied = read(directory / "members" / "cycle_1" / f"member_{loser}.from_{winner}.ckpt")
    assert_same_tensors(copied["optimizer_states"], source["optimizer_states"])  # value by value
    assert_same_tensors(copied["state_dict"], source["state_dict"])
    assert_same_tensors(copied["growprune"]["masks"], source["growprune"]["masks"])
    # the copy is pruned further (new masks and weights) with its optimizer state untouched
    pruned = read(directory / "members" / "cycle_1" / f"member_{loser}.pruned.ckpt")
    assert_same_tensors(pruned["optimizer_states"], source["optimizer_states"])
    # retraining restored that state: its optimizer started at the copied step count, not afresh
    assert first["start_steps"] == [0, 0] and second["start_steps"][loser] == first["train_batches"][winner]
    batches = first["train_batches"][winner]
    adam = [entry["step"] for entry in source["optimizer_states"][0]["state"].values()]
    assert all(float(step) == batches for step in adam)
    retrained = read(second["paths"][loser])
    assert all(float(entry["step"]) == 2 * batches for entry in retrained["optimizer_states"][0]["state"].values())
    assert retrained["global_step"] == second["global_steps"][loser] == 2 * batches
    assert retrained["epoch"] == second["epochs"][loser] == 2


def test_masks_only_shrink_and_match_the_state_genomes(two_cycles):
    directory, state, records = two_cycles
    genotype = MaskGenotype()
    genotype.bind(base_module())
    for member in range(2):
        parent = next((w for l, w in records[0]["exploits"] if l == member), member)
        before = read(records[0]["paths"][parent])["growprune"]["masks"]
        after = read(records[1]["paths"][member])["growprune"]["masks"]
        assert before.keys() == after.keys() and len(after) == 3  # the three weight layers
        for name in after:
            assert not (after[name] & ~before[name]).any()  # nothing revived
        if parent != member:
            # the exploited member explored: its mask is a strictly smaller copy of the winner's. (A member
            # already at the objective's sparsity may keep its mask: the GA's magnitude seed reproduces it.)
            assert sum(int((before[n] & ~after[n]).sum()) for n in after) > 0
        # within the explored genome the first cycle handed on (for the exploited member: a mutated copy)
        explored = genotype.masks(records[0]["state"]["members"][member]["genome"].numpy())
        for name, mask in explored.items():
            assert not (after[name] & ~mask.bool()).any()
    [[loser, winner]] = records[0]["exploits"]
    handed = records[0]["state"]["members"][loser]["genome"]
    assert (handed <= torch.from_numpy(records[0]["state"]["members"][winner]["genome"].numpy())).all()
    assert not torch.equal(handed, records[0]["state"]["members"][winner]["genome"])  # explored: more pruned
    # the best member's checkpoint holds exactly the state's best genome
    best = state["best"]
    masks = genotype.masks(best["genome"].numpy())
    stored = read(best["path"])["growprune"]["masks"]
    for name, mask in masks.items():
        assert torch.equal(stored[name], mask.bool())
    # explored genomes (the next cycle's bounds) never keep what their member's checkpoint pruned
    for member in state["members"]:
        member_masks = read(member["path"])["growprune"]["masks"]
        bound = genotype.masks(member["genome"].numpy())
        for name, mask in bound.items():
            assert not (mask.bool() & ~member_masks[name]).any()


def test_checkpoints_reload_with_their_edit_log_and_give_the_recorded_accuracy(two_cycles, digits):
    directory, state, records = two_cycles
    _, (inputs, targets) = digits
    for cycle, record in enumerate(records):
        for member, path in enumerate(record["paths"]):
            checkpoint = read(path)
            evolution = [entry for entry in checkpoint["growprune"]["edit_log"] if entry.get("source") == "evolution"]
            assert len(evolution) == cycle + 1  # one logged mask edit per cycle
            assert all(entry["ops"][0]["op"] == "mask_weights" for entry in evolution)
            loaded = GrowPruneModule.load_from_checkpoint(path)
            restored = load_member(base_module(), path)
            assert torch.equal(loaded(inputs), restored(inputs))
            assert plain_accuracy(loaded, inputs, targets) == pytest.approx(record["accuracies"][member])
            nonzero = sum(int(torch.count_nonzero(p)) for p in loaded.model.parameters())
            assert nonzero == record["sizes"][member]
            for name, mask in loaded.masks.items():  # pruned weights are exactly zero
                assert not loaded.model.get_parameter(name)[mask == 0].any()


def test_records_and_state_are_plain_and_load_weights_only(two_cycles, tmp_path):
    directory, state, records = two_cycles
    assert [record["cycle"] for record in records] == [0, 1]
    assert [record["state"]["cycle"] for record in records] == [1, 2]
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded["cycle"] == 2 and len(loaded["members"]) == 2
    assert loaded["best"]["member"] == records[1]["best_member"]
    assert loaded["best"]["accuracy"] == records[1]["best_accuracy"] == max(records[1]["accuracies"])
    for record in records:
        assert record["mean_fitness"] == pytest.approx(np.mean([f[0] for f in record["fitness"]]))
        assert record["train_samples"] == [1257, 1257]  # the whole training split


def test_resume_after_the_first_cycle_equals_the_uninterrupted_run(two_cycles, digits, tmp_path):
    _, uninterrupted, records = two_cycles
    directory = tmp_path / "resumed"
    first_records = []
    after_first = run_pbt(digits, directory, cycles=1, records=first_records)
    # the same seed gives the same first cycle
    for key in ("accuracies", "sizes", "fitness", "exploits", "global_steps"):
        assert first_records[0][key] == records[0][key]
    torch.save(after_first, tmp_path / "state.pt")
    resumed = run_pbt(digits, directory, start_cycle=1, state=torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed["rng"] == uninterrupted["rng"]
    for ours, theirs in zip(resumed["members"], uninterrupted["members"]):
        assert torch.equal(ours["genome"], theirs["genome"]) and ours["epochs"] == theirs["epochs"]
        assert ours["parent"] == theirs["parent"]
    for key in ("accuracies", "sizes", "fitness", "exploits", "densities", "search"):
        assert resumed["history"][1][key] == uninterrupted["history"][1][key]
    assert_same_tensors(read(resumed["best"]["path"])["state_dict"], read(uninterrupted["best"]["path"])["state_dict"])


def test_images_per_class_one_trains_on_ten_images(digits, tmp_path):
    records = []
    run_pbt(digits, tmp_path / "run", cycles=1, members=1, images_per_class=1, records=records)
    assert records[0]["train_samples"] == [10]
    assert records[0]["train_batches"] == [1]  # the training dataloader's length
    assert records[0]["global_steps"] == [1]
    assert records[0]["exploits"] == []  # one member: nobody to copy


@pytest.mark.slow  # 23 s alone (Ray start-up), 35 s on a loaded 2-core machine: the file would pass 60 s
def test_ray_engine_gives_the_local_engine_result(digits, tmp_path):
    pytest.importorskip("ray")
    from growprune.evolution.engines import RayEngine

    local = run_pbt(digits, tmp_path / "local", cycles=1)
    started = time.perf_counter()
    with RayEngine(num_cpus=2) as engine:
        remote = run_pbt(digits, tmp_path / "ray", cycles=1, engine=engine)
    print(f"ray run: {time.perf_counter() - started:.1f} s")
    for ours, theirs in zip(remote["members"], local["members"]):
        assert torch.equal(ours["genome"], theirs["genome"])
    for key in ("accuracies", "sizes", "fitness", "exploits"):
        assert remote["history"][0][key] == local["history"][0][key]
    assert_same_tensors(read(remote["best"]["path"])["state_dict"], read(local["best"]["path"])["state_dict"])


def test_a_redone_cycle_reuses_its_journal_and_overwrites_nothing(digits, tmp_path):
    directory = tmp_path / "redo"
    after_first = run_pbt(digits, directory, cycles=1)
    completed = run_pbt(digits, directory, start_cycle=1, state=after_first)
    files = {path: path.read_bytes() for path in (directory / "members").rglob("*.ckpt")}
    journals = {path: path.read_text() for path in (directory / "journals").rglob("*.jsonl")}
    # as if the run had died during cycle 1 after writing its files: cycle 1 again from the same state
    redone = run_pbt(digits, directory, start_cycle=1, state=after_first)
    assert all(path.read_bytes() == content for path, content in files.items())  # nothing overwritten
    assert all(path.read_text() == text for path, text in journals.items())  # no evaluation repeated
    assert redone["history"][1]["paths"] == [str(directory / "members" / "cycle_1" / f"member_{m}.1.ckpt")
                                             for m in range(2)]
    for key in ("accuracies", "sizes", "fitness", "exploits", "search"):
        assert redone["history"][1][key] == completed["history"][1][key]


def test_a_base_with_masks_is_only_pruned_further(digits, tmp_path):
    base = base_module()
    genotype = MaskGenotype()
    genotype.bind(base)
    name = next(iter(genotype.layer_slices))
    weight = base.model.get_parameter(name)
    kept = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    base.set_mask(name, kept)
    train, selection = digits
    records = []
    PBTCycles(cycles=1, members=1, prune_generations=1).run(
        base, MaskGenotype(), AccuracyAtSparsity(0.5), lambda: GeneticSearch(population=4, elite=1),
        PopulationEvaluator(method="full"), LocalEngine(), train, selection, tmp_path / "run",
        np.random.default_rng(0), on_cycle=records.append)
    mask = read(records[0]["paths"][0])["growprune"]["masks"][name]
    assert not (mask & ~kept.bool()).any()
    assert 0 < int(mask.sum()) < int(kept.sum())
    assert torch.equal(base.masks[name], kept)  # the base is not modified
