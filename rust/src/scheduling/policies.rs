//! The policies, each a profile composed of the pipeline pieces.

use super::filters::{AffinityKeyFilter, BoundedLoadFilter, HealthyFilter};
use super::pickers::MaxScorePicker;
use super::scorers::{LeastInflightScorer, LoadCostScorer};
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

/// Fewest requests in flight; ties take turns (the endpoint picked longest ago goes next).
pub fn least_request() -> Profile {
    Profile {
        filters: vec![Box::new(HealthyFilter)],
        scorers: vec![(Box::new(LeastInflightScorer), 1.0)],
        picker: Box::new(MaxScorePicker),
    }
}

/// The load model's weights (see `LoadCostScorer`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadModel {
    /// Prompt tokens of work one request in flight is worth (its batch slot and decode steps).
    pub request_tokens: f64,
    /// What a cached prompt token is worth against a token of queued work (1 = the same).
    pub affinity_weight: f64,
    /// Prompt tokens per second one endpoint is assumed to prefill: how fast its estimated
    /// backlog drains (see `backlog`).
    pub prefill_rate: f64,
}

impl LoadModel {
    /// Weights must be finite and non-negative, and the prefill rate positive.
    pub fn validate(&self) -> Result<(), &'static str> {
        let weight = |w: f64| w.is_finite() && w >= 0.0;
        if !(weight(self.request_tokens) && weight(self.affinity_weight)) {
            return Err("request_tokens and affinity_weight must be numbers >= 0");
        }
        if !(self.prefill_rate.is_finite() && self.prefill_rate > 0.0) {
            return Err("prefill_rate must be a number > 0");
        }
        Ok(())
    }
}

/// The endpoint where the request costs least (its requests in flight and prefill backlog, plus
/// the prefill of what it does not hold), among endpoints that are healthy and not overloaded,
/// and among those the ones that served the request's affinity key if any still qualifies; ties
/// take turns.
pub fn prefix_cache(model: LoadModel, load_factor: f64, load_floor: u32) -> Profile {
    Profile {
        filters: vec![
            Box::new(HealthyFilter),
            Box::new(BoundedLoadFilter {
                factor: load_factor,
                floor: load_floor,
            }),
            Box::new(AffinityKeyFilter),
        ],
        scorers: vec![(
            Box::new(LoadCostScorer {
                request_tokens: model.request_tokens,
                affinity_weight: model.affinity_weight,
            }),
            1.0,
        )],
        picker: Box::new(MaxScorePicker),
    }
}
