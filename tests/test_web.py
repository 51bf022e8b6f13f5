"""The web page in a real browser (Debian's chromium, driven by Playwright) against the real server.

The model is the tiny random-weight checkpoint, so the answers are forced: a wrapper around the
engine's `generate` adds a logits processor that emits a chosen text token by token (still
streamed by the real engine and server), and keeps special tokens so the box markup survives.
A screenshot of the grounded answer is saved in the test's temporary folder; the README's picture,
docs/web_screenshot.png, is refreshed only on request, so a test run leaves the tree clean:

    QWEN2VL_UPDATE_SCREENSHOT=1 python -m pytest tests/test_web.py -k upload
"""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tests.helpers.grounding_cases import CASES
from tests.helpers.media import mp4_bytes

CHROMIUM = os.environ.get("QWEN2VL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install playwright)")
if CHROMIUM is None:
    pytest.skip("needs a system Chromium (apt-get install chromium)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "web_screenshot.png"
UPDATE_SCREENSHOT = "QWEN2VL_UPDATE_SCREENSHOT"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]
GROUNDED = ("The <|object_ref_start|>blue square<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|> "
            "sits in the **middle** of the picture.")
HOSTILE = ("<img src=x onerror=\"document.title='pwned'\"> <script>document.title='pwned'</script> "
           "[click](javascript:alert(1)) and `<b>code</b>`\n\n```html\n<i>kept as text</i>\n```")


@pytest.fixture(scope="module")
def server():
    from qwen2vl.server.limits import ServerLimits
    from tests.helpers.server import running_server

    with running_server(ServerLimits(), api_key=None) as (url, app):
        service = app.state.service
        forced = {"text": GROUNDED}
        tokenizer, eos = service.processor.tokenizer, service.processor.eos_token_ids[0]
        generate = service.engine.generate

        def generate_forced(prompt, params, **kw):
            ids = tokenizer.encode(forced["text"], allow_special=True) + [eos]

            def force(done, logits):  # the next forced id gets all the probability
                out = torch.full_like(logits, float("-inf"))
                out[ids[min(len(done), len(ids) - 1)]] = 0.0
                return out

            params.logits_processors.append(force)
            params.skip_special_tokens = False
            return generate(prompt, params, **kw)

        service.engine.generate = generate_forced
        yield url, forced


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=BROWSER_ARGS, viewport={"width": 1100, "height": 900})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server[0] + "/")
        yield page
        context.close()
        # the 400 for skip_special_tokens (if the server refuses it) is logged by the browser; nothing else
        assert not [e for e in errors if "400" not in e], errors


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "square.png"
    image = Image.new("RGB", (320, 240), (235, 235, 235))
    ImageDraw.Draw(image).rectangle((80, 60, 240, 180), fill=(40, 70, 200))
    image.save(path)
    return path


def ask(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").last
    page.wait_for_function("el => ['done', 'error', 'stopped'].includes(el.dataset.state)",
                           arg=answer.element_handle(), timeout=60_000)
    return answer


def test_upload_ask_stream_and_draw_the_box(page, picture, tmp_path):
    before = SCREENSHOT.stat().st_mtime_ns if SCREENSHOT.exists() else None
    page.set_input_files("#file", str(picture))
    page.wait_for_selector("#attachments .thumb img")
    answer = ask(page, "Where is the blue square?")
    assert answer.get_attribute("data-state") == "done", answer.inner_text()
    assert int(answer.get_attribute("data-chunks")) > 5  # streamed in pieces, not one block
    body = answer.locator(".body")
    assert "blue square" in body.inner_text() and "sits in the middle of the picture." in body.inner_text()
    assert "<|" not in body.inner_text()  # markup rendered, not shown
    assert body.locator("strong").inner_text() == "middle"
    assert "tokens/s" in answer.locator(".meta").inner_text()
    # the box lies over the square: (250,250)-(750,750) of 1000 = the middle half of the picture
    img = answer.locator(".grounded img").bounding_box()
    box = answer.locator(".grounded rect").bounding_box()
    assert answer.locator(".grounded rect").count() == 1
    for got, want in [(box["x"], img["x"] + img["width"] / 4), (box["y"], img["y"] + img["height"] / 4),
                      (box["width"], img["width"] / 2), (box["height"], img["height"] / 2)]:
        assert abs(got - want) < 4, (box, img)
    assert answer.locator(".grounded .label").inner_text() == "blue square"
    update = os.environ.get(UPDATE_SCREENSHOT) == "1"
    page.screenshot(path=str(SCREENSHOT if update else tmp_path / "web_screenshot.png"), full_page=True)
    if not update:  # a test run leaves the tree as it found it
        assert (SCREENSHOT.stat().st_mtime_ns if SCREENSHOT.exists() else None) == before


def test_model_output_is_text_not_html(page, server):
    server[1]["text"] = HOSTILE
    try:
        answer = ask(page, "Say something nasty.")
    finally:
        server[1]["text"] = GROUNDED
    assert answer.get_attribute("data-state") == "done", answer.inner_text()  # the history was accepted
    body = answer.locator(".body")
    text = body.inner_text()
    assert "<img src=x onerror=" in text and "<script>" in text and "<i>kept as text</i>" in text
    assert body.locator("img, script, i, b, a").count() == 0  # nothing became an element
    assert page.title() == "qwen2vl"
    assert body.locator("pre code").inner_text() == "<i>kept as text</i>"


def test_page_parses_grounding_like_python(page):
    from qwen2vl.grounding import parse_grounding

    for text, _, _, _ in CASES:
        want = [[r.label, [list(p) for p in r.points]] for r in parse_grounding(text, 1000, 1000)]
        got = page.evaluate("t => qwen2vl.parseGrounding(t).map(r => [r.label, "
                            "r.points.map(p => p.map(Math.round))])", text)
        assert got == want, text


def test_page_is_served_with_a_strict_policy(server):
    import httpx

    res = httpx.get(server[0] + "/")
    assert res.status_code == 200 and "text/html" in res.headers["content-type"]
    csp = res.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp and "connect-src 'self'" in csp
    # no CDN or other outside resource: the machine may be offline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", res.text) and "@import" not in res.text


def test_drop_paste_and_stop(page, server, picture):
    import base64

    page.click("#new-chat")
    png = base64.b64encode(picture.read_bytes()).decode()
    page.evaluate("""png => {
        const file = () => new File([Uint8Array.from(atob(png), c => c.charCodeAt(0))], "x.png", {type: "image/png"});
        const dropped = new DataTransfer(); dropped.items.add(file());
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));
        const pasted = new DataTransfer(); pasted.items.add(file());
        document.querySelector("#input").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: pasted, bubbles: true, cancelable: true}));
    }""", png)
    page.wait_for_function("() => document.querySelectorAll('#attachments .thumb').length === 2")
    clip = picture.parent / "clip.mp4"
    clip.write_bytes(mp4_bytes(frames=8, width=64, height=48, fps=4))
    page.set_input_files("#file", str(clip))  # a video goes up as a video_url data: URI
    page.wait_for_selector("#attachments .thumb video")
    server[1]["text"] = "word " * 2000  # far longer than max_tokens: only Stop ends it early
    try:
        page.fill("#input", "Talk for a long time.")
        page.press("#input", "Enter")
        answer = page.locator(".msg.assistant").last
        page.wait_for_function("el => Number(el.dataset.chunks) >= 3", arg=answer.element_handle())
        page.click("#stop")
        page.wait_for_function("el => el.dataset.state === 'stopped'", arg=answer.element_handle(), timeout=5_000)
    finally:
        server[1]["text"] = GROUNDED
    assert int(answer.get_attribute("data-chunks")) < 400  # stopped well before max_tokens (512)
    assert answer.get_attribute("data-state") == "stopped"  # not an error: the server took the video
    assert page.locator(".msg.user").last.locator(".media img").count() == 2
    assert page.locator(".msg.user").last.locator(".media video").count() == 1
    assert page.is_visible("#send") and not page.is_visible("#stop")
