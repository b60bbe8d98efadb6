"""Tenants are kept apart on every batch route, and on the files a batch writes: another
tenant's batch or file is a 404, exactly like one that does not exist (never a 403)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.batch.fixtures import chat_line, jsonl, run_worker, submit, wait_for
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
