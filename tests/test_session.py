"""The session's state machine: under any interleaving of tokens, stops, completion and
failure, exactly one terminal outcome, the first, and exactly one end line."""

from __future__ import annotations

import logging

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.report import end_record, log_end, terminal_event
from gateway.core.session import Completed, Failed, Session, Stopped

pytestmark = pytest.mark.anyio

_STOP = st.tuples(st.just("stop"), st.sampled_from(["cancel", "disconnect", "timeout", "shutdown"]))
_ACTION = st.one_of(st.just(("token", "")), _STOP, st.just(("complete", "")), st.just(("fail", "")))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@given(actions=st.lists(_ACTION, max_size=15))
async def test_the_first_outcome_wins_and_one_line_is_written(
    actions: list[tuple[str, str]],
) -> None:
    session = Session("session_1_property", "m")
    first = None
    for kind, reason in actions:
        if kind == "token":
            session.tokens_delivered += 1
            continue
        if kind == "stop":
            outcome: Stopped | Completed | Failed = Stopped(reason)  # type: ignore[arg-type]
            won = session.cancel(reason)  # type: ignore[arg-type]
        elif kind == "complete":
            outcome = Completed("stop", None)
            won = session.settle(outcome)
        else:
            outcome = Failed("upstream_error", "boom")
            won = session.settle(outcome)
        assert won == (first is None)
        if first is None:
            first = outcome
    session.settle(Completed("stop", None))  # the relay's own end comes last, if at all
    expected = first or Completed("stop", None)
    assert session.outcome == expected
    assert session.scope is not None
    assert session.scope.cancel_called == isinstance(expected, Stopped)

    event, data = terminal_event(session)
    assert event == {Completed: "done", Stopped: "stopped", Failed: "error"}[type(expected)]
    if isinstance(expected, Stopped):
        assert data["reason"] == expected.reason
        assert data["tokens_delivered"] == session.tokens_delivered

    handler = _Lines()
    logger = logging.getLogger("gateway.core.report")
    logger.addHandler(handler)
    try:
        log_end(session)
    finally:
        logger.removeHandler(handler)
    assert len(handler.lines) == 1
    assert "session_1_property" in handler.lines[0]


async def test_the_end_record_says_where_its_usage_comes_from() -> None:
    completed = Session("session_usage_1", "m", "alice")
    completed.tokens_delivered = 4
    usage: dict[str, object] = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    completed.settle(Completed("stop", usage))
    record = end_record(completed, anyio.current_time())
    assert (record["usage"], record["usage_source"]) == (usage, "provider")
    assert (record["outcome"], record["reason"], record["principal"]) == (
        "completed",
        None,
        "alice",
    )

    stopped = Session("session_usage_2", "m")
    stopped.tokens_delivered, stopped.reasoning_delivered, stopped.tool_calls_delivered = 3, 5, 2
    stopped.refusal_delivered = 1
    stopped.cancel("timeout", "idle")
    record = end_record(stopped, anyio.current_time())
    assert record["usage_source"] == "estimated"
    # Deltas are counted as deltas, never as tokens (issue 32): no token count is known.
    assert record["usage"] == {
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "estimated": True,
        "deltas_delivered": 11,
    }
    assert record["refusal_delivered"] == 1
    assert (record["outcome"], record["reason"]) == ("timeout_idle", "timeout")
    assert record["time_to_first_delta_ms"] is None

    # A completed stream whose provider sent no usage reports none, not an estimate.
    silent = Session("session_usage_3", "m")
    silent.tokens_delivered = 3
    silent.settle(Completed("stop", None))
    record = end_record(silent, anyio.current_time())
    assert (record["usage"], record["usage_source"]) == (None, "none")
    # Nor does a failed one.
    failed = Session("session_usage_4", "m")
    failed.settle(Failed("upstream_error", "provider ended the answer with an error", detail="X"))
    record = end_record(failed, anyio.current_time())
    assert (record["usage"], record["usage_source"], record["detail"]) == (None, "none", "X")


async def test_the_sessions_clock_is_anyios() -> None:
    # The watchdog sleeps on anyio's clock (Trio's has an offset of its own): the times
    # the token path takes with the session's cheaper clock must be on the same one.
    before = anyio.current_time()
    now = Session("session_clock_1", "m").clock()
    assert before <= now <= anyio.current_time()


async def test_ended_is_set_for_a_waiter_that_came_before_or_after_the_end() -> None:
    # The event is made only when asked for; whenever that is, it says the truth.
    before, after = Session("a", "m"), Session("b", "m")
    waiting = before.ended
    assert not waiting.is_set()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting.wait)
            await anyio.wait_all_tasks_blocked()
            before.end()
    assert before.ended is waiting
    after.end()
    assert after.ended.is_set()
