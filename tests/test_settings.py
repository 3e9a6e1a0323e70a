from __future__ import annotations

import pytest

from gateway import ConfigError, Settings


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
            {"GATEWAY_UPSTREAM_URL": "https://api.openai.com", "GATEWAY_MODEL": "m"},
            "GATEWAY_UPSTREAM_URL",
        ),
        ({"GATEWAY_UPSTREAM_URL": "https://api.openai.com/v1"}, "GATEWAY_MODEL"),
        ({"GATEWAY_UPSTREAM_MAX_CONNECTIONS": "0"}, "GATEWAY_UPSTREAM_MAX_CONNECTIONS"),
    ],
)
def test_bad_values_fail_loudly_naming_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)
