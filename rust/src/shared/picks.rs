//! The shared-pick protocol: the engine decides, Redis commits with a guard.
//!
//! 1. `prepare`: the engine (`Balancer::decide`) runs the policy on this replica's view of the
//!    pool: the loads of the latest Redis reply, plus its own picks still on their way, and its
//!    prefix table (fed by its own picks and the other replicas' stream records). The decision is
//!    held in the view (so the next decisions see it) and encoded as one `COMMIT` call, with a
//!    guard: the chosen endpoint may have no more requests in flight in Redis than this view gave
//!    it (`GUARD_SLACK`).
//! 2. `complete` reads the reply: the pool's fresh loads, and whether the commit went ahead. If
//!    it did, the pick is counted here (a ticket). If another replica made the endpoint busier
//!    meanwhile, the engine decides again on the fresh loads and commits again (a second round
//!    trip, only after such a race); the last attempt has no guard.
//! 3. `fallback`: Redis did not answer in time: the decision is counted here only.
//!
//! So one pick is one round trip, Redis holds no policy, and the same engine decides for the
//! embedded, `--workers` and Redis backends.

use std::collections::HashMap;
use std::sync::Arc;

use crate::balancer::{Balancer, Decision, Pick, PickError, Request};

use super::{commit_call, parse_levels, Commit, Keys, Record, Release, Settings, StreamId};

/// How many more requests the chosen endpoint may have in Redis than the view the engine
/// decided on. None: a commit goes ahead only if no other replica added to the endpoint since
/// the view (which the stream keeps within milliseconds), so replicas never herd onto one
/// endpoint and least-request stays exact across them; a lost race costs a second round trip.
pub const GUARD_SLACK: u32 = 0;
/// Commit attempts per pick; the last has no guard (a pick never loops). A burst of picks on
/// several replicas at once (30 in the same millisecond on two) loses some races twice, and an
/// unguarded third commit then skews least-request by one; later attempts are decided on
/// fresher loads each time, so five made the burst exact in every run (a lost race costs one
/// more round trip, nothing in the common case).
pub const MAX_ATTEMPTS: u32 = 5;

/// A request as a pick needs it, owned (it may be decided again after a race).
#[derive(Debug, Clone, Default)]
pub struct OwnedRequest {
    pub hashes: Vec<u64>,
    pub level_ends: Vec<u64>,
    pub prompt_bytes: u64,
    pub context_bytes: u64,
    pub model: Option<String>,
    pub key: Option<u64>,
    pub pinned: Option<String>,
}

impl OwnedRequest {
    pub fn borrow(&self) -> Request<'_> {
        Request {
            hashes: &self.hashes,
            level_ends: &self.level_ends,
            prompt_bytes: self.prompt_bytes,
            context_bytes: self.context_bytes,
            model: self.model.as_deref(),
            key: self.key,
            pinned: self.pinned.as_deref(),
        }
    }
}

/// What a `COMMIT` reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReply {
    pub committed: bool,
    /// Pool-wide requests in flight of the candidates, in the order they were sent.
    pub loads: Vec<u32>,
    /// The point of the stream those loads are as of (records after it change them).
    pub at: Option<StreamId>,
}

impl CommitReply {
    /// From the script's `{committed, {requests...}, stream id}` (negative = 0).
    pub fn new(committed: i64, requests: &[i64], at: &str) -> Self {
        Self {
            committed: committed == 1,
            at: StreamId::parse(at),
            loads: requests
                .iter()
                .map(|&r| u32::try_from(r.max(0)).unwrap_or(u32::MAX))
                .collect(),
        }
    }
}

/// The next step of a shared pick.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Committed and counted.
    Picked(Pick),
    /// The guard held the commit back: send this commit (decided again) next.
    Retry(Vec<u8>),
}

struct Pending {
    /// `None`: the body could not be parsed (picked by load).
    request: Option<OwnedRequest>,
    request_id: String,
    decision: Decision,
    /// The pool when the commit was encoded: the reply's loads come in this order.
    candidates: Vec<Arc<str>>,
    attempts: u32,
}

/// Shared picks in flight for one replica (see the module docs).
pub struct SharedPicks {
    keys: Keys,
    settings: Settings,
    commit_sha: String,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    /// The stream position the view's loads are as of: records at or before it are already in
    /// them, later ones change them.
    anchor: StreamId,
}

impl SharedPicks {
    pub fn new(keys: Keys, settings: Settings, commit_sha: String) -> Self {
        Self {
            keys,
            settings,
            commit_sha,
            pending: HashMap::new(),
            next_id: 1,
            anchor: StreamId::default(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Decides and encodes the commit: `(pending id, RESP EVALSHA)`. `releases` (this replica's
    /// finished requests) ride on it. Every pending id must be completed, fall
    /// back or be discarded.
    pub fn prepare(
        &mut self,
        balancer: &mut Balancer,
        request: Option<OwnedRequest>,
        request_id: String,
        releases: &[Release],
        now_ms: u64,
    ) -> Result<(u64, Vec<u8>), PickError> {
        let decision =
            balancer.decide(request.as_ref().map(OwnedRequest::borrow).as_ref(), now_ms)?;
        let candidates: Vec<Arc<str>> = balancer
            .pool()
            .iter()
            .map(|&id| balancer.address(id).clone())
            .collect();
        let mut pending = Pending {
            request,
            request_id,
            decision,
            candidates,
            attempts: 1,
        };
        let command = self.encode(balancer, &mut pending, releases);
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, pending);
        Ok((id, command))
    }

    /// Holds the pending decision in the view and encodes its commit.
    fn encode(
        &self,
        balancer: &mut Balancer,
        pending: &mut Pending,
        releases: &[Release],
    ) -> Vec<u8> {
        let decision = &pending.decision;
        balancer.hold(decision);
        // maxRequestCount holds whatever the view said: the commit never passes it.
        let limit = balancer.config().max_request_count;
        let cap = (limit > 0).then(|| limit - 1);
        let guard = if pending.attempts < MAX_ATTEMPTS {
            let slack = decision.inflight + GUARD_SLACK;
            Some(cap.map_or(slack, |cap| cap.min(slack)))
        } else {
            cap
        };
        // The affinity key travels as one more level: the other replicas record it alike.
        let mut levels: Vec<u64> = match (&pending.request, decision.records_prefix) {
            (Some(request), true) => request.hashes.clone(),
            _ => Vec::new(),
        };
        levels.extend(decision.key);
        let commit = Commit {
            request_id: &pending.request_id,
            endpoint: balancer.address(decision.endpoint),
            guard,
            tokens: decision.tokens,
            levels: &levels,
        };
        commit_call(
            &self.keys,
            &self.settings,
            &commit,
            &pending.candidates,
            releases,
        )
        .resp(&self.commit_sha)
    }

    /// Reads a commit's reply: the pick, or the next commit after a race.
    pub fn complete(
        &mut self,
        balancer: &mut Balancer,
        id: u64,
        reply: &CommitReply,
        now_ms: u64,
    ) -> Result<Outcome, PickError> {
        let Some(mut pending) = self.pending.remove(&id) else {
            return Err(PickError::NoEndpoints);
        };
        balancer.unhold(&pending.decision);
        let loads: Vec<(Arc<str>, u32)> = pending
            .candidates
            .iter()
            .cloned()
            .zip(reply.loads.iter().copied())
            .collect();
        if let Some(at) = reply.at {
            self.anchor = self.anchor.max(at);
        }
        if reply.committed {
            let hashes = pending.request.as_ref().map_or(&[][..], |r| &r.hashes);
            let pick = balancer.commit(&pending.decision, hashes, now_ms);
            // After the commit: the reply's loads already include it.
            balancer.set_remote_loads(&loads);
            return Ok(Outcome::Picked(pick));
        }
        balancer.set_remote_loads(&loads);
        let request = pending.request.as_ref().map(OwnedRequest::borrow);
        pending.decision = balancer.decide(request.as_ref(), now_ms)?;
        pending.attempts += 1;
        let command = self.encode(balancer, &mut pending, &[]);
        self.pending.insert(id, pending);
        Ok(Outcome::Retry(command))
    }

    /// Redis did not answer: the decision is counted here only.
    pub fn fallback(&mut self, balancer: &mut Balancer, id: u64, now_ms: u64) -> Option<Pick> {
        let pending = self.pending.remove(&id)?;
        balancer.unhold(&pending.decision);
        let hashes = pending.request.as_ref().map_or(&[][..], |r| &r.hashes);
        Some(balancer.commit(&pending.decision, hashes, now_ms))
    }

    /// Forgets a pending pick that will not be used.
    pub fn discard(&mut self, balancer: &mut Balancer, id: u64) {
        if let Some(pending) = self.pending.remove(&id) {
            balancer.unhold(&pending.decision);
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Applies a record of the pool's stream (its `<ms>-<seq>` id and fields): another
    /// replica's commit, release, reap or take-back. A commit's tokens go into the endpoint's
    /// backlog and its prefix keys into the prefix table (dated by the id: `wall_now_ms` is the
    /// Unix time in ms, `now_ms` the balancer's clock); a request count change goes into the
    /// view unless the view's latest reply already counted it. This replica's own records, and
    /// garbled ones, are skipped. Returns whether it was applied.
    pub fn apply_record(
        &self,
        balancer: &mut Balancer,
        id: &str,
        record: &Record<'_>,
        wall_now_ms: u64,
        now_ms: u64,
    ) -> bool {
        let Some(at) = StreamId::parse(id) else {
            return false;
        };
        if record.replica == self.settings.replica {
            return false;
        }
        let mut applied = false;
        let levels = match record.levels.map(parse_levels) {
            Some(None) => return false,
            Some(Some(levels)) => levels,
            None => Vec::new(),
        };
        // When the record was written, on the balancer's clock.
        let written_ms = now_ms.saturating_sub(wall_now_ms.saturating_sub(at.ms));
        if let Some(endpoint) = record.endpoint {
            if record.failed {
                let tokens = record.tokens.unwrap_or(0);
                balancer.apply_remote_failure(endpoint, &levels, tokens, written_ms, now_ms);
                applied = true;
            } else if let Some(tokens) = record.tokens {
                balancer.apply_remote_commit(endpoint, tokens, &levels, written_ms);
                applied = true;
                if at > self.anchor {
                    balancer.add_remote_load(endpoint, 1);
                }
            }
        }
        for (endpoint, requests, tokens) in record.removals() {
            // Backlogs come from the stream alone; request counts also from the replies.
            if tokens > 0 {
                balancer.apply_remote_release(endpoint, tokens, written_ms, now_ms);
                applied = true;
            }
            if at > self.anchor {
                balancer.add_remote_load(endpoint, -i64::try_from(requests).unwrap_or(i64::MAX));
                applied = true;
            }
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    use super::*;
    use crate::balancer::{BalancerConfig, PickReason};
    use crate::scheduling::policies::Policy;

    fn setup() -> (Balancer, SharedPicks) {
        let mut b = Balancer::with_rng(
            BalancerConfig {
                policy: Policy::PrefixCache,
                ..BalancerConfig::default()
            },
            SmallRng::seed_from_u64(1),
        );
        b.set_endpoints(&["a:1", "b:1", "c:1"]);
        b.set_remote(true);
        let settings = Settings {
            replica: "r1".into(),
            lease_ms: 10_000,
            keep_ms: 100_000,
        };
        (
            b,
            SharedPicks::new(Keys::new("p", "r1"), settings, "sha".into()),
        )
    }

    #[allow(clippy::unnecessary_wraps)] // what `prepare` takes
    fn request(hashes: &[u64]) -> Option<OwnedRequest> {
        Some(OwnedRequest {
            hashes: hashes.to_vec(),
            prompt_bytes: 512 * hashes.len() as u64,
            ..OwnedRequest::default()
        })
    }

    fn reply(committed: bool, requests: [i64; 3]) -> CommitReply {
        CommitReply::new(i64::from(committed), &requests, "100-0")
    }

    #[test]
    fn a_committed_pick_counts_once_and_the_reply_sets_the_view() {
        let (mut b, mut s) = setup();
        let (id, command) = s
            .prepare(&mut b, request(&[1, 2]), "r-1".into(), &[], 0)
            .unwrap();
        assert!(command.starts_with(b"*"));
        // Held in the view while the commit is on its way: a second decision goes elsewhere.
        let (id2, _) = s
            .prepare(&mut b, request(&[7]), "r-2".into(), &[], 0)
            .unwrap();
        let first = s.pending[&id].decision.endpoint;
        assert_ne!(s.pending[&id2].decision.endpoint, first);
        s.discard(&mut b, id2);
        let mut loads = [0; 3];
        loads[first as usize] = 1;
        let Outcome::Picked(pick) = s.complete(&mut b, id, &reply(true, loads), 0).unwrap() else {
            panic!("committed")
        };
        assert_eq!(pick.reason, PickReason::LeastRequest);
        let views = b.endpoints(0);
        assert_eq!(
            views.iter().map(|v| v.inflight).sum::<u32>(),
            1,
            "{views:?}"
        );
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_race_lost_on_the_guard_decides_again_on_the_fresh_loads() {
        let (mut b, mut s) = setup();
        let (id, _) = s
            .prepare(&mut b, request(&[1]), "r-1".into(), &[], 0)
            .unwrap();
        let first = s.pending[&id].decision.endpoint;
        // Another replica filled the chosen endpoint meanwhile.
        let mut loads = [0; 3];
        loads[first as usize] = 5;
        let Outcome::Retry(command) = s.complete(&mut b, id, &reply(false, loads), 0).unwrap()
        else {
            panic!("retry")
        };
        assert!(!command.is_empty());
        let second = s.pending[&id].decision.endpoint;
        assert_ne!(second, first);
        loads[second as usize] = 1;
        assert!(matches!(
            s.complete(&mut b, id, &reply(true, loads), 0).unwrap(),
            Outcome::Picked(_)
        ));
    }

    #[test]
    fn other_replicas_records_give_affinity_and_own_are_skipped() {
        let (mut b, s) = setup();
        let blob = super::super::levels_blob(&[11, 12]);
        let commit = |replica| Record {
            replica,
            endpoint: Some("b:1"),
            tokens: Some(0),
            levels: Some(&blob),
            ..Record::default()
        };
        assert!(
            !s.apply_record(&mut b, "1000-0", &commit("r1"), 1000, 0),
            "own"
        );
        let garbled = Record {
            levels: Some(b"odd"),
            tokens: None,
            ..commit("r2")
        };
        assert!(!s.apply_record(&mut b, "1000-0", &garbled, 1000, 0));
        assert!(s.apply_record(&mut b, "1000-0", &commit("r2"), 1000, 0));
        let pick = b.pick(Some(&[11, 12, 13]), 0).unwrap();
        assert_eq!((&*pick.endpoint, pick.prefix_depth), ("b:1", 2));
    }

    #[test]
    #[allow(clippy::float_cmp)] // whole tokens, exact in f64
    fn records_after_the_latest_reply_change_the_counts_and_every_commit_the_backlog() {
        let (mut b, mut s) = setup();
        let (id, _) = s
            .prepare(&mut b, request(&[1]), "r-1".into(), &[], 0)
            .unwrap();
        let chosen = s.pending[&id].decision.endpoint;
        let mut loads = [0; 3];
        loads[chosen as usize] = 1;
        s.complete(&mut b, id, &reply(true, loads), 0).unwrap(); // the view is as of 100-0
        let c = b.id_of("c:1");
        let before = b.inflight_of(c);
        let busy = Record {
            replica: "r2",
            endpoint: Some("c:1"),
            tokens: Some(500),
            ..Record::default()
        };
        // Written at 99 ms (Redis clock), read at 1000 ms: 901 ms late, so what is left of its
        // 500 tokens at the default prefill rate is nothing; the request count is in the reply.
        assert!(s.apply_record(&mut b, "99-0", &busy, 1000, 5000));
        assert_eq!((b.inflight_of(c), b.backlog_of(c, 5000)), (before, 0.0));
        // Read as it is written: all 500 tokens, and one more request (after the reply).
        assert!(s.apply_record(&mut b, "1000-0", &busy, 1000, 5000));
        assert_eq!(
            (b.inflight_of(c), b.backlog_of(c, 5000)),
            (before + 1, 500.0)
        );
        let rate = b.config().load_model.prefill_rate;
        assert_eq!(
            b.backlog_of(c, 5020),
            (500.0 - rate * 0.02).max(0.0),
            "drains at the prefill rate"
        );
        let done = Record {
            replica: "r2",
            removed: Some("c:1\t1"),
            ..Record::default()
        };
        assert!(s.apply_record(&mut b, "1001-0", &done, 1000, 5000));
        assert_eq!(b.inflight_of(c), before);
        assert!(
            !s.apply_record(&mut b, "98-0", &done, 1000, 5000),
            "a release the reply already counted"
        );
        assert_eq!(b.inflight_of(c), before);
        // A failed request takes back what the backlog still held of it (300 of the 500 tokens
        // when it failed, 10 ms before it is read here).
        let failed = Record {
            replica: "r2",
            endpoint: Some("c:1"),
            tokens: Some(300),
            failed: true,
            ..Record::default()
        };
        assert!(s.apply_record(&mut b, "1010-0", &failed, 1020, 5020));
        let expected = (500.0 - rate * 0.02) - (300.0 - rate * 0.01);
        assert_eq!(b.backlog_of(c, 5020), expected.max(0.0));
        // A release record carries what the backlog still held of its request: taken back even
        // when the reply already counted the release itself (a record before the anchor, read as
        // it is written).
        let big = Record {
            tokens: Some(4000),
            ..busy
        };
        assert!(s.apply_record(&mut b, "1020-0", &big, 1020, 5020));
        let loaded = (b.inflight_of(c), b.backlog_of(c, 5020));
        let ended = Record {
            replica: "r2",
            removed: Some("c:1\t1\t3000"),
            ..Record::default()
        };
        assert!(s.apply_record(&mut b, "98-0", &ended, 98, 5020));
        assert_eq!(
            (b.inflight_of(c), b.backlog_of(c, 5020)),
            (loaded.0, loaded.1 - 3000.0)
        );
    }

    #[test]
    fn a_fallback_counts_the_decision_here_only() {
        let (mut b, mut s) = setup();
        let (id, _) = s.prepare(&mut b, None, "r-1".into(), &[], 0).unwrap();
        let pick = s.fallback(&mut b, id, 0).unwrap();
        assert_eq!(pick.reason, PickReason::BadBody);
        assert_eq!(
            b.endpoints(0).iter().map(|v| v.own_inflight).sum::<u32>(),
            1
        );
        assert!(s.fallback(&mut b, id, 0).is_none());
    }
}
