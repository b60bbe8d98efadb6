"""Offline token counting: exact ids, model mapping, the chat formula, robustness."""

from __future__ import annotations

import gzip
import threading
from pathlib import Path
from typing import Any

import pytest

from tail_service import tiktoken_counter as tokens
from tail_service.core.types import Endpoint
from tail_service.tiktoken_counter import TiktokenCounter, TokenizerDataError


@pytest.fixture(scope="module")
def counter() -> TiktokenCounter:
    c = TiktokenCounter()
    c.warm()
    return c


def test_known_ids_both_encodings(counter: TiktokenCounter) -> None:
    # ids documented by tiktoken / the OpenAI cookbook
    assert counter.encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert counter.encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert counter.encoding("cl100k_base").encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert counter.count_text("hello world", "gpt-4") == 2
    assert counter.count_text("hello world", "gpt-4o") == 2
    assert counter.count_text("tiktoken is great!", "gpt-3.5-turbo") == 6
    assert counter.count_text("", "gpt-4o") == 0


def test_encodings_differ_where_vocabularies_differ(counter: TiktokenCounter) -> None:
    text = "Größenverhältnisse und 東京都 — numbers 1234567"
    cl = counter.encoding("cl100k_base").encode(text)
    o2 = counter.encoding("o200k_base").encode(text)
    assert counter.count_text(text, "gpt-4") == len(cl)
    assert counter.count_text(text, "gpt-4o") == len(o2)
    assert len(o2) < len(cl)
    assert counter.encoding("o200k_base").decode(o2) == text


def test_special_token_text_counts_as_ordinary_text(counter: TiktokenCounter) -> None:
    n = counter.count_text("<|endoftext|>", "gpt-4")
    assert n == len(counter.encoding("cl100k_base").encode_ordinary("<|endoftext|>"))
    assert n > 1


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
        ("gpt-oss-20b", "o200k_base"),  # o200k_harmony family
        ("davinci", "cl100k_base"),  # retired r50k: approximated
        ("claude-3-5-sonnet", "o200k_base"),  # unknown -> default
        ("", "o200k_base"),
    ],
)
def test_model_mapping(model: str, expected: str) -> None:
    assert TiktokenCounter.encoding_name_for(model) == expected


# The OpenAI cookbook example ("How to count tokens with tiktoken"): 129 tokens for
# gpt-3.5-turbo / gpt-4, 124 for gpt-4o.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_messages_cookbook_values(counter: TiktokenCounter) -> None:
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-3.5-turbo-0613") == 129
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-4o") == 124


def test_messages_formula_parts(counter: TiktokenCounter) -> None:
    # 3 per message + role ("user" = 1) + content (2) + 3 reply priming
    assert counter.count_messages([{"role": "user", "content": "hello world"}], "gpt-4o") == 9
    # a name costs its tokens + 1
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    assert counter.count_messages(named, "gpt-4o") == 9 + counter.count_text("bob", "gpt-4o") + 1
    # text parts count like strings; images are a fixed estimate
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "text", "text": " world"},
                {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
            ],
        }
    ]
    text = counter.count_text("hello", "gpt-4o") + counter.count_text(" world", "gpt-4o")
    expected = 3 + 1 + text + tokens.IMAGE_TOKENS_LOW + tokens.IMAGE_TOKENS_DEFAULT + 3
    assert counter.count_messages(parts, "gpt-4o") == expected


def test_tool_calls_count_name_and_arguments(counter: TiktokenCounter) -> None:
    args = '{"city": "Paris", "unit": "celsius"}'
    msg = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
        ],
    }
    base = counter.count_messages([{"role": "assistant", "content": None}], "gpt-4o")
    extra = counter.count_text("get_weather", "gpt-4o") + counter.count_text(args, "gpt-4o")
    assert counter.count_messages([msg], "gpt-4o") == base + extra


def test_count_tools_cookbook_formula(counter: TiktokenCounter) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "description": "The city."},
                        "unit": {"type": "string", "description": "Unit", "enum": ["c", "f"]},
                    },
                },
            },
        }
    ]
    t = counter.count_text
    m = "gpt-4o"
    # func_init 7, prop_init 3, prop_key 3 each, enum_init -3, enum_item 3 each, func_end 12
    expected = (
        7
        + t("get_weather:Get the weather", m)
        + 3
        + 3
        + t("city:string:The city", m)
        + 3
        - 3
        + (3 + t("c", m))
        + (3 + t("f", m))
        + t("unit:string:Unit", m)
        + 12
    )
    assert counter.count_tools(tools, m) == expected
    assert counter.count_tools([], m) == 0
    assert counter.count_tools(None, m) == 0
    # cl100k models use func_init 10
    assert counter.count_tools(tools, "gpt-4") > 0


def test_count_prompt_endpoints(counter: TiktokenCounter) -> None:
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}]}
    assert counter.count_prompt(chat, "chat") == 9
    assert counter.count_prompt(chat, Endpoint.CHAT) == 9
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert counter.count_prompt({**chat, "tools": tools}, "chat") == 9 + counter.count_tools(tools, "gpt-4o")

    def completion(prompt: Any) -> int:
        return counter.count_prompt({"model": "gpt-3.5-turbo-instruct", "prompt": prompt}, "completion")

    assert completion("hello world") == 2
    assert completion(["hello world", "hello"]) == 3
    assert completion([1, 2, 3]) == 3
    assert completion([[1, 2], [3, 4, 5]]) == 5

    def embedding(value: Any) -> int:
        return counter.count_prompt({"model": "text-embedding-3-small", "input": value}, "embedding")

    assert embedding("hello world") == 2
    assert embedding(["hello world", "tiktoken is great!"]) == 8
    assert embedding([15339, 1917]) == 2
    assert embedding([[15339, 1917], [1]]) == 3
    assert counter.count_prompt(chat, "responses") == 0


@pytest.mark.parametrize(
    ("body", "endpoint"),
    [
        ({}, "chat"),
        ({"messages": None}, "chat"),
        ({"messages": "hi"}, "chat"),
        ({"model": 5, "messages": [None, 5, "x", {"role": 7, "content": {"a": 1}}]}, "chat"),
        ({"messages": [{"content": [None, 3, {"type": "image_url"}, {"text": 5}, "raw"]}]}, "chat"),
        ({"messages": [{"tool_calls": [None, {"function": None}, {"function": {"name": 3}}]}]}, "chat"),
        (
            {
                "messages": [],
                "tools": [None, {"function": "x"}, {"function": {"parameters": {"properties": 3}}}],
            },
            "chat",
        ),
        (
            {
                "messages": [],
                "tools": [{"function": {"parameters": {"properties": {"a": 1, "b": {"enum": 3}}}}}],
            },
            "chat",
        ),
        ({"messages": [], "functions": "nope"}, "chat"),
        ({"prompt": {"a": 1}}, "completion"),
        ({"prompt": [True, None, 1.5, "ok", [1, "x", None]]}, "completion"),
        ({"input": None}, "embedding"),
        ({"input": [[], [None], {}]}, "embedding"),
    ],
)
def test_never_raises_on_odd_input(counter: TiktokenCounter, body: dict[str, Any], endpoint: str) -> None:
    n = counter.count_prompt(body, endpoint)
    assert isinstance(n, int)
    assert n >= 0


def test_odd_top_level_values(counter: TiktokenCounter) -> None:
    assert counter.count_prompt(None, "chat") == 0  # type: ignore[arg-type]
    assert counter.count_messages(None, "gpt-4o") == 0  # type: ignore[arg-type]
    assert counter.count_text(None, "gpt-4o") == 0  # type: ignore[arg-type]
    assert counter.count_text("hi", None) == 1  # type: ignore[arg-type]


def test_lazy_thread_safe_single_build(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = tokens._build_encoding
    gate = threading.Barrier(8)

    def counting(name: str) -> Any:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(tokens, "_build_encoding", counting)
    c = TiktokenCounter()
    results: list[int] = []

    def work() -> None:
        gate.wait()
        results.append(c.count_text("hello world", "gpt-4o"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [2] * 8
    assert calls == ["o200k_base"]  # built once, only the encoding that was needed


def test_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken.load

    def no_network(*_a: Any, **_k: Any) -> bytes:
        raise AssertionError("tiktoken tried to fetch a file")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    c = TiktokenCounter()
    c.warm()
    assert c.count_text("hello world", "gpt-4") == 2


def test_hash_mismatch_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "cl100k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(b"aGVsbG8= 0\n"))
    monkeypatch.setattr(tokens, "_data_file", lambda name: bad)
    with pytest.raises(TokenizerDataError, match="sha256"):
        TiktokenCounter().encoding("cl100k_base")


def test_unsupported_encoding_name() -> None:
    with pytest.raises(ValueError, match="unsupported encoding"):
        TiktokenCounter().encoding("p50k_base")


# ------------------------------------------------------------------ the published encodings, pinned


@pytest.mark.parametrize("name", tokens.SUPPORTED_ENCODINGS)
def test_specs_match_what_tiktoken_publishes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our pattern, special tokens and hash are tiktoken's own: an upgrade that changes them fails here."""
    from tiktoken_ext import openai_public

    seen: dict[str, Any] = {}

    def no_download(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen["hash"] = expected_hash
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", no_download)
    published = openai_public.ENCODING_CONSTRUCTORS[name]()
    spec = tokens.ENCODING_SPECS[name]
    assert published["pat_str"] == spec.pat_str
    assert published["special_tokens"] == dict(spec.special_tokens)
    assert seen["hash"] == spec.sha256


def test_known_token_ids(counter: TiktokenCounter) -> None:
    """The OpenAI cookbook's example ids (and the ranks dict emptied after building did not matter)."""
    assert counter.encoding("cl100k_base").encode_ordinary("tiktoken is great!") == [
        83,
        1609,
        5963,
        374,
        2294,
        0,
    ]
    assert counter.encoding("o200k_base").encode_ordinary("tiktoken is great!") == [
        83,
        8251,
        2488,
        382,
        2212,
        0,
    ]


@pytest.mark.parametrize("name", tokens.SUPPORTED_ENCODINGS)
def test_long_text_counted_in_pieces_is_exact(name: str, counter: TiktokenCounter) -> None:
    import random

    rng = random.Random(7)
    words = ["".join(rng.choices("abcdefghijXYZéß的 ", k=rng.randint(1, 9))) for _ in range(500)]
    text = " ".join(rng.choices([*words, "\n", "  ", "12345", " ,", "\t\t"], k=40_000))
    assert len(text) > 5 * tokens.PIECE_CHARS
    enc = counter.encoding(name)
    assert tokens._encoded_len(enc, text) == len(enc.encode_ordinary(text))
