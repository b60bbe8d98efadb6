"""Driver for test_without_local_extra: the gateway in a Python where some packages are absent.

    python -m tests.integration.blocked_imports_driver UPSTREAM_BASE_URL MODULE [MODULE ...]

Before anything else it installs a ``sys.meta_path`` finder that refuses the named
top-level modules (as if their distributions were not installed: ``import`` and
``importlib.util.find_spec`` both fail), then serves ``create_app`` on a real socket with
an OpenAI-compatible deployment on the given fake upstream plus the two embedded local
models, calls both with the ``openai`` SDK and prints one JSON document of what it saw.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any


class Refuse(importlib.abc.MetaPathFinder):
    """Refuses ``blocked`` top-level modules and their submodules."""

    def __init__(self, blocked: set[str]) -> None:
        self.blocked = blocked

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        if fullname.split(".", 1)[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)


def main() -> None:
    upstream, blocked = sys.argv[1], set(sys.argv[2:])
    sys.meta_path.insert(0, Refuse(blocked))

    import openai

    from tail_service.logging import configure_logging
    from tail_service.settings import load_settings
    from tests.conftest import UPSTREAM_KEY_ENV, serve_app

    models: list[dict[str, Any]] = [
        {"name": "gpt-4o-mini", "provider": "openai", "base_url": upstream, "api_key_env": UPSTREAM_KEY_ENV},
        *(
            {"name": f"local/{m}", "provider": "local", "upstream_model": m}
            for m in ("smollm2-135m-instruct", "all-minilm-l6-v2")
        ),
    ]
    settings = load_settings(None, models=models, auth={"mode": "disabled"}, ratelimit={"enabled": False})
    configure_logging("info", json=False)
    out: dict[str, Any] = {}
    with serve_app(settings) as app:
        client = app.client(timeout=120)
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        out["remote_chat"] = r.choices[0].message.content
        for name, call in {
            "local_chat": lambda: client.chat.completions.create(
                model="local/smollm2-135m-instruct", messages=[{"role": "user", "content": "hi"}]
            ),
            "local_stream": lambda: list(
                client.chat.completions.create(
                    model="local/smollm2-135m-instruct",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4,
                    stream=True,
                )
            ),
            "local_embed": lambda: client.embeddings.create(model="local/all-minilm-l6-v2", input="hi"),
        }.items():
            try:
                call()
                out[name] = {"status": 200}
            except openai.APIStatusError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                out[name] = {"status": exc.status_code, "code": exc.code, "message": body.get("message")}
        with app.http() as http:
            out["health"] = http.get("/health").json()
    out["imported"] = sorted(m for m in sys.modules if m.split(".", 1)[0] in blocked)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
