"""The admin HTTP server: /healthz, /readyz, /metrics, /debug/endpoints, /debug/config,
/debug/discovery, /debug/decisions, /status."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from llmlb._core import Balancer
from llmlb.config import Config, effective_dict
from llmlb.decision import Decision
from llmlb.endpoints import EndpointManager
from llmlb.metrics import Metrics
from llmlb.shared import SharedState
from llmlb.status import status_page

if TYPE_CHECKING:
    from llmlb.prediction import PredictionTracker
    from llmlb.scraper import MetricsScraper

# Prediction vs reality per endpoint (null while unknown or when `prediction` is off).
NO_PREDICTION = {"predicted_hit_ratio": None, "engine_hit_ratio": None, "prediction_accuracy": None}


async def endpoint_views(
    balancer: Balancer,
    endpoints: EndpointManager,
    shared: SharedState | None = None,
    scraper: MetricsScraper | None = None,
    prediction: PredictionTracker | None = None,
) -> list[dict[str, Any]]:
    local = balancer.endpoints()
    # Pool-wide counts come from Redis when it answers; otherwise this replica's view is all
    # there is (and `shared_view` says so).
    pool = await shared.pool_inflight([v[0] for v in local]) if shared is not None else None
    loads = scraper.views() if scraper is not None else {}
    views = []
    for address, inflight, own_inflight, healthy, in_pool, backlog in local:
        views.append(
            {
                "address": address,
                "inflight": pool.get(address, 0) if pool is not None else inflight,
                "local_inflight": own_inflight,
                # The load model's other half: prompt tokens sent and not yet prefilled (est.).
                "prefill_backlog_tokens": backlog,
                "shared_view": pool is not None,
                "healthy": healthy,
                "in_pool": in_pool,
                "labels": dict(endpoints.labels.get(address, {})),
                **(loads.get(address, {}) if scraper is not None else {}),
                **(prediction.view(address) if prediction is not None else NO_PREDICTION),
            }
        )
    return views


def decision_views(recent: Iterable[Decision]) -> list[dict[str, Any]]:
    """The recent decisions, newest first: each one's record plus its unix ``time``."""
    return [{"time": d.time, **d.fields()} for d in reversed(list(recent))]


def build_app(
    config: Config,
    *,
    balancer: Balancer,
    endpoints: EndpointManager,
    metrics: Metrics,
    is_ready: Callable[[], bool],
    shared: SharedState | None = None,
    scraper: MetricsScraper | None = None,
    recent: Iterable[Decision] = (),
    prediction: PredictionTracker | None = None,
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
        body = orjson.dumps(
            await endpoint_views(balancer, endpoints, shared, scraper, prediction), option=orjson.OPT_INDENT_2
        )
        return web.Response(body=body, content_type="application/json")

    async def debug_config(_: web.Request) -> web.Response:
        body = orjson.dumps(effective_dict(config), option=orjson.OPT_INDENT_2)
        return web.Response(body=body, content_type="application/json")

    async def debug_discovery(_: web.Request) -> web.Response:
        # Static pools answer too (kind "static"), so a probe of this path needs no config check.
        status = endpoints.discovery_status
        view: dict[str, Any] = (
            status.view()
            if status is not None
            else {"kind": "static", "up": True, "endpoints": len(endpoints.pool)}
        )
        view["addresses"] = [ep.address for ep in endpoints.pool]
        body = orjson.dumps(view, option=orjson.OPT_INDENT_2)
        return web.Response(body=body, content_type="application/json")

    async def debug_decisions(_: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(decision_views(recent)), content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/debug/endpoints", debug_endpoints)
    app.router.add_get("/debug/config", debug_config)
    app.router.add_get("/debug/discovery", debug_discovery)
    app.router.add_get("/debug/decisions", debug_decisions)
    app.router.add_get("/status", status_page)
    return app
