"""The ``llmlb`` command line: serve, check-config, envoy-config, sim.

Exit codes: 0 clean shutdown, 2 bad config or arguments (one line naming the field), 1 anything
else. User mistakes never print a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from llmlb.config import (
    DEFAULT_REQUEST_TIMEOUT_S,
    Config,
    ConfigError,
    effective_yaml,
    load_config,
    load_endpoints_file,
    with_overrides,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other llmlb error, plus where to look.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(code: int, message: str) -> int:
    print(f"llmlb: error: {message}", file=sys.stderr)
    return code


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmlb", description="LLM-aware endpoint picker for Envoy (gRPC ext_proc).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the picker daemon (ext_proc gRPC + admin HTTP)")
    serve.add_argument("--config", metavar="FILE", help="YAML config file (see docs/configuration.md)")
    serve.add_argument("--endpoints", metavar="A,B,...", help="comma-separated ip:port endpoints")
    serve.add_argument("--policy", metavar="NAME", help="global_least_request | prefix_cache | least_busy")
    serve.add_argument("--grpc-listen", metavar="H:P", help="ext_proc listen address (default 0.0.0.0:9002)")
    serve.add_argument("--admin-listen", metavar="H:P", help="admin HTTP address (default 127.0.0.1:9090)")
    serve.add_argument("--log-level", metavar="L", help="debug | info | warning | error")
    serve.add_argument(
        "--workers",
        metavar="N",
        type=_positive_int,
        default=1,
        help="picker processes sharing the ext_proc port and one state (default 1; see docs/design.md)",
    )
    # Set by the supervisor of --workers N for each worker process; not for people.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-state", help=argparse.SUPPRESS)
    serve.add_argument("--worker-announce", help=argparse.SUPPRESS)

    check = sub.add_parser("check-config", help="validate a config and print the effective config")
    check.add_argument("file", metavar="FILE")

    envoy = sub.add_parser("envoy-config", help="print an Envoy bootstrap wired to the picker")
    source = envoy.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="take endpoints and the picker address from it")
    source.add_argument("--endpoints", metavar="A,B,...", help="comma-separated ip:port endpoints")
    envoy.add_argument("--listen", metavar="H:P", default="0.0.0.0:10000", help="Envoy's HTTP listener")
    envoy.add_argument("--admin", metavar="H:P", default="127.0.0.1:9901", help="Envoy's admin listener")
    envoy.add_argument(
        "--picker",
        metavar="H:P",
        action="append",
        help="a picker's ext_proc address; repeat (or comma-separate) for several replicas "
        "(default: the config's grpc_listen, else 127.0.0.1:9002)",
    )
    envoy.add_argument(
        "--max-body-bytes",
        metavar="N",
        type=int,
        help="largest request body (default: the config's max_body_bytes, else 64 MiB)",
    )
    envoy.add_argument(
        "--request-timeout",
        metavar="S",
        type=int,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds a request may take, streamed response included (default %(default)s; "
        "keep the picker's drain_timeout at least this)",
    )
    envoy.add_argument("--mode", choices=("buffered", "full-duplex"), default="buffered")
    envoy.add_argument("--fallback", choices=("round_robin", "least_request", "random", "ring_hash"))
    envoy.add_argument(
        "--route-prefix",
        metavar="PREFIX",
        action="append",
        help="path prefix routed to the model servers; repeat for several (default /v1/; / routes "
        "everything); any other path gets 404 from Envoy",
    )
    envoy.add_argument("--picker-ca", metavar="FILE", help="TLS to the picker: CA of its certificate")
    envoy.add_argument("--picker-cert", metavar="FILE", help="Envoy's client certificate (mTLS)")
    envoy.add_argument("--picker-key", metavar="FILE", help="the key of --picker-cert")
    envoy.add_argument(
        "--picker-sni",
        metavar="NAME",
        help="server name sent to and required of the picker (default: the picker host when a name)",
    )
    _add_sim_parser(sub)
    return parser


def _add_sim_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    sim = sub.add_parser(
        "sim",
        help="run a simulated vLLM model server (see docs/sim.md)",
        description="A vLLM-compatible model-server simulator: paged KV cache with prefix caching, "
        "continuous batching with chunked prefill, vLLM's /metrics, failure injection. See docs/sim.md.",
    )
    add = sim.add_argument
    add("--port", type=_int_in(1, 65535), required=True, help="TCP port to listen on")
    add("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    add("--name", help="name in the x-sim-name header and /_sim/stats (default sim-PORT)")
    add(
        "--model",
        help="the engine's model: in /metrics, and for requests that name none (default: the first of "
        "--models, else sim-model)",
    )
    add(
        "--models",
        metavar="MODEL,...",
        type=_names,
        default=(),
        help="model names served; a request naming another model (or adapter) gets 404 (default: --model)",
    )
    add(
        "--block-size",
        type=_int_in(1, 4096),
        default=16,
        help="tokens per KV-cache block (default %(default)s)",
    )
    add(
        "--kv-blocks",
        type=_int_in(1, 10_000_000),
        default=2048,
        help="KV-cache capacity in blocks (default %(default)s)",
    )
    add(
        "--max-running",
        type=_int_in(1, 100_000),
        default=16,
        help="most requests in the running batch (default %(default)s)",
    )
    add(
        "--max-batched-tokens",
        type=_int_in(1, 10_000_000),
        default=2048,
        help="prefill tokens per engine step (chunked prefill budget) (default %(default)s)",
    )
    add(
        "--step-base-ms",
        type=_float_in(0, 60_000),
        default=2.0,
        help="fixed cost of one engine step (default %(default)s)",
    )
    add(
        "--prefill-ms-per-token",
        type=_float_in(0, 1000),
        default=0.02,
        help="step cost per prefilled (uncached) prompt token (default %(default)s)",
    )
    add(
        "--decode-ms-per-seq",
        type=_float_in(0, 1000),
        default=0.1,
        help="step cost per sequence decoding a token (default %(default)s)",
    )
    add(
        "--output-tokens",
        type=_int_in(1, 1_000_000),
        default=16,
        help="tokens generated when a request sets no max_tokens (default %(default)s)",
    )
    add(
        "--chars-per-token",
        type=_int_in(1, 1024),
        default=4,
        help="prompt bytes per token (default %(default)s)",
    )
    add("--lora", metavar="ADAPTER,...", type=_names, default=(), help="LoRA adapter names to serve")
    add(
        "--max-loras",
        type=_int_in(1, 10_000),
        default=2,
        help="most distinct adapters in the running batch (default %(default)s)",
    )
    add(
        "--fail-rate",
        type=_float_in(0, 1),
        default=0.0,
        help="fraction of requests answered 500 at once (default %(default)s)",
    )
    add(
        "--slow-rate",
        type=_float_in(0, 1),
        default=0.0,
        help="fraction of requests held --slow-ms first (default %(default)s)",
    )
    add(
        "--slow-ms",
        type=_float_in(0, 3_600_000),
        default=1000.0,
        help="delay of a slow request (default %(default)s)",
    )
    add(
        "--drop-rate",
        type=_float_in(0, 1),
        default=0.0,
        help="fraction of requests whose connection is closed without an answer (default %(default)s)",
    )
    add("--seed", type=int, default=0, help="seed of the failure-injection draws (default %(default)s)")
    add("--access-log", action="store_true", help="log every HTTP request to stderr")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:  # integral spellings such as 2048.0 or 1e+06 (what Python's f"{x:g}" writes)
                number = float(text)
            except ValueError:
                number = math.nan
            if not number.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
            value = int(number)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{value:g} is outside {low:g}..{high:g}")
        return value

    return parse


def _names(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: names must be non-empty")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a name is given twice")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..64")
    return value


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The serve flags a worker process gets: everything but --workers."""
    argv = []
    for flag in ("config", "endpoints", "policy", "grpc_listen", "admin_listen", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", value]
    return argv


def _serve_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if args.config else Config()
    return with_overrides(
        config,
        endpoints=args.endpoints,
        policy=args.policy,
        grpc_listen=args.grpc_listen,
        admin_listen=args.admin_listen,
        log_level=args.log_level,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from llmlb.daemon import ConfigRefused, StartupError, WorkerRole, serve, serve_workers

    config = _serve_config(args)
    _check_tls_files(config)
    _check_tracing_installed(config)
    try:
        if args.worker_index is not None:
            role = WorkerRole(args.worker_index, args.worker_state, args.worker_announce)
            return serve(config, role)
        if args.workers > 1:
            return serve_workers(config, _worker_argv(args), args.workers)
        return serve(config)
    except ConfigRefused as e:
        return _fail(EXIT_USAGE, str(e))
    except StartupError as e:
        return _fail(EXIT_FAILURE, str(e))
    except KeyboardInterrupt:
        return EXIT_OK


def _check_tls_files(config: Config) -> None:
    """grpc_tls files that are missing or not PEM stop here: exit 2, one line naming the field."""
    if config.grpc_tls is not None:
        from llmlb.tls import check_files

        check_files(config.grpc_tls)


#: What ``tracing`` needs beyond llmlb's own dependencies (the ``llmlb[tracing]`` extra).
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter")


def _check_tracing_installed(config: Config) -> None:
    """Tracing configured without the OpenTelemetry packages stops here: exit 2, one line."""
    if not config.tracing.enabled:
        return
    import importlib

    for module in TRACING_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                "tracing.otlp_endpoint",
                f"tracing needs the OpenTelemetry packages: pip install 'llmlb[tracing]' ({e})",
            ) from None


def _check_kubeconfig(config: Config) -> None:
    """A kubeconfig named in the config is loaded as ``serve`` would (no API call is made): one
    that cannot be stops here, exit 2. The in-cluster/``$KUBECONFIG`` default depends on where
    the picker runs, so it is left to ``serve``."""
    discovery = config.discovery
    if discovery is None or discovery.kind == "dns" or not discovery.kubeconfig:
        return
    import asyncio

    from llmlb.discovery.kube import KubeClient

    async def load() -> None:
        client = await KubeClient.connect(discovery.kubeconfig)
        await client.close()

    asyncio.run(load())


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    if config.endpoints_file:
        load_endpoints_file(config.endpoints_file)
    _check_tls_files(config)
    _check_kubeconfig(config)
    _check_tracing_installed(config)
    sys.stdout.write(effective_yaml(config))
    return EXIT_OK


def _picker_address(grpc_listen: str) -> str:
    """Where Envoy should dial a picker listening on ``grpc_listen`` (wildcards mean local)."""
    host, _, port = grpc_listen.rpartition(":")
    if host in ("0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    from llmlb.envoy_config import DEFAULT_ROUTE_PREFIXES, EnvoyConfigError, EnvoyOptions, render_envoy_config

    config = load_config(args.config) if args.config else with_overrides(Config(), endpoints=args.endpoints)
    endpoints = [ep.address for ep in config.endpoints]
    if config.endpoints_file:
        endpoints += [
            ep.address for ep in load_endpoints_file(config.endpoints_file) if ep.address not in endpoints
        ]
    if config.discovery is not None and config.discovery.kind == "dns":
        # Envoy follows the same name itself (STRICT_DNS), so its fallback hosts are the picker's.
        endpoints.append(f"{config.discovery.name}:{config.discovery.port}")
    if args.fallback and not endpoints:
        raise ConfigError(
            "--fallback",
            "needs endpoints (--endpoints, or --config with endpoints or dns discovery) to list in the "
            "Envoy cluster",
        )
    pickers = [p for value in args.picker or () for p in value.split(",") if p.strip()]
    if args.picker and not pickers:
        raise ConfigError("--picker", "expected host:port, got an empty value")
    _check_picker_tls_flags(args, config)
    try:
        options = EnvoyOptions(
            endpoints=tuple(endpoints),
            listen=args.listen,
            admin=args.admin,
            pickers=tuple(pickers or [_picker_address(config.grpc_listen)]),
            # One owner of the default: the daemon's max_body_bytes (config file or its default).
            max_body_bytes=args.max_body_bytes if args.max_body_bytes is not None else config.max_body_bytes,
            mode=args.mode,
            fallback=args.fallback,
            request_timeout_s=args.request_timeout,
            route_prefixes=tuple(args.route_prefix or DEFAULT_ROUTE_PREFIXES),
            picker_ca=args.picker_ca,
            picker_cert=args.picker_cert,
            picker_key=args.picker_key,
            picker_sni=args.picker_sni,
        )
        rendered = render_envoy_config(options)
    except EnvoyConfigError as e:
        raise ConfigError(e.field, e.message) from None
    if args.config and config.drain_timeout < args.request_timeout:
        print(
            f"llmlb: warning: the config's drain_timeout ({config.drain_timeout} s) is shorter than "
            f"--request-timeout ({args.request_timeout} s): a picker restart may cut requests Envoy "
            "would still let finish (see docs/operations.md)",
            file=sys.stderr,
        )
    if args.fallback and args.mode == "full-duplex":
        print(
            "llmlb: warning: in full-duplex mode Envoy 1.40 cannot fail open once a request body is on its "
            "way (500 while the picker is down); use --mode buffered for a dependable fallback",
            file=sys.stderr,
        )
    sys.stdout.write(rendered)
    return EXIT_OK


def _check_picker_tls_flags(args: argparse.Namespace, config: Config) -> None:
    """A config whose picker speaks TLS (or demands client certificates) needs the matching flags:
    otherwise the generated Envoy could never reach it."""
    tls = config.grpc_tls
    if tls is None:
        return
    if args.picker_ca is None:
        raise ConfigError(
            "--picker-ca",
            "the config sets grpc_tls: give the CA that signed grpc_tls.cert (Envoy must verify it)",
        )
    if tls.client_ca is not None and args.picker_cert is None:
        raise ConfigError(
            "--picker-cert",
            "the config sets grpc_tls.client_ca: give Envoy's client certificate and key "
            "(--picker-cert, --picker-key) signed by that CA",
        )


def _cmd_sim(args: argparse.Namespace) -> int:
    from llmlb.sim.engine import EngineConfig
    from llmlb.sim.server import SimOptions, StartupError, run

    model = args.model or (args.models[0] if args.models else "sim-model")
    if args.models and model not in args.models:
        raise ConfigError("--models", f"must include --model ({model})")
    for name in args.models or (model,):
        if name in args.lora:
            raise ConfigError("--lora", f"an adapter cannot be named like a served model ({name})")
    engine = EngineConfig(
        model=model,
        block_size=args.block_size,
        kv_blocks=args.kv_blocks,
        max_running=args.max_running,
        max_batched_tokens=args.max_batched_tokens,
        step_base_ms=args.step_base_ms,
        prefill_ms_per_token=args.prefill_ms_per_token,
        decode_ms_per_seq=args.decode_ms_per_seq,
        chars_per_token=args.chars_per_token,
        max_loras=args.max_loras,
    )
    options = SimOptions(
        port=args.port,
        host=args.host,
        name=args.name or "",
        engine=engine,
        output_tokens=args.output_tokens,
        models=args.models,
        loras=args.lora,
        fail_rate=args.fail_rate,
        slow_rate=args.slow_rate,
        slow_ms=args.slow_ms,
        drop_rate=args.drop_rate,
        seed=args.seed,
        access_log=args.access_log,
    )
    try:
        return run(options)
    except StartupError as e:
        return _fail(EXIT_FAILURE, str(e))
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from llmlb import __version__

        print(f"llmlb {__version__}")
        return EXIT_OK
    commands = {
        "serve": _cmd_serve,
        "check-config": _cmd_check_config,
        "envoy-config": _cmd_envoy_config,
        "sim": _cmd_sim,
    }
    if args.command not in commands:
        parser.print_help()
        return EXIT_USAGE
    try:
        return commands[args.command](args)
    except ConfigError as e:
        return _fail(EXIT_USAGE, str(e))
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
