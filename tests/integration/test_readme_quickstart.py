"""The README's quick start, run as written against a real `tail-service up`.

The blocks are the ones marked ``<!-- quickstart:NAME -->`` in README.md: ``up``, ``key``
(create a key), ``python`` (saved as quickstart.py), ``run`` (install the SDK, run the
file), ``curl`` and ``batch`` (a batch through the CLI and the embedded worker). They run
in one clean shell, as a person would paste them: ``HOME``
is a fresh temp directory (so the default state directory is new), ``PATH`` has only the
system directories, and nothing else is inherited. The only substitutions:

* ``bash scripts/up.sh`` runs as ``<venv>/bin/tail-service up --port 0``: the install
  half of up.sh made this venv already, and port 0 avoids clashing with anything;
* ``http://127.0.0.1:8080`` becomes the URL that `up` printed;
* ``.venv/bin/`` becomes this interpreter's bin directory (the repository's ./.venv when
  run by scripts/test.sh, so usually no change at all).

The banner's "create an API key" command is run exactly as printed, in the same clean shell.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README_URL = "http://127.0.0.1:8080"
MARKED_BLOCK = re.compile(r"<!-- quickstart:(\w+) -->\s*```(\w+)\n(.*?)^```", re.S | re.M)


def quickstart_blocks() -> dict[str, str]:
    """``{name: code}`` of the README's marked quick-start blocks."""
    return {name: code for name, _lang, code in MARKED_BLOCK.findall((ROOT / "README.md").read_text())}


def _substitute(code: str, url: str) -> str:
    return code.replace(README_URL, url).replace(".venv/bin/", f"{BIN}/")


def _clean_env(home: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_readme_quickstart_runs_as_written(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = quickstart_blocks()
    assert set(blocks) == {"up", "key", "python", "run", "curl", "batch"}, sorted(blocks)
    up_lines = [ln for ln in blocks["up"].splitlines() if ln.strip() and not ln.startswith("#")]
    assert up_lines == ["bash scripts/up.sh"]
    assert "tail_service.cli" in BIN.joinpath("tail-service").read_text()  # the console script is here

    # A short HOME: the stack's redis socket lives under it, and a unix socket path must
    # fit in 107 bytes (pytest's tmp_path plus ~/.local/state/tail-service/... does not).
    home = Path(tempfile.mkdtemp(prefix="tq-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    work = tmp_path / "work"
    work.mkdir()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("TAIL_", "XDG_"))}
    server_env["HOME"] = str(home)
    proc = subprocess.Popen(
        [str(BIN / "tail-service"), "up", "--port", "0"],
        cwd=ROOT,
        env=server_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(log)
        threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True).start()

        # The banner's command works as printed, with nothing on PATH.
        hint = next(ln for ln in log if "create an API key:" in ln).split("create an API key:", 1)[1].strip()
        assert hint.startswith("/"), hint
        shell = {"cwd": work, "env": _clean_env(home), "capture_output": True, "text": True}
        made = subprocess.run(["/bin/bash", "-c", hint], timeout=60, **shell)
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip().splitlines()[-1].startswith("sk-tail-")

        # The README's blocks, pasted into one shell.
        (work / "quickstart.py").write_text(_substitute(blocks["python"], url))
        script = "set -euo pipefail\n" + "\n".join(
            _substitute(blocks[name], url) for name in ("key", "run", "curl", "batch")
        )
        res = subprocess.run(["/bin/bash", "-c", script], timeout=360, **shell)
        assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:], "".join(log[-30:]))
    finally:
        proc.terminate()
        proc.wait(30)

    lines = res.stdout.splitlines()  # pip's lines, then quickstart.py's, then curl's
    paris = next(i for i, ln in enumerate(lines) if "Paris" in ln)  # the first answer
    dims = lines.index("384")  # the embedding's length, printed last by quickstart.py
    assert any(ln.strip() for ln in lines[paris + 1 : dims]), res.stdout  # the streamed answer
    said = next(ln for ln in lines if ln.startswith("responses: "))  # client.responses.create
    assert said[len("responses: ") :].strip(), res.stdout
    # curl's response (it ends without a newline: the batch block's output follows on its line)
    answer, _ = json.JSONDecoder().raw_decode("\n".join(lines[dims + 1 :]))
    assert lines[-1].split() == ["3", "requests.output.jsonl"], lines[-5:]  # the batch block's
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
