//! Leases and attempt tokens in process (no sockets, no VM): how many attempts a runner may
//! hold, what an attempt's token may still do once the attempt ended or its runner token was
//! revoked, and one output per attempt that its report must name.

use crate::http::router;
use crate::http::tests::test_app;
use crate::service::{App, Shared};
use crate::tokens;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use construir_api::PROTOCOL_HEADER;
use construir_api::types::{JobId, RunnerId};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::time::Duration;
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(
    app: &Shared,
    method: Method,
    path: &str,
    token: &str,
    body: Body,
    extra: &[(&str, String)],
) -> Answer {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(PROTOCOL_HEADER, "1")
        .header("Authorization", format!("Bearer {token}"));
    for (k, v) in extra {
        b = b.header(*k, v);
    }
    let resp = router(app.clone())
        .oneshot(b.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        body: body.to_vec(),
    }
}

async fn post_json(
    app: &Shared,
    path: &str,
    token: &str,
    v: Value,
    extra: &[(&str, String)],
) -> Answer {
    let mut extra = extra.to_vec();
    extra.push(("Content-Type", "application/json".into()));
    send(
        app,
        Method::POST,
        path,
        token,
        Body::from(v.to_string()),
        &extra,
    )
    .await
}

/// A new token of `role` for `user`, and its id.
async fn token(app: &Shared, user: &str, role: &str) -> (String, i64) {
    let id = app.db.ensure_user(user).await.unwrap();
    let t = tokens::generate().unwrap();
    let token_id = app
        .db
        .add_token(id, role, &tokens::digest(&t))
        .await
        .unwrap();
    (t, token_id)
}

fn job(text: &str) -> Vec<u8> {
    use construir_tools::pack::{JobFile, job_archive};
    let mut bytes = job_archive(&[JobFile::script(&format!("#!/bin/sh\necho {text}\n"))]).unwrap();
    bytes.resize(64 << 10, 0);
    bytes
}

fn caps(free_slots: u32) -> Value {
    json!({
        "arch": "x86_64", "backend": "qemu", "host_kind": "emulated", "images": ["t0"],
        "max_memory_mib": 4096, "max_vcpus": 4, "max_timeout_s": 7200,
        "max_job_size": 1u64 << 30, "max_output_size": 1u64 << 30,
        "free_slots": free_slots, "free_memory_mib": 4096
    })
}

async fn submit(app: &Shared, token: &str, name: &str) -> u64 {
    let a = send(
        app,
        Method::POST,
        &format!("/api/v1/jobs?name={name}&memory_mib=256&vcpus=1&timeout_s=60"),
        token,
        Body::from(job(name)),
        &[],
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    a.json()["id"].as_u64().unwrap()
}

async fn register(app: &Shared, token: &str, name: &str) -> String {
    let reg = post_json(
        app,
        "/api/v1/runner/register",
        token,
        json!({"name": name}),
        &[],
    )
    .await;
    assert_eq!(reg.status, StatusCode::OK, "{}", reg.text());
    reg.json()["runner_id"].as_u64().unwrap().to_string()
}

async fn claim(app: &Shared, token: &str, runner: &str, free_slots: u32) -> Answer {
    post_json(
        app,
        "/api/v1/runner/claim",
        token,
        json!({"capabilities": caps(free_slots), "wait_s": 0}),
        &[("Construir-Runner", runner.to_string())],
    )
    .await
}

/// A claimed attempt: its id and token.
struct Claimed {
    base: String,
    token: String,
    job: u64,
}

async fn claimed(app: &Shared, token: &str, runner: &str, free_slots: u32) -> Claimed {
    let c = claim(app, token, runner, free_slots).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text());
    let v = c.json();
    Claimed {
        base: format!(
            "/api/v1/runner/attempts/{}",
            v["attempt_id"].as_u64().unwrap()
        ),
        token: v["attempt_token"].as_str().unwrap().to_string(),
        job: v["job_id"].as_u64().unwrap(),
    }
}

async fn call(app: &Shared, a: &Claimed, what: &str) -> Answer {
    let path = format!("{}/{what}", a.base);
    match what {
        "heartbeat" => {
            post_json(
                app,
                &path,
                &a.token,
                json!({"phase": "running", "console_bytes": 0}),
                &[],
            )
            .await
        }
        _ => send(app, Method::POST, &path, &a.token, Body::empty(), &[]).await,
    }
}

async fn upload(app: &Shared, a: &Claimed, bytes: &[u8]) -> Answer {
    send(
        app,
        Method::PUT,
        &format!("{}/output", a.base),
        &a.token,
        Body::from(bytes.to_vec()),
        &[],
    )
    .await
}

async fn report(app: &Shared, a: &Claimed, sha: Option<&str>) -> Answer {
    let mut body = json!({"status": "success", "exit_code": 0, "job_exit_status": 0});
    if let Some(sha) = sha {
        body["output_sha256"] = json!(sha);
    }
    post_json(app, &format!("{}/report", a.base), &a.token, body, &[]).await
}

async fn show(app: &Shared, token: &str, id: u64) -> Value {
    send(
        app,
        Method::GET,
        &format!("/api/v1/jobs/{id}"),
        token,
        Body::empty(),
        &[],
    )
    .await
    .json()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    tokens::hex(&Sha256::digest(bytes))
}

/// The same server with a short lease (and so a short late window: one lease).
async fn short_lease_app(lease: Duration) -> (tempfile::TempDir, Shared) {
    let (d, app) = test_app().await;
    let mut settings = app.settings.clone();
    settings.lease = lease;
    let app = App::new(settings, app.db.clone(), app.blobs.clone()).unwrap();
    (d, app)
}

#[tokio::test]
async fn a_runner_gets_no_more_live_attempts_than_the_slots_it_declared() {
    let (_d, app) = test_app().await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    for n in 0..8 {
        submit(&app, &alice, &format!("j{n}_t0.tar.xz")).await;
    }
    // A runner that declares one slot, then keeps saying it has one free.
    let one = register(&app, &rt, "one").await;
    let first = claimed(&app, &rt, &one, 1).await;
    assert_eq!(call(&app, &first, "start").await.status, StatusCode::OK);
    let again = claim(&app, &rt, &one, 1).await;
    assert_eq!(
        again.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        again.text()
    );
    assert_eq!(again.json()["error"], "too-many-requests");
    assert!(
        again.json()["message"]
            .as_str()
            .unwrap()
            .contains("as many as the 1 job slots it declared"),
        "{}",
        again.text()
    );
    // Once its attempt has ended, it may claim again.
    let abort = post_json(
        &app,
        &format!("{}/abort", first.base),
        &first.token,
        json!({"reason": "done with it"}),
        &[],
    )
    .await;
    assert_eq!(abort.status, StatusCode::OK, "{}", abort.text());
    claimed(&app, &rt, &one, 1).await;

    // A registration forgets what was declared before (a runner that restarted).
    let many = register(&app, &rt, "many").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(claimed(&app, &rt, &many, 6).await);
    }
    // Six slots, but at most four claimed and not started: the fifth claim gets no work.
    let fifth = claim(&app, &rt, &many, 2).await;
    assert_eq!(fifth.status, StatusCode::NO_CONTENT, "{}", fifth.text());
    let load = app
        .db
        .runner_load(RunnerId(many.parse().unwrap()))
        .await
        .unwrap();
    assert_eq!((load.live, load.unstarted), (4, 4));
    // A start frees an unstarted place.
    assert_eq!(call(&app, &held[0], "start").await.status, StatusCode::OK);
    let load = app
        .db
        .runner_load(RunnerId(many.parse().unwrap()))
        .await
        .unwrap();
    assert_eq!((load.live, load.unstarted), (4, 3));
    claimed(&app, &rt, &many, 2).await;
}

#[tokio::test]
async fn concurrent_claims_of_one_runner_cannot_all_slip_under_its_slots() {
    let (_d, app) = test_app().await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    for n in 0..8 {
        submit(&app, &alice, &format!("j{n}_t0.tar.xz")).await;
    }
    let runner = register(&app, &rt, "racer").await;
    let claims: Vec<_> = (0..8)
        .map(|_| {
            let (app, rt, runner) = (app.clone(), rt.clone(), runner.clone());
            tokio::spawn(async move { claim(&app, &rt, &runner, 2).await.status })
        })
        .collect();
    let mut got = 0;
    for c in claims {
        let status = c.await.unwrap();
        assert!(
            [
                StatusCode::OK,
                StatusCode::NO_CONTENT,
                StatusCode::TOO_MANY_REQUESTS
            ]
            .contains(&status),
            "{status}"
        );
        got += usize::from(status == StatusCode::OK);
    }
    assert_eq!(got, 2, "two slots declared, two attempts handed out");
    let load = app
        .db
        .runner_load(RunnerId(runner.parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(load.live, 2);
}

#[tokio::test]
async fn revoking_the_runner_token_kills_the_attempt_tokens_claimed_with_it() {
    let (_d, app) = test_app().await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, rt_id) = token(&app, "volunteer", "runner").await;
    let (other, _) = token(&app, "volunteer", "runner").await;
    submit(&app, &alice, "a_t0.tar.xz").await;
    submit(&app, &alice, "b_t0.tar.xz").await;
    let runner = register(&app, &rt, "home").await;
    let a = claimed(&app, &rt, &runner, 2).await;
    // The same user's runner, claiming with another of its tokens.
    let b = claimed(&app, &other, &runner, 1).await;
    for x in [&a, &b] {
        assert_eq!(call(&app, x, "start").await.status, StatusCode::OK);
        assert_eq!(call(&app, x, "heartbeat").await.status, StatusCode::OK);
    }
    assert!(app.db.revoke_token(rt_id).await.unwrap());
    let hb = call(&app, &a, "heartbeat").await;
    assert_eq!(hb.status, StatusCode::UNAUTHORIZED, "{}", hb.text());
    assert!(
        hb.json()["message"].as_str().unwrap().contains("revoked"),
        "{}",
        hb.text()
    );
    assert_eq!(
        report(&app, &a, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        upload(&app, &a, b"x").await.status,
        StatusCode::UNAUTHORIZED
    );
    // The attempt claimed with the other token lives on.
    assert_eq!(call(&app, &b, "heartbeat").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_lapsed_attempt_delivers_late_within_its_window_and_not_after() {
    let lease = Duration::from_millis(1500);
    let (_d, app) = short_lease_app(lease).await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    let id = submit(&app, &alice, "late_t0.tar.xz").await;
    let runner = register(&app, &rt, "home").await;
    let a = claimed(&app, &rt, &runner, 1).await;
    assert_eq!(call(&app, &a, "start").await.status, StatusCode::OK);
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    // Lapsed (the sweeper has not run): no more heartbeats, but its output and report are
    // kept aside, late.
    assert_eq!(
        call(&app, &a, "heartbeat").await.json()["error"],
        "lease-lost"
    );
    let out = b"a late output".to_vec();
    let up = upload(&app, &a, &out).await;
    assert_eq!(up.status, StatusCode::CREATED, "{}", up.text());
    let rep = report(&app, &a, Some(&sha256_hex(&out))).await;
    assert_eq!(rep.status, StatusCode::OK, "{}", rep.text());
    assert_eq!(rep.json()["late"], true, "{}", rep.text());
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "queued", "{v}");
    assert_eq!(v["result_attempt"], Value::Null);
    assert_eq!(v["attempts"][0]["output_sha256"], json!(sha256_hex(&out)));

    // The next attempt lapses, is swept, and its runner comes back past the late window.
    app.sweep().await.unwrap();
    let v = show(&app, &alice, id).await;
    let wait = v["retry_not_before_ms"].as_u64().unwrap();
    let now = crate::db::now_ms() as u64;
    tokio::time::sleep(Duration::from_millis(wait.saturating_sub(now) + 50)).await;
    app.sweep().await.unwrap();
    let b = claimed(&app, &rt, &runner, 1).await;
    assert_eq!(b.job, id);
    assert_eq!(call(&app, &b, "start").await.status, StatusCode::OK);
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    app.sweep().await.unwrap();
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let up = upload(&app, &b, b"too late").await;
    assert_eq!(
        (up.status, up.json()["error"].as_str()),
        (StatusCode::CONFLICT, Some("lease-lost")),
        "{}",
        up.text()
    );
    let rep = report(&app, &b, None).await;
    assert_eq!(
        (rep.status, rep.json()["error"].as_str()),
        (StatusCode::CONFLICT, Some("lease-lost")),
        "{}",
        rep.text()
    );
    assert!(
        rep.json()["message"]
            .as_str()
            .unwrap()
            .contains("late window"),
        "{}",
        rep.text()
    );
    let v = show(&app, &alice, id).await;
    assert_eq!(v["attempts"][1]["late"], false, "{v}");
    assert_eq!(v["attempts"][1]["output_sha256"], Value::Null, "{v}");
}

#[tokio::test]
async fn an_attempt_given_up_takes_no_output_and_no_report() {
    let (_d, app) = test_app().await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    submit(&app, &alice, "a_t0.tar.xz").await;
    let runner = register(&app, &rt, "home").await;
    let a = claimed(&app, &rt, &runner, 1).await;
    assert_eq!(call(&app, &a, "start").await.status, StatusCode::OK);
    let abort = post_json(
        &app,
        &format!("{}/abort", a.base),
        &a.token,
        json!({"reason": "disk full"}),
        &[],
    )
    .await;
    assert_eq!(abort.status, StatusCode::OK);
    for answer in [upload(&app, &a, b"x").await, report(&app, &a, None).await] {
        assert_eq!(answer.json()["error"], "lease-lost", "{}", answer.text());
    }
    let got = send(
        &app,
        Method::GET,
        &format!("{}/job", a.base),
        &a.token,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(got.json()["error"], "lease-lost");
}

#[tokio::test]
async fn one_output_per_attempt_and_the_report_must_name_the_one_received() {
    let (_d, app) = test_app().await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    let id = submit(&app, &alice, "a_t0.tar.xz").await;
    let runner = register(&app, &rt, "home").await;
    let a = claimed(&app, &rt, &runner, 1).await;
    assert_eq!(call(&app, &a, "start").await.status, StatusCode::OK);
    let out = b"the output".to_vec();
    let sha = sha256_hex(&out);
    assert_eq!(upload(&app, &a, &out).await.status, StatusCode::CREATED);
    let second = upload(&app, &a, b"another output").await;
    assert_eq!(
        (second.status, second.json()["error"].as_str()),
        (StatusCode::CONFLICT, Some("wrong-state")),
        "{}",
        second.text()
    );
    assert!(
        second.text().contains(&sha),
        "it says what the first one was: {}",
        second.text()
    );

    // A report naming another output is refused, and nothing of it is recorded.
    let wrong = report(&app, &a, Some(&sha256_hex(b"another output"))).await;
    assert_eq!(
        wrong.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        wrong.text()
    );
    assert_eq!(wrong.json()["error"], "invalid-params");
    assert!(wrong.text().contains("output_sha256"), "{}", wrong.text());
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["attempts"][0]["status"], Value::Null, "{v}");
    let right = report(&app, &a, Some(&sha)).await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.text());
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["attempts"][0]["output_sha256"], json!(sha));
    // And after the report, no upload at all.
    assert!(upload(&app, &a, &out).await.status.is_client_error());

    // A report that names an output when none came is refused too.
    let id = submit(&app, &alice, "b_t0.tar.xz").await;
    let b = claimed(&app, &rt, &runner, 1).await;
    assert_eq!(b.job, id);
    assert_eq!(call(&app, &b, "start").await.status, StatusCode::OK);
    let none = report(&app, &b, Some(&sha)).await;
    assert_eq!(
        none.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        none.text()
    );
    assert!(none.text().contains("no output"), "{}", none.text());
}

#[tokio::test]
async fn an_output_is_recorded_once_and_only_for_the_job_as_judged() {
    use crate::jobs::SetOutput;
    let (_d, app) = test_app().await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    let id = JobId(submit(&app, &alice, "a_t0.tar.xz").await);
    let runner = register(&app, &rt, "home").await;
    let a = claimed(&app, &rt, &runner, 1).await;
    let attempt =
        construir_api::types::AttemptId(a.base.rsplit('/').next().unwrap().parse().unwrap());
    let job = app.db.load_job(id).await.unwrap().unwrap();
    // The job moved on (the start) since it was judged: nothing is recorded.
    assert_eq!(call(&app, &a, "start").await.status, StatusCode::OK);
    let stale = app
        .db
        .set_output(
            attempt,
            id,
            job.version,
            &"1".repeat(64),
            1,
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(stale, SetOutput::JobChanged);
    let job = app.db.load_job(id).await.unwrap().unwrap();
    let first = app
        .db
        .set_output(
            attempt,
            id,
            job.version,
            &"1".repeat(64),
            1,
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(first, SetOutput::Stored);
    let second = app
        .db
        .set_output(
            attempt,
            id,
            job.version,
            &"2".repeat(64),
            2,
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(second, SetOutput::AlreadySet("1".repeat(64), 1));
}

#[tokio::test]
async fn the_claim_counts_follow_the_snapshot() {
    let (_d, app) = test_app().await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    submit(&app, &alice, "a_t0.tar.xz").await;
    let runner = register(&app, &rt, "home").await;
    let r = RunnerId(runner.parse().unwrap());
    let a = claimed(&app, &rt, &runner, 1).await;
    let load = |app: Shared| async move { app.db.runner_load(r).await.unwrap() };
    assert_eq!(
        (
            load(app.clone()).await.live,
            load(app.clone()).await.unstarted
        ),
        (1, 1)
    );
    assert_eq!(app.db.unstarted_jobs(r).await.unwrap(), [JobId(a.job)]);
    call(&app, &a, "start").await;
    assert_eq!(
        (
            load(app.clone()).await.live,
            load(app.clone()).await.unstarted
        ),
        (1, 0)
    );
    assert_eq!(report(&app, &a, None).await.status, StatusCode::OK);
    assert_eq!(
        (
            load(app.clone()).await.live,
            load(app.clone()).await.unstarted
        ),
        (0, 0)
    );
}

#[tokio::test]
async fn metrics_count_claims_submissions_lapsed_leases_and_jobs_per_state() {
    let lease = Duration::from_millis(1500);
    let (_d, app) = short_lease_app(lease).await;
    let (alice, _) = token(&app, "alice", "submitter").await;
    let (rt, _) = token(&app, "volunteer", "runner").await;
    submit(&app, &alice, "counted_t0.tar.xz").await;
    let runner = register(&app, &rt, "home").await;
    let a = claimed(&app, &rt, &runner, 1).await;
    assert_eq!(call(&app, &a, "start").await.status, StatusCode::OK);
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    app.sweep().await.unwrap();
    let resp = router(app.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "no token needed");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let page = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for line in [
        "construir_claims_total 1",
        "construir_submissions_total 1",
        "construir_leases_lapsed_total 1",
        "construir_attempts_ended_total{state=\"expired\"} 1",
        "construir_jobs{state=\"queued\"} 1",
        "construir_jobs{state=\"succeeded\"} 0",
        "construir_queue_length 1",
        "construir_runners_seen 1",
        "construir_uploads_total 0",
    ] {
        assert!(page.lines().any(|l| l == line), "{line:?} in:\n{page}");
    }
    assert_eq!(page.lines().last(), Some("# EOF"));
    for l in page.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = l.rsplit_once(' ').unwrap();
        assert!(name.starts_with("construir_"), "{l}");
        assert!(value.parse::<f64>().is_ok(), "{l}");
    }
}
