//! Concurrent claims start at different jobs.
//!
//! Every claim lists the same claimable jobs in the same order (fairest first). Claims made at
//! the same moment would all try the first job, one would get it, and each of the others would
//! have paid for an attempt row made and dropped before trying the second, and so on: with a
//! hundred runners claiming at once, most of the server's work is lost races. So the claims in
//! progress in this process take turns: while `n` are in progress, each starts at a different
//! one of the best `n` jobs (in the order they came in), then goes on in order. With one claim
//! at a time (a quiet farm, every test of the order) the order is exactly the fair one; under
//! load a job is at most `n - 1` places early or late among the best `n`, which all go at once.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The claims in progress in this process, and whose turn it is to start where.
#[derive(Default)]
pub struct ClaimSpread {
    in_progress: AtomicUsize,
    turn: AtomicUsize,
}

/// One claim in progress: counted until dropped.
pub struct ClaimTurn<'a> {
    spread: &'a ClaimSpread,
    /// How many claims were in progress when this one began (itself included).
    pub width: usize,
    /// This claim's turn, counted over all claims.
    pub turn: usize,
}

impl ClaimSpread {
    /// Begins a claim.
    pub fn begin(&self) -> ClaimTurn<'_> {
        let width = self.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        ClaimTurn {
            spread: self,
            width,
            turn,
        }
    }
}

impl Drop for ClaimTurn<'_> {
    fn drop(&mut self) {
        self.spread.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ClaimTurn<'_> {
    /// Reorders `order` (fairest first) for this claim: the best `width` rotated to start at
    /// this claim's turn among them, the rest after them as they were.
    pub fn arrange<T>(&self, order: &mut [T]) {
        let window = self.width.min(order.len());
        if window > 1 {
            order[..window].rotate_left(self.turn % window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_at_a_time_keeps_the_fair_order() {
        let spread = ClaimSpread::default();
        for _ in 0..5 {
            let turn = spread.begin();
            assert_eq!(turn.width, 1);
            let mut order = vec![1, 2, 3, 4];
            turn.arrange(&mut order);
            assert_eq!(order, [1, 2, 3, 4]);
        }
    }

    #[test]
    fn claims_at_once_start_at_different_jobs_among_the_best_and_miss_none() {
        let spread = ClaimSpread::default();
        let turns: Vec<_> = (0..4).map(|_| spread.begin()).collect();
        let mut firsts = Vec::new();
        for turn in &turns {
            let mut order: Vec<u32> = (1..=10).collect();
            turn.arrange(&mut order);
            // Every job is still there, the ones past the window where they were.
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (1..=10).collect::<Vec<_>>());
            assert_eq!(
                order[turn.width..],
                (turn.width as u32 + 1..=10).collect::<Vec<_>>()
            );
            firsts.push(order[0]);
        }
        // The last to begin saw four in progress and the others fewer: all began at a
        // different job.
        firsts.sort();
        firsts.dedup();
        assert_eq!(firsts.len(), 4, "{firsts:?}");
        drop(turns);
        assert_eq!(
            spread.begin().width,
            1,
            "ended claims are no longer counted"
        );
    }

    #[test]
    fn a_window_wider_than_the_list_rotates_what_there_is() {
        let spread = ClaimSpread::default();
        let _held: Vec<_> = (0..7).map(|_| spread.begin()).collect();
        let turn = spread.begin();
        let mut order = vec!['a', 'b', 'c'];
        turn.arrange(&mut order);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, ['a', 'b', 'c']);
        let mut empty: Vec<u8> = Vec::new();
        turn.arrange(&mut empty);
    }
}
