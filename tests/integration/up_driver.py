"""Driver for test_up_embedded: start `tail-service up` and talk to it with the openai SDK.

Run as a script (possibly inside a network namespace with only loopback). Prints one
JSON document with what it observed; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai


def child_pids(pid: int) -> dict[int, str]:
    """Children of ``pid`` (started by any of its threads) with their command lines."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = task.read_text().split()
        except OSError:
            continue
        for child in kids:
            try:
                out[int(child)] = Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
            except OSError:
                continue
    return out


def main() -> None:
    state_dir = sys.argv[1]
    exe = os.path.join(os.path.dirname(sys.executable), "tail-service")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TAIL_CONFIG": ""}
    env.pop("TAIL_CONFIG")
    started = time.monotonic()
    proc = subprocess.Popen(
        [exe, "up", "--port", "0", "--state-dir", state_dir],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out: dict[str, object] = {}
    drain = threading.Thread()
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "no listening line"
        # Keep draining the log so the server never blocks on a full pipe.
        log_lines: list[str] = []
        drain = threading.Thread(target=lambda: log_lines.extend(proc.stderr or ()), daemon=True)
        drain.start()
        created = subprocess.run(
            [exe, "keys", "create", "--name", "driver", "--state-dir", state_dir],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
        out["key_prefix_ok"] = key.startswith("sk-tail-") and len(key) >= 8 + 43
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
        try:
            openai.OpenAI(base_url=url + "/v1", api_key="sk-tail-wrong", max_retries=0).models.list()
            out["wrong_key"] = "accepted"
        except openai.AuthenticationError as exc:
            out["wrong_key"] = exc.code
        for _ in range(200):
            try:
                ids = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                time.sleep(0.05)
        out["startup_s"] = time.monotonic() - started
        out["models"] = ids
        r = client.chat.completions.create(
            model="local/smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        out["chat"] = r.choices[0].message.content
        out["chat_usage"] = r.usage.model_dump() if r.usage else None
        pieces = []
        roles = []
        usage = None
        for chunk in client.chat.completions.create(
            model="local/smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage:
                usage = chunk.usage.model_dump()
            for c in chunk.choices:
                if c.delta.role:
                    roles.append(c.delta.role)
                pieces.append(c.delta.content or "")
        out["stream_text"] = "".join(pieces)
        out["stream_roles"] = roles
        out["stream_usage"] = usage
        e = client.embeddings.create(model="local/all-minilm-l6-v2", input=["hello world", "a cat"])
        out["embed_dims"] = [len(d.embedding) for d in e.data]
        out["embed_usage"] = e.usage.model_dump()
        # A batch through the CLI, run by the embedded worker (a supervised child).
        batch_file = Path(state_dir) / "texts.jsonl"
        batch_file.write_text(
            "".join(
                json.dumps(
                    {
                        "custom_id": f"t{i}",
                        "method": "POST",
                        "url": "/v1/embeddings",
                        "body": {"model": "local/all-minilm-l6-v2", "input": f"text {i}"},
                    }
                )
                + "\n"
                for i in range(5)
            )
        )
        cli_args = ["--endpoint", "/v1/embeddings", "--wait", "--interval", "0.2", "--base-url", url + "/v1"]
        submitted = subprocess.run(
            [exe, "batch", "submit", str(batch_file), *cli_args, "--api-key", key],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        out["batch_exit"] = submitted.returncode
        out["batch_stdout"] = submitted.stdout + submitted.stderr[-2000:]
        output_file = Path(state_dir) / "texts.output.jsonl"
        out["batch_lines"] = len(output_file.read_text().splitlines()) if output_file.exists() else 0
        listed = subprocess.run(
            [exe, "keys", "list", "--state-dir", state_dir],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        out["list_has_no_key"] = key not in listed.stdout and "driver" in listed.stdout
        subprocess.run(
            [exe, "keys", "revoke", key, "--state-dir", state_dir], env=env, timeout=60, check=True
        )
        t0 = time.monotonic()
        out["revoked_after_s"] = None
        while time.monotonic() - t0 < 5:
            try:
                client.models.list()
            except openai.AuthenticationError:
                out["revoked_after_s"] = time.monotonic() - t0
                break
            time.sleep(0.05)
        out["health"] = httpx.get(url + "/health", timeout=10).json()  # no key needed
        # A crashed child is restarted; keys keep working meanwhile from the verdict cache.
        second = (
            subprocess.run(
                [exe, "keys", "create", "--name", "second", "--state-dir", state_dir],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        client2 = openai.OpenAI(base_url=url + "/v1", api_key=second, max_retries=0, timeout=60)
        client2.models.list()
        children = child_pids(proc.pid)
        auth_pid = next(pid for pid, cmd in children.items() if "auth-service" in cmd)
        os.kill(auth_pid, signal.SIGKILL)
        # the worker ran undisturbed so far (it once died with the thread that started it)
        out["worker_exits_before_kill"] = sum("batch-worker exited" in line for line in log_lines)
        out["worker_log"] = [line for line in log_lines if "batch-worker" in line or "worker" in line][-40:]
        worker_pid = next(pid for pid, cmd in children.items() if cmd.endswith("tail_service worker "))
        os.kill(worker_pid, signal.SIGKILL)
        out["cached_key_while_auth_down"] = bool(client2.models.list().data)
        t0 = time.monotonic()
        out["auth_restarted_after_s"] = None
        while time.monotonic() - t0 < 20:
            now = child_pids(proc.pid)
            if any("auth-service" in cmd and pid != auth_pid for pid, cmd in now.items()):
                done = subprocess.run(
                    [exe, "keys", "list", "--state-dir", state_dir], capture_output=True, env=env, timeout=60
                )
                if done.returncode == 0:
                    out["auth_restarted_after_s"] = time.monotonic() - t0
                    break
            time.sleep(0.2)
        t0 = time.monotonic()
        out["worker_restarted"] = False
        while time.monotonic() - t0 < 20 and not out["worker_restarted"]:
            out["worker_restarted"] = any(
                cmd.endswith("tail_service worker ") and pid != worker_pid
                for pid, cmd in child_pids(proc.pid).items()
            )
            time.sleep(0.2)
        final = child_pids(proc.pid)
        out["children"] = sorted(final)
        out["children_cmds"] = [cmd[-120:] for cmd in final.values()]
    finally:
        proc.terminate()
        try:
            out["exit_code"] = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit_code"] = "killed"
        if drain.ident is not None:
            drain.join(5)
        out["log_tail"] = log_lines[-40:]
        out["worker_log_end"] = [line for line in log_lines if "batch-worker" in line][-30:]
        time.sleep(0.5)
        out["children_left"] = [pid for pid in out.get("children", []) if os.path.exists(f"/proc/{pid}")]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
