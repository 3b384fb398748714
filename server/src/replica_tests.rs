//! Replicated jobs and lying runners, in process: tests that speak the runner API directly
//! (no VM). Each volunteer has its own owner, runner and ed25519 key; honest ones upload the
//! same output, liars another (or another job's), replay statements, sign with keys that are not
//! theirs, report success for a failure, or share an owner. Each lie is refused or outvoted, and
//! the job still ends with the honest result, a receipt that opens with the server's key, and
//! standing that says who agreed.

use crate::flow_tests::{Answer, caps, job, json_call, send, submit, token};
use crate::http::tests::{app_with, test_app};
use crate::matching_tests::{Claimed, call, claim, claimed, show};
use crate::service::Shared;
use crate::settings::SettingArgs;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use construir_api::trust::{
    Attestation, KeyPair, STATEMENT_VERSION, ServerKey, SignedReceipt, SignedStatement, Statement,
};
use construir_api::types::{AttemptId, JobId, ReportStatus, RunnerId};
use serde_json::{Value, json};
use std::time::Duration;

/// One volunteer: an owner with a runner token, a registered runner and its key.
pub(crate) struct Volunteer {
    pub token: String,
    pub runner: String,
    pub key: KeyPair,
}

pub(crate) async fn volunteer(app: &Shared, owner: &str, name: &str) -> Volunteer {
    let token = token(app, owner, "runner").await;
    let key = KeyPair::generate().unwrap();
    let runner = register_with(app, &token, name, &key.public_hex()).await;
    Volunteer { token, runner, key }
}

async fn register_with(app: &Shared, token: &str, name: &str, key: &str) -> String {
    let reg = json_call(
        app,
        Method::POST,
        "/api/v1/runner/register",
        token,
        json!({ "name": name, "public_key": key }),
        &[],
    )
    .await;
    assert_eq!(
        reg.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reg.body)
    );
    reg.json()["runner_id"].as_u64().unwrap().to_string()
}

/// An output archive (a small tar.xz) whose one file holds `text`.
pub(crate) fn output(text: &str) -> Vec<u8> {
    use construir_tools::pack::{JobFile, job_archive};
    job_archive(&[
        JobFile::script("#!/bin/sh\n"),
        JobFile::new("out/result", text.as_bytes(), 0o644),
    ])
    .unwrap()
}

pub(crate) fn tree_of(bytes: &[u8]) -> String {
    construir_contract::archive::index(bytes, &construir_contract::archive::Limits::DEFAULT)
        .unwrap()
        .tree_sha256
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A replicated job of alice's: `replicas` and `quorum` in its query.
pub(crate) async fn submit_replicated(app: &Shared, alice: &str, query: &str) -> u64 {
    let a = send(
        app,
        Method::POST,
        &format!("/api/v1/jobs?name=hello_t0.tar.xz&memory_mib=256&vcpus=1&timeout_s=60&{query}"),
        alice,
        Body::from(job("replicated")),
        &[],
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()["id"].as_u64().unwrap()
}

/// What a run reports: the status, the job's exit status, the output.
#[derive(Clone)]
pub(crate) struct Run {
    pub status: ReportStatus,
    pub exit: u16,
    pub output: Vec<u8>,
}

pub(crate) fn success(text: &str) -> Run {
    Run {
        status: ReportStatus::Success,
        exit: 0,
        output: output(text),
    }
}

/// The statement `v` would sign for its attempt `a` of `job` reporting `run`.
pub(crate) async fn statement_of(app: &Shared, v: &Volunteer, a: &Claimed, run: &Run) -> Statement {
    let stored = app.db.load_job(JobId(a.job)).await.unwrap().unwrap();
    let attempt: u64 = a.base.rsplit('/').next().unwrap().parse().unwrap();
    Statement {
        v: STATEMENT_VERSION,
        job_id: JobId(a.job),
        attempt_id: AttemptId(attempt),
        job_sha256: stored.facts.sha256.clone(),
        image: stored.facts.image.clone(),
        image_digest: stored.facts.image_digest.clone(),
        runner_id: RunnerId(v.runner.parse().unwrap()),
        runner_key: v.key.public_hex(),
        runner_version: "test".into(),
        backend: "qemu".into(),
        host_kind: "emulated".into(),
        status: run.status,
        job_exit_status: Some(run.exit),
        output_sha256: Some(sha256(&run.output)),
        output_tree_sha256: Some(tree_of(&run.output)),
        console_sha256: sha256(b""),
        console_bytes: 0,
        started_ms: 1,
        ended_ms: 2,
    }
}

/// Claims a job for `v` (which must get one), starts it and uploads `run`'s output.
pub(crate) async fn claim_and_upload(app: &Shared, v: &Volunteer, run: &Run) -> Claimed {
    let a = claimed(&claim(app, &v.token, &v.runner, caps()).await);
    assert_eq!(
        call(app, &a, Method::POST, "start", Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    let up = call(
        app,
        &a,
        Method::PUT,
        "output",
        Body::from(run.output.clone()),
    )
    .await;
    assert_eq!(
        up.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&up.body)
    );
    a
}

pub(crate) async fn report(
    app: &Shared,
    a: &Claimed,
    run: &Run,
    statement: Option<SignedStatement>,
) -> Answer {
    json_call(
        app,
        Method::POST,
        &format!("{}/report", a.base),
        &a.token,
        json!({"status": run.status, "exit_code": run.exit, "job_exit_status": run.exit,
               "output_sha256": sha256(&run.output), "output_tree_sha256": tree_of(&run.output),
               "statement": statement}),
        &[],
    )
    .await
}

/// `v` claims, runs and reports `run` honestly (signed with its own key); returns the attempt.
pub(crate) async fn honest(app: &Shared, v: &Volunteer, run: &Run) -> Claimed {
    let a = claim_and_upload(app, v, run).await;
    let st = statement_of(app, v, &a, run).await.sign(&v.key);
    let r = report(app, &a, run, Some(st)).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    a
}

/// The job once it has ended (its votes wait for the outputs' background indexing).
pub(crate) async fn ended(app: &Shared, alice: &str, id: u64) -> Value {
    for _ in 0..500 {
        let j = show(app, alice, id).await;
        if !matches!(j["state"].as_str(), Some("queued" | "running")) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {id} did not end: {}", show(app, alice, id).await);
}

/// The job once it wants another replica (queued, a vote or its index in).
pub(crate) async fn wants_more(app: &Shared, alice: &str, id: u64) -> Value {
    for _ in 0..500 {
        let j = show(app, alice, id).await;
        if j["reason"]
            .as_str()
            .is_some_and(|r| r.contains("more replica(s) wanted"))
        {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "job {id} wants no more replicas: {}",
        show(app, alice, id).await
    );
}

pub(crate) async fn runners(app: &Shared, token: &str) -> Vec<Value> {
    let r = send(
        app,
        Method::GET,
        "/api/v1/runners",
        token,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    r.json().as_array().unwrap().clone()
}

pub(crate) fn standing_of(list: &[Value], runner: &str) -> (u64, u64, u64) {
    let r = list
        .iter()
        .find(|r| r["id"].as_u64().unwrap().to_string() == runner)
        .unwrap();
    let s = &r["standing"];
    (
        s["agreed_in_row"].as_u64().unwrap(),
        s["agreed"].as_u64().unwrap(),
        s["disagreed"].as_u64().unwrap(),
    )
}

pub(crate) async fn receipt(app: &Shared, alice: &str, id: u64) -> Answer {
    send(
        app,
        Method::GET,
        &format!("/api/v1/jobs/{id}/receipt"),
        alice,
        Body::empty(),
        &[],
    )
    .await
}

pub(crate) async fn server_key(app: &Shared) -> ServerKey {
    let k = send(
        app,
        Method::GET,
        crate::receipts::KEY_PATH,
        "",
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(k.status, StatusCode::OK);
    serde_json::from_slice(&k.body).unwrap()
}

#[tokio::test]
async fn two_owners_that_agree_make_a_verified_result_with_a_receipt_that_opens() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_replicated(&app, &alice, "replicas=2").await;
    assert_eq!(show(&app, &alice, id).await["quorum"], 2);
    // The submitter's own runner takes no replica of it.
    let own = volunteer(&app, "alice", "alices-box").await;
    assert_eq!(
        claim(&app, &own.token, &own.runner, caps()).await.status,
        StatusCode::NO_CONTENT
    );
    let (bob, carol) = (
        volunteer(&app, "bob", "b1").await,
        volunteer(&app, "carol", "c1").await,
    );
    let run = success("42");
    honest(&app, &bob, &run).await;
    honest(&app, &carol, &run).await;
    let j = ended(&app, &alice, id).await;
    assert_eq!(
        (j["state"].as_str(), j["attestation"].as_str()),
        (Some("succeeded"), Some("verified"))
    );
    assert_eq!(j["agreeing"].as_array().unwrap().len(), 2);
    assert!(
        j["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["signed"] == true)
    );
    // The receipt opens with the published key, and says who agreed.
    let r = receipt(&app, &alice, id).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let signed: SignedReceipt = serde_json::from_slice(&r.body).unwrap();
    let key = server_key(&app).await;
    let opened = signed.open(&key.public_key).unwrap();
    assert_eq!(opened.attestation, Attestation::Verified);
    assert_eq!(
        opened.verdict.output_sha256.as_deref(),
        Some(sha256(&run.output).as_str())
    );
    assert_eq!(
        opened.verdict.output_tree_sha256,
        Some(tree_of(&run.output))
    );
    // Both runners gained standing.
    let list = runners(&app, &alice).await;
    assert_eq!(standing_of(&list, &bob.runner), (1, 1, 0));
    assert_eq!(standing_of(&list, &carol.runner), (1, 1, 0));
    // Revoking one of them marks the result it took part in: a person's call (a runner token,
    // which may be what was stolen, cannot), not someone else's.
    let path = format!("/api/v1/runners/{}/revoke", bob.runner);
    let by_runner = send(&app, Method::POST, &path, &bob.token, Body::empty(), &[]).await;
    assert_eq!(by_runner.status, StatusCode::FORBIDDEN);
    let carols = token(&app, "carol", "submitter").await;
    let by_other = send(&app, Method::POST, &path, &carols, Body::empty(), &[]).await;
    assert_eq!(by_other.status, StatusCode::NOT_FOUND);
    let bobs = token(&app, "bob", "submitter").await;
    let revoke = send(&app, Method::POST, &path, &bobs, Body::empty(), &[]).await;
    assert_eq!(
        revoke.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&revoke.body)
    );
    let j = show(&app, &alice, id).await;
    assert_eq!(
        j["revoked_runners"],
        json!([bob.runner.parse::<u64>().unwrap()])
    );
}

#[tokio::test]
async fn a_wrong_output_and_another_jobs_output_are_outvoted_and_lose_standing() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_replicated(&app, &alice, "replicas=2").await;
    let (bob, mallory, carol) = (
        volunteer(&app, "bob", "b1").await,
        volunteer(&app, "mallory", "m1").await,
        volunteer(&app, "carol", "c1").await,
    );
    honest(&app, &bob, &success("42")).await;
    // Mallory signs her own wrong output honestly: nothing refuses it, the vote outvotes it.
    honest(&app, &mallory, &success("41")).await;
    let j = wants_more(&app, &alice, id).await;
    assert!(
        j["reason"].as_str().unwrap().contains("1 of 2 votes agree"),
        "{j}"
    );
    honest(&app, &carol, &success("42")).await;
    let j = ended(&app, &alice, id).await;
    assert_eq!(j["state"], "succeeded");
    let list = runners(&app, &alice).await;
    assert_eq!(standing_of(&list, &mallory.runner), (0, 0, 1));
    assert_eq!(standing_of(&list, &carol.runner), (1, 1, 0));
    // A runner that uploads the right output of another job votes for another tree.
    let other = submit_replicated(&app, &alice, "replicas=2").await;
    honest(&app, &bob, &success("7")).await;
    honest(&app, &mallory, &success("42")).await;
    wants_more(&app, &alice, other).await;
    honest(&app, &carol, &success("7")).await;
    assert_eq!(ended(&app, &alice, other).await["state"], "succeeded");
    let list = runners(&app, &alice).await;
    assert_eq!(standing_of(&list, &mallory.runner), (0, 0, 2));
    assert_eq!(standing_of(&list, &bob.runner), (2, 2, 0));
}

#[tokio::test]
async fn replayed_foreign_unsigned_and_contradicting_statements_are_refused() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_replicated(&app, &alice, "replicas=2").await;
    let (bob, mallory) = (
        volunteer(&app, "bob", "b1").await,
        volunteer(&app, "mallory", "m1").await,
    );
    let run = success("42");
    let b = claim_and_upload(&app, &bob, &run).await;
    let bobs = statement_of(&app, &bob, &b, &run).await.sign(&bob.key);
    let m = claim_and_upload(&app, &mallory, &run).await;
    let refused = |r: &Answer, what: &str| {
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        String::from_utf8_lossy(&r.body).to_string()
    };
    // An output uploaded, and a report (and statement) that names none: its vote would say
    // "no output" while its upload could become the job's output.
    let mut none = statement_of(&app, &mallory, &m, &run).await;
    none.output_sha256 = None;
    none.output_tree_sha256 = None;
    let r = json_call(
        &app,
        Method::POST,
        &format!("{}/report", m.base),
        &m.token,
        json!({"status": "success", "exit_code": 0, "job_exit_status": 0,
               "statement": none.sign(&mallory.key)}),
        &[],
    )
    .await;
    let why = refused(&r, "no output named");
    assert!(why.contains("must name it"), "{why}");
    // Unsigned.
    let why = refused(&report(&app, &m, &run, None).await, "unsigned");
    assert!(why.contains("must carry a statement"), "{why}");
    // Bob's statement replayed for her own attempt.
    let why = refused(
        &report(&app, &m, &run, Some(bobs.clone())).await,
        "replayed",
    );
    assert!(why.contains("registered key"), "{why}");
    // Her statement, but claiming Bob's key (she cannot sign for it).
    let mut st = statement_of(&app, &mallory, &m, &run).await;
    st.runner_key = bob.key.public_hex();
    let why = refused(
        &report(&app, &m, &run, Some(st.sign(&mallory.key))).await,
        "another's key",
    );
    assert!(why.contains("signature"), "{why}");
    // Signed by a key she made, not the one registered.
    let stranger = KeyPair::generate().unwrap();
    let mut st = statement_of(&app, &mallory, &m, &run).await;
    st.runner_key = stranger.public_hex();
    let why = refused(
        &report(&app, &m, &run, Some(st.sign(&stranger))).await,
        "unregistered key",
    );
    assert!(why.contains("registered key"), "{why}");
    // Her own key, but naming Bob's attempt.
    let mut st = statement_of(&app, &mallory, &m, &run).await;
    st.attempt_id = statement_of(&app, &bob, &b, &run).await.attempt_id;
    let why = refused(
        &report(&app, &m, &run, Some(st.sign(&mallory.key))).await,
        "other attempt",
    );
    assert!(why.contains("attempt_id"), "{why}");
    // A statement that says failed under a report that says success.
    let mut st = statement_of(&app, &mallory, &m, &run).await;
    st.status = ReportStatus::Failed;
    st.job_exit_status = Some(1);
    let why = refused(
        &report(&app, &m, &run, Some(st.sign(&mallory.key))).await,
        "contradiction",
    );
    assert!(why.contains("status"), "{why}");
    // A key cannot be swapped on re-registration: a stolen token brings no key of its own.
    let swap = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/register",
        &mallory.token,
        json!({"name": "m1", "public_key": stranger.public_hex()}),
        &[],
    )
    .await;
    assert_eq!(
        swap.status,
        StatusCode::CONFLICT,
        "{}",
        String::from_utf8_lossy(&swap.body)
    );
    // Nothing of that was taken: both honest reports still make the result.
    let r = report(&app, &b, &run, Some(bobs)).await;
    assert_eq!(r.status, StatusCode::OK);
    let st = statement_of(&app, &mallory, &m, &run)
        .await
        .sign(&mallory.key);
    assert_eq!(
        report(&app, &m, &run, Some(st)).await.status,
        StatusCode::OK
    );
    assert_eq!(ended(&app, &alice, id).await["attestation"], "verified");
}

#[tokio::test]
async fn one_owners_runners_form_no_quorum_and_a_false_success_is_outvoted() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_replicated(&app, &alice, "replicas=2").await;
    let bob = volunteer(&app, "bob", "b1").await;
    let bob2 = Volunteer {
        runner: register_with(
            &app,
            &bob.token,
            "b2",
            &KeyPair::generate().unwrap().public_hex(),
        )
        .await,
        key: KeyPair::generate().unwrap(),
        token: bob.token.clone(),
    };
    let failed = Run {
        status: ReportStatus::Failed,
        exit: 3,
        output: output("partial"),
    };
    honest(&app, &bob, &failed).await;
    // Bob's second runner gets no replica of a job Bob's first one voted on.
    assert_eq!(
        claim(&app, &bob2.token, &bob2.runner, caps()).await.status,
        StatusCode::NO_CONTENT
    );
    // Mallory says it succeeded (with the same output): outvoted by two that saw it fail.
    let (mallory, carol) = (
        volunteer(&app, "mallory", "m1").await,
        volunteer(&app, "carol", "c1").await,
    );
    let lie = Run {
        status: ReportStatus::Success,
        exit: 0,
        ..failed.clone()
    };
    honest(&app, &mallory, &lie).await;
    wants_more(&app, &alice, id).await;
    honest(&app, &carol, &failed).await;
    let j = ended(&app, &alice, id).await;
    assert_eq!(
        (j["state"].as_str(), j["attestation"].as_str()),
        (Some("failed"), Some("verified"))
    );
    assert_eq!(
        standing_of(&runners(&app, &alice).await, &mallory.runner),
        (0, 0, 1)
    );
}

#[tokio::test]
async fn votes_that_never_agree_end_inconclusive_with_every_vote_shown() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_replicated(&app, &alice, "replicas=2").await;
    for (i, owner) in ["u1", "u2", "u3", "u4"].into_iter().enumerate() {
        let v = volunteer(&app, owner, "r").await;
        honest(&app, &v, &success(&format!("out {i}"))).await;
        if i < 3 {
            wants_more(&app, &alice, id).await;
        }
    }
    let j = ended(&app, &alice, id).await;
    assert_eq!(j["state"], "inconclusive", "{j}");
    let votes: Vec<&Value> = j["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["vote"])
        .collect();
    assert!(
        votes
            .iter()
            .all(|v| v.as_str().is_some_and(|v| v.contains("tree"))),
        "{votes:?}"
    );
    assert_eq!(
        receipt(&app, &alice, id).await.status,
        StatusCode::NOT_FOUND
    );
    // Nobody lost standing: no quorum said who was wrong.
    for r in runners(&app, &alice).await {
        assert_eq!(r["standing"]["disagreed"], 0);
    }
}

#[tokio::test]
async fn a_run_on_the_submitters_own_runner_is_self_attested_and_one_other_is_unverified() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let own = volunteer(&app, "alice", "alices-box").await;
    let a = submit(&app, &alice, "mine_t0.tar.xz", job("mine")).await;
    let mine = a.json()["id"].as_u64().unwrap();
    honest(&app, &own, &success("x")).await;
    let j = ended(&app, &alice, mine).await;
    assert_eq!(j["attestation"], "self-attested");
    let key = server_key(&app).await;
    // Its receipt (once the output is indexed) says so too.
    let mut opened = None;
    for _ in 0..200 {
        let r = receipt(&app, &alice, mine).await;
        if r.status == StatusCode::OK {
            let s: SignedReceipt = serde_json::from_slice(&r.body).unwrap();
            opened = Some(s.open(&key.public_key).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        opened.expect("a receipt").attestation,
        Attestation::SelfAttested
    );
    let b = submit(&app, &alice, "theirs_t0.tar.xz", job("theirs")).await;
    let theirs = b.json()["id"].as_u64().unwrap();
    let bob = volunteer(&app, "bob", "b1").await;
    honest(&app, &bob, &success("y")).await;
    assert_eq!(
        ended(&app, &alice, theirs).await["attestation"],
        "unverified"
    );
}
