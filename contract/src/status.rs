//! The status port: how the guest init tells the host what happened to the job.
//!
//! # Protocol (version 1)
//!
//! The guest writes single bytes (`outb`) to I/O port [`STATUS_PORT`] (0x5f0). Reads of the port
//! return 0 and mean nothing. The bytes form a stream of messages; each message is one opcode
//! byte, followed by one argument byte for the opcodes that take one:
//!
//! | opcode | argument | meaning |
//! |---|---|---|
//! | `0x01` | — | init started (boot-time marker; the first write of a boot) |
//! | `0x02` | — | job unpacked from the job disk |
//! | `0x03` | — | job script started |
//! | `0x04` | exit code | **outcome**: the job exited by itself with this status (0–255) |
//! | `0x05` | signal | **outcome**: the job was killed by this signal (not by the time limit) |
//! | `0x10` | — | **outcome**: invalid job: the job disk holds no readable archive |
//! | `0x11` | — | **outcome**: invalid job: the archive has no `opt/job/construir` |
//! | `0x12` | — | **outcome**: the job ran past the in-guest time limit and was killed |
//! | `0x13` | — | **outcome**: the guest init itself failed (message on the console) |
//!
//! The init writes the outcome only after the job's processes are gone and the disks are synced,
//! then reboots. The host takes the **last** outcome seen; a guest that ends with no outcome
//! crashed. Unknown opcodes are counted and skipped (they take no argument), so a newer guest
//! stays readable. The decoder keeps constant state whatever the guest writes: a guest flooding
//! the port costs the host nothing but the exits.
//!
//! On the VMM the port is a device on the I/O bus; under QEMU it is an `isa-debugcon` device that
//! copies the bytes into a file, decoded with the same [`StatusDecoder`] afterwards.
//!
//! A job runs as root in the guest and can write to this port itself: the outcome is only as
//! trustworthy as the guest, and says nothing the job could not say by its exit code. What the
//! host observes itself (timeout, crash, reset) never comes from this port.

/// The I/O port the guest init writes its status bytes to.
pub const STATUS_PORT: u16 = 0x5f0;

/// Opcodes of the status protocol (see the module documentation).
pub mod op {
    pub const INIT_STARTED: u8 = 0x01;
    pub const JOB_UNPACKED: u8 = 0x02;
    pub const JOB_STARTED: u8 = 0x03;
    pub const JOB_EXITED: u8 = 0x04;
    pub const JOB_SIGNALED: u8 = 0x05;
    pub const INVALID_NO_ARCHIVE: u8 = 0x10;
    pub const INVALID_NO_SCRIPT: u8 = 0x11;
    pub const TIME_LIMIT: u8 = 0x12;
    pub const INIT_FAILED: u8 = 0x13;
}

/// What the guest reported as the end of its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestReport {
    /// The job exited by itself with this status.
    Exited(u8),
    /// The job was killed by this signal.
    Signaled(u8),
    /// The job disk holds no readable archive.
    NoArchive,
    /// The archive has no `opt/job/construir`.
    NoScript,
    /// The in-guest time limit killed the job.
    TimeLimit,
    /// The guest init failed.
    InitFailed,
}

impl GuestReport {
    /// The message bytes the guest writes for this outcome.
    pub fn encode(self) -> Vec<u8> {
        match self {
            GuestReport::Exited(code) => vec![op::JOB_EXITED, code],
            GuestReport::Signaled(sig) => vec![op::JOB_SIGNALED, sig],
            GuestReport::NoArchive => vec![op::INVALID_NO_ARCHIVE],
            GuestReport::NoScript => vec![op::INVALID_NO_SCRIPT],
            GuestReport::TimeLimit => vec![op::TIME_LIMIT],
            GuestReport::InitFailed => vec![op::INIT_FAILED],
        }
    }
}

/// A progress event decoded from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusEvent {
    InitStarted,
    JobUnpacked,
    JobStarted,
    Outcome(GuestReport),
    Unknown(u8),
}

/// Decodes the status byte stream, one byte at a time, in constant memory.
#[derive(Debug, Default, Clone)]
pub struct StatusDecoder {
    pending: Option<u8>,
    last_outcome: Option<GuestReport>,
    init_started: bool,
    unknown: u64,
    bytes: u64,
}

impl StatusDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one byte written by the guest; returns the event it completes, if any.
    pub fn push(&mut self, byte: u8) -> Option<StatusEvent> {
        self.bytes = self.bytes.saturating_add(1);
        let event = match self.pending.take() {
            Some(op::JOB_EXITED) => StatusEvent::Outcome(GuestReport::Exited(byte)),
            Some(_) => StatusEvent::Outcome(GuestReport::Signaled(byte)),
            None => match byte {
                op::INIT_STARTED => StatusEvent::InitStarted,
                op::JOB_UNPACKED => StatusEvent::JobUnpacked,
                op::JOB_STARTED => StatusEvent::JobStarted,
                op::JOB_EXITED | op::JOB_SIGNALED => {
                    self.pending = Some(byte);
                    return None;
                }
                op::INVALID_NO_ARCHIVE => StatusEvent::Outcome(GuestReport::NoArchive),
                op::INVALID_NO_SCRIPT => StatusEvent::Outcome(GuestReport::NoScript),
                op::TIME_LIMIT => StatusEvent::Outcome(GuestReport::TimeLimit),
                op::INIT_FAILED => StatusEvent::Outcome(GuestReport::InitFailed),
                other => StatusEvent::Unknown(other),
            },
        };
        match event {
            StatusEvent::Outcome(report) => self.last_outcome = Some(report),
            StatusEvent::InitStarted => self.init_started = true,
            StatusEvent::Unknown(_) => self.unknown = self.unknown.saturating_add(1),
            _ => {}
        }
        Some(event)
    }

    /// Feeds every byte of `bytes`.
    pub fn push_all(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
    }

    /// The last outcome the guest reported, if any.
    pub fn outcome(&self) -> Option<GuestReport> {
        self.last_outcome
    }

    /// Whether the init announced itself.
    pub fn init_started(&self) -> bool {
        self.init_started
    }

    /// How many unknown opcodes were skipped.
    pub fn unknown_opcodes(&self) -> u64 {
        self.unknown
    }

    /// How many bytes were written in all.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes
    }
}

/// Decodes a whole recorded stream (for example QEMU's debugcon file).
pub fn decode(bytes: &[u8]) -> StatusDecoder {
    let mut decoder = StatusDecoder::new();
    decoder.push_all(bytes);
    decoder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_normal_run_decodes_to_its_exit_code() {
        let mut stream = vec![op::INIT_STARTED, op::JOB_UNPACKED, op::JOB_STARTED];
        stream.extend(GuestReport::Exited(3).encode());
        let d = decode(&stream);
        assert!(d.init_started());
        assert_eq!(d.outcome(), Some(GuestReport::Exited(3)));
        assert_eq!(d.unknown_opcodes(), 0);
    }

    #[test]
    fn every_report_round_trips() {
        let reports = [
            GuestReport::Exited(0),
            GuestReport::Exited(255),
            GuestReport::Exited(op::INIT_STARTED),
            GuestReport::Signaled(9),
            GuestReport::NoArchive,
            GuestReport::NoScript,
            GuestReport::TimeLimit,
            GuestReport::InitFailed,
        ];
        for r in reports {
            assert_eq!(decode(&r.encode()).outcome(), Some(r), "{r:?}");
        }
    }

    #[test]
    fn the_last_outcome_wins_and_argument_bytes_are_not_opcodes() {
        // 0x13 here is the exit code, not INIT_FAILED.
        let d = decode(&[op::INVALID_NO_ARCHIVE, op::JOB_EXITED, op::INIT_FAILED]);
        assert_eq!(d.outcome(), Some(GuestReport::Exited(op::INIT_FAILED)));
    }

    #[test]
    fn unknown_opcodes_are_skipped_and_counted() {
        let d = decode(&[0xff, 0x42, op::TIME_LIMIT, 0x99]);
        assert_eq!(d.outcome(), Some(GuestReport::TimeLimit));
        assert_eq!(d.unknown_opcodes(), 3);
        assert_eq!(d.bytes_seen(), 4);
    }

    #[test]
    fn a_stream_cut_after_an_opcode_has_no_outcome() {
        assert_eq!(decode(&[op::INIT_STARTED, op::JOB_EXITED]).outcome(), None);
        assert_eq!(decode(&[]).outcome(), None);
    }
}
