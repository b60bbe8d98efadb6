"""A whole security stack in one process, for end-to-end tests.

auth-service and secret-service run in-process on loopback ports with certificates from
the dev PKI (``tls_for``); :meth:`Stack.gateway_settings` points a gateway at them as the
``tail`` identity, and the ``admin_*`` stubs talk to them as ``admin``, as the CLI does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tail_service.authsvc.keys import ensure_pepper_file
from tail_service.authsvc.server import AuthService
from tail_service.proto import auth_pb2, auth_pb2_grpc, secrets_pb2_grpc
from tail_service.rpc.tls import channel_credentials
from tail_service.secretsvc.server import SecretService
from tail_service.settings import AuthServiceSettings, SecretServiceSettings, TLSFiles, load_settings


@dataclass
class Stack:
    tmp: Path
    tls_for: Callable[[str], TLSFiles]
    auth_port: int
    secrets_port: int
    auth: AuthService | None = None
    secrets: SecretService | None = None

    def start_auth(self) -> None:
        settings = AuthServiceSettings(
            listen=f"127.0.0.1:{self.auth_port}",
            database_url=f"sqlite:///{self.tmp / 'auth.db'}",
            tls=self.tls_for("auth"),
            pepper_file=self.tmp / "pepper",
            event_poll_interval=0.1,
        )
        self.auth = AuthService.build(settings, base_dir=self.tmp)
        # port 0 the first time (the kernel picks a free one), the same port on a restart
        self.auth_port = self.auth.start().port

    def stop_auth(self) -> None:
        assert self.auth is not None
        self.auth.stop(grace=0.5)
        self.auth = None

    def start_secrets(self) -> None:
        settings = SecretServiceSettings(
            listen=f"127.0.0.1:{self.secrets_port}",
            database_url=f"sqlite:///{self.tmp / 'secrets.db'}",
            tls=self.tls_for("secrets"),
            master_key_file=self.tmp / "master.key",
            embedded=True,
        )
        self.secrets = SecretService.build(settings, base_dir=self.tmp)
        self.secrets_port = self.secrets.start().port

    def admin_auth(self) -> Any:
        ch = grpc.secure_channel(f"127.0.0.1:{self.auth_port}", channel_credentials(self.tls_for("admin")))
        return auth_pb2_grpc.AuthServiceStub(ch)

    def admin_secrets(self) -> Any:
        ch = grpc.secure_channel(f"127.0.0.1:{self.secrets_port}", channel_credentials(self.tls_for("admin")))
        return secrets_pb2_grpc.SecretServiceStub(ch)

    def create_key(self, tenant: str = "acme", **kw: Any) -> str:
        resp = self.admin_auth().CreateKey(
            auth_pb2.CreateKeyRequest(name="t", tenant=tenant, **kw), timeout=5
        )
        key: str = resp.api_key
        return key

    def gateway_settings(self, models: list[dict[str, Any]], **kw: Any) -> Any:
        return load_settings(
            None,
            models=models,
            auth={
                "mode": "grpc",
                "address": f"127.0.0.1:{self.auth_port}",
                "tls": self.tls_for("tail").model_dump(),
                "timeout": 0.5,
                "retries": 1,
                "negative_ttl": 0.5,
            },
            secrets={
                "address": f"127.0.0.1:{self.secrets_port}",
                "tls": self.tls_for("tail").model_dump(),
                "refresh_interval": 0.3,
            },
            server={"request_timeout": 20, "sse_keepalive": 0},
            **{"ratelimit": {"enabled": False}, **kw},
        )


@pytest.fixture
def stack(tmp_path: Path, tls_for: Callable[[str], TLSFiles]) -> Iterator[Stack]:
    ensure_pepper_file(tmp_path / "pepper")
    st = Stack(tmp_path, tls_for, 0, 0)
    st.start_auth()
    st.start_secrets()
    try:
        yield st
    finally:
        if st.auth is not None:
            st.auth.stop(grace=0.2)
        if st.secrets is not None:
            st.secrets.stop(grace=0.2)
