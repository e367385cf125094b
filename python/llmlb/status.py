"""``GET /status``: the live status page of the admin port (``status.html`` next to this module).

The page is static: its script fetches ``/debug/config``, ``/debug/discovery``,
``/debug/endpoints`` and ``/debug/decisions`` from the server that served it and refreshes itself
(``?refresh=SECONDS``, 0 = off). The daemon's admin server and the ``--workers`` supervisor serve
the same page; the supervisor answers those paths by asking every worker. The one server-side
figure is the uptime of the process serving the page, written into the page when it is served.
"""

from __future__ import annotations

import functools
import time
from importlib import resources

from aiohttp import web

PAGE = "status.html"
#: Where the page's template takes the serving process's uptime in seconds.
UPTIME_MARK = "__LLMLB_UPTIME__"
#: Nothing but the page's own inline style and script, and fetches from the same origin: values
#: shown come from clients (request ids, models, paths) and the script never parses them as HTML.
SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Close enough to the process start: the admin server and the supervisor import this at startup.
_STARTED = time.monotonic()


@functools.cache
def template() -> str:
    """The page as shipped in the package (read once)."""
    return resources.files("llmlb").joinpath(PAGE).read_text(encoding="utf-8")


def render(uptime_seconds: float) -> str:
    return template().replace(UPTIME_MARK, f"{uptime_seconds:.0f}", 1)


async def status_page(_: web.Request) -> web.Response:
    return web.Response(
        text=render(time.monotonic() - _STARTED),
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store", "Content-Security-Policy": SECURITY_POLICY},
    )
