//! Embedded picking state for one replica: the endpoint pool, in-flight counts, request tickets,
//! the prefix table, and the configured policy.
//!
//! Every pick returns a ticket; releasing a ticket decrements its endpoint exactly once, however
//! often it is called, so in-flight counts cannot leak or go negative. Endpoints are interned by
//! address for the life of the process: an endpoint removed from the pool keeps its in-flight
//! count until its requests finish, and re-adding it restores its prefix entries and counts.

use std::collections::{HashMap, TryReserveError};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::prefix_table::PrefixTable;
use crate::scheduling::filters::HealthyFilter;
use crate::scheduling::least_busy::{self, Thresholds};
use crate::scheduling::policies::{self, Policy};
use crate::scheduling::{Candidate, Filter, LoraFit, Profile, RequestInfo, Scratch};
use crate::worker_state::WorkerState;

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
    /// Refuse a pick when the chosen endpoint already has this many in flight; 0 = off.
    pub max_request_count: u32,
    /// least_busy: models never shed (`None`: every model is critical).
    pub critical_models: Option<Vec<String>>,
    /// least_busy: metrics older than this count as stale.
    pub stale_after_ms: u64,
    pub thresholds: Thresholds,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            policy: Policy::PrefixCache,
            prefix_ttl_s: 1800,
            prefix_capacity: 262_144,
            load_factor: 1.5,
            load_floor: 8,
            max_request_count: 0,
            critical_models: None,
            stale_after_ms: 2000,
            thresholds: Thresholds::default(),
        }
    }
}

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
}

impl PickReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PickReason::PrefixHit => "prefix_hit",
            PickReason::LeastRequest => "least_request",
            PickReason::BadBody => "bad_body",
            PickReason::NoHealthy => "no_healthy",
            PickReason::LeastBusy => "least_busy",
            PickReason::StaleMetrics => "stale_metrics",
        }
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
    /// Across every worker process sharing state (equals `own_inflight` without workers).
    pub inflight: u32,
    /// This process's own requests in flight.
    pub own_inflight: u32,
    pub healthy: bool,
    pub in_pool: bool,
}

/// One request in flight.
struct Ticket {
    endpoint: u32,
    /// The endpoint's scrape generation when picked (least_busy).
    generation: u32,
    /// Prefix levels this pick recorded that the endpoint did not hold before: taken back if
    /// the request fails, since the server then never cached them.
    claimed: Option<Box<[u64]>>,
}

const NOT_IN_POOL: u32 = u32::MAX;

/// The levels past those the endpoint already held, if any.
fn claimed_levels(hashes: &[u64], depth: u32) -> Option<Box<[u64]>> {
    let new = hashes.get(depth as usize..).unwrap_or(&[]);
    (!new.is_empty()).then(|| new.into())
}
const NO_SLOT: u32 = u32::MAX;

/// The state this process shares with its sibling workers, and how local ids map onto it.
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

pub struct Balancer {
    config: BalancerConfig,
    profile: Profile,
    fallback: Profile,
    addresses: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
    inflight: Vec<u32>,
    /// The ticket number of each endpoint's latest pick here (tie-break order; 0 = never).
    last_picked: Vec<u64>,
    healthy: Vec<bool>,
    pool: Vec<u32>,
    /// Position of each interned endpoint in `pool` (`NOT_IN_POOL` if absent).
    pool_position: Vec<u32>,
    tickets: HashMap<u64, Ticket>,
    next_ticket: u64,
    prefix: PrefixTable,
    rng: SmallRng,
    candidates: Vec<Candidate>,
    depths: Vec<(u32, u32)>,
    scratch: Scratch,
    workers: Option<Workers>,
    loads: Vec<Option<Load>>,
    /// least_busy: requests picked since the endpoint's last scrape and still in flight (the
    /// scrape could not see them yet). Releasing one picked before the scrape changes nothing.
    picks_since_scrape: Vec<u32>,
    scrape_generation: Vec<u32>,
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
            Policy::PrefixCache => policies::prefix_cache(config.load_factor, config.load_floor),
        };
        // Only prefix_cache uses the table: the other policies need no memory for it.
        let capacity = if config.policy.uses_prefix() {
            config.prefix_capacity
        } else {
            1
        };
        let prefix = PrefixTable::try_new(capacity, config.prefix_ttl_s.saturating_mul(1000))?;
        Ok(Self {
            config,
            profile,
            fallback: policies::least_request(),
            addresses: Vec::new(),
            ids: HashMap::new(),
            inflight: Vec::new(),
            last_picked: Vec::new(),
            healthy: Vec::new(),
            pool: Vec::new(),
            pool_position: Vec::new(),
            tickets: HashMap::new(),
            next_ticket: 1,
            prefix,
            rng,
            candidates: Vec::new(),
            depths: Vec::new(),
            scratch: Scratch::default(),
            workers: None,
            loads: Vec::new(),
            picks_since_scrape: Vec::new(),
            scrape_generation: Vec::new(),
        })
    }

    /// Records an endpoint's freshly scraped load; picks since the previous scrape stop counting.
    pub fn set_load(&mut self, address: &str, load: Load) {
        let id = self.intern(address) as usize;
        self.loads[id] = Some(load);
        self.picks_since_scrape[id] = 0;
        self.scrape_generation[id] = self.scrape_generation[id].wrapping_add(1);
    }

    /// The last load of every endpoint in the pool.
    pub fn endpoint_loads(&self) -> Vec<LoadView> {
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
            prefix_levels: 0,
            critical: self.is_critical(model),
            lora,
            entropy: rand::Rng::random(&mut self.rng),
        };
        HealthyFilter.filter(&request, &mut self.candidates);
        if least_busy::decide(&request, &mut self.candidates, &self.config.thresholds) {
            Ok(true)
        } else {
            Err(PickError::Shed)
        }
    }

    /// From now on, in-flight counts and prefix entries live in `state`, shared with the other
    /// worker processes (each worker attaches its own `WorkerState` of the same file).
    pub fn attach_workers(&mut self, state: Arc<WorkerState>) {
        let mut workers = Workers {
            state,
            slot_of: Vec::with_capacity(self.addresses.len()),
            local_of: HashMap::new(),
            slot_depths: Vec::new(),
        };
        for (id, address) in self.addresses.iter().enumerate() {
            let slot = workers.state.intern(address).unwrap_or(NO_SLOT);
            workers.slot_of.push(slot);
            if slot != NO_SLOT {
                workers.local_of.insert(slot, id as u32);
                for _ in 0..self.inflight[id] {
                    workers.state.increment(slot);
                }
            }
        }
        self.workers = Some(workers);
    }

    /// The worker-shared state and `id`'s slot in it, when attached and the slot exists.
    fn shared_slot(&self, id: u32) -> Option<(&Workers, u32)> {
        self.workers
            .as_ref()
            .and_then(|w| w.slot(id).map(|s| (w, s)))
    }

    /// Pool-wide in-flight count of `id` (all workers when attached).
    fn inflight_of(&self, id: u32) -> u32 {
        match self.shared_slot(id) {
            Some((w, slot)) => w.state.inflight(slot),
            None => self.inflight[id as usize],
        }
    }

    fn count_in(&mut self, id: u32) {
        self.inflight[id as usize] += 1;
        self.last_picked[id as usize] = self.next_ticket;
        if let Some((w, slot)) = self.shared_slot(id) {
            w.state.increment(slot);
        }
    }

    fn count_out(&mut self, id: u32) {
        let count = &mut self.inflight[id as usize];
        *count = count.saturating_sub(1);
        if let Some((w, slot)) = self.shared_slot(id) {
            w.state.decrement(slot);
        }
    }

    fn match_depths(&mut self, hashes: &[u64], now_ms: u64) {
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
        match self.shared_slot(id) {
            Some((w, slot)) => w.state.record(hashes, slot, now_ms),
            None => self.prefix.record(hashes, id, now_ms),
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
        self.inflight.push(0);
        self.last_picked.push(0);
        self.healthy.push(true);
        self.pool_position.push(NOT_IN_POOL);
        self.loads.push(None);
        self.picks_since_scrape.push(0);
        self.scrape_generation.push(0);
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

    /// Marks an endpoint (in the pool or not) healthy or unhealthy.
    pub fn set_healthy(&mut self, address: &str, healthy: bool) {
        let id = self.intern(address);
        self.healthy[id as usize] = healthy;
    }

    /// Picks an endpoint. `prefix_hashes` is `None` when the body could not be parsed.
    pub fn pick(&mut self, prefix_hashes: Option<&[u64]>, now_ms: u64) -> Result<Pick, PickError> {
        self.pick_for(prefix_hashes, None, now_ms)
    }

    /// Picks an endpoint for a request of `model` (least_busy: criticality and LoRA adapters).
    pub fn pick_for(
        &mut self,
        prefix_hashes: Option<&[u64]>,
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<Pick, PickError> {
        if self.pool.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        for &id in &self.pool {
            candidates.push(Candidate {
                id,
                inflight: self.inflight_of(id),
                healthy: self.healthy[id as usize],
                prefix_depth: 0,
                waiting: 0.0,
                kv_cache: 0.0,
                stale: false,
                lora: LoraFit::None,
                last_picked: self.last_picked[id as usize],
            });
        }
        self.candidates = candidates;
        let mut fresh_metrics = true;
        if self.config.policy == Policy::LeastBusy && prefix_hashes.is_some() {
            fresh_metrics = self.least_busy(model, now_ms)?;
        }
        let hashes = prefix_hashes.unwrap_or(&[]);
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
        let request = RequestInfo {
            prefix_levels: hashes.len() as u32,
            ..RequestInfo::default()
        };
        let profile = if prefix_hashes.is_some() {
            &self.profile
        } else {
            &self.fallback
        };
        let chosen = profile
            .run(
                &request,
                &mut self.candidates,
                &mut self.scratch,
                &mut self.rng,
            )
            .ok_or(PickError::NoEndpoints)?;

        let idx = chosen.id as usize;
        let limit = self.config.max_request_count;
        if limit > 0 && chosen.inflight >= limit {
            return Err(PickError::OverLimit {
                endpoint: self.addresses[idx].clone(),
                inflight: chosen.inflight,
            });
        }
        let reason = if prefix_hashes.is_none() {
            PickReason::BadBody
        } else if !chosen.healthy {
            PickReason::NoHealthy
        } else if !fresh_metrics {
            PickReason::StaleMetrics
        } else if self.config.policy == Policy::LeastBusy {
            PickReason::LeastBusy
        } else if chosen.prefix_depth > 0 {
            PickReason::PrefixHit
        } else {
            PickReason::LeastRequest
        };
        let depth = chosen.prefix_depth;
        let claimed = if use_prefix {
            self.record(hashes, chosen.id, now_ms);
            claimed_levels(hashes, depth)
        } else {
            None
        };
        self.count_in(chosen.id);
        self.picks_since_scrape[idx] += 1;
        let ticket = self.new_ticket(chosen.id, claimed);
        Ok(Pick {
            ticket,
            endpoint: self.addresses[idx].clone(),
            reason,
            prefix_depth: chosen.prefix_depth,
            inflight: chosen.inflight + 1,
        })
    }

    /// Endpoints a pick may choose from: the healthy ones, or all when none is healthy (then
    /// `true`). Used when the choice is made elsewhere (shared state).
    pub fn candidates(&self) -> (Vec<Arc<str>>, bool) {
        let healthy: Vec<Arc<str>> = self
            .pool
            .iter()
            .filter(|&&id| self.healthy[id as usize])
            .map(|&id| self.addresses[id as usize].clone())
            .collect();
        if healthy.is_empty() {
            (
                self.pool
                    .iter()
                    .map(|&id| self.addresses[id as usize].clone())
                    .collect(),
                !self.pool.is_empty(),
            )
        } else {
            (healthy, false)
        }
    }

    /// Counts a pick made elsewhere (shared state) in this replica's state, and records its
    /// prefix levels locally so a later local fallback keeps the affinity. `depth`: the levels
    /// the endpoint already held.
    pub fn assign(
        &mut self,
        endpoint: &str,
        prefix_hashes: &[u64],
        depth: u32,
        now_ms: u64,
    ) -> u64 {
        let id = self.intern(endpoint);
        let mut claimed = None;
        if self.config.policy.uses_prefix() && !prefix_hashes.is_empty() {
            self.record(prefix_hashes, id, now_ms);
            claimed = claimed_levels(prefix_hashes, depth);
        }
        self.count_in(id);
        self.new_ticket(id, claimed)
    }

    fn new_ticket(&mut self, endpoint: u32, claimed: Option<Box<[u64]>>) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let generation = self.scrape_generation[endpoint as usize];
        self.tickets.insert(
            ticket,
            Ticket {
                endpoint,
                generation,
                claimed,
            },
        );
        ticket
    }

    /// Ends a pick's request. Returns `false` for an unknown or already released ticket.
    pub fn release(&mut self, ticket: u64) -> bool {
        self.end(ticket, false)
    }

    /// Ends a request that failed (an error answer): it also takes back the prefix levels it
    /// claimed, which the server never cached.
    pub fn release_failed(&mut self, ticket: u64) -> bool {
        self.end(ticket, true)
    }

    fn end(&mut self, ticket: u64, failed: bool) -> bool {
        let Some(t) = self.tickets.remove(&ticket) else {
            return false;
        };
        self.count_out(t.endpoint);
        let i = t.endpoint as usize;
        if self.scrape_generation[i] == t.generation {
            self.picks_since_scrape[i] = self.picks_since_scrape[i].saturating_sub(1);
        }
        if let (true, Some(levels)) = (failed, t.claimed) {
            match self.shared_slot(t.endpoint) {
                Some((w, slot)) => w.state.forget(&levels, slot),
                None => self.prefix.forget(&levels, t.endpoint),
            }
        }
        true
    }

    pub fn open_tickets(&self) -> usize {
        self.tickets.len()
    }

    pub fn prefix_entries(&self) -> usize {
        self.prefix.len()
    }

    /// The pool, plus endpoints outside it that still have requests in flight.
    pub fn endpoints(&self) -> Vec<EndpointView> {
        let mut out: Vec<EndpointView> = self.pool.iter().map(|&id| self.view(id, true)).collect();
        for id in 0..self.addresses.len() as u32 {
            if self.pool_position[id as usize] == NOT_IN_POOL && self.inflight_of(id) > 0 {
                out.push(self.view(id, false));
            }
        }
        out
    }

    fn view(&self, id: u32, in_pool: bool) -> EndpointView {
        let i = id as usize;
        EndpointView {
            address: self.addresses[i].clone(),
            inflight: self.inflight_of(id),
            own_inflight: self.inflight[i],
            healthy: self.healthy[i],
            in_pool,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(policy: Policy) -> Balancer {
        let config = BalancerConfig {
            policy,
            ..BalancerConfig::default()
        };
        let mut b = Balancer::with_rng(config, SmallRng::seed_from_u64(3));
        b.set_endpoints(&["a:1", "b:1", "c:1"]);
        b
    }

    #[test]
    fn least_request_spreads_and_releases() {
        let mut b = balancer(Policy::GlobalLeastRequest);
        let picks: Vec<Pick> = (0..30).map(|_| b.pick(Some(&[]), 0).unwrap()).collect();
        for view in b.endpoints() {
            assert_eq!(view.inflight, 10, "{view:?}");
        }
        for p in &picks {
            assert!(b.release(p.ticket));
            assert!(!b.release(p.ticket), "release is idempotent");
        }
        assert!(b.endpoints().iter().all(|v| v.inflight == 0));
        assert_eq!(b.open_tickets(), 0);
    }

    #[test]
    fn ties_do_not_follow_list_order() {
        let mut b = balancer(Policy::GlobalLeastRequest);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..60 {
            let p = b.pick(Some(&[]), 0).unwrap();
            firsts.insert(p.endpoint.clone());
            b.release(p.ticket);
        }
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn a_failed_request_takes_back_only_the_levels_it_claimed() {
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick(Some(&[11, 12]), 0).unwrap();
        b.release(first.ticket);
        // The next turn reaches the same server, claims two more levels, and fails there.
        let failed = b.pick(Some(&[11, 12, 13, 14]), 10).unwrap();
        assert_eq!(failed.endpoint, first.endpoint);
        assert!(b.release_failed(failed.ticket));
        assert!(!b.release_failed(failed.ticket), "release is idempotent");
        // What the server held before stays; what it never cached is gone.
        let again = b.pick(Some(&[11, 12, 13, 14]), 20).unwrap();
        assert_eq!(again.endpoint, first.endpoint);
        assert_eq!(again.prefix_depth, 2);
        b.release(again.ticket);
        // A brand-new prompt that fails leaves nothing behind.
        let new = b.pick(Some(&[91, 92, 93]), 30).unwrap();
        b.release_failed(new.ticket);
        let entries = b.prefix_entries();
        let probe = b.pick(Some(&[91]), 40).unwrap();
        assert_eq!(probe.prefix_depth, 0);
        assert_eq!(probe.reason, PickReason::LeastRequest);
        assert!(b.prefix_entries() <= entries + 1);
    }

    #[test]
    fn prefix_affinity_follows_the_conversation() {
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick(Some(&[11, 12]), 0).unwrap();
        assert_eq!(first.reason, PickReason::LeastRequest);
        b.release(first.ticket);
        let next = b.pick(Some(&[11, 12, 13, 14]), 10).unwrap();
        assert_eq!(next.endpoint, first.endpoint);
        assert_eq!(next.reason, PickReason::PrefixHit);
        assert_eq!(next.prefix_depth, 2);
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

    #[test]
    fn unhealthy_endpoints_are_avoided_unless_all_are() {
        let mut b = balancer(Policy::PrefixCache);
        let first = b.pick(Some(&[1]), 0).unwrap();
        b.release(first.ticket);
        b.set_healthy(&first.endpoint, false);
        let next = b.pick(Some(&[1, 2]), 0).unwrap();
        assert_ne!(
            next.endpoint, first.endpoint,
            "an unhealthy prefix holder is skipped"
        );
        b.release(next.ticket);
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
        let views = b.endpoints();
        assert!(views
            .iter()
            .any(|v| &*v.address == "a:1" && v.inflight == 1 && !v.in_pool));
        b.set_endpoints(&["a:1", "b:1"]);
        assert!(b.release(p.ticket));
        assert!(!b.release(p.ticket));
        assert!(b.endpoints().iter().all(|v| v.inflight == 0));
    }

    #[test]
    fn assigned_picks_count_locally_and_keep_affinity() {
        let mut b = balancer(Policy::PrefixCache);
        let ticket = b.assign("b:1", &[5, 6], 0, 0);
        assert_eq!(
            b.endpoints()
                .iter()
                .find(|v| &*v.address == "b:1")
                .unwrap()
                .inflight,
            1
        );
        assert!(b.release(ticket));
        let local = b.pick(Some(&[5, 6, 7]), 0).unwrap();
        assert_eq!((&*local.endpoint, local.prefix_depth), ("b:1", 2));
        b.set_healthy("a:1", false);
        let (candidates, all_unhealthy) = b.candidates();
        assert_eq!(
            candidates.iter().map(|c| &**c).collect::<Vec<_>>(),
            ["b:1", "c:1"]
        );
        assert!(!all_unhealthy);
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
        for view in w[0].endpoints() {
            assert_eq!(view.inflight, 10, "pool-wide: {view:?}");
        }
        let own: u32 = w[1].endpoints().iter().map(|v| v.own_inflight).sum();
        assert_eq!(own, 15);
        for (worker, p) in &picks {
            assert!(w[*worker].release(p.ticket));
        }
        assert!(w[1].endpoints().iter().all(|v| v.inflight == 0));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn workers_take_back_a_failed_request_s_levels() {
        let (mut w, path) = worker_balancers(Policy::PrefixCache, "forget");
        let first = w[0].pick(Some(&[1, 2]), 0).unwrap();
        w[0].release(first.ticket);
        let failed = w[1].pick(Some(&[1, 2, 3]), 0).unwrap();
        assert_eq!(failed.endpoint, first.endpoint);
        w[1].release_failed(failed.ticket);
        let next = w[0].pick(Some(&[1, 2, 3]), 0).unwrap();
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
        w[0].release(first.ticket);
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
            b.release(p.ticket);
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
                b.release(p.ticket);
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
            b.release(p.ticket);
        }
        // A request picked before a scrape and released after it changes nothing.
        let held = b.pick_for(Some(&[]), Some("m"), 10).unwrap();
        b.set_load("c:1", load(1.0, 0.05, 20)); // the scrape saw it
        b.release(held.ticket);
        let views = b.endpoint_loads();
        let c = views.iter().find(|v| &*v.address == "c:1").unwrap();
        assert_eq!(c.picks_since_scrape, 0);
    }
}
