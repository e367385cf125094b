//! The decision record's values: what each field of a pick's record holds, rounded once here
//! for every form of the record (Envoy's dynamic metadata, logs, traces, `/debug/decisions`).
//! The field names and their order belong to the caller (`llmlb.decision.RECORD_FIELDS`); this
//! module maps each name to where its value comes from, so the two cannot drift apart silently:
//! an unknown name is refused when the encoder is made.

use crate::pb_struct::{encode_struct, encode_struct_field, Value};

/// Where a record field's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    RequestId,
    Endpoint,
    Policy,
    Reason,
    PrefixDepth,
    PrefixLevels,
    PrefixShare,
    CachedTokens,
    PromptTokens,
    Candidates,
    Score,
    RunnerUp,
    State,
    Model,
    Path,
    PickUs,
}

impl Field {
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "request_id" => Self::RequestId,
            "endpoint" => Self::Endpoint,
            "policy" => Self::Policy,
            "reason" => Self::Reason,
            "prefix_depth" => Self::PrefixDepth,
            "prefix_levels" => Self::PrefixLevels,
            "prefix_share" => Self::PrefixShare,
            "cached_tokens" => Self::CachedTokens,
            "prompt_tokens" => Self::PromptTokens,
            "candidates" => Self::Candidates,
            "score" => Self::Score,
            "runner_up" => Self::RunnerUp,
            "state" => Self::State,
            "model" => Self::Model,
            "path" => Self::Path,
            "pick_us" => Self::PickUs,
            _ => return None,
        })
    }
}

/// One pick's figures and what the picker knows around it.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    pub endpoint: &'a str,
    pub reason: &'a str,
    pub prefix_depth: u32,
    pub prefix_levels: u32,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub candidates: u32,
    pub score: f64,
    pub runner_up: Option<f64>,
    pub policy: &'a str,
    pub state: &'a str,
    pub request_id: &'a str,
    pub path: &'a str,
    pub model: &'a str,
    pub pick_seconds: f64,
}

/// A record value: text, a count, a number, or nothing (the field is left out: `runner_up` of
/// a lone candidate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue<'a> {
    Text(&'a str),
    Count(u64),
    Number(f64),
    Absent,
}

fn rounded(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

impl<'a> Record<'a> {
    /// Predicted cached share of the prompt's tokens, 0..1.
    pub fn prefix_share(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.cached_tokens as f64 / self.prompt_tokens as f64
        }
    }

    /// The field's value as the record carries it (shares to 4 digits, scores to 6, the pick
    /// time in µs to 0.1).
    pub fn value(&self, field: Field) -> FieldValue<'a> {
        use FieldValue::{Absent, Count, Number, Text};
        match field {
            Field::RequestId => Text(self.request_id),
            Field::Endpoint => Text(self.endpoint),
            Field::Policy => Text(self.policy),
            Field::Reason => Text(self.reason),
            Field::PrefixDepth => Count(self.prefix_depth.into()),
            Field::PrefixLevels => Count(self.prefix_levels.into()),
            Field::PrefixShare => Number(rounded(self.prefix_share(), 4)),
            Field::CachedTokens => Count(self.cached_tokens),
            Field::PromptTokens => Count(self.prompt_tokens),
            Field::Candidates => Count(self.candidates.into()),
            Field::Score => Number(rounded(self.score, 6)),
            Field::RunnerUp => self.runner_up.map_or(Absent, |r| Number(rounded(r, 6))),
            Field::State => Text(self.state),
            Field::Model => Text(self.model),
            Field::Path => Text(self.path),
            Field::PickUs => Number(rounded(self.pick_seconds * 1e6, 1)),
        }
    }
}

/// Encodes the dynamic metadata of a pick: `route_namespace` with `{route_key: endpoint}` (what
/// Envoy routes by) and `record_namespace` with the record's `fields` (in wire format, see
/// `pb_struct`); with `as_field`, as that field of the enclosing answer (`encode_struct_field`).
pub fn encode_metadata(
    route_namespace: &str,
    route_key: &str,
    record_namespace: &str,
    fields: &[(String, Field)],
    record: &Record<'_>,
    as_field: Option<u8>,
) -> Vec<u8> {
    let values: Vec<(&str, Value<'_>)> = fields
        .iter()
        .filter_map(|(name, field)| match record.value(*field) {
            FieldValue::Text(s) => Some((name.as_str(), Value::Str(s))),
            FieldValue::Number(n) => Some((name.as_str(), Value::Number(n))),
            // Struct numbers are doubles: exact for counts below 2^53.
            FieldValue::Count(n) => Some((name.as_str(), Value::Number(n as f64))),
            FieldValue::Absent => None,
        })
        .collect();
    let metadata = [
        (
            route_namespace,
            Value::Struct(vec![(route_key, Value::Str(record.endpoint))]),
        ),
        (record_namespace, Value::Struct(values)),
    ];
    match as_field {
        Some(field) => encode_struct_field(field, &metadata),
        None => encode_struct(&metadata),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            endpoint: "10.0.0.1:8000",
            reason: "prefix_hit",
            prefix_depth: 3,
            prefix_levels: 5,
            prompt_tokens: 300,
            cached_tokens: 100,
            candidates: 3,
            score: 0.123_456_789,
            runner_up: None,
            policy: "prefix_cache",
            state: "embedded",
            request_id: "r-1",
            path: "/v1/chat/completions",
            model: "m",
            pick_seconds: 0.000_041_26,
        }
    }

    #[test]
    fn values_are_rounded_once_here() {
        let r = record();
        assert_eq!(r.value(Field::PrefixShare), FieldValue::Number(0.3333));
        assert_eq!(r.value(Field::Score), FieldValue::Number(0.123_457));
        assert_eq!(r.value(Field::PickUs), FieldValue::Number(41.3));
        assert_eq!(r.value(Field::RunnerUp), FieldValue::Absent);
        let alone = Record {
            prompt_tokens: 0,
            runner_up: Some(0.5),
            ..r
        };
        assert_eq!(alone.value(Field::PrefixShare), FieldValue::Number(0.0));
        assert_eq!(alone.value(Field::RunnerUp), FieldValue::Number(0.5));
    }

    #[test]
    fn every_name_maps_to_its_field() {
        for name in [
            "request_id",
            "endpoint",
            "policy",
            "reason",
            "prefix_depth",
            "prefix_levels",
            "prefix_share",
            "cached_tokens",
            "prompt_tokens",
            "candidates",
            "score",
            "runner_up",
            "state",
            "model",
            "path",
            "pick_us",
        ] {
            assert!(Field::named(name).is_some(), "{name}");
        }
        assert_eq!(Field::named("nope"), None);
    }

    #[test]
    fn absent_fields_are_left_out_of_the_metadata() {
        let fields = vec![
            ("endpoint".to_string(), Field::Endpoint),
            ("runner_up".to_string(), Field::RunnerUp),
        ];
        let with = encode_metadata(
            "envoy.lb",
            "x",
            "llmlb",
            &fields,
            &Record {
                runner_up: Some(0.25),
                ..record()
            },
            None,
        );
        let without = encode_metadata("envoy.lb", "x", "llmlb", &fields, &record(), None);
        // The runner_up entry: a map entry with the key and a fixed64 number.
        assert!(with.len() > without.len());
        assert!(!without.windows(9).any(|w| w == b"runner_up"));
        assert!(with.windows(9).any(|w| w == b"runner_up"));
    }
}
