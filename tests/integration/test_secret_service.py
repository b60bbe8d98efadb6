"""secret-service over real gRPC with mTLS on port 0, on SQLite and PostgreSQL.

Covers authorization by certificate identity, versioning, the audit trail, encryption at
rest (no plaintext in the database files or rows), TLS rejections, master key handling
(refusal, embedded creation, restart, mismatch) and the ``run`` entry point.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tail_service.certs import write_private
from tail_service.db import make_engine
from tail_service.proto import secrets_pb2, secrets_pb2_grpc
from tail_service.rpc.tls import channel_credentials
from tail_service.secretsvc import (
    SERVICE_NAME,
    MasterKeyError,
    MasterKeyMismatch,
    SecretService,
    SecretStore,
    load_master_key,
)
from tail_service.secretsvc.store import secret_audit, secret_versions
from tail_service.settings import SecretServiceSettings, TLSFiles

V1 = b"sk-PLAINTEXT-v1-7f3a9c2e1b"
V2 = b"sk-PLAINTEXT-v2-0d4e8b6a55"
OTHER = b"anthropic-PLAINTEXT-91c0"
NO_KEY_ENV = "TAIL_TEST_NO_SUCH_MASTER_KEY"
TLSFor = Callable[[str], TLSFiles]


def _settings(base_dir: Path, db_url: str, tls: TLSFiles | None, **kw: Any) -> SecretServiceSettings:
    key_file = base_dir / "master.key"
    if not key_file.exists() and not kw.get("embedded"):
        write_private(key_file, base64.b64encode(os.urandom(32)))
    kw.setdefault("master_key_file", Path("master.key"))
    return SecretServiceSettings(
        listen="127.0.0.1:0", database_url=db_url, tls=tls, master_key_env=NO_KEY_ENV, **kw
    )


@dataclass
class Harness:
    """A running service and the client channels opened against it (closed at teardown)."""

    service: SecretService
    port: int
    db_url: str
    ca: bytes
    tls_for: TLSFor
    channels: list[grpc.Channel] = field(default_factory=list)

    def channel(self, creds: grpc.ChannelCredentials) -> grpc.Channel:
        ch = grpc.secure_channel(f"127.0.0.1:{self.port}", creds)
        self.channels.append(ch)
        return ch

    def stub(self, who: str | TLSFiles) -> Any:
        tls = self.tls_for(who) if isinstance(who, str) else who
        return secrets_pb2_grpc.SecretServiceStub(self.channel(channel_credentials(tls)))

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.service.stop(0)


@pytest.fixture
def harness_for(tmp_path: Path, tls_for: TLSFor, pki_dir: Path) -> Iterator[Callable[..., Harness]]:
    """``harness_for(db_url=None)``: a started service (default: SQLite ``store.db`` in tmp_path)."""
    started: list[Harness] = []

    def start(db_url: str | None = None) -> Harness:
        db_url = db_url or f"sqlite:///{tmp_path / 'store.db'}"
        service = SecretService.build(_settings(tmp_path, db_url, tls_for("secrets")), base_dir=tmp_path)
        running = service.start()
        h = Harness(service, running.port, db_url, (pki_dir / "ca.pem").read_bytes(), tls_for)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


def code(call: Callable[..., Any], request: Any) -> grpc.StatusCode:
    """The status code ``call(request)`` fails with."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    status: grpc.StatusCode = info.value.code()
    return status


def audit_rows(db_url: str) -> list[sa.Row[Any]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(secret_audit).order_by(secret_audit.c.id)))
    finally:
        engine.dispose()


def test_admin_put_get_list_rotate_delete(db_url: str, harness_for: Callable[..., Harness]) -> None:
    admin = harness_for(db_url).stub("admin")
    put = admin.PutSecret(secrets_pb2.PutSecretRequest(name="openai/prod", value=V1), timeout=10)
    assert (put.meta.name, put.meta.version) == ("openai/prod", 1) and put.meta.created_at > 0
    admin.PutSecret(secrets_pb2.PutSecretRequest(name="Anthropic.key_2", value=OTHER), timeout=10)
    got = admin.GetSecret(secrets_pb2.GetSecretRequest(name="openai/prod"), timeout=10)
    assert (got.value, got.meta.version) == (V1, 1)

    rotated = admin.RotateSecret(secrets_pb2.RotateSecretRequest(name="openai/prod", value=V2), timeout=10)
    assert rotated.meta.version == 2
    assert admin.GetSecret(secrets_pb2.GetSecretRequest(name="openai/prod"), timeout=10).value == V2
    old = admin.GetSecret(secrets_pb2.GetSecretRequest(name="openai/prod", version=1), timeout=10)
    assert (old.value, old.meta.version) == (V1, 1)
    assert code(admin.GetSecret, secrets_pb2.GetSecretRequest(name="openai/prod", version=3)) == (
        grpc.StatusCode.NOT_FOUND
    )
    names = admin.ListSecrets(secrets_pb2.ListSecretsRequest(), timeout=10).names
    assert list(names) == ["Anthropic.key_2", "openai/prod"]  # code-point order on both backends

    assert admin.DeleteSecret(secrets_pb2.DeleteSecretRequest(name="openai/prod"), timeout=10).deleted
    assert not admin.DeleteSecret(secrets_pb2.DeleteSecretRequest(name="openai/prod"), timeout=10).deleted
    for version in (0, 1, 2):
        req = secrets_pb2.GetSecretRequest(name="openai/prod", version=version)
        assert code(admin.GetSecret, req) == grpc.StatusCode.NOT_FOUND
    assert code(admin.RotateSecret, secrets_pb2.RotateSecretRequest(name="openai/prod", value=V2)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert list(admin.ListSecrets(secrets_pb2.ListSecretsRequest(), timeout=10).names) == ["Anthropic.key_2"]
    # re-creating a deleted name continues its numbering: a version is never reused
    again = admin.PutSecret(secrets_pb2.PutSecretRequest(name="openai/prod", value=V1), timeout=10)
    assert again.meta.version == 3


@pytest.mark.parametrize(
    ("name", "value", "version"),
    [
        ("bad name", V1, 0),
        ("", V1, 0),
        ("x" * 129, V1, 0),
        ("ok", b"", 0),
        ("ok", b"v" * 65537, 0),
        ("ok", V1, -1),
    ],
)
def test_invalid_arguments(
    name: str, value: bytes, version: int, harness_for: Callable[..., Harness]
) -> None:
    admin = harness_for().stub("admin")
    if version < 0:
        assert code(admin.GetSecret, secrets_pb2.GetSecretRequest(name=name, version=version)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        return
    assert code(admin.PutSecret, secrets_pb2.PutSecretRequest(name=name, value=value)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert admin.PutSecret(secrets_pb2.PutSecretRequest(name="a" * 128, value=b"v" * 65536), timeout=10)


def test_permissions_by_identity_and_audit(db_url: str, harness_for: Callable[..., Harness]) -> None:
    h = harness_for(db_url)
    admin, tail, auth = h.stub("admin"), h.stub("tail"), h.stub("auth")
    admin.PutSecret(secrets_pb2.PutSecretRequest(name="p", value=V1), timeout=10)
    assert tail.GetSecret(secrets_pb2.GetSecretRequest(name="p"), timeout=10).value == V1
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code(tail.PutSecret, secrets_pb2.PutSecretRequest(name="p", value=V2)) == denied
    assert code(tail.ListSecrets, secrets_pb2.ListSecretsRequest()) == denied
    assert code(tail.DeleteSecret, secrets_pb2.DeleteSecretRequest(name="p")) == denied
    assert code(tail.RotateSecret, secrets_pb2.RotateSecretRequest(name="p", value=V2)) == denied
    assert code(auth.GetSecret, secrets_pb2.GetSecretRequest(name="p")) == denied
    assert code(tail.GetSecret, secrets_pb2.GetSecretRequest(name="nope")) == grpc.StatusCode.NOT_FOUND
    assert code(admin.PutSecret, secrets_pb2.PutSecretRequest(name="bad name", value=V1)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert admin.GetSecret(secrets_pb2.GetSecretRequest(name="p"), timeout=10).value == V1  # unchanged

    rows = [(r.identity, r.action, r.name, r.version, r.outcome) for r in audit_rows(db_url)]
    assert rows == [
        ("admin", "put", "p", 1, "ok"),
        ("tail", "get", "p", 1, "ok"),
        ("tail", "put", "p", None, "denied"),
        ("tail", "list", None, None, "denied"),
        ("tail", "delete", "p", None, "denied"),
        ("tail", "rotate", "p", None, "denied"),
        ("auth", "get", "p", None, "denied"),
        ("tail", "get", "nope", None, "not_found"),
        ("admin", "put", "bad name", None, "invalid"),
        ("admin", "get", "p", 1, "ok"),
    ]
    assert all(r.ts > 1_600_000_000_000 for r in audit_rows(db_url))  # unix milliseconds


def _dump_all_rows(db_url: str) -> tuple[str, int]:
    """Every row of every table as text (bytes as hex and as latin-1; on PostgreSQL also the
    server's own ``row::text`` rendering), and the number of rows dumped."""
    engine = make_engine(db_url)
    out, rows = [], 0
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    rows += 1
                    for v in row:
                        b = bytes(v) if isinstance(v, bytes | memoryview) else None
                        out.append(b.hex() + b.decode("latin-1") if b is not None else str(v))
                if engine.dialect.name == "postgresql":
                    out += conn.scalars(sa.text(f'SELECT CAST(t AS text) FROM "{table.name}" AS t'))
    finally:
        engine.dispose()
    return "\n".join(out), rows


def test_no_plaintext_at_rest(db_url: str, harness_for: Callable[..., Harness], tmp_path: Path) -> None:
    admin = harness_for(db_url).stub("admin")
    admin.PutSecret(secrets_pb2.PutSecretRequest(name="openai/prod", value=V1), timeout=10)
    admin.RotateSecret(secrets_pb2.RotateSecretRequest(name="openai/prod", value=V2), timeout=10)
    admin.GetSecret(secrets_pb2.GetSecretRequest(name="openai/prod", version=1), timeout=10)
    dump, rows = _dump_all_rows(db_url)
    # schema_migrations 1 + secrets 1 + secret_versions 2 + secret_audit 3
    assert rows == 7 and "openai/prod" in dump
    for value in (V1, V2):
        for form in (value.decode(), value.hex(), base64.b64encode(value).decode()):
            assert form not in dump
    if db_url.startswith("sqlite"):
        files = [p for p in tmp_path.iterdir() if p.name.startswith("store.db")]
        assert any(p.name.endswith("-wal") for p in files)
        raw = b"".join(p.read_bytes() for p in files)
        assert b"openai/prod" in raw
        assert V1 not in raw and V2 not in raw and V1.hex().encode() not in raw


def test_swapped_or_tampered_row_is_data_loss(db_url: str, harness_for: Callable[..., Harness]) -> None:
    admin = harness_for(db_url).stub("admin")
    for name, value in (("a", V1), ("b", V2)):
        admin.PutSecret(secrets_pb2.PutSecretRequest(name=name, value=value), timeout=10)
    engine = make_engine(db_url)
    v = secret_versions.c
    try:
        with engine.begin() as conn:  # move a's sealed columns onto b's row
            row_a = conn.execute(sa.select(secret_versions).where(v.name == "a")).one()
            cols = ("ciphertext", "nonce", "wrapped_key", "wrap_nonce")
            conn.execute(
                sa.update(secret_versions).where(v.name == "b").values({c: row_a._mapping[c] for c in cols})
            )
    finally:
        engine.dispose()
    assert code(admin.GetSecret, secrets_pb2.GetSecretRequest(name="b")) == grpc.StatusCode.DATA_LOSS
    assert admin.GetSecret(secrets_pb2.GetSecretRequest(name="a"), timeout=10).value == V1
    assert audit_rows(db_url)[-2].outcome == "error"


def test_concurrent_puts_get_distinct_versions(db_url: str, tmp_path: Path, tls_for: TLSFor) -> None:
    settings = _settings(tmp_path, db_url, tls_for("secrets"))
    engine = make_engine(db_url, tmp_path)
    store = SecretStore(engine, load_master_key(settings, base_dir=tmp_path))
    versions: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                versions.append(store.put("shared", f"value-{i}-{j}".encode(), actor="admin").version)
                store.get("shared", actor="tail")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert not errors and sorted(versions) == list(range(1, 21))


def test_tls_rejections(harness_for: Callable[..., Harness], rogue_tls: TLSFor, expired_tls: TLSFor) -> None:
    h = harness_for()
    rogue = rogue_tls("admin")
    clients = [
        secrets_pb2_grpc.SecretServiceStub(h.channel(grpc.ssl_channel_credentials(root_certificates=h.ca))),
        h.stub(rogue),  # another CA altogether
        h.stub(
            TLSFiles(ca_file=h.tls_for("admin").ca_file, cert_file=rogue.cert_file, key_file=rogue.key_file)
        ),
        h.stub(expired_tls("admin")),
    ]
    for stub in clients:
        assert code(stub.GetSecret, secrets_pb2.GetSecretRequest(name="x")) == grpc.StatusCode.UNAVAILABLE
    assert audit_rows(h.db_url) == []  # no handler was reached


def test_health_serving(harness_for: Callable[..., Harness]) -> None:
    h = harness_for()
    health = health_pb2_grpc.HealthStub(h.channel(channel_credentials(h.tls_for("tail"))))
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_no_secret_values_in_logs(
    harness_for: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h = harness_for()
    admin, tail = h.stub("admin"), h.stub("tail")
    admin.PutSecret(secrets_pb2.PutSecretRequest(name="openai/prod", value=V1), timeout=10)
    admin.RotateSecret(secrets_pb2.RotateSecretRequest(name="openai/prod", value=V2), timeout=10)
    tail.GetSecret(secrets_pb2.GetSecretRequest(name="openai/prod"), timeout=10)
    code(tail.PutSecret, secrets_pb2.PutSecretRequest(name="openai/prod", value=OTHER))
    code(admin.PutSecret, secrets_pb2.PutSecretRequest(name="bad name", value=OTHER))
    text = caplog.text + "\n".join(repr(r.__dict__) for r in caplog.records)
    assert "secret audit: identity=tail action=put name='openai/prod' version=- outcome=denied" in caplog.text
    for value in (V1, V2, OTHER):
        assert value.decode() not in text and value.hex() not in text


def test_refuses_without_master_key_or_tls(tmp_path: Path, tls_for: TLSFor) -> None:
    db = f"sqlite:///{tmp_path / 'nokey.db'}"
    settings = SecretServiceSettings(database_url=db, tls=tls_for("secrets"), master_key_env=NO_KEY_ENV)
    with pytest.raises(MasterKeyError, match=f"no secrets master key.*{NO_KEY_ENV}"):
        SecretService.build(settings, base_dir=tmp_path)
    assert not (tmp_path / "nokey.db").exists()
    with pytest.raises(ValueError, match="without TLS"):
        SecretService.build(_settings(tmp_path, db, None), base_dir=tmp_path)
    SecretService.build(_settings(tmp_path, db, None), base_dir=tmp_path, allow_insecure=True).stop()


def test_embedded_key_file_restart_and_mismatch(tmp_path: Path, tls_for: TLSFor) -> None:
    settings = _settings(
        tmp_path, "sqlite:///emb.db", tls_for("secrets"), embedded=True, master_key_file=None
    )
    first = SecretService.build(settings, base_dir=tmp_path)
    key_file = tmp_path / "secrets-master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert first.store.put("openai/prod", V1, actor="admin").version == 1
    first.stop()

    second = SecretService.build(settings, base_dir=tmp_path)  # same file: old secrets decrypt
    meta, value = second.store.get("openai/prod")
    assert (meta.version, value) == (1, V1)
    second.stop()

    write_private(key_file, base64.b64encode(os.urandom(32)))
    with pytest.raises(MasterKeyMismatch, match="master key mismatch") as info:
        SecretService.build(settings, base_dir=tmp_path)
    assert key_file.read_text() not in str(info.value)


def test_run_logs_bound_port_and_stops_on_sigterm(tmp_path: Path, tls_for: TLSFor) -> None:
    settings = _settings(tmp_path, "sqlite:///run.db", tls_for("secrets"))
    script = (
        "import logging, sys\nfrom pathlib import Path\n"
        "from tail_service.secretsvc import run\nfrom tail_service.settings import SecretServiceSettings\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        f"settings = SecretServiceSettings.model_validate_json({settings.model_dump_json()!r})\n"
        "run(settings, base_dir=Path(sys.argv[1]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            m = re.search(r"secret-service listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port > 0
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(tls_for("admin"))) as ch:
            stub = secrets_pb2_grpc.SecretServiceStub(ch)
            stub.PutSecret(secrets_pb2.PutSecretRequest(name="k", value=V1), timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
