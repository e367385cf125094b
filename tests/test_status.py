"""The status page as shipped: one small self-contained file (the machine serving it may have no
internet), served with a policy that forbids anything but itself. tests/e2e/test_status_page.py
renders it in a real browser."""

from __future__ import annotations

import asyncio
import re
from importlib import resources

from aiohttp.test_utils import make_mocked_request

from llmlb.decision import RECORD_FIELDS
from llmlb.status import PAGE, UPTIME_MARK, render, status_page, template


def test_the_page_is_package_data_small_and_self_contained() -> None:
    assert resources.files("llmlb").joinpath(PAGE).is_file()
    page = template()
    assert len(page.encode()) < 20_000
    # Nothing fetched from elsewhere: no URLs, no linked or imported resources, no fonts.
    assert not re.search(r"https?:|//[a-z]", page, re.IGNORECASE)
    assert not re.search(r"\b(src|href)\s*=|@import|@font-face|url\(", page, re.IGNORECASE)
    # Values are written as text, never parsed as HTML.
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", page)


def test_the_page_reads_the_decision_record_by_its_names() -> None:
    page = template()
    shown = {
        "request_id", "endpoint", "reason", "prefix_depth", "prefix_levels", "prefix_share",
        "cached_tokens", "prompt_tokens", "candidates", "score", "runner_up", "state", "model",
        "path", "pick_us",
    }  # fmt: skip
    assert shown <= set(RECORD_FIELDS)
    for name in shown:
        assert f"d.{name}" in page, name


def test_the_uptime_is_written_into_the_page() -> None:
    assert template().count(UPTIME_MARK) == 1
    page = render(3725.4)
    assert UPTIME_MARK not in page
    assert '<meta name="llmlb-uptime" content="3725">' in page


def test_the_page_is_served_uncached_under_a_strict_policy() -> None:
    reply = asyncio.run(status_page(make_mocked_request("GET", "/status")))
    assert reply.status == 200
    assert reply.content_type == "text/html"
    assert reply.headers["Cache-Control"] == "no-store"
    policy = dict(part.strip().split(" ", 1) for part in reply.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    assert reply.text is not None
    assert UPTIME_MARK not in reply.text
