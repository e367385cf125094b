//! Streaming `Content-Encoding` decoding, and `BodyParser`: a decoder feeding a
//! `RequestParser` piece by piece.
//!
//! Codings: `identity`, `gzip` / `x-gzip` (members may be concatenated), `deflate` (zlib-wrapped
//! per RFC 9110; raw deflate too when the zlib header is absent, as some clients send it) and
//! `zstd`. A list such as `gzip, zstd` names the codings in the order they were applied, so they
//! are decoded in reverse; at most `MAX_CODINGS` are accepted. Anything else is
//! `ParseError::UnsupportedEncoding`.
//!
//! Compressed chunks go in, decoded bytes come out through a fixed 32 KiB buffer per coding and
//! go straight on to the parser, so the decoded body is never held whole. `max_bytes` bounds both
//! the raw bytes fed and the decoded bytes; a decompression bomb is stopped within one buffer of
//! the limit (zstd: within its window, at most 8 MiB) without its output being allocated.
//!
//! Crates: `flate2` with its default pure-Rust `miniz_oxide` backend for deflate (gzip framing
//! is read here, so truncation, the CRC and trailing data are all checked). For zstd, `ruzstd`
//! (pure Rust) rather than `zstd` (bindings that build the C libzstd): no C toolchain in the
//! build, and no C code parsing hostile input; it is slower than libzstd, which matters little
//! next to the network for request bodies. Its push API needs whole blocks, so the zstd framing
//! (frame headers, block headers) is read here and blocks (at most 128 KiB) are handed over one
//! at a time.

use std::io::Read as _;

use flate2::{Crc, Decompress, FlushDecompress, Status};
use ruzstd::decoding::FrameDecoder;

use crate::request::{Limits, ParseError, ParsedRequest, RequestKind, RequestParser, TooLarge};

/// Content codings accepted in one `Content-Encoding` list (`identity` not counted).
pub const MAX_CODINGS: usize = 2;

/// Decoded bytes produced per step.
const OUT_BUFFER: usize = 32 * 1024;

/// The largest zstd window accepted: RFC 9659 bounds the HTTP `zstd` coding to 8 MiB.
const ZSTD_MAX_WINDOW: u64 = 8 << 20;

/// The largest zstd block (compressed or not), per RFC 8878.
const ZSTD_MAX_BLOCK: usize = 128 * 1024;

/// The longest gzip header accepted (the optional name, comment and extra field included).
const GZIP_MAX_HEADER: usize = 64 * 1024;

/// A content coding, as named in `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Zstd,
}

/// Reads a `Content-Encoding` value: the codings in the order they were applied (`identity`
/// and empty entries dropped).
pub fn parse_content_encoding(value: &str) -> Result<Vec<Coding>, ParseError> {
    let mut codings = Vec::new();
    for token in value.split(',') {
        let name = token.trim_matches([' ', '\t']);
        let coding = if name.is_empty() || name.eq_ignore_ascii_case("identity") {
            continue;
        } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            Coding::Gzip
        } else if name.eq_ignore_ascii_case("deflate") {
            Coding::Deflate
        } else if name.eq_ignore_ascii_case("zstd") {
            Coding::Zstd
        } else {
            let shown: String = name.chars().take(64).collect();
            return Err(ParseError::UnsupportedEncoding(shown));
        };
        if codings.len() == MAX_CODINGS {
            return Err(ParseError::UnsupportedEncoding(format!(
                "more than {MAX_CODINGS} codings in {:?}",
                value.chars().take(64).collect::<String>()
            )));
        }
        codings.push(coding);
    }
    Ok(codings)
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Halt {
    TooLarge,
    Corrupt(String),
}

fn corrupt(message: impl Into<String>) -> Halt {
    Halt::Corrupt(message.into())
}

type Out<'a> = &'a mut dyn FnMut(&[u8]) -> Result<(), Halt>;

/// Inflates as much of `input` as it can, handing out every piece of output; returns the bytes
/// consumed and whether the deflate stream ended.
fn inflate(
    d: &mut Decompress,
    mut input: &[u8],
    buf: &mut [u8],
    out: Out<'_>,
) -> Result<(usize, bool), Halt> {
    let len = input.len();
    loop {
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress(input, buf, FlushDecompress::None)
            .map_err(|e| corrupt(format!("corrupt deflate stream: {e}")))?;
        let consumed = (d.total_in() - in_before) as usize;
        let produced = (d.total_out() - out_before) as usize;
        input = &input[consumed..];
        if produced > 0 {
            out(&buf[..produced])?;
        }
        if status == Status::StreamEnd {
            return Ok((len - input.len(), true));
        }
        if produced < buf.len() {
            if input.is_empty() {
                return Ok((len, false));
            }
            if consumed == 0 {
                return Err(corrupt("corrupt deflate stream: no progress"));
            }
        }
    }
}

/// `deflate`: zlib-wrapped, or raw when the first two bytes are not a zlib header.
struct Deflate {
    inner: Option<Decompress>,
    head: Vec<u8>,
    ended: bool,
    buf: Box<[u8]>,
}

fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

impl Deflate {
    fn new() -> Self {
        Self {
            inner: None,
            head: Vec::new(),
            ended: false,
            buf: vec![0; OUT_BUFFER].into_boxed_slice(),
        }
    }

    fn push(&mut self, mut input: &[u8], out: Out<'_>) -> Result<(), Halt> {
        if self.ended {
            return if input.is_empty() {
                Ok(())
            } else {
                Err(corrupt("data after the end of the deflate stream"))
            };
        }
        if self.inner.is_none() {
            let take = (2 - self.head.len()).min(input.len());
            self.head.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.head.len() < 2 {
                return Ok(());
            }
            let zlib = is_zlib_header(self.head[0], self.head[1]);
            self.inner = Some(Decompress::new(zlib));
            let head = std::mem::take(&mut self.head);
            self.run(&head, out)?;
        }
        self.run(input, out)
    }

    fn run(&mut self, input: &[u8], out: Out<'_>) -> Result<(), Halt> {
        if self.ended {
            return if input.is_empty() {
                Ok(())
            } else {
                Err(corrupt("data after the end of the deflate stream"))
            };
        }
        let d = self.inner.as_mut().expect("started");
        let (consumed, ended) = inflate(d, input, &mut self.buf, out)?;
        self.ended = ended;
        if ended && consumed < input.len() {
            return Err(corrupt("data after the end of the deflate stream"));
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), Halt> {
        if self.ended || (self.inner.is_none() && self.head.is_empty()) {
            Ok(())
        } else {
            Err(corrupt("truncated deflate stream"))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GzipPhase {
    Header,
    Body,
    Trailer,
}

/// `gzip`: members of header, raw deflate, CRC-32 and size.
struct Gzip {
    phase: GzipPhase,
    header: Vec<u8>,
    inflater: Decompress,
    crc: Crc,
    trailer: [u8; 8],
    trailer_len: usize,
    buf: Box<[u8]>,
}

/// The length of the gzip member header at the start of `buf`, `None` if more bytes are needed.
fn gzip_header_len(buf: &[u8]) -> Result<Option<usize>, Halt> {
    const MAGIC: [u8; 3] = [0x1f, 0x8b, 8];
    let known = buf.len().min(3);
    if buf[..known] != MAGIC[..known] {
        return Err(corrupt("not a gzip stream"));
    }
    if buf.len() < 10 {
        return Ok(None);
    }
    let flags = buf[3];
    if flags & 0xe0 != 0 {
        return Err(corrupt("reserved gzip header flags set"));
    }
    let mut pos = 10;
    if flags & 0x04 != 0 {
        let Some(xlen) = buf.get(pos..pos + 2) else {
            return Ok(None);
        };
        pos += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for flag in [0x08, 0x10] {
        // A zero-terminated file name, then comment.
        if flags & flag != 0 {
            match buf.get(pos..).and_then(|rest| memchr::memchr(0, rest)) {
                Some(n) => pos += n + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & 0x02 != 0 {
        pos += 2;
    }
    Ok((buf.len() >= pos).then_some(pos))
}

impl Gzip {
    fn new() -> Self {
        Self {
            phase: GzipPhase::Header,
            header: Vec::new(),
            inflater: Decompress::new(false),
            crc: Crc::new(),
            trailer: [0; 8],
            trailer_len: 0,
            buf: vec![0; OUT_BUFFER].into_boxed_slice(),
        }
    }

    fn push(&mut self, mut input: &[u8], out: Out<'_>) -> Result<(), Halt> {
        while !input.is_empty() {
            match self.phase {
                GzipPhase::Header => {
                    let before = self.header.len();
                    let take = input.len().min(GZIP_MAX_HEADER - before);
                    self.header.extend_from_slice(&input[..take]);
                    match gzip_header_len(&self.header)? {
                        Some(n) => {
                            input = &input[n - before..];
                            self.header.clear();
                            self.inflater.reset(false);
                            self.crc.reset();
                            self.phase = GzipPhase::Body;
                        }
                        None if self.header.len() >= GZIP_MAX_HEADER => {
                            return Err(corrupt("gzip header too long"));
                        }
                        None => input = &input[take..],
                    }
                }
                GzipPhase::Body => {
                    let crc = &mut self.crc;
                    let (consumed, ended) =
                        inflate(&mut self.inflater, input, &mut self.buf, &mut |piece| {
                            crc.update(piece);
                            out(piece)
                        })?;
                    input = &input[consumed..];
                    if ended {
                        self.trailer_len = 0;
                        self.phase = GzipPhase::Trailer;
                    }
                }
                GzipPhase::Trailer => {
                    let take = (8 - self.trailer_len).min(input.len());
                    self.trailer[self.trailer_len..self.trailer_len + take]
                        .copy_from_slice(&input[..take]);
                    self.trailer_len += take;
                    input = &input[take..];
                    if self.trailer_len == 8 {
                        let t = self.trailer;
                        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
                        let size = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
                        if crc != self.crc.sum() || size != self.crc.amount() {
                            return Err(corrupt("gzip CRC or size mismatch"));
                        }
                        // Another member may follow.
                        self.phase = GzipPhase::Header;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), Halt> {
        if self.phase == GzipPhase::Header && self.header.is_empty() {
            Ok(())
        } else {
            Err(corrupt("truncated gzip stream"))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZstdPhase {
    /// A frame header (or a skippable frame's) comes next.
    Frame,
    /// Blocks of the current frame.
    Block { checksum: bool },
    /// Bytes of a skippable frame left.
    Skip(u64),
}

/// How many bytes the next unit needs.
enum Need {
    /// At least this many to know the unit's length.
    AtLeast(usize),
    Exactly(usize),
}

/// `zstd`: the framing is read here, whole blocks go to `ruzstd`.
struct Zstd {
    decoder: FrameDecoder,
    phase: ZstdPhase,
    /// A unit (frame header, or block with its checksum) begun in an earlier chunk.
    pending: Vec<u8>,
    buf: Box<[u8]>,
}

const ZSTD_MAGIC: u32 = 0xFD2F_B528;

impl Zstd {
    fn new() -> Self {
        let mut decoder = FrameDecoder::new();
        decoder.set_max_window_size(ZSTD_MAX_WINDOW);
        Self {
            decoder,
            phase: ZstdPhase::Frame,
            pending: Vec::new(),
            buf: vec![0; OUT_BUFFER].into_boxed_slice(),
        }
    }

    fn need(&self, unit: &[u8]) -> Result<Need, Halt> {
        match self.phase {
            ZstdPhase::Frame => {
                let Some(magic) = unit.get(..4) else {
                    return Ok(Need::AtLeast(4));
                };
                let magic = u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]);
                if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
                    return Ok(Need::Exactly(8));
                }
                if magic != ZSTD_MAGIC {
                    return Err(corrupt("not a zstd frame"));
                }
                let Some(&descriptor) = unit.get(4) else {
                    return Ok(Need::AtLeast(5));
                };
                let single_segment = descriptor & 0x20 != 0;
                let dictionary = [0, 1, 2, 4][usize::from(descriptor & 3)];
                let content_size = match descriptor >> 6 {
                    0 => usize::from(single_segment),
                    1 => 2,
                    2 => 4,
                    _ => 8,
                };
                Ok(Need::Exactly(
                    5 + usize::from(!single_segment) + dictionary + content_size,
                ))
            }
            ZstdPhase::Block { checksum } => {
                let Some(h) = unit.get(..3) else {
                    return Ok(Need::AtLeast(3));
                };
                let header = u32::from_le_bytes([h[0], h[1], h[2], 0]);
                let last = header & 1 != 0;
                let size = (header >> 3) as usize;
                let content = match (header >> 1) & 3 {
                    0 | 2 => size,
                    1 => 1,
                    _ => return Err(corrupt("reserved zstd block type")),
                };
                if size > ZSTD_MAX_BLOCK {
                    return Err(corrupt("zstd block too large"));
                }
                Ok(Need::Exactly(
                    3 + content + if last && checksum { 4 } else { 0 },
                ))
            }
            ZstdPhase::Skip(_) => unreachable!("skipped without units"),
        }
    }

    fn unit(&mut self, unit: &[u8], out: Out<'_>) -> Result<(), Halt> {
        match self.phase {
            ZstdPhase::Frame => {
                let magic = u32::from_le_bytes([unit[0], unit[1], unit[2], unit[3]]);
                if magic != ZSTD_MAGIC {
                    let len = u32::from_le_bytes([unit[4], unit[5], unit[6], unit[7]]);
                    self.phase = ZstdPhase::Skip(u64::from(len));
                    return Ok(());
                }
                self.decoder
                    .reset(unit)
                    .map_err(|e| corrupt(format!("bad zstd frame header: {e}")))?;
                self.phase = ZstdPhase::Block {
                    checksum: unit[4] & 0x04 != 0,
                };
            }
            ZstdPhase::Block { checksum } => {
                let (read, written) = self
                    .decoder
                    .decode_from_to(unit, &mut self.buf)
                    .map_err(|e| corrupt(format!("corrupt zstd stream: {e}")))?;
                if read != unit.len() {
                    return Err(corrupt("corrupt zstd block"));
                }
                if written > 0 {
                    out(&self.buf[..written])?;
                }
                loop {
                    let n = self
                        .decoder
                        .read(&mut self.buf)
                        .map_err(|e| corrupt(format!("corrupt zstd stream: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    out(&self.buf[..n])?;
                }
                if self.decoder.is_finished() {
                    if checksum
                        && self.decoder.get_checksum_from_data()
                            != self.decoder.get_calculated_checksum()
                    {
                        return Err(corrupt("zstd checksum mismatch"));
                    }
                    self.phase = ZstdPhase::Frame;
                }
            }
            ZstdPhase::Skip(_) => unreachable!("skipped without units"),
        }
        Ok(())
    }

    fn push(&mut self, mut input: &[u8], out: Out<'_>) -> Result<(), Halt> {
        while !input.is_empty() {
            if let ZstdPhase::Skip(left) = self.phase {
                let take = (input.len() as u64).min(left);
                input = &input[take as usize..];
                self.phase = if take == left {
                    ZstdPhase::Frame
                } else {
                    ZstdPhase::Skip(left - take)
                };
                continue;
            }
            if self.pending.is_empty() {
                if let Need::Exactly(n) = self.need(input)? {
                    if n <= input.len() {
                        self.unit(&input[..n], out)?;
                        input = &input[n..];
                        continue;
                    }
                }
                // Less than one unit: at most a block (128 KiB) is held.
                self.pending.extend_from_slice(input);
                return Ok(());
            }
            let need = self.need(&self.pending)?;
            let (Need::AtLeast(n) | Need::Exactly(n)) = need;
            let take = n.saturating_sub(self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if matches!(need, Need::Exactly(n) if n == self.pending.len()) {
                let unit = std::mem::take(&mut self.pending);
                self.unit(&unit, out)?;
                self.pending = unit;
                self.pending.clear();
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), Halt> {
        if self.phase == ZstdPhase::Frame && self.pending.is_empty() {
            Ok(())
        } else {
            Err(corrupt("truncated zstd stream"))
        }
    }
}

/// One decoding step of the chain.
enum Stage {
    Gzip(Gzip),
    Deflate(Deflate),
    Zstd(Box<Zstd>),
}

impl Stage {
    fn new(coding: Coding) -> Self {
        match coding {
            Coding::Gzip => Stage::Gzip(Gzip::new()),
            Coding::Deflate => Stage::Deflate(Deflate::new()),
            Coding::Zstd => Stage::Zstd(Box::new(Zstd::new())),
        }
    }

    fn push(&mut self, input: &[u8], out: Out<'_>) -> Result<(), Halt> {
        match self {
            Stage::Gzip(s) => s.push(input, out),
            Stage::Deflate(s) => s.push(input, out),
            Stage::Zstd(s) => s.push(input, out),
        }
    }

    fn finish(&self) -> Result<(), Halt> {
        match self {
            Stage::Gzip(s) => s.finish(),
            Stage::Deflate(s) => s.finish(),
            Stage::Zstd(s) => s.finish(),
        }
    }

    /// The stage's own buffers (not the decompressor's internal state: 32 KiB of deflate
    /// window, or the zstd window of at most 8 MiB).
    fn retained_bytes(&self) -> usize {
        match self {
            Stage::Gzip(s) => s.buf.len() + s.header.capacity(),
            Stage::Deflate(s) => s.buf.len() + s.head.capacity(),
            Stage::Zstd(s) => s.buf.len() + s.pending.capacity(),
        }
    }
}

/// Pushes `input` through `stages` (in decoding order) into the parser.
fn run(stages: &mut [Stage], input: &[u8], parser: &mut RequestParser) -> Result<(), Halt> {
    match stages.split_first_mut() {
        None => parser.feed(input).map_err(|TooLarge| Halt::TooLarge),
        Some((stage, rest)) => stage.push(input, &mut |piece| run(rest, piece, parser)),
    }
}

/// A request body as it arrives: decoded per `Content-Encoding`, then parsed and prefix-hashed,
/// in bounded memory.
pub struct BodyParser {
    /// In decoding order (the reverse of the header's).
    stages: Vec<Stage>,
    parser: RequestParser,
    max_bytes: u64,
    raw_fed: u64,
    dead: bool,
    /// An unsupported encoding, or a corrupt stream: later chunks are ignored.
    error: Option<ParseError>,
}

impl std::fmt::Debug for BodyParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyParser")
            .field("stages", &self.stages.len())
            .field("raw_fed", &self.raw_fed)
            .field("error", &self.error)
            .field("parser", &self.parser)
            .finish_non_exhaustive()
    }
}

impl BodyParser {
    /// `encoding`: the `Content-Encoding` header value, if any. `max_bytes` bounds the raw and
    /// the decoded bytes alike; `max_blocks` the prefix levels.
    pub fn new(encoding: Option<&str>, max_bytes: u64, max_blocks: usize) -> Self {
        Self::with_limits(
            encoding,
            Limits {
                max_bytes,
                max_blocks,
                ..Limits::default()
            },
        )
    }

    /// A chat-completions or completions body.
    pub fn with_limits(encoding: Option<&str>, limits: Limits) -> Self {
        Self::for_kind(RequestKind::Chat, encoding, limits)
    }

    /// A body of `kind`'s shape. An `Other` body is neither decoded nor parsed (its encoding is
    /// not even read): only its raw bytes are counted against `max_bytes`.
    pub fn for_kind(kind: RequestKind, encoding: Option<&str>, limits: Limits) -> Self {
        let encoding = encoding.filter(|_| kind != RequestKind::Other);
        let (stages, error) = match encoding.map(parse_content_encoding) {
            None => (Vec::new(), None),
            Some(Ok(codings)) => (codings.into_iter().rev().map(Stage::new).collect(), None),
            Some(Err(e)) => (Vec::new(), Some(e)),
        };
        Self {
            stages,
            parser: RequestParser::for_kind(kind, limits),
            max_bytes: limits.max_bytes,
            raw_fed: 0,
            dead: false,
            error,
        }
    }

    /// Decodes and parses the next raw chunk. `Err(TooLarge)` once the raw or the decoded bytes
    /// pass `max_bytes`; the parser is dead from then on. Other problems are kept for `finish`.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), TooLarge> {
        if self.dead {
            return Err(TooLarge);
        }
        self.raw_fed = self.raw_fed.saturating_add(chunk.len() as u64);
        if self.raw_fed > self.max_bytes {
            self.die();
            return Err(TooLarge);
        }
        if self.error.is_some() {
            return Ok(());
        }
        match run(&mut self.stages, chunk, &mut self.parser) {
            Ok(()) => Ok(()),
            Err(Halt::TooLarge) => {
                self.die();
                Err(TooLarge)
            }
            Err(Halt::Corrupt(message)) => {
                self.error = Some(ParseError::Decode(message));
                self.stages = Vec::new();
                Ok(())
            }
        }
    }

    fn die(&mut self) {
        self.dead = true;
        self.stages = Vec::new();
    }

    /// Raw bytes fed so far.
    pub fn bytes_fed(&self) -> u64 {
        self.raw_fed
    }

    /// Heap bytes held: the parser's and the decoders' own buffers.
    pub fn retained_bytes(&self) -> usize {
        self.parser.retained_bytes() + self.stages.iter().map(Stage::retained_bytes).sum::<usize>()
    }

    /// The parsed request, or why the body is unusable.
    pub fn finish(self) -> Result<ParsedRequest, ParseError> {
        if self.dead {
            return Err(ParseError::TooLarge {
                max_bytes: self.max_bytes,
            });
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        for stage in &self.stages {
            if let Err(Halt::Corrupt(message)) = stage.finish() {
                return Err(ParseError::Decode(message));
            }
        }
        self.parser.finish()
    }
}

/// Decodes and parses a whole chat-completions or completions body (the buffered mode).
pub fn parse_body(
    body: &[u8],
    encoding: Option<&str>,
    max_bytes: u64,
    max_blocks: usize,
) -> Result<ParsedRequest, ParseError> {
    parse_body_for(RequestKind::Chat, body, encoding, max_bytes, max_blocks)
}

/// Decodes and parses a whole body of `kind`'s shape (the buffered mode): one `BodyParser`, one
/// feed.
pub fn parse_body_for(
    kind: RequestKind,
    body: &[u8],
    encoding: Option<&str>,
    max_bytes: u64,
    max_blocks: usize,
) -> Result<ParsedRequest, ParseError> {
    let limits = Limits {
        max_bytes,
        max_blocks,
        ..Limits::default()
    };
    let mut parser = BodyParser::for_kind(kind, encoding, limits);
    // A failed feed leaves the parser dead; `finish` reports it.
    let _ = parser.feed(body);
    parser.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use ruzstd::encoding::{compress_to_vec, CompressionLevel};

    use super::*;
    use crate::request::parse_request;

    const UNLIMITED: u64 = u64::MAX;

    fn body() -> Vec<u8> {
        let text = "All work and no play makes Jack a dull boy. caf\u{e9} ".repeat(400);
        format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"{text}"}},{{"role":"user","content":"hi"}}],"stream":true}}"#
        )
        .into_bytes()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        compress_to_vec(data, CompressionLevel::Fastest)
    }

    fn feed_in(
        encoding: Option<&str>,
        data: &[u8],
        chunk: usize,
        max_bytes: u64,
    ) -> Result<ParsedRequest, ParseError> {
        let mut p = BodyParser::new(encoding, max_bytes, usize::MAX);
        for piece in data.chunks(chunk.max(1)) {
            if p.feed(piece).is_err() {
                break;
            }
        }
        p.finish()
    }

    #[test]
    fn every_coding_decodes_to_the_plain_keys_whatever_the_chunking() {
        let plain = body();
        let expected = parse_request(&plain).unwrap();
        let mut concatenated = gzip(&plain[..1000]);
        concatenated.extend(gzip(&plain[1000..]));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("identity", plain.clone()),
            ("gzip", gzip(&plain)),
            ("x-gzip", gzip(&plain)),
            ("GZIP", concatenated),
            ("deflate", zlib(&plain)),
            ("deflate", raw_deflate(&plain)),
            ("zstd", zstd(&plain)),
            ("gzip, zstd", zstd(&gzip(&plain))),
            ("deflate,gzip", gzip(&zlib(&plain))),
            (" identity , zstd ", zstd(&plain)),
        ];
        for (encoding, data) in &cases {
            for chunk in [1, 7, 1000, 64 * 1024, data.len()] {
                assert_eq!(
                    feed_in(Some(encoding), data, chunk, UNLIMITED).as_ref(),
                    Ok(&expected),
                    "{encoding} in chunks of {chunk}"
                );
            }
            assert_eq!(
                parse_body(data, Some(encoding), UNLIMITED, usize::MAX).as_ref(),
                Ok(&expected)
            );
        }
        assert_eq!(
            parse_body(&plain, None, UNLIMITED, usize::MAX),
            Ok(expected)
        );
    }

    #[test]
    fn unsupported_and_too_many_codings() {
        for encoding in ["br", "compress", "gzip, br", "gzip, gzip, gzip"] {
            assert!(
                matches!(
                    parse_body(b"{}", Some(encoding), UNLIMITED, 8),
                    Err(ParseError::UnsupportedEncoding(_))
                ),
                "{encoding}"
            );
        }
        assert_eq!(
            parse_content_encoding("gzip, identity, zstd"),
            Ok(vec![Coding::Gzip, Coding::Zstd])
        );
        assert_eq!(parse_content_encoding(""), Ok(vec![]));
    }

    #[test]
    fn corrupt_and_truncated_streams_are_decode_errors() {
        let plain = body();
        let gz = gzip(&plain);
        let zl = zlib(&plain);
        let zs = zstd(&plain);
        let mut flipped = gz.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        let mut bad_crc = gz.clone();
        let n = bad_crc.len();
        bad_crc[n - 6] ^= 1;
        let mut trailing = zl.clone();
        trailing.extend_from_slice(b"junk");
        let mut zs_flipped = zs.clone();
        let mid = zs_flipped.len() / 2;
        zs_flipped[mid] ^= 0x5a;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("gzip", plain.clone()),
            ("gzip", gz[..gz.len() - 3].to_vec()),
            ("gzip", gz[..gz.len() / 2].to_vec()),
            ("gzip", flipped),
            ("gzip", bad_crc),
            ("deflate", zl[..zl.len() / 2].to_vec()),
            ("deflate", trailing),
            ("zstd", plain.clone()),
            ("zstd", zs[..zs.len() - 1].to_vec()),
            ("zstd", zs_flipped),
        ];
        for (encoding, data) in cases {
            for chunk in [3, data.len()] {
                let r = feed_in(Some(encoding), &data, chunk, UNLIMITED);
                assert!(
                    matches!(r, Err(ParseError::Decode(_))),
                    "{encoding}, {} bytes in chunks of {chunk}: {r:?}",
                    data.len()
                );
            }
        }
    }

    #[test]
    fn bombs_stop_at_max_bytes() {
        // 16 MiB of spaces compresses to a few KiB (gzip) or a few hundred bytes (zstd).
        let zeros = vec![b' '; 16 << 20];
        for (encoding, data) in [("gzip", gzip(&zeros)), ("zstd", zstd(&zeros))] {
            assert!(data.len() < 200_000, "{encoding}: {}", data.len());
            let mut p = BodyParser::new(Some(encoding), 1 << 20, 64);
            let mut result = Ok(());
            for piece in data.chunks(16 * 1024) {
                result = p.feed(piece);
                assert!(p.retained_bytes() < 512 * 1024, "{}", p.retained_bytes());
                if result.is_err() {
                    break;
                }
            }
            assert_eq!(result, Err(TooLarge), "{encoding}");
            assert_eq!(p.feed(b"more"), Err(TooLarge));
            assert_eq!(p.finish(), Err(ParseError::TooLarge { max_bytes: 1 << 20 }));
        }
        // Raw bytes count too.
        let mut p = BodyParser::new(None, 4, 8);
        assert_eq!(p.feed(b"{\"pr"), Ok(()));
        assert_eq!(p.feed(b"o"), Err(TooLarge));
    }

    #[test]
    fn zstd_skippable_frames_and_many_frames() {
        let plain = body();
        let mut data = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        data.extend(zstd(&plain[..500]));
        data.extend(zstd(&plain[500..]));
        let expected = parse_request(&plain);
        for chunk in [1, 5, data.len()] {
            assert_eq!(feed_in(Some("zstd"), &data, chunk, UNLIMITED), expected);
        }
    }

    #[test]
    fn zstd_windows_over_8_mib_are_refused() {
        // A frame header declaring a 16 MiB window (descriptor exponent 14), then one raw block.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 14 << 3];
        frame.extend_from_slice(&[0x09, 0, 0, b'{']);
        let r = parse_body(&frame, Some("zstd"), UNLIMITED, 8);
        assert!(
            matches!(&r, Err(ParseError::Decode(m)) if m.contains("window")),
            "{r:?}"
        );
        // The same frame with an 8 MiB window decodes (to a truncated body).
        frame[5] = 13 << 3;
        assert!(matches!(
            parse_body(&frame, Some("zstd"), UNLIMITED, 8),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn empty_compressed_bodies() {
        for encoding in ["gzip", "deflate", "zstd"] {
            assert_eq!(
                parse_body(b"", Some(encoding), UNLIMITED, 8),
                Err(ParseError::NotAnObject)
            );
        }
    }
}
