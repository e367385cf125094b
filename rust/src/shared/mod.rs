//! Shared state in Redis: key names, script calls, the pool's stream of prefix records, and the
//! shared-pick protocol (`picks`).
//!
//! The daemon does the I/O; this module decides what goes over the wire and what a reply means,
//! so the protocol has one definition and is unit-tested here. The scripts (`scripts`) hold no
//! policy: the engine in `balancer` decides every pick, for every backend.

pub mod picks;
pub mod scripts;

use crate::balancer::TakenBack;

/// Prefix levels a stream record carries: 256 levels of 512 bytes identify 128 KiB of prompt.
pub const MAX_SHARED_LEVELS: usize = 256;

/// The stream of prefix records is trimmed to about this many (a replica that starts reads the
/// recent ones to warm its prefix table; live replicas follow it as it grows).
pub const STREAM_MAXLEN: usize = 20_000;

/// Key names for one pool and one replica. The pool is the Redis Cluster hash tag, so every
/// key of a pool lives on one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    pub inflight: String,
    pub leases: String,
    pub picks: String,
    pub replica: ReplicaKeys,
}

/// One replica's own hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaKeys {
    pub counts: String,
    pub requests: String,
}

impl Keys {
    /// The key naming which endpoint holds a stored response (Responses API), in the pool's slot.
    pub fn response(&self, response_id: &str) -> String {
        format!("{}response:{response_id}", self.prefix)
    }

    pub fn new(pool: &str, replica: &str) -> Self {
        let prefix = format!("llmlb:{{{pool}}}:");
        let mut keys = Self {
            inflight: format!("{prefix}inflight"),
            leases: format!("{prefix}leases"),
            picks: format!("{prefix}picks"),
            replica: ReplicaKeys {
                counts: String::new(),
                requests: String::new(),
            },
            prefix,
        };
        keys.replica = keys.of_replica(replica);
        keys
    }

    /// The hashes of any replica (for reaping another one).
    pub fn of_replica(&self, replica: &str) -> ReplicaKeys {
        ReplicaKeys {
            counts: format!("{}rc:{replica}", self.prefix),
            requests: format!("{}rq:{replica}", self.prefix),
        }
    }

    /// `KEYS` 1-3 of the commit and release scripts.
    fn release_keys(&self) -> Vec<String> {
        vec![
            self.inflight.clone(),
            self.replica.counts.clone(),
            self.replica.requests.clone(),
        ]
    }
}

/// This replica's timings (see `lease_timings` in the daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub replica: String,
    pub lease_ms: u64,
    pub keep_ms: u64,
}

/// One script call: its name in `scripts::ALL`, `KEYS` and `ARGV`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub script: &'static str,
    pub keys: Vec<String>,
    pub args: Vec<Vec<u8>>,
}

impl Call {
    /// The call as a RESP `EVALSHA`, ready to write to a connection.
    pub fn resp(&self, sha: &str) -> Vec<u8> {
        let numkeys = self.keys.len().to_string();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(3 + self.keys.len() + self.args.len());
        parts.extend([b"EVALSHA".as_slice(), sha.as_bytes(), numkeys.as_bytes()]);
        parts.extend(self.keys.iter().map(String::as_bytes));
        parts.extend(self.args.iter().map(Vec::as_slice));
        resp_command(&parts)
    }
}

fn arg(value: &impl ToString) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// A finished request of this replica, for a release call: its request id, and the prompt
/// tokens the backlog still held of it (`Balancer::release`), which the other replicas take back.
pub type Release = (String, u64);

fn release_args(releases: &[Release]) -> impl Iterator<Item = Vec<u8>> + '_ {
    releases
        .iter()
        .flat_map(|(id, tokens)| [id.as_bytes().to_vec(), arg(tokens)])
}

/// Releases of this replica's finished requests (see `scripts::RELEASE`).
pub fn release_call(keys: &Keys, settings: &Settings, releases: &[Release]) -> Call {
    let mut k = keys.release_keys();
    k.push(keys.picks.clone());
    let mut args = vec![
        arg(&settings.replica),
        arg(&STREAM_MAXLEN),
        arg(&settings.keep_ms),
    ];
    args.extend(release_args(releases));
    Call {
        script: "release",
        keys: k,
        args,
    }
}

/// This replica's heartbeat (see `scripts::HEARTBEAT`); lists up to `max_listed` lapsed ones.
pub fn heartbeat_call(keys: &Keys, settings: &Settings, max_listed: u32) -> Call {
    Call {
        script: "heartbeat",
        keys: vec![
            keys.leases.clone(),
            keys.replica.counts.clone(),
            keys.replica.requests.clone(),
            keys.inflight.clone(),
            keys.picks.clone(),
        ],
        args: vec![
            arg(&settings.replica),
            arg(&settings.lease_ms),
            arg(&settings.keep_ms),
            arg(&max_listed),
        ],
    }
}

/// Reaping a lapsed replica (see `scripts::REAP`).
pub fn reap_call(keys: &Keys, other: &str) -> Call {
    let theirs = keys.of_replica(other);
    Call {
        script: "reap",
        keys: vec![
            keys.leases.clone(),
            keys.inflight.clone(),
            theirs.counts,
            theirs.requests,
            keys.picks.clone(),
        ],
        args: vec![arg(&other), arg(&STREAM_MAXLEN)],
    }
}

/// What a commit carries besides the candidates (see `scripts::COMMIT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit<'a> {
    pub request_id: &'a str,
    pub endpoint: &'a str,
    /// The most requests the endpoint may already have; `None`: commit whatever it has.
    pub guard: Option<u32>,
    /// The prompt tokens the request adds to the endpoint's prefill backlog.
    pub tokens: u64,
    /// The prompt's prefix keys, for the other replicas (empty: none).
    pub levels: &'a [u64],
}

/// A commit of a pick the engine decided, with releases riding on it.
pub fn commit_call<S: AsRef<str>>(
    keys: &Keys,
    settings: &Settings,
    commit: &Commit<'_>,
    candidates: &[S],
    releases: &[Release],
) -> Call {
    let mut k = keys.release_keys();
    k.extend([keys.leases.clone(), keys.picks.clone()]);
    let mut a = Vec::with_capacity(12 + candidates.len() + 2 * releases.len());
    a.extend([
        arg(&settings.replica),
        arg(&commit.request_id),
        arg(&settings.lease_ms),
        arg(&settings.keep_ms),
        arg(&commit.endpoint),
        commit.guard.map(|g| arg(&g)).unwrap_or_default(),
        arg(&commit.tokens),
        levels_blob(commit.levels),
        arg(&STREAM_MAXLEN),
        arg(&candidates.len()),
    ]);
    a.extend(candidates.iter().map(|c| c.as_ref().as_bytes().to_vec()));
    a.push(arg(&releases.len()));
    a.extend(release_args(releases));
    Call {
        script: "commit",
        keys: k,
        args: a,
    }
}

/// The stream record that takes back what a failed request claimed: its prefix levels and the
/// backlog tokens still held of it (a plain `XADD`).
pub fn forget_command(keys: &Keys, replica: &str, taken: &TakenBack) -> Vec<u8> {
    let blob = levels_blob(&taken.levels);
    let maxlen = STREAM_MAXLEN.to_string();
    let tokens = taken.tokens.to_string();
    resp_command(&[
        b"XADD".as_slice(),
        keys.picks.as_bytes(),
        b"MAXLEN",
        b"~",
        maxlen.as_bytes(),
        b"*",
        b"r",
        replica.as_bytes(),
        b"e",
        taken.endpoint.as_bytes(),
        b"t",
        tokens.as_bytes(),
        b"l",
        &blob,
        b"f",
        b"1",
    ])
}

/// Prefix keys as 8 bytes each, little-endian, at most `MAX_SHARED_LEVELS` of them.
pub fn levels_blob(levels: &[u64]) -> Vec<u8> {
    levels[..levels.len().min(MAX_SHARED_LEVELS)]
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect()
}

/// The keys of a `levels_blob`; `None` if the blob is not whole keys.
pub fn parse_levels(blob: &[u8]) -> Option<Vec<u64>> {
    if !blob.len().is_multiple_of(8) || blob.len() / 8 > MAX_SHARED_LEVELS {
        return None;
    }
    Some(
        blob.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

/// A stream entry id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId {
    /// When Redis recorded it (Unix ms, Redis clock).
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// One record of the pool's stream, by its fields (see `scripts`): what another replica changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record<'a> {
    /// The replica that made the change.
    pub replica: &'a str,
    /// A commit (with the tokens it adds to the endpoint's backlog), or a take-back (`failed`):
    /// the endpoint.
    pub endpoint: Option<&'a str>,
    pub tokens: Option<u64>,
    /// The prompt's prefix keys (`levels_blob`).
    pub levels: Option<&'a [u8]>,
    pub failed: bool,
    /// Released or reaped requests: `endpoint TAB requests [TAB tokens]` lines.
    pub removed: Option<&'a str>,
}

impl Record<'_> {
    /// `(endpoint, requests, tokens)` removed by a release or reap record (`tokens`: what the
    /// backlog still held of a released request, 0 when the line has none).
    pub fn removals(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.removed.unwrap_or("").lines().filter_map(|line| {
            let mut fields = line.split('\t');
            let endpoint = fields.next()?;
            let requests = fields.next()?.parse().ok()?;
            let tokens = match fields.next() {
                Some(t) => t.parse().ok()?,
                None => 0,
            };
            Some((endpoint, requests, tokens))
        })
    }
}

/// A Redis command in RESP (array of bulk strings), ready to write to a connection.
pub fn resp_command<S: AsRef<[u8]>>(parts: &[S]) -> Vec<u8> {
    let size: usize = parts.iter().map(|p| p.as_ref().len() + 16).sum();
    let mut out = Vec::with_capacity(size + 16);
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for part in parts {
        let part = part.as_ref();
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// CRC16 (XMODEM) of the hash tag, modulo 16384: the Redis Cluster slot of a key.
pub fn cluster_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(bytes) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            replica: "r1".into(),
            lease_ms: 10_000,
            keep_ms: 150_000,
        }
    }

    #[test]
    fn slot_matches_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(cluster_slot("123456789"), 0x31C3); // the CRC16 check value
        assert_eq!(cluster_slot("foo"), 12182);
        assert_eq!(
            cluster_slot("{user1000}.following"),
            cluster_slot("{user1000}.followers")
        );
        assert_eq!(cluster_slot("foo{}{bar}"), cluster_slot("foo{}{bar}"));
        assert_ne!(cluster_slot("foo{}{bar}"), cluster_slot("bar"));
    }

    #[test]
    fn every_key_is_on_one_slot_and_prefixed() {
        let keys = Keys::new("pool-a", "replica-1");
        let commit = Commit {
            request_id: "7",
            endpoint: "10.0.0.1:80",
            guard: Some(3),
            tokens: 100,
            levels: &[1, 2],
        };
        let calls = [
            commit_call(&keys, &settings(), &commit, &["10.0.0.1:80"], &[]),
            release_call(&keys, &settings(), &[("1".into(), 0)]),
            heartbeat_call(&keys, &settings(), 16),
            reap_call(&keys, "other"),
        ];
        let slot = cluster_slot(&keys.inflight);
        for call in &calls {
            for key in &call.keys {
                assert!(key.starts_with("llmlb:{pool-a}:"), "{key}");
                assert_eq!(cluster_slot(key), slot, "{key}");
            }
            assert!(scripts::ALL.iter().any(|(name, _)| *name == call.script));
        }
    }

    #[test]
    fn commit_call_encoding() {
        let keys = Keys::new("p", "r1");
        let commit = Commit {
            request_id: "42",
            endpoint: "a:1",
            guard: Some(4),
            tokens: 300,
            levels: &[0x0102],
        };
        let call = commit_call(
            &keys,
            &settings(),
            &commit,
            &["a:1", "b:2"],
            &[("5".into(), 700)],
        );
        assert_eq!(
            call.keys,
            [
                "llmlb:{p}:inflight",
                "llmlb:{p}:rc:r1",
                "llmlb:{p}:rq:r1",
                "llmlb:{p}:leases",
                "llmlb:{p}:picks"
            ]
        );
        let args: Vec<&[u8]> = call.args.iter().map(Vec::as_slice).collect();
        assert_eq!(
            args,
            [
                &b"r1"[..],
                b"42",
                b"10000",
                b"150000",
                b"a:1",
                b"4",
                b"300",
                &[2, 1, 0, 0, 0, 0, 0, 0],
                b"20000",
                b"2",
                b"a:1",
                b"b:2",
                b"1",
                b"5",
                b"700"
            ]
        );
        let unguarded = Commit {
            guard: None,
            ..commit
        };
        let call = commit_call(&keys, &settings(), &unguarded, &["a:1"], &[]);
        assert!(call.args[5].is_empty(), "no guard: an empty argument");
    }

    #[test]
    fn levels_round_trip_and_are_bounded() {
        let many: Vec<u64> = (0..1000).collect();
        let blob = levels_blob(&many);
        assert_eq!(blob.len(), 8 * MAX_SHARED_LEVELS);
        assert_eq!(parse_levels(&blob).unwrap(), many[..MAX_SHARED_LEVELS]);
        assert_eq!(parse_levels(b"1234567"), None);
        assert_eq!(parse_levels(&[]), Some(vec![]));
        let id = StreamId::parse("1733300000123-4").unwrap();
        assert_eq!((id.ms, id.seq), (1_733_300_000_123, 4));
        assert!(StreamId::parse("1733300000123-5").unwrap() > id);
        assert!(StreamId::parse("1733300000124-0").unwrap() > id);
        assert_eq!(StreamId::parse("junk"), None);
        let record = Record {
            replica: "r",
            removed: Some("a:1\t1\nb:2\t3\t900\nbroken\nc:3\tx\nd:4\t1\tx"),
            ..Record::default()
        };
        assert_eq!(
            record.removals().collect::<Vec<_>>(),
            [("a:1", 1, 0), ("b:2", 3, 900)]
        );
    }

    #[test]
    fn resp_encoding() {
        assert_eq!(resp_command(&["PING"]), b"*1\r\n$4\r\nPING\r\n");
        let call = Call {
            script: "release",
            keys: vec!["k".into()],
            args: vec![vec![], "é".as_bytes().to_vec()],
        };
        assert_eq!(
            call.resp("abc"),
            "*6\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$1\r\nk\r\n$0\r\n\r\n$2\r\né\r\n"
                .as_bytes()
        );
        let taken = TakenBack {
            endpoint: "a:1".into(),
            levels: Box::new([1]),
            tokens: 300,
        };
        let forget = forget_command(&Keys::new("p", "r"), "r", &taken);
        assert!(forget.starts_with(b"*16\r\n$4\r\nXADD\r\n$15\r\nllmlb:{p}:picks\r\n"));
        assert!(forget.ends_with(b"$1\r\nt\r\n$3\r\n300\r\n$1\r\nl\r\n$8\r\n\x01\0\0\0\0\0\0\0\r\n$1\r\nf\r\n$1\r\n1\r\n"));
    }

    #[test]
    fn scripts_declare_their_keys() {
        for (name, text) in scripts::ALL {
            // Keys are only ever reached through KEYS[...] (never built from strings inside).
            assert!(!text.contains("llmlb:"), "{name} builds a key name");
            assert!(text.contains("KEYS["), "{name}");
        }
    }
}
