"""The API-key store: SQLAlchemy 2 Core, one code path for SQLite and PostgreSQL.

``api_keys`` holds one row per key: never the key, only its peppered hash (unique) and
display prefix, with the tenant, allowed models, limits and budget. ``tenants`` holds the
policy of tenants that have one (a budget, MCP servers); a tenant without a row has no
budget and every MCP server. ``key_events`` is an append-only log of revocations and
updates, written in the same transaction as the change (a change of a tenant's policy
logs an update of each of its keys); the
auth-service replicas poll it (:class:`~tail_service.authsvc.events.EventCursor`) to push
cache invalidations to the Tail Services, so a change made through any replica reaches
every watcher. The records the store returns and the checks on its arguments are in
:mod:`.records`.

Times are unix seconds (integers). Limits of 0 mean "no limit", ``expires_at`` 0 "never".
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tail_service.authsvc.keys import Pepper, display_prefix, generate_key, looks_like_key
from tail_service.authsvc.records import (
    MAX_TEXT,
    InvalidKeyArgument,
    KeyEvent,
    KeyInfo,
    KeyNotFound,
    TenantInfo,
    VerifiedKey,
    clean_budget,
    clean_expires,
    clean_limit,
    clean_mcp_servers,
    clean_models,
    clean_text,
)
from tail_service.db import Migration, migrate

SERVICE = "auth"


def _tables(metadata: sa.MetaData, *, version: int = 5) -> tuple[sa.Table, sa.Table]:
    """``api_keys`` and ``key_events`` as of ``version`` (1: as first shipped; 2 adds
    ``response_cache``; 3 adds ``mcp_servers``; 4 adds the budget, and :func:`_tenants`;
    5 changes only ``tenants``)."""
    extra = [sa.Column("response_cache", sa.Boolean, nullable=False, server_default=sa.false())]
    extra3 = [sa.Column("mcp_servers", sa.Text, nullable=False, server_default="[]")]
    extra4 = [
        sa.Column("budget_usd", sa.Double, nullable=False, server_default="0"),
        sa.Column("budget_period", sa.String(8), nullable=False, server_default="none"),
    ]
    api_keys = sa.Table(
        "api_keys",
        metadata,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(MAX_TEXT), nullable=False),
        sa.Column("tenant", sa.String(MAX_TEXT), nullable=False),
        sa.Column("allowed_models", sa.Text, nullable=False),
        sa.Column("rpm", sa.BigInteger, nullable=False),
        sa.Column("tpm", sa.BigInteger, nullable=False),
        sa.Column("max_concurrency", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        *(extra if version >= 2 else []),
        *(extra3 if version >= 3 else []),
        *(extra4 if version >= 4 else []),
        sa.Index("ix_api_keys_key_hash", "key_hash", unique=True),
        sa.Index("ix_api_keys_tenant", "tenant"),
    )
    key_events = sa.Table(
        "key_events",
        metadata,
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sqlite_autoincrement=True,  # ids never reused, so "id > last seen" stays sound
    )
    return api_keys, key_events


def _tenants(metadata: sa.MetaData, *, version: int = 5) -> sa.Table:
    """``tenants`` as of ``version`` (4: as first shipped; 5 adds ``mcp_servers``): one row
    per tenant whose policy was ever set."""
    extra5 = [sa.Column("mcp_servers", sa.Text, nullable=False, server_default="[]")]
    return sa.Table(
        "tenants",
        metadata,
        sa.Column("tenant", sa.String(MAX_TEXT), primary_key=True),
        sa.Column("budget_usd", sa.Double, nullable=False),
        sa.Column("budget_period", sa.String(8), nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        *(extra5 if version >= 5 else []),
    )


_METADATA = sa.MetaData()
API_KEYS, KEY_EVENTS = _tables(_METADATA)
TENANTS = _tenants(_METADATA)


def _v1(conn: Connection) -> None:
    metadata = sa.MetaData()
    _tables(metadata, version=1)
    metadata.create_all(conn)


def _v2(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN response_cache BOOLEAN NOT NULL DEFAULT FALSE"))


def _v3(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN mcp_servers TEXT NOT NULL DEFAULT '[]'"))


def _v4(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN budget_usd DOUBLE PRECISION NOT NULL DEFAULT 0"))
    conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN budget_period VARCHAR(8) NOT NULL DEFAULT 'none'"))
    _tenants(sa.MetaData(), version=4).create(conn)


def _v5(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE tenants ADD COLUMN mcp_servers TEXT NOT NULL DEFAULT '[]'"))


MIGRATIONS: tuple[Migration, ...] = (_v1, _v2, _v3, _v4, _v5)


def _info(row: sa.Row[Any]) -> KeyInfo:
    m = dict(row._mapping)
    for extra in ("key_hash", *_TENANT_LABELS):
        m.pop(extra, None)
    return KeyInfo(
        **m
        | {
            "allowed_models": tuple(json.loads(m["allowed_models"])),
            "revoked": bool(m["revoked"]),
            "response_cache": bool(m["response_cache"]),
            "mcp_servers": tuple(json.loads(m["mcp_servers"])),
            "budget_usd": float(m["budget_usd"]),
        }
    )


_INFO_COLUMNS = [c for c in API_KEYS.c if c.name != "key_hash"]
_DUMMY_HASH = "0" * 64
#: the ``tenants`` columns a principal carries, as ``_WITH_TENANT`` labels them
_TENANT_LABELS = ("tenant_budget_usd", "tenant_budget_period", "tenant_mcp_servers")
#: a key's row with its tenant's budget and MCP servers (NULL without a ``tenants`` row):
#: one indexed lookup
_WITH_TENANT = sa.select(
    API_KEYS,
    TENANTS.c.budget_usd.label("tenant_budget_usd"),
    TENANTS.c.budget_period.label("tenant_budget_period"),
    TENANTS.c.mcp_servers.label("tenant_mcp_servers"),
).select_from(API_KEYS.outerjoin(TENANTS, TENANTS.c.tenant == API_KEYS.c.tenant))
#: the policy of a tenant whose row is made by setting one part of it
_NO_TENANT_POLICY = {"budget_usd": 0.0, "budget_period": "none", "mcp_servers": "[]"}


class KeyStore:
    """API keys in a SQL database, hashed with ``pepper``. Thread-safe (the engine pools).

    Every method is one short transaction; a change and its ``key_events`` row commit
    together. ``clock`` returns unix seconds (tests pass a fake one).
    """

    def __init__(self, engine: Engine, pepper: Pepper, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._pepper = pepper
        self._clock = clock

    def __repr__(self) -> str:
        return f"KeyStore({self._engine.url.render_as_string(hide_password=True)!r})"

    @property
    def engine(self) -> Engine:
        """The engine the store uses."""
        return self._engine

    def migrate(self) -> int:
        """Bring the schema up to date (idempotent); returns the schema version."""
        return migrate(self._engine, SERVICE, MIGRATIONS)

    def _now(self) -> int:
        return int(self._clock())

    def create_key(
        self,
        *,
        tenant: str,
        name: str = "",
        allowed_models: Sequence[str] = (),
        rpm: int = 0,
        tpm: int = 0,
        max_concurrency: int = 0,
        expires_at: int = 0,
        response_cache: bool = False,
        mcp_servers: Sequence[str] = (),
        budget_usd: float = 0.0,
        budget_period: str = "",
    ) -> tuple[KeyInfo, str]:
        """Create a key; returns its info and the plaintext, which exists nowhere else afterwards.

        Raises :class:`InvalidKeyArgument` for an empty tenant, over-long text, negative
        limits, an ``expires_at`` that is not in the future or a bad budget (see
        :func:`~.records.clean_budget`: a budget without a period is per month).
        """
        now = self._now()
        expires = clean_expires(expires_at)
        if expires and expires <= now:
            raise InvalidKeyArgument("expires_at is in the past")
        usd, period = clean_budget(budget_usd, budget_period)
        api_key = generate_key()
        values = {
            "id": "key_" + secrets.token_hex(12),
            "key_hash": self._pepper.hash_key(api_key),
            "prefix": display_prefix(api_key),
            "name": clean_text("name", name, required=False),
            "tenant": clean_text("tenant", tenant, required=True),
            "allowed_models": json.dumps(list(clean_models(allowed_models))),
            "rpm": clean_limit("rpm", rpm),
            "tpm": clean_limit("tpm", tpm),
            "max_concurrency": clean_limit("max_concurrency", max_concurrency),
            "expires_at": expires,
            "revoked": False,
            "response_cache": bool(response_cache),
            "mcp_servers": json.dumps(list(clean_mcp_servers(mcp_servers))),
            "budget_usd": usd,
            "budget_period": period,
            "created_at": now,
            "updated_at": now,
        }
        with self._engine.begin() as conn:
            conn.execute(sa.insert(API_KEYS).values(**values))
            row = conn.execute(sa.select(*_INFO_COLUMNS).where(API_KEYS.c.id == values["id"])).one()
        return _info(row), api_key

    def get(self, key_id: str) -> KeyInfo:
        """The key with ``key_id``, or :class:`KeyNotFound`."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(*_INFO_COLUMNS).where(API_KEYS.c.id == key_id)).first()
        if row is None:
            raise KeyNotFound("no such key")
        return _info(row)

    def list_keys(self, tenant: str = "", include_revoked: bool = False) -> list[KeyInfo]:
        """Keys of ``tenant`` (empty: all tenants), oldest first; revoked ones only if asked."""
        query = sa.select(*_INFO_COLUMNS).order_by(API_KEYS.c.created_at, API_KEYS.c.id)
        if tenant:
            query = query.where(API_KEYS.c.tenant == tenant)
        if not include_revoked:
            query = query.where(API_KEYS.c.revoked.is_(False))
        with self._engine.connect() as conn:
            return [_info(r) for r in conn.execute(query)]

    def revoke(self, *, key_id: str | None = None, api_key: str | None = None) -> KeyInfo:
        """Revoke the key named by id or by its plaintext (exactly one); idempotent.

        The first revocation records a ``revoked`` event in the same transaction; a
        repeat changes nothing and returns the (revoked) key. :class:`KeyNotFound` if
        no key matches.
        """
        if (key_id is None) == (api_key is None):
            raise InvalidKeyArgument("give the key's id or the key itself")
        with self._engine.begin() as conn:
            if api_key is not None:
                if not looks_like_key(api_key):
                    raise KeyNotFound("no such key")
                where = API_KEYS.c.key_hash == self._pepper.hash_key(api_key)
            else:
                where = API_KEYS.c.id == key_id
            row = conn.execute(sa.select(API_KEYS.c.id).where(where)).first()
            if row is None:
                raise KeyNotFound("no such key")
            now = self._now()
            changed = conn.execute(
                sa.update(API_KEYS)
                .where(API_KEYS.c.id == row.id, API_KEYS.c.revoked.is_(False))
                .values(revoked=True, updated_at=now)
            ).rowcount
            if changed:
                conn.execute(sa.insert(KEY_EVENTS).values(key_id=row.id, kind="revoked", created_at=now))
            info = conn.execute(sa.select(*_INFO_COLUMNS).where(API_KEYS.c.id == row.id)).one()
        return _info(info)

    def update(
        self,
        key_id: str,
        *,
        name: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
        expires_at: int | None = None,
        allowed_models: Sequence[str] | None = None,
        response_cache: bool | None = None,
        mcp_servers: Sequence[str] | None = None,
        budget_usd: float | None = None,
        budget_period: str | None = None,
    ) -> KeyInfo:
        """Change the given fields (``None``: keep) and record an ``updated`` event.

        ``expires_at`` may lie in the past (that expires the key now). A call that sets
        nothing changes nothing. :class:`KeyNotFound` for an unknown id.

        ``budget_usd`` 0 removes the key's budget. A new amount without a period keeps the
        current period (``month`` if the key had no budget); a period alone changes the
        period of the current budget, and is :class:`InvalidKeyArgument` without one.
        """
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = clean_text("name", name, required=False)
        for field, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrency", max_concurrency)):
            if value is not None:
                values[field] = clean_limit(field, value)
        if expires_at is not None:
            values["expires_at"] = clean_expires(expires_at)
        if allowed_models is not None:
            values["allowed_models"] = json.dumps(list(clean_models(allowed_models)))
        if response_cache is not None:
            values["response_cache"] = bool(response_cache)
        if mcp_servers is not None:
            values["mcp_servers"] = json.dumps(list(clean_mcp_servers(mcp_servers)))
        if budget_usd is not None:
            clean_budget(budget_usd, budget_period)  # a bad value fails before any I/O
        elif budget_period is not None:
            clean_budget(1.0, budget_period)
        budget = budget_usd is not None or budget_period is not None
        if not values and not budget:
            return self.get(key_id)
        with self._engine.begin() as conn:
            if budget:
                values |= self._budget_update(conn, key_id, budget_usd, budget_period)
            now = self._now()
            changed = conn.execute(
                sa.update(API_KEYS).where(API_KEYS.c.id == key_id).values(**values, updated_at=now)
            ).rowcount
            if not changed:
                raise KeyNotFound("no such key")
            conn.execute(sa.insert(KEY_EVENTS).values(key_id=key_id, kind="updated", created_at=now))
            row = conn.execute(sa.select(*_INFO_COLUMNS).where(API_KEYS.c.id == key_id)).one()
        return _info(row)

    @staticmethod
    def _budget_update(
        conn: Connection, key_id: str, usd: float | None, period: str | None
    ) -> dict[str, Any]:
        """The budget columns of an update, resolved against the key's current budget."""
        row = conn.execute(
            sa.select(API_KEYS.c.budget_usd, API_KEYS.c.budget_period).where(API_KEYS.c.id == key_id)
        ).first()
        if row is None:
            raise KeyNotFound("no such key")
        has_budget = row.budget_usd > 0
        if usd is None:
            if not has_budget:
                raise InvalidKeyArgument("budget_period needs a budget: set budget_usd above 0 too")
            usd = float(row.budget_usd)
        current = row.budget_period if has_budget else None
        new_usd, new_period = clean_budget(usd, period, current_period=current)
        return {"budget_usd": new_usd, "budget_period": new_period}

    def get_tenant(self, tenant: str) -> TenantInfo:
        """The policy of ``tenant``; without a ``tenants`` row, no budget and every MCP server
        (``updated_at`` 0)."""
        name = clean_text("tenant", tenant, required=True)
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(TENANTS).where(TENANTS.c.tenant == name)).first()
        return _tenant_info(name, row)

    def set_tenant_budget(self, tenant: str, budget_usd: float, budget_period: str = "") -> TenantInfo:
        """Set (``budget_usd`` > 0) or remove (0) the budget of ``tenant``, for all its keys together.

        A period left empty is ``month`` (see :func:`~.records.clean_budget`). A change
        records an ``updated`` event for each of the tenant's keys that is not revoked, in
        the same transaction, so every gateway drops its cached verdicts of those keys;
        setting the budget it already has changes and records nothing.
        """
        name = clean_text("tenant", tenant, required=True)
        usd, period = clean_budget(budget_usd, budget_period)
        return self._set_tenant(name, {"budget_usd": usd, "budget_period": period})

    def set_tenant_mcp_servers(self, tenant: str, servers: Sequence[str]) -> TenantInfo:
        """Replace the MCP servers the agent runs of all of ``tenant``'s keys may use (each
        key's own list applies as well); an empty list allows every configured one.

        Names are checked like a key's (:func:`~.records.clean_models`). A change records
        an ``updated`` event for each of the tenant's keys that is not revoked, like
        :meth:`set_tenant_budget`; setting the list it already has records nothing.
        """
        name = clean_text("tenant", tenant, required=True)
        names = json.dumps(list(clean_mcp_servers(servers)))
        return self._set_tenant(name, {"mcp_servers": names})

    def _set_tenant(self, name: str, values: dict[str, Any]) -> TenantInfo:
        """Set ``values`` (columns of ``tenants``) on the tenant's row, made if missing."""
        try:
            return self._write_tenant(name, values)
        except sa.exc.IntegrityError:  # another replica made the tenant's row first: update it
            return self._write_tenant(name, values)

    def _write_tenant(self, name: str, values: dict[str, Any]) -> TenantInfo:
        now = self._now()
        where = TENANTS.c.tenant == name
        with self._engine.begin() as conn:
            old = conn.execute(sa.select(TENANTS).where(where)).first()
            if old is not None and all(getattr(old, k) == v for k, v in values.items()):
                return _tenant_info(name, old)
            if old is None:
                conn.execute(
                    sa.insert(TENANTS).values(tenant=name, **(_NO_TENANT_POLICY | values), updated_at=now)
                )
            else:
                conn.execute(sa.update(TENANTS).where(where).values(**values, updated_at=now))
            key_ids = conn.execute(
                sa.select(API_KEYS.c.id).where(API_KEYS.c.tenant == name, API_KEYS.c.revoked.is_(False))
            ).scalars()
            events = [{"key_id": k, "kind": "updated", "created_at": now} for k in key_ids]
            if events:
                conn.execute(sa.insert(KEY_EVENTS), events)
            row = conn.execute(sa.select(TENANTS).where(where)).one()
        return _tenant_info(name, row)

    def verify(self, api_key: str, now: float | None = None) -> VerifiedKey | None:
        """The principal of a valid key, else ``None``.

        Unknown, revoked and expired keys take the same path (hash, one indexed lookup,
        a constant-time comparison, the same checks) and all give ``None``; only a key
        that is malformed (wrong prefix or length) is turned away before hashing.
        """
        if not looks_like_key(api_key):
            return None
        presented = self._pepper.hash_key(api_key)
        with self._engine.connect() as conn:
            row = conn.execute(_WITH_TENANT.where(API_KEYS.c.key_hash == presented)).first()
        at = self._now() if now is None else int(now)
        info = _info(row) if row is not None else None
        stored = row.key_hash if row is not None else _DUMMY_HASH
        matches = hmac.compare_digest(stored.encode("ascii"), presented.encode("ascii"))
        if row is None or info is None or not matches or info.revoked or 0 < info.expires_at <= at:
            return None
        return _verified(info, row)

    def principals(self, key_ids: Iterable[str], now: float | None = None) -> list[VerifiedKey]:
        """The current principals of the keys ``key_ids`` that are still valid (not revoked,
        not expired); the others are left out."""
        ids = sorted(set(key_ids))
        if not ids:
            return []
        at = self._now() if now is None else int(now)
        with self._engine.connect() as conn:
            rows = conn.execute(_WITH_TENANT.where(API_KEYS.c.id.in_(ids))).all()
        out = []
        for row in rows:
            info = _info(row)
            if not info.revoked and not 0 < info.expires_at <= at:
                out.append(_verified(info, row))
        return out

    def max_event_id(self) -> int:
        """The id of the newest key event, or 0 if there is none."""
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(KEY_EVENTS.c.id))).scalar() or 0)

    def events_after(self, event_id: int, *, also: Iterable[int] = (), limit: int = 1000) -> list[KeyEvent]:
        """Events with id > ``event_id`` (at most ``limit``), plus those with ids in ``also``; by id."""
        cond = KEY_EVENTS.c.id > event_id
        extra = sorted(set(also))
        if extra:
            cond = sa.or_(cond, KEY_EVENTS.c.id.in_(extra))
        query = sa.select(KEY_EVENTS).where(cond).order_by(KEY_EVENTS.c.id).limit(limit + len(extra))
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [KeyEvent(int(r.id), r.key_id, r.kind, int(r.created_at)) for r in rows]


def _verified(info: KeyInfo, row: sa.Row[Any]) -> VerifiedKey:
    """The principal a valid key's record gives; ``row`` (from ``_WITH_TENANT``) has the
    tenant's budget and MCP servers, NULL if the tenant has no ``tenants`` row."""
    tenant = {*_TENANT_LABELS, "key_id"}
    same = {f.name: getattr(info, f.name) for f in fields(VerifiedKey) if f.name not in tenant}
    if row.tenant_budget_usd is None:
        return VerifiedKey(key_id=info.id, **same)
    return VerifiedKey(
        key_id=info.id,
        **same,
        tenant_budget_usd=float(row.tenant_budget_usd),
        tenant_budget_period=row.tenant_budget_period,
        tenant_mcp_servers=tuple(json.loads(row.tenant_mcp_servers)),
    )


def _tenant_info(name: str, row: sa.Row[Any] | None) -> TenantInfo:
    if row is None:
        return TenantInfo(tenant=name)
    return TenantInfo(
        tenant=name,
        budget_usd=float(row.budget_usd),
        budget_period=row.budget_period,
        updated_at=int(row.updated_at),
        mcp_servers=tuple(json.loads(row.mcp_servers)),
    )
