"""Request parsing and the worker-thread generation loop for the local chat model.

The loop (:func:`run_generation`) is synchronous and emits :data:`GenEvent` objects
through a callback, so the same code serves non-streaming calls (collect into a list)
and streaming calls (push into an asyncio queue). Choices are generated one after the
other, in index order; each emits ``ChoiceStarted``, zero or more ``ChoiceText``, then
``ChoiceFinished``; the run ends with ``GenerationDone``. When ``cancel`` is set the loop
returns promptly without further events.

Token accounting: ``prompt_tokens`` is the exact length of each rendered prompt (once per
prompt, not per choice, as OpenAI counts); ``completion_tokens`` is every sampled token
except the end-of-turn token (OpenAI does not count it either).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tail_service.errors import ProviderHTTPError, ProviderUnsupportedError
from tail_service.providers.local.llama import LlamaModel
from tail_service.providers.local.sampling import Sampler, SamplingParams
from tail_service.providers.local.textstream import TextAssembler

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_N = 128
#: content part types whose text is used; any other part type is refused (text-only model)
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal"})


@dataclass(frozen=True, slots=True)
class GenOptions:
    """Validated generation parameters of one request.

    ``logprobs``: ``None`` when not requested, else how many alternatives per token.
    ``echo``: legacy completions only; prepend the prompt to each choice.
    """

    max_tokens: int
    n: int = 1
    stops: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False


@dataclass(frozen=True, slots=True)
class PromptJob:
    """One prompt; produces choices ``first_index .. first_index + n - 1``."""

    ids: tuple[int, ...]
    first_index: int
    echo_text: str = ""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """Logprob data of one emitted token; ``text_offset`` in characters of the choice text."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    text_offset: int


@dataclass(frozen=True, slots=True)
class ChoiceStarted:
    index: int


@dataclass(frozen=True, slots=True)
class ChoiceText:
    index: int
    text: str
    tokens: tuple[TokenInfo, ...]


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class GenerationDone:
    prompt_tokens: int
    completion_tokens: int


GenEvent = ChoiceStarted | ChoiceText | ChoiceFinished | GenerationDone


def _bad_request(message: str, param: str | None, code: str | None = None) -> ProviderHTTPError:
    err = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return ProviderHTTPError(400, message, body={"error": err})


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def parse_options(body: dict[str, Any], *, chat: bool) -> GenOptions:
    """Read OpenAI sampling fields from ``body`` (chat or legacy completion defaults)."""
    default_max = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS
    max_tokens = _int(body.get("max_completion_tokens"), None) if chat else None
    if max_tokens is None:
        max_tokens = _int(body.get("max_tokens"), default_max)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if isinstance(s, str) and s)
    bias: dict[int, float] = {}
    raw_bias = body.get("logit_bias")
    if isinstance(raw_bias, dict):
        for key, val in raw_bias.items():
            if str(key).lstrip("-").isdigit() and isinstance(val, int | float):
                bias[int(key)] = float(val)
    sampling = SamplingParams(
        temperature=max(0.0, _num(body.get("temperature"), 1.0)),
        top_p=min(1.0, max(1e-6, _num(body.get("top_p"), 1.0))),
        presence_penalty=_num(body.get("presence_penalty"), 0.0),
        frequency_penalty=_num(body.get("frequency_penalty"), 0.0),
        logit_bias=bias,
    )
    if chat:
        top = _int(body.get("top_logprobs"), 0) or 0
        logprobs = max(0, min(20, top)) if body.get("logprobs") is True else None
    else:
        lp = _int(body.get("logprobs"), None)
        logprobs = None if lp is None else max(0, min(20, lp))
    return GenOptions(
        max_tokens=max(0, max_tokens or 0),
        n=max(1, min(MAX_N, _int(body.get("n"), 1) or 1)),
        stops=stops,
        sampling=sampling,
        seed=_int(body.get("seed"), None),
        logprobs=logprobs,
        echo=not chat and body.get("echo") is True,
    )


def chat_messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    """``(role, text)`` pairs for the ChatML template; ``developer`` becomes ``system``.

    Text parts are joined with newlines. Image/audio/file parts raise
    :class:`ProviderUnsupportedError` (the model reads text only).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_request("'messages' must be a non-empty array", "messages")
    out: list[tuple[str, str]] = []
    for msg in messages:
        if not isinstance(msg, dict):
            raise _bad_request("each message must be an object", "messages")
        role = msg.get("role")
        role = "system" if role == "developer" else str(role or "user")
        content = msg.get("content")
        if isinstance(content, list):
            texts: list[str] = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in _TEXT_PARTS:
                    raise ProviderUnsupportedError(
                        f"the local chat model reads text only (got a {kind!r} part)"
                    )
                value = part.get("text", part.get("refusal"))
                texts.append(value if isinstance(value, str) else "")
            content = "\n".join(texts)
        elif not isinstance(content, str):
            content = ""
        out.append((role, content))
    return out


def chat_jobs(model: LlamaModel, body: dict[str, Any], opts: GenOptions) -> list[PromptJob]:
    """The single prompt job of a chat request (the model's own rendered ChatML prompt)."""
    return [PromptJob(tuple(model.tokenizer.render_chat(chat_messages(body))), 0)]


def completion_jobs(model: LlamaModel, body: dict[str, Any], opts: GenOptions) -> list[PromptJob]:
    """One job per legacy prompt (``str | list[str] | list[int] | list[list[int]]``).

    String prompts parse control-token text (``<|im_start|>``); token arrays are this
    model's own ids. An empty prompt becomes ``<|endoftext|>``, OpenAI's default prompt.
    """
    tok = model.tokenizer
    prompt = body.get("prompt", "<|endoftext|>")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise _bad_request("'prompt' must be a string, an array of strings or token arrays", "prompt")
    jobs: list[PromptJob] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tok.encode(p or "<|endoftext|>", parse_special=True)
            text = p
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = next((t for t in p if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise _bad_request(
                    f"token id {bad} is outside the vocabulary (0..{tok.vocab_size - 1})", "prompt"
                )
            ids, text = list(p), tok.decode(p, skip_control=False)
        else:
            raise _bad_request("'prompt' must be a string, an array of strings or token arrays", "prompt")
        jobs.append(PromptJob(tuple(ids), i * opts.n, text))
    return jobs


def _check_context(model: LlamaModel, jobs: Sequence[PromptJob]) -> None:
    ctx = model.config.context_length
    for job in jobs:
        if len(job.ids) >= ctx:
            raise _bad_request(
                f"This model's maximum context length is {ctx} tokens. However, your prompt resulted "
                f"in {len(job.ids)} tokens. Please reduce the length of the prompt.",
                "messages",
                "context_length_exceeded",
            )


def _echo_infos(model: LlamaModel, job: PromptJob, k: int, cancel: threading.Event) -> tuple[TokenInfo, ...]:
    tok = model.tokenizer
    scored = model.score(job.ids, k, cancel)
    asm = TextAssembler()
    infos = []
    for tid, (lp, top) in zip(job.ids, scored, strict=False):
        infos.append(TokenInfo(tid, lp, top, asm.char_offset))
        asm.push(tok.token_bytes(tid))
    return tuple(infos)


def run_generation(
    model: LlamaModel,
    jobs: Sequence[PromptJob],
    opts: GenOptions,
    emit: Callable[[GenEvent], None],
    cancel: threading.Event,
) -> None:
    """Generate every choice of every job, reporting through ``emit`` (see module doc).

    Raises :class:`ProviderHTTPError` (400) before any event when a prompt does not fit the
    context window. ``max_tokens`` is clamped to the room left in the context window.
    """
    _check_context(model, jobs)
    tok = model.tokenizer
    rng = np.random.default_rng(opts.seed)
    want_lp = opts.logprobs is not None
    k = opts.logprobs or 0
    completion_total = 0
    for job in jobs:
        echo = _echo_infos(model, job, k, cancel) if opts.echo and want_lp else ()
        for c in range(opts.n):
            if cancel.is_set():
                return
            index = job.first_index + c
            emit(ChoiceStarted(index))
            base = 0
            if opts.echo:
                emit(ChoiceText(index, job.echo_text, echo))
                base = len(job.echo_text)
            sampler = Sampler(opts.sampling, rng, model.config.vocab_size)
            asm = TextAssembler(opts.stops)
            pending: list[TokenInfo] = []
            produced = 0
            finish = "length"
            for step in model.generate(
                job.ids,
                sampler,
                max_tokens=opts.max_tokens,
                top_logprobs=k if want_lp else None,
                cancel=cancel,
            ):
                if step.is_end:
                    finish = "stop"
                    break
                produced += 1
                if want_lp:
                    pending.append(TokenInfo(step.token_id, step.logprob, step.top, base + asm.char_offset))
                text = asm.push(tok.output_bytes(step.token_id))
                if text:
                    emit(ChoiceText(index, text, tuple(pending)))
                    pending = []
                if asm.stopped:
                    finish = "stop"
                    break
            if cancel.is_set():
                return
            tail = asm.finish()
            if tail:
                emit(ChoiceText(index, tail, tuple(pending)))
            completion_total += produced
            emit(ChoiceFinished(index, finish, produced))
    emit(GenerationDone(sum(len(j.ids) for j in jobs), completion_total))
