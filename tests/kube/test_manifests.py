"""The Kubernetes manifests in deploy/kubernetes, against a real API server.

Every kustomization (the base, each example, each component composed with the base) is rendered
with the built kubectl's ``kubectl kustomize`` and applied with ``--dry-run=server`` and strict
field validation, so a schema error (an unknown field, a wrong type, an invalid InferencePool)
fails here. Then what matters is asserted on the rendered objects: non-root, read-only root
filesystem, no capabilities; probes on the admin port; RBAC that grants each discovery source
exactly what it reads (checked by the API server's own authorizer as the ServiceAccount after a
real apply); the shipped configs pass ``llmlb check-config``; the InferencePool names llmlb's
Service and ext_proc port; a PodDisruptionBudget; Envoy's bootstrap is what ``llmlb envoy-config``
prints today.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.certs import CA
from tests.support.kube import KubeApi, KubeApiError, KubeCluster, kube_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
EXAMPLES = sorted(p.name for p in (DEPLOY / "examples").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir() if (p / "kustomization.yaml").is_file())
EXAMPLE_NAMESPACE = "llm"
KUBECTL_TIMEOUT = 60.0

Obj = dict[str, Any]

# What each discovery kind may read: (apiGroup, resource) -> verbs. Nothing else, nowhere else.
RBAC_BY_KIND: dict[str, dict[tuple[str, str], list[str]]] = {
    "dns": {},
    "kubernetes": {("discovery.k8s.io", "endpointslices"): ["list", "watch"]},
    "inferencePool": {
        ("inference.networking.k8s.io", "inferencepools"): ["list", "watch"],
        ("", "pods"): ["list", "watch"],
    },
}

# The config lines the redis and tls components document (their kustomization.yaml comments).
REDIS_CONFIG = """\
grpc_listen: 0.0.0.0:9002
admin_listen: 0.0.0.0:9090
lb_policy: prefix_cache
discovery: {kind: dns, name: vllm-headless, port: 8000}
lb_config:
  serviceFQDN: redis.llm.svc.cluster.local
  servicePort: 6379
  username: llmlb
  password: "${LLMLB_REDIS_PASSWORD}"
"""
TLS_CONFIG = """\
grpc_listen: 0.0.0.0:9002
admin_listen: 0.0.0.0:9090
lb_policy: prefix_cache
discovery: {kind: dns, name: vllm-headless, port: 8000}
grpc_tls:
  cert: /etc/llmlb-tls/tls.crt
  key: /etc/llmlb-tls/tls.key
  client_ca: /etc/llmlb-tls/ca.crt
"""


# --------------------------------------------------------------------------------------------------
# helpers


def kubectl(
    *args: str, kubeconfig: Path | None = None, stdin: str | None = None, timeout: float = KUBECTL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """The built kubectl (bounded in time); never raises on its exit code."""
    argv = [str(kube_binary("kubectl"))]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig or os.devnull)}
    return subprocess.run(
        [*argv, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def render(directory: Path) -> list[Obj]:
    done = kubectl("kustomize", str(directory))
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def composition(
    tmp: Path, components: list[str], config: str | None, namespace: str = EXAMPLE_NAMESPACE
) -> Path:
    """A kustomization in ``tmp``: the base, ``components``, and (if given) a replaced config."""
    tmp.mkdir(parents=True, exist_ok=True)
    kustomization: Obj = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        # kustomize takes relative paths only
        "resources": [os.path.relpath(DEPLOY / "base", tmp)],
        "components": [os.path.relpath(DEPLOY / "components" / c, tmp) for c in components],
    }
    if config is not None:
        (tmp / "config.yaml").write_text(config)
        kustomization["configMapGenerator"] = [
            {"name": "llmlb-config", "behavior": "replace", "files": ["config.yaml"]}
        ]
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return tmp


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name or ''}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def llmlb_deployment(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "llmlb")


def llmlb_container(objs: list[Obj]) -> Obj:
    containers: list[Obj] = llmlb_deployment(objs)["spec"]["template"]["spec"]["containers"]
    [container] = [c for c in containers if c["name"] == "llmlb"]
    return container


def llmlb_config(objs: list[Obj]) -> tuple[str, Obj]:
    """The config file the llmlb Deployment mounts at /etc/llmlb/config.yaml, as text and parsed."""
    container = llmlb_container(objs)
    assert container["args"] == ["serve", "--config", "/etc/llmlb/config.yaml"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/llmlb"]
    volumes = llmlb_deployment(objs)["spec"]["template"]["spec"]["volumes"]
    [volume] = [v for v in volumes if v["name"] == mount["name"]]
    configmap = one(objs, "ConfigMap", volume["configMap"]["name"])
    text = configmap["data"]["config.yaml"]
    parsed = yaml.safe_load(text)
    assert isinstance(parsed, dict)
    return text, parsed


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmlb", "check-config", str(path)],
        capture_output=True, text=True, timeout=30, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


def retarget(objs: list[Obj], namespace: str) -> list[Obj]:
    """The objects moved into ``namespace`` (Namespace objects dropped, bindings' subjects moved)."""
    moved = []
    for obj in copy.deepcopy(objs):
        if obj["kind"] == "Namespace":
            continue
        if "namespace" in obj["metadata"]:
            obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
        moved.append(obj)
    return moved


def as_stream(objs: list[Obj]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False)


def apply(objs: list[Obj], kubeconfig: Path, *, dry_run: bool) -> list[Obj]:
    args = ["apply", "--validate=strict", "-f", "-", "-o", "json"]
    if dry_run:
        args.insert(1, "--dry-run=server")
    done = kubectl(*args, kubeconfig=kubeconfig, stdin=as_stream(objs))
    assert done.returncode == 0, f"kubectl {' '.join(args)}:\n{done.stderr}"
    out = json.loads(done.stdout)
    items: list[Obj] = out["items"] if out.get("kind") == "List" else [out]
    return items


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def kubeconfig(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kube_cluster.write_kubeconfig(tmp_path_factory.mktemp("manifests") / "admin.kubeconfig")


@pytest.fixture(scope="module")
def cluster_ready(kube_api: KubeApi) -> KubeApi:
    """The InferencePool CRD installed and the examples' namespace there (dry runs create none)."""
    kube_api.install_inferencepool_crd()
    try:
        kube_api.create_namespace(EXAMPLE_NAMESPACE)
    except KubeApiError as exc:
        if exc.status != 409:
            raise
    return kube_api


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Each example's objects, rendered once."""
    return {name: render(DEPLOY / "examples" / name) for name in EXAMPLES}


# --------------------------------------------------------------------------------------------------
# every kustomization renders and the API server accepts it


def test_the_examples_and_components_are_there() -> None:
    assert EXAMPLES == ["gateway-inferencepool", "standalone-dns", "standalone-kubernetes"]
    assert set(COMPONENTS) >= {"discovery-kubernetes", "discovery-inferencepool", "redis", "tls", "envoy",
                               "network-policy"}  # fmt: skip
    used = set()
    for name in EXAMPLES:
        kustomization = yaml.safe_load((DEPLOY / "examples" / name / "kustomization.yaml").read_text())
        used |= {Path(c).name for c in kustomization.get("components", [])}
    # redis and tls are composed with the base in test_optional_components below.
    assert set(COMPONENTS) - used == {"redis", "tls"}


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_passes_server_side_dry_run(
    example: str, rendered: dict[str, list[Obj]], cluster_ready: KubeApi, kubeconfig: Path
) -> None:
    objs = rendered[example]
    accepted = apply(objs, kubeconfig, dry_run=True)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in accepted) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in objs
    )
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == EXAMPLE_NAMESPACE, obj["metadata"]
    # A dry run persists nothing.
    assert not cluster_ready.exists(f"/apis/apps/v1/namespaces/{EXAMPLE_NAMESPACE}/deployments/llmlb")


def test_base_passes_server_side_dry_run(cluster_ready: KubeApi, kubeconfig: Path, tmp_path: Path) -> None:
    objs = render(DEPLOY / "base")
    assert sorted(o["kind"] for o in objs) == [
        "ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]  # fmt: skip
    apply(retarget(objs, EXAMPLE_NAMESPACE), kubeconfig, dry_run=True)
    path = tmp_path / "config.yaml"
    path.write_text(llmlb_config(objs)[0])
    done = check_config(path)
    assert done.returncode == 0, done.stderr


def test_a_schema_error_fails_the_dry_run(
    rendered: dict[str, list[Obj]], cluster_ready: KubeApi, kubeconfig: Path
) -> None:
    """The check is real: an unknown field or an invalid InferencePool is refused."""
    objs = copy.deepcopy(rendered["gateway-inferencepool"])
    llmlb_container(objs)["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    done = kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", kubeconfig=kubeconfig,
                   stdin=as_stream(objs))  # fmt: skip
    assert done.returncode != 0
    assert "paht" in done.stderr, done.stderr

    objs = copy.deepcopy(rendered["gateway-inferencepool"])
    del one(objs, "InferencePool")["spec"]["endpointPickerRef"]["port"]
    done = kubectl("apply", "--dry-run=server", "-f", "-", kubeconfig=kubeconfig, stdin=as_stream(objs))
    assert done.returncode != 0
    assert "port is required" in done.stderr, done.stderr


def test_optional_components(cluster_ready: KubeApi, kubeconfig: Path, tmp_path: Path) -> None:
    """redis and tls, composed with the base and the config lines their comments give."""
    # redis: the password comes from the Secret llmlb-redis through LLMLB_REDIS_PASSWORD.
    objs = render(composition(tmp_path / "redis", ["redis"], REDIS_CONFIG))
    apply(objs, kubeconfig, dry_run=True)
    [env] = llmlb_container(objs)["env"]
    assert env == {"name": "LLMLB_REDIS_PASSWORD",
                   "valueFrom": {"secretKeyRef": {"name": "llmlb-redis", "key": "password"}}}  # fmt: skip
    text, config = llmlb_config(objs)
    assert config["lb_config"]["password"] == "${LLMLB_REDIS_PASSWORD}"
    path = tmp_path / "redis.yaml"
    path.write_text(text)
    done = check_config(path, {"LLMLB_REDIS_PASSWORD": "s3cret"})
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout

    # tls: the Secret llmlb-grpc-tls mounted where the config looks for the files.
    objs = render(composition(tmp_path / "tls", ["tls"], TLS_CONFIG))
    apply(objs, kubeconfig, dry_run=True)
    [mount] = [m for m in llmlb_container(objs)["volumeMounts"] if m["name"] == "grpc-tls"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/llmlb-tls", True)
    volumes = llmlb_deployment(objs)["spec"]["template"]["spec"]["volumes"]
    [volume] = [v for v in volumes if v["name"] == "grpc-tls"]
    assert volume["secret"]["secretName"] == "llmlb-grpc-tls"
    text, config = llmlb_config(objs)
    files = tmp_path / "llmlb-tls"
    ca = CA()
    ca.write(files, "ca")
    ca.issue("llmlb", dns=("llmlb",)).write(files, "tls")
    for key in ("cert", "key", "client_ca"):
        target = Path(config["grpc_tls"][key])
        assert target.parent == Path(mount["mountPath"])
        assert (files / target.name).is_file(), target.name
        config["grpc_tls"][key] = str(files / target.name)
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump(config))
    done = check_config(path)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------
# properties of what is rendered


@pytest.mark.parametrize("example", EXAMPLES)
def test_pods_run_unprivileged(example: str, rendered: dict[str, list[Obj]]) -> None:
    deployments = of_kind(rendered[example], "Deployment")
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host), host
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert not context.get("privileged")
            assert "memory" in container["resources"]["limits"]
            assert set(container["resources"]["requests"]) == {"cpu", "memory"}


@pytest.mark.parametrize("example", EXAMPLES)
def test_llmlb_pods_are_probed_on_the_admin_port(example: str, rendered: dict[str, list[Obj]]) -> None:
    objs = rendered[example]
    container = llmlb_container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    _, config = llmlb_config(objs)
    # The ports the config listens on, on every interface (probes reach the pod IP).
    assert config["admin_listen"] == f"0.0.0.0:{ports['admin']}"
    assert config["grpc_listen"] == f"0.0.0.0:{ports['grpc']}"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    readiness = container["readinessProbe"]
    # Out of rotation before drain_grace ends (docs/operations.md#restarts-and-drains).
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < config.get("drain_grace", 5)
    pod = llmlb_deployment(objs)["spec"]["template"]["spec"]
    assert (
        pod["terminationGracePeriodSeconds"]
        >= config.get("drain_grace", 5) + config.get("drain_timeout", 300) + 5
    )
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    service = one(objs, "Service", "llmlb")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (9002, "grpc"), "admin": (9090, "admin")}  # fmt: skip
    assert service["spec"]["selector"] == llmlb_deployment(objs)["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_shipped_config_passes_check_config(
    example: str, rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    text, _ = llmlb_config(rendered[example])
    assert text == (DEPLOY / "examples" / example / "config.yaml").read_text()
    path = tmp_path / "config.yaml"
    path.write_text(text)
    done = check_config(path)
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["discovery"]["kind"] in RBAC_BY_KIND


@pytest.mark.parametrize("example", EXAMPLES)
def test_rbac_is_exactly_what_the_discovery_source_reads(
    example: str, rendered: dict[str, list[Obj]]
) -> None:
    objs = rendered[example]
    _, config = llmlb_config(objs)
    wanted = RBAC_BY_KIND[config["discovery"]["kind"]]
    assert not of_kind(objs, "ClusterRole")
    assert not of_kind(objs, "ClusterRoleBinding")
    granted: dict[tuple[str, str], list[str]] = {}
    for role in of_kind(objs, "Role"):
        assert role["metadata"]["namespace"] == EXAMPLE_NAMESPACE
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not rule.get("resourceNames")
            assert not rule.get("nonResourceURLs")
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted[(group, resource)] = sorted(granted.get((group, resource), []) + rule["verbs"])
    assert granted == wanted
    deployment = llmlb_deployment(objs)
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(objs, "ServiceAccount", account)
    bindings = of_kind(objs, "RoleBinding")
    assert [b["roleRef"]["name"] for b in bindings] == [r["metadata"]["name"] for r in of_kind(objs, "Role")]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": EXAMPLE_NAMESPACE}
        ]
    # A token only where the source needs one.
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is bool(wanted)


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_deployment_has_a_disruption_budget(example: str, rendered: dict[str, list[Obj]]) -> None:
    objs = rendered[example]
    budgets = of_kind(objs, "PodDisruptionBudget")
    for deployment in of_kind(objs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        [budget] = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_inferencepool_points_at_llmlb(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["gateway-inferencepool"]
    pool = one(objs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    _, config = llmlb_config(objs)
    assert config["discovery"] == {"kind": "inferencePool", "pool": pool["metadata"]["name"]}
    ref = pool["spec"]["endpointPickerRef"]
    service = one(objs, "Service", ref["name"])
    assert (ref["group"], ref["kind"]) == ("", "Service")
    [grpc] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert ref["port"] == {"number": grpc["port"]}
    assert grpc["targetPort"] == "grpc"
    assert config["grpc_listen"].endswith(":9002")
    assert pool["spec"]["selector"]["matchLabels"] == {"app": "vllm"}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]

    route = yaml.safe_load((DEPLOY / "examples" / "gateway-inferencepool" / "httproute.yaml").read_text())
    assert route["metadata"]["namespace"] == pool["metadata"]["namespace"]
    [rule] = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]  # fmt: skip


@pytest.mark.parametrize("example", ["standalone-dns", "standalone-kubernetes"])
def test_envoy_bootstrap_is_what_envoy_config_prints(
    example: str, rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    objs = rendered[example]
    envoy = one(objs, "Deployment", "envoy")
    [container] = envoy["spec"]["template"]["spec"]["containers"]
    [mount] = container["volumeMounts"]
    assert container["args"][:2] == ["-c", f"{mount['mountPath']}/envoy.yaml"]
    [volume] = envoy["spec"]["template"]["spec"]["volumes"]
    bootstrap = one(objs, "ConfigMap", volume["configMap"]["name"])["data"]["envoy.yaml"]

    config = tmp_path / "config.yaml"
    config.write_text(llmlb_config(objs)[0])
    argv = ["envoy-config", "--config", str(config), "--picker", "llmlb-picker:9002"]
    argv += ["--listen", "0.0.0.0:10000", "--admin", "127.0.0.1:9901"]
    done = subprocess.run(
        [sys.executable, "-m", "llmlb", *argv], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert bootstrap == done.stdout, (
        "regenerate deploy/kubernetes/components/envoy/envoy.yaml (see its kustomization)"
    )
    # Envoy reaches every picker through the headless Service; only Envoy may (network policy).
    picker = one(objs, "Service", "llmlb-picker")
    assert picker["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in picker["spec"]["ports"]] == [9002]
    policy = one(objs, "NetworkPolicy", "llmlb")
    grpc_rule = [r for r in policy["spec"]["ingress"] if {"port": 9002, "protocol": "TCP"} in r["ports"]]
    [rule] = grpc_rule
    [source] = rule["from"]
    assert (
        source["podSelector"]["matchLabels"].items()
        <= envoy["spec"]["template"]["metadata"]["labels"].items()
    )
    assert container["ports"] == [{"name": "http", "containerPort": 10000, "protocol": "TCP"}]


# --------------------------------------------------------------------------------------------------
# a real apply, and the ServiceAccount's rights as the API server's authorizer sees them


def can_i(kubeconfig: Path, namespace: str, verb: str, resource: str, account_ns: str | None = None) -> bool:
    who = f"system:serviceaccount:{account_ns or namespace}:llmlb"
    done = kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", who, kubeconfig=kubeconfig)
    assert done.stdout.strip() in ("yes", "no"), (done.stdout, done.stderr)
    return done.stdout.strip() == "yes"


@pytest.mark.parametrize("example", ["standalone-kubernetes", "gateway-inferencepool"])
def test_real_apply_grants_the_service_account_exactly_its_reads(
    example: str,
    rendered: dict[str, list[Obj]],
    cluster_ready: KubeApi,
    kubeconfig: Path,
    kube_namespace: str,
) -> None:
    # Pod Security Admission: the namespace enforces and warns at `restricted`.
    levels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    cluster_ready.patch(f"/api/v1/namespaces/{kube_namespace}", {"metadata": {"labels": levels}})
    objs = retarget(rendered[example], kube_namespace)
    done = kubectl("apply", "--dry-run=server", "-f", "-", kubeconfig=kubeconfig, stdin=as_stream(objs))
    assert done.returncode == 0, done.stderr
    assert "violate" not in done.stderr, done.stderr
    created = apply(objs, kubeconfig, dry_run=False)
    assert len(created) == len(objs)
    assert cluster_ready.exists(f"/apis/apps/v1/namespaces/{kube_namespace}/deployments/llmlb")
    # Applying again works (`kubectl apply -k` is how updates are rolled out).
    again = kubectl("apply", "-f", "-", kubeconfig=kubeconfig, stdin=as_stream(objs))
    assert again.returncode == 0, again.stderr
    assert "deployment.apps/llmlb unchanged" in again.stdout, again.stdout

    if example == "standalone-kubernetes":
        allowed = {("list", "endpointslices.discovery.k8s.io"), ("watch", "endpointslices.discovery.k8s.io")}
    else:
        pools = "inferencepools.inference.networking.k8s.io"
        allowed = {("list", pools), ("watch", pools), ("list", "pods"), ("watch", "pods")}
    resources = ["endpointslices.discovery.k8s.io", "inferencepools.inference.networking.k8s.io", "pods",
                 "services", "secrets", "configmaps"]  # fmt: skip
    for resource in resources:
        for verb in ("get", "list", "watch", "create", "delete"):
            assert can_i(kubeconfig, kube_namespace, verb, resource) == ((verb, resource) in allowed), (
                verb,
                resource,
            )
    # Nothing outside its namespace.
    for verb, resource in sorted(allowed):
        assert not can_i(kubeconfig, "default", verb, resource, account_ns=kube_namespace)
