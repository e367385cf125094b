//! Criterion benchmarks of the llmlb core: request parsing + prefix hashing, picks, and the
//! prefix table. Run with `cargo bench --bench core -- --noplot`; `python bench/check.py` runs
//! this and the Python benchmarks and compares them with the budgets.
//!
//! Benchmark ids (criterion writes `target/criterion/<id>/new/estimates.json`):
//! - `parse_hash/{1KB,32KB,1MB}`: `parse_request` of a generated OpenAI chat body.
//! - `parse_hash/{responses,messages,embeddings}_1MB`: `parse_request_for` of a generated ~1 MB
//!   Responses body (input items of every type), Anthropic Messages body (content blocks, a
//!   system prompt) and embeddings body (passages); Rust only.
//! - `parse_hash_chunked/1MB`: the 1 MB body fed to a `RequestParser` in 64 KiB chunks.
//! - `pick/<policy>/<endpoints>`: one `pick` + one `release` (state stays steady).
//! - `pick_only/<policy>/<endpoints>`: `pick` alone, in bursts of outstanding picks whose
//!   releases are not timed.
//! - `pick/prefix_cache_miss/<endpoints>`: pick + release of a never-seen 32 KB-sized chain.
//! - `release/unknown_ticket`: the smallest call there is (baseline of the Python call cost).
//! - `prefix_table/match_depths/<case>/<levels>` and `prefix_table/record/<case>/64`.
//! - `engine_metrics/vllm_100kb`: `parse_engine_metrics` of a generated ~100 KB vLLM `/metrics`
//!   page (engine auto-detected).
//!
//! The request bodies come from a small deterministic generator, mirrored byte for byte by
//! `bench/python/bench_bodies.py`; each run prints a fingerprint line per body so `check.py` can
//! confirm that both sides measured the same bytes.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use _core::balancer::{Balancer, BalancerConfig, PickReason};
use _core::engine_metrics::{parse_engine_metrics, Engine};
use _core::prefix_table::PrefixTable;
use _core::request::{parse_request, parse_request_for, Limits, RequestKind, RequestParser};
use _core::scheduling::policies::Policy;
use _core::worker_state::{Layout, WorkerState};

// ---------------------------------------------------------------------------------------------
// Deterministic request bodies (keep in sync with bench/python/bench_bodies.py).

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const BODY_HEAD: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":["#;
const BODY_TAIL: &str = r#"],"max_tokens":512,"temperature":0.7,"stream":true}"#;

/// (label, target size in bytes, seed)
const BODY_SIZES: [(&str, usize, u64); 3] = [
    ("1KB", 1024, 1),
    ("32KB", 32 * 1024, 32),
    ("1MB", 1024 * 1024, 1024),
];

#[rustfmt::skip]
const WORDS: [&str; 96] = [
    "the", "model", "request", "server", "cache", "prefix", "token", "latency", "and", "of", "to",
    "in", "is", "that", "for", "with", "as", "on", "this", "be", "are", "we", "can", "it", "an",
    "by", "from", "at", "or", "not", "which", "will", "should", "would", "could", "please",
    "answer", "question", "explain", "summary", "document", "section", "example", "function",
    "value", "result", "because", "however", "therefore", "system", "user", "assistant", "response",
    "context", "window", "memory", "throughput", "endpoint", "cluster", "replica", "balancer",
    "routing", "policy", "healthy", "load", "queue", "batch", "stream", "output", "input", "small",
    "large", "quickly", "carefully", "first", "second", "finally", "also", "other", "more", "than",
    "each", "every", "some", "about", "into", "over", "after", "before", "while", "café", "naïve",
    "résumé", "façade", "über", "déjà",
];

/// splitmix64: tiny, fast and easy to mirror exactly in Python.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// English-like text as JSON string content (already escaped): sentences with commas, the odd
/// quoted phrase (`\"`), paragraphs separated by `\n\n`, a few non-ASCII words.
struct TextGen {
    words_left: u64,
    sentences_left: u64,
    quote_left: u64,
    first: bool,
}

impl TextGen {
    fn new() -> Self {
        Self {
            words_left: 0,
            sentences_left: 0,
            quote_left: 0,
            first: true,
        }
    }

    fn token(&mut self, rng: &mut Mix, tok: &mut Vec<u8>) {
        tok.clear();
        let mut capitalize = false;
        if self.words_left == 0 {
            if self.sentences_left == 0 {
                self.sentences_left = 2 + rng.below(5);
                if !self.first {
                    tok.extend_from_slice(br"\n\n");
                }
            } else {
                tok.push(b' ');
            }
            self.sentences_left -= 1;
            self.words_left = 6 + rng.below(14);
            capitalize = true;
        } else {
            tok.push(b' ');
        }
        let word = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        if self.quote_left == 0 && self.words_left > 3 && rng.below(48) == 0 {
            tok.extend_from_slice(br#"\""#);
            self.quote_left = 2 + rng.below(2);
        }
        let start = tok.len();
        tok.extend_from_slice(word);
        if capitalize {
            tok[start] = tok[start].to_ascii_uppercase();
        }
        if self.quote_left > 0 {
            self.quote_left -= 1;
            if self.quote_left == 0 {
                tok.extend_from_slice(br#"\""#);
            }
        }
        self.words_left -= 1;
        if self.words_left == 0 {
            if self.quote_left > 0 {
                tok.extend_from_slice(br#"\""#);
                self.quote_left = 0;
            }
            tok.push(if rng.below(8) == 0 { b'?' } else { b'.' });
        } else if rng.below(12) == 0 {
            tok.push(b',');
        }
        self.first = false;
    }
}

/// Appends `{"role":"<role>","content":"<about len bytes of text>"}`.
fn message(out: &mut Vec<u8>, rng: &mut Mix, role: &str, len: usize) {
    out.extend_from_slice(br#"{"role":""#);
    out.extend_from_slice(role.as_bytes());
    out.extend_from_slice(br#"","content":""#);
    text(out, rng, len);
    out.extend_from_slice(br#""}"#);
}

/// Appends about `len` bytes of escaped text (no quotes).
fn text(out: &mut Vec<u8>, rng: &mut Mix, len: usize) {
    let mut text = TextGen::new();
    let mut tok = Vec::new();
    let mut written = 0;
    loop {
        text.token(rng, &mut tok);
        if written + tok.len() > len {
            break;
        }
        out.extend_from_slice(&tok);
        written += tok.len();
    }
}

const fn message_overhead(role: &str) -> usize {
    r#"{"role":"","content":""}"#.len() + role.len()
}

/// A chat-completions body of about `target` bytes: a system prompt, then user/assistant turns
/// (the odd long pasted document), ending with a user turn.
fn chat_body(target: usize, seed: u64) -> Vec<u8> {
    let mut rng = Mix(seed);
    let mut out = Vec::with_capacity(target + 64);
    out.extend_from_slice(BODY_HEAD.as_bytes());
    let system = (target / 8).clamp(200, 4000);
    message(&mut out, &mut rng, "system", system);
    let (user_oh, asst_oh) = (message_overhead("user"), message_overhead("assistant"));
    loop {
        let remaining = target.saturating_sub(out.len() + BODY_TAIL.len());
        let user = if rng.below(10) == 0 {
            2000 + rng.below(14_000)
        } else {
            100 + rng.below(700)
        } as usize;
        let assistant = 300 + rng.below(2500) as usize;
        if remaining < user + assistant + user_oh + asst_oh + 2 + 300 {
            out.push(b',');
            message(
                &mut out,
                &mut rng,
                "user",
                remaining.saturating_sub(user_oh + 1),
            );
            break;
        }
        out.push(b',');
        message(&mut out, &mut rng, "user", user);
        out.push(b',');
        message(&mut out, &mut rng, "assistant", assistant);
    }
    out.extend_from_slice(BODY_TAIL.as_bytes());
    out
}

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    BODY_SIZES
        .iter()
        .map(|&(label, size, seed)| (label, chat_body(size, seed)))
        .collect()
}

/// Writes `pieces` joined with `text(len)` runs: `pieces[0], text, pieces[1], text, ...`.
fn templated(out: &mut Vec<u8>, rng: &mut Mix, pieces: &[&str], lens: &[usize]) {
    for (i, piece) in pieces.iter().enumerate() {
        out.extend_from_slice(piece.as_bytes());
        if let Some(&len) = lens.get(i) {
            text(out, rng, len);
        }
    }
}

/// A Responses body of about `target` bytes: instructions, then input items of every type (user
/// messages as strings and as parts, assistant output, function calls and outputs, reasoning).
fn responses_body(target: usize, seed: u64) -> Vec<u8> {
    let mut rng = Mix(seed);
    let mut out = Vec::with_capacity(target + 4096);
    templated(
        &mut out,
        &mut rng,
        &[r#"{"model":"gpt-4.1","instructions":""#, r#"","input":["#],
        &[2000],
    );
    let mut call = 0;
    while out.len() < target {
        if call > 0 {
            out.push(b',');
        }
        call += 1;
        let id = format!("call_{call}");
        let len = 200 + rng.below(3000) as usize;
        match rng.below(6) {
            0 => templated(
                &mut out,
                &mut rng,
                &[r#"{"role":"user","content":""#, r#""}"#],
                &[len],
            ),
            1 => templated(
                &mut out,
                &mut rng,
                &[
                    r#"{"role":"user","content":[{"type":"input_text","text":""#,
                    r#""}]}"#,
                ],
                &[len],
            ),
            2 => templated(
                &mut out,
                &mut rng,
                &[
                    r#"{"type":"message","role":"assistant","status":"completed","content":[{"type":"output_text","annotations":[],"text":""#,
                    r#""}]}"#,
                ],
                &[len],
            ),
            3 => templated(
                &mut out,
                &mut rng,
                &[
                    &format!(
                        r#"{{"type":"function_call","call_id":"{id}","name":"search","arguments":"{{\"query\":\""#
                    ),
                    r#"\"}"}"#,
                ],
                &[len / 8],
            ),
            4 => templated(
                &mut out,
                &mut rng,
                &[
                    &format!(r#"{{"type":"function_call_output","call_id":"{id}","output":""#),
                    r#""}"#,
                ],
                &[len],
            ),
            _ => templated(
                &mut out,
                &mut rng,
                &[
                    &format!(
                        r#"{{"type":"reasoning","id":"rs_{call}","summary":[{{"type":"summary_text","text":""#
                    ),
                    r#""}]}"#,
                ],
                &[len / 2],
            ),
        }
    }
    out.extend_from_slice(
        br#"],"tools":[{"type":"function","name":"search","parameters":{"type":"object"}}],"store":false,"stream":true}"#,
    );
    out
}

/// An Anthropic Messages body of about `target` bytes: text, tool_use and tool_result blocks,
/// the system prompt (blocks) last, as the SDK sends it.
fn messages_body(target: usize, seed: u64) -> Vec<u8> {
    let mut rng = Mix(seed);
    let mut out = Vec::with_capacity(target + 4096);
    out.extend_from_slice(br#"{"max_tokens":1024,"messages":["#);
    let mut turn = 0;
    while out.len() < target {
        if turn > 0 {
            out.push(b',');
        }
        turn += 1;
        let len = 200 + rng.below(3000) as usize;
        match rng.below(3) {
            0 => templated(
                &mut out,
                &mut rng,
                &[
                    r#"{"role":"user","content":[{"type":"text","text":""#,
                    r#""}]}"#,
                ],
                &[len],
            ),
            1 => templated(
                &mut out,
                &mut rng,
                &[
                    r#"{"role":"assistant","content":[{"type":"text","text":""#,
                    &format!(
                        r#""}},{{"type":"tool_use","id":"toolu_{turn}","name":"search","input":{{"query":""#
                    ),
                    r#""}}]}"#,
                ],
                &[len, 40],
            ),
            _ => templated(
                &mut out,
                &mut rng,
                &[
                    &format!(
                        r#"{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"toolu_{turn}","content":""#
                    ),
                    r#""}]}"#,
                ],
                &[len],
            ),
        }
    }
    templated(
        &mut out,
        &mut rng,
        &[
            r#"],"model":"claude-sonnet-4-5","stream":true,"system":[{"type":"text","text":""#,
            r#"","cache_control":{"type":"ephemeral"}}]}"#,
        ],
        &[4000],
    );
    out
}

/// An embeddings body of about `target` bytes: an array of passages.
fn embeddings_body(target: usize, seed: u64) -> Vec<u8> {
    let mut rng = Mix(seed);
    let mut out = Vec::with_capacity(target + 4096);
    out.extend_from_slice(br#"{"model":"BAAI/bge-m3","input":["#);
    let mut first = true;
    while out.len() < target {
        if !first {
            out.push(b',');
        }
        first = false;
        let len = 200 + rng.below(2000) as usize;
        templated(&mut out, &mut rng, &["\"", "\""], &[len]);
    }
    out.extend_from_slice(br#"],"encoding_format":"float"}"#);
    out
}

/// The other request shapes, about 1 MB each: (label, kind, body).
fn shape_bodies() -> Vec<(&'static str, RequestKind, Vec<u8>)> {
    const SIZE: usize = 1024 * 1024;
    vec![
        (
            "responses_1MB",
            RequestKind::Responses,
            responses_body(SIZE, 7),
        ),
        (
            "messages_1MB",
            RequestKind::Messages,
            messages_body(SIZE, 8),
        ),
        (
            "embeddings_1MB",
            RequestKind::Embeddings,
            embeddings_body(SIZE, 9),
        ),
    ]
}

fn hashes_of(body: &[u8]) -> Vec<u64> {
    parse_request(body)
        .expect("generated bodies parse")
        .prefix_hashes
}

// ---------------------------------------------------------------------------------------------
// Parsing and hashing.

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_hash");
    // A 1 MB body takes ~1 ms: 50 samples keep the run within the measurement time.
    group.sample_size(50);
    for (label, body) in bodies() {
        let parsed = parse_request(&body).expect("generated bodies parse");
        assert_eq!(parsed.model, MODEL);
        // One line per body so check.py can confirm the Python side measured the same bytes.
        println!(
            "llmlb-bench-body size={label} bytes={} levels={} last_hash={}",
            body.len(),
            parsed.prefix_hashes.len(),
            parsed.prefix_hashes.last().copied().unwrap_or(0)
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
            b.iter(|| parse_request(black_box(body)).expect("parses"));
        });
    }
    for (label, kind, body) in shape_bodies() {
        let parsed = parse_request_for(kind, &body, Limits::default()).expect("generated");
        assert_eq!(parsed.kind, kind);
        assert!(parsed.prefix_hashes.len() > 1000, "{label}");
        println!(
            "llmlb-bench-shape {label} bytes={} levels={}",
            body.len(),
            parsed.prefix_hashes.len()
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
            b.iter(|| parse_request_for(kind, black_box(body), Limits::default()).expect("parses"));
        });
    }
    group.finish();

    // The same 1 MB body as Envoy streams it (FULL_DUPLEX_STREAMED): 64 KiB chunks.
    let (_, body) = bodies().pop().expect("three bodies");
    let whole = parse_request(&body).expect("parses");
    let chunked = |body: &[u8]| {
        let mut parser = RequestParser::new(Limits::default());
        for chunk in body.chunks(STREAM_CHUNK) {
            parser.feed(chunk).expect("no size limit");
        }
        parser.finish().expect("parses")
    };
    assert_eq!(chunked(&body), whole);
    let mut group = c.benchmark_group("parse_hash_chunked");
    group.sample_size(50);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_with_input(BenchmarkId::from_parameter("1MB"), &body, |b, body| {
        b.iter(|| chunked(black_box(body)));
    });
    group.finish();
}

/// Bytes per body chunk in `parse_hash_chunked` (Envoy's streamed chunks are at most ~64 KiB).
const STREAM_CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Picks.

const NOW_MS: u64 = 1_000;
/// Warm-up picks are this far apart, as real requests would be, so prefill backlogs drain
/// between them; all 1,500 stay within the prefix entries' lifetime (1,800 s).
const WARM_STEP_MS: u64 = 1_000;
/// The chain of the hit path is picked this long before the timed picks (its backlog drains).
const SETTLE_MS: u64 = 10_000;
/// When the timed picks happen.
const PICK_MS: u64 = NOW_MS + WARM_CHAINS as u64 * WARM_STEP_MS + 2 * SETTLE_MS;
/// Entries put in the prefix table before timing pick benches: about 100k (1,500 chains of 64).
const WARM_CHAINS: usize = 1_500;
const WARM_LEVELS: usize = 64;
/// Outstanding picks in the pick-alone bench before they are released (untimed).
const PICK_BURST: u64 = 64;

fn endpoints(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}:8000", i / 65_536, (i / 256) % 256, i % 256))
        .collect()
}

fn random_chain(rng: &mut Mix, levels: usize) -> Vec<u64> {
    (0..levels).map(|_| rng.next()).collect()
}

/// A balancer over `n` endpoints; for prefix_cache, a prefix table warmed with ~100k entries by
/// earlier picks, and `chain` recorded on one endpoint so picking it exercises the hit path.
fn balancer(policy: Policy, n: usize, chain: &[u64]) -> Balancer {
    balancer_on(policy, n, chain, None)
}

/// The same, as worker 0 of two sharing state through a mapped file (`serve --workers 2`).
fn worker_balancer(policy: Policy, n: usize, chain: &[u64]) -> Balancer {
    let path = std::env::temp_dir().join(format!("llmlb-bench-workers-{}", std::process::id()));
    let capacity = BalancerConfig::default().prefix_capacity;
    WorkerState::create(&path, Layout::new(2, 16_384, capacity), 1800).expect("worker state");
    let state = WorkerState::open(&path, 0).expect("worker state");
    let _ = std::fs::remove_file(&path); // the mapping outlives the name
    balancer_on(policy, n, chain, Some(Arc::new(state)))
}

fn balancer_on(
    policy: Policy,
    n: usize,
    chain: &[u64],
    workers: Option<Arc<WorkerState>>,
) -> Balancer {
    let config = BalancerConfig {
        policy,
        ..BalancerConfig::default()
    };
    let mut b = Balancer::with_rng(config, SmallRng::seed_from_u64(7));
    if let Some(state) = workers {
        b.attach_workers(state);
    }
    b.set_endpoints(&endpoints(n));
    if policy.uses_prefix() {
        let mut rng = Mix(99);
        for i in 0..WARM_CHAINS as u64 {
            let at = NOW_MS + i * WARM_STEP_MS;
            let p = b
                .pick(Some(&random_chain(&mut rng, WARM_LEVELS)), at)
                .expect("pick");
            b.release(p.ticket, at);
        }
        let p = b.pick(Some(chain), PICK_MS - SETTLE_MS).expect("pick");
        b.release(p.ticket, PICK_MS - SETTLE_MS);
        let again = b.pick(Some(chain), PICK_MS).expect("pick");
        assert_eq!(again.reason, PickReason::PrefixHit);
        assert_eq!(again.prefix_depth as usize, chain.len());
        b.release(again.ticket, PICK_MS);
    }
    b
}

fn bench_pick(c: &mut Criterion) {
    let body32 = chat_body(BODY_SIZES[1].1, BODY_SIZES[1].2);
    let chain = hashes_of(&body32);
    let empty: &[u64] = &[];
    let cases = [
        (Policy::GlobalLeastRequest, empty),
        (Policy::PrefixCache, chain.as_slice()),
    ];

    let mut group = c.benchmark_group("pick");
    group.throughput(Throughput::Elements(1));
    for (policy, hashes) in cases {
        for n in [8, 1000] {
            let mut b = balancer(policy, n, &chain);
            group.bench_function(BenchmarkId::new(policy.name(), n), |bench| {
                bench.iter(|| {
                    let p = b.pick(Some(black_box(hashes)), PICK_MS).expect("pick");
                    b.release(p.ticket, PICK_MS)
                });
            });
            assert_eq!(b.open_tickets(), 0);
        }
    }
    for (policy, hashes) in cases {
        let mut b = worker_balancer(policy, 1000, &chain);
        let id = BenchmarkId::new(format!("{}_workers", policy.name()), 1000);
        group.bench_function(id, |bench| {
            bench.iter(|| {
                let p = b.pick(Some(black_box(hashes)), PICK_MS).expect("pick");
                b.release(p.ticket, PICK_MS)
            });
        });
    }
    // A chain nobody holds: every level misses and is then recorded (evicting old entries).
    for n in [8, 1000] {
        let mut b = balancer(Policy::PrefixCache, n, &chain);
        let mut rng = Mix(4242);
        group.bench_function(BenchmarkId::new("prefix_cache_miss", n), |bench| {
            bench.iter_batched(
                || random_chain(&mut rng, chain.len()),
                |fresh| {
                    let p = b.pick(Some(&fresh), PICK_MS).expect("pick");
                    b.release(p.ticket, PICK_MS);
                    fresh
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();

    let mut group = c.benchmark_group("pick_only");
    group.throughput(Throughput::Elements(1));
    for (policy, hashes) in cases {
        for n in [8, 1000] {
            let mut b = balancer(policy, n, &chain);
            let mut tickets = Vec::with_capacity(PICK_BURST as usize);
            group.bench_function(BenchmarkId::new(policy.name(), n), |bench| {
                bench.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let burst = left.min(PICK_BURST);
                        let start = Instant::now();
                        for _ in 0..burst {
                            tickets.push(
                                b.pick(Some(black_box(hashes)), PICK_MS)
                                    .expect("pick")
                                    .ticket,
                            );
                        }
                        total += start.elapsed();
                        for t in tickets.drain(..) {
                            b.release(t, PICK_MS);
                        }
                        left -= burst;
                    }
                    total
                });
            });
            assert_eq!(b.open_tickets(), 0);
        }
    }
    group.finish();

    let mut group = c.benchmark_group("release");
    group.throughput(Throughput::Elements(1));
    let mut b = balancer(Policy::GlobalLeastRequest, 8, &chain);
    group.bench_function("unknown_ticket", |bench| {
        bench.iter(|| b.release(black_box(0), PICK_MS));
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// The prefix table on its own.

const TABLE_CAPACITY: usize = 262_144;
const TABLE_ENTRIES: usize = 100_000;
const TTL_S: u64 = 1_800;

/// A table of ~100k entries from 64-level chains recorded on random endpoints of 1,000.
fn warm_table(rng: &mut Mix) -> PrefixTable {
    let mut t = PrefixTable::new(TABLE_CAPACITY, TTL_S);
    while t.len() < TABLE_ENTRIES {
        let chain = random_chain(rng, WARM_LEVELS);
        t.record(&chain, rng.below(1000) as u32, NOW_MS);
    }
    t
}

fn bench_prefix_table(c: &mut Criterion) {
    let mut rng = Mix(2024);
    let mut group = c.benchmark_group("prefix_table");
    group.throughput(Throughput::Elements(1));
    for levels in [64, 2048] {
        let mut t = warm_table(&mut rng);
        let held = random_chain(&mut rng, levels);
        t.record(&held, 7, NOW_MS);
        // Shares the first half with `held`, then diverges.
        let mut partial = held[..levels / 2].to_vec();
        partial.extend(random_chain(&mut rng, levels - levels / 2));
        // Held by four endpoints, as a shared system prompt would be.
        let shared = random_chain(&mut rng, levels);
        for e in [11, 12, 13, 14] {
            t.record(&shared, e, NOW_MS);
        }
        let missing = random_chain(&mut rng, levels);

        let cases: [(&str, &[u64], usize, u32); 4] = [
            ("hit", &held, 1, levels as u32),
            ("hit_4_holders", &shared, 4, levels as u32),
            ("partial", &partial, 1, (levels / 2) as u32),
            ("miss", &missing, 0, 0),
        ];
        let mut out = Vec::new();
        for (case, hashes, holders, depth) in cases {
            t.match_depths(hashes, NOW_MS, &mut out);
            assert_eq!(out.len(), holders, "{case}/{levels}");
            assert!(
                out.iter().all(|&(_, d)| d == depth),
                "{case}/{levels}: {out:?}"
            );
            group.bench_function(format!("match_depths/{case}/{levels}"), |b| {
                b.iter(|| {
                    t.match_depths(black_box(hashes), NOW_MS, &mut out);
                    out.len()
                });
            });
        }
    }

    // `record` of 64 levels: re-recording a held chain (the prefix-hit path of a pick) and
    // recording a new chain into a full table (every level inserted, one eviction each).
    let mut t = warm_table(&mut rng);
    let held = random_chain(&mut rng, 64);
    t.record(&held, 7, NOW_MS);
    group.bench_function("record/existing/64", |b| {
        b.iter(|| t.record(black_box(&held), 7, NOW_MS));
    });
    // Full tables of 100k entries and of the default capacity (262,144): the second is the steady
    // state of a busy balancer, and shows what a larger working set costs per insert.
    for capacity in [TABLE_ENTRIES, BalancerConfig::default().prefix_capacity] {
        let mut full = PrefixTable::new(capacity, TTL_S);
        while full.len() < full.capacity() {
            let chain = random_chain(&mut rng, WARM_LEVELS);
            full.record(&chain, rng.below(1000) as u32, NOW_MS);
        }
        let name = if capacity == TABLE_ENTRIES {
            "new"
        } else {
            "new_default_capacity"
        };
        group.bench_function(format!("record/{name}/64"), |b| {
            b.iter_batched(
                || random_chain(&mut rng, 64),
                |fresh| {
                    full.record(&fresh, 7, NOW_MS);
                    fresh
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Engine metrics pages.

const METRICS_PAGE_BYTES: usize = 100 * 1024;
const METRICS_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
/// Data-parallel engines on the page; each repeats every vLLM series with its `engine` label.
const METRICS_ENGINES: u64 = 3;

const LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const TPOT_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
];
const ITERATION_BUCKETS: [f64; 13] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
const N_BUCKETS: [f64; 5] = [1.0, 2.0, 5.0, 10.0, 20.0];

/// vLLM's histograms: (name, help, buckets).
const METRICS_HISTOGRAMS: [(&str, &str, &[f64]); 13] = [
    (
        "iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        &ITERATION_BUCKETS,
    ),
    (
        "time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &TTFT_BUCKETS,
    ),
    (
        "time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        &TPOT_BUCKETS,
    ),
    (
        "inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &TPOT_BUCKETS,
    ),
    (
        "e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &LATENCY_BUCKETS,
    ),
    (
        "request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &LATENCY_BUCKETS,
    ),
    (
        "request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        &LATENCY_BUCKETS,
    ),
    (
        "request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        &LATENCY_BUCKETS,
    ),
    (
        "request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        &LATENCY_BUCKETS,
    ),
    (
        "request_prompt_tokens",
        "Number of prefill tokens processed.",
        &TOKEN_BUCKETS,
    ),
    (
        "request_generation_tokens",
        "Number of generation tokens processed.",
        &TOKEN_BUCKETS,
    ),
    (
        "request_params_max_tokens",
        "Histogram of the max_tokens request parameter.",
        &TOKEN_BUCKETS,
    ),
    (
        "request_params_n",
        "Histogram of the n request parameter.",
        &N_BUCKETS,
    ),
];

/// A float as prometheus_client writes it (`12.0`, `0.3`, `1.7e+09` is not needed here).
fn prom_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Writes a vLLM `/metrics` page the way prometheus_client lays it out.
struct MetricsPage {
    out: String,
    rng: Mix,
}

impl MetricsPage {
    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        use std::fmt::Write as _;
        let _ = self.out.write_fmt(args);
        self.out.push('\n');
    }

    fn family(&mut self, name: &str, help: &str, kind: &str) {
        self.line(format_args!("# HELP {name} {help}\n# TYPE {name} {kind}"));
    }

    /// The labels of one data-parallel engine's series.
    fn labels(engine: u64) -> String {
        format!("engine=\"{engine}\",model_name=\"{METRICS_MODEL}\"")
    }

    /// What prometheus_client exposes by itself: GC, platform and process metrics.
    fn process(&mut self) {
        self.family(
            "python_gc_objects_collected_total",
            "Objects collected during gc",
            "counter",
        );
        for (generation, collected) in [(0, 11_532), (1, 1_843), (2, 907)] {
            self.line(format_args!(
                "python_gc_objects_collected_total{{generation=\"{generation}\"}} {collected}.0"
            ));
        }
        self.family("python_info", "Python platform information", "gauge");
        self.line(format_args!(
            "python_info{{implementation=\"CPython\",major=\"3\",minor=\"12\",patchlevel=\"8\",version=\"3.12.8\"}} 1.0"
        ));
        for (name, value) in [
            ("process_virtual_memory_bytes", "6.4923648e+010"),
            ("process_resident_memory_bytes", "3.912953856e+09"),
            ("process_start_time_seconds", "1.73180042413e+09"),
            ("process_cpu_seconds_total", "1843.27"),
            ("process_open_fds", "142.0"),
            ("process_max_fds", "1.048576e+06"),
        ] {
            self.family(name, "Process metric.", "gauge");
            self.line(format_args!("{name} {value}"));
        }
    }

    /// The load gauges (both KV-usage names) and the LoRA info series.
    fn gauges(&mut self) {
        for (name, help) in [
            (
                "num_requests_running",
                "Number of requests in model execution batches.",
            ),
            (
                "num_requests_waiting",
                "Number of requests waiting to be processed.",
            ),
            (
                "kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            ),
            (
                "gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.",
            ),
        ] {
            self.family(&format!("vllm:{name}"), help, "gauge");
            for engine in 0..METRICS_ENGINES {
                let value = if name.ends_with("_perc") {
                    self.rng.below(1000) as f64 / 1000.0
                } else {
                    self.rng.below(64) as f64
                };
                let labels = Self::labels(engine);
                self.line(format_args!(
                    "vllm:{name}{{{labels}}} {}",
                    prom_float(value)
                ));
            }
        }
        self.family(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            "gauge",
        );
        self.line(format_args!(
            "vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"sql-lora,chat-lora\",waiting_lora_adapters=\"\"}} 1.7318004531e+09"
        ));
    }

    /// Counters, each with its `_created` samples.
    fn counters(&mut self) {
        for (name, help) in [
            (
                "num_preemptions",
                "Cumulative number of preemption from the engine.",
            ),
            ("prompt_tokens", "Number of prefill tokens processed."),
            (
                "generation_tokens",
                "Number of generation tokens processed.",
            ),
            (
                "prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
            ),
            (
                "prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
            ),
        ] {
            self.family(&format!("vllm:{name}_total"), help, "counter");
            for engine in 0..METRICS_ENGINES {
                let value = prom_float(self.rng.below(10_000_000) as f64);
                let labels = Self::labels(engine);
                self.line(format_args!("vllm:{name}_total{{{labels}}} {value}"));
            }
            for engine in 0..METRICS_ENGINES {
                let labels = Self::labels(engine);
                self.line(format_args!(
                    "vllm:{name}_created{{{labels}}} 1.7318004236e+09"
                ));
            }
        }
        self.family(
            "vllm:request_success_total",
            "Count of successfully processed requests.",
            "counter",
        );
        for engine in 0..METRICS_ENGINES {
            for reason in ["stop", "length", "abort"] {
                let value = prom_float(self.rng.below(100_000) as f64);
                let labels = Self::labels(engine);
                self.line(format_args!(
                    "vllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {value}"
                ));
            }
        }
    }

    /// The request histograms, every bucket of every engine.
    fn histograms(&mut self) {
        for (name, help, buckets) in METRICS_HISTOGRAMS {
            self.family(&format!("vllm:{name}"), help, "histogram");
            for engine in 0..METRICS_ENGINES {
                let mut count = 0;
                let bounds = buckets.iter().map(|&b| prom_float(b));
                for le in bounds.chain(["+Inf".to_owned()]) {
                    count += self.rng.below(500);
                    self.line(format_args!(
                        "vllm:{name}_bucket{{engine=\"{engine}\",le=\"{le}\",model_name=\"{METRICS_MODEL}\"}} {}",
                        prom_float(count as f64)
                    ));
                }
                let labels = Self::labels(engine);
                let sum = count as f64 * (self.rng.below(10_000) as f64 / 1000.0);
                self.line(format_args!(
                    "vllm:{name}_count{{{labels}}} {}",
                    prom_float(count as f64)
                ));
                self.line(format_args!("vllm:{name}_sum{{{labels}}} {sum}"));
            }
            for engine in 0..METRICS_ENGINES {
                let labels = Self::labels(engine);
                self.line(format_args!(
                    "vllm:{name}_created{{{labels}}} 1.7318004236e+09"
                ));
            }
        }
    }
}

/// A vLLM `/metrics` page of about 100 KB, as a 3-way data-parallel server exposes it.
fn vllm_metrics_page(seed: u64) -> Vec<u8> {
    let mut page = MetricsPage {
        out: String::with_capacity(METRICS_PAGE_BYTES + 8192),
        rng: Mix(seed),
    };
    page.process();
    page.gauges();
    page.counters();
    page.histograms();
    page.out.into_bytes()
}

fn bench_engine_metrics(c: &mut Criterion) {
    let page = vllm_metrics_page(100);
    assert!(
        (METRICS_PAGE_BYTES * 9 / 10..=METRICS_PAGE_BYTES * 11 / 10).contains(&page.len()),
        "the generated page is {} bytes",
        page.len()
    );
    let (engine, m) = parse_engine_metrics(&page, None).expect("the page parses");
    assert_eq!(engine, Engine::Vllm);
    assert_eq!(m.lines_skipped, 0);
    assert!(m.waiting.is_some() && m.running.is_some() && m.kv_cache_usage.is_some());
    assert_eq!(m.running_lora_adapters, ["sql-lora", "chat-lora"]);
    println!(
        "llmlb-bench-metrics bytes={} lines={} waiting={:?} running={:?} kv={:?}",
        page.len(),
        memchr::memchr_iter(b'\n', &page).count(),
        m.waiting,
        m.running,
        m.kv_cache_usage
    );

    let mut group = c.benchmark_group("engine_metrics");
    group.throughput(Throughput::Bytes(page.len() as u64));
    group.bench_function("vllm_100kb", |b| {
        b.iter(|| parse_engine_metrics(black_box(&page), None).expect("parses"));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Bounded run; `--warm-up-time` / `--measurement-time` on the command line override these.
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench_parse, bench_pick, bench_prefix_table, bench_engine_metrics
}
criterion_main!(benches);
