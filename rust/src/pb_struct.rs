//! `google.protobuf.Struct` in protobuf wire format: the ext_proc answer's dynamic metadata
//! (namespaces of key/value records). Encoded here because building it field by field through
//! the Python protobuf API costs about 10x more per request (see `bench/python`).

/// A `google.protobuf.Value`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Number(f64),
    Str(&'a str),
    Bool(bool),
    Struct(Vec<(&'a str, Value<'a>)>),
}

// Field numbers: Struct.fields (map<string, Value>) is 1; a map entry's key 1 and value 2;
// Value: null_value 1, number_value 2, string_value 3, bool_value 4, struct_value 5.
pub(crate) const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
pub(crate) const WIRE_LEN: u8 = 2;

pub(crate) fn tag(field: u8, wire: u8) -> u8 {
    field << 3 | wire
}

pub(crate) fn put_varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(crate) fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

pub(crate) fn len_field_size(payload: usize) -> usize {
    1 + varint_len(payload as u64) + payload
}

fn value_size(value: &Value<'_>) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 2,
        Value::Number(_) => 9,
        Value::Str(s) => len_field_size(s.len()),
        Value::Struct(fields) => len_field_size(struct_size(fields)),
    }
}

fn entry_size(key: &str, value: &Value<'_>) -> usize {
    len_field_size(key.len()) + len_field_size(value_size(value))
}

/// The encoded size of a Struct with these fields (without an outer tag).
pub fn struct_size(fields: &[(&str, Value<'_>)]) -> usize {
    fields
        .iter()
        .map(|(key, value)| len_field_size(entry_size(key, value)))
        .sum()
}

pub(crate) fn put_len(field: u8, len: usize, out: &mut Vec<u8>) {
    out.push(tag(field, WIRE_LEN));
    put_varint(len as u64, out);
}

fn put_value(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(&[tag(1, WIRE_VARINT), 0]),
        Value::Number(n) => {
            out.push(tag(2, WIRE_FIXED64));
            out.extend_from_slice(&n.to_le_bytes());
        }
        Value::Str(s) => {
            put_len(3, s.len(), out);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Bool(b) => out.extend_from_slice(&[tag(4, WIRE_VARINT), u8::from(*b)]),
        Value::Struct(fields) => {
            put_len(5, struct_size(fields), out);
            put_struct(fields, out);
        }
    }
}

/// Appends a Struct with these fields (map entries in the given order) to `out`.
pub fn put_struct(fields: &[(&str, Value<'_>)], out: &mut Vec<u8>) {
    for (key, value) in fields {
        put_len(1, entry_size(key, value), out);
        put_len(1, key.len(), out);
        out.extend_from_slice(key.as_bytes());
        put_len(2, value_size(value), out);
        put_value(value, out);
    }
}

/// A Struct with these fields, encoded.
pub fn encode_struct(fields: &[(&str, Value<'_>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(struct_size(fields));
    put_struct(fields, &mut out);
    out
}

/// Field numbers `encode_struct_field` takes: those with a one-byte tag.
pub const MAX_ONE_BYTE_FIELD: u8 = 15;

/// A Struct with these fields as field `field` (1..=15) of an enclosing message: appended to
/// that message's bytes, a parser merges it in.
pub fn encode_struct_field(field: u8, fields: &[(&str, Value<'_>)]) -> Vec<u8> {
    assert!(
        (1..=MAX_ONE_BYTE_FIELD).contains(&field),
        "field {field} needs a longer tag"
    );
    let size = struct_size(fields);
    let mut out = Vec::with_capacity(len_field_size(size));
    put_len(field, size, &mut out);
    put_struct(fields, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_struct_field_is_its_tag_length_and_struct() {
        let fields = [("k", Value::Str("v"))];
        let bare = encode_struct(&fields);
        let field = encode_struct_field(8, &fields);
        assert_eq!(field[0], 8 << 3 | 2);
        assert_eq!(usize::from(field[1]), bare.len());
        assert_eq!(&field[2..], &bare[..]);
    }

    #[test]
    fn one_string_field_matches_protobuf_bytes() {
        // Struct{fields: {"a": Value{string_value: "b"}}}, as protoc encodes it.
        let bytes = encode_struct(&[("a", Value::Str("b"))]);
        assert_eq!(
            bytes,
            [0x0a, 0x08, 0x0a, 0x01, b'a', 0x12, 0x03, 0x1a, 0x01, b'b']
        );
    }

    #[test]
    fn numbers_bools_and_nulls() {
        let bytes = encode_struct(&[("n", Value::Number(1.5))]);
        let mut expected = vec![0x0a, 0x0e, 0x0a, 0x01, b'n', 0x12, 0x09, 0x11];
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        assert_eq!(bytes, expected);
        assert_eq!(
            encode_struct(&[("t", Value::Bool(true))]),
            [0x0a, 0x07, 0x0a, 0x01, b't', 0x12, 0x02, 0x20, 0x01]
        );
        assert_eq!(
            encode_struct(&[("z", Value::Null)]),
            [0x0a, 0x07, 0x0a, 0x01, b'z', 0x12, 0x02, 0x08, 0x00]
        );
    }

    #[test]
    fn sizes_agree_with_the_bytes_for_nested_and_long_fields() {
        let long = "x".repeat(300); // a two-byte length
        let inner = vec![("k", Value::Str(&long)), ("n", Value::Number(3.0))];
        let fields = vec![
            (
                "envoy.lb",
                Value::Struct(vec![("d", Value::Str("10.0.0.1:80"))]),
            ),
            ("llmlb", Value::Struct(inner)),
        ];
        let bytes = encode_struct(&fields);
        assert_eq!(bytes.len(), struct_size(&fields));
        assert!(bytes.windows(long.len()).any(|w| w == long.as_bytes()));
    }
}
