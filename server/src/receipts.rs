//! Receipts: the server's signed word on a job's result, `GET /api/v1/jobs/{id}/receipt`, and
//! its public key at `/.well-known/construir/server-key`.
//!
//! A receipt is made from the stored record each time it is asked for, and signed with the
//! server's key (ed25519 signatures are deterministic: the same record gives the same bytes).
//! It names the job, its replicas and quorum, the verdict (status, exit status, the output's
//! sha256 and tree digest as the server hashed and indexed them), and each agreeing runner's
//! signed statement with that runner's owner. `construir verify` checks it offline.

use crate::api_jobs::visible;
use crate::http::{Caller, Refusal};
use crate::jobs::StoredJob;
use crate::service::Shared;
use axum::Json;
use axum::extract::{Path, State};
use construir_api::codes;
use construir_api::trust::{
    RECEIPT_VERSION, Receipt, ServerKey, SignedReceipt, Verdict, Vote, attestation_of,
};
use construir_api::types::{JobId, ReportStatus, UserId};

/// The well-known path of the server's public key.
pub const KEY_PATH: &str = "/.well-known/construir/server-key";

/// Why a job has no receipt (yet).
fn none(job: &StoredJob, why: &str) -> Refusal {
    Refusal::new(
        codes::NOT_FOUND,
        format!("job {} has no receipt: {why}", job.facts.id),
    )
}

/// The receipt of `job`'s result, signed.
pub async fn receipt_of(app: &Shared, job: &StoredJob) -> Result<SignedReceipt, Refusal> {
    let s = &job.snapshot;
    if s.agreeing.is_empty() {
        return Err(none(job, &format!("it is {} without a result", s.state)));
    }
    let statements = app.db.statements_of(job.facts.id).await?;
    let blobs = app.db.attempt_blobs(job.facts.id).await?;
    let mut votes = Vec::new();
    for id in &s.agreeing {
        let a = s.attempt(*id).ok_or_else(|| {
            Refusal::new(codes::INTERNAL, format!("agreeing attempt {id} is gone"))
        })?;
        let statement = statements
            .iter()
            .find(|(at, _)| at == id)
            .map(|(_, st)| st.clone())
            .ok_or_else(|| {
                none(
                    job,
                    &format!("attempt {id}'s report was not signed (its runner predates signing)"),
                )
            })?;
        votes.push(Vote {
            runner_id: a.runner,
            owner: a.runner_owner,
            statement,
        });
    }
    let first = s
        .attempt(s.agreeing[0])
        .and_then(|a| a.report.as_ref())
        .ok_or_else(|| Refusal::new(codes::INTERNAL, "the result has no report"))?;
    if !matches!(first.status, ReportStatus::Success | ReportStatus::Failed) {
        return Err(none(
            job,
            &format!(
                "its result is {}, and receipts are for jobs that ran to an exit status",
                first.status
            ),
        ));
    }
    // The output as the report named it (the server checked it is the one it received, and the
    // record keeps it when retention has deleted the bytes) and the tree as the server indexed
    // it (none for an output it could not read).
    let index = blobs
        .get(&s.agreeing[0])
        .and_then(|b| b.output_index.clone());
    // (A job of one replica may have a report from a runner that did not name its output.)
    let output_sha256 = first.output_sha256.clone().or_else(|| {
        blobs
            .get(&s.agreeing[0])
            .and_then(|b| b.output_sha256.clone())
    });
    if output_sha256.is_some() && index.is_none() {
        return Err(none(
            job,
            "its output has not been indexed yet; ask again soon",
        ));
    }
    let tree = index.and_then(|i| i.tree_sha256);
    if let (Some(ours), Some(said)) = (&tree, &first.output_tree_sha256)
        && ours != said
    {
        return Err(none(
            job,
            "its runner's statement names another output tree than the server's index of the \
             output",
        ));
    }
    let owners: Vec<UserId> = votes.iter().map(|v| v.owner).collect();
    let receipt = Receipt {
        v: RECEIPT_VERSION,
        server_key: app.signer.public().public_key.clone(),
        job_id: job.facts.id,
        job_name: job.facts.name.clone(),
        job_sha256: job.facts.sha256.clone(),
        image: job.facts.image.clone(),
        image_digest: job.facts.image_digest.clone(),
        submitter: job.facts.owner,
        replicas: s.policy.replicas,
        quorum: s.policy.quorum,
        attestation: attestation_of(
            s.policy.quorum,
            &owners,
            job.facts.owner,
            s.ran_alone().is_some(),
        ),
        ran_alone: s.ran_alone(),
        verdict: Verdict {
            status: first.status,
            job_exit_status: first.job_exit_status,
            output_sha256,
            output_tree_sha256: tree,
        },
        votes,
        issued_ms: s.ended_ms.unwrap_or(s.created_ms),
    };
    Ok(app.signer.sign_receipt(&receipt))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/receipt", tag = "jobs", params(("id" = u64, Path, description = "the job")),
    responses((status = 200, description = "the server's signed receipt of the job's result", body = SignedReceipt), (status = 404, description = "no such job, or no receipt (yet), saying why", body = construir_api::ApiError), (status = 401, description = "no or bad token", body = construir_api::ApiError)),
    security(("token" = [])))]
pub async fn receipt(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<SignedReceipt>, Refusal> {
    let job = visible(&app, &caller, JobId(id)).await?;
    Ok(Json(receipt_of(&app, &job).await?))
}

/// The server's public key (no token needed: a verifier fetches it once and keeps it). It
/// carries the protocol header like every API answer, so clients read it the same way.
pub async fn server_key(
    State(app): State<Shared>,
) -> ([(&'static str, &'static str); 1], Json<ServerKey>) {
    (
        [(construir_api::PROTOCOL_HEADER, "1")],
        Json(app.signer.public().clone()),
    )
}
