//! The request shapes other than chat / completions, the affinity fields, the path table, and
//! pinned chat / completions keys (shared state in Redis depends on them).

use super::tests::{assert_split_invariant_for, chunked_for};
use super::*;

use RequestKind::{Chat, Completion, Embeddings, Messages, Other, Rerank, Responses, Score};

fn parse_as(kind: RequestKind, body: &str) -> PResult<ParsedRequest> {
    parse_request_for(kind, body.as_bytes(), Limits::default())
}

fn ok_as(kind: RequestKind, body: &str) -> ParsedRequest {
    parse_as(kind, body).unwrap_or_else(|e| panic!("{body}: {e}"))
}

fn hashes_as(kind: RequestKind, body: &str) -> Vec<u64> {
    ok_as(kind, body).prefix_hashes
}

/// Keys of `segments` (each a list of `(tag, bytes)` fields) under `ctx`, block size `block`.
fn expected(
    block: usize,
    segments: &[&[(u8, &[u8])]],
    ctx: &ContextHasher,
    model: &str,
) -> Vec<u64> {
    let mut h = PrefixHasher::new(block, usize::MAX);
    for segment in segments {
        for &(tag, bytes) in *segment {
            h.field(tag, bytes);
        }
        h.end_segment();
    }
    h.finish(ctx.ctx(model.as_bytes()))
}

fn system_context(system: &[u8]) -> ContextHasher {
    let mut ctx = ContextHasher::default();
    ctx.begin_system();
    ctx.system_bytes(system);
    ctx
}

#[test]
fn kinds_from_paths_and_names() {
    for (path, kind) in [
        ("/v1/chat/completions", Chat),
        ("/v1/chat/completions/", Chat),
        ("/v1/chat/completions?x=1", Chat),
        ("/v1/chat/completions/?x=1/2", Chat),
        ("/v1/completions", Completion),
        ("/v1/responses", Responses),
        ("/v1/responses?stream=true", Responses),
        ("/v1/messages", Messages),
        ("/v1/embeddings", Embeddings),
        ("/v1/rerank", Rerank),
        ("/rerank", Rerank),
        ("/v2/rerank/", Rerank),
        ("/v1/score", Score),
        ("/score", Score),
        ("/v1/responses/resp_1", Other),
        ("/v1/models", Other),
        ("/v1/chat/completions//", Other),
        ("/V1/chat/completions", Other),
        ("v1/chat/completions", Other),
        ("", Other),
        ("/", Other),
        ("?/v1/completions", Other),
    ] {
        assert_eq!(RequestKind::from_path(path), kind, "{path}");
    }
    for kind in RequestKind::ALL {
        assert_eq!(RequestKind::from_name(kind.as_str()), Some(kind));
    }
    assert_eq!(RequestKind::from_name("Chat"), None);
    assert_eq!(RequestKind::from_name(""), None);
}

#[test]
fn stored_response_ids() {
    for (path, id) in [
        ("/v1/responses/resp_1", Some("resp_1")),
        ("/v1/responses/resp_1/", Some("resp_1")),
        ("/v1/responses/resp_1/input_items", Some("resp_1")),
        ("/v1/responses/resp_1/cancel?x=/y", Some("resp_1")),
        ("/v1/responses/resp_1?include=a/b", Some("resp_1")),
        ("/v1/responses", None),
        ("/v1/responses/", None),
        ("/v1/responses//x", None),
        ("/v1/responses?x=/v1/responses/a", None),
        ("/v1/responsesx/a", None),
        ("/v2/responses/a", None),
        ("/v1/chat/completions", None),
    ] {
        assert_eq!(stored_response_id(path), id, "{path}");
    }
}

/// Chat / completions keys as computed before the other shapes existed (values from the parser
/// of that time): they must never change.
#[test]
fn chat_and_completion_keys_are_pinned() {
    let limits = Limits {
        block_size: 16,
        ..Limits::default()
    };
    for (body, last, levels, prompt_bytes) in [
        (
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi \u00e9"},{"type":"image_url","image_url":{"url":"x"}}],"name":"n"}],"tools":[{"type":"function"}],"stream":true}"#,
            12_297_026_588_428_351_852,
            7,
            119,
        ),
        (
            r#"{"model":"m","prompt":[[1,2],[3]],"user":"u","prompt_cache_key":"k"}"#,
            6_148_818_755_920_131_452,
            2,
            18,
        ),
        (
            r#"{"prompt":"once upon a time","model":"gpt","instructions":"x","system":"y","input":"z"}"#,
            6_607_285_479_987_848_494,
            2,
            21,
        ),
    ] {
        let r = parse_request_with(body.as_bytes(), limits).unwrap();
        assert_eq!(
            (
                r.prefix_hashes.last().copied(),
                r.prefix_hashes.len(),
                r.prompt_bytes
            ),
            (Some(last), levels, prompt_bytes),
            "{body}"
        );
        assert_eq!(
            parse_request_for(Completion, body.as_bytes(), limits),
            Ok(r)
        );
    }
}

#[test]
fn the_context_without_a_system_part_is_the_v3_context() {
    // ctx as it was computed before system parts: model, then the tools framing only.
    let mut ctx = ContextHasher::default();
    let zero = xxhash_rust::xxh3::xxh3_64_with_seed(&[0; 17], 0x6c6c_6d6c_6263_7478);
    assert_eq!(
        ctx.ctx(b"m"),
        xxhash_rust::xxh3::xxh3_64_with_seed(b"m", zero)
    );
    ctx.begin_system();
    assert_ne!(
        ctx.ctx(b"m"),
        xxhash_rust::xxh3::xxh3_64_with_seed(b"m", zero)
    );
    ctx.clear_system();
    assert_eq!(
        ctx.ctx(b"m"),
        xxhash_rust::xxh3::xxh3_64_with_seed(b"m", zero)
    );
}

#[test]
fn responses_string_input_hashes_like_a_completions_prompt() {
    let r = ok_as(
        Responses,
        r#"{"model":"m","input":"hello there","stream":true}"#,
    );
    assert_eq!(r.kind, Responses);
    assert!(r.stream);
    let prompt = parse_request(br#"{"model":"m","prompt":"hello there"}"#).unwrap();
    assert_eq!(r.prefix_hashes, prompt.prefix_hashes);
    assert_eq!(r.prompt_bytes, prompt.prompt_bytes);
}

#[test]
fn responses_input_items_are_raw_segments() {
    let items = [
        r#"{"role":"user","content":"hi"}"#,
        r#"{"type":"function_call","call_id":"c1","name":"f","arguments":"{\"a\":1}"}"#,
        r#"{"type":"function_call_output","call_id":"c1","output":"42"}"#,
        r#"{"type":"reasoning","summary":[]}"#,
        r#""a bare string""#,
        "17",
        "null",
    ];
    let body = format!(r#"{{"model":"m","input":[{}]}}"#, items.join(","));
    let segments: Vec<[(u8, &[u8]); 1]> = items.iter().map(|i| [(b'I', i.as_bytes())]).collect();
    let segments: Vec<&[(u8, &[u8])]> = segments.iter().map(|s| &s[..]).collect();
    let r = assert_split_invariant_for(Responses, &body).unwrap();
    assert_eq!(
        r.prefix_hashes,
        expected(
            DEFAULT_BLOCK_SIZE,
            &segments,
            &ContextHasher::default(),
            "m"
        )
    );
    let canonical: usize = items.iter().map(|i| 1 + i.len() + 4).sum();
    assert_eq!(r.prompt_bytes, canonical as u64);
    // The string as input and as a one-item array differ.
    assert_ne!(
        hashes_as(Responses, r#"{"input":"hi"}"#),
        hashes_as(Responses, r#"{"input":["hi"]}"#)
    );
    assert_ne!(
        hashes_as(Responses, r#"{"input":"hi"}"#),
        hashes_as(Responses, r#"{"input":[{"role":"user","content":"hi"}]}"#)
    );
}

/// Turn n+1 sends turn n's input, the assistant's output item and a new user item: every level
/// of turn n is a leading level of turn n+1 (items end segments, so even the last block is
/// shared).
#[test]
fn a_responses_conversation_grows_item_by_item() {
    let limits = Limits {
        block_size: 64,
        ..Limits::default()
    };
    let mut items = vec![format!(
        r#"{{"role":"user","content":[{{"type":"input_text","text":"{}"}}]}}"#,
        "Tell me about caches. ".repeat(20)
    )];
    let mut previous: Vec<u64> = Vec::new();
    for turn in 0..5 {
        let body = format!(
            r#"{{"model":"m","instructions":"be brief","input":[{}],"tools":[]}}"#,
            items.join(",")
        );
        let keys = parse_request_for(Responses, body.as_bytes(), limits)
            .unwrap()
            .prefix_hashes;
        assert!(keys.len() > previous.len(), "turn {turn}");
        assert_eq!(keys[..previous.len()], previous[..], "turn {turn}");
        previous = keys;
        items.push(format!(
            r#"{{"type":"message","role":"assistant","content":[{{"type":"output_text","text":"answer {turn}"}}]}}"#
        ));
        items.push(format!(r#"{{"role":"user","content":"and then {turn}?"}}"#));
    }
}

#[test]
fn instructions_are_context_not_chain() {
    let before =
        r#"{"model":"m","instructions":"You are terse.","input":[{"role":"user","content":"hi"}]}"#;
    let after =
        r#"{"input":[{"role":"user","content":"hi"}],"model":"m","instructions":"You are terse."}"#;
    let a = assert_split_invariant_for(Responses, before).unwrap();
    let b = assert_split_invariant_for(Responses, after).unwrap();
    assert_eq!(a, b);
    let item: &[(u8, &[u8])] = &[(b'I', br#"{"role":"user","content":"hi"}"#)];
    assert_eq!(
        a.prefix_hashes,
        expected(
            DEFAULT_BLOCK_SIZE,
            &[item],
            &system_context(b"You are terse."),
            "m"
        )
    );
    assert_eq!(a.prompt_bytes, (1 + 30 + 4) + 14);
    // Another instruction changes every level; none, or null, is the plain context.
    let long_input = format!(r#""input":"{}""#, "x".repeat(3000));
    let keys = |instructions: &str| {
        hashes_as(
            Responses,
            &format!(r#"{{"model":"m",{instructions}{long_input}}}"#),
        )
    };
    let terse = keys(r#""instructions":"terse","#);
    let verbose = keys(r#""instructions":"verbose","#);
    let none = keys("");
    assert_eq!(terse.len(), verbose.len());
    assert!(terse
        .iter()
        .all(|k| !verbose.contains(k) && !none.contains(k)));
    assert_eq!(keys(r#""instructions":null,"#), none);
    assert_eq!(keys(r#""instructions":"terse","instructions":null,"#), none);
    assert_eq!(keys(r#""instructions":"x","instructions":"terse","#), terse);
    assert_eq!(
        none,
        hashes_as(
            Completion,
            &format!(
                r#"{{"model":"m",{}}}"#,
                long_input.replace("input", "prompt")
            )
        )
    );
    assert_eq!(
        parse_as(Responses, r#"{"instructions":["a"]}"#),
        Err(wrong("instructions", "a string or null"))
    );
}

#[test]
fn responses_fields_store_and_affinity() {
    let r = ok_as(Responses, r#"{"model":"m"}"#);
    assert_eq!(
        (r.kind, r.prefix_hashes.len(), r.prompt_bytes, r.store),
        (Responses, 0, 0, true),
        "no input is valid"
    );
    assert!(!ok_as(Responses, r#"{"store":false,"input":"x"}"#).store);
    assert!(ok_as(Responses, r#"{"store":true}"#).store);
    assert!(ok_as(Responses, r#"{"store":false,"store":null}"#).store);
    assert!(
        ok_as(Chat, r#"{"store":false,"prompt":"x"}"#).store,
        "read for Responses only"
    );
    assert_eq!(
        parse_as(Responses, r#"{"store":"no"}"#),
        Err(wrong("store", "a boolean"))
    );
    let body = r#"{"previous_response_id":"resp_9","conversation":"conv_1","prompt_cache_key":"pk",
        "user":"u1","safety_identifier":"s1","input":"x","model":"m"}"#;
    let r = assert_split_invariant_for(Responses, body).unwrap();
    assert_eq!(
        r.affinity,
        Affinity {
            prompt_cache_key: Some("pk".into()),
            conversation: Some("conv_1".into()),
            safety_identifier: Some("s1".into()),
            user: Some("u1".into()),
            previous_response_id: Some("resp_9".into()),
        }
    );
    // An affinity field is not part of the keys.
    assert_eq!(
        r.prefix_hashes,
        hashes_as(Responses, r#"{"input":"x","model":"m"}"#)
    );
    for (conversation, id) in [
        (r#"{"id":"conv_2","metadata":{"id":"no"}}"#, Some("conv_2")),
        (
            r#"{"metadata":{"id":"no"},"id":"conv_\u0032"}"#,
            Some("conv_2"),
        ),
        (r#"{"object":"conversation"}"#, None),
        (r#"{"id":null}"#, None),
        ("null", None),
        (r#""conv_3""#, Some("conv_3")),
    ] {
        let body = format!(r#"{{"conversation":"old","conversation":{conversation},"input":"x"}}"#);
        let r = assert_split_invariant_for(Responses, &body).unwrap();
        assert_eq!(r.affinity.conversation.as_deref(), id, "{conversation}");
    }
    for (body, field) in [
        (r#"{"conversation":5}"#, "conversation"),
        (r#"{"conversation":{"id":5}}"#, "conversation.id"),
        (r#"{"previous_response_id":{}}"#, "previous_response_id"),
        (r#"{"prompt_cache_key":1}"#, "prompt_cache_key"),
        (r#"{"safety_identifier":true}"#, "safety_identifier"),
        (r#"{"user":[]}"#, "user"),
        (r#"{"input":5}"#, "input"),
    ] {
        assert!(
            matches!(parse_as(Responses, body), Err(ParseError::WrongType { field: f, .. }) if f == field),
            "{body}: {:?}",
            parse_as(Responses, body)
        );
    }
}

#[test]
fn chat_affinity_fields() {
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"user":"u","prompt_cache_key":"k","safety_identifier":"s","previous_response_id":"ignored","conversation":"ignored"}"#;
    let r = assert_split_invariant_for(Chat, body).unwrap();
    assert_eq!(
        r.affinity,
        Affinity {
            prompt_cache_key: Some("k".into()),
            safety_identifier: Some("s".into()),
            user: Some("u".into()),
            ..Affinity::default()
        }
    );
    assert_eq!(
        r.prefix_hashes,
        hashes_as(Chat, r#"{"messages":[{"role":"user","content":"hi"}]}"#)
    );
    // Last wins; null is absent.
    let r = ok_as(
        Completion,
        r#"{"prompt":"x","user":"a","user":"b","prompt_cache_key":"k","prompt_cache_key":null}"#,
    );
    assert_eq!(r.affinity.user.as_deref(), Some("b"));
    assert_eq!(r.affinity.prompt_cache_key, None);
    assert_eq!(
        parse_as(Chat, r#"{"prompt":"x","user":5}"#),
        Err(wrong("user", "a string"))
    );
    assert_eq!(
        parse_as(Chat, r#"{"prompt":"x","safety_identifier":{}}"#),
        Err(wrong("safety_identifier", "a string"))
    );
}

#[test]
fn affinity_values_are_capped_at_1024_decoded_bytes() {
    let at_cap = "é".repeat(MAX_AFFINITY_BYTES / 2);
    let escaped_at_cap = "\\u00e9".repeat(MAX_AFFINITY_BYTES / 2);
    let over = "a".repeat(MAX_AFFINITY_BYTES + 1);
    for (value, kept) in [
        (at_cap.as_str(), Some(at_cap.as_str())),
        (escaped_at_cap.as_str(), Some(at_cap.as_str())),
        (over.as_str(), None),
        ("", Some("")),
    ] {
        let body = format!(r#"{{"user":"{value}","prompt":"x"}}"#);
        let r = ok_as(Chat, &body);
        assert_eq!(r.affinity.user.as_deref(), kept, "{}", value.len());
        // A long value still replaces an earlier one (last wins), and nothing is retained.
        let body = format!(r#"{{"user":"short","user":"{value}","prompt":"x"}}"#);
        assert_eq!(ok_as(Chat, &body).affinity.user.as_deref(), kept);
    }
    let mut p = RequestParser::for_kind(Responses, Limits::default());
    p.feed(br#"{"conversation":""#).unwrap();
    for _ in 0..1000 {
        p.feed(&[b'c'; 1000]).unwrap();
    }
    assert!(p.retained_bytes() < 8 * 1024, "{}", p.retained_bytes());
    p.feed(br#"","input":"x"}"#).unwrap();
    assert_eq!(p.finish().unwrap().affinity.conversation, None);
}

#[test]
fn messages_bodies() {
    let system_first = r#"{"model":"claude","system":"You are terse.","max_tokens":10,"messages":[
        {"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]},
        {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"42"}]}],
        "stream":true,"metadata":{"user_id":"u-1"},"tools":[{"name":"f"}]}"#;
    let system_last = r#"{"model":"claude","max_tokens":10,"messages":[
        {"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]},
        {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"42"}]}],
        "stream":true,"metadata":{"user_id":"u-1"},"tools":[{"name":"f"}],"system":"You are terse."}"#;
    let first = assert_split_invariant_for(Messages, system_first).unwrap();
    let last = assert_split_invariant_for(Messages, system_last).unwrap();
    assert_eq!(first, last);
    assert_eq!(
        (first.kind, first.model.as_str(), first.stream),
        (Messages, "claude", true)
    );
    assert_eq!(first.affinity.user.as_deref(), Some("u-1"));
    let mut ctx = system_context(b"You are terse.");
    ctx.begin_tools();
    ctx.tools_bytes(br#"[{"name":"f"}]"#);
    let segments: [&[(u8, &[u8])]; 3] = [
        &[(b'r', b"user"), (b'c', b"hi")],
        &[
            (b'r', b"assistant"),
            (
                b'p',
                br#"{"type":"tool_use","id":"t1","name":"f","input":{}}"#,
            ),
        ],
        &[
            (b'r', b"user"),
            (
                b'p',
                br#"{"type":"tool_result","tool_use_id":"t1","content":"42"}"#,
            ),
        ],
    ];
    assert_eq!(
        first.prefix_hashes,
        expected(DEFAULT_BLOCK_SIZE, &segments, &ctx, "claude")
    );
}

#[test]
fn messages_system_prompts_and_errors() {
    // Messages parse like chat messages: without a system prompt the keys are chat's.
    let chat = r#"{"model":"claude","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(hashes_as(Messages, chat), hashes_as(Chat, chat));
    // A system prompt of blocks is its raw JSON; another system prompt changes every level.
    let blocks =
        r#"[{"type":"text","text":"You are terse.","cache_control":{"type":"ephemeral"}}]"#;
    let with_blocks = format!(
        r#"{{"system":{blocks},"model":"claude","messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let parsed = assert_split_invariant_for(Messages, &with_blocks).unwrap();
    let hi: &[(u8, &[u8])] = &[(b'r', b"user"), (b'c', b"hi")];
    assert_eq!(
        parsed.prefix_hashes,
        expected(
            DEFAULT_BLOCK_SIZE,
            &[hi],
            &system_context(blocks.as_bytes()),
            "claude"
        )
    );
    assert_eq!(
        parsed.prompt_bytes,
        (1 + 4 + 4 + 1 + 2 + 4) + blocks.len() as u64
    );
    let long = format!(
        r#""messages":[{{"role":"user","content":"{}"}}]"#,
        "y".repeat(4000)
    );
    let keys = |system: &str| hashes_as(Messages, &format!("{{{system}{long}}}"));
    let (terse, verbose, none) = (
        keys(r#""system":"terse","#),
        keys(r#""system":"verbose","#),
        keys(""),
    );
    assert!(terse
        .iter()
        .all(|k| !verbose.contains(k) && !none.contains(k)));
    assert_eq!(keys(r#""system":null,"#), none);
    assert_ne!(
        keys(r#""system":"","#),
        none,
        "an empty system prompt is present"
    );
    // Errors.
    assert_eq!(
        parse_as(Messages, r#"{"model":"claude","prompt":"x","system":"s"}"#),
        Err(ParseError::NoPromptIn(Messages))
    );
    assert_eq!(
        ParseError::NoPromptIn(Messages).to_string(),
        "body has no 'messages'"
    );
    assert_eq!(
        parse_as(Messages, r#"{"system":5,"messages":[]}"#),
        Err(wrong("system", "a string, an array or null"))
    );
    assert_eq!(
        parse_as(Messages, r#"{"metadata":{"user_id":5},"messages":[]}"#),
        Err(wrong("metadata.user_id", "a string"))
    );
    assert_eq!(
        parse_as(Messages, r#"{"metadata":"x","messages":[]}"#),
        Err(wrong("metadata", "an object or null"))
    );
    let r = ok_as(
        Messages,
        r#"{"metadata":{"user_id":"a"},"metadata":{},"user":"top","messages":[]}"#,
    );
    assert_eq!(
        r.affinity.user, None,
        "only metadata.user_id; the last metadata wins"
    );
}

#[test]
fn embeddings_bodies() {
    for input in [
        r#""a sentence""#,
        r#"["one","two"]"#,
        "[1, 2, 3]",
        "[[1, 2], [3]]",
    ] {
        let body =
            format!(r#"{{"model":"e","input":{input},"user":"u","encoding_format":"float"}}"#);
        let r = assert_split_invariant_for(Embeddings, &body).unwrap();
        let prompt =
            parse_request(format!(r#"{{"model":"e","prompt":{input}}}"#).as_bytes()).unwrap();
        assert_eq!(
            (r.kind, &r.prefix_hashes, r.prompt_bytes),
            (Embeddings, &prompt.prefix_hashes, prompt.prompt_bytes),
            "{input}"
        );
        assert_eq!(r.affinity.user.as_deref(), Some("u"));
    }
    // Chat-style embeddings (vLLM): messages as in chat, and they take precedence.
    let chat = r#"{"model":"e","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(hashes_as(Embeddings, chat), hashes_as(Chat, chat));
    assert_eq!(
        hashes_as(
            Embeddings,
            r#"{"input":"x","model":"e","messages":[{"role":"user","content":"hi"}]}"#
        ),
        hashes_as(Chat, chat)
    );
    assert_eq!(
        parse_as(Embeddings, r#"{"model":"e","prompt":"x"}"#),
        Err(ParseError::NoPromptIn(Embeddings))
    );
    assert_eq!(
        ParseError::NoPromptIn(Embeddings).to_string(),
        "body has neither 'input' nor 'messages'"
    );
    assert_eq!(
        parse_as(Embeddings, r#"{"input":{}}"#),
        Err(wrong("input", "a string or an array"))
    );
    assert_eq!(
        parse_as(Embeddings, r#"{"input":[1,"a"]}"#),
        Err(wrong("input", "token ids or strings, not both"))
    );
    assert_eq!(
        parse_as(Embeddings, r#"{"input":[true]}"#),
        Err(wrong(
            "input[]",
            "a string, a token id or an array of token ids"
        ))
    );
}

#[test]
fn rerank_and_score_fields_are_tagged_raw_segments() {
    for kind in [Rerank, Score] {
        let body = r#"{"model":"r","query":"what is a cache?","documents":["a","b \u00e9"],"top_n":2,"user":"u"}"#;
        let r = assert_split_invariant_for(kind, body).unwrap();
        let segments: [&[(u8, &[u8])]; 2] = [
            &[(b'Q', br#""what is a cache?""#)],
            &[(b'D', br#"["a","b \u00e9"]"#)],
        ];
        assert_eq!(
            r.prefix_hashes,
            expected(
                DEFAULT_BLOCK_SIZE,
                &segments,
                &ContextHasher::default(),
                "r"
            )
        );
        assert_eq!((r.kind, r.affinity.user.as_deref()), (kind, Some("u")));
        // One tag per field name: the same value under another name differs.
        let fields = [
            "query",
            "documents",
            "text_1",
            "text_2",
            "queries",
            "items",
            "data_1",
            "data_2",
            "input",
        ];
        let keys: Vec<Vec<u64>> = fields
            .iter()
            .map(|f| hashes_as(kind, &format!(r#"{{"{f}":"a"}}"#)))
            .collect();
        for (i, a) in keys.iter().enumerate() {
            assert_eq!(a.len(), 1);
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // In body key order.
        assert_ne!(
            hashes_as(kind, r#"{"text_1":"a","text_2":"b"}"#),
            hashes_as(kind, r#"{"text_2":"b","text_1":"a"}"#)
        );
        assert_eq!(
            parse_as(kind, r#"{"model":"r","prompt":"x","messages":[]}"#),
            Err(ParseError::NoPromptIn(kind))
        );
    }
    assert_eq!(
        ParseError::NoPromptIn(Rerank).to_string(),
        "body has none of 'query', 'documents', 'text_1', 'text_2', 'queries', 'items', \
         'data_1', 'data_2', 'input'"
    );
}

#[test]
fn no_prompt_messages() {
    assert_eq!(
        ParseError::NoPrompt.to_string(),
        "body has neither 'messages' nor 'prompt'"
    );
    for kind in [Chat, Completion] {
        assert_eq!(
            parse_as(kind, r#"{"input":"x"}"#),
            Err(ParseError::NoPrompt)
        );
    }
}

#[test]
fn other_bodies_are_only_counted() {
    for body in [
        &b"not json at all"[..],
        b"\xff\xfe",
        b"",
        b"{\"model\":5",
        b"[1]",
    ] {
        let r = parse_request_for(Other, body, Limits::default()).unwrap();
        assert_eq!(r.kind, Other);
        assert_eq!(r.model, "");
        assert!(r.prefix_hashes.is_empty());
        assert_eq!(
            (r.prompt_bytes, r.context_bytes, r.stream, r.store),
            (0, 0, false, true)
        );
        assert_eq!(r.affinity, Affinity::default());
        assert_eq!(chunked_for(Other, body, &[1], Limits::default()), Ok(r));
    }
    let limits = Limits {
        max_bytes: 10,
        ..Limits::default()
    };
    let mut p = RequestParser::for_kind(Other, limits);
    p.feed(b"0123456789").unwrap();
    assert_eq!(p.feed(b"x"), Err(TooLarge));
    assert_eq!(p.finish(), Err(ParseError::TooLarge { max_bytes: 10 }));
}

#[test]
fn every_shape_still_validates_the_json() {
    for kind in [Chat, Responses, Messages, Embeddings, Rerank, Score] {
        for bad in [
            &br#"{"input":"x","query":"q","messages":[],"x":tru}"#[..],
            br#"{"input":["a"] "query":"q","messages":[]}"#,
            br#"{"input":["\x"],"query":"q","messages":[]}"#,
            br#"{"instructions":"a","system":"b","query":"q","messages":[]"#,
        ] {
            assert!(
                matches!(
                    parse_request_for(kind, bad, Limits::default()),
                    Err(ParseError::Json(_))
                ),
                "{kind:?} {}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_request_for(kind, b"{\"input\":\"\xff\"}", Limits::default()),
            Err(ParseError::NotUtf8)
        );
        let deep = format!(r#"{{"input":{},"query":1,"messages":[]}}"#, "[".repeat(200));
        assert!(matches!(
            parse_request_for(kind, deep.as_bytes(), Limits::default()),
            Err(ParseError::Json(e)) if e.message == "nesting too deep"
        ));
    }
}

#[test]
fn the_new_shapes_split_anywhere() {
    for (kind, body) in [
        (
            Responses,
            r#"{"model":"m\u00e9","instructions":"be \"brief\"","input":[{"role":"user","content":[{"type":"input_text","text":"h\u00e9llo 😀"}]},{"type":"function_call_output","call_id":"c","output":"[1, 2]"},"s",-1.5e3,true],"conversation":{"id":"c\n1"},"store":false,"tools":[{"type":"web_search"}]}"#,
        ),
        (
            Responses,
            r#"{"input":"a \ud83d\ude00 b","previous_response_id":"r\/1"}"#,
        ),
        (
            Messages,
            r#"{"messages":[{"content":[{"text":"hi","type":"text"},{"type":"image","source":{"data":"x"}}],"role":"user"}],"system":[{"type":"text","text":"s\u00e9"}],"metadata":{"user_id":"u\t"}}"#,
        ),
        (Embeddings, r#"{"input":[[1,2],[3]],"model":"e"}"#),
        (Embeddings, r#"{"input":[1, 22 ,333],"model":"e"}"#),
        (
            Rerank,
            r#"{"query":"q\u00e9","documents":[{"text":"d"},"e"],"model":"r"}"#,
        ),
        (Score, r#"{"text_1":["a"],"text_2":"b","model":"r"}"#),
    ] {
        let r = assert_split_invariant_for(kind, body);
        assert!(r.is_ok(), "{body}: {r:?}");
    }
}

#[test]
fn body_parser_takes_a_kind() {
    use crate::body_decode::{parse_body_for, BodyParser};
    let body = br#"{"model":"m","input":"x"}"#;
    assert_eq!(
        parse_body_for(Responses, body, None, u64::MAX, usize::MAX),
        parse_as(Responses, r#"{"model":"m","input":"x"}"#)
    );
    // Other: no decoding, not even of the encoding's name.
    let mut p = BodyParser::for_kind(Other, Some("br, compress"), Limits::default());
    p.feed(b"\x1f\x8b garbage").unwrap();
    assert_eq!(p.finish().map(|r| r.kind), Ok(Other));
    assert_eq!(
        parse_body_for(Other, b"0123456789x", Some("gzip"), 10, 8),
        Err(ParseError::TooLarge { max_bytes: 10 })
    );
}

/// Generated bodies of the new shapes: any split gives the one-shot result, and the order of
/// the top-level keys does not matter (a rerank body's fields excepted: they are in body order).
mod props {
    use proptest::prelude::*;

    use super::*;

    fn pick(values: &[&'static str]) -> impl Strategy<Value = &'static str> {
        prop::sample::select(values.to_vec())
    }

    fn responses_item() -> impl Strategy<Value = &'static str> {
        pick(&[
            r#"{"role":"user","content":"h\u00e9llo \"there\""}"#,
            r#"{"role":"user","content":[{"type":"input_text","text":"a\nb 😀"}]}"#,
            r#"{"type":"message","role":"assistant","content":[{"type":"output_text","text":"ok"}]}"#,
            r#"{"type":"function_call","call_id":"c1","name":"f","arguments":"{\"x\":[1,2]}"}"#,
            r#"{"type":"function_call_output","call_id":"c1","output":"\ud83d\ude00"}"#,
            r#"{"type":"reasoning","summary":[]}"#,
            r#""plain""#,
        ])
    }

    fn chat_message() -> impl Strategy<Value = &'static str> {
        pick(&[
            r#"{"role":"user","content":"hi \u00e9"}"#,
            r#"{"content":[{"text":"a\"b","type":"text"}],"role":"user"}"#,
            r#"{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"q":"x"}}]}"#,
            r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"42"}]}"#,
        ])
    }

    fn array(items: &[&str]) -> String {
        format!("[{}]", items.join(", "))
    }

    /// Top-level fields of a body of `kind`.
    fn body() -> impl Strategy<Value = (RequestKind, Vec<(&'static str, String)>)> {
        let responses = (
            prop::collection::vec(responses_item(), 0..6),
            any::<bool>(),
            prop::option::of(pick(&[r#""be brief""#, r#""\u00e9\n""#, "null"])),
            prop::option::of(pick(&[r#""conv""#, r#"{"id":"c","x":[1]}"#])),
        )
            .prop_map(|(items, as_string, instructions, conversation)| {
                let input = if as_string {
                    r#""a \"string\" input""#.to_string()
                } else {
                    array(&items)
                };
                let mut fields = vec![
                    ("model", r#""m""#.to_string()),
                    ("input", input),
                    ("tools", r#"[{"type":"function"}]"#.to_string()),
                    ("store", "false".to_string()),
                    ("user", r#""u""#.to_string()),
                ];
                fields.extend(instructions.map(|i| ("instructions", i.to_string())));
                fields.extend(conversation.map(|c| ("conversation", c.to_string())));
                (Responses, fields)
            });
        let messages = (
            prop::collection::vec(chat_message(), 0..5),
            prop::option::of(pick(&[
                r#""sys""#,
                r#"[{"type":"text","text":"s"}]"#,
                "null",
            ])),
        )
            .prop_map(|(messages, system)| {
                let mut fields = vec![
                    ("model", r#""claude""#.to_string()),
                    ("messages", array(&messages)),
                    ("metadata", r#"{"user_id":"u"}"#.to_string()),
                    ("stream", "true".to_string()),
                ];
                fields.extend(system.map(|s| ("system", s.to_string())));
                (Messages, fields)
            });
        let embeddings = pick(&[r#""text""#, r#"["a","b\n"]"#, "[1, 2, 3]", "[[1], [2, 3]]"])
            .prop_map(|input| {
                (
                    Embeddings,
                    vec![
                        ("model", r#""e""#.to_string()),
                        ("input", input.to_string()),
                        ("dimensions", "8".to_string()),
                    ],
                )
            });
        prop_oneof![responses, messages, embeddings]
    }

    fn render(fields: &[(&str, String)], mut seed: u64) -> String {
        let mut order: Vec<usize> = (0..fields.len()).collect();
        for i in (1..order.len()).rev() {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            order.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let members: Vec<String> = order
            .iter()
            .map(|&i| format!(r#""{}": {}"#, fields[i].0, fields[i].1))
            .collect();
        format!("{{{}}}", members.join(", "))
    }

    proptest! {
        #[test]
        fn any_split_and_any_key_order_give_the_one_shot_result(
            (kind, fields) in body(),
            seeds in (any::<u64>(), any::<u64>()),
            sizes in prop::collection::vec(1usize..200, 1..8),
            block_size in prop::sample::select(vec![7usize, 64, 512]),
        ) {
            let limits = Limits { block_size, ..Limits::default() };
            let (a, b) = (render(&fields, seeds.0), render(&fields, seeds.1));
            let one_shot = parse_request_for(kind, a.as_bytes(), limits);
            prop_assert!(one_shot.is_ok(), "{a}: {one_shot:?}");
            prop_assert_eq!(&chunked_for(kind, a.as_bytes(), &sizes, limits), &one_shot, "{}", a);
            prop_assert_eq!(&parse_request_for(kind, b.as_bytes(), limits), &one_shot, "{}\n{}", a, b);
        }
    }
}
