//! Quotas per user (queued jobs, jobs running at once, bytes stored) and the per-user rate of
//! API requests: each refusal a clear 4xx that says which limit, how much is used and what to
//! do; nothing past a limit is stored.

use crate::flow_tests::{caps, job, send, submit, token};
use crate::http::tests::app_with;
use crate::matching_tests::{claim, claimed, show};
use crate::replica_tests::volunteer;
use crate::settings::SettingArgs;
use axum::body::Body;
use axum::http::{Method, StatusCode};

#[tokio::test]
async fn a_user_past_the_queued_quota_is_refused_until_one_runs() {
    let (_d, app) = app_with(SettingArgs {
        max_queued_per_user: Some(2),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    for n in 0..2 {
        let s = submit(&app, &alice, &format!("q{n}_t0.tar.xz"), job("q")).await;
        assert_eq!(s.status, StatusCode::CREATED);
    }
    let third = submit(&app, &alice, "q2_t0.tar.xz", job("q")).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.json()["error"], "too-many-requests");
    let message = third.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("2 jobs queued"), "{message}");
    // Another user's queue is their own.
    let bob = token(&app, "bob", "submitter").await;
    assert_eq!(
        submit(&app, &bob, "b_t0.tar.xz", job("b")).await.status,
        StatusCode::CREATED
    );
    // One of alice's runs (no longer queued): one more fits.
    let v = volunteer(&app, "volunteer", "home").await;
    let _a = claimed(&claim(&app, &v.token, &v.runner, caps()).await);
    let fits = submit(&app, &alice, "q3_t0.tar.xz", job("q")).await;
    assert_eq!(fits.status, StatusCode::CREATED, "{}", fits.json());
}

#[tokio::test]
async fn a_user_past_the_stored_quota_is_refused_with_what_is_used_and_nothing_is_kept() {
    let job_bytes = job("s").len() as u64;
    let (_d, app) = app_with(SettingArgs {
        // Three job files fit; a fourth does not.
        max_stored_per_user: Some(3 * job_bytes + 100),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    for n in 0..3 {
        let s = submit(&app, &alice, &format!("s{n}_t0.tar.xz"), job("s")).await;
        assert_eq!(s.status, StatusCode::CREATED);
    }
    // Refused after the body (no Content-Length) and, with one, before it is read.
    let over = submit(&app, &alice, "s3_t0.tar.xz", job("s")).await;
    let declared = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=s4_t0.tar.xz&memory_mib=256&vcpus=1&timeout_s=60",
        &alice,
        Body::from(job("s")),
        &[("Content-Length", job_bytes.to_string())],
    )
    .await;
    for r in [over, declared] {
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        let body = r.json();
        assert_eq!(body["error"], "quota-exceeded", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("keep {} bytes", 3 * job_bytes))
                && message.contains(&format!("brings {job_bytes}"))
                && message.contains("delete"),
            "{message}"
        );
    }
    let listed = send(
        &app,
        Method::GET,
        "/api/v1/jobs",
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(
        listed.json().as_array().map(Vec::len),
        Some(3),
        "nothing past a quota is stored: {}",
        listed.json()
    );
    // Bob's bytes are his own.
    let bob = token(&app, "bob", "submitter").await;
    assert_eq!(
        submit(&app, &bob, "b_t0.tar.xz", job("b")).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_users_jobs_past_the_running_cap_wait_and_say_why() {
    let (_d, app) = app_with(SettingArgs {
        max_running_per_user: Some(1),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let bob = token(&app, "bob", "submitter").await;
    let first = submit(&app, &alice, "a1_t0.tar.xz", job("a")).await.json()["id"]
        .as_u64()
        .unwrap();
    let second = submit(&app, &alice, "a2_t0.tar.xz", job("a")).await.json()["id"]
        .as_u64()
        .unwrap();
    let bobs = submit(&app, &bob, "b1_t0.tar.xz", job("b")).await.json()["id"]
        .as_u64()
        .unwrap();
    let mut caps2 = caps();
    caps2["free_slots"] = 3.into();
    let v = volunteer(&app, "volunteer", "home").await;
    let got = claimed(&claim(&app, &v.token, &v.runner, caps2.clone()).await);
    assert_eq!(got.job, first);
    // Alice runs one: the next claim passes her second job over for bob's.
    let next = claimed(&claim(&app, &v.token, &v.runner, caps2.clone()).await);
    assert_eq!(next.job, bobs);
    let none = claim(&app, &v.token, &v.runner, caps2).await;
    assert_eq!(none.status, StatusCode::NO_CONTENT, "alice's second waits");
    let waiting = show(&app, &alice, second).await;
    assert_eq!(waiting["state"], "queued");
    assert!(
        waiting["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("jobs running, the most one user may run at once"),
        "{waiting}"
    );
}

#[tokio::test]
async fn a_user_past_the_request_rate_gets_429_saying_when_to_try_again() {
    let (_d, app) = app_with(SettingArgs {
        requests_per_second: Some(2),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    // A second token of hers shares her rate.
    let alice2 = token(&app, "alice", "submitter").await;
    let bob = token(&app, "bob", "submitter").await;
    let mut refused = None;
    for n in 0..20 {
        let t = if n % 2 == 0 { &alice } else { &alice2 };
        let r = send(&app, Method::GET, "/api/v1/jobs", t, Body::empty(), &[]).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((n, r));
            break;
        }
        assert_eq!(r.status, StatusCode::OK);
    }
    let (n, r) = refused.expect("refused within 20 requests");
    assert!(n >= 10, "a burst of five seconds' worth passes first ({n})");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("2 API requests a second") && message.contains("try again in"),
        "{message}"
    );
    // Bob is not held back by alice.
    let b = send(&app, Method::GET, "/api/v1/jobs", &bob, Body::empty(), &[]).await;
    assert_eq!(b.status, StatusCode::OK);
    // Half a second later alice may again.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let again = send(
        &app,
        Method::GET,
        "/api/v1/jobs",
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
}
