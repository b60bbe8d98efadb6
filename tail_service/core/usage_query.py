"""Usage queries in the shape of OpenAI's organization Usage API (completions).

A query names a time range, a bucket width (``1m``, ``1h``, ``1d``) and what to group by
(``model``, ``api_key_id``, ``tenant``, ``source``). The answer is a page of buckets, empty
ones included, each with one result per group: ``input_tokens``, ``output_tokens``,
``input_cached_tokens``, ``num_model_requests``, and ``cost_usd`` (ours), plus the grouped
fields (``null`` when not grouped). ``next_page`` continues after the page's last bucket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tail_service.core.pricing import NANOS
from tail_service.errors import InvalidRequestError

#: bucket width -> (seconds, default buckets per page, most buckets per page)
WIDTHS: Mapping[str, tuple[int, int, int]] = {
    "1m": (60, 60, 1440),
    "1h": (3600, 24, 168),
    "1d": (86400, 7, 31),
}
GROUPS = ("model", "api_key_id", "tenant", "source")
#: the grouped fields every result carries (null unless grouped by)
_FIELDS = ("model", "api_key_id", "tenant", "source")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A validated query: buckets ``[start, end)`` of ``width`` seconds, one page of them."""

    start: int
    end: int
    width: int
    group_by: tuple[str, ...]
    models: tuple[str, ...]

    def bucket_starts(self) -> list[int]:
        return list(range(self.start, self.end, self.width))


def _int(raw: str | None, name: str) -> int | None:
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise InvalidRequestError(
            f"Invalid value for '{name}': a non-negative integer is required.", param=name
        )
    return int(raw)


def parse_query(params: Mapping[str, Sequence[str]], now: int) -> tuple[UsageQuery, int]:
    """Validate a query's parameters (each a list of values, as a query string gives them).

    ``start_time`` (required, unix seconds), ``end_time`` (default: now), ``bucket_width``
    (default ``1d``), ``group_by`` (repeatable or comma-separated), ``models``, ``limit``
    (buckets per page) and ``page`` (the cursor a previous answer gave). Returns the query
    for this page and the end of the whole range.
    """

    def one(name: str) -> str | None:
        values = params.get(name) or ()
        if len(values) > 1:
            raise InvalidRequestError(f"'{name}' may be given once.", param=name)
        return values[0] if values else None

    known = {"start_time", "end_time", "bucket_width", "group_by", "group_by[]", "models", "models[]"}
    for name in params:
        if name not in known | {"limit", "page"}:
            raise InvalidRequestError(
                f"Unknown parameter: '{name[:100]}'.", param=name[:100], code="unknown_parameter"
            )
    width_name = one("bucket_width") or "1d"
    if width_name not in WIDTHS:
        raise InvalidRequestError(
            "Invalid value for 'bucket_width': one of '1m', '1h' or '1d' is required.", param="bucket_width"
        )
    width, default_limit, max_limit = WIDTHS[width_name]
    start = _int(one("start_time"), "start_time")
    if start is None:
        raise InvalidRequestError("Missing required parameter: 'start_time'.", param="start_time")
    end = _int(one("end_time"), "end_time")
    if end is None:
        end = max(now + 1, start + 1)  # exclusive, and records are whole seconds: this one too
    if end <= start:
        raise InvalidRequestError("'end_time' must be after 'start_time'.", param="end_time")
    page = _int(one("page"), "page")
    if page is not None:
        if page < start or page >= end or (page - start) % width:
            raise InvalidRequestError(
                "Invalid value for 'page': use the next_page of an answer.", param="page"
            )
        start = page
    limit = _int(one("limit"), "limit")
    if limit is None:
        limit = default_limit
    if not 1 <= limit <= max_limit:
        raise InvalidRequestError(
            f"Invalid value for 'limit': from 1 to {max_limit} buckets of '{width_name}'.", param="limit"
        )
    groups: list[str] = []
    for raw in [*(params.get("group_by") or ()), *(params.get("group_by[]") or ())]:
        for g in raw.split(","):
            if g not in GROUPS:
                raise InvalidRequestError(
                    f"Invalid value for 'group_by': '{g[:100]}' (one of {', '.join(GROUPS)}).",
                    param="group_by",
                )
            if g not in groups:
                groups.append(g)
    models = tuple(
        m for raw in [*(params.get("models") or ()), *(params.get("models[]") or ())] for m in raw.split(",")
    )
    return UsageQuery(start, min(end, start + limit * width), width, tuple(groups), models), end


def usage_page(query: UsageQuery, requested_end: int, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The answer to ``query`` from :meth:`~tail_service.store.usage.UsageStore.sums` rows."""
    by_bucket: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        result: dict[str, Any] = {
            "object": "organization.usage.completions.result",
            "input_tokens": int(row["prompt_tokens"]),
            "output_tokens": int(row["completion_tokens"]),
            "input_cached_tokens": int(row["cached_tokens"]),
            "num_model_requests": int(row["requests"]),
            "cost_usd": int(row["cost_nanos"]) / NANOS,
        }
        for name in _FIELDS:
            result[name] = row.get(name) if name in query.group_by else None
        by_bucket.setdefault(int(row["bucket"]), []).append(result)
    data = [
        {
            "object": "bucket",
            "start_time": at,
            "end_time": min(at + query.width, query.end),
            "results": by_bucket.get(i, []),
        }
        for i, at in enumerate(query.bucket_starts())
    ]
    more = query.end < requested_end
    return {"object": "page", "data": data, "has_more": more, "next_page": str(query.end) if more else None}
