"""The dev PKI from `tail-service certs init`, and certificate rotation without restarts."""

from __future__ import annotations

import logging
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import openai
import pytest
from cryptography import x509

from tail_service.authsvc.keys import ensure_pepper_file
from tail_service.authsvc.server import AuthService
from tail_service.certs import init_dev_pki
from tail_service.proto import auth_pb2, auth_pb2_grpc, secrets_pb2
from tail_service.rpc.tls import channel_credentials, tls_from_dir
from tail_service.settings import AuthServiceSettings, TLSFiles
from tests.conftest import serve_app
from tests.fakes.openai_upstream import run_openai_upstream_in_thread
from tests.stack_fixtures import Stack

EXE = str(Path(sys.executable).with_name("tail-service"))


def test_certs_init_cli_makes_a_ca_and_four_identities(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    res = subprocess.run(
        [EXE, "certs", "init", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for identity in ("tail", "auth", "secrets", "admin"):
        cert = x509.load_pem_x509_certificate((out / f"{identity}.pem").read_bytes())
        assert cert.issuer == ca.subject
        cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        assert cn == identity
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert identity in sans.get_values_for_type(x509.DNSName)
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
        assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
        mode = stat.S_IMODE((out / f"{identity}.key").stat().st_mode)
        assert mode == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    # a second run keeps what exists
    before = (out / "admin.pem").read_bytes()
    subprocess.run([EXE, "certs", "init", "--out", str(out)], check=True, capture_output=True, timeout=60)
    assert (out / "admin.pem").read_bytes() == before


def _list_keys(port: int, tls: TLSFiles) -> None:
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(tls)) as ch:
        auth_pb2_grpc.AuthServiceStub(ch).ListKeys(auth_pb2.ListKeysRequest(), timeout=5)


def test_server_certificates_rotate_without_restart(tmp_path: Path, pki_dir: Path) -> None:
    # The server's TLS files live in their own directory, which we rewrite in place.
    live = tmp_path / "live"
    live.mkdir()
    for name in ("ca.pem", "auth.pem", "auth.key"):
        shutil.copy(pki_dir / name, live / name)
    ensure_pepper_file(tmp_path / "pepper")
    settings = AuthServiceSettings(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'auth.db'}",
        tls=tls_from_dir(live, "auth"),
        pepper_file=tmp_path / "pepper",
    )
    service = AuthService.build(settings, base_dir=tmp_path)
    port = service.start().port
    try:
        old_admin = tls_from_dir(pki_dir, "admin")
        _list_keys(port, old_admin)
        # Rotate to a whole new CA: the server's certificate and its trust anchor.
        new_pki = tmp_path / "new-pki"
        init_dev_pki(new_pki)
        for name in ("ca.pem", "auth.pem", "auth.key"):
            shutil.copy(new_pki / name, live / name)
        _list_keys(port, tls_from_dir(new_pki, "admin"))  # new handshakes get the new config
        with pytest.raises(grpc.RpcError) as info:
            _list_keys(port, old_admin)  # the old CA is no longer trusted, either way
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop(grace=0.2)


def test_gateway_logs_hold_no_key_or_secret(
    caplog: pytest.LogCaptureFixture, tls_for: Callable[[str], TLSFiles], tmp_path: Path
) -> None:
    """Debug logs of the whole path: gateway, auth-service and secret-service in one process."""
    caplog.set_level(logging.DEBUG)
    ensure_pepper_file(tmp_path / "pepper")
    st = Stack(tmp_path, tls_for, 0, 0)
    st.start_auth()
    st.start_secrets()
    try:
        with run_openai_upstream_in_thread("a", api_key="sk-provider-secret-value-123") as up:
            settings = st.gateway_settings(
                [{"name": "m", "provider": "openai", "base_url": up.base_url, "api_key_secret": "prov"}],
                log_level="debug",
            )
            st.admin_secrets().PutSecret(
                secrets_pb2.PutSecretRequest(name="prov", value=b"sk-provider-secret-value-123"), timeout=5
            )
            key = st.create_key()
            with serve_app(settings) as app:
                client = openai.OpenAI(base_url=app.v1, api_key=key, max_retries=0)
                for _ in range(50):
                    try:
                        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                        break
                    except openai.InternalServerError:
                        time.sleep(0.1)
                with pytest.raises(openai.AuthenticationError):
                    openai.OpenAI(base_url=app.v1, api_key=key + "x", max_retries=0).models.list()
    finally:
        if st.auth is not None:
            st.auth.stop(grace=0.2)
        if st.secrets is not None:
            st.secrets.stop(grace=0.2)
    text = caplog.text + "".join(str(vars(r)) for r in caplog.records)
    assert key[8:] not in text
    assert "sk-provider-secret-value-123" not in text
    assert "tail_service" in text  # the capture did see the services' debug logs
