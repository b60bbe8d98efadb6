"""Provider credentials from secret-service, kept in memory and refreshed in the background.

The model proxy asks for a credential on every upstream call, so :meth:`SecretsClient.get`
only reads memory. A background task fetches every secret the config names right away
and then every ``refresh_interval`` seconds, so a rotated secret is picked up within
seconds and a secret that is missing at start-up becomes usable as soon as it is set,
with no restart. Until then, calls to its models get a 503 that names the credential.
When secret-service is unreachable the cached values keep serving. Values are never
logged; the cache holds them as plain strings only in this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import grpc

from tail_service.clients.grpc_channel import ReloadingChannel, check_health
from tail_service.clients.grpc_metadata import outgoing_metadata
from tail_service.errors import ServiceUnavailableError
from tail_service.proto import secrets_pb2, secrets_pb2_grpc
from tail_service.settings import SecretsSettings

log = logging.getLogger("tail_service.clients.secrets")


class SecretsClient:
    """In-memory view of the named secrets, refreshed from secret-service."""

    def __init__(self, channel: ReloadingChannel, settings: SecretsSettings, names: Iterable[str]) -> None:
        self._channel = channel
        self._settings = settings
        self._names = sorted(set(names))
        self._values: dict[str, tuple[int, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def get(self, name: str) -> str:
        """The current value of ``name``; 503 ``credential_unavailable`` if it has none yet."""
        found = self._values.get(name)
        if found is None:
            raise ServiceUnavailableError(
                f"The credential `{name}` is not available yet: set it in secret-service "
                f"(tail-service secrets set {name}).",
                code="credential_unavailable",
                retry_after=self._settings.refresh_interval,
            )
        return found[1]

    def version(self, name: str) -> int | None:
        found = self._values.get(name)
        return found[0] if found else None

    async def refresh(self) -> None:
        """Fetch every named secret once; keep old values for those that cannot be read."""
        stub = secrets_pb2_grpc.SecretServiceStub(self._channel.get())
        for name in self._names:
            try:
                resp = await stub.GetSecret(
                    secrets_pb2.GetSecretRequest(name=name),
                    timeout=self._settings.timeout,
                    metadata=outgoing_metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    if self._values.pop(name, None) is not None:
                        log.warning("credential deleted in secret-service", extra={"secret": name})
                    continue
                self.last_error = exc.code().name
                log.debug("secret refresh failed: %s", exc.code().name)
                continue
            old = self._values.get(name)
            if old is None or old[0] != resp.meta.version:
                try:
                    value = resp.value.decode("utf-8")
                except UnicodeDecodeError:
                    # An API key is text: this one cannot be sent, so it stays unavailable
                    # (503 credential_unavailable) and the others still load.
                    self.last_error = "INVALID_UTF8"
                    log.error(
                        "credential is not valid UTF-8; set it again",
                        extra={"secret": name, "version": resp.meta.version},
                    )
                    continue
                self._values[name] = (resp.meta.version, value)
                log.info("credential loaded", extra={"secret": name, "version": resp.meta.version})
            self.last_error = None

    async def start(self) -> None:
        """Fetch once (briefly), then keep refreshing in the background."""
        if not self._names:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.refresh(), self._settings.timeout * 2)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.refresh_interval)
            try:
                await self.refresh()
            except Exception:  # keep refreshing whatever happened to one round
                log.exception("secret refresh round failed")

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = await check_health(self._channel.get(), "tail.secrets.v1.SecretService")
        missing = [n for n in self._names if n not in self._values]
        out["credentials_missing"] = missing
        if missing and out["status"] == "ok":
            out["status"] = "degraded"
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close()
