"""The container image definition (Dockerfile, .dockerignore), read as text: no Docker daemon here.

What is checked: two stages from python:3.11-slim, the wheel built with maturin from a locked
Cargo.lock, a numeric non-root user that matches the Kubernetes manifests, the entrypoint and
command the manifests rely on, and a build context that holds what the COPY lines need and never
a locally built extension.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending
    out = []
    for line in joined:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def args() -> dict[str, str]:
    found = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            found[name] = value
    return found


def test_two_stages_from_python_slim() -> None:
    assert args()["PYTHON_IMAGE"] == "python:3.11-slim"
    builder, runtime = stages()
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert runtime[0] == ("FROM", "${PYTHON_IMAGE} AS runtime")
    builder_runs = " ".join(rest for word, rest in builder if word == "RUN")
    assert "sh.rustup.rs" in builder_runs
    assert "maturin build --release --locked --out /wheels" in builder_runs
    runtime_runs = " ".join(rest for word, rest in runtime if word == "RUN")
    assert "from=builder,source=/wheels" in runtime_runs
    # The wheel with its tracing extra (OpenTelemetry), so `tracing:` works in the image.
    assert "whl=$(ls /wheels/llmlb-*.whl)" in runtime_runs
    assert 'pip install "${whl}[tracing]"' in runtime_runs
    # The toolchain is pinned at or above the crate's rust-version.
    floor = re.search(r'rust-version = "(\d+)\.(\d+)"', (ROOT / "Cargo.toml").read_text())
    assert floor is not None
    pinned = tuple(int(x) for x in args()["RUST_VERSION"].split(".")[:2])
    assert pinned >= (int(floor[1]), int(floor[2]))


def test_runs_as_a_numeric_non_root_user_matching_the_manifests() -> None:
    runtime = stages()[-1]
    [user] = [rest for word, rest in runtime if word == "USER"]
    uid = int(args()["LLMLB_UID"])
    assert user == "${LLMLB_UID}:${LLMLB_UID}"
    assert uid > 0
    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text())
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (uid, uid, True)


def test_entrypoint_and_command() -> None:
    runtime = dict(stages()[-1])
    assert json.loads(runtime["ENTRYPOINT"]) == ["llmlb"]
    command = json.loads(runtime["CMD"])
    assert command == ["serve", "--config", "/etc/llmlb/config.yaml"]
    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == command
    assert "command" not in container
    assert {int(p) for p in runtime["EXPOSE"].split()} == {p["containerPort"] for p in container["ports"]}


def _regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: `**` any path, `*` and `?` within one segment."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i : close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, and a pattern that matches
    a directory covers everything under it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _regex(pattern.removeprefix("!"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_is_an_allowlist_of_the_copied_sources() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    copied = []
    for word, rest in stages()[0]:
        if word == "COPY":
            copied += rest.split()[:-1]
    assert copied == ["Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "rust", "python"]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), source
    assert not _ignored("python/llmlb/cli.py", patterns)
    assert not _ignored("rust/src/lib.rs", patterns)
    left_out = ["python/llmlb/_core.abi3.so", "python/llmlb/__pycache__/cli.cpython-311.pyc"]
    left_out += ["tests/conftest.py", ".git/config", "target/release/lib_core.so", "bench/README.md"]
    for path in left_out:
        assert _ignored(path, patterns), path
