"""The access log's direct writer formats a line exactly as the logging path does.

:class:`tail_service.logging.AccessLog` bypasses log records when our own stderr handler
is the only destination; the lines must not differ from the handler's but for the time.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from tail_service.logging import AccessLog, log_handler, request_id_var

FIELDS = {"method": "POST", "route": "/v1/chat/completions", "status": 200, "ms": 1.25, "key_id": "key_a"}


def _only_handler(buf: io.StringIO, *, as_json: bool) -> list[logging.Handler]:
    root = logging.getLogger()
    saved = list(root.handlers)
    handler = log_handler(buf, json=as_json)
    handler._tail = True  # type: ignore[attr-defined]  # as configure_logging marks it
    root.handlers = [handler]
    return saved


@pytest.mark.parametrize("as_json", [False, True])
async def test_the_direct_line_is_the_handlers_line(as_json: bool) -> None:
    buf = io.StringIO()
    logger = logging.getLogger("tail_service.access")
    root = logging.getLogger()
    level = root.level
    saved = _only_handler(buf, as_json=as_json)
    root.setLevel(logging.INFO)
    try:
        access = AccessLog(logger)
        access.write("req_1", FIELDS)  # direct: written at the end of this turn of the loop
        access.write("req_2", FIELDS)
        assert buf.getvalue() == ""
        await asyncio.sleep(0)
        direct = buf.getvalue().splitlines()
        assert len(direct) == 2
        logger.addHandler(logging.NullHandler())  # now through a log record and the handler
        token = request_id_var.set("req_2")  # where the handler reads the request id
        try:
            access.write("req_2", FIELDS)
        finally:
            request_id_var.reset(token)
            logger.handlers.clear()
        via_logging = buf.getvalue().splitlines()[2]
    finally:
        root.handlers = saved
        root.setLevel(level)
    if as_json:
        a, b = json.loads(direct[1]), json.loads(via_logging)
        assert abs(a.pop("ts") - b.pop("ts")) < 5
        assert a == b
    else:
        assert direct[1][24:] == via_logging[24:]  # after "YYYY-MM-DD HH:MM:SS,mmm "
        assert direct[1][23] == " " and direct[1][19] == ","
