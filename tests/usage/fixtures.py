"""Helpers for the usage-ledger tests: the store's rows, polling, records.

Each test has its own SQLite store file that its gateways, drainers and the test share.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tail_service.core.types import Endpoint, TokenUsage
from tail_service.core.usage import Outcome, UsageRecord
from tail_service.settings import StoreSettings
from tail_service.store import Store
from tail_service.store.schema import usage_records


def store_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'usage-store.db'}"


@contextmanager
def open_store(url: str) -> Iterator[Store]:
    """The store at ``url``, migrated; closed on exit."""
    store = Store(StoreSettings(database_url=url), None)
    store.migrate()
    try:
        yield store
    finally:
        store.close()


def stored_rows(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(usage_records))]


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``pred`` every 20 ms; the seconds it took to hold."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def record_row(record_id: str, *, prompt: int = 3, completion: int = 5, **kw: Any) -> dict[str, Any]:
    """A ledger row as the gateway writes it into the stream."""
    rec = UsageRecord(
        kw.pop("request_id", "req-" + record_id),
        kw.pop("model", "gpt-test"),
        Endpoint.CHAT,
        TokenUsage(prompt, completion),
        Outcome.OK,
        deployment="gpt-test#0",
        record_id=record_id,
        key_id="key-1",
        tenant="acme",
        created_at=time.time(),
        **kw,
    )
    return rec.to_row()
