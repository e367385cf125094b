"""The Kubernetes API, read the way controllers read it: list, then watch from the list's version.

Credentials come from the official async client's loaders (``kubernetes_asyncio.config``): the
pod's service account in a cluster (its token re-read as it rotates), else ``$KUBECONFIG`` or
``~/.kube/config``, or ``discovery.kubeconfig`` when given, with exec plugins and client
certificates. The objects themselves are read as raw JSON (orjson), not the client's model
classes: a watch of churning pods then costs a parse, not a model build per event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from llmlb.config import ConfigError
from llmlb.discovery import DiscoveryError, DiscoveryStatus

log = logging.getLogger("llmlb.discovery")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A watch asks the server to end it after this long (it is then resumed from the last version);
# a connection silent for longer than the read timeout is presumed dead.
WATCH_SECONDS = 300
READ_TIMEOUT_S = WATCH_SECONDS + 30
REQUEST_TIMEOUT_S = 10.0
LIST_PAGE = 500
# Retries after an error wait from the first to the last of these (jittered): short, so a
# restarted API server is read again within about a second.
BACKOFF_S = (0.1, 1.0)
# An answer that retrying will not change soon (401, 403, 404: rights or a CRD missing) backs off
# further, up to this, so a misconfigured replica does not poll the API server every second. It
# starts as short as any retry: an API server that is still starting refuses for a moment too.
REFUSED_BACKOFF_MAX_S = 5.0
# A watch that ends sooner than this without error waits BACKOFF_S[0] before the next one, so a
# proxy that cuts watches at once cannot make the loop spin.
MIN_WATCH_S = 1.0
# One watch event (an object) may be at most this large; a longer line means a broken stream.
MAX_EVENT_BYTES = 16 * 1024 * 1024

KubeObject = dict[str, Any]


class RequestRefused(DiscoveryError):
    """The API server answered, and the answer is no (401, 403, 404)."""


class Gone(Exception):
    """410: the resourceVersion a list or watch continued from is too old; list again."""


def own_namespace() -> str:
    """The namespace of the pod this runs in, else "default"."""
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


class KubeClient:
    """GET and watch against the API server with the loaded credentials."""

    def __init__(self, api_client: Any) -> None:
        self._api = api_client

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> KubeClient:
        from kubernetes_asyncio import client
        from kubernetes_asyncio import config as kube_config

        configuration = client.Configuration()
        try:
            if kubeconfig:
                # Said here in one line; the library would also log a warning of its own. (Once,
                # at start: the loader below reads the file as blockingly.)
                if not os.path.isfile(kubeconfig):  # noqa: ASYNC240
                    raise OSError("no such file")
                await kube_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                kube_config.load_incluster_config(client_configuration=configuration)
            else:
                await kube_config.load_kube_config(client_configuration=configuration)
        except (kube_config.ConfigException, OSError, ValueError, TypeError, KeyError) as e:
            where = (
                kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config (no in-cluster service account)"
            )
            message = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(
                "discovery.kubeconfig", f"cannot load Kubernetes credentials from {where}: {message}"
            ) from None
        return cls(client.ApiClient(configuration))

    async def close(self) -> None:
        await self._api.close()

    async def _request(
        self, path: str, params: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._api.call_api(
            path,
            "GET",
            query_params=list(params.items()),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        if response.status == 410:
            response.release()
            raise Gone(path)
        if response.status != 200:
            body = await response.read()
            response.release()
            message = f"GET {path}: {response.status} {_api_message(body)}"
            if response.status == 404 and "/apis/inference.networking.k8s.io/" in path:
                message += " (is the InferencePool CRD, inference.networking.k8s.io/v1, installed?)"
            if response.status in (401, 403, 404):
                raise RequestRefused(message)
            raise DiscoveryError(message)
        return response

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> KubeObject:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        response = await self._request(path, params or {}, timeout)
        try:
            data = orjson.loads(await response.read())
        finally:
            response.release()
        if not isinstance(data, dict):
            raise DiscoveryError(f"GET {path}: not a JSON object")
        return data

    async def list(self, path: str, params: Mapping[str, str]) -> tuple[list[KubeObject], str]:
        """Every item of a collection (page by page) and the version to watch from."""
        items: list[KubeObject] = []
        cont = ""
        for _ in range(100_000):  # bounded: a page holds up to LIST_PAGE items
            page = await self.get(
                path, {**params, "limit": str(LIST_PAGE), **({"continue": cont} if cont else {})}
            )
            items.extend(item for item in page.get("items") or () if isinstance(item, dict))
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                return items, str(meta.get("resourceVersion") or "")
        raise DiscoveryError(f"GET {path}: too many pages")

    async def watch(
        self, path: str, params: Mapping[str, str], version: str, on_open: Callable[[], None]
    ) -> AsyncIterator[KubeObject]:
        """The events of one watch request, until the server ends it; ``on_open`` once it is
        accepted (a quiet watch is a healthy one)."""
        query = {
            **params,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        response = await self._request(path, query, timeout)
        on_open()
        try:
            pending = b""
            async for chunk in response.content.iter_any():
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    line, pending = pending[:end], pending[end + 1 :]
                    if line.strip():
                        event = orjson.loads(line)
                        if isinstance(event, dict):
                            yield event
                if len(pending) > MAX_EVENT_BYTES:
                    raise DiscoveryError(f"watch {path}: an event over {MAX_EVENT_BYTES} bytes")
        finally:
            response.release()


def _api_message(body: bytes) -> str:
    """The ``message`` of a Kubernetes Status body, else the start of the body."""
    try:
        status = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return str(status["message"])
    return body[:200].decode("utf-8", "replace")


def object_key(obj: KubeObject) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Reflector:
    """Keeps a ``namespace/name -> object`` map of one collection current.

    It lists, then watches from the list's resourceVersion with bookmarks on; a watch the server
    ends is resumed from the last version seen, and an expired version (410 Gone) lists again.
    Every change calls ``on_change`` with the whole map (after a list, once). An error keeps the
    map as it was, marks the status part down and retries with a short jittered backoff."""

    def __init__(  # noqa: PLR0917 - one collection's whole description
        self,
        client: KubeClient,
        path: str,
        params: Mapping[str, str],
        on_change: Callable[[dict[str, KubeObject]], None],
        status: DiscoveryStatus,
        part: str,
    ) -> None:
        self.client = client
        self.path = path
        self.params = dict(params)
        self.on_change = on_change
        self.status = status
        self.part = part
        self.objects: dict[str, KubeObject] = {}
        self.lists = 0
        self.watches = 0

    async def run(self) -> None:
        version = ""
        delay = BACKOFF_S[0]
        refused = False
        while True:
            try:
                if not version:
                    items, version = await self.client.list(self.path, self.params)
                    self.lists += 1
                    self.objects = {object_key(item): item for item in items}
                    self._ok()
                    refused = False
                    self.on_change(self.objects)
                watched = time.monotonic()
                version = await self._watch(version)
                delay, refused = BACKOFF_S[0], False
                if time.monotonic() - watched < MIN_WATCH_S:
                    await asyncio.sleep(BACKOFF_S[0])
            except Gone:
                log.info("discovery: %s version expired, listing again", self.part)
                version = ""
            except asyncio.CancelledError:
                raise
            except (DiscoveryError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
                message = " ".join(str(e).split()) or type(e).__name__
                if self.status.parts.get(self.part, "") is None:
                    log.warning("discovery: lost %s (keeping the last set): %s", self.part, message)
                self.status.failed(f"{self.part}: {message}", self.part)
                if isinstance(e, RequestRefused) and not refused:
                    # The server answers again (one that is still starting refuses for a moment):
                    # ask again soon, then less and less often.
                    delay = BACKOFF_S[0]
                refused = isinstance(e, RequestRefused)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, REFUSED_BACKOFF_MAX_S if refused else BACKOFF_S[1])

    def _ok(self) -> None:
        if self.status.parts.get(self.part):
            log.info("discovery: %s is read again", self.part)
        self.status.ok(self.part)

    async def _watch(self, version: str) -> str:
        """One watch request; returns the version to resume from."""
        self.watches += 1
        async for event in self.client.watch(self.path, self.params, version, self._ok):
            kind = event.get("type")
            obj = event.get("object")
            if not isinstance(obj, dict):
                continue
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(self.path)
                raise DiscoveryError(f"watch {self.path}: {obj.get('code')} {obj.get('message')}")
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            key = object_key(obj)
            if kind == "DELETED":
                if self.objects.pop(key, None) is None:
                    continue
            elif kind in ("ADDED", "MODIFIED"):
                self.objects[key] = obj
            else:
                continue
            self.on_change(self.objects)
        return version
