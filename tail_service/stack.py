"""The embedded stack behind ``tail-service up``: state directory, child services, supervision.

``up`` makes the state directory hold everything a laptop stack needs: a development CA
and certificates (``certs/``), the key-hashing pepper, the secrets master key (created by
secret-service in embedded mode), SQLite databases, and ``stack.yaml`` — the generated
config of the two gRPC services, which the admin commands (``keys``, ``secrets``) read to
find them. auth-service and secret-service run as child processes on loopback ports with
mutual TLS, and redis-server on a unix socket; a supervisor thread restarts a child that
crashes (with backoff) and stops them all when the parent stops. On Linux the children
also get SIGTERM if the parent dies abruptly (``PR_SET_PDEATHSIG``).

One ``up`` at a time per state directory: :func:`prepare_state` takes an exclusive
``flock`` on ``up.lock`` before touching anything, and the lock lives as long as the
returned layout (the life of ``up``). A second ``up`` on a live state directory exits
with a message naming the directory and the holder's pid, and changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from tail_service.certs import init_dev_pki
from tail_service.redis_embedded import EmbeddedRedis, terminate
from tail_service.rpc.tls import tls_from_dir

log = logging.getLogger("tail_service.stack")

STACK_FILE = "stack.yaml"
CERTS_DIR = "certs"
LOCK_FILE = "up.lock"


class StateDirBusy(SystemExit):
    """Another ``up`` holds the state directory.

    A :class:`SystemExit` (status 1, the message on stderr) so that the command exits
    with this message rather than a traceback.
    """


class StateLock:
    """An exclusive ``flock`` on ``up.lock`` in a state directory, held until :meth:`release`
    (or until the process exits: the kernel drops it with the file descriptor)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            who = f" (pid {holder})" if holder else ""
            raise StateDirBusy(
                f"tail-service: the state directory {state_dir} is in use by another "
                f"`tail-service up`{who}; stop it first, or give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the kernel unlocks anyway
            self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class StackLayout:
    """Where the embedded stack keeps its files, and the ports its services use."""

    state_dir: Path
    auth_port: int
    secrets_port: int
    #: held for as long as this layout lives: no second ``up`` on the directory meanwhile
    lock: StateLock | None = field(default=None, compare=False, repr=False)

    @property
    def certs(self) -> Path:
        return self.state_dir / CERTS_DIR

    @property
    def stack_file(self) -> Path:
        return self.state_dir / STACK_FILE

    @property
    def auth_address(self) -> str:
        return f"127.0.0.1:{self.auth_port}"

    @property
    def secrets_address(self) -> str:
        return f"127.0.0.1:{self.secrets_port}"

    def tls(self, identity: str) -> dict[str, str]:
        files = tls_from_dir(self.certs, identity)
        return {
            "ca_file": str(files.ca_file),
            "cert_file": str(files.cert_file),
            "key_file": str(files.key_file),
        }

    def services_config(self) -> dict[str, Any]:
        """The generated config of the two gRPC services (and where the admin finds them)."""
        return {
            "auth_service": {
                "listen": self.auth_address,
                "database_url": "sqlite:///auth.db",
                "tls": self.tls("auth"),
                "pepper_file": "auth.pepper",
            },
            "secret_service": {
                "listen": self.secrets_address,
                "database_url": "sqlite:///secrets.db",
                "tls": self.tls("secrets"),
                "master_key_file": "secrets.master-key",
                "embedded": True,
            },
        }

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"

    def http_overrides(self) -> dict[str, Any]:
        """Settings overrides that point the HTTP service at the child services."""
        return {
            "auth": {"mode": "grpc", "address": self.auth_address, "tls": self.tls("tail")},
            "secrets": {"address": self.secrets_address, "tls": self.tls("tail")},
            "redis": {"url": f"unix://{self.redis_dir / 'redis.sock'}"},
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def prepare_state(state_dir: Path) -> StackLayout:
    """Lock the state directory, then create it, the certificates, pepper and ``stack.yaml``
    (ports reused).

    Raises :class:`StateDirBusy`, having changed nothing, when another ``up`` holds it.
    """
    from tail_service.authsvc.keys import ensure_pepper_file

    state_dir.mkdir(parents=True, exist_ok=True)
    lock = StateLock(state_dir)
    with contextlib.suppress(OSError):
        state_dir.chmod(0o700)
    init_dev_pki(state_dir / CERTS_DIR)
    ensure_pepper_file(state_dir / "auth.pepper")
    old = read_stack_file(state_dir)
    wanted = [_port_of(old, "auth_service"), _port_of(old, "secret_service")]
    ports = [p if p and _port_is_free(p) else _free_port() for p in wanted]
    layout = StackLayout(state_dir.resolve(), ports[0], ports[1], lock)
    layout.stack_file.write_text(yaml.safe_dump(layout.services_config(), sort_keys=False))
    return layout


def _port_of(config: dict[str, Any] | None, section: str) -> int | None:
    try:
        return int(str((config or {})[section]["listen"]).rsplit(":", 1)[1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def read_stack_file(state_dir: Path) -> dict[str, Any] | None:
    """The generated services config of a stack started by ``up`` in ``state_dir``, if any."""
    path = state_dir / STACK_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


#: Run by ``python -I -S -c`` in a new child, before the real command: ties the child's life
#: to ours with ``PR_SET_PDEATHSIG`` (it survives the exec), gives up if we are already gone,
#: then execs the command in place (same pid).
_DEATHSIG_SHIM = (
    "import ctypes,os,sys\n"
    f"ctypes.CDLL(None,use_errno=True).prctl(1,{int(signal.SIGTERM)})\n"  # PR_SET_PDEATHSIG
    "if os.getppid()!=int(sys.argv[1]):sys.exit(0)\n"  # the parent died before the prctl
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


def die_with_parent(args: list[str]) -> list[str]:
    """``args`` prefixed so the child gets SIGTERM when this process dies (Linux), or as is.

    Not a ``preexec_fn``: that runs Python in the child between fork and exec, where it can
    deadlock on a lock another of our threads held at the fork (Python's documentation says
    as much; a restarted worker was left hanging there, never exec'd). The shim runs after a
    clean exec in a single-threaded interpreter, for about 15 ms per start."""
    if not sys.platform.startswith("linux"):
        return args
    return [sys.executable, "-I", "-S", "-c", _DEATHSIG_SHIM, str(os.getpid()), *args]


class Supervised(Protocol):
    """What the supervisor needs of a child: its process, a way to (re)start it, readiness."""

    name: str
    restarts: int
    ready: threading.Event
    #: seconds before the first restart after a crash (doubling, up to 10 s, while it crashes)
    first_backoff: float

    @property
    def proc(self) -> subprocess.Popen[bytes] | None: ...

    def start(self) -> None: ...

    def stop(self, grace: float = 10.0) -> None: ...


class Child:
    """One supervised child service: started, forwarded to our stderr, restarted on crash."""

    first_backoff = 0.5

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], *, ready_marker: str = " listening on "
    ) -> None:
        self.name = name
        self._args = args
        self._env = env
        #: the log text that says the child is ready
        self._marker = ready_marker
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.ready = threading.Event()

    def start(self) -> None:
        self.ready.clear()
        self.proc = subprocess.Popen(
            die_with_parent(self._args), stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self._env
        )
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True, name=f"{self.name}-log").start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            if self._marker in line:
                self.ready.set()
            sys.stderr.write(f"[{self.name}] {line}")
            sys.stderr.flush()

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            terminate(self.proc, grace)


class RedisChild:
    """The embedded redis-server as a supervised child: :meth:`start` returns once it answers.

    A restarted server reloads its append-only file: the ledger's stream, the budgets
    spent and the rate-limit windows come back as they were (up to the last second).
    """

    name = "redis-server"
    first_backoff = 0.1  # every moment without it is a moment without limits (fail-open)

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server
        self.restarts = 0
        self.ready = threading.Event()

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.server.proc

    def start(self) -> None:
        self.ready.clear()
        self.server.start(prefix=die_with_parent)
        self.ready.set()

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace)


class Supervisor:
    """Keeps the children running until :meth:`stop`; restarts a crashed one with backoff.

    A crash is noticed within ``poll`` seconds (the dead child is reaped, never left a
    zombie); the restart follows after the child's ``first_backoff``, doubled (up to
    10 s) while restarts keep failing to come up.
    """

    def __init__(self, children: list[Supervised], *, poll: float = 0.1) -> None:
        self.children = children
        self._poll = poll
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="tail-supervisor")

    def start(self, ready_timeout: float = 60.0, *, wait: bool = True) -> None:
        """Start every child; with ``wait``, return once each is ready (else raise)."""
        try:
            for child in self.children:
                child.start()
        except BaseException:
            self.stop()
            raise
        if not wait:
            self._thread.start()
            return
        deadline = time.monotonic() + ready_timeout
        for child in self.children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"{child.name} did not start (see its log above)")
        self._thread.start()

    def _watch(self) -> None:
        backoff: dict[str, float] = {c.name: c.first_backoff for c in self.children}
        while not self._stopping.wait(self._poll):
            for child in self.children:
                proc = child.proc
                if proc is not None and proc.poll() is None:
                    continue
                if self._stopping.is_set():
                    return
                code = proc.returncode if proc is not None else "no process"
                log.error("%s exited with %s; restarting in %.1fs", child.name, code, backoff[child.name])
                if self._stopping.wait(backoff[child.name]):
                    return
                child.restarts += 1
                backoff[child.name] = min(backoff[child.name] * 2, 10.0)
                try:
                    child.start()
                except Exception as exc:  # tried again on the next round, after the backoff
                    log.error("%s did not restart: %s", child.name, exc)
                    continue
                if child.ready.wait(30):
                    backoff[child.name] = child.first_backoff
                    log.warning("%s restarted (restart %d)", child.name, child.restarts)

    def stop(self) -> None:
        self._stopping.set()
        for child in self.children:
            child.stop()


def start_redis(layout: StackLayout) -> Supervisor:
    """The bundled redis-server on a private unix socket in the state directory, supervised:
    restarted within a fraction of a second if it dies. ``stop()`` stops it."""
    supervisor = Supervisor([RedisChild(EmbeddedRedis(layout.redis_dir))])
    supervisor.start()
    return supervisor


def start_children(layout: StackLayout, *, log_level: str) -> Supervisor:
    """Start auth-service and secret-service for ``layout`` and wait until both listen."""
    env = {**os.environ, "TAIL_LOG_LEVEL": log_level}
    for var in ("TAIL_CONFIG", "TAIL_SETTINGS_JSON"):
        env.pop(var, None)
    base = [sys.executable, "-m", "tail_service"]
    common = ["--config", str(layout.stack_file), "--state-dir", str(layout.state_dir)]
    supervisor = Supervisor(
        [
            Child("auth-service", [*base, "auth-service", *common], env),
            Child("secret-service", [*base, "secret-service", *common], env),
        ]
    )
    supervisor.start()
    return supervisor


def start_worker(settings_json: str, *, log_level: str) -> Supervisor:
    """Start the embedded batch worker (``tail-service worker``) with the HTTP service's
    settings, supervised. The HTTP service does not wait for it: until it is ready, batches
    wait (``/health`` counts the live workers)."""
    env = {**os.environ, "TAIL_LOG_LEVEL": log_level, "TAIL_SETTINGS_JSON": settings_json}
    env.pop("TAIL_CONFIG", None)
    args = [sys.executable, "-m", "tail_service", "worker"]
    child = Child("batch-worker", args, env, ready_marker="batch worker ready")
    supervisor = Supervisor([child])
    supervisor.start(wait=False)
    return supervisor
