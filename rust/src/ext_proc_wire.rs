//! The ext_proc and gRPC health messages in protobuf wire format, read and written without
//! protobuf objects: every `ProcessingRequest` decoded into what the service reads of it
//! (`decode_request`), the streamed body answers (request chunks passed on after a pick, and
//! response chunks echoed, in Python or by the transport once a stream only echoes its response,
//! see `extproc_server`), and the health check's request and answer. The rarer answers (picks,
//! immediate responses) are encoded by the Python service.

use crate::pb_struct::{len_field_size, put_len, put_varint, tag, WIRE_VARINT};

// ProcessingRequest's `request` oneof: the phase a message carries (the numbers are its fields).
pub const REQUEST_HEADERS: u64 = 2;
pub const RESPONSE_HEADERS: u64 = 3;
pub const REQUEST_BODY: u64 = 4;
pub const RESPONSE_BODY: u64 = 5;
pub const REQUEST_TRAILERS: u64 = 6;
pub const RESPONSE_TRAILERS: u64 = 7;
// metadata_context 8, attributes 9 and observability_mode 10 may come beside a phase;
// protocol_config 11 only in a stream's first message.
const REQUEST_SIDE_FIELDS: [u64; 3] = [8, 9, 10];
const REQUEST_PROTOCOL_CONFIG: u64 = 11;
// HttpHeaders: headers 1 (a HeaderMap: headers 1, each a HeaderValue: key 1, value 2,
// raw_value 3), end_of_stream 3.
const HEADERS_MAP: u64 = 1;
const HEADERS_END: u64 = 3;
const MAP_VALUE: u64 = 1;
const VALUE_KEY: u64 = 1;
const VALUE_TEXT: u64 = 2;
const VALUE_RAW: u64 = 3;
// ProtocolConfiguration: request_body_mode 1, response_body_mode 2.
const PROTOCOL_REQUEST_MODE: u64 = 1;
const PROTOCOL_RESPONSE_MODE: u64 = 2;
// HttpBody and StreamedBodyResponse: body 1, end_of_stream 2.
const BODY_BYTES: u64 = 1;
const BODY_END: u64 = 2;
// ProcessingResponse.request_body 3 / response_body 4 > BodyResponse.response 1 >
// CommonResponse.body_mutation 3 > BodyMutation.streamed_response 3.
const RESPONSE_REQUEST_BODY: u8 = 3;
const RESPONSE_RESPONSE_BODY: u8 = 4;
const BODY_RESPONSE_COMMON: u8 = 1;
const COMMON_BODY_MUTATION: u8 = 3;
const MUTATION_STREAMED: u8 = 3;

/// One field of a protobuf message: its number and its value (a varint, or a length-delimited
/// payload; fixed-width fields are skipped over and reported as `Other`).
#[derive(Debug, PartialEq, Eq)]
pub enum FieldValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// Reads a varint at the start of `data`: its value and length.
pub fn read_varint(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in data.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The fields of a message in order, or `None` if it is not well-formed.
pub fn fields(mut data: &[u8]) -> Option<Vec<(u64, FieldValue<'_>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let (key, used) = read_varint(data)?;
        data = &data[used..];
        let number = key >> 3;
        let value = match key & 7 {
            0 => {
                let (n, used) = read_varint(data)?;
                data = &data[used..];
                FieldValue::Varint(n)
            }
            1 => {
                data = data.get(8..)?;
                FieldValue::Other
            }
            2 => {
                let (len, used) = read_varint(data)?;
                let end = used.checked_add(usize::try_from(len).ok()?)?;
                let payload = data.get(used..end)?;
                data = &data[end..];
                FieldValue::Bytes(payload)
            }
            5 => {
                data = data.get(4..)?;
                FieldValue::Other
            }
            _ => return None,
        };
        out.push((number, value));
    }
    Some(out)
}

/// A `ProcessingRequest` that carries only a response body chunk (and none of the fields that
/// need the service): the chunk and whether it ends the body.
pub fn response_body_chunk(request: &[u8]) -> Option<(&[u8], bool)> {
    let mut chunk = None;
    for (number, value) in fields(request)? {
        match (number, value) {
            (RESPONSE_BODY, FieldValue::Bytes(body)) if chunk.is_none() => {
                chunk = Some(body);
            }
            (n, _) if REQUEST_SIDE_FIELDS.contains(&n) => {}
            _ => return None,
        }
    }
    let (body, end, other_fields) = http_body(chunk?)?;
    // end_of_stream_without_message, grpc_message_compressed: not echoed as-is.
    (!other_fields).then_some((body, end))
}

/// An `HttpBody`: its chunk, end of stream, and whether any other field was set (or a known
/// one with an unexpected wire type, which protobuf keeps as unknown); `None` if broken.
fn http_body(payload: &[u8]) -> Option<(&[u8], bool, bool)> {
    let (mut body, mut end, mut other_fields): (&[u8], bool, bool) = (&[], false, false);
    for (number, value) in fields(payload)? {
        match (number, value) {
            (BODY_BYTES, FieldValue::Bytes(bytes)) => body = bytes,
            (BODY_END, FieldValue::Varint(flag)) => end = flag != 0,
            _ => other_fields = true,
        }
    }
    Some((body, end, other_fields))
}

/// What the service reads of a `ProcessingRequest`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request<'a> {
    /// REQUEST_HEADERS ..= RESPONSE_TRAILERS; 0 when the message carries no phase.
    pub phase: u64,
    /// The headers of a headers phase, `(key, value)` in order (`raw_value`, else `value`).
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    /// The chunk of a body phase.
    pub body: &'a [u8],
    pub end_of_stream: bool,
    /// The stream's request and response body modes (`protocol_config`, first message only).
    pub body_modes: Option<(i32, i32)>,
}

/// Decodes a `ProcessingRequest`, or `None` if it is not well-formed protobuf. As the protobuf
/// library reads it: the last phase set wins, and a field of an unexpected wire type is
/// skipped as unknown.
pub fn decode_request(request: &[u8]) -> Option<Request<'_>> {
    let mut out = Request::default();
    let mut payload: &[u8] = &[];
    for (number, value) in fields(request)? {
        match (number, value) {
            (REQUEST_HEADERS..=RESPONSE_TRAILERS, FieldValue::Bytes(bytes)) => {
                out.phase = number;
                payload = bytes;
            }
            (REQUEST_PROTOCOL_CONFIG, FieldValue::Bytes(bytes)) => {
                out.body_modes = Some(body_modes(bytes)?);
            }
            // Metadata, attributes, observability mode: not read. A known field with another
            // wire type is an unknown field to protobuf too, so it is skipped, not refused.
            _ => {}
        }
    }
    match out.phase {
        REQUEST_HEADERS | RESPONSE_HEADERS => read_headers(payload, &mut out)?,
        REQUEST_BODY | RESPONSE_BODY => {
            (out.body, out.end_of_stream, _) = http_body(payload)?;
        }
        _ => {} // trailers: their content is not read
    }
    Some(out)
}

fn read_headers<'a>(payload: &'a [u8], out: &mut Request<'a>) -> Option<()> {
    for (number, value) in fields(payload)? {
        match (number, value) {
            (HEADERS_MAP, FieldValue::Bytes(map)) => {
                for (number, value) in fields(map)? {
                    if let (MAP_VALUE, FieldValue::Bytes(header)) = (number, value) {
                        out.headers.push(header_value(header)?);
                    }
                }
            }
            (HEADERS_END, FieldValue::Varint(flag)) => out.end_of_stream = flag != 0,
            _ => {}
        }
    }
    Some(())
}

fn header_value(header: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut key, mut text, mut raw): (&[u8], &[u8], Option<&[u8]>) = (&[], &[], None);
    for (number, value) in fields(header)? {
        match (number, value) {
            (VALUE_KEY, FieldValue::Bytes(bytes)) => key = bytes,
            (VALUE_TEXT, FieldValue::Bytes(bytes)) => text = bytes,
            (VALUE_RAW, FieldValue::Bytes(bytes)) => raw = Some(bytes),
            _ => {}
        }
    }
    Some((key, raw.unwrap_or(text)))
}

fn body_modes(config: &[u8]) -> Option<(i32, i32)> {
    let (mut request, mut response) = (0, 0);
    for (number, value) in fields(config)? {
        match (number, value) {
            (PROTOCOL_REQUEST_MODE, FieldValue::Varint(mode)) => request = mode as i32,
            (PROTOCOL_RESPONSE_MODE, FieldValue::Varint(mode)) => response = mode as i32,
            _ => {}
        }
    }
    Some((request, response))
}

/// The `ProcessingResponse` passing a response body chunk on unchanged (FULL_DUPLEX_STREAMED):
/// byte for byte what the Python protobuf encoder makes of the same message.
pub fn echo_response_chunk(body: &[u8], end_of_stream: bool) -> Vec<u8> {
    streamed_body_answer(RESPONSE_RESPONSE_BODY, body, end_of_stream)
}

/// The `ProcessingResponse` passing a request body chunk on (FULL_DUPLEX_STREAMED, after the
/// pick), as the Python protobuf encoder makes it.
pub fn request_body_chunk(body: &[u8], end_of_stream: bool) -> Vec<u8> {
    streamed_body_answer(RESPONSE_REQUEST_BODY, body, end_of_stream)
}

fn streamed_body_answer(phase: u8, body: &[u8], end_of_stream: bool) -> Vec<u8> {
    let end_size = if end_of_stream { 2 } else { 0 };
    let body_size = if body.is_empty() {
        0
    } else {
        len_field_size(body.len())
    };
    let streamed = body_size + end_size;
    let mutation = len_field_size(streamed);
    let common = len_field_size(mutation);
    let body_response = len_field_size(common);
    let mut out = Vec::with_capacity(len_field_size(body_response));
    put_len(phase, body_response, &mut out);
    put_len(BODY_RESPONSE_COMMON, common, &mut out);
    put_len(COMMON_BODY_MUTATION, mutation, &mut out);
    put_len(MUTATION_STREAMED, streamed, &mut out);
    if !body.is_empty() {
        put_len(BODY_BYTES as u8, body.len(), &mut out);
        out.extend_from_slice(body);
    }
    if end_of_stream {
        out.push(tag(BODY_END as u8, WIRE_VARINT));
        out.push(1);
    }
    out
}

/// `grpc.health.v1.HealthCheckRequest.service` (field 1), or `None` if the message is broken.
pub fn health_check_service(request: &[u8]) -> Option<String> {
    let mut service = String::new();
    for (number, value) in fields(request)? {
        if let (1, FieldValue::Bytes(name)) = (number, value) {
            service = String::from_utf8(name.to_vec()).ok()?;
        }
    }
    Some(service)
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    Serving = 1,
    NotServing = 2,
}

/// A `HealthCheckResponse` with this status (field 1).
pub fn health_check_response(status: Serving) -> Vec<u8> {
    let mut out = vec![tag(1, WIRE_VARINT)];
    put_varint(status as u64, &mut out);
    out
}

/// A message in gRPC's length-prefixed framing (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with_chunk(body: &[u8], end: bool) -> Vec<u8> {
        let mut http_body = Vec::new();
        if !body.is_empty() {
            put_len(1, body.len(), &mut http_body);
            http_body.extend_from_slice(body);
        }
        if end {
            http_body.extend_from_slice(&[tag(2, WIRE_VARINT), 1]);
        }
        let mut request = Vec::new();
        put_len(5, http_body.len(), &mut request);
        request.extend_from_slice(&http_body);
        request
    }

    #[test]
    fn a_response_chunk_is_read_with_its_end_flag() {
        let request = request_with_chunk(b"data: {}\n\n", true);
        assert_eq!(
            response_body_chunk(&request),
            Some((&b"data: {}\n\n"[..], true))
        );
        let request = request_with_chunk(b"", false);
        assert_eq!(response_body_chunk(&request), Some((&b""[..], false)));
    }

    #[test]
    fn side_fields_are_allowed_but_any_other_message_is_not_a_chunk() {
        let mut request = request_with_chunk(b"x", false);
        request.extend_from_slice(&[tag(10, WIRE_VARINT), 1]);
        assert!(response_body_chunk(&request).is_some());
        let mut with_config = request_with_chunk(b"x", false);
        put_len(11, 0, &mut with_config);
        assert!(response_body_chunk(&with_config).is_none());
        let mut headers = Vec::new();
        put_len(3, 0, &mut headers);
        assert!(response_body_chunk(&headers).is_none());
        assert!(response_body_chunk(&[0x2a, 0x05, 1]).is_none()); // truncated
    }

    #[test]
    fn the_echo_nests_the_chunk_in_a_streamed_body_response() {
        let echo = echo_response_chunk(b"abc", true);
        let outer = fields(&echo).unwrap();
        let FieldValue::Bytes(body_response) = outer[0].1 else {
            panic!()
        };
        assert_eq!(outer[0].0, 4);
        let FieldValue::Bytes(common) = fields(body_response).unwrap()[0].1 else {
            panic!()
        };
        let FieldValue::Bytes(mutation) = fields(common).unwrap()[0].1 else {
            panic!()
        };
        let FieldValue::Bytes(streamed) = fields(mutation).unwrap()[0].1 else {
            panic!()
        };
        assert_eq!(
            fields(streamed).unwrap(),
            vec![(1, FieldValue::Bytes(b"abc")), (2, FieldValue::Varint(1))]
        );
        let long = vec![7u8; 70_000];
        let echo = echo_response_chunk(&long, false);
        assert_eq!(
            echo.len(),
            len_field_size(len_field_size(len_field_size(len_field_size(
                len_field_size(70_000)
            ))))
        );
    }

    fn message(field: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_len(field, payload.len(), &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn header(key: &[u8], value_field: u8, value: &[u8]) -> Vec<u8> {
        let mut out = message(1, key);
        out.extend(message(value_field, value));
        message(1, &out) // one HeaderMap.headers entry
    }

    #[test]
    fn request_headers_are_read_in_order_with_raw_values_first() {
        let mut map = header(b":path", 3, b"/v1/chat/completions");
        map.extend(header(b"x-text", 2, b"text"));
        let mut raw_and_text = message(1, b"both");
        raw_and_text.extend(message(2, b"text"));
        raw_and_text.extend(message(3, b"raw"));
        map.extend(message(1, &raw_and_text));
        let mut http_headers = message(1, &map);
        http_headers.extend_from_slice(&[tag(3, WIRE_VARINT), 1]);
        let mut request = message(2, &http_headers);
        let mut config = vec![tag(1, WIRE_VARINT), 6, tag(2, WIRE_VARINT), 6];
        config.extend_from_slice(&[tag(3, WIRE_VARINT), 1]); // not read
        request.extend(message(11, &config));
        request.extend_from_slice(&[tag(10, WIRE_VARINT), 1]); // observability_mode: skipped
        let decoded = decode_request(&request).unwrap();
        assert_eq!(decoded.phase, REQUEST_HEADERS);
        assert_eq!(
            decoded.headers,
            vec![
                (&b":path"[..], &b"/v1/chat/completions"[..]),
                (&b"x-text"[..], &b"text"[..]),
                (&b"both"[..], &b"raw"[..]),
            ]
        );
        assert!(decoded.end_of_stream);
        assert_eq!(decoded.body_modes, Some((6, 6)));
    }

    #[test]
    fn bodies_trailers_and_empty_messages_decode() {
        let chunk = request_with_chunk(b"data", true);
        let decoded = decode_request(&chunk).unwrap();
        assert_eq!(
            (decoded.phase, decoded.body, decoded.end_of_stream),
            (RESPONSE_BODY, &b"data"[..], true)
        );
        let mut body = message(1, b"{}");
        body.extend_from_slice(&[tag(2, WIRE_VARINT), 0]);
        let request = message(4, &body);
        let decoded = decode_request(&request).unwrap();
        assert_eq!(
            (decoded.phase, decoded.body, decoded.end_of_stream),
            (REQUEST_BODY, &b"{}"[..], false)
        );
        let trailers = message(6, &message(1, &header(b"t", 3, b"v")));
        let decoded = decode_request(&trailers).unwrap();
        assert_eq!(
            (decoded.phase, decoded.headers.len()),
            (REQUEST_TRAILERS, 0)
        );
        assert_eq!(decode_request(&[]), Some(Request::default()));
    }

    #[test]
    fn malformed_requests_are_refused_and_unexpected_wire_types_skipped() {
        assert!(decode_request(&[0x22, 0x05, 1]).is_none()); // truncated body
        assert!(decode_request(&[0x0f]).is_none()); // wire type 7
        let varint = [tag(4, WIRE_VARINT), 1];
        let phase_as_varint = decode_request(&varint).unwrap();
        assert_eq!(phase_as_varint.phase, 0);
        let end_as_bytes = message(2, &[tag(3, 2), 0]);
        assert!(!decode_request(&end_as_bytes).unwrap().end_of_stream);
        let mode_as_bytes = message(11, &message(1, b"x"));
        assert_eq!(
            decode_request(&mode_as_bytes).unwrap().body_modes,
            Some((0, 0))
        );
    }

    #[test]
    fn request_chunks_nest_like_response_echoes_under_field_3() {
        let echo = echo_response_chunk(b"abc", true);
        let chunk = request_body_chunk(b"abc", true);
        assert_eq!(chunk[0], tag(3, 2));
        assert_eq!(echo[1..], chunk[1..]);
        assert_eq!(
            request_body_chunk(b"", false),
            vec![tag(3, 2), 6, 0x0a, 4, 0x1a, 2, 0x1a, 0]
        );
    }

    #[test]
    fn health_messages_round_trip() {
        let mut request = Vec::new();
        put_len(1, 4, &mut request);
        request.extend_from_slice(b"name");
        assert_eq!(health_check_service(&request).as_deref(), Some("name"));
        assert_eq!(health_check_service(&[]).as_deref(), Some(""));
        assert_eq!(health_check_response(Serving::NotServing), vec![0x08, 2]);
        assert_eq!(grpc_frame(b"ab"), vec![0, 0, 0, 0, 2, b'a', b'b']);
    }
}
