"""The reference chat page and gateway/web/static/client.js in a real browser.

Debian's Chromium, driven headless by Playwright, against `gateway serve` in its own
process (demo mode: the built-in simulator behind it), on each worker class. What
the simulator did is read from its own `/v1/_streams`; what the gateway logged, from
its stderr.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    expect,
    sync_playwright,
)
from playwright.sync_api import Request as PWRequest

from support.processes import free_port

from .processes import WAIT, Gateway, TcpProxy

CHROMIUM = "/usr/bin/chromium"
# Long enough that a stopped answer has generated far fewer than planned; fast
# enough that a completed one takes about two seconds.
TOKENS, RATE = 80, 40.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None,
        reason="Debian's chromium is not installed (make test does)",
    ),
]


def _gateway(worker: str, **settings: str) -> Gateway:
    defaults = {"GATEWAY_SIMULATOR_TOKENS": str(TOKENS), "GATEWAY_SIMULATOR_RATE": str(RATE)}
    return Gateway(worker, **{**defaults, **settings})


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    gw = _gateway(request.param)
    try:
        yield gw
    finally:
        gw.stop()
    assert not any("Traceback" in line for line in gw.lines), "\n".join(gw.lines)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture
def context(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    context = playwright.chromium.launch_persistent_context(
        tmp_path / "profile",
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    try:
        yield context
    finally:
        context.close()


class ChatPage:
    """The page, with what it logs to the console and the stream requests it makes."""

    def __init__(self, page: Page, gateway: Gateway, url: str | None = None) -> None:
        self.page = page
        self.console: list[ConsoleMessage] = []
        self.stream_requests: list[PWRequest] = []
        self.failed: list[PWRequest] = []
        self.page_errors: list[str] = []
        page.on("console", lambda message: self.console.append(message))
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("request", lambda request: self._request(request))
        page.on("requestfailed", lambda request: self.failed.append(request))
        page.goto(url or gateway.url)
        self.message = page.get_by_role("textbox", name="Message", exact=True)
        self.send_button = page.get_by_role("button", name="Send")
        self.stop_button = page.get_by_role("button", name="Stop")
        self.log = page.get_by_role("log")

    def _request(self, request: PWRequest) -> None:
        if request.url.endswith("/api/chat/stream"):
            self.stream_requests.append(request)

    def ask(self, text: str) -> None:
        self.message.fill(text)
        self.send_button.click()

    def answer(self, index: int = -1) -> Any:
        return self.log.locator("article.assistant").nth(index)

    def answer_text(self, index: int = -1) -> str:
        text: str = self.answer(index).locator(".text").inner_text()
        return text

    def wait_for_tokens(self, n: int) -> None:
        """Until the streaming answer shows at least ``n`` tokens (the simulator's
        tokens are words, each but the first with a leading space)."""
        self.page.wait_for_function(
            """n => {
                const a = [...document.querySelectorAll('article.assistant')].pop();
                return a && a.querySelector('.text').textContent.split(' ').length >= n;
            }""",
            arg=n,
            timeout=WAIT * 1000,
        )

    def session_id(self, index: int = -1) -> str:
        session_id: str | None = self.answer(index).get_attribute("data-session-id")
        assert session_id is not None
        return session_id

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions: a stop must cause neither.

        Left out: Chromium's own network line for a cancel call answered 404, which
        is expected when the aborted fetch ends the stream first (docs/client.md).
        """
        return self.page_errors + [
            f"{m.text} ({m.location.get('url')})"
            for m in self.console
            if m.type == "error"
            and not ("/api/chat/cancel/" in m.location.get("url", "") and "status of 404" in m.text)
        ]


@pytest.fixture
def chat(context: BrowserContext, gateway: Gateway) -> ChatPage:
    return ChatPage(context.new_page(), gateway)


def _tokens_in(status: str) -> int:
    match = re.search(r"(\d+) tokens? delivered", status)
    assert match is not None, status
    return int(match.group(1))


def test_stop_keeps_the_partial_text_and_closes_the_provider(
    chat: ChatPage, gateway: Gateway
) -> None:
    expect(chat.stop_button).to_be_disabled()
    chat.ask("Tell me a long story.")
    expect(chat.stop_button).to_be_enabled()
    chat.wait_for_tokens(5)
    session_id = chat.session_id()
    clicked = time.monotonic()
    chat.stop_button.click()

    status = chat.answer().locator(".status")
    expect(status).to_contain_text("AI response stopped by user.")
    expect(chat.stop_button).to_be_disabled()
    partial = chat.answer_text()
    assert _tokens_in(status.inner_text()) == len(partial.split(" "))
    # The fetch was aborted by the browser, not left to finish.
    assert any(
        r.url.endswith("/api/chat/stream") and "ERR_ABORTED" in (r.failure or "")
        for r in chat.failed
    )

    record = gateway.stream_for(session_id)
    assert record["outcome"] == "closed_by_client"
    assert record["ended_at"] - clicked < 1.0
    assert record["sent"] < record["planned"] / 2
    assert record["text"].startswith(partial)
    line = gateway.wait_for(rf"\[SSE\] {session_id} aborted by client/cancel")
    assert "reason=cancel" in line or "reason=disconnect" in line
    assert not any("completed" in x for x in gateway.session_lines(session_id))

    # The demo panel makes the saving visible.
    panel = chat.page.get_by_role("complementary", name="Simulated provider")
    expect(panel).to_contain_text(
        f"generated {record['sent']} of {record['planned']} tokens, stopped by the gateway"
    )
    assert chat.errors() == []


def test_the_next_answer_is_clean_and_its_history_leaves_out_the_stopped_one(
    chat: ChatPage, gateway: Gateway
) -> None:
    chat.ask("First question")
    chat.wait_for_tokens(3)
    chat.stop_button.click()
    expect(chat.answer().locator(".status")).to_contain_text("stopped by user")
    stopped_text = chat.answer_text()

    chat.ask("Second question")
    expect(chat.answer(1)).to_have_attribute("data-status", "completed", timeout=WAIT * 1000)
    second_id = chat.session_id(1)
    record = gateway.stream_for(second_id)
    assert record["outcome"] == "completed"
    # Exactly the second session's tokens, none from the first, and the first
    # answer was not touched.
    assert chat.answer_text(1) == record["text"]
    assert chat.answer_text(0) == stopped_text
    assert chat.session_id(0) != second_id
    expect(chat.answer(1).locator(".status")).to_have_count(0)

    body = json.loads(chat.stream_requests[1].post_data or "")
    assert body["messages"] == [
        {"role": "user", "content": "First question"},
        {"role": "user", "content": "Second question"},
    ]
    assert chat.stream_requests[1].headers["x-session-id"] == second_id
    assert chat.errors() == []


def test_reloading_mid_stream_closes_the_provider(chat: ChatPage, gateway: Gateway) -> None:
    chat.ask("Keep talking")
    chat.wait_for_tokens(3)
    session_id = chat.session_id()
    reloaded = time.monotonic()
    chat.page.reload()
    record = gateway.stream_for(session_id)
    assert record["outcome"] == "closed_by_client"
    assert record["ended_at"] - reloaded < 1.0
    assert record["sent"] < record["planned"]
    gateway.wait_for(rf"\[SSE\] {session_id} aborted by client/cancel")
    expect(chat.stop_button).to_be_disabled()


def test_a_failed_cancel_call_still_stops_cleanly(chat: ChatPage, gateway: Gateway) -> None:
    chat.page.route("**/api/chat/cancel/**", lambda route: route.abort())
    chat.ask("Hello")
    chat.wait_for_tokens(3)
    session_id = chat.session_id()
    chat.stop_button.click()
    expect(chat.answer().locator(".status")).to_contain_text("AI response stopped by user.")
    expect(chat.stop_button).to_be_disabled()
    expect(chat.send_button).to_be_enabled()
    # The aborted fetch alone closes the provider.
    record = gateway.stream_for(session_id)
    assert record["outcome"] == "closed_by_client"
    line = gateway.wait_for(rf"\[SSE\] {session_id} aborted by client/cancel")
    assert "reason=disconnect" in line
    # Chromium itself logs the failed request; the page logs no error of its own.
    assert [e for e in chat.errors() if "/api/chat/cancel/" not in e] == []
    assert all(e.startswith("Failed to load resource") for e in chat.errors())
    warnings = [m.text for m in chat.console if m.type == "warning"]
    assert any(f"cancel of {session_id} failed" in w for w in warnings), warnings


def test_escape_stops_and_enter_sends(chat: ChatPage, gateway: Gateway) -> None:
    chat.message.fill("Via the keyboard")
    chat.message.press("Enter")
    chat.wait_for_tokens(3)
    expect(chat.stop_button).to_be_enabled()
    session_id = chat.session_id()
    chat.page.keyboard.press("Escape")
    expect(chat.answer().locator(".status")).to_contain_text("AI response stopped by user.")
    expect(chat.stop_button).to_be_disabled()
    assert gateway.stream_for(session_id)["outcome"] == "closed_by_client"


def test_an_error_is_shown_readably(context: BrowserContext, gateway: Gateway) -> None:
    # A gateway whose provider refuses connections answers with an `error` event.
    broken = _gateway(
        gateway.worker,
        GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}/v1",
        GATEWAY_MODEL="m",
    )
    try:
        chat = ChatPage(context.new_page(), broken)
        chat.ask("Anyone there?")
        expect(chat.answer()).to_have_attribute("data-status", "error", timeout=WAIT * 1000)
        expect(chat.answer().locator(".status")).to_have_text(
            "Something went wrong: provider refused the connection"
        )
        expect(chat.stop_button).to_be_disabled()
        expect(chat.send_button).to_be_enabled()
        assert chat.page_errors == []
    finally:
        broken.stop()


def test_timeout_and_shutdown_stops_say_so(context: BrowserContext, gateway: Gateway) -> None:
    short = _gateway(gateway.worker, GATEWAY_MAX_DURATION="1")
    try:
        chat = ChatPage(context.new_page(), short)
        chat.ask("Take your time")
        expect(chat.answer().locator(".status")).to_contain_text(
            "AI response stopped: the answer reached its time limit.", timeout=WAIT * 1000
        )
        assert chat.answer_text()
        chat.ask("Again")
        chat.wait_for_tokens(3)
        short.process.terminate()  # SIGTERM: `gateway serve` stops streams, then exits
        expect(chat.answer().locator(".status")).to_contain_text(
            "AI response stopped: the server is restarting.", timeout=WAIT * 1000
        )
        expect(chat.stop_button).to_be_disabled()
        assert chat.errors() == []
    finally:
        short.stop()


def test_stop_while_the_model_thinks_keeps_the_thinking_and_closes_the_provider(
    context: BrowserContext, gateway: Gateway
) -> None:
    reasoner = _gateway(
        gateway.worker,
        GATEWAY_MODEL="simulator-reasoner",
        GATEWAY_SIMULATOR_REASONING_TOKENS="10000",
    )
    try:
        chat = ChatPage(context.new_page(), reasoner)
        chat.ask("Think hard.")
        thinking = chat.answer().locator("details.thinking")
        expect(thinking).to_have_attribute("open", "")
        chat.page.wait_for_function(
            """() => {
                const r = document.querySelector('article.assistant .thinking .reasoning');
                return r && r.textContent.split(' ').length >= 5;
            }""",
            timeout=WAIT * 1000,
        )
        session_id = chat.session_id()
        clicked = time.monotonic()
        chat.stop_button.click()
        expect(chat.answer().locator(".status")).to_contain_text("AI response stopped by user.")
        shown = thinking.locator(".reasoning").inner_text()
        assert len(shown.split(" ")) >= 5
        assert chat.answer_text() == ""

        record = reasoner.stream_for(session_id)
        assert record["outcome"] == "closed_by_client"
        assert record["ended_at"] - clicked < 1.0
        assert record["text"] == ""
        assert record["reasoning"].startswith(shown)
        reasoner.wait_for(rf"\[SSE\] {session_id} aborted by client/cancel")
        assert chat.errors() == []
    finally:
        reasoner.stop()


def test_a_refusal_thinking_in_parts_and_a_failed_generation_show_as_what_they_are(
    context: BrowserContext, gateway: Gateway
) -> None:
    # The simulator's provider modes (issue 32): OpenAI's refusal, Mistral's content
    # parts, OpenRouter's finish_reason "error".
    modes = ("refusal", "parts", "error")
    gateways = [
        _gateway(
            gateway.worker,
            GATEWAY_MODEL=f"simulator-{mode}",
            GATEWAY_SIMULATOR_TOKENS="6",
            GATEWAY_SIMULATOR_REASONING_TOKENS="4",
        )
        for mode in modes
    ]
    try:
        for mode, gw in zip(modes, gateways, strict=True):
            chat = ChatPage(context.new_page(), gw)
            chat.ask("Hello")
            answer = chat.answer()
            status = answer.locator(".status")
            if mode == "refusal":
                expect(answer).to_have_attribute("data-status", "completed", timeout=WAIT * 1000)
                refusal = answer.locator(".refusal")
                expect(refusal).to_have_text(gw.stream_for(chat.session_id())["refusal"])
                assert len(refusal.inner_text().split()) == 6
                assert chat.answer_text() == ""
                expect(status).to_have_text("The model declined to answer.")
                # The refusal goes back in the next request's history as a refusal part,
                # which the gateway accepts (a 400 would end this answer in an error).
                chat.ask("Why not?")
                expect(chat.answer()).to_have_attribute(
                    "data-status", "completed", timeout=WAIT * 1000
                )
            elif mode == "parts":
                expect(answer).to_have_attribute("data-status", "completed", timeout=WAIT * 1000)
                record = gw.stream_for(chat.session_id())
                assert chat.answer_text() == record["text"]
                assert len(record["text"].split()) == 6
                reasoning = answer.locator("details.thinking .reasoning")
                expect(reasoning).to_have_text(record["reasoning"])
                expect(answer.locator(".refusal")).to_have_count(0)
            else:
                expect(answer).to_have_attribute("data-status", "error", timeout=WAIT * 1000)
                expect(status).to_have_text(
                    "Something went wrong: provider ended the answer with an error "
                    "(MALFORMED_FUNCTION_CALL)"
                )
                # What arrived before the failure stays.
                assert len(chat.answer_text().split()) == 6
            assert chat.errors() == []
    finally:
        # Together: on Trio each waits out the browser's idle connections (docs/operations.md).
        with ThreadPoolExecutor() as pool:
            list(pool.map(Gateway.stop, gateways))


def test_a_duplicate_session_id_is_an_error_state_not_a_stop(chat: ChatPage) -> None:
    second: dict[str, Any] = chat.page.evaluate(
        """async () => {
            const { startChat } = await import('/static/client.js');
            let started;
            const firstToken = new Promise((resolve) => { started = resolve; });
            const first = startChat({ messages: [{ role: 'user', content: 'a' }],
                                      sessionId: 'session_1_conflict', onToken: () => started() });
            await firstToken;
            const second = await startChat({ messages: [{ role: 'user', content: 'b' }],
                                             sessionId: 'session_1_conflict' }).done;
            await first.stop();
            return second;
        }"""
    )
    assert second["status"] == "error"
    assert second["code"] == "session_conflict"
    assert second["message"]


def test_works_on_a_narrow_phone_screen(
    playwright: Playwright, gateway: Gateway, tmp_path: Path
) -> None:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
    )
    try:
        page = browser.new_page(viewport={"width": 360, "height": 640}, is_mobile=True)
        chat = ChatPage(page, gateway)
        chat.ask("Small screen")
        chat.wait_for_tokens(3)
        chat.stop_button.click()
        expect(chat.answer().locator(".status")).to_contain_text("stopped by user")
        # Nothing wider than the screen, and both buttons on it.
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        for button in (chat.send_button, chat.stop_button):
            box = button.bounding_box()
            assert box is not None
            assert box["x"] >= 0
            assert box["x"] + box["width"] <= 360
            assert box["height"] >= 40  # a finger's target
    finally:
        browser.close()


@pytest.mark.parametrize("worker", ["asyncio", "trio"])
def test_an_answer_survives_going_offline_and_stop_works_after_a_resume(
    context: BrowserContext, worker: str
) -> None:
    gw = Gateway(
        worker,
        GATEWAY_SIMULATOR_TOKENS="200",
        GATEWAY_SIMULATOR_RATE=str(RATE),
        GATEWAY_RESUME_WINDOW="30",
    )
    # The page talks to the gateway through a relay that "going offline" cuts.
    network = TcpProxy(gw.port)
    try:
        chat = ChatPage(context.new_page(), gw, url=network.url)
        reconnecting = chat.page.locator(".reconnecting")

        def drop_and_return(session_id: str) -> None:
            context.set_offline(True)
            network.cut()
            expect(reconnecting).to_be_visible()
            gw.wait_for(rf"\[SSE\] {session_id} parked")
            context.set_offline(False)
            gw.wait_for(rf"\[SSE\] {session_id} resumed after id \d+")

        # An answer that completes across a dropped connection, with no gap.
        chat.ask("Tell me a story.")
        chat.wait_for_tokens(5)
        first = chat.session_id()
        drop_and_return(first)
        expect(chat.answer().locator(".status")).to_have_count(0)
        chat.page.wait_for_function(
            "() => document.querySelector('article.assistant')?.dataset.status === 'completed'",
            timeout=WAIT * 1000,
        )
        record = gw.stream_for(first)
        assert record["outcome"] == "completed"
        assert chat.answer_text() == record["text"]
        expect(reconnecting).to_have_count(0)

        # Stop after a resume stops the provider.
        chat.ask("Tell me another.")
        chat.wait_for_tokens(5)
        second = chat.session_id()
        drop_and_return(second)
        shown = len(chat.answer_text().split(" "))
        chat.wait_for_tokens(shown + 3)
        chat.stop_button.click()
        expect(chat.answer().locator(".status")).to_contain_text("stopped by user")
        record = gw.stream_for(second)
        assert record["outcome"] == "closed_by_client"
        assert record["sent"] < record["planned"]
        assert record["text"].startswith(chat.answer_text())
        # Chromium logs the cut connections and the failed retries itself; the page
        # raised nothing and logged nothing else.
        assert chat.page_errors == []
        assert all(e.startswith("Failed to load resource: net::") for e in chat.errors())
    finally:
        network.close()
        gw.stop()
    assert not any("Traceback" in line for line in gw.lines), "\n".join(gw.lines)


def test_the_model_picker_lists_the_routes_and_an_answer_says_who_served(
    context: BrowserContext, gateway: Gateway, tmp_path: Path
) -> None:
    # Two simulated providers behind one route: the first answers 429, the second serves.
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[providers.busy]\nsimulate = { status = 429 }\n"
        "[providers.healthy]\nsimulate = { tokens = 5 }\n"
        '[models.chat]\ntargets = [{ provider = "busy" }, { provider = "healthy" }]\n'
        '[models.solo]\ntargets = [{ provider = "healthy" }]\n'
    )
    routed = _gateway(gateway.worker, GATEWAY_CONFIG=str(config))
    try:
        chat = ChatPage(context.new_page(), routed)
        expect(chat.page.locator("#model option")).to_have_text(["chat", "solo"])
        chat.ask("Hello")
        answer = chat.answer()
        expect(answer).to_have_attribute("data-status", "completed", timeout=WAIT * 1000)
        expect(answer).to_have_attribute("data-provider", "healthy")
        expect(answer.locator(".served-by")).to_have_text(" Served by healthy (chat).")
        assert len(chat.answer_text().split()) == 5
        chat.page.locator("#model").select_option("solo")
        chat.ask("Again")
        expect(chat.answer()).to_have_attribute("data-status", "completed", timeout=WAIT * 1000)
        expect(chat.answer().locator(".served-by")).to_have_text(" Served by healthy (solo).")
        assert chat.errors() == []
    finally:
        routed.stop()
