"""Fixtures of the usage-ledger tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tail_service.redis_embedded import EmbeddedRedis


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone (a short directory: the unix socket path is bounded)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("r")).start()
    try:
        yield server
    finally:
        server.stop()
