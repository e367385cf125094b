//! The picking engine of one replica: the endpoint pool, request tickets, the configured policy,
//! and the seam to where in-flight load and prefix holders live.
//!
//! A pick is two steps: `decide` runs the policy's pipeline (filters, scorers, picker) on the
//! current view of every endpoint's load and prefix holders, and `commit` counts the decision
//! in (a ticket), records its prefix levels, and claims them. `pick` does both. Shared state in
//! Redis runs the same two steps with a round trip between them (see `shared::SharedPicks`), so
//! one engine decides for every backend:
//!
//! | backend | requests in flight | prefill backlog | prefix holders |
//! |---|---|---|---|
//! | embedded (one process) | this process's counts | this process's picks | the embedded `PrefixTable` |
//! | `--workers N` | the workers' shared mapping (`WorkerState`) | the same mapping | the same mapping |
//! | Redis | pool-wide, from the latest script reply (`set_remote_loads`) | this replica's picks and the pool's stream of the others' | the embedded table, fed the same way |
//!
//! Every pick returns a ticket; releasing a ticket decrements its endpoint exactly once, however
//! often it is called, so in-flight counts cannot leak or go negative. Endpoints are interned by
//! address for the life of the process: an endpoint removed from the pool keeps its in-flight
//! count until its requests finish, and re-adding it restores its prefix entries and counts.

use std::collections::{HashMap, TryReserveError};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::affinity::AffinityKey;
use crate::backlog::Backlog;
use crate::prefix_hash::DEFAULT_BLOCK_SIZE;
use crate::prefix_table::PrefixTable;
use crate::scheduling::filters::HealthyFilter;
use crate::scheduling::least_busy::{self, Thresholds};
use crate::scheduling::policies::{self, LoadModel, Policy};
use crate::scheduling::{Candidate, Filter, LoraFit, Profile, RequestInfo, Scratch};
use crate::worker_state::WorkerState;

/// Prompt bytes per token, to estimate tokens from a prompt's size (English text and code run
/// at about 4 bytes per token with the common tokenizers).
pub const BYTES_PER_TOKEN: u64 = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct BalancerConfig {
    pub policy: Policy,
    /// Seconds a prefix -> endpoint entry lives after it was last recorded.
    pub prefix_ttl_s: u64,
    /// Entries in the prefix table (least recently used evicted beyond it).
    pub prefix_capacity: usize,
    /// Bounded-load factor and floor for prefix affinity (see `BoundedLoadFilter`).
    pub load_factor: f64,
    pub load_floor: u32,
    /// prefix_cache's load model (see `LoadCostScorer`).
    pub load_model: LoadModel,
    /// Refuse a pick when the chosen endpoint already has this many in flight; 0 = off.
    pub max_request_count: u32,
    /// least_busy: models never shed (`None`: every model is critical).
    pub critical_models: Option<Vec<String>>,
    /// least_busy: metrics older than this count as stale.
    pub stale_after_ms: u64,
    pub thresholds: Thresholds,
    /// Where a request's affinity key comes from, first present wins (see `affinity`).
    pub affinity_keys: Vec<AffinityKey>,
    /// A request for a model no endpoint serves: routed by load among all endpoints (`true`)
    /// or refused (`PickError::UnknownModel`).
    pub route_unknown_models: bool,
}

impl Default for BalancerConfig {
    /// The one owner of the picking defaults: the daemon's config reads them from here.
    fn default() -> Self {
        Self {
            policy: Policy::PrefixCache,
            prefix_ttl_s: 1800,
            prefix_capacity: 262_144,
            load_factor: 1.5,
            load_floor: 8,
            load_model: LoadModel {
                request_tokens: 128.0,
                affinity_weight: 2.0,
                prefill_rate: 10_000.0,
            },
            max_request_count: 0,
            critical_models: None,
            stale_after_ms: 2000,
            thresholds: Thresholds::default(),
            affinity_keys: AffinityKey::DEFAULT_ORDER.to_vec(),
            route_unknown_models: false,
        }
    }
}

/// Why an endpoint was picked: the one owner of these names (metrics and logs use `as_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickReason {
    /// The chosen endpoint holds part of the request's prefix.
    PrefixHit,
    /// Chosen by load (no prefix held, or the policy is least-request).
    LeastRequest,
    /// The body could not be parsed; chosen by load.
    BadBody,
    /// No endpoint was healthy; chosen by load among all of them.
    NoHealthy,
    /// least_busy: chosen from live metrics.
    LeastBusy,
    /// least_busy: every endpoint's metrics were stale; chosen by in-flight count.
    StaleMetrics,
    /// The chosen endpoint served the request's affinity key (`prompt_cache_key`, ...).
    AffinityKey,
    /// The request refers to state one endpoint holds (a stored response): sent there.
    StoredResponse,
    /// No endpoint serves the request's model; chosen by load among all (`unknown_model: route`).
    UnknownModel,
}

impl PickReason {
    pub const ALL: [PickReason; 9] = [
        PickReason::PrefixHit,
        PickReason::LeastRequest,
        PickReason::BadBody,
        PickReason::NoHealthy,
        PickReason::LeastBusy,
        PickReason::StaleMetrics,
        PickReason::AffinityKey,
        PickReason::StoredResponse,
        PickReason::UnknownModel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PickReason::PrefixHit => "prefix_hit",
            PickReason::LeastRequest => "least_request",
            PickReason::BadBody => "bad_body",
            PickReason::NoHealthy => "no_healthy",
            PickReason::LeastBusy => "least_busy",
            PickReason::StaleMetrics => "stale_metrics",
            PickReason::AffinityKey => "affinity_key",
            PickReason::StoredResponse => "stored_response",
            PickReason::UnknownModel => "unknown_model",
        }
    }

    /// The pick fell back from the policy (counted in `llmlb_fallbacks_total`).
    pub fn is_fallback(self) -> bool {
        matches!(
            self,
            PickReason::BadBody
                | PickReason::NoHealthy
                | PickReason::StaleMetrics
                | PickReason::UnknownModel
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub ticket: u64,
    pub endpoint: Arc<str>,
    pub reason: PickReason,
    pub prefix_depth: u32,
    /// In-flight count of the chosen endpoint including this request.
    pub inflight: u32,
    pub figures: Figures,
}

/// How a decision was reached: the figures of its decision record.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    /// The request's prefix levels.
    pub levels: u32,
    /// The request's estimated prompt tokens, and those predicted to be cached on the endpoint.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Candidates left after the filters (1 for a pinned request).
    pub candidates: u32,
    /// The chosen endpoint's total score, and the best of the others (`None`: it was alone).
    pub score: f64,
    pub runner_up: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
    /// `max_request_count` reached on the best endpoint.
    OverLimit {
        endpoint: Arc<str>,
        inflight: u32,
    },
    /// least_busy: a sheddable request and no endpoint has room for it.
    Shed,
    /// No endpoint serves the request's model (and `route_unknown_models` is off).
    UnknownModel {
        model: String,
    },
}

/// What a pick knows of the request. `None` where a pick is made from the headers alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    /// The prompt's chained prefix keys (empty when the policy needs none).
    pub hashes: &'a [u64],
    /// Canonical prompt bytes up to each level's end (`ParsedRequest::level_ends`); empty: each
    /// level counts as a full block.
    pub level_ends: &'a [u64],
    /// The prompt's size (see `ParsedRequest::prompt_bytes`), and its part outside the blocks
    /// (`ParsedRequest::context_bytes`).
    pub prompt_bytes: u64,
    pub context_bytes: u64,
    /// The `model` field: only endpoints serving it are candidates (and least_busy:
    /// criticality and LoRA adapters).
    pub model: Option<&'a str>,
    /// The request's affinity key, hashed (see `affinity`; prefix_cache only).
    pub key: Option<u64>,
    /// The endpoint that holds state the request refers to (the stored response a Responses API
    /// follow-up continues): it is sent there while that endpoint is in the pool and healthy.
    pub pinned: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// What the pipeline knows of the request's size.
    fn info(&self) -> RequestInfo<'a> {
        RequestInfo {
            level_ends: self.level_ends,
            prefix_levels: self.hashes.len() as u32,
            prompt_tokens: self.prompt_bytes.div_ceil(BYTES_PER_TOKEN),
            block_tokens: DEFAULT_BLOCK_SIZE as u64 / BYTES_PER_TOKEN,
            context_tokens: self.context_bytes.div_ceil(BYTES_PER_TOKEN),
            ..RequestInfo::default()
        }
    }
}

/// A decision of the pipeline, not yet counted (see `Balancer::commit`).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The chosen endpoint's interned id.
    pub endpoint: u32,
    pub reason: PickReason,
    /// Leading prefix levels the endpoint held.
    pub depth: u32,
    /// The endpoint's load in the view the decision used.
    pub inflight: u32,
    /// Prompt tokens this request adds to the endpoint's backlog: the part it does not hold.
    pub tokens: u64,
    /// Whether the request's prefix levels are recorded for the endpoint.
    pub records_prefix: bool,
    /// The affinity key recorded for the endpoint with the pick.
    pub key: Option<u64>,
    pub figures: Figures,
}

/// One endpoint's last scraped load (least_busy).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    pub waiting: f64,
    pub running: f64,
    pub kv_cache: f64,
    pub running_lora: Vec<String>,
    pub waiting_lora: Vec<String>,
    pub max_lora: u32,
    /// When it was scraped, on the balancer's clock.
    pub at_ms: u64,
}

impl Load {
    fn lora_fit(&self, model: &str) -> LoraFit {
        if self
            .running_lora
            .iter()
            .chain(&self.waiting_lora)
            .any(|a| a == model)
        {
            LoraFit::Loaded
        } else if (self.running_lora.len() as u32) < self.max_lora {
            LoraFit::FreeSlot
        } else {
            LoraFit::None
        }
    }
}

/// What `Balancer::endpoint_loads` reports per endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadView {
    pub address: Arc<str>,
    pub load: Option<Load>,
    pub picks_since_scrape: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub address: Arc<str>,
    /// Pool-wide: every worker process sharing state, or every replica with Redis (equals
    /// `own_inflight` on embedded state).
    pub inflight: u32,
    /// The prefill backlog estimate, in whole prompt tokens (see `backlog`).
    pub backlog: u64,
    /// This process's own requests in flight.
    pub own_inflight: u32,
    pub healthy: bool,
    pub in_pool: bool,
}

/// What a failed request took back from its endpoint: the prefix levels it claimed and what
/// the backlog estimate still held of its prompt tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenBack {
    pub endpoint: Arc<str>,
    pub levels: Box<[u64]>,
    pub tokens: u64,
}

/// One request in flight.
struct Ticket {
    endpoint: u32,
    /// The endpoint's scrape generation when picked (least_busy).
    generation: u32,
    /// Prefix levels this pick recorded that the endpoint did not hold before: taken back if
    /// the request fails, since the server then never cached them.
    claimed: Option<Box<[u64]>>,
    /// The prompt tokens the pick added to the endpoint's backlog, and when: what is left of
    /// them is taken back when the request ends (it can only end once they are prefilled, or
    /// refused).
    tokens: u64,
    sent_ms: u64,
}

const NOT_IN_POOL: u32 = u32::MAX;
const NO_SLOT: u32 = u32::MAX;

/// The levels past those the endpoint already held, if any.
fn claimed_levels(hashes: &[u64], depth: u32) -> Option<Box<[u64]>> {
    let new = hashes.get(depth as usize..).unwrap_or(&[]);
    (!new.is_empty()).then(|| new.into())
}

/// The state this process shares with its sibling workers, and how local ids map onto it.
/// This process's prefix table activity since it started (the `llmlb_prefix_table_*` metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCounts {
    /// Requests with prefix levels looked up.
    pub lookups: u64,
    /// Of those, lookups where some endpoint held the first level.
    pub hits: u64,
    /// Levels newly stored, and of those, how many evicted another entry.
    pub insertions: u64,
    pub evictions: u64,
}

/// The prefix table's size and activity (scrape time: the shared table is counted in one pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub entries: usize,
    pub capacity: usize,
    pub counts: PrefixCounts,
}

struct Workers {
    state: Arc<WorkerState>,
    /// Local id -> directory slot (`NO_SLOT` when the directory could not take the address;
    /// that endpoint then counts and matches prefixes from this process's state alone).
    slot_of: Vec<u32>,
    local_of: HashMap<u32, u32>,
    slot_depths: Vec<(u32, u32)>,
}

impl Workers {
    fn slot(&self, id: u32) -> Option<u32> {
        self.slot_of
            .get(id as usize)
            .copied()
            .filter(|&s| s != NO_SLOT)
    }
}

/// Decisions on their way to Redis, per endpoint (see `Balancer::hold`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Held {
    requests: u32,
    tokens: u64,
}

pub struct Balancer {
    config: BalancerConfig,
    profile: Profile,
    fallback: Profile,
    addresses: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
    /// This process's own requests in flight per endpoint.
    own: Vec<u32>,
    /// Pool-wide requests in flight from Redis (by id), while shared picks go through it.
    remote: Option<Vec<u32>>,
    /// This replica's decisions whose commits are on their way to Redis (see `hold`).
    held: Vec<Held>,
    /// Prefill backlog per endpoint (embedded and Redis; the workers keep theirs shared).
    backlog: Vec<Backlog>,
    /// The ticket number of each endpoint's latest pick here (tie-break order; 0 = never).
    last_picked: Vec<u64>,
    healthy: Vec<bool>,
    pool: Vec<u32>,
    /// Position of each interned endpoint in `pool` (`NOT_IN_POOL` if absent).
    pool_position: Vec<u32>,
    tickets: HashMap<u64, Ticket>,
    next_ticket: u64,
    prefix: PrefixTable,
    prefix_counts: PrefixCounts,
    rng: SmallRng,
    candidates: Vec<Candidate>,
    depths: Vec<(u32, u32)>,
    scratch: Scratch,
    workers: Option<Workers>,
    loads: Vec<Option<Load>>,
    /// The models each endpoint serves (`None`: not known, taken to serve any).
    models: Vec<Option<Box<[Box<str>]>>>,
    /// least_busy: requests picked since the endpoint's last scrape and still in flight (the
    /// scrape could not see them yet). Releasing one picked before the scrape changes nothing.
    picks_since_scrape: Vec<u32>,
    scrape_generation: Vec<u32>,
    /// With `--workers`: the generation of the shared load last taken in per endpoint (see
    /// `take_published_load`).
    published_generation: Vec<u64>,
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        Self::with_rng(config, SmallRng::from_os_rng())
    }

    /// Like `new`, but a prefix table whose memory cannot be reserved is an error.
    pub fn try_new(config: BalancerConfig) -> Result<Self, TryReserveError> {
        Self::try_with_rng(config, SmallRng::from_os_rng())
    }

    pub fn with_rng(config: BalancerConfig, rng: SmallRng) -> Self {
        Self::try_with_rng(config, rng).expect("memory for the prefix table")
    }

    pub fn try_with_rng(config: BalancerConfig, rng: SmallRng) -> Result<Self, TryReserveError> {
        let profile = match config.policy {
            // least_busy decides in `least_busy`; least-request then makes the final choice.
            Policy::GlobalLeastRequest | Policy::LeastBusy => policies::least_request(),
            Policy::PrefixCache => {
                policies::prefix_cache(config.load_model, config.load_factor, config.load_floor)
            }
        };
        // Only prefix_cache uses the table: the other policies need no memory for it.
        let capacity = if config.policy.uses_prefix() {
            config.prefix_capacity
        } else {
            1
        };
        let prefix = PrefixTable::try_new(capacity, config.prefix_ttl_s)?;
        Ok(Self {
            config,
            profile,
            fallback: policies::least_request(),
            addresses: Vec::new(),
            ids: HashMap::new(),
            own: Vec::new(),
            remote: None,
            held: Vec::new(),
            backlog: Vec::new(),
            last_picked: Vec::new(),
            healthy: Vec::new(),
            pool: Vec::new(),
            pool_position: Vec::new(),
            tickets: HashMap::new(),
            next_ticket: 1,
            prefix,
            prefix_counts: PrefixCounts::default(),
            rng,
            candidates: Vec::new(),
            depths: Vec::new(),
            scratch: Scratch::default(),
            workers: None,
            loads: Vec::new(),
            models: Vec::new(),
            picks_since_scrape: Vec::new(),
            scrape_generation: Vec::new(),
            published_generation: Vec::new(),
        })
    }

    /// Records an endpoint's freshly scraped load; picks since the previous scrape stop counting.
    /// With `--workers` it is published to the other workers too (one of them scrapes for all).
    pub fn set_load(&mut self, address: &str, load: Load) {
        let id = self.intern(address) as usize;
        if let Some(w) = &self.workers {
            if let Some(slot) = w.slot(id as u32) {
                w.state.publish_load(slot, &load);
                self.published_generation[id] = w.state.load_generation(slot);
            }
        }
        self.loads[id] = Some(load);
        self.picks_since_scrape[id] = 0;
        self.scrape_generation[id] = self.scrape_generation[id].wrapping_add(1);
    }

    /// With `--workers`: takes in the load another worker published for `id` since this one
    /// last looked, as `set_load` would (one atomic read when nothing changed).
    fn take_published_load(&mut self, id: usize) {
        let Some(w) = &self.workers else { return };
        let Some(slot) = w.slot(id as u32) else {
            return;
        };
        if w.state.load_generation(slot) == self.published_generation[id] {
            return;
        }
        if let Some((generation, load)) = w.state.read_load(slot) {
            self.loads[id] = Some(load);
            self.picks_since_scrape[id] = 0;
            self.scrape_generation[id] = self.scrape_generation[id].wrapping_add(1);
            self.published_generation[id] = generation;
        }
    }

    /// The last load of every endpoint in the pool (with `--workers`, the latest published).
    pub fn endpoint_loads(&mut self) -> Vec<LoadView> {
        for i in 0..self.pool.len() {
            self.take_published_load(self.pool[i] as usize);
        }
        self.pool
            .iter()
            .map(|&id| LoadView {
                address: self.addresses[id as usize].clone(),
                load: self.loads[id as usize].clone(),
                picks_since_scrape: self.picks_since_scrape[id as usize],
            })
            .collect()
    }

    fn is_critical(&self, model: Option<&str>) -> bool {
        match (&self.config.critical_models, model) {
            (Some(critical), Some(model)) => critical.iter().any(|m| m == model),
            // No list: everything is critical (as in Higress); no model: never shed the unknown.
            _ => true,
        }
    }

    /// Fills the candidates' load fields and decides; `Ok(false)` when every endpoint is stale.
    fn least_busy(&mut self, model: Option<&str>, now_ms: u64) -> Result<bool, PickError> {
        let stale_after = self.config.stale_after_ms;
        let mut lora = false;
        if self.workers.is_some() {
            for i in 0..self.candidates.len() {
                self.take_published_load(self.candidates[i].id as usize);
            }
        }
        for c in &mut self.candidates {
            let id = c.id as usize;
            match &self.loads[id] {
                Some(load) if now_ms.saturating_sub(load.at_ms) <= stale_after => {
                    c.waiting = load.waiting + f64::from(self.picks_since_scrape[id]);
                    c.kv_cache = load.kv_cache;
                    c.lora = model.map_or(LoraFit::None, |m| load.lora_fit(m));
                    lora |= c.lora == LoraFit::Loaded;
                }
                _ => c.stale = true,
            }
        }
        if self.candidates.iter().all(|c| c.stale) {
            return Ok(false);
        }
        let request = RequestInfo {
            critical: self.is_critical(model),
            lora,
            entropy: rand::Rng::random(&mut self.rng),
            ..RequestInfo::default()
        };
        HealthyFilter.filter(&request, &mut self.candidates);
        if least_busy::decide(&request, &mut self.candidates, &self.config.thresholds) {
            Ok(true)
        } else {
            Err(PickError::Shed)
        }
    }

    // --- the backend seam ------------------------------------------------------------------

    /// From now on, in-flight counts, backlogs and prefix entries live in `state`, shared with
    /// the other worker processes (each worker attaches its own `WorkerState` of the same file).
    pub fn attach_workers(&mut self, state: Arc<WorkerState>) {
        let mut workers = Workers {
            state,
            slot_of: Vec::with_capacity(self.addresses.len()),
            local_of: HashMap::new(),
            slot_depths: Vec::new(),
        };
        let rate = self.config.load_model.prefill_rate;
        for (id, address) in self.addresses.iter().enumerate() {
            let slot = workers.state.intern(address).unwrap_or(NO_SLOT);
            workers.slot_of.push(slot);
            if slot != NO_SLOT {
                workers.local_of.insert(slot, id as u32);
                workers.state.add(slot, u64::from(self.own[id]));
                let b = self.backlog[id];
                workers
                    .state
                    .add_backlog(slot, b.tokens as u64, b.at_ms, rate);
            }
        }
        self.workers = Some(workers);
        // Prefix entries live in the shared state from now on: the embedded table's memory goes.
        self.prefix = PrefixTable::new(1, self.config.prefix_ttl_s);
    }

    /// Shared picks go through Redis from now on: decisions use the pool-wide request counts of
    /// the latest script reply (`set_remote_loads`). `false` goes back to this replica's own
    /// counts (Redis is away).
    pub fn set_remote(&mut self, on: bool) {
        self.remote = on.then(|| self.own.clone());
    }

    /// Pool-wide requests in flight from a Redis reply, for endpoints by address.
    pub fn set_remote_loads<S: AsRef<str>>(&mut self, loads: &[(S, u32)]) {
        if self.remote.is_none() {
            return;
        }
        for (address, requests) in loads {
            let id = self.intern(address.as_ref()) as usize;
            if let Some(remote) = self.remote.as_mut() {
                remote[id] = *requests;
            }
        }
    }

    /// Another replica's change to an endpoint's requests in flight, from the pool's stream
    /// (between two replies).
    pub fn add_remote_load(&mut self, endpoint: &str, requests: i64) {
        if self.remote.is_none() {
            return;
        }
        let id = self.intern(endpoint) as usize;
        if let Some(remote) = self.remote.as_mut() {
            remote[id] = (i64::from(remote[id]) + requests).clamp(0, i64::from(u32::MAX)) as u32;
        }
    }

    /// The worker-shared state and `id`'s slot in it, when attached and the slot exists.
    fn shared_slot(&self, id: u32) -> Option<(&Workers, u32)> {
        self.workers
            .as_ref()
            .and_then(|w| w.slot(id).map(|s| (w, s)))
    }

    /// Counts a decision in the view while its commit is on its way to Redis, so this
    /// replica's next decisions see it (`unhold` once the reply is in).
    pub fn hold(&mut self, decision: &Decision) {
        let held = &mut self.held[decision.endpoint as usize];
        held.requests += 1;
        held.tokens += decision.tokens;
    }

    pub fn unhold(&mut self, decision: &Decision) {
        let held = &mut self.held[decision.endpoint as usize];
        held.requests = held.requests.saturating_sub(1);
        held.tokens = held.tokens.saturating_sub(decision.tokens);
    }

    /// `id`'s requests in flight in the view decisions use: pool-wide from Redis (plus this
    /// replica's commits on their way), else across the workers, else this process's own.
    pub fn inflight_of(&self, id: u32) -> u32 {
        let i = id as usize;
        if let Some(remote) = &self.remote {
            return remote[i] + self.held[i].requests;
        }
        match self.shared_slot(id) {
            Some((w, slot)) => w.state.inflight(slot),
            None => self.own[i],
        }
    }

    /// `id`'s prefill backlog at `now_ms`, in tokens (with the commits on their way to Redis).
    pub fn backlog_of(&self, id: u32, now_ms: u64) -> f64 {
        let rate = self.config.load_model.prefill_rate;
        if let Some((w, slot)) = self.shared_slot(id) {
            return w.state.backlog(slot).at(now_ms, rate);
        }
        let i = id as usize;
        self.backlog[i].at(now_ms, rate) + self.held[i].tokens as f64
    }

    fn add_backlog(&mut self, id: u32, tokens: u64, sent_ms: u64) {
        let rate = self.config.load_model.prefill_rate;
        match self.shared_slot(id) {
            Some((w, slot)) => w.state.add_backlog(slot, tokens, sent_ms, rate),
            None => self.backlog[id as usize].add(tokens, sent_ms, rate),
        }
    }

    fn take_back_backlog(&mut self, id: u32, tokens: u64, as_of_ms: u64, now_ms: u64) {
        let rate = self.config.load_model.prefill_rate;
        match self.shared_slot(id) {
            Some((w, slot)) => w
                .state
                .take_back_backlog(slot, tokens, as_of_ms, now_ms, rate),
            None => self.backlog[id as usize].take_back(tokens, as_of_ms, now_ms, rate),
        }
    }

    fn count_in(&mut self, id: u32) {
        let i = id as usize;
        self.own[i] += 1;
        if let Some(remote) = self.remote.as_mut() {
            // Until the next reply says otherwise (it carries this pick too).
            remote[i] += 1;
        }
        self.last_picked[i] = self.next_ticket;
        if let Some((w, slot)) = self.shared_slot(id) {
            w.state.increment(slot);
        }
    }

    fn count_out(&mut self, id: u32) {
        let i = id as usize;
        self.own[i] = self.own[i].saturating_sub(1);
        if let Some(remote) = self.remote.as_mut() {
            remote[i] = remote[i].saturating_sub(1);
        }
        if let Some((w, slot)) = self.shared_slot(id) {
            w.state.decrement(slot);
        }
    }

    fn match_depths(&mut self, hashes: &[u64], now_ms: u64) {
        self.lookup_depths(hashes, now_ms);
        if !hashes.is_empty() {
            self.prefix_counts.lookups += 1;
            self.prefix_counts.hits += u64::from(!self.depths.is_empty());
        }
    }

    fn lookup_depths(&mut self, hashes: &[u64], now_ms: u64) {
        match self.workers.as_mut() {
            Some(w) => {
                w.state.match_depths(hashes, now_ms, &mut w.slot_depths);
                self.depths.clear();
                for &(slot, depth) in &w.slot_depths {
                    if let Some(&id) = w.local_of.get(&slot) {
                        self.depths.push((id, depth));
                    }
                }
            }
            None => self.prefix.match_depths(hashes, now_ms, &mut self.depths),
        }
    }

    fn record(&mut self, hashes: &[u64], id: u32, now_ms: u64) {
        let recorded = match self.shared_slot(id) {
            Some((w, slot)) => w.state.record(hashes, slot, now_ms),
            None => self.prefix.record(hashes, id, now_ms),
        };
        self.prefix_counts.insertions += recorded.inserted;
        self.prefix_counts.evictions += recorded.evicted;
    }

    fn forget(&mut self, hashes: &[u64], id: u32) {
        match self.shared_slot(id) {
            Some((w, slot)) => w.state.forget(hashes, slot),
            None => self.prefix.forget(hashes, id),
        }
    }

    /// Another replica committed a pick of `endpoint` (from the pool's stream; `sent_ms`: when,
    /// on this balancer's clock): its prompt tokens join the endpoint's backlog and its prefix
    /// levels (empty: none) the prefix table.
    pub fn apply_remote_commit(
        &mut self,
        endpoint: &str,
        tokens: u64,
        levels: &[u64],
        sent_ms: u64,
    ) {
        let id = self.intern(endpoint);
        self.add_backlog(id, tokens, sent_ms);
        if self.config.policy.uses_prefix() && !levels.is_empty() {
            self.record(levels, id, sent_ms);
        }
    }

    /// Another replica's request to `endpoint` ended: the `tokens` the backlog still held of it
    /// as of `as_of_ms` (this balancer's clock) are taken back.
    pub fn apply_remote_release(
        &mut self,
        endpoint: &str,
        tokens: u64,
        as_of_ms: u64,
        now_ms: u64,
    ) {
        let id = self.intern(endpoint);
        self.take_back_backlog(id, tokens, as_of_ms, now_ms);
    }

    /// Another replica's request to `endpoint` failed: the levels it claimed are taken back,
    /// and the `tokens` the backlog still held of it as of `as_of_ms` (this balancer's clock).
    pub fn apply_remote_failure(
        &mut self,
        endpoint: &str,
        levels: &[u64],
        tokens: u64,
        as_of_ms: u64,
        now_ms: u64,
    ) {
        let id = self.intern(endpoint);
        if tokens > 0 {
            self.take_back_backlog(id, tokens, as_of_ms, now_ms);
        }
        if self.config.policy.uses_prefix() && !levels.is_empty() {
            self.forget(levels, id);
        }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.config
    }

    fn intern(&mut self, address: &str) -> u32 {
        if let Some(&id) = self.ids.get(address) {
            return id;
        }
        let id = u32::try_from(self.addresses.len()).expect("fewer than 2^32 distinct endpoints");
        let address: Arc<str> = Arc::from(address);
        self.addresses.push(address.clone());
        self.ids.insert(address, id);
        self.own.push(0);
        self.held.push(Held::default());
        self.backlog.push(Backlog::default());
        if let Some(remote) = self.remote.as_mut() {
            remote.push(0);
        }
        self.last_picked.push(0);
        self.healthy.push(true);
        self.pool_position.push(NOT_IN_POOL);
        self.loads.push(None);
        self.models.push(None);
        self.picks_since_scrape.push(0);
        self.scrape_generation.push(0);
        self.published_generation.push(0);
        if let Some(w) = self.workers.as_mut() {
            let slot = w
                .state
                .intern(&self.addresses[id as usize])
                .unwrap_or(NO_SLOT);
            w.slot_of.push(slot);
            if slot != NO_SLOT {
                w.local_of.insert(slot, id);
            }
        }
        id
    }

    /// The interned id of `address` (interning it if new).
    pub fn id_of(&mut self, address: &str) -> u32 {
        self.intern(address)
    }

    pub fn address(&self, id: u32) -> &Arc<str> {
        &self.addresses[id as usize]
    }

    /// Replaces the pool (order kept, duplicates dropped). New endpoints start healthy.
    pub fn set_endpoints<S: AsRef<str>>(&mut self, addresses: &[S]) {
        for &id in &self.pool {
            self.pool_position[id as usize] = NOT_IN_POOL;
        }
        let mut pool = Vec::with_capacity(addresses.len());
        for address in addresses {
            let id = self.intern(address.as_ref());
            if self.pool_position[id as usize] == NOT_IN_POOL {
                self.pool_position[id as usize] = pool.len() as u32;
                pool.push(id);
            }
        }
        self.pool = pool;
    }

    /// Sets the models (and LoRA adapters) an endpoint serves; `None`: not known (it is then a
    /// candidate for a model no endpoint is known to serve).
    pub fn set_models<S: AsRef<str>>(&mut self, address: &str, models: Option<&[S]>) {
        let id = self.intern(address) as usize;
        self.models[id] = models.map(|m| m.iter().map(|s| Box::from(s.as_ref())).collect());
    }

    /// The models an endpoint is known to serve.
    pub fn models_of(&self, address: &str) -> Option<Vec<String>> {
        let id = *self.ids.get(address)?;
        self.models[id as usize]
            .as_ref()
            .map(|m| m.iter().map(ToString::to_string).collect())
    }

    /// Keeps the candidates that serve `model`: those known to serve it, else those whose models
    /// are not known. `Ok(false)`: none could, and the request is routed among all anyway.
    fn keep_serving(&mut self, model: Option<&str>) -> Result<bool, PickError> {
        let Some(model) = model.filter(|m| !m.is_empty()) else {
            return Ok(true);
        };
        let models = &self.models;
        let serves = |c: &Candidate| {
            models[c.id as usize]
                .as_ref()
                .map(|m| m.iter().any(|s| &**s == model))
        };
        if self.candidates.iter().all(|c| serves(c).is_none()) {
            return Ok(true); // nothing known about any endpoint's models
        }
        if self.candidates.iter().any(|c| serves(c) == Some(true)) {
            self.candidates.retain(|c| serves(c) == Some(true));
        } else if self.candidates.iter().any(|c| serves(c).is_none()) {
            self.candidates.retain(|c| serves(c).is_none());
        } else if self.config.route_unknown_models {
            return Ok(false);
        } else {
            return Err(PickError::UnknownModel {
                model: model.to_owned(),
            });
        }
        Ok(true)
    }

    /// Marks an endpoint (in the pool or not) healthy or unhealthy.
    pub fn set_healthy(&mut self, address: &str, healthy: bool) {
        let id = self.intern(address);
        self.healthy[id as usize] = healthy;
    }

    /// The pool's endpoint ids, in order.
    pub fn pool(&self) -> &[u32] {
        &self.pool
    }

    // --- picking ---------------------------------------------------------------------------

    /// Picks an endpoint. `prefix_hashes` is `None` when the body could not be parsed; the
    /// prompt's size is taken as whole blocks (tests and benches).
    pub fn pick(&mut self, prefix_hashes: Option<&[u64]>, now_ms: u64) -> Result<Pick, PickError> {
        self.pick_for(prefix_hashes, None, now_ms)
    }

    /// `pick` for a request of `model` (least_busy: criticality and LoRA adapters).
    pub fn pick_for(
        &mut self,
        prefix_hashes: Option<&[u64]>,
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<Pick, PickError> {
        let request = prefix_hashes.map(|hashes| Request {
            hashes,
            prompt_bytes: (hashes.len() * DEFAULT_BLOCK_SIZE) as u64,
            model,
            ..Request::default()
        });
        self.pick_request(request.as_ref(), now_ms)
    }

    /// Decides and commits. `None`: the body could not be parsed (picked by load).
    pub fn pick_request(
        &mut self,
        request: Option<&Request<'_>>,
        now_ms: u64,
    ) -> Result<Pick, PickError> {
        let decision = self.decide(request, now_ms)?;
        Ok(self.commit(&decision, request.map_or(&[], |r| r.hashes), now_ms))
    }

    /// Runs the policy on the current view; counts nothing (see `commit`).
    pub fn decide(
        &mut self,
        request: Option<&Request<'_>>,
        now_ms: u64,
    ) -> Result<Decision, PickError> {
        if self.pool.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        if let Some(decision) = request.and_then(|r| self.decide_pinned(r, now_ms)) {
            return Ok(decision);
        }
        self.fill_candidates(now_ms);
        let model_served = self.keep_serving(request.and_then(|r| r.model))?;
        let mut fresh_metrics = true;
        if self.config.policy == Policy::LeastBusy && request.is_some() {
            fresh_metrics = self.least_busy(request.and_then(|r| r.model), now_ms)?;
        }
        let hashes = request.map_or(&[][..], |r| r.hashes);
        let use_prefix = self.config.policy.uses_prefix() && !hashes.is_empty();
        if use_prefix {
            self.match_depths(hashes, now_ms);
            for &(id, depth) in &self.depths {
                if let Some(&pos) = self
                    .pool_position
                    .get(id as usize)
                    .filter(|&&p| p != NOT_IN_POOL)
                {
                    self.candidates[pos as usize].prefix_depth = depth;
                }
            }
        }
        let key = request
            .and_then(|r| r.key)
            .filter(|_| self.config.policy.uses_prefix());
        if let Some(key) = key {
            self.match_depths(&[key], now_ms);
            for &(id, _) in &self.depths {
                if let Some(c) = self.candidates.iter_mut().find(|c| c.id == id) {
                    c.key_held = true;
                }
            }
        }
        let info = request.map_or_else(RequestInfo::default, Request::info);
        let profile = if request.is_some() {
            &self.profile
        } else {
            &self.fallback
        };
        let choice = profile
            .run(
                &info,
                &mut self.candidates,
                &mut self.scratch,
                &mut self.rng,
            )
            .ok_or(PickError::NoEndpoints)?;
        let chosen = choice.candidate;

        let limit = self.config.max_request_count;
        if limit > 0 && chosen.inflight >= limit {
            return Err(PickError::OverLimit {
                endpoint: self.addresses[chosen.id as usize].clone(),
                inflight: chosen.inflight,
            });
        }
        let reason = if request.is_none() {
            PickReason::BadBody
        } else if !chosen.healthy {
            PickReason::NoHealthy
        } else if !model_served {
            PickReason::UnknownModel
        } else if !fresh_metrics {
            PickReason::StaleMetrics
        } else if self.config.policy == Policy::LeastBusy {
            PickReason::LeastBusy
        } else if chosen.key_held {
            PickReason::AffinityKey
        } else if chosen.prefix_depth > 0 {
            PickReason::PrefixHit
        } else {
            PickReason::LeastRequest
        };
        let cached = info.cached_tokens(chosen.prefix_depth);
        Ok(Decision {
            endpoint: chosen.id,
            reason,
            depth: chosen.prefix_depth,
            inflight: chosen.inflight,
            tokens: info.prompt_tokens - cached,
            records_prefix: use_prefix,
            key,
            figures: Figures {
                levels: info.prefix_levels,
                prompt_tokens: info.prompt_tokens,
                cached_tokens: cached,
                candidates: choice.candidates,
                score: choice.score,
                runner_up: choice.runner_up,
            },
        })
    }

    /// One candidate per pool endpoint, with its load as the view has it now.
    fn fill_candidates(&mut self, now_ms: u64) {
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        let uses_backlog = self.config.policy.uses_prefix();
        for &id in &self.pool {
            candidates.push(Candidate {
                id,
                inflight: self.inflight_of(id),
                backlog: if uses_backlog {
                    self.backlog_of(id, now_ms)
                } else {
                    0.0
                },
                healthy: self.healthy[id as usize],
                prefix_depth: 0,
                key_held: false,
                waiting: 0.0,
                kv_cache: 0.0,
                stale: false,
                lora: LoraFit::None,
                last_picked: self.last_picked[id as usize],
            });
        }
        self.candidates = candidates;
    }

    /// The decision for a request pinned to an endpoint (see `Request::pinned`), if that
    /// endpoint can take it: in the pool and healthy. Its model and load are not checked: no
    /// other endpoint could answer it.
    fn decide_pinned(&mut self, request: &Request<'_>, now_ms: u64) -> Option<Decision> {
        let id = *self.ids.get(request.pinned?)?;
        if self.pool_position[id as usize] == NOT_IN_POOL || !self.healthy[id as usize] {
            return None;
        }
        let use_prefix = self.config.policy.uses_prefix() && !request.hashes.is_empty();
        let mut depth = 0;
        if use_prefix {
            self.match_depths(request.hashes, now_ms);
            depth = self
                .depths
                .iter()
                .find(|&&(holder, _)| holder == id)
                .map_or(0, |&(_, d)| d);
        }
        let info = request.info();
        let prompt_tokens = info.prompt_tokens;
        let cached = info.cached_tokens(depth);
        Some(Decision {
            endpoint: id,
            reason: PickReason::StoredResponse,
            depth,
            inflight: self.inflight_of(id),
            tokens: prompt_tokens - cached,
            records_prefix: use_prefix,
            key: request.key.filter(|_| self.config.policy.uses_prefix()),
            // No pipeline ran: the one endpoint that can answer it, with a full score.
            figures: Figures {
                levels: info.prefix_levels,
                prompt_tokens,
                cached_tokens: cached,
                candidates: 1,
                score: 1.0,
                runner_up: None,
            },
        })
    }

    /// Counts a decision in: its ticket, its load, its prefix levels (`hashes`, the request's).
    pub fn commit(&mut self, decision: &Decision, hashes: &[u64], now_ms: u64) -> Pick {
        let id = decision.endpoint;
        let claimed = if decision.records_prefix {
            self.record(hashes, id, now_ms);
            claimed_levels(hashes, decision.depth)
        } else {
            None
        };
        if let Some(key) = decision.key {
            self.record(&[key], id, now_ms);
        }
        self.count_in(id);
        self.add_backlog(id, decision.tokens, now_ms);
        self.picks_since_scrape[id as usize] += 1;
        let ticket = self.new_ticket(id, claimed, decision.tokens, now_ms);
        Pick {
            ticket,
            endpoint: self.addresses[id as usize].clone(),
            reason: decision.reason,
            prefix_depth: decision.depth,
            inflight: decision.inflight + 1,
            figures: decision.figures,
        }
    }

    fn new_ticket(
        &mut self,
        endpoint: u32,
        claimed: Option<Box<[u64]>>,
        tokens: u64,
        sent_ms: u64,
    ) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let generation = self.scrape_generation[endpoint as usize];
        self.tickets.insert(
            ticket,
            Ticket {
                endpoint,
                generation,
                claimed,
                tokens,
                sent_ms,
            },
        );
        ticket
    }

    /// Ends a pick's request at `now_ms`: returns the prompt tokens the backlog still held of it
    /// (taken back; the other replicas take them back from its release record), or `None` for an
    /// unknown or already released ticket.
    pub fn release(&mut self, ticket: u64, now_ms: u64) -> Option<u64> {
        self.end(ticket, now_ms).map(|(_, tokens)| tokens)
    }

    /// Ends a request that failed (an error answer): it also takes back the prefix levels it
    /// claimed, which the server never cached. Returns what was taken back (for the other
    /// replicas), if anything.
    pub fn release_failed(&mut self, ticket: u64, now_ms: u64) -> Option<TakenBack> {
        let (t, tokens) = self.end(ticket, now_ms)?;
        let levels = t.claimed.unwrap_or_default();
        if !levels.is_empty() {
            self.forget(&levels, t.endpoint);
        }
        (!levels.is_empty() || tokens > 0).then(|| TakenBack {
            endpoint: self.addresses[t.endpoint as usize].clone(),
            levels,
            tokens,
        })
    }

    /// Uncounts a ticket and takes what is left of its prompt tokens back from the backlog
    /// (returned, in whole tokens); `None` if it was unknown or already released.
    fn end(&mut self, ticket: u64, now_ms: u64) -> Option<(Ticket, u64)> {
        let t = self.tickets.remove(&ticket)?;
        self.count_out(t.endpoint);
        let i = t.endpoint as usize;
        if self.scrape_generation[i] == t.generation {
            self.picks_since_scrape[i] = self.picks_since_scrape[i].saturating_sub(1);
        }
        let left = Backlog {
            tokens: t.tokens as f64,
            at_ms: t.sent_ms,
        }
        .at(now_ms, self.config.load_model.prefill_rate);
        if left > 0.0 {
            self.take_back_backlog(t.endpoint, t.tokens, t.sent_ms, now_ms);
        }
        Some((t, left.ceil() as u64))
    }

    pub fn open_tickets(&self) -> usize {
        self.tickets.len()
    }

    pub fn prefix_entries(&self) -> usize {
        self.prefix.len()
    }

    /// The table picks match against: with `--workers`, the shared one (endpoints the shared
    /// directory could not take use this process's own table; their entries are not counted).
    pub fn prefix_stats(&self) -> PrefixStats {
        let (entries, capacity) = match &self.workers {
            Some(w) => (w.state.prefix_entries(), w.state.prefix_capacity()),
            None => (self.prefix.len(), self.prefix.capacity()),
        };
        PrefixStats {
            entries,
            capacity,
            counts: self.prefix_counts,
        }
    }

    /// The pool, plus endpoints outside it that still have requests in flight (backlogs as of
    /// `now_ms`).
    pub fn endpoints(&self, now_ms: u64) -> Vec<EndpointView> {
        let mut out: Vec<EndpointView> = self
            .pool
            .iter()
            .map(|&id| self.view(id, true, now_ms))
            .collect();
        for id in 0..self.addresses.len() as u32 {
            if self.pool_position[id as usize] == NOT_IN_POOL && self.inflight_of(id) > 0 {
                out.push(self.view(id, false, now_ms));
            }
        }
        out
    }

    fn view(&self, id: u32, in_pool: bool, now_ms: u64) -> EndpointView {
        let i = id as usize;
        EndpointView {
            address: self.addresses[i].clone(),
            inflight: self.inflight_of(id),
            backlog: self.backlog_of(id, now_ms).round() as u64,
            own_inflight: self.own[i],
            healthy: self.healthy[i],
            in_pool,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(policy: Policy) -> Balancer {
        balancer_with(BalancerConfig {
            policy,
            ..BalancerConfig::default()
        })
    }

    fn balancer_with(config: BalancerConfig) -> Balancer {
        let mut b = Balancer::with_rng(config, SmallRng::seed_from_u64(3));
        b.set_endpoints(&["a:1", "b:1", "c:1"]);
        b
    }

    #[test]
    fn least_request_spreads_and_releases() {
        let mut b = balancer(Policy::GlobalLeastRequest);
        let picks: Vec<Pick> = (0..30).map(|_| b.pick(Some(&[]), 0).unwrap()).collect();
        for view in b.endpoints(0) {
            assert_eq!(view.inflight, 10, "{view:?}");
        }
        for p in &picks {
            assert!(b.release(p.ticket, 0).is_some());
            assert!(b.release(p.ticket, 0).is_none(), "release is idempotent");
        }
        assert!(b.endpoints(0).iter().all(|v| v.inflight == 0));
        assert_eq!(b.open_tickets(), 0);
    }

    #[test]
    fn ties_do_not_follow_list_order() {
        let mut b = balancer(Policy::GlobalLeastRequest);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..60 {
            let p = b.pick(Some(&[]), 0).unwrap();
            firsts.insert(p.endpoint.clone());
            b.release(p.ticket, 0);
        }
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn prefix_stats_count_lookups_hits_and_insertions() {
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick(Some(&[11, 12]), 0).unwrap();
        b.release(first.ticket, 0);
        let next = b.pick(Some(&[11, 12, 13]), 2_000).unwrap();
        b.release(next.ticket, 2_000);
        // A request without prefix levels is no lookup.
        let none = b.pick(Some(&[]), 2_000).unwrap();
        b.release(none.ticket, 2_000);
        let stats = b.prefix_stats();
        assert_eq!(
            stats.counts,
            PrefixCounts {
                lookups: 2,
                hits: 1,
                insertions: 3,
                evictions: 0
            }
        );
        assert_eq!((stats.entries, stats.capacity), (3, b.prefix.capacity()));
    }

    #[test]
    fn a_failed_request_takes_back_only_the_levels_it_claimed() {
        // Turns some seconds apart, as in a conversation: each prompt's backlog has drained.
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick(Some(&[11, 12]), 0).unwrap();
        b.release(first.ticket, 0);
        // The next turn reaches the same server, claims two more levels, and fails there.
        let failed = b.pick(Some(&[11, 12, 13, 14]), 2_000).unwrap();
        assert_eq!(failed.endpoint, first.endpoint);
        let taken = b.release_failed(failed.ticket, 2_000).unwrap();
        assert_eq!(
            (&*taken.endpoint, &*taken.levels),
            (&*first.endpoint, &[13, 14][..])
        );
        assert!(
            b.release_failed(failed.ticket, 2_000).is_none(),
            "release is idempotent"
        );
        // What the server held before stays; what it never cached is gone.
        let again = b.pick(Some(&[11, 12, 13, 14]), 4_000).unwrap();
        assert_eq!(again.endpoint, first.endpoint);
        assert_eq!(again.prefix_depth, 2);
        b.release(again.ticket, 4_000);
        // A brand-new prompt that fails leaves nothing behind.
        let new = b.pick(Some(&[91, 92, 93]), 6_000).unwrap();
        b.release_failed(new.ticket, 6_000);
        let entries = b.prefix_entries();
        let probe = b.pick(Some(&[91]), 8_000).unwrap();
        assert_eq!(probe.prefix_depth, 0);
        assert_eq!(probe.reason, PickReason::LeastRequest);
        assert!(b.prefix_entries() <= entries + 1);
    }

    #[test]
    fn prefix_affinity_follows_the_conversation() {
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick(Some(&[11, 12]), 0).unwrap();
        assert_eq!(first.reason, PickReason::LeastRequest);
        b.release(first.ticket, 0);
        let next = b.pick(Some(&[11, 12, 13, 14]), 10).unwrap();
        assert_eq!(next.endpoint, first.endpoint);
        assert_eq!(next.reason, PickReason::PrefixHit);
        assert_eq!(next.prefix_depth, 2);
    }

    #[test]
    fn a_prefix_expires_prefix_ttl_s_seconds_after_its_last_use() {
        let mut b = balancer_with(BalancerConfig {
            policy: Policy::PrefixCache,
            prefix_ttl_s: 60,
            ..BalancerConfig::default()
        });
        let first = b.pick(Some(&[11, 12]), 0).unwrap();
        b.release(first.ticket, 0);
        let within = b.pick(Some(&[11, 12]), 59_000).unwrap();
        assert_eq!(within.reason, PickReason::PrefixHit);
        b.release(within.ticket, 59_000);
        // The hit recorded the prefix again at 59 s: it now lasts until 119 s, not 120.
        let renewed = b.pick(Some(&[11, 12]), 118_000).unwrap();
        assert_eq!(renewed.reason, PickReason::PrefixHit);
        b.release(renewed.ticket, 118_000);
        let expired = b.pick(Some(&[11, 12]), 178_000).unwrap();
        assert_eq!(expired.reason, PickReason::LeastRequest);
        assert_eq!(expired.prefix_depth, 0);
    }

    #[test]
    fn affinity_is_bounded_by_load() {
        let mut b = balancer(Policy::PrefixCache);
        let mut tickets = Vec::new();
        let mut per_endpoint: HashMap<Arc<str>, u32> = HashMap::new();
        // 30 concurrent requests sharing one hot prefix: they must not all pile onto one server.
        for _ in 0..30 {
            let p = b.pick(Some(&[42, 43]), 0).unwrap();
            *per_endpoint.entry(p.endpoint.clone()).or_default() += 1;
            tickets.push(p.ticket);
        }
        let max = *per_endpoint.values().max().unwrap();
        // The last pick saw 29 in flight: bound = max(8, ceil(1.5 * 30 / 3)) = 15, so at most
        // 1.5x the fair share of 10; the overflow goes elsewhere.
        assert!(max <= 15, "{per_endpoint:?}");
        assert!(per_endpoint.len() >= 2, "{per_endpoint:?}");
    }

    fn keyed(hashes: &[u64], key: u64) -> Request<'_> {
        Request {
            hashes,
            prompt_bytes: 512 * hashes.len() as u64,
            key: Some(key),
            ..Request::default()
        }
    }

    #[test]
    fn an_affinity_key_sticks_across_different_prompts_within_the_load_bound() {
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick_request(Some(&keyed(&[1, 2], 77)), 0).unwrap();
        assert_eq!(first.reason, PickReason::LeastRequest);
        // Different prompts, same key: same endpoint, even with the first still in flight.
        for n in 0..5u64 {
            let hashes = [100 + n, 200 + n];
            let p = b.pick_request(Some(&keyed(&hashes, 77)), 0).unwrap();
            assert_eq!(p.endpoint, first.endpoint);
            assert_eq!(p.reason, PickReason::AffinityKey);
        }
        // Without the key the same prompts spread by load.
        let other = b
            .pick_request(
                Some(&Request {
                    hashes: &[300],
                    prompt_bytes: 512,
                    ..Request::default()
                }),
                0,
            )
            .unwrap();
        assert_ne!(other.endpoint, first.endpoint);
        // Past the load bound (floor 8 at this load) the session moves and the key follows.
        let mut moved = None;
        for n in 0..20u64 {
            let p = b.pick_request(Some(&keyed(&[400 + n], 77)), 0).unwrap();
            if p.endpoint != first.endpoint {
                moved = Some(p.endpoint.clone());
                break;
            }
        }
        let moved = moved.expect("the key left its overloaded endpoint");
        assert!(
            b.endpoints(0).iter().all(|v| v.inflight <= 8),
            "{:?}",
            b.endpoints(0)
        );
        let next = b.pick_request(Some(&keyed(&[999], 77)), 0).unwrap();
        assert!(next.endpoint == moved || next.endpoint == first.endpoint);
        // A load policy ignores keys.
        let mut g = balancer(Policy::GlobalLeastRequest);
        let a = g.pick_request(Some(&keyed(&[], 5)), 0).unwrap();
        let c = g.pick_request(Some(&keyed(&[], 5)), 0).unwrap();
        assert_ne!(a.endpoint, c.endpoint);
    }

    #[test]
    fn a_pinned_request_goes_to_its_endpoint_while_it_can_take_it() {
        for policy in [
            Policy::PrefixCache,
            Policy::GlobalLeastRequest,
            Policy::LeastBusy,
        ] {
            let mut b = balancer(policy);
            for _ in 0..4 {
                b.pick(Some(&[]), 0).unwrap();
            }
            let pinned = |address| Request {
                pinned: Some(address),
                ..Request::default()
            };
            for _ in 0..3 {
                let p = b.pick_request(Some(&pinned("b:1")), 0).unwrap();
                assert_eq!(
                    (&*p.endpoint, p.reason),
                    ("b:1", PickReason::StoredResponse)
                );
            }
            b.set_healthy("b:1", false);
            let p = b.pick_request(Some(&pinned("b:1")), 0).unwrap();
            assert_ne!(&*p.endpoint, "b:1");
            b.set_healthy("b:1", true);
            b.set_endpoints(&["a:1", "c:1"]);
            let p = b.pick_request(Some(&pinned("b:1")), 0).unwrap();
            assert_ne!(&*p.endpoint, "b:1");
            let p = b.pick_request(Some(&pinned("never-seen:1")), 0).unwrap();
            assert_ne!(p.reason, PickReason::StoredResponse);
        }
    }

    #[test]
    fn requests_go_only_to_endpoints_serving_their_model() {
        let mut b = balancer(Policy::PrefixCache);
        let model = |m| Request {
            model: Some(m),
            ..Request::default()
        };
        // Nothing known: every endpoint may serve anything.
        let seen: std::collections::HashSet<_> = (0..6)
            .map(|_| b.pick_request(Some(&model("x")), 0).unwrap().endpoint)
            .collect();
        assert_eq!(seen.len(), 3);
        b.set_models("a:1", Some(&["x", "x-lora"]));
        b.set_models("b:1", Some(&["y"]));
        for _ in 0..10 {
            assert_eq!(
                &*b.pick_request(Some(&model("x")), 0).unwrap().endpoint,
                "a:1"
            );
            assert_eq!(
                &*b.pick_request(Some(&model("x-lora")), 0).unwrap().endpoint,
                "a:1"
            );
            assert_eq!(
                &*b.pick_request(Some(&model("y")), 0).unwrap().endpoint,
                "b:1"
            );
            // No known server: the one whose models are unknown may serve it.
            assert_eq!(
                &*b.pick_request(Some(&model("z")), 0).unwrap().endpoint,
                "c:1"
            );
        }
        assert_eq!(b.models_of("a:1").unwrap(), vec!["x", "x-lora"]);
        b.set_models("c:1", Some(&["y"]));
        assert_eq!(
            b.pick_request(Some(&model("z")), 0),
            Err(PickError::UnknownModel { model: "z".into() })
        );
        // Requests without a model go anywhere: by load (a:1 has twice the others' requests).
        let p = b.pick_request(Some(&model("")), 0).unwrap();
        assert_ne!(&*p.endpoint, "a:1");
        assert_eq!(p.reason, PickReason::LeastRequest);
        let mut routed = Balancer::with_rng(
            BalancerConfig {
                route_unknown_models: true,
                ..BalancerConfig::default()
            },
            SmallRng::seed_from_u64(1),
        );
        routed.set_endpoints(&["a:1", "b:1"]);
        routed.set_models("a:1", Some(&["x"]));
        routed.set_models("b:1", Some(&["y"]));
        let p = routed.pick_request(Some(&model("z")), 0).unwrap();
        assert_eq!(p.reason, PickReason::UnknownModel);
        assert!(p.reason.is_fallback());
    }

    #[test]
    fn unhealthy_endpoints_are_avoided_unless_all_are() {
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick(Some(&[1]), 0).unwrap();
        b.release(first.ticket, 0);
        b.set_healthy(&first.endpoint, false);
        let next = b.pick(Some(&[1, 2]), 0).unwrap();
        assert_ne!(
            next.endpoint, first.endpoint,
            "an unhealthy prefix holder is skipped"
        );
        b.release(next.ticket, 0);
        for a in ["a:1", "b:1", "c:1"] {
            b.set_healthy(a, false);
        }
        assert_eq!(b.pick(Some(&[1]), 0).unwrap().reason, PickReason::NoHealthy);
    }

    #[test]
    fn bad_body_and_empty_pool() {
        let mut b = balancer(Policy::PrefixCache);
        assert_eq!(b.pick(None, 0).unwrap().reason, PickReason::BadBody);
        b.set_endpoints::<&str>(&[]);
        assert_eq!(b.pick(Some(&[1]), 0), Err(PickError::NoEndpoints));
    }

    #[test]
    fn removed_endpoint_keeps_count_until_release_and_never_goes_negative() {
        let mut b = balancer(Policy::GlobalLeastRequest);
        b.set_endpoints(&["a:1"]);
        let p = b.pick(Some(&[]), 0).unwrap();
        b.set_endpoints(&["b:1"]);
        let views = b.endpoints(0);
        assert!(views
            .iter()
            .any(|v| &*v.address == "a:1" && v.inflight == 1 && !v.in_pool));
        b.set_endpoints(&["a:1", "b:1"]);
        assert!(b.release(p.ticket, 0).is_some());
        assert!(b.release(p.ticket, 0).is_none());
        assert!(b.endpoints(0).iter().all(|v| v.inflight == 0));
    }

    #[test]
    fn remote_loads_drive_decisions_and_remote_picks_give_affinity() {
        let mut b = balancer(Policy::PrefixCache);
        b.set_remote(true);
        // Another replica already keeps a:1 and b:1 busy: this replica's own view is empty.
        b.set_remote_loads(&[("a:1", 9), ("b:1", 9)]);
        let p = b.pick(Some(&[1, 2]), 0).unwrap();
        assert_eq!(&*p.endpoint, "c:1");
        // Its own pick counts in the remote view until the next reply.
        let c = b
            .endpoints(0)
            .into_iter()
            .find(|v| &*v.address == "c:1")
            .unwrap();
        assert_eq!((c.inflight, c.own_inflight), (1, 1));
        b.release(p.ticket, 0);
        // The other replica picked b:1 for a prompt: this replica follows it.
        b.set_remote_loads(&[("b:1", 0)]);
        b.apply_remote_commit("b:1", 0, &[5, 6], 0);
        let next = b.pick(Some(&[5, 6, 7]), 0).unwrap();
        assert_eq!((&*next.endpoint, next.prefix_depth), ("b:1", 2));
        b.release(next.ticket, 0);
        // ...and forgets it when that request failed there.
        b.apply_remote_failure("b:1", &[5, 6], 0, 0, 0);
        b.apply_remote_failure("b:1", &[5, 6, 7], 0, 0, 0);
        let after = b.pick(Some(&[5, 6, 7]), 0).unwrap();
        assert_eq!(after.prefix_depth, 0);
        b.release(after.ticket, 0);
        // A failed request's leftover backlog, as the other replica reported it 100 ms ago
        // (100 ms of it drained since): the rest is taken back here too.
        b.apply_remote_commit("b:1", 5_000, &[], 1_000);
        b.apply_remote_failure("b:1", &[], 4_000, 1_100, 1_200);
        let left = 5_000.0 - 0.2 * b.config().load_model.prefill_rate;
        let expected = (left - (4_000.0 - 0.1 * b.config().load_model.prefill_rate)).max(0.0);
        let b1 = |b: &Balancer| {
            b.endpoints(1_200)
                .into_iter()
                .find(|v| &*v.address == "b:1")
        };
        assert_eq!(b1(&b).unwrap().backlog, expected as u64);
        // Without Redis, the replica's own counts decide again.
        b.set_remote(false);
        assert!(b.endpoints(0).iter().all(|v| v.inflight == v.own_inflight));
    }

    #[test]
    fn a_hot_prefix_spreads_instead_of_idling_a_server() {
        // The reproduction: 60 concurrent requests sharing one system prompt (16 blocks,
        // 2,048 tokens) with a question of their own (1 block) over 3 servers went 30/0/30.
        let mut b = balancer(Policy::PrefixCache);
        let system: Vec<u64> = (1..=16).collect();
        let mut per_endpoint: HashMap<Arc<str>, u32> = HashMap::new();
        for i in 0..60u64 {
            let mut hashes = system.clone();
            hashes.push(1000 + i);
            let p = b.pick(Some(&hashes), 0).unwrap();
            *per_endpoint.entry(p.endpoint).or_default() += 1;
        }
        let counts: Vec<u32> = per_endpoint.values().copied().collect();
        assert_eq!(counts.len(), 3, "every server takes some: {per_endpoint:?}");
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(max - min <= 4, "{per_endpoint:?}");
    }

    #[test]
    fn the_prefill_backlog_steers_and_drains() {
        // Unique prompts: a server that has just taken a long prompt is still prefilling it, so
        // the next ones go elsewhere until it drains, although each is counted only once.
        let mut b = balancer(Policy::PrefixCache);
        b.set_endpoints(&["a:1", "b:1"]);
        let long: Vec<u64> = (100..164).collect(); // 64 blocks, 8,192 tokens
        let big = b.pick(Some(&long), 0).unwrap();
        for (i, at) in [100, 200, 300].into_iter().enumerate() {
            let p = b.pick(Some(&[i as u64]), at).unwrap();
            assert_ne!(p.endpoint, big.endpoint, "at {at} ms");
            b.release(p.ticket, at + 50);
        }
        let backlog = |b: &Balancer, at| {
            b.endpoints(at)
                .into_iter()
                .find(|v| v.address == big.endpoint)
                .unwrap()
                .backlog
        };
        let rate = b.config().load_model.prefill_rate;
        assert_eq!(backlog(&b, 500), (8192.0 - rate / 2.0).max(0.0) as u64);
        assert_eq!(backlog(&b, 5_000), 0, "drained");
        b.release(big.ticket, 5_000);
        // Drained: both take turns again.
        let next: Vec<Arc<str>> = (0..2)
            .map(|i| b.pick(Some(&[50 + i]), 10_000).unwrap().endpoint)
            .collect();
        assert_ne!(next[0], next[1]);
    }

    #[test]
    fn an_ended_request_leaves_no_backlog_behind() {
        // A huge prompt the server refuses at once (or answers quickly): it was never queued
        // for as long as the rate estimate says, so its end takes the estimate back and the
        // server takes its share again straight away.
        for failed in [true, false] {
            let mut b = balancer(Policy::PrefixCache);
            b.set_endpoints(&["a:1", "b:1"]);
            let huge: Vec<u64> = (1_000..3_000).collect(); // 256,000 tokens
            let p = b.pick(Some(&huge), 0).unwrap();
            let taken = if failed {
                b.release_failed(p.ticket, 20).map(|t| t.tokens)
            } else {
                b.release(p.ticket, 20)
            };
            let left = 256_000.0 - 0.02 * b.config().load_model.prefill_rate;
            assert_eq!(
                taken,
                Some(left as u64),
                "what the other replicas take back"
            );
            let next: Vec<Arc<str>> = (0..4)
                .map(|i| {
                    let p = b.pick(Some(&[i]), 30).unwrap();
                    b.release(p.ticket, 30);
                    p.endpoint
                })
                .collect();
            assert!(next.contains(&p.endpoint), "failed={failed}: {next:?}");
        }
    }

    #[test]
    fn max_request_count_refuses() {
        let config = BalancerConfig {
            policy: Policy::GlobalLeastRequest,
            max_request_count: 1,
            ..BalancerConfig::default()
        };
        let mut b = Balancer::with_rng(config, SmallRng::seed_from_u64(1));
        b.set_endpoints(&["a:1", "b:1"]);
        b.pick(Some(&[]), 0).unwrap();
        b.pick(Some(&[]), 0).unwrap();
        assert!(matches!(
            b.pick(Some(&[]), 0),
            Err(PickError::OverLimit { inflight: 1, .. })
        ));
    }

    fn worker_balancers(policy: Policy, name: &str) -> (Vec<Balancer>, std::path::PathBuf) {
        use crate::worker_state::{Layout, WorkerState};
        let path =
            std::env::temp_dir().join(format!("llmlb-balancer-{}-{name}", std::process::id()));
        WorkerState::create(&path, Layout::new(2, 64, 1024), 60).unwrap();
        let workers = (0..2)
            .map(|w| {
                let mut b = balancer(policy);
                b.attach_workers(Arc::new(WorkerState::open(&path, w).unwrap()));
                b
            })
            .collect();
        (workers, path)
    }

    #[test]
    fn workers_balance_as_one() {
        let (mut w, path) = worker_balancers(Policy::GlobalLeastRequest, "spread");
        let mut picks = Vec::new();
        for i in 0..30 {
            let b = &mut w[i % 2];
            picks.push((i % 2, b.pick(Some(&[]), 0).unwrap()));
        }
        for view in w[0].endpoints(0) {
            assert_eq!(view.inflight, 10, "pool-wide: {view:?}");
        }
        let own: u32 = w[1].endpoints(0).iter().map(|v| v.own_inflight).sum();
        assert_eq!(own, 15);
        for (worker, p) in &picks {
            assert!(w[*worker].release(p.ticket, 0).is_some());
        }
        assert!(w[1].endpoints(0).iter().all(|v| v.inflight == 0));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn workers_take_back_a_failed_request_s_levels() {
        let (mut w, path) = worker_balancers(Policy::PrefixCache, "forget");
        let first = w[0].pick(Some(&[1, 2]), 0).unwrap();
        w[0].release(first.ticket, 0);
        let failed = w[1].pick(Some(&[1, 2, 3]), 2_000).unwrap();
        assert_eq!(failed.endpoint, first.endpoint);
        w[1].release_failed(failed.ticket, 2_000);
        let next = w[0].pick(Some(&[1, 2, 3]), 4_000).unwrap();
        assert_eq!(
            (next.endpoint.clone(), next.prefix_depth),
            (first.endpoint.clone(), 2),
            "level 3 was never cached"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn workers_share_prefix_affinity() {
        let (mut w, path) = worker_balancers(Policy::PrefixCache, "prefix");
        let first = w[0].pick(Some(&[1, 2, 3]), 0).unwrap();
        w[0].release(first.ticket, 0);
        let next = w[1].pick(Some(&[1, 2, 3, 4]), 0).unwrap();
        assert_eq!(
            next.endpoint, first.endpoint,
            "the next turn follows the prefix across workers"
        );
        assert_eq!((next.reason, next.prefix_depth), (PickReason::PrefixHit, 3));
        let _ = std::fs::remove_file(path);
    }

    fn busy_balancer(critical: Option<Vec<String>>) -> Balancer {
        let config = BalancerConfig {
            policy: Policy::LeastBusy,
            critical_models: critical,
            ..BalancerConfig::default()
        };
        let mut b = Balancer::with_rng(config, SmallRng::seed_from_u64(5));
        b.set_endpoints(&["a:1", "b:1", "c:1"]);
        b
    }

    fn load(waiting: f64, kv_cache: f64, at_ms: u64) -> Load {
        Load {
            waiting,
            kv_cache,
            at_ms,
            ..Load::default()
        }
    }

    #[test]
    fn least_busy_follows_the_idle_server_and_counts_picks_between_scrapes() {
        let mut b = busy_balancer(None);
        b.set_load("a:1", load(8.0, 0.5, 0));
        b.set_load("b:1", load(0.0, 0.1, 0));
        b.set_load("c:1", load(9.0, 0.9, 0));
        let first = b.pick_for(Some(&[]), Some("m"), 10).unwrap();
        assert_eq!(
            (&*first.endpoint, first.reason),
            ("b:1", PickReason::LeastBusy)
        );
        // A burst before the next scrape: b's picks count as queue, so the burst does not all
        // land on the server that looked idle.
        let burst: Vec<_> = (0..12)
            .map(|_| b.pick_for(Some(&[]), Some("m"), 20).unwrap())
            .collect();
        assert!(burst.iter().any(|p| &*p.endpoint != "b:1"), "{burst:?}");
        // The load flips: traffic follows.
        b.set_load("a:1", load(0.0, 0.1, 30));
        b.set_load("b:1", load(20.0, 0.9, 30));
        b.set_load("c:1", load(20.0, 0.9, 30));
        assert_eq!(
            &*b.pick_for(Some(&[]), Some("m"), 40).unwrap().endpoint,
            "a:1"
        );
    }

    #[test]
    fn one_worker_scrapes_and_every_worker_picks_by_its_loads() {
        use crate::worker_state::{Layout, WorkerState};
        let path = std::env::temp_dir().join(format!("llmlb-balancer-{}-busy", std::process::id()));
        WorkerState::create(&path, Layout::new(2, 64, 1024), 60).unwrap();
        let mut w: Vec<Balancer> = (0..2)
            .map(|i| {
                let mut b = busy_balancer(None);
                b.attach_workers(Arc::new(WorkerState::open(&path, i).unwrap()));
                b
            })
            .collect();
        // Worker 1 has never been handed a load: all stale, so it falls back by request count.
        let before = w[1].pick_for(Some(&[]), Some("m"), 10).unwrap();
        assert_eq!(before.reason, PickReason::StaleMetrics);
        w[0].set_load("a:1", load(8.0, 0.5, 0));
        w[0].set_load("b:1", load(0.0, 0.1, 0));
        w[0].set_load("c:1", load(9.0, 0.9, 0));
        let p = w[1].pick_for(Some(&[]), Some("m"), 10).unwrap();
        assert_eq!((&*p.endpoint, p.reason), ("b:1", PickReason::LeastBusy));
        let views = w[1].endpoint_loads();
        assert_eq!(views[0].load.as_ref().map(|l| l.waiting), Some(8.0));
        // The next scrape flips the load; worker 1 follows it, its own pick count restarting.
        w[0].set_load("a:1", load(0.0, 0.1, 30));
        w[0].set_load("b:1", load(20.0, 0.9, 30));
        w[0].set_load("c:1", load(20.0, 0.9, 30));
        let p = w[1].pick_for(Some(&[]), Some("m"), 40).unwrap();
        assert_eq!(&*p.endpoint, "a:1");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn least_busy_avoids_stale_metrics_and_falls_back_when_all_are_stale() {
        let mut b = busy_balancer(None);
        b.set_load("a:1", load(0.0, 0.0, 0)); // idle, but its metrics will be old
        b.set_load("b:1", load(3.0, 0.5, 2_500));
        b.set_load("c:1", load(3.0, 0.5, 2_500));
        for _ in 0..10 {
            let p = b.pick_for(Some(&[]), Some("m"), 3_000).unwrap();
            assert_ne!(
                &*p.endpoint, "a:1",
                "a's metrics are 3 s old (stale after 2 s)"
            );
            b.release(p.ticket, 0);
        }
        let p = b.pick_for(Some(&[]), Some("m"), 60_000).unwrap();
        assert_eq!(p.reason, PickReason::StaleMetrics);
    }

    #[test]
    fn sheddable_models_are_refused_when_saturated_and_critical_ones_are_not() {
        let mut b = busy_balancer(Some(vec!["gold".to_owned()]));
        for e in ["a:1", "b:1", "c:1"] {
            b.set_load(e, load(10.0, 0.95, 0));
        }
        assert_eq!(
            b.pick_for(Some(&[]), Some("bronze"), 10),
            Err(PickError::Shed)
        );
        assert!(b.pick_for(Some(&[]), Some("gold"), 10).is_ok());
        assert_eq!(b.open_tickets(), 1, "a shed request takes no ticket");
        b.set_load("c:1", load(1.0, 0.2, 20));
        assert_eq!(
            &*b.pick_for(Some(&[]), Some("bronze"), 30).unwrap().endpoint,
            "c:1"
        );
    }

    #[test]
    fn lora_requests_go_where_the_adapter_is_loaded() {
        let mut b = busy_balancer(None);
        for e in ["a:1", "b:1", "c:1"] {
            b.set_load(
                e,
                Load {
                    max_lora: 2,
                    ..load(0.0, 0.1, 0)
                },
            );
        }
        b.set_load(
            "c:1",
            Load {
                running_lora: vec!["sql-lora".to_owned()],
                max_lora: 2,
                ..load(2.0, 0.3, 0)
            },
        );
        let hits = (0..20)
            .filter(|_| {
                let p = b.pick_for(Some(&[]), Some("sql-lora"), 10).unwrap();
                b.release(p.ticket, 0);
                &*p.endpoint == "c:1"
            })
            .count();
        assert!(hits >= 19, "{hits} of 20 on the server with the adapter");
    }

    #[test]
    fn finished_requests_stop_counting_as_queue_before_the_next_scrape() {
        let mut b = busy_balancer(None);
        b.set_load("a:1", load(9.0, 0.7, 0));
        b.set_load("b:1", load(8.0, 0.6, 0));
        b.set_load("c:1", load(0.0, 0.05, 0));
        // One request at a time, each finished before the next: c stays the idle one.
        for _ in 0..20 {
            let p = b.pick_for(Some(&[]), Some("m"), 10).unwrap();
            assert_eq!(&*p.endpoint, "c:1");
            b.release(p.ticket, 0);
        }
        // A request picked before a scrape and released after it changes nothing.
        let held = b.pick_for(Some(&[]), Some("m"), 10).unwrap();
        b.set_load("c:1", load(1.0, 0.05, 20)); // the scrape saw it
        b.release(held.ticket, 0);
        let views = b.endpoint_loads();
        let c = views.iter().find(|v| &*v.address == "c:1").unwrap();
        assert_eq!(c.picks_since_scrape, 0);
    }
}
