"""``tail-service usage`` as a real process over a store with known rows: the table, JSON
lines, CSV, grouping, filters, relative times, and the usage errors (exit status 2)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tail_service.store.usage import UsageStore
from tests.processes import EXE
from tests.usage.fixtures import open_store, record_row

pytestmark = pytest.mark.slow

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
DAY = 86_400
#: nano-dollars per token (prompt, completion)
PRICES = {"gpt-one": (2_000, 8_000), "gpt-two": (1_000, 4_000)}
#: (id, key, tenant, model, at, prompt, completion)
ROWS = [
    ("r1", "key-a", "acme", "gpt-one", T0 + 100, 3, 5),  # 46,000 nanos
    ("r2", "key-a", "acme", "gpt-two", T0 + 200, 10, 20),  # 90,000
    ("r3", "key-b", "globex", "gpt-one", T0 + 3_700, 7, 7),  # 70,000
    ("r4", "key-b", "globex", "gpt-one", T0 + DAY + 1, 1, 1),  # 10,000, the next day
    ("r0", "key-a", "acme", "gpt-one", T0 - 1, 50, 50),  # before every range below
]
RANGE = ["--since", str(T0), "--until", str(T0 + 2 * DAY)]


def ledger_row(
    record_id: str, key: str, tenant: str, model: str, at: int, prompt: int, completion: int
) -> dict[str, Any]:
    p, c = PRICES[model]
    out = record_row(
        record_id, prompt=prompt, completion=completion, model=model, cost_nanos=prompt * p + completion * c
    )
    out.update(key_id=key, tenant=tenant, created_at=at)
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config file whose store holds :data:`ROWS`."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with open_store(url) as store:
        UsageStore(store).insert([ledger_row(*r) for r in ROWS])
    path = tmp_path / "tail.yaml"
    path.write_text(f"store:\n  database_url: {url}\n")
    return path


def usage(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TAIL_SETTINGS_JSON"}
    return subprocess.run(
        [EXE, "usage", "--config", str(config), *args], capture_output=True, text=True, env=env, timeout=60
    )


def ok(config: Path, *args: str) -> str:
    done = usage(config, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def json_lines(config: Path, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok(config, *args, "--json").splitlines()]


def test_the_table_has_a_header_a_row_per_bucket_and_a_total(config: Path) -> None:
    lines = ok(config, *RANGE).splitlines()
    assert [line.split() for line in lines] == [
        ["start", "requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd"],
        ["2026-01-01T00:00:00Z", "3", "20", "32", "0", "0.000206"],
        ["2026-01-02T00:00:00Z", "1", "1", "1", "0", "0.000010"],
        ["total", "4", "21", "33", "0", "0.000216"],
    ]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_hour_buckets_grouped_by_model_and_key(config: Path) -> None:
    got = json_lines(config, *RANGE, "--bucket", "1h", "--group-by", "model,key")
    assert [(g["start"], g["model"], g["api_key_id"], g["requests"]) for g in got] == [
        ("2026-01-01T00:00:00Z", "gpt-one", "key-a", 1),
        ("2026-01-01T00:00:00Z", "gpt-two", "key-a", 1),
        ("2026-01-01T01:00:00Z", "gpt-one", "key-b", 1),
        ("2026-01-02T00:00:00Z", "gpt-one", "key-b", 1),
    ]
    assert got[1] == {
        "start": "2026-01-01T00:00:00Z",
        "model": "gpt-two",
        "api_key_id": "key-a",
        "requests": 1,
        "input_tokens": 10,
        "output_tokens": 20,
        "cached_tokens": 0,
        "cost_usd": 0.00009,
    }
    assert sum(g["cost_usd"] for g in got) == pytest.approx(0.000216, abs=1e-12)
    # the table grouped the same way has the grouped columns, and the same total
    table = ok(config, *RANGE, "--bucket", "1h", "--group-by", "model,key").splitlines()
    assert table[0].split()[:3] == ["start", "model", "api_key_id"]
    assert table[-1].split() == ["total", "4", "21", "33", "0", "0.000216"]


def test_csv_has_a_header(config: Path) -> None:
    out = ok(config, *RANGE, "--group-by", "tenant", "--csv")
    assert out.splitlines()[0] == "start,tenant,requests,input_tokens,output_tokens,cached_tokens,cost_usd"
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["start"], r["tenant"], r["requests"], float(r["cost_usd"])) for r in rows] == [
        ("2026-01-01T00:00:00Z", "acme", "2", 0.000136),
        ("2026-01-01T00:00:00Z", "globex", "1", 0.00007),
        ("2026-01-02T00:00:00Z", "globex", "1", 0.00001),
    ]


def test_key_and_tenant_filters(config: Path) -> None:
    mine = json_lines(config, *RANGE, "--key", "key-a")
    assert [(g["requests"], g["input_tokens"]) for g in mine] == [(2, 13)]
    theirs = json_lines(config, *RANGE, "--tenant", "globex", "--group-by", "key")
    assert [(g["api_key_id"], g["requests"]) for g in theirs] == [("key-b", 1), ("key-b", 1)]
    assert json_lines(config, *RANGE, "--key", "key-a", "--tenant", "globex") == []
    assert ok(config, *RANGE, "--key", "nobody").strip() == "no usage in this range"


def test_since_takes_a_relative_time(config: Path) -> None:
    now = int(time.time())
    with open_store(f"sqlite:///{config.parent / 'ledger.db'}") as store:
        UsageStore(store).insert(
            [
                ledger_row("h1", "key-c", "acme", "gpt-one", now - 3_600, 1, 1),  # an hour ago
                ledger_row("h2", "key-c", "acme", "gpt-one", now - 60, 2, 2),
                ledger_row("h3", "key-c", "acme", "gpt-one", now - 3 * 3_600, 4, 4),  # too old
            ]
        )
    got = json_lines(config, "--since", "2h", "--bucket", "1m", "--key", "key-c")
    assert sorted(g["input_tokens"] for g in got) == [1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "use e.g. 24h, 7d, 2026-12-01 or unix seconds"),
        (["--since", "2x"], "use e.g. 24h"),
        (["--json", "--csv"], "--json or --csv, not both"),
        (["--bucket", "1w"], "use 1m, 1h or 1d"),
        (["--group-by", "model,user"], "group by model, key, tenant or source"),
        (["--since", str(T0 + DAY), "--until", str(T0)], "--until must be after --since"),
    ],
)
def test_a_bad_option_exits_2_with_a_clear_message(config: Path, args: list[str], message: str) -> None:
    done = usage(config, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in " ".join(done.stderr.split()), done.stderr  # click wraps long lines
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
