"""secret-service: named, versioned provider credentials, envelope-encrypted at rest, over mTLS gRPC.

- :mod:`.crypto`: the master key and AES-256-GCM envelope encryption;
- :mod:`.store`: the SQL store (SQLite or PostgreSQL) with its audit trail;
- :mod:`.server`: the gRPC service, :class:`SecretService` and :func:`run`.
"""

from tail_service.secretsvc.crypto import (
    DecryptionError,
    MasterKey,
    MasterKeyError,
    MasterKeyMismatch,
    SecretCryptoError,
    load_master_key,
)
from tail_service.secretsvc.server import SERVICE_NAME, SecretService, SecretServicer, run
from tail_service.secretsvc.store import InvalidSecret, SecretMeta, SecretNotFound, SecretStore

__all__ = [
    "SERVICE_NAME",
    "DecryptionError",
    "InvalidSecret",
    "MasterKey",
    "MasterKeyError",
    "MasterKeyMismatch",
    "SecretCryptoError",
    "SecretMeta",
    "SecretNotFound",
    "SecretService",
    "SecretServicer",
    "SecretStore",
    "load_master_key",
    "run",
]
