"""SmolLM2's byte-level BPE tokenizer, rebuilt from GGUF metadata, and its ChatML template.

The GGUF file carries the vocabulary (``tokenizer.ggml.tokens``), the token types and the
BPE merges; ``tokenizer.ggml.pre == "smollm"`` names the pre-tokenizer, which is "split
every digit on its own, then GPT-2 byte-level splitting". That is rebuilt here with the
``tokenizers`` library, so no tokenizer file is needed besides the GGUF.

Control tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` ...) are never produced
by the BPE model. :meth:`SmolTokenizer.encode` maps their literal text to their ids only
when ``parse_special`` is true (used for the model's own template and for raw legacy
prompts), so chat message content that merely *contains* ``<|im_end|>`` cannot inject
template structure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

#: The system message SmolLM2's chat template adds when the first message is not a system one.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: GGUF token type of control (special) tokens.
_TOKEN_TYPE_CONTROL = 3


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode-char -> byte table (inverse of ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class SmolTokenizer:
    """Encode/decode for SmolLM2 (vocabulary of 49152 byte-level BPE tokens).

    Invariants: ids are ``0 <= id < vocab_size``; :meth:`token_bytes` of a normal token is
    its exact UTF-8 byte fragment (it may be an incomplete code point), so concatenating
    the bytes of generated ids and decoding them once is the exact output text.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        *,
        eos_id: int,
    ) -> None:
        self.vocab_size = len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs: list[tuple[str, str]] = []
        for merge in merges:
            left, _, right = merge.partition(" ")
            pairs.append((left, right))
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        self._tokenizer = tok
        self._control: dict[str, int] = {
            t: i
            for i, (t, kind) in enumerate(zip(tokens, token_types, strict=True))
            if kind == _TOKEN_TYPE_CONTROL
        }
        self._control_ids = frozenset(self._control.values())
        self._special_re = (
            re.compile(
                "(" + "|".join(re.escape(t) for t in sorted(self._control, key=len, reverse=True)) + ")"
            )
            if self._control
            else None
        )
        table = _byte_decoder()
        self._bytes: list[bytes] = []
        for i, t in enumerate(tokens):
            if i in self._control_ids:
                self._bytes.append(t.encode())
            else:
                self._bytes.append(b"".join(bytes([table[c]]) if c in table else c.encode() for c in t))
        self.im_start_id = self._control.get("<|im_start|>", 1)
        self.im_end_id = self._control.get("<|im_end|>", eos_id)
        #: generation stops on any of these: the GGUF eos (``<|im_end|>``, id 2) and ``<|endoftext|>``
        self.end_ids = frozenset(
            {eos_id, self.im_end_id}
            | ({self._control["<|endoftext|>"]} if "<|endoftext|>" in self._control else set())
        )
        self._newline = self._plain("\n")

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> SmolTokenizer:
        """Build from ``GGUFReader.fields`` (the ``tokenizer.ggml.*`` keys)."""

        def strings(key: str) -> list[str]:
            f = fields[key]
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

        tt = fields["tokenizer.ggml.token_type"]
        types = [int(tt.parts[i][0]) for i in tt.data]
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eos_id = int(eos.parts[eos.data[0]][0]) if eos is not None else 2
        return cls(strings("tokenizer.ggml.tokens"), types, strings("tokenizer.ggml.merges"), eos_id=eos_id)

    def _plain(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``. With ``parse_special``, control-token text maps to its id."""
        if not parse_special or self._special_re is None:
            return self._plain(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self._control[part])
            else:
                ids.extend(self._plain(part))
        return ids

    def is_control(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control token (rendered as nothing in generated text)."""
        return token_id in self._control_ids

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; a control token gives its literal text (e.g. ``<|im_end|>``)."""
        return self._bytes[token_id]

    def token_str(self, token_id: int) -> str:
        """Display string of one token (invalid/partial UTF-8 replaced by U+FFFD)."""
        return self._bytes[token_id].decode("utf-8", errors="replace")

    def output_bytes(self, token_id: int) -> bytes:
        """Bytes this token adds to generated text: control tokens add nothing."""
        return b"" if token_id in self._control_ids else self._bytes[token_id]

    def decode(self, ids: Sequence[int], *, skip_control: bool = True) -> str:
        """Text of ``ids`` (complete decode; invalid UTF-8 replaced)."""
        get = self.output_bytes if skip_control else self.token_bytes
        return b"".join(get(i) for i in ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of SmolLM2's ChatML prompt for ``(role, content)`` pairs.

        Same ids as the GGUF's Jinja template with ``add_generation_prompt``: a default
        system message is prepended when the first message is not ``system``; each
        message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; then
        ``<|im_start|>assistant\\n``. Content is encoded without parsing special tokens.
        """
        msgs = list(messages)
        if msgs and msgs[0][0] != "system":
            msgs.insert(0, ("system", DEFAULT_SYSTEM_PROMPT))
        ids: list[int] = []
        for role, content in msgs:
            ids.append(self.im_start_id)
            ids.extend(self._plain(f"{role}\n{content}"))
            ids.append(self.im_end_id)
            ids.extend(self._newline)
        ids.append(self.im_start_id)
        ids.extend(self._plain("assistant\n"))
        return ids
