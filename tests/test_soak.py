"""The soak runner's short version: random fates through a real gateway process on each
worker class; the books must balance (tests/soak.py; `make soak` runs 10,000)."""

from __future__ import annotations

import anyio
import pytest

from .soak import FATES, failures, soak

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("worker", ["asyncio", "uvloop", "trio"])
def test_short_soak_balances_the_books(worker: str) -> None:
    books = anyio.run(soak, worker, 300, 30, 7)
    assert failures(books) == []
    assert set(books["fates"]) == set(FATES)
    assert sum(books["fates"].values()) == 300
