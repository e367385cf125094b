//! Picking state shared by the worker processes of one `llmlb serve --workers N`.
//!
//! The workers accept ext_proc streams on one port (SO_REUSEPORT), so the turns of one
//! conversation and the requests to one endpoint land on different processes. To pick as one
//! replica they share, through a file mapped by every worker (in `/dev/shm`):
//!
//! - an **endpoint directory**: address -> slot, append-only, so every worker names an endpoint
//!   by the same slot;
//! - **in-flight counts** per worker and slot: each worker writes only its own row, and a pick
//!   reads the sum over rows. A worker that dies leaves its row behind; its replacement (same
//!   index) zeroes the row when it opens the state, so no phantom load survives a restart;
//! - a **prefill backlog** per slot (`backlog::pack`, one word updated by compare-and-swap):
//!   every worker's picks add to it and it drains with time, so it needs no cleaning up;
//! - a **prefix table**: the embedded table's sets (`prefix_table::WAYS` ways, `set_of`), each
//!   entry a prefix hash and up to four `(slot, expiry)` holders, least recently used way
//!   replaced;
//! - a **scraped load** per slot (least_busy): one worker scrapes the endpoints' metrics and
//!   publishes each load here, so the pool is scraped once per interval whatever the number of
//!   workers. A sequence word guards each record (odd while written; readers retry), and a
//!   writer that died mid-write is simply overwritten by the next publish.
//!
//! Every word is an `AtomicU64`. Directory and prefix sets are guarded by spinlocks whose word
//! holds the owner's PID: a lock held by a process that no longer exists is taken over, and a
//! lock that stays busy past a bound is given up on (the pick proceeds without prefix
//! information), so a crashed or stuck worker can never stall the others.

#![allow(unsafe_code)] // One mapping turned into a slice of atomics; see `WorkerState::open`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backlog::{self, Backlog};
use crate::balancer::Load;
use crate::prefix_table::{self, Recorded, HOLDERS, WAYS};

const MAGIC: u64 = 0x6c6c_6d6c_625f_7773; // "llmlb_ws"
/// 2: a prefill backlog word per slot; 3: a scraped load per slot; 4: sets chosen by
/// `prefix_table::set_of`.
const VERSION: u64 = 4;

const HEADER_WORDS: usize = 8;
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_WORKERS: usize = 2;
const H_SLOTS: usize = 3;
const H_SETS: usize = 4;
const H_TTL_S: usize = 5;
const H_DIRECTORY_LOCK: usize = 6;
/// The directory starts right after the header.
const DIRECTORY: usize = HEADER_WORDS;

/// Directory entry: the address length, then up to `MAX_ADDRESS` bytes.
const DIR_WORDS: usize = 16;
pub const MAX_ADDRESS: usize = (DIR_WORDS - 1) * 8;

/// Prefix entry: key, `last_used_s | len << 32`, then one `slot | expires_s << 32` per holder.
const ENTRY_WORDS: usize = 2 + HOLDERS;
/// Prefix set: its lock word, then the ways.
const SET_WORDS: usize = 1 + WAYS * ENTRY_WORDS;

pub const MAX_WORKERS: usize = 256;

/// Scraped load record: sequence, waiting, running, KV use (f64 bits), scraped at (ms),
/// `max_lora`, bytes of adapter names used, then the names.
const LOAD_WORDS: usize = 32;
const LOAD_HEAD: usize = 7;
/// Adapter names shared per endpoint (each: running/waiting tag, length, bytes); names past
/// it are left out (a worker then sees fewer adapters loaded than the scrape did).
pub const LOAD_NAME_BYTES: usize = (LOAD_WORDS - LOAD_HEAD) * 8;
/// Reads of a record being rewritten before giving up (the previous load is then used).
const LOAD_READ_TRIES: u32 = 64;

/// Spins before a busy lock is checked for a dead owner, and before it is given up on.
const STEAL_CHECK_SPINS: u32 = 2_000;
const GIVE_UP_SPINS: u32 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub workers: usize,
    pub slots: usize,
    pub sets: usize,
}

impl Layout {
    /// `prefix_capacity` entries rounded up to whole sets.
    pub fn new(workers: usize, slots: usize, prefix_capacity: usize) -> Self {
        Self {
            workers: workers.clamp(1, MAX_WORKERS),
            slots: slots.max(1),
            sets: prefix_capacity.div_ceil(WAYS).max(1),
        }
    }

    fn counts(&self) -> usize {
        DIRECTORY + self.slots * DIR_WORDS
    }

    fn backlogs(&self) -> usize {
        self.counts() + self.workers * self.slots
    }

    fn prefix(&self) -> usize {
        self.backlogs() + self.slots
    }

    fn loads(&self) -> usize {
        self.prefix() + self.sets * SET_WORDS
    }

    fn words(&self) -> usize {
        self.loads() + self.slots * LOAD_WORDS
    }

    pub fn bytes(&self) -> usize {
        self.words() * 8
    }
}

pub struct WorkerState {
    map: *mut AtomicU64,
    words: usize,
    layout: Layout,
    worker: usize,
    ttl_s: u32,
    /// This process's lock-owner mark.
    pid: u64,
}

// SAFETY: the mapping is only ever accessed through atomics, which are Sync; the pointer stays
// valid until `Drop` unmaps it.
unsafe impl Send for WorkerState {}
unsafe impl Sync for WorkerState {}

/// Sizes the file and reserves its blocks now. A mapping over a sparse file on a full tmpfs
/// (Docker's /dev/shm is 64 MiB by default) would kill the process with SIGBUS at the first
/// touch of a page that cannot be had; reserving turns that into an error at start.
fn reserve(file: &File, bytes: usize) -> io::Result<()> {
    let len = libc::off_t::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "state file too large"))?;
    // SAFETY: a plain system call on a file descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // A file system without fallocate: size it sparse, as before.
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(bytes as u64),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Milliseconds of the system's monotonic clock: the clock of every time in the mapping, the
/// same in every process (a process-local clock would make a restarted worker's entries expire
/// early and its backlogs never drain in its siblings' eyes).
pub fn clock_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain system call writing into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

fn seconds(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 1000).unwrap_or(u32::MAX)
}

fn process_exists(pid: u64) -> bool {
    // Without /proc we cannot tell, so never take a lock over.
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

impl WorkerState {
    /// Creates (or truncates) the state file at `path` for `layout`; workers then `open` it.
    pub fn create(path: &Path, layout: Layout, ttl_s: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        reserve(&file, layout.bytes())?;
        let state = Self::map(&file, layout, 0)?;
        let header = state.all();
        header[H_WORKERS].store(layout.workers as u64, Ordering::Relaxed);
        header[H_SLOTS].store(layout.slots as u64, Ordering::Relaxed);
        header[H_SETS].store(layout.sets as u64, Ordering::Relaxed);
        header[H_TTL_S].store(ttl_s.min(u64::from(u32::MAX)), Ordering::Relaxed);
        header[H_VERSION].store(VERSION, Ordering::Relaxed);
        header[H_MAGIC].store(MAGIC, Ordering::Release);
        Ok(())
    }

    /// Maps the state as worker `worker` and zeroes that worker's in-flight row (whatever a
    /// previous process with this index left there is not in flight any more).
    pub fn open(path: &Path, worker: usize) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len() as usize;
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        if len < HEADER_WORDS * 8 {
            return Err(bad("too short to be a worker state file"));
        }
        let probe = Self::map(
            &file,
            Layout {
                workers: 0,
                slots: 0,
                sets: 0,
            },
            0,
        )?;
        let header = probe.all();
        if header[H_MAGIC].load(Ordering::Acquire) != MAGIC
            || header[H_VERSION].load(Ordering::Relaxed) != VERSION
        {
            return Err(bad("not an llmlb worker state file (or another version)"));
        }
        let layout = Layout {
            workers: header[H_WORKERS].load(Ordering::Relaxed) as usize,
            slots: header[H_SLOTS].load(Ordering::Relaxed) as usize,
            sets: header[H_SETS].load(Ordering::Relaxed) as usize,
        };
        let ttl_s = header[H_TTL_S].load(Ordering::Relaxed) as u32;
        drop(probe);
        if layout.bytes() != len {
            return Err(bad("size does not match its header"));
        }
        if worker >= layout.workers {
            return Err(bad(&format!(
                "worker {worker} out of range (0..{})",
                layout.workers
            )));
        }
        let mut state = Self::map(&file, layout, worker)?;
        state.ttl_s = ttl_s;
        for slot in 0..layout.slots {
            state.count(worker, slot).store(0, Ordering::Relaxed);
        }
        Ok(state)
    }

    fn map(file: &File, layout: Layout, worker: usize) -> io::Result<Self> {
        let len = file.metadata()?.len() as usize;
        // SAFETY: a shared read-write mapping of the whole file; the kernel returns page-aligned
        // memory, which satisfies AtomicU64's alignment, and `words` never exceeds the file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            map: ptr.cast::<AtomicU64>(),
            words: len / 8,
            layout,
            worker,
            ttl_s: 0,
            pid: u64::from(std::process::id()),
        })
    }

    fn all(&self) -> &[AtomicU64] {
        // SAFETY: `map` points at `words` initialised (file-backed, zero-filled) u64 words that
        // live until `Drop`; AtomicU64 has the layout of u64 and every access is atomic.
        unsafe { std::slice::from_raw_parts(self.map, self.words) }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn worker(&self) -> usize {
        self.worker
    }

    fn count(&self, worker: usize, slot: usize) -> &AtomicU64 {
        &self.all()[self.layout.counts() + worker * self.layout.slots + slot]
    }

    fn lock<'a>(&self, word: &'a AtomicU64) -> Option<LockGuard<'a>> {
        let mut spins = 0u32;
        loop {
            match word.compare_exchange_weak(0, self.pid, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Some(LockGuard(word)),
                Err(owner) => {
                    spins += 1;
                    if spins == STEAL_CHECK_SPINS
                        && owner != 0
                        && !process_exists(owner)
                        && word
                            .compare_exchange(owner, self.pid, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok()
                    {
                        return Some(LockGuard(word));
                    }
                    if spins >= GIVE_UP_SPINS {
                        return None;
                    }
                    if spins > 64 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
    }

    /// The slot of `address`, adding it to the directory if new. `None` when the address is
    /// longer than `MAX_ADDRESS` bytes, the directory is full, or its lock stayed busy.
    pub fn intern(&self, address: &str) -> Option<u32> {
        let bytes = address.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_ADDRESS {
            return None;
        }
        if let Some(slot) = self.find(bytes) {
            return Some(slot);
        }
        let all = self.all();
        let _guard = self.lock(&all[H_DIRECTORY_LOCK])?;
        if let Some(slot) = self.find(bytes) {
            return Some(slot);
        }
        let slot = (0..self.layout.slots).find(|&s| self.entry_len(s) == 0)?;
        let base = DIRECTORY + slot * DIR_WORDS;
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            all[base + 1 + i].store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        all[base].store(bytes.len() as u64, Ordering::Release);
        Some(slot as u32)
    }

    fn entry_len(&self, slot: usize) -> usize {
        self.all()[DIRECTORY + slot * DIR_WORDS].load(Ordering::Acquire) as usize
    }

    /// The address in `slot`, if taken.
    pub fn address(&self, slot: u32) -> Option<String> {
        let slot = slot as usize;
        if slot >= self.layout.slots {
            return None;
        }
        let len = self.entry_len(slot);
        if len == 0 || len > MAX_ADDRESS {
            return None;
        }
        let base = DIRECTORY + slot * DIR_WORDS;
        let mut bytes = Vec::with_capacity(len + 8);
        for i in 0..len.div_ceil(8) {
            bytes.extend_from_slice(
                &self.all()[base + 1 + i]
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        bytes.truncate(len);
        String::from_utf8(bytes).ok()
    }

    fn find(&self, bytes: &[u8]) -> Option<u32> {
        let all = self.all();
        'slots: for slot in 0..self.layout.slots {
            let len = self.entry_len(slot);
            if len == 0 {
                return None; // slots are taken in order: the first free one ends the list
            }
            if len != bytes.len() {
                continue;
            }
            let base = DIRECTORY + slot * DIR_WORDS;
            for (i, chunk) in bytes.chunks(8).enumerate() {
                let word = all[base + 1 + i].load(Ordering::Relaxed).to_le_bytes();
                if word[..chunk.len()] != *chunk {
                    continue 'slots;
                }
            }
            return Some(slot as u32);
        }
        None
    }

    /// Requests in flight to `slot` across every worker.
    pub fn inflight(&self, slot: u32) -> u32 {
        let slot = slot as usize;
        if slot >= self.layout.slots {
            return 0;
        }
        let total: u64 = (0..self.layout.workers)
            .map(|w| self.count(w, slot).load(Ordering::Relaxed))
            .sum();
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// This worker's own requests in flight to `slot`.
    pub fn own_inflight(&self, slot: u32) -> u32 {
        let slot = slot as usize;
        if slot >= self.layout.slots {
            return 0;
        }
        u32::try_from(self.count(self.worker, slot).load(Ordering::Relaxed)).unwrap_or(u32::MAX)
    }

    /// Adds one in-flight request of this worker to `slot`.
    pub fn increment(&self, slot: u32) {
        self.add(slot, 1);
    }

    /// Adds `requests` in-flight requests of this worker to `slot`.
    pub fn add(&self, slot: u32, requests: u64) {
        if (slot as usize) < self.layout.slots {
            self.count(self.worker, slot as usize)
                .fetch_add(requests, Ordering::Relaxed);
        }
    }

    fn backlog_word(&self, slot: u32) -> Option<&AtomicU64> {
        ((slot as usize) < self.layout.slots)
            .then(|| &self.all()[self.layout.backlogs() + slot as usize])
    }

    /// `slot`'s prefill backlog (every worker's picks).
    pub fn backlog(&self, slot: u32) -> Backlog {
        self.backlog_word(slot).map_or(Backlog::default(), |w| {
            backlog::unpack(w.load(Ordering::Relaxed))
        })
    }

    /// Adds `tokens` sent at `sent_ms` to `slot`'s backlog (see `Backlog::add`).
    pub fn add_backlog(&self, slot: u32, tokens: u64, sent_ms: u64, rate: f64) {
        self.update_backlog(slot, |b| b.add(tokens, sent_ms, rate));
    }

    /// Takes an ended request's `tokens` (as of `as_of_ms`) back from `slot`'s backlog (see
    /// `Backlog::take_back`).
    pub fn take_back_backlog(&self, slot: u32, tokens: u64, as_of_ms: u64, now_ms: u64, rate: f64) {
        self.update_backlog(slot, |b| b.take_back(tokens, as_of_ms, now_ms, rate));
    }

    fn update_backlog(&self, slot: u32, update: impl Fn(&mut Backlog)) {
        let Some(word) = self.backlog_word(slot) else {
            return;
        };
        let mut current = word.load(Ordering::Relaxed);
        // Every worker writes this word: retry until no other update came in between.
        loop {
            let mut b = backlog::unpack(current);
            update(&mut b);
            match word.compare_exchange_weak(
                current,
                backlog::pack(b),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// Removes one; never below zero. Only this worker writes its row, so load-then-store is exact.
    pub fn decrement(&self, slot: u32) {
        if (slot as usize) < self.layout.slots {
            let count = self.count(self.worker, slot as usize);
            let value = count.load(Ordering::Relaxed);
            count.store(value.saturating_sub(1), Ordering::Relaxed);
        }
    }

    fn set_of(&self, hash: u64) -> usize {
        self.layout.prefix() + prefix_table::set_of(hash, self.layout.sets) * SET_WORDS
    }

    /// Runs `f` on the ways of `hash`'s set under its lock; `None` if the lock stayed busy.
    fn with_set<R>(&self, hash: u64, f: impl FnOnce(&[AtomicU64]) -> R) -> Option<R> {
        let base = self.set_of(hash);
        let set = &self.all()[base..base + SET_WORDS];
        let _guard = self.lock(&set[0])?;
        Some(f(&set[1..]))
    }

    fn holds(&self, hash: u64, slot: u32, now_s: u32) -> bool {
        self.with_set(hash, |ways| {
            find_way(ways, hash).is_some_and(|way| live_holders(way, now_s).any(|s| s == slot))
        })
        .unwrap_or(false)
    }

    /// For each endpoint slot holding the first block, how many leading blocks it holds (the
    /// same binary search as the embedded table).
    pub fn match_depths(&self, hashes: &[u64], now_ms: u64, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let now_s = seconds(now_ms);
        let Some(&first) = hashes.first() else { return };
        let mut holders = [0u32; HOLDERS];
        let mut count = 0;
        let _ = self.with_set(first, |ways| {
            if let Some(way) = find_way(ways, first) {
                let used = &way[1];
                let meta = used.load(Ordering::Relaxed);
                used.store((meta & !0xffff_ffff) | u64::from(now_s), Ordering::Relaxed);
                for slot in live_holders(way, now_s) {
                    holders[count] = slot;
                    count += 1;
                }
            }
        });
        for &slot in &holders[..count] {
            let (mut lo, mut hi) = (1usize, hashes.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self.holds(hashes[mid - 1], slot, now_s) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            out.push((slot, lo as u32));
        }
    }

    /// Takes back a record of `slot` for these levels (see `PrefixTable::forget`).
    pub fn forget(&self, hashes: &[u64], slot: u32) {
        for &hash in hashes {
            let _ = self.with_set(hash, |ways| {
                if let Some(way) = find_way(ways, hash) {
                    remove_holder(way, slot);
                }
            });
        }
    }

    /// Records that `slot` now holds every level of `hashes`.
    pub fn record(&self, hashes: &[u64], slot: u32, now_ms: u64) -> Recorded {
        let now_s = seconds(now_ms);
        let expires_s = now_s.saturating_add(self.ttl_s);
        let mut recorded = Recorded::default();
        for &hash in hashes {
            if let Some(one) = self.with_set(hash, |ways| touch(ways, hash, slot, now_s, expires_s))
            {
                recorded += one;
            }
        }
        recorded
    }

    fn load_record(&self, slot: u32) -> Option<&[AtomicU64]> {
        let slot = slot as usize;
        (slot < self.layout.slots).then(|| {
            let base = self.layout.loads() + slot * LOAD_WORDS;
            &self.all()[base..base + LOAD_WORDS]
        })
    }

    /// Publishes `slot`'s freshly scraped load to every worker (one writer: the scraping one).
    pub fn publish_load(&self, slot: u32, load: &Load) {
        let Some(record) = self.load_record(slot) else {
            return;
        };
        let mut names = [0u8; LOAD_NAME_BYTES];
        let mut used = 0;
        let tagged = (load.running_lora.iter().map(|n| (0u8, n)))
            .chain(load.waiting_lora.iter().map(|n| (1u8, n)));
        for (tag, name) in tagged {
            let bytes = name.as_bytes();
            if bytes.len() > usize::from(u8::MAX) || used + 2 + bytes.len() > LOAD_NAME_BYTES {
                continue;
            }
            names[used] = tag;
            names[used + 1] = bytes.len() as u8;
            names[used + 2..used + 2 + bytes.len()].copy_from_slice(bytes);
            used += 2 + bytes.len();
        }
        // Odd while written; an odd word left by a writer that died is taken over as it is.
        let odd = record[0].load(Ordering::Relaxed) | 1;
        record[0].store(odd, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        record[1].store(load.waiting.to_bits(), Ordering::Relaxed);
        record[2].store(load.running.to_bits(), Ordering::Relaxed);
        record[3].store(load.kv_cache.to_bits(), Ordering::Relaxed);
        record[4].store(load.at_ms, Ordering::Relaxed);
        record[5].store(u64::from(load.max_lora), Ordering::Relaxed);
        record[6].store(used as u64, Ordering::Relaxed);
        for (i, chunk) in names[..used].chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            record[LOAD_HEAD + i].store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        record[0].store(odd + 1, Ordering::Release);
    }

    /// How many loads were published for `slot` (0: none yet); changes with every publish.
    pub fn load_generation(&self, slot: u32) -> u64 {
        self.load_record(slot)
            .map_or(0, |r| r[0].load(Ordering::Acquire) / 2)
    }

    /// `slot`'s latest published load and its generation; `None` before the first publish (or
    /// while a writer keeps rewriting it).
    pub fn read_load(&self, slot: u32) -> Option<(u64, Load)> {
        let record = self.load_record(slot)?;
        for _ in 0..LOAD_READ_TRIES {
            let before = record[0].load(Ordering::Acquire);
            if before == 0 {
                return None;
            }
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let words: Vec<u64> = record[1..]
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .collect();
            std::sync::atomic::fence(Ordering::Acquire);
            if record[0].load(Ordering::Relaxed) != before {
                continue;
            }
            let mut load = Load {
                waiting: f64::from_bits(words[0]),
                running: f64::from_bits(words[1]),
                kv_cache: f64::from_bits(words[2]),
                at_ms: words[3],
                max_lora: u32::try_from(words[4]).unwrap_or(u32::MAX),
                ..Load::default()
            };
            let used = (words[5] as usize).min(LOAD_NAME_BYTES);
            let bytes: Vec<u8> = words[LOAD_HEAD - 1..]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .take(used)
                .collect();
            let mut at = 0;
            while at + 2 <= bytes.len() {
                let (tag, len) = (bytes[at], usize::from(bytes[at + 1]));
                let Some(name) = bytes.get(at + 2..at + 2 + len) else {
                    break;
                };
                let name = String::from_utf8_lossy(name).into_owned();
                if tag == 0 {
                    load.running_lora.push(name);
                } else {
                    load.waiting_lora.push(name);
                }
                at += 2 + len;
            }
            return Some((before / 2, load));
        }
        None
    }

    /// Ways of the prefix table in use (one pass over the table: for scrapes, not picks).
    pub fn prefix_entries(&self) -> usize {
        let base = self.layout.prefix();
        let words = &self.all()[base..base + self.layout.sets * SET_WORDS];
        words
            .chunks_exact(SET_WORDS)
            .map(|set| {
                (0..WAYS)
                    .filter(|&i| way(&set[1..], i)[0].load(Ordering::Relaxed) != 0)
                    .count()
            })
            .sum()
    }

    /// Entries the prefix table holds at most (whole sets).
    pub fn prefix_capacity(&self) -> usize {
        self.layout.sets * WAYS
    }
}

struct LockGuard<'a>(&'a AtomicU64);

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

impl Drop for WorkerState {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.map.cast(), self.words * 8);
        }
    }
}

fn way(ways: &[AtomicU64], i: usize) -> &[AtomicU64] {
    &ways[i * ENTRY_WORDS..(i + 1) * ENTRY_WORDS]
}

/// Key 0 marks a free way, so a (vanishingly unlikely) zero hash is stored as 1.
fn key_of(hash: u64) -> u64 {
    hash.max(1)
}

fn find_way(ways: &[AtomicU64], hash: u64) -> Option<&[AtomicU64]> {
    let key = key_of(hash);
    (0..WAYS)
        .map(|i| way(ways, i))
        .find(|w| w[0].load(Ordering::Relaxed) == key)
}

fn holder_count(way: &[AtomicU64]) -> usize {
    ((way[1].load(Ordering::Relaxed) >> 32) as usize).min(HOLDERS)
}

fn live_holders(way: &[AtomicU64], now_s: u32) -> impl Iterator<Item = u32> + '_ {
    way[2..2 + holder_count(way)].iter().filter_map(move |h| {
        let value = h.load(Ordering::Relaxed);
        ((value >> 32) as u32 > now_s).then_some(value as u32)
    })
}

fn remove_holder(way: &[AtomicU64], slot: u32) {
    let len = holder_count(way);
    let mut kept = 0;
    for i in 0..len {
        let holder = way[2 + i].load(Ordering::Relaxed);
        if holder as u32 != slot {
            way[2 + kept].store(holder, Ordering::Relaxed);
            kept += 1;
        }
    }
    if kept < len {
        let meta = way[1].load(Ordering::Relaxed);
        way[1].store(
            (meta & 0xffff_ffff) | ((kept as u64) << 32),
            Ordering::Relaxed,
        );
    }
}

/// Moves (or inserts) `slot` to the front of `hash`'s holders, claiming a way if needed: a free
/// one, else the least recently used.
fn touch(ways: &[AtomicU64], hash: u64, slot: u32, now_s: u32, expires_s: u32) -> Recorded {
    let key = key_of(hash);
    let mut recorded = Recorded::default();
    let target = find_way(ways, hash).unwrap_or_else(|| {
        let victim = (0..WAYS)
            .map(|i| way(ways, i))
            .min_by_key(|w| {
                if w[0].load(Ordering::Relaxed) == 0 {
                    0
                } else {
                    1 + (w[1].load(Ordering::Relaxed) & 0xffff_ffff)
                }
            })
            .expect("WAYS > 0");
        recorded.inserted = 1;
        recorded.evicted = u64::from(victim[0].load(Ordering::Relaxed) != 0);
        victim[0].store(key, Ordering::Relaxed);
        victim[1].store(0, Ordering::Relaxed);
        victim
    });
    let len = holder_count(target);
    let mut holders = [0u64; HOLDERS];
    for (i, h) in target[2..2 + len].iter().enumerate() {
        holders[i] = h.load(Ordering::Relaxed);
    }
    let at = holders[..len]
        .iter()
        .position(|&h| h as u32 == slot)
        .unwrap_or(if len < HOLDERS { len } else { HOLDERS - 1 });
    let new_len = len.max(at + 1);
    holders.copy_within(0..at, 1);
    holders[0] = u64::from(slot) | (u64::from(expires_s) << 32);
    for (i, &h) in holders[..new_len].iter().enumerate() {
        target[2 + i].store(h, Ordering::Relaxed);
    }
    target[1].store(
        u64::from(now_s) | ((new_len as u64) << 32),
        Ordering::Relaxed,
    );
    recorded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix_table::spread;

    struct TempFile(std::path::PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp(name: &str) -> TempFile {
        let dir = std::env::temp_dir();
        TempFile(dir.join(format!("llmlb-ws-test-{}-{name}", std::process::id())))
    }

    /// Runs `work` on `workers` threads at once, each as its own worker of the mapping at
    /// `path` (as worker processes do); returns their states.
    fn in_workers(
        path: &Path,
        workers: usize,
        work: impl Fn(&WorkerState) + Clone + Send + 'static,
    ) -> Vec<WorkerState> {
        let threads: Vec<_> = (0..workers)
            .map(|w| {
                let (path, work) = (path.to_path_buf(), work.clone());
                std::thread::spawn(move || {
                    let state = WorkerState::open(&path, w).unwrap();
                    work(&state);
                    state
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    fn create(name: &str, layout: Layout) -> TempFile {
        let file = temp(name);
        WorkerState::create(&file.0, layout, 60).unwrap();
        file
    }

    fn depths(state: &WorkerState, hashes: &[u64], now_ms: u64) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        state.match_depths(hashes, now_ms, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn a_published_load_is_read_by_every_worker_with_its_adapters() {
        let file = create("loads", Layout::new(2, 4, 16));
        let a = WorkerState::open(&file.0, 0).unwrap();
        let b = WorkerState::open(&file.0, 1).unwrap();
        let slot = a.intern("10.0.0.1:8000").unwrap();
        assert_eq!(b.read_load(slot), None, "nothing published yet");
        assert_eq!(b.load_generation(slot), 0);
        let load = Load {
            waiting: 3.0,
            running: 2.5,
            kv_cache: 0.75,
            running_lora: vec!["sql-lora".into(), "chat-lora".into()],
            waiting_lora: vec!["new-lora".into()],
            max_lora: 4,
            at_ms: 12_345,
        };
        a.publish_load(slot, &load);
        assert_eq!(b.read_load(slot), Some((1, load.clone())));
        let next = Load {
            waiting: 0.0,
            ..load
        };
        a.publish_load(slot, &next);
        assert_eq!(b.load_generation(slot), 2);
        assert_eq!(b.read_load(slot).map(|(_, l)| l.waiting), Some(0.0));
        assert_eq!(b.read_load(99), None, "out of range");
    }

    #[test]
    fn adapter_names_past_the_record_are_left_out() {
        let file = create("loads-names", Layout::new(1, 1, 8));
        let a = WorkerState::open(&file.0, 0).unwrap();
        let names: Vec<String> = (0..40).map(|i| format!("adapter-{i:03}")).collect();
        let load = Load {
            running_lora: names.clone(),
            ..Load::default()
        };
        a.publish_load(0, &load);
        let (_, read) = a.read_load(0).unwrap();
        let fit = LOAD_NAME_BYTES / (2 + names[0].len());
        assert_eq!(read.running_lora, names[..fit]);
    }

    #[test]
    fn readers_never_see_a_torn_load() {
        let file = create("loads-torn", Layout::new(2, 1, 8));
        let writer = WorkerState::open(&file.0, 0).unwrap();
        let path = file.0.clone();
        let reader = std::thread::spawn(move || {
            let state = WorkerState::open(&path, 1).unwrap();
            let mut seen = 0;
            for _ in 0..200_000 {
                if let Some((_, l)) = state.read_load(0) {
                    // Every publish writes one value into all three figures.
                    assert_eq!(l.waiting.to_bits(), l.running.to_bits());
                    assert_eq!(l.waiting.to_bits(), l.kv_cache.to_bits());
                    seen += 1;
                }
            }
            seen
        });
        for i in 0..200_000u32 {
            let v = f64::from(i);
            writer.publish_load(
                0,
                &Load {
                    waiting: v,
                    running: v,
                    kv_cache: v,
                    ..Load::default()
                },
            );
        }
        assert!(reader.join().unwrap() > 0);
    }

    #[test]
    fn workers_share_the_directory_and_sum_their_counts() {
        let file = create("counts", Layout::new(2, 8, 64));
        let a = WorkerState::open(&file.0, 0).unwrap();
        let b = WorkerState::open(&file.0, 1).unwrap();
        let s = a.intern("10.0.0.1:8000").unwrap();
        assert_eq!(
            b.intern("10.0.0.1:8000"),
            Some(s),
            "same address, same slot"
        );
        assert_ne!(b.intern("10.0.0.2:8000"), Some(s));
        assert_eq!(a.address(s).as_deref(), Some("10.0.0.1:8000"));
        a.increment(s);
        a.increment(s);
        b.increment(s);
        assert_eq!((a.inflight(s), b.inflight(s)), (3, 3));
        assert_eq!((a.own_inflight(s), b.own_inflight(s)), (2, 1));
        b.decrement(s);
        b.decrement(s); // never below zero, and never into another worker's share
        assert_eq!(a.inflight(s), 2);
    }

    #[test]
    #[allow(clippy::float_cmp)] // whole tokens, exact in f64
    fn workers_add_to_one_backlog() {
        let file = create("backlog", Layout::new(2, 8, 64));
        let a = WorkerState::open(&file.0, 0).unwrap();
        let b = WorkerState::open(&file.0, 1).unwrap();
        let s = a.intern("e:1").unwrap();
        a.add_backlog(s, 1000, 5_000, 1000.0);
        b.add_backlog(s, 500, 5_500, 1000.0);
        assert_eq!(
            a.backlog(s).at(5_500, 1000.0),
            1000.0,
            "500 drained, 500 added"
        );
        assert_eq!(b.backlog(s).at(7_000, 1000.0), 0.0);
        b.add_backlog(s, 4000, 8_000, 1000.0);
        a.take_back_backlog(s, 4000, 8_000, 9_000, 1000.0);
        assert_eq!(
            b.backlog(s).at(9_000, 1000.0),
            0.0,
            "a sibling's ended request"
        );
        assert_eq!(a.backlog(99), Backlog::default(), "no such slot");
        // Concurrent adds are never lost (one word, compare-and-swap).
        let s = a.intern("e:2").unwrap();
        in_workers(&file.0, 2, move |state| {
            for _ in 0..10_000 {
                state.add_backlog(s, 3, 100_000, 0.0);
            }
        });
        assert_eq!(a.backlog(s).tokens, 60_000.0);
    }

    #[test]
    fn a_restarted_worker_drops_its_predecessors_counts() {
        let file = create("restart", Layout::new(2, 8, 64));
        let a = WorkerState::open(&file.0, 0).unwrap();
        let b = WorkerState::open(&file.0, 1).unwrap();
        let s = a.intern("e:1").unwrap();
        a.increment(s);
        b.increment(s);
        drop(b); // worker 1 dies with one request in flight...
        let b2 = WorkerState::open(&file.0, 1).unwrap(); // ...and its replacement starts clean
        assert_eq!(b2.inflight(s), 1);
        assert_eq!(b2.own_inflight(s), 0);
    }

    #[test]
    fn directory_limits() {
        let file = create("dir", Layout::new(1, 2, 64));
        let a = WorkerState::open(&file.0, 0).unwrap();
        assert!(a.intern("a:1").is_some());
        assert!(a.intern("b:1").is_some());
        assert_eq!(a.intern("c:1"), None, "full");
        assert_eq!(a.intern(&"x".repeat(MAX_ADDRESS + 1)), None, "too long");
        assert_eq!(a.intern(""), None);
        let long = "y".repeat(MAX_ADDRESS);
        let file2 = create("dir2", Layout::new(1, 2, 64));
        let b = WorkerState::open(&file2.0, 0).unwrap();
        let slot = b.intern(&long).unwrap();
        assert_eq!(b.address(slot).as_deref(), Some(long.as_str()));
    }

    #[test]
    fn open_rejects_foreign_files_and_bad_indexes() {
        let file = temp("foreign");
        std::fs::write(&file.0, vec![7u8; 4096]).unwrap();
        assert!(WorkerState::open(&file.0, 0).is_err());
        let good = create("index", Layout::new(2, 4, 8));
        assert!(WorkerState::open(&good.0, 2).is_err());
        assert!(WorkerState::open(Path::new("/nonexistent/llmlb"), 0).is_err());
    }

    #[test]
    fn prefix_depths_are_shared_between_workers() {
        let file = create("prefix", Layout::new(2, 8, 1024));
        let a = WorkerState::open(&file.0, 0).unwrap();
        let b = WorkerState::open(&file.0, 1).unwrap();
        a.record(&[11, 12, 13], 3, 0);
        b.record(&[11, 12, 13, 14, 15], 5, 0);
        assert_eq!(
            depths(&b, &[11, 12, 13, 14, 15, 16], 1000),
            vec![(3, 3), (5, 5)]
        );
        assert_eq!(depths(&a, &[99, 12], 1000), vec![]);
        assert_eq!(depths(&a, &[], 1000), vec![]);
    }

    #[test]
    fn prefix_stats_count_the_shared_table() {
        // One set of WAYS ways: the ninth distinct level evicts one.
        let file = create("stats", Layout::new(2, 8, WAYS));
        let a = WorkerState::open(&file.0, 0).unwrap();
        let b = WorkerState::open(&file.0, 1).unwrap();
        assert_eq!(a.prefix_capacity(), WAYS);
        let hashes: Vec<u64> = (1..=WAYS as u64).collect();
        assert_eq!(
            a.record(&hashes, 1, 0),
            Recorded {
                inserted: WAYS as u64,
                evicted: 0
            }
        );
        // The other worker sees the same entries; levels already there are not inserted again.
        assert_eq!(b.prefix_entries(), WAYS);
        assert_eq!(b.record(&hashes[..2], 2, 0), Recorded::default());
        assert_eq!(
            b.record(&[100], 2, 0),
            Recorded {
                inserted: 1,
                evicted: 1
            }
        );
        assert_eq!(a.prefix_entries(), WAYS);
    }

    #[test]
    fn prefix_entries_expire_and_keep_four_holders() {
        let file = create("expire", Layout::new(1, 8, 1024));
        let a = WorkerState::open(&file.0, 0).unwrap(); // ttl 60 s
        a.record(&[1, 2], 7, 0);
        assert_eq!(depths(&a, &[1, 2], 59_999), vec![(7, 2)]);
        assert_eq!(depths(&a, &[1, 2], 60_000), vec![]);
        for slot in 0..6 {
            a.record(&[9], slot, 0);
        }
        assert_eq!(depths(&a, &[9], 0), vec![(2, 1), (3, 1), (4, 1), (5, 1)]);
    }

    #[test]
    fn a_full_set_replaces_its_least_recently_used_way() {
        let file = create("lru", Layout::new(1, 8, WAYS)); // one set
        let a = WorkerState::open(&file.0, 0).unwrap();
        for key in 1..=WAYS as u64 {
            a.record(&[key], 1, key * 1000);
        }
        // Key 1 is used again, so key 2 is now the oldest and goes first.
        assert_eq!(depths(&a, &[1], 20_000), vec![(1, 1)]);
        a.record(&[100], 1, 21_000);
        assert_eq!(depths(&a, &[2], 21_000), vec![]);
        assert_eq!(depths(&a, &[1], 21_000), vec![(1, 1)]);
        assert_eq!(depths(&a, &[100], 21_000), vec![(1, 1)]);
    }

    #[test]
    fn a_lock_left_by_a_dead_process_is_taken_over() {
        let file = create("steal", Layout::new(1, 8, 64));
        let a = WorkerState::open(&file.0, 0).unwrap();
        // PIDs are below 2^22 on Linux: this owner cannot exist.
        a.all()[H_DIRECTORY_LOCK].store(u64::from(u32::MAX) + 7, Ordering::Relaxed);
        assert!(a.intern("e:1").is_some());
        assert_eq!(a.all()[H_DIRECTORY_LOCK].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_lock_held_by_a_live_process_is_given_up_on() {
        let file = create("busy", Layout::new(1, 8, 64));
        let a = WorkerState::open(&file.0, 0).unwrap();
        a.all()[H_DIRECTORY_LOCK].store(1, Ordering::Relaxed); // PID 1 always exists
        assert_eq!(a.intern("e:1"), None);
        a.all()[H_DIRECTORY_LOCK].store(0, Ordering::Relaxed);
        assert!(a.intern("e:1").is_some());
    }

    #[test]
    fn concurrent_workers_keep_exact_counts() {
        let file = create("threads", Layout::new(4, 8, 1024));
        let states = in_workers(&file.0, 4, |state| {
            let slot = state.intern("shared:1").unwrap();
            for i in 0..10_000u64 {
                state.increment(slot);
                state.record(&[spread(i % 97), spread(1000 + i % 13)], slot, 0);
                if i % 2 == 0 {
                    state.decrement(slot);
                }
            }
        });
        let slot = states[0].intern("shared:1").unwrap();
        assert_eq!(states[0].inflight(slot), 4 * 5_000);
        assert!(!depths(&states[0], &[spread(5)], 0).is_empty());
    }
}
