"""The relay -> sender hand-off: order, batching, back-pressure and both closes."""

from __future__ import annotations

import anyio
import pytest

from gateway.outbox import Mark, Outbox

pytestmark = pytest.mark.anyio


async def test_take_returns_everything_queued_in_order_with_the_last_mark() -> None:
    outbox = Outbox(8)
    outbox.put_nowait(b"a", (1, 0, 0))
    await outbox.put(b"b", (1, 2, 0))
    outbox.put_nowait(b"c")  # a ping: no mark of its own
    assert await outbox.take() == (b"abc", (1, 2, 0))
    outbox.put_nowait(b"d", (2, 2, 1))
    assert await outbox.take() == (b"d", (2, 2, 1))
    outbox.put_nowait(b"e")
    outbox.put_nowait(b"f")
    assert await outbox.take() == (b"ef", None)


async def test_take_waits_for_a_put() -> None:
    outbox = Outbox(8)
    got: list[tuple[bytes, Mark | None] | None] = []
    async with anyio.create_task_group() as tg:

        async def consumer() -> None:
            got.append(await outbox.take())

        tg.start_soon(consumer)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        outbox.put_nowait(b"x", (1, 0, 0))
    assert got == [(b"x", (1, 0, 0))]


async def test_a_full_outbox_makes_put_wait_until_take() -> None:
    outbox = Outbox(2)
    outbox.put_nowait(b"1")
    outbox.put_nowait(b"2")
    with pytest.raises(anyio.WouldBlock):
        outbox.put_nowait(b"3")
    done = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def producer() -> None:
            await outbox.put(b"3")
            done.set()

        tg.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        assert await outbox.take() == (b"12", None)
    assert done.is_set()
    assert await outbox.take() == (b"3", None)


async def test_close_lets_the_sender_drain_then_end() -> None:
    outbox = Outbox(8)
    outbox.put_nowait(b"last")
    outbox.close()
    assert await outbox.take() == (b"last", None)
    assert await outbox.take() is None
    with pytest.raises(anyio.ClosedResourceError):
        outbox.put_nowait(b"more")


async def test_close_wakes_a_waiting_take() -> None:
    outbox = Outbox(8)
    got: list[tuple[bytes, Mark | None] | None] = [(b"", (-1, -1, -1))]
    async with anyio.create_task_group() as tg:

        async def consumer() -> None:
            got[0] = await outbox.take()

        tg.start_soon(consumer)
        await anyio.wait_all_tasks_blocked()
        outbox.close()
    assert got == [None]


async def test_a_gone_sender_breaks_puts_also_a_waiting_one() -> None:
    outbox = Outbox(1)
    outbox.put_nowait(b"queued")
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def producer() -> None:
            try:
                await outbox.put(b"waiting")
            except anyio.BrokenResourceError as exc:
                errors.append(exc)

        tg.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        outbox.close_receiver()
    assert len(errors) == 1
    with pytest.raises(anyio.BrokenResourceError):
        outbox.put_nowait(b"after")
    assert await outbox.take() is None
