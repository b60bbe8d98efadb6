"""CLI commands for the services and their administration: certs, auth-service,
secret-service, keys, tenants and secrets. Registered on the main app by :mod:`tail_service.cli`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from tail_service.admin import AdminError, KeysAdmin, SecretsAdmin, resolve
from tail_service.settings import ConfigError, Settings, default_state_dir, load_settings

if TYPE_CHECKING:
    from tail_service.proto import auth_pb2

StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="state directory of the stack [default: as `up`]", envvar="TAIL_STATE_DIR"
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: $TAIL_CONFIG)", envvar="TAIL_CONFIG"),
]
AuthAddrOpt = Annotated[str | None, typer.Option("--auth-address", help="auth-service host:port")]
SecretsAddrOpt = Annotated[str | None, typer.Option("--secrets-address", help="secret-service host:port")]
TlsDirOpt = Annotated[
    Path | None, typer.Option("--tls-dir", help="directory with ca.pem, admin.pem and admin.key")
]

keys_app = typer.Typer(help="Create, list, revoke and update API keys (auth-service).", no_args_is_help=True)
tenants_app = typer.Typer(
    help="Tenant policy for all of a tenant's keys: budgets and MCP servers.", no_args_is_help=True
)
secrets_app = typer.Typer(help="Provider credentials in secret-service.", no_args_is_help=True)
certs_app = typer.Typer(help="The development PKI for mutual TLS.", no_args_is_help=True)


def _fail(message: str, exit_code: int = 1) -> typer.Exit:
    typer.echo(f"tail-service: {message}", err=True)
    return typer.Exit(exit_code)


def _service_settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"tail-service: {exc}", err=True)
        raise typer.Exit(2) from None


@certs_app.command("init")
def certs_init(
    state_dir: StateOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="where to write [default: STATE_DIR/certs]")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing CA and certificates")] = False,
) -> None:
    """Create a development CA and certificates for tail, auth, secrets and admin."""
    from tail_service.certs import init_dev_pki

    directory = out or (state_dir or default_state_dir()) / "certs"
    files = init_dev_pki(directory, force=force)
    for identity, f in files.items():
        typer.echo(f"{identity}\t{f.cert}\t{f.key}")
    typer.echo(f"ca\t{directory / 'ca.pem'}")


def auth_service(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Run auth-service (API keys and tenant policy) over gRPC with mutual TLS."""
    from tail_service.authsvc.server import run
    from tail_service.logging import configure_logging

    settings = _service_settings(config)
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        run(settings.auth_service, base_dir=state_dir or default_state_dir())
    except (ValueError, OSError) as exc:
        raise _fail(f"auth-service: {exc}") from None


def secret_service(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Run secret-service (encrypted provider credentials) over gRPC with mutual TLS."""
    from tail_service.logging import configure_logging
    from tail_service.secretsvc.server import run

    settings = _service_settings(config)
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        run(settings.secret_service, base_dir=state_dir or default_state_dir())
    except (ValueError, OSError) as exc:
        raise _fail(f"secret-service: {exc}") from None


A = TypeVar("A", KeysAdmin, SecretsAdmin)


@contextmanager
def _admin(
    kind: type[A], service: str, state_dir: Path | None, address: str | None, tls_dir: Path | None
) -> Iterator[A]:
    """An admin client for ``service``; its errors end the command with a one-line message."""
    try:
        admin = kind(resolve(service, state_dir or default_state_dir(), address, tls_dir))
    except AdminError as exc:
        raise _fail(str(exc)) from None
    try:
        yield admin
    except AdminError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    finally:
        admin.close()


def _keys(
    state_dir: Path | None, address: str | None, tls_dir: Path | None
) -> AbstractContextManager[KeysAdmin]:
    return _admin(KeysAdmin, "auth_service", state_dir, address, tls_dir)


def _secrets(
    state_dir: Path | None, address: str | None, tls_dir: Path | None
) -> AbstractContextManager[SecretsAdmin]:
    return _admin(SecretsAdmin, "secret_service", state_dir, address, tls_dir)


def _models(value: str | None) -> list[str]:
    return [m.strip() for m in (value or "").split(",") if m.strip()]


BudgetOpt = Annotated[float, typer.Option("--budget", help="USD per budget period (0: no budget)")]
BudgetPeriodOpt = Annotated[
    str | None,
    typer.Option(
        "--budget-period",
        help="day or month (UTC calendar), or none (never resets) [default: month, or the current one]",
    ),
]


def _budget(b: auth_pb2.Budget, empty: str = "none") -> str:
    """``$5/day``, ``$100/month``, ``$20 total`` (period none), or ``empty`` without a budget."""
    return _spend(b.usd, b.period, empty)


def _tenant(info: auth_pb2.TenantInfo) -> str:
    """``tenant acme: budget $100/month, mcp_servers=docs,search`` (``*``: every configured one)."""
    servers = ",".join(info.mcp_servers) or "*"
    return f"tenant {info.tenant}: budget {_budget(info.budget)}, mcp_servers={servers}"


def _spend(usd: float, period: str, empty: str = "none") -> str:
    if not usd:
        return empty
    amount = f"{usd:.6f}".rstrip("0").rstrip(".")
    return f"${amount} total" if period == "none" else f"${amount}/{period}"


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="a label for the key")] = "default",
    tenant: Annotated[str, typer.Option(help="the tenant the key belongs to")] = "default",
    models: Annotated[
        str | None, typer.Option(help="comma-separated models it may use [default: all]")
    ] = None,
    rpm: Annotated[int, typer.Option(help="requests per minute (0: no limit)")] = 0,
    tpm: Annotated[int, typer.Option(help="tokens per minute (0: no limit)")] = 0,
    max_concurrency: Annotated[int, typer.Option(help="requests in flight (0: no limit)")] = 0,
    expires_in: Annotated[int, typer.Option(help="seconds until it expires (0: never)")] = 0,
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="use the response cache by default")
    ] = False,
    mcp_servers: Annotated[
        str | None, typer.Option(help="comma-separated MCP servers its agent runs may use [default: all]")
    ] = None,
    budget: BudgetOpt = 0.0,
    budget_period: BudgetPeriodOpt = None,
    state_dir: StateOpt = None,
    auth_address: AuthAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Create a key. The key itself is printed once, alone, as the last line."""
    expires_at = int(time.time()) + expires_in if expires_in > 0 else 0
    with _keys(state_dir, auth_address, tls_dir) as admin:
        resp = admin.create(
            name=name,
            tenant=tenant,
            models=_models(models),
            rpm=rpm,
            tpm=tpm,
            max_concurrency=max_concurrency,
            expires_at=expires_at,
            response_cache=cache,
            mcp_servers=_models(mcp_servers),
            budget_usd=budget,
            budget_period=budget_period or "",
        )
    spend = f", budget {_budget(resp.key.budget)}" if resp.key.budget.usd else ""
    typer.echo(
        f"created key {resp.key.id} ({resp.key.prefix}...) for tenant {resp.key.tenant}{spend}", err=True
    )
    typer.echo("store it now: it is shown only once", err=True)
    typer.echo(resp.api_key)


def key_record(k: auth_pb2.KeyInfo) -> dict[str, Any]:
    """A key's metadata as JSON-ready data: never the key itself, nor its hash (neither is stored)."""
    return {
        "id": k.id,
        "prefix": k.prefix,
        "name": k.name,
        "tenant": k.tenant,
        "models": list(k.allowed_models),  # empty: every model
        "rpm": k.limits.rpm,
        "tpm": k.limits.tpm,
        "max_concurrency": k.limits.max_concurrency,
        "expires_at": k.expires_at or None,  # unix seconds; null: never
        "created_at": k.created_at or None,
        "revoked": k.revoked,
        "response_cache": k.response_cache,
        "mcp_servers": list(k.mcp_servers),  # empty: every configured MCP server
        "budget_usd": k.budget.usd,  # 0: no budget
        "budget_period": k.budget.period or "none",  # day, month (UTC) or none (never resets)
    }


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "never"


def _limit(n: int) -> str:
    return str(n) if n else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns under a header row, two spaces apart (no trailing spaces)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str, typer.Option(help="only this tenant")] = "",
    all_keys: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON array of key objects (for scripts)")
    ] = False,
    state_dir: StateOpt = None,
    auth_address: AuthAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """List keys: display prefixes and policy only (keys are never stored, only their HMAC)."""
    with _keys(state_dir, auth_address, tls_dir) as admin:
        keys = [key_record(k) for k in admin.list(tenant=tenant, include_revoked=all_keys)]
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    header = [
        "ID",
        "PREFIX",
        "NAME",
        "TENANT",
        "MODELS",
        "RPM",
        "TPM",
        "CONCURRENCY",
        "BUDGET",
        "EXPIRES",
        "STATUS",
    ]
    rows = [
        [
            k["id"],
            k["prefix"] + "...",
            k["name"],
            k["tenant"],
            ",".join(k["models"]) or "*",
            _limit(k["rpm"]),
            _limit(k["tpm"]),
            _limit(k["max_concurrency"]),
            _spend(k["budget_usd"], k["budget_period"], "-"),
            _when(k["expires_at"]),
            ("revoked" if k["revoked"] else "active") + (", cache" if k["response_cache"] else ""),
        ]
        for k in keys
    ]
    typer.echo(table(header, rows))


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="the key's id, or the key itself")],
    state_dir: StateOpt = None,
    auth_address: AuthAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Revoke a key; every replica stops accepting it within about a second."""
    with _keys(state_dir, auth_address, tls_dir) as admin:
        info = admin.revoke(key)
    typer.echo(f"revoked {info.id} ({info.prefix}...)")


@keys_app.command("update")
def keys_update(
    key_id: Annotated[str, typer.Argument(help="the key's id")],
    rpm: Annotated[int | None, typer.Option(help="requests per minute (0: no limit)")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute (0: no limit)")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="requests in flight (0: no limit)")] = None,
    name: Annotated[str | None, typer.Option(help="a new label")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated models ('' for all)")] = None,
    cache: Annotated[
        bool | None, typer.Option("--cache/--no-cache", help="use the response cache by default")
    ] = None,
    mcp_servers: Annotated[
        str | None, typer.Option(help="comma-separated MCP servers its agent runs may use ('' for all)")
    ] = None,
    budget: Annotated[
        float | None, typer.Option("--budget", help="USD per budget period (0: remove it)")
    ] = None,
    budget_period: BudgetPeriodOpt = None,
    state_dir: StateOpt = None,
    auth_address: AuthAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Change a key's limits, label, models, MCP servers or budget."""
    from tail_service.proto import auth_pb2

    req = auth_pb2.UpdateKeyRequest(id=key_id)
    if rpm is not None:
        req.rpm = rpm
    if tpm is not None:
        req.tpm = tpm
    if max_concurrency is not None:
        req.max_concurrency = max_concurrency
    if name is not None:
        req.name = name
    if models is not None:
        req.set_allowed_models = True
        req.allowed_models.extend(_models(models))
    if cache is not None:
        req.response_cache = cache
    if mcp_servers is not None:
        req.set_mcp_servers = True
        req.mcp_servers.extend(_models(mcp_servers))
    if budget is not None:
        req.budget_usd = budget
    if budget_period is not None:
        req.budget_period = budget_period
    with _keys(state_dir, auth_address, tls_dir) as admin:
        info = admin.update(req)
    typer.echo(
        f"updated {info.id}: rpm={info.limits.rpm} tpm={info.limits.tpm} "
        f"max_concurrency={info.limits.max_concurrency} models={','.join(info.allowed_models) or '*'} "
        f"mcp_servers={','.join(info.mcp_servers) or '*'} budget={_budget(info.budget)}"
    )


@tenants_app.command("budget")
def tenants_budget(
    tenant: Annotated[str, typer.Argument(help="the tenant, as its keys name it")],
    budget: Annotated[
        float | None, typer.Option("--budget", help="USD per budget period for all its keys (0: remove it)")
    ] = None,
    budget_period: BudgetPeriodOpt = None,
    state_dir: StateOpt = None,
    auth_address: AuthAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Set a tenant's budget (all its keys together), or show it without --budget.

    A change reaches every gateway within about a second."""
    if budget is None and budget_period is not None:
        raise _fail("--budget-period needs --budget (the amount for the period)", 2)
    with _keys(state_dir, auth_address, tls_dir) as admin:
        if budget is None:
            info = admin.tenant(tenant)
        else:
            info = admin.set_tenant_budget(tenant, budget, budget_period or "")
    typer.echo(_tenant(info))


@tenants_app.command("mcp-servers")
def tenants_mcp_servers(
    tenant: Annotated[str, typer.Argument(help="the tenant, as its keys name it")],
    servers: Annotated[
        str | None,
        typer.Argument(help="comma-separated MCP servers all its keys' agent runs may use ('' for all)"),
    ] = None,
    state_dir: StateOpt = None,
    auth_address: AuthAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Set the MCP servers of all a tenant's keys, or show them without a list.

    Each key's own list applies too. A change reaches every gateway within about a second."""
    with _keys(state_dir, auth_address, tls_dir) as admin:
        if servers is None:
            info = admin.tenant(tenant)
        else:
            info = admin.set_tenant_mcp_servers(tenant, _models(servers))
    typer.echo(_tenant(info))


def _read_value() -> bytes:
    if sys.stdin.isatty():
        typer.echo("value (end with Ctrl-D): ", err=True, nl=False)
    value = sys.stdin.buffer.read()
    value = value[:-1] if value.endswith(b"\n") else value
    value = value[:-1] if value.endswith(b"\r") else value
    if not value:
        raise _fail("no value on standard input")
    return value


@secrets_app.command("set")
def secrets_set(
    name: Annotated[str, typer.Argument(help="the secret's name, e.g. openai-key")],
    state_dir: StateOpt = None,
    secrets_address: SecretsAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Store a secret (a new version if it exists). The value is read from stdin, never argv."""
    _write_secret(name, rotate=False, state_dir=state_dir, address=secrets_address, tls_dir=tls_dir)


@secrets_app.command("rotate")
def secrets_rotate(
    name: Annotated[str, typer.Argument(help="an existing secret's name")],
    state_dir: StateOpt = None,
    secrets_address: SecretsAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Replace an existing secret's value (read from stdin) with a new version."""
    _write_secret(name, rotate=True, state_dir=state_dir, address=secrets_address, tls_dir=tls_dir)


def _write_secret(
    name: str, *, rotate: bool, state_dir: Path | None, address: str | None, tls_dir: Path | None
) -> None:
    value = _read_value()
    with _secrets(state_dir, address, tls_dir) as admin:
        meta = admin.rotate(name, value) if rotate else admin.set(name, value)
    typer.echo(f"{'rotated' if rotate else 'stored'} {meta.name}, version {meta.version}")


@secrets_app.command("list")
def secrets_list(
    state_dir: StateOpt = None,
    secrets_address: SecretsAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """List secret names (never values)."""
    with _secrets(state_dir, secrets_address, tls_dir) as admin:
        for name in admin.list():
            typer.echo(name)


@secrets_app.command("delete")
def secrets_delete(
    name: Annotated[str, typer.Argument(help="the secret's name")],
    state_dir: StateOpt = None,
    secrets_address: SecretsAddrOpt = None,
    tls_dir: TlsDirOpt = None,
) -> None:
    """Delete a secret and all its versions."""
    with _secrets(state_dir, secrets_address, tls_dir) as admin:
        deleted = admin.delete(name)
    if not deleted:
        raise _fail(f"no secret named {name}")
    typer.echo(f"deleted {name}")


def register(cli: typer.Typer) -> None:
    """Add these commands to the main ``tail-service`` app."""
    cli.command("auth-service")(auth_service)
    cli.command("secret-service")(secret_service)
    cli.add_typer(keys_app, name="keys")
    cli.add_typer(tenants_app, name="tenants")
    cli.add_typer(secrets_app, name="secrets")
    cli.add_typer(certs_app, name="certs")
