"""Key events from the database to the ``WatchKeyEvents`` streams of one auth-service replica.

The store appends a row to ``key_events`` in the same transaction as each revocation or
update. :class:`EventCursor` reads that log in id order without losing rows that commit
out of order; :class:`EventHub` runs one poller thread per replica that reads
``key_events`` every ``event_poll_interval`` seconds (and at once after a local change)
and fans the rows out to the open streams, each a :class:`Watcher`, so a revocation made
through any replica sharing the database reaches every watcher. Each stream first gets a
``HELLO``. A watcher that falls ``queue_size`` events behind is dropped with ``ABORTED``;
on shutdown streams end with ``UNAVAILABLE``. Either way the client should flush its
cache and reconnect.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import suppress

import grpc

from tail_service.authsvc.records import KeyEvent
from tail_service.authsvc.store import KeyStore

log = logging.getLogger("tail_service.authsvc")


class WatchRefused(Exception):
    """A new watcher was turned away; ``code`` is the status its stream ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class EventCursor:
    """Reads ``key_events`` in order without missing rows that commit out of id order.

    On PostgreSQL two replicas may take event ids 5 and 6 and commit 6 first; a plain
    "id > last seen" would then skip 5 forever. The cursor remembers such holes and
    asks for them again on each poll for ``gap_ttl`` seconds (a hole can also be an id
    from a rolled-back transaction, which never appears). Not thread-safe: one poller.
    """

    def __init__(self, store: KeyStore, start_after: int, *, gap_ttl: float = 60.0, max_gaps: int = 1000):
        self._store = store
        self._last = start_after
        self._gaps: dict[int, float] = {}
        self._gap_ttl = gap_ttl
        self._max_gaps = max_gaps

    @classmethod
    def at_end(cls, store: KeyStore, *, lookback: int = 256) -> EventCursor:
        """A cursor after the newest event that still watches holes among the last ``lookback`` ids."""
        cursor = cls(store, max(0, store.max_event_id() - lookback))
        cursor.poll()  # skips what is there, remembers what is missing
        return cursor

    @property
    def last_id(self) -> int:
        """The highest event id seen so far."""
        return self._last

    def poll(self, now: float | None = None) -> list[KeyEvent]:
        """New events since the last poll (including late commits into holes), by id."""
        at = time.monotonic() if now is None else now
        events = self._store.events_after(self._last, also=self._gaps)
        seen = {e.id for e in events}
        for event_id in seen & self._gaps.keys():
            del self._gaps[event_id]
        if events:
            top = max(seen)
            for missing in range(max(self._last + 1, top - self._max_gaps), top):
                if missing not in seen and len(self._gaps) < self._max_gaps:
                    self._gaps[missing] = at
            self._last = max(self._last, top)
        for event_id, since in list(self._gaps.items()):
            if at - since > self._gap_ttl:
                del self._gaps[event_id]
        return events


class Watcher:
    """One open ``WatchKeyEvents`` stream's bounded queue; ``reason`` is set once it must end."""

    def __init__(self, size: int, start_id: int) -> None:
        self.start_id = start_id
        self.reason: str | None = None  # "overflow" | "stopping"
        self._queue: queue.Queue[KeyEvent | None] = queue.Queue(maxsize=size)

    def offer(self, event: KeyEvent) -> bool:
        """Queue ``event``; ``False`` if the queue is full."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            return False
        return True

    def close(self, reason: str) -> None:
        """Mark the stream to end (first reason wins) and wake its reader."""
        if self.reason is None:
            self.reason = reason
        self.wake()

    def wake(self) -> None:
        """Unblock a reader waiting in :meth:`next` (also gRPC's on-termination callback)."""
        with suppress(queue.Full):  # full: the reader is not blocked, it has events to take
            self._queue.put_nowait(None)

    def next(self, timeout: float) -> KeyEvent | None:
        """The next event, or ``None`` after ``timeout`` seconds or a wake-up."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class EventHub:
    """Polls ``key_events`` on a background thread and fans new rows out to the watchers.

    ``interval`` is in seconds. At most ``max_watchers`` streams at once (each holds a
    server thread); a watcher more than ``queue_size`` events behind is closed with
    reason ``"overflow"``. :meth:`stop` ends every stream and joins the thread.
    """

    def __init__(self, store: KeyStore, interval: float, *, queue_size: int = 1024, max_watchers: int = 32):
        self._store = store
        self._interval = interval
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self._lock = threading.Lock()
        self._watchers: set[Watcher] = set()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = 0

    def start(self) -> None:
        """Start polling after the newest existing event (raises if the database is unreachable)."""
        cursor = EventCursor.at_end(self._store)
        self._last_id = cursor.last_id
        self._thread = threading.Thread(target=self._run, args=(cursor,), name="auth-key-events", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Poll now instead of at the next interval (after a change made here)."""
        self._wake.set()

    def subscribe(self) -> Watcher:
        """A new watcher; raises ``WatchRefused`` when stopping or full."""
        with self._lock:
            if self._stopping.is_set() or self._thread is None:
                raise WatchRefused(grpc.StatusCode.UNAVAILABLE, "auth-service is shutting down")
            if len(self._watchers) >= self._max_watchers:
                raise WatchRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many key-event watchers")
            watcher = Watcher(self._queue_size, self._last_id)
            self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        """Forget ``watcher`` (idempotent)."""
        with self._lock:
            self._watchers.discard(watcher)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling and end every stream; idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._lock:
            watchers, self._watchers = self._watchers, set()
        for w in watchers:
            w.close("stopping")

    def publish(self, events: list[KeyEvent]) -> None:
        """Hand ``events`` to every watcher; close those whose queue is full."""
        with self._lock:
            if events:
                self._last_id = max(self._last_id, max(e.id for e in events))
            overflowed = [w for w in self._watchers if not all(w.offer(e) for e in events)]
            for w in overflowed:
                self._watchers.discard(w)
        for w in overflowed:
            log.warning("dropping a key-event watcher that fell behind")
            w.close("overflow")

    def _run(self, cursor: EventCursor) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                events = cursor.poll()
            except Exception as exc:  # keep polling: the cursor resumes where it stopped
                log.warning("key-event poll failed: %s", type(exc).__name__)
                continue
            if events:
                self.publish(events)
