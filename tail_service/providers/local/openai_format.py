"""Translate generation events into OpenAI chat / legacy-completion dicts (responses and chunks).

Shapes follow ``shared/docs/openai-contract.md`` §4-§5:

* chat response: ``message = {role, content, refusal: None}``, ``logprobs`` is ``None``
  unless asked, then ``{"content": [TokenLogprob...], "refusal": None}``;
* chat stream: per choice ``{"role": "assistant", "content": ""}`` first, then
  ``{"content": piece}``, then ``{}`` with ``finish_reason``; the run ends with a
  ``{"choices": [], "usage": {...}}`` chunk (the core drops it unless the client asked);
* legacy: ``{text, index, logprobs, finish_reason}`` with ``logprobs = {tokens,
  token_logprobs, top_logprobs, text_offset}``; streamed chunks have the same shape.

``id``, ``created`` and ``model`` are fixed per :class:`OpenAIFormatter`, so they are
identical across all chunks of a stream.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from tail_service.providers.local.generation import (
    ChoiceFinished,
    ChoiceStarted,
    ChoiceText,
    GenerationDone,
    GenEvent,
    TokenInfo,
)
from tail_service.providers.local.smol_tokenizer import SmolTokenizer


class OpenAIFormatter:
    """Builds the dicts of one request. ``chat`` selects chat vs legacy completion shapes.

    ``logprobs``: whether the client asked for logprobs (events then carry token infos).
    """

    def __init__(self, tokenizer: SmolTokenizer, model: str, *, chat: bool, logprobs: bool) -> None:
        self._tok = tokenizer
        self.chat = chat
        self.logprobs = logprobs
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    # ------------------------------------------------------------------ logprobs
    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": self._tok.token_str(token_id),
            "logprob": logprob,
            "bytes": list(self._tok.token_bytes(token_id)),
        }

    def chat_logprobs(self, infos: Iterable[TokenInfo]) -> dict[str, Any]:
        """``{"content": [...], "refusal": None}`` for the given tokens."""
        content = []
        for info in infos:
            entry = self._token_entry(info.token_id, info.logprob if info.logprob is not None else 0.0)
            entry["top_logprobs"] = [self._token_entry(t, lp) for t, lp in info.top]
            content.append(entry)
        return {"content": content, "refusal": None}

    def legacy_logprobs(self, infos: Sequence[TokenInfo]) -> dict[str, Any]:
        """``{tokens, token_logprobs, top_logprobs, text_offset}`` for the given tokens."""
        tops: list[dict[str, float] | None] = []
        for info in infos:
            if info.logprob is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for t, lp in info.top:
                top.setdefault(self._tok.token_str(t), lp)
            tops.append(top)
        return {
            "tokens": [self._tok.token_str(i.token_id) for i in infos],
            "token_logprobs": [i.logprob for i in infos],
            "top_logprobs": tops,
            "text_offset": [i.text_offset for i in infos],
        }

    # ------------------------------------------------------------------ streaming
    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunks(self, event: GenEvent) -> list[dict[str, Any]]:
        """Stream chunks for one event (possibly none)."""
        if isinstance(event, ChoiceStarted):
            if not self.chat:
                return []
            empty: dict[str, Any] | None = {"content": [], "refusal": None} if self.logprobs else None
            delta = {"role": "assistant", "content": ""}
            return [
                self._chunk(
                    [{"index": event.index, "delta": delta, "logprobs": empty, "finish_reason": None}]
                )
            ]
        if isinstance(event, ChoiceText):
            if self.chat:
                lp = self.chat_logprobs(event.tokens) if self.logprobs else None
                choice = {
                    "index": event.index,
                    "delta": {"content": event.text},
                    "logprobs": lp,
                    "finish_reason": None,
                }
            else:
                lp = self.legacy_logprobs(event.tokens) if self.logprobs else None
                choice = {"text": event.text, "index": event.index, "logprobs": lp, "finish_reason": None}
            return [self._chunk([choice])]
        if isinstance(event, ChoiceFinished):
            if self.chat:
                choice = {
                    "index": event.index,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                }
            else:
                choice = {
                    "text": "",
                    "index": event.index,
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                }
            return [self._chunk([choice])]
        chunk = self._chunk([])
        chunk["usage"] = usage(event)
        return [chunk]

    # ------------------------------------------------------------------ whole response
    def response(self, events: Iterable[GenEvent]) -> dict[str, Any]:
        """The complete ``chat.completion`` / ``text_completion`` dict from all events."""
        texts: dict[int, list[str]] = {}
        infos: dict[int, list[TokenInfo]] = {}
        finish: dict[int, str] = {}
        done = GenerationDone(0, 0)
        for ev in events:
            if isinstance(ev, ChoiceStarted):
                texts[ev.index], infos[ev.index] = [], []
            elif isinstance(ev, ChoiceText):
                texts[ev.index].append(ev.text)
                infos[ev.index].extend(ev.tokens)
            elif isinstance(ev, ChoiceFinished):
                finish[ev.index] = ev.finish_reason
            else:
                done = ev
        choices: list[dict[str, Any]] = []
        for index in sorted(texts):
            text = "".join(texts[index])
            if self.chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": self.chat_logprobs(infos[index]) if self.logprobs else None,
                        "finish_reason": finish.get(index, "length"),
                    }
                )
            else:
                choices.append(
                    {
                        "text": text,
                        "index": index,
                        "logprobs": self.legacy_logprobs(infos[index]) if self.logprobs else None,
                        "finish_reason": finish.get(index, "length"),
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(done),
        }


def usage(done: GenerationDone) -> dict[str, int]:
    """OpenAI ``usage`` object."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }
