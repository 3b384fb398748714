//! The whole protocol in process (no sockets, no VM): a submitter submits, a runner claims,
//! starts, beats, streams its console, uploads the output and reports; the submitter reads the
//! job, its console and its output back byte for byte. Plus the refusals on the way.

use crate::http::router;
use crate::http::tests::test_app;
use crate::service::Shared;
use crate::tokens;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use construir_api::PROTOCOL_HEADER;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: axum::http::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A console read's `Construir-Log-Next`.
    pub(crate) fn next(&self) -> u64 {
        self.headers["Construir-Log-Next"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Whether a console read says the console is complete.
    pub(crate) fn complete(&self) -> bool {
        self.headers.get("Construir-Log-Complete").is_some()
    }
}

pub(crate) async fn send(
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
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

pub(crate) async fn json_call(
    app: &Shared,
    method: Method,
    path: &str,
    token: &str,
    v: Value,
    extra: &[(&str, String)],
) -> Answer {
    let mut extra = extra.to_vec();
    extra.push(("Content-Type", "application/json".into()));
    send(app, method, path, token, Body::from(v.to_string()), &extra).await
}

pub(crate) async fn token(app: &Shared, user: &str, role: &str) -> String {
    let id = app.db.ensure_user(user).await.unwrap();
    let t = tokens::generate().unwrap();
    app.db
        .add_token(id, role, &tokens::digest(&t))
        .await
        .unwrap();
    t
}

pub(crate) fn job(text: &str) -> Vec<u8> {
    use construir_tools::pack::{JobFile, job_archive};
    let mut bytes = job_archive(&[JobFile::script(&format!("#!/bin/sh\necho {text}\n"))]).unwrap();
    bytes.resize(64 << 10, 0);
    bytes
}

pub(crate) fn caps() -> Value {
    json!({
        "arch": "x86_64", "backend": "qemu", "host_kind": "emulated", "images": ["t0"],
        "max_memory_mib": 4096, "max_vcpus": 4, "max_timeout_s": 7200,
        "max_job_size": 1u64 << 30, "max_output_size": 1u64 << 30,
        "free_slots": 1, "free_memory_mib": 4096
    })
}

pub(crate) async fn submit(app: &Shared, token: &str, name: &str, bytes: Vec<u8>) -> Answer {
    send(
        app,
        Method::POST,
        &format!("/api/v1/jobs?name={name}&memory_mib=256&vcpus=1&timeout_s=60"),
        token,
        Body::from(bytes),
        &[],
    )
    .await
}

#[tokio::test]
async fn a_job_goes_from_submit_to_output_and_every_byte_comes_back() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let runner_token = token(&app, "volunteer", "runner").await;
    let bytes = job("hello");
    let a = submit(&app, &alice, "hello_t0.tar.xz&private=false", bytes.clone()).await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let view = a.json();
    let id = view["id"].as_u64().unwrap();
    assert_eq!(view["state"], "queued");
    assert_eq!(view["size"], 64 << 10);

    let reg = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/register",
        &runner_token,
        json!({"name": "home"}),
        &[],
    )
    .await;
    assert_eq!(reg.status, StatusCode::OK);
    let runner = reg.json()["runner_id"].as_u64().unwrap().to_string();
    let claim = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/claim",
        &runner_token,
        json!({"capabilities": caps(), "wait_s": 1}),
        &[("Construir-Runner", runner.clone())],
    )
    .await;
    assert_eq!(
        claim.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&claim.body)
    );
    let c = claim.json();
    assert_eq!(c["job_id"].as_u64(), Some(id));
    let attempt = c["attempt_id"].as_u64().unwrap();
    let at = c["attempt_token"].as_str().unwrap().to_string();
    let base = format!("/api/v1/runner/attempts/{attempt}");

    // The submitter's token is not an attempt token, and an attempt token is for one attempt.
    let wrong = send(
        &app,
        Method::POST,
        &format!("{base}/start"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let other = send(
        &app,
        Method::POST,
        &format!("/api/v1/runner/attempts/{}/start", attempt + 1),
        &at,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);

    let started = send(
        &app,
        Method::POST,
        &format!("{base}/start"),
        &at,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(
        started.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&started.body)
    );
    let got = send(
        &app,
        Method::GET,
        &format!("{base}/job"),
        &at,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(got.body, bytes, "the job file comes back byte for byte");
    let hb = json_call(
        &app,
        Method::POST,
        &format!("{base}/heartbeat"),
        &at,
        json!({"phase": "running", "console_bytes": 0}),
        &[],
    )
    .await;
    assert_eq!(hb.status, StatusCode::OK);
    assert_eq!(hb.json()["cancel"], false);

    // The console: appended, resent (stored once), a gap refused with where to resume.
    let piece = |off: u64, text: &str| {
        let app = app.clone();
        let at = at.clone();
        let path = format!("{base}/log?offset={off}");
        let text = text.to_string();
        async move { send(&app, Method::PATCH, &path, &at, Body::from(text), &[]).await }
    };
    let p = piece(0, "booting\n").await;
    assert_eq!(
        (p.status.as_u16(), p.json()["next_offset"].as_u64()),
        (202, Some(8))
    );
    let p = piece(0, "booting\n").await;
    assert_eq!(
        (p.status.as_u16(), p.json()["next_offset"].as_u64()),
        (200, Some(8))
    );
    let p = piece(20, "lost?").await;
    assert_eq!(
        (p.status.as_u16(), p.json()["next_offset"].as_u64()),
        (416, Some(8))
    );
    let p = piece(4, "ing\nhello\n").await;
    assert_eq!(
        (p.status.as_u16(), p.json()["next_offset"].as_u64()),
        (202, Some(14))
    );
    let log = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{id}/log?offset=0"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(log.body, b"booting\nhello\n");
    assert_eq!(log.headers["Construir-Log-Next"], "14");
    assert!(log.headers.get("Construir-Log-Complete").is_none());

    // The output: past the limit refused; within it, stored and hashed by the server.
    let out = b"an output archive".to_vec();
    let up = send(
        &app,
        Method::PUT,
        &format!("{base}/output"),
        &at,
        Body::from(out.clone()),
        &[],
    )
    .await;
    assert_eq!(
        up.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&up.body)
    );
    let sha = up.json()["sha256"].as_str().unwrap().to_string();
    let rep = json_call(
        &app, Method::POST, &format!("{base}/report"), &at,
        json!({"status": "success", "exit_code": 0, "job_exit_status": 0, "reason": "job succeeded"}), &[],
    )
    .await;
    assert_eq!(
        rep.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&rep.body)
    );
    let again = json_call(
        &app, Method::POST, &format!("{base}/report"), &at,
        json!({"status": "success", "exit_code": 0, "job_exit_status": 0, "reason": "job succeeded"}), &[],
    )
    .await;
    assert!(again.status.is_client_error(), "a report is taken once");

    let show = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{id}"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    let v = show.json();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result_attempt"].as_u64(), Some(attempt));
    assert_eq!(
        v["attempts"][0]["output_sha256"].as_str(),
        Some(sha.as_str())
    );
    let fetched = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{id}/output"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(fetched.body, out);
    assert_eq!(fetched.headers["Construir-Sha256"], sha.as_str());
    let log = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{id}/log?offset=14"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert!(log.body.is_empty());
    assert_eq!(log.headers["Construir-Log-Complete"], "true");

    // Someone else sees the public job but cannot cancel it, and their list is their own; a
    // runner token cannot read jobs.
    let bob = token(&app, "bob", "submitter").await;
    let get = |path: String| {
        let (app, bob) = (app.clone(), bob.clone());
        async move { send(&app, Method::GET, &path, &bob, Body::empty(), &[]).await }
    };
    assert_eq!(
        get(format!("/api/v1/jobs/{id}")).await.status,
        StatusCode::OK
    );
    let cancel = send(
        &app,
        Method::POST,
        &format!("/api/v1/jobs/{id}/cancel"),
        &bob,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(cancel.status, StatusCode::FORBIDDEN);
    let list = get("/api/v1/jobs".into()).await;
    assert_eq!(list.json(), json!([]));
    // A private job is not there for anyone but its owner (and admins).
    let private = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=secret_t0.tar.xz&private=true",
        &alice,
        Body::from(job("private")),
        &[],
    )
    .await;
    assert_eq!(private.status, StatusCode::CREATED);
    assert_eq!(private.json()["private"], true);
    let pid = private.json()["id"].as_u64().unwrap();
    for path in [
        "",
        "/log",
        "/output",
        "/output/index",
        "/receipt",
        "/cancel",
    ] {
        let method = if path == "/cancel" {
            Method::POST
        } else {
            Method::GET
        };
        let r = send(
            &app,
            method,
            &format!("/api/v1/jobs/{pid}{path}"),
            &bob,
            Body::empty(),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
    let r = send(
        &app,
        Method::GET,
        "/api/v1/jobs",
        &runner_token,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // After the report the attempt is over: its token no longer starts or beats.
    let late = json_call(
        &app,
        Method::POST,
        &format!("{base}/heartbeat"),
        &at,
        json!({"phase": "running", "console_bytes": 0}),
        &[],
    )
    .await;
    assert!(late.status.is_client_error());
}

#[tokio::test]
async fn refusals_at_submit_and_claim_say_why() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let a = submit(&app, &alice, "no-index.tar.xz", job("x")).await;
    assert_eq!(
        (a.status.as_u16(), a.json()["error"].as_str()),
        (422, Some("bad-job-name"))
    );
    let a = submit(&app, &alice, "garbage_t0.tar.xz", vec![0x5a; 4096]).await;
    assert_eq!(a.status.as_u16(), 400);
    assert!(
        a.json()["message"].as_str().unwrap().contains("not a job"),
        "{}",
        a.json()
    );
    let a = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=x_t0.tar.xz&priority=1000",
        &alice,
        Body::from(job("x")),
        &[],
    )
    .await;
    assert_eq!(a.json()["error"], "invalid-params");
    let a = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=x_t0.tar.xz&sneaky=1",
        &alice,
        Body::from(job("x")),
        &[],
    )
    .await;
    assert_eq!(a.status.as_u16(), 400, "unknown parameters are refused");
    let huge = vec![0u8; (app.settings.max_job_size + 1) as usize];
    let a = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=big_t0.tar.xz",
        &alice,
        Body::from(huge),
        &[],
    )
    .await;
    assert_eq!(
        (a.status.as_u16(), a.json()["error"].as_str()),
        (413, Some("job-too-big"))
    );
    assert_eq!(
        std::fs::read_dir(app.settings.data.join("tmp"))
            .unwrap()
            .count(),
        0,
        "nothing of a refused upload is kept"
    );

    // A job only an i9 runner could run is not given to this one, and says why.
    let a = submit(&app, &alice, "exotic_i9.tar.xz", job("x")).await;
    let id = a.json()["id"].as_u64().unwrap();
    let runner_token = token(&app, "volunteer", "runner").await;
    let reg = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/register",
        &runner_token,
        json!({"name": "home"}),
        &[],
    )
    .await;
    let runner = reg.json()["runner_id"].as_u64().unwrap().to_string();
    let claim = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/claim",
        &runner_token,
        json!({"capabilities": caps(), "wait_s": 0}),
        &[("Construir-Runner", runner.clone())],
    )
    .await;
    assert_eq!(claim.status, StatusCode::NO_CONTENT);
    let show = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{id}"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert!(
        show.json()["reason"].as_str().unwrap().contains("i9"),
        "{}",
        show.json()
    );
    // Claims for another user's runner, or without a runner token, are refused.
    let claim = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/claim",
        &alice,
        json!({"capabilities": caps(), "wait_s": 0}),
        &[("Construir-Runner", runner.clone())],
    )
    .await;
    assert_eq!(claim.status, StatusCode::FORBIDDEN);
    let mallory = token(&app, "mallory", "runner").await;
    let claim = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/claim",
        &mallory,
        json!({"capabilities": caps(), "wait_s": 0}),
        &[("Construir-Runner", runner)],
    )
    .await;
    assert_eq!(claim.status, StatusCode::FORBIDDEN);
    // Cancel ends a queued job; a second cancel says it has ended.
    let c = send(
        &app,
        Method::POST,
        &format!("/api/v1/jobs/{id}/cancel"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(c.json()["state"], "canceled");
    let c = send(
        &app,
        Method::POST,
        &format!("/api/v1/jobs/{id}/cancel"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(c.json()["error"], "job-finished");
}

#[tokio::test]
async fn a_long_poll_claim_gets_a_job_submitted_while_it_waits() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let runner_token = token(&app, "volunteer", "runner").await;
    let reg = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/register",
        &runner_token,
        json!({"name": "home"}),
        &[],
    )
    .await;
    let runner = reg.json()["runner_id"].as_u64().unwrap().to_string();
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let c = json_call(
                &app,
                Method::POST,
                "/api/v1/runner/claim",
                &runner_token,
                json!({"capabilities": caps(), "wait_s": 20}),
                &[("Construir-Runner", runner)],
            )
            .await;
            (c.status, t0.elapsed())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let a = submit(&app, &alice, "late_t0.tar.xz", job("x")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    let (status, took) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        took < std::time::Duration::from_secs(10),
        "woken by the submission, not the timeout ({took:?})"
    );
}

#[tokio::test]
async fn one_owners_many_jobs_never_hide_another_owners_one() {
    use crate::jobs::{NewJob, PER_OWNER_WINDOW};
    use construir_api::state::{JobPolicy, JobSnapshot};
    use construir_api::types::{JobLimits, UserId};
    let (_d, app) = test_app().await;
    let a = app.db.ensure_user("prolific").await.unwrap();
    let b = app.db.ensure_user("modest").await.unwrap();
    let new = |owner: i64, image: &str, priority: i32| NewJob {
        owner: UserId(owner as u64),
        name: format!("j_{image}.tar.xz"),
        image: image.into(),
        image_digest: None,
        sha256: "0".repeat(64),
        size: 1,
        limits: JobLimits::DEFAULT,
        priority,
        private: false,
    };
    let now = crate::db::now_ms() as u64;
    let snap = JobSnapshot::submitted(JobPolicy::DEFAULT, now).job;
    for _ in 0..(PER_OWNER_WINDOW + 10) {
        app.db.insert_job(&new(a, "i9", 100), &snap).await.unwrap();
    }
    let modest = app.db.insert_job(&new(b, "t0", 0), &snap).await.unwrap();
    let seen = app.db.claimable(now).await.unwrap();
    let of_a = seen
        .iter()
        .filter(|(_, o, _)| *o == UserId(a as u64))
        .count();
    assert_eq!(of_a as i64, PER_OWNER_WINDOW, "one owner's window");
    assert!(
        seen.iter().any(|(id, _, _)| *id == modest),
        "the other owner's job is in sight"
    );
    // And a runner that can only run t0 gets it, past the other owner's higher priorities.
    let runner_token = token(&app, "volunteer", "runner").await;
    let reg = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/register",
        &runner_token,
        json!({"name": "home"}),
        &[],
    )
    .await;
    let runner = reg.json()["runner_id"].as_u64().unwrap().to_string();
    let mut c = caps();
    c["max_memory_mib"] = json!(4096);
    let claim = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/claim",
        &runner_token,
        json!({"capabilities": c, "wait_s": 0}),
        &[("Construir-Runner", runner)],
    )
    .await;
    assert_eq!(
        claim.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&claim.body)
    );
    assert_eq!(claim.json()["job_id"].as_u64(), Some(modest.0));
}

#[tokio::test]
async fn default_limits_follow_a_lowered_server_maximum() {
    let (_d, app) = test_app().await;
    let mut settings = app.settings.clone();
    settings.max_output_size = 64 << 20;
    let app = crate::service::App::new(settings, app.db.clone(), app.blobs.clone()).unwrap();
    let alice = token(&app, "alice", "submitter").await;
    let a = submit(&app, &alice, "small_t0.tar.xz", job("x")).await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["limits"]["output_size"], 64 << 20);
}

#[tokio::test]
async fn one_user_gets_no_more_jobs_queued_than_the_server_takes_and_others_still_do() {
    let (_d, app) = crate::http::tests::app_with(crate::settings::SettingArgs {
        max_queued_per_user: Some(2),
        ..Default::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let bob = token(&app, "bob", "submitter").await;
    for n in 0..2 {
        let a = submit(&app, &alice, &format!("a{n}_t0.tar.xz"), job("a")).await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.json());
    }
    let refused = submit(&app, &alice, "a2_t0.tar.xz", job("a")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json()["error"], "too-many-requests");
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("2 jobs queued"),
        "{:?}",
        refused.json()
    );
    let b = submit(&app, &bob, "b0_t0.tar.xz", job("b")).await;
    assert_eq!(b.status, StatusCode::CREATED, "another user is not held up");
}
