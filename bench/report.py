"""Renders a `make bench` report as the markdown table in docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

_SATURATED = "saturated: not every stream started within 30 s"


def _kib(v: dict[str, Any]) -> str:
    return _SATURATED if v.get("saturated") else str(v["kib_per_stream"])


def _cpu(v: dict[str, Any]) -> str:
    if v.get("saturated"):
        return _SATURATED
    return f"{v['us_per_token']} ({v['cpu_fraction']:.0%} CPU, {v['tokens_per_s']} tok/s)"


def _quantiles(figures: dict[str, Any]) -> str:
    """A first-token figure's p50 / p90 / p99, as the tables write them."""
    return f"{figures['p50']} / {figures['p90']} / {figures['p99']}"


def _ratio(gateway: float | None, baseline: float | None) -> str:
    if gateway is None or baseline is None or baseline == 0:
        return ""
    return f"{gateway / baseline:.2f}x"


START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# Rows of the gateway's CPU per token next to other servers or other settings, each
# measured in its own process (bench/run.py): (impl, what it is, its ratio's label).
_VARIANTS = (
    (
        "floor",
        "floor (bench/floor.py: hypercorn, one socket read and one send per token)",
        "gateway / floor",
    ),
    ("gateway-openai", "gateway's /v1/chat/completions (OpenAI's chunks)", "/v1 / native"),
    (
        "gateway-anthropic",
        "gateway, an Anthropic provider (Messages read natively: bench/anthropic.toml)",
        "Anthropic / OpenAI provider",
    ),
    (
        "gateway-messages",
        "gateway's /v1/messages (Anthropic's events), an OpenAI-compatible provider",
        "/v1/messages / native",
    ),
    (
        "gateway-messages-anthropic",
        "gateway's /v1/messages, an Anthropic provider",
        "/v1/messages+Anthropic / native",
    ),
    ("gateway-nometrics", "gateway with GATEWAY_METRICS=off", "off / on"),
    ("gateway-resume", "gateway with GATEWAY_RESUME_WINDOW=30", "resume / off"),
    (
        "gateway-resume-redis",
        "gateway with GATEWAY_RESUME_WINDOW=30 and GATEWAY_REDIS_URL (events to Redis)",
        "resume+Redis / off",
    ),
)


def render(report: dict[str, Any], loads: list[int], page: str = "") -> str:
    """Replace the generated block in ``page``; what is outside it (the history of
    optimization steps) is kept as written."""
    block = "\n".join([START, _tables(report, loads), END])
    if START in page and END in page:
        return page[: page.index(START)] + block + page[page.index(END) + len(END) :]
    return "# Benchmarks\n\n" + block + "\n"


def _tables(report: dict[str, Any], loads: list[int]) -> str:
    runs = {(r["worker"], r["impl"]): r for r in report["runs"]}
    workers = list(dict.fromkeys(r["worker"] for r in report["runs"]))
    lines = [
        "Written by `make bench` (bench/run.py) between these markers.",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}, Python {report['python']}",
        f"- command: `{report['command']}`, {report['seconds']} s",
        f"- load: streams x {report['rate']:g} tokens/s, one token per provider chunk",
        "",
        "CPU is the server process's own (utime + stime from /proc/<pid>/stat) per token the",
        "clients received in the window; tok/s below 20 x streams means the server could not",
        "keep up. Latencies run from the trigger (the cancel request",
        "written, or the client's FIN) to the provider seeing EOF, both on CLOCK_MONOTONIC.",
        "The machine is shared and noisy: compare columns of one run, not runs.",
        "",
    ]
    for worker in workers:
        base, gate = runs.get((worker, "baseline")), runs.get((worker, "gateway"))
        if base is None or gate is None:
            continue
        lines += [
            f"## {worker} worker",
            "",
            "| measure | baseline | gateway | gateway / baseline |",
            "|---|---|---|---|",
        ]
        for n in loads:
            b, g = base["cpu"].get(str(n)), gate["cpu"].get(str(n))
            if b and g:
                ratio = _ratio(g.get("us_per_token"), b.get("us_per_token"))
                lines.append(f"| CPU µs per token, {n} streams | {_cpu(b)} | {_cpu(g)} | {ratio} |")
        for key, label in (
            ("cancel_idle", "cancel → provider EOF, idle"),
            ("cancel_loaded", "cancel → provider EOF, 200 streams"),
            ("disconnect_idle", "disconnect → provider EOF, idle"),
            ("disconnect_loaded", "disconnect → provider EOF, 200 streams"),
        ):
            b, g = base.get(key), gate.get(key)
            if b and g:
                lines.append(
                    f"| {label}, ms p50 / p99 (n={g['n']}) | {b['p50']} / {b['p99']} | "
                    f"{g['p50']} / {g['p99']} | {_ratio(g['p99'], b['p99'])} (p99) |"
                )
        cross = gate.get("cancel_cross_instance")
        if cross:
            lines.append(
                f"| cancel sent to another instance (Redis) → provider EOF, idle, ms p50 / p99 "
                f"(n={cross['n']}) | | {cross['p50']} / {cross['p99']} | |"
            )
        b, g = base.get("memory"), gate.get("memory")
        if b and g:
            ratio = _ratio(g.get("kib_per_stream"), b.get("kib_per_stream"))
            lines.append(
                f"| RSS per held stream, KiB ({g['streams']} streams) | {_kib(b)} | "
                f"{_kib(g)} | {ratio} |"
            )
        if b and g and not (b.get("saturated") or g.get("saturated")):
            lines.append(
                f"| RSS before / open / after close, MiB | {b['rss_before_kib'] // 1024} / "
                f"{b['rss_open_kib'] // 1024} / {b['rss_after_kib'] // 1024} | "
                f"{g['rss_before_kib'] // 1024} / {g['rss_open_kib'] // 1024} / "
                f"{g['rss_after_kib'] // 1024} | |"
            )
        b, g = base.get("capacity"), gate.get("capacity")
        if b and g:
            lines.append(
                f"| capacity: streams at {report['rate']:g} tok/s with cancel p99 < 15 ms | "
                f"{b['streams']} | "
                f"{g['streams']} | |"
            )
        for impl, what, label in _VARIANTS:
            for n, v in runs.get((worker, impl), {}).get("cpu", {}).items():
                g = gate["cpu"].get(n)
                gate_us, their_us = (g.get("us_per_token") if g else None), v.get("us_per_token")
                # Each ratio reads as its label says: the gateway over the floor, the
                # variant over the plain gateway.
                ratio = _ratio(gate_us, their_us) if impl == "floor" else _ratio(their_us, gate_us)
                lines.append(
                    f"| {what}, CPU µs per token, {n} streams | | {_cpu(v)} | {label} {ratio} |"
                )
        first = gate.get("first_token")
        if first:
            direct = first["direct"]
            for surface, path in (("api", "/api/chat/stream"), ("v1", "/v1/chat/completions")):
                added, total = first[f"added_{surface}"], first[surface]
                lines.append(
                    f"| time to first token added over the provider, {path}, ms p50 / p90 / "
                    f"p99 (one request at a time) | | {_quantiles(added)} (through the gateway "
                    f"{_quantiles(total)}; the provider alone {_quantiles(direct)}) | |"
                )
        floor = gate.get("first_token_floor")
        if first and floor:
            added = floor["added_api"]
            above = [round(first["added_api"][q] - added[q], 3) for q in ("p50", "p90")]
            lines.append(
                "| time to first token added by the floor (bench/floor.py: hypercorn, and a "
                "relay that does nothing else), the same measure, ms p50 / p90 / p99 | | "
                f"{_quantiles(added)} (the provider alone "
                f"{floor['direct']['p50']}) | gateway /api above it: p50 {above[0]}, "
                f"p90 {above[1]} |"
            )
        for server, what in (
            ("gateway", "through the gateway, /api/chat/stream"),
            ("floor", "by the floor"),
        ):
            loaded = gate.get(f"first_token_loaded_{server}")
            if loaded:
                added, direct = loaded["added_api"], loaded["direct"]
                lines.append(
                    f"| time to first token added {what}, {gate.get('first_token_load')} "
                    "streams held open meanwhile (20 tokens/s each), "
                    f"ms p50 / p90 / p99 | | {_quantiles(added)} "
                    f"(the provider alone {_quantiles(direct)}) | |"
                )
        for routes, what in (
            ("routed", "through a route of one target (bench/routed.toml)"),
            ("fallback", "through a fallback: the first target answers 503 (bench/fallback.toml)"),
        ):
            first = gate.get(f"first_token_{routes}")
            if first:
                total, direct = first["api"], first["direct"]
                lines.append(
                    f"| time to first token {what}, /api/chat/stream, ms p50 / p90 / p99 | | "
                    f"{_quantiles(total)} (the provider alone {_quantiles(direct)}) | |"
                )
        late = gate.get("idle_timeout_late")
        if late:
            lines.append(
                f"| idle timeout lateness, ms p50 / p99 (n={late['n']}) | (none) | "
                f"{late['p50']} / {late['p99']} | |"
            )
        lines.append("")
    return "\n".join(lines)
