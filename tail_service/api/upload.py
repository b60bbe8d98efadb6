"""``POST /v1/files``: a multipart/form-data body streamed into the store as it arrives.

The body is fed chunk by chunk (:func:`~tail_service.api.body.iter_body`, the JSON
bodies' stall limits) to python-multipart's streaming parser, whose callbacks collect
the small fields and append the file's bytes to a buffer; each time the buffer holds
``chunk_bytes`` a content row is written through the store's pool. So an upload needs
about one chunk of memory whatever its size, and the event loop never waits on the
database.

The ``files`` row is inserted ``uploading`` as soon as the file part's headers arrive
(``purpose`` may come before or after the file), and completed in one update once the
body has ended and every field is valid. On any failure, the rows written so far are
deleted (a process that dies leaves an ``uploading`` row the store purges later).

Limits: the file up to ``store.max_file_bytes`` (a ``batch`` file up to
``batch.max_input_bytes``), other fields up to :data:`MAX_FIELD_BYTES` each, at most
:data:`MAX_PARTS` parts. Every refusal is a 400 naming the parameter (a 408 for a stall).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from tail_service.api.body import iter_body
from tail_service.errors import InvalidRequestError
from tail_service.services import Services
from tail_service.store.files import FileRecord, FileStore

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger("tail_service.api")

#: purposes a client may upload with
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
#: the form fields besides ``file``
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
#: most bytes of one non-file field
MAX_FIELD_BYTES = 64 * 1024
#: most parts in one form
MAX_PARTS = 16
#: longest file name (characters; the ``files.filename`` column)
MAX_FILENAME = 512
#: ``expires_after[seconds]`` bounds, and the default expiry of ``batch`` files (30 days)
MIN_EXPIRES, MAX_EXPIRES = 3600, 2_592_000
BATCH_EXPIRES = 2_592_000
#: room for the non-file parts and the multipart framing in a declared Content-Length
_FRAMING_ALLOWANCE = MAX_PARTS * (MAX_FIELD_BYTES + 8 * 1024)


def _missing(param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _malformed(detail: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"We could not parse the multipart/form-data body of your request: {detail}.",
        code="invalid_multipart",
        headers={"connection": "close"},
    )


class _Form:
    """The parser's callbacks: small fields collected, the file's bytes buffered in ``data``.

    Raises :class:`InvalidRequestError` from inside ``parser.write`` as soon as a limit or
    a field is wrong, so a bad upload stops at the first offending byte.
    """

    def __init__(self, max_file_bytes: int, max_batch_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.max_batch_bytes = max_batch_bytes
        self.fields: dict[str, str] = {}
        #: the file's name once its part's headers have arrived
        self.filename: str | None = None
        #: file bytes not yet written to the store
        self.data = bytearray()
        self.size = 0
        self.ended = False
        self._parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        #: the current part: ``"file"``, a field name, or ``None`` before its headers end
        self._current: str | None = None
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        self._disposition = None
        self._current = None
        self._value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        if self._disposition is None:
            raise _malformed("a part has no Content-Disposition header")
        kind, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if kind != b"form-data" or raw_name is None:
            raise _malformed("a part's Content-Disposition is not form-data with a name")
        name = raw_name.decode("utf-8", "replace")
        if name == "file":
            raw_filename = options.get(b"filename")
            if not raw_filename:
                raise InvalidRequestError("The 'file' part must have a filename.", param="file")
            if self.filename is not None:
                raise InvalidRequestError("Send exactly one 'file' part.", param="file")
            filename = raw_filename.decode("utf-8", "replace")
            if len(filename) > MAX_FILENAME:
                raise InvalidRequestError(
                    f"The filename is longer than {MAX_FILENAME} characters.", param="file"
                )
            self.filename = filename
            self._check_batch_filename()
        elif name not in FIELDS:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)
        elif name in self.fields:
            raise InvalidRequestError(f"The field '{name}' was sent more than once.", param=name)
        self._current = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current == "file":
            self.size += end - start
            limit = self.max_batch_bytes if self.fields.get("purpose") == "batch" else self.max_file_bytes
            if self.size > limit:
                raise self._too_large(limit)
            self.data += data[start:end]
        elif self._current is not None:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidRequestError(
                    f"The field '{self._current}' is longer than {MAX_FIELD_BYTES} bytes.",
                    param=self._current,
                )

    def _part_end(self) -> None:
        name = self._current
        if name is None or name == "file":
            return
        try:
            value = bytes(self._value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"The field '{name}' is not valid UTF-8.", param=name) from None
        self.fields[name] = value
        if name == "purpose":
            if value not in UPLOAD_PURPOSES:
                raise InvalidRequestError(
                    f"Invalid value for 'purpose': '{value[:100]}'. Supported values are: "
                    + ", ".join(f"'{p}'" for p in UPLOAD_PURPOSES)
                    + ".",
                    param="purpose",
                )
            self._check_batch_filename()
            if value == "batch" and self.size > self.max_batch_bytes:
                raise self._too_large(self.max_batch_bytes)

    def _end(self) -> None:
        self.ended = True

    def _too_large(self, limit: int) -> InvalidRequestError:
        kind = "A batch input file" if self.fields.get("purpose") == "batch" else "The file"
        return InvalidRequestError(
            f"{kind} may be at most {limit} bytes.",
            param="file",
            code="file_too_large",
            headers={"connection": "close"},
        )

    def _check_batch_filename(self) -> None:
        name = self.filename
        if self.fields.get("purpose") == "batch" and name is not None and not name.endswith(".jsonl"):
            raise InvalidRequestError(
                "A file with purpose 'batch' must be a .jsonl file (its name must end in .jsonl).",
                param="file",
                code="invalid_file_format",
            )

    def expires_after(self) -> int | None:
        """Seconds from creation to expiry, from the fields (``batch`` default: 30 days)."""
        anchor = self.fields.get("expires_after[anchor]")
        seconds = self.fields.get("expires_after[seconds]")
        if anchor is None and seconds is None:
            return BATCH_EXPIRES if self.fields["purpose"] == "batch" else None
        if anchor is None:
            raise _missing("expires_after[anchor]")
        if seconds is None:
            raise _missing("expires_after[seconds]")
        if anchor != "created_at":
            raise InvalidRequestError(
                "Invalid value for 'expires_after[anchor]': the only anchor is 'created_at'.",
                param="expires_after[anchor]",
            )
        text = seconds.strip()
        if not (text.isascii() and text.isdigit() and MIN_EXPIRES <= int(text) <= MAX_EXPIRES):
            raise InvalidRequestError(
                f"Invalid value for 'expires_after[seconds]': an integer from {MIN_EXPIRES} to "
                f"{MAX_EXPIRES} is required.",
                param="expires_after[seconds]",
            )
        return int(text)


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            "The request body must be multipart/form-data (with a boundary), with the fields "
            "'file' and 'purpose'.",
            param=None,
            code="invalid_content_type",
        )
    if len(boundary) > 200:
        raise _malformed("the boundary is longer than 200 bytes")
    return boundary


async def receive_upload(request: Request, services: Services, tenant: str) -> FileRecord:
    """Stream the upload in ``request`` into the store for ``tenant``; the stored file."""
    settings = services.settings
    max_file = settings.store.max_file_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_file + _FRAMING_ALLOWANCE:
        raise InvalidRequestError(
            f"The file may be at most {max_file} bytes.",
            param="file",
            code="file_too_large",
            headers={"connection": "close"},
        )
    form = _Form(max_file, min(max_file, settings.batch.max_input_bytes))
    parser = MultipartParser(_boundary(request), form.callbacks())
    store = services.store
    files = FileStore(store)
    chunk_bytes = files.chunk_bytes
    upload: FileRecord | None = None
    seq = 0
    try:
        async with contextlib.aclosing(iter_body(request, settings.server)) as body:
            async for chunk in body:
                try:
                    parser.write(chunk)
                except FormParserError as exc:
                    raise _malformed(str(exc).rstrip(".")) from None
                if upload is None and form.filename is not None:
                    upload = await store.run(files.begin_upload, tenant, form.filename)
                while upload is not None and len(form.data) >= chunk_bytes:
                    piece = bytes(form.data[:chunk_bytes])
                    del form.data[:chunk_bytes]
                    await store.run(files.put_chunk, upload.id, seq, piece)
                    seq += 1
                if form.ended:
                    break
        if not form.ended:
            raise _malformed("the body ended before the closing boundary")
        if upload is None:
            raise _missing("file")
        if "purpose" not in form.fields:
            raise _missing("purpose")
        expires_after = form.expires_after()
        if form.data:
            await store.run(files.put_chunk, upload.id, seq, bytes(form.data))
            form.data.clear()
        expires_at = upload.created_at + expires_after if expires_after is not None else None
        return await store.run(files.finish_upload, upload, form.fields["purpose"], form.size, expires_at)
    except BaseException:
        if upload is not None:
            await _discard(services, files, upload.id)
        raise


async def _discard(services: Services, files: FileStore, file_id: str) -> None:
    """Delete a failed upload's rows, even while the request is being cancelled."""
    try:
        await asyncio.shield(services.store.run(files.discard, file_id))
    except Exception:
        log.warning("could not delete the failed upload %s (purged later)", file_id, exc_info=True)
    except asyncio.CancelledError:
        log.info("the failed upload %s is deleted in the background", file_id)
        raise
