"""The embedded stack behind ``tail-service up``: state directory, child services, supervision.

``up`` makes the state directory hold everything a laptop stack needs: a development CA
and certificates (``certs/``), the key-hashing pepper, the secrets master key (created by
secret-service in embedded mode), SQLite databases, and ``stack.yaml`` — the generated
config of the two gRPC services, which the admin commands (``keys``, ``secrets``) read to
find them. auth-service and secret-service run as child processes on loopback ports with
mutual TLS; a supervisor thread restarts a child that crashes (with backoff) and stops
both when the parent stops. On Linux the children also get SIGTERM if the parent dies
abruptly (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tail_service.certs import init_dev_pki
from tail_service.redis_embedded import EmbeddedRedis, terminate
from tail_service.rpc.tls import tls_from_dir

log = logging.getLogger("tail_service.stack")

STACK_FILE = "stack.yaml"
CERTS_DIR = "certs"


@dataclass(frozen=True)
class StackLayout:
    """Where the embedded stack keeps its files, and the ports its services use."""

    state_dir: Path
    auth_port: int
    secrets_port: int

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
    """Create the state directory, certificates, pepper and ``stack.yaml`` (ports reused)."""
    from tail_service.authsvc.keys import ensure_pepper_file

    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        state_dir.chmod(0o700)
    init_dev_pki(state_dir / CERTS_DIR)
    ensure_pepper_file(state_dir / "auth.pepper")
    old = read_stack_file(state_dir)
    wanted = [_port_of(old, "auth_service"), _port_of(old, "secret_service")]
    ports = [p if p and _port_is_free(p) else _free_port() for p in wanted]
    layout = StackLayout(state_dir.resolve(), ports[0], ports[1])
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


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """One supervised child service: started, forwarded to our stderr, restarted on crash."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self._args = args
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.ready = threading.Event()

    def start(self) -> None:
        self.ready.clear()
        self.proc = subprocess.Popen(
            self._args,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self._env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True, name=f"{self.name}-log").start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            if " listening on " in line:
                self.ready.set()
            sys.stderr.write(f"[{self.name}] {line}")
            sys.stderr.flush()

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            terminate(self.proc, grace)


class Supervisor:
    """Keeps the children running until :meth:`stop`; restarts a crashed one with backoff."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="tail-supervisor")

    def start(self, ready_timeout: float = 60.0) -> None:
        for child in self.children:
            child.start()
        deadline = time.monotonic() + ready_timeout
        for child in self.children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"{child.name} did not start (see its log above)")
        self._thread.start()

    def _watch(self) -> None:
        backoff: dict[str, float] = {c.name: 0.5 for c in self.children}
        while not self._stopping.wait(0.2):
            for child in self.children:
                proc = child.proc
                if proc is None or proc.poll() is None:
                    continue
                if self._stopping.is_set():
                    return
                log.error(
                    "%s exited with %s; restarting in %.1fs", child.name, proc.returncode, backoff[child.name]
                )
                if self._stopping.wait(backoff[child.name]):
                    return
                child.restarts += 1
                child.start()
                backoff[child.name] = min(backoff[child.name] * 2, 10.0)
                if child.ready.wait(30):
                    backoff[child.name] = 0.5

    def stop(self) -> None:
        self._stopping.set()
        for child in self.children:
            child.stop()


def start_redis(layout: StackLayout) -> EmbeddedRedis:
    """The bundled redis-server on a private unix socket in the state directory."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return EmbeddedRedis(layout.redis_dir).start(preexec=preexec)


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
