"""Envelope encryption of secret values: AES-256-GCM data keys wrapped by one master key.

Every secret version gets a fresh random 256-bit *data key*. The value is encrypted with
it (AES-256-GCM, 12-byte random nonce), and the data key is itself encrypted ("wrapped")
with the *master key* (AES-256-GCM, its own nonce). Both encryptions carry associated data
binding the secret's name and version, so a stored row moved to another name or version
fails authentication instead of decrypting. Each row also records the master key's id, so
opening it under a different master key fails with a clear :class:`MasterKeyMismatch`
rather than an opaque tag failure.

The master key is 32 bytes, kept as base64 in a file or an environment variable
(:func:`load_master_key`). Its bytes never leave :class:`MasterKey`: no ``repr``, ``str``,
error message or log line shows them, and the object refuses to be pickled.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tail_service.certs import write_private
from tail_service.settings import SecretServiceSettings

log = logging.getLogger("tail_service.secretsvc.crypto")

#: bytes in a master key and in a data key (AES-256)
KEY_BYTES = 32
#: bytes in an AES-GCM nonce
NONCE_BYTES = 12
#: where embedded mode creates the master key when ``master_key_file`` is not set (under base_dir)
DEFAULT_MASTER_KEY_FILE = Path("secrets-master.key")

_KEY_ID_CONTEXT = b"tail.secrets.v1 master key id\x00"
_VALUE_AAD = b"tail.secrets.v1 value\x00"
_WRAP_AAD = b"tail.secrets.v1 data key\x00"


class SecretCryptoError(Exception):
    """A secret could not be encrypted or decrypted. Messages never contain key material or values."""


class MasterKeyError(SecretCryptoError):
    """The master key is missing, malformed, or not the one the stored secrets were sealed with."""


class MasterKeyMismatch(MasterKeyError):
    """A stored row was sealed under a different master key (its recorded key id differs)."""


class DecryptionError(SecretCryptoError):
    """A stored row failed authentication: it was altered, truncated, or moved to another name/version."""


@dataclass(frozen=True, slots=True)
class SealedValue:
    """One encrypted secret version as stored: nothing here reveals the value or either key.

    ``ciphertext`` is the value encrypted under the data key (with the 16-byte GCM tag);
    ``wrapped_key`` is the data key encrypted under the master key (48 bytes);
    ``nonce``/``wrap_nonce`` are their 12-byte nonces; ``master_key_id`` names the master key.
    """

    ciphertext: bytes
    nonce: bytes
    wrapped_key: bytes
    wrap_nonce: bytes
    master_key_id: str

    def __repr__(self) -> str:
        return f"SealedValue(master_key_id={self.master_key_id!r}, ciphertext_bytes={len(self.ciphertext)})"


def _aad(prefix: bytes, name: str, version: int) -> bytes:
    # Names are validated to a NUL-free alphabet, so "prefix NUL name NUL version" is unambiguous.
    return prefix + name.encode("utf-8") + b"\x00" + version.to_bytes(8, "big", signed=True)


class MasterKey:
    """The 256-bit key-encryption key. Immutable and thread-safe; its bytes are never shown.

    ``key_id`` (8 hex digits of a domain-separated SHA-256 of the key) identifies it in
    stored rows and messages; it reveals nothing useful about the key.
    """

    __slots__ = ("_aead", "_id", "_key")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise MasterKeyError(f"a master key must be exactly {KEY_BYTES} bytes")
        self._key = key
        self._id = hashlib.sha256(_KEY_ID_CONTEXT + key).hexdigest()[:8]
        self._aead = AESGCM(key)

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random master key (from the OS CSPRNG)."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_base64(cls, text: str | bytes, *, source: str) -> MasterKey:
        """Parse base64 of exactly 32 bytes (surrounding whitespace ignored).

        ``source`` (e.g. ``"file /x/master.key"``) names where it came from in the error;
        the text itself is never echoed.
        """
        raw = text.strip() if isinstance(text, bytes) else text.strip().encode("ascii", "replace")
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise MasterKeyError(
                f"the master key from {source} is not valid base64 (expected base64 of {KEY_BYTES} bytes)"
            ) from None
        if len(key) != KEY_BYTES:
            raise MasterKeyError(
                f"the master key from {source} decodes to {len(key)} bytes; expected exactly {KEY_BYTES}"
            )
        return cls(key)

    @property
    def key_id(self) -> str:
        """8 lowercase hex digits identifying this key; safe to log and store."""
        return self._id

    def seal(self, name: str, version: int, value: bytes) -> SealedValue:
        """Encrypt ``value`` as version ``version`` of secret ``name`` under a fresh data key."""
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(data_key).encrypt(nonce, value, _aad(_VALUE_AAD, name, version))
        wrap_nonce = os.urandom(NONCE_BYTES)
        wrapped = self._aead.encrypt(wrap_nonce, data_key, _aad(_WRAP_AAD, name, version))
        return SealedValue(ciphertext, nonce, wrapped, wrap_nonce, self._id)

    def open(self, name: str, version: int, sealed: SealedValue) -> bytes:
        """The plaintext of ``sealed``, which must be version ``version`` of ``name``.

        Raises :class:`MasterKeyMismatch` if it was sealed under another master key and
        :class:`DecryptionError` if any part was altered or belongs to another name/version.
        """
        if sealed.master_key_id != self._id:
            raise MasterKeyMismatch(
                f"master key mismatch: secret {name!r} version {version} was encrypted under master "
                f"key id {sealed.master_key_id}, but this service's master key id is {self._id}"
            )
        try:
            data_key = self._aead.decrypt(
                sealed.wrap_nonce, sealed.wrapped_key, _aad(_WRAP_AAD, name, version)
            )
            return AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, _aad(_VALUE_AAD, name, version))
        except (InvalidTag, ValueError):
            raise DecryptionError(
                f"secret {name!r} version {version} failed authentication: "
                "the stored row was altered or belongs to another secret or version"
            ) from None

    def _base64(self) -> bytes:
        return base64.b64encode(self._key)

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self._id!r})"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a MasterKey cannot be pickled or copied")


def _read_key_file(path: Path) -> MasterKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise MasterKeyError(f"cannot read the master key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        log.warning("the master key file %s is readable by group or others (chmod 600 it)", path)
    return MasterKey.from_base64(data, source=f"file {path}")


def load_master_key(
    settings: SecretServiceSettings, *, base_dir: Path, environ: Mapping[str, str] | None = None
) -> MasterKey:
    """The service's master key, from the first source that has one.

    1. ``settings.master_key_file`` (relative paths under ``base_dir``; in embedded mode it
       defaults to ``secrets-master.key``), if the file exists;
    2. the environment variable ``settings.master_key_env`` (``environ``, default
       ``os.environ``), if set and non-empty;
    3. in embedded mode only: a new random key written (base64, mode 0600) to that file,
       then read back (later starts find it in step 1).

    Otherwise raises :class:`MasterKeyError` naming what to configure. A malformed key
    (not base64 of exactly 32 bytes) is always an error, never silently replaced.
    """
    env = os.environ if environ is None else environ
    path = base_dir / settings.master_key_file if settings.master_key_file is not None else None
    if path is None and settings.embedded:
        path = base_dir / DEFAULT_MASTER_KEY_FILE
    if path is not None and path.exists():
        return _read_key_file(path)
    from_env = env.get(settings.master_key_env, "")
    if from_env.strip():
        return MasterKey.from_base64(from_env, source=f"${settings.master_key_env}")
    if settings.embedded and path is not None:
        write_private(path, MasterKey.generate()._base64() + b"\n")
        log.info("embedded mode: created a new secrets master key file %s", path)
        return _read_key_file(path)
    where = f"the file {path} does not exist and " if path is not None else ""
    raise MasterKeyError(
        f"no secrets master key: {where}${settings.master_key_env} is not set. Configure "
        f"secret_service.master_key_file or set ${settings.master_key_env} to base64 of "
        f"{KEY_BYTES} random bytes (e.g. `head -c {KEY_BYTES} /dev/urandom | base64`)"
    )
