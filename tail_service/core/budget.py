"""Budgets: USD per calendar day or month (UTC), or in total, reserved at admission.

A request's worst case (its prompt, every output token it may produce, at the model's
price) is reserved against the key's budget and its tenant's in the same admission as its
rate limits, then settled to the real cost. So concurrent requests cannot overshoot: the
sum of what is reserved and spent never passes the budget. A request whose worst case
does not fit is a 429 ``insufficient_quota``.
"""

from __future__ import annotations

import datetime as dt

from tail_service.core.pricing import NANOS
from tail_service.core.ratelimit import Admission, AdmissionRequest, Budget

PERIODS = ("day", "month", "none")


class Budgets:
    """:func:`budget_for`, remembered until the period it falls in ends (it is asked once
    per request; the calendar arithmetic costs more than the lookup)."""

    def __init__(self, size: int = 4096) -> None:
        self._known: dict[tuple[float, str], Budget] = {}
        self._size = size

    def get(self, usd: float, period: str, now: float) -> Budget | None:
        if usd <= 0:
            return None
        known = self._known.get((usd, period))
        if known is not None and (not known.resets_at or now < known.resets_at) and now >= known.starts_at:
            return known
        if len(self._known) >= self._size:
            self._known.clear()
        budget = budget_for(usd, period, now)
        assert budget is not None
        self._known[(usd, period)] = budget
        return budget


def budget_for(usd: float, period: str, now: float) -> Budget | None:
    """The budget of ``usd`` per ``period`` in force at unix time ``now`` (None: no budget)."""
    if usd <= 0:
        return None
    limit = round(usd * NANOS)
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "day":
        start = day.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
        return Budget(
            limit, "d" + start.strftime("%Y%m%d"), int(end.timestamp()), "per day", int(start.timestamp())
        )
    if period == "month":
        start = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        return Budget(
            limit, "m" + start.strftime("%Y%m"), int(end.timestamp()), "per month", int(start.timestamp())
        )
    return Budget(limit, "all", 0, "in total")


def _usd(nanos: int) -> str:
    value = nanos / NANOS
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.6f}".rstrip("0")


def budget_message(answer: Admission, req: AdmissionRequest) -> str:
    """The 429 ``insufficient_quota`` message for a budget rejection, in OpenAI's words
    plus what was spent, what the request may cost and when the budget resets."""
    tenant = answer.reason == "tenant_budget"
    budget = req.tenant_budget if tenant else req.budget
    assert budget is not None
    whose = f"the budget of tenant {req.tenant!r}" if tenant else "this API key's budget"
    reset = ""
    if budget.resets_at:
        at = dt.datetime.fromtimestamp(budget.resets_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        reset = f" It resets at {at}."
    return (
        f"You exceeded your current quota: {whose} is {_usd(budget.limit_nanos)} {budget.label}, "
        f"{_usd(answer.budget_spent_nanos)} is spent or reserved, and this request may cost up to "
        f"{_usd(req.cost_nanos)}.{reset}"
    )
