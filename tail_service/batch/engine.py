"""The batch engine's three steps, each idempotent so a durable workflow can run it again:

* :meth:`BatchEngine.validate` reads the input file from the store as it streams by,
  checks every line and stores the valid ones (or fails the batch with line-numbered
  errors), then cuts the lines into chunks;
* :meth:`BatchEngine.run_chunk` runs the lines of one chunk that have no stored result,
  concurrently, through admission (batch priority) and the model proxy, storing each
  result once (``(batch, line)`` is unique);
* :meth:`BatchEngine.finalize` gives every line still without a result its error record
  (expired, cancelled), writes the output and error files and sets the final status.

Every line thus ends in exactly one record. The DBOS workflows that call these steps are
in :mod:`tail_service.batch.workflows`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator

import orjson
from opentelemetry.trace import Tracer

from tail_service.core.auth import KeyDirectory, principal_from_json
from tail_service.core.batch import (
    InputChecker,
    line_record_id,
    not_run_line,
    output_line,
    run_line,
)
from tail_service.core.inference import InferenceService
from tail_service.core.spans import NOOP_TRACER, step_span
from tail_service.core.types import Principal
from tail_service.errors import ServiceUnavailableError
from tail_service.settings import BatchSettings
from tail_service.store import Store
from tail_service.store.batches import TERMINAL, BatchRow, BatchStore, ResultRow
from tail_service.store.files import FileStore

log = logging.getLogger("tail_service.batch")

#: output files are kept this long unless the batch asked otherwise (OpenAI: 30 days)
OUTPUT_TTL = 30 * 86_400
#: seconds between checks, while a batch runs, that the key which created it is still valid
KEY_RECHECK = 2.0
#: input lines stored per insert while validating
_LINES_PER_INSERT = 1000


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's ``output`` or ``error`` file: fixed, so writing it again replaces it."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def split_lines(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, line)`` for each line of a file given as byte chunks."""
    line_no = 0
    tail = b""
    for chunk in chunks:
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        for part in parts:
            line_no += 1
            yield line_no, part
    if tail:
        yield line_no + 1, tail


class _StopWatch:
    """Tells a running chunk to start no new lines: the batch is being cancelled or expired,
    or the key that created it was revoked.

    Polls the batch's status in the store every ``interval`` seconds (one small query per
    chunk, not per line), and the key every :data:`KEY_RECHECK` seconds. ``principal`` is
    the key's policy as it is now (an updated limit applies to the lines still to run).
    """

    def __init__(
        self, engine: BatchEngine, batch: BatchRow, principal: Principal, interval: float = 0.5
    ) -> None:
        self._engine = engine
        self._batch = batch
        self._interval = interval
        self.principal = principal
        self.reason: str | None = None
        self._check(batch.status)

    def _check(self, status: str) -> None:
        if status in ("cancelling", "cancelled"):
            self.reason = "cancelled"
        elif self._batch.expires_at is not None and time.time() >= self._batch.expires_at:
            self.reason = "expired"

    @property
    def stopped(self) -> bool:
        expires = self._batch.expires_at
        if self.reason is None and expires is not None and time.time() >= expires:
            self.reason = "expired"
        return self.reason is not None

    async def watch(self) -> None:
        next_key_check = time.monotonic() + KEY_RECHECK
        while self.reason is None:
            await asyncio.sleep(self._interval)
            row = await self._engine.store.run(self._engine.batches.get_any, self._batch.id)
            self._check(row.status if row is not None else "cancelled")
            if self.reason is None and time.monotonic() >= next_key_check:
                next_key_check = time.monotonic() + KEY_RECHECK
                fresh = await self._engine.current_principal(self.principal)
                if fresh is None:
                    await self._engine.stop_revoked(self._batch.id)
                    self.reason = "revoked"
                else:
                    self.principal = fresh


class _ResultWriter:
    """Buffers line results and stores them in groups (one insert per group, not per line)."""

    def __init__(
        self, engine: BatchEngine, batch_id: str, max_rows: int = 100, max_delay: float = 0.2
    ) -> None:
        self._engine = engine
        self._batch_id = batch_id
        self._rows: list[ResultRow] = []
        self._max_rows = max_rows
        self._max_delay = max_delay
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, row: ResultRow) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._max_rows:
            self._spawn(0.0)
        elif self._flusher is None or self._flusher.done():
            self._spawn(self._max_delay)

    def _spawn(self, delay: float) -> None:
        async def later() -> None:
            if delay:
                await asyncio.sleep(delay)
            await self.flush()

        self._flusher = asyncio.create_task(later())

    async def flush(self) -> None:
        async with self._lock:
            rows, self._rows = self._rows, []
            if rows:
                await self._engine.store.run(self._engine.batches.insert_results, self._batch_id, rows)

    async def close(self) -> None:
        """Store everything buffered (waiting for a flush already under way)."""
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()


class BatchEngine:
    """Validates, runs and finalizes batches stored in ``store``."""

    def __init__(
        self,
        settings: BatchSettings,
        store: Store,
        inference: InferenceService,
        *,
        keys: KeyDirectory | None = None,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        self.settings = settings
        #: one span per chunk run
        self.tracer = tracer
        self.store = store
        self.batches = BatchStore(store)
        self.files = FileStore(store)
        self.inference = inference
        #: where the key that created a batch is checked again while it runs (auth-service)
        self.keys = keys
        self._clock = clock
        self._key_cache: dict[str, tuple[float, Principal | None]] = {}

    async def current_principal(self, principal: Principal) -> Principal | None:
        """The key's principal as it is now; ``None`` once it is revoked or expired. When
        auth-service cannot tell, the last known one (checked again later)."""
        if 0 < principal.expires_at <= self._clock():
            return None
        if self.keys is None:
            return principal
        now = time.monotonic()
        cached = self._key_cache.get(principal.key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = await self.keys.principals([principal.key_id])
        except ServiceUnavailableError:
            log.warning("cannot check the key of a running batch", extra={"key_id": principal.key_id})
            return principal
        fresh = found.get(principal.key_id)
        self._key_cache[principal.key_id] = (now + KEY_RECHECK, fresh)
        return fresh

    async def stop_revoked(self, batch_id: str) -> None:
        """The batch's key was revoked (or expired): cancel it, saying why."""
        message = "The API key that created this batch was revoked or expired; the batch was cancelled."
        error = {"code": "key_revoked", "message": message, "param": None, "line": None}
        await self.store.run(
            self.batches.transition,
            batch_id,
            ("validating", "in_progress"),
            "cancelling",
            cancelling_at=self._now(),
            errors=json.dumps({"object": "list", "data": [error]}),
        )

    def _now(self) -> int:
        return int(self._clock())

    # -- validate ---------------------------------------------------------------------------

    async def validate(self, batch_id: str) -> list[tuple[int, int]]:
        """Check and store the input lines; the chunks to run as ``(first, last)`` line numbers."""
        batch = await self.store.run(self.batches.get_any, batch_id)
        if batch is None or batch.status in TERMINAL or batch.status == "cancelling":
            return []
        if batch.status == "validating":
            if not await self.store.run(self._check_and_store, batch):
                return []
            if not await self.store.run(
                self.batches.transition, batch_id, ("validating",), "in_progress", in_progress_at=self._now()
            ):
                return []  # cancelled meanwhile
        numbers = await self.store.run(self.batches.line_numbers, batch_id)
        size = self.settings.chunk_lines
        return [(numbers[i], numbers[min(i + size, len(numbers)) - 1]) for i in range(0, len(numbers), size)]

    def _check_and_store(self, batch: BatchRow) -> bool:
        """Blocking: stream the input file, store valid lines; ``False`` when the batch failed."""
        checker = InputChecker(batch.endpoint, self.settings.max_lines)
        record = self.files.get(batch.tenant, batch.input_file_id)
        if record is None:
            return self._fail(batch, "invalid_file", "The input file no longer exists.", "input_file_id")
        if record.bytes > self.settings.max_input_bytes:
            limit = self.settings.max_input_bytes // (1024 * 1024)
            message = f"The input file is larger than the {limit} MB limit."
            return self._fail(batch, "file_too_large", message, "input_file_id")
        pending: list[tuple[int, str, bytes]] = []
        for line_no, raw in split_lines(self.files.iter_content(record.id)):
            line = checker.feed(line_no, raw.rstrip(b"\r"))
            if line is not None and not checker.error_count:
                pending.append((line.line_no, line.custom_id, orjson.dumps(line.body)))
                if len(pending) >= _LINES_PER_INSERT:
                    self.batches.insert_lines(batch.id, pending)
                    pending = []
        checker.finish()
        if checker.error_count:
            self.batches.delete_lines(batch.id)
            errors = {"object": "list", "data": [e.to_openai() for e in checker.errors]}
            self.batches.transition(
                batch.id, ("validating",), "failed", failed_at=self._now(), errors=json.dumps(errors)
            )
            return False
        self.batches.insert_lines(batch.id, pending)
        model = next(iter(checker.models)) if len(checker.models) == 1 else None
        self.batches.update(batch.id, total=checker.lines, model=model)
        return True

    def _fail(self, batch: BatchRow, code: str, message: str, param: str | None) -> bool:
        error = {"code": code, "message": message, "param": param, "line": None}
        errors = json.dumps({"object": "list", "data": [error]})
        self.batches.transition(batch.id, ("validating",), "failed", failed_at=self._now(), errors=errors)
        return False

    # -- run --------------------------------------------------------------------------------

    @step_span(
        "tail.batch.chunk",
        "tail.batch.id",
        "tail.batch.first_line",
        "tail.batch.last_line",
        result="tail.batch.lines_run",
    )
    async def run_chunk(self, batch_id: str, first: int, last: int) -> int:
        """Run the lines ``first..last`` that have no result yet; returns how many ran."""
        batch = await self.store.run(self.batches.get_any, batch_id)
        if batch is None or batch.status in TERMINAL:
            return 0
        principal = await self.current_principal(principal_from_json(batch.principal))
        if principal is None:
            await self.stop_revoked(batch_id)
            return 0
        stop = _StopWatch(self, batch, principal)
        if stop.stopped:
            return 0
        lines = await self.store.run(self.batches.pending_lines, batch_id, first, last)
        if not lines:
            return 0
        writer = _ResultWriter(self, batch_id)
        gate = asyncio.Semaphore(self.settings.line_concurrency)
        watcher = asyncio.create_task(stop.watch())
        ran = 0

        async def one(line_no: int, custom_id: str, body: bytes) -> None:
            nonlocal ran
            async with gate:
                result = await run_line(
                    self.inference,
                    batch.endpoint,
                    body,
                    stop.principal,
                    stopped=lambda: stop.stopped,
                    max_backoff=self.settings.max_backoff,
                )
            if result is None:
                return  # the batch stopped first: finalize records the line
            record = output_line(line_record_id(batch_id, line_no), custom_id, result)
            writer.add(
                ResultRow(
                    line_no,
                    result.ok,
                    orjson.dumps(record),
                    result.prompt_tokens,
                    result.completion_tokens,
                    result.cached_tokens,
                    result.reasoning_tokens,
                )
            )
            ran += 1

        try:
            await asyncio.gather(*(one(*line) for line in lines))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await writer.close()
        return ran

    # -- finalize -----------------------------------------------------------------------------

    async def finalize(self, batch_id: str) -> str | None:
        """Record the lines that never ran, write the output files, set the final status."""
        return await self.store.run(self._finalize, batch_id)

    def _finalize(self, batch_id: str) -> str | None:
        batch = self.batches.get_any(batch_id)
        if batch is None or batch.status in TERMINAL:
            return batch.status if batch else None
        now = self._now()
        expired = batch.expires_at is not None and now >= batch.expires_at
        if batch.status != "cancelling" and not self.batches.transition(
            batch_id, ("in_progress",), "finalizing", finalizing_at=now
        ):
            batch = self.batches.get_any(batch_id)
            assert batch is not None
            if batch.status != "cancelling":
                return batch.status
        reason = "expired"
        if batch.status == "cancelling":
            reason = "revoked" if "key_revoked" in (batch.errors or "") else "cancelled"
        missing = self._record_unanswered(batch_id, reason)
        if batch.status != "cancelling" and missing and not expired:
            log.error("batch %s: %d lines had no result when it finished", batch_id, missing)
        final = "cancelled" if batch.status == "cancelling" else ("expired" if missing else "completed")
        ttl = batch.output_expires_after or OUTPUT_TTL
        out_id = self._write_output(batch, ok=True, expires_at=now + ttl)
        err_id = self._write_output(batch, ok=False, expires_at=now + ttl)
        progress = self.batches.progress(batch_id)
        self.batches.transition(
            batch_id,
            ("finalizing", "cancelling"),
            final,
            **{f"{final}_at": self._now()},
            output_file_id=out_id,
            error_file_id=err_id,
            completed=progress.completed,
            failed=progress.failed,
            usage=json.dumps(progress.usage()),
        )
        log.info(
            "batch finished",
            extra={
                "batch": batch_id,
                "status": final,
                "lines_ok": progress.completed,
                "lines_failed": progress.failed,
            },
        )
        return final

    def _record_unanswered(self, batch_id: str, reason: str) -> int:
        """Give every line without a result its error record; how many there were."""
        count = 0
        after = 0
        while page := self.batches.unanswered(batch_id, after):
            records = [(n, not_run_line(line_record_id(batch_id, n), cid, reason)) for n, cid in page]
            rows = [ResultRow(n, False, orjson.dumps(record)) for n, record in records]
            self.batches.insert_results(batch_id, rows)
            count += len(rows)
            after = page[-1][0]
        return count

    def _write_output(self, batch: BatchRow, *, ok: bool, expires_at: int) -> str | None:
        """Write the output (``ok``) or error file; its id, or ``None`` when it has no lines."""
        file_id = output_file_id(batch.id, "output" if ok else "error")
        records = self.batches.iter_records(batch.id, ok)
        first = next(records, None)
        self.files.discard(file_id)  # a finalize that crashed half way wrote part of it
        if first is None:
            return None

        def lines() -> Iterator[bytes]:
            yield first + b"\n"
            for record in records:
                yield record + b"\n"

        name = f"{batch.id}_{'output' if ok else 'error'}.jsonl"
        self.files.write_file(batch.tenant, name, "batch_output", lines(), expires_at, file_id=file_id)
        return file_id
