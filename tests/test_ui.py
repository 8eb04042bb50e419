"""Tests for nanochat/ui.html in headless Chromium against a real chat_web server: send a message,
watch tokens stream in, stop, regenerate, edit, see a server error, start a new chat, on a
desktop and a phone-width screen. Screenshots go to tmp_path (and $NANOCHAT_TEST_ARTIFACTS)."""

import os
import shutil

import pytest

from test_chat_web import Server, chat_base_dir  # noqa: F401  (chat_base_dir: the session fixture with the tiny models)

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def ui_server(chat_base_dir):  # noqa: F811
    s = Server(chat_base_dir, "--model-tag", "chatty", "--max-tokens", "4000")
    yield s
    s.stop()


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def save_screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("NANOCHAT_TEST_ARTIFACTS"):
        os.makedirs(os.environ["NANOCHAT_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(path, os.path.join(os.environ["NANOCHAT_TEST_ARTIFACTS"], name))
    return path


def assistant_text(page):
    return page.locator(".msg.assistant .bubble").last.inner_text()


def test_send_stream_stop_regenerate_edit_new_chat(ui_server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(ui_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('nanochat-sft-chatty')")
    assert page.locator("#send").is_disabled()
    page.click("#settings-toggle")
    page.fill("#max-tokens", "4000")  # long replies (~10 s), so there is time to press stop
    page.click("#settings-toggle")

    # type a message; tokens stream into the assistant's bubble
    page.fill("#input", "Hello! What can you do?")
    page.keyboard.press("Enter")
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

    # a server error is shown in the conversation
    page.click("#settings-toggle")
    page.fill("#max-tokens", "4096")  # + the prompt is more than the 4096-token context: a 400 from the server
    page.fill("#input", "one more")
    page.keyboard.press("Enter")
    error = page.wait_for_selector(".error")
    assert "context" in error.inner_text() and "4096" in error.inner_text()
    save_screenshot(page, tmp_path, "chat_error.png")

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
    page = browser.new_page(viewport={"width": 390, "height": 760}, device_scale_factor=2)
    page.goto(ui_server.url + "/")
    page.click("#settings-toggle")
    page.fill("#max-tokens", "4000")
    page.click("#settings-toggle")
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
