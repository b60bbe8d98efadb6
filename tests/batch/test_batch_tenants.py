"""Tenants are kept apart on every batch route, and on the files a batch writes: another
tenant's batch or file is a 404, exactly like one that does not exist (never a 403)."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tail_service.proto import auth_pb2
from tests.batch.fixtures import chat_line, jsonl, output_lines, run_worker, submit, wait_for
from tests.conftest import model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack

pytestmark = pytest.mark.slow


def test_batches_and_their_files_are_private_to_the_tenant(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, tmp_path: Path
) -> None:
    settings = stack.gateway_settings([model_entry("gpt-test", upstream)], state_dir=tmp_path)
    with serve_app(settings) as app, run_worker(settings):
        owner = app.client(api_key=stack.create_key(tenant="acme"), _strict_response_validation=True)
        colleague = app.client(api_key=stack.create_key(tenant="acme"))
        stranger = app.client(api_key=stack.create_key(tenant="globex"))
        created = submit(owner, jsonl([chat_line("a"), chat_line("b", "fake: reject this request")]))
        batch = wait_for(owner, created.id)
        assert batch.status == "completed" and batch.output_file_id and batch.error_file_id

        # the same tenant (another key) sees it all
        assert colleague.batches.retrieve(batch.id).id == batch.id
        assert colleague.files.content(batch.output_file_id).read()

        for call in (
            lambda: stranger.batches.retrieve(batch.id),
            lambda: stranger.batches.cancel(batch.id),
            lambda: stranger.files.retrieve(batch.output_file_id or ""),
            lambda: stranger.files.content(batch.error_file_id or ""),
            lambda: stranger.files.delete(batch.input_file_id),
            lambda: stranger.batches.create(
                input_file_id=batch.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
            ),
        ):
            with pytest.raises(openai.NotFoundError) as caught:
                call()
            assert caught.value.status_code == 404
            assert "No such" in caught.value.message
        assert [b.id for b in stranger.batches.list()] == []
        assert [f.id for f in stranger.files.list()] == []
        # the stranger's own batch is invisible to the owner the same way
        theirs = submit(stranger, jsonl([chat_line("x")]))
        with pytest.raises(openai.NotFoundError):
            owner.batches.retrieve(theirs.id)
        assert theirs.id not in {b.id for b in owner.batches.list()}
        # a cursor naming another tenant's batch reveals nothing either
        assert owner.batches.list(after=theirs.id).data == []


def test_revoking_the_key_cancels_its_running_batch(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, tmp_path: Path
) -> None:
    """The worker checks the key that created a batch while it runs: once it is revoked, no
    new line runs, and the batch ends ``cancelled`` with its partial results."""
    upstream.latency = 0.2
    settings = stack.gateway_settings([model_entry("gpt-test", upstream)], state_dir=tmp_path)
    key = stack.create_key(tenant="acme")
    slow = {"chunk_lines": 20, "worker_concurrency": 1, "line_concurrency": 4}
    with serve_app(settings) as app, run_worker(settings, **slow):
        client = app.client(api_key=key, _strict_response_validation=True)
        created = submit(client, jsonl([chat_line(f"r{i}") for i in range(200)]))
        wait_for(
            client, created.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 8
        )
        admin = app.client(api_key=stack.create_key(tenant="acme"))  # the tenant's other key
        stack.admin_auth().RevokeKey(auth_pb2.RevokeKeyRequest(id=created_key_id(stack, key)), timeout=5)
        revoked_at = time.monotonic()
        batch = wait_for(admin, created.id)
        errors = output_lines(admin, batch.error_file_id)
    assert batch.status == "cancelled"
    assert batch.errors is not None and batch.errors.data is not None
    assert [e.code for e in batch.errors.data] == ["key_revoked"]
    assert batch.request_counts is not None
    done, failed = batch.request_counts.completed, batch.request_counts.failed
    assert 8 <= done < 200 and done + failed == 200
    assert {e["error"]["code"] for e in errors} == {"key_revoked"}
    # lines started after the revocation was seen (within ~2 s) did not reach the upstream
    late = [r for r in upstream.requests if r.time > revoked_at + 3.0]
    assert late == []


def created_key_id(stack: Stack, key: str) -> str:
    """The id of ``key`` (by its display prefix, from the admin listing)."""
    listed = stack.admin_auth().ListKeys(auth_pb2.ListKeysRequest(tenant="acme"), timeout=5)
    return next(k.id for k in listed.keys if key.startswith(k.prefix))
