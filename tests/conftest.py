"""Shared fixtures: the gateway served by real uvicorn on 127.0.0.1:0, fake upstreams, SDK clients.

Factories clean up after themselves. Nothing here patches module attributes: each
test builds its own ``Settings`` and app.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from tail_service.app import create_app
from tail_service.http_server import server_config
from tail_service.settings import Settings, load_settings
from tests.fakes.openai_upstream import FakeOpenAI, run_openai_upstream_in_thread

pytest_plugins = ["tests.rpc_fixtures", "tests.stack_fixtures"]

UPSTREAM_KEY_ENV = "TAIL_TEST_UPSTREAM_KEY"


@dataclass
class RunningApp:
    """A gateway running in a background thread."""

    base_url: str  # http://127.0.0.1:PORT
    settings: Settings
    server: uvicorn.Server
    loop: asyncio.AbstractEventLoop

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("api_key", "sk-test")
        return openai.OpenAI(base_url=self.v1, **kw)

    def strict_client(self, **kw: Any) -> openai.OpenAI:
        return self.client(_strict_response_validation=True, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)


@contextmanager
def serve_app(settings: Settings, *, app: Any = None) -> Iterator[RunningApp]:
    """Run ``create_app(settings)`` (or ``app``) under uvicorn (uvloop, httptools) on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The production server config: the hardened protocol with the settings' limits.
    config = server_config(
        app if app is not None else create_app(settings),
        settings.server,
        loop="uvloop",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=1,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        import uvloop

        loop = uvloop.new_event_loop()
        loops.append(loop)
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve(sockets=[sock]))
        loop.close()

    thread = threading.Thread(target=run, name="tail-app", daemon=True)
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    if not server.started:
        server.should_exit = True
        thread.join(5)
        raise RuntimeError("the app did not start")
    try:
        yield RunningApp(f"http://127.0.0.1:{port}", settings, server, loops[0])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def model_entry(name: str, upstream: FakeOpenAI, **kw: Any) -> dict[str, Any]:
    """A config entry for an OpenAI-compatible deployment on a fake upstream."""
    entry: dict[str, Any] = {
        "name": name,
        "provider": "openai",
        "base_url": upstream.base_url,
        "api_key_env": UPSTREAM_KEY_ENV,
        "max_retries": 1,
        "timeout": 10,
    }
    entry.update(kw)
    return entry


@pytest.fixture
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, "sk-up-a")
    return "sk-up-a"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with run_openai_upstream_in_thread("a", api_key="sk-up-a") as up:
        yield up


@pytest.fixture
def upstream_b() -> Iterator[FakeOpenAI]:
    with run_openai_upstream_in_thread("b", api_key="sk-up-a") as up:
        yield up


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Apps built without a state directory keep their store in a temporary one, never the checkout."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TAIL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    yield
    mp.undo()


@pytest.fixture
def make_app(
    upstream_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningApp]]:
    """``make_app(models=[...], **settings)`` starts a gateway; all are stopped at teardown."""
    stack: list[Any] = []

    def factory(models: list[dict[str, Any]], **kw: Any) -> RunningApp:
        kw.setdefault("server", {})
        kw["server"] = {"request_timeout": 20, "sse_keepalive": 0, **kw["server"]}
        kw.setdefault("auth", {"mode": "disabled"})
        kw.setdefault("ratelimit", {"enabled": False})
        kw.setdefault("state_dir", tmp_path_factory.mktemp("gateway"))
        settings = load_settings(None, models=models, **kw)
        cm = serve_app(settings)
        app = cm.__enter__()
        stack.append(cm)
        return app

    yield factory
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def gateway(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> RunningApp:
    """A gateway with chat/completions/embeddings models on one fake upstream."""
    return make_app(
        [
            model_entry("gpt-test", upstream),
            model_entry("org/embed-test", upstream, supports_dimensions=True),
            model_entry("embed-fixed", upstream),
        ]
    )
