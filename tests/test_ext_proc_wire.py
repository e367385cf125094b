"""The ext_proc wire codec in Rust (``ExtProcMessage.decode``, the chunk answers) against the
protobuf library's reading and writing of the same messages."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from llmlb._core import ExtProcMessage, echo_response_chunk, request_body_chunk

Mode = processing_mode_pb2.ProcessingMode
M = ExtProcMessage

header_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20)
header_pairs = st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=8)


def _header_map(pairs: list[tuple[str, bytes]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs])


@given(pairs=header_pairs, end=st.booleans(), response=st.booleans())
def test_headers_decode_as_protobuf_reads_them(pairs, end, response):
    http = pb.HttpHeaders(headers=_header_map(pairs), end_of_stream=end)
    request = pb.ProcessingRequest(**{"response_headers" if response else "request_headers": http})
    decoded = M.decode(request.SerializeToString())
    assert decoded.phase == (M.RESPONSE_HEADERS if response else M.REQUEST_HEADERS)
    assert decoded.headers == tuple(pairs)
    assert decoded.end_of_stream == end
    assert decoded.body == b""
    assert decoded.body_modes is None


@given(data=st.binary(max_size=300), end=st.booleans(), response=st.booleans())
def test_bodies_decode_as_protobuf_reads_them(data, end, response):
    http = pb.HttpBody(body=data, end_of_stream=end)
    request = pb.ProcessingRequest(**{"response_body" if response else "request_body": http})
    decoded = M.decode(request.SerializeToString())
    assert (decoded.phase, decoded.body, decoded.end_of_stream) == (
        M.RESPONSE_BODY if response else M.REQUEST_BODY,
        data,
        end,
    )


def test_the_first_message_carries_the_body_modes_and_side_fields_are_skipped():
    request = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=_header_map([(":path", b"/v1/chat/completions")])),
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=Mode.FULL_DUPLEX_STREAMED, response_body_mode=Mode.STREAMED
        ),
        observability_mode=True,
    )
    request.metadata_context.filter_metadata["x"].fields["y"].string_value = "z"
    decoded = M.decode(request.SerializeToString())
    assert decoded.body_modes == (Mode.FULL_DUPLEX_STREAMED, Mode.STREAMED)
    assert decoded.headers == ((":path", b"/v1/chat/completions"),)


def test_a_value_without_raw_value_is_read_from_value():
    status = base_pb2.HeaderValue(key=":status", value="200")
    http = pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[status]))
    assert M.decode(pb.ProcessingRequest(response_headers=http).SerializeToString()).headers == (
        (":status", b"200"),
    )


@pytest.mark.parametrize(
    ("request_", "phase"),
    [
        (pb.ProcessingRequest(request_trailers=pb.HttpTrailers()), M.REQUEST_TRAILERS),
        (pb.ProcessingRequest(response_trailers=pb.HttpTrailers()), M.RESPONSE_TRAILERS),
        (pb.ProcessingRequest(observability_mode=True), M.NONE),
        (pb.ProcessingRequest(), M.NONE),
    ],
)
def test_other_phases(request_, phase):
    assert M.decode(request_.SerializeToString()).phase == phase


@pytest.mark.parametrize(
    "raw",
    [b"\x22\x05\x01", b"\x0f", b"\x12\x02\x1a"],
    ids=["truncated body", "wire type 7", "truncated headers"],
)
def test_malformed_messages_are_marked_not_raised(raw):
    with pytest.raises(DecodeError):  # the protobuf library refuses them too
        pb.ProcessingRequest.FromString(raw)
    assert M.decode(raw).phase == M.MALFORMED


@pytest.mark.parametrize(
    ("raw", "phase", "modes"),
    [(b"\x20\x01", M.NONE, None), (b"\x5a\x02\x0a\x00", M.NONE, (0, 0))],
    ids=["phase as varint", "mode as bytes"],
)
def test_unexpected_wire_types_are_unknown_fields_as_in_protobuf(raw, phase, modes):
    read = pb.ProcessingRequest.FromString(raw)
    assert read.WhichOneof("request") is None
    decoded = M.decode(raw)
    assert (decoded.phase, decoded.body_modes) == (phase, modes)
    assert read.HasField("protocol_config") == (modes is not None)


# Bodies around the varint length boundaries (127/128 bytes, and past 16 KiB).
bodies = st.one_of(st.binary(max_size=300), st.sampled_from([b"x" * 127, b"x" * 128, b"x" * 70_000]))


@given(data=bodies, end=st.booleans())
def test_chunk_answers_are_what_protobuf_writes(data, end):
    streamed = pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=end))
    )
    assert (
        echo_response_chunk(data, end)
        == pb.ProcessingResponse(response_body=pb.BodyResponse(response=streamed)).SerializeToString()
    )
    assert (
        request_body_chunk(data, end)
        == pb.ProcessingResponse(request_body=pb.BodyResponse(response=streamed)).SerializeToString()
    )
