"""This test process's own TCP connections, read from ``/proc`` (Linux)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def own_connections(ports: set[int]) -> dict[int, str]:
    """This process's established TCP sockets whose remote port is in ``ports``: inode ->
    the kernel's timer field (``tr``: ``02`` is the keepalive timer, ``00`` none)."""
    mine = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                mine.add(int(target[8:-1]))
    found: dict[int, str] = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                remote_port, state, inode = int(cols[2].rsplit(":", 1)[1], 16), cols[3], int(cols[9])
                if state == "01" and remote_port in ports and inode in mine:
                    found[inode] = cols[5].split(":")[0]
    return found
