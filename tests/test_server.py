from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway import ConfigError, load_config
from gateway.server import is_hypercorn_setting

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_in_hypercorn_toml_is_a_real_setting() -> None:
    data = tomllib.loads((ROOT / "hypercorn.toml").read_text())
    assert data, "hypercorn.toml is empty"
    assert [key for key in data if not is_hypercorn_setting(key)] == []
    config = load_config(ROOT / "hypercorn.toml")
    for key, value in data.items():
        assert getattr(config, key) == value
    assert config.read_timeout is None


def test_misspelt_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text('gracefull_timeout = 5\nbind = ["127.0.0.1:1"]\n')
    with pytest.raises(ConfigError, match="gracefull_timeout"):
        load_config(path)


def test_read_timeout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text("read_timeout = 30\n")
    with pytest.raises(ConfigError, match="read_timeout"):
        load_config(path)


def test_unknown_worker_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="worker_class"):
        load_config(worker_class="gevent")


@pytest.mark.parametrize("key", ["create_sockets", "from_toml", "log", "ssl_enabled", "_bind"])
def test_methods_and_private_names_are_not_settings(key: str) -> None:
    assert not is_hypercorn_setting(key)
