"""Thread-based concurrency helpers for the local provider: single-flight loading, micro-batching.

Both are built on ``concurrent.futures`` and a ``threading.Lock`` rather than asyncio
primitives, so one provider instance works from any event loop (and from several loops
over its lifetime, as in tests); async callers await ``asyncio.wrap_future(...)``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _settle(fut: Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete ``fut`` unless it is already done (e.g. cancelled by its waiter)."""
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class SingleFlight(Generic[T]):
    """Run ``factory`` once on ``executor``; every caller shares that one result.

    Concurrent first calls wait for the same load. A failed (or cancelled) load is
    forgotten, so the next call tries again. Waiters being cancelled never cancel the
    load itself.
    """

    def __init__(self, factory: Callable[[], T], executor: Executor) -> None:
        self._factory = factory
        self._executor = executor
        self._lock = threading.Lock()
        self._future: Future[T] | None = None

    def future(self) -> Future[T]:
        """The shared load future, starting the load if none is running or succeeded."""
        with self._lock:
            fut = self._future
            if fut is None or fut.cancelled() or (fut.done() and fut.exception() is not None):
                fut = self._executor.submit(self._factory)
                self._future = fut
            return fut

    def loaded(self) -> T | None:
        """The value when loading has succeeded, else ``None`` (never starts a load)."""
        fut = self._future
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            return fut.result()
        return None

    async def get(self) -> T:
        """Await the loaded value (loading it on first use)."""
        return await asyncio.shield(asyncio.wrap_future(self.future()))

    def reset(self) -> None:
        """Forget the loaded value (it is garbage-collected once no caller holds it)."""
        with self._lock:
            self._future = None


@dataclass(eq=False)
class _Request(Generic[R]):
    future: Future[list[R]]
    results: list[Any]
    remaining: int


@dataclass(eq=False)
class _Item(Generic[T, R]):
    request: _Request[R]
    position: int
    value: T = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """Merge concurrent requests into batched calls of ``fn`` on ``executor``.

    ``fn(items)`` returns one result per item, in order; a result that is an exception
    fails only the request that item belongs to. While one batch runs, newly submitted
    items queue up and form the next batch (at most ``max_batch`` items; a request larger
    than that spans several batches). Results are split back per request, in input order.
    :attr:`batches` counts ``fn`` calls (forward passes) for tests and metrics.
    """

    def __init__(
        self, fn: Callable[[list[T]], Sequence[R | BaseException]], executor: Executor, max_batch: int
    ) -> None:
        self._fn = fn
        self._executor = executor
        self.max_batch = max(1, max_batch)
        self._lock = threading.Lock()
        self._pending: deque[_Item[T, R]] = deque()
        self._draining = False
        self.batches = 0
        self.items = 0

    def submit(self, values: Sequence[T]) -> Future[list[R]]:
        """Queue ``values``; the future resolves to their results in the same order."""
        fut: Future[list[R]] = Future()
        if not values:
            fut.set_result([])
            return fut
        req: _Request[R] = _Request(fut, [None] * len(values), len(values))
        with self._lock:
            self._pending.extend(_Item(req, i, v) for i, v in enumerate(values))
            start = not self._draining
            self._draining = True
        if start:
            try:
                self._executor.submit(self._drain)
            except RuntimeError as exc:  # executor shut down
                self.fail_all(exc)
        return fut

    def fail_all(self, exc: BaseException) -> None:
        """Fail every queued request with ``exc`` (used on shutdown)."""
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
            self._draining = False
        for it in items:
            _settle(it.request.future, exc=exc)

    def _take(self) -> list[_Item[T, R]]:
        with self._lock:
            batch: list[_Item[T, R]] = []
            while self._pending and len(batch) < self.max_batch:
                it = self._pending.popleft()
                if not it.request.future.done():  # skip cancelled / already failed requests
                    batch.append(it)
            if not batch:
                self._draining = False
            return batch

    def _drain(self) -> None:
        while batch := self._take():
            try:
                results = self._fn([it.value for it in batch])
            except Exception as exc:
                for it in batch:
                    _settle(it.request.future, exc=exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for it, res in zip(batch, results, strict=True):
                req = it.request
                if isinstance(res, BaseException):
                    _settle(req.future, exc=res)
                    continue
                req.results[it.position] = res
                req.remaining -= 1
                if req.remaining == 0:
                    _settle(req.future, result=req.results)
