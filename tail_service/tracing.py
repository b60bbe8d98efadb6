"""OpenTelemetry traces: one tracer provider per app, exported over OTLP/HTTP.

:func:`build_tracing` is called by the app factory's lifespan (and the batch worker,
through :func:`tail_service.app.build_core`). With ``tracing.enabled`` off it returns the
API's no-op tracer and builds nothing: no thread, no exporter, no provider. With it on,
it builds a :class:`~opentelemetry.sdk.trace.TracerProvider` of its own (the global
provider is never set, so two apps in one process, or a library that sets it, do not
mix) with a :class:`~opentelemetry.sdk.trace.export.BatchSpanProcessor` in front of the
OTLP/HTTP exporter. The processor queues ended spans and exports them from its own
thread, so the event loop never waits on the collector; a full queue drops spans rather
than blocking. :meth:`Tracing.shutdown` flushes what is queued (in a worker thread) when
the lifespan ends.

The exporter's headers (a tracing vendor's key, say) are secrets: read from
``SecretStr`` only here, never logged.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer

from tail_service import __version__
from tail_service.core.spans import NOOP_TRACER
from tail_service.settings import TracingSettings

#: seconds one export may take (a collector that is down holds up only the exporter's
#: thread, and the final flush at shutdown, for at most this long)
EXPORT_TIMEOUT = 5.0
#: the instrumentation scope name of every span the service makes
SCOPE = "tail_service"


@dataclass(frozen=True, slots=True)
class Tracing:
    """The tracer to hand to the service's parts, and the provider behind it (if any)."""

    tracer: Tracer
    provider: TracerProvider | None = None

    async def shutdown(self) -> None:
        """Export the spans still queued, then stop the exporter thread (off the event loop)."""
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)


def build_tracing(settings: TracingSettings) -> Tracing:
    """A no-op tracer when tracing is off, else a tracer of a new provider exporting to
    ``settings.otlp_endpoint``, sampling ``sample_ratio`` of new traces (a request whose
    ``traceparent`` says sampled is always kept, one that says not sampled never is)."""
    if not settings.enabled:
        return Tracing(NOOP_TRACER)
    resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
    provider = TracerProvider(
        resource=resource,
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        # the lifespan shuts it down; an atexit hook per app would keep every provider alive
        shutdown_on_exit=False,
    )
    exporter = OTLPSpanExporter(
        endpoint=settings.otlp_endpoint,
        headers={name: value.get_secret_value() for name, value in settings.headers.items()},
        timeout=EXPORT_TIMEOUT,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer(SCOPE, __version__), provider)
