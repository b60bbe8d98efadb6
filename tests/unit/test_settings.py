"""Config loading: YAML + env overrides, env references, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tail_service.settings import LOCAL_CHAT_MODEL, ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tail.yaml"
    p.write_text(text)
    return p


def test_defaults_serve_the_local_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAIL_CONFIG", raising=False)
    s = load_settings()
    names = [m.name for m in s.model_entries()]
    assert LOCAL_CHAT_MODEL in names
    assert s.server.port == 8080


def test_yaml_env_override_and_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UP_BASE", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("UP_KEY", "sk-secret-value-123456")
    monkeypatch.setenv("TAIL_SERVER__PORT", "9123")
    cfg = write(
        tmp_path,
        """
server: {port: 1000, max_body_bytes: 4096}
models:
  - name: m
    provider: openai
    base_url: ${UP_BASE}
    api_key_env: UP_KEY
  - name: m
    provider: openai
    base_url: ${MISSING_BASE:-http://127.0.0.1:10/v1}
""",
    )
    s = load_settings(cfg)
    assert s.server.port == 9123  # env beats file
    assert s.server.max_body_bytes == 4096
    assert [m.base_url for m in s.models] == ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"]
    assert s.credentials["UP_KEY"].get_secret_value() == "sk-secret-value-123456"
    assert "sk-secret-value" not in repr(s)
    assert "sk-secret-value" not in s.model_dump_json()


def test_cli_overrides_beat_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAIL_SERVER__PORT", "9123")
    s = load_settings(write(tmp_path, "log_level: debug\n"), server={"port": 7000})
    assert s.server.port == 7000
    assert s.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models:\n  - name: m\n    provider: nope\n    base_url: http://x/v1\n", "models.0.provider"),
        ("models:\n  - name: m\n    provider: openai\n    base_url: ftp://x\n", "models.0"),
        (
            "models:\n  - name: m\n    provider: openai\n    base_url: http://x\n    weight: 0\n",
            "models.0.weight",
        ),
        ("server: {port: 70000}\n", "server.port"),
        ("bogus_key: 1\n", "bogus_key"),
        ("models:\n  - name: m\n    provider: openai\n    base_url: ${NOPE_NOT_SET}\n", "models.0.base_url"),
        (
            "models:\n  - {name: m, provider: openai, base_url: 'http://x', api_key_env: NOPE_UNSET}\n",
            "models.0.api_key_env",
        ),
        ("- just\n- a list\n", "mapping"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert fragment in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")
