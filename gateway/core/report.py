"""What a stream's end reports: its terminal event, its outcome as one word, its
usage, and its one end-of-life line (text and JSON; docs/observability.md). The
outcome itself, and how a stream gets it, is ``Session``'s (session.py)."""

from __future__ import annotations

import logging

import anyio

from .session import Completed, Failed, Session, Stopped

__all__ = [
    "end_record",
    "log_end",
    "outcome_label",
    "reported_usage",
    "routing_report",
    "terminal_event",
]

logger = logging.getLogger(__name__)


def terminal_event(session: Session) -> tuple[str, dict[str, object]]:
    """The name and data of the stream's terminal event, from its outcome; with
    GATEWAY_CONFIG's routes, who served it and each attempt (docs/routing.md)."""
    name, data = _terminal_event(session)
    if session.routed:
        data.update(routing_report(session))
    return name, data


def routing_report(session: Session) -> dict[str, object]:
    """The provider and model that served the stream (``None`` when none did), and
    every attempt in order."""
    served = next((a for a in session.attempts if a.served or a.result == "stopped"), None)
    return {
        "provider": None if served is None else served.provider,
        "provider_model": None if served is None else served.model,
        "attempts": [a.report(session.started_at) for a in session.attempts],
    }


def _terminal_event(session: Session) -> tuple[str, dict[str, object]]:
    outcome = session.outcome
    if isinstance(outcome, Completed):
        return "done", {
            "status": "completed",
            "finish_reason": outcome.finish_reason,
            "usage": outcome.usage,
            "first_delta_ms": session.first_delta_ms(),
        }
    if isinstance(outcome, Stopped):
        data: dict[str, object] = {"status": "stopped", "reason": outcome.reason}
        if outcome.detail is not None:
            data["detail"] = outcome.detail
        data["tokens_delivered"] = session.tokens_delivered
        data["reasoning_delivered"] = session.reasoning_delivered
        data["tool_calls_delivered"] = session.tool_calls_delivered
        data["refusal_delivered"] = session.refusal_delivered
        data["first_delta_ms"] = session.first_delta_ms()
        return "stopped", data
    assert outcome is not None
    data = {"status": "error", "code": outcome.code, "message": outcome.message}
    if outcome.detail is not None:
        data["detail"] = outcome.detail
    if outcome.upstream_status is not None:
        data["upstream_status"] = outcome.upstream_status
    return "error", data


def outcome_label(session: Session) -> str:
    """The outcome as one word: the ``outcome`` of metrics and JSON logs."""
    outcome = session.outcome
    if isinstance(outcome, Completed):
        return "completed"
    if isinstance(outcome, Stopped):
        if outcome.reason == "cancel":
            return "cancelled"
        if outcome.reason == "disconnect":
            return "disconnected"
        if outcome.reason == "timeout":
            return f"timeout_{outcome.detail}"
        return "shutdown"
    assert isinstance(outcome, Failed)
    if outcome.code in ("internal_error", "session_conflict"):
        return outcome.code
    return "upstream_error"


def reported_usage(session: Session) -> tuple[dict[str, object] | None, str]:
    """The usage to report, and where it comes from. A completed stream has exactly
    what the provider sent (``"provider"``), or nothing (``"none"``); so has a
    failed one. A stopped stream never gets the provider's usage, which comes last:
    it has the gateway's own figures (``"estimated"``), which know no token counts
    and say how many deltas reached the client (a delta is not a token)."""
    outcome = session.outcome
    if isinstance(outcome, Completed):
        return outcome.usage, "none" if outcome.usage is None else "provider"
    if not isinstance(outcome, Stopped):
        return None, "none"
    estimate: dict[str, object] = {
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "estimated": True,
        "deltas_delivered": sum(session.delivered()),
    }
    return estimate, "estimated"


def end_record(session: Session, now: float) -> dict[str, object]:
    """The end line's fields, for the JSON log format (docs/observability.md)."""
    outcome = session.outcome
    usage, source = reported_usage(session)
    record: dict[str, object] = {
        "session_id": session.id,
        "principal": session.principal,
        "model": session.model,
        "outcome": outcome_label(session),
        "reason": outcome.reason if isinstance(outcome, Stopped) else None,
        "tokens_delivered": session.tokens_delivered,
        "reasoning_delivered": session.reasoning_delivered,
        "tool_calls_delivered": session.tool_calls_delivered,
        "refusal_delivered": session.refusal_delivered,
        "usage": usage,
        "usage_source": source,
        "duration_ms": round((now - session.started_at) * 1000),
        "time_to_first_delta_ms": (
            None
            if session.first_delta_at is None
            else round((session.first_delta_at - session.started_at) * 1000)
        ),
        "provider_close_ms": None,
        **routing_report(session),
    }
    if session.stopped_at is not None and session.provider_closed_at is not None:
        close = max(0.0, session.provider_closed_at - session.stopped_at)
        record["provider_close_ms"] = round(close * 1000, 3)
    if isinstance(outcome, Failed):
        record["code"] = outcome.code
        if outcome.detail is not None:
            record["detail"] = outcome.detail
        if outcome.cause is not None:
            record["cause"] = outcome.cause
        if outcome.note is not None:
            record["cause_detail"] = outcome.note
    return record


def log_end(session: Session) -> None:
    """Write the session's one end-of-life line (a stop is INFO, never ERROR)."""
    outcome = session.outcome
    now = anyio.current_time()
    after = round((now - session.started_at) * 1000)
    extra = {"gateway": end_record(session, now)}
    if isinstance(outcome, Completed):
        logger.info(
            "[SSE] %s completed in %dms %s", session.id, after, _counts(session), extra=extra
        )
    elif isinstance(outcome, Stopped):
        detail = f" detail={outcome.detail}" if outcome.detail else ""
        if outcome.reason in ("cancel", "disconnect"):
            logger.info(
                "[SSE] %s aborted by client/cancel reason=%s%s %s after=%dms",
                session.id,
                outcome.reason,
                detail,
                _counts(session),
                after,
                extra=extra,
            )
        elif outcome.reason == "timeout":
            logger.info(
                "[SSE] %s timed out reason=%s %s after=%dms",
                session.id,
                outcome.detail,
                _counts(session),
                after,
                extra=extra,
            )
        else:
            logger.info(
                "[SSE] %s stopped reason=%s %s after=%dms",
                session.id,
                outcome.reason,
                _counts(session),
                after,
                extra=extra,
            )
    elif isinstance(outcome, Failed):
        status = f" upstream_status={outcome.upstream_status}" if outcome.upstream_status else ""
        if outcome.cause is not None:
            status += f" cause={outcome.cause}"
        for name, value in (outcome.provider_error or {}).items():
            status += f" provider_{name}={value}"
        logger.warning(
            "[SSE] %s failed code=%s%s %s after=%dms: %s",
            session.id,
            outcome.code,
            status,
            _counts(session),
            after,
            outcome.message if outcome.note is None else f"{outcome.message} ({outcome.note})",
            extra=extra,
        )


def _counts(session: Session) -> str:
    text = f"tokens={session.tokens_delivered}"
    if session.reasoning_delivered:
        text += f" reasoning={session.reasoning_delivered}"
    if session.tool_calls_delivered:
        text += f" tool_calls={session.tool_calls_delivered}"
    if session.refusal_delivered:
        text += f" refusal={session.refusal_delivered}"
    for kind, ms in session.first_delta_ms().items():
        text += f" first_{kind}_ms={ms}"
    return text
