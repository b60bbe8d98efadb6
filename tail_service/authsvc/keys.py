"""API keys and the pepper that hashes them.

A key is ``sk-tail-`` followed by the unpadded base64url encoding of 32 random bytes
(43 characters, 256 bits). The plaintext is shown to the admin once, at creation, and
never stored: the database holds ``HMAC-SHA256(pepper, key)`` in hex, which is useless
without the pepper (a stolen database cannot be brute-forced offline), plus a display
prefix (``sk-tail-`` and the first 4 random characters) so admins can tell keys apart.

The pepper is one secret shared by every replica of auth-service: it comes from a file
or an environment variable and must carry at least 256 bits. Nothing here puts a key or
the pepper into a log line, an exception message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

from tail_service.settings import AuthServiceSettings

#: every key starts with this
KEY_PREFIX = "sk-tail-"
#: random bytes per key
KEY_BYTES = 32
#: characters of the random part: unpadded base64url of KEY_BYTES
KEY_BODY_CHARS = 43
#: total length of a well-formed key
KEY_LENGTH = len(KEY_PREFIX) + KEY_BODY_CHARS
#: random characters kept in the display prefix
DISPLAY_CHARS = 4
#: least pepper material, bytes
MIN_PEPPER_BYTES = 32

log = logging.getLogger("tail_service.authsvc.keys")

_BODY_RE = re.compile(rf"[A-Za-z0-9_-]{{{KEY_BODY_CHARS}}}")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


class PepperError(ValueError):
    """The pepper is missing or too weak; the message says where it was looked for, never its value."""


class Pepper:
    """The HMAC key for API-key hashes: immutable, and its ``repr`` never shows the bytes."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if len(value) < MIN_PEPPER_BYTES:
            raise PepperError(f"the pepper must hold at least {MIN_PEPPER_BYTES} bytes")
        self._value = bytes(value)

    def hash_key(self, api_key: str) -> str:
        """``HMAC-SHA256(pepper, api_key)`` as 64 lowercase hex characters."""
        return hmac.new(self._value, api_key.encode("utf-8"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "Pepper(***)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Pepper cannot be pickled")


def generate_key() -> str:
    """A new API key: ``sk-tail-`` + 43 base64url characters from ``secrets.token_bytes(32)``."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).rstrip(b"=").decode("ascii")
    return KEY_PREFIX + body


def looks_like_key(candidate: str) -> bool:
    """Cheap syntactic check (prefix, length, alphabet) done before any hashing or lookup."""
    return (
        len(candidate) == KEY_LENGTH
        and candidate.startswith(KEY_PREFIX)
        and _BODY_RE.fullmatch(candidate, len(KEY_PREFIX)) is not None
    )


def display_prefix(api_key: str) -> str:
    """What admins see of a key: ``sk-tail-`` and its first 4 random characters."""
    return api_key[: len(KEY_PREFIX) + DISPLAY_CHARS]


def decode_pepper(raw: bytes) -> bytes:
    """Pepper bytes from a file's or variable's contents.

    Accepted, tried in this order on the whitespace-stripped text: hex (≥ 64 digits),
    standard or URL-safe base64 decoding to ≥ 32 bytes, or any other text/bytes of
    ≥ 32 characters used as is. Raises :class:`PepperError` if shorter.
    """
    data = raw.strip()
    if len(data) >= 2 * MIN_PEPPER_BYTES and len(data) % 2 == 0 and _HEX_RE.fullmatch(data.decode("latin-1")):
        return bytes.fromhex(data.decode("ascii"))
    for alphabet in (data, data.translate(_URLSAFE_TO_STD)):
        try:
            decoded = base64.b64decode(alphabet + b"=" * (-len(alphabet) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(decoded) >= MIN_PEPPER_BYTES:
            return decoded
    if len(data) >= MIN_PEPPER_BYTES:
        return data
    raise PepperError(
        f"the pepper is too short: need at least {MIN_PEPPER_BYTES} bytes "
        f"(e.g. {MIN_PEPPER_BYTES} random bytes as base64 or hex)"
    )


def load_pepper(settings: AuthServiceSettings, base_dir: Path) -> Pepper:
    """The pepper from ``settings.pepper_file`` (relative to ``base_dir``) or ``$settings.pepper_env``.

    The file wins when configured (and must then exist). Raises :class:`PepperError`
    naming the file or variable, never the value, if missing, unreadable or too short.
    """
    if settings.pepper_file is not None:
        path = settings.pepper_file if settings.pepper_file.is_absolute() else base_dir / settings.pepper_file
        try:
            raw = path.read_bytes()
            if path.stat().st_mode & 0o077:
                log.warning("the pepper file %s is readable by group or others; chmod 600 it", path)
        except OSError as exc:
            raise PepperError(f"cannot read the pepper file {path}: {exc.strerror}") from None
        where = f"the pepper file {path}"
    else:
        value = os.environ.get(settings.pepper_env)
        if not value:
            raise PepperError(
                f"no pepper configured: set auth_service.pepper_file or the environment variable "
                f"{settings.pepper_env} (at least {MIN_PEPPER_BYTES} random bytes, base64 or hex)"
            )
        raw = value.encode("utf-8")
        where = f"the environment variable {settings.pepper_env}"
    try:
        return Pepper(decode_pepper(raw))
    except PepperError as exc:
        raise PepperError(f"{where}: {exc}") from None


def ensure_pepper_file(path: Path) -> bool:
    """Create ``path`` holding 32 random bytes as base64 (mode 0600) unless it exists.

    Returns ``True`` if it created the file. The file appears complete or not at all
    (written aside, then hard-linked into place), and two processes racing here end up
    sharing one pepper.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    data = base64.b64encode(secrets.token_bytes(MIN_PEPPER_BYTES)) + b"\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic and exclusive: never a half-written pepper, never two
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True
