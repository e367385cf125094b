//! The prefill backlog: an estimate of the prompt tokens an endpoint was sent and has not
//! prefilled yet. Every pick adds the prompt tokens the endpoint does not hold; the estimate
//! drains at the load model's `prefill_rate` (tokens per second). Every backend keeps it by these
//! functions: the embedded balancer, the workers' shared mapping (`pack`/`unpack`), and each
//! Redis replica from the pool's stream of commits.
//!
//! Why not the prompt tokens of the requests in flight: a request stays in flight through its
//! whole decode, long after its prefill stopped delaying anyone, so that count sends new work
//! to the server that has just taken a large prompt (measured on unique prompts: mean TTFT
//! 1.07× round robin's, against 0.98× for this estimate; see bench/quality/README.md). A rate
//! set too low only makes the estimate remember picks longer (it then balances the tokens sent);
//! one set far too high forgets queued work, so the default is conservative.

/// One endpoint's backlog as of `at_ms` (the balancer's clock).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    pub tokens: f64,
    pub at_ms: u64,
}

impl Backlog {
    /// The estimate at `now_ms`, drained at `rate` tokens per second.
    pub fn at(&self, now_ms: u64, rate: f64) -> f64 {
        let elapsed_s = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        (self.tokens - rate * elapsed_s).max(0.0)
    }

    /// Adds `tokens` sent at `sent_ms`. A pick older than the estimate (another replica's, read
    /// from the stream a little late) adds what would be left of it now, without rewinding.
    pub fn add(&mut self, tokens: u64, sent_ms: u64, rate: f64) {
        let now_ms = sent_ms.max(self.at_ms);
        let late_s = (now_ms - sent_ms) as f64 / 1000.0;
        self.tokens = self.at(now_ms, rate) + (tokens as f64 - rate * late_s).max(0.0);
        self.at_ms = now_ms;
    }

    /// Takes back what is left of `tokens` of the estimate as of `as_of_ms` (a request that
    /// ended: its prefill is done, so the estimate should no longer hold any of it). What the
    /// estimate would have drained of them since is not taken twice; the estimate never goes
    /// below zero.
    pub fn take_back(&mut self, tokens: u64, as_of_ms: u64, now_ms: u64, rate: f64) {
        let now_ms = now_ms.max(self.at_ms);
        let elapsed_s = now_ms.saturating_sub(as_of_ms) as f64 / 1000.0;
        let left = (tokens as f64 - rate * elapsed_s).max(0.0);
        self.tokens = (self.at(now_ms, rate) - left).max(0.0);
        self.at_ms = now_ms;
    }
}

/// One word holds a backlog, for the workers' shared mapping: whole tokens in the high
/// `TOKEN_BITS` (saturating), the millisecond stamp below (about 34 years of a monotonic clock).
const TOKEN_BITS: u32 = 24;
const STAMP_BITS: u32 = 64 - TOKEN_BITS;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;
const TOKEN_MAX: u64 = (1 << TOKEN_BITS) - 1;

pub fn pack(backlog: Backlog) -> u64 {
    let tokens = (backlog.tokens.round().max(0.0) as u64).min(TOKEN_MAX);
    (tokens << STAMP_BITS) | (backlog.at_ms & STAMP_MASK)
}

pub fn unpack(word: u64) -> Backlog {
    Backlog {
        tokens: (word >> STAMP_BITS) as f64,
        at_ms: word & STAMP_MASK,
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // whole-token values, exact in f64
mod tests {
    use super::*;

    #[test]
    fn drains_at_the_rate_and_never_below_zero() {
        let mut b = Backlog::default();
        b.add(1000, 10_000, 2000.0);
        assert_eq!(b.at(10_000, 2000.0), 1000.0);
        assert_eq!(b.at(10_250, 2000.0), 500.0);
        assert_eq!(b.at(20_000, 2000.0), 0.0);
        assert_eq!(
            b.at(9_000, 2000.0),
            1000.0,
            "a clock read before the stamp drains nothing"
        );
        b.add(300, 10_250, 2000.0);
        assert_eq!(
            b,
            Backlog {
                tokens: 800.0,
                at_ms: 10_250
            }
        );
    }

    #[test]
    fn a_late_pick_adds_what_is_left_of_it() {
        let mut b = Backlog {
            tokens: 1000.0,
            at_ms: 5_000,
        };
        b.add(400, 4_900, 1000.0); // 100 ms late: 100 tokens of it drained already
        assert_eq!(
            b,
            Backlog {
                tokens: 1300.0,
                at_ms: 5_000
            }
        );
        b.add(50, 4_000, 1000.0); // a whole second late: all of it drained
        assert_eq!(b.tokens, 1300.0);
    }

    #[test]
    fn an_ended_request_takes_back_what_is_left_of_it() {
        let mut b = Backlog::default();
        b.add(8000, 1_000, 1000.0);
        b.add(500, 1_500, 1000.0);
        // The 8,000-token request ends at 3 s: 6,000 of it would still be queued by the rate.
        b.take_back(8000, 1_000, 3_000, 1000.0);
        assert_eq!(
            b,
            Backlog {
                tokens: 500.0,
                at_ms: 3_000
            }
        );
        // The estimate drains in the order work was sent, so it still holds 400 tokens of the
        // second request, which on its own would have drained by now: nothing is taken for it
        // (conservative), and the rest drains at the rate.
        b.take_back(500, 1_500, 3_100, 1000.0);
        assert_eq!(b.tokens, 400.0);
        b.take_back(1000, 3_100, 3_100, 1000.0);
        assert_eq!(b.tokens, 0.0, "never below zero");
    }

    #[test]
    fn packs_into_one_word() {
        let b = Backlog {
            tokens: 12_345.4,
            at_ms: 987_654_321,
        };
        assert_eq!(
            unpack(pack(b)),
            Backlog {
                tokens: 12_345.0,
                at_ms: 987_654_321
            }
        );
        let huge = Backlog {
            tokens: 1e12,
            at_ms: 1,
        };
        assert_eq!(unpack(pack(huge)).tokens, TOKEN_MAX as f64, "saturates");
    }
}
