//! The few ext_proc and gRPC health messages the transport reads and writes itself, in protobuf
//! wire format: a streamed response chunk and its echo (answered without Python once a stream
//! only echoes its response, see `extproc_server`), and the health check's request and answer.
//! Everything else is decoded and encoded by the Python service.

use crate::pb_struct::{len_field_size, put_len, put_varint, tag, WIRE_VARINT};

// ProcessingRequest: response_body 5; metadata_context 8, attributes 9 and observability_mode
// 10 may come beside it; protocol_config 11 only in a stream's first message.
const REQUEST_RESPONSE_BODY: u64 = 5;
const REQUEST_SIDE_FIELDS: [u64; 3] = [8, 9, 10];
// HttpBody and StreamedBodyResponse: body 1, end_of_stream 2.
const BODY_BYTES: u64 = 1;
const BODY_END: u64 = 2;
// ProcessingResponse.response_body 4 > BodyResponse.response 1 > CommonResponse.body_mutation 3
// > BodyMutation.streamed_response 3.
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
            (REQUEST_RESPONSE_BODY, FieldValue::Bytes(body)) if chunk.is_none() => {
                chunk = Some(body);
            }
            (n, _) if REQUEST_SIDE_FIELDS.contains(&n) => {}
            _ => return None,
        }
    }
    let mut body: &[u8] = &[];
    let mut end = false;
    for (number, value) in fields(chunk?)? {
        match (number, value) {
            (BODY_BYTES, FieldValue::Bytes(bytes)) => body = bytes,
            (BODY_END, FieldValue::Varint(flag)) => end = flag != 0,
            // end_of_stream_without_message, grpc_message_compressed: not echoed as-is.
            _ => return None,
        }
    }
    Some((body, end))
}

/// The `ProcessingResponse` passing a response body chunk on unchanged (FULL_DUPLEX_STREAMED):
/// byte for byte what the Python protobuf encoder makes of the same message.
pub fn echo_response_chunk(body: &[u8], end_of_stream: bool) -> Vec<u8> {
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
    put_len(RESPONSE_RESPONSE_BODY, body_response, &mut out);
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
