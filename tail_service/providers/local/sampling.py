"""Token sampling for the local Llama engine: greedy, temperature + nucleus, penalties, logprobs.

All functions take the raw ``float32`` logits of one position (shape ``(vocab,)``).
Reported log-probabilities are the log-softmax of the *raw* logits (before temperature,
penalties or bias), which is what OpenAI's ``logprobs`` describe. Sampling itself runs on
a ``float64`` copy of the 49k-entry vector: cheap, and immune to NumPy 2's dtype
promotion pitfalls that matter for the big matrices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token.

    ``temperature == 0`` means greedy (argmax). ``top_p`` is the nucleus mass in (0, 1].
    Penalties follow OpenAI: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) *
    presence_penalty`` over the tokens generated so far in this choice. ``logit_bias``
    maps token id -> bias added to the logit (-100 bans, +100 forces).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)


def log_softmax(logits: FloatArray) -> npt.NDArray[np.float64]:
    """Numerically stable log-softmax, in float64."""
    x = logits.astype(np.float64)
    m = float(x.max())
    return x - (m + float(np.log(np.exp(x - m).sum())))


def top_k(logprobs: npt.NDArray[np.float64], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(token_id, logprob)`` pairs, most likely first."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[0])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


class Sampler:
    """Stateful sampler for one choice: remembers generated-token counts for penalties.

    Not thread-safe; one per generation. ``rng`` supplies all randomness, so a seeded
    ``numpy.random.Generator`` makes sampling reproducible.
    """

    def __init__(self, params: SamplingParams, rng: np.random.Generator, vocab_size: int) -> None:
        self.params = params
        self._rng = rng
        self._vocab = vocab_size
        self._counts: dict[int, int] = {}
        bias = np.zeros(vocab_size, dtype=np.float64)
        for tok, b in params.logit_bias.items():
            if 0 <= tok < vocab_size:
                bias[tok] = float(b)
        self._bias = bias if params.logit_bias else None

    def observe(self, token_id: int) -> None:
        """Record a generated token (for presence/frequency penalties)."""
        self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def _adjusted(self, logits: FloatArray) -> npt.NDArray[np.float64]:
        x = logits.astype(np.float64)
        if self._bias is not None:
            x += self._bias
        p = self.params
        if self._counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self._counts.keys(), dtype=np.int64)
            cnt = np.fromiter(self._counts.values(), dtype=np.float64)
            x[ids] -= cnt * p.frequency_penalty + p.presence_penalty
        return x

    def sample(self, logits: FloatArray) -> int:
        """Pick the next token id from one position's raw logits."""
        x = self._adjusted(logits)
        temp = self.params.temperature
        if temp <= 0.0:
            return int(np.argmax(x))
        x /= float(temp)
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        top_p = self.params.top_p
        if top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            cum = np.cumsum(sorted_p)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(cum, top_p, side="left")) + 1
            keep = max(1, min(keep, order.shape[0]))
            kept = sorted_p[:keep] / float(sorted_p[:keep].sum())
            return int(order[int(self._rng.choice(keep, p=kept))])
        return int(self._rng.choice(self._vocab, p=probs))
