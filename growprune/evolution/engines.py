"""Where the population is evaluated: in this process, in a local process pool, or as Ray tasks.

An engine maps a module-level ``function(shared, item)`` over ``items`` and returns the results in
order. ``shared`` (the bound evaluator and genotype) travels once per :meth:`Engine.map` call, the
items (a chunk of genomes each) once per task. Tasks get their seeds in their items and every task
runs under ``torch.set_num_threads(threads)``; the global torch seed is never touched, so every
engine returns identical results for the same items.

>>> with make_engine("local") as engine:
...     engine.map(pow, [1, 2, 3], shared=2)
[2, 4, 8]
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import uuid
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence

import torch

TaskFunction = Callable[[Any, Any], Any]


def _run_with_threads(function: TaskFunction, shared: Any, item: Any, threads: int | None) -> Any:
    """``function(shared, item)`` under ``torch.set_num_threads(threads)`` (restored afterwards)."""
    if threads is None:
        return function(shared, item)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(shared, item)
    finally:
        torch.set_num_threads(previous)


class Engine(ABC):
    """Maps a function over items; results in item order. Use as a context manager or call :meth:`close`."""

    threads: int | None

    @abstractmethod
    def map(self, function: TaskFunction, items: Sequence[Any], shared: Any = None) -> list[Any]:
        """``[function(shared, item) for item in items]``, possibly in parallel.

        Args:
            function: a module-level function (it is pickled by reference for other processes).
            items: one task each.
            shared: passed to every task; sent to other processes once per call.
        """

    def imap(self, function: TaskFunction, items: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        """``(index, function(shared, items[index]))`` pairs as tasks finish (any order).

        The evolutionary loop journals each chunk's results as soon as it returns, so a killed run
        loses only the chunks still in flight. This default waits for :meth:`map`.
        """
        yield from enumerate(self.map(function, items, shared))

    def close(self) -> None:
        """Release workers (idempotent)."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- local ---------------------------------------------------------------------------------------

# A pool worker keeps the last ``shared`` object it unpickled, keyed by the map call's token, so a
# map call with many tasks unpickles its (possibly large) shared object once per worker.
_WORKER_SHARED: tuple[str, Any] | None = None


def _pool_task(token: str, payload: bytes, function: TaskFunction, item: Any, threads: int) -> Any:
    global _WORKER_SHARED
    if _WORKER_SHARED is None or _WORKER_SHARED[0] != token:
        _WORKER_SHARED = (token, pickle.loads(payload))
    return _run_with_threads(function, _WORKER_SHARED[1], item, threads)


class LocalEngine(Engine):
    """This process (``workers=1``) or a pool of ``workers`` spawned processes.

    Args:
        workers: 1 runs every task in this process, one after another, on the very ``shared``
            object (so an evaluator's activation cache persists across generations); more starts a
            ``spawn`` process pool on the first :meth:`map` (tasks then get a copy of ``shared``).
        threads: torch threads per task. ``None``: in-process tasks keep the current setting, pool
            workers use ``max(1, os.cpu_count() // workers)``.

    Raises:
        ValueError: ``workers`` or ``threads`` below 1.
    """

    def __init__(self, workers: int = 1, threads: int | None = None) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"LocalEngine workers must be an integer >= 1, got {workers!r}")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"LocalEngine threads must be an integer >= 1 or None, got {threads!r}")
        self.workers = workers
        self.threads = threads
        self._pool: ProcessPoolExecutor | None = None

    def _worker_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, (os.cpu_count() or 1) // self.workers)

    def map(self, function: TaskFunction, items: Sequence[Any], shared: Any = None) -> list[Any]:
        items = list(items)
        if self.workers == 1:
            return [_run_with_threads(function, shared, item, self.threads) for item in items]
        return [future.result() for future in self._submit(function, items, shared)]

    def imap(self, function: TaskFunction, items: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        items = list(items)
        if self.workers == 1:
            for index, item in enumerate(items):
                yield index, _run_with_threads(function, shared, item, self.threads)
            return
        futures = self._submit(function, items, shared)
        index_of = {future: index for index, future in enumerate(futures)}
        for future in as_completed(futures):
            yield index_of[future], future.result()

    def _submit(self, function: TaskFunction, items: list[Any], shared: Any) -> list[Future]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        token, payload = uuid.uuid4().hex, pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)
        threads = self._worker_threads()
        return [self._pool.submit(_pool_task, token, payload, function, item, threads) for item in items]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"LocalEngine(workers={self.workers}, threads={self.threads})"


# --- Ray -----------------------------------------------------------------------------------------


def _ray_task(function: TaskFunction, shared: Any, item: Any, threads: int) -> Any:
    # Ray resolves ``shared`` (an ObjectRef passed as a top-level argument) to the object itself.
    return _run_with_threads(function, shared, item, threads)


def _driver_python_path() -> str:
    """This process's ``sys.path`` as a ``PYTHONPATH``: Ray workers then import what this process
    imports (task functions pickle by reference), as spawned pool workers do."""
    return os.pathsep.join(path for path in sys.path if path and os.path.isdir(path))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ImportError("Ray is not installed: pip install 'growprune[ray]'") from error
    return ray


class RayEngine(Engine):
    """Tasks on a Ray cluster: a local one started here, or an existing one.

    One Ray session serves the engine's lifetime (start-up takes seconds). If Ray is already
    initialised in this process, that session is used (and ``num_cpus`` / ``address`` are ignored,
    with a warning) and :meth:`close` leaves it running; a session this engine started is shut
    down by :meth:`close`.

    Args:
        num_cpus: CPUs of the local cluster to start (``None``: all); must be None with ``address``.
        address: an existing cluster's address (``"auto"`` or ``"host:port"``); ``None`` starts one.
        threads: torch threads per task; each task also reserves that many Ray CPUs.

    Raises:
        ImportError: Ray is not installed.
        ValueError: ``num_cpus`` or ``threads`` below 1; both ``num_cpus`` and ``address`` given.
    """

    def __init__(self, num_cpus: int | None = None, address: str | None = None, threads: int = 1) -> None:
        if num_cpus is not None and (not isinstance(num_cpus, int) or isinstance(num_cpus, bool) or num_cpus < 1):
            raise ValueError(f"RayEngine num_cpus must be an integer >= 1 or None, got {num_cpus!r}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"RayEngine threads must be an integer >= 1, got {threads!r}")
        if num_cpus is not None and address is not None:
            raise ValueError(f"RayEngine takes num_cpus ({num_cpus}) or address ({address!r}), not both")
        ray = _import_ray()
        self.num_cpus, self.address, self.threads = num_cpus, address, threads
        self._ray = ray
        self._owns_session = not ray.is_initialized()
        if self._owns_session:
            ray.init(
                address=address,
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": _driver_python_path()}},
            )
        elif num_cpus is not None or address is not None:
            warnings.warn(
                f"Ray is already initialised in this process: RayEngine uses that session "
                f"(num_cpus={num_cpus}, address={address!r} ignored)",
                stacklevel=2,
            )
        self._remote = ray.remote(_ray_task).options(num_cpus=threads)
        self._closed = False

    def map(self, function: TaskFunction, items: Sequence[Any], shared: Any = None) -> list[Any]:
        return list(self._ray.get(self._submit(function, items, shared)))

    def imap(self, function: TaskFunction, items: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        refs = self._submit(function, items, shared)
        index_of = {ref: index for index, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            yield index_of[done[0]], self._ray.get(done[0])

    def _submit(self, function: TaskFunction, items: Sequence[Any], shared: Any) -> list[Any]:
        if self._closed:
            raise ValueError("RayEngine.map after close(): create a new engine")
        shared_ref = self._ray.put(shared)  # once per call: every task reads the same object
        return [self._remote.remote(function, shared_ref, item, self.threads) for item in items]

    def close(self) -> None:
        if not self._closed and self._owns_session and self._ray.is_initialized():
            self._ray.shutdown()
        self._closed = True

    def __repr__(self) -> str:
        return f"RayEngine(num_cpus={self.num_cpus}, address={self.address!r}, threads={self.threads})"


ENGINES: dict[str, type[Engine]] = {"local": LocalEngine, "ray": RayEngine}


def make_engine(name: str, **kwargs: Any) -> Engine:
    """An engine by name: ``"local"`` (:class:`LocalEngine`) or ``"ray"`` (:class:`RayEngine`).

    Raises:
        ValueError: an unknown name (the message lists the names).
    """
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {sorted(ENGINES)}")
    return ENGINES[name](**kwargs)
