"""all-MiniLM-L6-v2 sentence embeddings: int8 ONNX on onnxruntime, 384 dimensions.

Pipeline (same as sentence-transformers): BERT WordPiece (lower-cased, ``[CLS] ... [SEP]``)
truncated to :data:`MAX_TOKENS` tokens, padded to the longest input of the batch, one
forward pass, mean pooling of ``last_hidden_state`` over the attention mask, then L2
normalisation. Output vectors are unit length (``float32``).

Token-id inputs (OpenAI allows ``int[]`` / ``int[][]``) are taken as *this model's own*
WordPiece ids (vocabulary of 30522; they are not tiktoken ids, which would be meaningless
here): ``[CLS]`` (101) is prepended and ``[SEP]`` (102) appended when missing, and the
sequence is truncated to :data:`MAX_TOKENS` keeping the final ``[SEP]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: WordPiece tokens per input, including [CLS] and [SEP] (the model was trained at 256)
MAX_TOKENS = 256
#: output dimensions
DIMENSIONS = 384
CLS_ID = 101
SEP_ID = 102
PAD_ID = 0


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

    def tokenize(self, item: str | Sequence[int]) -> list[int]:
        """WordPiece ids of one input (text or own-vocabulary ids), with specials, truncated."""
        if isinstance(item, str):
            return list(self._tokenizer.encode(item).ids)
        ids = [int(i) for i in item]
        if not ids:
            raise EmbedInputError("token array inputs must not be empty")
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise EmbedInputError(
                f"token id {bad} is outside this model's WordPiece vocabulary (0..{self.vocab_size - 1})"
            )
        if ids[0] != CLS_ID:
            ids.insert(0, CLS_ID)
        if ids[-1] != SEP_ID:
            ids.append(SEP_ID)
        if len(ids) > MAX_TOKENS:
            ids = [*ids[: MAX_TOKENS - 1], SEP_ID]
        return ids

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
