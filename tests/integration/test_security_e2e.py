"""End to end: openai SDK -> gateway -> auth-service / secret-service (real gRPC, real mTLS).

The two services run in this process on loopback ports with certificates from the dev
PKI; the gateway runs under uvicorn in a thread and talks to them as the `tail`
identity. Admin calls use the `admin` certificate, as the CLI does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tail_service.proto import auth_pb2, secrets_pb2
from tail_service.settings import TLSFiles
from tests.conftest import RunningApp, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack


def model(upstream: FakeOpenAI, **kw: Any) -> dict[str, Any]:
    return {"name": "gpt-test", "provider": "openai", "base_url": upstream.base_url, "max_retries": 0, **kw}


@pytest.fixture
def env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2E_UPSTREAM_KEY", "sk-up-a")


def chat(app: RunningApp, key: str | None) -> str:
    client = openai.OpenAI(base_url=app.v1, api_key=key or "unused", max_retries=0)
    kwargs: dict[str, Any] = {}
    if key is None:
        kwargs["extra_headers"] = {"Authorization": openai.omit}
    r = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], **kwargs
    )
    return r.choices[0].message.content or ""


def wait_until(pred: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_key_lifecycle_through_http(stack: Stack, upstream: FakeOpenAI, env_key: None) -> None:
    with serve_app(stack.gateway_settings([model(upstream, api_key_env="E2E_UPSTREAM_KEY")])) as app:
        key = stack.create_key()
        assert chat(app, key) == "[a] hi"
        with pytest.raises(openai.AuthenticationError) as missing:
            chat(app, None)
        assert missing.value.code == "invalid_api_key"
        assert "didn't provide an API key" in missing.value.message
        with pytest.raises(openai.AuthenticationError) as wrong:
            chat(app, "sk-tail-" + "x" * 43)
        assert wrong.value.code == "invalid_api_key"
        # revoke; the running gateway refuses the key within about a second
        stack.admin_auth().RevokeKey(auth_pb2.RevokeKeyRequest(api_key=key), timeout=5)

        def refused() -> bool:
            try:
                chat(app, key)
            except openai.AuthenticationError:
                return True
            return False

        took = wait_until(refused, 3.0)
        assert took < 1.5


def test_model_allow_list_is_403(stack: Stack, upstream: FakeOpenAI, env_key: None) -> None:
    models = [model(upstream, api_key_env="E2E_UPSTREAM_KEY"), {**model(upstream), "name": "other"}]
    with serve_app(stack.gateway_settings(models)) as app:
        key = stack.create_key(allowed_models=["other"])
        with pytest.raises(openai.PermissionDeniedError):
            chat(app, key)
        client = openai.OpenAI(base_url=app.v1, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["other"]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-test")


def test_auth_service_down_cached_keys_work_uncached_get_503(
    stack: Stack, upstream: FakeOpenAI, env_key: None
) -> None:
    with serve_app(stack.gateway_settings([model(upstream, api_key_env="E2E_UPSTREAM_KEY")])) as app:
        cached, uncached = stack.create_key(), stack.create_key()
        assert chat(app, cached) == "[a] hi"
        stack.stop_auth()
        for _ in range(5):
            assert chat(app, cached) == "[a] hi"  # served from the verdict cache
        with pytest.raises(openai.InternalServerError) as info:
            chat(app, uncached)
        assert info.value.status_code == 503
        assert info.value.code == "auth_unavailable"
        stack.start_auth()  # same port, same database
        wait_until(lambda: _ok(app, uncached), 10.0)
        assert chat(app, cached) == "[a] hi"


def _ok(app: RunningApp, key: str) -> bool:
    try:
        return chat(app, key) == "[a] hi"
    except openai.APIError:
        return False


def test_credential_from_secret_service_missing_then_set_then_rotated(
    stack: Stack, upstream: FakeOpenAI
) -> None:
    upstream.api_key = "sk-provider-v1"
    with serve_app(stack.gateway_settings([model(upstream, api_key_secret="provider-key")])) as app:
        key = stack.create_key()
        with pytest.raises(openai.InternalServerError) as info:
            chat(app, key)
        assert info.value.status_code == 503
        assert info.value.code == "credential_unavailable"
        assert "provider-key" in str(info.value.message)
        admin = stack.admin_secrets()
        admin.PutSecret(secrets_pb2.PutSecretRequest(name="provider-key", value=b"sk-provider-v1"), timeout=5)
        wait_until(lambda: _ok(app, key), 5.0)  # picked up with no restart
        upstream.api_key = "sk-provider-v2"
        admin.RotateSecret(
            secrets_pb2.RotateSecretRequest(name="provider-key", value=b"sk-provider-v2"), timeout=5
        )
        wait_until(lambda: _ok(app, key), 5.0)
        sent = [r.headers.get("authorization") for r in upstream.requests]
        assert "Bearer sk-provider-v2" in sent


def test_gateway_with_the_wrong_identity_is_refused(
    stack: Stack, upstream: FakeOpenAI, env_key: None, rogue_tls: Callable[[str], TLSFiles]
) -> None:
    settings = stack.gateway_settings([model(upstream, api_key_env="E2E_UPSTREAM_KEY")])
    rogue = settings.model_copy(update={"auth": settings.auth.model_copy(update={"tls": rogue_tls("tail")})})
    key = stack.create_key()
    with serve_app(rogue) as app, pytest.raises(openai.InternalServerError) as info:
        chat(app, key)
    assert info.value.code == "auth_unavailable"  # never fail-open
