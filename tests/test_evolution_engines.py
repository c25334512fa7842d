"""Engines: in-process, process pool and Ray give the same results, in item order, under the set thread count."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from growprune.evolution.engines import LocalEngine, RayEngine, make_engine


def seeded_forward(shared: torch.Tensor, item: tuple[int, int]) -> tuple[int, torch.Tensor, int]:
    """A seeded torch computation: a random MLP layer applied to random inputs, from the item's seed."""
    index, seed = item
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, shared.shape[1], generator=generator)
    hidden = torch.relu(inputs @ shared.T + torch.randn(shared.shape[0], generator=generator))
    return index, hidden.sum(dim=1), torch.get_num_threads()


def failing(shared: object, item: int) -> int:
    if item == 2:
        raise RuntimeError(f"task {item} failed")
    return item


def identity_of_shared(shared: object, item: int) -> int:
    return id(shared)


ITEMS = [(index, 1000 + 7 * index) for index in range(6)]


def shared_weights() -> torch.Tensor:
    return torch.randn(32, 20, generator=torch.Generator().manual_seed(3))


def reference() -> list[torch.Tensor]:
    """The same computation by a plain loop, no engine."""
    return [seeded_forward(shared_weights(), item)[1] for item in ITEMS]


def test_local_engine_in_process_runs_in_order_under_its_thread_count():
    before = torch.get_num_threads()
    with LocalEngine(workers=1, threads=1) as engine:
        results = engine.map(seeded_forward, ITEMS, shared=shared_weights())
    assert [r[0] for r in results] == list(range(len(ITEMS)))
    assert all(r[2] == 1 for r in results)
    assert torch.get_num_threads() == before  # restored after each task
    with LocalEngine(workers=1, threads=1) as engine:
        stream = engine.imap(seeded_forward, ITEMS, shared=shared_weights())
        assert next(stream)[0] == 0  # in-process: lazily, one task per step, in order
        assert [index for index, _ in stream] == list(range(1, len(ITEMS)))
    for (_, values, _), expected in zip(results, reference()):
        assert torch.equal(values, expected)


def test_local_engine_in_process_passes_the_very_shared_object():
    shared = {"cache": []}
    with LocalEngine() as engine:
        assert engine.map(identity_of_shared, [0, 1], shared=shared) == [id(shared), id(shared)]


def test_process_pool_gives_identical_results_and_raises_task_errors():
    with LocalEngine(workers=2, threads=1) as engine:
        results = engine.map(seeded_forward, ITEMS, shared=shared_weights())
        assert [r[0] for r in results] == list(range(len(ITEMS)))
        assert all(r[2] == 1 for r in results)
        for (_, values, _), expected in zip(results, reference()):
            assert torch.equal(values, expected)
        # imap yields (index, result) as tasks finish: the same results, any order
        pairs = sorted(engine.imap(seeded_forward, ITEMS, shared=shared_weights()), key=lambda pair: pair[0])
        assert [index for index, _ in pairs] == list(range(len(ITEMS)))
        assert all(torch.equal(result[1], expected) for (_, result), expected in zip(pairs, reference()))
        with pytest.raises(RuntimeError, match="task 2 failed"):
            engine.map(failing, [0, 1, 2, 3])
        # The pool survives a failed task: the next map works.
        assert engine.map(failing, [5, 6]) == [5, 6]


def test_bad_engine_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="unknown engine 'dask'.*local.*ray"):
        make_engine("dask")
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        LocalEngine(workers=0)
    with pytest.raises(ValueError, match="threads must be an integer >= 1 or None, got 0"):
        make_engine("local", threads=0)
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        RayEngine(threads=0)
    with pytest.raises(ValueError, match="not both"):
        RayEngine(num_cpus=2, address="auto")
    assert isinstance(make_engine("local", workers=1), LocalEngine)


def test_missing_ray_raises_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'growprune\[ray\]'"):
        make_engine("ray", num_cpus=2)


def test_ray_engine_matches_the_local_engine_and_leaves_foreign_sessions_running():
    """Measured here: Ray start-up + tasks + shutdown about 9-12 s on 2 loaded cores."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    start = time.perf_counter()
    engine = RayEngine(num_cpus=2, threads=1)
    try:
        results = engine.map(seeded_forward, ITEMS, shared=shared_weights())
        assert [r[0] for r in results] == list(range(len(ITEMS)))
        assert all(r[2] == 1 for r in results)
        for (_, values, _), expected in zip(results, reference()):
            assert torch.equal(values, expected)
        pairs = sorted(engine.imap(seeded_forward, ITEMS, shared=shared_weights()), key=lambda pair: pair[0])
        assert [index for index, _ in pairs] == list(range(len(ITEMS)))
        assert all(torch.equal(result[1], expected) for (_, result), expected in zip(pairs, reference()))
        with pytest.raises(Exception, match="task 2 failed"):
            engine.map(failing, [0, 1, 2, 3])
        # A second engine reuses the running session and must not shut it down on close.
        with pytest.warns(UserWarning, match="already initialised"):
            guest = RayEngine(num_cpus=4)
        assert guest.map(failing, [7]) == [7]
        guest.close()
        assert ray.is_initialized()
    finally:
        engine.close()
    assert not ray.is_initialized()
    assert time.perf_counter() - start < 60
    with pytest.raises(ValueError, match="after close"):
        engine.map(failing, [1])
