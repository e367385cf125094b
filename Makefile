# llmlb developer tasks. `make help` lists them.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

.PHONY: install
install: ## Install llmlb (builds the Rust extension, release profile)
	$(PIP) install .

.PHONY: deps
deps: ## System packages the tests need (Debian's redis-server, dnsmasq-base, chromium, wrk; idempotent)
	bash scripts/install-test-deps.sh

.PHONY: dev
dev: deps ## Install llmlb editable plus everything the tests, lints and benchmarks need
	$(PIP) install -e '.[test]'
	@# xds-protos ships an old copy of opentelemetry-proto's modules (Envoy's API imports them);
	@# whichever wheel pip unpacks last owns the files, so put the real ones back.
	$(PIP) install --no-deps --force-reinstall "opentelemetry-proto==$$($(PYTHON) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

.PHONY: kube-bin
kube-bin: ## Build the test Kubernetes API server, etcd and kubectl once into a cache dir (~6 min cold)
	bash scripts/build-kube-test-binaries.sh

.PHONY: otel-bin
otel-bin: ## Build the OpenTelemetry Collector the tracing tests receive spans with, once into a cache dir (~2 min cold)
	bash scripts/build-otel-collector.sh

.PHONY: build
build: ## Rebuild the Rust extension in place after Rust changes (editable install)
	$(PIP) install --no-build-isolation --no-deps -e .

.PHONY: lint-python
lint-python: ## ruff (lint + format check), mypy --strict, and the extension's stub against the extension
	ruff check python tests bench scripts
	ruff format --check python tests bench scripts
	mypy
	python -m mypy.stubtest llmlb._core

.PHONY: lint-rust
lint-rust: ## rustfmt check and clippy (pedantic) with warnings as errors
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings

.PHONY: lint
lint: lint-python lint-rust ## All linters

.PHONY: fmt
fmt: ## Format Python and Rust
	ruff format python tests bench
	ruff check --fix python tests bench
	cargo fmt

.PHONY: test-rust
test-rust: ## Rust unit tests
	cargo test --release

.PHONY: test-python
test-python: ## Python tests: unit, protocol and end-to-end through a real Envoy
	$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

.PHONY: test-bench-smoke
test-bench-smoke: ## The Python benchmarks, once each, and bench-scale's short variant, as smoke tests
	$(PYTHON) -m pytest bench/python --benchmark-disable -q; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	$(PYTHON) bench/scale/bench_scale.py --smoke

.PHONY: test
test: dev kube-bin otel-bin lint test-rust test-python test-bench-smoke ## Install what tests need, lint, run every test

.PHONY: bench
bench: ## Criterion (Rust) and pytest-benchmark (Python) benchmarks
	cargo bench --bench core
	$(PYTHON) -m pytest bench/python --benchmark-enable

.PHONY: bench-check
bench-check: ## Run the benchmarks and print each figure against its budget
	$(PYTHON) bench/check.py

.PHONY: bench-e2e
bench-e2e: ## Requests/s, latency and picker CPU through a real Envoy (wrk; apt-get install wrk)
	$(PYTHON) bench/e2e/bench_e2e.py --rounds 3
	$(PYTHON) bench/e2e/bench_e2e.py --budget

.PHONY: bench-redis
bench-redis: ## What shared state in Redis adds per pick, through Envoy at a fixed rate
	$(PYTHON) bench/redis/bench_redis.py

.PHONY: bench-stall
bench-stall: ## How long one big request body holds up other streams in the picker (both Envoy modes)
	$(PYTHON) bench/stall/bench_stall.py

.PHONY: bench-churn
bench-churn: ## What pod churn costs the picker (CPU, lag, RSS) against the test API server (needs kube-bin)
	$(PYTHON) bench/discovery/bench_churn.py

.PHONY: bench-scale
bench-scale: ## Gateway mode at scale beside the llm-d EPP (../shared/anchors): CPU, req/s, scrapes, memory
	$(PYTHON) bench/scale/bench_scale.py --label $(or $(LABEL),run)

.PHONY: bench-quality
bench-quality: ## Routing quality (KV hit rate, TTFT, hot spots) of each policy over simulated vLLM servers
	$(PYTHON) bench/quality/run.py

.PHONY: clean
clean: ## Remove build outputs
	cargo clean
	rm -rf .pytest_cache .hypothesis .benchmarks .mypy_cache .ruff_cache python/llmlb/*.so
