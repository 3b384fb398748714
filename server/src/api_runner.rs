//! The runners' side of the API. A runner's own token (role `runner`) only registers and claims;
//! each claimed attempt gets a token of its own, good for that attempt's calls while it lives.
//! Claims are long polls: a runner waits up to 30 s in one request and gets a new job within
//! milliseconds of its submission.

use crate::db::now_ms;
use crate::http::{Caller, Refusal};
use crate::jobs::{RunnerCap, SetOutput, StoredJob};
use crate::service::{Shared, Topic};
use crate::tokens;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use construir_api::fit::fits;
use construir_api::log::AppendKind;
use construir_api::state::{Access, Event, Refusal as StepRefusal, step};
use construir_api::types::{
    AbortRequest, AttemptId, AttemptView, ClaimRequest, ClaimResponse, HeartbeatRequest,
    HeartbeatResponse, JobId, LogOffsetResponse, ReportRequest, RunnerId, UserId,
};
use construir_api::{ApiError, codes};
use std::collections::HashSet;
use std::time::Duration;

/// A console piece is at most this large.
pub const LOG_PIECE_LIMIT: usize = 1 << 20;

/// The most claimed, not yet started attempts one runner may hold, however many slots it
/// declares: an honest runner starts each claim within moments, so more than a few waiting are
/// claims it does not use (and each would hold a job for an accept window).
pub const MAX_UNSTARTED_PER_RUNNER: u32 = 4;

/// What a runner that has declared `slots` job slots may hold at once.
pub fn runner_cap(runner: RunnerId, slots: u32) -> RunnerCap {
    RunnerCap {
        runner,
        live: slots,
        unstarted: slots.clamp(1, MAX_UNSTARTED_PER_RUNNER),
    }
}

fn step_refusal(r: StepRefusal) -> Refusal {
    Refusal(ApiError::from(&r))
}

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
    responses((status = 200, description = "an attempt to run", body = ClaimResponse), (status = 204, description = "no job came within wait_s"), (status = 429, description = "the runner holds as many live attempts as the job slots it declared, or its token holds too many open long polls", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn claim(
    State(app): State<Shared>,
    caller: Caller,
    // Held for the whole long poll: a token's open polls are capped (429).
    _poll: crate::polls::LongPoll,
    headers: HeaderMap,
    Json(req): Json<ClaimRequest>,
) -> Result<Response, Refusal> {
    must_be_runner(&caller)?;
    req.validate()
        .map_err(|e| Refusal::new(codes::INVALID_PARAMS, e.to_string()))?;
    let runner = runner_header(&headers)?;
    let caps_json = serde_json::to_string(&req.capabilities).unwrap_or_default();
    let slots = app
        .db
        .runner_seen(
            runner,
            caller.0.user_id,
            &caps_json,
            req.capabilities.free_slots,
        )
        .await?
        .ok_or_else(|| {
            Refusal::new(
                codes::FORBIDDEN,
                format!("runner {runner} is not this token's"),
            )
        })?;
    let cap = runner_cap(runner, slots);
    // Once per claim: the jobs one of these claimed and did not start are not handed to any.
    let own = app.db.runners_of(caller.0.user_id).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(req.wait_s));
    let mut raced_passes = 0;
    loop {
        // Registered before looking, so a submission between the look and the wait still wakes.
        let woken = app.work.notified();
        let load = app.db.runner_load(runner).await?;
        if load.live >= cap.live && req.capabilities.free_slots > 0 {
            // It says it has room, yet holds as many attempts as it ever said it had slots.
            return Err(Refusal::new(
                codes::TOO_MANY_REQUESTS,
                format!(
                    "runner {runner} holds {} live attempts, as many as the {} job slots it \
                     declared: finish, report or abort one before claiming another (a runner \
                     restarted under the same name waits for its old attempts to lapse)",
                    load.live, cap.live
                ),
            ));
        }
        let claimed = if load.unstarted >= cap.unstarted {
            Claimed::AtCap
        } else {
            try_claim(&app, runner, caller.0.token_id, &req, cap, &own).await?
        };
        let more = match claimed {
            Claimed::Got(resp) => return Ok(Json(*resp).into_response()),
            // Every job it looked at went to concurrent claims: there may be more behind them,
            // so look again at once rather than wait for a wake-up with work queued.
            Claimed::Raced if raced_passes < 20 => {
                raced_passes += 1;
                true
            }
            Claimed::Nothing | Claimed::Raced => tokio::select! {
                woke = tokio::time::timeout_at(deadline, woken) => woke.is_ok(),
                () = app.stopped() => false,
            },
            Claimed::AtCap => tokio::select! {
                more = wait_for_starts(&app, cap, deadline) => more?,
                () = app.stopped() => false,
            },
        };
        if !more || app.is_stopping() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// Waits until one of the runner's unstarted attempts changes (it starts, lapses or is given
/// up: a step of its job) or `deadline` comes; false at the deadline.
async fn wait_for_starts(
    app: &Shared,
    cap: RunnerCap,
    deadline: tokio::time::Instant,
) -> Result<bool, Refusal> {
    let jobs = app.db.unstarted_jobs(cap.runner).await?;
    let watches: Vec<_> = jobs
        .iter()
        .map(|id| app.watchers.watch(Topic::Job(*id)))
        .collect();
    // Looked at again once watched, so a start between the first look and the watch is seen.
    if app.db.runner_load(cap.runner).await?.unstarted < cap.unstarted {
        return Ok(true);
    }
    if watches.is_empty() {
        // Its attempts changed between the two looks: look again soon, not at once.
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        tokio::time::sleep_until(soon.min(deadline)).await;
        return Ok(soon < deadline);
    }
    let waits = watches.iter().map(|w| Box::pin(w.notified()));
    Ok(
        tokio::time::timeout_at(deadline, futures::future::select_all(waits))
            .await
            .is_ok(),
    )
}

/// What one pass over the claimable jobs gave a runner.
pub enum Claimed {
    Got(Box<ClaimResponse>),
    /// Nothing it can take now.
    Nothing,
    /// Nothing, but only because concurrent claims took what it would have taken.
    Raced,
    /// It holds as many attempts (or unstarted ones) as it may.
    AtCap,
}

/// One pass over the claimable jobs, fairly across owners: the owner with the fewest jobs
/// running goes first (one owner's thousand queued jobs do not starve another's one), then
/// priority and age within an owner. Jobs this runner cannot take are skipped; one no runner
/// could take says why. So is a job that one of `own` (the runners of this runner's user, all
/// its names) claimed and did not start: it went back to the queue at once and costs no try,
/// so handing it to the same user again would let one user cycle it into `errored` (the state
/// machine bars the same runner; this bars the user's other names too). The claim is stored
/// only while the runner is within `cap`.
pub async fn try_claim(
    app: &Shared,
    runner: RunnerId,
    claim_token: i64,
    req: &ClaimRequest,
    cap: RunnerCap,
    own: &HashSet<RunnerId>,
) -> Result<Claimed, Refusal> {
    if req.capabilities.free_slots == 0 {
        return Ok(Claimed::Nothing);
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
    let mut lost_any = false;
    for (_, _, id) in order {
        let Some(job) = app.db.load_job(id).await? else {
            continue;
        };
        // (A live one, if the job was claimed since it was listed, fails the claim anyway.)
        let not_started_by_own = |a: &construir_api::state::AttemptSnapshot| {
            a.started_ms.is_none() && own.contains(&a.runner)
        };
        if job.snapshot.attempts.iter().any(not_started_by_own) {
            continue;
        }
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
            .insert_attempt(id, runner, &tokens::digest(&token), claim_token)
            .await?;
        let settings = app.step_settings();
        let job = match claim_job(app, id, attempt, runner, cap).await? {
            ClaimStep::Claimed(job) => job,
            ClaimStep::Lost => {
                // Someone else got it first, or its back-off began: the next one.
                app.db.drop_attempt(attempt).await?;
                lost_any = true;
                continue;
            }
            ClaimStep::AtCap => {
                app.db.drop_attempt(attempt).await?;
                return Ok(Claimed::AtCap);
            }
        };
        let a = job
            .snapshot
            .attempt(attempt)
            .ok_or_else(|| Refusal::new(codes::INTERNAL, "the claimed attempt vanished"))?;
        tracing::info!("job {id} claimed by runner {runner} as attempt {attempt}");
        return Ok(Claimed::Got(Box::new(ClaimResponse {
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
        })));
    }
    Ok(if lost_any {
        Claimed::Raced
    } else {
        Claimed::Nothing
    })
}

enum ClaimStep {
    Claimed(Box<StoredJob>),
    /// The job is not claimable (any more).
    Lost,
    AtCap,
}

/// Applies `Claim` to job `id` for `attempt`, stored only if the job is unchanged since it was
/// read and the runner is still within `cap` (one statement: concurrent claims of one runner
/// cannot all pass the count).
async fn claim_job(
    app: &Shared,
    id: JobId,
    attempt: AttemptId,
    runner: RunnerId,
    cap: RunnerCap,
) -> Result<ClaimStep, Refusal> {
    let settings = app.step_settings();
    for _ in 0..5 {
        let Some(mut job) = app.db.load_job(id).await? else {
            return Ok(ClaimStep::Lost);
        };
        let now = now_ms() as u64;
        let (lease_until_ms, accept_by_ms) = settings.claim_deadlines(now);
        let event = Event::Claim {
            attempt,
            runner,
            lease_until_ms,
            accept_by_ms,
        };
        let Ok(t) = step(&job.snapshot, &settings, now, &event) else {
            return Ok(ClaimStep::Lost);
        };
        if app
            .db
            .store_job_within(id, job.version, &t.job, Some(cap))
            .await?
        {
            job.snapshot = t.job;
            job.version += 1;
            // The job's log followers learn of the new attempt at once.
            app.stored(&job, &t.effects);
            return Ok(ClaimStep::Claimed(Box::new(job)));
        }
        let load = app.db.runner_load(runner).await?;
        if load.live >= cap.live || load.unstarted >= cap.unstarted {
            return Ok(ClaimStep::AtCap);
        }
        // The job was written meanwhile: look at it again.
    }
    Ok(ClaimStep::Lost)
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
            let why = if crate::http::past_limit(&e) {
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
                app.watchers
                    .wake(crate::service::Topic::Console(who.attempt));
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
            )
            .await?
        {
            SetOutput::Stored => {
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
    if let Some(theirs) = &report.output_sha256 {
        // An output is set once, so what is read here cannot change under the report.
        let why = match app.db.attempt_output(attempt).await? {
            Some((ours, _)) if ours == *theirs => None,
            Some((ours, size)) => Some(format!(
                "the server received and hashed {ours} ({size} bytes) for attempt {attempt}"
            )),
            None => Some(format!(
                "the server has received no output for attempt {attempt}"
            )),
        };
        if let Some(why) = why {
            return Err(Refusal::new(
                codes::INVALID_PARAMS,
                format!(
                    "output_sha256: the report names the output {theirs}, but {why}; nothing \
                     was recorded"
                ),
            ));
        }
    }
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
