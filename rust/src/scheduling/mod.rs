//! The picking pipeline: filters narrow the candidates, weighted scorers rank them, one picker
//! chooses. A policy is a `Profile` composed of these small pieces (see `policies`).

pub mod filters;
pub mod least_busy;
pub mod pickers;
pub mod policies;
pub mod scorers;

use rand::rngs::SmallRng;

use crate::balancer::BYTES_PER_TOKEN;

/// One endpoint as the pipeline sees it for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The endpoint's interned id (stable for the life of the process).
    pub id: u32,
    pub inflight: u32,
    /// Prompt tokens sent to the endpoint and not yet prefilled, estimated (see `backlog`).
    pub backlog: f64,
    pub healthy: bool,
    /// Leading prefix blocks of this request the endpoint is known to hold.
    pub prefix_depth: u32,
    /// The endpoint served the request's affinity key recently (see `affinity`).
    pub key_held: bool,
    /// Live load from the endpoint's metrics (least_busy; zero otherwise): queued requests,
    /// plus the picks made since the last scrape, and KV-cache usage in [0, 1].
    pub waiting: f64,
    pub kv_cache: f64,
    /// No metrics, or older than `staleAfter`: treated as saturated.
    pub stale: bool,
    pub lora: LoraFit,
    /// When this process last picked the endpoint (a pick sequence number; 0 = never): among
    /// equal candidates the one picked longest ago goes first, so ties rotate like round robin.
    pub last_picked: u64,
}

/// How an endpoint fits the LoRA adapter a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraFit {
    /// No adapter requested, or the endpoint cannot load it now.
    #[default]
    None,
    /// The endpoint has a free adapter slot.
    FreeSlot,
    /// The adapter is loaded (running or waiting) on the endpoint.
    Loaded,
}

/// What the pipeline knows of the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo<'a> {
    /// Number of prefix blocks of the request (0 when the body gave none).
    pub prefix_levels: u32,
    /// Estimated prompt tokens of the request, and prompt tokens per prefix block (0 when the
    /// body gave none: the load model then weighs requests only).
    pub prompt_tokens: u64,
    pub block_tokens: u64,
    /// Canonical prompt bytes up to each prefix level's end (empty: `block_tokens` a level).
    pub level_ends: &'a [u64],
    /// Prompt tokens outside the blocks (tools, system prompt) that every level's holder has.
    pub context_tokens: u64,
    /// The request's model is critical (least_busy never sheds it).
    pub critical: bool,
    /// The request's model is a LoRA adapter some endpoint has loaded.
    pub lora: bool,
    /// A uniform random draw for filters that decide by chance.
    pub entropy: u64,
}

impl RequestInfo<'_> {
    /// Prompt tokens an endpoint holding `depth` leading levels has cached: those levels' part
    /// of the prompt, plus the context folded into every level (so any match means it is
    /// cached too).
    pub fn cached_tokens(&self, depth: u32) -> u64 {
        if depth == 0 {
            return 0;
        }
        let levels = match self.level_ends.get(depth as usize - 1) {
            Some(&end) => end.div_ceil(BYTES_PER_TOKEN),
            None => u64::from(depth) * self.block_tokens,
        };
        (levels + self.context_tokens).min(self.prompt_tokens)
    }
}

pub trait Filter: Send + Sync {
    fn name(&self) -> &'static str;
    /// Removes candidates in place. Filters never empty a non-empty set: when nothing would
    /// survive they leave it unchanged (fail open rather than refuse traffic).
    fn filter(&self, request: &RequestInfo, candidates: &mut Vec<Candidate>);
}

pub trait Scorer: Send + Sync {
    fn name(&self) -> &'static str;
    /// Writes one score in [0, 1] per candidate, 1 = best.
    fn score(&self, request: &RequestInfo, candidates: &[Candidate], out: &mut [f64]);
}

pub trait Picker: Send + Sync {
    fn name(&self) -> &'static str;
    /// Index of the chosen candidate; `candidates` is never empty.
    fn pick(&self, candidates: &[Candidate], totals: &[f64], rng: &mut SmallRng) -> usize;
}

/// Buffers reused across picks so the hot path does not allocate.
#[derive(Default)]
pub struct Scratch {
    scores: Vec<f64>,
    totals: Vec<f64>,
}

/// The picker's choice and how clear it was: the decision record's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub candidate: Candidate,
    /// Candidates left after the filters.
    pub candidates: u32,
    /// The chosen candidate's total (weighted) score.
    pub score: f64,
    /// The best total among the others; `None` when the chosen one was alone.
    pub runner_up: Option<f64>,
}

pub struct Profile {
    pub filters: Vec<Box<dyn Filter>>,
    pub scorers: Vec<(Box<dyn Scorer>, f64)>,
    pub picker: Box<dyn Picker>,
}

impl Profile {
    /// Runs filters, scorers and the picker; returns the choice, `None` when there are no
    /// candidates at all.
    pub fn run(
        &self,
        request: &RequestInfo,
        candidates: &mut Vec<Candidate>,
        scratch: &mut Scratch,
        rng: &mut SmallRng,
    ) -> Option<Choice> {
        if candidates.is_empty() {
            return None;
        }
        for filter in &self.filters {
            filter.filter(request, candidates);
        }
        let n = candidates.len();
        let Scratch { scores, totals } = scratch;
        totals.clear();
        totals.resize(n, 0.0);
        scores.clear();
        scores.resize(n, 0.0);
        for (scorer, weight) in &self.scorers {
            scorer.score(request, candidates, scores);
            for (total, score) in totals.iter_mut().zip(scores.iter()) {
                *total += weight * score.clamp(0.0, 1.0);
            }
        }
        let chosen = self.picker.pick(candidates, totals, rng);
        let runner_up = totals
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != chosen)
            .map(|(_, &total)| total)
            .reduce(f64::max);
        Some(Choice {
            candidate: candidates[chosen],
            candidates: n as u32,
            score: totals[chosen],
            runner_up,
        })
    }
}

#[cfg(test)]
pub(crate) fn cand(id: u32, inflight: u32) -> Candidate {
    Candidate {
        id,
        inflight,
        backlog: 0.0,
        healthy: true,
        prefix_depth: 0,
        key_held: false,
        waiting: 0.0,
        kv_cache: 0.0,
        stale: false,
        lora: LoraFit::None,
        last_picked: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn choice_reports_candidates_left_and_the_runner_up() {
        let profile = policies::least_request();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut scratch = Scratch::default();
        let mut sick = cand(3, 0);
        sick.healthy = false;
        let mut candidates = vec![cand(1, 4), cand(2, 1), sick];
        let choice = profile
            .run(
                &RequestInfo::default(),
                &mut candidates,
                &mut scratch,
                &mut rng,
            )
            .unwrap();
        assert_eq!(choice.candidate.id, 2);
        // The unhealthy endpoint was filtered out.
        assert_eq!(choice.candidates, 2);
        let runner_up = choice.runner_up.unwrap();
        assert!(choice.score > runner_up, "{choice:?}");
    }

    #[test]
    fn cached_tokens_follow_the_levels_own_sizes() {
        let ends = [40, 100, 612];
        let request = RequestInfo {
            prefix_levels: 3,
            prompt_tokens: 400,
            block_tokens: 128,
            context_tokens: 10,
            level_ends: &ends,
            ..RequestInfo::default()
        };
        assert_eq!(request.cached_tokens(0), 0);
        assert_eq!(request.cached_tokens(1), 10 + 10);
        assert_eq!(request.cached_tokens(2), 25 + 10);
        assert_eq!(request.cached_tokens(3), 153 + 10);
        // Without level sizes, each level is a full block.
        let coarse = RequestInfo {
            level_ends: &[],
            ..request
        };
        assert_eq!(coarse.cached_tokens(2), 256 + 10);
    }

    #[test]
    fn a_lone_candidate_has_no_runner_up() {
        let profile = policies::least_request();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut candidates = vec![cand(7, 0)];
        let choice = profile
            .run(
                &RequestInfo::default(),
                &mut candidates,
                &mut Scratch::default(),
                &mut rng,
            )
            .unwrap();
        assert_eq!((choice.candidate.id, choice.candidates), (7, 1));
        assert_eq!(choice.runner_up, None);
    }
}
