//! OpenAI request parsing: chat completions and completions, straight from the body bytes.
//!
//! One scan over the body collects the routing fields and the prompt, as borrowed slices where
//! possible; the prompt is then hashed into its chained prefix hashes (see `prefix_hash`).

use std::borrow::Cow;

use crate::json::{JsonError, Scanner};
use crate::prefix_hash::{PrefixHasher, Prompt, DEFAULT_BLOCK_SIZE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Chat,
    Completion,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Chat => "chat",
            RequestKind::Completion => "completion",
        }
    }
}

/// What the picker needs from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub kind: RequestKind,
    /// The `model` field; empty when absent.
    pub model: String,
    pub stream: bool,
    /// `prefix_hashes[i]` identifies the first `i + 1` blocks of the prompt.
    pub prefix_hashes: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    NotUtf8,
    Json(JsonError),
    NotAnObject,
    /// Neither `messages` nor `prompt` is present.
    NoPrompt,
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NotUtf8 => write!(f, "body is not valid UTF-8"),
            ParseError::Json(e) => write!(f, "body is not valid JSON: {e}"),
            ParseError::NotAnObject => write!(f, "body is not a JSON object"),
            ParseError::NoPrompt => write!(f, "body has neither 'messages' nor 'prompt'"),
            ParseError::WrongType { field, expected } => write!(f, "'{field}' must be {expected}"),
        }
    }
}

impl std::error::Error for ParseError {}

impl From<JsonError> for ParseError {
    fn from(e: JsonError) -> Self {
        ParseError::Json(e)
    }
}

type Result<T> = std::result::Result<T, ParseError>;

fn wrong(field: &'static str, expected: &'static str) -> ParseError {
    ParseError::WrongType { field, expected }
}

/// Parses a request body with the default prefix block size.
pub fn parse_request(body: &[u8]) -> Result<ParsedRequest> {
    parse_request_with_block_size(body, DEFAULT_BLOCK_SIZE)
}

pub fn parse_request_with_block_size(body: &[u8], block_size: usize) -> Result<ParsedRequest> {
    if simdutf8::basic::from_utf8(body).is_err() {
        return Err(ParseError::NotUtf8);
    }
    let mut s = Scanner::new(body);
    if s.peek() != Some(b'{') {
        return Err(ParseError::NotAnObject);
    }
    s.expect(b'{', "expected an object")?;

    let mut model: Option<Cow<[u8]>> = None;
    let mut stream = false;
    let mut tools: Option<&[u8]> = None;
    // Both are parsed if both are present (the last of each key wins); chat takes precedence.
    let mut chat: Option<Prompt> = None;
    let mut prompt: Option<Prompt> = None;
    let mut first = true;
    while s.next_member(b'}', &mut first)? {
        let key = s.key()?;
        match key.as_ref() {
            b"model" => {
                if s.peek() != Some(b'"') {
                    return Err(wrong("model", "a string"));
                }
                model = Some(s.string()?);
            }
            b"stream" => match s.peek() {
                Some(b't' | b'f') => stream = s.boolean()?,
                Some(b'n') => {
                    s.skip_value()?;
                }
                _ => return Err(wrong("stream", "a boolean")),
            },
            b"messages" => chat = Some(parse_messages(&mut s)?),
            b"prompt" => prompt = Some(parse_prompt(&mut s)?),
            b"tools" => tools = Some(s.skip_value()?),
            _ => {
                s.skip_value()?;
            }
        }
    }
    s.finish()?;

    let (kind, segments) = match (chat, prompt) {
        (Some(messages), _) => (RequestKind::Chat, messages),
        (None, Some(prompt)) => (RequestKind::Completion, prompt),
        (None, None) => return Err(ParseError::NoPrompt),
    };
    let model = model.unwrap_or(Cow::Borrowed(b""));
    let mut hasher = PrefixHasher::new(&model, block_size);
    if let Some(tools) = tools {
        // Tool definitions are rendered ahead of the conversation by chat templates.
        hasher.segment(&[(b'T', Cow::Borrowed(tools))]);
    }
    for segment in segments.segments() {
        hasher.segment(segment);
    }
    Ok(ParsedRequest {
        kind,
        // Valid UTF-8: the whole body was checked and escapes decode to UTF-8.
        model: String::from_utf8_lossy(&model).into_owned(),
        stream,
        prefix_hashes: hasher.finish(),
    })
}

/// `messages`: an array of objects with `role` and `content` (string, null or content parts).
fn parse_messages<'a>(s: &mut Scanner<'a>) -> Result<Prompt<'a>> {
    if s.peek() != Some(b'[') {
        return Err(wrong("messages", "an array"));
    }
    s.expect(b'[', "expected an array")?;
    let mut prompt = Prompt::default();
    let mut first = true;
    while s.next_member(b']', &mut first)? {
        parse_message(s, &mut prompt)?;
    }
    Ok(prompt)
}

/// Canonical field order within a message, whatever the key order in the JSON: role, content
/// (parts in their order), then the rest by tag.
fn field_rank(tag: u8) -> u16 {
    match tag {
        b'r' => 0,
        b'c' | b'p' => 1,
        other => 2 + u16::from(other),
    }
}

fn parse_message<'a>(s: &mut Scanner<'a>, prompt: &mut Prompt<'a>) -> Result<()> {
    if s.peek() != Some(b'{') {
        return Err(wrong("messages[]", "an object"));
    }
    s.expect(b'{', "expected an object")?;
    let start = prompt.mark();
    let mut has_role = false;
    let mut has_content = false;
    let mut first = true;
    while s.next_member(b'}', &mut first)? {
        let key = s.key()?;
        match key.as_ref() {
            b"role" => {
                if s.peek() != Some(b'"') {
                    return Err(wrong("messages[].role", "a string"));
                }
                if has_role {
                    prompt.remove_open(start, |tag| tag == b'r');
                }
                has_role = true;
                prompt.push(b'r', s.string()?);
            }
            b"content" => {
                if has_content {
                    prompt.remove_open(start, |tag| field_rank(tag) == 1);
                }
                has_content = true;
                match s.peek() {
                    Some(b'"') => prompt.push(b'c', s.string()?),
                    Some(b'[') => parse_content_parts(s, prompt)?,
                    Some(b'n') => {
                        s.skip_value()?;
                    }
                    _ => return Err(wrong("messages[].content", "a string, an array or null")),
                }
            }
            b"name" => prompt.push(b'n', string_or_raw(s)?),
            b"tool_call_id" => prompt.push(b'i', string_or_raw(s)?),
            b"tool_calls" => prompt.push(b'x', Cow::Borrowed(s.skip_value()?)),
            _ => {
                s.skip_value()?;
            }
        }
    }
    if !has_role {
        return Err(wrong("messages[].role", "present"));
    }
    // Stable: content parts keep their order.
    prompt
        .open_segment(start)
        .sort_by_key(|(tag, _)| field_rank(*tag));
    prompt.end_segment();
    Ok(())
}

/// Content parts: text parts hash like plain string content (so `"hi"` and
/// `[{"type":"text","text":"hi"}]` share a prefix); any other part hashes as its raw JSON.
fn parse_content_parts<'a>(s: &mut Scanner<'a>, out: &mut Prompt<'a>) -> Result<()> {
    s.expect(b'[', "expected an array")?;
    let mut first = true;
    while s.next_member(b']', &mut first)? {
        if s.peek() != Some(b'{') {
            return Err(wrong("messages[].content[]", "an object"));
        }
        let raw = s.skip_value()?;
        let mut part = Scanner::new(raw);
        match text_of_part(&mut part) {
            Some(text) => out.push(b'c', text),
            None => out.push(b'p', Cow::Borrowed(raw)),
        }
    }
    Ok(())
}

/// The `text` of a `{"type": "text", "text": ...}` part, or `None` for any other part.
fn text_of_part<'a>(s: &mut Scanner<'a>) -> Option<Cow<'a, [u8]>> {
    s.expect(b'{', "").ok()?;
    let mut is_text = false;
    let mut text = None;
    let mut first = true;
    while s.next_member(b'}', &mut first).ok()? {
        let key = s.key().ok()?;
        match (key.as_ref(), s.peek()) {
            (b"type", Some(b'"')) => is_text = s.string().ok()?.as_ref() == b"text",
            (b"text", Some(b'"')) => text = Some(s.string().ok()?),
            _ => {
                s.skip_value().ok()?;
            }
        }
    }
    if is_text {
        text
    } else {
        None
    }
}

fn string_or_raw<'a>(s: &mut Scanner<'a>) -> Result<Cow<'a, [u8]>> {
    if s.peek() == Some(b'"') {
        Ok(s.string()?)
    } else {
        Ok(Cow::Borrowed(s.skip_value()?))
    }
}

/// `prompt`: a string, an array of strings, an array of token ids or an array of such arrays.
fn parse_prompt<'a>(s: &mut Scanner<'a>) -> Result<Prompt<'a>> {
    let mut out = Prompt::default();
    match s.peek() {
        Some(b'"') => out.push_segment(b'P', s.string()?),
        Some(b'[') => {
            s.expect(b'[', "expected an array")?;
            let mut tokens: Vec<&'a [u8]> = Vec::new();
            let mut first = true;
            while s.next_member(b']', &mut first)? {
                match s.peek() {
                    Some(b'"') => out.push_segment(b'P', s.string()?),
                    Some(b'[') => out.push_segment(b'K', Cow::Borrowed(s.skip_value()?)),
                    Some(b'-' | b'0'..=b'9') => tokens.push(s.skip_value()?),
                    _ => {
                        return Err(wrong(
                            "prompt[]",
                            "a string, a token id or an array of token ids",
                        ))
                    }
                }
            }
            if !tokens.is_empty() {
                // A flat token-id prompt: one segment of the ids, separated canonically.
                if !out.is_empty() {
                    return Err(wrong("prompt", "token ids or strings, not both"));
                }
                out.push_segment(b'K', Cow::Owned(tokens.join(&b' ')));
            }
        }
        _ => return Err(wrong("prompt", "a string or an array")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(body: &str) -> Vec<u64> {
        parse_request(body.as_bytes()).unwrap().prefix_hashes
    }

    #[test]
    fn chat_fields() {
        let r = parse_request(
            br#"{"stream": true, "messages": [{"role": "user", "content": "hi"}], "model": "m1"}"#,
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::Chat);
        assert_eq!(r.model, "m1");
        assert!(r.stream);
        assert_eq!(r.prefix_hashes.len(), 1);
    }

    #[test]
    fn completion_prompt_forms() {
        for body in [
            r#"{"model": "m", "prompt": "once upon a time"}"#,
            r#"{"model": "m", "prompt": ["a", "b"]}"#,
            r#"{"model": "m", "prompt": [1, 2, 3]}"#,
            r#"{"model": "m", "prompt": [[1, 2], [3]]}"#,
        ] {
            let r = parse_request(body.as_bytes()).unwrap();
            assert_eq!(r.kind, RequestKind::Completion, "{body}");
            assert!(!r.prefix_hashes.is_empty(), "{body}");
        }
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = hashes(r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"x"}]}"#);
        let b = hashes(
            r#"{ "messages" : [ { "name":"x", "content" : "hi" , "role" : "user" } ] , "model" : "m" }"#,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn text_parts_hash_like_string_content() {
        let a = hashes(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let b = hashes(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
        );
        let c = hashes(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn escapes_are_decoded_before_hashing() {
        let a = hashes(r#"{"model":"m","messages":[{"role":"user","content":"é/"}]}"#);
        let b = hashes(r#"{"model":"m","messages":[{"role":"user","content":"\u00e9\/"}]}"#);
        assert_eq!(a, b);
    }

    #[test]
    fn model_separates_keys() {
        let a = hashes(r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#);
        let b = hashes(r#"{"model":"b","messages":[{"role":"user","content":"hi"}]}"#);
        assert_ne!(a, b);
    }

    #[test]
    fn tools_change_the_prefix() {
        let a = hashes(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let b = hashes(
            r#"{"model":"m","tools":[{"type":"function"}],"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_ne!(a.last(), b.last());
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        assert_eq!(parse_request(b"\xff\xfe"), Err(ParseError::NotUtf8));
        assert_eq!(parse_request(b"[1]"), Err(ParseError::NotAnObject));
        assert_eq!(parse_request(b"hello"), Err(ParseError::NotAnObject));
        assert!(matches!(
            parse_request(b"{\"model\": \"m\", "),
            Err(ParseError::Json(_))
        ));
        assert_eq!(
            parse_request(br#"{"model":"m"}"#),
            Err(ParseError::NoPrompt)
        );
        assert_eq!(
            parse_request(br#"{"messages":"hi"}"#),
            Err(ParseError::WrongType {
                field: "messages",
                expected: "an array"
            })
        );
        assert_eq!(
            parse_request(br#"{"messages":[{"content":"hi"}]}"#),
            Err(ParseError::WrongType {
                field: "messages[].role",
                expected: "present"
            })
        );
        assert_eq!(
            parse_request(br#"{"model":5,"prompt":"x"}"#),
            Err(ParseError::WrongType {
                field: "model",
                expected: "a string"
            })
        );
        assert!(matches!(
            parse_request(br#"{"prompt":"x"} x"#),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn null_content_and_tool_calls() {
        let a = hashes(
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}]}"#,
        );
        let b = hashes(
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"2"}]}]}"#,
        );
        assert_ne!(a, b);
    }
}
