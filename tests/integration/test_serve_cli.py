"""`tail-service serve` as a real process: workers, port 0, config errors, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.processes import EXE, run_tail


@contextmanager
def serve(args: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    with run_tail(["serve", *args], {**os.environ, **env}) as running:
        yield running.proc, running.url, running.log


def worker_pids(pid: int) -> list[int]:
    """Child processes of ``pid`` that are uvicorn workers (not multiprocessing's tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(x) for x in path.read_text().split()] if path.exists() else []
    return [k for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]


def write_config(tmp_path: Path, upstream: FakeOpenAI) -> Path:
    cfg = tmp_path / "tail.yaml"
    cfg.write_text(
        f"""
models:
  - name: gpt-test
    provider: openai
    base_url: {upstream.base_url}
    api_key_env: SERVE_TEST_KEY
log_level: info
auth:
  mode: disabled
ratelimit:
  enabled: false
"""
    )
    return cfg


@pytest.mark.slow
def test_serve_with_two_workers(tmp_path: Path, upstream: FakeOpenAI) -> None:
    cfg = write_config(tmp_path, upstream)
    with serve(["--config", str(cfg), "--port", "0", "--workers", "2"], {"SERVE_TEST_KEY": "sk-up-a"}) as (
        proc,
        url,
        _,
    ):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=3)
        answers = {
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": f"n{i}"}])
            .choices[0]
            .message.content
            for i in range(20)
        }
        assert answers == {f"[a] n{i}" for i in range(20)}
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        # every upstream call carried the key resolved in the workers from the environment
        assert all(r.headers.get("authorization") == "Bearer sk-up-a" for r in upstream.requests)
    assert proc.returncode in (0, -signal.SIGTERM)
    assert all(not Path(f"/proc/{w}").exists() for w in workers)


def test_bad_config_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  port: 99999\nmodels:\n  - {name: m, provider: openai, base_url: nope}\n")
    res = subprocess.run([EXE, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "server.port" in res.stderr
    assert "models.0" in res.stderr
    assert "Traceback" not in res.stderr


def test_check_config_lists_models(tmp_path: Path, upstream: FakeOpenAI) -> None:
    cfg = write_config(tmp_path, upstream)
    res = subprocess.run(
        [EXE, "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SERVE_TEST_KEY": "k"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("gpt-test\topenai\t" + upstream.base_url)
