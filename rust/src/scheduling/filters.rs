//! Filters: drop candidates that must not take this request.

use super::{Candidate, Filter, RequestInfo};

/// Keeps healthy endpoints; if none is healthy, keeps them all (a guess beats a refusal).
pub struct HealthyFilter;

impl Filter for HealthyFilter {
    fn name(&self) -> &'static str {
        "healthy"
    }

    fn filter(&self, _request: &RequestInfo, candidates: &mut Vec<Candidate>) {
        if candidates.iter().any(|c| c.healthy) {
            candidates.retain(|c| c.healthy);
        }
    }
}

/// Bounded load (in the spirit of consistent hashing with bounded loads): an endpoint is
/// overloaded when its in-flight count has reached
/// `bound = max(floor, ceil(factor * (total_inflight + 1) / n))`.
/// No endpoint can take more than `factor` times its fair share once load is real, and the
/// least-loaded endpoint is always under the bound, so affinity can never pile a hot prefix onto
/// one server while others idle. `floor` lets a little affinity through at low load, where the
/// fair share would otherwise be a single request.
pub struct BoundedLoadFilter {
    pub factor: f64,
    pub floor: u32,
}

impl BoundedLoadFilter {
    pub fn bound(&self, candidates: &[Candidate]) -> u32 {
        let total: u64 = candidates.iter().map(|c| u64::from(c.inflight)).sum();
        let n = candidates.len().max(1) as f64;
        let fair = (self.factor * (total as f64 + 1.0) / n).ceil();
        (fair as u32).max(self.floor)
    }
}

impl Filter for BoundedLoadFilter {
    fn name(&self) -> &'static str {
        "bounded-load"
    }

    fn filter(&self, _request: &RequestInfo, candidates: &mut Vec<Candidate>) {
        let bound = self.bound(candidates);
        if candidates.iter().any(|c| c.inflight < bound) {
            candidates.retain(|c| c.inflight < bound);
        }
    }
}

/// Affinity keys (see `affinity`): when an endpoint that served the request's key is still a
/// candidate, only such endpoints remain. Runs after the bounded-load filter, so a key never pins
/// a session to an overloaded server: past the bound the session moves, and the key follows it.
pub struct AffinityKeyFilter;

impl Filter for AffinityKeyFilter {
    fn name(&self) -> &'static str {
        "affinity-key"
    }

    fn filter(&self, _request: &RequestInfo, candidates: &mut Vec<Candidate>) {
        if candidates.iter().any(|c| c.key_held) {
            candidates.retain(|c| c.key_held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::cand;
    use super::*;

    #[test]
    fn healthy_filter_fails_open() {
        let mut c = vec![
            cand(1, 0),
            Candidate {
                healthy: false,
                ..cand(2, 0)
            },
        ];
        HealthyFilter.filter(&RequestInfo::default(), &mut c);
        assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1]);
        let mut none = vec![Candidate {
            healthy: false,
            ..cand(1, 0)
        }];
        HealthyFilter.filter(&RequestInfo::default(), &mut none);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn affinity_key_filter_keeps_holders_and_fails_open() {
        let held = |id, inflight| Candidate {
            key_held: true,
            ..cand(id, inflight)
        };
        let mut c = vec![cand(1, 0), held(2, 3), cand(3, 1)];
        AffinityKeyFilter.filter(&RequestInfo::default(), &mut c);
        assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), vec![2]);
        let mut none = vec![cand(1, 0), cand(2, 0)];
        AffinityKeyFilter.filter(&RequestInfo::default(), &mut none);
        assert_eq!(none.len(), 2);
    }

    #[test]
    fn bounded_load_cases() {
        let f = BoundedLoadFilter {
            factor: 1.25,
            floor: 1,
        };
        // Idle pool: every endpoint may take one request.
        assert_eq!(
            f.bound(&[cand(1, 0), cand(2, 0), cand(3, 0), cand(4, 0)]),
            1
        );
        // 3 in flight on one of 4: the bound is 1, so only the idle ones remain.
        let mut c = vec![cand(1, 3), cand(2, 0), cand(3, 0), cand(4, 0)];
        f.filter(&RequestInfo::default(), &mut c);
        assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), vec![2, 3, 4]);
        // The floor lets a little affinity through at low load...
        let f = BoundedLoadFilter {
            factor: 1.25,
            floor: 3,
        };
        let mut c = vec![cand(1, 2), cand(2, 0), cand(3, 0), cand(4, 0)];
        f.filter(&RequestInfo::default(), &mut c);
        assert_eq!(c.len(), 4);
        // ...but not at real load, where the factor rules: bound = ceil(1.25 * 41 / 4) = 13.
        let mut c = vec![cand(1, 13), cand(2, 9), cand(3, 9), cand(4, 9)];
        assert_eq!(f.bound(&c), 13);
        f.filter(&RequestInfo::default(), &mut c);
        assert_eq!(c.len(), 3);
        // The least-loaded endpoint always survives.
        for loads in [[0u32, 0, 0], [5, 9, 100], [1000, 1000, 0]] {
            let mut c: Vec<_> = loads
                .iter()
                .enumerate()
                .map(|(i, &l)| cand(i as u32, l))
                .collect();
            let min = *loads.iter().min().unwrap();
            BoundedLoadFilter {
                factor: 1.0,
                floor: 0,
            }
            .filter(&RequestInfo::default(), &mut c);
            assert!(c.iter().any(|c| c.inflight == min));
        }
    }
}
