"""The seam between the model proxy and the adapters: the Provider protocol and its errors.

``core`` declares what it needs; ``providers/`` implements it and ``app.py`` wires the
concrete classes. Providers do transport and translation only: no retries, no
fallback, no cooldown (that is :mod:`tail_service.core.proxy`'s job), so every adapter
gets the same failure policy.

Stream contract: ``chat_stream``/``completion_stream`` return async generators of
OpenAI chunk dicts. An HTTP or connection failure before the first chunk must raise a
:class:`ProviderError` from the first ``__anext__`` (so the proxy can still fail
over). A stream that ends without the provider's end marker must raise
:class:`ProviderStreamCut`, never end quietly. Streaming adapters always ask their
upstream for usage; a final usage chunk has ``choices == []``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from tail_service.core.types import UpstreamCall


class ProviderError(Exception):
    """An attempt against one deployment failed.

    ``retryable``: worth retrying on the same deployment (after ``retry_after`` seconds
    when the upstream said so). ``failover``: worth trying another deployment.
    """

    retryable: bool = False
    failover: bool = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ProviderHTTPError(ProviderError):
    """The upstream answered with a non-2xx status.

    429, 408, 409 and 5xx are retryable and fail over. 401/403 fail over (the
    credential of this deployment is bad) but are not retried. Other 4xx are the
    caller's fault: neither retried nor failed over, and shown to the client.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.body = body
        self.retryable = status in (408, 409, 429) or status >= 500
        self.failover = self.retryable or status in (401, 403)


class ProviderConnectionError(ProviderError):
    """Connecting failed, or the connection broke before a response."""

    retryable = True


class ProviderTimeoutError(ProviderError):
    """The attempt ran past its deadline."""

    retryable = True


class ProviderProtocolError(ProviderError):
    """The upstream answered with something that is not its documented wire format."""

    retryable = True


class ProviderStreamCut(ProviderError):
    """A stream ended or broke before its end marker."""

    retryable = True


class ProviderUnsupportedError(ProviderError):
    """The adapter cannot serve this operation or parameter (e.g. embeddings on Anthropic)."""

    retryable = False
    failover = True


class Provider(Protocol):
    """An adapter for one upstream wire protocol. One instance serves all its deployments."""

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        """Return an OpenAI ``chat.completion`` dict with ``usage``."""
        ...

    def chat_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        """Yield OpenAI ``chat.completion.chunk`` dicts, ending with a usage chunk."""
        ...

    async def completion(self, call: UpstreamCall) -> dict[str, Any]:
        """Return an OpenAI ``text_completion`` dict with ``usage``."""
        ...

    def completion_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        """Yield OpenAI ``text_completion`` chunk dicts, ending with a usage chunk."""
        ...

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        """Return an OpenAI embedding ``list`` dict in input order, with ``usage``.

        ``call.body["encoding_format"]`` is ``"float"`` or ``"base64"``; an adapter that
        can only produce floats returns floats and the core encodes them.
        """
        ...

    async def aclose(self) -> None:
        """Release pooled connections, threads and models."""
        ...
