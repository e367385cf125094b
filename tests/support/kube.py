"""A real Kubernetes API server (kube-apiserver + etcd) on 127.0.0.1 for tests, and a tiny client.

The binaries are built once from the Go module proxy by ``scripts/build-kube-test-binaries.sh``
(``make kube-bin``) into :func:`kube_bin_dir`. :class:`KubeCluster` runs etcd and kube-apiserver
from there with RBAC, a static token file (an admin in ``system:masters`` and a ``limited`` user
with no groups), service-account keys and certificates made in memory. There is no controller
manager, scheduler or kubelet: tests write Pod status and EndpointSlices themselves.

What such an API server accepts (each of these was hit):
- EndpointSlice addresses must not be loopback; Pod ``status.podIP`` may be ``127.0.0.N``.
- Namespaces never finish deleting (no namespace controller): use a fresh namespace per test.
- A CRD in a ``*.k8s.io`` group needs the ``api-approved.kubernetes.io`` annotation.

Every process is started and stopped by PID (:class:`tests.support.procs.ManagedProcess`), every
wait is bounded in time, every HTTP call has a timeout and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import secrets
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.certs import CA
from tests.support.procs import HOST, ManagedProcess, free_ports, wait_until

KUBE_VERSION = "v1.37.2"
ETCD_VERSION = "3.7.4"
BIN_ENV = "LLMLB_KUBE_BIN"
BINARIES = ("kube-apiserver", "etcd", "kubectl")
BUILD_HINT = (
    "run `make kube-bin` (bash scripts/build-kube-test-binaries.sh) once: it builds kube-apiserver, "
    f"etcd and kubectl {KUBE_VERSION} from the Go module proxy into ${BIN_ENV} "
    "(default ~/.cache/llmlb/kube-v1.37.2; ~6 min cold)"
)
CRD_PATH = Path(__file__).resolve().with_name("inferencepool-crd.yaml")
INFERENCE_GROUP = "inference.networking.k8s.io"
INFERENCE_VERSION = "v1"

JSON = dict[str, Any]


def kube_bin_dir() -> Path:
    """Where the build script puts the binaries: ``$LLMLB_KUBE_BIN`` or ~/.cache/llmlb/kube-v1.37.2."""
    configured = os.environ.get(BIN_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "llmlb" / f"kube-{KUBE_VERSION}"


class KubeBinariesMissing(RuntimeError):
    """The test binaries are not built; the message says how to build them."""


def kube_binary(name: str) -> Path:
    """The path of ``name`` (kube-apiserver, etcd or kubectl) in :func:`kube_bin_dir`."""
    path = kube_bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise KubeBinariesMissing(f"no {name} at {path}: {BUILD_HINT}")
    return path


def missing_binaries() -> list[str]:
    """The binaries that are not there (empty when the cluster can start)."""
    missing = []
    for name in BINARIES:
        try:
            kube_binary(name)
        except KubeBinariesMissing:
            missing.append(name)
    return missing


# --------------------------------------------------------------------------------------------------
# the JSON client


class KubeApiError(AssertionError):
    """A non-2xx answer from the API server, with its Status message."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        self.method, self.path, self.status, self.body = method, path, status, body
        self.reason = ""
        self.message = body.decode("utf-8", "replace")[:2000]
        with contextlib.suppress(ValueError):
            decoded = json.loads(body)
            if isinstance(decoded, dict):
                self.reason = str(decoded.get("reason", ""))
                self.message = str(decoded.get("message", self.message))
        super().__init__(f"{method} {path} -> {status} {self.reason}: {self.message}")


@dataclass(frozen=True)
class KubeReply:
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def pods_path(namespace: str, name: str | None = None) -> str:
    return _path(f"/api/v1/namespaces/{namespace}/pods", name)


def services_path(namespace: str, name: str | None = None) -> str:
    return _path(f"/api/v1/namespaces/{namespace}/services", name)


def endpointslices_path(namespace: str, name: str | None = None) -> str:
    return _path(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", name)


def inferencepools_path(namespace: str, name: str | None = None) -> str:
    return _path(f"/apis/{INFERENCE_GROUP}/{INFERENCE_VERSION}/namespaces/{namespace}/inferencepools", name)


def _path(collection: str, name: str | None) -> str:
    return collection if name is None else f"{collection}/{quote(name, safe='')}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def inferencepool_crd() -> JSON:
    """The InferencePool CRD of ``tests/support/inferencepool-crd.yaml``."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(crd, dict), CRD_PATH
    return crd


class KubeApi:
    """A synchronous JSON client of the API server (http.client + ssl, one connection per call).

    ``path`` arguments are API paths such as ``/api/v1/namespaces/ns/pods/name``. Methods raise
    :class:`KubeApiError` on a non-2xx answer; :meth:`request` returns any answer as it is.
    """

    def __init__(self, url: str, ca_path: Path, token: str, timeout: float = 10.0) -> None:
        host, _, port = url.removeprefix("https://").rstrip("/").partition(":")
        assert host == HOST, f"tests only talk to {HOST}, not {url}"
        self.url, self.ca_path, self.token, self.timeout = url, ca_path, token, timeout
        self._port = int(port or 443)
        self._ssl = ssl.create_default_context(cafile=str(ca_path))

    def with_token(self, token: str) -> KubeApi:
        """The same client authenticating with another bearer token."""
        return KubeApi(self.url, self.ca_path, token, self.timeout)

    # raw -----------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> KubeReply:
        """One request; ``body`` (if not None) is sent as JSON. Raises OSError on connection errors."""
        conn = http.client.HTTPSConnection(
            HOST, self._port, context=self._ssl, timeout=timeout or self.timeout
        )
        headers = {"authorization": f"Bearer {self.token}", "accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = content_type
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return KubeReply(resp.status, resp.read())
        finally:
            conn.close()

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        reply = self.request(method, path, body, content_type=content_type)
        if not reply.ok:
            raise KubeApiError(method, path, reply.status, reply.body)
        return reply.json()

    # verbs ---------------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def exists(self, path: str) -> bool:
        reply = self.request("GET", path)
        if reply.status == 404:
            return False
        if not reply.ok:
            raise KubeApiError("GET", path, reply.status, reply.body)
        return True

    def create(self, path: str, obj: Mapping[str, Any]) -> Any:
        """POST ``obj`` to the collection ``path``; returns the created object."""
        return self._call("POST", path, obj)

    def replace(self, path: str, obj: Mapping[str, Any]) -> Any:
        """PUT ``obj`` (with its ``metadata.resourceVersion``: a stale one is a 409 Conflict)."""
        return self._call("PUT", path, obj)

    def update(self, path: str, change: Callable[[JSON], None], attempts: int = 5) -> Any:
        """Read the object, let ``change`` edit it in place, PUT it back; retried on 409 Conflict."""
        for attempt in range(attempts):
            obj = self.get(path)
            change(obj)
            try:
                return self.replace(path, obj)
            except KubeApiError as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def patch(self, path: str, obj: Mapping[str, Any], subresource: str | None = None) -> Any:
        """A JSON merge patch (RFC 7386) of the object or of its ``subresource`` (e.g. "status")."""
        target = f"{path}/{subresource}" if subresource else path
        return self._call("PATCH", target, obj, content_type="application/merge-patch+json")

    def patch_status(self, path: str, obj: Mapping[str, Any]) -> Any:
        return self.patch(path, obj, subresource="status")

    def delete(self, path: str, grace_period: int | None = 0, *, missing_ok: bool = False) -> Any:
        """DELETE with ``gracePeriodSeconds`` (0: at once; None: the object's default)."""
        options: JSON = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period is not None:
            options["gracePeriodSeconds"] = grace_period
        reply = self.request("DELETE", path, options)
        if reply.status == 404 and missing_ok:
            return None
        if not reply.ok:
            raise KubeApiError("DELETE", path, reply.status, reply.body)
        return reply.json()

    def wait_gone(self, path: str, timeout: float = 10.0) -> None:
        wait_until(lambda: not self.exists(path), timeout, interval=0.05, message=f"{path} to be gone")

    def version(self) -> JSON:
        version = self.get("/version")
        assert isinstance(version, dict)
        return version

    # CRDs ----------------------------------------------------------------------------------------

    def apply_crd(self, crd: Mapping[str, Any], timeout: float = 30.0) -> JSON:
        """Create (or replace) a CRD and wait until it is Established and its resource is served.

        Note: the API server holds the first creates of a custom resource for 2 s while its CRD
        is less than 2 s Established (on purpose, for HA servers: crdHandler.serveResource)."""
        name = crd["metadata"]["name"]
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        reply = self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        if reply.status == 409:
            current = self.get(path)
            wanted = json.loads(json.dumps(crd))
            wanted["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.replace(path, wanted)
        elif not reply.ok:
            raise KubeApiError("POST", "customresourcedefinitions", reply.status, reply.body)

        obj = self._wait_established(path, timeout)
        spec = crd["spec"]
        served = [v["name"] for v in spec["versions"] if v.get("served", True)]
        for version in served:
            collection = f"/apis/{spec['group']}/{version}/{spec['names']['plural']}"
            wait_until(self._served(collection), timeout, interval=0.05, message=f"{collection} to be served")
        return obj

    def _wait_established(self, path: str, timeout: float) -> JSON:
        """Poll the CRD every 0.05 s until its Established condition is True; fail at once if its
        names are not accepted (a clash with another CRD), or after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        conditions: list[JSON] = []
        for _ in range(int(timeout / 0.05) + 10):
            obj: JSON = self.get(path)
            # `status.conditions` is null until the CRD controllers have looked at it.
            conditions = (obj.get("status") or {}).get("conditions") or []
            for condition in conditions:
                if condition.get("type") == "NamesAccepted" and condition.get("status") == "False":
                    raise KubeApiError("GET", path, 422, json.dumps(condition).encode())
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                return obj
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise AssertionError(f"{path} not Established within {timeout}s; conditions: {conditions}")

    def _served(self, path: str) -> Callable[[], bool]:
        return lambda: self.request("GET", path).ok

    def install_inferencepool_crd(self) -> JSON:
        return self.apply_crd(inferencepool_crd())

    # convenience ---------------------------------------------------------------------------------

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> JSON:
        obj = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels or {})},
        }
        created: JSON = self.create("/api/v1/namespaces", obj)
        return created

    def create_pod(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str],
        annotations: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        node_name: str | None = None,
    ) -> JSON:
        """A minimal valid Pod (one container, image example/model-server). No scheduler or kubelet
        runs: it stays Pending until :meth:`set_pod_status` writes a status."""
        container: JSON = {"name": "server", "image": "example/model-server"}
        if port is not None:
            container["ports"] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        spec: JSON = {"containers": [container], "terminationGracePeriodSeconds": 0}
        if node_name is not None:
            spec["nodeName"] = node_name
        metadata: JSON = {"name": name, "labels": dict(labels)}
        if annotations:
            metadata["annotations"] = dict(annotations)
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
        created: JSON = self.create(pods_path(namespace), obj)
        return created

    def set_pod_status(self, namespace: str, name: str, ip: str, ready: bool) -> JSON:
        """Write what a kubelet would: phase Running, ``podIP``/``podIPs`` = ``ip`` (127.0.0.N is
        fine), conditions Ready and ContainersReady = ``ready``."""
        now = _now()
        flag = "True" if ready else "False"
        status = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "Ready", "status": flag, "lastTransitionTime": now},
            ],
        }
        patched: JSON = self.patch_status(pods_path(namespace, name), {"status": status})
        return patched

    def delete_pod(self, namespace: str, name: str, timeout: float = 10.0) -> None:
        """Delete at once (grace period 0) and wait until the Pod is gone."""
        path = pods_path(namespace, name)
        self.delete(path, grace_period=0, missing_ok=True)
        self.wait_gone(path, timeout)

    def create_service(
        self,
        namespace: str,
        name: str,
        selector: Mapping[str, str] | None,
        ports: Sequence[tuple[str, int]],
        *,
        headless: bool = False,
    ) -> JSON:
        """A ClusterIP Service (``headless``: clusterIP None); ``selector`` None: no selector (its
        EndpointSlices are then the tests' to write)."""
        spec: JSON = {
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports],
        }
        if selector is not None:
            spec["selector"] = dict(selector)
        if headless:
            spec["clusterIP"] = "None"
        obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}
        created: JSON = self.create(services_path(namespace), obj)
        return created

    def create_endpointslice(
        self,
        namespace: str,
        name: str,
        service: str,
        endpoints: Iterable[tuple[str, bool, bool, bool]],
        ports: Sequence[tuple[str, int]],
    ) -> JSON:
        """An IPv4 EndpointSlice of ``service``; ``endpoints``: (ip, ready, serving, terminating).

        The API server rejects loopback addresses here (422): use 10.x addresses, as data only."""
        items = []
        for ip, ready, serving, terminating in endpoints:
            if ipaddress.ip_address(ip).is_loopback:
                raise ValueError(f"EndpointSlice addresses may not be loopback ({ip}): use e.g. 10.0.1.N")
            conditions = {"ready": ready, "serving": serving, "terminating": terminating}
            items.append({"addresses": [ip], "conditions": conditions})
        obj = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "llmlb-tests",
                },
            },
            "addressType": "IPv4",
            "endpoints": items,
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        }
        created: JSON = self.create(endpointslices_path(namespace), obj)
        return created

    def create_inferencepool(
        self,
        namespace: str,
        name: str,
        match_labels: Mapping[str, str],
        target_ports: Sequence[int],
        *,
        picker: str = "llmlb",
        picker_port: int = 9002,
        failure_mode: str | None = None,
    ) -> JSON:
        """An InferencePool (the CRD must be installed: :meth:`install_inferencepool_crd`)."""
        ref: JSON = {"name": picker, "port": {"number": picker_port}}
        if failure_mode is not None:
            ref["failureMode"] = failure_mode
        obj = {
            "apiVersion": f"{INFERENCE_GROUP}/{INFERENCE_VERSION}",
            "kind": "InferencePool",
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": dict(match_labels)},
                "targetPorts": [{"number": p} for p in target_ports],
                "endpointPickerRef": ref,
            },
        }
        created: JSON = self.create(inferencepools_path(namespace), obj)
        return created


# --------------------------------------------------------------------------------------------------
# the cluster


def _rsa_key_pair() -> tuple[bytes, bytes]:
    """A service-account signing key (PKCS#8 PEM) and its public key (SubjectPublicKeyInfo PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


class KubeCluster:
    """etcd + kube-apiserver on free 127.0.0.1 ports, with state and logs under ``workdir``.

    ``start()`` returns once ``/readyz`` answers ok (bounded); on failure it stops what it started
    and raises with the tail of the logs. ``stop()`` stops both processes by PID.
    """

    def __init__(self, workdir: Path, bin_dir: Path | None = None, ready_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir or kube_bin_dir()
        self.ready_timeout = ready_timeout
        self.etcd_port, self.etcd_peer_port, self.port = free_ports(3)
        self.admin_token = secrets.token_hex(16)
        self.limited_token = secrets.token_hex(16)
        self.etcd: ManagedProcess | None = None
        self.apiserver: ManagedProcess | None = None
        self.startup_seconds = 0.0
        self._apiserver_starts = 0
        self._pki = workdir / "pki"

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self._pki / "ca.crt"

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_port}"

    def api(self, token: str | None = None) -> KubeApi:
        """A client with the admin token (or ``token``)."""
        return KubeApi(self.url, self.ca_path, token or self.admin_token)

    def binary(self, name: str) -> Path:
        path = self.bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise KubeBinariesMissing(f"no {name} at {path}: {BUILD_HINT}")
        return path

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> KubeCluster:
        started = time.monotonic()
        etcd, apiserver = self.binary("etcd"), self.binary("kube-apiserver")
        self._write_pki()
        try:
            self.etcd = ManagedProcess("etcd", self._etcd_argv(etcd), self.workdir / "etcd.log").start()
            self.etcd.wait_ready(f"{self.etcd_url}/health", timeout=self.ready_timeout, interval=0.05)
            self._start_apiserver(apiserver)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def restart_apiserver(self) -> None:
        """Stop the API server and start it again on the same port with the same etcd; wait ready."""
        self.stop_apiserver()
        self.start_apiserver()

    def stop_apiserver(self) -> None:
        """Stop only the API server (etcd keeps the state): an outage, until start_apiserver()."""
        assert self.apiserver is not None, "not started"
        self.apiserver.stop(timeout=10.0)
        self.apiserver = None

    def start_apiserver(self) -> None:
        """Start the API server again on the same port with the same etcd; wait ready."""
        assert self.apiserver is None, "already running"
        self._start_apiserver(self.binary("kube-apiserver"))

    def stop(self) -> None:
        for proc in (self.apiserver, self.etcd):
            if proc is not None:
                proc.stop(timeout=10.0)

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return all(p is not None and p.running for p in (self.etcd, self.apiserver))

    def describe(self, lines: int = 40) -> str:
        return "\n".join(p.describe(lines) for p in (self.etcd, self.apiserver) if p is not None)

    # kubeconfig ----------------------------------------------------------------------------------

    def write_kubeconfig(self, path: Path, token: str | None = None, namespace: str | None = None) -> Path:
        """A kubeconfig for kubectl and the Python clients: this server, its CA, a bearer token
        (the admin's by default) and a current context (in ``namespace`` if given)."""
        context: JSON = {"cluster": "llmlb-test", "user": "llmlb-test-user"}
        if namespace is not None:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "llmlb-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": "llmlb-test-user", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "llmlb-test", "context": context}],
            "current-context": "llmlb-test",
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def kubectl(
        self, *args: str, kubeconfig: Path, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl with ``kubeconfig`` (bounded in time); never raises on its exit code."""
        argv = [str(self.binary("kubectl")), "--kubeconfig", str(kubeconfig), *args]
        env = {**os.environ, "HOME": str(self.workdir), "KUBECONFIG": str(kubeconfig)}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)

    # internals -----------------------------------------------------------------------------------

    def _write_pki(self) -> None:
        ca = CA("llmlb test kubernetes CA")
        ca.write(self._pki, "ca")
        serving = ca.issue(
            "kube-apiserver",
            ips=(HOST,),
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        )
        serving.write(self._pki, "apiserver")
        private, public = _rsa_key_pair()
        (self._pki / "sa.key").write_bytes(private)
        (self._pki / "sa.pub").write_bytes(public)
        tokens = [
            f'{self.admin_token},admin,uid-admin,"system:masters"',
            f"{self.limited_token},limited,uid-limited",
        ]
        (self._pki / "tokens.csv").write_text("\n".join(tokens) + "\n")

    def _etcd_argv(self, etcd: Path) -> list[str]:
        peer = f"http://{HOST}:{self.etcd_peer_port}"
        return [
            str(etcd),
            "--name",
            "default",
            "--data-dir",
            str(self.workdir / "etcd-data"),
            "--listen-client-urls",
            self.etcd_url,
            "--advertise-client-urls",
            self.etcd_url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"default={peer}",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ]

    def _apiserver_argv(self, apiserver: Path) -> list[str]:
        pki = self._pki
        return [
            str(apiserver),
            "--etcd-servers",
            self.etcd_url,
            "--bind-address",
            HOST,
            "--advertise-address",
            HOST,
            "--secure-port",
            str(self.port),
            # A loopback advertise address makes the default reconciler exit the server.
            "--endpoint-reconciler-type",
            "none",
            "--tls-cert-file",
            str(pki / "apiserver.crt"),
            "--tls-private-key-file",
            str(pki / "apiserver.key"),
            "--client-ca-file",
            str(pki / "ca.crt"),
            "--token-auth-file",
            str(pki / "tokens.csv"),
            "--authorization-mode",
            "RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            str(pki / "sa.pub"),
            "--service-account-signing-key-file",
            str(pki / "sa.key"),
            "--service-cluster-ip-range",
            "10.0.0.0/24",
            # No controller manager, so no default ServiceAccount to admit Pods against.
            "--disable-admission-plugins",
            "ServiceAccount",
            "--cert-dir",
            str(self.workdir / "apiserver-certs"),
            "--profiling=false",
        ]

    def _start_apiserver(self, apiserver: Path) -> None:
        self._apiserver_starts += 1
        log = self.workdir / f"kube-apiserver-{self._apiserver_starts}.log"
        self.apiserver = ManagedProcess("kube-apiserver", self._apiserver_argv(apiserver), log).start()
        self._wait_ready(self.apiserver)

    def _wait_ready(self, proc: ManagedProcess) -> None:
        """Poll /readyz every 0.1 s until it answers ``ok`` (bounded); raise with the logs if not."""
        api = self.api()
        deadline = time.monotonic() + self.ready_timeout
        last: object = None
        for _ in range(int(self.ready_timeout / 0.1) + 10):
            if not proc.running:
                raise AssertionError(f"kube-apiserver exited before it was ready\n--- {self.describe()}")
            try:
                reply = api.request("GET", "/readyz", timeout=2.0)
                if reply.status == 200 and reply.body.strip() == b"ok":
                    return
                last = reply
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"kube-apiserver not ready at {self.url}/readyz within {self.ready_timeout}s "
            f"(last: {last!r})\n--- {self.describe()}"
        )
