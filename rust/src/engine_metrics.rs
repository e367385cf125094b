//! Model-server load from a Prometheus text-format `/metrics` page: queue length, running
//! requests, KV-cache usage and LoRA adapters, for vLLM, SGLang, trtllm-serve and Triton TRT-LLM;
//! plus the prefix-cache counters (prompt tokens looked up, tokens found) of vLLM and SGLang.
//!
//! One pass over the bytes. Lines are found with `memchr`; a sample's metric name is read and
//! checked against the engine's families before anything else, so the hundreds of histogram
//! buckets of a vLLM page cost a name scan, a `}` search and a number parse each, and allocate
//! nothing. Only samples of the families read here have their labels parsed (and their bytes
//! checked as UTF-8).
//!
//! Every non-blank, non-comment line must be a sample (`name{labels} value [timestamp]`); one that
//! is not is skipped and counted in `lines_skipped`. Labels of families not read here are not
//! parsed, only found: a malformed label set there can go unnoticed.

use std::borrow::Cow;

use memchr::{memchr, memchr2, memrchr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Vllm,
    Sglang,
    TrtllmServe,
    Triton,
}

impl Engine {
    /// Auto-detection order.
    const ALL: [Engine; 4] = [
        Engine::Vllm,
        Engine::Sglang,
        Engine::TrtllmServe,
        Engine::Triton,
    ];

    /// `vllm`, `sglang`, `trtllm-serve` (or `trtllm`), `triton` (or `triton-trtllm`), in any case.
    pub fn from_name(name: &str) -> Option<Engine> {
        const NAMES: [(&str, Engine); 6] = [
            ("vllm", Engine::Vllm),
            ("sglang", Engine::Sglang),
            ("trtllm-serve", Engine::TrtllmServe),
            ("trtllm", Engine::TrtllmServe),
            ("triton", Engine::Triton),
            ("triton-trtllm", Engine::Triton),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, e)| e)
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::TrtllmServe => "trtllm-serve",
            Engine::Triton => "triton",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// An endpoint's load as its `/metrics` page reports it. A field whose family is absent (or
/// holds no usable value) is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineMetrics {
    /// Requests queued, summed over the family's series.
    pub waiting: Option<f64>,
    /// Requests running, summed over the family's series.
    pub running: Option<f64>,
    /// KV-cache usage in `0..=1`, the largest of the family's series.
    pub kv_cache_usage: Option<f64>,
    /// vLLM only, from the newest `vllm:lora_requests_info` series.
    pub running_lora_adapters: Vec<String>,
    pub waiting_lora_adapters: Vec<String>,
    pub max_lora: Option<u32>,
    /// Prompt tokens looked up in the prefix cache since the server started (a counter), summed
    /// over the family's series. vLLM: `prefix_cache_queries` (else the older
    /// `gpu_prefix_cache_queries`); SGLang: `prompt_tokens` (every prompt token is looked up).
    pub prefix_cache_queries: Option<f64>,
    /// Of those, tokens found in the cache (a counter). vLLM: `prefix_cache_hits` (else
    /// `gpu_prefix_cache_hits`); SGLang: `cached_tokens`, summed over its `cache_source` series.
    pub prefix_cache_hits: Option<f64>,
    /// Lines that are neither blank, comments nor well-formed samples.
    pub lines_skipped: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsError {
    /// A sample of a family read here is not valid UTF-8.
    NotUtf8,
    /// The page has content lines but not one sample (an HTML error page, say).
    NoSamples,
    /// Auto-detection found none of the engines' metrics.
    UnknownEngine,
}

impl std::fmt::Display for MetricsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsError::NotUtf8 => write!(f, "metrics page is not valid UTF-8"),
            MetricsError::NoSamples => {
                write!(f, "no Prometheus samples in the page (not a metrics page?)")
            }
            MetricsError::UnknownEngine => write!(
                f,
                "no vllm, sglang, trtllm-serve or triton metrics in the page"
            ),
        }
    }
}

impl std::error::Error for MetricsError {}

/// The families read, by meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Waiting,
    Running,
    KvUsage,
    /// vLLM's `gpu_cache_usage_perc`, used when `kv_cache_usage_perc` is absent.
    KvUsageOld,
    /// vLLM's `lora_requests_info`.
    Lora,
    /// Prefix-cache counters: tokens looked up, tokens hit; vLLM's `gpu_` names are the older
    /// spelling, read when the new one is absent.
    CacheQueries,
    CacheHits,
    CacheQueriesOld,
    CacheHitsOld,
    /// Triton's `request_metrics`: waiting or running by `request_type`.
    TritonRequests,
    /// Triton's `kv_cache_block_metrics`: usage when `kv_cache_block_type="fraction"`.
    TritonKvBlocks,
}

/// The engine whose prefix `name` carries, and the family when it is one read here.
fn classify(name: &[u8]) -> Option<(Engine, Option<Family>)> {
    // Literal prefixes: the comparisons compile to a load or two each.
    let (engine, rest) = match name.first()? {
        b'v' => (Engine::Vllm, name.strip_prefix(b"vllm:")?),
        b's' => (Engine::Sglang, name.strip_prefix(b"sglang:")?),
        b't' => (Engine::TrtllmServe, name.strip_prefix(b"trtllm_")?),
        b'n' => (Engine::Triton, name.strip_prefix(b"nv_trt_llm_")?),
        _ => return None,
    };
    let family = match (engine, rest) {
        (Engine::Vllm | Engine::TrtllmServe, b"num_requests_waiting")
        | (Engine::Sglang, b"num_queue_reqs") => Family::Waiting,
        (Engine::Vllm | Engine::TrtllmServe, b"num_requests_running")
        | (Engine::Sglang, b"num_running_reqs") => Family::Running,
        (Engine::Vllm, b"kv_cache_usage_perc")
        | (Engine::Sglang, b"token_usage")
        | (Engine::TrtllmServe, b"kv_cache_utilization") => Family::KvUsage,
        (Engine::Vllm, b"gpu_cache_usage_perc") => Family::KvUsageOld,
        (Engine::Vllm, b"lora_requests_info") => Family::Lora,
        // Counters: `_total` in the text format; OpenMetrics-style pages may leave it off.
        (Engine::Vllm, b"prefix_cache_queries_total" | b"prefix_cache_queries")
        | (Engine::Sglang, b"prompt_tokens_total" | b"prompt_tokens") => Family::CacheQueries,
        (Engine::Vllm, b"prefix_cache_hits_total" | b"prefix_cache_hits")
        | (Engine::Sglang, b"cached_tokens_total" | b"cached_tokens") => Family::CacheHits,
        (Engine::Vllm, b"gpu_prefix_cache_queries_total" | b"gpu_prefix_cache_queries") => {
            Family::CacheQueriesOld
        }
        (Engine::Vllm, b"gpu_prefix_cache_hits_total" | b"gpu_prefix_cache_hits") => {
            Family::CacheHitsOld
        }
        (Engine::Triton, b"request_metrics") => Family::TritonRequests,
        (Engine::Triton, b"kv_cache_block_metrics") => Family::TritonKvBlocks,
        _ => return Some((engine, None)),
    };
    Some((engine, Some(family)))
}

// ---------------------------------------------------------------------------------------------
// Bytes.

const NAME_START: u8 = 1;
const NAME: u8 = 2;
const LABEL_START: u8 = 4;
const LABEL: u8 = 8;

/// Character classes of metric names (`[a-zA-Z_:][a-zA-Z0-9_:]*`) and label names
/// (`[a-zA-Z_][a-zA-Z0-9_]*`).
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let alpha = b.is_ascii_alphabetic() || b == b'_';
        if alpha {
            t[i] = NAME_START | NAME | LABEL_START | LABEL;
        } else if b.is_ascii_digit() {
            t[i] = NAME | LABEL;
        } else if b == b':' {
            t[i] = NAME_START | NAME;
        }
        i += 1;
    }
    t
};

fn class(b: u8) -> u8 {
    CLASS[b as usize]
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blanks(s: &[u8], mut pos: usize) -> usize {
    while pos < s.len() && is_blank(s[pos]) {
        pos += 1;
    }
    pos
}

/// Length of the metric name `line` starts with; 0 when it starts with none.
fn name_len(line: &[u8]) -> usize {
    match line.first() {
        Some(&b) if class(b) & NAME_START != 0 => {}
        _ => return 0,
    }
    // Eight bytes a step while they are all name bytes (names run 20 to 50 bytes), one branch each.
    let mut len = 0;
    for chunk in line.chunks_exact(8) {
        if chunk.iter().fold(NAME, |all, &b| all & class(b)) == 0 {
            break;
        }
        len += 8;
    }
    len + line[len..]
        .iter()
        .position(|&b| class(b) & NAME == 0)
        .unwrap_or(line.len() - len)
}

/// `s` up to the first blank, and the rest.
fn token(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s.iter().position(|&b| is_blank(b)).unwrap_or(s.len());
    s.split_at(end)
}

/// A Prometheus float: decimal, exponent, `NaN`, `+Inf`, `-Inf`.
fn parse_float(s: &[u8]) -> Option<f64> {
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn skip_digits(s: &[u8], mut pos: usize) -> usize {
    while pos < s.len() && s[pos].is_ascii_digit() {
        pos += 1;
    }
    pos
}

/// Where the number starting at `s[pos]` ends, when it is one `parse_float` accepts and a blank
/// or the end of `s` follows it. The decimal form (`[+-]? (d+ [. d*] | . d+) [(e|E) [+-]? d+]`)
/// is checked in the same scan that finds its end; only the rest (`NaN`, `Inf`, ...) goes
/// through the parser.
fn number_end(s: &[u8], start: usize) -> Option<usize> {
    let mut pos = start + usize::from(matches!(s.get(start), Some(b'+' | b'-')));
    let int_end = skip_digits(s, pos);
    let mut digits = int_end - pos;
    pos = int_end;
    if s.get(pos) == Some(&b'.') {
        let frac_end = skip_digits(s, pos + 1);
        digits += frac_end - pos - 1;
        pos = frac_end;
    }
    if digits == 0 {
        let (word, _) = token(&s[start..]);
        return parse_float(word).map(|_| start + word.len());
    }
    if matches!(s.get(pos), Some(b'e' | b'E')) {
        pos += 1;
        if matches!(s.get(pos), Some(b'+' | b'-')) {
            pos += 1;
        }
        let exp_end = skip_digits(s, pos);
        if exp_end == pos {
            return None;
        }
        pos = exp_end;
    }
    match s.get(pos) {
        None => Some(pos),
        Some(&b) if is_blank(b) => Some(pos),
        Some(_) => None,
    }
}

/// Whether `s` is what `parse_float` accepts, without computing it.
#[cfg(test)]
fn is_float(s: &[u8]) -> bool {
    number_end(s, 0) == Some(s.len())
}

/// Checks `value [timestamp]`, then the end of the line or an OpenMetrics exemplar (`# ...`),
/// for the sample whose name and labels end at `s`; returns the value's bytes.
fn sample_value(s: &[u8]) -> Option<&[u8]> {
    let start = skip_blanks(s, 0);
    let end = number_end(s, start)?;
    let value = &s[start..end];
    let mut pos = skip_blanks(s, end);
    if pos < s.len() && s[pos] != b'#' {
        // Milliseconds in the text format, seconds in OpenMetrics: any number will do.
        pos = skip_blanks(s, number_end(s, pos)?);
    }
    (pos == s.len() || s[pos] == b'#').then_some(value)
}

// ---------------------------------------------------------------------------------------------
// Labels.

/// A label value as written, escapes (`\\`, `\"`, `\n`) still in place.
#[derive(Debug, Clone, Copy)]
struct Label<'a> {
    raw: &'a str,
    escaped: bool,
}

impl<'a> Label<'a> {
    fn value(self) -> Cow<'a, str> {
        if !self.escaped {
            return Cow::Borrowed(self.raw);
        }
        let mut out = String::with_capacity(self.raw.len());
        let mut chars = self.raw.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                // Only valid escapes get here (see `parse_labels`).
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    }

    fn is(self, expected: &str) -> bool {
        if self.escaped {
            self.value() == expected
        } else {
            self.raw == expected
        }
    }
}

/// The labels the families read here look at.
#[derive(Debug, Default)]
struct Labels<'a> {
    request_type: Option<Label<'a>>,
    kv_cache_block_type: Option<Label<'a>>,
    running_lora_adapters: Option<Label<'a>>,
    waiting_lora_adapters: Option<Label<'a>>,
    max_lora: Option<Label<'a>>,
}

impl<'a> Labels<'a> {
    fn keep(&mut self, name: &str, value: Label<'a>) {
        let slot = match name {
            "request_type" => &mut self.request_type,
            "kv_cache_block_type" => &mut self.kv_cache_block_type,
            "running_lora_adapters" => &mut self.running_lora_adapters,
            "waiting_lora_adapters" => &mut self.waiting_lora_adapters,
            "max_lora" => &mut self.max_lora,
            _ => return,
        };
        *slot = Some(value);
    }
}

/// Parses the label set opening at `line[pos] == b'{'`, handing each label to `labels`; returns
/// the position after the closing `}`, or `None` when the set is malformed.
fn parse_labels<'a>(line: &'a str, pos: usize, labels: &mut Labels<'a>) -> Option<usize> {
    let b = line.as_bytes();
    let mut pos = pos + 1;
    loop {
        pos = skip_blanks(b, pos);
        // `{}` and a trailing comma (`{a="x",}`) are allowed.
        if *b.get(pos)? == b'}' {
            return Some(pos + 1);
        }
        let start = pos;
        if class(b[pos]) & LABEL_START == 0 {
            return None;
        }
        pos += 1;
        while pos < b.len() && class(b[pos]) & LABEL != 0 {
            pos += 1;
        }
        // Every index used for slicing sits next to an ASCII byte, so on a char boundary.
        let name = &line[start..pos];
        pos = skip_blanks(b, pos);
        if b.get(pos) != Some(&b'=') {
            return None;
        }
        pos = skip_blanks(b, pos + 1);
        if b.get(pos) != Some(&b'"') {
            return None;
        }
        pos += 1;
        let value_start = pos;
        let mut escaped = false;
        loop {
            let at = pos + memchr2(b'"', b'\\', &b[pos..])?;
            if b[at] == b'"' {
                pos = at;
                break;
            }
            if !matches!(b.get(at + 1)?, b'\\' | b'"' | b'n') {
                return None;
            }
            escaped = true;
            pos = at + 2;
        }
        labels.keep(
            name,
            Label {
                raw: &line[value_start..pos],
                escaped,
            },
        );
        pos = skip_blanks(b, pos + 1);
        match *b.get(pos)? {
            b',' => pos += 1,
            b'}' => return Some(pos + 1),
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tallies.

/// The LoRA series seen with the largest value (a timestamp) so far.
#[derive(Debug)]
struct LoraSeries<'a> {
    stamp: f64,
    running: Option<Label<'a>>,
    waiting: Option<Label<'a>>,
    max_lora: Option<Label<'a>>,
}

/// What one engine's families said so far.
#[derive(Debug, Default)]
struct Tally<'a> {
    /// A sample of the engine (any family with its prefix) was seen.
    present: bool,
    waiting: Option<f64>,
    running: Option<f64>,
    kv: Option<f64>,
    kv_old: Option<f64>,
    lora: Option<LoraSeries<'a>>,
    cache_queries: Option<f64>,
    cache_hits: Option<f64>,
    cache_queries_old: Option<f64>,
    cache_hits_old: Option<f64>,
}

/// Adds a request count; NaN, infinite and negative values count as absent.
fn add_count(total: &mut Option<f64>, v: f64) {
    if v.is_finite() && v >= 0.0 {
        // Starting from +0.0 also turns a -0.0 sample into 0.
        *total = Some(total.unwrap_or(0.0) + v);
    }
}

/// Keeps the largest usage, clamped to 1; NaN and negative values count as absent.
fn max_usage(max: &mut Option<f64>, v: f64) {
    if v >= 0.0 {
        let v = v.min(1.0) + 0.0;
        *max = Some(max.map_or(v, |m| m.max(v)));
    }
}

impl<'a> Tally<'a> {
    fn record(&mut self, family: Family, labels: &Labels<'a>, v: f64) {
        match family {
            Family::Waiting => add_count(&mut self.waiting, v),
            Family::Running => add_count(&mut self.running, v),
            Family::KvUsage => max_usage(&mut self.kv, v),
            Family::KvUsageOld => max_usage(&mut self.kv_old, v),
            Family::CacheQueries => add_count(&mut self.cache_queries, v),
            Family::CacheHits => add_count(&mut self.cache_hits, v),
            Family::CacheQueriesOld => add_count(&mut self.cache_queries_old, v),
            Family::CacheHitsOld => add_count(&mut self.cache_hits_old, v),
            Family::Lora => {
                // The first of equal stamps stays; a NaN stamp never wins.
                if self.lora.as_ref().is_none_or(|best| v > best.stamp) && !v.is_nan() {
                    self.lora = Some(LoraSeries {
                        stamp: v,
                        running: labels.running_lora_adapters,
                        waiting: labels.waiting_lora_adapters,
                        max_lora: labels.max_lora,
                    });
                }
            }
            Family::TritonRequests => match labels.request_type {
                Some(t) if t.is("waiting") => add_count(&mut self.waiting, v),
                Some(t) if t.is("scheduled") => add_count(&mut self.running, v),
                _ => {}
            },
            Family::TritonKvBlocks => {
                if labels.kv_cache_block_type.is_some_and(|t| t.is("fraction")) {
                    max_usage(&mut self.kv, v);
                }
            }
        }
    }

    fn finish(self, lines_skipped: u32) -> EngineMetrics {
        let (running_lora_adapters, waiting_lora_adapters, max_lora) = match self.lora {
            Some(s) => (
                adapters(s.running),
                adapters(s.waiting),
                s.max_lora.and_then(|m| parse_max_lora(&m.value())),
            ),
            None => (Vec::new(), Vec::new(), None),
        };
        // Finite series can still sum past f64::MAX: such a total is as unusable as one NaN.
        let finite = |total: Option<f64>| total.filter(|t| t.is_finite());
        // The two counters come from the same spelling (both new or both old), so a page in
        // the middle of a rename never pairs one name's hits with the other's queries.
        let (prefix_cache_queries, prefix_cache_hits) =
            match (finite(self.cache_queries), finite(self.cache_hits)) {
                (None, None) => (finite(self.cache_queries_old), finite(self.cache_hits_old)),
                new => new,
            };
        EngineMetrics {
            waiting: finite(self.waiting),
            running: finite(self.running),
            kv_cache_usage: self.kv.or(self.kv_old),
            running_lora_adapters,
            waiting_lora_adapters,
            max_lora,
            prefix_cache_queries,
            prefix_cache_hits,
            lines_skipped,
        }
    }
}

/// A comma-separated adapter list; blank entries are dropped.
fn adapters(label: Option<Label<'_>>) -> Vec<String> {
    let Some(label) = label else {
        return Vec::new();
    };
    label
        .value()
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `max_lora="4"` (also `"4.0"`).
fn parse_max_lora(s: &str) -> Option<u32> {
    let s = s.trim();
    s.parse().ok().or_else(|| {
        let f: f64 = s.parse().ok()?;
        (f >= 0.0 && f <= f64::from(u32::MAX) && f.fract() == 0.0).then_some(f as u32)
    })
}

// ---------------------------------------------------------------------------------------------
// The page.

/// Reads the load of the model server whose `/metrics` page is `text`.
///
/// `engine = None` detects the engine from the samples present: the first of vLLM (`vllm:*`),
/// SGLang (`sglang:*`), trtllm-serve (`trtllm_*`) and Triton (`nv_trt_llm_*`). A family that is
/// absent leaves its field `None`; it is never an error. Malformed lines are skipped and counted.
pub fn parse_engine_metrics(
    text: &[u8],
    engine: Option<Engine>,
) -> Result<(Engine, EngineMetrics), MetricsError> {
    let mut tallies: [Tally; 4] = Default::default();
    let mut content_lines = 0u32;
    let mut samples = 0u32;
    let mut rest = text;
    while !rest.is_empty() {
        let line = match memchr(b'\n', rest) {
            Some(end) => {
                let line = &rest[..end];
                rest = &rest[end + 1..];
                line
            }
            None => std::mem::take(&mut rest),
        };
        // Also drops the `\r` of a `\r\n` line end.
        let line = line.trim_ascii();
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        content_lines = content_lines.saturating_add(1);
        if read_sample(line, engine, &mut tallies)? {
            samples = samples.saturating_add(1);
        }
    }
    if samples == 0 && content_lines > 0 {
        return Err(MetricsError::NoSamples);
    }
    let engine = match engine {
        Some(e) => e,
        None => Engine::ALL
            .into_iter()
            .find(|e| tallies[e.index()].present)
            .ok_or(MetricsError::UnknownEngine)?,
    };
    let tally = std::mem::take(&mut tallies[engine.index()]);
    Ok((engine, tally.finish(content_lines - samples)))
}

/// Reads one sample line (trimmed, not a comment) into `tallies`; `false` when it is malformed.
fn read_sample<'a>(
    line: &'a [u8],
    engine: Option<Engine>,
    tallies: &mut [Tally<'a>; 4],
) -> Result<bool, MetricsError> {
    let name_end = name_len(line);
    if name_end == 0 {
        return Ok(false);
    }
    let found = classify(&line[..name_end]);
    if let Some((e, Some(family))) = found {
        if engine.is_none_or(|wanted| wanted == e) {
            return read_wanted(line, name_end, family, &mut tallies[e.index()]);
        }
    }
    // Any other sample: find the end of its labels without parsing them, then check the value.
    let mut pos = skip_blanks(line, name_end);
    if line.get(pos) == Some(&b'{') {
        match memrchr(b'}', &line[pos..]) {
            Some(close) => pos += close + 1,
            None => return Ok(false),
        }
    } else if pos == name_end {
        return Ok(false); // the name runs into something that is not a name
    }
    if sample_value(&line[pos..]).is_none() {
        return Ok(false);
    }
    if let Some((e, _)) = found {
        tallies[e.index()].present = true;
    }
    Ok(true)
}

/// Reads a sample of a family read here, labels and all.
fn read_wanted<'a>(
    line: &'a [u8],
    name_end: usize,
    family: Family,
    tally: &mut Tally<'a>,
) -> Result<bool, MetricsError> {
    let line = simdutf8::basic::from_utf8(line).map_err(|_| MetricsError::NotUtf8)?;
    let b = line.as_bytes();
    let mut labels = Labels::default();
    let mut pos = skip_blanks(b, name_end);
    if b.get(pos) == Some(&b'{') {
        match parse_labels(line, pos, &mut labels) {
            Some(end) => pos = end,
            None => return Ok(false),
        }
    } else if pos == name_end {
        return Ok(false);
    }
    let Some(v) = sample_value(&b[pos..]).and_then(parse_float) else {
        return Ok(false);
    };
    tally.present = true;
    tally.record(family, &labels, v);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str, engine: Option<Engine>) -> (Engine, EngineMetrics) {
        parse_engine_metrics(text.as_bytes(), engine).unwrap()
    }

    fn metrics(text: &str, engine: Engine) -> EngineMetrics {
        parse(text, Some(engine)).1
    }

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4375
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 31.5
vllm:e2e_request_latency_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
"#;

    #[test]
    fn vllm_gauges() {
        let (engine, m) = parse(VLLM, None);
        assert_eq!(engine, Engine::Vllm);
        assert_eq!(
            m,
            EngineMetrics {
                waiting: Some(7.0),
                running: Some(3.0),
                kv_cache_usage: Some(0.4375),
                ..EngineMetrics::default()
            }
        );
        assert_eq!(metrics(VLLM, Engine::Vllm), m);
    }

    #[test]
    fn vllm_old_kv_name() {
        let m = metrics(
            "vllm:num_requests_waiting 1\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\n",
            Engine::Vllm,
        );
        assert_eq!(m.kv_cache_usage, Some(0.25));
        assert_eq!(m.waiting, Some(1.0));
        assert_eq!(m.running, None);
    }

    #[test]
    fn vllm_new_kv_name_is_preferred() {
        for page in [
            "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.5\n",
            "vllm:kv_cache_usage_perc 0.5\nvllm:gpu_cache_usage_perc 0.9\n",
        ] {
            assert_eq!(
                metrics(page, Engine::Vllm).kv_cache_usage,
                Some(0.5),
                "{page}"
            );
        }
        // A new family with no usable value falls back to the old one.
        let m = metrics(
            "vllm:kv_cache_usage_perc NaN\nvllm:gpu_cache_usage_perc 0.9\n",
            Engine::Vllm,
        );
        assert_eq!(m.kv_cache_usage, Some(0.9));
    }

    #[test]
    fn vllm_lora_newest_series_wins() {
        let page = r#"
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a, b ,,",waiting_lora_adapters=" c"} 1.700000005e9
vllm:lora_requests_info{max_lora="8",running_lora_adapters="older",waiting_lora_adapters="x"} 1.6e9
vllm:lora_requests_info{max_lora="9",running_lora_adapters="nan",waiting_lora_adapters="x"} NaN
"#;
        let m = metrics(page, Engine::Vllm);
        assert_eq!(m.running_lora_adapters, ["a", "b"]);
        assert_eq!(m.waiting_lora_adapters, ["c"]);
        assert_eq!(m.max_lora, Some(4));
        assert_eq!(m.waiting, None);
        assert_eq!(m.lines_skipped, 0);

        // Equal stamps: the first stays.
        let m = metrics(
            "vllm:lora_requests_info{running_lora_adapters=\"first\"} 5\n\
             vllm:lora_requests_info{running_lora_adapters=\"second\"} 5\n",
            Engine::Vllm,
        );
        assert_eq!(m.running_lora_adapters, ["first"]);
        assert_eq!(m.max_lora, None);

        // No adapters at all; a float-formatted max_lora.
        let m = metrics(
            r#"vllm:lora_requests_info{max_lora="4.0",running_lora_adapters="",waiting_lora_adapters=""} 1"#,
            Engine::Vllm,
        );
        assert!(m.running_lora_adapters.is_empty() && m.waiting_lora_adapters.is_empty());
        assert_eq!(m.max_lora, Some(4));
        assert_eq!(parse_max_lora("-1"), None);
        assert_eq!(parse_max_lora("x"), None);
        assert_eq!(parse_max_lora(" 3 "), Some(3));
    }

    #[test]
    fn vllm_prefix_cache_counters() {
        let page = r#"
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 800.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 900.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 100.0
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 5.0
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 1.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 77.0
"#;
        let m = metrics(page, Engine::Vllm);
        assert_eq!(
            (m.prefix_cache_queries, m.prefix_cache_hits),
            (Some(2000.0), Some(1000.0))
        );
        assert_eq!(m.lines_skipped, 0);
        // Older vLLM: the gpu_ spelling, with or without the counter suffix.
        for page in [
            "vllm:gpu_prefix_cache_queries_total 64\nvllm:gpu_prefix_cache_hits_total 48\n",
            "vllm:gpu_prefix_cache_queries 64\nvllm:gpu_prefix_cache_hits 48\n",
        ] {
            let m = metrics(page, Engine::Vllm);
            assert_eq!(
                (m.prefix_cache_queries, m.prefix_cache_hits),
                (Some(64.0), Some(48.0)),
                "{page}"
            );
        }
        // Absent counters are None, never 0; NaN counts as absent.
        let m = metrics(VLLM, Engine::Vllm);
        assert_eq!((m.prefix_cache_queries, m.prefix_cache_hits), (None, None));
        let m = metrics(
            "vllm:prefix_cache_queries_total NaN\nvllm:prefix_cache_hits_total 3\n",
            Engine::Vllm,
        );
        assert_eq!(
            (m.prefix_cache_queries, m.prefix_cache_hits),
            (None, Some(3.0))
        );
    }

    #[test]
    fn sglang_prefix_cache_counters() {
        let page = "\
sglang:prompt_tokens_total{model_name=\"qwen\"} 4000.0
sglang:cached_tokens_total{cache_source=\"device\",model_name=\"qwen\"} 2500.0
sglang:cached_tokens_total{cache_source=\"host\",model_name=\"qwen\"} 500.0
sglang:cache_hit_rate{model_name=\"qwen\"} 0.9
";
        let m = metrics(page, Engine::Sglang);
        assert_eq!(
            (m.prefix_cache_queries, m.prefix_cache_hits),
            (Some(4000.0), Some(3000.0))
        );
        // trtllm-serve and Triton report no such counters.
        let m = metrics("trtllm_num_requests_waiting 1\n", Engine::TrtllmServe);
        assert_eq!((m.prefix_cache_queries, m.prefix_cache_hits), (None, None));
    }

    #[test]
    fn sglang() {
        let page = "\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name=\"qwen\",tp_rank=\"0\"} 12.0
sglang:num_queue_reqs{model_name=\"qwen\",tp_rank=\"0\"} 4.0
sglang:token_usage{model_name=\"qwen\",tp_rank=\"0\"} 0.81
sglang:gen_throughput{model_name=\"qwen\",tp_rank=\"0\"} 1234.5
";
        let (engine, m) = parse(page, None);
        assert_eq!(engine, Engine::Sglang);
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage),
            (Some(4.0), Some(12.0), Some(0.81))
        );
    }

    #[test]
    fn trtllm_serve() {
        let page = "\
trtllm_num_requests_waiting 2
trtllm_num_requests_running 6
trtllm_kv_cache_utilization 0.125
trtllm_e2e_request_latency_seconds_count 40
";
        let (engine, m) = parse(page, None);
        assert_eq!(engine, Engine::TrtllmServe);
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage),
            (Some(2.0), Some(6.0), Some(0.125))
        );
    }

    #[test]
    fn triton() {
        let page = r#"
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 64
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 4096
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.3
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_inference_count{model="tensorrt_llm",version="1"} 100
"#;
        let (engine, m) = parse(page, None);
        assert_eq!(engine, Engine::Triton);
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage),
            (Some(3.0), Some(5.0), Some(0.3))
        );
    }

    #[test]
    fn a_sum_past_f64_max_is_absent() {
        let page = b"vllm:num_requests_waiting{engine=\"0\"} 1e308\nvllm:num_requests_waiting{engine=\"1\"} 1e308\n";
        let (_, m) = parse_engine_metrics(page, Some(Engine::Vllm)).unwrap();
        assert_eq!(m.waiting, None);
    }

    #[test]
    fn series_are_summed_and_kv_is_the_max() {
        let page = r#"
vllm:num_requests_waiting{engine="0",model_name="m"} 2
vllm:num_requests_waiting{engine="1",model_name="m"} 3.5
vllm:num_requests_running{engine="0",model_name="m"} 1
vllm:num_requests_running{engine="1",model_name="m"} 4
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.7
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.2
"#;
        let m = metrics(page, Engine::Vllm);
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage),
            (Some(5.5), Some(5.0), Some(0.7))
        );
    }

    #[test]
    fn absent_families_are_none() {
        let m = metrics("vllm:num_requests_running 2\n", Engine::Vllm);
        assert_eq!(
            m,
            EngineMetrics {
                running: Some(2.0),
                ..EngineMetrics::default()
            }
        );
        // Another engine's page read as vLLM: nothing, and no error.
        let m = metrics("sglang:num_queue_reqs 4\n", Engine::Vllm);
        assert_eq!(m, EngineMetrics::default());
        // Names that only start like a family are other families.
        let m = metrics(
            "vllm:num_requests_waiting_total 9\nvllm:num_requests_waitin 9\n",
            Engine::Vllm,
        );
        assert_eq!(m.waiting, None);
        assert_eq!(m.lines_skipped, 0);
    }

    #[test]
    fn escapes_in_labels() {
        let page = r#"vllm:num_requests_waiting{model_name="a\"b} 99 {c\\",x="line\nbreak, ok"} 4
vllm:lora_requests_info{running_lora_adapters="s\\q,t\"u",waiting_lora_adapters="w\nx"} 1
other_metric{path="} 3",q="\"\\"} 5
"#;
        let m = metrics(page, Engine::Vllm);
        assert_eq!(m.waiting, Some(4.0));
        assert_eq!(m.running_lora_adapters, ["s\\q", "t\"u"]);
        assert_eq!(m.waiting_lora_adapters, ["w\nx"]);
        assert_eq!(m.lines_skipped, 0);
        // Triton's selecting label, escaped but equal.
        let m = metrics(
            "nv_trt_llm_request_metrics{request_type=\"wait\\ing\"} 3\nup 1\n",
            Engine::Triton,
        );
        assert_eq!((m.waiting, m.lines_skipped), (None, 1)); // `\i` is not an escape
        let m = metrics(
            r#"nv_trt_llm_request_metrics{request_type="waiting\n"} 3"#,
            Engine::Triton,
        );
        assert_eq!((m.waiting, m.lines_skipped), (None, 0));
    }

    #[test]
    fn whitespace_and_label_syntax() {
        let page = "  vllm:num_requests_waiting\t{ model_name = \"m\" , engine=\"0\", }   2   1700000000000  \n\
                    vllm:num_requests_running{} 1\n\
                    \t# indented comment\n\
                    vllm:kv_cache_usage_perc 0.5 # {trace_id=\"x\"} 0.5\n";
        let m = metrics(page, Engine::Vllm);
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage, m.lines_skipped),
            (Some(2.0), Some(1.0), Some(0.5), 0)
        );
    }

    #[test]
    fn malformed_lines_are_skipped_and_counted() {
        let page = r#"vllm:num_requests_waiting{model_name="m"} 5
vllm:num_requests_waiting{model_name="m" 6
vllm:num_requests_waiting{model_name=m} 6
vllm:num_requests_waiting{model_name="m} 6
vllm:num_requests_waiting{model_name="m"}
vllm:num_requests_waiting{model_name="m"} six
vllm:num_requests_waiting{model_name="m"} 6 7 8
vllm:num_requests_waiting{="m"} 6
vllm:num_requests_waiting{1a="m"} 6
vllm:num_requests_waiting{a="m"b="n"} 6
vllm:num_requests_waiting{a="m\"} 6
vllm:num_requests_waiting 6 soon
vllm:num_requests_waiting
vllm:num_requests_waiting-x 6
some_other{a="b" 3
some_other 3 4 5
some_other
0starts_with_digit 1
vllm:num_requests_running 1
"#;
        let m = metrics(page, Engine::Vllm);
        assert_eq!(m.waiting, Some(5.0));
        assert_eq!(m.running, Some(1.0));
        assert_eq!(m.lines_skipped, 17);
    }

    #[test]
    fn nan_inf_and_negative_values() {
        let m = metrics(
            "vllm:num_requests_waiting NaN\nvllm:num_requests_running -1\nvllm:kv_cache_usage_perc +Inf\n",
            Engine::Vllm,
        );
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage, m.lines_skipped),
            (None, None, Some(1.0), 0)
        );
        let m = metrics(
            "vllm:num_requests_waiting +Inf\nvllm:num_requests_running 2e0\nvllm:kv_cache_usage_perc -Inf\n",
            Engine::Vllm,
        );
        assert_eq!(
            (m.waiting, m.running, m.kv_cache_usage),
            (None, Some(2.0), None)
        );
        // One bad series among good ones does not hide the good ones.
        let m = metrics(
            "vllm:num_requests_waiting{e=\"0\"} NaN\nvllm:num_requests_waiting{e=\"1\"} 1.5E1\n\
             vllm:kv_cache_usage_perc{e=\"0\"} 1.25\nvllm:kv_cache_usage_perc{e=\"1\"} NaN\n\
             vllm:num_requests_running -0.0\n",
            Engine::Vllm,
        );
        assert_eq!((m.waiting, m.kv_cache_usage), (Some(15.0), Some(1.0)));
        assert!(m.running.unwrap().is_sign_positive());
    }

    #[test]
    fn float_check_agrees_with_the_parser() {
        for s in [
            "0",
            "12.0",
            "-3",
            "+4.5",
            ".5",
            "5.",
            ".",
            "",
            "+",
            "-.",
            "1e5",
            "1E+05",
            "2.5e-3",
            "1e",
            "1e+",
            "e5",
            ".e5",
            "1.2.3",
            "1-2",
            "NaN",
            "nan",
            "+Inf",
            "-Inf",
            "inf",
            "infinity",
            "Infinity",
            "+nan",
            "0x10",
            "1_000",
            " 1",
            "1 ",
            "six",
            "1.7318004531e+09",
        ] {
            assert_eq!(is_float(s.as_bytes()), s.parse::<f64>().is_ok(), "{s:?}");
        }
    }

    #[test]
    fn crlf_line_ends() {
        let crlf = VLLM.replace('\n', "\r\n");
        assert_eq!(parse(&crlf, None), parse(VLLM, None));
        // No newline at the end at all.
        let m = metrics("vllm:num_requests_waiting 3", Engine::Vllm);
        assert_eq!(m.waiting, Some(3.0));
    }

    #[test]
    fn empty_and_comment_only_pages() {
        for page in [
            "",
            "\n\n",
            "  \r\n",
            "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n",
        ] {
            assert_eq!(
                parse_engine_metrics(page.as_bytes(), Some(Engine::Sglang)),
                Ok((Engine::Sglang, EngineMetrics::default())),
                "{page:?}"
            );
            assert_eq!(
                parse_engine_metrics(page.as_bytes(), None),
                Err(MetricsError::UnknownEngine),
                "{page:?}"
            );
        }
    }

    #[test]
    fn html_page_has_no_samples() {
        let page = b"<!DOCTYPE html>\n<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n\
            <center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n</body>\n</html>\n";
        for engine in [None, Some(Engine::Vllm)] {
            assert_eq!(
                parse_engine_metrics(page, engine),
                Err(MetricsError::NoSamples)
            );
        }
        for page in [
            &b"{\"error\": \"not found\"}"[..],
            b"Not Found",
            b"Service Unavailable\r\n",
            b"\xff\xfe\x00garbage",
        ] {
            assert_eq!(
                parse_engine_metrics(page, None),
                Err(MetricsError::NoSamples)
            );
        }
    }

    #[test]
    fn auto_detection() {
        // Any family of the engine counts, not only the ones read.
        let (engine, m) = parse(
            "process_cpu_seconds_total 1\nsglang:gen_throughput 5\n",
            None,
        );
        assert_eq!((engine, m), (Engine::Sglang, EngineMetrics::default()));
        // vLLM first, wherever it appears in the page.
        let (engine, m) = parse(
            "sglang:num_queue_reqs 4\nvllm:num_requests_waiting 1\n",
            None,
        );
        assert_eq!((engine, m.waiting), (Engine::Vllm, Some(1.0)));
        let (engine, _) = parse("nv_trt_llm_request_metrics{request_type=\"waiting\"} 1\ntrtllm_num_requests_waiting 2\n", None);
        assert_eq!(engine, Engine::TrtllmServe);
        // A malformed line of an engine does not detect it.
        assert_eq!(
            parse_engine_metrics(b"up 1\nvllm:num_requests_waiting x\n", None),
            Err(MetricsError::UnknownEngine)
        );
    }

    #[test]
    fn unknown_engine() {
        let page = "# TYPE node_load1 gauge\nnode_load1 0.5\nnv_inference_count{model=\"m\"} 3\n";
        assert_eq!(
            parse_engine_metrics(page.as_bytes(), None),
            Err(MetricsError::UnknownEngine)
        );
        assert_eq!(
            parse(page, Some(Engine::Triton)),
            (Engine::Triton, EngineMetrics::default())
        );
    }

    #[test]
    fn utf8_is_checked_where_it_matters() {
        let bad = b"vllm:num_requests_waiting{model_name=\"\xff\"} 1\n";
        assert_eq!(
            parse_engine_metrics(bad, Some(Engine::Vllm)),
            Err(MetricsError::NotUtf8)
        );
        // Not read for sglang, and the other lines' bytes are never decoded.
        let m = parse_engine_metrics(bad, Some(Engine::Sglang)).unwrap().1;
        assert_eq!(m, EngineMetrics::default());
        let (_, m) = parse_engine_metrics(
            b"other{a=\"\xc3\x28\"} 1\nvllm:num_requests_waiting{model_name=\"caf\xc3\xa9\"} 2\n",
            None,
        )
        .unwrap();
        assert_eq!((m.waiting, m.lines_skipped), (Some(2.0), 0));
    }

    #[test]
    fn engine_names() {
        for e in Engine::ALL {
            assert_eq!(Engine::from_name(e.name()), Some(e));
        }
        assert_eq!(Engine::from_name("TRTLLM"), Some(Engine::TrtllmServe));
        assert_eq!(Engine::from_name("Triton-TRTLLM"), Some(Engine::Triton));
        assert_eq!(Engine::from_name("vLLM"), Some(Engine::Vllm));
        assert_eq!(Engine::from_name("tgi"), None);
        assert_eq!(Engine::from_name(""), None);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            MetricsError::NoSamples.to_string(),
            "no Prometheus samples in the page (not a metrics page?)"
        );
        assert!(MetricsError::UnknownEngine
            .to_string()
            .contains("trtllm-serve"));
        assert!(MetricsError::NotUtf8.to_string().contains("UTF-8"));
    }

    #[test]
    fn every_truncation_parses_without_panicking() {
        let page = format!(
            "{VLLM}vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"a\\\"b,c\",waiting_lora_adapters=\"\"}} 1.7e9 123\n"
        );
        let full = parse(&page, None).1;
        assert_eq!(full.running_lora_adapters, ["a\"b", "c"]);
        for end in 0..=page.len() {
            let cut = &page.as_bytes()[..end];
            match parse_engine_metrics(cut, None) {
                Ok((Engine::Vllm, m)) => assert!(m.lines_skipped <= 1, "{end}: {m:?}"),
                Ok(other) => panic!("{end}: {other:?}"),
                Err(e) => assert!(
                    matches!(e, MetricsError::UnknownEngine | MetricsError::NoSamples),
                    "{end}: {e}"
                ),
            }
        }
    }

    /// Pieces of metric lines, so random pages reach deep into the label and value paths.
    const FRAGMENTS: [&str; 28] = [
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "nv_trt_llm_request_metrics",
        "sglang:token_usage",
        "trtllm_num_requests_running",
        "x_bucket",
        "{",
        "}",
        "\"",
        "\\",
        "\\\"",
        "=",
        ",",
        " ",
        "\t",
        "\n",
        "\r\n",
        "# ",
        "request_type=\"waiting\"",
        "running_lora_adapters=\"a,b\"",
        "max_lora=\"4\"",
        "1",
        "0.5",
        "NaN",
        "-Inf",
        "1e9",
        "\u{e9}",
    ];

    fn fragments() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                (0..FRAGMENTS.len()).prop_map(|i| FRAGMENTS[i].as_bytes().to_vec()),
                any::<u8>().prop_map(|b| vec![b]),
            ],
            0..64,
        )
        .prop_map(|parts| parts.concat())
    }

    const ENGINES: [Option<Engine>; 5] = [
        None,
        Some(Engine::Vllm),
        Some(Engine::Sglang),
        Some(Engine::TrtllmServe),
        Some(Engine::Triton),
    ];

    proptest! {
        #[test]
        fn float_check_matches_the_parser(s in "[-+0-9.eEnaNIif]{0,8}") {
            prop_assert_eq!(is_float(s.as_bytes()), s.parse::<f64>().is_ok());
        }

        #[test]
        fn name_len_matches_a_plain_scan(s in "[a-z_:0-9{ <-]{0,40}") {
            let b = s.as_bytes();
            let plain = if b.first().is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_' || c == b':') {
                b.iter().position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')).unwrap_or(b.len())
            } else {
                0
            };
            prop_assert_eq!(name_len(b), plain);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for engine in ENGINES {
                let _ = parse_engine_metrics(&bytes, engine);
            }
        }

        #[test]
        fn metric_like_text_never_panics(bytes in fragments()) {
            for engine in ENGINES {
                if let Ok((e, m)) = parse_engine_metrics(&bytes, engine) {
                    prop_assert!(engine.is_none_or(|wanted| wanted == e));
                    prop_assert!(m.kv_cache_usage.is_none_or(|kv| (0.0..=1.0).contains(&kv)));
                    prop_assert!(m.waiting.is_none_or(|w| w.is_finite() && w >= 0.0));
                    prop_assert!(m.running.is_none_or(|r| r.is_finite() && r >= 0.0));
                }
            }
        }

        #[test]
        fn garbage_lines_change_only_the_count(
            garbage in proptest::collection::vec("<[^\n]{0,40}", 0..8),
            at in proptest::collection::vec(0usize..16, 8),
        ) {
            let mut lines: Vec<&str> = VLLM.lines().collect();
            for (g, &i) in garbage.iter().zip(&at) {
                lines.insert(i.min(lines.len()), g);
            }
            let (engine, m) = parse(&lines.join("\n"), None);
            let (_, clean) = parse(VLLM, None);
            prop_assert_eq!(engine, Engine::Vllm);
            prop_assert_eq!(m, EngineMetrics { lines_skipped: garbage.len() as u32, ..clean });
        }
    }
}
