"""The app's lifespan releases what it built, whatever happens (issue 8, faults 6).

A start-up that fails part way (an exception, or a cancellation while secret-service
does not answer) must leave no task running, no gRPC connection open and no upstream
HTTP session unclosed; a close that raises must not keep the others from running.
Observed on real things: the event loop's tasks, this process's TCP sockets
(``/proc/self/net/tcp``) and aiohttp's own unclosed-session report.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tail_service import tiktoken_counter
from tail_service.app import create_app
from tail_service.proto import secrets_pb2
from tests.procfs import own_connections
from tests.stack_fixtures import Stack


def client_sockets_to(ports: set[int]) -> set[int]:
    """Inodes of this process's established TCP sockets whose remote port is in ``ports``."""
    return set(own_connections(ports))


async def assert_released(baseline: set[int], ports: set[int]) -> None:
    """No task but ours, no new connection to ``ports``, no unclosed aiohttp session."""
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: reports.append(str(ctx.get("message"))))
    try:
        for _ in range(100):  # bounded: 5 s
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            conns = client_sockets_to(ports) - baseline
            if not tasks and not conns:
                break
            await asyncio.sleep(0.05)
        assert not tasks, tasks
        assert not conns, f"{len(conns)} connection(s) to auth/secret-service left open"
        gc.collect()
        await asyncio.sleep(0)
        assert not [r for r in reports if "Unclosed" in r], reports
    finally:
        loop.set_exception_handler(None)


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung service)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        yield srv.getsockname()[1]


def _settings(stack: Stack, secret: str, **kw: Any) -> Any:
    entry = {
        "name": "gpt-x",
        "provider": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "api_key_secret": secret,
    }
    return stack.gateway_settings([entry], **kw)


async def test_a_start_that_fails_part_way_closes_session_channels_and_tasks(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the tokenizer's bundled data missing fails start-up when the tables are awaited:
    # after the session, the providers, the auth-service watch and the secrets client exist
    def missing(name: str) -> Path:
        raise tiktoken_counter.TokenizerDataError(f"{name}: not bundled")

    monkeypatch.setattr(tiktoken_counter, "_data_file", missing)
    admin = stack.admin_secrets()
    admin.PutSecret(secrets_pb2.PutSecretRequest(name="k", value=b"sk-up"), timeout=5)
    stack.create_key()
    ports = {stack.auth_port, stack.secrets_port}
    baseline = client_sockets_to(ports)
    app = create_app(_settings(stack, "k"))
    with pytest.raises(tiktoken_counter.TokenizerDataError):
        async with app.router.lifespan_context(app):
            pass
    await assert_released(baseline, ports)


async def test_a_credential_that_is_not_utf8_is_unavailable_not_a_failed_start(stack: Stack) -> None:
    admin = stack.admin_secrets()
    admin.PutSecret(secrets_pb2.PutSecretRequest(name="bad", value=b"\xff\xfe"), timeout=5)
    app = create_app(_settings(stack, "bad"))
    async with app.router.lifespan_context(app):
        services = app.state.services
        health = await services.health_checks["secret_service"]()
        assert health["credentials_missing"] == ["bad"]


async def test_a_start_cancelled_while_secret_service_hangs_closes_everything(stack: Stack) -> None:
    stack.create_key()
    with black_hole() as hung:
        settings = _settings(stack, "k")
        settings = settings.model_copy(
            update={"secrets": settings.secrets.model_copy(update={"address": f"127.0.0.1:{hung}"})}
        )
        ports = {stack.auth_port, hung}
        baseline = client_sockets_to(ports)
        app = create_app(settings)

        async def start() -> None:
            async with app.router.lifespan_context(app):
                raise AssertionError("started despite a hung secret-service")

        task = asyncio.create_task(start())
        # the auth-service watch is up (a connection) while the secret fetch hangs
        for _ in range(100):
            if client_sockets_to({stack.auth_port}) - baseline:
                break
            await asyncio.sleep(0.02)
        assert client_sockets_to({stack.auth_port}) - baseline
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await assert_released(baseline, ports)


async def test_a_close_that_raises_does_not_keep_the_others_from_running(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The closers the lifespan registers its resources with: real session, channel, task."""
    from tail_service.app import _Closers

    session = aiohttp.ClientSession()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.auth_port}")
    task = asyncio.create_task(asyncio.sleep(3600))
    ran: list[str] = []

    async def broken() -> None:
        ran.append("broken")
        raise RuntimeError("close failed")

    caplog.set_level(logging.ERROR, logger="tail_service.app")
    async with contextlib.AsyncExitStack() as stack_:
        closers = _Closers(stack_)
        closers.add("the session", session.close)
        closers.add("the channel", channel.close)
        closers.add("a broken resource", broken)
        closers.task("a task", task)
    assert ran == ["broken"]
    assert session.closed and task.cancelled()
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert any("closing a broken resource failed" in r.getMessage() for r in caplog.records)
