"""Control tasks of ``growprune qd``: policies, lockstep rollouts, behaviour measures, the pruning emitter."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch

gymnasium = pytest.importorskip("gymnasium")
ribs = pytest.importorskip("ribs")

from growprune.qd.control import ControlTask, MissingExtraError  # noqa: E402
from growprune.qd.policies import LOG_RATE_BOUNDS, BatchedPolicy, PolicyLayout, policy_module  # noqa: E402
from growprune.qd.weight_emitter import PruningMutationEmitter  # noqa: E402

LINEAGE = {"depth": ((), np.int32), "root_objective": ((), np.float32), "parent_objective": ((), np.float32)}


def reference_lunar_lander(weights: np.ndarray, seed: int, max_steps: int = 1000) -> tuple[float, float, float, bool]:
    """One plain episode of ``argmax(W s)`` with the registered TimeLimit wrapper: (return,
    impact_x, impact_y_velocity, whether a leg touched) as pyribs' tutorial describes them."""
    env = gymnasium.make("LunarLander-v3", max_episode_steps=max_steps)
    obs, _ = env.reset(seed=seed)
    total, impact, y_velocities, done = 0.0, None, [], False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(int(np.argmax(weights @ obs)))
        total += reward
        y_velocities.append(obs[3])
        if impact is None and (obs[6] or obs[7]):
            impact = (obs[0], obs[3])
        done = terminated or truncated
    env.close()
    touched = impact is not None
    if impact is None:
        impact = (obs[0], min(y_velocities))
    return total, float(impact[0]), float(impact[1]), touched


def lunar_solutions() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([np.zeros((1, 32)), rng.normal(size=(9, 32))]).astype(np.float32)


def test_layout_round_trip_and_module_matches_batched_forward():
    layout = PolicyLayout(obs_dim=5, act_dim=3, hidden=(4, 6), bias=True, rate_gene=True)
    assert layout.solution_dim == 4 * 5 + 6 * 4 + 3 * 6 + (4 + 6 + 3) + 1 == 76
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=shape).astype(np.float32) for shape in layout.layer_shapes]
    biases = [rng.normal(size=out).astype(np.float32) for out, _ in layout.layer_shapes]
    solution = layout.encode(weights, biases, log_rate=-2.5)
    assert solution[0] == weights[0][0, 0] and solution[1] == weights[0][0, 1]  # row-major [out, in]
    assert solution[20] == weights[1][0, 0] and solution[-1] == np.float32(-2.5)
    decoded_w, decoded_b, log_rates = layout.decode(solution)
    for a, b in zip(decoded_w, weights):
        np.testing.assert_array_equal(a[0], b)
    for a, b in zip(decoded_b, biases):
        np.testing.assert_array_equal(a[0], b)
    assert log_rates[0] == np.float32(-2.5)
    assert PolicyLayout.from_dict(layout.to_dict()) == layout
    assert layout.weight_genes().sum() == layout.num_weights

    module = policy_module(layout, solution, "tanh")
    obs = rng.normal(size=(7, 5)).astype(np.float32)
    batched = BatchedPolicy(layout, np.repeat(solution[None], 7, axis=0), "tanh").forward(obs)
    np.testing.assert_allclose(module(torch.from_numpy(obs)).detach().numpy(), batched, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \[n, 76\]"):
        layout.decode(np.zeros((2, 75)))
    with pytest.raises(ValueError, match="biases must be given"):
        layout.encode(weights, None, log_rate=-2.0)


def test_evaluation_is_independent_of_batch_composition():
    task = ControlTask()
    task.bind(seed=0)
    solutions = lunar_solutions()
    together = task.evaluate(solutions, ["impact_x", "impact_y_velocity"])
    order = [7, 2, 9, 0]
    apart = task.evaluate(solutions[order], ["impact_x", "impact_y_velocity"])
    alone = [task.evaluate(solutions[i : i + 1], ["impact_x"])[0] for i in (9, 3)]
    for i, evaluation in zip(order, apart):
        assert evaluation.objective == together[i].objective
        assert evaluation.measures == together[i].measures
    for i, evaluation in zip((9, 3), alone):
        assert evaluation.objective == together[i].objective
        assert evaluation.measures["impact_y_velocity"] == together[i].measures["impact_y_velocity"]


@pytest.mark.parametrize("max_steps", [1000, 30])
def test_lunar_lander_measures_match_a_plain_episode(max_steps):
    task = ControlTask(max_episode_steps=max_steps)
    solutions = lunar_solutions()
    evaluations = task.evaluate(solutions, ["impact_x", "impact_y_velocity"])
    touched = []
    for solution, evaluation in zip(solutions, evaluations):
        total, impact_x, impact_y, touch = reference_lunar_lander(solution.reshape(4, 8), seed=52, max_steps=max_steps)
        touched.append(touch)
        assert evaluation.objective == pytest.approx(total, rel=1e-9, abs=1e-9)
        assert evaluation.measures["impact_x"] == pytest.approx(impact_x, abs=1e-7)
        assert evaluation.measures["impact_y_velocity"] == pytest.approx(impact_y, abs=1e-7)
        assert evaluation.info["episode_length"] <= max_steps
    if max_steps == 1000:  # both branches: first contact, and none (flew off screen)
        assert any(touched) and not all(touched)
    else:  # truncated before touching down
        assert not any(touched) and all(e.info["episode_length"] == 30 for e in evaluations)


def test_several_episode_seeds_average():
    solutions = lunar_solutions()[:3]
    both = ControlTask(episode_seeds=(52, 7)).evaluate(solutions, ["impact_x"])
    first = ControlTask(episode_seeds=(52,)).evaluate(solutions, ["impact_x"])
    second = ControlTask(episode_seeds=(7,)).evaluate(solutions, ["impact_x"])
    for b, f, s in zip(both, first, second):
        assert b.objective == pytest.approx((f.objective + s.objective) / 2)
        assert b.measures["impact_x"] == pytest.approx((f.measures["impact_x"] + s.measures["impact_x"]) / 2)
        assert b.info["return_min"] == pytest.approx(min(f.objective, s.objective))


def test_bipedal_walker_contacts_match_a_plain_episode():
    task = ControlTask("BipedalWalker-v3", hidden=(6,), bias=True, max_episode_steps=60, init_std=0.7)
    solutions = task.initial_solutions(2, np.random.default_rng(3))
    evaluations = task.evaluate(solutions, ["leg0_contact", "leg1_contact", "distance"])
    for solution, evaluation in zip(solutions, evaluations):
        module = task.network(solution)
        env = gymnasium.make("BipedalWalker-v3", max_episode_steps=60)
        obs, _ = env.reset(seed=52)
        start = env.unwrapped.hull.position[0]
        total, contacts, steps, done = 0.0, np.zeros(2), 0, False
        while not done:
            with torch.no_grad():
                action = np.tanh(module(torch.from_numpy(obs[None])).numpy()[0])
            obs, reward, terminated, truncated, _ = env.step(action)
            total, steps = total + reward, steps + 1
            contacts += [obs[8] > 0.5, obs[13] > 0.5]
            done = terminated or truncated
        assert evaluation.objective == pytest.approx(total, rel=1e-4, abs=1e-3)
        assert evaluation.measures["leg0_contact"] == pytest.approx(contacts[0] / steps)
        assert evaluation.measures["leg1_contact"] == pytest.approx(contacts[1] / steps)
        assert math.copysign(1, evaluation.measures["distance"]) == math.copysign(1, env.unwrapped.hull.position[0] - start)
        assert 0 <= evaluation.measures["leg0_contact"] <= 1


def test_density_and_graph_descriptors_follow_the_zero_weights():
    graph = pytest.importorskip("growprune.graph")
    task = ControlTask(hidden=(5,), evolve_pruning=True, init_std=1.0, initial_prune_rate=0.8, max_episode_steps=20)
    solution = task.initial_solutions(1, np.random.default_rng(4))[0]
    zeros = int((solution[: task.layout.num_weights] == 0).sum())
    evaluation = task.evaluate(solution[None], ["density", "num_edges", "prune_rate"])[0]
    assert evaluation.measures["density"] == pytest.approx(1 - zeros / task.layout.num_weights)
    assert evaluation.measures["num_edges"] == task.layout.num_weights - zeros
    assert evaluation.measures["prune_rate"] == pytest.approx(10**task.initial_log_rate)
    unit_graph = task.graph(solution)
    assert len(unit_graph.sources) == task.layout.num_weights - zeros
    assert graph.graph_measures(unit_graph, ["num_units"])["num_units"] == 8 + 5 + 4


def test_unknown_env_descriptor_and_missing_extra_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown control env 'Pong-v5'; supported: LunarLander-v3, .*BipedalWalker-v3"):
        ControlTask("Pong-v5")
    with pytest.raises(ValueError, match=r"unknown descriptor 'speed' .*valid: impact_x, impact_y_velocity"):
        ControlTask().evaluate(np.zeros((1, 32), np.float32), ["speed"])

    # a linear policy has no hidden layer: information descriptors are not offered (they would be NaN)
    assert "mi_label" not in ControlTask().descriptor_names()
    assert "mi_label" in ControlTask(hidden=[4]).descriptor_names()

    real_import = builtins.__import__

    def no_gymnasium(name, *args, **kwargs):
        if name.split(".")[0] == "gymnasium":
            raise ImportError("No module named 'gymnasium'", name="gymnasium")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gymnasium)
    with pytest.raises(MissingExtraError, match=r"pip install 'growprune\[control\]'") as error:
        ControlTask()
    assert isinstance(error.value, ImportError) and isinstance(error.value, ValueError)


def test_initial_solutions_respect_init_std_pruning_and_rate_gene():
    task = ControlTask(hidden=(4,), bias=True, evolve_pruning=True, init_std=0.0)
    zeros = task.initial_solutions(3, np.random.default_rng(0))
    assert zeros.dtype == np.float32 and not zeros[:, :-1].any() and (zeros[:, -1] == np.float32(-2.0)).all()
    task = ControlTask(hidden=(4,), evolve_pruning=True, init_std=1.0, initial_prune_rate=0.5, initial_log_rate=-3)
    solutions = task.initial_solutions(200, np.random.default_rng(0))
    zero_fractions = (solutions[:, : task.layout.num_weights] == 0).mean(axis=1)
    assert 0.22 < zero_fractions.mean() < 0.28  # per-solution fractions ~ U(0, 0.5)
    assert zero_fractions.min() < 0.05 and 0.45 < zero_fractions.max() < 0.6
    assert (solutions[:, -1] == np.float32(-3.0)).all()
    with pytest.raises(ValueError, match="initial_log_rate must be in"):
        ControlTask(evolve_pruning=True, initial_log_rate=-0.5)


def _archive_with(task: ControlTask, solutions: np.ndarray, objectives, depths) -> "ribs.archives.GridArchive":
    archive = ribs.archives.GridArchive(
        solution_dim=task.solution_dim, dims=[4], ranges=[(0, 4)], seed=5, dtype=np.float32, extra_fields=LINEAGE
    )
    archive.add(
        solutions,
        objectives,
        np.arange(len(solutions))[:, None] + 0.5,
        depth=depths,
        root_objective=np.full(len(solutions), -7.0),
        parent_objective=np.full(len(solutions), np.nan),
    )
    return archive


def test_pruning_emitter_keeps_pruned_weights_and_prunes_at_the_childs_rate():
    task = ControlTask(hidden=(16,), bias=True, evolve_pruning=True, init_std=1.0)
    parent = task.initial_solutions(1, np.random.default_rng(1))
    parent[0, : task.layout.num_weights : 2] = 0.0  # half of the weights pruned
    parent[0, -1] = -1.0  # rate 0.1
    archive = _archive_with(task, parent, [3.0], [4])
    emitter = PruningMutationEmitter(archive, task=task, batch_size=400, sigma=0.05, rate_sigma=0.0, seed=2)
    children = emitter.ask()
    weights = task.layout.num_weights
    pruned = parent[0, :weights] == 0
    assert children.shape == (400, task.solution_dim) and children.dtype == np.float32
    assert not children[:, :weights][:, pruned].any()  # pruned stay pruned
    survivors = children[:, :weights][:, ~pruned]
    assert abs((survivors == 0).mean() - 0.1) < 0.01  # each survivor pruned with the rate 10 ** -1
    kept = survivors != 0
    moved = np.abs(survivors - parent[0, :weights][~pruned])[kept]
    assert 0.03 < moved.mean() < 0.05  # sigma 0.05: mean |N(0, 0.05)| = 0.04
    assert not np.array_equal(children[0, weights:-1], parent[0, weights:-1])  # biases perturbed
    assert (children[:, -1] == -1.0).all()
    np.testing.assert_array_equal(emitter.last_lineage["depth"], np.full(400, 5))
    np.testing.assert_array_equal(emitter.last_lineage["parent_objective"], np.full(400, 3.0))
    np.testing.assert_array_equal(emitter.last_lineage["root_objective"], np.full(400, -7.0))

    regrow = PruningMutationEmitter(archive, task=task, batch_size=5, rate_sigma=0.0, regrow_probability=1.0, seed=2)
    assert (regrow.ask()[:, :weights][:, pruned] != 0).all()


def test_pruning_rate_gene_self_adapts_within_bounds():
    task = ControlTask(hidden=(8,), evolve_pruning=True, init_std=1.0)
    parents = task.initial_solutions(2, np.random.default_rng(1))
    parents[0, -1], parents[1, -1] = -3.9, -1.05
    archive = _archive_with(task, parents, [1.0, 2.0], [0, 0])
    emitter = PruningMutationEmitter(archive, task=task, batch_size=2000, rate_sigma=0.3, seed=0)
    children = emitter.ask()
    genes = children[:, -1].astype(np.float64)
    assert genes.min() >= LOG_RATE_BOUNDS[0] - 1e-6 and genes.max() <= LOG_RATE_BOUNDS[1] + 1e-6
    from_low = emitter.last_lineage["parent_objective"] == 1.0
    assert 0 < from_low.sum() < 2000
    # inherited: children stay near their own parent's gene, and the clip bounds are hit
    assert np.median(genes[from_low]) < -3.5 and np.median(genes[~from_low]) > -1.5
    assert np.isclose(genes, LOG_RATE_BOUNDS[0]).any() and np.isclose(genes, LOG_RATE_BOUNDS[1]).any()
    interior = genes[~from_low][(genes[~from_low] < -1.2)]
    assert interior.size > 100
    with pytest.raises(ValueError, match="log_rate_bounds must satisfy -4.0 <= low <= high <= -1.0"):
        PruningMutationEmitter(archive, task=task, log_rate_bounds=(-5.0, -1.0))
    with pytest.raises(ValueError, match="regrow_probability must be in"):
        PruningMutationEmitter(archive, task=task, regrow_probability=1.5)


def test_emitter_starts_from_initial_solutions_and_a_saved_elite_replays(tmp_path):
    task = ControlTask(hidden=(4,), bias=True, evolve_pruning=True, init_std=0.5, max_episode_steps=200)
    task.bind(seed=0)
    archive = ribs.archives.GridArchive(
        solution_dim=task.solution_dim, dims=[5, 5], ranges=[(-1, 1), (-3, 0)], seed=1, dtype=np.float32,
        extra_fields=LINEAGE, qd_score_offset=-600,
    )
    emitter = PruningMutationEmitter(archive, task=task, batch_size=10, seed=3)
    for _ in range(3):
        solutions = emitter.ask()
        lineage = emitter.last_lineage
        evaluations = task.evaluate(solutions, ["impact_x", "impact_y_velocity"])
        objectives = np.array([e.objective for e in evaluations])
        roots = np.where(lineage["depth"] == 0, objectives, lineage["root_objective"])
        archive.add(
            solutions, objectives,
            [[e.measures["impact_x"], e.measures["impact_y_velocity"]] for e in evaluations],
            depth=lineage["depth"], root_objective=roots, parent_objective=lineage["parent_objective"],
        )
    assert archive.stats.num_elites > 0
    best = archive.best_elite
    path = task.save_elite(best["solution"], tmp_path / "best.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["env"] == "LunarLander-v3" and payload["objective"] == pytest.approx(best["objective"], rel=1e-6)
    assert set(payload["measures"]) >= {"impact_x", "impact_y_velocity", "density", "prune_rate"}
    reloaded, solution = ControlTask.from_elite(path)
    np.testing.assert_array_equal(solution, best["solution"])
    returns = reloaded.replay(path)
    assert returns.shape == (1,) and returns[0] == pytest.approx(best["objective"], rel=1e-6)
    module = torch.nn.Sequential(
        torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)
    )
    module.load_state_dict(payload["state_dict"])
    with pytest.raises(ValueError, match="is for LunarLander-v3 with layout"):
        ControlTask(hidden=(3,)).replay(path)


def test_information_descriptors_use_the_observations_seen_and_the_actions():
    information = pytest.importorskip("growprune.information")
    task = ControlTask(hidden=(6,), init_std=0.8, max_episode_steps=150)
    solution = task.initial_solutions(1, np.random.default_rng(2))[0]
    evaluation = task.evaluate(solution[None], ["mi_label", "mi_consecutive"])[0]
    module = task.network(solution)
    env = gymnasium.make("LunarLander-v3", max_episode_steps=150)
    obs, _ = env.reset(seed=52)
    hidden, outputs, actions, done = [], [], [], False
    while not done:
        with torch.no_grad():
            h = module[1](module[0](torch.from_numpy(obs[None])))
            out = module[2](h)
        action = int(out.argmax())
        hidden.append(h.numpy()[0])
        outputs.append(out.numpy()[0])
        actions.append(action)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    expected_label = information.mutual_information(np.array(hidden), np.array(actions), bins=30)
    expected_next = information.mutual_information(np.array(hidden), np.array(outputs), bins=30)
    assert evaluation.measures["mi_label"] == pytest.approx(expected_label, rel=1e-6)
    assert evaluation.measures["mi_consecutive"] == pytest.approx(expected_next, rel=1e-6)
    # a linear policy has no hidden layer: the descriptor is refused, not a made-up number
    with pytest.raises(ValueError, match="unknown descriptor 'mi_label' for ControlTask"):
        ControlTask().evaluate(np.ones((1, 32), np.float32), ["mi_label"])


def test_pruning_emitter_refuses_tasks_it_cannot_evolve():
    from ribs.archives import GridArchive

    task = ControlTask(hidden=[4], evolve_pruning=True)  # init_std 0: every weight starts at zero
    task.bind(0)
    archive = GridArchive(solution_dim=task.solution_dim, dims=[4], ranges=[(0.0, 1.0)])
    with pytest.raises(ValueError, match="init_std 0 .*stays there"):
        PruningMutationEmitter(archive, task=task)
    PruningMutationEmitter(archive, task=task, regrow_probability=0.1)  # regrowth can revive weights
    with pytest.raises(ValueError, match="ControlTask, not a object"):
        PruningMutationEmitter(archive, task=object())
