"""The Anthropic Messages API behind the OpenAI-shaped :class:`~tail_service.core.provider.Provider`.

Transport only; the wire translation lives in :mod:`.anthropic_request`,
:mod:`.anthropic_response` and :mod:`.anthropic_stream`. One instance serves every
``anthropic`` deployment over an injected :class:`aiohttp.ClientSession` (the caller
owns and closes it). Requests go to ``{base_url}/v1/messages`` (``base_url`` may or may
not already end in ``/v1``) with ``x-api-key``, ``anthropic-version`` and the call's
``x-request-id``.

Failure mapping:

* non-2xx -> :class:`ProviderHTTPError` with the upstream ``error.message``, the parsed
  body and ``retry_after`` from ``retry-after-ms``/``retry-after``; 529 (overloaded) is
  reported as 503 so the core retries and fails over.
* connection failures -> :class:`ProviderConnectionError` (a break after a stream has
  started -> :class:`ProviderStreamCut`); deadlines -> :class:`ProviderTimeoutError`;
  bodies that are not the documented wire format -> :class:`ProviderProtocolError`;
  requests that cannot be translated -> ``ProviderHTTPError(400)``.

Timeouts: non-streaming calls have a total deadline of ``call.timeout``. Streaming calls
must produce their first chunk within ``call.timeout`` (connect is capped by the
deployment's ``connect_timeout``); after that there is no total cap, only an idle
timeout of ``call.timeout`` per socket read.

The API key is only ever put in the ``x-api-key`` header: it is scrubbed from upstream
error bodies and never appears in messages, reprs or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from tail_service.core.types import UpstreamCall
from tail_service.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderProtocolError,
    ProviderStreamCut,
    ProviderTimeoutError,
    ProviderUnsupportedError,
)
from tail_service.providers.anthropic_errors import AnthropicRequestError, AnthropicResponseError
from tail_service.providers.anthropic_request import completion_to_chat_body, to_messages_request
from tail_service.providers.anthropic_response import (
    chat_chunk_to_text_chunk,
    chat_to_text_completion,
    from_messages_response,
)
from tail_service.providers.anthropic_stream import StreamTranslator
from tail_service.providers.upstream_http import SSEDecoder, describe, parse_retry_after

ANTHROPIC_VERSION = "2023-06-01"
#: headers a client may not forward: credentials, framing and the protocol version
_NOT_FORWARDED = frozenset(
    {"authorization", "x-api-key", "host", "content-length", "content-type", "transfer-encoding"}
    | {"connection", "accept", "accept-encoding", "anthropic-version"}
)
#: headers the deployment config may not set
_NOT_CONFIGURABLE = frozenset({"x-api-key", "host", "content-length", "transfer-encoding", "connection"})


class _EventSource:
    """``(event type, JSON data)`` pairs from an SSE response body; ``None`` at end of body."""

    def __init__(self, resp: aiohttp.ClientResponse, api_key: str | None) -> None:
        self._resp = resp
        self._api_key = api_key
        self._decoder = SSEDecoder()
        self._pending: deque[tuple[str, str]] = deque()
        self._eof = False

    async def next(self) -> tuple[str, dict[str, Any]] | None:
        while not self._pending:
            if self._eof:
                return None
            chunk = await self._resp.content.readany()
            if chunk:
                self._pending.extend(self._decoder.feed(chunk))
            else:
                self._eof = True
                self._pending.extend(self._decoder.close())
        event, text = self._pending.popleft()
        if event == "error" and self._api_key:
            text = text.replace(self._api_key, "***")
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ProviderProtocolError(f"anthropic sent a non-JSON {event!r} event") from None
        if not isinstance(data, dict):
            raise ProviderProtocolError(f"anthropic sent a non-object {event!r} event")
        if event == "message":  # no ``event:`` line: fall back to the payload's type
            event = str(data.get("type", "message"))
        return event, data


def http_error(status: int, headers: Mapping[str, str], raw: bytes, api_key: str | None) -> ProviderHTTPError:
    """Build the :class:`ProviderHTTPError` for a non-2xx answer (529 -> 503; key scrubbed)."""
    if api_key:
        raw = raw.replace(api_key.encode(), b"***")
    body: Any
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = raw.decode("utf-8", errors="replace")[:2000] or None
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    if not isinstance(message, str) or not message:
        message = f"anthropic answered HTTP {status}"
    return ProviderHTTPError(
        503 if status == 529 else status, message, retry_after=parse_retry_after(headers), body=body
    )


def _bad_request(exc: AnthropicRequestError) -> ProviderHTTPError:
    body = {
        "error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param, "code": None}
    }
    return ProviderHTTPError(400, exc.message, body=body)


class AnthropicProvider:
    """:class:`~tail_service.core.provider.Provider` for Anthropic's Messages API.

    ``chat``/``chat_stream`` translate OpenAI chat; ``completion``/``completion_stream``
    send a string ``prompt`` as one user message and answer in ``text_completion`` shape;
    ``embeddings`` raises :class:`ProviderUnsupportedError`. ``clock`` gives ``created``.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        anthropic_version: str = ANTHROPIC_VERSION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._version = anthropic_version
        self._clock = clock

    async def aclose(self) -> None:
        """Nothing to release: the injected session belongs to the caller."""

    @staticmethod
    def messages_url(base_url: str) -> str:
        base = base_url.rstrip("/")
        return f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"

    def _headers(self, call: UpstreamCall, *, stream: bool) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["anthropic-version"] = self._version
        for name, value in call.forward_headers:
            if name.lower() not in _NOT_FORWARDED:
                headers[name] = value
        for name, value in call.deployment.headers:
            if name.lower() not in _NOT_CONFIGURABLE:
                headers[name] = value
        headers["content-type"] = "application/json"
        headers["accept"] = "text/event-stream" if stream else "application/json"
        if call.api_key:
            headers["x-api-key"] = call.api_key
        if call.request_id:
            headers["x-request-id"] = call.request_id
        return headers

    @staticmethod
    def _payload(call: UpstreamCall, *, stream: bool) -> bytes:
        try:
            payload = to_messages_request(call.body, call.deployment.upstream_model)
        except AnthropicRequestError as exc:
            raise _bad_request(exc) from None
        payload.pop("stream", None)
        if stream:
            payload["stream"] = True
        try:
            return orjson.dumps(payload)
        except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
            raise ProviderHTTPError(400, f"request is not serialisable: {exc}") from None

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        """POST a non-streaming message; return an OpenAI ``chat.completion``."""
        payload = self._payload(call, stream=False)
        connect = min(call.deployment.connect_timeout, call.timeout)
        timeout = aiohttp.ClientTimeout(total=call.timeout, sock_connect=connect)
        try:
            async with self._session.post(
                self.messages_url(call.deployment.base_url),
                data=payload,
                headers=self._headers(call, stream=False),
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                if not 200 <= resp.status < 300:
                    raise http_error(resp.status, resp.headers, raw, call.api_key)
        except ProviderError:
            raise
        except TimeoutError as exc:
            raise ProviderTimeoutError(f"anthropic request timed out after {call.timeout:g}s") from exc
        except aiohttp.ClientConnectionError as exc:
            raise ProviderConnectionError(f"anthropic connection failed: {describe(exc)}") from exc
        except aiohttp.ClientError as exc:
            raise ProviderConnectionError(f"anthropic request failed: {type(exc).__name__}") from None
        try:
            data = orjson.loads(raw)
            if not isinstance(data, dict):
                raise AnthropicResponseError("not a JSON object")
            return from_messages_response(data, call.deployment.model, int(self._clock()))
        except (orjson.JSONDecodeError, AnthropicResponseError) as exc:
            raise ProviderProtocolError(f"anthropic returned an invalid message: {exc}") from None

    async def chat_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        """Stream a message as OpenAI chunks (role chunk ... finish chunk, usage chunk).

        Everything up to the first chunk (translation, connect, status, first event) runs
        under the first-byte deadline, so failures surface at the first ``__anext__``.
        Closing the generator early closes the upstream connection at once.
        """
        payload = self._payload(call, stream=True)
        translator = StreamTranslator(call.deployment.model, int(self._clock()))
        resp: aiohttp.ClientResponse | None = None
        started = False  # the upstream answered with a stream
        connect = min(call.deployment.connect_timeout, call.timeout)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=call.timeout)
        try:
            async with asyncio.timeout(call.timeout):  # never spans a yield
                resp = await self._session.post(
                    self.messages_url(call.deployment.base_url),
                    data=payload,
                    headers=self._headers(call, stream=True),
                    timeout=timeout,
                    allow_redirects=False,
                )
                if not 200 <= resp.status < 300:
                    raise http_error(resp.status, resp.headers, await resp.read(), call.api_key)
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    raise ProviderProtocolError("anthropic stream is not text/event-stream")
                source = _EventSource(resp, call.api_key)
                started = True
                chunks = await self._next_chunks(source, translator)
            while True:
                if translator.done and resp is not None:  # all read: the connection may be pooled again
                    resp.release()
                    resp = None
                for chunk in chunks:
                    yield chunk
                if translator.done:
                    break
                chunks = await self._next_chunks(source, translator)
        except ProviderError:
            raise
        except AnthropicResponseError as exc:
            raise ProviderProtocolError(f"anthropic stream: {exc}") from None
        except TimeoutError as exc:
            raise ProviderTimeoutError(f"anthropic stream timed out ({call.timeout:g}s)") from exc
        except aiohttp.ClientError as exc:
            if not started:
                if isinstance(exc, aiohttp.ClientConnectionError):
                    raise ProviderConnectionError(f"anthropic connection failed: {describe(exc)}") from exc
                raise ProviderConnectionError(f"anthropic request failed: {type(exc).__name__}") from None
            raise ProviderStreamCut(f"anthropic stream broke: {type(exc).__name__}") from None
        finally:
            if resp is not None:
                resp.close()  # early close, error or cut: drop the connection now

    @staticmethod
    async def _next_chunks(source: _EventSource, translator: StreamTranslator) -> list[dict[str, Any]]:
        """Read events until the translator has chunks for the client or the message is done."""
        while True:
            item = await source.next()
            if item is None:
                return translator.finish()  # raises ProviderStreamCut without message_stop
            chunks = translator.feed(*item)
            if chunks or translator.done:
                return chunks

    @staticmethod
    def _as_chat(call: UpstreamCall) -> UpstreamCall:
        try:
            return dataclasses.replace(call, body=completion_to_chat_body(call.body))
        except AnthropicRequestError as exc:
            raise _bad_request(exc) from None

    async def completion(self, call: UpstreamCall) -> dict[str, Any]:
        """Legacy completion: the prompt as one user message, answered as ``text_completion``."""
        return chat_to_text_completion(await self.chat(self._as_chat(call)))

    async def completion_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        """Streaming legacy completion; chunks have ``object == "text_completion"``."""
        chat_call = self._as_chat(call)
        async with contextlib.aclosing(self.chat_stream(chat_call)) as chunks:
            async for chunk in chunks:
                if (out := chat_chunk_to_text_chunk(chunk)) is not None:
                    yield out

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        raise ProviderUnsupportedError("embeddings are not supported by anthropic deployments")
