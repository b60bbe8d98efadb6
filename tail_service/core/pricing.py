"""What a request costs: prices per model, in USD per million tokens.

Costs are kept in whole nano-dollars (1e-9 USD) wherever they are added up (budgets in
Redis, the ledger's sums), so a sum is exact however many requests it covers: a $5 budget
is 5,000,000,000 and the largest exactly representable sum in a Lua number (2**53) is
about $9 million.

A price comes from the model's config entry (``price:``), else from the built-in table
for the common OpenAI and Anthropic models, matched by the public model name or the
upstream model name: exactly, or by the longest table entry the name starts with followed
by ``-`` (so ``gpt-4o-2024-08-06`` is priced as ``gpt-4o``, and ``gpt-4o-mini`` as itself).
A model without a price costs 0 and is listed by :meth:`Pricing.unpriced`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tail_service.core.types import TokenUsage

#: nano-dollars per dollar
NANOS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. ``cached_input`` (prompt tokens read from the provider's
    cache) defaults to the input price when a model has no cache discount."""

    input: float
    output: float
    cached_input: float | None = None

    def cost_nanos(self, usage: TokenUsage) -> int:
        """The cost of ``usage`` in nano-dollars, rounded up (a cost is never under-billed)."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        # per-million prices times tokens: nano-dollars per token = price * 1000
        milli = (usage.prompt_tokens - cached) * self.input + cached * cached_price
        milli += usage.completion_tokens * self.output
        return _ceil(milli * 1000)

    def worst_case_nanos(self, prompt_tokens: int, max_output_tokens: int) -> int:
        """The most a request may cost: every prompt token uncached, every allowed output token."""
        return _ceil((prompt_tokens * self.input + max_output_tokens * self.output) * 1000)


def _ceil(value: float) -> int:
    whole = int(value)
    return whole + 1 if value - whole > 1e-9 else whole


#: Built-in list prices (USD per 1M tokens: input, output, cached input), December 2026.
#: Config entries override them.
BUILTIN_PRICES: Mapping[str, Price] = {
    # OpenAI
    "gpt-5": Price(1.25, 10.0, 0.125),
    "gpt-5-mini": Price(0.25, 2.0, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-4.1": Price(2.0, 8.0, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4o": Price(2.50, 10.0, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "gpt-4-turbo": Price(10.0, 30.0),
    "gpt-4": Price(30.0, 60.0),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.0, 60.0, 7.50),
    "o1-mini": Price(1.10, 4.40, 0.55),
    "o3": Price(2.0, 8.0, 0.50),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
    # Anthropic (cached input: a cache read)
    "claude-opus-4-5": Price(5.0, 25.0, 0.50),
    "claude-opus-4-1": Price(15.0, 75.0, 1.50),
    "claude-opus-4": Price(15.0, 75.0, 1.50),
    "claude-sonnet-4-5": Price(3.0, 15.0, 0.30),
    "claude-sonnet-4": Price(3.0, 15.0, 0.30),
    "claude-haiku-4-5": Price(1.0, 5.0, 0.10),
    "claude-3-7-sonnet": Price(3.0, 15.0, 0.30),
    "claude-3-5-sonnet": Price(3.0, 15.0, 0.30),
    "claude-3-5-haiku": Price(0.80, 4.0, 0.08),
    "claude-3-opus": Price(15.0, 75.0, 1.50),
    "claude-3-haiku": Price(0.25, 1.25, 0.03),
}


def builtin_price(name: str) -> Price | None:
    """The built-in price of ``name``: exact, else the longest entry it starts with plus ``-``."""
    if (price := BUILTIN_PRICES.get(name)) is not None:
        return price
    best = ""
    for entry in BUILTIN_PRICES:
        if name.startswith(entry + "-") and len(entry) > len(best):
            best = entry
    return BUILTIN_PRICES[best] if best else None


class Pricing:
    """The price of every public model, resolved once at start-up (lookups are dict gets).

    ``models`` maps each public model name to its configured price (or ``None``) and the
    upstream model names of its deployments.
    """

    def __init__(self, models: Mapping[str, tuple[Price | None, Iterable[str]]]) -> None:
        self._prices: dict[str, Price] = {}
        self._unpriced: list[str] = []
        for name, (configured, upstream) in models.items():
            price = configured or builtin_price(name)
            for other in upstream:
                if price is not None:
                    break
                price = builtin_price(other)
            if price is None:
                self._unpriced.append(name)
            else:
                self._prices[name] = price

    def price(self, model: str) -> Price | None:
        return self._prices.get(model)

    def cost_nanos(self, model: str, usage: TokenUsage) -> int:
        """What ``usage`` of ``model`` cost, in nano-dollars (0 for a model without a price)."""
        price = self._prices.get(model)
        return 0 if price is None else price.cost_nanos(usage)

    def worst_case_nanos(self, model: str, prompt_tokens: int, max_output_tokens: int) -> int:
        price = self._prices.get(model)
        return 0 if price is None else price.worst_case_nanos(prompt_tokens, max_output_tokens)

    def unpriced(self) -> list[str]:
        """Public models with no price: their cost is counted as 0 (``/health`` lists them)."""
        return sorted(self._unpriced)


def usd(nanos: int) -> float:
    """Nano-dollars as dollars (for display and the ledger's ``cost`` column)."""
    return nanos / NANOS
