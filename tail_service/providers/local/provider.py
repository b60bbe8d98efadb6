"""The embedded local provider: SmolLM2-135M-Instruct for chat/completions, MiniLM for embeddings.

``Deployment.upstream_model`` picks the engine: :data:`CHAT_MODEL` (chat and legacy
completions) or :data:`EMBED_MODEL` (embeddings); anything else raises
:class:`ProviderUnsupportedError`. Nothing touches the network.

Threading model:

* models load lazily on first use, once (concurrent first calls share the load), in
  the engine's worker thread, never on the event loop;
* chat generation runs on a one-thread executor, so requests queue and run one at a
  time; choices of one request (``n``) are generated one after the other;
* embeddings run on their own one-thread executor behind a micro-batcher: requests that
  arrive while a forward pass runs are merged into the next one (``max_embed_batch``);
* streaming: the worker pushes events into an ``asyncio.Queue`` with
  ``loop.call_soon_threadsafe``; when the consumer stops (the async generator is closed
  or cancelled) a ``threading.Event`` makes the worker stop within one token.

Installation: the engines need the ``local`` extra and the SmolLM2 weights (see
:mod:`.resources`). A model whose packages are missing is reported ``unavailable`` by
:meth:`LocalProvider.health` and answers every call with a 503
``local_model_unavailable`` naming what is missing and the command that installs it
(looked up again on each call until the model has loaded).

Semantics worth knowing: ``tools``/``tool_choice``/``response_format`` are ignored (the
model cannot call tools, and tool calls are never faked); ``suffix``/``best_of``/``user``
are ignored; image/audio/file content parts raise :class:`ProviderUnsupportedError`. The
model is smoke-test grade: it answers simple questions and makes things up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tail_service.core.types import UpstreamCall
from tail_service.errors import ProviderError, ProviderHTTPError, ProviderStreamCut, ProviderUnsupportedError
from tail_service.providers.local import resources
from tail_service.providers.local.concurrency import MicroBatcher, SingleFlight
from tail_service.providers.local.resources import CHAT_MODEL, EMBED_MODEL

# The engines need the `local` extra (NumPy, onnxruntime, gguf, tokenizers): they are
# imported when a model loads, so this module imports, and reports what is missing,
# without them.
if TYPE_CHECKING:
    from tail_service.providers.local.embedder import MiniLMEmbedder
    from tail_service.providers.local.generation import GenEvent, GenOptions, PromptJob
    from tail_service.providers.local.llama import LlamaModel
    from tail_service.providers.local.openai_format import OpenAIFormatter

    _JobBuilder = Callable[[LlamaModel, dict[str, Any], GenOptions], list[PromptJob]]

__all__ = ["CHAT_MODEL", "EMBED_MODEL", "LocalProvider"]

log = logging.getLogger("tail_service.providers.local")


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _Finished:
    pass


def _as_provider_error(exc: BaseException) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    err = ProviderError(f"local model failed: {exc!r}")
    err.__cause__ = exc
    return err


class LocalProvider:
    """Provider for the embedded models (see module doc). One instance serves all local deployments.

    ``chat_threads``: OpenBLAS threads for the chat engine (applied process-wide when the
    chat model loads). ``embed_threads``: onnxruntime intra-op threads.
    ``max_embed_batch``: inputs per embedding forward pass. ``chat_model_path``,
    ``embed_model_path``, ``embed_tokenizer_path`` override the packaged files.
    ``models``: the upstream models that deployments use (default: both); ``/health``
    reports these, and each is checked at construction for missing packages (logged
    with the command that installs them).
    """

    def __init__(
        self,
        *,
        models: Collection[str] = (CHAT_MODEL, EMBED_MODEL),
        chat_threads: int = 2,
        embed_threads: int = 1,
        max_embed_batch: int = 64,
        chat_model_path: str | os.PathLike[str] | None = None,
        embed_model_path: str | os.PathLike[str] | None = None,
        embed_tokenizer_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.chat_threads = max(1, chat_threads)
        self.embed_threads = max(1, embed_threads)
        self._chat_path = chat_model_path
        self._embed_path = embed_model_path
        self._embed_tok_path = embed_tokenizer_path
        self._chat_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-chat")
        self._embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-embed")
        self._chat = SingleFlight(self._load_chat, self._chat_pool)
        self._embed = SingleFlight(self._load_embedder, self._embed_pool)
        self._batcher: MicroBatcher[str | list[int], tuple[list[float], int]] = MicroBatcher(
            self._embed_batch, self._embed_pool, max_embed_batch
        )
        self._lock = threading.Lock()
        self._cancels: set[threading.Event] = set()
        self._running = 0
        self._closed = False
        self._models = tuple(m for m in (CHAT_MODEL, EMBED_MODEL) if m in {x.strip().lower() for x in models})
        for model in self._models:
            absent = self._missing(model)
            if absent:
                log.warning(
                    "local model %s is unavailable: missing %s; install with: %s",
                    model,
                    ", ".join(absent),
                    resources.fix_command(absent, pip=f"{sys.executable} -m pip"),
                )

    # ------------------------------------------------------------------ loading
    def _missing(self, model: str) -> list[str]:
        """What ``model`` lacks to run here (nothing when its files were given as paths)."""
        overridden = self._chat_path if model == CHAT_MODEL else self._embed_path
        absent = resources.missing(model)
        if overridden is not None:
            absent = [d for d in absent if d not in (resources.SMOLLM2_DIST, resources.MINILM_DIST)]
        return absent

    def _require(self, model: str, engine: SingleFlight[Any]) -> None:
        """Raise the 503 naming what is missing, unless ``model`` is loaded or can load."""
        if engine.loaded() is None:
            absent = self._missing(model)
            if absent:
                raise resources.unavailable(model, absent)

    def _load_chat(self) -> LlamaModel:
        from tail_service.providers.local.llama import LlamaModel

        path = (
            resources.checked_file(self._chat_path, "chat model")
            if self._chat_path is not None
            else resources.package_file(
                resources.SMOLLM2_PACKAGE, resources.SMOLLM2_FILE, resources.SMOLLM2_INSTALL
            )
        )
        return LlamaModel(str(path), threads=self.chat_threads)

    def _load_embedder(self) -> MiniLMEmbedder:
        from tail_service.providers.local.embedder import MiniLMEmbedder

        model = (
            resources.checked_file(self._embed_path, "embedding model")
            if self._embed_path is not None
            else resources.package_file(
                resources.MINILM_PACKAGE, resources.MINILM_FILE, resources.MINILM_INSTALL
            )
        )
        tok = resources.checked_file(
            self._embed_tok_path or resources.MINILM_TOKENIZER, "embedding tokenizer"
        )
        return MiniLMEmbedder(str(model), str(tok), threads=self.embed_threads)

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("the local provider is closed")

    @staticmethod
    def _engine(call: UpstreamCall, wanted: str) -> None:
        name = call.deployment.upstream_model.strip().lower()
        if name not in (CHAT_MODEL, EMBED_MODEL):
            raise ProviderUnsupportedError(
                f"unknown local model {call.deployment.upstream_model!r}; "
                f"expected {CHAT_MODEL!r} or {EMBED_MODEL!r}"
            )
        if name != wanted:
            raise ProviderUnsupportedError(f"local model {name!r} does not serve this endpoint")

    async def warm(self, upstream_model: str) -> None:
        """Load ``upstream_model`` now (in its worker thread) instead of on first request."""
        self._check_open()
        name = upstream_model.strip().lower()
        if name not in (CHAT_MODEL, EMBED_MODEL):
            raise ProviderUnsupportedError(f"unknown local model {upstream_model!r}")
        if self._missing(name):
            return  # logged at construction; /health and each request say what to install
        if name == CHAT_MODEL:
            await self._chat.get()
        else:
            await self._embed.get()

    def stats(self) -> dict[str, int]:
        """Counters for tests and metrics: running chat jobs, embedding batches/inputs."""
        return {
            "chat_jobs_running": self._running,
            "embed_batches": self._batcher.batches,
            "embed_inputs": self._batcher.items,
        }

    def model_state(self, model: str) -> dict[str, Any]:
        """One model for ``/health``: ``ok`` (``loaded`` or loading on first use) or
        ``unavailable``, with the missing distributions and the command that installs them."""
        engine: SingleFlight[Any] = self._chat if model == CHAT_MODEL else self._embed
        if engine.loaded() is not None:
            return {"status": "ok", "loaded": True}
        absent = self._missing(model)
        if absent:
            return {
                "status": "unavailable",
                "loaded": False,
                "missing": absent,
                "fix": resources.fix_command(absent),
            }
        return {"status": "ok", "loaded": False}

    async def health(self) -> dict[str, Any]:
        """For ``/health``: each configured local model's state (see :meth:`model_state`)."""
        models = {m: self.model_state(m) for m in self._models}
        ok = all(m["status"] == "ok" for m in models.values())
        return {"status": "ok" if ok else "degraded", "models": models, **self.stats()}

    # ------------------------------------------------------------------ chat / completions
    async def _prepare(
        self, call: UpstreamCall, *, chat: bool
    ) -> tuple[LlamaModel, GenOptions, OpenAIFormatter]:
        self._check_open()
        self._engine(call, CHAT_MODEL)
        self._require(CHAT_MODEL, self._chat)
        model = await self._chat.get()
        from tail_service.providers.local.generation import parse_options
        from tail_service.providers.local.openai_format import OpenAIFormatter

        opts = parse_options(call.body, chat=chat)
        name = str(call.body.get("model") or CHAT_MODEL)
        fmt = OpenAIFormatter(model.tokenizer, name, chat=chat, logprobs=opts.logprobs is not None)
        return model, opts, fmt

    async def _events(
        self, model: LlamaModel, build: _JobBuilder, body: dict[str, Any], opts: GenOptions
    ) -> AsyncGenerator[GenEvent, None]:
        """Run one generation job on the chat thread and yield its events as they happen.

        Raises the job's error; raises :class:`ProviderError` if the job stopped before
        ``GenerationDone`` (provider closed). Closing this generator stops the worker.
        """
        from tail_service.providers.local.generation import GenerationDone, run_generation

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenEvent | _Failed | _Finished] = asyncio.Queue()
        cancel = threading.Event()

        def emit(ev: GenEvent | _Failed | _Finished) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancel.set()

        def job() -> None:
            with self._lock:
                self._running += 1
            try:
                if not cancel.is_set():
                    run_generation(model, build(model, body, opts), opts, emit, cancel)
                emit(_Finished())
            except BaseException as exc:
                emit(_Failed(exc))
            finally:
                with self._lock:
                    self._running -= 1

        def on_done(fut: Future[None]) -> None:
            if fut.cancelled():  # dropped from the queue by aclose()
                emit(_Failed(ProviderError("the local provider is closed")))

        with self._lock:
            self._cancels.add(cancel)
        try:
            self._chat_pool.submit(job).add_done_callback(on_done)
        except RuntimeError as exc:
            raise ProviderError("the local provider is closed") from exc
        try:
            done = False
            while True:
                ev = await queue.get()
                if isinstance(ev, _Finished):
                    if not done:
                        raise ProviderError("local generation was interrupted")
                    return
                if isinstance(ev, _Failed):
                    raise _as_provider_error(ev.error)
                done = done or isinstance(ev, GenerationDone)
                yield ev
        finally:
            cancel.set()
            with self._lock:
                self._cancels.discard(cancel)

    async def _complete(self, call: UpstreamCall, *, chat: bool) -> dict[str, Any]:
        model, opts, fmt = await self._prepare(call, chat=chat)
        from tail_service.providers.local.generation import chat_jobs, completion_jobs

        build = chat_jobs if chat else completion_jobs
        async with aclosing(self._events(model, build, call.body, opts)) as events:
            collected = [ev async for ev in events]
        return fmt.response(collected)

    async def _stream(self, call: UpstreamCall, *, chat: bool) -> AsyncGenerator[dict[str, Any], None]:
        model, opts, fmt = await self._prepare(call, chat=chat)
        from tail_service.providers.local.generation import chat_jobs, completion_jobs

        build = chat_jobs if chat else completion_jobs
        sent = False
        async with aclosing(self._events(model, build, call.body, opts)) as events:
            try:
                async for ev in events:
                    for chunk in fmt.chunks(ev):
                        sent = True
                        yield chunk
            except ProviderError as exc:
                if sent and not isinstance(exc, ProviderStreamCut):
                    raise ProviderStreamCut(f"local generation stopped mid-stream: {exc.message}") from exc
                raise

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        """OpenAI ``chat.completion`` from SmolLM2 (default ``max_tokens`` 256)."""
        return await self._complete(call, chat=True)

    def chat_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        """``chat.completion.chunk`` dicts as tokens are generated, then a usage chunk."""
        return self._stream(call, chat=True)

    async def completion(self, call: UpstreamCall) -> dict[str, Any]:
        """OpenAI ``text_completion`` (raw prompt, no template; default ``max_tokens`` 16)."""
        return await self._complete(call, chat=False)

    def completion_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        """``text_completion`` chunks as tokens are generated, then a usage chunk."""
        return self._stream(call, chat=False)

    # ------------------------------------------------------------------ embeddings
    def _embed_batch(self, items: list[str | list[int]]) -> list[tuple[list[float], int] | BaseException]:
        from tail_service.providers.local.embedder import EmbedInputError

        embedder = self._embed.loaded()
        if embedder is None:
            raise ProviderError("embedding model is not loaded")
        slots: list[int | BaseException] = []  # row in ``ok``, or the item's error
        ok: list[list[int]] = []
        for item in items:
            try:
                ids = embedder.tokenize(item)
            except EmbedInputError as exc:
                slots.append(ProviderHTTPError(400, str(exc), body=_invalid_input(str(exc))))
                continue
            slots.append(len(ok))
            ok.append(ids)
        vectors = embedder.embed_ids(ok)
        return [s if isinstance(s, BaseException) else (vectors[s].tolist(), len(ok[s])) for s in slots]

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        """OpenAI embedding list (float vectors, 384 dims, unit norm); ``dimensions`` is ignored.

        ``usage.prompt_tokens`` is the real WordPiece count (with ``[CLS]``/``[SEP]``,
        after truncation to 256). Token-array inputs are MiniLM WordPiece ids.
        """
        self._check_open()
        self._engine(call, EMBED_MODEL)
        items = _embedding_inputs(call.body.get("input"))
        self._require(EMBED_MODEL, self._embed)
        await self._embed.get()
        results = await asyncio.wrap_future(self._batcher.submit(items))
        data = [{"object": "embedding", "index": i, "embedding": vec} for i, (vec, _) in enumerate(results)]
        n_tokens = sum(n for _, n in results)
        return {
            "object": "list",
            "data": data,
            "model": str(call.body.get("model") or EMBED_MODEL),
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    # ------------------------------------------------------------------ shutdown
    async def aclose(self) -> None:
        """Stop running generations, fail queued embeddings, shut the worker threads down."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for ev in self._cancels:
                ev.set()
            self._cancels.clear()
        self._batcher.fail_all(ProviderError("the local provider is closed"))
        self._chat_pool.shutdown(wait=False, cancel_futures=True)
        self._embed_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.gather(
            asyncio.to_thread(self._chat_pool.shutdown, wait=True),
            asyncio.to_thread(self._embed_pool.shutdown, wait=True),
        )
        self._chat.reset()
        self._embed.reset()


def _invalid_input(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": "input", "code": None}}


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    """``input`` as a list of texts / token arrays (OpenAI's four accepted shapes)."""

    def bad(message: str) -> ProviderHTTPError:
        return ProviderHTTPError(400, message, body=_invalid_input(message))

    def is_tokens(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(raw, str):
        items: Sequence[Any] = [raw]
    elif isinstance(raw, list) and raw and is_tokens(raw):
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise bad("'input' must be a non-empty string, array of strings, or token array(s)")
    out: list[str | list[int]] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad("'input' must not contain empty strings")
            out.append(item)
        elif is_tokens(item) and item:
            out.append(list(item))
        else:
            raise bad("'input' items must be non-empty strings or non-empty token arrays")
    return out
