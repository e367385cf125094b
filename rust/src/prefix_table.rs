//! The embedded prefix table: prefix hash -> the endpoints that recently served that prefix.
//!
//! Bounded in entries and in time: each holder expires `ttl_s` seconds after it was last
//! recorded, and past `capacity` entries the least recently used one is evicted (CLOCK, the
//! classic one-bit approximation of LRU: an entry used since the hand last passed gets a second
//! chance). Each entry keeps up to `HOLDERS` endpoints, most recent first, so a prefix shared by
//! several servers (a common system prompt) is known to all of them.
//!
//! Layout for cache behaviour: entries live inline in one hash map (no per-entry allocation),
//! and the eviction order is a flat ring of keys, so an insert costs one map probe plus the
//! evicted key's removal. Memory: about 64 bytes per entry.

use std::collections::{HashMap, TryReserveError};
use std::hash::{BuildHasherDefault, Hasher};

pub const HOLDERS: usize = 4;

/// Keys are already xxh3 outputs: hashing them again would only cost time.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdentityBuild = BuildHasherDefault<IdentityHasher>;

#[derive(Clone, Copy, Debug, Default)]
struct Holder {
    endpoint: u32,
    /// Whole seconds on the table's clock; u32 lasts 136 years.
    expires_s: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    len: u8,
    /// Used since the clock hand last passed (CLOCK's second chance).
    referenced: bool,
    holders: [Holder; HOLDERS],
}

impl Entry {
    fn live(&self, now_s: u32) -> impl Iterator<Item = u32> + '_ {
        self.holders[..usize::from(self.len)]
            .iter()
            .filter(move |h| h.expires_s > now_s)
            .map(|h| h.endpoint)
    }

    fn holds(&self, endpoint: u32, now_s: u32) -> bool {
        self.live(now_s).any(|e| e == endpoint)
    }

    /// Moves (or inserts) `endpoint` to the front with a fresh expiry; the oldest drops off.
    fn touch(&mut self, endpoint: u32, expires_s: u32) {
        let len = usize::from(self.len);
        let at = self.holders[..len]
            .iter()
            .position(|h| h.endpoint == endpoint)
            .unwrap_or_else(|| {
                if len < HOLDERS {
                    self.len += 1;
                    len
                } else {
                    HOLDERS - 1
                }
            });
        self.holders.copy_within(0..at, 1);
        self.holders[0] = Holder {
            endpoint,
            expires_s,
        };
        self.referenced = true;
    }

    /// Drops `endpoint` from the holders (the entry stays, possibly empty, in its ring slot).
    fn remove(&mut self, endpoint: u32) {
        let len = usize::from(self.len);
        if let Some(at) = self.holders[..len]
            .iter()
            .position(|h| h.endpoint == endpoint)
        {
            self.holders.copy_within(at + 1..len, at);
            self.len -= 1;
        }
    }
}

pub struct PrefixTable {
    entries: HashMap<u64, Entry, IdentityBuild>,
    /// Keys in eviction order; `hand` is where the clock points.
    ring: Vec<u64>,
    hand: usize,
    capacity: usize,
    ttl_s: u32,
}

/// What one `record` changed: levels newly stored, and of those, how many took the place of
/// another entry (evictions; the table was full).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    pub inserted: u64,
    pub evicted: u64,
}

impl std::ops::AddAssign for Recorded {
    fn add_assign(&mut self, other: Self) {
        self.inserted += other.inserted;
        self.evicted += other.evicted;
    }
}

fn seconds(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 1000).unwrap_or(u32::MAX)
}

impl PrefixTable {
    /// A table of `capacity` entries; panics if the memory cannot be had (see `try_new`).
    pub fn new(capacity: usize, ttl_s: u64) -> Self {
        Self::try_new(capacity, ttl_s).expect("memory for the prefix table")
    }

    /// Like `new`, but a capacity whose memory cannot be reserved is an error, not an abort:
    /// the size comes from the operator's config.
    pub fn try_new(capacity: usize, ttl_s: u64) -> Result<Self, TryReserveError> {
        let capacity = capacity.max(1);
        let mut entries = HashMap::with_hasher(IdentityBuild::default());
        entries.try_reserve(capacity)?;
        let mut ring = Vec::new();
        ring.try_reserve_exact(capacity)?;
        Ok(Self {
            entries,
            ring,
            hand: 0,
            capacity,
            ttl_s: u32::try_from(ttl_s).unwrap_or(u32::MAX),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn holds(&self, hash: u64, endpoint: u32, now_s: u32) -> bool {
        self.entries
            .get(&hash)
            .is_some_and(|e| e.holds(endpoint, now_s))
    }

    /// For each endpoint holding the first block, how many leading blocks of `hashes` it holds.
    ///
    /// Levels are recorded together, so a holder of level `k` normally holds every level below
    /// it: a binary search per holder finds its depth in `O(log n)` lookups.
    pub fn match_depths(&mut self, hashes: &[u64], now_ms: u64, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let now_s = seconds(now_ms);
        let Some(first) = hashes.first() else { return };
        let Some(entry) = self.entries.get_mut(first) else {
            return;
        };
        entry.referenced = true;
        let entry = *entry;
        for endpoint in entry.live(now_s) {
            let (mut lo, mut hi) = (1usize, hashes.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self.holds(hashes[mid - 1], endpoint, now_s) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            out.push((endpoint, lo as u32));
        }
    }

    /// Records that `endpoint` now holds every level of `hashes`.
    pub fn record(&mut self, hashes: &[u64], endpoint: u32, now_ms: u64) -> Recorded {
        let expires_s = seconds(now_ms).saturating_add(self.ttl_s);
        let mut recorded = Recorded::default();
        for &hash in hashes {
            if let Some(entry) = self.entries.get_mut(&hash) {
                entry.touch(endpoint, expires_s);
                continue;
            }
            recorded.inserted += 1;
            if self.ring.len() < self.capacity {
                self.ring.push(hash);
            } else if self.evict_into(hash) {
                recorded.evicted += 1;
            }
            let mut entry = Entry::default();
            entry.touch(endpoint, expires_s);
            self.entries.insert(hash, entry);
        }
        recorded
    }

    /// Takes back a record of `endpoint` for these levels (its request failed: the server never
    /// cached them). Other endpoints holding the same levels keep them; an entry left with no
    /// holder is removed (its ring slot is reused by the next eviction pass).
    pub fn forget(&mut self, hashes: &[u64], endpoint: u32) {
        for hash in hashes {
            if let Some(entry) = self.entries.get_mut(hash) {
                entry.remove(endpoint);
                if entry.len == 0 {
                    self.entries.remove(hash);
                }
            }
        }
    }

    /// Advances the clock to an entry not used since the last pass, evicts it, and puts `hash`
    /// in its ring slot. Bounded: one full turn clears every bit, so it stops within two turns.
    /// False when the slot was already free (its entry forgotten), so nothing was evicted.
    fn evict_into(&mut self, hash: u64) -> bool {
        loop {
            let victim = self.ring[self.hand];
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.ring.len();
            match self.entries.get_mut(&victim) {
                Some(entry) if entry.referenced => entry.referenced = false,
                found => {
                    let evicted = found.is_some();
                    self.entries.remove(&victim);
                    self.ring[slot] = hash;
                    return evicted;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forget_takes_back_one_endpoint_only() {
        let mut t = PrefixTable::new(100, 1000);
        t.record(&[1, 2], 7, 0);
        t.record(&[1, 2, 3], 8, 0);
        t.forget(&[2, 3], 8);
        assert_eq!(depths(&mut t, &[1, 2, 3], 0), vec![(7, 2), (8, 1)]);
        t.forget(&[1, 2], 7);
        assert_eq!(depths(&mut t, &[1, 2, 3], 0), vec![(8, 1)]);
        // Entries nobody holds any more are gone; forgetting what is not held changes nothing.
        assert_eq!(t.len(), 1);
        t.forget(&[9], 8);
        assert_eq!(t.len(), 1);
        // The table keeps working at capacity after removals (their ring slots are reused).
        let mut small = PrefixTable::new(4, 1000);
        small.record(&[1, 2, 3, 4], 1, 0);
        small.forget(&[2, 3], 1);
        small.record(&[5, 6, 7, 8, 9], 2, 0);
        assert!(small.len() <= 4);
        assert_eq!(depths(&mut small, &[9], 0), vec![(2, 1)]);
    }

    fn depths(t: &mut PrefixTable, hashes: &[u64], now: u64) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        t.match_depths(hashes, now, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn longest_prefix_per_endpoint() {
        let mut t = PrefixTable::new(100, 1);
        t.record(&[1, 2, 3], 7, 0);
        t.record(&[1, 2, 3, 4, 5], 8, 0);
        assert_eq!(
            depths(&mut t, &[1, 2, 3, 4, 5, 6], 10),
            vec![(7, 3), (8, 5)]
        );
        assert_eq!(depths(&mut t, &[9, 2, 3], 10), vec![]);
        assert_eq!(depths(&mut t, &[], 10), vec![]);
    }

    #[test]
    fn entries_expire() {
        let mut t = PrefixTable::new(100, 2);
        t.record(&[1, 2], 7, 0);
        assert_eq!(depths(&mut t, &[1, 2], 1999), vec![(7, 2)]);
        assert_eq!(depths(&mut t, &[1, 2], 2000), vec![]);
        t.record(&[1], 7, 1500);
        assert_eq!(depths(&mut t, &[1, 2], 2500), vec![(7, 1)]);
    }

    #[test]
    fn capacity_bounds_entries() {
        let mut t = PrefixTable::new(3, 1000);
        t.record(&[1, 2, 3], 7, 0);
        t.record(&[4], 7, 0);
        assert_eq!(t.len(), 3);
        assert_eq!(depths(&mut t, &[4], 0), vec![(7, 1)]);
        for key in 10..1000 {
            t.record(&[key], 7, 0);
            assert_eq!(t.len(), 3);
        }
    }

    #[test]
    fn eviction_spares_recently_used_entries() {
        let mut t = PrefixTable::new(4, 1000);
        t.record(&[1, 2, 3, 4], 7, 0);
        // One full turn of the clock clears every "used" bit...
        t.record(&[5], 7, 0);
        assert_eq!(
            depths(&mut t, &[1], 0),
            vec![],
            "the first entry went first"
        );
        // ...then 2 is looked up (used again) while 3 and 4 are not: 3 and 4 go before 2.
        assert_eq!(depths(&mut t, &[2], 0), vec![(7, 1)]);
        t.record(&[6, 8], 7, 0);
        assert_eq!(depths(&mut t, &[2], 0), vec![(7, 1)]);
        assert_eq!(depths(&mut t, &[3], 0), vec![]);
        assert_eq!(depths(&mut t, &[4], 0), vec![]);
    }

    #[test]
    fn record_counts_insertions_and_evictions() {
        let mut t = PrefixTable::new(3, 1000);
        let first = t.record(&[1, 2, 3], 7, 0);
        assert_eq!(
            first,
            Recorded {
                inserted: 3,
                evicted: 0
            }
        );
        // Known levels are refreshed, not inserted again.
        assert_eq!(t.record(&[1, 2], 8, 0), Recorded::default());
        // The table is full: a new level takes an old one's place.
        assert_eq!(
            t.record(&[4], 7, 0),
            Recorded {
                inserted: 1,
                evicted: 1
            }
        );
        // A forgotten entry's slot is reused without evicting anything.
        t.forget(&[1, 2, 3, 4], 7);
        t.forget(&[1, 2], 8);
        assert!(t.is_empty());
        assert_eq!(
            t.record(&[5], 7, 0),
            Recorded {
                inserted: 1,
                evicted: 0
            }
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn holders_keep_the_most_recent_four() {
        let mut t = PrefixTable::new(10, 1000);
        for e in 0..6 {
            t.record(&[1], e, 0);
        }
        assert_eq!(
            depths(&mut t, &[1], 0),
            vec![(2, 1), (3, 1), (4, 1), (5, 1)]
        );
        t.record(&[1], 3, 0);
        assert_eq!(depths(&mut t, &[1], 0).len(), 4);
    }
}
