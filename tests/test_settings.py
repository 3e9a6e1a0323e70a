from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import ConfigError, Settings
from gateway.provider.client import chat_url


def test_defaults_run_the_simulator() -> None:
    settings = Settings.from_env({})
    assert settings.upstream_url is None
    assert settings.connect_timeout == 10
    assert settings.first_token_timeout == 120
    assert settings.idle_timeout == 60
    assert settings.max_duration == 600
    assert settings.ping_interval == 15
    assert settings.log_level == "INFO"


def test_reads_every_variable() -> None:
    settings = Settings.from_env(
        {
            "GATEWAY_UPSTREAM_URL": "https://api.deepseek.com/v1/",
            "GATEWAY_UPSTREAM_API_KEY": "sk-test",
            "GATEWAY_MODEL": "deepseek-chat",
            "GATEWAY_CONNECT_TIMEOUT": "3",
            "GATEWAY_FIRST_TOKEN_TIMEOUT": "30",
            "GATEWAY_IDLE_TIMEOUT": "20.5",
            "GATEWAY_MAX_DURATION": "300",
            "GATEWAY_PING_INTERVAL": "0",
            "GATEWAY_SEND_TIMEOUT": "4",
            "GATEWAY_LOG_LEVEL": "debug",
        }
    )
    assert settings.upstream_url == "https://api.deepseek.com/v1"
    assert settings.upstream_api_key == "sk-test"
    assert settings.model == "deepseek-chat"
    assert (settings.connect_timeout, settings.first_token_timeout) == (3, 30)
    assert (settings.idle_timeout, settings.max_duration) == (20.5, 300)
    assert settings.ping_interval == 0
    assert settings.send_timeout == 4
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"GATEWAY_IDLE_TIMEOUT": "soon"}, "GATEWAY_IDLE_TIMEOUT"),
        ({"GATEWAY_IDLE_TIMEOUT": "-1"}, "GATEWAY_IDLE_TIMEOUT"),
        ({"GATEWAY_MAX_DURATION": "inf"}, "GATEWAY_MAX_DURATION"),
        ({"GATEWAY_CONNECT_TIMEOUT": "nan"}, "GATEWAY_CONNECT_TIMEOUT"),
        ({"GATEWAY_PING_INTERVAL": "-5"}, "GATEWAY_PING_INTERVAL"),
        ({"GATEWAY_LOG_LEVEL": "LOUD"}, "GATEWAY_LOG_LEVEL"),
        (
            {"GATEWAY_UPSTREAM_URL": "api.openai.com/v1", "GATEWAY_MODEL": "m"},
            "GATEWAY_UPSTREAM_URL",
        ),
        (
            {"GATEWAY_UPSTREAM_URL": "ftp://api.openai.com/v1", "GATEWAY_MODEL": "m"},
            "GATEWAY_UPSTREAM_URL",
        ),
        ({"GATEWAY_UPSTREAM_URL": "https:///v1", "GATEWAY_MODEL": "m"}, "GATEWAY_UPSTREAM_URL"),
        (
            {"GATEWAY_UPSTREAM_URL": "https://h:port/v1", "GATEWAY_MODEL": "m"},
            "GATEWAY_UPSTREAM_URL",
        ),
        ({"GATEWAY_UPSTREAM_URL": "https://h/v1#x", "GATEWAY_MODEL": "m"}, "GATEWAY_UPSTREAM_URL"),
        ({"GATEWAY_BODY_TIMEOUT": "0"}, "GATEWAY_BODY_TIMEOUT"),
        ({"GATEWAY_UPSTREAM_URL": "https://api.openai.com/v1"}, "GATEWAY_MODEL"),
        ({"GATEWAY_UPSTREAM_MAX_CONNECTIONS": "0"}, "GATEWAY_UPSTREAM_MAX_CONNECTIONS"),
    ],
)
def test_bad_values_fail_loudly_naming_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


def test_reads_principals_limits_and_cors(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\ncarol:carol-key-0123456789abcd\n\n")
    settings = Settings.from_env(
        {
            "GATEWAY_API_KEYS": "alice:alice-key-0123456789ab, bob:bob-key-0123456789abcd",
            "GATEWAY_API_KEYS_FILE": str(keys),
            "GATEWAY_CORS_ORIGINS": "https://a.example/, http://localhost:5173",
            "GATEWAY_MAX_BODY_BYTES": "2048",
            "GATEWAY_MAX_SESSIONS_PER_PRINCIPAL": "3",
            "GATEWAY_MAX_SESSIONS": "50",
            "GATEWAY_MAX_MESSAGES": "10",
            "GATEWAY_MAX_MESSAGE_CHARS": "100",
        }
    )
    assert [name for name, _ in settings.api_keys] == ["alice", "bob", "carol"]
    assert settings.cors_origins == ("https://a.example", "http://localhost:5173")
    assert (settings.max_body_bytes, settings.max_sessions) == (2048, 50)
    assert settings.max_sessions_per_principal == 3
    assert (settings.max_messages, settings.max_message_chars) == (10, 100)
    proxied = Settings.from_env(
        {"GATEWAY_PRINCIPAL_HEADER": "X-User", "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, ::1"}
    )
    assert proxied.principal_header == "x-user"
    assert proxied.trusted_proxies == ("10.0.0.0/8", "::1")


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"GATEWAY_API_KEYS": "no-colon-here-0123456789"}, "name:key"),
        ({"GATEWAY_API_KEYS": "a:short"}, "16"),
        ({"GATEWAY_API_KEYS": ":anonymous-key-0123456789"}, "name"),
        # A header carries ASCII: such keys could never match, so they are refused.
        ({"GATEWAY_API_KEYS": "a:schl\u00fcssel-0123456789ab"}, "printable ASCII"),
        ({"GATEWAY_API_KEYS": "a:tab\tinside-0123456789ab"}, "printable ASCII"),
        ({"GATEWAY_API_KEYS": "a:same-key-0123456789ab,b:same-key-0123456789ab"}, "unique"),
        ({"GATEWAY_API_KEYS_FILE": "/nonexistent/keys"}, "GATEWAY_API_KEYS_FILE"),
        (
            {
                "GATEWAY_API_KEYS": "a:alice-key-0123456789ab",
                "GATEWAY_PRINCIPAL_HEADER": "x-user",
                "GATEWAY_TRUSTED_PROXIES": "127.0.0.1",
            },
            "not both",
        ),
        ({"GATEWAY_PRINCIPAL_HEADER": "x-user"}, "GATEWAY_TRUSTED_PROXIES"),
        ({"GATEWAY_PRINCIPAL_HEADER": "x", "GATEWAY_TRUSTED_PROXIES": "proxy"}, "'proxy'"),
        ({"GATEWAY_CORS_ORIGINS": "example.com"}, "GATEWAY_CORS_ORIGINS"),
        ({"GATEWAY_MAX_BODY_BYTES": "0"}, "GATEWAY_MAX_BODY_BYTES"),
        ({"GATEWAY_MAX_SESSIONS": "many"}, "GATEWAY_MAX_SESSIONS"),
    ],
)
def test_bad_principal_and_limit_settings_fail_loudly(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        Settings.from_env(env)
    # A key is never echoed in the error.
    for value in env.values():
        if "key-0123456789" in value:
            assert value.split(":")[-1] not in str(info.value)


def test_reads_the_redis_settings() -> None:
    settings = Settings.from_env(
        {"GATEWAY_REDIS_URL": "redis://10.0.0.5:6379/0", "GATEWAY_CLAIM_TTL": "4.5"}
    )
    assert settings.redis_url == "redis://10.0.0.5:6379/0"
    assert settings.claim_ttl == 4.5
    assert Settings.from_env({}).redis_url is None
    with pytest.raises(ConfigError, match="GATEWAY_REDIS_URL"):
        Settings.from_env({"GATEWAY_REDIS_URL": "10.0.0.5:6379"})
    with pytest.raises(ConfigError, match="GATEWAY_CLAIM_TTL"):
        Settings.from_env({"GATEWAY_CLAIM_TTL": "0"})


@pytest.mark.parametrize(
    ("base", "chat"),
    [
        ("https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
        ),
        (
            "https://r.openai.azure.com/openai/deployments/gpt?api-version=2024-10-21",
            "https://r.openai.azure.com/openai/deployments/gpt/chat/completions"
            "?api-version=2024-10-21",
        ),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/chat/completions"),
        (
            "http://proxy.internal/llm/deepseek/",
            "http://proxy.internal/llm/deepseek/chat/completions",
        ),
    ],
)
def test_any_http_base_url_is_accepted(base: str, chat: str) -> None:
    settings = Settings.from_env({"GATEWAY_UPSTREAM_URL": base, "GATEWAY_MODEL": "m"})
    assert settings.upstream_url is not None
    assert chat_url(settings.upstream_url) == chat
