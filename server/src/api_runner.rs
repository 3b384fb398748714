//! The runners' side of the API: registering and claiming. A runner's own token (role
//! `runner`) only registers and claims; each claimed attempt gets a token of its own, good for
//! that attempt's calls while it lives (`api_attempts.rs`). Claims are long polls: a runner
//! waits up to 30 s in one request and gets a new job within milliseconds of its submission.

use crate::db::now_ms;
use crate::http::{Caller, Refusal};
use crate::jobs::{RunnerCap, StoredJob};
use crate::service::{Shared, Topic};
use crate::tokens;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use construir_api::fit::{Pinned, fits};
use construir_api::state::{Alone, Cooldown, Event, step};
use construir_api::types::{
    AttemptId, ClaimRequest, ClaimResponse, JobId, RanAlone, RunnerId, UserId,
};
use construir_api::{ApiError, codes};
use std::collections::HashSet;
use std::time::Duration;

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
        alone_after: 0,
    }
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/runner/register", post(register))
        .route("/runner/claim", post(claim))
        .merge(crate::api_attempts::routes())
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
    /// The runner's ed25519 public key (64 hex digits), which its reports' statements are
    /// signed with: bound to the runner at its first registration with one, never replaced.
    #[serde(default)]
    public_key: Option<String>,
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
    if let Some(key) = &req.public_key
        && !construir_api::trust::valid_public_key(key)
    {
        return Err(Refusal::new(
            codes::INVALID_PARAMS,
            "public_key: expected an ed25519 public key, 64 lower-case hex digits",
        ));
    }
    let runner_id = app.db.register_runner(caller.0.user_id, &req.name).await?;
    if app.db.runner_revoked(runner_id).await? {
        return Err(Refusal::new(
            codes::FORBIDDEN,
            format!("runner {runner_id} ({}) has been revoked", req.name),
        ));
    }
    if let Some(key) = &req.public_key
        && let crate::runners::KeyBinding::Other(bound) =
            app.db.bind_runner_key(runner_id, key).await?
    {
        return Err(Refusal::new(
            codes::WRONG_STATE,
            format!(
                "runner {runner_id} ({}) is bound to the public key {bound}, not {key}: a \
                 runner's key is made once and kept in its state directory; a new machine \
                 registers under a new name",
                req.name
            ),
        ));
    }
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
                format!("runner {runner} is not this token's, or has been revoked"),
            )
        })?;
    let cap = runner_cap(runner, slots);
    // Once per claim: a job one of these claimed and did not start is handed to none of them
    // while they wait out its cool-down.
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
            let owner = UserId(caller.0.user_id as u64);
            try_claim(&app, (runner, owner), caller.0.token_id, &req, cap, &own).await?
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
/// priority and age within an owner; claims at once start at different ones of the best
/// ([`crate::claim_spread`]). Jobs this runner cannot take are skipped; one no runner
/// could take says why. So is a job that one of `own` (the runners of this runner's user, all
/// its names) claimed and did not start, while they wait out its cool-down: it went back to the
/// queue at once and cost no try, so handing it straight back to the same user would let one
/// user cycle it towards `errored` under fresh names. The state machine cools down the runner
/// itself; here the cool-down is the user's, counted over all its names' unstarted ends of the
/// job (so it is never shorter than any one of theirs), and other users' runners may take the
/// job at once. The claim is stored only while the runner is within `cap`.
pub async fn try_claim(
    app: &Shared,
    (runner, owner): (RunnerId, UserId),
    claim_token: i64,
    req: &ClaimRequest,
    cap: RunnerCap,
    own: &HashSet<RunnerId>,
) -> Result<Claimed, Refusal> {
    if req.capabilities.free_slots == 0 {
        return Ok(Claimed::Nothing);
    }
    // Counted from before the look, so claims looking at once see each other.
    let turn = app.claim_spread.begin();
    let now = now_ms() as u64;
    let candidates = app.db.claimable(now).await?;
    let running = app.db.running_per_owner().await?;
    let mut order: Vec<(u64, usize, JobId, UserId)> = Vec::new();
    let mut seen: HashSet<UserId> = HashSet::new();
    let mut rank_in_owner = std::collections::HashMap::<UserId, u64>::new();
    for (i, (id, owner, _)) in candidates.iter().enumerate() {
        let n = rank_in_owner.entry(*owner).or_default();
        // Round robin: an owner's k-th job comes after every owner's (k-1)-th.
        order.push((
            running.get(owner).copied().unwrap_or(0) + *n,
            i,
            *id,
            *owner,
        ));
        *n += 1;
        seen.insert(*owner);
    }
    order.sort();
    turn.arrange(&mut order);
    let settings = app.step_settings();
    let mut lost_any = false;
    // A replicated job takes only signed reports: a runner without a key gets none of them.
    let keyed = app.db.runner_key(runner).await?.is_some();
    // The runner's host class: a replicated job's replicas run on one.
    let class = format!(
        "{}/{}",
        req.capabilities.backend, req.capabilities.host_kind
    );
    // Adaptive replication: the runner's standing may let it run a job that allows it alone.
    let after = app.settings.adaptive_after;
    let standing = match after {
        0 => 0,
        _ => app.db.agreed_in_row(runner).await?,
    };
    // One job alone at a time, and none while a vote it cast alone is being checked (the store
    // checks both again, with the standing).
    let holds_alone = after > 0 && app.db.holds_alone(runner).await?;
    let terms = (after > 0 && standing >= after && !holds_alone).then_some(RanAlone {
        agreed_in_row: standing,
        after,
        audit_percent: app.settings.audit_percent,
    });
    let max_running = app.settings.max_running_per_user;
    for (_, _, id, job_owner) in order {
        let at_cap = running.get(&job_owner).copied().unwrap_or(0) >= max_running;
        let Some(job) = app.db.load_job(id).await? else {
            continue;
        };
        // A job that would add to its owner's running ones past the cap waits (one that
        // runs already and wants another replica does not add one).
        if at_cap && job.snapshot.state == construir_api::types::JobState::Queued {
            let why = format!(
                "waiting: its owner has {max_running} jobs running, the most one user may run \
                 at once (--max-running-per-user)"
            );
            if job.snapshot.reason != why {
                let _ = app
                    .apply(id, |_| Event::Unschedulable { why: why.clone() })
                    .await;
            }
            continue;
        }
        // (A live one, if the job was claimed since it was listed, fails the claim anyway.)
        let cooling = job
            .snapshot
            .unstarted_cooldown(&settings, |r| own.contains(&r))
            .filter(|c| now < c.until_ms);
        if let Some(c) = cooling {
            // The job's reason names the runner's own cool-down; when the user's is longer
            // (other names of it did not start the job either), it says so.
            let runners_own = job
                .snapshot
                .unstarted_cooldown(&settings, |r| r == c.runner)
                .map(|o| o.until_ms);
            if runners_own != Some(c.until_ms) {
                let why = user_cooldown_reason(&c);
                if job.snapshot.reason != why {
                    let _ = app
                        .apply(id, |_| Event::Unschedulable { why: why.clone() })
                        .await;
                }
            }
            continue;
        }
        // A pinned job weighs its image's size against a fetching runner's cache (cached: this
        // runs for every candidate). An image row gone would be a bug: weighed as no bytes.
        let pinned_bytes = match &job.facts.image_digest {
            Some(d) => app.db.image_bytes(d).await?.unwrap_or(0),
            None => 0,
        };
        let pinned = job.facts.image_digest.as_deref().map(|digest| Pinned {
            digest,
            bytes: pinned_bytes,
        });
        if let Err(misfit) = fits(
            &job.facts.image,
            pinned,
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
        if job.snapshot.policy.replicated() && !keyed {
            continue;
        }
        // A replica this runner's owner may not take (its own job, or one it holds a replica
        // of) is passed over before an attempt row is made for it.
        let (lease_until_ms, accept_by_ms) = settings.claim_deadlines(now);
        // Drawn for each job offered, told to no one (the state machine keeps it from every
        // view until the attempt's vote is in).
        let alone = match terms.filter(|_| job.snapshot.policy.adaptive) {
            Some(terms) => Some(Alone {
                audit: tokens::draw(terms.audit_percent)
                    .map_err(|e| Refusal::new(codes::INTERNAL, e.to_string()))?,
                terms,
            }),
            None => None,
        };
        let trial = Event::Claim {
            attempt: AttemptId(u64::MAX),
            runner,
            owner,
            class: class.clone(),
            lease_until_ms,
            accept_by_ms,
            alone,
        };
        if step(&job.snapshot, &settings, now, &trial).is_err() {
            continue;
        }
        let token = tokens::generate().map_err(|e| Refusal::new(codes::INTERNAL, e.to_string()))?;
        let attempt = app
            .db
            .insert_attempt(id, runner, &tokens::digest(&token), claim_token)
            .await?;
        let job = match claim_job(app, id, attempt, (runner, owner, &class), cap, alone).await? {
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
        app.metrics.claims.inc();
        return Ok(Claimed::Got(Box::new(ClaimResponse {
            attempt_id: attempt,
            attempt_token: token,
            job_id: id,
            job_name: job.facts.name.clone(),
            image: job.facts.image.clone(),
            image_digest: job.facts.image_digest.clone(),
            sha256: job.facts.sha256.clone(),
            size: job.facts.size,
            limits: job.facts.limits,
            accept_by_ms: a.accept_by_ms,
            lease_until_ms: a.lease_until_ms,
            heartbeat_interval_s: (settings.lease_ms / 3000).max(1),
            lease_s: settings.lease_ms / 1000,
            clock_s: Some(job.snapshot.created_ms / 1000),
        })));
    }
    Ok(if lost_any {
        Claimed::Raced
    } else {
        Claimed::Nothing
    })
}

/// A queued job's reason while the runners of one user wait out a cool-down longer than that of
/// the runner that last did not start it.
fn user_cooldown_reason(c: &Cooldown) -> String {
    format!(
        "runner {} claimed it as attempt {} and did not start it, the user's runners {} times \
         in all: other users' runners may take it now, that user's again at {} Unix ms, after \
         a cool-down",
        c.runner, c.attempt, c.unstarted_ends, c.until_ms
    )
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
    (runner, owner, class): (RunnerId, UserId, &str),
    cap: RunnerCap,
    mut alone: Option<Alone>,
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
            owner,
            class: class.to_string(),
            lease_until_ms,
            accept_by_ms,
            alone,
        };
        let Ok(t) = step(&job.snapshot, &settings, now, &event) else {
            return Ok(ClaimStep::Lost);
        };
        let claims_alone = t.job.attempt(attempt).is_some_and(|a| a.alone.is_some());
        let cap = RunnerCap {
            alone_after: match claims_alone {
                true => alone.map_or(0, |a| a.terms.after),
                false => 0,
            },
            ..cap
        };
        if app
            .db
            .store_job_within(id, job.version, &t.job, Some(cap), &t.effects, None)
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
        // The standing or the one-alone rule may have failed it: then a replica's claim next.
        if let Some(a) = alone
            && claims_alone
            && (app.db.holds_alone(runner).await?
                || app.db.agreed_in_row(runner).await? < a.terms.after)
        {
            alone = None;
        }
        // The job was written meanwhile: look at it again.
    }
    Ok(ClaimStep::Lost)
}
