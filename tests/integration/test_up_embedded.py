"""`tail-service up` with no config answers from the local models, with no network at all.

The driver runs inside a fresh network namespace (`unshare -n`: loopback only) when the
machine allows it, so any attempt to download anything would fail the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("up_driver.py")


def _netns_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, check=False)
    return [unshare, "-n"] if probe.returncode == 0 else []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_answers_offline_from_local_models(tmp_path: Path) -> None:
    prefix = _netns_prefix()
    # Inside the namespace loopback starts down; bring it up, then run the driver.
    cmd = [
        *prefix,
        "sh",
        "-c",
        f'ip link set lo up 2>/dev/null; exec "{sys.executable}" "{DRIVER}" "{tmp_path}"',
    ]
    if not prefix:
        cmd = [sys.executable, str(DRIVER), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=280, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # shown in full when an assertion below fails (pytest cuts long assertion messages)
    for name in ("children_cmds", "worker_log_end", "log_tail"):
        print(f"--- {name}:", *out.get(name, []), sep="\n")
    assert out["key_prefix_ok"] is True
    assert out["wrong_key"] == "invalid_api_key"
    assert out["models"] == ["local/smollm2-135m-instruct", "local/all-minilm-l6-v2"]
    assert "Paris" in out["chat"]
    usage = out["chat_usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert out["stream_roles"] == ["assistant"]
    assert out["stream_text"].strip()
    assert out["stream_usage"]["completion_tokens"] > 0
    assert out["embed_dims"] == [384, 384]
    assert out["embed_usage"]["prompt_tokens"] > 0
    assert out["batch_exit"] == 0, out["batch_stdout"]
    assert out["batch_lines"] == 5
    assert out["worker_exits_before_kill"] == 0, out["worker_log"]
    assert out["worker_restarted"] is True, out["log_tail"]
    assert out["list_has_no_key"] is True
    assert out["revoked_after_s"] is not None and out["revoked_after_s"] < 1.5
    deps = out["health"]["dependencies"]
    assert deps["auth_service"]["status"] == "ok"
    assert deps["auth_service"]["revocation_watch"] == "connected"
    assert out["cached_key_while_auth_down"] is True
    assert out["auth_restarted_after_s"] is not None, out["log_tail"]
    assert len(out["children"]) == 4  # auth-service, secret-service, redis-server, batch worker
    assert deps["redis"]["status"] == "ok"
    assert out["children_left"] == []  # the children stop with the parent
    # SIGTERM: a graceful shutdown of the HTTP service and both children, exit status 0.
    assert out["exit_code"] == 0
    assert any("Application shutdown complete" in line for line in out["log_tail"])
