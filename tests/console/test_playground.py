"""The playground and the requests view in a real browser, on simulated phones at the real rate
(~22.7 tok/s): streaming token by token, stop cancelling on the phone, model markup staying text,
reasoning apart, raw completions, keyboard use, and the requests view's filters."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.console.browser import PHONE, Console, console_server, expect, open_page, wait_until

pytestmark = pytest.mark.timeout(180)

# what a hostile model (or a prompt injection through one) might say
MARKUP = ('<script>window.__pwned = "script"</script><img src=x onerror="window.__pwned = \'img\'">'
          '<b>bold?</b> & <a href="javascript:window.__pwned=1">link</a>')


@pytest.fixture(scope="module")
def pg() -> Iterator[Console]:
    with console_server(2) as console:
        yield console


def settings(page: Any, *, max_tokens: int, thinking: bool = False, raw: bool = False) -> None:
    if page.locator("#pg-settings-box").get_attribute("open") is None:  # folded away on a phone's screen
        page.click("#pg-settings-box > summary")
    page.locator('input[name="pg-mode"][value="raw"]' if raw else 'input[name="pg-mode"][value="chat"]').check()
    page.fill("#pg-max-tokens", str(max_tokens))
    page.fill("#pg-temperature", "0")
    if not raw:
        page.locator("#pg-thinking").set_checked(thinking)


def send(page: Any, text: str) -> Any:
    """Types ``text`` and presses Enter; the new reply's locator."""
    before = page.locator("#pg-log li.assistant").count()
    page.fill("#pg-input", text)
    page.press("#pg-input", "Enter")
    reply = page.locator("#pg-log li.assistant").nth(before)
    reply.wait_for()
    return reply


def finished(reply: Any) -> None:
    expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=60_000)


def stat(reply: Any, role: str) -> str:
    return str(reply.locator(f'[data-role="{role}"] b').inner_text())


def test_a_chat_reply_streams_token_by_token_with_its_numbers(browser: Any, pg: Console) -> None:
    with open_page(browser, pg.base_url + "/#playground") as (page, _):
        settings(page, max_tokens=40)
        reply = send(page, "Tell me about phones")
        content = reply.locator('[data-role="content"]')
        lengths: list[int] = []
        deadline = time.monotonic() + 30
        while "streaming" in (reply.get_attribute("class") or "") and time.monotonic() < deadline:
            n = len(content.inner_text())
            if not lengths or n != lengths[-1]:
                lengths.append(n)
            time.sleep(0.02)
        finished(reply)
        # 40 tokens over ~1.8 s: seen growing many times, not appearing at once
        assert len([n for n in lengths if n > 0]) >= 5, lengths
        assert stat(reply, "phone") in {p["serial"] for p in pg.devices()}
        assert stat(reply, "completion-tokens") == "40" and stat(reply, "finish") == "length"
        assert int(stat(reply, "prompt-tokens")) > 5
        assert stat(reply, "ttft").endswith(("ms", " s"))
        assert 5 < float(stat(reply, "tps")) < 60  # about the phone's 22.7 tok/s
        assert stat(reply, "cached-tokens").isdigit()

        second = send(page, "And then?")  # the conversation goes on: both turns are sent
        finished(second)
        assert page.locator("#pg-log li.user").count() == 2
        assert int(stat(second, "prompt-tokens")) > int(stat(reply, "prompt-tokens")) + 40


def test_stop_cancels_the_reply_on_the_phone(browser: Any, pg: Console) -> None:
    with open_page(browser, pg.base_url + "/#playground") as (page, _):
        settings(page, max_tokens=1000)  # ~44 s at the real rate
        reply = send(page, "Write a long story")
        expect(reply.locator('[data-role="content"]')).not_to_have_text("", timeout=20_000)
        busy = [p for p in pg.devices() if p["request_in_flight"]]
        assert len(busy) == 1
        page.click("#pg-stop")
        expect(reply.locator('[data-role="note"]')).to_have_text("Stopped: cancelled on the phone.")
        serial = busy[0]["serial"]
        wait_until(lambda: pg.phone(serial)["request_in_flight"] is None, 5, "the phone freed")
        served = pg.phone(serial)["tokens_served"]
        time.sleep(0.5)  # ~11 tokens' time: none more may come
        assert pg.phone(serial)["tokens_served"] == served
        row = next(r for r in pg.requests(phone=serial) if r["endpoint"] == "/v1/chat/completions")
        assert row["outcome"] == "cancelled" and row["completion_tokens"] < 1000
        assert page.locator("#pg-send").is_enabled() and page.locator("#pg-stop").is_disabled()


def test_markup_from_the_model_stays_text(browser: Any, pg: Console) -> None:
    for phone in pg.lab.phones:
        phone.configure(answer=MARKUP)
    try:
        with open_page(browser, pg.base_url + "/#playground") as (page, _):
            settings(page, max_tokens=200)
            reply = send(page, f"Say this: {MARKUP}")
            finished(reply)
            assert reply.locator('[data-role="content"]').inner_text() == MARKUP, reply.inner_text()
            assert page.locator("#pg-log li.user .text").last.inner_text() == f"Say this: {MARKUP}"
            # no element made from it: the message bodies hold text nodes only
            assert page.locator("#pg-log .text *:not(.prompt)").count() == 0
            assert page.locator("#pg-log img, #pg-log script, #pg-log a").count() == 0
            time.sleep(0.3)  # an <img onerror> would have fired by now
            assert page.evaluate("() => window.__pwned") is None
            assert stat(reply, "finish") == "stop"
    finally:
        for phone in pg.lab.phones:
            phone.configure(answer=None)


def test_thinking_shows_the_reasoning_apart(browser: Any, pg: Console) -> None:
    with open_page(browser, pg.base_url + "/#playground") as (page, _):
        settings(page, max_tokens=60, thinking=True)
        reply = send(page, "Think first, then answer")
        finished(reply)
        reasoning = reply.locator('[data-role="reasoning"]').inner_text()
        content = reply.locator('[data-role="content"]').inner_text()
        assert len(reasoning) > 20 and "<think>" not in reasoning + content and "</think>" not in content
        assert reasoning not in content


def test_raw_completion_continues_the_prompt(browser: Any, pg: Console) -> None:
    with open_page(browser, pg.base_url + "/#playground") as (page, _):
        settings(page, max_tokens=20, raw=True)
        expect(page.locator("#pg-system")).to_be_hidden()
        reply = send(page, "Once upon a time")
        finished(reply)
        assert reply.locator(".prompt").inner_text() == "Once upon a time"
        assert len(reply.locator('[data-role="content"]').inner_text()) > len("Once upon a time")
        assert stat(reply, "completion-tokens") == "20"
        row = pg.requests(limit=1)[0]
        assert row["endpoint"] == "/v1/completions" and row["outcome"] == "ok"


def test_keyboard_alone_switches_views_sends_and_stops(browser: Any, pg: Console) -> None:
    with open_page(browser, pg.base_url + "/#farm") as (page, _):
        page.locator("#tab-farm").focus()
        page.keyboard.press("ArrowRight")
        expect(page.locator("#view-playground")).to_be_visible()
        expect(page.locator("#tab-playground")).to_be_focused()
        settings(page, max_tokens=1000)
        page.locator("#pg-input").focus()
        page.keyboard.type("Go on and on")
        page.keyboard.press("Enter")
        reply = page.locator("#pg-log li.assistant").last
        expect(reply.locator('[data-role="content"]')).not_to_have_text("", timeout=20_000)
        page.keyboard.press("Escape")
        expect(reply.locator('[data-role="note"]')).to_have_text("Stopped: cancelled on the phone.")
        page.locator("#tab-playground").focus()
        page.keyboard.press("End")
        expect(page.locator("#view-requests")).to_be_visible()


def test_a_phone_failing_mid_reply_shows_the_error(browser: Any, pg: Console) -> None:
    for phone in pg.lab.phones:
        phone.configure(crash_after=5)  # the phone's process dies after 5 tokens of any request
    try:
        with open_page(browser, pg.base_url + "/#playground") as (page, _):
            settings(page, max_tokens=100)
            reply = send(page, "Keep going")
            finished(reply)
            note = reply.locator('[data-role="note"]')
            expect(note).to_have_class(re.compile(r"\bbad\b"))
            assert note.inner_text().startswith("Error ")
            assert len(reply.locator('[data-role="content"]').inner_text()) > 0  # what came before stays
    finally:
        for phone in pg.lab.phones:
            phone.configure(crash_after=None)
    wait_until(lambda: all(p["state"] == "ready" for p in pg.devices()), 60, "the phones restarted")
    assert any(r["outcome"] == "error" for r in pg.requests(status="error"))


def test_requests_view_lists_and_filters(browser: Any, pg: Console) -> None:
    with open_page(browser, pg.base_url + "/#requests") as (page, _):
        rows = page.locator("#rq-body tr")
        expect(rows.first).to_be_visible()
        assert rows.count() == len(pg.requests(limit=300))
        page.select_option("#rq-status", "ok")  # the server's warm-up request at least
        expect(page.locator('#rq-body tr[data-outcome="ok"]').first).to_be_visible()
        expect(page.locator('#rq-body tr:not([data-outcome="ok"])')).to_have_count(0)
        page.select_option("#rq-status", "")
        serial = pg.lab.phones[0].serial
        page.select_option("#rq-phone", serial)
        expect(page.locator(f'#rq-body tr:not([data-phone="{serial}"])')).to_have_count(0)
        expect(page.locator(f'#rq-body tr[data-phone="{serial}"]')).to_have_count(len(pg.requests(phone=serial)))
        page.select_option("#rq-status", "error")
        if not pg.requests(phone=serial, status="error"):
            expect(page.locator("#rq-empty")).to_be_visible()
            expect(page.locator("#rq-empty")).to_contain_text("No request matches")


def test_playground_and_requests_screenshots(browser: Any, pg: Console, shots: Path) -> None:
    with open_page(browser, pg.base_url + "/#playground") as (page, _):
        page.fill("#pg-system", "You are a concise assistant.")
        settings(page, max_tokens=60, thinking=True)
        finished(send(page, "What is the capital of France?"))
        settings(page, max_tokens=40)
        finished(send(page, "And of Italy?"))
        page.screenshot(path=str(shots / "playground-wide.png"), full_page=True)
        page.click("#tab-requests")
        expect(page.locator("#rq-body tr").first).to_be_visible()
        page.screenshot(path=str(shots / "requests-wide.png"), full_page=True)
    with open_page(browser, pg.base_url + "/#playground", viewport=PHONE, dark=True) as (page, _):
        settings(page, max_tokens=30)
        finished(send(page, "Hello from my phone"))
        page.screenshot(path=str(shots / "playground-phone.png"), full_page=True)
        page.click("#tab-requests")
        expect(page.locator("#rq-body tr").first).to_be_visible()
        page.screenshot(path=str(shots / "requests-phone.png"), full_page=True)


def test_a_request_row_can_be_selected_while_new_ones_come_in(browser: Any, pg: Console) -> None:
    """The requests view polled every 1.5 s and rebuilt its table each time: a request id or an error
    selected to copy was gone at the next poll. Rows stay as they are; new ones come in above."""
    with open_page(browser, pg.base_url + "/#requests") as (page, _):
        rows = page.locator("#rq-body tr")
        expect(rows.first).to_be_visible()
        cell = '#rq-body tr:first-child td[data-label="Request"]'
        chosen = page.evaluate("""(selector) => {
            const range = document.createRange();
            range.selectNodeContents(document.querySelector(selector));
            getSelection().removeAllRanges();
            getSelection().addRange(range);
            return getSelection().toString();
        }""", cell)
        count = rows.count()
        for n in (1, 2):  # a new request, seen by a poll; twice
            httpx.post(pg.base_url + "/tokenize", json={"model": pg.model, "prompt": "hi"}, timeout=30).raise_for_status()
            expect(rows).to_have_count(min(count + n, 300))
        assert chosen and page.evaluate("() => getSelection().toString()") == chosen


def test_a_slow_server_does_not_collect_the_requests_polls(browser: Any, pg: Console) -> None:
    """The view polled every 1.5 s whether the last poll had come back or not: with the server slow to
    answer (its event loop held, a loaded machine) polls piled up, each holding one of the browser's six
    connections to the server (the event stream holds one, a chat another). One poll at a time now."""
    held: list[Any] = []
    with open_page(browser, pg.base_url + "/#farm") as (page, _):
        page.route("**/v1/requests*", lambda route: held.append(route))  # each poll waits here until let through
        page.click("#tab-requests")
        wait_until(lambda: len(held) >= 1, 10, "the first poll")
        page.wait_for_timeout(5_000)  # three polls' time
        assert len(held) == 1, [r.request.url for r in held]
        held[0].continue_()
        page.unroute("**/v1/requests*")
        expect(page.locator("#rq-body tr").first).to_be_visible()


def test_a_message_stopped_before_any_reply_says_it_is_left_out(browser: Any, pg: Console) -> None:
    """Stop before the first token (here while the message waits for a phone): the turn was dropped
    from what the next message sends, but still shown like any other, so the page showed a
    conversation the model never got. It says so now; the next message goes without it."""
    blockers = [threading.Thread(target=httpx.post, args=(pg.base_url + "/v1/completions",), daemon=True,
                                 kwargs={"json": {"model": pg.model, "prompt": "Go on", "max_tokens": 60,
                                                  "ignore_eos": True}, "timeout": 60})
                for _ in pg.lab.phones]
    with open_page(browser, pg.base_url + "/#playground") as (page, _):
        settings(page, max_tokens=20)
        for b in blockers:  # every phone busy: the next message waits in the queue
            b.start()
        wait_until(lambda: all(p["request_in_flight"] for p in pg.devices()), 20, "the phones busy")
        reply = send(page, "This one waits")
        wait_until(lambda: any(r["outcome"] == "running" and r["endpoint"] == "/v1/chat/completions"
                               for r in pg.requests(limit=5)), 10, "the message queued")
        page.click("#pg-stop")
        expect(reply.locator('[data-role="note"]')).to_have_text("Stopped: cancelled on the phone.")
        assert reply.locator('[data-role="content"]').inner_text() == ""
        first = page.locator("#pg-log li.user").first
        expect(first).to_have_attribute("data-unanswered", "1")
        expect(first.locator('[data-role="note"]')).to_contain_text("left out of the conversation")
        for b in blockers:
            b.join(60)
        finished(second := send(page, "Hello"))
        expect(page.locator("#pg-log li.user").last).not_to_have_attribute("data-unanswered", "1")
        assert stat(second, "finish") in ("length", "stop")
