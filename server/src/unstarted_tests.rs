//! Claims that never start, and uploads of one attempt at a time, in process: a runner (or its
//! user under other names) that claims a job and does not start it waits out a cool-down before
//! it gets that job again, so one user cannot cycle a job — or the queue — into `errored` in a
//! burst, while an honest runner whose claim or start was lost gets it back; other users'
//! runners may take the job at once. And a second output upload of an attempt while one is
//! under way is refused at once, before its body is read.

use crate::flow_tests::{caps, job, json_call, send, submit, token};
use crate::http::tests::app_with;
use crate::matching_tests::{Claimed, call, claim, claimed, register, show};
use crate::service::Shared;
use crate::settings::SettingArgs;
use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

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

async fn submit_id(app: &Shared, token: &str, name: &str) -> u64 {
    let answer = submit(app, token, name, job(name)).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    answer.json()["id"].as_u64().unwrap()
}

/// Moves the ends of job `id`'s attempts `by_ms` into the past, as if that long had gone by.
async fn backdate(app: &Shared, id: u64, by_ms: u64) {
    let id = construir_api::types::JobId(id);
    let mut job = app.db.load_job(id).await.unwrap().unwrap();
    for a in &mut job.snapshot.attempts {
        if let Some(ended) = a.ended_ms.as_mut() {
            *ended -= by_ms;
        }
    }
    assert!(
        app.db
            .store_job(id, job.version, &job.snapshot)
            .await
            .unwrap()
    );
}

const COOL_DOWN_MS: u64 = 5 * 60_000;

fn reason(v: &Value) -> String {
    v["reason"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_user_whose_runner_did_not_start_a_job_waits_out_a_cool_down_and_others_take_it_at_once()
{
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let first = submit_id(&app, &alice, "first_t0.tar.xz").await;
    let second = submit_id(&app, &alice, "second_t0.tar.xz").await;
    let mallory = token(&app, "mallory", "runner").await;
    let m1 = register(&app, &mallory, "m1").await;

    // Claim → abort before the start: the job goes back to the queue at once, costing no try.
    let a = claimed(&claim(&app, &mallory, &m1, caps()).await);
    assert_eq!(a.job, first, "the oldest first");
    abort(&app, &a).await;
    assert_eq!(show(&app, &alice, first).await["state"], "queued");
    // The same runner is passed over for it, the next job in the usual order instead.
    let b = claimed(&claim(&app, &mallory, &m1, caps()).await);
    assert_eq!(b.job, second);
    abort(&app, &b).await;

    // Again and again, under fresh names of the same user (or a second token of it): nothing
    // during the cool-down.
    let mallory2 = token(&app, "mallory", "runner").await;
    for n in 0..6 {
        let (t, r) = if n % 2 == 0 {
            (&mallory, register(&app, &mallory, &format!("m-{n}")).await)
        } else {
            (
                &mallory2,
                register(&app, &mallory2, &format!("m-{n}")).await,
            )
        };
        let answer = claim(&app, t, &r, caps()).await;
        assert_eq!(
            answer.status,
            StatusCode::NO_CONTENT,
            "try {n}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let again = claim(&app, &mallory, &m1, caps()).await;
        assert_eq!(again.status, StatusCode::NO_CONTENT, "try {n}");
    }
    for id in [first, second] {
        let v = show(&app, &alice, id).await;
        assert_eq!(v["state"], "queued", "{v}");
        assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{v}");
        let reason = reason(&v);
        assert!(
            reason.contains(&format!(
                "runner {m1} claimed it and did not start it; other runners may take it now, \
                 {m1} again after a 300 s cool-down"
            )),
            "{reason}"
        );
        assert!(!reason.contains("queued again"), "{reason}");
    }

    // After the cool-down the user's runners get the first again: another name of it claims
    // and gives up once more, and now the user's names wait twice as long.
    backdate(&app, first, COOL_DOWN_MS).await;
    let m9 = register(&app, &mallory2, "m9").await;
    let c = claimed(&claim(&app, &mallory2, &m9, caps()).await);
    assert_eq!(c.job, first);
    abort(&app, &c).await;
    backdate(&app, first, COOL_DOWN_MS).await;
    let answer = claim(&app, &mallory, &m1, caps()).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    let v = show(&app, &alice, first).await;
    let why = reason(&v);
    assert!(
        why.contains(&format!(
            "runner {m9} claimed it as attempt {} and did not start it, the user's runners 2 \
             times in all: other users' runners may take it now, that user's again at",
            c.base.rsplit('/').next().unwrap()
        )),
        "{why}"
    );
    backdate(&app, first, COOL_DOWN_MS).await;
    let d = claimed(&claim(&app, &mallory, &m1, caps()).await);
    assert_eq!(d.job, first, "m1 gets it again after the cool-down");
    let started = call(&app, &d, Method::POST, "start", Body::empty()).await;
    assert_eq!(started.status, StatusCode::OK);
    let why = reason(&show(&app, &alice, first).await);
    assert!(why.contains("try 1 of 3"), "{why}");

    // Another user's runner gets the second at once, with all its tries.
    let volunteer = token(&app, "volunteer", "runner").await;
    let home = register(&app, &volunteer, "home").await;
    let e = claimed(&claim(&app, &volunteer, &home, caps()).await);
    assert_eq!(e.job, second);
    let started = call(&app, &e, Method::POST, "start", Body::empty()).await;
    assert_eq!(started.status, StatusCode::OK);
    let why = reason(&show(&app, &alice, second).await);
    assert!(why.contains("try 1 of 3"), "{why}");
}

#[tokio::test]
async fn a_runner_that_lets_the_accept_window_close_gets_the_job_after_its_cool_down() {
    let (_d, app) = app_with(SettingArgs {
        accept_window: Some(1),
        ..SettingArgs::default()
    })
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_id(&app, &alice, "slow_t0.tar.xz").await;
    let sleepy_token = token(&app, "sleepy", "runner").await;
    let sleepy = register(&app, &sleepy_token, "sleepy").await;
    claimed(&claim(&app, &sleepy_token, &sleepy, caps()).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.sweep().await.unwrap();
    let v = show(&app, &alice, id).await;
    assert_eq!(v["state"], "queued", "{v}");
    assert_eq!(v["attempts"][0]["state"], "expired", "{v}");
    // Restarted under the same name (the same runner id), say after its claim answer was lost:
    // not this job during the cool-down, and the reason says until when.
    let again = register(&app, &sleepy_token, "sleepy").await;
    assert_eq!(again, sleepy);
    let answer = claim(&app, &sleepy_token, &sleepy, caps()).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    let why = reason(&show(&app, &alice, id).await);
    assert!(
        why.contains(&format!("{sleepy} again after a 300 s cool-down")),
        "{why}"
    );
    // Then it gets it back, though no other runner came.
    backdate(&app, id, COOL_DOWN_MS).await;
    assert_eq!(
        claimed(&claim(&app, &sleepy_token, &sleepy, caps()).await).job,
        id
    );
}

#[tokio::test]
async fn another_users_runner_takes_a_job_at_once_during_a_cool_down() {
    let (_d, app) = app_with(SettingArgs::default()).await;
    let alice = token(&app, "alice", "submitter").await;
    let id = submit_id(&app, &alice, "x_t0.tar.xz").await;
    let farm = token(&app, "farm", "runner").await;
    let f1 = register(&app, &farm, "f1").await;
    abort(&app, &claimed(&claim(&app, &farm, &f1, caps()).await)).await;
    let f2 = register(&app, &farm, "f2").await;
    assert_eq!(
        claim(&app, &farm, &f2, caps()).await.status,
        StatusCode::NO_CONTENT
    );
    let other = token(&app, "other", "runner").await;
    let keen = register(&app, &other, "keen").await;
    assert_eq!(claimed(&claim(&app, &other, &keen, caps()).await).job, id);
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
    let a = claimed(&claim(&app, &volunteer, &home, caps()).await);
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
    let a = claimed(&claim(&app, &volunteer, &home, caps()).await);
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
