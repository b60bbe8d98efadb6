"""The Files API over real uvicorn: the official SDK (strict) for the happy paths, raw HTTP
for bodies the SDK cannot send, and the store's tables to check nothing is left behind."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack

BOUNDARY = "tailtestboundary"


@pytest.fixture
def files_app(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> Callable[..., RunningApp]:
    """``files_app(store={...}, server={...})``: a gateway with auth disabled (tenant ``anonymous``)."""

    def factory(**kw: Any) -> RunningApp:
        kw.setdefault("store", {"chunk_bytes": 4096})
        return make_app([model_entry("gpt-test", upstream)], **kw)

    return factory


def store_rows(app: RunningApp) -> tuple[int, int]:
    """``(files rows, file_chunks rows)`` in the app's SQLite store, whatever their state."""
    engine = sa.create_engine(f"sqlite:///{Path(app.settings.state_dir or '') / 'store.db'}")
    try:
        with engine.connect() as conn:
            n_files = conn.execute(sa.text("SELECT count(*) FROM files")).scalar_one()
            n_chunks = conn.execute(sa.text("SELECT count(*) FROM file_chunks")).scalar_one()
    finally:
        engine.dispose()
    return n_files, n_chunks


def form(*parts: tuple[str, bytes, str | None], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body of ``(name, value, filename)`` parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_form(app: RunningApp, body: bytes, content_type: str | None = None) -> httpx.Response:
    with app.http() as http:
        return http.post(
            "/v1/files",
            content=body,
            headers={"content-type": content_type or f"multipart/form-data; boundary={BOUNDARY}"},
        )


def assert_error(resp: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    message: str = err["message"]
    return message


def test_upload_list_retrieve_content_delete_with_the_sdk(files_app: Callable[..., RunningApp]) -> None:
    app = files_app()
    client = app.strict_client()
    data = os.urandom(4096 * 3 + 17)  # several chunk rows and a short last one
    before = int(time.time())
    created = client.files.create(file=("input.jsonl", data), purpose="batch")
    assert created.id.startswith("file-") and len(created.id) == 5 + 24
    assert created.bytes == len(data) and created.filename == "input.jsonl"
    assert created.purpose == "batch" and created.status == "processed"
    assert created.expires_at == created.created_at + 30 * 86400  # batch default
    assert created.created_at >= before
    kept = client.files.create(
        file=("notes.txt", b"hello"),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert kept.expires_at == kept.created_at + 3600
    plain = client.files.create(file=("plain.bin", b""), purpose="assistants")
    assert plain.expires_at is None and plain.bytes == 0

    assert client.files.retrieve(created.id).model_dump() == created.model_dump()
    assert client.files.content(created.id).read() == data
    assert client.files.content(plain.id).read() == b""
    raw = client.files.with_raw_response.content(created.id)
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["content-length"] == str(len(data))

    deleted = client.files.delete(kept.id)
    assert deleted.id == kept.id and deleted.deleted is True and deleted.object == "file"
    for call in (client.files.retrieve, client.files.delete, client.files.content):
        with pytest.raises(openai.NotFoundError) as err:
            call(kept.id)
        assert err.value.message.endswith(f"No such File object: {kept.id}")
        assert err.value.param == "id" and err.value.type == "invalid_request_error"
    assert store_rows(app) == (2, 4)


def test_listing_pages_by_cursor_in_both_orders(files_app: Callable[..., RunningApp]) -> None:
    app = files_app()
    client = app.strict_client()
    ids = [client.files.create(file=(f"f{i}.txt", b"x" * i), purpose="user_data").id for i in range(5)]
    batch = client.files.create(file=("b.jsonl", b"{}\n"), purpose="batch").id

    page = client.files.list(limit=2)
    assert len(page.data) == 2 and page.has_more is True
    newest_first = [f.id for f in client.files.list(limit=2)]  # auto-pagination over 3 pages
    assert sorted(newest_first) == sorted([*ids, batch]) and len(newest_first) == 6
    oldest_first = [f.id for f in client.files.list(limit=2, order="asc")]
    assert oldest_first == list(reversed(newest_first))
    assert [f.id for f in client.files.list(purpose="batch")] == [batch]
    user_data = [f.id for f in client.files.list(purpose="user_data", limit=3)]
    assert user_data == [i for i in newest_first if i != batch]

    with app.http() as http:
        body = http.get("/v1/files", params={"limit": 2}).json()
        assert body["object"] == "list" and body["has_more"] is True
        assert body["first_id"] == body["data"][0]["id"] and body["last_id"] == body["data"][1]["id"]
        assert set(body["data"][0]) == {
            "id",
            "object",
            "bytes",
            "created_at",
            "filename",
            "purpose",
            "status",
            "expires_at",
            "status_details",
        }
        last = http.get("/v1/files", params={"after": newest_first[-1]}).json()
        assert last == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        unknown = http.get("/v1/files", params={"after": "file-" + "0" * 24}).json()
        assert unknown["data"] == [] and unknown["has_more"] is False
        for params, param in [
            ({"limit": "0"}, "limit"),
            ({"limit": "10001"}, "limit"),
            ({"limit": "two"}, "limit"),
            ({"order": "up"}, "order"),
            ({"purpose": "nope"}, "purpose"),
        ]:
            assert_error(http.get("/v1/files", params=params), 400, param)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (form(("purpose", b"batch", None)), "file", "missing_required_parameter"),
        (form(("file", b"abc", "a.txt")), "purpose", "missing_required_parameter"),
        (form(("purpose", b"nope", None), ("file", b"abc", "a.txt")), "purpose", None),
        (form(("file", b"abc", "a.txt"), ("purpose", b"nope", None)), "purpose", None),
        (form(("purpose", b"batch", None), ("file", b"abc", "a.txt")), "file", "invalid_file_format"),
        (form(("file", b"abc", "a.csv"), ("purpose", b"batch", None)), "file", "invalid_file_format"),
        (form(("file", b"abc", None), ("purpose", b"user_data", None)), "file", None),
        (
            form(("file", b"a", "a.txt"), ("file", b"b", "b.txt"), ("purpose", b"user_data", None)),
            "file",
            None,
        ),
        (
            form(("file", b"a", "a.txt"), ("purpose", b"user_data", None), ("model", b"x", None)),
            "model",
            None,
        ),
        (
            form(("file", b"a", "a.txt"), ("purpose", b"user_data", None), ("purpose", b"batch", None)),
            "purpose",
            None,
        ),
        (form(("purpose", b"x" * 70_000, None), ("file", b"abc", "a.txt")), "purpose", None),
        (form(("purpose", b"\xff\xfe", None), ("file", b"abc", "a.txt")), "purpose", None),
        (
            form(
                ("file", b"a", "a.txt"),
                ("purpose", b"user_data", None),
                ("expires_after[seconds]", b"3600", None),
            ),
            "expires_after[anchor]",
            "missing_required_parameter",
        ),
        (
            form(
                ("file", b"a", "a.txt"),
                ("purpose", b"user_data", None),
                ("expires_after[anchor]", b"last_used", None),
                ("expires_after[seconds]", b"3600", None),
            ),
            "expires_after[anchor]",
            None,
        ),
        (
            form(
                ("file", b"a", "a.txt"),
                ("purpose", b"user_data", None),
                ("expires_after[anchor]", b"created_at", None),
                ("expires_after[seconds]", b"3599", None),
            ),
            "expires_after[seconds]",
            None,
        ),
        (
            form(
                ("file", b"a", "a.txt"),
                ("purpose", b"user_data", None),
                ("expires_after[anchor]", b"created_at", None),
                ("expires_after[seconds]", b"2592001", None),
            ),
            "expires_after[seconds]",
            None,
        ),
        (b"", None, "invalid_multipart"),
        (
            b'--tailtestboundary\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
            None,
            "invalid_multipart",
        ),
        (b"not multipart at all", None, "invalid_multipart"),
        (
            b"--tailtestboundary\r\nContent-Type: text/plain\r\n\r\nabc\r\n--tailtestboundary--\r\n",
            None,
            "invalid_multipart",
        ),
    ],
)
def test_bad_uploads_are_400s_naming_the_param_and_leave_nothing(
    files_app: Callable[..., RunningApp], body: bytes, param: str | None, code: str | None
) -> None:
    app = files_app()
    assert_error(post_form(app, body), 400, param, code)
    assert store_rows(app) == (0, 0)


def test_bad_uploads_through_the_sdk_and_other_content_types(files_app: Callable[..., RunningApp]) -> None:
    app = files_app()
    client = app.strict_client()
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.txt", b"abc"), purpose="batch")
    assert err.value.param == "file" and err.value.code == "invalid_file_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.txt", b"abc"), purpose="nope")  # type: ignore[arg-type]
    assert err.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(
            file=("a.txt", b"abc"), purpose="user_data", expires_after={"anchor": "created_at", "seconds": 60}
        )
    assert err.value.param == "expires_after[seconds]"
    for content_type in ("application/json", "multipart/form-data", "text/plain; boundary=x"):
        assert_error(post_form(app, b'{"purpose": "batch"}', content_type), 400, None, "invalid_content_type")
    with app.http() as http:
        assert_error(http.post("/v1/files"), 400, None, "invalid_content_type")
    assert store_rows(app) == (0, 0)


def test_a_file_over_the_limit_is_refused_and_removed(files_app: Callable[..., RunningApp]) -> None:
    app = files_app(store={"chunk_bytes": 4096, "max_file_bytes": 20_000})
    client = app.strict_client()
    ok = client.files.create(file=("ok.txt", b"x" * 20_000), purpose="user_data")
    assert ok.bytes == 20_000
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("big.txt", b"x" * 20_001), purpose="user_data")
    assert err.value.code == "file_too_large" and err.value.param == "file"
    assert "20000 bytes" in err.value.message
    # declared far too large: refused before any byte of the body is read
    resp = post_form(app, form(("purpose", b"user_data", None), ("file", b"x" * 2_000_000, "big.txt")))
    assert_error(resp, 400, "file", "file_too_large")
    assert store_rows(app) == (1, 5)


def test_a_batch_file_over_the_batch_input_limit_is_refused(files_app: Callable[..., RunningApp]) -> None:
    app = files_app(batch={"max_input_bytes": 5000})
    client = app.strict_client()
    assert client.files.create(file=("big.txt", b"x" * 8000), purpose="user_data").bytes == 8000
    # purpose after the file: the batch limit applies when the purpose arrives
    body = form(("file", b"x" * 8000, "big.jsonl"), ("purpose", b"batch", None))
    assert_error(post_form(app, body), 400, "file", "file_too_large")
    body = form(("purpose", b"batch", None), ("file", b"x" * 8000, "big.jsonl"))
    assert_error(post_form(app, body), 400, "file", "file_too_large")
    assert store_rows(app)[0] == 1


def _stalled_upload(app: RunningApp, sent: bytes, declared: int) -> bytes:
    host, port = app.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            "POST /v1/files HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        sock.sendall(head + sent)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_stalled_upload_is_a_408_and_leaves_nothing(files_app: Callable[..., RunningApp]) -> None:
    app = files_app(server={"body_idle_timeout": 0.5, "body_min_rate": 0})
    start = time.monotonic()
    prefix = form(("purpose", b"user_data", None))[: -len(f"--{BOUNDARY}--\r\n")]
    sent = (
        prefix
        + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'.encode()
    )
    answer = _stalled_upload(app, sent + b"y" * 10_000, 1_000_000)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert time.monotonic() - start < 5
    assert store_rows(app) == (0, 0)


def test_time_spent_writing_chunks_is_not_a_stall(files_app: Callable[..., RunningApp]) -> None:
    # a tight idle limit and many small chunk rows: the store's time is not the client's
    app = files_app(server={"body_idle_timeout": 0.3}, store={"chunk_bytes": 4096})
    data = os.urandom(2 * 1024 * 1024)
    created = app.strict_client().files.create(file=("a.bin", data), purpose="user_data")
    assert app.strict_client().files.content(created.id).read() == data


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_64_mb_upload_streams_without_holding_the_file_in_memory(
    files_app: Callable[..., RunningApp],
) -> None:
    app = files_app(store={})  # default 1 MiB chunk rows
    size = 64 * 1024 * 1024
    piece = os.urandom(1024 * 1024)

    def body() -> Iterator[bytes]:
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'.encode()
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"'.encode()
        yield b"\r\n\r\n"
        for _ in range(size // len(piece)):
            yield piece
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kb())
            time.sleep(0.005)

    baseline = _rss_kb()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with app.http() as http:
            resp = http.post(
                "/v1/files",
                content=body(),
                headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
                timeout=120,
            )
    finally:
        done.set()
        sampler.join()
    assert resp.status_code == 200, resp.text
    assert resp.json()["bytes"] == size
    growth_mb = (peak[0] - baseline) / 1024
    print(f"RSS growth during a 64 MB upload: {growth_mb:.1f} MB")
    assert growth_mb < 40, f"RSS grew by {growth_mb:.1f} MB during a 64 MB upload"
    assert store_rows(app) == (1, 64)
    # the download streams too, and is the same bytes
    with app.http() as http, http.stream("GET", f"/v1/files/{resp.json()['id']}/content") as download:
        assert download.headers["content-length"] == str(size)
        got, want = hashlib.sha256(), hashlib.sha256()
        for chunk in download.iter_bytes():
            got.update(chunk)
        for _ in range(size // len(piece)):
            want.update(piece)
        assert got.digest() == want.digest()


def test_tenants_see_only_their_own_files(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, tmp_path: Path
) -> None:
    settings = stack.gateway_settings([model_entry("gpt-test", upstream)], state_dir=tmp_path / "gw")
    acme_key, globex_key = stack.create_key(tenant="acme"), stack.create_key(tenant="globex")
    with serve_app(settings) as app:
        acme = app.strict_client(api_key=acme_key)
        globex = app.strict_client(api_key=globex_key)
        mine = acme.files.create(file=("a.jsonl", b'{"a":1}\n'), purpose="batch")
        theirs = globex.files.create(file=("g.txt", b"globex"), purpose="user_data")
        assert [f.id for f in acme.files.list()] == [mine.id]
        assert [f.id for f in globex.files.list()] == [theirs.id]
        assert globex.files.list(after=mine.id).data == []  # a foreign cursor is an empty page
        for call in (globex.files.retrieve, globex.files.content, globex.files.delete):
            with pytest.raises(openai.NotFoundError) as err:
                call(mine.id)
            assert err.value.body == {
                "message": f"No such File object: {mine.id}",
                "type": "invalid_request_error",
                "param": "id",
                "code": None,
            }
        assert acme.files.content(mine.id).read() == b'{"a":1}\n'  # untouched
        with pytest.raises(openai.AuthenticationError):
            app.strict_client(api_key="sk-nope").files.list()
