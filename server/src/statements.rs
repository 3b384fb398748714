//! Signed statements: a report's [`SignedStatement`], checked against what the server knows
//! before the report is applied, and kept beside the attempt for the job's receipt.
//!
//! The runner's word is taken for nothing the server can check itself: the statement must be
//! signed by the key its runner registered, name this job, attempt, runner, job file and image,
//! and say what the report says, whose output digest the server computed on upload (the tree
//! digest it names is compared with the server's own index by the state machine: a runner that
//! misstates it agrees with no one). A replicated job takes no unsigned report.

use crate::db::{Db, DbError};
use crate::http::Refusal;
use crate::jobs::StoredJob;
use construir_api::codes;
use construir_api::state::AttemptSnapshot;
use construir_api::trust::{SignedStatement, Statement};
use construir_api::types::{AttemptId, JobId, ReportRequest, RunnerId};
use sqlx::Row;

/// Checks `report`'s statement for `attempt` of `job`; returns its JSON to keep, or none for an
/// unsigned report of a job that takes one. `runner_key` is the key the attempt's runner
/// registered, if any; `console_bytes` what the server received of its console.
pub fn check(
    job: &StoredJob,
    attempt: &AttemptSnapshot,
    report: &ReportRequest,
    runner_key: Option<&str>,
    console_bytes: u64,
) -> Result<Option<String>, Refusal> {
    let refuse = |why: String| Refusal::new(codes::INVALID_PARAMS, format!("statement: {why}"));
    let Some(signed) = &report.statement else {
        if job.snapshot.policy.replicated() {
            return Err(refuse(format!(
                "job {} is replicated ({} replicas, quorum {}): its reports must carry a \
                 statement signed with the runner's registered key",
                job.facts.id, job.snapshot.policy.replicas, job.snapshot.policy.quorum
            )));
        }
        return Ok(None);
    };
    let st = signed.open().map_err(|e| refuse(e.to_string()))?;
    let Some(key) = runner_key else {
        return Err(refuse(format!(
            "runner {} registered no public key to check it with (register again with one)",
            attempt.runner
        )));
    };
    if st.runner_key != key {
        return Err(refuse(format!(
            "it is signed by key {}, not by runner {}'s registered key {key}",
            st.runner_key, attempt.runner
        )));
    }
    if let Some((field, ours, theirs)) = first_difference(job, attempt, report, &st) {
        return Err(refuse(format!(
            "its {field} is {theirs}, but {ours}: a statement must say what the report says, \
             of this attempt"
        )));
    }
    if st.console_bytes != console_bytes {
        // The console never counts towards a result: noted, not refused (a log piece the
        // runner gave up on is no lie about the job).
        tracing::warn!(
            "attempt {}: its statement counts {} console bytes, the server received {}",
            attempt.id,
            st.console_bytes,
            console_bytes
        );
    }
    serde_json::to_string(signed)
        .map(Some)
        .map_err(|e| Refusal::new(codes::INTERNAL, format!("keeping the statement: {e}")))
}

/// The first field of `st` that is not what the server knows or the report says: (field, what
/// it should be, what it is).
fn first_difference(
    job: &StoredJob,
    attempt: &AttemptSnapshot,
    report: &ReportRequest,
    st: &Statement,
) -> Option<(&'static str, String, String)> {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
    let checks: [(&'static str, String, String); 10] = [
        (
            "job_id",
            format!("this is job {}", job.facts.id),
            st.job_id.to_string(),
        ),
        (
            "attempt_id",
            format!("this is attempt {}", attempt.id),
            st.attempt_id.to_string(),
        ),
        (
            "runner_id",
            format!("the attempt is runner {}'s", attempt.runner),
            st.runner_id.to_string(),
        ),
        (
            "job_sha256",
            format!("the job file is {}", job.facts.sha256),
            st.job_sha256.clone(),
        ),
        (
            "image",
            format!("the job's image is {}", job.facts.image),
            st.image.clone(),
        ),
        (
            "image_digest",
            format!("the job is pinned to {}", show(&job.facts.image_digest)),
            show(&st.image_digest),
        ),
        (
            "status",
            format!("the report says {}", report.status),
            st.status.to_string(),
        ),
        (
            "job_exit_status",
            format!("the report says {:?}", report.job_exit_status),
            format!("{:?}", st.job_exit_status),
        ),
        (
            "output_sha256",
            format!("the report names {}", show(&report.output_sha256)),
            show(&st.output_sha256),
        ),
        (
            "output_tree_sha256",
            format!("the report names {}", show(&report.output_tree_sha256)),
            show(&st.output_tree_sha256),
        ),
    ];
    let same = [
        st.job_id == job.facts.id,
        st.attempt_id == attempt.id,
        st.runner_id == attempt.runner,
        st.job_sha256 == job.facts.sha256,
        st.image == job.facts.image,
        st.image_digest == job.facts.image_digest,
        st.status == report.status,
        st.job_exit_status == report.job_exit_status,
        st.output_sha256 == report.output_sha256,
        st.output_tree_sha256 == report.output_tree_sha256,
    ];
    checks
        .into_iter()
        .zip(same)
        .find(|(_, same)| !same)
        .map(|(c, _)| c)
}

impl Db {
    /// The kept statements of a job's attempts.
    pub async fn statements_of(
        &self,
        job: JobId,
    ) -> Result<Vec<(AttemptId, SignedStatement)>, DbError> {
        let rows = sqlx::query(
            "SELECT id, statement FROM attempts WHERE job_id = $1 AND statement IS NOT NULL",
        )
        .bind(job.0 as i64)
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let text: String = r.try_get(1)?;
            let signed = serde_json::from_str(&text)
                .map_err(|e| DbError::Refused(format!("a kept statement does not parse: {e}")))?;
            out.push((AttemptId(r.try_get::<i64, _>(0)? as u64), signed));
        }
        Ok(out)
    }

    /// The public key runner `runner` registered, if any.
    pub async fn runner_key(&self, runner: RunnerId) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT public_key FROM runners WHERE id = $1")
            .bind(runner.0 as i64)
            .fetch_optional(self.pool())
            .await?;
        Ok(row
            .map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()?
            .flatten())
    }
}
