//! Claims that never start, and uploads of one attempt at a time, in process: a runner (or its
//! user under other names) that claims a job and does not start it never gets that job again,
//! so one user cannot cycle a job — or the queue — into `errored`; the job goes on to other
//! users' runners in the usual order. And a second output upload of an attempt while one is
//! under way is refused at once, before its body is read.

use crate::flow_tests::{Answer, caps, job, json_call, send, submit, token};
use crate::service::{App, Shared};
use crate::settings::SettingArgs;
use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

async fn app_with(args: SettingArgs) -> (tempfile::TempDir, Shared) {
    let d = tempfile::tempdir().unwrap();
    let settings = SettingArgs {
        data: Some(d.path().to_path_buf()),
        ..args
    }
    .resolve()
    .unwrap();
    let db = crate::db::Db::open_embedded(d.path()).await.unwrap();
    let blobs = crate::blobs::Blobs::open_local(d.path()).unwrap();
    (d, App::new(settings, db, blobs))
}

async fn register(app: &Shared, token: &str, name: &str) -> String {
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

async fn claim(app: &Shared, token: &str, runner: &str) -> Answer {
    json_call(
        app,
        Method::POST,
        "/api/v1/runner/claim",
        token,
        json!({"capabilities": caps(), "wait_s": 0}),
        &[("Construir-Runner", runner.to_string())],
    )
    .await
}

/// A claimed attempt: its job, its path prefix and its token.
struct Claimed {
    job: u64,
    base: String,
    token: String,
}

fn claimed(answer: &Answer) -> Claimed {
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

async fn abort(app: &Shared, a: &Claimed) {
    let answer = json_call(
        app,
        Method::POST,
        &format!("{}/abort", a.base),
        &a.token,
        json!({"reason": "not today"}),
        &[],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

async fn call(app: &Shared, a: &Claimed, method: Method, what: &str, body: Body) -> Answer {
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

async fn submit_id(app: &Shared, token: &str, name: &str) -> u64 {
    let answer = submit(app, token, name, job(name)).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    answer.json()["id"].as_u64().unwrap()
}

#[tokio::test]
async fn a_user_whose_runner_did_not_start_a_job_never_gets_it_again_and_cannot_error_it() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let first = submit_id(&app, &alice, "first_t0.tar.xz").await;
    let second = submit_id(&app, &alice, "second_t0.tar.xz").await;
    let mallory = token(&app, "mallory", "runner").await;
    let m1 = register(&app, &mallory, "m1").await;

    // Claim → abort before the start: the job goes back to the queue at once, costing no try.
    let a = claimed(&claim(&app, &mallory, &m1).await);
    assert_eq!(a.job, first, "the oldest first");
    abort(&app, &a).await;
    assert_eq!(show(&app, &alice, first).await["state"], "queued");
    // The same runner is passed over for it, the next job in the usual order instead.
    let b = claimed(&claim(&app, &mallory, &m1).await);
    assert_eq!(b.job, second);
    abort(&app, &b).await;

    // Again and again, under fresh names of the same user (or a second token of it): nothing.
    let mallory2 = token(&app, "mallory", "runner").await;
    for n in 0..12 {
        let (t, r) = if n % 2 == 0 {
            (&mallory, register(&app, &mallory, &format!("m-{n}")).await)
        } else {
            (
                &mallory2,
                register(&app, &mallory2, &format!("m-{n}")).await,
            )
        };
        let answer = claim(&app, t, &r).await;
        assert_eq!(
            answer.status,
            StatusCode::NO_CONTENT,
            "try {n}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let again = claim(&app, &mallory, &m1).await;
        assert_eq!(again.status, StatusCode::NO_CONTENT, "try {n}");
    }
    for id in [first, second] {
        let v = show(&app, &alice, id).await;
        assert_eq!(v["state"], "queued", "{v}");
        assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{v}");
        let reason = v["reason"].as_str().unwrap();
        assert!(
            reason.contains("queued again for other runners"),
            "{reason}"
        );
    }

    // Another user's runner gets them, in order, with all their tries.
    let volunteer = token(&app, "volunteer", "runner").await;
    let home = register(&app, &volunteer, "home").await;
    let c = claimed(&claim(&app, &volunteer, &home).await);
    assert_eq!(c.job, first);
    let started = call(&app, &c, Method::POST, "start", Body::empty()).await;
    assert_eq!(started.status, StatusCode::OK);
    let reason = show(&app, &alice, first).await["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("try 1 of 3"), "{reason}");
}

#[tokio::test]
async fn a_runner_that_lets_the_accept_window_close_is_passed_over_too() {
    let (_d, app) = app_with(SettingArgs {
        accept_window: Some(1),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_id(&app, &alice, "slow_t0.tar.xz").await;
    let sleepy_token = token(&app, "sleepy", "runner").await;
    let sleepy = register(&app, &sleepy_token, "sleepy").await;
    claimed(&claim(&app, &sleepy_token, &sleepy).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.sweep().await.unwrap();
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "queued", "{v}");
    assert_eq!(v["attempts"][0]["state"], "expired", "{v}");
    // Restarted under the same name (the same runner id): still not this job.
    let again = register(&app, &sleepy_token, "sleepy").await;
    assert_eq!(again, sleepy);
    let answer = claim(&app, &sleepy_token, &sleepy).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    let other = token(&app, "other", "runner").await;
    let keen = register(&app, &other, "keen").await;
    assert_eq!(claimed(&claim(&app, &other, &keen).await).job, id);
}

/// A request body whose first chunk is sent at once and the rest when `rest` is sent (or the
/// body ends, when it is dropped); `polled` says when the server has begun reading it.
fn held_body(
    first: Vec<u8>,
) -> (
    Body,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<Vec<u8>>,
) {
    let (polled_tx, polled) = tokio::sync::oneshot::channel::<()>();
    let (rest, rest_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let chunks = futures::stream::unfold(
        (Some(first), Some(polled_tx), Some(rest_rx)),
        |(first, polled_tx, rest_rx)| async move {
            if let Some(tx) = polled_tx {
                let _ = tx.send(());
            }
            if let Some(bytes) = first {
                return Some((
                    Ok::<_, std::io::Error>(Bytes::from(bytes)),
                    (None, None, rest_rx),
                ));
            }
            let bytes = rest_rx?.await.ok()?;
            Some((Ok(Bytes::from(bytes)), (None, None, None)))
        },
    );
    (Body::from_stream(chunks), polled, rest)
}

#[tokio::test]
async fn a_second_upload_of_an_attempt_while_one_is_under_way_is_refused_at_once() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_id(&app, &alice, "out_t0.tar.xz").await;
    let volunteer = token(&app, "volunteer", "runner").await;
    let home = register(&app, &volunteer, "home").await;
    let a = claimed(&claim(&app, &volunteer, &home).await);
    assert_eq!(a.job, id);
    let started = call(&app, &a, Method::POST, "start", Body::empty()).await;
    assert_eq!(started.status, StatusCode::OK);

    let (body, polled, rest) = held_body(b"the first half, ".to_vec());
    let first = {
        let (app, path, token) = (app.clone(), format!("{}/output", a.base), a.token.clone());
        tokio::spawn(async move { send(&app, Method::PUT, &path, &token, body, &[]).await })
    };
    // The server reads the first upload's body, and waits for the rest of it.
    tokio::time::timeout(Duration::from_secs(10), polled)
        .await
        .unwrap()
        .unwrap();

    // A second one is answered at once, without its body being read (it never ends).
    let (never, mut never_polled, _never_rest) = held_body(b"a second output".to_vec());
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        call(&app, &a, Method::PUT, "output", never),
    )
    .await
    .expect("answered without waiting for its body");
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(second.json()["error"], "wrong-state");
    let message = second.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("an upload of this attempt is under way"),
        "{message}"
    );
    assert!(never_polled.try_recv().is_err(), "its body was not read");

    // The first goes on undisturbed and is taken.
    rest.send(b"and the second.".to_vec()).unwrap();
    let first = first.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.json()["size"], 31);
    // Once it has ended another may come (and is told the attempt has its output).
    let third = call(&app, &a, Method::PUT, "output", Body::from("x")).await;
    assert_eq!(third.status, StatusCode::CONFLICT);
    let message = third.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("has uploaded its output already"),
        "{message}"
    );
}

#[tokio::test]
async fn an_upload_that_failed_frees_the_attempt_for_the_next() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let answer = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=small_t0.tar.xz&output_size=1024&memory_mib=256&timeout_s=60",
        &alice,
        Body::from(job("small")),
        &[],
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let volunteer = token(&app, "volunteer", "runner").await;
    let home = register(&app, &volunteer, "home").await;
    let a = claimed(&claim(&app, &volunteer, &home).await);
    let started = call(&app, &a, Method::POST, "start", Body::empty()).await;
    assert_eq!(started.status, StatusCode::OK);
    // Cut off past the limit: the hold on the attempt goes with the request.
    let too_big = call(&app, &a, Method::PUT, "output", Body::from(vec![7u8; 4096])).await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    // A body that breaks half-way, too.
    let broken = futures::stream::iter([
        Ok(Bytes::from_static(b"half")),
        Err(std::io::Error::other("the runner went away")),
    ]);
    let cut = call(&app, &a, Method::PUT, "output", Body::from_stream(broken)).await;
    assert!(cut.status.is_client_error(), "{}", cut.status);
    let fits = call(&app, &a, Method::PUT, "output", Body::from(vec![7u8; 1024])).await;
    assert_eq!(
        fits.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&fits.body)
    );
}
