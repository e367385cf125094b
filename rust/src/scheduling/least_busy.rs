//! least_busy: the inference extension's legacy decision tree over live model-server metrics,
//! built from small filters.
//!
//! ```text
//! critical? ─yes→ queue < lora_queue_threshold ─ok→   lora affinity → least queue → least KV
//!          │                                   └fail→ least queue → lora affinity → least KV
//!          └no─→  queue <= queue_threshold and KV <= kv_threshold
//!                                              ─ok→   least queue → lora affinity → least KV
//!                                              └fail→ shed (429)
//! ```
//!
//! Before the tree, endpoints whose metrics are stale are dropped (unless all are: then the
//! caller falls back to least in-flight). A filter that would leave nothing passes its input
//! on unchanged. The final choice among the survivors is by fewest in flight; ties go to the
//! endpoint picked longest ago (`MaxScorePicker`), so a band of equally idle servers takes turns
//! with a burst instead of one taking it all.

use super::{Candidate, Filter, LoraFit, RequestInfo};

/// The thresholds of the decision tree (defaults: the inference extension's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Sheddable requests need an endpoint with at most this many queued.
    pub queue: f64,
    /// ... and KV-cache usage at most this.
    pub kv_cache: f64,
    /// Critical requests prefer LoRA affinity while the queue is below this.
    pub lora_queue: f64,
    /// Probability of keeping only endpoints with the adapter loaded (else: free slots too).
    pub lora_affinity: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            queue: 5.0,
            kv_cache: 0.8,
            lora_queue: 128.0,
            lora_affinity: 0.999,
        }
    }
}

/// Keeps endpoints with fresh metrics (all, if none is fresh).
pub struct FreshFilter;

impl Filter for FreshFilter {
    fn name(&self) -> &'static str {
        "fresh-metrics"
    }

    fn filter(&self, _request: &RequestInfo, candidates: &mut Vec<Candidate>) {
        if candidates.iter().any(|c| !c.stale) {
            candidates.retain(|c| !c.stale);
        }
    }
}

/// Keeps the band `[min, min + (max - min) / n]` of a load figure: the least loaded, plus those
/// close to it, so the final choice spreads instead of herding onto one exact minimum.
fn keep_band(candidates: &mut Vec<Candidate>, value: impl Fn(&Candidate) -> f64) {
    let (min, max) = candidates
        .iter()
        .map(&value)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !(min.is_finite() && max.is_finite()) {
        return;
    }
    let limit = min + (max - min) / candidates.len().max(1) as f64;
    candidates.retain(|c| value(c) <= limit);
}

pub struct LeastQueueFilter;

impl Filter for LeastQueueFilter {
    fn name(&self) -> &'static str {
        "least-queue"
    }

    fn filter(&self, _request: &RequestInfo, candidates: &mut Vec<Candidate>) {
        keep_band(candidates, |c| c.waiting);
    }
}

pub struct LeastKvCacheFilter;

impl Filter for LeastKvCacheFilter {
    fn name(&self) -> &'static str {
        "least-kv-cache"
    }

    fn filter(&self, _request: &RequestInfo, candidates: &mut Vec<Candidate>) {
        keep_band(candidates, |c| c.kv_cache);
    }
}

/// For a LoRA request: endpoints with the adapter loaded (with probability `affinity`), else
/// those that can load it; a request for a base model passes through.
pub struct LoraAffinityFilter {
    pub affinity: f64,
}

impl Filter for LoraAffinityFilter {
    fn name(&self) -> &'static str {
        "lora-affinity"
    }

    fn filter(&self, request: &RequestInfo, candidates: &mut Vec<Candidate>) {
        if !request.lora {
            return;
        }
        // `entropy` is uniform over u64: below the affinity share of its range, stick.
        let stick = (request.entropy as f64) < self.affinity * u64::MAX as f64;
        let loaded = candidates.iter().any(|c| c.lora == LoraFit::Loaded);
        if stick && loaded {
            candidates.retain(|c| c.lora == LoraFit::Loaded);
        } else if candidates.iter().any(|c| c.lora != LoraFit::None) {
            candidates.retain(|c| c.lora != LoraFit::None);
        }
    }
}

/// Has room for a sheddable request: queue and KV usage within the thresholds.
pub fn has_capacity(c: &Candidate, t: &Thresholds) -> bool {
    !c.stale && c.waiting <= t.queue && c.kv_cache <= t.kv_cache
}

/// Runs the decision tree; `false` means shed the request (sheddable, and no endpoint has room).
/// On return `candidates` holds the survivors.
pub fn decide(request: &RequestInfo, candidates: &mut Vec<Candidate>, t: &Thresholds) -> bool {
    FreshFilter.filter(request, candidates);
    let lora = LoraAffinityFilter {
        affinity: t.lora_affinity,
    };
    if request.critical {
        if candidates.iter().any(|c| c.waiting < t.lora_queue) {
            candidates.retain(|c| c.waiting < t.lora_queue);
            lora.filter(request, candidates);
            LeastQueueFilter.filter(request, candidates);
        } else {
            LeastQueueFilter.filter(request, candidates);
            lora.filter(request, candidates);
        }
    } else {
        if !candidates.iter().any(|c| has_capacity(c, t)) {
            return false;
        }
        candidates.retain(|c| has_capacity(c, t));
        LeastQueueFilter.filter(request, candidates);
        lora.filter(request, candidates);
    }
    LeastKvCacheFilter.filter(request, candidates);
    true
}

#[cfg(test)]
mod tests {
    use super::super::cand;
    use super::*;

    fn load(id: u32, waiting: f64, kv_cache: f64) -> Candidate {
        Candidate {
            waiting,
            kv_cache,
            ..cand(id, 0)
        }
    }

    fn ids(c: &[Candidate]) -> Vec<u32> {
        c.iter().map(|c| c.id).collect()
    }

    fn critical() -> RequestInfo<'static> {
        RequestInfo {
            critical: true,
            ..RequestInfo::default()
        }
    }

    #[test]
    fn critical_requests_go_to_the_least_queue_then_least_kv() {
        let mut c = vec![
            load(1, 10.0, 0.1),
            load(2, 0.0, 0.9),
            load(3, 1.0, 0.2),
            load(4, 0.0, 0.3),
        ];
        assert!(decide(&critical(), &mut c, &Thresholds::default()));
        // Queue band [0, 0 + 10/4]: 2, 3, 4; KV band over them [0.2, 0.2 + 0.7/3]: 3, 4.
        assert_eq!(ids(&c), vec![3, 4]);
    }

    #[test]
    fn stale_endpoints_are_avoided_unless_all_are_stale() {
        let stale = |id| Candidate {
            stale: true,
            ..load(id, 0.0, 0.0)
        };
        let mut c = vec![stale(1), load(2, 50.0, 0.9)];
        assert!(decide(&critical(), &mut c, &Thresholds::default()));
        assert_eq!(ids(&c), vec![2]);
        let mut all = vec![stale(1), stale(2)];
        FreshFilter.filter(&critical(), &mut all);
        assert_eq!(ids(&all), vec![1, 2]);
    }

    #[test]
    fn sheddable_requests_need_room_or_are_shed() {
        let t = Thresholds::default();
        let sheddable = RequestInfo::default();
        let mut c = vec![load(1, 6.0, 0.1), load(2, 0.0, 0.85), load(3, 5.0, 0.8)];
        assert!(decide(&sheddable, &mut c, &t));
        assert_eq!(
            ids(&c),
            vec![3],
            "only 3 is within queue <= 5 and KV <= 0.8"
        );
        let mut full = vec![load(1, 6.0, 0.1), load(2, 0.0, 0.85)];
        assert!(!decide(&sheddable, &mut full, &t));
        let mut same = vec![load(1, 6.0, 0.1), load(2, 0.0, 0.85)];
        assert!(
            decide(&critical(), &mut same, &t),
            "critical requests are never shed"
        );
    }

    #[test]
    fn lora_requests_prefer_the_loaded_adapter_then_free_slots() {
        let with = |id, lora| Candidate {
            lora,
            ..load(id, 0.0, 0.0)
        };
        let request = RequestInfo {
            critical: true,
            lora: true,
            entropy: 0,
            ..RequestInfo::default()
        };
        let mut c = vec![
            with(1, LoraFit::None),
            with(2, LoraFit::Loaded),
            with(3, LoraFit::FreeSlot),
        ];
        assert!(decide(&request, &mut c, &Thresholds::default()));
        assert_eq!(ids(&c), vec![2]);
        // The rare draw above the affinity share also admits free slots.
        let explore = RequestInfo {
            entropy: u64::MAX,
            ..request
        };
        let mut c = vec![
            with(1, LoraFit::None),
            with(2, LoraFit::Loaded),
            with(3, LoraFit::FreeSlot),
        ];
        assert!(decide(&explore, &mut c, &Thresholds::default()));
        assert_eq!(ids(&c), vec![2, 3]);
        // A base-model request ignores adapters.
        let mut c = vec![with(1, LoraFit::None), with(2, LoraFit::Loaded)];
        assert!(decide(&critical(), &mut c, &Thresholds::default()));
        assert_eq!(ids(&c), vec![1, 2]);
    }

    #[test]
    fn a_queue_past_the_lora_threshold_puts_least_queue_first() {
        let t = Thresholds {
            lora_queue: 3.0,
            ..Thresholds::default()
        };
        let request = RequestInfo {
            critical: true,
            lora: true,
            ..RequestInfo::default()
        };
        let loaded_but_busy = Candidate {
            lora: LoraFit::Loaded,
            ..load(1, 40.0, 0.0)
        };
        let mut c = vec![loaded_but_busy, load(2, 4.0, 0.0)];
        assert!(decide(&request, &mut c, &t));
        assert_eq!(
            ids(&c),
            vec![2],
            "the queue decides before affinity when all queues are long"
        );
    }

    #[test]
    fn bands_keep_near_ties_together() {
        let mut c = vec![load(1, 0.0, 0.0), load(2, 1.0, 0.0), load(3, 9.0, 0.0)];
        LeastQueueFilter.filter(&critical(), &mut c);
        assert_eq!(ids(&c), vec![1, 2]);
    }
}
