//! How a run ended, and the process exit code every construir launcher (the VMM, the QEMU
//! launcher) gives for it.
//!
//! | exit code | meaning |
//! |---|---|
//! | 0–99 | the job exited by itself with this status (0: success) |
//! | 100 | the job failed with a status of 100 or more, or was killed by a signal (exact value in the JSON summary and on the console) |
//! | 101 | invalid job: the job disk holds no readable archive, or no `opt/job/construir` |
//! | 102 | timed out: the in-guest limit or the host's timeout stopped the job |
//! | 103 | the guest failed: kernel panic, crash, reset or power-off without a report, or the init failed |
//! | 104 | this host cannot run guests (no usable `/dev/kvm` or no QEMU) |
//! | 105 | setup error: bad arguments, missing image or kernel, I/O error on the host |
//! | 106 | interrupted: the launcher got SIGINT or SIGTERM and stopped the VM |

use crate::status::GuestReport;

/// Exit code: the job exited with a status ≥ 100 or was killed by a signal.
pub const EXIT_JOB_FAILED_HIGH: u8 = 100;
/// Exit code: the job file is not a valid job.
pub const EXIT_INVALID_JOB: u8 = 101;
/// Exit code: the job was stopped at its time limit.
pub const EXIT_TIMED_OUT: u8 = 102;
/// Exit code: the guest failed without reporting a job outcome.
pub const EXIT_GUEST_FAILED: u8 = 103;
/// Exit code: the host cannot run guests.
pub const EXIT_HOST_UNSUPPORTED: u8 = 104;
/// Exit code: the launcher could not set the VM up.
pub const EXIT_SETUP_ERROR: u8 = 105;
/// Exit code: the launcher was interrupted by a signal.
pub const EXIT_INTERRUPTED: u8 = 106;

/// How a run ended, from the host's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The job exited by itself with this status.
    Exited(u8),
    /// The job was killed by this signal.
    Signaled(u8),
    /// The job file is not a valid job (the reason says which way).
    InvalidJob(&'static str),
    /// The job ran past its limit; `in_guest` tells whether the init or the host stopped it.
    TimedOut { in_guest: bool },
    /// The guest ended without reporting an outcome, or its init failed.
    GuestFailed(String),
    /// The launcher was interrupted.
    Interrupted,
}

impl RunOutcome {
    /// The outcome for what the guest reported, or for a guest that ended without a report.
    pub fn from_report(report: Option<GuestReport>, how_the_guest_ended: &str) -> Self {
        match report {
            Some(GuestReport::Exited(code)) => RunOutcome::Exited(code),
            Some(GuestReport::Signaled(sig)) => RunOutcome::Signaled(sig),
            Some(GuestReport::NoArchive) => RunOutcome::InvalidJob(
                "the job disk holds no readable archive (xz, gzip, zstd or tar)",
            ),
            Some(GuestReport::NoScript) => {
                RunOutcome::InvalidJob("the job archive has no opt/job/construir")
            }
            Some(GuestReport::TimeLimit) => RunOutcome::TimedOut { in_guest: true },
            Some(GuestReport::InitFailed) => {
                RunOutcome::GuestFailed("the guest init failed (see the console log)".into())
            }
            None => RunOutcome::GuestFailed(format!(
                "the guest ended without reporting a job outcome ({how_the_guest_ended})"
            )),
        }
    }

    /// The process exit code for this outcome (see the module documentation).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunOutcome::Exited(code) if *code < EXIT_JOB_FAILED_HIGH => *code,
            RunOutcome::Exited(_) | RunOutcome::Signaled(_) => EXIT_JOB_FAILED_HIGH,
            RunOutcome::InvalidJob(_) => EXIT_INVALID_JOB,
            RunOutcome::TimedOut { .. } => EXIT_TIMED_OUT,
            RunOutcome::GuestFailed(_) => EXIT_GUEST_FAILED,
            RunOutcome::Interrupted => EXIT_INTERRUPTED,
        }
    }

    /// A stable one-word status for records: `success`, `failed`, `invalid-job`, `timed-out`,
    /// `guest-failed`, `interrupted`.
    pub fn status(&self) -> &'static str {
        match self {
            RunOutcome::Exited(0) => "success",
            RunOutcome::Exited(_) | RunOutcome::Signaled(_) => "failed",
            RunOutcome::InvalidJob(_) => "invalid-job",
            RunOutcome::TimedOut { .. } => "timed-out",
            RunOutcome::GuestFailed(_) => "guest-failed",
            RunOutcome::Interrupted => "interrupted",
        }
    }

    /// The job's own exit status, where it has one (signals as 128 + signal, like a shell).
    pub fn job_exit_status(&self) -> Option<u16> {
        match self {
            RunOutcome::Exited(code) => Some(u16::from(*code)),
            RunOutcome::Signaled(sig) => Some(128 + u16::from(*sig)),
            _ => None,
        }
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::Exited(0) => write!(f, "job succeeded"),
            RunOutcome::Exited(code) => write!(f, "job failed with exit status {code}"),
            RunOutcome::Signaled(sig) => write!(f, "job killed by signal {sig}"),
            RunOutcome::InvalidJob(why) => write!(f, "invalid job: {why}"),
            RunOutcome::TimedOut { in_guest: true } => {
                write!(f, "timed out: the guest's time limit killed the job")
            }
            RunOutcome::TimedOut { in_guest: false } => {
                write!(f, "timed out: the host stopped the VM")
            }
            RunOutcome::GuestFailed(why) => write!(f, "guest failed: {why}"),
            RunOutcome::Interrupted => write!(f, "interrupted"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_keep_success_and_failures_apart() {
        assert_eq!(RunOutcome::Exited(0).exit_code(), 0);
        assert_eq!(RunOutcome::Exited(3).exit_code(), 3);
        assert_eq!(RunOutcome::Exited(99).exit_code(), 99);
        assert_eq!(RunOutcome::Exited(100).exit_code(), 100);
        assert_eq!(RunOutcome::Exited(255).exit_code(), 100);
        assert_eq!(RunOutcome::Signaled(9).exit_code(), 100);
        assert_eq!(
            RunOutcome::from_report(Some(GuestReport::NoScript), "").exit_code(),
            101
        );
        assert_eq!(
            RunOutcome::from_report(Some(GuestReport::NoArchive), "").exit_code(),
            101
        );
        assert_eq!(
            RunOutcome::from_report(Some(GuestReport::TimeLimit), "").exit_code(),
            102
        );
        assert_eq!(RunOutcome::TimedOut { in_guest: false }.exit_code(), 102);
        assert_eq!(RunOutcome::from_report(None, "reset").exit_code(), 103);
        assert_eq!(
            RunOutcome::from_report(Some(GuestReport::InitFailed), "").exit_code(),
            103
        );
        assert_eq!(RunOutcome::Interrupted.exit_code(), 106);
    }

    #[test]
    fn statuses_and_job_codes() {
        assert_eq!(RunOutcome::Exited(0).status(), "success");
        assert_eq!(RunOutcome::Exited(1).status(), "failed");
        assert_eq!(RunOutcome::Signaled(9).job_exit_status(), Some(137));
        assert_eq!(
            RunOutcome::TimedOut { in_guest: true }.job_exit_status(),
            None
        );
        let failed = RunOutcome::from_report(None, "triple fault");
        assert!(failed.to_string().contains("triple fault"), "{failed}");
    }
}
