//! Pickers: choose one candidate from the weighted totals.

use rand::rngs::SmallRng;
use rand::Rng;

use super::{Candidate, Picker};

/// Totals closer than this count as a tie.
const TIE: f64 = 1e-9;

/// The highest total; ties broken uniformly at random (never by list order, which would herd
/// traffic onto the first endpoint).
pub struct MaxScorePicker;

impl Picker for MaxScorePicker {
    fn name(&self) -> &'static str {
        "max-score"
    }

    fn pick(&self, _candidates: &[Candidate], totals: &[f64], rng: &mut SmallRng) -> usize {
        let best = totals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let is_tied = |t: &f64| (best - t).abs() <= TIE;
        let ties = totals.iter().filter(|t| is_tied(t)).count();
        // One draw among the tied, uniform (cheaper than a draw per tie when many are equal).
        let nth = if ties > 1 {
            rng.random_range(0..ties)
        } else {
            0
        };
        totals
            .iter()
            .enumerate()
            .filter(|(_, t)| is_tied(t))
            .nth(nth)
            .map_or(0, |(i, _)| i)
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
