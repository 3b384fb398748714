//! What a guest can make the VMM log, rate-limited. A guest chooses how often its driver
//! misbehaves (a bad `QUEUE_NUM` in a loop costs it one MMIO exit; an available ring full of bad
//! heads costs it nothing), and the VMM's stderr is a file on the host, so every message a guest
//! can cause goes through a [`FaultLog`]: the first [`LOGGED_PER_KIND`] of each kind are logged,
//! the rest are only counted, and the counts are reported once when the VM ends. The log a guest
//! can cause is then bounded by the number of kinds, whatever it does.

use std::sync::atomic::{AtomicU64, Ordering};

/// Messages of one kind logged per device before they are only counted.
pub const LOGGED_PER_KIND: u64 = 3;

/// A kind of guest misbehaviour the VMM notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A virtio-blk request that failed its checks (answered with an error status).
    BadRequest,
    /// An available-ring entry naming a descriptor past the queue's end (it cannot be returned).
    BadHead,
    /// The used ring could not be written.
    UsedRing,
    /// The driver's available index or ring is unusable.
    AvailRing,
    /// `QUEUE_NUM` not a power of two, zero, or above the maximum.
    QueueSize,
    /// A ring address that breaks its alignment.
    QueueAddress,
    /// `DRIVER_OK` with queues not ready or not in guest memory.
    QueueNotUsable,
    /// The device refused to start.
    Activate,
    /// A legacy device could not raise its interrupt or event (an eventfd write failed).
    Trigger,
}

impl Fault {
    /// Every kind, in the order of the counters.
    pub const ALL: [Fault; 9] = [
        Fault::BadRequest,
        Fault::BadHead,
        Fault::UsedRing,
        Fault::AvailRing,
        Fault::QueueSize,
        Fault::QueueAddress,
        Fault::QueueNotUsable,
        Fault::Activate,
        Fault::Trigger,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::BadRequest => "bad requests",
            Fault::BadHead => "available-ring heads out of range",
            Fault::UsedRing => "used-ring write failures",
            Fault::AvailRing => "unusable available rings",
            Fault::QueueSize => "invalid queue sizes",
            Fault::QueueAddress => "misaligned ring addresses",
            Fault::QueueNotUsable => "DRIVER_OK with unusable queues",
            Fault::Activate => "refused activations",
            Fault::Trigger => "failed interrupt or event triggers",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Per-device counters of guest faults.
#[derive(Debug)]
pub struct FaultLog {
    counts: [AtomicU64; Fault::ALL.len()],
}

impl Default for FaultLog {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultLog {
    pub const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; Fault::ALL.len()],
        }
    }

    /// Counts one fault; true when the caller should log it (one of the first few of its kind).
    /// The first one past the limit logs, once, that the rest are only counted.
    pub fn note(&self, kind: Fault) -> bool {
        let n = self.counts[kind.index()].fetch_add(1, Ordering::Relaxed) + 1;
        if n == LOGGED_PER_KIND + 1 {
            tracing::warn!(
                "the guest keeps causing {}: further ones are counted and reported when the VM ends",
                kind.name()
            );
        }
        n <= LOGGED_PER_KIND
    }

    /// How many faults of this kind were noted.
    pub fn count(&self, kind: Fault) -> u64 {
        self.counts[kind.index()].load(Ordering::Relaxed)
    }

    /// All faults noted.
    pub fn total(&self) -> u64 {
        Fault::ALL.iter().map(|&k| self.count(k)).sum()
    }

    /// The kinds that had more faults than were logged, with their counts.
    pub fn unlogged(&self) -> Vec<(Fault, u64)> {
        Fault::ALL
            .iter()
            .map(|&k| (k, self.count(k)))
            .filter(|&(_, n)| n > LOGGED_PER_KIND)
            .collect()
    }

    /// One line per kind that went past the limit: at most `Fault::ALL.len()` lines.
    pub fn report(&self, device: &str) {
        for (kind, n) in self.unlogged() {
            tracing::warn!(
                "{device}: the guest caused {n} {} ({LOGGED_PER_KIND} logged)",
                kind.name()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_few_of_each_kind_are_logged_and_all_are_counted() {
        let log = FaultLog::new();
        let logged = (0..100_000).filter(|_| log.note(Fault::QueueSize)).count();
        assert_eq!(logged as u64, LOGGED_PER_KIND);
        assert!(log.note(Fault::BadHead), "each kind has its own allowance");
        assert_eq!(log.count(Fault::QueueSize), 100_000);
        assert_eq!(log.total(), 100_001);
        assert_eq!(log.unlogged(), vec![(Fault::QueueSize, 100_000)]);
        for (i, k) in Fault::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "ALL is in counter order");
        }
    }

    #[test]
    fn a_virtio_queue_directive_silences_its_own_log_lines() {
        // launcher::init_logging's default filter turns virtio-queue off this way; its lines come
        // through the log → tracing bridge, with the crate's module path as their target.
        use crate::virtio::testing::count_log_lines_through;
        use virtio_queue::{Queue, QueueT};
        let (lines, guard) = count_log_lines_through("info,virtio_queue=off");
        Queue::new(16).unwrap().set_size(3);
        assert_eq!(lines.load(Ordering::Relaxed), 0);
        drop(guard);
        let (lines, _guard) = count_log_lines_through("info");
        Queue::new(16).unwrap().set_size(3);
        assert_eq!(lines.load(Ordering::Relaxed), 1, "the bridge works");
        // Ours stay: the note that further faults are only counted is a warning.
        let log = FaultLog::new();
        for _ in 0..=LOGGED_PER_KIND {
            log.note(Fault::QueueSize);
        }
        assert_eq!(lines.load(Ordering::Relaxed), 2);
    }
}
