"""Named, versioned secrets in SQL (SQLite or PostgreSQL), encrypted at rest, with an audit trail.

Tables (created by migrations at start-up):

``secrets``
    One row per name ever used: ``latest_version`` and ``deleted_at`` (NULL while live).
    Deleting a secret removes all its versions but keeps this row, so a later put of
    the same name continues the numbering: a version number is never reused for a
    different value, and clients that cache by ``(name, version)`` stay correct.
``secret_versions``
    ``(name, version)`` → the :class:`~tail_service.secretsvc.crypto.SealedValue` columns
    and ``created_at`` (unix seconds). Never the plaintext.
``secret_audit``
    One row per access: ``ts`` (unix milliseconds), ``identity``, ``action``, ``name``,
    ``version``, ``outcome`` (``ok``, ``denied``, ``not_found``, ``invalid`` or ``error``
    when a stored row failed to decrypt). Never the value.

Methods that take ``actor`` write that access's audit row themselves (mutations in the
same transaction as the change); without ``actor`` nothing is audited.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from tail_service.db import migrate
from tail_service.secretsvc.crypto import MasterKey, MasterKeyMismatch, SealedValue, SecretCryptoError

log = logging.getLogger("tail_service.secretsvc.audit")

Action = Literal["put", "get", "list", "delete", "rotate"]
Outcome = Literal["ok", "denied", "not_found", "invalid", "error"]

#: longest secret name, in characters
MAX_NAME_CHARS = 128
#: largest secret value, in bytes (64 KiB)
MAX_VALUE_BYTES = 64 * 1024
NAME_PATTERN = re.compile(r"[A-Za-z0-9._/-]{1,128}")
#: the name under which :func:`tail_service.db.migrate` records this schema's version
MIGRATION_SERVICE = "secret-service"

_META = sa.MetaData()

secrets_table = sa.Table(
    "secrets",
    _META,
    sa.Column("name", sa.String(MAX_NAME_CHARS), primary_key=True),
    sa.Column("latest_version", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("deleted_at", sa.BigInteger, nullable=True),
)

secret_versions = sa.Table(
    "secret_versions",
    _META,
    sa.Column("name", sa.String(MAX_NAME_CHARS), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("nonce", sa.LargeBinary, nullable=False),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
    sa.Column("wrap_nonce", sa.LargeBinary, nullable=False),
    sa.Column("master_key_id", sa.String(16), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

secret_audit = sa.Table(
    "secret_audit",
    _META,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("identity", sa.String(256), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("name", sa.String(MAX_NAME_CHARS), nullable=True),
    sa.Column("version", sa.BigInteger, nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Index("ix_secret_audit_name_ts", "name", "ts"),
)


def _create_tables(conn: Connection) -> None:
    _META.create_all(conn, tables=[secrets_table, secret_versions, secret_audit])


#: the schema, one function per version, applied in order at start-up
MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_create_tables,)


class InvalidSecret(ValueError):
    """A bad name, value or version; the message says which rule was broken (never the value)."""


class SecretNotFound(LookupError):
    """No such secret, or no such version of it."""


@dataclass(frozen=True, slots=True)
class SecretMeta:
    """A secret version's public facts: ``created_at`` is unix seconds; ``version`` counts from 1."""

    name: str
    version: int
    created_at: int


def printable(text: str, limit: int = MAX_NAME_CHARS) -> str:
    """``text`` cut to ``limit`` characters with control characters replaced: safe for logs and SQL."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def validate_name(name: str) -> None:
    """Raise :class:`InvalidSecret` unless ``name`` is 1..128 characters of ``[A-Za-z0-9._/-]``."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidSecret(f"secret names are 1..{MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ / -")


def validate_value(value: bytes) -> None:
    """Raise :class:`InvalidSecret` unless ``value`` is 1..64 KiB bytes (the message gives only its size)."""
    if not 1 <= len(value) <= MAX_VALUE_BYTES:
        raise InvalidSecret(f"secret values are 1..{MAX_VALUE_BYTES} bytes (got {len(value)})")


class SecretStore:
    """The secrets of one database, sealed under one master key. Thread-safe (stateless over the engine).

    Construction applies pending migrations. Versions of a name are 1, 2, 3, ... and never
    reused, even across a delete; ``get(name, 0)`` is the latest.
    """

    def __init__(self, engine: Engine, master_key: MasterKey) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"secret-service supports SQLite and PostgreSQL, not {dialect}")
        self._engine = engine
        self._key = master_key
        self._insert: Callable[[sa.Table], Any] = sqlite.insert if dialect == "sqlite" else postgresql.insert
        migrate(engine, MIGRATION_SERVICE, MIGRATIONS)

    def __repr__(self) -> str:
        return f"SecretStore({self._engine!r}, master_key_id={self._key.key_id!r})"

    def verify_master_key(self) -> None:
        """Raise :class:`MasterKeyMismatch` if any stored version was sealed under another master key."""
        stmt = (
            sa.select(secret_versions.c.master_key_id, sa.func.count())
            .where(secret_versions.c.master_key_id != self._key.key_id)
            .group_by(secret_versions.c.master_key_id)
        )
        with self._engine.connect() as conn:
            foreign = {str(k): int(n) for k, n in conn.execute(stmt)}
        if foreign:
            ids = ", ".join(sorted(foreign))
            raise MasterKeyMismatch(
                f"master key mismatch: {sum(foreign.values())} stored secret version(s) were encrypted "
                f"under master key id {ids}, but the configured master key's id is {self._key.key_id}"
            )

    def put(self, name: str, value: bytes, *, actor: str | None = None) -> SecretMeta:
        """Store ``value`` as a new version of ``name``, creating the secret if it is new or deleted.

        The version is one more than the last ever used for the name (1 for a new name).
        """
        return self._write("put", name, value, actor)

    def rotate(self, name: str, value: bytes, *, actor: str | None = None) -> SecretMeta:
        """Store ``value`` as the next version of an existing secret; :class:`SecretNotFound` if none."""
        return self._write("rotate", name, value, actor)

    def get(self, name: str, version: int = 0, *, actor: str | None = None) -> tuple[SecretMeta, bytes]:
        """``(meta, value)`` of version ``version`` (0: the latest) of ``name``.

        Raises :class:`SecretNotFound`, :class:`InvalidSecret`, or a
        :class:`~tail_service.secretsvc.crypto.SecretCryptoError` if the row fails to decrypt.
        """
        self._validate(actor, "get", name, version=version)
        v = secret_versions.c
        stmt = sa.select(secret_versions).where(v.name == name)
        stmt = stmt.where(v.version == version) if version else stmt.order_by(v.version.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            self._audit_once(actor, "get", name, version or None, "not_found")
            raise SecretNotFound(
                f"secret {name!r}" + (f" has no version {version}" if version else " not found")
            )
        sealed = SealedValue(row.ciphertext, row.nonce, row.wrapped_key, row.wrap_nonce, row.master_key_id)
        try:
            value = self._key.open(name, row.version, sealed)
        except SecretCryptoError:
            self._audit_once(actor, "get", name, row.version, "error")
            raise
        self._audit_once(actor, "get", name, row.version, "ok")
        return SecretMeta(name, row.version, row.created_at), value

    def list_names(self, *, actor: str | None = None) -> list[str]:
        """The names of all live secrets, sorted by code point (the same on every backend)."""
        stmt = sa.select(secrets_table.c.name).where(secrets_table.c.deleted_at.is_(None))
        with self._engine.connect() as conn:
            names = sorted(str(n) for n in conn.scalars(stmt))
        self._audit_once(actor, "list", None, None, "ok")
        return names

    def delete(self, name: str, *, actor: str | None = None) -> bool:
        """Remove every version of ``name``; ``False`` if there was no live secret of that name."""
        self._validate(actor, "delete", name)
        s = secrets_table.c
        with self._engine.begin() as conn:
            found = (
                conn.execute(
                    sa.update(secrets_table)
                    .where(s.name == name, s.deleted_at.is_(None))
                    .values(deleted_at=int(time.time()))
                    .returning(s.name)
                ).first()
                is not None
            )
            if found:
                conn.execute(sa.delete(secret_versions).where(secret_versions.c.name == name))
            self._audit(conn, actor, "delete", name, None, "ok" if found else "not_found")
        return found

    def audit(
        self, identity: str, action: str, name: str | None, version: int | None, outcome: Outcome
    ) -> None:
        """Record one access (e.g. a denied call) in its own transaction, and log it (see :meth:`_audit`)."""
        with self._engine.begin() as conn:
            self._audit(conn, identity, action, name, version, outcome)

    # -- internals ---------------------------------------------------------------------

    def _write(self, action: Action, name: str, value: bytes, actor: str | None) -> SecretMeta:
        self._validate(actor, action, name, value=value)
        now = int(time.time())
        with self._engine.begin() as conn:
            version = conn.execute(self._next_version(action, name, now)).scalar_one_or_none()
            if version is not None:
                sealed = self._key.seal(name, version, value)
                conn.execute(
                    sa.insert(secret_versions).values(
                        name=name,
                        version=version,
                        ciphertext=sealed.ciphertext,
                        nonce=sealed.nonce,
                        wrapped_key=sealed.wrapped_key,
                        wrap_nonce=sealed.wrap_nonce,
                        master_key_id=sealed.master_key_id,
                        created_at=now,
                    )
                )
            self._audit(conn, actor, action, name, version, "ok" if version is not None else "not_found")
        if version is None:
            raise SecretNotFound(f"secret {name!r} not found")
        return SecretMeta(name, int(version), now)

    def _next_version(self, action: Action, name: str, now: int) -> sa.Executable:
        """A statement returning the new version number (row-locks the name on PostgreSQL)."""
        s = secrets_table.c
        if action == "rotate":
            return (
                sa.update(secrets_table)
                .where(s.name == name, s.deleted_at.is_(None))
                .values(latest_version=s.latest_version + 1)
                .returning(s.latest_version)
            )
        stmt = self._insert(secrets_table).values(
            name=name, latest_version=1, created_at=now, deleted_at=None
        )
        upsert: sa.Executable = stmt.on_conflict_do_update(
            index_elements=[s.name], set_={"latest_version": s.latest_version + 1, "deleted_at": None}
        ).returning(s.latest_version)
        return upsert

    def _validate(
        self, actor: str | None, action: Action, name: str, *, value: bytes | None = None, version: int = 0
    ) -> None:
        try:
            validate_name(name)
            if value is not None:
                validate_value(value)
            if version < 0:
                raise InvalidSecret("version must be 0 (the latest) or a positive version number")
        except InvalidSecret:
            self._audit_once(actor, action, name, version or None, "invalid")
            raise

    def _audit_once(
        self, actor: str | None, action: str, name: str | None, version: int | None, outcome: Outcome
    ) -> None:
        if actor is not None:
            self.audit(actor, action, name, version, outcome)

    def _audit(
        self,
        conn: Connection,
        actor: str | None,
        action: str,
        name: str | None,
        version: int | None,
        outcome: Outcome,
    ) -> None:
        if actor is None:
            return
        identity = printable(actor, 256)
        safe_name = printable(name) if name is not None else None
        conn.execute(
            sa.insert(secret_audit).values(
                ts=time.time_ns() // 1_000_000,
                identity=identity,
                action=action,
                name=safe_name,
                version=version,
                outcome=outcome,
            )
        )
        # The table is the audit trail. The log shows changes and refusals; reads (the
        # HTTP service polls each secret every few seconds) only at DEBUG.
        level = (
            logging.WARNING
            if outcome == "denied"
            else logging.INFO
            if action in ("put", "rotate", "delete")
            else logging.DEBUG
        )
        log.log(
            level,
            "secret audit: identity=%s action=%s name=%r version=%s outcome=%s",
            identity,
            action,
            safe_name,
            version if version is not None else "-",
            outcome,
        )
