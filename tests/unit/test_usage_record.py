"""A usage record's shape: the ledger table, the stream payload and the record agree."""

from __future__ import annotations

from tail_service.core.types import Endpoint, Source, TokenUsage
from tail_service.core.usage import LEDGER_FIELDS, Outcome, UsageRecord
from tail_service.store.schema import usage_records


def test_the_ledger_fields_are_the_table_columns_in_order() -> None:
    assert tuple(c.name for c in usage_records.columns) == LEDGER_FIELDS


def test_a_record_as_values_and_as_a_row() -> None:
    rec = UsageRecord(
        "req_1",
        "gpt-x",
        Endpoint.CHAT,
        TokenUsage(10, 5, 4),
        Outcome.OK,
        deployment="gpt-x#0",
        record_id="u-1",
        key_id="key_a",
        tenant="acme",
        cost_nanos=1234,
        latency_s=0.0126,
        source=Source.BATCH,
        created_at=1796569281.9,
    )
    row = rec.to_row()
    assert tuple(row.values()) == rec.to_values()
    assert row == {
        "id": "u-1",
        "request_id": "req_1",
        "key_id": "key_a",
        "tenant": "acme",
        "model": "gpt-x",
        "deployment": "gpt-x#0",
        "endpoint": "chat",
        "source": "batch",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 4,
        "cost_nanos": 1234,
        "latency_ms": 13,
        "status": 200,
        "outcome": "ok",
        "cache_hit": False,
        "estimated": False,
        "created_at": 1796569281,
    }
