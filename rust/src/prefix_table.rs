//! The embedded prefix table: prefix hash -> the endpoints that recently served that prefix.
//!
//! Bounded in entries (LRU) and in time (each holder expires `ttl_ms` after it was last
//! recorded). Each entry keeps up to `HOLDERS` endpoints, most recent first, so a prefix shared
//! by several servers (a common system prompt) is known to all of them.
//! Memory: about 100 bytes per entry (key, four holders, LRU links and map overhead).

use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;

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
    expires_ms: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Holders {
    len: u8,
    slots: [Holder; HOLDERS],
}

impl Holders {
    fn live(&self, now_ms: u64) -> impl Iterator<Item = u32> + '_ {
        self.slots[..usize::from(self.len)]
            .iter()
            .filter(move |h| h.expires_ms > now_ms)
            .map(|h| h.endpoint)
    }

    fn holds(&self, endpoint: u32, now_ms: u64) -> bool {
        self.live(now_ms).any(|e| e == endpoint)
    }

    /// Moves (or inserts) `endpoint` to the front with a fresh expiry; the oldest drops off.
    fn touch(&mut self, endpoint: u32, expires_ms: u64) {
        let len = usize::from(self.len);
        let at = self.slots[..len]
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
        self.slots.copy_within(0..at, 1);
        self.slots[0] = Holder {
            endpoint,
            expires_ms,
        };
    }
}

pub struct PrefixTable {
    entries: LruCache<u64, Holders, IdentityBuild>,
    ttl_ms: u64,
}

impl PrefixTable {
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        let capacity = NonZeroUsize::new(capacity.max(1)).expect("capacity is at least 1");
        Self {
            entries: LruCache::with_hasher(capacity, IdentityBuild::default()),
            ttl_ms,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.entries.cap().get()
    }

    fn holds(&self, hash: u64, endpoint: u32, now_ms: u64) -> bool {
        self.entries
            .peek(&hash)
            .is_some_and(|h| h.holds(endpoint, now_ms))
    }

    /// For each endpoint holding the first block, how many leading blocks of `hashes` it holds.
    ///
    /// Levels are recorded together, so a holder of level `k` normally holds every level below
    /// it: a binary search per holder finds its depth in `O(log n)` lookups.
    pub fn match_depths(&mut self, hashes: &[u64], now_ms: u64, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let Some(first) = hashes.first() else { return };
        let Some(holders) = self.entries.get(first).copied() else {
            return;
        };
        for endpoint in holders.live(now_ms) {
            let (mut lo, mut hi) = (1usize, hashes.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self.holds(hashes[mid - 1], endpoint, now_ms) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            out.push((endpoint, lo as u32));
        }
    }

    /// Records that `endpoint` now holds every level of `hashes`.
    pub fn record(&mut self, hashes: &[u64], endpoint: u32, now_ms: u64) {
        let expires_ms = now_ms.saturating_add(self.ttl_ms);
        for &hash in hashes {
            if let Some(holders) = self.entries.get_mut(&hash) {
                holders.touch(endpoint, expires_ms);
            } else {
                let mut holders = Holders::default();
                holders.touch(endpoint, expires_ms);
                self.entries.push(hash, holders);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depths(t: &mut PrefixTable, hashes: &[u64], now: u64) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        t.match_depths(hashes, now, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn longest_prefix_per_endpoint() {
        let mut t = PrefixTable::new(100, 1000);
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
        let mut t = PrefixTable::new(100, 1000);
        t.record(&[1, 2], 7, 0);
        assert_eq!(depths(&mut t, &[1, 2], 999), vec![(7, 2)]);
        assert_eq!(depths(&mut t, &[1, 2], 1000), vec![]);
        t.record(&[1], 7, 900);
        assert_eq!(depths(&mut t, &[1, 2], 1500), vec![(7, 1)]);
    }

    #[test]
    fn capacity_bounds_entries_lru() {
        let mut t = PrefixTable::new(3, 1000);
        t.record(&[1, 2, 3], 7, 0);
        t.record(&[4], 7, 0);
        assert_eq!(t.len(), 3);
        assert_eq!(depths(&mut t, &[1], 0), vec![]);
        assert_eq!(depths(&mut t, &[4], 0), vec![(7, 1)]);
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
