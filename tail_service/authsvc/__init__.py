"""auth-service: API keys (hashed with a pepper, never stored) and per-key tenant policy over gRPC.

:mod:`.keys` makes and hashes keys and loads the pepper, :mod:`.store` keeps them in
SQL (SQLite or PostgreSQL) as the records of :mod:`.records`, :mod:`.servicer` answers the
RPCs of ``tail.auth.v1.AuthService``, :mod:`.events` carries key events to its watchers
and :mod:`.server` runs a replica.
"""

from tail_service.authsvc.keys import Pepper, PepperError, ensure_pepper_file, load_pepper
from tail_service.authsvc.records import KeyInfo, VerifiedKey
from tail_service.authsvc.server import SERVICE_NAME, AuthService, run
from tail_service.authsvc.store import KeyStore

__all__ = [
    "SERVICE_NAME",
    "AuthService",
    "KeyInfo",
    "KeyStore",
    "Pepper",
    "PepperError",
    "VerifiedKey",
    "ensure_pepper_file",
    "load_pepper",
    "run",
]
