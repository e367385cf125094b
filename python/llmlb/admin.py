"""The admin HTTP server: /healthz, /readyz, /metrics, /debug/endpoints, /debug/config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from llmlb._core import Balancer
from llmlb.config import Config, effective_dict
from llmlb.endpoints import EndpointManager
from llmlb.metrics import Metrics


def endpoint_views(balancer: Balancer, endpoints: EndpointManager) -> list[dict[str, Any]]:
    views = []
    for address, inflight, healthy, in_pool in balancer.endpoints():
        views.append(
            {
                "address": address,
                # Embedded state: this replica's view is the whole pool's.
                "inflight": inflight,
                "local_inflight": inflight,
                "healthy": healthy,
                "in_pool": in_pool,
                "labels": dict(endpoints.labels.get(address, {})),
            }
        )
    return views


def build_app(
    config: Config,
    balancer: Balancer,
    endpoints: EndpointManager,
    metrics: Metrics,
    is_ready: Callable[[], bool],
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8")

    async def debug_endpoints(_: web.Request) -> web.Response:
        body = orjson.dumps(endpoint_views(balancer, endpoints), option=orjson.OPT_INDENT_2)
        return web.Response(body=body, content_type="application/json")

    async def debug_config(_: web.Request) -> web.Response:
        body = orjson.dumps(effective_dict(config), option=orjson.OPT_INDENT_2)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/debug/endpoints", debug_endpoints)
    app.router.add_get("/debug/config", debug_config)
    return app
