//! Adaptive replication, in process: a runner of good standing runs a job that allows it
//! alone (its result `on-standing`, with a receipt that says so), unless the audit drawn at
//! its claim asks for the job's other replicas after its vote; an audit catches a runner
//! alone that lies, which loses its standing and runs nothing alone after that.

use crate::flow_tests::caps;
use crate::flow_tests::token;
use crate::http::tests::app_with;
use crate::matching_tests::{call, claim, claimed, show};
use crate::replica_tests::{
    Volunteer, claim_and_upload, ended, honest, receipt, report, runners, server_key, standing_of,
    statement_of, submit_replicated, success, volunteer, wants_more,
};
use crate::service::Shared;
use crate::settings::SettingArgs;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use construir_api::trust::{Attestation, SignedReceipt};
use construir_api::types::RanAlone;
use serde_json::Value;

/// A server that lets a runner with one agreed vote run adaptive jobs alone, audited at
/// `audit_percent`; alice submits; bob, carol and dave lend runners, each with one vote agreed
/// (a job of three replicas they all ran).
async fn farm(audit_percent: u8) -> (tempfile::TempDir, Shared, String, [Volunteer; 3]) {
    let (d, app) = app_with(SettingArgs {
        adaptive_after: Some(1),
        audit_percent: Some(audit_percent),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let all = [
        volunteer(&app, "bob", "b1").await,
        volunteer(&app, "carol", "c1").await,
        volunteer(&app, "dave", "d1").await,
    ];
    let id = submit_replicated(&app, &alice, "replicas=3").await;
    for v in &all {
        honest(&app, v, &success("42")).await;
    }
    assert_eq!(ended(&app, &alice, id).await["attestation"], "verified");
    let list = runners(&app, &alice).await;
    for v in &all {
        assert_eq!(standing_of(&list, &v.runner), (1, 1, 0));
    }
    (d, app, alice, all)
}

async fn nothing_for(app: &Shared, v: &Volunteer) {
    assert_eq!(
        claim(app, &v.token, &v.runner, caps()).await.status,
        StatusCode::NO_CONTENT,
        "runner {} got a job",
        v.runner
    );
}

#[tokio::test]
async fn a_runner_of_good_standing_runs_an_adaptive_job_alone_and_its_result_is_on_standing() {
    let (_d, app, alice, [bob, carol, dave]) = farm(0).await;
    let id = submit_replicated(&app, &alice, "replicas=2&adaptive=true").await;
    assert_eq!(show(&app, &alice, id).await["adaptive"], true);
    let run = success("42");
    let a = claim_and_upload(&app, &bob, &run).await;
    // Alone, it holds the job: no one else gets a replica of it.
    nothing_for(&app, &carol).await;
    let j = show(&app, &alice, id).await;
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("alone on its standing"),
        "{j}"
    );
    let st = statement_of(&app, &bob, &a, &run).await.sign(&bob.key);
    assert_eq!(
        report(&app, &a, &run, Some(st)).await.status,
        StatusCode::OK
    );
    let j = ended(&app, &alice, id).await;
    assert_eq!(
        (j["state"].as_str(), j["attestation"].as_str()),
        (Some("succeeded"), Some("on-standing")),
        "{j}"
    );
    let terms: RanAlone = serde_json::from_value(j["ran_alone"].clone()).unwrap();
    assert_eq!(
        terms,
        RanAlone {
            agreed_in_row: 1,
            after: 1,
            audit_percent: 0
        }
    );
    // Its receipt opens as on-standing, with the terms, and one vote.
    let r = receipt(&app, &alice, id).await;
    assert_eq!(r.status, StatusCode::OK);
    let signed: SignedReceipt = serde_json::from_slice(&r.body).unwrap();
    let opened = signed.open(&server_key(&app).await.public_key).unwrap();
    assert_eq!(opened.attestation, Attestation::OnStanding);
    assert_eq!((opened.ran_alone, opened.votes.len()), (Some(terms), 1));
    // Nothing was compared: no standing changed.
    let list = runners(&app, &alice).await;
    assert_eq!(standing_of(&list, &bob.runner), (1, 1, 0));
    nothing_for(&app, &dave).await;

    // A job that does not allow it runs on all its replicas, whoever claims first.
    let id = submit_replicated(&app, &alice, "replicas=2").await;
    honest(&app, &bob, &run).await;
    honest(&app, &carol, &run).await;
    assert_eq!(ended(&app, &alice, id).await["attestation"], "verified");
}

#[tokio::test]
async fn a_runner_short_of_the_standing_runs_an_adaptive_job_as_one_of_its_replicas() {
    let (_d, app, alice, [bob, carol, _dave]) = farm(0).await;
    let erin = volunteer(&app, "erin", "e1").await;
    let id = submit_replicated(&app, &alice, "replicas=2&adaptive=true").await;
    let run = success("42");
    honest(&app, &erin, &run).await;
    // erin has no vote agreed: hers is a replica's claim, and another replica is wanted.
    wants_more(&app, &alice, id).await;
    honest(&app, &bob, &run).await;
    let j = ended(&app, &alice, id).await;
    assert_eq!(j["attestation"], "verified", "{j}");
    assert!(j.get("ran_alone").is_none(), "{j}");
    nothing_for(&app, &carol).await;
    // A quorum of 1 has nothing to spare: refused, saying why.
    let r = crate::flow_tests::send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=hello_t0.tar.xz&replicas=2&quorum=1&adaptive=true",
        &alice,
        Body::from(crate::flow_tests::job("x")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let why = String::from_utf8_lossy(&r.body);
    assert!(why.contains("adaptive"), "{why}");
}

#[tokio::test]
async fn an_audit_catches_a_runner_alone_that_lies_and_it_runs_nothing_alone_after() {
    let (_d, app, alice, [bob, carol, dave]) = farm(100).await;
    let id = submit_replicated(&app, &alice, "replicas=2&adaptive=true").await;
    let (lie, truth) = (success("41"), success("42"));
    let a = claim_and_upload(&app, &bob, &lie).await;
    // Audited or not, it holds the job alone until its vote is in.
    nothing_for(&app, &carol).await;
    let st = statement_of(&app, &bob, &a, &lie).await.sign(&bob.key);
    assert_eq!(
        report(&app, &a, &lie, Some(st)).await.status,
        StatusCode::OK
    );
    let j: Value = wants_more(&app, &alice, id).await;
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("checked by other replicas"),
        "{j}"
    );
    // The auditor disagrees; a third replica settles it against the runner alone.
    honest(&app, &carol, &truth).await;
    wants_more(&app, &alice, id).await;
    honest(&app, &dave, &truth).await;
    let j = ended(&app, &alice, id).await;
    assert_eq!(
        (j["state"].as_str(), j["attestation"].as_str()),
        (Some("succeeded"), Some("verified")),
        "{j}"
    );
    let list = runners(&app, &alice).await;
    assert_eq!(standing_of(&list, &bob.runner), (0, 1, 1));
    assert_eq!(standing_of(&list, &carol.runner), (2, 2, 0));
    // Back to no votes in a row: bob's next claim of an adaptive job is one replica's, and
    // another runner takes the second beside it.
    let id = submit_replicated(&app, &alice, "replicas=2&adaptive=true").await;
    let a = claimed(&claim(&app, &bob.token, &bob.runner, caps()).await);
    let b = claimed(&claim(&app, &carol.token, &carol.runner, caps()).await);
    assert_eq!((a.job, b.job), (id, id));
    for x in [&a, &b] {
        assert_eq!(
            call(&app, x, Method::POST, "start", Body::empty())
                .await
                .status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn a_runner_holds_one_job_alone_at_a_time() {
    let (_d, app, alice, [bob, carol, _dave]) = farm(0).await;
    let first = submit_replicated(&app, &alice, "replicas=2&adaptive=true").await;
    let second = submit_replicated(&app, &alice, "replicas=2&adaptive=true").await;
    let mut two_slots = caps();
    two_slots["free_slots"] = 2.into();
    let a = claimed(&claim(&app, &bob.token, &bob.runner, two_slots.clone()).await);
    assert_eq!(a.job, first);
    // bob's second claim is a replica's: carol gets the other replica of the same job.
    let b = claimed(&claim(&app, &bob.token, &bob.runner, two_slots).await);
    assert_eq!(b.job, second);
    let c = claimed(&claim(&app, &carol.token, &carol.runner, caps()).await);
    assert_eq!(c.job, second);
    let j = show(&app, &alice, first).await;
    assert_eq!(j["attempts"][0]["alone"], "alone", "{j}");
    let j = show(&app, &alice, second).await;
    assert!(j["attempts"][0].get("alone").is_none(), "{j}");
}
