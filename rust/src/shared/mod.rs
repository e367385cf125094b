//! Shared state in Redis: key names, script texts and the encoding of script calls.
//!
//! The daemon does the I/O; this module decides what goes over the wire, so the encoding has
//! one definition and is unit-tested here.

pub mod scripts;

use xxhash_rust::xxh3::xxh3_64;

/// Prefix levels sent to Redis per request. Deeper levels add keys to write on every pick
/// without changing the decision: 256 levels of 512 bytes already identify 128 KiB of prompt.
pub const MAX_SHARED_LEVELS: usize = 256;

/// `KEYS` of the pick script before its prefix levels (see `scripts::PICK`).
pub const PICK_FIXED_KEYS: usize = 4;

/// Key names for one pool and one replica. The pool is the Redis Cluster hash tag, so every
/// key of a pool lives on one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    pub inflight: String,
    pub leases: String,
    pub replica_counts: String,
    pub replica_requests: String,
}

impl Keys {
    pub fn new(pool: &str, replica: &str) -> Self {
        let prefix = format!("llmlb:{{{pool}}}:");
        Self {
            inflight: format!("{prefix}inflight"),
            leases: format!("{prefix}leases"),
            replica_counts: format!("{prefix}rc:{replica}"),
            replica_requests: format!("{prefix}rq:{replica}"),
            prefix,
        }
    }

    /// The counts hash of another replica (for reaping it).
    pub fn counts_of(&self, replica: &str) -> String {
        format!("{}rc:{replica}", self.prefix)
    }

    pub fn requests_of(&self, replica: &str) -> String {
        format!("{}rq:{replica}", self.prefix)
    }

    /// The key of one prefix level, namespaced by model (a short tag of the model name; the
    /// hash itself is already seeded with the model).
    pub fn prefix_level(&self, model_tag: u32, hash: u64) -> String {
        format!("{}p:{model_tag:08x}:{hash:016x}", self.prefix)
    }
}

pub fn model_tag(model: &str) -> u32 {
    xxh3_64(model.as_bytes()) as u32
}

/// Everything a pick script call needs besides the candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct PickSettings {
    pub replica: String,
    pub lease_ms: u64,
    pub keep_ms: u64,
    pub max_request_count: u32,
    pub prefix_ttl_ms: u64,
    pub load_factor: f64,
    pub load_floor: u32,
}

/// `(KEYS, ARGV)` for `scripts::PICK`; `releases` are request ids the same call releases first.
#[allow(clippy::too_many_arguments)] // one flat encoding of the script's documented arguments
pub fn pick_call(
    keys: &Keys,
    settings: &PickSettings,
    request_id: &str,
    seed: u32,
    candidates: &[&str],
    model: &str,
    prefix_hashes: &[u64],
    releases: &[String],
) -> (Vec<String>, Vec<String>) {
    let levels = &prefix_hashes[..prefix_hashes.len().min(MAX_SHARED_LEVELS)];
    let tag = model_tag(model);
    let mut k = Vec::with_capacity(PICK_FIXED_KEYS + levels.len());
    let fixed: [String; PICK_FIXED_KEYS] = [
        keys.inflight.clone(),
        keys.replica_counts.clone(),
        keys.replica_requests.clone(),
        keys.leases.clone(),
    ];
    k.extend(fixed);
    k.extend(levels.iter().map(|&h| keys.prefix_level(tag, h)));
    let mut a = Vec::with_capacity(10 + candidates.len());
    a.extend([
        settings.replica.clone(),
        request_id.to_owned(),
        seed.to_string(),
        settings.lease_ms.to_string(),
        settings.keep_ms.to_string(),
        settings.max_request_count.to_string(),
        settings.prefix_ttl_ms.to_string(),
        format!("{}", settings.load_factor),
        settings.load_floor.to_string(),
        candidates.len().to_string(),
    ]);
    a.extend(candidates.iter().map(|&c| c.to_owned()));
    a.push(releases.len().to_string());
    a.extend(releases.iter().cloned());
    (k, a)
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

/// `EVALSHA sha numkeys keys... args...` in RESP.
pub fn resp_evalsha(sha: &str, keys: &[String], args: &[String]) -> Vec<u8> {
    let numkeys = keys.len().to_string();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    parts.extend([b"EVALSHA".as_slice(), sha.as_bytes(), numkeys.as_bytes()]);
    parts.extend(keys.iter().map(String::as_bytes));
    parts.extend(args.iter().map(String::as_bytes));
    resp_command(&parts)
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

    fn settings() -> PickSettings {
        PickSettings {
            replica: "r1".into(),
            lease_ms: 10_000,
            keep_ms: 150_000,
            max_request_count: 0,
            prefix_ttl_ms: 1_800_000,
            load_factor: 1.25,
            load_floor: 2,
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
    fn every_key_of_a_pick_is_on_one_slot_and_prefixed() {
        let keys = Keys::new("pool-a", "replica-1");
        let (k, _) = pick_call(
            &keys,
            &settings(),
            "7",
            1,
            &["10.0.0.1:80"],
            "m",
            &[1, 2, 3],
            &[],
        );
        let slot = cluster_slot(&k[0]);
        assert_eq!(k.len(), 7);
        for key in k
            .iter()
            .chain([&keys.counts_of("x"), &keys.requests_of("x")])
        {
            assert!(key.starts_with("llmlb:{pool-a}:"), "{key}");
            assert_eq!(cluster_slot(key), slot, "{key}");
        }
    }

    #[test]
    fn pick_call_encoding() {
        let keys = Keys::new("p", "r1");
        let (k, a) = pick_call(
            &keys,
            &settings(),
            "42",
            9,
            &["a:1", "b:2"],
            "model-x",
            &[0xabc],
            &["5".to_owned(), "6".to_owned()],
        );
        assert_eq!(
            &k[..4],
            [
                "llmlb:{p}:inflight",
                "llmlb:{p}:rc:r1",
                "llmlb:{p}:rq:r1",
                "llmlb:{p}:leases"
            ]
        );
        assert_eq!(
            k[4],
            format!(
                "llmlb:{{p}}:p:{:08x}:0000000000000abc",
                model_tag("model-x")
            )
        );
        assert_eq!(
            a,
            [
                "r1", "42", "9", "10000", "150000", "0", "1800000", "1.25", "2", "2", "a:1", "b:2",
                "2", "5", "6"
            ]
        );
    }

    #[test]
    fn models_and_levels_are_bounded_and_namespaced() {
        let keys = Keys::new("p", "r");
        let many: Vec<u64> = (0..1000).collect();
        let (k, _) = pick_call(&keys, &settings(), "1", 0, &["a:1"], "m", &many, &[]);
        assert_eq!(k.len(), 4 + MAX_SHARED_LEVELS);
        assert_ne!(
            keys.prefix_level(model_tag("a"), 1),
            keys.prefix_level(model_tag("b"), 1)
        );
    }

    #[test]
    fn resp_encoding() {
        assert_eq!(resp_command(&["PING"]), b"*1\r\n$4\r\nPING\r\n");
        let cmd = resp_evalsha("abc", &["k".into()], &[String::new(), "é".into()]);
        assert_eq!(
            cmd,
            "*6\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$1\r\nk\r\n$0\r\n\r\n$2\r\né\r\n"
                .as_bytes()
        );
    }

    #[test]
    fn scripts_declare_their_keys() {
        for (name, text) in scripts::ALL {
            // Keys are only ever reached through KEYS[...] (never built from strings inside).
            assert!(!text.contains("llmlb:"), "{name} builds a key name");
            assert!(
                text.contains("KEYS[") || text.contains("ipairs(KEYS)"),
                "{name}"
            );
        }
    }
}
