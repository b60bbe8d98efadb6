"""secret-service's log is not flooded by the HTTP service's polling: every access stays in the
audit table, but reads are logged at DEBUG; changes at INFO and refusals at WARNING."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import pytest

from tail_service.proto import secrets_pb2
from tests.integration.test_secret_service import (  # noqa: F401 - harness_for is a fixture
    Harness,
    audit_rows,
    code,
    harness_for,
)

AUDIT_LOGGER = "tail_service.secretsvc"


def test_polled_reads_are_audited_in_the_table_but_not_logged_at_info(
    harness_for: Callable[..., Harness],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = harness_for()
    admin, tail = h.stub("admin"), h.stub("tail")
    caplog.set_level(logging.DEBUG, logger=AUDIT_LOGGER)
    admin.PutSecret(secrets_pb2.PutSecretRequest(name="openai-key", value=b"sk-x"), timeout=10)
    changes = [r for r in caplog.records if r.name.startswith(AUDIT_LOGGER)]
    assert [(r.levelno, "action=put" in r.getMessage()) for r in changes] == [(logging.INFO, True)]

    caplog.clear()
    for _ in range(10):  # what the HTTP service does every refresh_interval (2 s) per secret
        tail.GetSecret(secrets_pb2.GetSecretRequest(name="openai-key"), timeout=10)
    req = secrets_pb2.GetSecretRequest(name="not-set-yet")  # a secret named in config, not stored yet
    assert code(tail.GetSecret, req) == grpc.StatusCode.NOT_FOUND
    polled = [r for r in caplog.records if r.name.startswith(AUDIT_LOGGER)]
    assert [r for r in polled if r.levelno >= logging.INFO] == []
    assert len([r for r in polled if "action=get" in r.getMessage()]) == 11  # still there, at DEBUG

    caplog.clear()
    denied = secrets_pb2.PutSecretRequest(name="openai-key", value=b"sk-evil")
    assert code(tail.PutSecret, denied) == grpc.StatusCode.PERMISSION_DENIED
    refused = [r for r in caplog.records if r.name.startswith(AUDIT_LOGGER)]
    assert [r.levelno for r in refused] == [logging.WARNING]
    assert "outcome=denied" in refused[0].getMessage()

    rows = [(r.identity, r.action, r.outcome) for r in audit_rows(h.db_url)]
    assert rows == [
        ("admin", "put", "ok"),
        *[("tail", "get", "ok")] * 10,
        ("tail", "get", "not_found"),
        ("tail", "put", "denied"),
    ]
