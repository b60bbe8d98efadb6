"""``tail-service batch``: submit, watch, cancel and list batches over the HTTP API.

A client of the OpenAI Files and Batch API like any other: it talks to a running service
(``--base-url``, default ``http://127.0.0.1:8080/v1``) with an API key (``--api-key`` or
``$OPENAI_API_KEY``). The input file is streamed from disk, never read into memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

batch_cli = typer.Typer(help="Submit and follow batches (the OpenAI Batch API) on a running service.")

TERMINAL = {"completed", "failed", "expired", "cancelled"}
DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"

T = TypeVar("T")

BaseUrlOpt = Annotated[
    str,
    typer.Option("--base-url", envvar="OPENAI_BASE_URL", help="the service's /v1 URL", show_default=True),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="OPENAI_API_KEY", help="API key [default: $OPENAI_API_KEY]", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the batch object as JSON")]


class ApiError(Exception):
    """The service answered with an error (its OpenAI-style message)."""


class Api:
    """A few calls of the OpenAI API, over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        text = await resp.text()
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:300] or resp.reason
        raise ApiError(f"HTTP {resp.status}: {message}")

    async def json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        async with self._session.request(method, self._base + path, **kw) as resp:
            await self._check(resp)
            result: dict[str, Any] = await resp.json()
            return result

    async def upload(self, path: Path, purpose: str) -> dict[str, Any]:
        with path.open("rb") as stream:
            form = aiohttp.FormData()
            form.add_field("purpose", purpose)
            form.add_field("file", stream, filename=path.name, content_type="application/jsonl")
            return await self.json("POST", "/files", data=form)

    async def download(self, file_id: str, target: Path) -> int:
        size = 0
        async with self._session.get(f"{self._base}/files/{file_id}/content") as resp:
            await self._check(resp)
            with target.open("wb") as out:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
        return size


def _run(base_url: str, api_key: str | None, work: Callable[[Api], Awaitable[T]]) -> T:
    """Run ``work`` with a client; API and connection errors end the command with a message."""

    async def main() -> T:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            return await work(Api(session, base_url))

    try:
        return asyncio.run(main())
    except ApiError as exc:
        typer.echo(f"tail-service: {exc}", err=True)
        raise typer.Exit(1) from None
    except aiohttp.ClientError as exc:
        typer.echo(f"tail-service: cannot reach {base_url}: {exc}", err=True)
        raise typer.Exit(1) from None


def _summary(batch: dict[str, Any]) -> str:
    counts = batch.get("request_counts") or {}
    return (
        f"{batch['id']}  {batch['status']:<11} {counts.get('completed', 0)}/{counts.get('total', 0)} done, "
        f"{counts.get('failed', 0)} failed  ({batch['endpoint']})"
    )


def _show(batch: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(batch, indent=2))
        return
    typer.echo(_summary(batch))
    for error in (batch.get("errors") or {}).get("data") or []:
        where = f"line {error['line']}: " if error.get("line") else ""
        typer.echo(f"  {where}{error['code']}: {error['message']}")
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name):
            typer.echo(f"  {name}: {batch[name]}")


async def _follow(api: Api, batch: dict[str, Any], interval: float) -> dict[str, Any]:
    """Poll until the batch ends, with a progress bar on a terminal (a line per change otherwise)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(batch["status"], total=None)
        last = ""
        while batch["status"] not in TERMINAL:
            await asyncio.sleep(interval)
            batch = await api.json("GET", f"/batches/{batch['id']}")
            counts = batch.get("request_counts") or {}
            done = counts.get("completed", 0) + counts.get("failed", 0)
            bar.update(task, description=batch["status"], completed=done, total=counts.get("total") or None)
            line = _summary(batch)
            if bar.disable and line != last:
                typer.echo(line, err=True)
                last = line
    return batch


@batch_cli.command()
def submit(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="the input .jsonl")
    ],
    endpoint: Annotated[
        str, typer.Option(help="/v1/chat/completions, /v1/completions or /v1/embeddings")
    ] = "/v1/chat/completions",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="follow it to the end and download")] = False,
    output: Annotated[
        Path | None, typer.Option(help="where --wait saves the output [default: FILE.output.jsonl]")
    ] = None,
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
    base_url: BaseUrlOpt = DEFAULT_BASE_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Upload FILE, create a batch on it and print its id; with --wait, follow it with a
    progress bar and download the output (and errors, if any) next to FILE."""

    async def work(api: Api) -> dict[str, Any]:
        upload = await api.upload(file, "batch")
        body = {"input_file_id": upload["id"], "endpoint": endpoint, "completion_window": "24h"}
        # one key per submit: a retried create is the same batch, never a second one
        headers = {"Idempotency-Key": f"cli-{os.urandom(16).hex()}"}
        batch = await api.json("POST", "/batches", json=body, headers=headers)
        typer.echo(batch["id"])
        if not wait:
            return batch
        batch = await _follow(api, batch, interval)
        out = output or file.with_name(file.stem + ".output.jsonl")
        if batch.get("output_file_id"):
            size = await api.download(batch["output_file_id"], out)
            typer.echo(f"output: {out} ({size} bytes)", err=True)
        if batch.get("error_file_id"):
            errors = out.with_name(out.stem.removesuffix(".output") + ".errors.jsonl")
            size = await api.download(batch["error_file_id"], errors)
            typer.echo(f"errors: {errors} ({size} bytes)", err=True)
        return batch

    started = time.monotonic()
    batch = _run(base_url, api_key, work)
    if wait:
        _show(batch, as_json=False)
        typer.echo(f"finished in {time.monotonic() - started:.1f}s", err=True)
        if batch["status"] != "completed":
            raise typer.Exit(1)


@batch_cli.command()
def status(
    batch_id: Annotated[str, typer.Argument(help="batch_…")],
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = DEFAULT_BASE_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Show a batch: status, counts, errors and its files."""
    _show(_run(base_url, api_key, lambda api: api.json("GET", f"/batches/{batch_id}")), as_json)


@batch_cli.command()
def cancel(
    batch_id: Annotated[str, typer.Argument(help="batch_…")],
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = DEFAULT_BASE_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Cancel a batch: lines already run keep their results."""
    _show(_run(base_url, api_key, lambda api: api.json("POST", f"/batches/{batch_id}/cancel")), as_json)


@batch_cli.command("list")
def list_batches(
    limit: Annotated[int, typer.Option(min=1, max=100, help="most batches shown")] = 20,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = DEFAULT_BASE_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """List your batches, newest first."""
    page = _run(base_url, api_key, lambda api: api.json("GET", "/batches", params={"limit": str(limit)}))
    if as_json:
        typer.echo(json.dumps(page["data"], indent=2))
        return
    for batch in page["data"]:
        typer.echo(_summary(batch))
