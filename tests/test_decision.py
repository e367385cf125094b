"""The decision record's forms (metadata, header, log lines) and the settings that turn them on."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from llmlb._core import Balancer, RecordEncoder
from llmlb.config import ConfigError, parse_config
from llmlb.decision import RECORD_FIELDS, RECORD_NAMESPACE, Decision
from llmlb.logs import REQUEST_LOGGER, RequestLog, configure_logging
from llmlb.picking import Refusal, RequestMeta


def decision(**changes: object) -> Decision:
    fields: dict[str, object] = {
        "ticket": 7,
        "endpoint": "10.0.0.5:8000",
        "policy": "prefix_cache",
        "reason": "prefix_hit",
        "prefix_depth": 3,
        "prefix_levels": 4,
        "prompt_tokens": 1000,
        "cached_tokens": 750,
        "candidates": 3,
        "score": 0.875,
        "runner_up": 0.5,
        "state": "embedded",
        "pick_seconds": 42e-6,
        "time": 1_800_000_000.0,
        "request_id": "req-1",
        "path": "/v1/chat/completions",
        "model": "llama",
    }
    fields.update(changes)
    return Decision.of(**fields)  # type: ignore[arg-type]


def test_record_has_every_documented_field_in_order() -> None:
    record = decision().fields()
    assert list(record) == list(RECORD_FIELDS)
    assert record["prefix_share"] == 0.75
    assert record["pick_us"] == 42.0
    assert record["runner_up"] == 0.5


def test_record_leaves_out_runner_up_when_alone_and_share_when_no_prompt() -> None:
    record = decision(runner_up=None, prompt_tokens=0, cached_tokens=0).fields()
    assert "runner_up" not in record
    assert record["prefix_share"] == 0.0


def test_compact_form_is_one_header_value() -> None:
    value = decision().compact()
    pairs = dict(part.split("=", 1) for part in value.split(";"))
    assert pairs == {
        "endpoint": "10.0.0.5:8000",
        "reason": "prefix_hit",
        "depth": "3/4",
        "share": "0.75",
        "candidates": "3",
        "score": "0.875",
        "runner_up": "0.500",
        "state": "embedded",
        "pick_us": "42",
    }
    assert decision(runner_up=None).compact().count("runner_up=-") == 1


def test_metadata_is_the_record_and_the_route() -> None:
    """The Rust-encoded metadata is a protobuf Struct: the route namespace with the endpoint,
    the record namespace with exactly the record's dict form (same values, same rounding)."""
    encoder = RecordEncoder(
        "envoy.lb", "x-gateway-destination-endpoint", RECORD_NAMESPACE, list(RECORD_FIELDS)
    )
    for d in (decision(), decision(runner_up=None, prompt_tokens=0, cached_tokens=0, score=1 / 3)):
        encoded = struct_pb2.Struct.FromString(
            encoder.metadata(d.pick, d.policy, d.state, d.request_id, d.path, d.model, d.pick_seconds)
        )
        expected = struct_pb2.Struct()
        expected.get_or_create_struct("envoy.lb")["x-gateway-destination-endpoint"] = d.endpoint
        expected.get_or_create_struct(RECORD_NAMESPACE).update(d.fields())
        assert encoded == expected
    with pytest.raises(ValueError, match="no decision record field"):
        RecordEncoder("envoy.lb", "k", RECORD_NAMESPACE, ["endpoint", "colour"])
    # As the answer's dynamic_metadata field: appended to the answer's bytes, parsed into it.
    field = pb.ProcessingResponse.DESCRIPTOR.fields_by_name["dynamic_metadata"].number
    wrapped = RecordEncoder(
        "envoy.lb",
        "x-gateway-destination-endpoint",
        RECORD_NAMESPACE,
        list(RECORD_FIELDS),
        metadata_field=field,
    )
    d = decision()
    answer = pb.ProcessingResponse(request_body=pb.BodyResponse())
    parsed = pb.ProcessingResponse.FromString(
        answer.SerializeToString()
        + wrapped.metadata(d.pick, d.policy, d.state, d.request_id, d.path, d.model, d.pick_seconds)
    )
    assert parsed.HasField("request_body")
    assert parsed.dynamic_metadata == struct_pb2.Struct.FromString(
        encoder.metadata(d.pick, d.policy, d.state, d.request_id, d.path, d.model, d.pick_seconds)
    )
    with pytest.raises(ValueError, match="metadata_field 16"):
        RecordEncoder("envoy.lb", "k", RECORD_NAMESPACE, ["endpoint"], metadata_field=16)


def test_record_values_are_typed_as_json_expects() -> None:
    record = decision(score=1 / 3).fields()
    assert record["score"] == 0.333333
    assert isinstance(record["prefix_depth"], int)
    assert isinstance(record["candidates"], int)
    assert isinstance(record["pick_us"], float)


def test_pick_figures_come_from_the_pipeline() -> None:
    balancer = Balancer("global_least_request", seed=1)
    balancer.set_endpoints(["a:1", "b:1", "c:1"])
    held = balancer.pick(None)
    pick = balancer.pick(None)
    assert pick.endpoint != held.endpoint
    assert pick.candidates == 3
    assert pick.runner_up is not None
    assert pick.score >= pick.runner_up
    balancer.set_endpoints(["a:1"])
    alone = balancer.pick(None)
    assert (alone.candidates, alone.runner_up) == (1, None)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    yield out
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def _use(out: io.StringIO, log_format: str, level: str = "info") -> None:
    configure_logging(level, log_format)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)


def test_json_request_line_carries_the_record_and_status(captured: io.StringIO) -> None:
    _use(captured, "json")
    RequestLog().finished(decision(), 200)
    (line,) = [json.loads(x) for x in captured.getvalue().splitlines()]
    assert line["logger"] == REQUEST_LOGGER
    assert line["level"] == "info"
    assert line["status"] == 200
    assert {k: line[k] for k in ("request_id", "path", "model", "endpoint", "reason", "pick_us")} == {
        "request_id": "req-1",
        "path": "/v1/chat/completions",
        "model": "llama",
        "endpoint": "10.0.0.5:8000",
        "reason": "prefix_hit",
        "pick_us": 42.0,
    }
    assert line["time"].endswith("Z")


def test_text_request_line_and_refusals(captured: io.StringIO) -> None:
    _use(captured, "text")
    log = RequestLog()
    log.finished(decision(), 503)
    log.refused(
        RequestMeta(request_id="req-2", path="/v1/messages"), Refusal(429, "rate_limit_exceeded", "x")
    )
    first, second = captured.getvalue().splitlines()
    assert "request id=req-1 /v1/chat/completions model=llama -> 10.0.0.5:8000 reason=prefix_hit" in first
    assert "status=503" in first
    assert "request id=req-2 /v1/messages refused status=429 rate_limit_exceeded" in second


def test_request_lines_need_info(captured: io.StringIO) -> None:
    _use(captured, "json", level="warning")
    RequestLog().finished(decision(), 200)
    assert captured.getvalue() == ""


def test_library_loggers_are_quiet_unless_asked(captured: io.StringIO) -> None:
    configure_logging("debug", "text")
    assert logging.getLogger("grpc").getEffectiveLevel() == logging.WARNING
    configure_logging("debug", "text", libraries=True)
    assert logging.getLogger("grpc").getEffectiveLevel() == logging.DEBUG


def test_observability_settings() -> None:
    config = parse_config(
        {
            "log_format": "JSON",
            "log_requests": True,
            "decision_header": "X-LLMLB-Decision",
            "recent_decisions": 5,
        }
    )
    assert (config.log_format, config.log_requests, config.decision_header) == (
        "json",
        True,
        "x-llmlb-decision",
    )
    assert config.recent_decisions == 5
    defaults = parse_config({})
    assert (defaults.log_format, defaults.log_requests, defaults.decision_header) == ("text", False, "")
    for bad, message in (
        ({"log_format": "xml"}, "log_format"),
        ({"log_requests": "yes"}, "log_requests"),
        ({"decision_header": "bad header"}, "decision_header"),
        ({"recent_decisions": -1}, "recent_decisions"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(bad)
