"""pyribs' LunarLander recipe as a plain script vs the same setting through ``growprune qd``.

    python -m benchmarks.qd_lunar_lander                         # both, 300 iterations (needs a quiet machine)
    python -m benchmarks.qd_lunar_lander --iterations 20         # a quick check of both
    python -m benchmarks.qd_lunar_lander --only plain --iterations 20
    python -m benchmarks.qd_lunar_lander --rollouts              # episodes/s and descriptor costs

The setting (both runs): a linear policy ``argmax(W s)`` (4 x 8 weights, no bias, x0 = zeros), one
LunarLander-v3 episode per solution with env seed 52, a 50 x 50 ``GridArchive`` over the impact
x-position [-1, 1] and impact y-velocity [-3, 0] (x and y-velocity at the first step a leg touches
the ground, else the last x and the lowest y-velocity), ``qd_score_offset`` -600, 5
``EvolutionStrategyEmitter`` (CMA-ES, sigma0 1.0, ranker ``2imp``, 30 solutions each), a
``Scheduler``, 150 evaluations per iteration on 2 processes.

* ``plain``: the recipe written directly on pyribs + gymnasium, each batch evaluated with a
  2-process ``multiprocessing.Pool`` (one fresh env per episode, as a simple script would do);
* ``growprune``: ``growprune qd -c configs/qd/lunar_lander_tutorial.yaml --iterations N`` as a
  subprocess (local engine, 2 workers, 2 chunks), timing the whole command (start-up, run dir,
  checkpoints, heatmap and the saved elite included).

Rows (wall time, evaluations/s, coverage, best return, QD score) are appended to
``benchmarks/results/qd_lunar_lander.csv`` for the full 300 iterations and to
``qd_lunar_lander_quick.csv`` otherwise (``--out`` to choose).

``--rollouts`` measures instead (rows to ``qd_lunar_lander_rollouts.csv``): episodes/s of
:func:`growprune.qd.control.rollout` (all policies in lockstep, one batched forward per step) vs
one episode at a time (one env reused, numpy ``W @ s`` per step) vs ``gymnasium.vector.SyncVectorEnv``
(all copies stepped until the last episode ends) for 150 random linear policies; the batched
forward with numpy vs torch; per-evaluation cost of the graph descriptors on 8-16-16-4 netsci
policies (initial solutions, pruned at U(0, 0.9)).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import records

ENV_ID = "LunarLander-v3"
ENV_SEED = 52
CONFIG = records.REPO / "configs" / "qd" / "lunar_lander_tutorial.yaml"


# --- the plain recipe ----------------------------------------------------------------------------


def simulate(solution: np.ndarray) -> tuple[float, float, float]:
    """One episode of ``argmax(W s)``: (return, impact x, impact y-velocity)."""
    import gymnasium

    env = gymnasium.make(ENV_ID)
    weights = np.asarray(solution).reshape(4, 8)
    obs, _ = env.reset(seed=ENV_SEED)
    total, lowest_y_velocity, impact = 0.0, np.inf, None
    done = False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(int(np.argmax(weights @ obs)))
        total += float(reward)
        lowest_y_velocity = min(lowest_y_velocity, float(obs[3]))
        if impact is None and (obs[6] > 0.5 or obs[7] > 0.5):
            impact = (float(obs[0]), float(obs[3]))
        done = terminated or truncated
    env.close()
    if impact is None:
        impact = (float(obs[0]), lowest_y_velocity)
    return total, impact[0], impact[1]


def run_plain(iterations: int, seed: int) -> dict[str, Any]:
    """The recipe on pyribs directly; the pool's start-up is included in the wall time."""
    from ribs.archives import GridArchive
    from ribs.emitters import EvolutionStrategyEmitter
    from ribs.schedulers import Scheduler

    started = time.perf_counter()
    archive = GridArchive(solution_dim=32, dims=[50, 50], ranges=[(-1.0, 1.0), (-3.0, 0.0)],
                          qd_score_offset=-600, seed=seed)
    emitters = [EvolutionStrategyEmitter(archive, x0=np.zeros(32), sigma0=1.0, ranker="2imp", batch_size=30,
                                         seed=seed + 1 + index) for index in range(5)]
    scheduler = Scheduler(archive, emitters)
    evaluations = 0
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for _ in range(iterations):
            solutions = scheduler.ask()
            results = np.array(pool.map(simulate, list(solutions), chunksize=max(1, len(solutions) // 8)))
            scheduler.tell(results[:, 0], results[:, 1:])
            evaluations += len(solutions)
    wall = time.perf_counter() - started
    stats = archive.stats
    return {"method": "plain-pyribs-pool2", "iterations": iterations, "evaluations": evaluations,
            "wall_seconds": round(wall, 2), "evaluations_per_second": round(evaluations / wall, 1),
            "coverage": round(float(stats.coverage), 4), "best_return": round(float(stats.obj_max), 2),
            "qd_score": round(float(stats.qd_score), 1)}


# --- growprune qd --------------------------------------------------------------------------------


def run_growprune(iterations: int, seed: int) -> dict[str, Any]:
    """``growprune qd -c configs/qd/lunar_lander_tutorial.yaml`` as a subprocess, timed whole."""
    with tempfile.TemporaryDirectory(prefix="qd_lunar_") as root:
        command = [sys.executable, "-m", "growprune.cli", "qd", "-c", str(CONFIG), "--iterations", str(iterations),
                   "--seed", str(seed), "--root", root, "--wandb.mode", "disabled"]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, cwd=records.REPO,
                                   env={**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"})
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise SystemExit(f"growprune qd failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
        log = next(Path(root).glob("*/version_*/iterations.csv"))
        with log.open() as handle:
            last = list(csv.DictReader(handle))[-1]
    evaluations = int(last["evaluations"])
    return {"method": "growprune-qd-local2", "iterations": iterations, "evaluations": evaluations,
            "wall_seconds": round(wall, 2), "evaluations_per_second": round(evaluations / wall, 1),
            "coverage": round(float(last["coverage"]), 4), "best_return": round(float(last["objective_max"]), 2),
            "qd_score": round(float(last["qd_score"]), 1), "loop_seconds": round(float(last["wall_time"]), 2)}


# --- rollout speed and descriptor cost ------------------------------------------------------------


def measure_rollouts(policies: int, repeats: int) -> list[dict[str, Any]]:
    """Episodes/s of lockstep vs one-at-a-time rollouts; graph descriptor cost per evaluation."""
    import gymnasium

    from growprune.qd.control import ControlTask, rollout

    rng = np.random.default_rng(0)
    task = ControlTask()
    task.bind(0)
    solutions = rng.normal(size=(policies, 32)).astype(np.float32)
    rows = []

    def one_at_a_time() -> list[float]:
        env = gymnasium.make(ENV_ID).unwrapped
        returns = []
        for solution in solutions:
            weights = solution.reshape(4, 8)
            obs, _ = env.reset(seed=ENV_SEED)
            total, steps = 0.0, 0
            while True:
                obs, reward, terminated, _, _ = env.step(int(np.argmax(weights @ obs)))
                total, steps = total + float(reward), steps + 1
                if terminated or steps >= 1000:
                    break
            returns.append(total)
        return returns

    def sync_vector_env() -> list[float]:
        # every copy is stepped until the last episode ends; finished ones are ignored
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        envs = SyncVectorEnv([lambda: gymnasium.make(ENV_ID) for _ in range(policies)],
                             autoreset_mode=AutoresetMode.SAME_STEP)
        weights = solutions.reshape(policies, 4, 8)
        obs, _ = envs.reset(seed=[ENV_SEED] * policies)
        done, totals = np.zeros(policies, bool), np.zeros(policies)
        while not done.all():
            actions = np.argmax(np.matmul(weights, obs[:, :, None])[:, :, 0], axis=1)
            obs, reward, terminated, truncated, _ = envs.step(actions)
            totals += np.where(done, 0.0, reward)
            done |= terminated | truncated
        envs.close()
        return list(totals)

    policy = task.policies(solutions)
    reference = None
    for name, function in (("one-at-a-time", one_at_a_time), ("sync-vector-env", sync_vector_env),
                           ("lockstep", lambda: list(rollout(ENV_ID, policy, (ENV_SEED,), 1000).returns[:, 0]))):
        function()  # warm: env creation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            returns = function()
            times.append(time.perf_counter() - start)
        reference = returns if reference is None else reference
        assert np.allclose(returns, reference), "lockstep and one-at-a-time returns differ"
        best = min(times)
        rows.append({"measure": f"episodes_per_second/{name}", "policies": policies, "value": round(policies / best, 1),
                     "seconds": round(best, 3), "repeats": repeats})

    rows += measure_forward(rng)
    netsci = ControlTask(hidden=(16, 16), bias=True, evolve_pruning=True, init_std=0.5, initial_prune_rate=0.9)
    netsci.bind(0)
    from growprune.graph import graph_measures

    mlp = netsci.initial_solutions(policies, rng)
    for names in (["modularity"], ["assortativity"], ["modularity", "assortativity"], ["bipartite_clustering"],
                  ["mean_path_length", "connectivity", "dead_fraction"]):
        start = time.perf_counter()
        for solution in mlp:  # uncached: the task's per-process cache would hide the cost
            graph_measures(netsci.graph(solution), names, seed=0)
        seconds = (time.perf_counter() - start) / policies
        rows.append({"measure": f"graph_ms_per_evaluation/{'+'.join(names)}", "policies": policies,
                     "value": round(seconds * 1e3, 3), "seconds": round(seconds * policies, 3), "repeats": 1})
    start = time.perf_counter()
    netsci.evaluate(mlp, ["impact_x"])
    episode = (time.perf_counter() - start) / policies
    rows.append({"measure": "episode_ms_per_evaluation/netsci_initial_policies", "policies": policies,
                 "value": round(episode * 1e3, 3), "seconds": round(episode * policies, 3), "repeats": 1})
    return rows


def measure_forward(rng: np.random.Generator, calls: int = 2000) -> list[dict[str, Any]]:
    """Microseconds per batched policy forward: numpy ``matmul`` vs ``torch.bmm`` (one thread)."""
    import torch

    torch.set_num_threads(1)
    rows = []
    for count in (75, 150):
        for label, shapes in (("linear-4x8", [(4, 8)]), ("mlp-8-16-16-4", [(16, 8), (16, 16), (4, 16)])):
            weights = [rng.normal(size=(count, out, inp)).astype(np.float32) for out, inp in shapes]
            obs = rng.normal(size=(count, 8)).astype(np.float32)
            tensors, obs_tensor = [torch.from_numpy(w) for w in weights], torch.from_numpy(obs)

            def with_numpy() -> np.ndarray:
                h = obs
                for k, w in enumerate(weights):
                    h = np.matmul(w, h[:, :, None])[:, :, 0]
                    h = np.tanh(h) if k < len(weights) - 1 else h
                return h

            def with_torch() -> np.ndarray:
                with torch.no_grad():
                    h = obs_tensor
                    for k, w in enumerate(tensors):
                        h = torch.bmm(w, h.unsqueeze(-1)).squeeze(-1)
                        h = torch.tanh(h) if k < len(tensors) - 1 else h
                    return h.numpy()

            for name, function in (("numpy-matmul", with_numpy), ("torch-bmm", with_torch)):
                function()
                start = time.perf_counter()
                for _ in range(calls):
                    function()
                seconds = (time.perf_counter() - start) / calls
                rows.append({"measure": f"forward_us/{label}/{name}", "policies": count,
                             "value": round(seconds * 1e6, 2), "seconds": round(seconds * calls, 3), "repeats": 1})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300, help="MAP-Elites iterations of each run")
    parser.add_argument("--only", choices=("plain", "growprune"), default=None, help="run one of the two")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollouts", action="store_true", help="measure rollout speed and descriptor cost instead")
    parser.add_argument("--policies", type=int, default=150, help="--rollouts: policies per batch")
    parser.add_argument("--repeats", type=int, default=3, help="--rollouts: timing repeats (the best counts)")
    parser.add_argument("--out", type=Path, default=None, help="CSV to append to (default: see the module doc)")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = records.run_info()
    if args.rollouts:
        rows = [{**row, **info} for row in measure_rollouts(args.policies, args.repeats)]
        default = records.results_path("qd_lunar_lander_rollouts")
    else:
        runs = [name for name in ("plain", "growprune") if args.only in (None, name)]
        rows = []
        for name in runs:
            row = run_plain(args.iterations, args.seed) if name == "plain" else run_growprune(args.iterations, args.seed)
            row.setdefault("loop_seconds", "")
            rows.append({**row, "seed": args.seed, **info})
            print(", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
        default = records.results_path("qd_lunar_lander" if args.iterations == 300 else "qd_lunar_lander_quick")
    for row in rows if args.rollouts else []:
        print(f"{row['measure']}: {row['value']}", flush=True)
    print(records.save_rows(args.out or default, rows))


if __name__ == "__main__":
    main()
