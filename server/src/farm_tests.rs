//! Several servers, one farm: two (then three) servers on one PostgreSQL and one S3 bucket, each
//! with a data directory of its own holding nothing but its temporary files and the farm's key.
//! A runner and a client talk to different servers; wakeups cross between them (LISTEN/NOTIFY);
//! one server goes away mid-job and the job finishes through the other; a server started
//! afterwards serves every byte. Only in the PostgreSQL + S3 pass: the embedded SQLite is one
//! server's.

use crate::flow_tests::{caps, job, json_call, send, submit, token};
use crate::http::tests::test_app;
use crate::matching_tests::{Claimed, call, claimed};
use crate::replica_tests::{output, sha256, tree_of};
use crate::service::{App, KEY_FILE, Shared};
use crate::test_backends::{Backends, chosen};
use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

/// Another server of `first`'s farm: its own data directory, the same database and bucket, the
/// same settings and key.
pub(crate) async fn another_server(
    first_dir: &tempfile::TempDir,
    first: &Shared,
) -> (tempfile::TempDir, Shared) {
    let d = tempfile::tempdir().unwrap();
    for shared in ["test-backends", KEY_FILE] {
        std::fs::copy(first_dir.path().join(shared), d.path().join(shared)).unwrap();
    }
    let (db, blobs) = crate::test_backends::open(d.path()).await;
    let settings = crate::settings::Settings {
        data: d.path().to_path_buf(),
        ..first.settings.clone()
    };
    (d, App::new(settings, db, blobs).unwrap())
}

/// Whether this pass runs on PostgreSQL + S3 (said loudly when not).
fn on_a_shared_database(test: &str) -> bool {
    if chosen() == Backends::PostgresS3 {
        return true;
    }
    eprintln!(
        "NOTE: {test} runs in the PostgreSQL + S3 pass (tools/test), not on the embedded SQLite"
    );
    false
}

/// Polls until `check` holds (at most 10 s).
async fn within_10s<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    let t0 = Instant::now();
    while !check().await {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_servers_serve_one_farm_and_one_going_away_loses_nothing() {
    if !on_a_shared_database("two_servers_serve_one_farm_and_one_going_away_loses_nothing") {
        return;
    }
    let (dir_a, a) = test_app().await;
    let (_dir_b, b) = another_server(&dir_a, &a).await;
    // Tokens made through one are good on the other.
    let alice = token(&a, "alice", "submitter").await;
    let crate::replica_tests::Volunteer {
        token: volunteer,
        runner,
        ..
    } = crate::replica_tests::volunteer(&b, "volunteer", "home").await;

    // A runner long-polling b gets a job submitted through a, woken by a's NOTIFY.
    let waiting = {
        let (b, volunteer, runner) = (b.clone(), volunteer.clone(), runner.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let c = json_call(
                &b,
                Method::POST,
                "/api/v1/runner/claim",
                &volunteer,
                json!({"capabilities": caps(), "wait_s": 25}),
                &[("Construir-Runner", runner)],
            )
            .await;
            (c, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bytes = job("farm");
    let s = submit(&a, &alice, "farm_t0.tar.xz&private=false", bytes.clone()).await;
    assert_eq!(s.status, StatusCode::CREATED);
    let id = s.json()["id"].as_u64().unwrap();
    let (claim, took) = waiting.await.unwrap();
    let attempt: Claimed = claimed(&claim);
    assert_eq!(attempt.job, id);
    assert!(
        took < Duration::from_secs(10),
        "woken across servers, not by the poll's end ({took:?})"
    );

    // The job file uploaded through a is served by b, byte for byte.
    assert_eq!(
        call(&b, &attempt, Method::POST, "start", Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    let got = call(&b, &attempt, Method::GET, "job", Body::empty()).await;
    assert_eq!(got.body, bytes);

    // A client following the console on a gets the piece the runner sends to b.
    let following = {
        let (a, alice) = (a.clone(), alice.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = send(
                &a,
                Method::GET,
                &format!("/api/v1/jobs/{id}/log?offset=0&wait_s=25"),
                &alice,
                Body::empty(),
                &[],
            )
            .await;
            (r, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let piece = call(
        &b,
        &attempt,
        Method::PATCH,
        "log?offset=0",
        Body::from(&b"built on b\n"[..]),
    )
    .await;
    assert_eq!(piece.status, StatusCode::ACCEPTED);
    let (read, took) = following.await.unwrap();
    assert_eq!(read.body, b"built on b\n");
    assert!(took < Duration::from_secs(10), "woken across ({took:?})");

    // a goes away (its tasks with it); the runner goes on through b alone.
    drop(a);
    let out = output("made while a was gone");
    let up = call(&b, &attempt, Method::PUT, "output", Body::from(out.clone())).await;
    assert_eq!(up.status, StatusCode::CREATED);
    let rep = json_call(
        &b,
        Method::POST,
        &format!("{}/report", attempt.base),
        &attempt.token,
        json!({"status": "success", "exit_code": 0, "job_exit_status": 0,
               "output_sha256": sha256(&out), "output_tree_sha256": tree_of(&out)}),
        &[],
    )
    .await;
    assert_eq!(
        rep.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&rep.body)
    );

    // A server started afterwards, on a data directory of its own, serves all of it.
    let (_dir_c, c) = another_server(&dir_a, &b).await;
    within_10s("the job succeeded, seen by c", || {
        let (c, alice) = (c.clone(), alice.clone());
        async move {
            let v = send(
                &c,
                Method::GET,
                &format!("/api/v1/jobs/{id}"),
                &alice,
                Body::empty(),
                &[],
            )
            .await
            .json();
            v["state"] == "succeeded"
        }
    })
    .await;
    let fetched = send(
        &c,
        Method::GET,
        &format!("/api/v1/jobs/{id}/output"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(
        sha256(&fetched.body),
        sha256(&out),
        "the output, byte for byte"
    );
    let console = send(
        &c,
        Method::GET,
        &format!("/api/v1/jobs/{id}/log?offset=0"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(console.body, b"built on b\n");
}

#[tokio::test]
async fn two_farms_in_one_bucket_under_prefixes_never_see_each_others_blobs() {
    if !on_a_shared_database("two_farms_in_one_bucket_under_prefixes_never_see_each_others_blobs") {
        return;
    }
    use crate::blobs::{Blobs, StoreUrl};
    let bucket = crate::test_backends::new_bucket();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = |p: &str| StoreUrl::parse(&format!("s3://{}/{p}", bucket.bucket())).unwrap();
    let a = Blobs::open_s3(&url("farm-a"), da.path()).unwrap();
    let b = Blobs::open_s3(&url("farm-b/"), db.path()).unwrap();
    let mut w = a.writer().await.unwrap();
    w.write(b"farm a's output").await.unwrap();
    let got = w.finish().await.unwrap();
    a.publish(&got).await.unwrap();
    assert_eq!(a.list().await.unwrap().len(), 1);
    assert!(
        b.list().await.unwrap().is_empty(),
        "farm b sees nothing of farm a's"
    );
    assert!(b.info(&got.sha256).await.unwrap().is_none());
    let root = std::path::PathBuf::from(std::env::var("CONSTRUIR_TEST_S3_ROOT").unwrap());
    let file = root
        .join(bucket.bucket())
        .join("farm-a/sha256")
        .join(&got.sha256[..2])
        .join(&got.sha256);
    assert!(
        file.is_file(),
        "stored under the prefix: {}",
        file.display()
    );
}

#[tokio::test]
async fn a_nul_in_a_value_is_the_requests_fault_not_the_servers() {
    // PostgreSQL's TEXT takes no NUL byte; SQLite does. Either way, never a 5xx.
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    for path in [
        "/api/v1/jobs?owner=%00",
        "/jobs?owner=%00",
        "/jobs?image=a%00b",
    ] {
        let r = send(&app, Method::GET, path, &alice, Body::empty(), &[]).await;
        assert!(!r.status.is_server_error(), "{path}: {}", r.status);
    }
}
