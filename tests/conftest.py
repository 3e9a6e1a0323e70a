from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import end_lines, quiet_logging
from .processes import RedisServer

_STARTED = re.compile(r"\[SSE\] (\S+) started ")


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Every async test runs on asyncio, uvloop and Trio."""
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the uvloop runs of the tests marked ``asyncio_and_trio``."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("anyio_backend") if callspec is not None else None
        uvloop = isinstance(backend, tuple) and bool(backend[1].get("use_uvloop"))
        if uvloop and item.get_closest_marker("asyncio_and_trio") is not None:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def node_sdks() -> Path:
    """tests/sdk, with the JavaScript SDKs pinned in its package.json installed (``npm
    ci``, on first use): the folder of the scripts that run them under Node."""
    folder = Path(__file__).parent / "sdk"
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the JavaScript SDK tests (Node >= 18)")
    if not (folder / "node_modules").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder,
            check=True,
            timeout=300,
        )
    return folder


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, started before it and stopped after."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _gateway_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """After every test: each started session wrote exactly one end line (an id two
    principals used has two starts and two ends), and the gateway logged nothing at
    ERROR (a stop is never an error)."""
    caplog.set_level(logging.INFO, logger="gateway")
    quiet_logging()
    yield
    records = [r for r in caplog.get_records("call") if r.name.startswith("gateway")]
    messages = [r.getMessage() for r in records]
    starts = Counter(m.group(1) for msg in messages if (m := _STARTED.match(msg)))
    for sid, started in starts.items():
        ends = end_lines(records, sid)
        assert len(ends) == started, f"{sid} started {started}x, has end lines: {ends}"
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert not errors, errors
