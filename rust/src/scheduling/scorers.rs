//! Scorers: rank candidates in [0, 1], 1 = best.

use super::{Candidate, RequestInfo, Scorer};

/// Fewer requests in flight is better: min-max normalised, all equal scores 1.
pub struct LeastInflightScorer;

impl Scorer for LeastInflightScorer {
    fn name(&self) -> &'static str {
        "least-inflight"
    }

    fn score(&self, _request: &RequestInfo, candidates: &[Candidate], out: &mut [f64]) {
        let min = candidates.iter().map(|c| c.inflight).min().unwrap_or(0);
        let max = candidates.iter().map(|c| c.inflight).max().unwrap_or(0);
        let span = f64::from(max - min);
        for (c, s) in candidates.iter().zip(out.iter_mut()) {
            *s = if span == 0.0 {
                1.0
            } else {
                f64::from(max - c.inflight) / span
            };
        }
    }
}

/// The load model: what sending this request to an endpoint costs, in prompt tokens of work,
/// the lower the better.
///
/// `cost = request_tokens × in flight + backlog + prompt tokens − affinity_weight × cached
/// tokens`: the work already queued there (each request in flight weighs `request_tokens`, the
/// batch slot and decode steps it takes, plus the prompt tokens it was sent and has not
/// prefilled yet, see `backlog`), plus this request's own prefill, minus the part of its prompt
/// the endpoint holds (its matched prefix blocks). So a server that holds the prompt wins while
/// its queue is shorter than what the cache saves, and an idle server wins once the holder's
/// queue costs more than a re-prefill: a hot prefix spreads instead of piling up. Scores are the
/// costs min-max normalised, 1 = cheapest.
pub struct LoadCostScorer {
    pub request_tokens: f64,
    pub affinity_weight: f64,
}

impl LoadCostScorer {
    pub fn cost(&self, request: &RequestInfo, c: &Candidate) -> f64 {
        let cached = request.cached_tokens(c.prefix_depth);
        self.request_tokens * f64::from(c.inflight) + c.backlog + request.prompt_tokens as f64
            - self.affinity_weight * cached as f64
    }
}

impl Scorer for LoadCostScorer {
    fn name(&self) -> &'static str {
        "load-cost"
    }

    fn score(&self, request: &RequestInfo, candidates: &[Candidate], out: &mut [f64]) {
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for (c, s) in candidates.iter().zip(out.iter_mut()) {
            *s = self.cost(request, c);
            min = min.min(*s);
            max = max.max(*s);
        }
        let span = max - min;
        for s in out.iter_mut().take(candidates.len()) {
            *s = if span > 0.0 { (max - *s) / span } else { 1.0 };
        }
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the scores compared are exact by construction
mod tests {
    use super::super::cand;
    use super::*;

    #[test]
    fn least_inflight_normalises() {
        let c = [cand(1, 2), cand(2, 4), cand(3, 3)];
        let mut out = [0.0; 3];
        LeastInflightScorer.score(&RequestInfo::default(), &c, &mut out);
        assert_eq!(out, [1.0, 0.0, 0.5]);
        let c = [cand(1, 7), cand(2, 7)];
        let mut out = [0.0; 2];
        LeastInflightScorer.score(&RequestInfo::default(), &c, &mut out);
        assert_eq!(out, [1.0, 1.0]);
    }

    #[test]
    fn a_matched_level_means_its_context_is_cached_too() {
        // A 500-token system prompt folded into the levels, then 3 blocks of 128 tokens.
        let request = RequestInfo {
            prefix_levels: 3,
            prompt_tokens: 500 + 3 * 128,
            block_tokens: 128,
            context_tokens: 500,
            ..RequestInfo::default()
        };
        assert_eq!(request.cached_tokens(0), 0);
        assert_eq!(request.cached_tokens(1), 628);
        assert_eq!(request.cached_tokens(3), 884);
        assert_eq!(request.cached_tokens(9), 884, "never more than the prompt");
    }

    #[test]
    fn load_cost_weighs_the_queue_against_the_cache() {
        let scorer = LoadCostScorer {
            request_tokens: 100.0,
            affinity_weight: 1.0,
        };
        // A 2,048-token prompt, 16 blocks of 128 tokens; the holder has all 16.
        let request = RequestInfo {
            prefix_levels: 16,
            prompt_tokens: 2048,
            block_tokens: 128,
            ..RequestInfo::default()
        };
        let holder = |inflight, backlog| Candidate {
            prefix_depth: 16,
            backlog,
            ..cand(1, inflight)
        };
        let idle = cand(2, 0);
        // Idle holder: nothing to prefill. Idle stranger: the whole prompt.
        assert_eq!(scorer.cost(&request, &holder(0, 0.0)), 0.0);
        assert_eq!(scorer.cost(&request, &idle), 2048.0);
        // The holder keeps winning while its queue costs less than the re-prefill...
        let mut out = [0.0; 2];
        scorer.score(&request, &[holder(5, 1000.0), idle], &mut out);
        assert_eq!(out, [1.0, 0.0]);
        // ...and loses once it costs more: 10 requests and a backlog of 1,500 tokens = 2,500.
        scorer.score(&request, &[holder(10, 1500.0), idle], &mut out);
        assert_eq!(out, [0.0, 1.0]);
        // Equal costs tie (score 1 each): the picker then rotates.
        scorer.score(&request, &[cand(3, 2), cand(4, 2)], &mut out);
        assert_eq!(out, [1.0, 1.0]);
    }
}
