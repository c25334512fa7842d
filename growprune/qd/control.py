"""Control tasks for ``growprune qd``: MLP policies evolved without gradients on gymnasium Box2D envs.

A solution is a policy's flat parameter vector (layout in :mod:`growprune.qd.policies`). The
objective is the mean episode return over ``episode_seeds``; the measures are behaviour measures
of the episodes (per env, :data:`BEHAVIOUR_MEASURES`) and structural ones of the pruned policy
(density, graph measures of the unit graph of its nonzero weights, information measures).

Rollouts of many policies run in lockstep: one env per (policy, episode seed), one batched
forward for all live policies per step, and only the live envs are stepped (episodes end at
different times). A plain list of envs is used rather than ``gymnasium.vector.SyncVectorEnv``:
the vector env steps every copy until the last episode ends (and resets finished ones), which
measured 3x slower here for 150 LunarLander policies whose episodes last 60 to 1,000 steps.

Every episode starts with ``env.reset(seed=episode_seed)`` and the policy is deterministic, so an
evaluation depends only on the solution, never on the batch it is in.

Behaviour measures (the mean over episode seeds):

- ``LunarLander-v3`` / ``LunarLanderContinuous-v3`` (as in pyribs' LunarLander tutorial):
  ``impact_x``: the x-position at the first step a leg touches the ground (else the last
  x-position); ``impact_y_velocity``: the y-velocity at that step (else the lowest y-velocity of
  the episode). Both in the env's observation units (x about [-1, 1], y-velocity about [-3, 0]).
- ``BipedalWalker-v3`` / ``BipedalWalkerHardcore-v3``: ``leg0_contact`` and ``leg1_contact``: the
  fraction of steps each leg touches the ground (observation entries 8 and 13), in [0, 1];
  ``distance``: the hull's x displacement as a fraction of the course (start to the finish line
  the env checks), about [-0.1, 1].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from growprune.errors import ConfigurationError
from growprune.qd.policies import (
    LOG_RATE_BOUNDS,
    BatchedPolicy,
    PolicyLayout,
    check_activation,
    density,
    policy_graph,
    policy_module,
)
from growprune.qd.tasks import Evaluation, QDTask, common_descriptor_names, graph_descriptor_names, split_measures

CONTROL_EXTRA = "pip install 'growprune[control]'"


class MissingExtraError(ConfigurationError, ImportError):
    """An optional dependency is not installed; the message names the extra to install.

    Both a :class:`~growprune.errors.ConfigurationError` (the command line prints it as one line)
    and an ``ImportError``.
    """


def require_gymnasium() -> Any:
    """Imports gymnasium with its Box2D environments.

    Returns:
        the ``gymnasium`` module.

    Raises:
        MissingExtraError: gymnasium or Box2D is missing (names ``pip install 'growprune[control]'``).
    """
    try:
        import gymnasium
        import Box2D  # noqa: F401  (the envs import it only when made)
    except ImportError as error:
        raise MissingExtraError(
            f"control tasks need gymnasium with Box2D ({error.name or error}): {CONTROL_EXTRA}"
        ) from None
    return gymnasium


# --- behaviour measures --------------------------------------------------------------------------


class _Tracker(ABC):
    """Follows one episode and reports its behaviour measures."""

    __slots__ = ()

    @abstractmethod
    def reset(self, obs: np.ndarray, env: Any) -> None:
        """Start following an episode at its first observation."""

    @abstractmethod
    def step(self, obs: np.ndarray, env: Any) -> None:
        """Take in the observation after one step."""

    @abstractmethod
    def result(self, env: Any) -> list[float]:
        """The behaviour measures of the episode, in the env's measure order."""


class _LunarLanderTracker(_Tracker):
    __slots__ = ("impact_x", "impact_y_velocity", "last_x", "min_y_velocity")

    def reset(self, obs: np.ndarray, env: Any) -> None:
        self.impact_x = self.impact_y_velocity = None
        self.last_x = float(obs[0])
        self.min_y_velocity = math.inf

    def step(self, obs: np.ndarray, env: Any) -> None:
        self.last_x = float(obs[0])
        y_velocity = float(obs[3])
        if y_velocity < self.min_y_velocity:
            self.min_y_velocity = y_velocity
        if self.impact_x is None and (obs[6] > 0.5 or obs[7] > 0.5):
            self.impact_x, self.impact_y_velocity = self.last_x, y_velocity

    def result(self, env: Any) -> list[float]:
        if self.impact_x is None:
            return [self.last_x, self.min_y_velocity]
        return [self.impact_x, self.impact_y_velocity]


class _BipedalTracker(_Tracker):
    __slots__ = ("contacts0", "contacts1", "steps", "start_x")

    def reset(self, obs: np.ndarray, env: Any) -> None:
        self.contacts0 = self.contacts1 = self.steps = 0
        self.start_x = float(env.hull.position[0])

    def step(self, obs: np.ndarray, env: Any) -> None:
        self.steps += 1
        self.contacts0 += obs[8] > 0.5
        self.contacts1 += obs[13] > 0.5

    def result(self, env: Any) -> list[float]:
        from gymnasium.envs.box2d import bipedal_walker as bw

        finish = (bw.TERRAIN_LENGTH - bw.TERRAIN_GRASS) * bw.TERRAIN_STEP
        steps = max(self.steps, 1)
        distance = (float(env.hull.position[0]) - self.start_x) / (finish - self.start_x)
        return [self.contacts0 / steps, self.contacts1 / steps, distance]


@dataclass(frozen=True)
class BehaviourSpec:
    """The behaviour measures of one env: their names and the tracker that computes them."""

    names: tuple[str, ...]
    tracker: Callable[[], _Tracker]


_LUNAR = BehaviourSpec(("impact_x", "impact_y_velocity"), _LunarLanderTracker)
_BIPEDAL = BehaviourSpec(("leg0_contact", "leg1_contact", "distance"), _BipedalTracker)

#: Supported env ids and their behaviour measures.
BEHAVIOUR_MEASURES: dict[str, BehaviourSpec] = {
    "LunarLander-v3": _LUNAR,
    "LunarLanderContinuous-v3": _LUNAR,
    "BipedalWalker-v3": _BIPEDAL,
    "BipedalWalkerHardcore-v3": _BIPEDAL,
}

INFORMATION_MEASURES = ("mi_label", "mi_consecutive", "mi_label_unit")


def check_env(env: str) -> str:
    """Returns ``env`` if it is a supported env id.

    Raises:
        ValueError: unknown env (the message lists the supported ones).
    """
    if env not in BEHAVIOUR_MEASURES:
        raise ValueError(f"unknown control env {env!r}; supported: {', '.join(BEHAVIOUR_MEASURES)}")
    return env


# --- rollouts ------------------------------------------------------------------------------------

# Envs are kept per process and id: making a Box2D env costs about 0.4 ms, and a worker evaluates
# a new chunk every iteration. reset(seed=...) rebuilds the world, so reuse cannot leak state.
_ENV_POOL: dict[str, list[Any]] = {}


def _envs(env_id: str, count: int) -> list[Any]:
    gymnasium = require_gymnasium()
    pool = _ENV_POOL.setdefault(env_id, [])
    while len(pool) < count:
        # The unwrapped env: the rollout counts steps itself (the TimeLimit) and the passive
        # checker's per-step checks cost time for nothing here.
        pool.append(gymnasium.make(env_id).unwrapped)
    return pool[:count]


@dataclass
class Rollouts:
    """What :func:`rollout` measured for ``P`` policies x ``S`` episode seeds.

    Attributes:
        returns: ``[P, S]`` episode returns.
        lengths: ``[P, S]`` episode lengths (steps).
        behaviour: ``[P, S, M]`` behaviour measures (names of the env's :class:`BehaviourSpec`).
        observations: with ``record``, per policy the ``[N, obs_dim]`` observations its policy
            acted on (episodes concatenated); else None.
        actions: with ``record``, per policy the actions taken (``[N]`` int or ``[N, act_dim]``).
    """

    returns: np.ndarray
    lengths: np.ndarray
    behaviour: np.ndarray
    observations: list[np.ndarray] | None = None
    actions: list[np.ndarray] | None = None


def rollout(
    env_id: str,
    policy: BatchedPolicy,
    episode_seeds: Sequence[int],
    max_episode_steps: int,
    record: bool = False,
) -> Rollouts:
    """Runs every policy of ``policy`` for one episode per seed, all in lockstep.

    Args:
        env_id: a key of :data:`BEHAVIOUR_MEASURES`.
        policy: the ``P`` policies.
        episode_seeds: ``env.reset(seed=...)`` of each episode.
        max_episode_steps: episodes are truncated after this many steps.
        record: keep the observations and actions (for information measures).

    Returns:
        :class:`Rollouts`.

    Raises:
        ValueError: unknown env.
        MissingExtraError: gymnasium/Box2D missing.
    """
    spec = BEHAVIOUR_MEASURES[check_env(env_id)]
    seeds = [int(seed) for seed in episode_seeds]
    count, num_seeds = len(policy), len(seeds)
    rows = count * num_seeds
    envs = _envs(env_id, rows)
    policy_of = np.repeat(np.arange(count), num_seeds)
    space = envs[0].action_space
    discrete = hasattr(space, "n")
    if not discrete:
        low, high = np.asarray(space.low, dtype=np.float32), np.asarray(space.high, dtype=np.float32)

    trackers = [spec.tracker() for _ in range(rows)]
    obs = np.empty((rows, policy.layout.obs_dim), dtype=np.float32)
    for row in range(rows):
        first, _ = envs[row].reset(seed=seeds[row % num_seeds])
        obs[row] = first
        trackers[row].reset(first, envs[row])
    returns = [0.0] * rows
    lengths = [0] * rows
    seen_obs: list[list[np.ndarray]] = [[] for _ in range(rows)] if record else []
    seen_act: list[list[Any]] = [[] for _ in range(rows)] if record else []

    live = list(range(rows))
    step = 0
    while live:
        step += 1
        index = np.asarray(live)
        outputs = policy.forward(obs[index], rows=policy_of[index])
        if discrete:
            actions = np.argmax(outputs, axis=1).tolist()
        else:
            actions = low + (np.tanh(outputs) + 1.0) * 0.5 * (high - low)
        still = []
        for j, row in enumerate(live):
            action = actions[j]
            if record:
                seen_obs[row].append(obs[row].copy())
                seen_act[row].append(action)
            new_obs, reward, terminated, _, _ = envs[row].step(action)
            obs[row] = new_obs
            returns[row] += float(reward)
            lengths[row] += 1
            trackers[row].step(new_obs, envs[row])
            if not terminated and step < max_episode_steps:
                still.append(row)
        live = still

    behaviour = np.array([trackers[row].result(envs[row]) for row in range(rows)], dtype=np.float64)
    result = Rollouts(
        returns=np.asarray(returns).reshape(count, num_seeds),
        lengths=np.asarray(lengths).reshape(count, num_seeds),
        behaviour=behaviour.reshape(count, num_seeds, len(spec.names)),
    )
    if record:
        result.observations, result.actions = [], []
        for p in range(count):
            episode_rows = range(p * num_seeds, (p + 1) * num_seeds)
            result.observations.append(np.concatenate([np.stack(seen_obs[r]) for r in episode_rows]))
            result.actions.append(np.concatenate([np.asarray(seen_act[r]) for r in episode_rows]))
    return result


# --- the task ------------------------------------------------------------------------------------

# Graph measures by (layout, names, seed, packed nonzero pattern); oldest entries go first.
_GRAPH_CACHE: dict[tuple[Any, ...], dict[str, float]] = {}
_GRAPH_CACHE_SIZE = 4096


class ControlTask(QDTask):
    """MAP-Elites over the weights of MLP policies on a gymnasium control env.

    Args:
        env: a supported env id (:data:`BEHAVIOUR_MEASURES`).
        hidden: hidden layer widths (empty: a linear policy ``W s``, as in pyribs' tutorial).
        bias: whether layers have biases.
        activation: hidden activation (``tanh``, ``relu``, ``identity``).
        episode_seeds: one episode per seed; the objective is their mean return.
        max_episode_steps: truncation (None: the env's registered limit).
        evolve_pruning: append the ``log10`` pruning-rate gene (for :class:`PruningMutationEmitter`).
        initial_prune_rate: largest fraction of weights pruned in :meth:`initial_solutions`
            (each initial solution draws its fraction uniformly from [0, initial_prune_rate]).
        init_std: standard deviation of the initial weights (0: all zeros, as pyribs' ``x0``;
            a pruning emitter needs > 0 because it never revives zero weights by default).
        initial_log_rate: the rate gene of initial solutions, within
            :data:`~growprune.qd.policies.LOG_RATE_BOUNDS`.
        mi_bins: bins of the information measures.
        mi_samples: at most this many observations (evenly spaced) per policy for them.

    Actions: discrete envs take the argmax of the policy outputs; continuous envs take
    ``low + (tanh(out) + 1) / 2 * (high - low)``.

    Information descriptors (:func:`growprune.information.information_from_activations`): the
    probe is the observations the policy acted on during its episodes, the labels its actions, the
    layers its hidden activations then its outputs; ``mi_label`` averages over hidden layers, so
    it is NaN for a linear policy (no hidden layer), as is ``mi_consecutive``.

    Raises:
        ValueError: unknown env or activation, bad sizes, seeds or rates.
        MissingExtraError: gymnasium/Box2D missing (names ``pip install 'growprune[control]'``).
    """

    def __init__(
        self,
        env: str = "LunarLander-v3",
        hidden: Sequence[int] = (),
        bias: bool = False,
        activation: str = "tanh",
        episode_seeds: Sequence[int] = (52,),
        max_episode_steps: int | None = None,
        evolve_pruning: bool = False,
        initial_prune_rate: float = 0.0,
        init_std: float = 0.0,
        initial_log_rate: float = -2.0,
        mi_bins: int = 30,
        mi_samples: int = 2000,
    ) -> None:
        check_env(env)
        check_activation(activation)
        hidden = tuple(int(width) for width in hidden)
        if any(width < 1 for width in hidden):
            raise ValueError(f"ControlTask hidden widths must be >= 1, got {list(hidden)}")
        seeds = tuple(int(seed) for seed in episode_seeds)
        if not seeds:
            raise ValueError("ControlTask episode_seeds must name at least one seed")
        if max_episode_steps is not None and int(max_episode_steps) < 1:
            raise ValueError(f"ControlTask max_episode_steps must be >= 1 or None, got {max_episode_steps!r}")
        if not 0.0 <= float(initial_prune_rate) < 1.0:
            raise ValueError(f"ControlTask initial_prune_rate must be in [0, 1), got {initial_prune_rate!r}")
        if float(init_std) < 0.0:
            raise ValueError(f"ControlTask init_std must be >= 0, got {init_std!r}")
        low, high = LOG_RATE_BOUNDS
        if not low <= float(initial_log_rate) <= high:
            raise ValueError(f"ControlTask initial_log_rate must be in [{low}, {high}], got {initial_log_rate!r}")
        if int(mi_bins) < 2 or int(mi_samples) < 2:
            raise ValueError(f"ControlTask mi_bins and mi_samples must be >= 2, got {mi_bins!r}, {mi_samples!r}")
        require_gymnasium()
        self.env = env
        self.hidden = hidden
        self.bias = bool(bias)
        self.activation = activation
        self.episode_seeds = seeds
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        self.evolve_pruning = bool(evolve_pruning)
        self.initial_prune_rate = float(initial_prune_rate)
        self.init_std = float(init_std)
        self.initial_log_rate = float(initial_log_rate)
        self.mi_bins = int(mi_bins)
        self.mi_samples = int(mi_samples)
        self.seed = 0
        self.run_dir: Path | None = None
        self._layout: PolicyLayout | None = None
        self._steps: int | None = None

    # -- specs --

    def _spec(self) -> None:
        if self._layout is not None:
            return
        gymnasium = require_gymnasium()
        env = gymnasium.make(self.env)
        try:
            obs_dim = int(np.prod(env.observation_space.shape))
            space = env.action_space
            act_dim = int(space.n) if hasattr(space, "n") else int(np.prod(space.shape))
            registered = env.spec.max_episode_steps if env.spec is not None else None
        finally:
            env.close()
        self._layout = PolicyLayout(obs_dim, act_dim, self.hidden, self.bias, self.evolve_pruning)
        self._steps = self.max_episode_steps or registered or 1000

    def bind(self, seed: int, run_dir: Path | None = None) -> None:
        """Reads the env's spaces (once) and keeps the run seed (the seed of graph measures)."""
        self.seed = int(seed)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._spec()

    @property
    def layout(self) -> PolicyLayout:
        """The solution layout (reads the env's spaces on first use)."""
        self._spec()
        assert self._layout is not None
        return self._layout

    @property
    def episode_steps(self) -> int:
        """Steps after which an episode is truncated."""
        self._spec()
        assert self._steps is not None
        return self._steps

    @property
    def solution_dim(self) -> int:
        """Length of a solution (see :class:`~growprune.qd.policies.PolicyLayout`)."""
        return self.layout.solution_dim

    @property
    def solution_dtype(self) -> np.dtype:
        """float32."""
        return np.dtype(np.float32)

    def behaviour_names(self) -> list[str]:
        """The env's behaviour measures."""
        return list(BEHAVIOUR_MEASURES[self.env].names)

    def descriptor_names(self) -> list[str]:
        """Behaviour measures, then the descriptors every task accepts (``density``, ``sparsity``,
        graph and information measures) and, with ``evolve_pruning``, ``prune_rate``."""
        names = [*self.behaviour_names(), *common_descriptor_names()]
        if not self.hidden:
            # a linear policy has no hidden layer: its information measures are undefined (NaN)
            names = [name for name in names if name not in INFORMATION_MEASURES]
        if self.evolve_pruning:
            names.append("prune_rate")
        return list(dict.fromkeys(names))

    # -- solutions --

    def initial_solutions(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` seeds: weights from N(0, init_std) (zeros when 0), each pruned with a
        probability drawn per solution from U(0, initial_prune_rate); zero biases; the rate gene
        ``initial_log_rate``.

        Returns:
            float32 ``[count, solution_dim]``.
        """
        layout = self.layout
        solutions = np.zeros((int(count), layout.solution_dim), dtype=np.float32)
        if self.init_std > 0:
            solutions[:, : layout.num_weights] = rng.normal(0.0, self.init_std, (count, layout.num_weights))
        if self.initial_prune_rate > 0:
            # each solution its own fraction: a spread of structures (all dense networks share one
            # unit graph, hence one cell of a graph-descriptor archive)
            fractions = rng.uniform(0.0, self.initial_prune_rate, (count, 1))
            pruned = rng.random((count, layout.num_weights)) < fractions
            solutions[:, : layout.num_weights][pruned] = 0.0
        if layout.rate_gene:
            solutions[:, -1] = self.initial_log_rate
        return solutions

    def policies(self, solutions: np.ndarray) -> BatchedPolicy:
        """The solutions as one :class:`~growprune.qd.policies.BatchedPolicy`."""
        return BatchedPolicy(self.layout, np.asarray(solutions, dtype=np.float32), self.activation)

    # -- evaluation --

    def evaluate(self, solutions: np.ndarray, descriptors: Sequence[str] = ()) -> list[Evaluation]:
        """Rolls out every solution for one episode per episode seed.

        Args:
            solutions: ``[P, solution_dim]``.
            descriptors: names from :meth:`descriptor_names`; graph and information measures are
                computed only when asked.

        Returns:
            One :class:`Evaluation` per solution: objective = mean return; measures = the asked
            descriptors plus behaviour measures, density, sparsity (and prune_rate); info =
            ``episode_length`` (mean), ``return_min`` and ``return_max`` over seeds.

        Raises:
            ValueError: wrong shape or unknown descriptor.
        """
        descriptors = list(descriptors)
        if descriptors:
            self.check_descriptors(descriptors)
        solutions = np.asarray(solutions, dtype=np.float32)
        policy = self.policies(solutions)
        _, from_graph, information, _ = split_measures(descriptors)
        want_mi = bool(information)
        result = rollout(self.env, policy, self.episode_seeds, self.episode_steps, record=want_mi)
        dens = density(self.layout, solutions)
        names = self.behaviour_names()
        evaluations = []
        for p in range(len(policy)):
            measures = {name: float(value) for name, value in zip(names, result.behaviour[p].mean(axis=0))}
            measures["density"] = float(dens[p])
            measures["sparsity"] = 1.0 - float(dens[p])
            if policy.log_rates is not None:
                measures["prune_rate"] = float(10.0 ** policy.log_rates[p])
            if from_graph:
                measures.update(self._graph_measures(solutions[p], from_graph))
            if want_mi:
                measures.update(self._information(policy, p, result))
            returns = result.returns[p]
            evaluations.append(
                Evaluation(
                    objective=float(returns.mean()),
                    measures=measures,
                    info={
                        "episode_length": float(result.lengths[p].mean()),
                        "return_min": float(returns.min()),
                        "return_max": float(returns.max()),
                    },
                )
            )
        return evaluations

    def _graph_measures(self, solution: np.ndarray, names: list[str]) -> dict[str, float]:
        """Graph measures of the solution's nonzero pattern, cached per process: the measures
        depend only on that pattern (and the seed), and children made at low pruning rates often
        keep their parent's pattern, while Louvain costs about 5 ms on an 8-16-16-4 policy."""
        from growprune.graph import graph_measures

        pattern = np.packbits(solution[: self.layout.num_weights] != 0).tobytes()
        key = (self.layout, tuple(names), self.seed, pattern)
        cached = _GRAPH_CACHE.get(key)
        if cached is None:
            cached = graph_measures(policy_graph(self.layout, solution), names, seed=self.seed)
            if len(_GRAPH_CACHE) >= _GRAPH_CACHE_SIZE:
                _GRAPH_CACHE.pop(next(iter(_GRAPH_CACHE)))
            _GRAPH_CACHE[key] = cached
        return {name: float(value) for name, value in cached.items()}

    def _information(self, policy: BatchedPolicy, index: int, result: Rollouts) -> dict[str, float]:
        """``mi_label`` / ``mi_consecutive`` of policy ``index``: probe = the observations it acted
        on (at most ``mi_samples``, evenly spaced), labels = its actions; layers = the hidden
        activations then the outputs."""
        from growprune.information import information_from_activations

        assert result.observations is not None and result.actions is not None
        observations, actions = result.observations[index], result.actions[index]
        if len(observations) > self.mi_samples:
            keep = np.linspace(0, len(observations) - 1, self.mi_samples).round().astype(int)
            observations, actions = observations[keep], actions[keep]
        outputs, hiddens = policy.forward_one(index, observations)
        values = information_from_activations(
            [h.astype(np.float64) for h in [*hiddens, outputs]], np.asarray(actions), bins=self.mi_bins
        )
        return {name: float(values[name]) for name in INFORMATION_MEASURES}

    # -- networks and elites --

    def network(self, solution: np.ndarray) -> nn.Module:
        """The policy as ``nn.Sequential`` (pruned weights are zeros; output before the action mapping)."""
        return policy_module(self.layout, np.asarray(solution, dtype=np.float32), self.activation)

    def graph(self, solution: np.ndarray) -> Any:
        """Unit graph of the nonzero weights (:func:`growprune.graph.unit_graph_from_weights`)."""
        return policy_graph(self.layout, np.asarray(solution, dtype=np.float32))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (saved with elites; ``ControlTask(**config)`` rebuilds the task)."""
        return {
            "env": self.env,
            "hidden": list(self.hidden),
            "bias": self.bias,
            "activation": self.activation,
            "episode_seeds": list(self.episode_seeds),
            "max_episode_steps": self.max_episode_steps,
            "evolve_pruning": self.evolve_pruning,
            "initial_prune_rate": self.initial_prune_rate,
            "init_std": self.init_std,
            "initial_log_rate": self.initial_log_rate,
            "mi_bins": self.mi_bins,
            "mi_samples": self.mi_samples,
        }

    def save_elite(self, solution: np.ndarray, path: Path) -> Path:
        """Writes a policy file: ``state_dict`` (of :meth:`network`), ``env``, ``layout``,
        ``task`` (the constructor arguments), ``solution``, ``objective`` and ``measures``
        (re-evaluated here: behaviour measures, density, sparsity, every graph measure, prune_rate).

        Args:
            solution: ``[solution_dim]``.
            path: the file, or an existing directory (then ``<path>/best_elite.pt``).

        Returns:
            The file written (load with ``torch.load(path, weights_only=True)``; check it with
            :meth:`replay`).

        Raises:
            ValueError: wrong solution shape.
        """
        solution = np.asarray(solution, dtype=np.float32).reshape(-1)
        self.layout._check(solution)
        path = Path(path)
        if path.is_dir():
            path = path / "best_elite.pt"
        evaluation = self.evaluate(solution[None], graph_descriptor_names())[0]
        payload = {
            "state_dict": self.network(solution).state_dict(),
            "env": self.env,
            "layout": self.layout.to_dict(),
            "task": self.config(),
            "solution": torch.from_numpy(solution.copy()),
            "objective": evaluation.objective,
            "measures": evaluation.measures,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        torch.save(payload, temporary)
        temporary.replace(path)
        return path

    @classmethod
    def from_elite(cls, path: str | Path) -> tuple["ControlTask", np.ndarray]:
        """Rebuilds the task and the solution of a file written by :meth:`save_elite`.

        Returns:
            ``(task, solution)``.
        """
        payload = torch.load(Path(path), weights_only=True)
        task = cls(**payload["task"])
        return task, payload["solution"].numpy().astype(np.float32)

    def replay(self, elite: str | Path | np.ndarray, seeds: Sequence[int] | None = None) -> np.ndarray:
        """Runs a solution (or a saved elite) again, one episode per seed.

        Args:
            elite: a solution ``[solution_dim]`` or a file from :meth:`save_elite` (its env and
                layout must match this task's).
            seeds: episode seeds (None: this task's ``episode_seeds``).

        Returns:
            ``[len(seeds)]`` episode returns.

        Raises:
            ValueError: the file's env or layout differs from this task's, or a wrong shape.
        """
        if isinstance(elite, (str, Path)):
            payload = torch.load(Path(elite), weights_only=True)
            if payload["env"] != self.env or PolicyLayout.from_dict(payload["layout"]) != self.layout:
                raise ValueError(
                    f"elite {elite} is for {payload['env']} with layout {payload['layout']}, "
                    f"not this task's {self.env} with {self.layout.to_dict()}"
                )
            solution = payload["solution"].numpy()
        else:
            solution = np.asarray(elite)
        solution = np.asarray(solution, dtype=np.float32).reshape(1, -1)
        seeds = self.episode_seeds if seeds is None else tuple(int(seed) for seed in seeds)
        return rollout(self.env, self.policies(solution), seeds, self.episode_steps).returns[0]

    def __repr__(self) -> str:
        return f"ControlTask(env={self.env!r}, hidden={list(self.hidden)}, evolve_pruning={self.evolve_pruning})"
