"""One factory for the gRPC channels the HTTP service opens: mTLS, keepalive, rotation.

:class:`ReloadingChannel` hands out an ``grpc.aio`` channel built from the configured
certificate files and checks the files at most every few seconds; when they changed it
builds a new channel for new calls and closes the old one after a grace period, so
certificates rotate without downtime and without failing calls in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from tail_service.rpc.tls import channel_credentials, files_changed_since
from tail_service.settings import TLSFiles

log = logging.getLogger("tail_service.clients.grpc")

_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class ReloadingChannel:
    """A ``grpc.aio`` channel to ``address`` that follows certificate rotation.

    ``tls=None`` makes a plaintext channel, which only tests may ask for (``insecure``).
    """

    def __init__(
        self, address: str, tls: TLSFiles | None, *, insecure: bool = False, check_every: float = 5.0
    ) -> None:
        if tls is None and not insecure:
            raise ValueError(f"refusing a plaintext gRPC channel to {address}: configure tls")
        self.address = address
        self._tls = tls
        self._check_every = check_every
        self._stamp: tuple[float, ...] | None = None
        self._checked = 0.0
        self._channel = self._build()
        self._retired: set[asyncio.Task[None]] = set()

    def _build(self) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(self.address, options=_OPTIONS)
        self._stamp = files_changed_since(self._tls, None)
        return grpc.aio.secure_channel(self.address, channel_credentials(self._tls), options=_OPTIONS)

    def get(self) -> grpc.aio.Channel:
        """The channel for the next call (rebuilt if the certificate files changed)."""
        if self._tls is not None:
            now = time.monotonic()
            if now - self._checked >= self._check_every:
                self._checked = now
                if files_changed_since(self._tls, self._stamp) is not None:
                    old, self._channel = self._channel, self._build()
                    log.info("client certificates changed; new channel to %s", self.address)
                    task = asyncio.get_running_loop().create_task(self._retire(old))
                    self._retired.add(task)
                    task.add_done_callback(self._retired.discard)
        return self._channel

    async def _retire(self, channel: grpc.aio.Channel, grace: float = 30.0) -> None:
        await asyncio.sleep(grace)
        await channel.close()

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        await self._channel.close()


async def check_health(channel: grpc.aio.Channel, service: str, deadline: float = 1.0) -> dict[str, str]:
    """``grpc.health.v1`` Check of ``service``, as a ``/health`` entry."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        return {"status": "unavailable", "detail": exc.code().name}
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return {"status": "ok" if status == "SERVING" else "degraded", "detail": status}
