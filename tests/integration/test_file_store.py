"""FileStore on SQLite and on a real PostgreSQL (pgserver): what the batch engine relies on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tail_service.settings import StoreSettings
from tail_service.store import Store
from tail_service.store.files import STALE_UPLOAD_SECONDS, FileStore
from tail_service.store.schema import file_chunks, files

CHUNK = 4096


@pytest.fixture
def fs(db_url: str) -> Iterator[FileStore]:
    store = Store(StoreSettings(database_url=db_url, chunk_bytes=CHUNK), None)
    store.migrate()
    try:
        yield FileStore(store)
    finally:
        store.close()


def chunk_sizes(fs: FileStore, file_id: str) -> list[int]:
    with fs.engine.connect() as conn:
        rows = conn.execute(
            sa.select(sa.func.length(file_chunks.c.data))
            .where(file_chunks.c.file_id == file_id)
            .order_by(file_chunks.c.seq)
        )
        return [r[0] for r in rows]


def test_write_file_recuts_chunks_and_reads_back(fs: FileStore) -> None:
    pieces = [b"a" * 10, b"b" * (CHUNK * 2), b"c" * 5, b"", b"d" * (CHUNK - 15)]
    record = fs.write_file("t1", "out.jsonl", "batch_output", iter(pieces), expires_at=None)
    data = b"".join(pieces)
    assert record.bytes == len(data) and record.status == "processed" and record.purpose == "batch_output"
    assert chunk_sizes(fs, record.id) == [CHUNK, CHUNK, CHUNK]
    assert b"".join(fs.iter_content(record.id)) == data
    assert fs.get("t1", record.id) == record
    assert fs.get("t2", record.id) is None
    assert fs.get("t1", "file-" + "0" * 24) is None
    assert record.to_openai() == {
        "id": record.id,
        "object": "file",
        "bytes": len(data),
        "created_at": record.created_at,
        "filename": "out.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
    empty = fs.write_file("t1", "empty.jsonl", "batch_output", [], expires_at=None)
    assert empty.bytes == 0 and list(fs.iter_content(empty.id)) == []


def test_a_failing_write_leaves_nothing(fs: FileStore) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"x" * (CHUNK * 3)
        raise RuntimeError("the producer broke")

    with pytest.raises(RuntimeError):
        fs.write_file("t1", "out.jsonl", "batch_output", pieces(), expires_at=None)
    with fs.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(files)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(file_chunks)).scalar_one() == 0


def test_uploads_are_invisible_until_finished(fs: FileStore) -> None:
    upload = fs.begin_upload("t1", "in.jsonl")
    fs.put_chunk(upload.id, 0, b"abc")
    assert fs.get("t1", upload.id) is None
    assert fs.list_files("t1", limit=10).data == []
    done = fs.finish_upload(upload, "batch", 3, expires_at=None)
    assert fs.get("t1", upload.id) == done
    assert [f.id for f in fs.list_files("t1", limit=10).data] == [upload.id]


def test_listing_by_cursor_order_and_purpose(fs: FileStore) -> None:
    ids = [fs.write_file("t1", f"{i}.txt", "user_data", [b"x"], None).id for i in range(5)]
    other = fs.write_file("t1", "b.jsonl", "batch", [b"{}"], None).id
    fs.write_file("t2", "theirs.txt", "user_data", [b"y"], None)
    with fs.engine.begin() as conn:  # distinct creation times, so the order is known
        for i, fid in enumerate([*ids, other]):
            conn.execute(sa.update(files).where(files.c.id == fid).values(created_at=1000 + i))

    def walk(order: str, limit: int, purpose: str | None = None) -> list[str]:
        seen: list[str] = []
        after = None
        while True:
            page = fs.list_files("t1", limit=limit, order=order, after=after, purpose=purpose)
            seen += [f.id for f in page.data]
            if not page.has_more:
                return seen
            after = seen[-1]

    assert walk("asc", 2) == [*ids, other]
    assert walk("desc", 4) == [other, *reversed(ids)]
    assert walk("desc", 10_000, purpose="user_data") == list(reversed(ids))
    assert fs.list_files("t1", limit=10, after="file-" + "0" * 24).data == []
    t2_file = fs.list_files("t2", limit=1).data[0].id
    assert fs.list_files("t1", limit=10, after=t2_file).data == []  # a foreign cursor


def test_delete_and_purge(fs: FileStore) -> None:
    now = int(time.time())
    keep = fs.write_file("t1", "keep.txt", "user_data", [b"k" * (CHUNK + 1)], None)
    gone = fs.write_file("t1", "gone.txt", "user_data", [b"g" * (CHUNK + 1)], now + 100)
    assert fs.delete("t2", keep.id) is False
    assert fs.delete("t1", keep.id) is True
    assert fs.delete("t1", keep.id) is False
    assert fs.get("t1", keep.id) is None and list(fs.iter_content(keep.id)) == []

    expired = fs.write_file("t1", "old.txt", "user_data", [b"o"], now - 1)
    assert fs.get("t1", expired.id) is None  # expired: invisible at once
    fresh_upload = fs.begin_upload("t1", "new.txt")
    stale_upload = fs.begin_upload("t1", "crashed.txt")
    fs.put_chunk(stale_upload.id, 0, b"partial")
    with fs.engine.begin() as conn:
        conn.execute(
            sa.update(files)
            .where(files.c.id == stale_upload.id)
            .values(created_at=now - STALE_UPLOAD_SECONDS - 1)
        )
    assert fs.purge_expired(now) == 2
    with fs.engine.connect() as conn:
        left = set(conn.execute(sa.select(files.c.id)).scalars())
        chunk_owners = set(conn.execute(sa.select(file_chunks.c.file_id)).scalars())
    assert left == {gone.id, fresh_upload.id}
    assert chunk_owners == {gone.id}
    assert fs.purge_expired(now + 100) == 1
    assert fs.purge_expired(now + 100) == 0
