"""`tail-service up` under faults (issue 8, faults 1 and 2): a killed redis-server comes
back and limits are enforced again within 2 s; a second `up` on a live state directory
refuses and changes nothing.

Each test starts the real `tail-service up` (port 0, loopback) and its real children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.integration.up_driver import child_pids
from tests.processes import EXE, run_tail

EMBED = "local/all-minilm-l6-v2"


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for var in ("TAIL_CONFIG", "TAIL_SETTINGS_JSON", "TAIL_STATE_DIR"):
        env.pop(var, None)
    return env


@dataclass
class Up:
    proc: subprocess.Popen[str]
    url: str
    state_dir: Path
    log: list[str] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EXE, *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
            check=False,
        )

    def child(self, name: str) -> int | None:
        return next((pid for pid, cmd in child_pids(self.proc.pid).items() if name in cmd), None)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    state = tmp_path / "state"
    with run_tail(["up", "--port", "0", "--state-dir", str(state)], _env()) as running:
        yield Up(running.proc, running.url, state, running.log)


def _embed(client: httpx.Client, key: str) -> httpx.Response:
    return client.post(
        "/v1/embeddings", json={"model": EMBED, "input": "hi"}, headers={"authorization": f"Bearer {key}"}
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_redis_is_restarted_and_limits_hold_again_within_2s(up: Up) -> None:
    created = up.cli("keys", "create", "--name", "rpm3", "--rpm", "3")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=up.url, timeout=30) as client:
        first = [_embed(client, key) for _ in range(4)]
        assert [r.status_code for r in first] == [200, 200, 200, 429]
        assert first[0].headers["x-ratelimit-limit-requests"] == "3"
        redis_pid = up.child("redis-server")
        assert redis_pid is not None

        os.kill(redis_pid, signal.SIGKILL)
        killed = time.monotonic()
        enforced_after = None
        statuses: list[int] = []
        while time.monotonic() - killed < 10:
            r = _embed(client, key)
            statuses.append(r.status_code)
            # admitted by Redis (headers) or refused by it: the limiter is back
            if r.status_code == 429 or "x-ratelimit-limit-requests" in r.headers:
                enforced_after = time.monotonic() - killed
                break
            time.sleep(0.02)
        assert enforced_after is not None, (statuses[-10:], up.log[-30:])
        # a fresh Redis holds a fresh window: at most three more, then 429s again
        more = [_embed(client, key).status_code for _ in range(4)]
        assert more.count(429) >= 1 and more[-1] == 429, more
        new_pid = up.child("redis-server")
        assert new_pid is not None and new_pid != redis_pid
        assert not Path(f"/proc/{redis_pid}").exists()  # reaped, not a zombie
        health = client.get("/health").json()["dependencies"]["redis"]
        assert health["status"] == "ok" and health["breaker"] == "closed", health
    print(f"limits enforced again {enforced_after:.2f}s after SIGKILL of redis-server")
    assert enforced_after < 2.0, statuses


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_second_up_on_a_live_state_dir_refuses_and_changes_nothing(up: Up) -> None:
    stack_file = up.state_dir / "stack.yaml"
    sock = up.state_dir / "redis" / "redis.sock"
    before_yaml, before_sock = stack_file.read_bytes(), sock.stat()
    port = up.url.rsplit(":", 1)[1]  # busy: the first one listens there

    second = subprocess.run(
        [EXE, "up", "--port", port, "--state-dir", str(up.state_dir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert second.returncode != 0
    assert str(up.state_dir) in second.stderr and f"pid {up.proc.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert stack_file.read_bytes() == before_yaml
    after_sock = sock.stat()
    assert (after_sock.st_ino, after_sock.st_mtime_ns) == (before_sock.st_ino, before_sock.st_mtime_ns)
    listed = up.cli("keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert httpx.get(up.url + "/health", timeout=10).json()["dependencies"]["redis"]["status"] == "ok"
