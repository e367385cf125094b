//! Chained prefix hashes of a prompt.
//!
//! The prompt is a sequence of segments (one per chat message, or per completions prompt). Each
//! segment is serialised canonically as `tag, bytes, u32 little-endian length` per field (role
//! first, then content, then the rest), so `[A, B]` and `[B, A]` differ and no field can run
//! into the next (a segment decodes uniquely from its end, which the end flag marks), while
//! prompts that share the start of a long field share its leading blocks. The serialisation is cut into blocks of at most `block_size` bytes; a segment's
//! last block is closed at the segment's end and flagged as such, so a long message splits into
//! several blocks and a long shared system prompt still matches partially.
//!
//! `h_0 = xxh3_64(model, seed = MODEL_SEED)` and `h_i = xxh3_64(le64(h_{i-1}) || block_i || flag)`:
//! every hash identifies the whole prefix up to its block, so different models never share keys,
//! order matters and repeated blocks do not cancel (unlike an XOR chain).

use std::borrow::Cow;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Bytes of canonical prompt per prefix block (about 128 tokens of English text).
pub const DEFAULT_BLOCK_SIZE: usize = 512;

/// Domain separation for the model seed ("llmlb/v2": lengths after the bytes since v2, so
/// prefix keys written by v1 never match).
const MODEL_SEED: u64 = 0x6c6c_6d6c_622f_7632;

const FLAG_CONTINUES: u8 = 0;
const FLAG_SEGMENT_END: u8 = 1;

/// A tagged field of a segment, borrowed from the body where possible.
pub type Field<'a> = (u8, Cow<'a, [u8]>);

/// The prompt as segments (one per message, or per completions prompt) of tagged fields, kept
/// in one flat vector so parsing a request does not allocate per message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prompt<'a> {
    fields: Vec<Field<'a>>,
    ends: Vec<usize>,
}

impl<'a> Prompt<'a> {
    /// Index where the next field goes (the start of the segment being built).
    pub fn mark(&self) -> usize {
        self.fields.len()
    }

    pub fn push(&mut self, tag: u8, bytes: Cow<'a, [u8]>) {
        self.fields.push((tag, bytes));
    }

    /// The fields of the segment being built, which starts at `start` (from `mark`).
    pub fn open_segment(&mut self, start: usize) -> &mut [Field<'a>] {
        &mut self.fields[start..]
    }

    /// Drops the open segment's fields (from `start`) whose tag matches.
    pub fn remove_open(&mut self, start: usize, mut drop: impl FnMut(u8) -> bool) {
        let mut i = start;
        while i < self.fields.len() {
            if drop(self.fields[i].0) {
                self.fields.remove(i);
            } else {
                i += 1;
            }
        }
    }

    pub fn end_segment(&mut self) {
        self.ends.push(self.fields.len());
    }

    /// A one-field segment.
    pub fn push_segment(&mut self, tag: u8, bytes: Cow<'a, [u8]>) {
        self.push(tag, bytes);
        self.end_segment();
    }

    pub fn segments(&self) -> impl Iterator<Item = &[Field<'a>]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(a, b)| &self.fields[a..b])
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

pub struct PrefixHasher {
    block_size: usize,
    prev: u64,
    /// `le64(prev)` followed by the block's bytes so far.
    block: Vec<u8>,
    out: Vec<u64>,
}

const HEADER: usize = 8;

impl PrefixHasher {
    pub fn new(model: &[u8], block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let prev = xxh3_64_with_seed(model, MODEL_SEED);
        let mut block = Vec::with_capacity(HEADER + block_size + 1);
        block.extend_from_slice(&prev.to_le_bytes());
        Self {
            block_size,
            prev,
            block,
            out: Vec::new(),
        }
    }

    pub fn segment(&mut self, fields: &[Field<'_>]) {
        for (tag, bytes) in fields {
            // The length goes after the bytes: before them, a long message's first block would
            // depend on its total length, and two prompts sharing 6 KB of a message (a long
            // document, then different questions) would share no block at all.
            // Fields over 4 GiB cannot occur: bodies are far smaller.
            let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            self.feed(&[*tag]);
            self.feed(bytes);
            self.feed(&len.to_le_bytes());
        }
        self.close(FLAG_SEGMENT_END);
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // A full block is closed only when more bytes follow, so a segment that ends exactly
            // on a block boundary still gets its end flag.
            if self.block.len() - HEADER == self.block_size {
                self.close(FLAG_CONTINUES);
            }
            let room = self.block_size - (self.block.len() - HEADER);
            let take = room.min(bytes.len());
            self.block.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
    }

    fn close(&mut self, flag: u8) {
        self.block.push(flag);
        let h = xxh3_64(&self.block);
        self.out.push(h);
        self.prev = h;
        self.block.clear();
        self.block.extend_from_slice(&h.to_le_bytes());
    }

    pub fn finish(self) -> Vec<u64> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(model: &str, block: usize, segments: &[&[(u8, &str)]]) -> Vec<u64> {
        let mut h = PrefixHasher::new(model.as_bytes(), block);
        for seg in segments {
            let fields: Vec<Field> = seg
                .iter()
                .map(|(t, s)| (*t, Cow::Borrowed(s.as_bytes())))
                .collect();
            h.segment(&fields);
        }
        h.finish()
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
    fn model_seeds_the_chain() {
        let seg: &[(u8, &str)] = &[(b'r', "user"), (b'c', "hi")];
        assert_ne!(chain("a", 512, &[seg]), chain("b", 512, &[seg]));
    }
}
