//! From snapshots to what clients see ([`JobView`], [`AttemptView`]), with the facts the
//! state machines do not need (who, what, the uploads' hashes).

use super::{AttemptSnapshot, JobSnapshot};
use crate::types::{AttemptId, AttemptView, JobId, JobLimits, JobView, UserId};

/// What the storage holds about a job besides its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFacts {
    pub id: JobId,
    pub owner: UserId,
    pub name: String,
    pub image: String,
    /// The published image digest it is pinned to, if any.
    pub image_digest: Option<String>,
    pub sha256: String,
    pub size: u64,
    pub limits: JobLimits,
    pub priority: i32,
}

/// What the server received from an attempt (hashed by the server itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptBlobs {
    pub output_sha256: Option<String>,
    pub output_size: Option<u64>,
    pub console_size: u64,
    pub output_index: Option<crate::types::OutputIndexView>,
}

impl JobSnapshot {
    /// The job as its submitter sees it; `blobs` gives each attempt's uploads.
    pub fn view(
        &self,
        facts: JobFacts,
        mut blobs: impl FnMut(AttemptId) -> AttemptBlobs,
    ) -> JobView {
        JobView {
            id: facts.id,
            owner: facts.owner,
            name: facts.name,
            image: facts.image,
            image_digest: facts.image_digest,
            sha256: facts.sha256,
            size: facts.size,
            limits: facts.limits,
            priority: facts.priority,
            state: self.state,
            created_ms: self.created_ms,
            ended_ms: self.ended_ms,
            reason: self.reason.clone(),
            cancel_requested: self.cancel_requested,
            retry_not_before_ms: self.retry_not_before_ms,
            attempts: self.attempts.iter().map(|a| a.view(blobs(a.id))).collect(),
            result_attempt: self.result_attempt,
        }
    }
}

impl AttemptSnapshot {
    pub fn view(&self, blobs: AttemptBlobs) -> AttemptView {
        let report = self.report.as_ref();
        AttemptView {
            id: self.id,
            runner: self.runner,
            state: self.state,
            why: self.why.clone(),
            late: self.late,
            claimed_ms: self.claimed_ms,
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            phase: self.phase,
            status: report.map(|r| r.status),
            exit_code: report.and_then(|r| r.exit_code),
            job_exit_status: report.and_then(|r| r.job_exit_status),
            output_sha256: blobs.output_sha256,
            output_size: blobs.output_size,
            console_size: blobs.console_size,
            output_index: blobs.output_index,
        }
    }
}
