//! Chained prefix hashes of a prompt (construction v3).
//!
//! The prompt is a sequence of segments (one per chat or Messages message, per completions
//! prompt or embeddings input, per Responses input item, per rerank / score field). Each segment
//! is serialised canonically as `tag, bytes, u32 little-endian length` per field (role first,
//! then content, then the rest), so `[A, B]` and `[B, A]` differ and no field can run
//! into the next (a segment decodes uniquely from its end, which the end flag marks), while
//! prompts that share the start of a long field share its leading blocks. The serialisation is
//! cut into blocks of at most `block_size` bytes; a segment's last block is closed at the
//! segment's end and flagged as such, so a long message splits into several blocks and a long
//! shared system prompt still matches partially.
//!
//! ```text
//! c_0   = PROMPT_SEED                                  (a constant: "llmlb/v3")
//! c_i   = xxh3_64(le64(c_{i-1}) || block_i || flag_i)
//! t     = xxh3_64_with_seed(tools framing, CONTEXT_SEED)
//!         (tools framing: absent (17 zero bytes), or `T, le64(len), le64(xxh3_64(raw tools JSON))`)
//! s     = t                                            when there is no system part
//!       = xxh3_64_with_seed(S, le64(len), le64(xxh3_64(system)), t)    when there is one
//!         (system: a string's decoded bytes, or an array's raw JSON)
//! ctx   = xxh3_64_with_seed(model, s)
//! key_i = xxh3_64_with_seed(le64(c_i), ctx)
//! ```
//!
//! The system part is a Messages `system` or a Responses `instructions`: SDKs serialise it after
//! the conversation (alphabetical or parameter order), so, like the tools, it is kept out of the
//! chain; a different system prompt gives disjoint keys. A body without one (every chat and
//! completions body) has the `ctx` it had before system parts existed.
//!
//! Segment tags by shape: chat / Messages message fields `r` (role), `c` (text content), `p`
//! (non-text content part, raw JSON), `i`, `n`, `x` (tool_call_id, name, tool_calls); a
//! completions or embeddings string `P`, token ids `K`; a Responses string `input` `P`, an
//! `input` item `I` (raw JSON); rerank / score fields (raw JSON) `Q` query, `U` queries, `D`
//! documents, `M` items, `1` / `2` text_1 / text_2, `3` / `4` data_1 / data_2, `N` input.
//!
//! Every `c_i` identifies the whole prompt up to its block; order matters and repeated blocks do
//! not cancel (unlike an XOR chain). The chain does not depend on the model or the tools, so a
//! body can be hashed in one pass whatever its key order (the OpenAI SDKs send `messages` before
//! `model` and `tools`); the context `ctx` is folded into every level at the end instead. The
//! same model, tools and leading blocks give the same keys; a different model or different tools
//! give disjoint keys. Tools are not part of the prompt chain: they occupy no leading blocks
//! (v2 hashed them as a leading segment).
//!
//! At most `max_blocks` levels are produced; once the cap is reached no more block hashing is
//! done (`PrefixHasher::feed` returns at once).

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

/// Bytes of canonical prompt per prefix block (about 128 tokens of English text).
pub const DEFAULT_BLOCK_SIZE: usize = 512;

/// `c_0`, the chain's domain seed: "llmlb/v3" (v3: the model and tools moved out of the chain
/// into `ctx`, so keys written by v2 never match).
pub const PROMPT_SEED: u64 = 0x6c6c_6d6c_622f_7633;

/// Seed of the context hash (a different domain from the chain).
const CONTEXT_SEED: u64 = 0x6c6c_6d6c_6263_7478;

const FLAG_CONTINUES: u8 = 0;
const FLAG_SEGMENT_END: u8 = 1;

/// Bytes of `le64(c_{i-1})` at the start of the block buffer.
const HEADER: usize = 8;

/// The prompt chain: fed the canonical serialisation as it is decoded, a piece at a time.
#[derive(Debug, Clone)]
pub struct PrefixHasher {
    block_size: usize,
    max_blocks: usize,
    /// `le64(c_{i-1})` followed by the current block's bytes so far.
    block: Vec<u8>,
    /// `c_1 ..= c_n`; turned into keys by `finish`.
    chain: Vec<u64>,
    /// Canonical prompt bytes up to the end of each level (`ends[i]` for `c_{i+1}`): how much of
    /// the prompt an endpoint holding `i + 1` levels has (see `finish_with_ends`).
    ends: Vec<u64>,
    /// Canonical bytes placed in blocks so far (the blocks' running offset).
    hashed: u64,
    /// While muted, `feed` and `end_segment` do nothing (a `prompt` parsed after `messages`).
    muted: bool,
    /// Canonical prompt bytes fed (while not muted), past `max_blocks` too: the prompt's size,
    /// which the load model turns into tokens.
    bytes: u64,
}

impl PrefixHasher {
    pub fn new(block_size: usize, max_blocks: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let mut block = Vec::with_capacity(HEADER + block_size + 1);
        block.extend_from_slice(&PROMPT_SEED.to_le_bytes());
        Self {
            block_size,
            max_blocks,
            block,
            chain: Vec::new(),
            ends: Vec::new(),
            hashed: 0,
            muted: false,
            bytes: 0,
        }
    }

    /// Starts the chain again from `c_0` (a later `messages` or `prompt` key replaces the first).
    pub fn reset(&mut self) {
        self.block.clear();
        self.block.extend_from_slice(&PROMPT_SEED.to_le_bytes());
        self.chain.clear();
        self.ends.clear();
        self.hashed = 0;
        self.bytes = 0;
    }

    /// Canonical prompt bytes fed so far (the whole prompt, not only the hashed blocks).
    pub fn prompt_bytes(&self) -> u64 {
        self.bytes
    }

    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    /// True once no more bytes can change the output (muted, or `max_blocks` levels produced).
    #[inline]
    pub fn is_idle(&self) -> bool {
        self.muted || self.chain.len() >= self.max_blocks
    }

    /// Appends bytes of the canonical serialisation.
    #[inline]
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.muted {
            return;
        }
        self.bytes += bytes.len() as u64;
        if self.chain.len() >= self.max_blocks {
            return;
        }
        // Fast path: the bytes fit in the open block (a full block is closed lazily, below).
        let room = self.block_size - (self.block.len() - HEADER);
        if bytes.len() <= room {
            self.hashed += bytes.len() as u64;
            if bytes.len() <= 8 {
                // Tags, lengths and decoded escapes: cheaper than a call to memcpy.
                for &b in bytes {
                    self.block.push(b);
                }
            } else {
                self.block.extend_from_slice(bytes);
            }
            return;
        }
        self.feed_blocks(bytes);
    }

    fn feed_blocks(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // A full block is closed only when more bytes follow, so a segment that ends exactly
            // on a block boundary still gets its end flag.
            let filled = self.block.len() - HEADER;
            if filled == self.block_size {
                self.close(FLAG_CONTINUES);
                if self.chain.len() >= self.max_blocks {
                    return;
                }
                continue;
            }
            let take = (self.block_size - filled).min(bytes.len());
            self.block.extend_from_slice(&bytes[..take]);
            self.hashed += take as u64;
            bytes = &bytes[take..];
        }
    }

    /// Appends the length suffix of a field of `len` bytes.
    #[inline]
    pub fn feed_len(&mut self, len: u64) {
        // Fields over 4 GiB cannot occur in practice; they saturate.
        self.feed(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    }

    /// One whole field: `tag, bytes, u32 length`.
    pub fn field(&mut self, tag: u8, bytes: &[u8]) {
        // The length goes after the bytes: before them, a long message's first block would
        // depend on its total length, and two prompts sharing 6 KB of a message (a long
        // document, then different questions) would share no block at all.
        self.feed(&[tag]);
        self.feed(bytes);
        self.feed_len(bytes.len() as u64);
    }

    /// Closes the current segment (a message, or one completions prompt).
    pub fn end_segment(&mut self) {
        if !self.is_idle() {
            self.close(FLAG_SEGMENT_END);
        }
    }

    fn close(&mut self, flag: u8) {
        self.block.push(flag);
        let c = xxh3_64(&self.block);
        self.chain.push(c);
        self.ends.push(self.hashed);
        self.block.clear();
        self.block.extend_from_slice(&c.to_le_bytes());
    }

    /// Levels produced so far.
    pub fn len(&self) -> usize {
        self.chain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chain.is_empty()
    }

    /// Heap bytes held.
    pub fn retained_bytes(&self) -> usize {
        self.block.capacity()
            + (self.chain.capacity() + self.ends.capacity()) * std::mem::size_of::<u64>()
    }

    /// The level keys: `key_i = xxh3_64_with_seed(le64(c_i), ctx)`.
    pub fn finish(self, ctx: u64) -> Vec<u64> {
        self.finish_with_ends(ctx).0
    }

    /// The level keys and, for each, the canonical prompt bytes up to its end.
    pub fn finish_with_ends(self, ctx: u64) -> (Vec<u64>, Vec<u64>) {
        let mut keys = self.chain;
        for c in &mut keys {
            *c = xxh3_64_with_seed(&c.to_le_bytes(), ctx);
        }
        (keys, self.ends)
    }
}

/// The context every key is namespaced by: the model, the raw `tools` JSON value and the system
/// part (Messages `system`, Responses `instructions`), which may arrive before or after the
/// prompt and in any order. Tools and the system part are hashed as they arrive.
#[derive(Clone, Default)]
pub struct ContextHasher {
    /// The streaming hash of the current `tools` value and its length so far (boxed: the
    /// streaming state is about 600 bytes and most requests have no tools).
    tools: Option<Box<(Xxh3, u64)>>,
    /// The same for the system part.
    system: Option<Box<(Xxh3, u64)>>,
}

impl std::fmt::Debug for ContextHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextHasher")
            .field("tools_len", &self.tools.as_ref().map(|t| t.1))
            .field("system_len", &self.system.as_ref().map(|t| t.1))
            .finish()
    }
}

/// Starts a streamed part afresh (a repeated key replaces the earlier value).
fn begin_part(part: &mut Option<Box<(Xxh3, u64)>>) {
    match part {
        Some(t) => **t = (Xxh3::new(), 0),
        None => *part = Some(Box::new((Xxh3::new(), 0))),
    }
}

/// `tag, le64(len), le64(xxh3_64(bytes))` of a present part; all zeros when absent.
fn framing(tag: u8, part: Option<&(Xxh3, u64)>) -> [u8; 17] {
    let mut framed = [0u8; 17];
    if let Some(t) = part {
        framed[0] = tag;
        framed[1..9].copy_from_slice(&t.1.to_le_bytes());
        framed[9..].copy_from_slice(&t.0.digest().to_le_bytes());
    }
    framed
}

impl ContextHasher {
    /// A `tools` value starts (a repeated key replaces the earlier value).
    pub fn begin_tools(&mut self) {
        begin_part(&mut self.tools);
    }

    /// Length of the `tools` value (rendered into the prompt by chat templates), 0 when absent.
    pub fn tools_len(&self) -> u64 {
        self.tools.as_ref().map_or(0, |t| t.1)
    }

    /// Raw bytes of the `tools` value, in order.
    #[inline]
    pub fn tools_bytes(&mut self, bytes: &[u8]) {
        if let Some(t) = &mut self.tools {
            t.0.update(bytes);
            t.1 += bytes.len() as u64;
        }
    }

    /// A system part starts (a repeated key replaces the earlier value).
    pub fn begin_system(&mut self) {
        begin_part(&mut self.system);
    }

    /// The system part is absent after all (a later `null`).
    pub fn clear_system(&mut self) {
        self.system = None;
    }

    /// Length of the system part, 0 when absent.
    pub fn system_len(&self) -> u64 {
        self.system.as_ref().map_or(0, |t| t.1)
    }

    /// Bytes of the system part, in order: a string's decoded bytes, or an array's raw JSON.
    #[inline]
    pub fn system_bytes(&mut self, bytes: &[u8]) {
        if let Some(t) = &mut self.system {
            t.0.update(bytes);
            t.1 += bytes.len() as u64;
        }
    }

    /// `ctx` for `model`: `xxh3_64_with_seed(model, seed)`, where `seed` hashes the fixed-size
    /// framing of the tools (absent, or present with their length and xxh3 digest), then, only
    /// when a system part is present, its framing the same way. The model is the whole input of
    /// the outer hash, so the parts cannot run into each other; without a system part `ctx` is
    /// what it was before system parts existed.
    pub fn ctx(&self, model: &[u8]) -> u64 {
        let tools_seed = xxh3_64_with_seed(&framing(b'T', self.tools.as_deref()), CONTEXT_SEED);
        let seed = match self.system.as_deref() {
            Some(system) => xxh3_64_with_seed(&framing(b'S', Some(system)), tools_seed),
            None => tools_seed,
        };
        xxh3_64_with_seed(model, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNCAPPED: usize = usize::MAX;

    fn chain_with(
        model: &str,
        tools: Option<&str>,
        block: usize,
        max_blocks: usize,
        segments: &[&[(u8, &str)]],
    ) -> Vec<u64> {
        let mut h = PrefixHasher::new(block, max_blocks);
        for seg in segments {
            for (tag, s) in *seg {
                h.field(*tag, s.as_bytes());
            }
            h.end_segment();
        }
        let mut ctx = ContextHasher::default();
        if let Some(tools) = tools {
            ctx.begin_tools();
            ctx.tools_bytes(tools.as_bytes());
        }
        h.finish(ctx.ctx(model.as_bytes()))
    }

    fn chain(model: &str, block: usize, segments: &[&[(u8, &str)]]) -> Vec<u64> {
        chain_with(model, None, block, UNCAPPED, segments)
    }

    #[test]
    fn extension_keeps_the_prefix() {
        let a = chain(
            "m",
            512,
            &[
                &[(b'r', "system"), (b'c', "be brief")],
                &[(b'r', "user"), (b'c', "hi")],
            ],
        );
        let b = chain(
            "m",
            512,
            &[
                &[(b'r', "system"), (b'c', "be brief")],
                &[(b'r', "user"), (b'c', "hi")],
                &[(b'r', "assistant")],
            ],
        );
        assert_eq!(a, b[..a.len()]);
        assert_eq!(b.len(), a.len() + 1);
    }

    #[test]
    fn order_matters_and_repeats_do_not_cancel() {
        let a: &[(u8, &str)] = &[(b'r', "user"), (b'c', "A")];
        let b: &[(u8, &str)] = &[(b'r', "user"), (b'c', "B")];
        assert_ne!(
            chain("m", 512, &[a, b]).last(),
            chain("m", 512, &[b, a]).last()
        );
        let twice = chain("m", 512, &[a, a]);
        assert_ne!(twice[0], twice[1]);
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let a = chain("m", 512, &[&[(b'r', "us"), (b'c', "erhi")]]);
        let b = chain("m", 512, &[&[(b'r', "user"), (b'c', "hi")]]);
        assert_ne!(a, b);
    }

    #[test]
    fn long_content_splits_into_blocks_and_matches_partially() {
        let long_a = "x".repeat(100) + "A";
        let long_b = "x".repeat(100) + "B";
        let a = chain("m", 16, &[&[(b'r', "system"), (b'c', &long_a)]]);
        let b = chain("m", 16, &[&[(b'r', "system"), (b'c', &long_b)]]);
        // 1 + 6 + 4 + 1 + 101 + 4 = 117 bytes -> 8 blocks of 16.
        assert_eq!(a.len(), 8);
        assert_eq!(a[..7], b[..7]);
        assert_ne!(a[7], b[7]);
    }

    #[test]
    fn a_shared_start_matches_whatever_the_field_s_total_length() {
        // A long shared document, then questions of different lengths (the shared_prefix shape).
        let doc = "d".repeat(200);
        let a = chain(
            "m",
            16,
            &[&[(b'r', "user"), (b'c', &(doc.clone() + "why?"))]],
        );
        let b = chain(
            "m",
            16,
            &[&[(b'r', "user"), (b'c', &(doc + "and how, exactly?"))]],
        );
        // The role field (1 + 4 + 4) and the content tag come first: 210 shared bytes, so the
        // first 13 whole blocks agree.
        assert_eq!(a[..13], b[..13]);
        assert_ne!(a[13], b[13]);
    }

    #[test]
    fn segment_end_on_block_boundary_differs_from_continuation() {
        // One segment of exactly 2 blocks vs. the same bytes as two segments of one block each.
        let one = chain("m", 11, &[&[(b'r', "abcdef"), (b'c', "ghijkl")]]);
        let two = chain("m", 11, &[&[(b'r', "abcdef")], &[(b'c', "ghijkl")]]);
        assert_eq!(one.len(), 2);
        assert_eq!(two.len(), 2);
        assert_ne!(one[0], two[0]);
    }

    #[test]
    fn model_and_tools_give_disjoint_keys() {
        let seg: &[(u8, &str)] = &[(b'r', "user"), (b'c', &"hello ".repeat(300))];
        let base = chain_with("a", None, 64, UNCAPPED, &[seg]);
        let variants = [
            chain_with("b", None, 64, UNCAPPED, &[seg]),
            chain_with("a", Some("[]"), 64, UNCAPPED, &[seg]),
            chain_with("a", Some(r#"[{"type":"function"}]"#), 64, UNCAPPED, &[seg]),
            // Framing: the model's bytes cannot be confused with the tools' presence.
            chain_with("a-", None, 64, UNCAPPED, &[seg]),
        ];
        for v in &variants {
            assert_eq!(v.len(), base.len());
            assert!(v.iter().all(|k| !base.contains(k)), "every level differs");
        }
        let same = chain_with("a", None, 64, UNCAPPED, &[seg]);
        assert_eq!(same, base);
    }

    #[test]
    fn tools_occupy_no_leading_block() {
        // Same prompt, with and without tools: same number of levels (v2 added a leading block).
        let seg: &[(u8, &str)] = &[(b'r', "user"), (b'c', "hi")];
        let plain = chain_with("m", None, 512, UNCAPPED, &[seg]);
        let tools = chain_with("m", Some(&"t".repeat(2000)), 512, UNCAPPED, &[seg]);
        assert_eq!(plain.len(), 1);
        assert_eq!(tools.len(), 1);
    }

    #[test]
    fn the_cap_truncates_the_chain_and_stops_hashing() {
        let long = "y".repeat(10_000);
        let segs: &[&[(u8, &str)]] = &[&[(b'r', "user"), (b'c', &long)], &[(b'r', "user")]];
        let full = chain_with("m", None, 64, UNCAPPED, segs);
        for cap in [0, 1, 5, full.len() - 1, full.len(), full.len() + 3] {
            let capped = chain_with("m", None, 64, cap, segs);
            assert_eq!(capped, full[..cap.min(full.len())], "cap {cap}");
        }
        let mut h = PrefixHasher::new(64, 2);
        h.feed(&[0; 1000]);
        assert_eq!(h.len(), 2);
        let before = h.block.clone();
        h.feed(&[1; 100]);
        h.end_segment();
        assert_eq!((h.len(), &h.block), (2, &before), "no work past the cap");
    }

    #[test]
    fn feeding_in_pieces_equals_feeding_whole() {
        let text = "abcdefghij".repeat(50);
        let mut whole = PrefixHasher::new(16, UNCAPPED);
        whole.field(b'c', text.as_bytes());
        whole.end_segment();
        let mut pieces = PrefixHasher::new(16, UNCAPPED);
        pieces.feed(b"c");
        for piece in text.as_bytes().chunks(7) {
            pieces.feed(piece);
        }
        pieces.feed_len(text.len() as u64);
        pieces.end_segment();
        assert_eq!(whole.finish(1), pieces.finish(1));
    }
}
