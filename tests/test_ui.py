"""Tests for nanochat/ui.html in headless Chromium (Debian's /usr/bin/chromium) against real
chat_web servers: the first message on the tiny run's model; send a message, watch tokens stream
in, stop, regenerate, edit, see a server error, start a new chat, on a desktop and a phone-width
screen. Any browser console error or uncaught page error fails a test. Screenshots go to
tmp_path (and $NANOCHAT_TEST_ARTIFACTS)."""

import os
import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium not installed: apt-get install chromium")


@pytest.fixture(scope="module")
def ui_server(start_server):
    """Long replies from the chatty model (context 4096), so there is time to press stop."""
    return start_server("--model-tag", "chatty", "--max-tokens", "4000")


@pytest.fixture(scope="module")
def tiny_server(start_server):
    """What the tiny run leaves: a model with a 512-token context, served with the default --max-tokens
    (and, as `./chat.sh -t 0.9 -k 7` would, other sampling defaults)."""
    return start_server("--model-tag", "tiny", "--temperature", "0.9", "--top-k", "7")


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url, **options):
    """A new page at `url` and the list its console errors and uncaught exceptions are appended to."""
    page, errors = browser.new_page(**options), []
    page.on("console", lambda m: errors.append(f"console: {m.text} ({m.location['url']})") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url)
    return page, errors


def save_screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("NANOCHAT_TEST_ARTIFACTS"):
        os.makedirs(os.environ["NANOCHAT_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(path, os.path.join(os.environ["NANOCHAT_TEST_ARTIFACTS"], name))
    return path


def assistant_text(page):
    return page.locator(".msg.assistant .bubble").last.inner_text()


def test_first_message_on_a_tiny_context_model(tiny_server, browser, tmp_path):
    """A fresh page sends no max_tokens, so the reply gets the room the prompt leaves in the
    512-token context (the page used to send 512: a 400 at the very first message)."""
    page, errors = open_page(browser, tiny_server.url + "/", viewport={"width": 1100, "height": 760})
    page.wait_for_function("document.getElementById('model').textContent.startsWith('nanochat-sft-tiny')")
    page.fill("#input", "Why is the sky blue?")
    with page.expect_request("**/chat/completions") as request:
        page.keyboard.press("Enter")
    assert request.value.post_data_json["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert "max_tokens" not in request.value.post_data_json
    sent = request.value.post_data_json
    assert (sent["temperature"], sent["top_k"]) == (0.9, 7)  # the server's defaults, not the page's own
    assert page.locator("#temperature-value").inner_text() == "0.90"
    page.wait_for_selector(".msg.assistant")
    page.wait_for_function("!document.body.classList.contains('busy')", timeout=60000)  # the reply ended
    save_screenshot(page, tmp_path, "chat_tiny_context.png")
    assert page.locator(".error").count() == 0
    assert len(assistant_text(page)) > 100  # ~500 tokens: the model never stops before the context is full
    assert errors == []


def test_send_stream_stop_regenerate_edit_new_chat(ui_server, browser, tmp_path):
    page, errors = open_page(browser, ui_server.url + "/", viewport={"width": 1100, "height": 760})
    page.wait_for_function("document.getElementById('model').textContent.startsWith('nanochat-sft-chatty')")
    assert page.locator("#send").is_disabled()
    page.click("#settings-toggle")
    page.fill("#max-tokens", "4000")  # a value the user sets is sent as is
    page.click("#settings-toggle")

    # type a message; tokens stream into the assistant's bubble
    page.fill("#input", "Hello! What can you do?")
    with page.expect_request("**/chat/completions") as request:
        page.keyboard.press("Enter")
    assert request.value.post_data_json["max_tokens"] == 4000
    page.wait_for_selector(".msg.user .bubble:has-text('Hello! What can you do?')")
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').innerText.length > 5")
    first = len(assistant_text(page))
    page.wait_for_function(f"document.querySelector('.msg.assistant .bubble').innerText.length > {first}")
    save_screenshot(page, tmp_path, "chat_streaming.png")

    # stop: the button goes back to send and the text stops growing
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    stopped = assistant_text(page)
    page.wait_for_timeout(700)
    assert assistant_text(page) == stopped and len(stopped) > 5
    assert page.locator(".msg").count() == 2

    # regenerate: a new reply replaces the last one
    page.hover(".msg.assistant")
    page.click(".msg.assistant .actions button:has-text('Regenerate')")
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').innerText.length > 5")
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    assert page.locator(".msg").count() == 2

    # edit the user message: the conversation restarts from the edited turn
    page.hover(".msg.user")
    page.click(".msg.user .actions button:has-text('Edit')")
    page.fill(".edit-box textarea", "A different question")
    page.click(".edit-box button:has-text('Send')")
    page.wait_for_selector(".msg.user .bubble:has-text('A different question')")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble') && document.querySelector('.msg.assistant .bubble').innerText.length > 5")
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    assert page.locator(".msg").count() == 2
    save_screenshot(page, tmp_path, "chat_desktop.png")
    assert errors == []

    # a server error is shown in the conversation (Chromium logs the failed request, and only that)
    page.click("#settings-toggle")
    page.fill("#max-tokens", "4096")  # + the prompt is more than the 4096-token context: a 400 from the server
    page.fill("#input", "one more")
    page.keyboard.press("Enter")
    error = page.wait_for_selector(".error")
    assert "context" in error.inner_text() and "4096" in error.inner_text()
    save_screenshot(page, tmp_path, "chat_error.png")
    assert len(errors) == 1 and "status of 400" in errors.pop(), errors

    # tool calls and their outputs are drawn as their own blocks
    page.evaluate("""messages = [{role: "user", content: "What is 12 * 34?"}, {role: "assistant", content: [
        {type: "text", text: "Let me calculate that."}, {type: "python", text: "12 * 34"},
        {type: "python_output", text: "408"}, {type: "text", text: "12 × 34 = 408."}]}]; render();""")
    assert page.locator(".part-python").inner_text() == "12 * 34" and page.locator(".part-output").inner_text() == "408"
    assert page.locator(".part-python").evaluate("e => getComputedStyle(e).fontFamily").startswith("ui-monospace")
    save_screenshot(page, tmp_path, "chat_tools.png")

    # new chat empties the conversation
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    assert errors == []


def test_phone_width(ui_server, browser, tmp_path):
    page, errors = open_page(browser, ui_server.url + "/", viewport={"width": 390, "height": 760}, device_scale_factor=2)
    page.fill("#input", "Hi from a phone")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble') && document.querySelector('.msg.assistant .bubble').innerText.length > 40")
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    # nothing sticks out sideways, and the composer is on screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#composer").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 760
    save_screenshot(page, tmp_path, "chat_phone.png")
    assert errors == []
