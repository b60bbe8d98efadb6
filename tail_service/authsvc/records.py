"""What the key store hands out and what it accepts: records, errors and argument checks.

:class:`KeyInfo` is a key as admins see it, :class:`VerifiedKey` the principal of a key
that verified, :class:`TenantInfo` a tenant's policy, :class:`KeyEvent` one row of the
``key_events`` log. The ``clean_*``
functions check and normalise what callers pass to :class:`~tail_service.authsvc.store.KeyStore`
and raise :class:`InvalidKeyArgument` naming the field; the bounds are the ``MAX_*``
constants. No SQL here.

Times are unix seconds (integers). Limits of 0 mean "no limit", ``expires_at`` 0 "never".
Budgets are US dollars per period (``day`` or ``month``, UTC calendar, or ``none``: never
resets); 0 dollars means "no budget", and its period is then always ``none``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

EventKind = Literal["revoked", "updated"]

#: budget periods: a UTC calendar day or month, or none (the budget never resets)
BUDGET_PERIODS = ("day", "month", "none")
#: the period of a budget given without one
DEFAULT_BUDGET_PERIOD = "month"

MAX_TEXT = 200  # longest name, tenant or model id
MAX_MODELS = 1000
MAX_LIMIT = 2**53  # limits stay exact in JSON and in every client language
MAX_EXPIRES = 253_402_300_799  # 9999-12-31: larger values are milliseconds by mistake
MAX_BUDGET_USD = 1e9


class KeyStoreError(Exception):
    """Base of the store's expected errors; messages never include a key."""


class InvalidKeyArgument(KeyStoreError, ValueError):
    """A field is out of range or malformed; the message names the field."""


class KeyNotFound(KeyStoreError, LookupError):
    """No key has that id (or that plaintext)."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as admins see it: the display prefix, never the key or its hash."""

    id: str
    name: str
    tenant: str
    allowed_models: tuple[str, ...]  # empty: every model
    rpm: int
    tpm: int
    max_concurrency: int
    expires_at: int
    revoked: bool
    prefix: str
    created_at: int
    updated_at: int
    response_cache: bool = False
    mcp_servers: tuple[str, ...] = ()  # empty: every configured MCP server
    budget_usd: float = 0.0  # 0: no budget
    budget_period: str = "none"


@dataclass(frozen=True, slots=True)
class VerifiedKey:
    """Who a verified key belongs to and what it may do (limits: 0 = unlimited)."""

    key_id: str
    tenant: str
    name: str
    allowed_models: tuple[str, ...]
    rpm: int
    tpm: int
    max_concurrency: int
    expires_at: int
    response_cache: bool = False
    mcp_servers: tuple[str, ...] = ()
    budget_usd: float = 0.0
    budget_period: str = "none"
    tenant_budget_usd: float = 0.0  # the tenant's budget, for all its keys together
    tenant_budget_period: str = "none"
    tenant_mcp_servers: tuple[str, ...] = ()  # the tenant's MCP servers; empty: every configured one


@dataclass(frozen=True, slots=True)
class TenantInfo:
    """A tenant's policy. Tenants exist as soon as a key names them; one whose policy was
    never set has budget 0 (none), every MCP server and ``updated_at`` 0."""

    tenant: str
    budget_usd: float = 0.0
    budget_period: str = "none"
    updated_at: int = 0
    mcp_servers: tuple[str, ...] = ()  # for all its keys, with each key's own; empty: every one


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One row of ``key_events``: ``key_id`` was revoked or updated."""

    id: int
    key_id: str
    kind: EventKind
    created_at: int


def clean_text(field: str, value: str, *, required: bool) -> str:
    """``value`` stripped; :class:`InvalidKeyArgument` if empty and ``required``, or over :data:`MAX_TEXT`."""
    value = value.strip()
    if required and not value:
        raise InvalidKeyArgument(f"{field} is required")
    if len(value) > MAX_TEXT:
        raise InvalidKeyArgument(f"{field} is longer than {MAX_TEXT} characters")
    return value


def clean_limit(field: str, value: int) -> int:
    """A limit in 0 (unlimited) .. :data:`MAX_LIMIT`, else :class:`InvalidKeyArgument`."""
    if not 0 <= value <= MAX_LIMIT:
        raise InvalidKeyArgument(f"{field} must be between 0 (unlimited) and {MAX_LIMIT}")
    return int(value)


def clean_expires(value: int) -> int:
    """Unix seconds in 0 (never) .. :data:`MAX_EXPIRES`, else :class:`InvalidKeyArgument`."""
    if not 0 <= value <= MAX_EXPIRES:
        raise InvalidKeyArgument("expires_at must be unix seconds, or 0 for never")
    return int(value)


def clean_models(values: Iterable[str], field: str = "allowed_models") -> tuple[str, ...]:
    """Names (model ids, MCP servers) checked like text, duplicates dropped in order; at
    most :data:`MAX_MODELS`."""
    out: dict[str, None] = {}
    for v in values:
        out[clean_text(f"{field} entry", v, required=True)] = None
    if len(out) > MAX_MODELS:
        raise InvalidKeyArgument(f"{field} holds more than {MAX_MODELS} entries")
    return tuple(out)


#: what an MCP server may be called (the gateway's ``mcp_servers[].name``)
MCP_SERVER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def clean_mcp_servers(values: Iterable[str]) -> tuple[str, ...]:
    """MCP server names, checked like :func:`clean_models` and against the gateway's
    naming rule (a name no server can have would silently allow nothing)."""
    names = clean_models(values, "mcp_servers")
    for name in names:
        if not MCP_SERVER_NAME.fullmatch(name):
            raise InvalidKeyArgument(
                f"mcp_servers entry {name!r} is not an MCP server name (1-64 of A-Z a-z 0-9 _ -)"
            )
    return names


def clean_budget(usd: float, period: str | None, *, current_period: str | None = None) -> tuple[float, str]:
    """A budget as ``(usd, period)``, checked; :class:`InvalidKeyArgument` names ``budget_usd``
    or ``budget_period``.

    ``usd`` must be finite, in 0 .. :data:`MAX_BUDGET_USD`; ``period`` one of
    :data:`BUDGET_PERIODS` (case and spaces ignored). A period left out (``None`` or
    empty) is ``current_period`` (the budget being changed, if it has one), else
    :data:`DEFAULT_BUDGET_PERIOD`. A budget of 0 is "no budget" and its period ``none``.
    """
    if not (math.isfinite(usd) and 0 <= usd <= MAX_BUDGET_USD):
        raise InvalidKeyArgument(f"budget_usd must be a number from 0 (no budget) to {MAX_BUDGET_USD:.0f}")
    name = (period or "").strip().lower()
    if name and name not in BUDGET_PERIODS:
        raise InvalidKeyArgument(f"budget_period must be one of {', '.join(BUDGET_PERIODS)}")
    if usd == 0:
        return 0.0, "none"
    return float(usd), name or current_period or DEFAULT_BUDGET_PERIOD
