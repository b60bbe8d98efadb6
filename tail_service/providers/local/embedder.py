"""all-MiniLM-L6-v2 sentence embeddings: int8 ONNX on onnxruntime, 384 dimensions.

Pipeline (same as sentence-transformers): BERT WordPiece (lower-cased, ``[CLS] ... [SEP]``)
truncated to :data:`MAX_TOKENS` tokens, padded to the longest input of the batch, one
forward pass, mean pooling of ``last_hidden_state`` over the attention mask, then L2
normalisation. Output vectors are unit length (``float32``).

Token-id inputs (OpenAI allows ``int[]`` / ``int[][]``) are ids of
:data:`TOKEN_ARRAY_ENCODING`, the encoding clients use for OpenAI's embedding models
(LangChain's ``OpenAIEmbeddings`` sends every text that way on its defaults). They mean
nothing to WordPiece, so they are decoded to text and tokenised again, as if the text had
been sent; an id that encoding does not have is a 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from tail_service.tiktoken_counter import TiktokenCounter

if TYPE_CHECKING:
    import tiktoken

#: WordPiece tokens per input, including [CLS] and [SEP] (the model was trained at 256)
MAX_TOKENS = 256
#: output dimensions
DIMENSIONS = 384
PAD_ID = 0
#: what token-array inputs are ids of (OpenAI's text-embedding-3-* and ada-002 tokenizer)
TOKEN_ARRAY_ENCODING = "cl100k_base"


class EmbedInputError(ValueError):
    """An input the model cannot embed (empty token array, id out of vocabulary)."""


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """Unit vectors (one row per input, input order) and real token counts per input."""

    vectors: npt.NDArray[np.float32]
    token_counts: list[int]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on onnxruntime. Thread-safe for concurrent :meth:`embed` calls.

    ``model_path``: the ONNX file; ``tokenizer_path``: the Hugging Face ``tokenizer.json``;
    ``threads``: onnxruntime intra-op threads.
    """

    def __init__(self, model_path: str, tokenizer_path: str, *, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            model_path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._output_name = self._session.get_outputs()[0].name
        tok = Tokenizer.from_file(tokenizer_path)
        tok.enable_truncation(MAX_TOKENS)
        tok.no_padding()
        self._tokenizer = tok
        self.vocab_size = int(tok.get_vocab_size())
        # Built on the first token-array input (about 0.4 s, once), in the embedding thread.
        self._openai_tokens = TiktokenCounter()

    def decode_openai_ids(self, ids: Sequence[int]) -> str:
        """The text behind ``ids`` of :data:`TOKEN_ARRAY_ENCODING` (400 on an unknown id)."""
        if not ids:
            raise EmbedInputError("token array inputs must not be empty")
        enc = self._openai_tokens.encoding(TOKEN_ARRAY_ENCODING)
        bad = next((i for i in ids if not _decodes(enc, i)), None)
        if bad is not None:
            raise EmbedInputError(
                f"token id {bad} is not a {TOKEN_ARRAY_ENCODING} token id (token-array inputs are "
                f"{TOKEN_ARRAY_ENCODING} ids, as for OpenAI's embedding models)"
            )
        return enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def tokenize(self, item: str | Sequence[int]) -> list[int]:
        """WordPiece ids of one input, with specials, truncated.

        Token arrays are decoded from :data:`TOKEN_ARRAY_ENCODING` first.
        """
        text = item if isinstance(item, str) else self.decode_openai_ids([int(i) for i in item])
        return list(self._tokenizer.encode(text).ids)

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """One forward pass over already-tokenised inputs; returns (len(batch), 384) unit rows."""
        if not batch:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        (hidden,) = self._session.run([self._output_name], feeds)
        hidden = np.asarray(hidden, dtype=np.float32)
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        out: npt.NDArray[np.float32] = (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
        return out

    def embed(self, items: Sequence[str | Sequence[int]]) -> EmbedResult:
        """Tokenise and embed ``items`` in one forward pass (input order kept)."""
        batch = [self.tokenize(it) for it in items]
        return EmbedResult(self.embed_ids(batch), [len(ids) for ids in batch])


def _decodes(enc: tiktoken.Encoding, token: int) -> bool:
    if not 0 <= token <= enc.max_token_value:
        return False
    try:
        enc.decode_single_token_bytes(token)
    except KeyError:
        return False
    return True
