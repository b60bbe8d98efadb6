"""Token counting as the core needs it (implemented by :mod:`tail_service.tiktoken_counter`)."""

from __future__ import annotations

from typing import Any, Protocol


class TokenCounter(Protocol):
    """Exact offline token counts, used when an upstream does not report usage."""

    def count_text(self, text: str, model: str) -> int: ...

    def count_prompt(self, body: dict[str, Any], endpoint: str) -> int: ...
