"""Token counting as the core needs it (implemented by :mod:`tail_service.tiktoken_counter`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tail_service.core.types import ProxyRequest

#: request bodies above this size are counted in a worker thread: counting a 30 MB prompt
#: takes seconds, and on the event loop it would hold up every other request
COUNT_INLINE_MAX_BYTES = 64 * 1024


class TokenCounter(Protocol):
    """Exact offline token counts, used when an upstream does not report usage.

    Implementations must be thread-safe: large prompts are counted in worker threads.
    """

    def count_text(self, text: str, model: str) -> int: ...

    def count_prompt(self, body: dict[str, Any], endpoint: str) -> int: ...


async def count_prompt(counter: TokenCounter, req: ProxyRequest) -> int:
    """Prompt tokens of ``req``: inline when small, in a worker thread when large."""
    if req.body_bytes <= COUNT_INLINE_MAX_BYTES:
        return counter.count_prompt(req.body, req.endpoint.value)
    return await asyncio.to_thread(counter.count_prompt, req.body, req.endpoint.value)


async def count_text(counter: TokenCounter, text: str, model: str) -> int:
    """Tokens of ``text``: inline when short, in a worker thread when long."""
    if len(text) <= COUNT_INLINE_MAX_BYTES:
        return counter.count_text(text, model)
    return await asyncio.to_thread(counter.count_text, text, model)
