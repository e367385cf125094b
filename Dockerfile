# syntax=docker/dockerfile:1
#
# llmlb container image. Two stages:
#   builder  - the Rust toolchain (rustup) and maturin build the abi3 wheel from pyproject.toml;
#   runtime  - python:3.11-slim with only that wheel and its dependencies installed.
# The runtime runs as a numeric non-root user (65532) and writes nothing to its root filesystem,
# so it runs as it is with `--read-only` / Kubernetes `readOnlyRootFilesystem: true`:
# `llmlb serve` writes no files at all; only `--workers N` makes one shared-state file, in
# /dev/shm (a tmpfs of its own in Docker and Kubernetes), else in $TMPDIR (/tmp). See
# docs/kubernetes.md ("The image").
#
#   docker build -t llmlb:0.1.0 .
#   docker run --rm --read-only -p 9002:9002 -p 9090:9090 \
#     -v "$PWD/my-config.yaml:/etc/llmlb/config.yaml:ro" llmlb:0.1.0
#
# The config must listen on 0.0.0.0 for the ports to be reachable from outside the container
# (`admin_listen` defaults to 127.0.0.1:9090). Other commands: `docker run --rm llmlb:0.1.0
# check-config /etc/llmlb/config.yaml`, `... envoy-config ...`, `... sim --port 8000`.

ARG PYTHON_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# The toolchain this repository is built and tested with (Cargo.toml's rust-version is the floor).
ARG RUST_VERSION=1.95.0
ARG MATURIN_VERSION=1.16.0

ENV RUSTUP_HOME=/opt/rustup \
    CARGO_HOME=/opt/cargo \
    PATH=/opt/cargo/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc + libc6-dev: the linker rustc needs; curl + CA certificates: to fetch rustup.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && pip install "maturin==${MATURIN_VERSION}" \
 && rustc --version && maturin --version

WORKDIR /src
# Only what the wheel is built from (.dockerignore is an allowlist of the same files).
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust ./rust
COPY python ./python

# --locked: exactly the crate versions in Cargo.lock. The wheel is abi3 (CPython >= 3.10).
RUN --mount=type=cache,target=/opt/cargo/registry \
    --mount=type=cache,target=/src/target \
    maturin build --release --locked --out /wheels \
 && ls -l /wheels

# ------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG LLMLB_UID=65532

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheel and its dependencies (grpcio, uvloop, redis, kubernetes_asyncio, ...: binary wheels
# from PyPI) with the `tracing` extra (OpenTelemetry SDK + OTLP/gRPC exporter, so `tracing:` in
# the config works in the image; imported only when configured), compiled to bytecode now, as
# root, so nothing is written at run time. Then the user the process runs as: numeric, no home,
# no shell, owning nothing in the image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    whl=$(ls /wheels/llmlb-*.whl) \
 && pip install "${whl}[tracing]" \
 && groupadd --system --gid "${LLMLB_UID}" llmlb \
 && useradd --system --uid "${LLMLB_UID}" --gid "${LLMLB_UID}" --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin llmlb \
 && llmlb --version

# No bytecode writes (site-packages is read-only at run time anyway), logs straight to stdout.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

LABEL org.opencontainers.image.title="llmlb" \
      org.opencontainers.image.description="LLM-aware endpoint picker for Envoy (gRPC ext_proc)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

# ext_proc gRPC (grpc_listen) and admin HTTP (admin_listen: /healthz, /readyz, /metrics).
EXPOSE 9002 9090

USER ${LLMLB_UID}:${LLMLB_UID}
WORKDIR /

# llmlb handles SIGTERM itself (not ready at once, drain_grace, then drain_timeout), also as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llmlb"]
CMD ["serve", "--config", "/etc/llmlb/config.yaml"]
