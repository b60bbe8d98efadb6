"""The admin side of the CLI: talk to auth-service and secret-service over mTLS.

The commands find a stack started by ``tail-service up`` through its state directory
(``stack.yaml`` names the services' addresses, ``certs/`` holds the admin certificate).
For a deployed stack, ``--auth-address``, ``--secrets-address`` and ``--tls-dir`` (a
directory with ``ca.pem``, ``admin.pem`` and ``admin.key``) say the same explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tail_service.proto import auth_pb2, auth_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from tail_service.rpc.tls import channel_credentials, tls_from_dir
from tail_service.stack import CERTS_DIR, read_stack_file

TIMEOUT = 10.0


class AdminError(Exception):
    """A failed admin call, with a message for a person (no traceback, no secret).

    ``exit_code`` is 2 when the service refused the arguments (INVALID_ARGUMENT), as for
    a usage error, else 1.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Target:
    """Where a service is, and the admin's TLS files."""

    address: str
    tls_dir: Path


def resolve(service: str, state_dir: Path, address: str | None, tls_dir: Path | None) -> Target:
    """The target of ``service`` (``auth_service`` or ``secret_service``)."""
    if address is None:
        stack = read_stack_file(state_dir)
        try:
            address = str(stack[service]["listen"]) if stack else None
        except (KeyError, TypeError):
            address = None
        if address is None:
            raise AdminError(
                f"no running stack found in {state_dir} (start one with `tail-service up`, "
                f"or pass --{'auth' if service == 'auth_service' else 'secrets'}-address and --tls-dir)"
            )
    return Target(address, tls_dir or state_dir / CERTS_DIR)


def _channel(target: Target) -> grpc.Channel:
    files = tls_from_dir(target.tls_dir, "admin")
    try:
        creds = channel_credentials(files)
    except OSError as exc:
        raise AdminError(f"cannot read the admin certificate: {exc}") from None
    return grpc.secure_channel(target.address, creds)


def _call(fn: object, request: object) -> object:
    try:
        return fn(request, timeout=TIMEOUT)  # type: ignore[operator]
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        detail = exc.details()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            raise AdminError(f"service unavailable: {detail}") from None
        exit_code = 2 if code == grpc.StatusCode.INVALID_ARGUMENT else 1
        raise AdminError(f"{code.name.lower()}: {detail}", exit_code=exit_code) from None


class KeysAdmin:
    """``tail-service keys ...`` and ``tail-service tenants ...`` (both auth-service)."""

    def __init__(self, target: Target) -> None:
        self._channel = _channel(target)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def create(
        self,
        *,
        name: str,
        tenant: str,
        models: list[str],
        rpm: int,
        tpm: int,
        max_concurrency: int,
        expires_at: int,
        response_cache: bool = False,
        mcp_servers: list[str] | None = None,
        budget_usd: float = 0.0,
        budget_period: str = "",
    ) -> auth_pb2.CreateKeyResponse:
        req = auth_pb2.CreateKeyRequest(
            name=name,
            tenant=tenant,
            allowed_models=models,
            limits=auth_pb2.Limits(rpm=rpm, tpm=tpm, max_concurrency=max_concurrency),
            expires_at=expires_at,
            response_cache=response_cache,
            mcp_servers=mcp_servers or [],
            budget=auth_pb2.Budget(usd=budget_usd, period=budget_period),
        )
        resp: auth_pb2.CreateKeyResponse = _call(self._stub.CreateKey, req)  # type: ignore[assignment]
        return resp

    def list(self, *, tenant: str, include_revoked: bool) -> list[auth_pb2.KeyInfo]:
        req = auth_pb2.ListKeysRequest(tenant=tenant, include_revoked=include_revoked)
        resp: auth_pb2.ListKeysResponse = _call(self._stub.ListKeys, req)  # type: ignore[assignment]
        return list(resp.keys)

    def revoke(self, id_or_key: str) -> auth_pb2.KeyInfo:
        if id_or_key.startswith("sk-"):
            req = auth_pb2.RevokeKeyRequest(api_key=id_or_key)
        else:
            req = auth_pb2.RevokeKeyRequest(id=id_or_key)
        resp: auth_pb2.RevokeKeyResponse = _call(self._stub.RevokeKey, req)  # type: ignore[assignment]
        return resp.key

    def update(self, req: auth_pb2.UpdateKeyRequest) -> auth_pb2.KeyInfo:
        resp: auth_pb2.UpdateKeyResponse = _call(self._stub.UpdateKey, req)  # type: ignore[assignment]
        return resp.key

    def tenant(self, tenant: str) -> auth_pb2.TenantInfo:
        req = auth_pb2.GetTenantRequest(tenant=tenant)
        resp: auth_pb2.GetTenantResponse = _call(self._stub.GetTenant, req)  # type: ignore[assignment]
        return resp.tenant

    def set_tenant_budget(self, tenant: str, usd: float, period: str) -> auth_pb2.TenantInfo:
        req = auth_pb2.SetTenantBudgetRequest(tenant=tenant, budget=auth_pb2.Budget(usd=usd, period=period))
        resp: auth_pb2.SetTenantBudgetResponse = _call(self._stub.SetTenantBudget, req)  # type: ignore[assignment]
        return resp.tenant

    def set_tenant_mcp_servers(self, tenant: str, servers: Sequence[str]) -> auth_pb2.TenantInfo:
        req = auth_pb2.SetTenantMcpServersRequest(tenant=tenant, mcp_servers=servers)
        resp: auth_pb2.SetTenantMcpServersResponse = _call(self._stub.SetTenantMcpServers, req)  # type: ignore[assignment]
        return resp.tenant


class SecretsAdmin:
    """``tail-service secrets ...``."""

    def __init__(self, target: Target) -> None:
        self._channel = _channel(target)
        self._stub = secrets_pb2_grpc.SecretServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def set(self, name: str, value: bytes) -> secrets_pb2.SecretMeta:
        req = secrets_pb2.PutSecretRequest(name=name, value=value)
        resp: secrets_pb2.PutSecretResponse = _call(self._stub.PutSecret, req)  # type: ignore[assignment]
        return resp.meta

    def rotate(self, name: str, value: bytes) -> secrets_pb2.SecretMeta:
        req = secrets_pb2.RotateSecretRequest(name=name, value=value)
        resp: secrets_pb2.RotateSecretResponse = _call(self._stub.RotateSecret, req)  # type: ignore[assignment]
        return resp.meta

    def list(self) -> list[str]:
        resp: secrets_pb2.ListSecretsResponse = _call(  # type: ignore[assignment]
            self._stub.ListSecrets, secrets_pb2.ListSecretsRequest()
        )
        return list(resp.names)

    def delete(self, name: str) -> bool:
        req = secrets_pb2.DeleteSecretRequest(name=name)
        resp: secrets_pb2.DeleteSecretResponse = _call(self._stub.DeleteSecret, req)  # type: ignore[assignment]
        return resp.deleted
