"""The chat page at `/`: one static file (qwen2vl/web/index.html), no build step, no CDN.

Served with a Content-Security-Policy that allows only the page's own inline script and style
(by hash), same-origin fetches, and data:/blob: pictures. The page already inserts model output
as text only; the policy is the second wall: even an injected <script> or onerror= would not run.
The page holds no data, so it needs no API key; the key goes with its API calls.
"""

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = files("qwen2vl") / "web" / "index.html"  # where the page is: asked here only


def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


def page_headers(html: str) -> dict[str, str]:
    """Security headers for `html`, with the hashes of its inline <script> and <style> blocks."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


def add_web_page(app: FastAPI) -> bool:
    """Serve the chat page at GET / (read once, at startup); False, and no route, when this install
    has no page."""
    if not PAGE.is_file():
        return False
    html = page_html()
    headers = page_headers(html)

    @app.get("/", include_in_schema=False)
    async def web_page():
        return HTMLResponse(html, headers=headers)

    return True
