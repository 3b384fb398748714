//! One attempt's calls, each with the attempt's own token (`AttemptCaller`): the job file, start,
//! heartbeats, console pieces, the output upload, the report, an abort. A token is good while
//! its attempt lives (and, for the output and report of a lapsed attempt, within its late
//! window); it dies with the runner token it was claimed with.

use crate::db::now_ms;
use crate::http::Refusal;
use crate::jobs::{OutputIndexed, SetOutput, StoredJob};
use crate::service::Shared;
use crate::tokens;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use construir_api::log::AppendKind;
use construir_api::state::{Access, Event, Refusal as StepRefusal};
use construir_api::types::{
    AbortRequest, AttemptId, AttemptView, HeartbeatRequest, HeartbeatResponse, JobId,
    LogOffsetResponse, ReportRequest,
};
use construir_api::{ApiError, codes};

/// A console piece is at most this large.
pub const LOG_PIECE_LIMIT: usize = 1 << 20;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/runner/attempts/{id}/job", get(job_file))
        .route("/runner/attempts/{id}/start", post(start))
        .route("/runner/attempts/{id}/heartbeat", post(heartbeat))
        .route("/runner/attempts/{id}/log", patch(append_log))
        .route("/runner/attempts/{id}/output", put(upload_output))
        .route("/runner/attempts/{id}/report", post(report))
        .route("/runner/attempts/{id}/abort", post(abort))
}

fn step_refusal(r: StepRefusal) -> Refusal {
    Refusal(ApiError::from(&r))
}

/// An attempt's caller, from its own bearer token; the path's id must be that attempt.
pub struct AttemptCaller {
    pub attempt: AttemptId,
    pub job: JobId,
}

impl FromRequestParts<Shared> for AttemptCaller {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Self::Rejection> {
        let unauthorized = |why: &str| Refusal::new(codes::UNAUTHORIZED, why.to_string());
        let token = tokens::bearer(&parts.headers)
            .ok_or_else(|| unauthorized("no attempt token (Authorization: Bearer TOKEN)"))?;
        let (attempt, job) = app
            .db
            .attempt_by_token(&tokens::digest(token))
            .await?
            .ok_or_else(|| {
                unauthorized(
                    "not an attempt token, or the runner token it was claimed with is revoked",
                )
            })?;
        let Path(id): Path<u64> = Path::from_request_parts(parts, app)
            .await
            .map_err(|_| Refusal::new(codes::BAD_REQUEST, "no attempt id in the path"))?;
        if id != attempt.0 {
            return Err(Refusal::new(
                codes::FORBIDDEN,
                format!("this token is attempt {attempt}'s, not attempt {id}'s"),
            ));
        }
        Ok(AttemptCaller { attempt, job })
    }
}

async fn load(app: &Shared, who: &AttemptCaller) -> Result<StoredJob, Refusal> {
    app.db
        .load_job(who.job)
        .await?
        .ok_or_else(|| Refusal::new(codes::NOT_FOUND, "no such job"))
}

/// The attempt's job, if the attempt is live now (a lapse not swept yet counts as one).
async fn live_job(app: &Shared, who: &AttemptCaller) -> Result<StoredJob, Refusal> {
    let job = load(app, who).await?;
    let access = job
        .snapshot
        .attempt_access(who.attempt, &app.step_settings(), now_ms() as u64);
    match access {
        Ok(Access::Live) => Ok(job),
        _ => Err(Refusal::new(
            codes::LEASE_LOST,
            format!("attempt {} is no longer live", who.attempt),
        )),
    }
}

#[utoipa::path(get, path = "/api/v1/runner/attempts/{id}/job", tag = "attempts", params(("id" = u64, Path, description = "the attempt")),
    responses((status = 200, description = "the job file", content_type = "application/octet-stream", body = Vec<u8>), (status = 409, description = "the attempt is no longer live", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn job_file(State(app): State<Shared>, who: AttemptCaller) -> Result<Response, Refusal> {
    let job = live_job(&app, &who).await?;
    let stream = app.blobs.read(&job.facts.sha256).await?;
    Ok(Body::from_stream(stream).into_response())
}

fn heartbeat_answer(job: &StoredJob, attempt: AttemptId) -> Result<HeartbeatResponse, Refusal> {
    let a = job
        .snapshot
        .attempt(attempt)
        .ok_or_else(|| Refusal::new(codes::NOT_FOUND, "no such attempt"))?;
    Ok(HeartbeatResponse {
        lease_until_ms: a.lease_until_ms,
        cancel: a.cancel_requested,
    })
}

#[utoipa::path(post, path = "/api/v1/runner/attempts/{id}/start", tag = "attempts", params(("id" = u64, Path, description = "the attempt")),
    responses((status = 200, description = "started", body = HeartbeatResponse), (status = 409, description = "the attempt is no longer live", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn start(
    State(app): State<Shared>,
    who: AttemptCaller,
) -> Result<Json<HeartbeatResponse>, Refusal> {
    let attempt = who.attempt;
    let (job, _) = app.apply(who.job, |_| Event::Start { attempt }).await?;
    Ok(Json(heartbeat_answer(&job, attempt)?))
}

#[utoipa::path(post, path = "/api/v1/runner/attempts/{id}/heartbeat", tag = "attempts", params(("id" = u64, Path, description = "the attempt")), request_body = HeartbeatRequest,
    responses((status = 200, description = "the lease, and whether to stop", body = HeartbeatResponse), (status = 409, description = "the lease is lost: stop", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn heartbeat(
    State(app): State<Shared>,
    who: AttemptCaller,
    Json(progress): Json<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, Refusal> {
    let attempt = who.attempt;
    let (job, _) = app
        .apply(who.job, |_| Event::Heartbeat { attempt, progress })
        .await?;
    Ok(Json(heartbeat_answer(&job, attempt)?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OffsetQuery {
    offset: u64,
}

#[utoipa::path(patch, path = "/api/v1/runner/attempts/{id}/log", tag = "attempts", params(("id" = u64, Path, description = "the attempt"), OffsetQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "console bytes, at most 1 MiB"),
    responses((status = 202, description = "appended", body = LogOffsetResponse), (status = 200, description = "already stored", body = LogOffsetResponse),
        (status = 416, description = "a gap: resend from next_offset", body = LogOffsetResponse), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn append_log(
    State(app): State<Shared>,
    who: AttemptCaller,
    Query(q): Query<OffsetQuery>,
    body: Body,
) -> Result<Response, Refusal> {
    let job = live_job(&app, &who).await?;
    let piece = axum::body::to_bytes(body, LOG_PIECE_LIMIT)
        .await
        .map_err(|e| {
            let why = if crate::serve::past_limit(&e) {
                format!("a console piece is at most {LOG_PIECE_LIMIT} bytes")
            } else {
                format!("the console piece was cut short: {e}")
            };
            Refusal::new(codes::BAD_REQUEST, why)
        })?;
    // The cap keeps the console's head and a rolling tail (ConsoleCap): a piece may land in
    // both, and push the tail's oldest bytes out.
    let cap = construir_api::log::ConsoleCap::new(job.facts.limits.console_cap);
    for _ in 0..10 {
        let received = app.db.console_size(who.attempt).await?;
        let plan = cap.plan(received, q.offset, piece.len() as u64);
        let answer = |status: u16, next: u64| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            (status, Json(LogOffsetResponse { next_offset: next })).into_response()
        };
        if plan.kind != AppendKind::Appended {
            return Ok(answer(plan.kind.http_status(), plan.next_offset));
        }
        match app
            .db
            .append_log(who.attempt, cap, received, &plan, &piece)
            .await?
        {
            crate::logs::Appended::Stored => {
                app.wake(crate::service::Topic::Console(who.attempt));
                return Ok(answer(plan.kind.http_status(), plan.next_offset));
            }
            crate::logs::Appended::Raced => continue,
            // The attempt ended while this piece was on its way, and its console is closed.
            crate::logs::Appended::Closed => {
                return Err(Refusal::new(
                    codes::LEASE_LOST,
                    format!("attempt {} is no longer live", who.attempt),
                ));
            }
        }
    }
    Err(Refusal::new(
        codes::TOO_MANY_REQUESTS,
        "the console changed under this piece; send it again",
    ))
}

#[utoipa::path(put, path = "/api/v1/runner/attempts/{id}/output", tag = "attempts", params(("id" = u64, Path, description = "the attempt")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the output archive, cut at its end"),
    responses((status = 201, description = "stored; the server's own hash", body = Uploaded), (status = 413, description = "past the job's output limit", body = ApiError), (status = 409, description = "the attempt has its output already, another upload of it is under way, or it may no longer deliver one", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn upload_output(
    State(app): State<Shared>,
    who: AttemptCaller,
    body: Body,
) -> Result<Response, Refusal> {
    let attempt = who.attempt;
    // Before the body is read: one upload of an attempt at a time, each streaming up to the
    // job's output_size into this server's temporary files.
    let _upload = UploadInFlight::begin(&app, attempt)?;
    let settings = app.step_settings();
    let job = load(&app, &who).await?;
    // A live attempt, or one that lapsed within its late window (kept aside, never the
    // result); nothing once it has reported, was given up or canceled.
    let access = job
        .snapshot
        .attempt_access(attempt, &settings, now_ms() as u64)
        .map_err(step_refusal)?;
    if let Some((sha, size)) = app.db.attempt_output(attempt).await? {
        return Err(already_uploaded(attempt, &sha, size));
    }
    if access == Access::Live
        && job
            .snapshot
            .attempt(attempt)
            .is_some_and(|a| a.state == construir_api::types::AttemptState::Running)
    {
        app.apply(who.job, |_| Event::UploadBegun { attempt })
            .await?;
    }
    let received = app
        .blobs
        .receive(body, job.facts.limits.output_size)
        .await?;
    app.blobs.publish(&received).await?;
    // The upload took time: whether the attempt may still deliver is judged again now, and the
    // record is made only for the job as judged.
    for _ in 0..10 {
        let job = load(&app, &who).await?;
        job.snapshot
            .attempt_access(attempt, &settings, now_ms() as u64)
            .map_err(step_refusal)?;
        match app
            .db
            .set_output(
                attempt,
                who.job,
                job.version,
                &received.sha256,
                received.size,
                // Indexed after the answer, in the background: see `indexing`.
                &OutputIndexed::default(),
            )
            .await?
        {
            SetOutput::Stored => {
                app.metrics.uploads.inc();
                app.metrics.upload_bytes.inc_by(received.size);
                crate::indexing::spawn(
                    &app,
                    attempt,
                    received.sha256.clone(),
                    job.facts.limits.output_size,
                );
                return Ok((
                    StatusCode::CREATED,
                    Json(Uploaded {
                        sha256: received.sha256,
                        size: received.size,
                    }),
                )
                    .into_response());
            }
            SetOutput::AlreadySet(sha, size) => return Err(already_uploaded(attempt, &sha, size)),
            SetOutput::JobChanged => continue,
        }
    }
    Err(Refusal::new(
        codes::TOO_MANY_REQUESTS,
        "the job kept changing under this upload; send it again",
    ))
}

/// The output uploads in flight in this server process, by app and attempt (an app is one
/// server; tests run many in one process, each numbering its attempts from 1). In process only:
/// several server processes on one database would need a marker in the database (an
/// `upload_started_ms` on the attempt, set only where it is NULL or stale) to hold the same rule
/// across them.
static UPLOADS: std::sync::Mutex<std::collections::BTreeSet<(usize, u64)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The one upload under way of an attempt; the attempt is free for another when this drops,
/// however the upload ended (taken, refused, cut off, its request dropped).
struct UploadInFlight((usize, u64));

impl UploadInFlight {
    fn begin(app: &Shared, attempt: AttemptId) -> Result<UploadInFlight, Refusal> {
        let key = (std::sync::Arc::as_ptr(app) as usize, attempt.0);
        let mut uploads = UPLOADS.lock().unwrap_or_else(|p| p.into_inner());
        if !uploads.insert(key) {
            return Err(Refusal::new(
                codes::WRONG_STATE,
                format!(
                    "an upload of this attempt is under way (attempt {attempt}): one at a time; \
                     wait for its answer"
                ),
            ));
        }
        Ok(UploadInFlight(key))
    }
}

impl Drop for UploadInFlight {
    fn drop(&mut self) {
        let mut uploads = UPLOADS.lock().unwrap_or_else(|p| p.into_inner());
        uploads.remove(&self.0);
    }
}

/// One output per attempt: a second upload is refused, saying what the first one was (a
/// runner whose first answer was lost compares it with its own).
fn already_uploaded(attempt: AttemptId, sha256: &str, size: u64) -> Refusal {
    Refusal::new(
        codes::WRONG_STATE,
        format!(
            "attempt {attempt} has uploaded its output already (sha256 {sha256}, {size} bytes): \
             one output per attempt"
        ),
    )
}

/// What the server stored of an upload (its own hash of it).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Uploaded {
    pub sha256: String,
    pub size: u64,
}

#[utoipa::path(post, path = "/api/v1/runner/attempts/{id}/report", tag = "attempts", params(("id" = u64, Path, description = "the attempt")), request_body = ReportRequest,
    responses((status = 200, description = "taken (late if the lease had lapsed)", body = AttemptView), (status = 409, description = "already reported, or past the late window", body = ApiError), (status = 422, description = "output_sha256 is not the output the server received", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn report(
    State(app): State<Shared>,
    who: AttemptCaller,
    Json(report): Json<ReportRequest>,
) -> Result<Json<AttemptView>, Refusal> {
    report
        .validate()
        .map_err(|e| Refusal::new(codes::INVALID_PARAMS, e.to_string()))?;
    let attempt = who.attempt;
    // The job as it is before the report: what the output rule and the statement are checked
    // against (the step itself reads it again, under its version).
    let stored = app
        .db
        .load_job(who.job)
        .await?
        .ok_or_else(|| Refusal::new(codes::NOT_FOUND, "no such job"))?;
    // An output is set once, so what is read here cannot change under the report.
    let received = app.db.attempt_output(attempt).await?;
    let why = match (&report.output_sha256, &received) {
        (Some(theirs), Some((ours, _))) if ours == theirs => None,
        (Some(theirs), Some((ours, size))) => Some(format!(
            "the report names the output {theirs}, but the server received and hashed {ours} \
             ({size} bytes) for attempt {attempt}"
        )),
        (Some(theirs), None) => Some(format!(
            "the report names the output {theirs}, but the server has received no output for \
             attempt {attempt}"
        )),
        // Else its vote would say "no output" while the job's output, if it won, would be what
        // it uploaded. (A job of one replica takes the report of a runner from before reports
        // named their output.)
        (None, Some((ours, size))) if stored.snapshot.policy.replicated() => Some(format!(
            "the server received an output for attempt {attempt} ({ours}, {size} bytes), and \
             the report must name it"
        )),
        (None, _) => None,
    };
    if let Some(why) = why {
        return Err(Refusal::new(
            codes::INVALID_PARAMS,
            format!("output_sha256: {why}; nothing was recorded"),
        ));
    }
    // The statement is checked against the records before anything is applied, and kept with
    // the step that takes the report (a refused report keeps nothing).
    let snapshot = stored
        .snapshot
        .attempt(attempt)
        .ok_or_else(|| Refusal::new(codes::NOT_FOUND, "no such attempt"))?;
    let runner_key = app.db.runner_key(snapshot.runner).await?;
    let console = app.db.console_size(attempt).await?;
    let statement =
        crate::statements::check(&stored, snapshot, &report, runner_key.as_deref(), console)?;
    let (job, _) = app
        .apply_keeping(
            who.job,
            |_| Event::Report {
                attempt,
                report: report.clone(),
            },
            statement.as_deref().map(|json| (attempt, json)),
        )
        .await?;
    // Its output may have been indexed before the report came: the vote is counted now.
    if let Err(e) = crate::indexing::tell_job(&app, attempt).await {
        // The housekeeping tells it later; the report itself is taken.
        tracing::warn!("attempt {attempt}: counting its vote: {e}");
    }
    tracing::info!(
        "job {} attempt {attempt} reported {}",
        who.job,
        report.status.as_str()
    );
    let blobs = app.db.attempt_blobs(who.job).await?;
    let a = job
        .snapshot
        .attempt(attempt)
        .ok_or_else(|| Refusal::new(codes::NOT_FOUND, "no such attempt"))?;
    Ok(Json(a.view(
        blobs.get(&attempt).cloned().unwrap_or_default(),
        &job.snapshot.policy,
    )))
}

#[utoipa::path(post, path = "/api/v1/runner/attempts/{id}/abort", tag = "attempts", params(("id" = u64, Path, description = "the attempt")), request_body = AbortRequest,
    responses((status = 200, description = "aborted: the job is queued again, not blamed"), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn abort(
    State(app): State<Shared>,
    who: AttemptCaller,
    Json(req): Json<AbortRequest>,
) -> Result<Json<serde_json::Value>, Refusal> {
    req.validate()
        .map_err(|e| Refusal::new(codes::INVALID_PARAMS, e.to_string()))?;
    let attempt = who.attempt;
    app.apply(who.job, |_| Event::Abort {
        attempt,
        reason: req.reason.clone(),
    })
    .await?;
    tracing::info!("job {} attempt {attempt} aborted: {}", who.job, req.reason);
    Ok(Json(serde_json::json!({"aborted": attempt})))
}
