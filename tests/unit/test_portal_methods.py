"""Methods the portal's routes do not take, and a GET of a form's action.

After "Continue" or "I promise to pay" the address bar shows ``/continue`` or ``/promise``;
Enter there, the history or a restored session sends a ``GET``. That used to be aiohttp's plain
``405`` ("405: Method Not Allowed", no ``no-store``, no CSP, no way back); now it is a ``303`` to
``portal.url``, which shows where the caller stands, and nothing is done. Any other method a
route does not take gets the portal's small HTML error page: ``405`` with ``Allow``.
"""

from __future__ import annotations

import pytest
from test_portal import NOTICE, PORTAL_URL, FakeEnforcer, config, on_portal, portal, requests_total

from captive_portal.app import SECURITY_HEADERS
from enforcer.config import Config

__all__ = ["config"]  # the fixture, shared with test_portal


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/continue", "/promise", "/continue?lang=cs"])
async def test_get_of_a_forms_action_goes_to_the_page_and_does_nothing(config: Config, method: str,
                                                                        path: str) -> None:
    enforcer = FakeEnforcer(NOTICE)
    async with portal(config, enforcer) as client:
        response = await client.request(method, path, headers=on_portal(), allow_redirects=False)
        assert response.status == 303
        assert response.headers["Location"] == PORTAL_URL
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
        followed = await client.get(response.headers["Location"].removeprefix("http://portal.isp.example"),
                                    headers=on_portal())
        assert followed.status == 200
        assert requests_total(client, "not_found") == 1 and requests_total(client, "page") == 1
    assert enforcer.acknowledged == [] and enforcer.asked == ["127.0.0.1"]  # the page's lookup only


@pytest.mark.asyncio
@pytest.mark.parametrize("method,path,allow", [
    ("POST", "/", "GET,HEAD"),
    ("PUT", "/", "GET,HEAD"),
    ("OPTIONS", "/", "GET,HEAD"),
    ("DELETE", "/", "GET,HEAD"),
    ("POST", "/api/captive", "GET,HEAD"),
    ("PUT", "/continue", "GET,HEAD,POST"),
    ("DELETE", "/promise", "GET,HEAD,POST"),
])
async def test_other_methods_get_the_small_html_405_with_allow(config: Config, method: str, path: str,
                                                              allow: str) -> None:
    enforcer = FakeEnforcer(NOTICE)
    async with portal(config, enforcer) as client:
        response = await client.request(method, path, headers=on_portal(), data=b"csrf=x",
                                        allow_redirects=False)
        assert response.status == 405
        assert response.headers["Allow"] == allow
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-store"
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
        body = await response.text()
        assert body.startswith("<!DOCTYPE html>") and "<h1>Method not allowed</h1>" in body
        assert f'<a href="{PORTAL_URL}">' in body  # a way back
        assert requests_total(client, "not_found") == 1
        assert requests_total(client, "forbidden") == 0 and requests_total(client, "error") == 0
    assert enforcer.acknowledged == [] and enforcer.asked == []


@pytest.mark.asyncio
async def test_the_404_page_is_unchanged(config: Config) -> None:
    async with portal(config) as client:
        response = await client.get("/nothing-here", headers=on_portal())
        assert response.status == 404 and "Allow" not in response.headers
        assert response.headers["Cache-Control"] == "no-store"
        assert "<h1>Not found</h1>" in await response.text()
