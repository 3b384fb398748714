//! From snapshots to what clients see ([`JobView`], [`AttemptView`]), with the facts the
//! state machines do not need (who, what, the uploads' hashes).

use super::{AttemptSnapshot, Ballot, JobPolicy, JobSnapshot};
use crate::trust::attestation_of;
use crate::types::{AttemptId, AttemptView, JobId, JobLimits, JobView, RunnerId, UserId};

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
    /// Seen only by its owner and admins.
    pub private: bool,
}

/// What the server received from an attempt (hashed by the server itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptBlobs {
    pub output_sha256: Option<String>,
    pub output_size: Option<u64>,
    pub console_size: u64,
    pub output_index: Option<crate::types::OutputIndexView>,
    /// Its runner signed its report.
    pub signed: bool,
    /// The token its runner claimed it with has been revoked since.
    pub runner_revoked: bool,
}

impl JobSnapshot {
    /// The job as its submitter sees it; `blobs` gives each attempt's uploads.
    pub fn view(
        &self,
        facts: JobFacts,
        mut blobs: impl FnMut(AttemptId) -> AttemptBlobs,
    ) -> JobView {
        let attempts: Vec<(AttemptView, bool)> = self
            .attempts
            .iter()
            .map(|a| {
                let b = blobs(a.id);
                let revoked = b.runner_revoked;
                (a.view(b, &self.policy), revoked)
            })
            .collect();
        let agreeing: Vec<&AttemptSnapshot> = self
            .agreeing
            .iter()
            .filter_map(|id| self.attempt(*id))
            .collect();
        let owners: Vec<UserId> = agreeing.iter().map(|a| a.runner_owner).collect();
        let attestation = (!agreeing.is_empty()).then(|| {
            attestation_of(
                self.policy.quorum,
                &owners,
                facts.owner,
                self.ran_alone().is_some(),
            )
        });
        let revoked_runners: Vec<RunnerId> = attempts
            .iter()
            .filter(|(v, revoked)| *revoked && self.agreeing.contains(&v.id))
            .map(|(v, _)| v.runner)
            .collect();
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
            attempts: attempts.into_iter().map(|(v, _)| v).collect(),
            result_attempt: self.result_attempt,
            replicas: self.policy.replicas,
            quorum: self.policy.quorum,
            agreeing: self.agreeing.clone(),
            attestation,
            revoked_runners,
            adaptive: self.policy.adaptive,
            private: facts.private,
            ran_alone: self.ran_alone(),
        }
    }
}

impl AttemptSnapshot {
    pub fn view(&self, blobs: AttemptBlobs, policy: &JobPolicy) -> AttemptView {
        let report = self.report.as_ref();
        let ballot = self.ballot(policy);
        let alone = self.alone.map(|a| match (&ballot, a.audit) {
            (Ballot::Vote(_), true) => "alone, audited",
            (Ballot::Vote(_), false) => "alone, not audited",
            _ => "alone",
        });
        let vote = match ballot {
            Ballot::Vote(v) if policy.replicated() => Some(v.to_string()),
            _ => None,
        };
        AttemptView {
            id: self.id,
            runner: self.runner,
            runner_owner: self.runner_owner,
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
            vote,
            signed: blobs.signed,
            alone: alone.map(str::to_string),
            times: report.map(|r| r.times),
        }
    }
}
