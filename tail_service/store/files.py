"""Files in the shared store: metadata in ``files``, content in ``file_chunks`` rows.

Every method is blocking; async callers go through :meth:`tail_service.store.Store.run`.
A file is written as ``uploading`` first (never visible: :meth:`FileStore.get` and
:meth:`FileStore.list_files` skip it), one committed chunk at a time, and becomes
``processed`` in one final update, so a large file never sits in memory nor in one long
transaction. An upload that dies half way leaves an ``uploading`` row that
:meth:`FileStore.purge_expired` removes after :data:`STALE_UPLOAD_SECONDS`.

Content is read back one chunk row per query (:meth:`FileStore.read_chunk`), in ``seq``
order; every chunk but the last holds exactly ``chunk_bytes`` bytes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from tail_service.store import Store, beyond
from tail_service.store.schema import file_chunks, files

#: an ``uploading`` row older than this (seconds) is a crashed upload
STALE_UPLOAD_SECONDS = 3600
UPLOADING = "uploading"
PROCESSED = "processed"


def new_file_id() -> str:
    """``file-`` and 24 random hex characters."""
    return "file-" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One file's metadata (times in unix seconds; ``bytes`` is the content's size)."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    status: str
    created_at: int
    expires_at: int | None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``FileObject``."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass(frozen=True, slots=True)
class FilePage:
    """One page of :meth:`FileStore.list_files`; ``has_more`` when files follow it."""

    data: list[FileRecord]
    has_more: bool


def _record(row: Row[Any]) -> FileRecord:
    m = row._mapping
    return FileRecord(
        id=m["id"],
        tenant=m["tenant"],
        filename=m["filename"],
        purpose=m["purpose"],
        bytes=m["bytes"],
        status=m["status"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
    )


def _visible(tenant: str, now: int) -> sa.ColumnElement[bool]:
    """Files of ``tenant`` that are complete and not expired at ``now``."""
    return sa.and_(
        files.c.tenant == tenant,
        files.c.status == PROCESSED,
        sa.or_(files.c.expires_at.is_(None), files.c.expires_at > now),
    )


class FileStore:
    """Files of every tenant in the store. Thread-safe; each method is one short unit of work."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine
        #: bytes per content row
        self.chunk_bytes = store.settings.chunk_bytes

    def get(self, tenant: str, file_id: str) -> FileRecord | None:
        """``file_id`` if ``tenant`` owns it and it is complete and unexpired, else ``None``."""
        now = int(time.time())
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(files).where(files.c.id == file_id, _visible(tenant, now))).first()
        return _record(row) if row is not None else None

    def list_files(
        self,
        tenant: str,
        *,
        limit: int,
        order: str = "desc",
        after: str | None = None,
        purpose: str | None = None,
    ) -> FilePage:
        """Up to ``limit`` visible files of ``tenant`` by ``(created_at, id)`` in ``order``
        (``asc`` or ``desc``), starting after the file ``after``.

        The cursor may be any file of ``tenant`` still in the store (even one expired
        meanwhile); another tenant's or a missing id gives an empty last page, the same
        for both, so a cursor reveals nothing of other tenants.
        """
        now = int(time.time())
        desc = order == "desc"
        query = sa.select(files).where(_visible(tenant, now))
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.engine.connect() as conn:
            if after is not None:
                cursor = conn.execute(
                    sa.select(files.c.created_at, files.c.id).where(
                        files.c.id == after, files.c.tenant == tenant
                    )
                ).first()
                if cursor is None:
                    return FilePage([], has_more=False)
                query = query.where(beyond(files, cursor.created_at, cursor.id, desc=desc))
            if desc:
                query = query.order_by(files.c.created_at.desc(), files.c.id.desc())
            else:
                query = query.order_by(files.c.created_at.asc(), files.c.id.asc())
            rows = conn.execute(query.limit(limit + 1)).all()
        return FilePage([_record(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def delete(self, tenant: str, file_id: str) -> bool:
        """Delete a visible file of ``tenant`` and its content; whether there was one."""
        now = int(time.time())
        with self.engine.begin() as conn:
            found = conn.execute(
                sa.select(files.c.id).where(files.c.id == file_id, _visible(tenant, now))
            ).first()
            if found is None:
                return False
            _delete_files(conn, [file_id])
        return True

    def read_chunk(self, file_id: str, seq: int) -> bytes | None:
        """Content row ``seq`` (from 0) of ``file_id``, or ``None`` past the last one."""
        with self.engine.connect() as conn:
            data = conn.execute(
                sa.select(file_chunks.c.data).where(
                    file_chunks.c.file_id == file_id, file_chunks.c.seq == seq
                )
            ).scalar()
        return bytes(data) if data is not None else None

    def iter_content(self, file_id: str) -> Iterator[bytes]:
        """The content of ``file_id`` chunk by chunk, one query per chunk (no ownership check:
        call :meth:`get` first)."""
        seq = 0
        while (data := self.read_chunk(file_id, seq)) is not None:
            yield data
            seq += 1

    def begin_upload(self, tenant: str, filename: str, file_id: str | None = None) -> FileRecord:
        """Insert an ``uploading`` file (purpose and size unknown yet) and return it."""
        record = FileRecord(
            id=file_id or new_file_id(),
            tenant=tenant,
            filename=filename,
            purpose="",
            bytes=0,
            status=UPLOADING,
            created_at=int(time.time()),
            expires_at=None,
        )
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(files).values(
                    id=record.id,
                    tenant=tenant,
                    filename=filename,
                    purpose=record.purpose,
                    bytes=0,
                    status=UPLOADING,
                    created_at=record.created_at,
                    expires_at=None,
                )
            )
        return record

    def put_chunk(self, file_id: str, seq: int, data: bytes) -> None:
        """Store content row ``seq`` of an uploading file (its own transaction)."""
        with self.engine.begin() as conn:
            conn.execute(sa.insert(file_chunks).values(file_id=file_id, seq=seq, data=data))

    def finish_upload(
        self, upload: FileRecord, purpose: str, size: int, expires_at: int | None
    ) -> FileRecord:
        """Mark an upload ``processed`` with its purpose, size and expiry, in one update."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(files)
                .where(files.c.id == upload.id, files.c.status == UPLOADING)
                .values(purpose=purpose, bytes=size, status=PROCESSED, expires_at=expires_at)
            )
        return FileRecord(
            id=upload.id,
            tenant=upload.tenant,
            filename=upload.filename,
            purpose=purpose,
            bytes=size,
            status=PROCESSED,
            created_at=upload.created_at,
            expires_at=expires_at,
        )

    def discard(self, file_id: str) -> None:
        """Delete a file and its content whatever its state (a failed upload)."""
        with self.engine.begin() as conn:
            _delete_files(conn, [file_id])

    def write_file(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        chunks: Iterable[bytes],
        expires_at: int | None,
        *,
        file_id: str | None = None,
    ) -> FileRecord:
        """Store a file the server made (a batch's output): ``chunks`` are re-cut into rows
        of ``chunk_bytes``, each committed as it fills, the file ``uploading`` (invisible)
        until the last; on any failure what was written is deleted (or, if the process
        dies, purged later)."""
        upload = self.begin_upload(tenant, filename, file_id)
        try:
            size = 0
            seq = 0
            buf = bytearray()
            for piece in chunks:
                buf += piece
                size += len(piece)
                while len(buf) >= self.chunk_bytes:
                    self.put_chunk(upload.id, seq, bytes(buf[: self.chunk_bytes]))
                    del buf[: self.chunk_bytes]
                    seq += 1
            if buf:
                self.put_chunk(upload.id, seq, bytes(buf))
            return self.finish_upload(upload, purpose, size, expires_at)
        except BaseException:
            self.discard(upload.id)
            raise

    def purge_expired(self, now: int) -> int:
        """Delete files expired at ``now`` and uploads stuck for :data:`STALE_UPLOAD_SECONDS`,
        content included; the number of files deleted."""
        expired = sa.or_(
            sa.and_(files.c.status == PROCESSED, files.c.expires_at.is_not(None), files.c.expires_at <= now),
            sa.and_(files.c.status == UPLOADING, files.c.created_at < now - STALE_UPLOAD_SECONDS),
        )
        total = 0
        while True:
            with self.engine.begin() as conn:
                ids = list(conn.execute(sa.select(files.c.id).where(expired).limit(100)).scalars())
                if not ids:
                    return total
                total += _delete_files(conn, ids)


def _delete_files(conn: Connection, ids: list[str]) -> int:
    """Delete ``ids`` and their chunks (explicitly: no reliance on the cascade)."""
    conn.execute(sa.delete(file_chunks).where(file_chunks.c.file_id.in_(ids)))
    return conn.execute(sa.delete(files).where(files.c.id.in_(ids))).rowcount
