"""Prometheus metrics: one outcome per stream, the Stop latency, what reached the client.

Every stream is counted where its one end line is written (``ChatStream._finish``), so
the counters agree with the logs. Labels are bounded: no principal, session id or model
text. Names and their OpenTelemetry GenAI equivalents: docs/observability.md.

With ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client's own variable, read when it
is imported), every hypercorn worker writes its figures there and a scrape of any
worker reports the sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from ..errors import CONNECT_CAUSES
from ..provider.parser import token_counts
from .report import outcome_label
from .session import Completed, Failed, Session, Stopped

__all__ = ["ATTEMPT_RESULTS", "CANCEL_RESULTS", "FAILURE_CODES", "OUTCOMES", "Metrics"]

OUTCOMES = (
    "completed",
    "cancelled",
    "disconnected",
    "timeout_first_token",
    "timeout_idle",
    "timeout_total",
    "timeout_send",
    "shutdown",
    "upstream_error",
    "internal_error",
    "session_conflict",
)
_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
CANCEL_RESULTS = ("stopped", "not_found", "forwarded", "unavailable", "timeout")
# What became of an attempt at a provider (core/session.py, Attempt).
ATTEMPT_RESULTS = ("served", "failed", "stopped", "hedge_lost", "cooldown", "abandoned")
# The provider error codes (gateway/errors.py). A connection that failed is counted by
# its cause (errors.CONNECT_CAUSES) instead of its code: "the certificate expired" and
# "the provider is down" need different hands.
_UPSTREAM_CODES = (
    "upstream_unavailable",
    "upstream_error",
    "upstream_disconnected",
    "upstream_protocol",
)
# Why an attempt failed: those, and no first delta in time.
FAILURE_CODES = (*_UPSTREAM_CODES, "first_token_timeout", *CONNECT_CAUSES)
# gateway_upstream_errors_total's codes: a failed stream's.
_ERROR_CODES = (*_UPSTREAM_CODES, "upstream_misconfigured", *CONNECT_CAUSES)
_KINDS = ("content", "reasoning", "tool_call", "refusal")
_TRIGGERS = ("cancel", "disconnect", "timeout", "shutdown")
# Stop latencies are milliseconds on loopback, seconds when something is wrong.
_CLOSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FIRST_DELTA_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The gateway's metrics, in a registry of their own (one per app)."""

    def __init__(self, enabled: bool = True, providers: tuple[str, ...] = ()) -> None:
        # Off (GATEWAY_METRICS=off), nothing is created or counted: in multiprocess
        # mode not even the files.
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        if not enabled:
            return
        r = self.registry
        self.started = Counter("gateway_streams_started", "Streams started.", registry=r)
        self.ended = Counter(
            "gateway_streams_ended", "Streams ended, by outcome.", ["outcome"], registry=r
        )
        self.live = Gauge(
            "gateway_streams_live",
            "Streams running now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.deltas = Counter(
            "gateway_deltas_delivered",
            "Deltas the client was sent, by kind, counted when the stream ends.",
            ["kind"],
            registry=r,
        )
        self.first_delta = Histogram(
            "gateway_time_to_first_delta_seconds",
            "From the request to the first delta of any kind.",
            buckets=_FIRST_DELTA_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "gateway_stream_duration_seconds",
            "From the request to the stream's end, by outcome.",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.provider_close = Histogram(
            "gateway_provider_close_seconds",
            "From a stop's trigger to the provider's connection closed.",
            ["trigger"],
            buckets=_CLOSE_BUCKETS,
            registry=r,
        )
        self.cancels = Counter(
            "gateway_cancel_requests",
            "Cancel requests, by result.",
            ["result"],
            registry=r,
        )
        self.provider_tokens = Counter(
            "gateway_provider_tokens",
            "Tokens in the provider's usage reports, by type.",
            ["type"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Provider failures, by code.", ["code"], registry=r
        )
        self.cluster_available = Gauge(
            "gateway_cluster_available",
            "1 while Redis is reachable (only with GATEWAY_REDIS_URL).",
            registry=r,
            # Over several workers: 0 if any live one cannot reach Redis.
            multiprocess_mode="livemin",
        )
        # Per configured provider (GATEWAY_CONFIG's names, or "default"): bounded.
        self.attempts = Counter(
            "gateway_provider_attempts",
            "Attempts at a provider, by result (docs/routing.md), counted when the stream ends.",
            ["provider", "result"],
            registry=r,
        )
        self.provider_failures = Counter(
            "gateway_provider_failures",
            "Failed attempts at a provider, by cause (the error code, or "
            "first_token_timeout), counted when the stream ends.",
            ["provider", "code"],
            registry=r,
        )
        self.provider_first_delta = Histogram(
            "gateway_provider_time_to_first_delta_seconds",
            "From an attempt's start to its provider's first delta, for the attempt that served.",
            ["provider"],
            buckets=_FIRST_DELTA_BUCKETS,
            registry=r,
        )
        self.provider_open = Gauge(
            "gateway_provider_responses_open",
            "Provider responses open now (two for a stream while it hedges).",
            ["provider"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # Every label value exists from the start: a rate over a series that appears
        # mid-way misses its first increment.
        for provider in providers:
            for result in ATTEMPT_RESULTS:
                self.attempts.labels(provider, result)
            self.provider_first_delta.labels(provider)
            self.provider_open.labels(provider)
            for code in FAILURE_CODES:
                self.provider_failures.labels(provider, code)
        for code in _ERROR_CODES:
            self.upstream_errors.labels(code)
        for outcome in OUTCOMES:
            self.ended.labels(outcome)
            self.duration.labels(outcome)
        for kind in _KINDS:
            self.deltas.labels(kind)
        for trigger in _TRIGGERS:
            self.provider_close.labels(trigger)
        for result in CANCEL_RESULTS:
            self.cancels.labels(result)
        for kind in ("prompt", "completion", "reasoning", "cached_prompt"):
            self.provider_tokens.labels(kind)

    def stream_started(self) -> None:
        if not self.enabled:
            return
        self.started.inc()
        self.live.inc()

    def stream_ended(self, session: Session, now: float) -> None:
        if not self.enabled:
            return
        outcome = outcome_label(session)
        self.live.dec()
        self.ended.labels(outcome).inc()
        self.duration.labels(outcome).observe(now - session.started_at)
        for kind, count in zip(_KINDS, session.delivered(), strict=True):
            if count:
                self.deltas.labels(kind).inc(count)
        if session.first_delta_at is not None:
            self.first_delta.observe(session.first_delta_at - session.started_at)
        stopped = session.outcome
        if (
            isinstance(stopped, Stopped)
            and session.stopped_at is not None
            and session.provider_closed_at is not None
        ):
            close = max(0.0, session.provider_closed_at - session.stopped_at)
            self.provider_close.labels(stopped.reason).observe(close)
        if isinstance(stopped, Completed) and stopped.usage is not None:
            for kind, count in token_counts(stopped.usage).items():
                self.provider_tokens.labels(kind).inc(count)
        if isinstance(stopped, Failed) and stopped.code.startswith("upstream_"):
            self.upstream_errors.labels(stopped.cause or stopped.code).inc()
        for attempt in session.attempts:
            self.attempts.labels(attempt.provider, attempt.result or "failed").inc()
            code = attempt.cause or attempt.code
            if attempt.result == "failed" and code in FAILURE_CODES:
                self.provider_failures.labels(attempt.provider, code).inc()
            if attempt.served and session.first_delta_at is not None:
                delay = max(0.0, session.first_delta_at - attempt.started_at)
                self.provider_first_delta.labels(attempt.provider).observe(delay)

    def provider_opened(self, provider: str, delta: int) -> None:
        """A provider response opened (``+1``) or closed (``-1``)."""
        if self.enabled:
            self.provider_open.labels(provider).inc(delta)

    def cancel_request(self, result: str) -> None:
        if not self.enabled:
            return
        self.cancels.labels(result).inc()

    def exposition(self) -> bytes:
        if _MULTIPROCESS:
            # Read from every worker's files, this one's included.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def close(self) -> None:
        """At the worker's exit: its live gauges stop counting (the counters stay,
        summed: totals do not drop when a worker restarts)."""
        if _MULTIPROCESS:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
