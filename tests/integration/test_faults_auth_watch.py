"""The revocation watch outlives errors that are not gRPC statuses (issue 8, faults 3)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from tail_service.clients.auth import AuthClient
from tail_service.clients.grpc_channel import ReloadingChannel
from tail_service.errors import AuthenticationError
from tail_service.proto import auth_pb2
from tail_service.settings import AuthSettings, TLSFiles
from tests.stack_fixtures import Stack


class ClosedFirst(ReloadingChannel):
    """Hands the watch a closed channel first (as a channel retired under it would be):
    opening a stream on it raises ``grpc.aio.UsageError``, which is no ``AioRpcError``."""

    def __init__(self, address: str, tls: TLSFiles, dead: grpc.aio.Channel, times: int) -> None:
        super().__init__(address, tls)
        self._dead = dead
        self.times = times

    def get(self) -> grpc.aio.Channel:
        if self.times > 0:
            self.times -= 1
            return self._dead
        return super().get()


async def test_watch_survives_a_non_grpc_error_and_still_delivers_revocations(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    key = stack.create_key()
    tls = stack.tls_for("tail")
    settings = AuthSettings(address=f"127.0.0.1:{stack.auth_port}", tls=tls, cache_ttl=60)
    dead = grpc.aio.insecure_channel(settings.address or "")
    await dead.close()
    # the first two watch attempts get the closed channel
    channel = ClosedFirst(settings.address or "", tls, dead, times=2)
    client = AuthClient(channel, settings)
    caplog.set_level(logging.WARNING, logger="tail_service.clients.auth")
    client.start()
    try:
        async with asyncio.timeout(10):
            while not client.watch_connected:  # noqa: ASYNC110 - a flag, polled with a bound
                await asyncio.sleep(0.02)
        assert channel.times == 0
        assert any("UsageError" in r.getMessage() for r in caplog.records)
        principal = await client.authenticate(key)  # cached now, for 60 s
        assert principal.tenant == "acme"
        await asyncio.to_thread(
            lambda: stack.admin_auth().RevokeKey(auth_pb2.RevokeKeyRequest(api_key=key), timeout=5)
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AuthenticationError):
            async with asyncio.timeout(5):
                while True:
                    await client.authenticate(key)
                    await asyncio.sleep(0.02)
        assert loop.time() - started < 2.0
    finally:
        await client.close()
