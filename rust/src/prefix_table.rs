//! The embedded prefix table: prefix hash -> the endpoints that recently served that prefix.
//!
//! Bounded in entries and in time: each holder expires `ttl_s` seconds after it was last
//! recorded, and the table holds `capacity` entries (rounded up to whole sets of `WAYS`). Each
//! entry keeps up to `HOLDERS` endpoints, most recent first, so a prefix shared by several
//! servers (a common system prompt) is known to all of them.
//!
//! Layout for cache behaviour: set-associative, like a CPU cache. A hash lives in one set of
//! `WAYS` entries (`set_of`), and a new entry takes the set's least recently used way. A lookup
//! reads one set (its keys fill one or two cache lines), and an insertion evicts within the set it
//! already read, so recording a new level costs one random memory access, where a global LRU or
//! CLOCK order costs a second one for the victim. `record` also looks up a group of levels
//! before it changes any, so the CPU fetches their sets at once instead of one miss after
//! another. The `--workers` state (`worker_state`) uses the same sets in shared memory.

use std::collections::TryReserveError;

pub const HOLDERS: usize = 4;
/// Entries per set.
pub const WAYS: usize = 8;
/// Levels `record` looks up before changing any (their sets are fetched in parallel).
const GROUP: usize = 8;

/// The set of `sets` that `hash` lives in. Keys are already xxh3 outputs (uniform bits): the
/// high half of `hash × sets` maps them evenly, and costs a multiply where `%` costs a division.
pub fn set_of(hash: u64, sets: usize) -> usize {
    ((u128::from(hash) * sets as u128) >> 64) as usize
}

/// Asks the CPU to start loading the cache line holding `data` (a hint; a no-op off x86-64).
#[inline]
fn prefetch<T>(data: &T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a prefetch only hints the cache and never faults; `data` is a live reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(data).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `count` empty sets in zeroed memory from the allocator (`calloc`): a large table comes from
/// pages the kernel zeroes as they are first touched, so it costs nothing to create and uses
/// memory as its sets fill. (Writing the zeros at start took 8-33 ms for the default size, on
/// every balancer a test or the simulator makes.)
fn empty_sets(count: usize) -> Result<Box<[Set]>, TryReserveError> {
    if let Ok(layout) = std::alloc::Layout::array::<Set>(count) {
        if layout.size() > 0 {
            #[allow(unsafe_code, clippy::cast_ptr_alignment)] // aligned as `layout` asks
            // SAFETY: the layout is not zero-sized.
            let data = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Set>();
            if !data.is_null() {
                advise_huge_pages(data as usize, layout.size());
                #[allow(unsafe_code)]
                // SAFETY: allocated by the global allocator with the layout of `count` sets, each
                // initialised: all zeros is a valid empty set (integers only).
                return Ok(unsafe {
                    Box::from_raw(std::ptr::slice_from_raw_parts_mut(data, count))
                });
            }
        }
    }
    // Out of memory (or a size past what can be addressed): the fallible path says which.
    let mut sets = Vec::new();
    sets.try_reserve_exact(count)?;
    sets.resize(count, Set::default());
    Ok(sets.into_boxed_slice())
}

/// Asks Linux to back a large table with huge pages before it is first written. Lookups land
/// at random, and with 4 KiB pages a table of the default size (13 MiB, 3,328 pages, more than a
/// second-level TLB holds) misses the TLB on most of them as well as the cache. A hint: where
/// transparent huge pages are off, nothing changes.
fn advise_huge_pages(start: usize, bytes: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    if !cfg!(target_os = "linux") || bytes < 2 * HUGE_PAGE {
        return;
    }
    // Only the whole 4 KiB pages inside the allocation (madvise wants an aligned start).
    let first = start.next_multiple_of(4096);
    let length = (start + bytes - first) / 4096 * 4096;
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: the range lies inside one live allocation; MADV_HUGEPAGE changes how its pages
    // are backed, never their contents, and a refusal (THP off) is harmless.
    unsafe {
        libc::madvise(first as *mut libc::c_void, length, libc::MADV_HUGEPAGE);
    }
    let _ = length;
}

#[derive(Clone, Copy, Debug, Default)]
struct Holder {
    endpoint: u32,
    /// Whole seconds on the table's clock; u32 lasts 136 years.
    expires_s: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    len: u8,
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
    }

    /// Drops `endpoint` from the holders.
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

/// One set: the keys first (a lookup reads them, two cache lines at most), then when each way
/// was last used, then the entries. Not aligned to cache lines on purpose: the allocator then
/// hands out zeroed pages as they are (see `empty_sets`), where a 64-byte alignment makes it
/// write the zeros itself.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Set {
    keys: [u64; WAYS],
    /// The table's use clock when the way was last used; 0: the way is empty.
    used: [u64; WAYS],
    entries: [Entry; WAYS],
}

impl Set {
    fn find(&self, hash: u64) -> Option<usize> {
        // The keys alone first (one cache line, no branches); an empty way's stale key may
        // match too, so a match counts only if its way is in use.
        let mut matches = 0u32;
        for (way, &key) in self.keys.iter().enumerate() {
            matches |= u32::from(key == hash) << way;
        }
        while matches != 0 {
            let way = matches.trailing_zeros() as usize;
            if self.used[way] != 0 {
                return Some(way);
            }
            matches &= matches - 1;
        }
        None
    }

    /// The way a new key takes: an empty one, else the least recently used.
    fn victim(&self) -> usize {
        (0..WAYS).min_by_key(|&way| self.used[way]).unwrap_or(0)
    }
}

pub struct PrefixTable {
    sets: Box<[Set]>,
    len: usize,
    /// Advances once per `record` or `match_depths`: the sets' recency order.
    clock: u64,
    ttl_s: u32,
}

/// What one `record` changed: levels newly stored, and of those, how many took the place of
/// another entry (evictions; the set was full).
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
    /// A table of `capacity` entries (whole sets); panics if the memory cannot be had (see
    /// `try_new`).
    pub fn new(capacity: usize, ttl_s: u64) -> Self {
        Self::try_new(capacity, ttl_s).expect("memory for the prefix table")
    }

    /// Like `new`, but a capacity whose memory cannot be reserved is an error, not an abort:
    /// the size comes from the operator's config.
    pub fn try_new(capacity: usize, ttl_s: u64) -> Result<Self, TryReserveError> {
        let sets = empty_sets(capacity.div_ceil(WAYS).max(1))?;
        Ok(Self {
            sets,
            len: 0,
            clock: 0,
            ttl_s: u32::try_from(ttl_s).unwrap_or(u32::MAX),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries it holds at most: the configured capacity rounded up to whole sets.
    pub fn capacity(&self) -> usize {
        self.sets.len() * WAYS
    }

    fn entry(&self, hash: u64) -> Option<&Entry> {
        let set = &self.sets[set_of(hash, self.sets.len())];
        set.find(hash).map(|way| &set.entries[way])
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// For each endpoint holding the first block, how many leading blocks of `hashes` it holds.
    ///
    /// Levels are recorded together, so a holder of level `k` normally holds every level below
    /// it: a binary search per holder finds its depth in `O(log n)` lookups.
    pub fn match_depths(&mut self, hashes: &[u64], now_ms: u64, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let now_s = seconds(now_ms);
        let Some(&first) = hashes.first() else { return };
        let tick = self.tick();
        let set = set_of(first, self.sets.len());
        let Some(way) = self.sets[set].find(first) else {
            return;
        };
        // A prefix that is looked up is in use: it goes after the set's idle entries.
        self.sets[set].used[way] = tick;
        let entry = self.sets[set].entries[way];
        for endpoint in entry.live(now_s) {
            let (mut lo, mut hi) = (1usize, hashes.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self
                    .entry(hashes[mid - 1])
                    .is_some_and(|e| e.holds(endpoint, now_s))
                {
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
        let tick = self.tick();
        let sets = self.sets.len();
        let mut recorded = Recorded::default();
        for group in hashes.chunks(GROUP) {
            // Fetch the group's sets at once, then look each level up, then change them.
            let mut found = [(0usize, None); GROUP];
            for (slot, &hash) in found.iter_mut().zip(group) {
                slot.0 = set_of(hash, sets);
                let set = &self.sets[slot.0];
                prefetch(&set.keys);
                prefetch(&set.used);
            }
            for (slot, &hash) in found.iter_mut().zip(group) {
                let set = &self.sets[slot.0];
                slot.1 = set.find(hash);
                // The entry this level will write: fetched now too, not one by one below.
                prefetch(&set.entries[slot.1.unwrap_or_else(|| set.victim())]);
            }
            for (&hash, &(set, way)) in group.iter().zip(&found) {
                let set = &mut self.sets[set];
                // An earlier level of the group may have changed this set (same set).
                let way = way
                    .filter(|&w| set.keys[w] == hash && set.used[w] != 0)
                    .or_else(|| set.find(hash));
                let way = way.unwrap_or_else(|| {
                    let way = set.victim();
                    recorded.inserted += 1;
                    if set.used[way] == 0 {
                        self.len += 1;
                    } else {
                        recorded.evicted += 1;
                    }
                    set.keys[way] = hash;
                    set.entries[way] = Entry::default();
                    way
                });
                set.used[way] = tick;
                set.entries[way].touch(endpoint, expires_s);
            }
        }
        recorded
    }

    /// Takes back a record of `endpoint` for these levels (its request failed: the server never
    /// cached them). Other endpoints holding the same levels keep them; an entry left with no
    /// holder is removed.
    pub fn forget(&mut self, hashes: &[u64], endpoint: u32) {
        let sets = self.sets.len();
        for &hash in hashes {
            let set = &mut self.sets[set_of(hash, sets)];
            if let Some(way) = set.find(hash) {
                set.entries[way].remove(endpoint);
                if set.entries[way].len == 0 {
                    set.used[way] = 0;
                    self.len -= 1;
                }
            }
        }
    }
}

/// Test keys spread over the sets like real hashes (small integers all share the first set).
#[cfg(test)]
pub(crate) fn spread(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
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
        // The table keeps working when full after removals (their ways are reused).
        let mut small = PrefixTable::new(WAYS, 1000); // one set
        let keys: Vec<u64> = (1..=WAYS as u64).collect();
        small.record(&keys, 1, 0);
        small.forget(&keys[1..3], 1);
        assert_eq!(small.len(), WAYS - 2);
        let more: Vec<u64> = (100..100 + WAYS as u64).collect();
        small.record(&more, 2, 0);
        assert_eq!(small.len(), WAYS);
        assert_eq!(depths(&mut small, &more[WAYS - 1..], 0), vec![(2, 1)]);
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
    fn capacity_is_whole_sets_and_bounds_entries() {
        assert_eq!(PrefixTable::new(3, 1000).capacity(), WAYS);
        assert_eq!(PrefixTable::new(0, 1000).capacity(), WAYS);
        assert_eq!(PrefixTable::new(100_000, 1000).capacity(), 100_000);
        assert_eq!(PrefixTable::new(100_001, 1000).capacity(), 100_008);
        let mut t = PrefixTable::new(4 * WAYS, 1000);
        for key in 0..10_000 {
            t.record(&[spread(key)], 7, 0);
            assert!(t.len() <= t.capacity());
        }
        // Every set filled up: the table is full, not just one set.
        assert_eq!(t.len(), t.capacity());
        assert_eq!(depths(&mut t, &[spread(9_999)], 0), vec![(7, 1)]);
    }

    #[test]
    fn an_entry_costs_52_bytes() {
        // docs/configuration.md quotes this (13 MiB at the default 262,144 entries).
        assert_eq!(std::mem::size_of::<Set>(), 52 * WAYS);
        assert_eq!(
            PrefixTable::new(262_144, 1).sets.len() * std::mem::size_of::<Set>(),
            13 << 20
        );
    }

    #[test]
    fn set_of_spreads_hashes_evenly() {
        let sets = 1000;
        let mut counts = vec![0u32; sets];
        for i in 0..100_000 {
            counts[set_of(spread(i), sets)] += 1;
        }
        // 100 per set on average; a biased mapping would leave sets empty or crowded.
        assert!(
            counts.iter().all(|&c| (60..=140).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(set_of(u64::MAX, sets), sets - 1);
        assert_eq!(set_of(0, sets), 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_way() {
        let mut t = PrefixTable::new(WAYS, 1000); // one set
        for key in 1..=WAYS as u64 {
            t.record(&[key], 7, 0);
        }
        // 1 is looked up (used again), 2 is refreshed by a record: 3 is now the oldest.
        assert_eq!(depths(&mut t, &[1], 0), vec![(7, 1)]);
        t.record(&[2], 8, 0);
        t.record(&[100], 7, 0);
        assert_eq!(depths(&mut t, &[3], 0), vec![], "the oldest went first");
        for key in [1, 2, 4, 100] {
            assert!(!depths(&mut t, &[key], 0).is_empty(), "{key} kept");
        }
        // Those lookups were uses too: 5 is now the oldest, not 4.
        t.record(&[101], 7, 0);
        assert_eq!(depths(&mut t, &[5], 0), vec![], "then the next oldest");
        assert_eq!(depths(&mut t, &[4], 0), vec![(7, 1)]);
    }

    #[test]
    fn record_counts_insertions_and_evictions() {
        let mut t = PrefixTable::new(WAYS, 1000); // one set
        let keys: Vec<u64> = (1..=WAYS as u64).collect();
        let first = t.record(&keys, 7, 0);
        assert_eq!(
            first,
            Recorded {
                inserted: WAYS as u64,
                evicted: 0
            }
        );
        // Known levels are refreshed, not inserted again.
        assert_eq!(t.record(&keys[..2], 8, 0), Recorded::default());
        // The table is full: a new level takes an old one's place.
        assert_eq!(
            t.record(&[100], 7, 0),
            Recorded {
                inserted: 1,
                evicted: 1
            }
        );
        assert_eq!(t.len(), WAYS);
        // A forgotten entry's way is reused without evicting anything.
        t.forget(&keys, 7);
        t.forget(&keys, 8);
        t.forget(&[100], 7);
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
    fn a_chain_longer_than_a_group_is_recorded_whole() {
        let mut t = PrefixTable::new(1 << 16, 1000);
        let chain: Vec<u64> = (0..3 * GROUP as u64 + 5).map(spread).collect();
        let recorded = t.record(&chain, 7, 0);
        assert_eq!(recorded.inserted, chain.len() as u64);
        assert_eq!(depths(&mut t, &chain, 0), vec![(7, chain.len() as u32)]);
        // A chain that repeats a level, and levels sharing one set within a group, still
        // store each key once.
        let mut one_set = PrefixTable::new(WAYS, 1000);
        let repeats = [1, 2, 1, 3, 2, 4, 4, 5, 6, 1];
        let recorded = one_set.record(&repeats, 9, 0);
        assert_eq!(recorded.inserted, 6);
        assert_eq!(one_set.len(), 6);
        assert_eq!(depths(&mut one_set, &[1, 2, 3, 4, 5, 6], 0), vec![(9, 6)]);
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
