//! The runners' side of the API. A runner's own token (role `runner`) only registers and claims;
//! each claimed attempt gets a token of its own, good for that attempt's calls while it lives.
//! Claims are long polls: a runner waits up to 30 s in one request and gets a new job within
//! milliseconds of its submission.

use crate::db::now_ms;
use crate::http::{Caller, Refusal};
use crate::jobs::StoredJob;
use crate::service::Shared;
use crate::tokens;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use construir_api::fit::fits;
use construir_api::log::{AppendKind, plan_append};
use construir_api::state::Event;
use construir_api::types::{
    AbortRequest, AttemptId, AttemptView, ClaimRequest, ClaimResponse, HeartbeatRequest,
    HeartbeatResponse, JobId, LogOffsetResponse, ReportRequest, RunnerId, UserId,
};
use construir_api::{ApiError, codes};
use std::collections::HashSet;
use std::time::Duration;

/// A console piece is at most this large.
pub const LOG_PIECE_LIMIT: usize = 1 << 20;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/runner/register", post(register))
        .route("/runner/claim", post(claim))
        .route("/runner/attempts/{id}/job", get(job_file))
        .route("/runner/attempts/{id}/start", post(start))
        .route("/runner/attempts/{id}/heartbeat", post(heartbeat))
        .route("/runner/attempts/{id}/log", patch(append_log))
        .route("/runner/attempts/{id}/output", put(upload_output))
        .route("/runner/attempts/{id}/report", post(report))
        .route("/runner/attempts/{id}/abort", post(abort))
}

fn must_be_runner(caller: &Caller) -> Result<(), Refusal> {
    if caller.0.role == "runner" {
        Ok(())
    } else {
        Err(Refusal::new(
            codes::FORBIDDEN,
            "this call needs a runner token",
        ))
    }
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    name: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    runner_id: RunnerId,
}

#[utoipa::path(post, path = "/api/v1/runner/register", tag = "runners", request_body = RegisterRequest,
    responses((status = 200, description = "the runner's id", body = RegisterResponse), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn register(
    State(app): State<Shared>,
    caller: Caller,
    Json(req): Json<RegisterRequest>,
) -> Result<Json<RegisterResponse>, Refusal> {
    must_be_runner(&caller)?;
    let ok = !req.name.is_empty()
        && req.name.len() <= 64
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        return Err(Refusal::new(
            codes::INVALID_PARAMS,
            "name: 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    let runner_id = app.db.register_runner(caller.0.user_id, &req.name).await?;
    tracing::info!(
        "runner {runner_id} ({}) of {} registered",
        req.name,
        caller.0.user
    );
    Ok(Json(RegisterResponse { runner_id }))
}

/// The runner a claim is for: the `Construir-Runner` header, one of the caller's runners.
fn runner_header(headers: &HeaderMap) -> Result<RunnerId, Refusal> {
    headers
        .get("Construir-Runner")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Refusal::new(
                codes::BAD_REQUEST,
                "no Construir-Runner header (the runner id from /runner/register)",
            )
        })
}

#[utoipa::path(post, path = "/api/v1/runner/claim", tag = "runners", request_body = ClaimRequest,
    params(("Construir-Runner" = u64, Header, description = "the runner id from /runner/register")),
    responses((status = 200, description = "an attempt to run", body = ClaimResponse), (status = 204, description = "no job came within wait_s"), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn claim(
    State(app): State<Shared>,
    caller: Caller,
    headers: HeaderMap,
    Json(req): Json<ClaimRequest>,
) -> Result<Response, Refusal> {
    must_be_runner(&caller)?;
    req.validate()
        .map_err(|e| Refusal::new(codes::INVALID_PARAMS, e.to_string()))?;
    let runner = runner_header(&headers)?;
    let caps_json = serde_json::to_string(&req.capabilities).unwrap_or_default();
    let owner = app
        .db
        .runner_seen(runner, caller.0.user_id, &caps_json)
        .await?;
    if owner != Some(caller.0.user_id) {
        return Err(Refusal::new(
            codes::FORBIDDEN,
            format!("runner {runner} is not this token's"),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(req.wait_s));
    loop {
        // Registered before looking, so a submission between the look and the wait still wakes.
        let woken = app.work.notified();
        if let Some(resp) = try_claim(&app, runner, &req).await? {
            return Ok(Json(resp).into_response());
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// One pass over the claimable jobs, fairly across owners: the owner with the fewest jobs
/// running goes first (one owner's thousand queued jobs do not starve another's one), then
/// priority and age within an owner. Jobs this runner cannot take are skipped; one no runner
/// could take says why.
pub async fn try_claim(
    app: &Shared,
    runner: RunnerId,
    req: &ClaimRequest,
) -> Result<Option<ClaimResponse>, Refusal> {
    if req.capabilities.free_slots == 0 {
        return Ok(None);
    }
    let now = now_ms() as u64;
    let candidates = app.db.claimable(now).await?;
    let running = app.db.running_per_owner().await?;
    let mut order: Vec<(u64, usize, JobId)> = Vec::new();
    let mut seen: HashSet<UserId> = HashSet::new();
    let mut rank_in_owner = std::collections::HashMap::<UserId, u64>::new();
    for (i, (id, owner, _)) in candidates.iter().enumerate() {
        let n = rank_in_owner.entry(*owner).or_default();
        // Round robin: an owner's k-th job comes after every owner's (k-1)-th.
        order.push((running.get(owner).copied().unwrap_or(0) + *n, i, *id));
        *n += 1;
        seen.insert(*owner);
    }
    order.sort();
    for (_, _, id) in order {
        let Some(job) = app.db.load_job(id).await? else {
            continue;
        };
        if let Err(misfit) = fits(
            &job.facts.image,
            job.facts.size,
            &job.facts.limits,
            &req.capabilities,
        ) {
            if !misfit.is_temporary() && job.snapshot.reason != misfit.to_string() {
                let why = misfit.to_string();
                let _ = app
                    .apply(id, |_| Event::Unschedulable { why: why.clone() })
                    .await;
            }
            continue;
        }
        let token = tokens::generate().map_err(|e| Refusal::new(codes::INTERNAL, e.to_string()))?;
        let attempt = app
            .db
            .insert_attempt(id, runner, &tokens::digest(&token))
            .await?;
        let settings = app.step_settings();
        let claimed = app
            .apply(id, |_| {
                let (lease_until_ms, accept_by_ms) = settings.claim_deadlines(now_ms() as u64);
                Event::Claim {
                    attempt,
                    runner,
                    lease_until_ms,
                    accept_by_ms,
                }
            })
            .await;
        match claimed {
            Ok((job, _)) => {
                let a = job
                    .snapshot
                    .attempt(attempt)
                    .ok_or_else(|| Refusal::new(codes::INTERNAL, "the claimed attempt vanished"))?;
                tracing::info!("job {id} claimed by runner {runner} as attempt {attempt}");
                return Ok(Some(ClaimResponse {
                    attempt_id: attempt,
                    attempt_token: token,
                    job_id: id,
                    job_name: job.facts.name.clone(),
                    image: job.facts.image.clone(),
                    sha256: job.facts.sha256.clone(),
                    size: job.facts.size,
                    limits: job.facts.limits,
                    accept_by_ms: a.accept_by_ms,
                    lease_until_ms: a.lease_until_ms,
                    heartbeat_interval_s: (settings.lease_ms / 3000).max(1),
                    lease_s: settings.lease_ms / 1000,
                }));
            }
            Err(_) => {
                // Someone else got it first, or its back-off began: the next one.
                app.db.drop_attempt(attempt).await?;
            }
        }
    }
    Ok(None)
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
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| tokens::well_formed(t))
            .ok_or_else(|| unauthorized("no attempt token (Authorization: Bearer TOKEN)"))?;
        let (attempt, job) = app
            .db
            .attempt_by_token(&tokens::digest(token))
            .await?
            .ok_or_else(|| unauthorized("not an attempt token"))?;
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

async fn live_job(app: &Shared, who: &AttemptCaller) -> Result<StoredJob, Refusal> {
    let job = app
        .db
        .load_job(who.job)
        .await?
        .ok_or_else(|| Refusal::new(codes::NOT_FOUND, "no such job"))?;
    match job.snapshot.attempt(who.attempt) {
        Some(a) if a.state.is_live() => Ok(job),
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
        .map_err(|_| {
            Refusal::new(
                codes::BAD_REQUEST,
                format!("a console piece is at most {LOG_PIECE_LIMIT} bytes"),
            )
        })?;
    for _ in 0..10 {
        let received = app.db.console_size(who.attempt).await?;
        let plan = plan_append(
            received,
            q.offset,
            piece.len() as u64,
            job.facts.limits.console_cap,
        );
        let answer = |status: u16, next: u64| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            (status, Json(LogOffsetResponse { next_offset: next })).into_response()
        };
        if plan.kind != AppendKind::Appended {
            return Ok(answer(plan.kind.http_status(), plan.next_offset));
        }
        let keep = &piece[plan.skip as usize..(plan.skip + plan.keep) as usize];
        if app
            .db
            .append_log(who.attempt, received, plan.write_at, keep, plan.next_offset)
            .await?
        {
            app.changed.notify_waiters();
            return Ok(answer(plan.kind.http_status(), plan.next_offset));
        }
    }
    Err(Refusal::new(
        codes::TOO_MANY_REQUESTS,
        "the console changed under this piece; send it again",
    ))
}

#[utoipa::path(put, path = "/api/v1/runner/attempts/{id}/output", tag = "attempts", params(("id" = u64, Path, description = "the attempt")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the output archive, cut at its end"),
    responses((status = 201, description = "stored; the server's own hash", body = Uploaded), (status = 413, description = "past the job's output limit", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("attempt_token" = [])))]
pub async fn upload_output(
    State(app): State<Shared>,
    who: AttemptCaller,
    body: Body,
) -> Result<Response, Refusal> {
    let job = live_job(&app, &who).await?;
    let attempt = who.attempt;
    if job
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
    app.db
        .set_output(attempt, &received.sha256, received.size)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"sha256": received.sha256, "size": received.size})),
    )
        .into_response())
}

/// What the server stored of an upload (its own hash of it).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Uploaded {
    pub sha256: String,
    pub size: u64,
}

#[utoipa::path(post, path = "/api/v1/runner/attempts/{id}/report", tag = "attempts", params(("id" = u64, Path, description = "the attempt")), request_body = ReportRequest,
    responses((status = 200, description = "taken (late if the lease had lapsed)", body = AttemptView), (status = 409, description = "already reported", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
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
    let (job, _) = app
        .apply(who.job, |_| Event::Report {
            attempt,
            report: report.clone(),
        })
        .await?;
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
    Ok(Json(
        a.view(blobs.get(&attempt).cloned().unwrap_or_default()),
    ))
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
