//! Request parsing, incremental: OpenAI chat completions, completions, Responses, embeddings,
//! rerank / score, and Anthropic Messages bodies, fed chunk by chunk.
//!
//! `RequestParser` is a resumable JSON state machine that pulls out the routing fields (`model`,
//! `stream`) and streams the prompt straight into the prefix hasher (`prefix_hash`) as string
//! bytes are decoded: chunk boundaries may fall anywhere (inside a string, an escape, a
//! `\uXXXX`, a UTF-8 sequence, a number or a literal) and the result is the same for every
//! split of the same bytes. A whole body is "new parser, one `feed`, `finish`" (`parse_request`).
//!
//! Memory held is O(nesting + block size + the prefix levels), not O(body): nesting is capped at
//! 128 levels, string runs are found with `memchr` and hashed in place. Bytes are buffered only
//! where the canonical field order differs from the key order in the body, each buffer bounded by
//! the one field that needs it:
//! - a message's `content` before its `role` (kept until the role is known);
//! - the fields ranked after content (`name`, `tool_call_id`, `tool_calls`), always kept until
//!   the message ends (they are small);
//! - a content part while it is not yet known whether it is a text part: its raw JSON (and its
//!   `text`, if that comes before `"type"`). A part whose `"type"` comes first and is not `"text"`
//!   streams its raw JSON straight to the hasher; one whose `"type": "text"` comes first streams
//!   its `text`.
//!
//! Semantics (the same as the one-shot parser this replaces): `messages` (chat) takes precedence
//! over `prompt` (completions); the last of a repeated top-level key wins; content is a string,
//! `null` or content parts, where a `{"type": "text", "text": ...}` part hashes like plain string
//! content and any other part as its raw JSON; `name`, `tool_call_id`, `tool_calls` and `tools`
//! hash as given. New: a repeated `role` or `content` key in one message, or `type` or `text` key
//! in one content part, is an error (`DuplicateKey`), since the first may already be hashed; and
//! every string's escapes are validated, skipped or not.
//!
//! UTF-8 is validated per chunk (SIMD), carrying an incomplete trailing sequence to the next;
//! an invalid body reports `NotUtf8` whatever other error it also has.
//!
//! Shapes (`RequestKind`, usually `RequestKind::from_path`; `RequestParser::new` is the chat /
//! completions shape). Every shape validates the whole body (JSON, UTF-8, nesting) and reads
//! `model`; other keys by shape:
//! - Chat / Completion: as above, plus the affinity strings `prompt_cache_key`, `user`,
//!   `safety_identifier`. Keys and errors are exactly what they were before the other shapes.
//! - Responses: `stream`, `tools`, `store`; `input` a string (one segment, like a completions
//!   string prompt) or an array whose every item is one segment of its raw JSON, so a
//!   conversation's levels grow item by item; `instructions` goes into the context (`ctx`), not
//!   the chain, since SDKs send it after `input`; affinity `previous_response_id`, `conversation`
//!   (a string, or an object's `id`), `prompt_cache_key`, `user`, `safety_identifier`. No
//!   `input` is valid (no levels).
//! - Messages (Anthropic): `stream`, `tools`, `messages` exactly as chat messages; `system` (a
//!   string, or blocks as raw JSON) into the context; `metadata.user_id` as `user`.
//! - Embeddings: `input` exactly as a completions `prompt`, `messages` as chat (and taking
//!   precedence), `user`.
//! - Rerank / Score: each of `query`, `documents`, `text_1`, `text_2`, `queries`, `items`,
//!   `data_1`, `data_2`, `input` is one segment of its raw JSON with a tag of its own, in body
//!   order (a repeated key is hashed again); `user`.
//! - Other: not parsed at all, only counted against `max_bytes`.
//!
//! Affinity values are kept up to `MAX_AFFINITY_BYTES` decoded bytes (a longer one is `None`),
//! so memory stays bounded; `null` means absent, any other non-string is `WrongType`.

use memchr::memchr2;

use crate::prefix_hash::{ContextHasher, PrefixHasher, DEFAULT_BLOCK_SIZE};

/// The API a body is for: picks the body's shape (which keys are read, how the prompt is hashed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `/v1/chat/completions`. Chat and Completion share one shape (`messages` takes
    /// precedence over `prompt`); a result says which of the two the body used.
    Chat,
    /// `/v1/completions`.
    Completion,
    /// `/v1/responses` (OpenAI Responses API).
    Responses,
    /// `/v1/messages` (Anthropic Messages API).
    Messages,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/rerank`, `/rerank`, `/v2/rerank`.
    Rerank,
    /// `/v1/score`, `/score`.
    Score,
    /// Any other path: the body is not parsed, only counted against `max_bytes`.
    Other,
}

impl RequestKind {
    pub const ALL: [RequestKind; 8] = [
        RequestKind::Chat,
        RequestKind::Completion,
        RequestKind::Responses,
        RequestKind::Messages,
        RequestKind::Embeddings,
        RequestKind::Rerank,
        RequestKind::Score,
        RequestKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Chat => "chat",
            RequestKind::Completion => "completion",
            RequestKind::Responses => "responses",
            RequestKind::Messages => "messages",
            RequestKind::Embeddings => "embeddings",
            RequestKind::Rerank => "rerank",
            RequestKind::Score => "score",
            RequestKind::Other => "other",
        }
    }

    /// The kind named `name` (an `as_str` name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The kind of a request path (the one owner of the path table); a query string and a
    /// trailing `/` are ignored.
    pub fn from_path(path: &str) -> Self {
        match trim_path(path) {
            "/v1/chat/completions" => RequestKind::Chat,
            "/v1/completions" => RequestKind::Completion,
            "/v1/responses" => RequestKind::Responses,
            "/v1/messages" => RequestKind::Messages,
            "/v1/embeddings" => RequestKind::Embeddings,
            "/v1/rerank" | "/rerank" | "/v2/rerank" => RequestKind::Rerank,
            "/v1/score" | "/score" => RequestKind::Score,
            _ => RequestKind::Other,
        }
    }

    /// What a body of this kind lacks when it has no prompt (the `NoPrompt` message).
    fn missing_prompt(self) -> &'static str {
        match self {
            RequestKind::Chat | RequestKind::Completion => "neither 'messages' nor 'prompt'",
            RequestKind::Messages => "no 'messages'",
            RequestKind::Embeddings => "neither 'input' nor 'messages'",
            RequestKind::Rerank | RequestKind::Score => {
                "none of 'query', 'documents', 'text_1', 'text_2', 'queries', 'items', 'data_1', \
                 'data_2', 'input'"
            }
            // A Responses body without `input` is valid, and an Other body is not parsed.
            RequestKind::Responses | RequestKind::Other => "no prompt",
        }
    }
}

/// `path` without its query string and one trailing `/`.
fn trim_path(path: &str) -> &str {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    path.strip_suffix('/').unwrap_or(path)
}

/// The `{id}` of `/v1/responses/{id}` or `/v1/responses/{id}/...` (a stored response, or its
/// input items), query string ignored; `None` for any other path.
pub fn stored_response_id(path: &str) -> Option<&str> {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let rest = path.strip_prefix("/v1/responses/")?;
    let id = rest.split_once('/').map_or(rest, |(id, _)| id);
    (!id.is_empty()).then_some(id)
}

/// The longest affinity value kept, in decoded bytes: a longer one is ignored (`None`), so what
/// a parse holds stays bounded whatever the body.
pub const MAX_AFFINITY_BYTES: usize = 1024;

/// Fields a client sets to keep related requests together (on one endpoint, or one cache), as
/// given; `None` when absent, `null`, or longer than `MAX_AFFINITY_BYTES`. A repeated key: the
/// last value counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affinity {
    /// `prompt_cache_key` (Chat, Completion, Responses).
    pub prompt_cache_key: Option<String>,
    /// Responses `conversation`: the string, or the object's `id`.
    pub conversation: Option<String>,
    /// `safety_identifier` (Chat, Completion, Responses).
    pub safety_identifier: Option<String>,
    /// `user`; for Messages, `metadata.user_id`.
    pub user: Option<String>,
    /// Responses `previous_response_id`.
    pub previous_response_id: Option<String>,
}

/// What the picker needs from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub kind: RequestKind,
    /// The `model` field; empty when absent.
    pub model: String,
    pub stream: bool,
    /// `prefix_hashes[i]` identifies the first `i + 1` blocks of the prompt (at most
    /// `max_blocks` of them).
    pub prefix_hashes: Vec<u64>,
    /// `level_ends[i]`: canonical prompt bytes up to the end of level `i` (so an endpoint
    /// holding `i + 1` levels holds that much of the prompt, plus the context).
    pub level_ends: Vec<u64>,
    /// Size of the prompt: its canonical bytes (every message, past `max_blocks` too) plus the
    /// `tools` JSON and the system part (Messages `system`, Responses `instructions`). The load
    /// model estimates prompt tokens from it.
    pub prompt_bytes: u64,
    /// The part of `prompt_bytes` folded into every prefix level rather than cut into blocks
    /// (`tools` and the system part): an endpoint holding any level holds it too.
    pub context_bytes: u64,
    pub affinity: Affinity,
    /// Responses `store` (`true` when absent or `null`); `true` for every other kind.
    pub store: bool,
}

impl ParsedRequest {
    /// A body of a path whose shape is not read (`RequestKind::Other`): no model, no prompt.
    pub fn unread() -> Self {
        Self {
            kind: RequestKind::Other,
            model: String::new(),
            stream: false,
            prefix_hashes: Vec::new(),
            level_ends: Vec::new(),
            prompt_bytes: 0,
            context_bytes: 0,
            affinity: Affinity::default(),
            store: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// Offset in the (decoded) body.
    pub offset: u64,
    pub message: &'static str,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    NotUtf8,
    Json(JsonError),
    NotAnObject,
    /// A Chat or Completion body has neither `messages` nor `prompt`.
    NoPrompt,
    /// A body of another kind lacks its prompt fields (the message names them).
    NoPromptIn(RequestKind),
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    /// A key that may appear once appeared twice in one object.
    DuplicateKey {
        field: &'static str,
    },
    /// More than `max_bytes` bytes were fed (raw or decoded).
    TooLarge {
        max_bytes: u64,
    },
    /// A `Content-Encoding` this build does not decode.
    UnsupportedEncoding(String),
    /// The compressed body is corrupt or truncated.
    Decode(String),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NotUtf8 => write!(f, "body is not valid UTF-8"),
            ParseError::Json(e) => write!(f, "body is not valid JSON: {e}"),
            ParseError::NotAnObject => write!(f, "body is not a JSON object"),
            ParseError::NoPrompt => {
                write!(f, "body has {}", RequestKind::Chat.missing_prompt())
            }
            ParseError::NoPromptIn(kind) => write!(f, "body has {}", kind.missing_prompt()),
            ParseError::WrongType { field, expected } => write!(f, "'{field}' must be {expected}"),
            ParseError::DuplicateKey { field } => write!(f, "'{field}' appears twice"),
            ParseError::TooLarge { max_bytes } => {
                write!(f, "body is larger than max_bytes ({max_bytes} bytes)")
            }
            ParseError::UnsupportedEncoding(e) => write!(f, "unsupported content encoding: {e}"),
            ParseError::Decode(e) => write!(f, "body could not be decoded: {e}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// `feed` went past `max_bytes`; the parser is dead from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "body is larger than max_bytes")
    }
}

impl std::error::Error for TooLarge {}

/// Bounds of one parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes `feed` accepts in all; past them it returns `TooLarge`.
    pub max_bytes: u64,
    /// Prefix levels produced at most; past them no block is hashed.
    pub max_blocks: usize,
    /// Bytes of canonical prompt per prefix block.
    pub block_size: usize,
}

impl Default for Limits {
    /// No size limit, no cap, the default block size.
    fn default() -> Self {
        Self {
            max_bytes: u64::MAX,
            max_blocks: usize::MAX,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

type PResult<T> = Result<T, ParseError>;

/// Parses a whole request body (no size limit, no cap, the default block size).
pub fn parse_request(body: &[u8]) -> PResult<ParsedRequest> {
    parse_request_with(body, Limits::default())
}

/// Parses a whole chat-completions or completions body.
pub fn parse_request_with(body: &[u8], limits: Limits) -> PResult<ParsedRequest> {
    parse_request_for(RequestKind::Chat, body, limits)
}

/// Parses a whole body of `kind`'s shape.
pub fn parse_request_for(kind: RequestKind, body: &[u8], limits: Limits) -> PResult<ParsedRequest> {
    let mut parser = RequestParser::for_kind(kind, limits);
    // A failed feed leaves the parser dead; `finish` reports it.
    let _ = parser.feed(body);
    parser.finish()
}

/// Nesting deeper than this is refused, so hostile input cannot exhaust memory.
const MAX_DEPTH: usize = 128;

/// Buffers larger than this are freed, not kept for reuse, once their field is done.
const KEEP_CAPACITY: usize = 16 * 1024;

fn wrong(field: &'static str, expected: &'static str) -> ParseError {
    ParseError::WrongType { field, expected }
}

fn duplicate(field: &'static str) -> ParseError {
    ParseError::DuplicateKey { field }
}

/// The open containers, inline (no allocation, at most `MAX_DEPTH`).
#[derive(Debug, Clone)]
struct Stack {
    items: [Ctx; MAX_DEPTH],
    len: usize,
}

impl Stack {
    fn new() -> Self {
        Self {
            items: [Ctx::Root; MAX_DEPTH],
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn last(&self) -> Option<Ctx> {
        self.len.checked_sub(1).map(|i| self.items[i])
    }

    /// Caller checks `len() < MAX_DEPTH`.
    fn push(&mut self, ctx: Ctx) {
        self.items[self.len] = ctx;
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Ctx> {
        self.len = self.len.checked_sub(1)?;
        Some(self.items[self.len])
    }
}

/// What a top-level value means in a body of `kind`'s shape.
fn root_slot(kind: RequestKind, key: Key) -> Slot {
    use RequestKind::{Chat, Completion, Embeddings, Messages, Other, Rerank, Responses, Score};
    match (kind, key) {
        (Other, _) => Slot::Skip,
        (_, Key::Model) => Slot::Model,
        (Chat | Completion | Responses | Messages, Key::Stream) => Slot::Stream,
        (Chat | Completion | Responses | Messages, Key::Tools) => Slot::Tools,
        (Chat | Completion | Messages | Embeddings, Key::Messages) => Slot::Messages,
        // An embeddings `input` reads like a completions `prompt`.
        (Chat | Completion, Key::Prompt) | (Embeddings, Key::Input) => Slot::Prompt,
        (Responses, Key::Input) => Slot::Input,
        (Responses, Key::Instructions) | (Messages, Key::System) => Slot::System,
        (Responses, Key::Store) => Slot::Store,
        (Responses, Key::Conversation) => Slot::Conversation,
        (Messages, Key::Metadata) => Slot::Metadata,
        (Chat | Completion | Responses, Key::PromptCache | Key::SafetyIdentifier)
        | (Responses, Key::PreviousResponseId)
        | (Chat | Completion | Responses | Embeddings | Rerank | Score, Key::User) => {
            Slot::Affinity
        }
        (Rerank | Score, Key::Scored(_) | Key::Input) => Slot::Scored,
        _ => Slot::Skip,
    }
}

/// The byte a one-character escape (`\\n`, `\\"`, ...) stands for.
#[inline]
fn short_escape(b: u8) -> Option<u8> {
    Some(match b {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

fn recycle(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    } else {
        buf.clear();
    }
}

/// What a container holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Root,
    Messages,
    Message,
    Parts,
    Part,
    Prompt,
    /// A Responses `input` array.
    InputItems,
    /// A Responses `conversation` object.
    Conversation,
    /// A Messages `metadata` object.
    Metadata,
    OtherObject,
    OtherArray,
}

impl Ctx {
    fn is_object(self) -> bool {
        matches!(
            self,
            Ctx::Root
                | Ctx::Message
                | Ctx::Part
                | Ctx::Conversation
                | Ctx::Metadata
                | Ctx::OtherObject
        )
    }

    /// Whether the parser reads this object's keys.
    fn reads_keys(self) -> bool {
        matches!(
            self,
            Ctx::Root | Ctx::Message | Ctx::Part | Ctx::Conversation | Ctx::Metadata
        )
    }
}

/// The key of the current object member, as far as the parser cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Model,
    Stream,
    Messages,
    Prompt,
    Tools,
    Role,
    Content,
    Name,
    ToolCallId,
    ToolCalls,
    Type,
    Text,
    Input,
    Instructions,
    System,
    Store,
    Metadata,
    UserId,
    Id,
    Conversation,
    PreviousResponseId,
    /// `prompt_cache_key`.
    PromptCache,
    SafetyIdentifier,
    User,
    /// A rerank / score field hashed as its raw JSON; the byte is its segment tag.
    Scored(u8),
    Other,
}

impl Key {
    fn from_bytes(key: &[u8]) -> Key {
        match key {
            b"model" => Key::Model,
            b"stream" => Key::Stream,
            b"messages" => Key::Messages,
            b"prompt" => Key::Prompt,
            b"tools" => Key::Tools,
            b"role" => Key::Role,
            b"content" => Key::Content,
            b"name" => Key::Name,
            b"tool_call_id" => Key::ToolCallId,
            b"tool_calls" => Key::ToolCalls,
            b"type" => Key::Type,
            b"text" => Key::Text,
            b"input" => Key::Input,
            b"instructions" => Key::Instructions,
            b"system" => Key::System,
            b"store" => Key::Store,
            b"metadata" => Key::Metadata,
            b"user_id" => Key::UserId,
            b"id" => Key::Id,
            b"conversation" => Key::Conversation,
            b"previous_response_id" => Key::PreviousResponseId,
            b"prompt_cache_key" => Key::PromptCache,
            b"safety_identifier" => Key::SafetyIdentifier,
            b"user" => Key::User,
            b"query" => Key::Scored(b'Q'),
            b"documents" => Key::Scored(b'D'),
            b"text_1" => Key::Scored(b'1'),
            b"text_2" => Key::Scored(b'2'),
            b"queries" => Key::Scored(b'U'),
            b"items" => Key::Scored(b'M'),
            b"data_1" => Key::Scored(b'3'),
            b"data_2" => Key::Scored(b'4'),
            _ => Key::Other,
        }
    }
}

/// What the value being read means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Skip,
    Model,
    Stream,
    Messages,
    Prompt,
    Tools,
    Message,
    Role,
    Content,
    Name,
    ToolCallId,
    ToolCalls,
    Part,
    PartType,
    PartText,
    PromptItem,
    /// Responses `input`.
    Input,
    /// An item of a Responses `input` array.
    InputItem,
    /// Messages `system`, Responses `instructions`.
    System,
    Store,
    /// A string kept in `Affinity` (which one: `RequestParser::capture_field`).
    Affinity,
    Conversation,
    Metadata,
    /// A rerank / score field.
    Scored,
}

/// Where the lexer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Before the root value.
    Start,
    /// After `{`: a key or `}`.
    ObjectOpen,
    /// After `,` in an object: a key.
    ObjectNext,
    /// After a key: `:`.
    Colon,
    /// A value (after `:`, or after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrayOpen,
    /// After a value: `,` or the closing bracket.
    AfterValue,
    /// Inside a string.
    Str,
    /// After a backslash in a string.
    Escape,
    /// Reading the hex digits of `\u`; `second` when they follow a high surrogate.
    Hex { n: u8, acc: u16, second: bool },
    /// After a high surrogate escape: a `\u` low surrogate may follow.
    AfterHigh,
    /// After a high surrogate and a backslash.
    AfterHighEscape,
    /// Inside a number or a literal.
    Literal,
    /// After the root object: only whitespace.
    Done,
    /// An error was recorded; the rest is only checked for UTF-8.
    Failed,
}

/// Where decoded string bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrTo {
    Discard,
    Key,
    Model,
    /// Into the hasher, counted (`role`, completions prompts).
    Hash,
    /// Into the message's content target, counted (content, text parts).
    Emit,
    /// Into the message's deferred fields.
    Deferred,
    /// A content part's `type`.
    TypeName,
    /// A content part's `text` before its type is known.
    Text,
    /// An affinity value (bounded).
    Capture,
    /// Into the context's system part.
    System,
}

/// Where raw JSON bytes of a captured value go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawTo {
    Tools,
    /// Into the hasher (a completions prompt of token ids).
    Hash,
    /// Into the message's content target (a non-text part).
    Emit,
    Deferred,
    /// Into the part buffer (a part not yet known to be text or not).
    PartBuffer,
    /// Into the context's system part (a Messages `system` array).
    System,
}

/// A value whose raw JSON text is being captured.
#[derive(Debug, Clone, Copy)]
struct Raw {
    to: RawTo,
    /// Stack depth at the value's start: the capture ends when a value completes at it.
    depth: usize,
    /// Start of the bytes of the current chunk not yet flushed.
    start: usize,
    /// Raw bytes captured so far.
    len: u64,
}

/// Where a message's content goes: straight to the hasher once the role is hashed, else into
/// `pending` until it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Hasher,
    Pending,
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

#[derive(Debug, Default)]
struct MessageState {
    has_role: bool,
    has_content: bool,
    /// Content serialised before the role was known.
    pending: Vec<u8>,
    /// Values of the fields ranked after content.
    deferred: Vec<u8>,
    /// `(tag, start, end)` into `deferred`, in key order.
    records: Vec<(u8, usize, usize)>,
}

impl MessageState {
    fn begin(&mut self) {
        self.has_role = false;
        self.has_content = false;
        recycle(&mut self.pending);
        recycle(&mut self.deferred);
        self.records.clear();
    }

    fn deferred_begin(&mut self, tag: u8) {
        let at = self.deferred.len();
        self.records.push((tag, at, at));
    }

    fn deferred_end(&mut self) {
        let end = self.deferred.len();
        if let Some(r) = self.records.last_mut() {
            r.2 = end;
        }
    }

    fn retained_bytes(&self) -> usize {
        self.pending.capacity()
            + self.deferred.capacity()
            + self.records.capacity() * std::mem::size_of::<(u8, usize, usize)>()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum PartMode {
    /// Not yet known whether it is a text part: its raw JSON is buffered.
    #[default]
    Undecided,
    /// Not a text part: its raw JSON streams to the content target.
    Raw,
    /// A text part: its text went (or goes) to the content target.
    Text,
}

/// Segment tag of one Responses `input` item (raw JSON), unlike any chat or completions tag.
const INPUT_ITEM_TAG: u8 = b'I';

/// Segment tag of a rerank / score `input` (the other fields' tags are in `Key::from_bytes`).
const SCORED_INPUT_TAG: u8 = b'N';

/// The longest `type` value kept (only `"text"` matters).
const TYPE_NAME_MAX: usize = 8;

#[derive(Debug, Default)]
#[allow(clippy::struct_excessive_bools)] // independent facts about one JSON object
struct PartState {
    mode: PartMode,
    seen_type: bool,
    type_is_text: bool,
    seen_text: bool,
    /// `text` holds the whole string value of the part's `text`.
    text_ready: bool,
    type_name: [u8; TYPE_NAME_MAX],
    /// Bytes of the type name; `TYPE_NAME_MAX + 1` when longer.
    type_len: usize,
    text: Vec<u8>,
    raw: Vec<u8>,
}

impl PartState {
    fn begin(&mut self) {
        self.mode = PartMode::Undecided;
        self.seen_type = false;
        self.type_is_text = false;
        self.seen_text = false;
        self.text_ready = false;
        self.type_len = 0;
        recycle(&mut self.text);
        recycle(&mut self.raw);
    }

    fn retained_bytes(&self) -> usize {
        self.text.capacity() + self.raw.capacity()
    }
}

/// A completions `prompt` array.
#[derive(Debug, Default, Clone, Copy)]
struct PromptState {
    /// String and nested-array segments.
    segments: u32,
    /// Flat token ids, and the bytes of their canonical form (`ids joined by ' '`).
    tokens: u32,
    token_bytes: u64,
}

/// Which `Affinity` field a captured string goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AffinityField {
    PromptCacheKey,
    Conversation,
    SafetyIdentifier,
    User,
    PreviousResponseId,
}

impl Affinity {
    fn slot(&mut self, field: AffinityField) -> &mut Option<String> {
        match field {
            AffinityField::PromptCacheKey => &mut self.prompt_cache_key,
            AffinityField::Conversation => &mut self.conversation,
            AffinityField::SafetyIdentifier => &mut self.safety_identifier,
            AffinityField::User => &mut self.user,
            AffinityField::PreviousResponseId => &mut self.previous_response_id,
        }
    }
}

/// Valid UTF-8 bytes as a `String` (the body was checked, and escapes decode to UTF-8).
fn into_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// UTF-8 validation across chunks.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8 {
    carry: [u8; 4],
    carry_len: usize,
    bad: bool,
}

fn utf8_sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

impl Utf8 {
    fn check(&mut self, mut chunk: &[u8]) {
        if self.bad {
            return;
        }
        if self.carry_len > 0 {
            let need = utf8_sequence_len(self.carry[0]);
            let take = (need - self.carry_len).min(chunk.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&chunk[..take]);
            self.carry_len += take;
            chunk = &chunk[take..];
            if self.carry_len < need {
                return;
            }
            if std::str::from_utf8(&self.carry[..need]).is_err() {
                self.bad = true;
                return;
            }
            self.carry_len = 0;
        }
        if simdutf8::basic::from_utf8(chunk).is_ok() {
            return;
        }
        match simdutf8::compat::from_utf8(chunk) {
            Err(e) if e.error_len().is_none() => {
                // An incomplete sequence at the end: the next chunk may complete it.
                let rest = &chunk[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.carry_len = rest.len();
            }
            _ => self.bad = true,
        }
    }

    fn is_valid_end(&self) -> bool {
        !self.bad && self.carry_len == 0
    }
}

/// The incremental request parser; see the module docs.
#[allow(clippy::struct_excessive_bools)] // independent facts about one request
pub struct RequestParser {
    /// The shape asked for (Chat and Completion are one shape).
    kind: RequestKind,
    max_bytes: u64,
    /// Bytes fed before the current chunk.
    fed: u64,
    dead: bool,
    utf8: Utf8,
    error: Option<ParseError>,

    lex: Lex,
    stack: Stack,
    /// The current object member's key.
    key: Key,
    key_buf: [u8; 24],
    /// Bytes of the key; `key_buf.len() + 1` when longer (no key of interest is).
    key_len: usize,
    in_key: bool,
    /// The scalar value being read.
    slot: Slot,
    str_to: StrTo,
    /// Decoded bytes of the current hashed field.
    field_len: u64,
    /// A high surrogate waiting for its low half.
    high: u16,
    literal: [u8; 5],
    literal_len: usize,
    raw: Option<Raw>,

    hasher: PrefixHasher,
    context: ContextHasher,
    model: Vec<u8>,
    stream: bool,
    has_messages: bool,
    has_prompt: bool,
    target: Target,
    message: MessageState,
    part: PartState,
    prompt: PromptState,
    /// A rerank / score field was hashed.
    has_scored: bool,
    store: bool,
    affinity: Affinity,
    /// The affinity string being read, up to `MAX_AFFINITY_BYTES`.
    capture: Vec<u8>,
    capture_too_long: bool,
    capture_field: AffinityField,
}

impl std::fmt::Debug for RequestParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestParser")
            .field("kind", &self.kind)
            .field("fed", &self.fed)
            .field("lex", &self.lex)
            .field("depth", &self.stack.len())
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl RequestParser {
    /// A parser of chat-completions and completions bodies.
    pub fn new(limits: Limits) -> Self {
        Self::for_kind(RequestKind::Chat, limits)
    }

    /// A parser of bodies of `kind`'s shape (`Chat` and `Completion` are the same shape).
    pub fn for_kind(kind: RequestKind, limits: Limits) -> Self {
        Self {
            kind,
            max_bytes: limits.max_bytes,
            fed: 0,
            dead: false,
            utf8: Utf8::default(),
            error: None,
            lex: Lex::Start,
            stack: Stack::new(),
            key: Key::Other,
            key_buf: [0; 24],
            key_len: 0,
            in_key: false,
            slot: Slot::Skip,
            str_to: StrTo::Discard,
            field_len: 0,
            high: 0,
            literal: [0; 5],
            literal_len: 0,
            raw: None,
            hasher: PrefixHasher::new(limits.block_size, limits.max_blocks),
            context: ContextHasher::default(),
            model: Vec::new(),
            stream: false,
            has_messages: false,
            has_prompt: false,
            target: Target::Hasher,
            message: MessageState::default(),
            part: PartState::default(),
            prompt: PromptState::default(),
            has_scored: false,
            store: true,
            affinity: Affinity::default(),
            capture: Vec::new(),
            capture_too_long: false,
            capture_field: AffinityField::User,
        }
    }

    /// Parses the next piece of the body. `Err(TooLarge)` once more than `max_bytes` were fed in
    /// all; the parser is then dead (every later feed fails at once, `finish` reports it).
    /// Errors in the body itself are kept for `finish`.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), TooLarge> {
        if self.dead {
            return Err(TooLarge);
        }
        let total = self.fed.saturating_add(chunk.len() as u64);
        if total > self.max_bytes {
            self.die();
            return Err(TooLarge);
        }
        if self.kind == RequestKind::Other {
            // Not parsed at all: only counted.
            self.fed = total;
            return Ok(());
        }
        self.utf8.check(chunk);
        if self.lex != Lex::Failed {
            if let Err(e) = self.parse_chunk(chunk) {
                self.error = Some(e);
                self.lex = Lex::Failed;
                self.free_buffers();
            }
        }
        self.fed = total;
        Ok(())
    }

    /// Bytes fed so far.
    pub fn bytes_fed(&self) -> u64 {
        self.fed
    }

    /// Whether `feed` returned `TooLarge`.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    fn die(&mut self) {
        self.dead = true;
        self.lex = Lex::Failed;
        self.free_buffers();
        self.hasher = PrefixHasher::new(1, 0);
    }

    fn free_buffers(&mut self) {
        self.stack = Stack::new();
        self.model = Vec::new();
        self.message = MessageState::default();
        self.part = PartState::default();
        self.raw = None;
        self.capture = Vec::new();
    }

    /// Heap bytes the parser holds now: its buffers and the prefix levels so far (the nesting
    /// stack is inline, `MAX_DEPTH` bytes).
    pub fn retained_bytes(&self) -> usize {
        self.model.capacity()
            + self.capture.capacity()
            + self.message.retained_bytes()
            + self.part.retained_bytes()
            + self.hasher.retained_bytes()
    }

    /// The parsed request, or why the body is unusable.
    pub fn finish(self) -> PResult<ParsedRequest> {
        if self.dead {
            return Err(ParseError::TooLarge {
                max_bytes: self.max_bytes,
            });
        }
        if self.kind == RequestKind::Other {
            return Ok(ParsedRequest::unread());
        }
        if !self.utf8.is_valid_end() {
            return Err(ParseError::NotUtf8);
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.lex {
            Lex::Done => {}
            Lex::Start => return Err(ParseError::NotAnObject),
            _ => {
                return Err(ParseError::Json(JsonError {
                    offset: self.fed,
                    message: "unexpected end of input",
                }))
            }
        }
        let has_prompt = match self.kind {
            RequestKind::Chat | RequestKind::Completion | RequestKind::Embeddings => {
                self.has_messages || self.has_prompt
            }
            RequestKind::Messages => self.has_messages,
            RequestKind::Rerank | RequestKind::Score => self.has_scored,
            RequestKind::Responses | RequestKind::Other => true,
        };
        let kind = match self.kind {
            _ if !has_prompt => {
                return Err(match self.kind {
                    RequestKind::Chat | RequestKind::Completion => ParseError::NoPrompt,
                    kind => ParseError::NoPromptIn(kind),
                })
            }
            RequestKind::Chat | RequestKind::Completion if self.has_messages => RequestKind::Chat,
            RequestKind::Chat | RequestKind::Completion => RequestKind::Completion,
            kind => kind,
        };
        let ctx = self.context.ctx(&self.model);
        let context_bytes = self.context.tools_len() + self.context.system_len();
        let prompt_bytes = self.hasher.prompt_bytes() + context_bytes;
        let (prefix_hashes, level_ends) = self.hasher.finish_with_ends(ctx);
        Ok(ParsedRequest {
            kind,
            model: into_string(self.model),
            stream: self.stream,
            prefix_hashes,
            level_ends,
            prompt_bytes,
            context_bytes,
            affinity: self.affinity,
            store: self.store,
        })
    }

    fn json_err(&self, at: usize, message: &'static str) -> ParseError {
        ParseError::Json(JsonError {
            offset: self.fed + at as u64,
            message,
        })
    }

    fn parse_chunk(&mut self, chunk: &[u8]) -> PResult<()> {
        if let Some(raw) = &mut self.raw {
            raw.start = 0;
        }
        let mut pos = 0;
        while pos < chunk.len() {
            match self.lex {
                Lex::Str => loop {
                    // The hot path: runs between quotes and backslashes, short escapes inline.
                    let rest = &chunk[pos..];
                    let Some(n) = memchr2(b'"', b'\\', rest) else {
                        self.str_bytes(rest);
                        pos = chunk.len();
                        break;
                    };
                    if n > 0 {
                        self.str_bytes(&rest[..n]);
                    }
                    pos += n + 1;
                    if rest[n] == b'"' {
                        self.end_string(chunk, pos);
                        break;
                    }
                    if let Some(decoded) = chunk.get(pos).copied().and_then(short_escape) {
                        self.str_bytes(&[decoded]);
                        pos += 1;
                    } else {
                        self.lex = Lex::Escape;
                        break;
                    }
                },
                Lex::Literal => {
                    let start = pos;
                    while pos < chunk.len()
                        && (chunk[pos].is_ascii_alphanumeric()
                            || matches!(chunk[pos], b'-' | b'+' | b'.'))
                    {
                        pos += 1;
                    }
                    self.literal_bytes(&chunk[start..pos]);
                    if pos < chunk.len() {
                        self.end_literal(chunk, pos)?;
                    }
                }
                Lex::Escape => {
                    let b = chunk[pos];
                    pos += 1;
                    self.escape(b, pos)?;
                }
                Lex::Hex { n, acc, second } => {
                    pos += 1;
                    self.hex_digit(chunk[pos - 1], pos, n, acc, second)?;
                }
                Lex::AfterHigh => {
                    if chunk[pos] == b'\\' {
                        pos += 1;
                        self.lex = Lex::AfterHighEscape;
                    } else {
                        self.str_char('\u{FFFD}');
                        self.lex = Lex::Str;
                    }
                }
                Lex::AfterHighEscape => {
                    let b = chunk[pos];
                    pos += 1;
                    if b == b'u' {
                        self.lex = Lex::Hex {
                            n: 0,
                            acc: 0,
                            second: true,
                        };
                    } else {
                        self.str_char('\u{FFFD}');
                        self.escape(b, pos)?;
                    }
                }
                Lex::Failed => return Ok(()),
                _ => {
                    let b = chunk[pos];
                    if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                        pos += 1;
                        continue;
                    }
                    pos = self.structural(chunk, pos, b)?;
                }
            }
        }
        self.flush_raw(chunk, chunk.len());
        Ok(())
    }

    /// A non-whitespace byte outside strings and literals; returns the next position.
    fn structural(&mut self, chunk: &[u8], pos: usize, b: u8) -> PResult<usize> {
        match self.lex {
            Lex::Start => {
                if b != b'{' {
                    return Err(ParseError::NotAnObject);
                }
                self.stack.push(Ctx::Root);
                self.lex = Lex::ObjectOpen;
                Ok(pos + 1)
            }
            Lex::ObjectOpen | Lex::ObjectNext => match b {
                b'}' if self.lex == Lex::ObjectOpen => self.close(chunk, pos),
                b'"' => {
                    self.in_key = true;
                    self.key_len = 0;
                    self.str_to = match self.stack.last() {
                        Some(ctx) if ctx.reads_keys() => StrTo::Key,
                        _ => StrTo::Discard,
                    };
                    self.lex = Lex::Str;
                    Ok(pos + 1)
                }
                _ => Err(self.json_err(pos, "expected a string key")),
            },
            Lex::Colon => {
                if b != b':' {
                    return Err(self.json_err(pos, "expected ':' after key"));
                }
                self.lex = Lex::Value;
                Ok(pos + 1)
            }
            Lex::Value => self.begin_value(chunk, pos, b),
            Lex::ArrayOpen => {
                if b == b']' {
                    self.close(chunk, pos)
                } else {
                    self.begin_value(chunk, pos, b)
                }
            }
            Lex::AfterValue => {
                let top = self.stack.last().expect("inside a container");
                match b {
                    b',' => {
                        self.lex = if top.is_object() {
                            Lex::ObjectNext
                        } else {
                            Lex::Value
                        };
                        Ok(pos + 1)
                    }
                    b'}' if top.is_object() => self.close(chunk, pos),
                    b']' if !top.is_object() => self.close(chunk, pos),
                    _ => Err(self.json_err(pos, "expected ',' or a closing bracket")),
                }
            }
            Lex::Done => Err(self.json_err(pos, "trailing data after the JSON value")),
            _ => unreachable!("handled by parse_chunk"),
        }
    }

    /// What the value about to be read means.
    fn slot_here(&self) -> Slot {
        match (self.stack.last(), self.key) {
            (Some(Ctx::Root), key) => root_slot(self.kind, key),
            (Some(Ctx::Messages), _) => Slot::Message,
            (Some(Ctx::Message), Key::Role) => Slot::Role,
            (Some(Ctx::Message), Key::Content) => Slot::Content,
            (Some(Ctx::Message), Key::Name) => Slot::Name,
            (Some(Ctx::Message), Key::ToolCallId) => Slot::ToolCallId,
            (Some(Ctx::Message), Key::ToolCalls) => Slot::ToolCalls,
            (Some(Ctx::Parts), _) => Slot::Part,
            (Some(Ctx::Part), Key::Type) => Slot::PartType,
            (Some(Ctx::Part), Key::Text) => Slot::PartText,
            (Some(Ctx::Prompt), _) => Slot::PromptItem,
            (Some(Ctx::InputItems), _) => Slot::InputItem,
            (Some(Ctx::Conversation), Key::Id) | (Some(Ctx::Metadata), Key::UserId) => {
                Slot::Affinity
            }
            _ => Slot::Skip,
        }
    }

    fn start_raw(&mut self, to: RawTo, pos: usize) {
        self.raw = Some(Raw {
            to,
            depth: self.stack.len(),
            start: pos,
            len: 0,
        });
    }

    /// Sends the captured raw bytes of this chunk up to `upto` to their destination.
    fn flush_raw(&mut self, chunk: &[u8], upto: usize) {
        let Some(raw) = &mut self.raw else { return };
        let bytes = &chunk[raw.start..upto];
        raw.start = upto;
        raw.len += bytes.len() as u64;
        match raw.to {
            RawTo::Tools => self.context.tools_bytes(bytes),
            RawTo::Hash => self.hasher.feed(bytes),
            RawTo::Emit => match self.target {
                Target::Hasher => self.hasher.feed(bytes),
                Target::Pending => self.message.pending.extend_from_slice(bytes),
            },
            RawTo::Deferred => self.message.deferred.extend_from_slice(bytes),
            RawTo::PartBuffer => self.part.raw.extend_from_slice(bytes),
            RawTo::System => self.context.system_bytes(bytes),
        }
    }

    /// Content bytes, to the hasher or the message's pending buffer.
    #[inline(always)] // per string run: parse_hash measured 10-20% faster than #[inline]
    #[allow(clippy::inline_always)]
    fn emit(&mut self, bytes: &[u8]) {
        match self.target {
            Target::Hasher => self.hasher.feed(bytes),
            Target::Pending => self.message.pending.extend_from_slice(bytes),
        }
    }

    fn emit_len(&mut self, len: u64) {
        self.emit(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    }

    /// The name of the completions-style prompt field (embeddings call it `input`).
    fn prompt_name(&self) -> &'static str {
        if self.kind == RequestKind::Embeddings {
            "input"
        } else {
            "prompt"
        }
    }

    fn prompt_item_name(&self) -> &'static str {
        if self.kind == RequestKind::Embeddings {
            "input[]"
        } else {
            "prompt[]"
        }
    }

    /// An affinity string (or `null`) for `field` starts; `name` is for errors.
    fn begin_affinity(
        &mut self,
        field: AffinityField,
        name: &'static str,
        pos: usize,
        b: u8,
    ) -> PResult<usize> {
        self.capture_field = field;
        match b {
            b'"' => {
                self.capture.clear();
                self.capture_too_long = false;
                self.begin_string(StrTo::Capture, Slot::Affinity);
                Ok(pos + 1)
            }
            b'n' => {
                *self.affinity.slot(field) = None;
                self.begin_literal(Slot::Skip);
                Ok(pos)
            }
            _ => Err(wrong(name, "a string")),
        }
    }

    /// A `prompt` value starts: it replaces an earlier prompt, and is parsed but not hashed when
    /// `messages` (which takes precedence) came first.
    fn begin_prompt(&mut self) {
        self.has_prompt = true;
        if self.has_messages {
            self.hasher.set_muted(true);
        } else {
            self.hasher.reset();
        }
    }

    fn push(&mut self, chunk_pos: usize, ctx: Ctx) -> PResult<()> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.json_err(chunk_pos, "nesting too deep"));
        }
        self.stack.push(ctx);
        self.lex = if ctx.is_object() {
            Lex::ObjectOpen
        } else {
            Lex::ArrayOpen
        };
        Ok(())
    }

    fn begin_string(&mut self, str_to: StrTo, slot: Slot) {
        self.str_to = str_to;
        self.slot = slot;
        self.field_len = 0;
        self.lex = Lex::Str;
    }

    fn begin_literal(&mut self, slot: Slot) {
        self.slot = slot;
        self.literal_len = 0;
        self.lex = Lex::Literal;
    }

    /// Starts a value that is only skipped (validated), maybe inside a raw capture.
    fn begin_skipped(&mut self, pos: usize, b: u8) -> PResult<usize> {
        match b {
            b'"' => {
                self.begin_string(StrTo::Discard, Slot::Skip);
                Ok(pos + 1)
            }
            b'{' => {
                self.push(pos, Ctx::OtherObject)?;
                Ok(pos + 1)
            }
            b'[' => {
                self.push(pos, Ctx::OtherArray)?;
                Ok(pos + 1)
            }
            b't' | b'f' | b'n' | b'-' | b'0'..=b'9' => {
                self.begin_literal(Slot::Skip);
                Ok(pos)
            }
            _ => Err(self.json_err(pos, "unexpected byte")),
        }
    }

    #[allow(clippy::too_many_lines)] // one arm per kind of value, kept together
    fn begin_value(&mut self, chunk: &[u8], pos: usize, b: u8) -> PResult<usize> {
        let slot = self.slot_here();
        match slot {
            Slot::Skip => self.begin_skipped(pos, b),
            Slot::Model => {
                if b != b'"' {
                    return Err(wrong("model", "a string"));
                }
                self.model.clear();
                self.begin_string(StrTo::Model, slot);
                Ok(pos + 1)
            }
            Slot::Stream => {
                if !matches!(b, b't' | b'f' | b'n') {
                    return Err(wrong("stream", "a boolean"));
                }
                self.begin_literal(slot);
                Ok(pos)
            }
            Slot::Messages => {
                if b != b'[' {
                    return Err(wrong("messages", "an array"));
                }
                self.has_messages = true;
                self.hasher.set_muted(false);
                self.hasher.reset();
                self.push(pos, Ctx::Messages)?;
                Ok(pos + 1)
            }
            Slot::Prompt => match b {
                b'"' => {
                    self.begin_prompt();
                    self.hasher.feed(b"P");
                    self.begin_string(StrTo::Hash, slot);
                    Ok(pos + 1)
                }
                b'[' => {
                    self.begin_prompt();
                    self.prompt = PromptState::default();
                    self.push(pos, Ctx::Prompt)?;
                    Ok(pos + 1)
                }
                _ => Err(wrong(self.prompt_name(), "a string or an array")),
            },
            Slot::Tools => {
                self.context.begin_tools();
                self.start_raw(RawTo::Tools, pos);
                self.begin_skipped(pos, b)
            }
            Slot::Message => {
                if b != b'{' {
                    return Err(wrong("messages[]", "an object"));
                }
                self.message.begin();
                self.push(pos, Ctx::Message)?;
                Ok(pos + 1)
            }
            Slot::Role => {
                if b != b'"' {
                    return Err(wrong("messages[].role", "a string"));
                }
                if self.message.has_role {
                    return Err(duplicate("messages[].role"));
                }
                self.message.has_role = true;
                self.hasher.feed(b"r");
                self.begin_string(StrTo::Hash, slot);
                Ok(pos + 1)
            }
            Slot::Content => {
                if !matches!(b, b'"' | b'[' | b'n') {
                    return Err(wrong("messages[].content", "a string, an array or null"));
                }
                if self.message.has_content {
                    return Err(duplicate("messages[].content"));
                }
                self.message.has_content = true;
                self.target = if self.message.has_role {
                    Target::Hasher
                } else {
                    Target::Pending
                };
                match b {
                    b'"' => {
                        self.emit(b"c");
                        self.begin_string(StrTo::Emit, slot);
                        Ok(pos + 1)
                    }
                    b'[' => {
                        self.push(pos, Ctx::Parts)?;
                        Ok(pos + 1)
                    }
                    _ => {
                        self.begin_literal(Slot::Skip);
                        Ok(pos)
                    }
                }
            }
            Slot::Name | Slot::ToolCallId => {
                self.message
                    .deferred_begin(if slot == Slot::Name { b'n' } else { b'i' });
                if b == b'"' {
                    self.begin_string(StrTo::Deferred, slot);
                    Ok(pos + 1)
                } else {
                    self.start_raw(RawTo::Deferred, pos);
                    self.begin_skipped(pos, b)
                }
            }
            Slot::ToolCalls => {
                self.message.deferred_begin(b'x');
                self.start_raw(RawTo::Deferred, pos);
                self.begin_skipped(pos, b)
            }
            Slot::Part => {
                if b != b'{' {
                    return Err(wrong("messages[].content[]", "an object"));
                }
                self.part.begin();
                self.start_raw(RawTo::PartBuffer, pos);
                self.push(pos, Ctx::Part)?;
                Ok(pos + 1)
            }
            Slot::PartType => {
                if self.part.seen_type {
                    return Err(duplicate("messages[].content[].type"));
                }
                self.part.seen_type = true;
                if b == b'"' {
                    self.part.type_len = 0;
                    self.begin_string(StrTo::TypeName, slot);
                    return Ok(pos + 1);
                }
                // Only a string type can be "text".
                if self.part.mode == PartMode::Undecided {
                    self.decide_raw(chunk, pos);
                }
                self.begin_skipped(pos, b)
            }
            Slot::PartText => {
                if self.part.seen_text {
                    return Err(duplicate("messages[].content[].text"));
                }
                self.part.seen_text = true;
                if b != b'"' || self.part.mode != PartMode::Undecided {
                    return self.begin_skipped(pos, b);
                }
                if self.part.seen_type && self.part.type_is_text {
                    // `{"type": "text", "text": ...}`: stream the text.
                    self.raw = None;
                    self.part.raw.clear();
                    self.part.mode = PartMode::Text;
                    self.emit(b"c");
                    self.begin_string(StrTo::Emit, slot);
                } else {
                    self.begin_string(StrTo::Text, slot);
                }
                Ok(pos + 1)
            }
            Slot::PromptItem => match b {
                b'"' => {
                    self.prompt.segments += 1;
                    self.hasher.feed(b"P");
                    self.begin_string(StrTo::Hash, slot);
                    Ok(pos + 1)
                }
                b'[' => {
                    self.prompt.segments += 1;
                    self.hasher.feed(b"K");
                    self.start_raw(RawTo::Hash, pos);
                    self.push(pos, Ctx::OtherArray)?;
                    Ok(pos + 1)
                }
                b'-' | b'0'..=b'9' => {
                    // A flat token-id prompt: one segment of the ids, separated canonically.
                    if self.prompt.tokens == 0 {
                        self.hasher.feed(b"K");
                    } else {
                        self.hasher.feed(b" ");
                        self.prompt.token_bytes += 1;
                    }
                    self.prompt.tokens += 1;
                    self.begin_literal(slot);
                    Ok(pos)
                }
                _ => Err(wrong(
                    self.prompt_item_name(),
                    "a string, a token id or an array of token ids",
                )),
            },
            _ => self.begin_other_value(slot, pos, b),
        }
    }

    /// A Messages `system` or a Responses `instructions` value starts: the context's system
    /// part.
    fn begin_system(&mut self, pos: usize, b: u8) -> PResult<usize> {
        match b {
            b'"' => {
                self.context.begin_system();
                self.begin_string(StrTo::System, Slot::System);
                Ok(pos + 1)
            }
            b'[' if self.kind == RequestKind::Messages => {
                self.context.begin_system();
                self.start_raw(RawTo::System, pos);
                self.begin_skipped(pos, b)
            }
            b'n' => {
                self.context.clear_system();
                self.begin_literal(Slot::Skip);
                Ok(pos)
            }
            _ if self.kind == RequestKind::Messages => {
                Err(wrong("system", "a string, an array or null"))
            }
            _ => Err(wrong("instructions", "a string or null")),
        }
    }

    /// The values only the non-chat shapes read.
    fn begin_other_value(&mut self, slot: Slot, pos: usize, b: u8) -> PResult<usize> {
        match slot {
            Slot::Input => {
                // A repeated `input` replaces the earlier one.
                self.hasher.reset();
                match b {
                    b'"' => {
                        // Like a completions string prompt.
                        self.hasher.feed(b"P");
                        self.begin_string(StrTo::Hash, slot);
                        Ok(pos + 1)
                    }
                    b'[' => {
                        self.push(pos, Ctx::InputItems)?;
                        Ok(pos + 1)
                    }
                    b'n' => {
                        self.begin_literal(Slot::Skip);
                        Ok(pos)
                    }
                    _ => Err(wrong("input", "a string, an array or null")),
                }
            }
            Slot::InputItem => {
                // Any item (message, function call, its output, reasoning...) is one segment of
                // its raw JSON, so a conversation's prefix grows item by item.
                self.hasher.feed(&[INPUT_ITEM_TAG]);
                self.start_raw(RawTo::Hash, pos);
                self.begin_skipped(pos, b)
            }
            Slot::System => self.begin_system(pos, b),
            Slot::Store => {
                if !matches!(b, b't' | b'f' | b'n') {
                    return Err(wrong("store", "a boolean"));
                }
                self.begin_literal(slot);
                Ok(pos)
            }
            Slot::Affinity => {
                let (field, name) = match (self.stack.last(), self.key) {
                    (Some(Ctx::Conversation), _) => {
                        (AffinityField::Conversation, "conversation.id")
                    }
                    (Some(Ctx::Metadata), _) => (AffinityField::User, "metadata.user_id"),
                    (_, Key::PromptCache) => (AffinityField::PromptCacheKey, "prompt_cache_key"),
                    (_, Key::SafetyIdentifier) => {
                        (AffinityField::SafetyIdentifier, "safety_identifier")
                    }
                    (_, Key::PreviousResponseId) => {
                        (AffinityField::PreviousResponseId, "previous_response_id")
                    }
                    _ => (AffinityField::User, "user"),
                };
                self.begin_affinity(field, name, pos, b)
            }
            Slot::Conversation => match b {
                b'{' => {
                    // `{"id": ...}`; without an `id` there is no conversation.
                    self.affinity.conversation = None;
                    self.push(pos, Ctx::Conversation)?;
                    Ok(pos + 1)
                }
                b'"' | b'n' => {
                    self.begin_affinity(AffinityField::Conversation, "conversation", pos, b)
                }
                _ => Err(wrong("conversation", "a string, an object or null")),
            },
            Slot::Metadata => match b {
                b'{' => {
                    self.affinity.user = None;
                    self.push(pos, Ctx::Metadata)?;
                    Ok(pos + 1)
                }
                b'n' => {
                    self.affinity.user = None;
                    self.begin_literal(Slot::Skip);
                    Ok(pos)
                }
                _ => Err(wrong("metadata", "an object or null")),
            },
            Slot::Scored => {
                let tag = match self.key {
                    Key::Scored(tag) => tag,
                    _ => SCORED_INPUT_TAG,
                };
                self.has_scored = true;
                self.hasher.feed(&[tag]);
                self.start_raw(RawTo::Hash, pos);
                self.begin_skipped(pos, b)
            }
            _ => unreachable!("begin_value handles the chat slots"),
        }
    }

    /// The part turns out not to be a text part: its buffered raw JSON goes out, the rest
    /// streams.
    fn decide_raw(&mut self, chunk: &[u8], upto: usize) {
        self.flush_raw(chunk, upto);
        let buffered = std::mem::take(&mut self.part.raw);
        self.emit(b"p");
        self.emit(&buffered);
        self.part.raw = buffered;
        self.part.raw.clear();
        if let Some(raw) = &mut self.raw {
            raw.to = RawTo::Emit;
        }
        self.part.mode = PartMode::Raw;
    }

    /// The part is a text part whose text was buffered before its type was known.
    fn decide_text_buffered(&mut self) {
        self.raw = None;
        self.part.raw.clear();
        let text = std::mem::take(&mut self.part.text);
        self.emit(b"c");
        self.emit(&text);
        self.emit_len(text.len() as u64);
        self.part.text = text;
        self.part.mode = PartMode::Text;
    }

    /// A container closes at `pos`.
    fn close(&mut self, chunk: &[u8], pos: usize) -> PResult<usize> {
        let ctx = self.stack.pop().expect("inside a container");
        let after = pos + 1;
        match ctx {
            Ctx::Message => self.end_message()?,
            Ctx::Part => self.end_part(chunk, after),
            Ctx::Prompt => self.end_prompt()?,
            _ => {}
        }
        self.end_value(chunk, after);
        Ok(after)
    }

    fn end_message(&mut self) -> PResult<()> {
        if !self.message.has_role {
            return Err(wrong("messages[].role", "present"));
        }
        let m = &mut self.message;
        // Stable: repeated fields keep their order.
        m.records.sort_by_key(|r| field_rank(r.0));
        for &(tag, start, end) in &m.records {
            self.hasher.feed(&[tag]);
            self.hasher.feed(&m.deferred[start..end]);
            self.hasher.feed_len((end - start) as u64);
        }
        self.hasher.end_segment();
        Ok(())
    }

    fn end_part(&mut self, chunk: &[u8], after: usize) {
        match self.part.mode {
            PartMode::Undecided => {
                // Not a text part after all (no string type "text", or no string text).
                self.flush_raw(chunk, after);
                self.raw = None;
                let buffered = std::mem::take(&mut self.part.raw);
                self.emit(b"p");
                self.emit(&buffered);
                self.emit_len(buffered.len() as u64);
                self.part.raw = buffered;
            }
            PartMode::Raw => {
                self.flush_raw(chunk, after);
                let len = self.raw.take().map_or(0, |r| r.len);
                self.emit_len(len);
            }
            PartMode::Text => {}
        }
        recycle(&mut self.part.raw);
        recycle(&mut self.part.text);
    }

    fn end_prompt(&mut self) -> PResult<()> {
        let p = self.prompt;
        if p.tokens > 0 {
            if p.segments > 0 {
                return Err(wrong(self.prompt_name(), "token ids or strings, not both"));
            }
            self.hasher.feed_len(p.token_bytes);
            self.hasher.end_segment();
        }
        self.hasher.set_muted(false);
        Ok(())
    }

    /// A value completed; `after` is just past its last byte in this chunk.
    fn end_value(&mut self, chunk: &[u8], after: usize) {
        if let Some(raw) = self.raw {
            if raw.depth == self.stack.len() {
                self.flush_raw(chunk, after);
                let raw = self.raw.take().expect("checked");
                match raw.to {
                    RawTo::Hash => {
                        self.hasher.feed_len(raw.len);
                        self.hasher.end_segment();
                    }
                    RawTo::Deferred => self.message.deferred_end(),
                    RawTo::Tools | RawTo::Emit | RawTo::PartBuffer | RawTo::System => {}
                }
            }
        }
        self.lex = if self.stack.is_empty() {
            Lex::Done
        } else {
            Lex::AfterValue
        };
    }

    /// Decoded string bytes.
    #[inline(always)] // per string run: parse_hash measured 10-20% faster than #[inline]
    #[allow(clippy::inline_always)]
    fn str_bytes(&mut self, bytes: &[u8]) {
        match self.str_to {
            StrTo::Discard => {}
            StrTo::Hash => {
                self.hasher.feed(bytes);
                self.field_len += bytes.len() as u64;
            }
            StrTo::Emit => {
                self.emit(bytes);
                self.field_len += bytes.len() as u64;
            }
            StrTo::Key => {
                let end = self.key_len + bytes.len();
                if end <= self.key_buf.len() {
                    self.key_buf[self.key_len..end].copy_from_slice(bytes);
                    self.key_len = end;
                } else {
                    self.key_len = self.key_buf.len() + 1;
                }
            }
            StrTo::Model => self.model.extend_from_slice(bytes),
            StrTo::Deferred => self.message.deferred.extend_from_slice(bytes),
            StrTo::TypeName => {
                let end = self.part.type_len + bytes.len();
                if end <= TYPE_NAME_MAX {
                    self.part.type_name[self.part.type_len..end].copy_from_slice(bytes);
                    self.part.type_len = end;
                } else {
                    self.part.type_len = TYPE_NAME_MAX + 1;
                }
            }
            StrTo::Text => self.part.text.extend_from_slice(bytes),
            StrTo::Capture => {
                if self.capture.len() + bytes.len() <= MAX_AFFINITY_BYTES {
                    self.capture.extend_from_slice(bytes);
                } else {
                    self.capture_too_long = true;
                }
            }
            StrTo::System => self.context.system_bytes(bytes),
        }
    }

    fn str_char(&mut self, c: char) {
        let mut tmp = [0u8; 4];
        self.str_bytes(c.encode_utf8(&mut tmp).as_bytes());
    }

    /// One hex digit of a `\uXXXX` escape (`pos` is just past it).
    fn hex_digit(&mut self, b: u8, pos: usize, n: u8, acc: u16, second: bool) -> PResult<()> {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(self.json_err(pos, "bad hex digit in \\u escape")),
        };
        let acc = (acc << 4) | u16::from(digit);
        if n < 3 {
            self.lex = Lex::Hex {
                n: n + 1,
                acc,
                second,
            };
        } else if second && (0xDC00..0xE000).contains(&acc) {
            let code =
                0x10000 + ((u32::from(self.high) - 0xD800) << 10) + (u32::from(acc) - 0xDC00);
            self.str_char(char::from_u32(code).unwrap_or('\u{FFFD}'));
            self.lex = Lex::Str;
        } else {
            if second {
                // A high surrogate not followed by a low one: it stands alone, and this escape
                // is read afresh.
                self.str_char('\u{FFFD}');
            }
            self.code_unit(acc);
        }
        Ok(())
    }

    /// A `\uXXXX` code unit (not the low half of a pair).
    fn code_unit(&mut self, unit: u16) {
        if (0xD800..0xDC00).contains(&unit) {
            self.high = unit;
            self.lex = Lex::AfterHigh;
        } else {
            // A lone low surrogate becomes U+FFFD.
            let c = char::from_u32(u32::from(unit)).unwrap_or('\u{FFFD}');
            self.str_char(c);
            self.lex = Lex::Str;
        }
    }

    /// The byte after a backslash (`pos` is just past it).
    fn escape(&mut self, b: u8, pos: usize) -> PResult<()> {
        if b == b'u' {
            self.lex = Lex::Hex {
                n: 0,
                acc: 0,
                second: false,
            };
            return Ok(());
        }
        let decoded = short_escape(b).ok_or_else(|| self.json_err(pos - 1, "invalid escape"))?;
        self.str_bytes(&[decoded]);
        self.lex = Lex::Str;
        Ok(())
    }

    /// A string's closing quote; `after` is just past it.
    fn end_string(&mut self, chunk: &[u8], after: usize) {
        if self.in_key {
            self.in_key = false;
            self.key = if self.str_to == StrTo::Key && self.key_len <= self.key_buf.len() {
                Key::from_bytes(&self.key_buf[..self.key_len])
            } else {
                Key::Other
            };
            self.lex = Lex::Colon;
            return;
        }
        match self.slot {
            Slot::Role => {
                self.hasher.feed_len(self.field_len);
                // Content that came before the role follows it.
                if !self.message.pending.is_empty() {
                    self.hasher.feed(&self.message.pending);
                    recycle(&mut self.message.pending);
                }
            }
            Slot::Content => self.emit_len(self.field_len),
            Slot::Prompt | Slot::PromptItem | Slot::Input => {
                self.hasher.feed_len(self.field_len);
                self.hasher.end_segment();
                if self.slot == Slot::Prompt {
                    self.hasher.set_muted(false);
                }
            }
            Slot::Name | Slot::ToolCallId => self.message.deferred_end(),
            Slot::PartType => {
                let is_text = &self.part.type_name[..self.part.type_len.min(TYPE_NAME_MAX)]
                    == b"text"
                    && self.part.type_len == 4;
                self.part.type_is_text = is_text;
                if self.part.mode == PartMode::Undecided {
                    if !is_text {
                        self.decide_raw(chunk, after);
                    } else if self.part.text_ready {
                        self.decide_text_buffered();
                    }
                }
            }
            Slot::PartText => match self.str_to {
                StrTo::Emit => self.emit_len(self.field_len),
                StrTo::Text => self.part.text_ready = true,
                _ => {}
            },
            Slot::Affinity => {
                let value = (!self.capture_too_long)
                    .then(|| into_string(std::mem::take(&mut self.capture)));
                *self.affinity.slot(self.capture_field) = value;
            }
            _ => {}
        }
        self.end_value(chunk, after);
    }

    fn literal_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.literal_len < self.literal.len() {
            let keep = bytes.len().min(self.literal.len() - self.literal_len);
            self.literal[self.literal_len..self.literal_len + keep].copy_from_slice(&bytes[..keep]);
        }
        self.literal_len += bytes.len();
        if self.slot == Slot::PromptItem {
            self.hasher.feed(bytes);
            self.prompt.token_bytes += bytes.len() as u64;
        }
    }

    /// A number or literal ended just before `pos`.
    fn end_literal(&mut self, chunk: &[u8], pos: usize) -> PResult<()> {
        let first = self.literal[0];
        let word = &self.literal[..self.literal_len.min(self.literal.len())];
        let value = if first == b'-' || first.is_ascii_digit() {
            None
        } else if self.literal_len <= self.literal.len()
            && matches!(word, b"true" | b"false" | b"null")
        {
            Some(word[0])
        } else {
            return Err(self.json_err(pos, "invalid literal"));
        };
        match self.slot {
            Slot::Stream => match value {
                Some(b't') => self.stream = true,
                Some(b'f') => self.stream = false,
                _ => {}
            },
            // `null` is the default.
            Slot::Store => self.store = value != Some(b'f'),
            _ => {}
        }
        self.end_value(chunk, pos);
        Ok(())
    }
}

#[cfg(test)]
mod shape_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(body: &str) -> Vec<u64> {
        parse_request(body.as_bytes()).unwrap().prefix_hashes
    }

    fn chunked(body: &[u8], sizes: &[usize], limits: Limits) -> PResult<ParsedRequest> {
        chunked_for(RequestKind::Chat, body, sizes, limits)
    }

    /// `body` fed to a parser of `kind` in pieces of `sizes` (cycled).
    pub(super) fn chunked_for(
        kind: RequestKind,
        body: &[u8],
        sizes: &[usize],
        limits: Limits,
    ) -> PResult<ParsedRequest> {
        let mut p = RequestParser::for_kind(kind, limits);
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            p.feed(&rest[..n]).unwrap();
            rest = &rest[n..];
            i += 1;
        }
        p.finish()
    }

    /// Every split into two pieces, and 1-byte pieces, give the one-shot result.
    fn assert_split_invariant(body: &str) {
        let _ = assert_split_invariant_for(RequestKind::Chat, body);
    }

    /// The same for a parser of `kind`; returns the one-shot result.
    pub(super) fn assert_split_invariant_for(
        kind: RequestKind,
        body: &str,
    ) -> PResult<ParsedRequest> {
        let whole = parse_request_for(kind, body.as_bytes(), Limits::default());
        let bytes = body.as_bytes();
        for cut in 0..=bytes.len() {
            let mut p = RequestParser::for_kind(kind, Limits::default());
            p.feed(&bytes[..cut]).unwrap();
            p.feed(&bytes[cut..]).unwrap();
            assert_eq!(p.finish(), whole, "cut at {cut} of {body}");
        }
        assert_eq!(
            chunked_for(kind, bytes, &[1], Limits::default()),
            whole,
            "{body}"
        );
        whole
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
            assert_split_invariant(body);
        }
        assert_eq!(
            parse_request(br#"{"prompt": [1, "a"]}"#),
            Err(wrong("prompt", "token ids or strings, not both"))
        );
        assert_ne!(
            hashes(r#"{"prompt": [1, 2, 3]}"#),
            hashes(r#"{"prompt": [1, 23]}"#)
        );
        assert_eq!(
            hashes(r#"{"prompt": [1,2,3]}"#),
            hashes(r#"{"prompt": [ 1 , 2 , 3 ]}"#),
            "flat token ids are separated canonically"
        );
    }

    #[test]
    fn canonical_serialisation_is_as_documented() {
        // role, content, then the deferred fields by tag: tool_call_id, name, tool_calls.
        let mut h = PrefixHasher::new(DEFAULT_BLOCK_SIZE, usize::MAX);
        h.field(b'r', b"tool");
        h.field(b'c', b"42");
        h.field(b'i', b"call_1");
        h.field(b'n', b"calc");
        h.field(b'x', br#"[{"id": 1}]"#);
        h.end_segment();
        h.field(b'r', b"user");
        h.field(b'c', b"a\"b");
        h.field(b'p', br#"{"type":"image_url","image_url":{"url":"x"}}"#);
        h.end_segment();
        let mut ctx = ContextHasher::default();
        ctx.begin_tools();
        ctx.tools_bytes(br#"[{"type": "function"}]"#);
        let expected = h.finish(ctx.ctx(b"m"));
        let body = r#"{"tools": [{"type": "function"}], "messages": [
            {"tool_calls": [{"id": 1}], "name": "calc", "content": "42", "tool_call_id": "call_1", "role": "tool"},
            {"role": "user", "content": [{"type": "text", "text": "a\"b"}, {"type":"image_url","image_url":{"url":"x"}}]}
        ], "model": "m"}"#;
        assert_eq!(hashes(body), expected);
        assert_split_invariant(body);
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
        let a = hashes(r#"{"model":"m","messages":[{"role":"user","content":"é/😀\ufffd"}]}"#);
        let b = hashes(
            r#"{"model":"m","messages":[{"role":"user","content":"\u00e9\/\ud83d\ude00\ud800"}]}"#,
        );
        assert_eq!(a, b);
        assert_split_invariant(
            r#"{"messages":[{"role":"user","content":"\u00e9\/\ud83d\ude00\ud800\n\ud800\u0041\udc00x\ud83d"}]}"#,
        );
    }

    #[test]
    fn surrogates_decode_as_before() {
        // A high surrogate followed by a non-low escape: U+FFFD, then that escape read afresh.
        let a = hashes(r#"{"prompt":"\ud800\u0041\udc00\ud83d\ude00"}"#);
        let b = hashes(r#"{"prompt":"\ufffdA\ufffd😀"}"#);
        assert_eq!(a, b);
        let c = hashes(r#"{"prompt":"\ud800\n"}"#);
        let d = hashes(r#"{"prompt":"\ufffd\n"}"#);
        assert_eq!(c, d);
    }

    #[test]
    fn model_and_tools_separate_keys() {
        let a = hashes(r#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#);
        let b = hashes(r#"{"model":"b","messages":[{"role":"user","content":"hi"}]}"#);
        let t = hashes(
            r#"{"model":"a","tools":[{"type":"function"}],"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let t_after = hashes(
            r#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}],"model":"a"}"#,
        );
        assert_ne!(a, b);
        assert_ne!(a, t);
        assert_eq!(a.len(), t.len(), "tools occupy no leading block");
        assert_eq!(t, t_after, "key order does not matter");
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        assert_eq!(parse_request(b"\xff\xfe"), Err(ParseError::NotUtf8));
        assert_eq!(parse_request(b"[1]"), Err(ParseError::NotAnObject));
        assert_eq!(parse_request(b"hello"), Err(ParseError::NotAnObject));
        assert_eq!(parse_request(b"  "), Err(ParseError::NotAnObject));
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
            Err(wrong("messages", "an array"))
        );
        assert_eq!(
            parse_request(br#"{"messages":[{"content":"hi"}]}"#),
            Err(wrong("messages[].role", "present"))
        );
        assert_eq!(
            parse_request(br#"{"model":5,"prompt":"x"}"#),
            Err(wrong("model", "a string"))
        );
        assert!(matches!(
            parse_request(br#"{"prompt":"x"} x"#),
            Err(ParseError::Json(_))
        ));
        // Invalid UTF-8 wins over a JSON error earlier in the body, whatever the chunking.
        let body = b"{\"prompt\": x \xff}";
        assert_eq!(parse_request(body), Err(ParseError::NotUtf8));
        assert_eq!(
            chunked(body, &[3], Limits::default()),
            Err(ParseError::NotUtf8)
        );
        for bad in [
            &br#"{"prompt":"a\x"}"#[..],
            br#"{"other":"a\x"}"#,
            br#"{"prompt":"\u12g4"}"#,
            br#"{"x":[1,]}"#,
            br#"{"prompt":"x",}"#,
            br#"{"prompt":"x" "y"}"#,
            br#"{"stream":tru,"prompt":"x"}"#,
            br#"{"x":nul,"prompt":"x"}"#,
            b"{\"prompt\":\"x\"",
            b"{\"prompt\":\"x",
        ] {
            assert!(
                matches!(parse_request(bad), Err(ParseError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn wrong_types() {
        for (body, field) in [
            (r#"{"stream":"yes","prompt":"x"}"#, "stream"),
            (r#"{"prompt":{}}"#, "prompt"),
            (r#"{"prompt":[true]}"#, "prompt[]"),
            (r#"{"messages":[1]}"#, "messages[]"),
            (r#"{"messages":[{"role":1}]}"#, "messages[].role"),
            (
                r#"{"messages":[{"role":"u","content":5}]}"#,
                "messages[].content",
            ),
            (
                r#"{"messages":[{"role":"u","content":[5]}]}"#,
                "messages[].content[]",
            ),
        ] {
            assert!(
                matches!(parse_request(body.as_bytes()), Err(ParseError::WrongType { field: f, .. }) if f == field),
                "{body}: {:?}",
                parse_request(body.as_bytes())
            );
        }
    }

    #[test]
    fn duplicate_role_content_type_text_are_errors() {
        for (body, field) in [
            (
                r#"{"messages":[{"role":"u","role":"v"}]}"#,
                "messages[].role",
            ),
            (
                r#"{"messages":[{"role":"u","content":"a","content":null}]}"#,
                "messages[].content",
            ),
            (
                r#"{"messages":[{"role":"u","content":[{"type":"x","type":"text"}]}]}"#,
                "messages[].content[].type",
            ),
            (
                r#"{"messages":[{"role":"u","content":[{"text":"a","type":"text","text":"b"}]}]}"#,
                "messages[].content[].text",
            ),
        ] {
            assert_eq!(
                parse_request(body.as_bytes()),
                Err(duplicate(field)),
                "{body}"
            );
        }
        // Other repeated keys: the last top-level value wins; name & co. all count, in order.
        assert_eq!(
            parse_request(br#"{"model":"a","model":"b","prompt":"x"}"#)
                .unwrap()
                .model,
            "b"
        );
        assert_eq!(
            hashes(r#"{"prompt":"x","prompt":"y"}"#),
            hashes(r#"{"prompt":"y"}"#)
        );
        assert_ne!(
            hashes(r#"{"messages":[{"role":"u","name":"a","name":"b"}]}"#),
            hashes(r#"{"messages":[{"role":"u","name":"b"}]}"#)
        );
    }

    #[test]
    fn messages_take_precedence_over_prompt() {
        let chat = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let a = parse_request(chat.as_bytes()).unwrap();
        for body in [
            r#"{"prompt":"p","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"prompt":"p"}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"prompt":["p",[1]]}"#,
            r#"{"messages":[{"role":"x"}],"prompt":[1],"messages":[{"role":"user","content":"hi"}]}"#,
        ] {
            assert_eq!(parse_request(body.as_bytes()), Ok(a.clone()), "{body}");
            assert_split_invariant(body);
        }
        assert_eq!(
            parse_request(br#"{"messages":[],"prompt":[1,"a"]}"#),
            Err(wrong("prompt", "token ids or strings, not both")),
            "a prompt after messages is still checked"
        );
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

    /// The buffering cases: each unusual key order gives the same keys as the usual one.
    #[test]
    fn unusual_key_orders_hash_like_usual_ones() {
        let cases = [
            // content before role
            (
                r#"{"messages":[{"role":"user","content":"hello there"}]}"#,
                r#"{"messages":[{"content":"hello there","role":"user"}]}"#,
            ),
            // content parts before role
            (
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}]}]}"#,
                r#"{"messages":[{"content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}],"role":"user"}]}"#,
            ),
            // tool_call_id before content (the real order), name and tool_calls anywhere
            (
                r#"{"messages":[{"role":"tool","content":"42","tool_call_id":"c1"}]}"#,
                r#"{"messages":[{"role":"tool","tool_call_id":"c1","content":"42"}]}"#,
            ),
            (
                r#"{"messages":[{"role":"assistant","content":"x","name":"n","tool_calls":[{"id":1}]}]}"#,
                r#"{"messages":[{"tool_calls":[{"id":1}],"name":"n","content":"x","role":"assistant"}]}"#,
            ),
            // text before type
            (
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
                r#"{"messages":[{"role":"user","content":[{"text":"hi","type":"text"}]}]}"#,
            ),
            // text before type, with other keys around
            (
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                r#"{"messages":[{"role":"user","content":[{"cache":{"a":[1]},"text":"hi","x":1,"type":"text","y":2}]}]}"#,
            ),
        ];
        for (usual, unusual) in cases {
            assert_eq!(hashes(usual), hashes(unusual), "{unusual}");
            assert_split_invariant(unusual);
        }
        // A non-text part hashes as its raw JSON, whether its type comes first or last.
        let first = r#"{"type":"image_url","image_url":{"url":"u"}}"#;
        let last = r#"{"image_url":{"url":"u"},"type":"image_url"}"#;
        for part in [first, last] {
            let mut h = PrefixHasher::new(DEFAULT_BLOCK_SIZE, usize::MAX);
            h.field(b'r', b"user");
            h.field(b'p', part.as_bytes());
            h.end_segment();
            let expected = h.finish(ContextHasher::default().ctx(b""));
            let body = format!(r#"{{"messages":[{{"role":"user","content":[{part}]}}]}}"#);
            assert_eq!(hashes(&body), expected, "{part}");
            assert_split_invariant(&body);
        }
        // A "text" type with no string text, and a text with a non-text type, are raw parts.
        for part in [
            r#"{"type":"text"}"#,
            r#"{"type":"text","text":5}"#,
            r#"{"text":"hi","type":"texts"}"#,
            r#"{"text":"hi"}"#,
            r#"{"type":7,"text":"hi"}"#,
        ] {
            let mut h = PrefixHasher::new(DEFAULT_BLOCK_SIZE, usize::MAX);
            h.field(b'r', b"u");
            h.field(b'p', part.as_bytes());
            h.end_segment();
            let expected = h.finish(ContextHasher::default().ctx(b""));
            let body = format!(r#"{{"messages":[{{"role":"u","content":[{part}]}}]}}"#);
            assert_eq!(hashes(&body), expected, "{part}");
        }
    }

    #[test]
    fn buffers_are_bounded_by_the_field_that_needs_them() {
        // Content before role: the content is held until the role comes, then released.
        let long = "z".repeat(100_000);
        let body = format!(r#"{{"messages":[{{"content":"{long}","role":"user"}}"#);
        let mut p = RequestParser::new(Limits::default());
        p.feed(body.as_bytes()).unwrap();
        assert!(p.retained_bytes() < 8 * 1024, "{}", p.retained_bytes());
        let mut p = RequestParser::new(Limits::default());
        p.feed(format!(r#"{{"messages":[{{"content":"{long}""#).as_bytes())
            .unwrap();
        assert!(p.retained_bytes() >= 100_000);
        // The usual order holds nothing.
        let mut p = RequestParser::new(Limits::default());
        p.feed(format!(r#"{{"messages":[{{"role":"user","content":"{long}""#).as_bytes())
            .unwrap();
        assert!(p.retained_bytes() < 8 * 1024, "{}", p.retained_bytes());
        // A non-text part with its type first streams; with its type last it is buffered.
        let mut p = RequestParser::new(Limits::default());
        p.feed(
            format!(r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{long}"#)
                .as_bytes(),
        )
        .unwrap();
        assert!(p.retained_bytes() < 8 * 1024, "{}", p.retained_bytes());
        let mut p = RequestParser::new(Limits::default());
        p.feed(
            format!(r#"{{"messages":[{{"role":"user","content":[{{"image_url":{{"url":"{long}"#)
                .as_bytes(),
        )
        .unwrap();
        assert!(p.retained_bytes() >= 100_000);
    }

    #[test]
    fn depth_is_bounded() {
        let deep = format!(r#"{{"x":{}"#, "[".repeat(10_000));
        let err = parse_request(deep.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, ParseError::Json(e) if e.message == "nesting too deep"),
            "{err:?}"
        );
        let mut p = RequestParser::new(Limits::default());
        p.feed(br#"{"x":"#).unwrap();
        for _ in 0..10_000 {
            p.feed(b"[").unwrap();
            assert!(p.retained_bytes() < 1024);
        }
        assert!(p.finish().is_err());
    }

    #[test]
    fn level_ends_say_how_much_of_the_prompt_each_level_covers() {
        let long = "y".repeat(1500);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"short"}},{{"role":"assistant","content":"{long}"}}]}}"#
        );
        let r = parse_request(body.as_bytes()).unwrap();
        // One level for the short message, then 512-byte blocks of the long one.
        assert_eq!(r.level_ends.len(), r.prefix_hashes.len());
        assert!(r.prefix_hashes.len() >= 4, "{r:?}");
        assert!(
            r.level_ends[0] < 32,
            "a short message is a short level: {:?}",
            r.level_ends
        );
        assert!(r.level_ends.windows(2).all(|w| w[0] < w[1]));
        assert!(r.level_ends[1] - r.level_ends[0] <= 512);
        assert_eq!(
            *r.level_ends.last().unwrap(),
            r.prompt_bytes - r.context_bytes
        );
    }

    #[test]
    fn the_cap_bounds_levels() {
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}},{{"role":"user","content":"b"}}],"model":"m","stream":true}}"#,
            "a".repeat(20_000)
        );
        let full = parse_request(body.as_bytes()).unwrap();
        assert!(full.prefix_hashes.len() > 30);
        for cap in [0, 1, 10, full.prefix_hashes.len()] {
            let limits = Limits {
                max_blocks: cap,
                ..Limits::default()
            };
            let capped = parse_request_with(body.as_bytes(), limits).unwrap();
            assert_eq!(capped.prefix_hashes, full.prefix_hashes[..cap]);
            assert_eq!((capped.model.as_str(), capped.stream), ("m", true));
        }
        // Past the cap the body is still checked.
        let broken = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}],"x":tru}}"#,
            "a".repeat(5000)
        );
        let limits = Limits {
            max_blocks: 1,
            ..Limits::default()
        };
        assert!(matches!(
            parse_request_with(broken.as_bytes(), limits),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn too_large_kills_the_parser() {
        let limits = Limits {
            max_bytes: 10,
            ..Limits::default()
        };
        let mut p = RequestParser::new(limits);
        p.feed(br#"{"prompt""#).unwrap();
        assert_eq!(p.feed(b":\"xx\"}"), Err(TooLarge));
        assert_eq!(p.feed(b""), Err(TooLarge));
        assert_eq!(p.finish(), Err(ParseError::TooLarge { max_bytes: 10 }));
        let exact = RequestParser::new(Limits {
            max_bytes: 14,
            ..Limits::default()
        });
        let mut exact = exact;
        exact.feed(br#"{"prompt":"x"}"#).unwrap();
        assert!(exact.finish().is_ok());
    }

    #[test]
    fn utf8_split_anywhere() {
        let body = r#"{"messages":[{"role":"user","content":"naïve café 😀 日本語"}],"model":"é"}"#;
        assert_split_invariant(body);
        // An incomplete sequence at the very end is invalid.
        let mut p = RequestParser::new(Limits::default());
        p.feed(br#"{"prompt":"x"}"#).unwrap();
        p.feed(b"\xe6\x97").unwrap();
        assert_eq!(p.finish(), Err(ParseError::NotUtf8));
        // A bad continuation across a chunk boundary.
        let mut p = RequestParser::new(Limits::default());
        p.feed(b"{\"prompt\":\"\xe6").unwrap();
        p.feed(b"A\"}").unwrap();
        assert_eq!(p.finish(), Err(ParseError::NotUtf8));
    }

    /// A ~50 MB body fed in 64 KiB chunks: memory held stays small.
    #[test]
    fn retained_memory_is_bounded_for_a_huge_body() {
        const CHUNK: usize = 64 * 1024;
        let limits = Limits {
            max_blocks: 2048,
            ..Limits::default()
        };
        let mut p = RequestParser::new(limits);
        let mut max_retained = 0;
        let mut total = 0;
        let mut feed = |p: &mut RequestParser, bytes: &[u8]| {
            for piece in bytes.chunks(CHUNK) {
                p.feed(piece).unwrap();
                max_retained = max_retained.max(p.retained_bytes());
            }
        };
        feed(
            &mut p,
            br#"{"model":"m","messages":[{"role":"system","content":"#,
        );
        // One 25 MB message with escapes and non-ASCII text, then 25 MB of 1 KB messages.
        let text = "Some text with \\\"quotes\\\", caf\u{e9} \\u00e9 and \\n newlines. ".repeat(16);
        let mut body = Vec::with_capacity(CHUNK * 2);
        body.push(b'"');
        while total < 25 << 20 {
            body.extend_from_slice(text.as_bytes());
            if body.len() >= CHUNK {
                total += body.len();
                feed(&mut p, &body);
                body.clear();
            }
        }
        body.extend_from_slice(b"\"}");
        let message = r#",{"role":"user","content":"A short message, caf\u00e9 \"quoted\"."}"#;
        while total < 50 << 20 {
            body.extend_from_slice(message.as_bytes());
            if body.len() >= CHUNK {
                total += body.len();
                feed(&mut p, &body);
                body.clear();
            }
        }
        body.extend_from_slice(br#"],"stream":true}"#);
        feed(&mut p, &body);
        let retained_at_end = p.retained_bytes();
        assert!(p.bytes_fed() > 50 << 20);
        let r = p.finish().unwrap();
        assert_eq!(r.prefix_hashes.len(), 2048);
        assert!(r.stream);
        println!("retained bytes: max {max_retained}, at the end {retained_at_end}");
        assert!(max_retained < 64 * 1024, "{max_retained}");
    }

    /// Generated bodies: any split into chunks gives the one-shot result, and the key order and
    /// whitespace of the parsed structure (top level, messages, text parts) do not matter.
    mod props {
        use proptest::prelude::*;

        use super::super::*;
        use super::chunked;

        /// A JSON value whose object keys are shuffled when rendered; `Raw` is verbatim (the
        /// values that hash as raw JSON).
        #[derive(Debug, Clone)]
        enum J {
            Raw(String),
            Obj(Vec<(&'static str, J)>),
            Arr(Vec<J>),
        }

        fn next(rng: &mut u64) -> u64 {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        }

        fn render(j: &J, rng: &mut u64, spaced: bool, out: &mut String) {
            let sep = |rng: &mut u64, out: &mut String| {
                if spaced {
                    out.push_str([" ", "\n  ", "", "\t"][(next(rng) % 4) as usize]);
                }
            };
            match j {
                J::Raw(s) => out.push_str(s),
                J::Obj(fields) => {
                    let mut order: Vec<usize> = (0..fields.len()).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, (next(rng) % (i as u64 + 1)) as usize);
                    }
                    out.push('{');
                    for (n, &i) in order.iter().enumerate() {
                        if n > 0 {
                            out.push(',');
                        }
                        sep(rng, out);
                        out.push('"');
                        out.push_str(fields[i].0);
                        out.push('"');
                        sep(rng, out);
                        out.push(':');
                        sep(rng, out);
                        render(&fields[i].1, rng, spaced, out);
                    }
                    sep(rng, out);
                    out.push('}');
                }
                J::Arr(items) => {
                    out.push('[');
                    for (n, item) in items.iter().enumerate() {
                        if n > 0 {
                            out.push(',');
                        }
                        sep(rng, out);
                        render(item, rng, spaced, out);
                    }
                    sep(rng, out);
                    out.push(']');
                }
            }
        }

        fn raw(j: &J) -> J {
            let mut s = String::new();
            render(j, &mut 0x9E37_79B9_7F4A_7C15, false, &mut s);
            J::Raw(s)
        }

        /// JSON string contents (escaped): words, every kind of escape, non-ASCII text.
        fn text() -> impl Strategy<Value = String> {
            let piece = prop::sample::select(vec![
                "hello",
                " ",
                "world",
                "the quick brown fox",
                "\\\"",
                "\\\\",
                "\\n",
                "\\t",
                "\\/",
                "\\u00e9",
                "\\u0041",
                "\\ud83d\\ude00",
                "\\ud800",
                "\\udc00x",
                "é",
                "😀",
                "日本語",
                "naïve",
                "0123456789",
            ]);
            prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
        }

        fn string() -> impl Strategy<Value = J> {
            text().prop_map(|t| J::Raw(format!("\"{t}\"")))
        }

        fn number() -> impl Strategy<Value = J> {
            (0u32..200_000, any::<bool>())
                .prop_map(|(n, neg)| J::Raw(if neg { format!("-{n}") } else { n.to_string() }))
        }

        fn part() -> impl Strategy<Value = J> {
            prop_oneof![
                string()
                    .prop_map(|t| J::Obj(vec![("type", J::Raw("\"text\"".into())), ("text", t)])),
                (string(), string()).prop_map(|(t, e)| J::Obj(vec![
                    ("type", J::Raw("\"text\"".into())),
                    ("text", t),
                    ("cache_control", raw(&J::Obj(vec![("type", e)]))),
                ])),
                // A non-text part hashes as its raw JSON: its key order is fixed once.
                (string(), any::<u64>()).prop_map(|(url, seed)| {
                    let part = J::Obj(vec![
                        ("type", J::Raw("\"image_url\"".into())),
                        (
                            "image_url",
                            J::Obj(vec![("url", url), ("detail", J::Raw("\"low\"".into()))]),
                        ),
                    ]);
                    let mut s = String::new();
                    render(&part, &mut (seed | 1), false, &mut s);
                    J::Raw(s)
                }),
            ]
        }

        fn content() -> impl Strategy<Value = J> {
            prop_oneof![
                string(),
                Just(J::Raw("null".into())),
                prop::collection::vec(part(), 0..4).prop_map(J::Arr),
            ]
        }

        fn tool_calls() -> impl Strategy<Value = J> {
            prop::collection::vec((string(), string()), 1..3).prop_map(|calls| {
                raw(&J::Arr(
                    calls
                        .into_iter()
                        .map(|(id, args)| {
                            J::Obj(vec![
                                ("id", id),
                                ("type", J::Raw("\"function\"".into())),
                                ("function", J::Obj(vec![("arguments", args)])),
                            ])
                        })
                        .collect(),
                ))
            })
        }

        fn message() -> impl Strategy<Value = J> {
            (
                prop::sample::select(vec!["system", "user", "assistant", "tool"]),
                prop::option::of(content()),
                prop::option::of(string()),
                prop::option::of(string()),
                prop::option::of(tool_calls()),
            )
                .prop_map(|(role, content, name, call_id, calls)| {
                    let mut fields = vec![("role", J::Raw(format!("\"{role}\"")))];
                    fields.extend(content.map(|c| ("content", c)));
                    fields.extend(name.map(|n| ("name", n)));
                    fields.extend(call_id.map(|i| ("tool_call_id", i)));
                    fields.extend(calls.map(|c| ("tool_calls", c)));
                    J::Obj(fields)
                })
        }

        fn prompt() -> impl Strategy<Value = J> {
            prop_oneof![
                string(),
                prop::collection::vec(string(), 0..4).prop_map(J::Arr),
                prop::collection::vec(number(), 1..8).prop_map(J::Arr),
                prop::collection::vec(prop::collection::vec(number(), 0..5), 1..3)
                    .prop_map(|lists| J::Arr(lists.into_iter().map(|l| raw(&J::Arr(l))).collect())),
            ]
        }

        fn body() -> impl Strategy<Value = J> {
            let common = (
                string(),
                prop::option::of(any::<bool>()),
                prop::option::of(tool_calls()),
                prop::option::of(number()),
            );
            let chat = prop::collection::vec(message(), 1..5).prop_map(J::Arr);
            (
                common,
                prop_oneof![
                    chat.prop_map(|m| ("messages", m)),
                    prompt().prop_map(|p| ("prompt", p))
                ],
            )
                .prop_map(|((model, stream, tools, max_tokens), prompt)| {
                    let mut fields = vec![("model", model), prompt];
                    fields.extend(stream.map(|s| ("stream", J::Raw(s.to_string()))));
                    fields.extend(tools.map(|t| ("tools", t)));
                    fields.extend(max_tokens.map(|n| ("max_tokens", n)));
                    J::Obj(fields)
                })
        }

        proptest! {
            #[test]
            fn any_split_gives_the_one_shot_result(
                body in body(),
                seeds in (1u64.., 1u64..),
                sizes in prop::collection::vec(1usize..300, 1..12),
                block_size in prop::sample::select(vec![7usize, 64, 512]),
                max_blocks in prop::sample::select(vec![3usize, usize::MAX]),
            ) {
                let limits = Limits { max_blocks, block_size, ..Limits::default() };
                let (mut a, mut b) = (String::new(), String::new());
                render(&body, &mut seeds.0.clone(), false, &mut a);
                render(&body, &mut seeds.1.clone(), true, &mut b);
                let one_shot = parse_request_with(a.as_bytes(), limits);
                prop_assert!(one_shot.is_ok(), "{a}: {one_shot:?}");
                prop_assert_eq!(&chunked(a.as_bytes(), &sizes, limits), &one_shot, "{}", a);
                prop_assert_eq!(&chunked(a.as_bytes(), &[1], limits), &one_shot, "{}", a);
                // Another key order and whitespace: the same request.
                prop_assert_eq!(&parse_request_with(b.as_bytes(), limits), &one_shot, "{}\n{}", a, b);
                prop_assert_eq!(&chunked(b.as_bytes(), &sizes, limits), &one_shot, "{}", b);
            }
        }
    }
}
