"""The app factory: the one place where concrete classes are wired together.

``create_app(settings)`` returns a Starlette app whose lifespan builds every resource
(the pooled upstream HTTP session, the providers, the router and proxy, the token
counter, metrics) into one typed :class:`~tail_service.services.Services` and closes
them at shutdown. Nothing is created at import time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.exceptions
import sqlalchemy.exc
from opentelemetry.trace import Tracer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tail_service import __version__
from tail_service.api.errors import EXCEPTION_HANDLERS
from tail_service.api.fastpath import FastPathMiddleware
from tail_service.api.middleware import RequestIdMiddleware
from tail_service.api.openapi import build_openapi, docs, openapi_json
from tail_service.api.routes import ROUTES
from tail_service.api.tracing import TracingMiddleware
from tail_service.clients.auth import AuthClient, NoAuth
from tail_service.clients.grpc_channel import ReloadingChannel
from tail_service.clients.limiter_guard import GuardedLimiter
from tail_service.clients.ratelimit_redis import RedisRateLimiter
from tail_service.clients.redis_cluster import ClusterPipelinedRedis
from tail_service.clients.redis_pipe import PipelinedRedis, SharedRedis
from tail_service.clients.redis_pubsub import RunWatch, publisher
from tail_service.clients.response_cache import RedisResponseCache
from tail_service.clients.secrets import SecretsClient
from tail_service.clients.usage_ledger import UsageDrainer, UsageLedger
from tail_service.core.admission import Admitter
from tail_service.core.agent import AGENT_WAKE_CHANNEL, RUN_EVENTS_CHANNEL
from tail_service.core.inference import InferenceService
from tail_service.core.pricing import Price, Pricing
from tail_service.core.provider import Provider
from tail_service.core.proxy import ModelProxy
from tail_service.core.routing import ModelRouter
from tail_service.core.tools import builtin_tools
from tail_service.core.types import Deployment
from tail_service.core.usage import UsageSinks
from tail_service.metrics import Metrics, MetricsUsageSink, RequestMetrics, UpstreamMetrics
from tail_service.providers.registry import Credentials, build_deployments, build_providers
from tail_service.schemas.common import RequestSchema
from tail_service.services import Services
from tail_service.settings import (
    ConfigError,
    Settings,
    check_http_settings,
    load_settings,
    resolve_credentials,
)
from tail_service.store import Store
from tail_service.store.batches import BatchStore
from tail_service.tiktoken_counter import TiktokenCounter
from tail_service.tracing import build_tracing

log = logging.getLogger("tail_service.app")


def _http_session(settings: Settings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # per-host limit below is the real bound
        limit_per_host=1024,
        keepalive_timeout=60,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        skip_auto_headers=("User-Agent",),
        headers={"user-agent": f"tail-service/{__version__}"},
        auto_decompress=True,
    )


class _Closers:
    """An :class:`~contextlib.AsyncExitStack` for the lifespan's resources, each registered the
    moment it exists, so a start-up that fails part way closes exactly what it built.

    Closers run in reverse order of registration. One that raises is logged and does not
    stop the others (a failed close must not leak the rest); cancellation still propagates.
    """

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack

    def add(self, name: str, close: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            try:
                await close()
            except Exception:
                log.exception("closing %s failed", name)

        self._stack.push_async_callback(run)

    def task(self, name: str, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` (and wait for it) at exit."""

        async def cancel() -> None:
            if task.done():  # its outcome is its awaiter's to report
                if not task.cancelled():
                    task.exception()
                return
            # Cancelled again until it ends: a library may swallow one cancellation that
            # lands inside a network call (redis-py's asyncio client does, now and then).
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            if not task.cancelled():
                task.exception()  # retrieved: an error at shutdown is not worth a warning

        self.add(name, cancel)


@dataclass(slots=True)
class Core:
    """What the HTTP app and the batch worker share: the model proxy behind admission."""

    inference: InferenceService
    router: ModelRouter
    providers: Mapping[str, Provider]
    deployments: Sequence[Deployment]
    metrics: Metrics
    store: Store
    secrets: SecretsClient | None
    redis_client: SharedRedis | None
    limiter: GuardedLimiter | None
    #: awaited before the process reports ready (the tokenizer tables)
    warm: asyncio.Task[Any]
    pricing: Pricing
    #: moves usage records from the Redis stream into the store (None: not in this process)
    drainer: UsageDrainer | None
    #: makes the spans (a no-op tracer when tracing is off)
    tracer: Tracer


async def build_core(
    settings: Settings,
    closers: _Closers,
    *,
    response_cache: bool = True,
    drain_usage: bool = False,
    metrics: Metrics | None = None,
) -> Core:
    """Build the model proxy, admission, store and their clients, each registered with
    ``closers`` the moment it exists (into ``metrics`` when given: the HTTP app's).
    ``drain_usage``: run a drainer of the usage ledger's stream here."""
    tracing = build_tracing(settings.tracing)
    closers.add("the tracer provider", tracing.shutdown)  # closed last: flushes every span
    session = _http_session(settings)
    closers.add("the upstream HTTP session", session.close)
    deployments = build_deployments(settings.model_entries())
    router = ModelRouter(deployments, monotonic=time.monotonic)
    providers = build_providers(deployments, session, settings.local)
    for name, provider in providers.items():
        closers.add(f"provider {name}", provider.aclose)
    counter = TiktokenCounter()
    # Load the BPE tables the configured upstream models use (each costs ~0.4 s and
    # ~45 MB) off the event loop, in the background, so start-up is not held up. The
    # local models count their own tokens exactly and need none.
    encodings = {counter.encoding_name_for(d.upstream_model) for d in deployments if d.provider != "local"}
    # Awaited before the service reports ready: a request that needs a count while a
    # table is being built would wait on the tokenizer's lock, holding up the event loop.
    warm = asyncio.create_task(asyncio.to_thread(lambda: [counter.encoding(n) for n in sorted(encodings)]))
    closers.task("the tokenizer warm-up", warm)
    if metrics is None:
        metrics = Metrics(e.name for e in settings.model_entries())
    store = Store(settings.store, settings.state_dir)
    closers.add("the store", lambda: asyncio.to_thread(store.close))
    await asyncio.to_thread(store.migrate)
    secrets = _secrets_client(settings, closers)
    proxy = ModelProxy(
        router,
        providers,
        Credentials(settings.credentials, secrets),
        request_timeout=settings.server.request_timeout,
        monotonic=time.monotonic,
        observer=UpstreamMetrics(metrics),
        tracer=tracing.tracer,
    )
    redis_client, limiter = _limiter(settings)
    metrics.watch(router=router, limiter=limiter)
    if redis_client is not None:
        closers.add("the redis client", redis_client.close)
    if limiter is not None:
        closers.add("the rate limiter", limiter.close)
    pricing = build_pricing(settings)
    admitter = (
        Admitter(
            limiter,
            router,
            counter,
            default_max_tokens=settings.ratelimit.default_max_tokens,
            pricing=pricing,
            tracer=tracing.tracer,
        )
        if limiter is not None
        else None
    )
    ledger = UsageLedger(
        redis_client,
        store,
        settings.usage,
        durable_wait=settings.redis.timeout,
        redis_down=(lambda: limiter.breaker_open) if limiter is not None else (lambda: False),
    )
    # after the admitter's drain: records on their way are answered (or held) by then
    closers.add("the usage ledger", ledger.close)
    if admitter is not None:
        # closed first: settlements on their way still need the limiter and Redis
        closers.add("the admitter", admitter.drain)
    inference = InferenceService(
        proxy,
        counter,
        UsageSinks(MetricsUsageSink(metrics), ledger),
        admitter,
        cache=RedisResponseCache(redis_client, timeout=settings.redis.timeout)
        if redis_client is not None and response_cache
        else None,
        cache_ttl=settings.cache.ttl,
        pricing=pricing,
        durable_wait=settings.redis.timeout,
    )
    drainer = None
    if settings.redis.url and drain_usage:
        drainer = UsageDrainer(settings.redis.url, store, settings.usage, cluster=settings.redis.cluster)
        closers.task("the usage drainer", asyncio.create_task(drainer.run()))
    if secrets is not None:
        await secrets.start()
    return Core(
        inference,
        router,
        providers,
        deployments,
        metrics,
        store,
        secrets,
        redis_client,
        limiter,
        warm,
        pricing,
        drainer,
        tracing.tracer,
    )


def build_pricing(settings: Settings) -> Pricing:
    """Each public model's price: its config entry's (the first that gives one; 0 for the
    embedded local models), else the built-in table's by its name or its deployments'
    upstream names."""
    models: dict[str, tuple[Price | None, list[str]]] = {}
    for entry in settings.model_entries():
        price, upstream = models.get(entry.name, (None, []))
        if price is None and entry.price is not None:
            p = entry.price
            price = Price(p.input, p.output, p.cached_input)
        elif price is None and entry.provider == "local":
            price = Price(0.0, 0.0)  # runs here: free
        upstream.append(entry.upstream_model or entry.name)
        models[entry.name] = (price, upstream)
    return Pricing(models)


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        closers = _Closers(stack)
        check_http_settings(settings)
        auth = _auth_client(settings, closers)
        if isinstance(auth, AuthClient):
            auth.start()  # its revocation watch connects while the rest is built
        core = await build_core(
            settings, closers, drain_usage=settings.usage.drain_in_http, metrics=app.state.metrics
        )
        if isinstance(auth, AuthClient):
            core.metrics.watch(auth=auth)
        router, providers, deployments = core.router, core.providers, core.deployments
        redis_client, limiter, secrets = core.redis_client, core.limiter, core.secrets
        services = Services(
            settings=settings,
            inference=core.inference,
            router=router,
            providers=providers,
            metrics=core.metrics,
            auth=auth,
            store=core.store,
            builtin_tools=frozenset(builtin_tools(time.time)),
            tracer=core.tracer,
        )

        async def providers_health() -> dict[str, Any]:
            return {"status": "ok", "adapters": sorted(providers)}

        services.health_checks["providers"] = providers_health
        services.health_checks["usage"] = _usage_health(core)
        services.health_checks["store"] = _store_health(core.store, settings.batch.dead_after)
        if isinstance(auth, AuthClient):
            services.health_checks["auth_service"] = auth.health
        if secrets is not None:
            services.health_checks["secret_service"] = secrets.health
        if redis_client is not None:
            services.health_checks["redis"] = _redis_health(redis_client, limiter)
            if isinstance(redis_client, PipelinedRedis):  # not a cluster: one node to publish on
                wake = publisher(redis_client, AGENT_WAKE_CHANNEL)
                services.wake_agents = lambda: wake("1")
                services.run_watch = RunWatch(settings.redis.url, RUN_EVENTS_CHANNEL)
                services.run_watch.start()
                closers.add("the agent runs' watch", services.run_watch.aclose)
        local_health = getattr(providers.get("local"), "health", None)
        if local_health is not None:
            services.health_checks["local_models"] = local_health
        if settings.local.preload and "local" in providers:
            local: Any = providers["local"]
            for dep in deployments:
                if dep.provider == "local":
                    await local.warm(dep.upstream_model)
        await core.warm
        if limiter is not None:
            await limiter.prepare()
        # Everything built so far lives as long as the process: move it out of the garbage
        # collector's reach, so a full collection under load walks only per-request objects
        # (measured: gen-2 pauses of 35-100 ms without this, which also tripped the 50 ms
        # Redis deadline of every admission in flight).
        gc.collect()
        gc.freeze()
        app.state.services = services
        log.info("tail-service ready", extra={"models": len(router.models())})
        try:
            yield
        finally:
            # before any resource closes: new requests are refused from now on
            app.state.draining = True


def _limiter(settings: Settings) -> tuple[SharedRedis | None, GuardedLimiter | None]:
    """The Redis client (when configured) and the limiter (when rate limiting is on).

    One auto-pipelined client (per node, on a cluster) carries admissions, settlements,
    cache lookups and health pings, so a request's admission and cache lookup leave in one
    write.
    """
    if not settings.redis.url:
        return None, None
    connect_timeout = max(settings.redis.timeout, 0.5)
    client: SharedRedis
    if settings.redis.cluster:
        client = ClusterPipelinedRedis(settings.redis.url, connect_timeout=connect_timeout)
    else:
        client = PipelinedRedis(settings.redis.url, connect_timeout=connect_timeout)
    if not settings.ratelimit.enabled:
        return client, None
    inner = RedisRateLimiter(
        client,
        lease_ttl_ms=int(settings.ratelimit.lease_ttl * 1000),
        batch_headroom=settings.ratelimit.batch_headroom,
    )
    return client, GuardedLimiter(inner, settings.redis)


def _usage_health(core: Core) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Models without a price (their cost counts as 0) and whether this process drains the
    ledger's stream."""
    unpriced = core.pricing.unpriced()

    async def check() -> dict[str, Any]:
        state: dict[str, Any] = {"status": "ok", "unpriced_models": unpriced}
        if unpriced:
            state["warning"] = "these models have no price: their cost is counted as 0"
        if core.drainer is not None:
            state["drained_records"] = core.drainer.stored
        return state

    return check


def _store_health(store: Store, dead_after: float) -> Callable[[], Awaitable[dict[str, Any]]]:
    """The store answers; how many batch workers are alive (with none, batches wait: a
    warning, not a failure of this replica)."""
    batches = BatchStore(store)

    async def check() -> dict[str, Any]:
        try:
            live = await store.run(batches.live_workers, time.time(), dead_after)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            return {"status": "unavailable", "detail": type(exc).__name__}
        state: dict[str, Any] = {"status": "ok", "batch_workers": live}
        if not live:
            state["warning"] = "no batch worker is running: batches wait for one"
        return state

    return check


def _redis_health(
    client: SharedRedis, limiter: GuardedLimiter | None
) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def check() -> dict[str, Any]:
        state = await limiter.health() if limiter is not None else {"status": "ok"}
        try:
            await client.barrier(timeout=1.0)
        except (redis.exceptions.RedisError, TimeoutError, OSError) as exc:
            return {**state, "status": "unavailable", "detail": type(exc).__name__}
        return state

    return check


def _auth_client(settings: Settings, closers: _Closers) -> AuthClient | NoAuth:
    """The auth-service client (an mTLS channel) when keys are verified, registered with ``closers``."""
    if settings.auth.mode != "grpc":
        return NoAuth()
    assert settings.auth.address is not None
    auth_client = AuthClient(ReloadingChannel(settings.auth.address, settings.auth.tls), settings.auth)
    closers.add("the auth-service client", auth_client.close)
    return auth_client


def _secrets_client(settings: Settings, closers: _Closers) -> SecretsClient | None:
    """The secret-service client (an mTLS channel) when a model names a secret."""
    secret_names = {m.api_key_secret for m in settings.models if m.api_key_secret}
    if not secret_names:
        return None
    if not settings.secrets.address or settings.secrets.tls is None:
        raise ConfigError(
            "invalid configuration:\n  secrets.address and secrets.tls are required by api_key_secret"
        )
    secrets = SecretsClient(
        ReloadingChannel(settings.secrets.address, settings.secrets.tls), settings.secrets, secret_names
    )
    closers.add("the secret-service client", secrets.close)
    return secrets


async def _metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _router_routes() -> list[Route]:
    """One Starlette route per path of :data:`ROUTES`, so a 405's ``Allow`` names every
    method the path has (a path with several methods dispatches on the method)."""
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for method, path, handler, _, _ in ROUTES:
        by_path.setdefault(path, {})[method] = handler
    routes = []
    for path, handlers in by_path.items():
        if len(handlers) == 1:
            [(method, handler)] = handlers.items()
            routes.append(Route(path, handler, methods=[method]))
        else:
            routes.append(Route(path, _by_method(handlers), methods=list(handlers)))
    return routes


def _by_method(
    handlers: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def dispatch(request: Request) -> Response:
        # the router answers methods not listed; HEAD comes with GET
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return dispatch


def _tracing_middleware(settings: Settings) -> list[Middleware]:
    """The server-span middleware when tracing is on; none at all (no cost) when it is off."""
    if not settings.tracing.enabled:
        return []
    paths = frozenset(path for _, path, _, _, _ in ROUTES) | {"/metrics", "/openapi.json", "/docs"}
    return [Middleware(TracingMiddleware, routes=paths)]


def create_app(settings: Settings) -> Starlette:
    """A new app for ``settings``; resources are built when its lifespan starts."""
    routes = _router_routes()
    # The inference endpoints (bodies with a schema) are dispatched before the router.
    hot = {
        (method, path): handler
        for method, path, handler, schema, _ in ROUTES
        if schema is not None and issubclass(schema, RequestSchema)
    }
    routes += [
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    metrics = Metrics(e.name for e in settings.model_entries())
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                RequestIdMiddleware,
                access_log_enabled=settings.server.access_log,
                observe=RequestMetrics(metrics).observe,
                fast_paths=frozenset(path for _, path in hot),
                models=metrics.models,
            ),
            *_tracing_middleware(settings),
            Middleware(FastPathMiddleware, routes=hot),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    app.state.draining = False
    app.state.openapi = build_openapi(
        "Tail Service", __version__, "OpenAI-compatible API over a model proxy."
    )
    # the document states the configured bound, which the handler enforces
    sync = app.state.openapi["components"]["schemas"]["SyncBatchRequest"]["properties"]["requests"]
    sync["maxItems"] = settings.batch.sync_max_requests
    return app


def create_app_from_env() -> Starlette:
    """Factory for worker processes: settings from ``TAIL_SETTINGS_JSON`` (set by the CLI)."""
    import os

    from tail_service.logging import configure_logging

    raw = os.environ.get("TAIL_SETTINGS_JSON")
    settings = resolve_credentials(Settings.model_validate_json(raw)) if raw else load_settings()
    configure_logging(settings.log_level, json=settings.log_json)
    return create_app(settings)
