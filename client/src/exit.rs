//! The client's exit codes: a finished job's own code, as every launcher gives it (0–103, see
//! construir-contract's `outcome`), and the client's own codes from 110 up, clear of the
//! launchers' 104–106 (which describe a host, and a client has none).
//!
//! | code | meaning |
//! |---|---|
//! | 0–99 | the job exited with this status (0: success) |
//! | 100 | the job failed with a status ≥ 100, or was killed by a signal |
//! | 101 | invalid job: no readable archive, or no `opt/job/construir` |
//! | 102 | the job timed out |
//! | 103 | the guest failed |
//! | 110 | the job was canceled |
//! | 111 | the job errored (its tries ran out, each ended by a runner's failure, not the job's), expired (no runner took it in time) or was inconclusive (its replicas did not agree) |
//! | 112 | the server refused the request (a 4xx answer: unknown job, bad token, a limit, …) |
//! | 113 | the server could not be reached, or failed (connection, TLS, timeout, a 5xx answer) |
//! | 114 | bad usage, or the server does not speak this client's protocol |
//! | 115 | a local failure: a file could not be read or written, or what was downloaded failed its checks (sha256, the archive's limits) |
//! | 116 | verification failed: `construir verify` found a receipt that does not open with the server's key, or a record or an output archive that is not the one the receipt speaks of |

use construir_api::types::{AttemptView, JobState, JobView, ReportStatus};
use construir_contract::outcome::{
    EXIT_GUEST_FAILED, EXIT_INVALID_JOB, EXIT_JOB_FAILED_HIGH, EXIT_TIMED_OUT,
};

/// The job was canceled.
pub const CANCELED: u8 = 110;
/// The job errored, expired or was inconclusive: it ended without a result, through no fault
/// the client can pin on the job.
pub const ERRORED: u8 = 111;
/// The server refused the request (a 4xx `ApiError`).
pub const REFUSED: u8 = 112;
/// The server could not be reached, or it failed (5xx).
pub const UNREACHABLE: u8 = 113;
/// Bad usage, or a protocol mismatch with the server.
pub const USAGE: u8 = 114;
/// A local failure, or a download that failed its checks.
pub const LOCAL: u8 = 115;
/// `verify` refused the fetched result: its receipt, its record or its output.
pub const VERIFY_FAILED: u8 = 116;

/// A failure that ends the command with its own exit code (an error, not a job's outcome).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

/// A [`Failure`] as an error to return.
pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Failure {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code for a job as it stands: `None` while it has not ended.
pub fn job_exit_code(job: &JobView) -> Option<u8> {
    let result = || -> Option<&AttemptView> {
        let id = job.result_attempt?;
        job.attempts.iter().find(|a| a.id == id)
    };
    match job.state {
        JobState::Queued | JobState::Running => None,
        JobState::Canceled => Some(CANCELED),
        // Replicas that never agreed left no result, as an errored job did: whose fault that
        // is (a job that is not deterministic, a runner that lies) the code cannot say.
        JobState::Errored | JobState::Expired | JobState::Inconclusive => Some(ERRORED),
        // The state is the server's verdict; the result attempt only says which code within it.
        JobState::Succeeded => Some(0),
        JobState::Failed => Some(match result() {
            Some(a) => outcome_exit_code(a.status, a.job_exit_status, a.exit_code),
            None => EXIT_JOB_FAILED_HIGH,
        }),
    }
}

/// The launchers' exit code for a reported outcome: the status and the job's own exit status as
/// the runner's record gave them, or (from a runner that sent no status) the launcher's code.
pub fn outcome_exit_code(
    status: Option<ReportStatus>,
    job_exit_status: Option<u16>,
    launcher_code: Option<i32>,
) -> u8 {
    match status {
        Some(ReportStatus::Success) => 0,
        Some(ReportStatus::Failed) => match job_exit_status {
            // 0 with `failed` is refused by the server; were it to come anyway, a failed job
            // must not exit 0.
            Some(s @ 1..=99) => s as u8,
            _ => EXIT_JOB_FAILED_HIGH,
        },
        Some(ReportStatus::InvalidJob) => EXIT_INVALID_JOB,
        Some(ReportStatus::TimedOut) => EXIT_TIMED_OUT,
        Some(ReportStatus::GuestFailed) => EXIT_GUEST_FAILED,
        // A runner's own failure is never a job's result; should one stand, it is not the job's.
        Some(_) => ERRORED,
        None => match launcher_code {
            Some(c @ 0..=103) => c as u8,
            _ => EXIT_JOB_FAILED_HIGH,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::types::{AttemptId, AttemptState, JobId, JobLimits, RunnerId, UserId};

    fn attempt(status: Option<ReportStatus>, job_exit: Option<u16>) -> AttemptView {
        AttemptView {
            id: AttemptId(7),
            runner: RunnerId(1),
            runner_owner: UserId(2),
            state: AttemptState::Reported,
            why: String::new(),
            late: false,
            claimed_ms: 1,
            started_ms: Some(2),
            ended_ms: Some(3),
            phase: None,
            status,
            exit_code: None,
            job_exit_status: job_exit,
            output_sha256: None,
            output_size: None,
            console_size: 0,
            output_index: None,
            vote: None,
            signed: false,
            alone: None,
            times: None,
        }
    }

    pub(crate) fn job(state: JobState, attempts: Vec<AttemptView>) -> JobView {
        JobView {
            id: JobId(1),
            owner: UserId(1),
            name: "hello_i0.tar.xz".into(),
            image: "i0".into(),
            image_digest: None,
            sha256: "0".repeat(64),
            size: 1 << 20,
            limits: JobLimits::DEFAULT,
            priority: 0,
            state,
            created_ms: 0,
            ended_ms: None,
            reason: String::new(),
            cancel_requested: false,
            retry_not_before_ms: None,
            result_attempt: attempts.last().map(|a| a.id),
            attempts,
            replicas: 1,
            quorum: 1,
            agreeing: vec![],
            attestation: None,
            revoked_runners: vec![],
            adaptive: false,
            private: false,
            ran_alone: None,
        }
    }

    #[test]
    fn outcomes_map_as_the_launchers_table_says() {
        use ReportStatus::*;
        let code = |s, e| outcome_exit_code(Some(s), e, None);
        assert_eq!(code(Success, Some(0)), 0);
        assert_eq!(code(Failed, Some(2)), 2);
        assert_eq!(code(Failed, Some(99)), 99);
        assert_eq!(code(Failed, Some(100)), 100);
        assert_eq!(code(Failed, Some(128 + 9)), 100, "a signal");
        assert_eq!(code(Failed, None), 100);
        assert_eq!(code(Failed, Some(0)), 100, "a failed job never exits 0");
        assert_eq!(code(InvalidJob, None), 101);
        assert_eq!(code(TimedOut, None), 102);
        assert_eq!(code(GuestFailed, None), 103);
        assert_eq!(code(VmmFault, None), ERRORED);
        assert_eq!(outcome_exit_code(None, None, Some(102)), 102);
        assert_eq!(outcome_exit_code(None, None, Some(105)), 100);
        assert_eq!(outcome_exit_code(None, None, None), 100);
    }

    #[test]
    fn jobs_map_by_state_then_by_their_result() {
        assert_eq!(job_exit_code(&job(JobState::Queued, vec![])), None);
        assert_eq!(job_exit_code(&job(JobState::Running, vec![])), None);
        assert_eq!(job_exit_code(&job(JobState::Canceled, vec![])), Some(110));
        assert_eq!(job_exit_code(&job(JobState::Errored, vec![])), Some(111));
        assert_eq!(job_exit_code(&job(JobState::Expired, vec![])), Some(111));
        assert_eq!(
            job_exit_code(&job(JobState::Inconclusive, vec![])),
            Some(111)
        );
        let ok = attempt(Some(ReportStatus::Success), Some(0));
        assert_eq!(job_exit_code(&job(JobState::Succeeded, vec![ok])), Some(0));
        let failed = attempt(Some(ReportStatus::Failed), Some(3));
        assert_eq!(job_exit_code(&job(JobState::Failed, vec![failed])), Some(3));
        let timed_out = attempt(Some(ReportStatus::TimedOut), None);
        let j = job(JobState::Failed, vec![timed_out]);
        assert_eq!(job_exit_code(&j), Some(102));
        // Without the result attempt, a failed job is still a failure.
        let mut lost = j.clone();
        lost.result_attempt = None;
        assert_eq!(job_exit_code(&lost), Some(100));
        // The codes stay clear of the launchers' 104–106.
        for c in [
            CANCELED,
            ERRORED,
            REFUSED,
            UNREACHABLE,
            USAGE,
            LOCAL,
            VERIFY_FAILED,
        ] {
            assert!(c > 106, "{c}");
        }
    }
}
