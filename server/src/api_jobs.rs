//! The submitters' side of the API: submit a job file, follow it, read its console and output,
//! cancel it. A submitter sees its own jobs; an admin sees every job.

use crate::db::now_ms;
use crate::http::{Caller, Refusal};
use crate::jobs::{NewJob, StoredJob};
use crate::service::Shared;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use construir_api::state::{Event, JobPolicy, JobSnapshot};
use construir_api::types::{AttemptId, JobId, JobLimits, JobView, SubmitParams, UserId};
use construir_api::{ApiError, codes};
use construir_contract::jobname::parse_job_name;
use std::time::Duration;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/jobs", post(submit).get(list))
        .route("/jobs/{id}", get(show))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/log", get(log))
        .route("/jobs/{id}/output", get(output))
        .route("/jobs/{id}/output/index", get(output_index))
        .route("/jobs/{id}/receipt", get(crate::receipts::receipt))
}

fn may_submit(caller: &Caller) -> Result<(), Refusal> {
    match caller.0.role.as_str() {
        "submitter" | "admin" => Ok(()),
        _ => Err(Refusal::new(
            codes::FORBIDDEN,
            "this token may not submit or read jobs (it is a runner's)",
        )),
    }
}

/// The job, if the caller may see it (a public job, or a private one of theirs; see
/// [`crate::access`]).
pub async fn visible(app: &Shared, caller: &Caller, id: JobId) -> Result<StoredJob, Refusal> {
    may_submit(caller)?;
    crate::access::seen_job(app, crate::access::Viewer::of(caller), id).await
}

pub async fn view(app: &Shared, job: &StoredJob) -> Result<JobView, Refusal> {
    let blobs = app.db.attempt_blobs(job.facts.id).await?;
    Ok(job.snapshot.view(job.facts.clone(), |a| {
        blobs.get(&a).cloned().unwrap_or_default()
    }))
}

/// The submission's query: the job file's name and the [`SubmitParams`] asked for (checked by
/// `SubmitParams::resolve`). Not flattened: query values arrive as strings, which serde's
/// flatten cannot turn into numbers.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SubmitQuery {
    name: String,
    image: Option<String>,
    timeout_s: Option<u64>,
    output_size: Option<u64>,
    console_cap: Option<u64>,
    memory_mib: Option<u32>,
    vcpus: Option<u32>,
    priority: Option<i32>,
    replicas: Option<u32>,
    quorum: Option<u32>,
    own_runners: Option<bool>,
    any_class: Option<bool>,
    adaptive: Option<bool>,
    private: Option<bool>,
}

#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", params(SubmitQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the job file"),
    responses((status = 201, description = "the job, queued", body = JobView),
        (status = 413, description = "the job file is too big", body = ApiError), (status = 429, description = "the user has as many jobs queued as the server takes from one user", body = ApiError),
        (status = 422, description = "a bad name or limit", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn submit(
    State(app): State<Shared>,
    caller: Caller,
    Query(q): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    may_submit(&caller)?;
    let params = SubmitParams {
        image: q.image.clone(),
        timeout_s: q.timeout_s,
        output_size: q.output_size,
        console_cap: q.console_cap,
        memory_mib: q.memory_mib,
        vcpus: q.vcpus,
        priority: q.priority.unwrap_or(0),
        replicas: q.replicas,
        quorum: q.quorum,
        own_runners: q.own_runners.unwrap_or(false),
        any_class: q.any_class.unwrap_or(false),
        adaptive: q.adaptive.unwrap_or(false),
        private: q.private,
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let owner = UserId(caller.0.user_id as u64);
    let job = submit_job(&app, owner, &q.name, &params, declared, body).await?;
    tracing::info!(
        "job {} ({}) submitted by {}",
        job.facts.id,
        q.name,
        caller.0.user
    );
    Ok((StatusCode::CREATED, Json(view(&app, &job).await?)).into_response())
}

/// The server's limits for a submission: its maxima, and defaults never above them (an
/// operator may lower them).
pub fn limits_for(app: &Shared) -> (JobLimits, JobLimits) {
    let server_max = JobLimits {
        output_size: app.settings.max_output_size,
        ..JobLimits::DEFAULT_SERVER_MAX
    };
    let defaults = JobLimits {
        output_size: JobLimits::DEFAULT.output_size.min(server_max.output_size),
        ..JobLimits::DEFAULT
    };
    (defaults, server_max)
}

/// Refuses a submission from `owner` past the server's cap of queued jobs per user (one user's
/// flood waits in their own queue, not in the server's disk), or one whose `incoming` bytes
/// would take the user past the bytes they may keep stored.
async fn within_quotas(app: &Shared, owner: UserId, incoming: u64) -> Result<(), Refusal> {
    let queued = app.db.queued_of(owner).await?;
    if queued >= app.settings.max_queued_per_user {
        return Err(Refusal::new(
            codes::TOO_MANY_REQUESTS,
            format!(
                "you have {queued} jobs queued, the most this server takes from one user; \
                 submit more when some have run"
            ),
        ));
    }
    within_storage(app, owner, incoming).await
}

/// Refuses `incoming` bytes more for `owner` past `--max-stored-per-user`.
async fn within_storage(app: &Shared, owner: UserId, incoming: u64) -> Result<(), Refusal> {
    let quota = app.settings.max_stored_per_user;
    if quota == 0 {
        return Ok(());
    }
    let stored = app.db.stored_of(owner).await?;
    if stored.saturating_add(incoming) > quota {
        return Err(Refusal::new(
            codes::QUOTA_EXCEEDED,
            format!(
                "you keep {stored} bytes stored (job files, outputs, consoles) and this job \
                 brings {incoming}: past the {quota} bytes this server keeps for one user; \
                 delete jobs or wait for retention to free some"
            ),
        ));
    }
    Ok(())
}

/// What a submission is refused for before its body is read: a bad name, bad limits, a full
/// queue.
pub async fn precheck(
    app: &Shared,
    owner: UserId,
    job_name: &str,
    params: &SubmitParams,
) -> Result<(), Refusal> {
    parse_job_name(job_name).map_err(|e| Refusal::new(codes::BAD_JOB_NAME, e.to_string()))?;
    let (defaults, server_max) = limits_for(app);
    params
        .resolve(&defaults, &server_max)
        .map_err(|e| Refusal::new(codes::INVALID_PARAMS, e.to_string()))?;
    within_quotas(app, owner, 0).await
}

/// A submission, from the API or the website: the name and parameters checked, the body
/// received within the server's cap (`declared`: its Content-Length, refused at once when
/// past the cap), checked to be a job, published, and the job stored and queued.
pub async fn submit_job(
    app: &Shared,
    owner: UserId,
    job_name: &str,
    params: &SubmitParams,
    declared: Option<u64>,
    body: Body,
) -> Result<StoredJob, Refusal> {
    let name =
        parse_job_name(job_name).map_err(|e| Refusal::new(codes::BAD_JOB_NAME, e.to_string()))?;
    let (defaults, server_max) = limits_for(app);
    let limits = params
        .resolve(&defaults, &server_max)
        .map_err(|e| Refusal::new(codes::INVALID_PARAMS, e.to_string()))?;
    // Refused before the body is read (as far as its declared size tells).
    within_quotas(app, owner, declared.unwrap_or(0)).await?;
    let max = app.settings.max_job_size;
    if let Some(n) = declared.filter(|n| *n > max) {
        return Err(Refusal::new(
            codes::JOB_TOO_BIG,
            format!("the job file is {n} bytes; this server takes at most {max}"),
        ));
    }
    let received = app.blobs.receive(body, max).await.map_err(|e| match e {
        crate::blobs::BlobError::TooBig { limit } => Refusal::new(
            codes::JOB_TOO_BIG,
            format!("the job file is larger than this server takes ({limit} bytes)"),
        ),
        other => other.into(),
    })?;
    // A job is refused at the door when it is not one: no archive, no opt/job/construir.
    let path = received.file.to_path_buf();
    let _turn = DOOR_CHECKS
        .acquire()
        .await
        .map_err(|_| Refusal::new(codes::INTERNAL, "the server is stopping"))?;
    let checked = tokio::task::spawn_blocking(move || check_job_file(&path))
        .await
        .map_err(|e| Refusal::new(codes::INTERNAL, format!("checking the job: {e}")))?;
    checked.map_err(|why| Refusal::new(codes::BAD_REQUEST, why))?;
    if declared.is_none() {
        // Its size is known only now.
        within_storage(app, owner, received.size).await?;
    }
    app.blobs.publish(&received).await?;
    let (replicas, quorum) = params
        .replication()
        .map_err(|e| Refusal::new(codes::INVALID_PARAMS, e.to_string()))?;
    let policy = JobPolicy {
        max_tries: app.settings.max_tries,
        ttl_ms: app.settings.job_ttl.as_millis() as u64,
        timeout_ms: limits.timeout_s * 1000,
        replicas,
        quorum,
        max_votes: 0,
        owner,
        own_runners: params.own_runners,
        any_class: params.any_class,
        adaptive: params.adaptive,
    };
    let image = params.image.clone().unwrap_or(name.image);
    // Pinned to the digest its index names now, if the index was published (`image publish`);
    // a job of an unpublished index runs on the runners' own image of that index.
    let image_digest = app.db.current_image(&image).await?;
    let new = NewJob {
        owner,
        name: job_name.to_string(),
        image,
        image_digest,
        sha256: received.sha256.clone(),
        size: received.size,
        limits,
        priority: params.priority,
        private: params.private.unwrap_or(true),
    };
    enqueue(app, &new, policy).await
}

/// Stores a new job with `policy` and queues it (the runners' long polls wake).
async fn enqueue(app: &Shared, new: &NewJob, policy: JobPolicy) -> Result<StoredJob, Refusal> {
    let now = now_ms() as u64;
    let t = JobSnapshot::submitted(policy, now);
    let id = app.db.insert_job(new, &t.job).await?;
    app.metrics.submissions.inc();
    app.carry_out(&t.effects);
    app.db
        .load_job(id)
        .await?
        .ok_or_else(|| Refusal::new(codes::INTERNAL, "the job vanished"))
}

/// `job` again, as a new job of `owner`'s: the same job file, image (and pinned digest),
/// limits and replication; refused when its job file is no longer kept (retention).
pub async fn resubmit(app: &Shared, job: &StoredJob, owner: UserId) -> Result<JobId, Refusal> {
    if app.blobs.info(&job.facts.sha256).await?.is_none() {
        return Err(Refusal::new(
            codes::NOT_FOUND,
            format!(
                "job {}'s job file is no longer kept (see the server's --retention): submit it \
                 again",
                job.facts.id
            ),
        ));
    }
    within_quotas(app, owner, job.facts.size).await?;
    let policy = JobPolicy {
        max_tries: app.settings.max_tries,
        ttl_ms: app.settings.job_ttl.as_millis() as u64,
        owner,
        ..job.snapshot.policy
    };
    let new = NewJob {
        owner,
        name: job.facts.name.clone(),
        image: job.facts.image.clone(),
        image_digest: job.facts.image_digest.clone(),
        sha256: job.facts.sha256.clone(),
        size: job.facts.size,
        limits: job.facts.limits,
        priority: job.facts.priority,
        private: job.facts.private,
    };
    let stored = enqueue(app, &new, policy).await?;
    tracing::info!(
        "job {} resubmitted as job {}",
        job.facts.id,
        stored.facts.id
    );
    Ok(stored.facts.id)
}

/// The door check reads at most this much of a job's decompressed archive: a submitted bomb
/// costs the server a bounded amount of CPU (the VM, not the server, unpacks the real thing).
const DOOR_CHECK_STREAM: u64 = 256 << 20;

/// Door checks at a time (each one is CPU-bound decompression on a blocking thread).
static DOOR_CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Whether a file holds a job: a readable archive with `opt/job/construir`.
fn check_job_file(path: &std::path::Path) -> Result<(), String> {
    use construir_contract::archive::{self, Limits};
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the upload: {e}"))?;
    let limits = Limits {
        max_stream: DOOR_CHECK_STREAM,
        ..Limits::DEFAULT
    };
    let mut script = Vec::new();
    let found = archive::copy_file(
        std::io::BufReader::new(file),
        archive::JOB_SCRIPT,
        1 << 20,
        &limits,
        &mut script,
    );
    match found {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "not a job: the archive has no {}",
            archive::JOB_SCRIPT
        )),
        Err(e) => Err(format!("not a job: {e}")),
    }
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    responses((status = 200, description = "the caller's jobs, newest first", body = Vec<JobView>), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn list(
    State(app): State<Shared>,
    caller: Caller,
) -> Result<Json<Vec<JobView>>, Refusal> {
    may_submit(&caller)?;
    let owner = (caller.0.role != "admin").then_some(UserId(caller.0.user_id as u64));
    let mut out = Vec::new();
    for job in app.db.list_jobs(owner, 200).await? {
        out.push(view(&app, &job).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = u64, Path, description = "the job")),
    responses((status = 200, description = "the job", body = JobView), (status = 404, description = "no such job (of the caller's)", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn show(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, Refusal> {
    let job = visible(&app, &caller, JobId(id)).await?;
    Ok(Json(view(&app, &job).await?))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = u64, Path, description = "the job")),
    responses((status = 200, description = "the job, canceled or being canceled", body = JobView), (status = 409, description = "the job has ended", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn cancel(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, Refusal> {
    may_submit(&caller)?;
    crate::access::owned_job(&app, crate::access::Viewer::of(&caller), JobId(id)).await?;
    let (job, _) = app.apply(JobId(id), |_| Event::Cancel).await?;
    tracing::info!("job {id} canceled by {}", caller.0.user);
    Ok(Json(view(&app, &job).await?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    attempt: Option<u64>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    wait_s: u64,
}

/// Console bytes of an attempt from an offset; waits (a long poll, at most 30 s) for bytes past
/// it while the attempt is live.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/log", tag = "jobs", params(("id" = u64, Path, description = "the job"), LogQuery),
    responses((status = 200, description = "console bytes from the offset; headers Construir-Log-Next and, at the end, Construir-Log-Complete", content_type = "application/octet-stream", body = Vec<u8>), (status = 429, description = "too many long polls open under this token", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn log(
    State(app): State<Shared>,
    caller: Caller,
    // Held for the whole long poll: a token's open polls are capped (429).
    _poll: crate::polls::LongPoll,
    Path(id): Path<u64>,
    Query(q): Query<LogQuery>,
) -> Result<Response, Refusal> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait_s.min(30));
    // A step of this job (an attempt ends, a new one starts) and a piece of the followed
    // attempt's console wake this poll; nothing else in the server does.
    let job_watch = app.watchers.watch(crate::service::Topic::Job(JobId(id)));
    loop {
        // Registered before looking, so a change between the look and the wait still wakes it.
        let job_changed = job_watch.notified();
        let job = visible(&app, &caller, JobId(id)).await?;
        let attempt = match q.attempt {
            Some(a) => job.snapshot.attempt(AttemptId(a)),
            None => job.snapshot.attempts.last(),
        };
        let Some(attempt) = attempt else {
            if tokio::time::Instant::now() >= deadline
                || job.snapshot.state.is_terminal()
                || app.is_stopping()
            {
                return Ok(log_answer(
                    Vec::new(),
                    q.offset,
                    job.snapshot.state.is_terminal(),
                ));
            }
            // Until a runner takes it, also look again every second: a claim stored by a
            // path that does not wake this job's waiters, or by another server on the same
            // data, is seen within a second (one query a second, only while nothing runs).
            let soon = tokio::time::Instant::now() + Duration::from_secs(1);
            tokio::select! {
                () = wait_for_change(soon.min(deadline), job_changed, None) => {}
                () = app.stopped() => {}
            }
            continue;
        };
        let console_watch = app
            .watchers
            .watch(crate::service::Topic::Console(attempt.id));
        let piece_came = console_watch.notified();
        let cap = construir_api::log::ConsoleCap::new(job.facts.limits.console_cap);
        let read =
            crate::logs::read_console(&app.db, &app.blobs, attempt.id, cap, q.offset, 1 << 20)
                .await
                .map_err(|e| {
                    tracing::error!("reading the console of attempt {}: {e}", attempt.id);
                    Refusal::new(codes::INTERNAL, "the server could not read the console")
                })?;
        let ended = !attempt.state.is_live();
        let mut bytes = read.bytes;
        if let crate::logs::ConsoleHome::Deleted { at_ms } = read.home
            && q.offset < read.received
        {
            let room = read.next - q.offset;
            bytes.extend_from_slice(crate::retention::console_deleted_note(at_ms, room).as_bytes());
        }
        if !bytes.is_empty()
            || ended
            || tokio::time::Instant::now() >= deadline
            || app.is_stopping()
        {
            let complete = ended && read.next >= read.received;
            return Ok(log_answer(bytes, read.next, complete));
        }
        tokio::select! {
            () = wait_for_change(deadline, job_changed, Some(piece_came)) => {}
            () = app.stopped() => {}
        }
    }
}

/// Waits until the job changes, a console piece comes (when one is followed), or the deadline.
pub async fn wait_for_change(
    deadline: tokio::time::Instant,
    job_changed: tokio::sync::futures::Notified<'_>,
    piece_came: Option<tokio::sync::futures::Notified<'_>>,
) {
    let piece = async {
        match piece_came {
            Some(p) => p.await,
            None => std::future::pending().await,
        }
    };
    let _ = tokio::time::timeout_at(deadline, async {
        tokio::select! {
            _ = job_changed => {}
            _ = piece => {}
        }
    })
    .await;
}

fn log_answer(bytes: Vec<u8>, next: u64, complete: bool) -> Response {
    let mut r = (StatusCode::OK, bytes).into_response();
    let h = r.headers_mut();
    h.insert("Construir-Log-Next", HeaderValue::from(next));
    if complete {
        h.insert("Construir-Log-Complete", HeaderValue::from_static("true"));
    }
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// The output archive of the attempt whose result stands.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/output", tag = "jobs", params(("id" = u64, Path, description = "the job")),
    responses((status = 200, description = "the output archive of the result attempt (header Construir-Sha256)", content_type = "application/octet-stream", body = Vec<u8>), (status = 404, description = "no output (yet)", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn output(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Response, Refusal> {
    let job = visible(&app, &caller, JobId(id)).await?;
    let none = || Refusal::new(codes::NOT_FOUND, format!("job {id} has no output (yet)"));
    let result = job.snapshot.result_attempt.ok_or_else(none)?;
    let blobs = app.db.attempt_blobs(job.facts.id).await?;
    let sha = blobs
        .get(&result)
        .and_then(|b| b.output_sha256.clone())
        .ok_or_else(none)?;
    let stream = app.blobs.read(&sha).await?;
    let mut r = Body::from_stream(stream).into_response();
    r.headers_mut().insert(
        "Construir-Sha256",
        HeaderValue::from_str(&sha).map_err(|_| none())?,
    );
    Ok(r)
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct IndexQuery {
    /// The attempt (default: the one whose result stands).
    attempt: Option<u64>,
}

/// The index of an attempt's output, as the server made it when the output arrived: every
/// entry with its kind, permission bits, size and content digest, and the tree digest
/// (`construir_contract::archive::OutputIndex`, JSON).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/output/index", tag = "jobs", params(("id" = u64, Path, description = "the job"), IndexQuery),
    responses((status = 200, description = "the output's index (construir_contract::archive::OutputIndex)", content_type = "application/json", body = Object), (status = 404, description = "no indexed output (yet, or not an archive: the attempt's output_index says why)", body = ApiError), (status = 400, description = "bad request", body = ApiError), (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn output_index(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<u64>,
    Query(q): Query<IndexQuery>,
) -> Result<Response, Refusal> {
    let job = visible(&app, &caller, JobId(id)).await?;
    let none = || {
        Refusal::new(
            codes::NOT_FOUND,
            format!("job {id} has no indexed output (yet)"),
        )
    };
    let attempt = match q.attempt {
        Some(a) => job
            .snapshot
            .attempt(AttemptId(a))
            .map(|a| a.id)
            .ok_or_else(|| {
                Refusal::new(codes::NOT_FOUND, format!("job {id} has no attempt {a}"))
            })?,
        None => job.snapshot.result_attempt.ok_or_else(none)?,
    };
    let sha = app.db.output_index_blob(attempt).await?.ok_or_else(none)?;
    let stream = app.blobs.read(&sha).await?;
    let mut r = Body::from_stream(stream).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}
