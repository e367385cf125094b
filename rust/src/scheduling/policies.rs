//! The policies, each a profile composed of the pipeline pieces.

use super::filters::{BoundedLoadFilter, HealthyFilter};
use super::pickers::MaxScorePicker;
use super::scorers::{LeastInflightScorer, PrefixAffinityScorer};
use super::Profile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    GlobalLeastRequest,
    PrefixCache,
    /// Live model-server metrics (see `least_busy`).
    LeastBusy,
}

impl Policy {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "global_least_request" => Some(Policy::GlobalLeastRequest),
            "prefix_cache" => Some(Policy::PrefixCache),
            "least_busy" => Some(Policy::LeastBusy),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::GlobalLeastRequest => "global_least_request",
            Policy::PrefixCache => "prefix_cache",
            Policy::LeastBusy => "least_busy",
        }
    }

    pub fn uses_prefix(self) -> bool {
        self == Policy::PrefixCache
    }
}

/// Fewest requests in flight; uniform random among ties.
pub fn least_request() -> Profile {
    Profile {
        filters: vec![Box::new(HealthyFilter)],
        scorers: vec![(Box::new(LeastInflightScorer), 1.0)],
        picker: Box::new(MaxScorePicker),
    }
}

/// Weight of prefix affinity against load: any real prefix advantage outweighs a load
/// difference, and load decides among equal matches (and when nothing matches).
const AFFINITY_WEIGHT: f64 = 100.0;

/// Longest held prefix among endpoints that are healthy and not overloaded, else least in flight.
pub fn prefix_cache(load_factor: f64, load_floor: u32) -> Profile {
    Profile {
        filters: vec![
            Box::new(HealthyFilter),
            Box::new(BoundedLoadFilter {
                factor: load_factor,
                floor: load_floor,
            }),
        ],
        scorers: vec![
            (Box::new(PrefixAffinityScorer), AFFINITY_WEIGHT),
            (Box::new(LeastInflightScorer), 1.0),
        ],
        picker: Box::new(MaxScorePicker),
    }
}
