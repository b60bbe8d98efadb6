"""The seam between the model proxy and the adapters: the Provider protocol.

``core`` declares what it needs; ``providers/`` implements it (raising the
``ProviderError`` branch of :mod:`tail_service.errors`) and ``app.py`` wires the
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
