"""Writes docs/stopped-answer.png: the reference page with a stopped answer.

``.venv/bin/python scripts/screenshot.py`` (needs Debian's chromium, as the tests do).
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import Gateway  # noqa: E402
from tests.test_page import CHROMIUM, ChatPage  # noqa: E402


def main() -> None:
    # 90 tokens: the simulator's text to its last full stop.
    gateway = Gateway("asyncio", GATEWAY_SIMULATOR_TOKENS="90")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 800, "height": 600})
            chat = ChatPage(page, gateway)
            chat.ask("Why is the sky blue?")
            expect(chat.answer()).to_have_attribute("data-status", "completed", timeout=10_000)
            chat.ask("And why are sunsets red?")
            chat.wait_for_tokens(12)
            chat.stop_button.click()
            expect(page.get_by_role("complementary")).to_be_visible()
            page.locator("article.assistant details").last.evaluate("d => d.open = true")
            page.screenshot(path=ROOT / "docs" / "stopped-answer.png")
            browser.close()
    finally:
        gateway.stop()


if __name__ == "__main__":
    main()
