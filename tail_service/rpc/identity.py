"""Who is calling: the peer certificate's identities, and per-RPC authorization by them."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import grpc


def peer_identities(context: grpc.ServicerContext) -> frozenset[str]:
    """Common name and DNS subject-alternative names of the client certificate.

    gRPC puts them in the auth context only after the TLS handshake verified the chain
    against our CA, so they can be trusted.
    """
    auth: Mapping[str, Any] = context.auth_context()
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            names.add(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    return frozenset(names)


def require_identity(context: grpc.ServicerContext, allowed: Collection[str], action: str) -> str:
    """The caller's matching identity, or abort the call with PERMISSION_DENIED."""
    ids = peer_identities(context)
    for name in ids:
        if name in allowed:
            return name
    context.abort(grpc.StatusCode.PERMISSION_DENIED, f"identity not allowed to {action}")
    raise AssertionError("unreachable")  # abort raises
