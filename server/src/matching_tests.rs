//! The server's rules that need a clock or more than one job, in process: matching a job to a
//! runner's limits (and expiring one nobody can take), the accept window, equal outputs, the
//! cancel of a running job, an upload past the job's limit.

use crate::flow_tests::{Answer, caps, job, json_call, send, submit, token};
use crate::http::tests::app_with;
use crate::service::Shared;
use crate::settings::SettingArgs;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

pub(crate) async fn register(app: &Shared, token: &str, name: &str) -> String {
    let reg = json_call(
        app,
        Method::POST,
        "/api/v1/runner/register",
        token,
        json!({ "name": name }),
        &[],
    )
    .await;
    assert_eq!(reg.status, StatusCode::OK);
    reg.json()["runner_id"].as_u64().unwrap().to_string()
}

pub(crate) async fn claim(app: &Shared, token: &str, runner: &str, capabilities: Value) -> Answer {
    json_call(
        app,
        Method::POST,
        "/api/v1/runner/claim",
        token,
        json!({"capabilities": capabilities, "wait_s": 0}),
        &[("Construir-Runner", runner.to_string())],
    )
    .await
}

pub(crate) async fn show(app: &Shared, token: &str, id: u64) -> Value {
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

/// A claimed attempt: its job, its path prefix and its token.
pub(crate) struct Claimed {
    pub(crate) job: u64,
    pub(crate) base: String,
    pub(crate) token: String,
}

pub(crate) fn claimed(answer: &Answer) -> Claimed {
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let c = answer.json();
    Claimed {
        job: c["job_id"].as_u64().unwrap(),
        base: format!(
            "/api/v1/runner/attempts/{}",
            c["attempt_id"].as_u64().unwrap()
        ),
        token: c["attempt_token"].as_str().unwrap().to_string(),
    }
}

pub(crate) async fn call(
    app: &Shared,
    a: &Claimed,
    method: Method,
    what: &str,
    body: Body,
) -> Answer {
    send(
        app,
        method,
        &format!("{}/{what}", a.base),
        &a.token,
        body,
        &[],
    )
    .await
}

async fn report(app: &Shared, a: &Claimed, sha256: Option<&str>) -> Answer {
    json_call(
        app,
        Method::POST,
        &format!("{}/report", a.base),
        &a.token,
        json!({"status": "success", "exit_code": 0, "job_exit_status": 0,
               "reason": "job succeeded", "output_sha256": sha256}),
        &[],
    )
    .await
}

#[tokio::test]
async fn a_job_beyond_every_runners_limits_is_not_handed_out_says_why_and_expires() {
    let (_d, app) = app_with(SettingArgs {
        job_ttl: Some(1),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let big = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=big_t0.tar.xz&memory_mib=8192&vcpus=1&timeout_s=60",
        &alice,
        Body::from(job("big")),
        &[],
    )
    .await;
    assert_eq!(big.status, StatusCode::CREATED);
    let id = big.json()["id"].as_u64().unwrap();
    let volunteer = token(&app, "volunteer", "runner").await;
    let runner = register(&app, &volunteer, "small").await;
    let mut small = caps();
    small["max_memory_mib"] = json!(1024);
    small["free_memory_mib"] = json!(1024);
    let c = claim(&app, &volunteer, &runner, small).await;
    assert_eq!(c.status, StatusCode::NO_CONTENT, "8 GiB is beyond 1 GiB");
    let why = show(&app, &alice, id).await["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(why.contains("memory"), "the job says why: {why}");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.sweep().await.unwrap();
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "expired", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("time-to-live") && reason.contains("memory"),
        "the expiry keeps why: {reason}"
    );
}

#[tokio::test]
async fn an_attempt_not_started_in_its_window_gives_the_job_back_at_once_without_a_try() {
    let (_d, app) = app_with(SettingArgs {
        accept_window: Some(1),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit(&app, &alice, "slow_t0.tar.xz", job("x"))
        .await
        .json()["id"]
        .as_u64()
        .unwrap();
    let volunteer = token(&app, "volunteer", "runner").await;
    let sleepy = register(&app, &volunteer, "sleepy").await;
    let first = claimed(&claim(&app, &volunteer, &sleepy, caps()).await);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late = call(&app, &first, Method::POST, "start", Body::empty()).await;
    assert_eq!(late.status, StatusCode::CONFLICT, "too late to start");
    assert_eq!(late.json()["error"], "lease-lost");
    app.sweep().await.unwrap();
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "queued", "{v}");
    assert_eq!(v["attempts"][0]["state"], "expired", "{v}");

    // No back-off: another runner gets it at once, as its first try.
    let other_token = token(&app, "other", "runner").await;
    let other = register(&app, &other_token, "keen").await;
    let second = claimed(&claim(&app, &other_token, &other, caps()).await);
    let started = call(&app, &second, Method::POST, "start", Body::empty()).await;
    assert_eq!(started.status, StatusCode::OK);
    let reason = show(&app, &alice, id).await["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("try 1 of 3"), "{reason}");
}

#[tokio::test]
async fn equal_outputs_of_two_jobs_are_stored_once_and_both_served() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let volunteer = token(&app, "volunteer", "runner").await;
    let runner = register(&app, &volunteer, "home").await;
    let output = b"the same output archive, twice".to_vec();
    let mut shas = Vec::new();
    let mut ids = Vec::new();
    for n in 0..2 {
        let id = submit(
            &app,
            &alice,
            &format!("same{n}_t0.tar.xz"),
            job(&n.to_string()),
        )
        .await
        .json()["id"]
            .as_u64()
            .unwrap();
        let a = claimed(&claim(&app, &volunteer, &runner, caps()).await);
        assert_eq!(
            call(&app, &a, Method::POST, "start", Body::empty())
                .await
                .status,
            StatusCode::OK
        );
        let up = call(&app, &a, Method::PUT, "output", Body::from(output.clone())).await;
        assert_eq!(up.status, StatusCode::CREATED);
        let sha = up.json()["sha256"].as_str().unwrap().to_string();
        assert_eq!(report(&app, &a, Some(&sha)).await.status, StatusCode::OK);
        shas.push(sha);
        ids.push(id);
    }
    assert_eq!(shas[0], shas[1]);
    let sha = &shas[0];
    let copies = walk(&app.blobs.files_root())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == sha.as_str()))
        .count();
    assert_eq!(copies, 1, "one blob for both outputs");
    for id in ids {
        let got = send(
            &app,
            Method::GET,
            &format!("/api/v1/jobs/{id}/output"),
            &alice,
            Body::empty(),
            &[],
        )
        .await;
        assert_eq!(got.body, output, "job {id}'s output, byte for byte");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[tokio::test]
async fn a_running_job_canceled_stops_at_its_next_heartbeat_and_its_report_is_no_result() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit(&app, &alice, "long_t0.tar.xz", job("x"))
        .await
        .json()["id"]
        .as_u64()
        .unwrap();
    let volunteer = token(&app, "volunteer", "runner").await;
    let runner = register(&app, &volunteer, "home").await;
    let a = claimed(&claim(&app, &volunteer, &runner, caps()).await);
    assert_eq!(
        call(&app, &a, Method::POST, "start", Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    let c = send(
        &app,
        Method::POST,
        &format!("/api/v1/jobs/{id}/cancel"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.json()["state"], "running", "until the runner stops it");
    let hb = json_call(
        &app,
        Method::POST,
        &format!("{}/heartbeat", a.base),
        &a.token,
        json!({"phase": "running", "console_bytes": 0}),
        &[],
    )
    .await;
    assert_eq!(hb.json()["cancel"], true, "the heartbeat tells it to stop");
    assert_eq!(report(&app, &a, None).await.status, StatusCode::OK);
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "canceled", "{v}");
    assert!(v["result_attempt"].is_null(), "{v}");
    assert_eq!(v["attempts"][0]["state"], "canceled", "{v}");
}

#[tokio::test]
async fn an_upload_past_the_jobs_output_limit_is_cut_off_with_413_and_a_fitting_one_is_taken() {
    let (d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let small = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=small_t0.tar.xz&output_size=1024&memory_mib=256&timeout_s=60",
        &alice,
        Body::from(job("x")),
        &[],
    )
    .await;
    assert_eq!(small.status, StatusCode::CREATED);
    let volunteer = token(&app, "volunteer", "runner").await;
    let runner = register(&app, &volunteer, "home").await;
    let a = claimed(&claim(&app, &volunteer, &runner, caps()).await);
    call(&app, &a, Method::POST, "start", Body::empty()).await;
    let too_big = call(&app, &a, Method::PUT, "output", Body::from(vec![7u8; 4096])).await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_big.json()["error"], "output-too-big");
    let tmp_left = std::fs::read_dir(d.path().join("tmp"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().contains("upload"))
        })
        .count();
    assert_eq!(tmp_left, 0, "nothing of the cut upload is kept");
    let fits = call(&app, &a, Method::PUT, "output", Body::from(vec![7u8; 1024])).await;
    assert_eq!(fits.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_stopping_server_answers_its_parked_long_polls_at_once() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit(&app, &alice, "quiet_t0.tar.xz", job("x"))
        .await
        .json()["id"]
        .as_u64()
        .unwrap();
    let volunteer = token(&app, "volunteer", "runner").await;
    let runner = register(&app, &volunteer, "home").await;
    // The job is taken, so a second runner's claim parks; the submitter follows the console.
    let busy = claimed(&claim(&app, &volunteer, &runner, caps()).await);
    call(&app, &busy, Method::POST, "start", Body::empty()).await;
    let other_token = token(&app, "other", "runner").await;
    let other = register(&app, &other_token, "idle").await;
    let parked_claim = {
        let app = app.clone();
        tokio::spawn(async move {
            json_call(
                &app,
                Method::POST,
                "/api/v1/runner/claim",
                &other_token,
                json!({"capabilities": caps(), "wait_s": 25}),
                &[("Construir-Runner", other)],
            )
            .await
        })
    };
    let parked_log = {
        let app = app.clone();
        tokio::spawn(async move {
            send(
                &app,
                Method::GET,
                &format!("/api/v1/jobs/{id}/log?offset=0&wait_s=25"),
                &alice,
                Body::empty(),
                &[],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!parked_claim.is_finished() && !parked_log.is_finished());
    let asked = std::time::Instant::now();
    app.begin_stopping();
    let claim = tokio::time::timeout(Duration::from_secs(2), parked_claim)
        .await
        .expect("the claim answers at once")
        .unwrap();
    assert_eq!(claim.status, StatusCode::NO_CONTENT);
    let log = tokio::time::timeout(Duration::from_secs(2), parked_log)
        .await
        .expect("the log poll answers at once")
        .unwrap();
    assert_eq!(log.status, StatusCode::OK);
    assert!(log.headers.get("Construir-Log-Complete").is_none());
    assert!(asked.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn an_output_is_indexed_once_when_it_arrives_and_one_that_is_no_archive_says_why() {
    use construir_tools::pack::{JobFile, job_archive};
    use sha2::Digest;
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let volunteer = token(&app, "volunteer", "runner").await;
    let runner = register(&app, &volunteer, "home").await;
    let binary = b"\x7fELF pretend binary".to_vec();
    let output = job_archive(&[
        JobFile::script("#!/bin/sh\n"),
        JobFile::new("hello", binary.clone(), 0o755),
    ])
    .unwrap();
    let mut ids = Vec::new();
    for (n, body) in [(0, output.clone()), (1, b"not an archive".to_vec())] {
        let id = submit(&app, &alice, &format!("idx{n}_t0.tar.xz"), job("x"))
            .await
            .json()["id"]
            .as_u64()
            .unwrap();
        let a = claimed(&claim(&app, &volunteer, &runner, caps()).await);
        call(&app, &a, Method::POST, "start", Body::empty()).await;
        let up = call(&app, &a, Method::PUT, "output", Body::from(body)).await;
        assert_eq!(up.status, StatusCode::CREATED, "kept either way");
        let sha = up.json()["sha256"].as_str().unwrap().to_string();
        assert_eq!(report(&app, &a, Some(&sha)).await.status, StatusCode::OK);
        ids.push(id);
    }
    let index_of = |id: u64| {
        let app = app.clone();
        let alice = alice.clone();
        async move {
            send(
                &app,
                Method::GET,
                &format!("/api/v1/jobs/{id}/output/index"),
                &alice,
                Body::empty(),
                &[],
            )
            .await
        }
    };

    // Indexed in the background, after the upload's answer.
    let v = indexed(&app, &alice, ids[0]).await;
    let summary = &v["attempts"][0]["output_index"];
    let got = index_of(ids[0]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["content-type"], "application/json");
    let index: construir_contract::archive::OutputIndex =
        serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        summary["tree_sha256"].as_str(),
        Some(index.tree_sha256.as_str())
    );
    assert_eq!(
        summary["entries"].as_u64(),
        Some(index.entries.len() as u64)
    );
    assert_eq!(
        construir_contract::archive::tree_digest(&index.entries),
        index.tree_sha256
    );
    let hello = index
        .entries
        .iter()
        .find(|e| e.path == "opt/job/hello")
        .unwrap_or_else(|| panic!("{:?}", index.entries));
    let want = sha2::Sha256::digest(&binary)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert_eq!(hello.sha256.as_deref(), Some(want.as_str()));
    assert_eq!((hello.mode, hello.size), (0o755, binary.len() as u64));

    let v = indexed(&app, &alice, ids[1]).await;
    let why = v["attempts"][0]["output_index"]["error"].as_str().unwrap();
    assert!(why.contains("not an archive"), "{why}");
    assert!(v["attempts"][0]["output_index"]["tree_sha256"].is_null());
    assert_eq!(index_of(ids[1]).await.status, StatusCode::NOT_FOUND);
}

/// The job once its result's output is indexed (or why not), waiting up to 10 s.
async fn indexed(app: &Shared, token: &str, id: u64) -> Value {
    for _ in 0..200 {
        let v = show(app, token, id).await;
        if !v["attempts"][0]["output_index"].is_null() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id}'s output was never indexed");
}

#[tokio::test]
async fn an_output_a_stopped_server_left_unindexed_is_indexed_by_the_housekeeping() {
    use construir_tools::pack::{JobFile, job_archive};
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let volunteer = token(&app, "volunteer", "runner").await;
    let runner = register(&app, &volunteer, "home").await;
    let id = submit(&app, &alice, "late_t0.tar.xz", job("x"))
        .await
        .json()["id"]
        .as_u64()
        .unwrap();
    let a = claimed(&claim(&app, &volunteer, &runner, caps()).await);
    call(&app, &a, Method::POST, "start", Body::empty()).await;
    // The output as a server killed before its indexing left it: published and recorded only.
    let output = job_archive(&[JobFile::script("#!/bin/sh\n")]).unwrap();
    let mut writer = app.blobs.writer().await.unwrap();
    writer.write(&output).await.unwrap();
    let received = writer.finish().await.unwrap();
    app.blobs.publish(&received).await.unwrap();
    let job = app
        .db
        .load_job(construir_api::types::JobId(id))
        .await
        .unwrap()
        .unwrap();
    let attempt = job.snapshot.attempts[0].id;
    let stored = app
        .db
        .set_output(
            attempt,
            job.facts.id,
            job.version,
            &received.sha256,
            received.size,
            &Default::default(),
        )
        .await
        .unwrap();
    assert!(matches!(stored, crate::jobs::SetOutput::Stored));
    assert!(show(&app, &alice, id).await["attempts"][0]["output_index"].is_null());
    assert_eq!(crate::indexing::catch_up(&app, 10).await.unwrap(), 1);
    let v = show(&app, &alice, id).await;
    assert!(
        v["attempts"][0]["output_index"]["tree_sha256"].is_string(),
        "{v}"
    );
    assert_eq!(
        crate::indexing::catch_up(&app, 10).await.unwrap(),
        0,
        "once"
    );
}
