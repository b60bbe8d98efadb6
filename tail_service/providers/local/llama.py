"""A pure-NumPy Llama forward pass over SmolLM2-135M-Instruct (Q4_1 GGUF), with generation.

Loading dequantises every tensor to ``float32`` once (about 540 MB). The architecture is
plain Llama: RMSNorm, rotary position embeddings, grouped-query attention with a KV cache,
a SwiGLU MLP, and the token embedding reused as the output head when the file has no
``output.weight``.

RoPE and the GGUF permutation: llama.cpp's converter permutes the rows of ``attn_q`` and
``attn_k`` inside each head from Hugging Face's "two halves" layout to interleaved pairs
(so ggml can rotate adjacent pairs). :func:`_unpermute` undoes that at load time, and the
forward pass then uses the Hugging Face ``rotate_half`` formulation on contiguous halves.

Everything stays ``float32``: scalars are Python ``float`` (NumPy 2 would promote
``f32_array / np.float64(...)`` to float64 and run many times slower). The engine object
is immutable after load and can be shared; each :meth:`LlamaModel.generate` call owns its
own KV cache, so calls are independent (the provider still runs one at a time).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tail_service.providers.local.resources import set_blas_threads
from tail_service.providers.local.sampling import Sampler, log_softmax, top_k
from tail_service.providers.local.smol_tokenizer import SmolTokenizer

FloatArray = npt.NDArray[np.float32]

#: prompt tokens processed per forward call during prefill (bounds the attention matrix)
PREFILL_CHUNK = 256


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Hyper-parameters read from the GGUF ``llama.*`` metadata."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    context_length: int
    rope_base: float
    norm_eps: float
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True, slots=True)
class _Layer:
    attn_norm: FloatArray  # (dim,)
    wqkv: FloatArray  # (dim, dim + 2 * kv_dim), input-major so x @ w
    wo: FloatArray  # (dim, dim)
    ffn_norm: FloatArray  # (dim,)
    w_gate_up: FloatArray  # (dim, 2 * ffn)
    w_down: FloatArray  # (ffn, dim)


@dataclass(frozen=True, slots=True)
class GenStep:
    """One generated token.

    ``logprob`` is the log-softmax of the raw logits at the chosen token (``None`` unless
    logprobs were asked for); ``top`` holds up to ``top_logprobs`` ``(id, logprob)``
    alternatives, most likely first. ``is_end`` marks an end-of-turn token (it is the last
    step and adds no text).
    """

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    is_end: bool


def _field_scalar(fields: dict[str, Any], key: str) -> Any:
    f = fields[key]
    return f.parts[f.data[0]][0]


def _unpermute(w: FloatArray, n_heads: int) -> FloatArray:
    """Undo llama.cpp's q/k row permutation: interleaved pairs -> Hugging Face halves."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim))


def _rms_norm(x: FloatArray, weight: FloatArray, eps: float) -> FloatArray:
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    out: FloatArray = x * (1.0 / np.sqrt(ms + eps)) * weight
    return out


class LlamaModel:
    """SmolLM2-135M-Instruct loaded from a GGUF file, ready to generate.

    ``path`` is the GGUF file. Loading takes seconds (dequantisation); do it off the
    event loop. The tokenizer is rebuilt from the same file (:attr:`tokenizer`).
    ``threads``: when given, the OpenBLAS thread count used by the matmuls (NumPy's BLAS
    is process-global, so this affects every NumPy user in the process).
    """

    def __init__(self, path: str, *, threads: int | None = None) -> None:
        from gguf import GGUFReader
        from gguf.quants import dequantize

        if threads is not None:
            set_blas_threads(threads)

        reader = GGUFReader(path)
        fields = reader.fields
        arch = str(bytes(fields["general.architecture"].parts[-1]).decode())
        if arch != "llama":
            raise ValueError(f"unsupported GGUF architecture {arch!r} in {path}")
        tensors = {t.name: t for t in reader.tensors}

        def load(name: str) -> FloatArray:
            t = tensors[name]
            arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            return np.ascontiguousarray(arr.reshape(shape))

        n_heads = int(_field_scalar(fields, "llama.attention.head_count"))
        n_kv = int(_field_scalar(fields, "llama.attention.head_count_kv"))
        embd = load("token_embd.weight")
        cfg = LlamaConfig(
            n_layers=int(_field_scalar(fields, "llama.block_count")),
            dim=int(_field_scalar(fields, "llama.embedding_length")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            ffn_dim=int(_field_scalar(fields, "llama.feed_forward_length")),
            context_length=int(_field_scalar(fields, "llama.context_length")),
            rope_base=float(_field_scalar(fields, "llama.rope.freq_base")),
            norm_eps=float(_field_scalar(fields, "llama.attention.layer_norm_rms_epsilon")),
            vocab_size=int(embd.shape[0]),
        )
        self.config = cfg
        self.tokenizer = SmolTokenizer.from_gguf_fields(fields)
        layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            wq = _unpermute(load(p + "attn_q.weight"), n_heads)
            wk = _unpermute(load(p + "attn_k.weight"), n_kv)
            wv = load(p + "attn_v.weight")
            gate_up = np.concatenate([load(p + "ffn_gate.weight"), load(p + "ffn_up.weight")])
            layers.append(
                _Layer(
                    attn_norm=load(p + "attn_norm.weight"),
                    wqkv=np.ascontiguousarray(np.concatenate([wq, wk, wv]).T),
                    wo=np.ascontiguousarray(load(p + "attn_output.weight").T),
                    ffn_norm=load(p + "ffn_norm.weight"),
                    w_gate_up=np.ascontiguousarray(gate_up.T),
                    w_down=np.ascontiguousarray(load(p + "ffn_down.weight").T),
                )
            )
        self._layers = tuple(layers)
        self._embed = embd  # (vocab, dim): row lookup for inputs
        self._head = load("output.weight") if "output.weight" in tensors else embd  # tied
        self._out_norm = load("output_norm.weight")
        hd = cfg.head_dim
        inv = cfg.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        self._inv_freq = inv
        self._scale = 1.0 / math.sqrt(hd)

    # ------------------------------------------------------------------ forward pass
    def _rope_tables(self, start: int, n: int) -> tuple[FloatArray, FloatArray]:
        pos = np.arange(start, start + n, dtype=np.float64)
        ang = np.outer(pos, self._inv_freq)  # (n, head_dim / 2)
        return np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]

    @staticmethod
    def _rope(x: FloatArray, cos: FloatArray, sin: FloatArray) -> FloatArray:
        """Rotate the two halves of each head (Hugging Face ``rotate_half`` convention)."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out: FloatArray = np.empty_like(x)
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:] = x2 * cos + x1 * sin
        return out

    def _forward(
        self, ids: npt.NDArray[np.int64], k_cache: FloatArray, v_cache: FloatArray, start: int
    ) -> FloatArray:
        """Run ``ids`` (positions ``start..start+n``), fill the caches, return normed hidden (n, dim)."""
        cfg = self.config
        n = ids.shape[0]
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        group = nh // nkv
        q_end, k_end = nh * hd, nh * hd + nkv * hd
        end = start + n
        cos, sin = self._rope_tables(start, n)
        x: FloatArray = self._embed[ids]
        mask: FloatArray | None = None
        if n > 1:
            rows = np.arange(start, end)[:, None]
            cols = np.arange(end)[None, :]
            mask = np.where(cols > rows, np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
            mask = np.tile(mask, (group, 1))  # rows ordered (g, i)
        for li, layer in enumerate(self._layers):
            h = _rms_norm(x, layer.attn_norm, cfg.norm_eps)
            qkv = h @ layer.wqkv
            q = self._rope(qkv[:, :q_end].reshape(n, nh, hd), cos, sin)
            k = self._rope(qkv[:, q_end:k_end].reshape(n, nkv, hd), cos, sin)
            v = qkv[:, k_end:].reshape(n, nkv, hd)
            k_cache[li, :, start:end] = k.transpose(1, 0, 2)
            v_cache[li, :, start:end] = v.transpose(1, 0, 2)
            keys = k_cache[li, :, :end]  # (nkv, T, hd)
            vals = v_cache[li, :, :end]
            qg = q.reshape(n, nkv, group, hd).transpose(1, 2, 0, 3).reshape(nkv, group * n, hd)
            scores: FloatArray = qg @ keys.transpose(0, 2, 1)  # (nkv, group*n, T)
            scores *= self._scale
            if mask is not None:
                scores += mask
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            att = (scores @ vals).reshape(nkv, group, n, hd).transpose(2, 0, 1, 3).reshape(n, nh * hd)
            x += att @ layer.wo
            h = _rms_norm(x, layer.ffn_norm, cfg.norm_eps)
            gu = h @ layer.w_gate_up
            gate, up = gu[:, : cfg.ffn_dim], gu[:, cfg.ffn_dim :]
            denom = np.exp(-gate)
            denom += 1.0
            x += ((gate / denom) * up) @ layer.w_down  # SiLU(gate) * up
        return _rms_norm(x, self._out_norm, cfg.norm_eps)

    def _new_cache(self, capacity: int) -> tuple[FloatArray, FloatArray]:
        cfg = self.config
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)

    def _prefill(
        self, ids: Sequence[int], k: FloatArray, v: FloatArray, cancel: threading.Event | None
    ) -> FloatArray | None:
        """Run the prompt in chunks; return the normed hidden state of its last token."""
        arr = np.asarray(ids, dtype=np.int64)
        hidden: FloatArray | None = None
        for s in range(0, arr.shape[0], PREFILL_CHUNK):
            if cancel is not None and cancel.is_set():
                return None
            hidden = self._forward(arr[s : s + PREFILL_CHUNK], k, v, s)
        return None if hidden is None else hidden[-1]

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt_ids: Sequence[int],
        sampler: Sampler,
        *,
        max_tokens: int,
        top_logprobs: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[GenStep]:
        """Yield up to ``max_tokens`` generated tokens after ``prompt_ids``.

        Stops after an end token (``is_end``), after ``max_tokens`` steps, or as soon as
        ``cancel`` is set (checked before every token and between prefill chunks). With
        ``top_logprobs`` not ``None``, each step carries its logprob and that many
        alternatives. ``len(prompt_ids) + max_tokens`` must fit the context window
        (:meth:`max_new_tokens`). Synchronous and CPU-bound: run it in a worker thread.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        max_tokens = min(max_tokens, self.max_new_tokens(len(prompt_ids)))
        if max_tokens <= 0:
            return
        k, v = self._new_cache(len(prompt_ids) + max_tokens)
        last = self._prefill(prompt_ids, k, v, cancel)
        pos = len(prompt_ids)
        end_ids = self.tokenizer.end_ids
        for step in range(max_tokens):
            if last is None or (cancel is not None and cancel.is_set()):
                return
            logits: FloatArray = self._head @ last
            token = sampler.sample(logits)
            sampler.observe(token)
            lp: float | None = None
            alts: tuple[tuple[int, float], ...] = ()
            if top_logprobs is not None:
                lsm = log_softmax(logits)
                lp = float(lsm[token])
                alts = tuple(top_k(lsm, top_logprobs))
            is_end = token in end_ids
            yield GenStep(token, lp, alts, is_end)
            if is_end or step == max_tokens - 1:
                return
            last = self._forward(np.asarray([token], dtype=np.int64), k, v, pos)[-1]
            pos += 1

    def max_new_tokens(self, prompt_len: int) -> int:
        """How many tokens still fit in the context window after a prompt of ``prompt_len``."""
        return max(0, self.config.context_length - prompt_len)

    def score(
        self, ids: Sequence[int], top_logprobs: int, cancel: threading.Event | None = None
    ) -> list[tuple[float | None, tuple[tuple[int, float], ...]]]:
        """Logprob of each token given its prefix (first is ``None``), with alternatives.

        Used for legacy ``echo`` + ``logprobs``. One extra pass over the prompt.
        """
        out: list[tuple[float | None, tuple[tuple[int, float], ...]]] = [(None, ())]
        if not ids:
            return []
        arr = np.asarray(ids, dtype=np.int64)
        k, v = self._new_cache(len(ids))
        for s in range(0, arr.shape[0], PREFILL_CHUNK):
            if cancel is not None and cancel.is_set():
                break
            hidden = self._forward(arr[s : s + PREFILL_CHUNK], k, v, s)
            for j in range(hidden.shape[0]):
                nxt = s + j + 1
                if nxt >= arr.shape[0]:
                    break
                lsm = log_softmax(self._head @ hidden[j])
                out.append((float(lsm[arr[nxt]]), tuple(top_k(lsm, top_logprobs))))
        return out
