"""API keys, the pepper, the key store (SQLite) and the key-event plumbing, without gRPC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tail_service.authsvc.events import EventCursor, EventHub
from tail_service.authsvc.keys import (
    KEY_LENGTH,
    Pepper,
    PepperError,
    decode_pepper,
    display_prefix,
    ensure_pepper_file,
    generate_key,
    load_pepper,
    looks_like_key,
)
from tail_service.authsvc.records import InvalidKeyArgument, KeyEvent, KeyNotFound
from tail_service.authsvc.store import KeyStore
from tail_service.db import make_engine
from tail_service.settings import AuthServiceSettings

PEPPER = Pepper(b"p" * 32)


# --- keys ---------------------------------------------------------------------------------


def test_generated_keys_have_the_documented_shape() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("sk-tail-")
        assert len(key) == KEY_LENGTH == len("sk-tail-") + 43
        body = key[len("sk-tail-") :]
        assert "=" not in body
        assert len(base64.urlsafe_b64decode(body + "=")) == 32
        assert looks_like_key(key)
        assert display_prefix(key) == key[:12]


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "sk-tail-",
        "sk-test",
        "sk-tail-" + "A" * 42,
        "sk-tail-" + "A" * 44,
        "sk-tai1-" + "A" * 43,
        "sk-tail-" + "A" * 42 + "=",
        "sk-tail-" + "A" * 42 + "/",
        " sk-tail-" + "A" * 42,
        "sk-tail-" + "A" * 42 + "\n",
    ],
)
def test_malformed_keys_fail_the_syntactic_check(candidate: str) -> None:
    assert not looks_like_key(candidate)


def test_hash_is_hmac_sha256_of_the_key_with_the_pepper() -> None:
    key = generate_key()
    expected = hmac.new(b"p" * 32, key.encode(), hashlib.sha256).hexdigest()
    assert PEPPER.hash_key(key) == expected
    assert Pepper(b"q" * 32).hash_key(key) != expected


def test_the_pepper_never_shows_itself() -> None:
    pepper = Pepper(b"super-secret-pepper-material-0123456789")
    assert "super" not in repr(pepper) and "super" not in str(pepper) and "super" not in f"{pepper!r}"
    with pytest.raises(TypeError):
        pickle.dumps(pepper)
    with pytest.raises(PepperError):
        Pepper(b"short")


def test_decode_pepper_accepts_hex_base64_and_long_text() -> None:
    raw = os.urandom(32)
    assert decode_pepper(raw.hex().encode()) == raw
    assert decode_pepper(base64.b64encode(raw) + b"\n") == raw
    assert decode_pepper(base64.urlsafe_b64encode(raw).rstrip(b"=")) == raw
    text = b"correct horse battery staple, long enough!"
    assert decode_pepper(text) == text
    with pytest.raises(PepperError) as info:
        decode_pepper(b"tooshort-secret")
    assert "tooshort" not in str(info.value)


def test_load_pepper_from_a_file_relative_to_base_dir(tmp_path: Path) -> None:
    assert ensure_pepper_file(tmp_path / "state" / "pepper")
    settings = AuthServiceSettings(pepper_file=Path("state/pepper"))
    pepper = load_pepper(settings, tmp_path)
    key = generate_key()
    assert pepper.hash_key(key) == load_pepper(settings, tmp_path).hash_key(key)


def test_a_pepper_file_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pepper"
    ensure_pepper_file(path)
    path.chmod(0o644)
    load_pepper(AuthServiceSettings(pepper_file=path), tmp_path)
    assert "readable by group or others" in caplog.text
    assert path.read_text().strip() not in caplog.text


def test_load_pepper_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_AUTH_PEPPER", "ab" * 32)
    pepper = load_pepper(AuthServiceSettings(pepper_env="TEST_AUTH_PEPPER"), tmp_path)
    assert pepper.hash_key("x") == Pepper(bytes.fromhex("ab" * 32)).hash_key("x")


def test_load_pepper_refuses_missing_or_weak_peppers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TEST_AUTH_PEPPER", raising=False)
    with pytest.raises(PepperError, match="TEST_AUTH_PEPPER"):
        load_pepper(AuthServiceSettings(pepper_env="TEST_AUTH_PEPPER"), tmp_path)
    with pytest.raises(PepperError, match="cannot read the pepper file"):
        load_pepper(AuthServiceSettings(pepper_file=Path("absent")), tmp_path)
    monkeypatch.setenv("TEST_AUTH_PEPPER", "weak-pepper-value")
    with pytest.raises(PepperError) as info:
        load_pepper(AuthServiceSettings(pepper_env="TEST_AUTH_PEPPER"), tmp_path)
    assert "weak-pepper-value" not in str(info.value) and "TEST_AUTH_PEPPER" in str(info.value)


def test_ensure_pepper_file_creates_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "pepper"
    assert ensure_pepper_file(path) is True
    first = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(first.strip(), validate=True)) == 32
    assert ensure_pepper_file(path) is False
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["pepper"]


# --- the store ----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_700_000_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[KeyStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    s = KeyStore(engine, PEPPER, clock=clock)
    assert s.migrate() == 5
    assert s.migrate() == 5  # idempotent
    yield s
    engine.dispose()


def test_create_and_verify(store: KeyStore, clock: Clock) -> None:
    info, key = store.create_key(tenant="acme", name="ci", allowed_models=["a", "b", "a"], rpm=10, tpm=1000)
    assert looks_like_key(key) and info.prefix == key[:12] and info.id.startswith("key_")
    assert len(info.id) == 4 + 24
    assert info.allowed_models == ("a", "b") and info.created_at == info.updated_at == int(clock.now)
    p = store.verify(key)
    assert p is not None and p.key_id == info.id and p.tenant == "acme" and p.name == "ci"
    assert (p.allowed_models, p.rpm, p.tpm, p.max_concurrency, p.expires_at) == (("a", "b"), 10, 1000, 0, 0)
    with store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT key_hash FROM api_keys")).scalar_one()
    assert stored == PEPPER.hash_key(key)


def test_unknown_revoked_expired_and_malformed_keys_all_give_none(store: KeyStore, clock: Clock) -> None:
    _, revoked = store.create_key(tenant="t")
    store.revoke(api_key=revoked)
    _, expiring = store.create_key(tenant="t", expires_at=int(clock.now) + 60)
    assert store.verify(expiring) is not None
    assert store.verify(expiring, now=clock.now + 60) is None
    for key in (generate_key(), revoked, "sk-tail-nope", ""):
        assert store.verify(key) is None


def test_revoke_is_idempotent_and_logs_one_event(store: KeyStore) -> None:
    info, key = store.create_key(tenant="t")
    assert store.max_event_id() == 0
    assert store.revoke(key_id=info.id).revoked
    assert store.revoke(api_key=key).revoked
    events = store.events_after(0)
    assert [(e.key_id, e.kind) for e in events] == [(info.id, "revoked")]
    assert store.max_event_id() == events[0].id
    with pytest.raises(KeyNotFound):
        store.revoke(key_id="key_missing")
    with pytest.raises(KeyNotFound):
        store.revoke(api_key=generate_key())
    with pytest.raises(InvalidKeyArgument):
        store.revoke()


def test_update_is_partial_and_logs_an_event(store: KeyStore, clock: Clock) -> None:
    info, key = store.create_key(tenant="t", name="old", allowed_models=["m"], rpm=1, tpm=2)
    clock.now += 5
    updated = store.update(info.id, rpm=100, allowed_models=[])
    assert (updated.name, updated.rpm, updated.tpm, updated.allowed_models) == ("old", 100, 2, ())
    assert updated.updated_at == info.created_at + 5
    assert store.update(info.id) == updated  # nothing to change: no event
    assert [e.kind for e in store.events_after(0)] == ["updated"]
    store.update(info.id, expires_at=int(clock.now) - 1)  # expire it now
    assert store.verify(key) is None
    with pytest.raises(KeyNotFound):
        store.update("key_missing", rpm=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tenant": ""},
        {"tenant": "  "},
        {"tenant": "t" * 201},
        {"tenant": "t", "rpm": -1},
        {"tenant": "t", "max_concurrency": 2**60},
        {"tenant": "t", "expires_at": 1},
        {"tenant": "t", "expires_at": 1_700_000_000_000},
        {"tenant": "t", "allowed_models": [""]},
    ],
)
def test_create_validates_its_arguments(store: KeyStore, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidKeyArgument):
        store.create_key(**kwargs)  # type: ignore[arg-type]


def test_list_filters_by_tenant_and_revocation(store: KeyStore) -> None:
    a, _ = store.create_key(tenant="a")
    b, _ = store.create_key(tenant="b")
    store.revoke(key_id=b.id)
    assert [k.id for k in store.list_keys()] == [a.id]
    assert {k.id for k in store.list_keys(include_revoked=True)} == {a.id, b.id}
    assert [k.id for k in store.list_keys("b", include_revoked=True)] == [b.id]
    assert store.list_keys("c", include_revoked=True) == []


# --- key events ---------------------------------------------------------------------------


class FakeEvents:
    """``events_after`` over a list of rows that may "commit" out of id order."""

    def __init__(self) -> None:
        self.rows: list[KeyEvent] = []

    def add(self, event_id: int) -> None:
        self.rows.append(KeyEvent(event_id, f"key_{event_id}", "revoked", 0))

    def events_after(self, event_id: int, *, also: object = (), limit: int = 1000) -> list[KeyEvent]:
        wanted = set(also)  # type: ignore[call-overload]
        return sorted((e for e in self.rows if e.id > event_id or e.id in wanted), key=lambda e: e.id)

    def max_event_id(self) -> int:
        return max((e.id for e in self.rows), default=0)


def test_cursor_delivers_events_that_commit_out_of_order() -> None:
    fake = FakeEvents()
    cursor = EventCursor(fake, 0, gap_ttl=10)  # type: ignore[arg-type]
    fake.add(1)
    fake.add(3)  # 2 is still in flight
    assert [e.id for e in cursor.poll(now=0)] == [1, 3]
    assert cursor.poll(now=1) == []
    fake.add(2)
    fake.add(4)
    assert [e.id for e in cursor.poll(now=2)] == [2, 4]
    assert cursor.poll(now=3) == []
    fake.add(6)  # 5 never commits: forgotten after gap_ttl
    assert [e.id for e in cursor.poll(now=4)] == [6]
    assert cursor.poll(now=20) == []
    fake.add(5)
    assert cursor.poll(now=21) == []
    assert cursor.last_id == 6


def test_a_cursor_opened_at_the_end_still_catches_late_commits() -> None:
    fake = FakeEvents()
    for event_id in (1, 2, 4):
        fake.add(event_id)
    cursor = EventCursor.at_end(fake)  # type: ignore[arg-type]
    assert cursor.last_id == 4 and cursor.poll() == []
    fake.add(3)
    assert [e.id for e in cursor.poll()] == [3]


def test_hub_fans_out_drops_slow_watchers_and_ends_streams_on_stop() -> None:
    fake = FakeEvents()
    hub = EventHub(fake, 60.0, queue_size=2, max_watchers=2)  # type: ignore[arg-type]
    hub.start()
    fast, slow = hub.subscribe(), hub.subscribe()
    with pytest.raises(Exception, match="too many"):
        hub.subscribe()
    events = [KeyEvent(i, f"key_{i}", "updated", 0) for i in (1, 2, 3)]
    hub.publish(events[:2])
    assert fast.next(0.1) == events[0] and fast.next(0.1) == events[1]
    hub.publish(events[2:])
    assert slow.reason == "overflow" and fast.reason is None
    assert fast.next(0.1) == events[2]
    late = hub.subscribe()
    assert late.start_id == 3
    hub.stop()
    assert fast.reason == late.reason == "stopping"
    with pytest.raises(Exception, match="shutting down"):
        hub.subscribe()


def test_upgrade_from_schema_v1_keeps_keys(tmp_path: Path, clock: Clock) -> None:
    """A database made by the first release migrates to v5 (response_cache, mcp_servers,
    budgets, tenant MCP servers) with its keys intact."""
    from tail_service.authsvc import store as store_mod
    from tail_service.db import migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    assert migrate(engine, "auth", store_mod.MIGRATIONS[:1]) == 1
    api_key = "sk-tail-" + "A" * 43
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, key_hash, prefix, name, tenant, allowed_models, rpm, tpm, "
                "max_concurrency, expires_at, revoked, created_at, updated_at) VALUES "
                "('key_old', :h, 'sk-tail-AAAA', 'old', 'acme', '[]', 5, 0, 0, 0, 0, 1, 1)"
            ),
            {"h": PEPPER.hash_key(api_key)},
        )
    s = KeyStore(engine, PEPPER, clock=clock)
    assert s.migrate() == 5
    principal = s.verify(api_key)
    assert principal is not None and principal.key_id == "key_old" and principal.rpm == 5
    assert principal.response_cache is False and principal.mcp_servers == ()
    assert principal.tenant_mcp_servers == ()
    assert s.update("key_old", response_cache=True).response_cache is True
    assert s.update("key_old", mcp_servers=["docs", "docs", "search"]).mcp_servers == ("docs", "search")
    again = s.verify(api_key)
    assert again is not None and again.mcp_servers == ("docs", "search")
    engine.dispose()
