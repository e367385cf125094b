//! Pickers: choose one candidate from the weighted totals.

use rand::rngs::SmallRng;
use rand::Rng;

use super::{Candidate, Picker};

/// Totals closer than this count as a tie.
const TIE: f64 = 1e-9;

/// The highest total. Among ties, the candidate picked longest ago (so equal endpoints take
/// turns, as in round robin: random choices would send each endpoint a burstier stream, and
/// list order would herd traffic onto the first), and uniformly at random among candidates
/// never picked or picked at the same time (other workers' picks are not seen here).
pub struct MaxScorePicker;

impl Picker for MaxScorePicker {
    fn name(&self) -> &'static str {
        "max-score"
    }

    fn pick(&self, candidates: &[Candidate], totals: &[f64], rng: &mut SmallRng) -> usize {
        let best = totals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let is_tied = |i: usize| (best - totals[i]).abs() <= TIE;
        // One pass finds the tied candidate picked longest ago and how many share that turn.
        let (mut first, mut oldest, mut ties) = (0, u64::MAX, 0usize);
        for (i, c) in candidates.iter().enumerate().take(totals.len()) {
            if !is_tied(i) || c.last_picked > oldest {
                continue;
            }
            if c.last_picked < oldest {
                (first, oldest, ties) = (i, c.last_picked, 0);
            }
            ties += 1;
        }
        if ties <= 1 {
            return first;
        }
        // One draw among them, uniform (cheaper than a draw per tie when many are equal).
        let nth = rng.random_range(0..ties);
        (first..totals.len())
            .filter(|&i| is_tied(i) && candidates[i].last_picked == oldest)
            .nth(nth)
            .unwrap_or(first)
    }
}

#[cfg(test)]
mod tests {
    use super::super::cand;
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn highest_wins() {
        let mut rng = SmallRng::seed_from_u64(1);
        let c = [cand(0, 0), cand(1, 0), cand(2, 0)];
        assert_eq!(MaxScorePicker.pick(&c, &[0.1, 0.9, 0.5], &mut rng), 1);
    }

    #[test]
    fn ties_go_to_the_endpoint_picked_longest_ago() {
        let mut rng = SmallRng::seed_from_u64(3);
        let picked = |id, at| Candidate {
            last_picked: at,
            ..cand(id, 0)
        };
        let c = [picked(0, 9), picked(1, 4), picked(2, 1), picked(3, 7)];
        // 2 was picked longest ago but scores lower: only the tied best take turns.
        assert_eq!(MaxScorePicker.pick(&c, &[1.0, 1.0, 0.5, 1.0], &mut rng), 1);
        // Taking turns: each pick becomes the newest, so equal endpoints rotate.
        let mut c = vec![picked(0, 0), picked(1, 0), picked(2, 0)];
        let mut order = Vec::new();
        for at in 1..=9 {
            let i = MaxScorePicker.pick(&c, &[1.0; 3], &mut rng);
            c[i].last_picked = at;
            order.push(i);
        }
        for window in order.chunks(3) {
            let mut w = window.to_vec();
            w.sort_unstable();
            assert_eq!(w, [0, 1, 2], "{order:?}");
        }
    }

    #[test]
    fn ties_are_uniform() {
        let mut rng = SmallRng::seed_from_u64(7);
        let c = [cand(0, 0), cand(1, 0), cand(2, 0), cand(3, 0)];
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[MaxScorePicker.pick(&c, &[1.0, 1.0, 0.5, 1.0], &mut rng)] += 1;
        }
        assert_eq!(counts[2], 0);
        for i in [0, 1, 3] {
            assert!((12_000..14_700).contains(&counts[i]), "{counts:?}");
        }
    }
}
