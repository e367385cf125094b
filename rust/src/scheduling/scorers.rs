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

/// The share of the request's prefix blocks the endpoint already holds.
pub struct PrefixAffinityScorer;

impl Scorer for PrefixAffinityScorer {
    fn name(&self) -> &'static str {
        "prefix-affinity"
    }

    fn score(&self, request: &RequestInfo, candidates: &[Candidate], out: &mut [f64]) {
        let levels = f64::from(request.prefix_levels.max(1));
        for (c, s) in candidates.iter().zip(out.iter_mut()) {
            *s = f64::from(c.prefix_depth) / levels;
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
    fn prefix_affinity_is_share_of_levels() {
        let c = [
            Candidate {
                prefix_depth: 3,
                ..cand(1, 0)
            },
            cand(2, 0),
        ];
        let mut out = [0.0; 2];
        PrefixAffinityScorer.score(
            &RequestInfo {
                prefix_levels: 4,
                ..RequestInfo::default()
            },
            &c,
            &mut out,
        );
        assert_eq!(out, [0.75, 0.0]);
    }
}
