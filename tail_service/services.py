"""The typed container of everything the app builds at start-up and closes at shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Tracer

from tail_service.clients.redis_pubsub import RunWatch
from tail_service.core.agent import RUN_EVENTS_CHANNEL
from tail_service.core.auth import Authenticator
from tail_service.core.inference import InferenceService
from tail_service.core.provider import Provider
from tail_service.core.routing import ModelRouter
from tail_service.core.spans import NOOP_TRACER
from tail_service.metrics import Metrics
from tail_service.settings import Settings
from tail_service.store import Store


@dataclass(slots=True)
class Services:
    """Singletons of one app instance, built in the lifespan. Handlers read, never replace."""

    #: the frozen settings this app was built from
    settings: Settings
    #: chat / completions / embeddings logic over the model proxy
    inference: InferenceService
    #: public model ids and per-deployment health
    router: ModelRouter
    #: provider adapters by name (``openai``, ``anthropic``, ``local``)
    providers: Mapping[str, Provider]
    metrics: Metrics
    #: verifies API keys (auth-service behind a verdict cache, or disabled)
    auth: Authenticator
    #: files, batches and their results (SQLite or PostgreSQL), queried off the event loop
    store: Store
    #: tells the workers a run waits to start (a Redis PUBLISH; they also poll the store)
    wake_agents: Callable[[], None] = lambda: None
    #: wakes whoever waits on an agent run when a worker stored its news (without Redis,
    #: only the store poll's timer does)
    run_watch: RunWatch = field(default_factory=lambda: RunWatch(None, RUN_EVENTS_CHANNEL))
    #: names of the built-in agent tools (``{"type": "builtin", "name": ...}``)
    builtin_tools: frozenset[str] = frozenset()
    #: unix time the app started; the ``created`` of every listed model
    started_at: int = field(default_factory=lambda: int(time.time()))
    #: named async checks for ``/health``: each returns a status dict
    health_checks: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)
    #: large request bodies are parsed one at a time (see :func:`tail_service.api.body.read_json`)
    large_body_gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: makes the spans of requests (:mod:`tail_service.tracing`); a no-op when tracing is off
    tracer: Tracer = NOOP_TRACER
