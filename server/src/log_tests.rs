//! Consoles in process (no sockets, no VM): the cap's head and tail with its marker, resumable
//! pieces, compaction into one blob when the attempt ends (and after a server died half-way),
//! and long polls woken only by what they follow.

use crate::flow_tests::{Answer, job as job_file, token};
use crate::http::router;
use crate::http::tests::test_app;
use crate::service::{App, Shared, Topic};
use crate::tokens;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use construir_api::PROTOCOL_HEADER;
use construir_api::log::{ConsoleCap, dropped_marker};
use construir_api::state::{Event, step};
use construir_api::types::{AttemptId, JobId};
use futures::FutureExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::Row;
use std::time::Duration;
use tower::ServiceExt;

/// [`flow_tests::send`] with a JSON content type (the bodies here are JSON or console bytes).
pub(crate) async fn send(
    app: &Shared,
    method: Method,
    path: &str,
    token: &str,
    body: Body,
) -> Answer {
    crate::flow_tests::send(
        app,
        method,
        path,
        token,
        body,
        &[("Content-Type", "application/json".into())],
    )
    .await
}

/// A job submitted, claimed and started by a runner of its own.
pub(crate) struct Running {
    pub job: u64,
    pub attempt: u64,
    pub token: String,
    pub submitter: String,
}

impl Running {
    pub fn base(&self) -> String {
        format!("/api/v1/runner/attempts/{}", self.attempt)
    }

    /// Sends console bytes at `offset`: (status, next_offset).
    pub async fn piece(&self, app: &Shared, offset: u64, bytes: &[u8]) -> (u16, u64) {
        let a = send(
            app,
            Method::PATCH,
            &format!("{}/log?offset={offset}", self.base()),
            &self.token,
            Body::from(bytes.to_vec()),
        )
        .await;
        (
            a.status.as_u16(),
            a.json()["next_offset"].as_u64().unwrap_or(u64::MAX),
        )
    }

    pub async fn read(&self, app: &Shared, offset: u64, wait_s: u64) -> Answer {
        send(
            app,
            Method::GET,
            &format!(
                "/api/v1/jobs/{}/log?attempt={}&offset={offset}&wait_s={wait_s}",
                self.job, self.attempt
            ),
            &self.submitter,
            Body::empty(),
        )
        .await
    }

    pub async fn upload(&self, app: &Shared, output: &[u8]) -> String {
        let a = send(
            app,
            Method::PUT,
            &format!("{}/output", self.base()),
            &self.token,
            Body::from(output.to_vec()),
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED);
        a.json()["sha256"].as_str().unwrap().to_string()
    }

    pub async fn succeed(&self, app: &Shared) {
        let a = send(
            app,
            Method::POST,
            &format!("{}/report", self.base()),
            &self.token,
            Body::from(
                json!({"status": "success", "exit_code": 0, "job_exit_status": 0,
                       "reason": "job succeeded"})
                .to_string(),
            ),
        )
        .await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
    }
}

/// Submits a job with this console cap as `user` and has a runner named `runner` take it.
pub(crate) async fn start_job(app: &Shared, user: &str, runner: &str, console_cap: u64) -> Running {
    let submitter = token(app, user, "submitter").await;
    let a = send(
        app,
        Method::POST,
        &format!(
            "/api/v1/jobs?name={runner}_t0.tar.xz&memory_mib=256&vcpus=1&timeout_s=60\
             &console_cap={console_cap}"
        ),
        &submitter,
        Body::from(job_file(runner)),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let job = a.json()["id"].as_u64().unwrap();
    let runner_token = token(app, &format!("{runner}-owner"), "runner").await;
    let reg = send(
        app,
        Method::POST,
        "/api/v1/runner/register",
        &runner_token,
        Body::from(json!({"name": runner}).to_string()),
    )
    .await;
    let runner_id = reg.json()["runner_id"].as_u64().unwrap();
    let caps = json!({
        "arch": "x86_64", "backend": "qemu", "host_kind": "emulated", "images": ["t0"],
        "max_memory_mib": 4096, "max_vcpus": 4, "max_timeout_s": 7200,
        "max_job_size": 1u64 << 30, "max_output_size": 1u64 << 30,
        "free_slots": 1, "free_memory_mib": 4096
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/runner/claim")
        .header(PROTOCOL_HEADER, "1")
        .header("Authorization", format!("Bearer {runner_token}"))
        .header("Construir-Runner", runner_id.to_string())
        .header("Content-Type", "application/json")
        .body(Body::from(
            json!({"capabilities": caps, "wait_s": 1}).to_string(),
        ))
        .unwrap();
    let resp = router(app.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let c: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(c["job_id"].as_u64(), Some(job));
    let run = Running {
        job,
        attempt: c["attempt_id"].as_u64().unwrap(),
        token: c["attempt_token"].as_str().unwrap().to_string(),
        submitter,
    };
    let started = send(
        app,
        Method::POST,
        &format!("{}/start", run.base()),
        &run.token,
        Body::empty(),
    )
    .await;
    assert_eq!(started.status, StatusCode::OK);
    run
}

/// Bytes of a console long enough to pass any small cap, each position recognisable.
pub(crate) fn console_text(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz\n"[i % 27])
        .collect()
}

/// Head, marker, tail: what a reader from 0 is shown of `sent` under `cap`.
fn shown(sent: &[u8], cap: u64) -> Vec<u8> {
    let l = ConsoleCap::new(cap).layout(sent.len() as u64);
    let mut want = sent[..l.head_end as usize].to_vec();
    if l.dropped() > 0 {
        want.extend_from_slice(dropped_marker(l.dropped()).as_bytes());
    }
    want.extend_from_slice(&sent[l.tail_start as usize..]);
    want
}

pub(crate) async fn stored_piece_bytes(app: &App, attempt: u64) -> (i64, i64) {
    let r = sqlx::query(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(bytes)), 0) FROM log_pieces WHERE attempt_id = $1",
    )
    .bind(attempt as i64)
    .fetch_one(app.db.pool())
    .await
    .unwrap();
    (r.try_get(0).unwrap(), r.try_get(1).unwrap())
}

pub(crate) async fn console_blob(app: &App, attempt: u64) -> Option<String> {
    sqlx::query("SELECT console_sha256 FROM attempts WHERE id = $1")
        .bind(attempt as i64)
        .fetch_one(app.db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

/// Waits for the background compaction of an attempt's console.
pub(crate) async fn compacted(app: &App, attempt: u64) -> String {
    for _ in 0..500 {
        if let Some(sha) = console_blob(app, attempt).await {
            return sha;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("attempt {attempt}'s console was not compacted");
}

#[tokio::test]
async fn a_capped_console_keeps_its_head_and_its_last_bytes_with_a_marker_between() {
    let (_d, app) = test_app().await;
    let run = start_job(&app, "alice", "home", 100).await;
    let sent = console_text(1000);
    // Pieces of every size, some sent twice, one past what was received.
    let mut at = 0usize;
    let mut len = 7usize;
    while at < sent.len() {
        let end = (at + len).min(sent.len());
        let (status, next) = run.piece(&app, at as u64, &sent[at..end]).await;
        assert_eq!((status, next), (202, end as u64));
        if len.is_multiple_of(2) {
            let again = run.piece(&app, at as u64, &sent[at..end]).await;
            assert_eq!(
                again,
                (200, end as u64),
                "a piece sent twice is stored once"
            );
        }
        at = end;
        len = len * 3 % 61 + 1;
    }
    assert_eq!(run.piece(&app, 1010, b"gap").await, (416, 1000));
    let (rows, kept) = stored_piece_bytes(&app, run.attempt).await;
    assert_eq!(kept, 100, "the cap holds ({rows} rows)");

    let all = run.read(&app, 0, 0).await;
    assert_eq!(
        String::from_utf8_lossy(&all.body),
        String::from_utf8_lossy(&shown(&sent, 100))
    );
    assert_eq!(all.next(), 1000);
    assert!(!all.complete(), "the attempt still runs");
    // A follower that had read to 600 while those bytes were the tail: told what it missed.
    let late = run.read(&app, 600, 0).await;
    let mut want = dropped_marker(350).into_bytes();
    want.extend_from_slice(&sent[950..]);
    assert_eq!(late.body, want);
    assert_eq!(late.next(), 1000);
    // Up to date: nothing, the same offset.
    let none = run.read(&app, 1000, 0).await;
    assert!(none.body.is_empty());
    assert_eq!(none.next(), 1000);

    // More bytes roll the tail on; the head stays.
    let more = console_text(1030);
    assert_eq!(run.piece(&app, 1000, &more[1000..]).await, (202, 1030));
    let mut sent = sent;
    sent.extend_from_slice(&more[1000..]);
    assert_eq!(run.read(&app, 0, 0).await.body, shown(&sent, 100));
    assert_eq!(stored_piece_bytes(&app, run.attempt).await.1, 100);
}

#[tokio::test]
async fn an_ended_attempts_console_becomes_one_blob_read_the_same() {
    let (_d, app) = test_app().await;
    let run = start_job(&app, "alice", "home", 64).await;
    let sent = console_text(300);
    for chunk in (0..300).step_by(40) {
        let end = (chunk + 40).min(300);
        run.piece(&app, chunk as u64, &sent[chunk..end]).await;
    }
    let live = run.read(&app, 0, 0).await.body;
    run.upload(&app, b"an output").await;
    run.succeed(&app).await;
    let sha = compacted(&app, run.attempt).await;
    assert_eq!(
        stored_piece_bytes(&app, run.attempt).await,
        (0, 0),
        "the pieces are gone"
    );
    let l = ConsoleCap::new(64).layout(300);
    let mut packed = sent[..l.head_end as usize].to_vec();
    packed.extend_from_slice(&sent[l.tail_start as usize..]);
    assert_eq!(
        app.blobs.read_range(&sha, 0..1000).await.unwrap().to_vec(),
        packed,
        "the blob holds the kept bytes, head then tail"
    );
    let done = run.read(&app, 0, 0).await;
    assert_eq!(done.body, live, "read from the blob as from the pieces");
    assert_eq!((done.next(), done.complete()), (300, true));
    // From the middle of the tail, and in small steps by a follower's offsets.
    let mid = run.read(&app, 290, 0).await;
    assert_eq!(mid.body, &sent[290..]);
    assert!(run.read(&app, 300, 0).await.complete());
    // The attempt is over: a piece is refused, and changes nothing.
    let (status, _) = run.piece(&app, 300, b"late").await;
    assert_eq!(status, 409);
    assert_eq!(console_blob(&app, run.attempt).await, Some(sha));
}

/// Two views of the same data directory: `first` as the server that died, the other as the
/// one started after it.
async fn restart(d: &tempfile::TempDir, app: &Shared) -> Shared {
    let (db, blobs) = crate::test_backends::open(d.path()).await;
    App::new(app.settings.clone(), db, blobs).unwrap()
}

#[tokio::test]
async fn a_server_killed_before_or_during_compaction_finishes_it_at_restart() {
    let (d, app) = test_app().await;
    let cap = 64;
    let mut runs = Vec::new();
    for name in ["first", "second"] {
        let run = start_job(&app, "alice", name, cap).await;
        let sent = console_text(200 + runs.len() * 7);
        for chunk in (0..sent.len()).step_by(50) {
            let end = (chunk + 50).min(sent.len());
            run.piece(&app, chunk as u64, &sent[chunk..end]).await;
        }
        let before = run.read(&app, 0, 0).await.body;
        // The server stores the step that ends the attempt, and dies before its effects.
        let id = JobId(run.job);
        let job = app.db.load_job(id).await.unwrap().unwrap();
        let t = step(
            &job.snapshot,
            &app.step_settings(),
            crate::db::now_ms() as u64,
            &Event::Abort {
                attempt: AttemptId(run.attempt),
                reason: "runner stopping".into(),
            },
        )
        .unwrap();
        assert!(app.db.store_job(id, job.version, &t.job).await.unwrap());
        runs.push((run, before, sent));
    }
    // The second one got further: its blob was written and published, not yet named.
    let (second, _, second_sent) = &runs[1];
    let l = ConsoleCap::new(cap).layout(second_sent.len() as u64);
    let mut w = app.blobs.writer().await.unwrap();
    w.write(&second_sent[..l.head_end as usize]).await.unwrap();
    w.write(&second_sent[l.tail_start as usize..])
        .await
        .unwrap();
    let published = w.finish().await.unwrap();
    app.blobs.publish(&published).await.unwrap();
    assert_eq!(console_blob(&app, second.attempt).await, None);

    let after = restart(&d, &app).await;
    assert_eq!(after.compact_leftovers().await.unwrap(), 2);
    for (run, before, _) in &runs {
        let sha = console_blob(&after, run.attempt).await.expect("compacted");
        assert_eq!(stored_piece_bytes(&after, run.attempt).await, (0, 0));
        let read = run.read(&after, 0, 0).await;
        assert_eq!(&read.body, before, "nothing lost, nothing twice");
        assert!(read.complete());
        assert!(after.blobs.info(&sha).await.unwrap().is_some());
    }
    assert_eq!(
        console_blob(&after, second.attempt).await.as_deref(),
        Some(published.sha256.as_str()),
        "the published blob is the one named (equal bytes, stored once)"
    );
    assert_eq!(
        after.compact_leftovers().await.unwrap(),
        0,
        "nothing left to do"
    );
    assert_eq!(
        after.blobs.list().await.unwrap().len(),
        4,
        "two job files, two consoles"
    );
}

#[tokio::test]
async fn a_console_piece_wakes_only_its_own_followers() {
    let (_d, app) = test_app().await;
    let a = start_job(&app, "alice", "one", 1000).await;
    let b = start_job(&app, "bob", "two", 1000).await;
    {
        let a_console = app.watchers.watch(Topic::Console(AttemptId(a.attempt)));
        let a_job = app.watchers.watch(Topic::Job(JobId(a.job)));
        let b_console = app.watchers.watch(Topic::Console(AttemptId(b.attempt)));
        let mut a_piece = std::pin::pin!(a_console.notified());
        let mut a_step = std::pin::pin!(a_job.notified());
        let mut b_piece = std::pin::pin!(b_console.notified());
        b.piece(&app, 0, b"b's boot\n").await;
        assert!(
            b_piece.as_mut().now_or_never().is_some(),
            "b's follower woken"
        );
        assert!(
            a_piece.as_mut().now_or_never().is_none(),
            "a's console follower not"
        );
        assert!(
            a_step.as_mut().now_or_never().is_none(),
            "a's job waiters not"
        );
        // A step of a's job wakes its waiters.
        let hb = send(
            &app,
            Method::POST,
            &format!("{}/heartbeat", a.base()),
            &a.token,
            Body::from(json!({"phase": "running", "console_bytes": 0}).to_string()),
        )
        .await;
        assert_eq!(hb.status, StatusCode::OK);
        assert!(
            a_step.as_mut().now_or_never().is_some(),
            "a's job waiters woken"
        );
    }
    assert!(
        app.watchers.is_empty(),
        "no topic is kept once nobody follows it"
    );

    // Through the API: a long poll on a gets a's piece, and the attempt's end.
    let follower = {
        let app = app.clone();
        let path = format!("/api/v1/jobs/{}/log?offset=0&wait_s=20", a.job);
        let submitter = a.submitter.clone();
        tokio::spawn(async move { send(&app, Method::GET, &path, &submitter, Body::empty()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.piece(&app, 9, b"more of b\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !follower.is_finished(),
        "b's piece does not answer a's follower"
    );
    a.piece(&app, 0, b"a's boot\n").await;
    let got = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("woken by its piece")
        .unwrap();
    assert_eq!(got.body, b"a's boot\n");
    let ending = {
        let app = app.clone();
        let path = format!("/api/v1/jobs/{}/log?offset=9&wait_s=20", a.job);
        let submitter = a.submitter.clone();
        tokio::spawn(async move { send(&app, Method::GET, &path, &submitter, Body::empty()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.succeed(&app).await;
    let end = tokio::time::timeout(Duration::from_secs(5), ending)
        .await
        .expect("woken by the job's step")
        .unwrap();
    assert!(end.complete() && end.body.is_empty());
    assert!(app.watchers.is_empty());
}

/// A runner that sends its console a byte at a time: the pieces are merged into a few rows
/// (head and tail apart), and every read is byte for byte what the pieces said.
#[tokio::test]
async fn a_console_sent_a_byte_at_a_time_is_kept_in_few_rows() {
    let (_d, app) = test_app().await;
    let cap = 8000;
    let run = start_job(&app, "alice", "bytes", cap).await;
    // Every byte value, NUL and invalid UTF-8 among them.
    let sent: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    for (i, b) in sent.iter().enumerate() {
        assert_eq!(
            run.piece(&app, i as u64, std::slice::from_ref(b)).await,
            (202, i as u64 + 1)
        );
        if i == 3000 {
            let (rows, kept) = stored_piece_bytes(&app, run.attempt).await;
            assert_eq!((rows, kept), (1, 3001), "one row while in the head");
            assert_eq!(run.read(&app, 0, 0).await.body, &sent[..3001]);
        }
    }
    let (rows, kept) = stored_piece_bytes(&app, run.attempt).await;
    assert_eq!(kept, cap as i64);
    assert_eq!(rows, 2, "the head's row and the tail's");
    let all = run.read(&app, 0, 0).await;
    assert_eq!(all.body, shown(&sent, cap));
    assert_eq!(all.next(), 10_000);
    for from in [0u64, 1, 3999, 4000, 5999, 6000, 6001, 9999] {
        let a = run.read(&app, from, 0).await;
        let l = ConsoleCap::new(cap).layout(10_000);
        let mut want = Vec::new();
        if from < l.head_end {
            want.extend_from_slice(&sent[from as usize..l.head_end as usize]);
        }
        if from < l.tail_start {
            want.extend_from_slice(dropped_marker(l.tail_start - from.max(l.head_end)).as_bytes());
        }
        want.extend_from_slice(&sent[from.max(l.tail_start) as usize..]);
        assert_eq!(a.body, want, "from {from}");
        assert_eq!(a.next(), 10_000);
    }
    run.succeed(&app).await;
    let sha = compacted(&app, run.attempt).await;
    assert_eq!(run.read(&app, 0, 0).await.body, all.body);
    assert_eq!(app.blobs.info(&sha).await.unwrap().unwrap().size, cap);
}

/// Rows of a byte each (as a server before merging stored them): one read fetches a bounded
/// number of rows, and the follower goes on from right after the last byte it got.
#[tokio::test]
async fn a_read_fetches_a_bounded_number_of_rows_and_goes_on_from_there() {
    let (_d, app) = test_app().await;
    let run = start_job(&app, "alice", "tiny", 1 << 20).await;
    let n = 2000usize;
    let sent = console_text(n);
    let mut tx = app.db.pool().begin().await.unwrap();
    for (i, b) in sent.iter().enumerate() {
        sqlx::query("INSERT INTO log_pieces (attempt_id, start_offset, bytes) VALUES ($1, $2, $3)")
            .bind(run.attempt as i64)
            .bind(i as i64)
            .bind(vec![*b])
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE attempts SET console_size = $1 WHERE id = $2")
        .bind(n as i64)
        .bind(run.attempt as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let first = run.read(&app, 0, 0).await;
    assert_eq!(first.body.len() as i64, crate::logs::READ_ROWS);
    assert_eq!(first.next(), crate::logs::READ_ROWS as u64);
    let mut got = Vec::new();
    let mut at = 0;
    while at < n as u64 {
        let a = run.read(&app, at, 0).await;
        assert!(a.next() > at, "a read always moves on");
        got.extend_from_slice(&a.body);
        at = a.next();
    }
    assert_eq!(got, sent);
    // A piece after them is merged into nothing old (their rows are tiny, not its neighbour's
    // size), and compaction pages through them all.
    assert_eq!(run.piece(&app, n as u64, b"end").await, (202, n as u64 + 3));
    run.succeed(&app).await;
    let sha = compacted(&app, run.attempt).await;
    let mut all = sent.clone();
    all.extend_from_slice(b"end");
    assert_eq!(
        app.blobs
            .read_range(&sha, 0..1 << 20)
            .await
            .unwrap()
            .to_vec(),
        all
    );
}

/// Another runner's claim under way: its attempt row is there, its Claim step not yet stored
/// (the job meanwhile held by another attempt). Housekeeping leaves its console open until the
/// row is older than any claim takes.
#[tokio::test]
async fn an_attempt_row_of_a_claim_under_way_is_not_taken_for_dead() {
    let (_d, app) = test_app().await;
    let run = start_job(&app, "alice", "holder", 1000).await;
    let r = sqlx::query("SELECT runner_id, claim_token_id FROM attempts WHERE id = $1")
        .bind(run.attempt as i64)
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    let (runner, claim): (i64, i64) = (r.try_get(0).unwrap(), r.try_get(1).unwrap());
    let mut rows = Vec::new();
    for i in 0..2 {
        rows.push(
            app.db
                .insert_attempt(
                    JobId(run.job),
                    construir_api::types::RunnerId(runner as u64),
                    &tokens::digest(&format!("claim under way {i}")),
                    claim,
                )
                .await
                .unwrap(),
        );
    }
    let now = crate::db::now_ms();
    assert_eq!(app.compact_leftovers_at(now).await.unwrap(), 0);
    assert_eq!(console_blob(&app, rows[0].0).await, None, "still open");
    assert_eq!(app.compact_leftovers_at(now + 10_000).await.unwrap(), 0);
    // Past the grace: a claim that never stored its step is dead.
    let later = now + crate::service::CLAIM_GRACE.as_millis() as i64 + 1;
    assert_eq!(app.compact_leftovers_at(later).await.unwrap(), 1);
    assert!(console_blob(&app, rows[0].0).await.is_some());
    assert_eq!(
        console_blob(&app, run.attempt).await,
        None,
        "the live one stays"
    );
}
