"""Envelope encryption of secrets: round trips, tamper and swap detection, master key loading and hygiene."""

from __future__ import annotations

import base64
import copy
import dataclasses
import pickle
import stat
from pathlib import Path

import pytest

from tail_service.secretsvc.crypto import (
    DecryptionError,
    MasterKey,
    MasterKeyError,
    MasterKeyMismatch,
    SealedValue,
    load_master_key,
)
from tail_service.settings import SecretServiceSettings

VALUE = b"sk-live-0123456789abcdefDEADBEEF"
ENV = "TAIL_TEST_SECRETS_MASTER_KEY"


def _flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _settings(**kw: object) -> SecretServiceSettings:
    return SecretServiceSettings(master_key_env=ENV, **kw)  # type: ignore[arg-type]


def test_round_trip_and_fresh_keys_per_version() -> None:
    key = MasterKey.generate()
    a = key.seal("openai/prod", 1, VALUE)
    b = key.seal("openai/prod", 1, VALUE)
    assert key.open("openai/prod", 1, a) == VALUE == key.open("openai/prod", 1, b)
    assert a.ciphertext != b.ciphertext and a.wrapped_key != b.wrapped_key and a.nonce != b.nonce
    assert len(a.nonce) == len(a.wrap_nonce) == 12
    assert VALUE not in a.ciphertext + a.wrapped_key
    assert a.master_key_id == key.key_id and len(key.key_id) == 8
    assert key.open("x", 1, key.seal("x", 1, b"\x00")) == b"\x00"


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "wrapped_key", "wrap_nonce"])
def test_any_flipped_bit_fails(field: str) -> None:
    key = MasterKey.generate()
    sealed = key.seal("n", 3, VALUE)
    for at in (0, -1):
        original: bytes = getattr(sealed, field)
        bad = dataclasses.replace(sealed, **{field: _flip(original, at % len(original))})
        with pytest.raises(DecryptionError, match="failed authentication"):
            key.open("n", 3, bad)
    with pytest.raises(DecryptionError):
        key.open("n", 3, dataclasses.replace(sealed, **{field: b""}))


def test_rows_cannot_move_between_names_or_versions() -> None:
    key = MasterKey.generate()
    a1, a2, b1 = key.seal("a", 1, b"value-a1"), key.seal("a", 2, b"value-a2"), key.seal("b", 1, b"value-b1")
    # a whole row opened under another name or version
    for name, version, row in [("b", 1, a1), ("a", 2, a1), ("a", 1, a2), ("a", 1, b1)]:
        with pytest.raises(DecryptionError):
            key.open(name, version, row)
    # a row's wrapped key (or its value half) spliced from another row
    spliced_key = dataclasses.replace(a1, wrapped_key=b1.wrapped_key, wrap_nonce=b1.wrap_nonce)
    spliced_value = dataclasses.replace(a1, ciphertext=a2.ciphertext, nonce=a2.nonce)
    for row in (spliced_key, spliced_value):
        with pytest.raises(DecryptionError):
            key.open("a", 1, row)


def test_wrong_master_key_is_a_clear_mismatch() -> None:
    sealed = MasterKey.generate().seal("s", 1, VALUE)
    other = MasterKey.generate()
    with pytest.raises(MasterKeyMismatch, match="master key mismatch") as info:
        other.open("s", 1, sealed)
    assert sealed.master_key_id in str(info.value) and other.key_id in str(info.value)
    # a row that lies about its key id still fails authentication
    with pytest.raises(DecryptionError):
        other.open("s", 1, dataclasses.replace(sealed, master_key_id=other.key_id))


def test_no_key_material_in_repr_str_errors_or_pickles() -> None:
    raw = bytes(range(32))
    key = MasterKey(raw)
    b64 = base64.b64encode(raw).decode()
    shown = [repr(key), str(key), f"{key}", repr([key]), repr(key.seal("n", 1, VALUE))]
    for text in shown:
        for leak in (b64, raw.hex(), repr(raw), b64[:12]):
            assert leak not in text
        assert VALUE.decode() not in text
    assert key.key_id in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.copy(key)
    assert "ciphertext_bytes" in repr(key.seal("n", 1, VALUE))


@pytest.mark.parametrize(
    "text",
    ["not base64 at all!", base64.b64encode(b"x" * 31).decode(), base64.b64encode(b"x" * 33).decode(), ""],
)
def test_malformed_key_text_is_rejected_without_echo(text: str) -> None:
    with pytest.raises(MasterKeyError, match=r"master key from \$X") as info:
        MasterKey.from_base64(text, source="$X")
    if text:
        assert text not in str(info.value)
    with pytest.raises(MasterKeyError):
        MasterKey(b"short")


def test_load_from_file_env_and_precedence(tmp_path: Path) -> None:
    file_key, env_key = MasterKey.generate(), MasterKey.generate()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "m.key").write_bytes(file_key._base64() + b"\n")
    env = {ENV: env_key._base64().decode()}
    got = load_master_key(_settings(master_key_file=Path("keys/m.key")), base_dir=tmp_path, environ=env)
    assert got.key_id == file_key.key_id  # the configured file (relative to base_dir) wins
    got = load_master_key(_settings(master_key_file=Path("keys/missing.key")), base_dir=tmp_path, environ=env)
    assert got.key_id == env_key.key_id
    assert load_master_key(_settings(), base_dir=tmp_path, environ=env).key_id == env_key.key_id


def test_bad_env_value_names_the_variable_not_the_value(tmp_path: Path) -> None:
    bad = base64.b64encode(b"k" * 16).decode()
    with pytest.raises(MasterKeyError) as info:
        load_master_key(_settings(embedded=True), base_dir=tmp_path, environ={ENV: bad})
    assert ENV in str(info.value) and bad not in str(info.value) and "16 bytes" in str(info.value)
    assert not list(tmp_path.iterdir())  # a malformed key is never silently replaced


def test_no_key_outside_embedded_mode_refuses(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="no secrets master key") as info:
        load_master_key(_settings(master_key_file=Path("m.key")), base_dir=tmp_path, environ={})
    assert ENV in str(info.value) and "m.key" in str(info.value)
    with pytest.raises(MasterKeyError):
        load_master_key(_settings(), base_dir=tmp_path, environ={ENV: "  "})
    assert not list(tmp_path.iterdir())


def test_embedded_mode_creates_a_private_key_file_once(tmp_path: Path) -> None:
    first = load_master_key(_settings(embedded=True), base_dir=tmp_path, environ={})
    path = tmp_path / "secrets-master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_bytes().strip(), validate=True)) == 32
    again = load_master_key(_settings(embedded=True), base_dir=tmp_path, environ={})
    assert again.key_id == first.key_id
    assert again.open("n", 1, first.seal("n", 1, VALUE)) == VALUE
    named = load_master_key(
        _settings(embedded=True, master_key_file=Path("k/m.key")), base_dir=tmp_path, environ={}
    )
    assert (tmp_path / "k" / "m.key").exists() and named.key_id != first.key_id


def test_group_readable_key_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.key"
    path.write_bytes(MasterKey.generate()._base64())
    path.chmod(0o644)
    load_master_key(_settings(master_key_file=path), base_dir=tmp_path, environ={})
    assert "readable by group or others" in caplog.text
    assert path.read_text() not in caplog.text


def test_sealed_value_is_plain_data() -> None:
    sealed = MasterKey.generate().seal("n", 1, VALUE)
    assert isinstance(sealed, SealedValue)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sealed.nonce = b"x" * 12  # type: ignore[misc]
