//! Explicit affinity keys: what a client sends to say "these requests belong together".
//!
//! A request may name its session in several ways: OpenAI's `prompt_cache_key` (made for exactly
//! this), a Responses API `conversation`, a session header set by the gateway or the client,
//! `safety_identifier`, or `user`. The first one present in the configured order becomes the
//! request's key (the default order is `AffinityKey::DEFAULT_ORDER`); requests with the same key
//! prefer the endpoints that served it, bounded by load like prefix affinity (see
//! `scheduling::filters::AffinityKeyFilter`).
//!
//! A key is stored as one entry of the prefix table (hash -> holders), so every state backend
//! (embedded, `--workers`, Redis) keeps and shares it with no extra machinery. Its hash lives in
//! its own domain: each source has its own seed, so `user = "a"` and `prompt_cache_key = "a"` are
//! different keys, and no key can equal a prefix level (whose chain starts from another seed).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Where a key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AffinityKey {
    PromptCacheKey,
    Conversation,
    /// The configured session header.
    Session,
    SafetyIdentifier,
    User,
}

impl AffinityKey {
    pub const ALL: [AffinityKey; 5] = [
        AffinityKey::PromptCacheKey,
        AffinityKey::Conversation,
        AffinityKey::Session,
        AffinityKey::SafetyIdentifier,
        AffinityKey::User,
    ];

    /// Most specific first: a key made for caching, then a conversation, then a session, then
    /// the end user (whose requests may belong to many conversations).
    pub const DEFAULT_ORDER: [AffinityKey; 5] = Self::ALL;

    pub fn name(self) -> &'static str {
        match self {
            AffinityKey::PromptCacheKey => "prompt_cache_key",
            AffinityKey::Conversation => "conversation",
            AffinityKey::Session => "session_header",
            AffinityKey::SafetyIdentifier => "safety_identifier",
            AffinityKey::User => "user",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn seed(self) -> u64 {
        // Distinct per source, and distinct from the prefix chain's seeds.
        const BASE: u64 = 0x6c6c_6d6c_622f_6b00; // "llmlb/k\0"
        BASE + self as u64 + 1
    }

    /// The key's hash: a prefix-table entry of its own domain.
    pub fn hash(self, value: &str) -> u64 {
        xxh3_64_with_seed(value.as_bytes(), self.seed())
    }
}

/// The values a request carries, by source (empty strings count as absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeySources<'a> {
    pub prompt_cache_key: Option<&'a str>,
    pub conversation: Option<&'a str>,
    pub session: Option<&'a str>,
    pub safety_identifier: Option<&'a str>,
    pub user: Option<&'a str>,
}

impl<'a> KeySources<'a> {
    fn get(&self, key: AffinityKey) -> Option<&'a str> {
        match key {
            AffinityKey::PromptCacheKey => self.prompt_cache_key,
            AffinityKey::Conversation => self.conversation,
            AffinityKey::Session => self.session,
            AffinityKey::SafetyIdentifier => self.safety_identifier,
            AffinityKey::User => self.user,
        }
        .filter(|v| !v.is_empty())
    }

    /// The request's key: the first source in `order` that is present, and its hash.
    pub fn choose(&self, order: &[AffinityKey]) -> Option<(AffinityKey, u64)> {
        order
            .iter()
            .find_map(|&key| self.get(key).map(|value| (key, key.hash(value))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_present_source_in_order_wins() {
        let sources = KeySources {
            prompt_cache_key: None,
            conversation: Some("conv_1"),
            session: Some("s"),
            safety_identifier: None,
            user: Some("alice"),
        };
        let (key, hash) = sources.choose(&AffinityKey::DEFAULT_ORDER).unwrap();
        assert_eq!(key, AffinityKey::Conversation);
        assert_eq!(hash, AffinityKey::Conversation.hash("conv_1"));
        let user_first = [AffinityKey::User, AffinityKey::Session];
        assert_eq!(sources.choose(&user_first).unwrap().0, AffinityKey::User);
        // A source left out of the order is never used.
        assert!(sources.choose(&[AffinityKey::PromptCacheKey]).is_none());
        assert!(KeySources::default()
            .choose(&AffinityKey::DEFAULT_ORDER)
            .is_none());
    }

    #[test]
    fn empty_values_are_absent_and_sources_do_not_collide() {
        let sources = KeySources {
            prompt_cache_key: Some(""),
            user: Some("a"),
            ..KeySources::default()
        };
        assert_eq!(
            sources.choose(&AffinityKey::DEFAULT_ORDER).unwrap().0,
            AffinityKey::User
        );
        let hashes: std::collections::HashSet<u64> =
            AffinityKey::ALL.iter().map(|k| k.hash("a")).collect();
        assert_eq!(hashes.len(), AffinityKey::ALL.len());
    }

    #[test]
    fn names_round_trip() {
        for key in AffinityKey::ALL {
            assert_eq!(AffinityKey::from_name(key.name()), Some(key));
        }
        assert_eq!(AffinityKey::from_name("session"), None);
    }
}
