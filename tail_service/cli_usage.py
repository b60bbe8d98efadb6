"""``tail-service usage``: who used what and what it cost, read from the usage ledger.

It reads the store directly (the operator's view over every key and tenant), so it runs
wherever the store is reachable: beside ``tail-service up`` with the same ``--state-dir``,
or with the production config.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from tail_service.core.pricing import NANOS
from tail_service.core.usage_query import WIDTHS
from tail_service.settings import ConfigError, load_settings
from tail_service.store import Store
from tail_service.store.usage import UsageStore

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: what --group-by takes -> the column's name in the ledger's sums
_GROUP_ALIASES = {
    "key": "api_key_id",
    "api_key_id": "api_key_id",
    "model": "model",
    "tenant": "tenant",
    "source": "source",
}


def parse_time(raw: str, now: float) -> int:
    """``30m``, ``24h``, ``7d``, ``2w`` ago; an ISO date or time (UTC unless it says); or unix
    seconds."""
    raw = raw.strip()
    if m := re.fullmatch(r"(\d{1,6})([mhdw])", raw):
        return int(now) - int(m.group(1)) * _UNITS[m.group(2)]
    if raw.isdigit():
        return int(raw)
    try:
        at = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise typer.BadParameter(f"{raw!r}: use e.g. 24h, 7d, 2026-12-01 or unix seconds") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return int(at.timestamp())


def _groups(raw: str | None) -> tuple[str, ...]:
    out: list[str] = []
    for part in (raw or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part not in _GROUP_ALIASES:
            raise typer.BadParameter(f"{part!r}: group by model, key, tenant or source")
        if _GROUP_ALIASES[part] not in out:
            out.append(_GROUP_ALIASES[part])
    return tuple(out)


def usage_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="state directory of `up`")] = None,
    key: Annotated[str | None, typer.Option("--key", help="only this API key id")] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant")] = None,
    since: Annotated[str, typer.Option("--since", help="start: 24h, 7d, 2026-12-01, unix seconds")] = "7d",
    until: Annotated[str | None, typer.Option("--until", help="end (default: now)")] = None,
    bucket: Annotated[str, typer.Option("--bucket", help="bucket width: 1m, 1h or 1d")] = "1d",
    group_by: Annotated[
        str | None, typer.Option("--group-by", help="comma-separated: model, key, tenant, source")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one per bucket and group")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row")] = False,
) -> None:
    """Usage and cost per bucket of time (and per model, key, tenant or source), from the ledger."""
    if as_json and as_csv:
        raise typer.BadParameter("--json or --csv, not both")
    if bucket not in WIDTHS:
        raise typer.BadParameter(f"--bucket {bucket!r}: use 1m, 1h or 1d")
    now = time.time()
    start = parse_time(since, now)
    end = parse_time(until, now) if until else int(now) + 1
    if end <= start:
        raise typer.BadParameter("--until must be after --since")
    groups = _groups(group_by)
    try:
        settings = load_settings(config, state_dir=state_dir)
    except ConfigError as exc:
        typer.echo(f"tail-service: {exc}", err=True)
        raise typer.Exit(2) from None
    store = Store(settings.store, settings.state_dir)
    try:
        store.migrate()
        width = WIDTHS[bucket][0]
        start -= start % width  # whole minutes, hours or UTC days
        rows = UsageStore(store).sums(
            start=start, end=end, width=width, group_by=groups, key_id=key, tenant=tenant
        )
    finally:
        store.close()
    records = [_record(row, start, width, groups) for row in rows]
    if as_json:
        for rec in records:
            typer.echo(json.dumps(rec))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=_columns(groups), lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "cost_usd": f"{r['cost_usd']:.9f}"} for r in records)
    else:
        _table(records, groups)


def _columns(groups: tuple[str, ...]) -> list[str]:
    return ["start", *groups, "requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd"]


def _record(row: dict[str, Any], start: int, width: int, groups: tuple[str, ...]) -> dict[str, Any]:
    at = start + int(row["bucket"]) * width
    rec: dict[str, Any] = {"start": dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for g in groups:
        rec[g] = row[g]
    rec.update(
        requests=int(row["requests"]),
        input_tokens=int(row["prompt_tokens"]),
        output_tokens=int(row["completion_tokens"]),
        cached_tokens=int(row["cached_tokens"]),
        cost_usd=round(int(row["cost_nanos"]) / NANOS, 9),
    )
    return rec


def _table(records: list[dict[str, Any]], groups: tuple[str, ...]) -> None:
    columns = _columns(groups)
    if not records:
        typer.echo("no usage in this range")
        return
    cells = [[f"{r[c]:.6f}" if c == "cost_usd" else str(r[c]) for c in columns] for r in records]
    total = ["total", *[""] * len(groups)]
    total += [str(sum(r[c] for r in records)) for c in columns[1 + len(groups) : -1]]
    total.append(f"{sum(r['cost_usd'] for r in records):.6f}")
    widths = [max(len(c), *(len(row[i]) for row in [*cells, total])) for i, c in enumerate(columns)]
    numeric = set(range(1 + len(groups), len(columns)))

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in numeric else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    typer.echo(line(columns))
    for row in cells:
        typer.echo(line(row))
    typer.echo(line(total))
