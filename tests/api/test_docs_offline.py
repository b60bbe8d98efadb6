"""`/docs` works offline: Swagger UI and everything it loads come from the gateway itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx

from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import FakeOpenAI


class _Refs(HTMLParser):
    """Every URL a page makes the browser load: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is not None and (tag, name) in {("script", "src"), ("link", "href"), ("img", "src")}:
                self.refs.append((tag, value))


def test_docs_page_and_every_file_it_loads_are_served_by_the_gateway(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    app = make_app(models=[model_entry("gpt-4o-mini", upstream)])
    with httpx.Client(timeout=30) as http:
        page_url = app.base_url + "/docs"
        page = http.get(page_url)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        parser = _Refs()
        parser.feed(page.text)
        refs = [ref for _, ref in parser.refs]
        assert {tag for tag, _ in parser.refs} >= {"script", "link"}, page.text
        # Nothing absolute, nothing protocol-relative: no CDN.
        assert not [r for r in refs if urlsplit(r).scheme or r.startswith("//")], refs
        assert not re.search(r"https?://", page.text)
        # The browser may load nothing from elsewhere.
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "http" not in csp
        bodies = {}
        for ref in refs:
            url = urljoin(page_url, ref)
            assert url.startswith(app.base_url + "/"), url
            resp = http.get(url)
            assert resp.status_code == 200, (ref, resp.status_code)
            assert resp.content, ref
            bodies[ref] = resp
        scripts = [r for tag, r in parser.refs if tag == "script"]
        js = "".join(bodies[r].text for r in scripts)
        assert "SwaggerUIBundle" in js and len(js) > 500_000  # the real Swagger UI, not a stub
        assert any(bodies[r].headers["content-type"].startswith("text/css") for r in refs)
        # The initializer points at our own document, and turns the online validator off.
        init = bodies[scripts[-1]].text
        spec_url = re.search(r'url:\s*"([^"]+)"', init)
        assert spec_url is not None
        assert "validatorUrl: null" in init
        spec = http.get(urljoin(page_url, spec_url.group(1)))
        assert spec.status_code == 200 and spec.json()["openapi"].startswith("3.0")
        assert http.get(page_url, params={"asset": "../../etc/passwd"}).status_code == 404
