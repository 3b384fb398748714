//! Retention and orphan blobs in process: an old job's output and console go, its record stays
//! and says so; a blob another job still names stays; blobs no row names go once an hour old.

use crate::http::tests::test_app;
use crate::log_tests::{Running, compacted, console_blob, console_text, send, start_job};
use crate::service::{App, Shared};
use axum::body::Body;
use axum::http::Method;
use construir_api::types::JobId;
use std::time::{Duration, SystemTime};

const DAY_MS: u64 = 86_400_000;

/// Makes a job look as if it had been submitted and had ended `days` ago.
async fn age_job(app: &App, job: u64, days: u64) {
    let id = JobId(job);
    let stored = app.db.load_job(id).await.unwrap().unwrap();
    let mut s = stored.snapshot.clone();
    s.created_ms -= days * DAY_MS;
    s.ended_ms = s.ended_ms.map(|t| t - days * DAY_MS);
    assert!(app.db.store_job(id, stored.version, &s).await.unwrap());
    sqlx::query("UPDATE jobs SET created_ms = created_ms - $1 WHERE id = $2")
        .bind((days * DAY_MS) as i64)
        .bind(job as i64)
        .execute(app.db.pool())
        .await
        .unwrap();
}

/// Makes a blob look as if it had been published `secs` ago.
fn age_blob(app: &App, sha: &str, secs: u64) {
    let path = app.blobs.local_file(sha);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

async fn finished(
    app: &Shared,
    user: &str,
    runner: &str,
    output: &[u8],
    console: &[u8],
) -> (Running, String, String) {
    let run = start_job(app, user, runner, 1000).await;
    run.piece(app, 0, console).await;
    let out = run.upload(app, output).await;
    run.succeed(app).await;
    let con = compacted(app, run.attempt).await;
    (run, out, con)
}

#[tokio::test]
async fn the_sweeper_deletes_old_outputs_and_consoles_and_the_record_says_so() {
    let (_d, app) = test_app().await;
    assert_eq!(
        app.settings.retention,
        Some(Duration::from_secs(30 * 86400))
    );
    // An old job, and a recent one whose output is equal (stored once, named twice).
    let (old, out, old_console) =
        finished(&app, "alice", "old", b"same output", &console_text(50)).await;
    let (new, new_out, _) = finished(&app, "bob", "new", b"same output", &console_text(70)).await;
    assert_eq!(out, new_out);
    age_job(&app, old.job, 31).await;
    let old_file = app
        .db
        .load_job(JobId(old.job))
        .await
        .unwrap()
        .unwrap()
        .facts
        .sha256;
    for sha in [&out, &old_console, &old_file] {
        age_blob(&app, sha, 31 * 86400);
    }

    app.housekeep(false).await;

    let view = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{}", old.job),
        &old.submitter,
        Body::empty(),
    )
    .await;
    let v = view.json();
    assert_eq!(v["state"], "succeeded", "the record stays");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("output, console and job file deleted by retention at 20"),
        "{reason}"
    );
    assert!(v["attempts"][0]["output_sha256"].is_null(), "{v}");
    assert_eq!(
        v["attempts"][0]["console_size"], 50,
        "what it received is still told"
    );
    let output = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{}/output", old.job),
        &old.submitter,
        Body::empty(),
    )
    .await;
    assert_eq!(output.status.as_u16(), 404);
    let log = old.read(&app, 0, 0).await;
    assert!(String::from_utf8_lossy(&log.body).contains("deleted by retention"));
    assert!(log.complete());
    assert_eq!(console_blob(&app, old.attempt).await, None);
    assert_eq!(
        app.blobs.info(&old_console).await.unwrap(),
        None,
        "its console is gone"
    );
    assert!(
        app.blobs.info(&out).await.unwrap().is_some(),
        "the output another job names stays"
    );
    let fetched = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{}/output", new.job),
        &new.submitter,
        Body::empty(),
    )
    .await;
    assert_eq!(fetched.body, b"same output");
    let again = crate::retention::apply_retention(
        &app,
        crate::db::now_ms(),
        Duration::from_secs(30 * 86400),
    )
    .await
    .unwrap();
    assert_eq!(again, 0, "done once");

    // Its job file went too (no other row names it); the record keeps its digest.
    let old_view = app.db.load_job(JobId(old.job)).await.unwrap().unwrap();
    assert_eq!(app.blobs.info(&old_view.facts.sha256).await.unwrap(), None);
    assert_eq!(v["sha256"].as_str(), Some(old_view.facts.sha256.as_str()));

    // Once the recent job is old too, the shared output goes; its job file, which a queued job
    // submitted again names, stays.
    let again = send(
        &app,
        Method::POST,
        "/api/v1/jobs?name=new_t0.tar.xz&memory_mib=256&vcpus=1&timeout_s=60&console_cap=1000",
        &new.submitter,
        Body::from(crate::flow_tests::job("new")),
    )
    .await;
    assert_eq!(again.status.as_u16(), 201);
    let new_view = app.db.load_job(JobId(new.job)).await.unwrap().unwrap();
    age_blob(&app, &new_view.facts.sha256, 31 * 86400);
    age_job(&app, new.job, 31).await;
    let done = crate::retention::apply_retention(
        &app,
        crate::db::now_ms(),
        Duration::from_secs(30 * 86400),
    )
    .await
    .unwrap();
    assert_eq!(done, 1);
    assert_eq!(app.blobs.info(&out).await.unwrap(), None);
    assert!(
        app.blobs
            .info(&new_view.facts.sha256)
            .await
            .unwrap()
            .is_some(),
        "a job file another job names stays"
    );
}

/// The job's reason says its blobs were deleted only once that is committed: a transaction
/// that fails leaves the record as it was, and a server killed between the commit and the note
/// has the next pass write it.
#[tokio::test]
async fn the_record_says_deleted_only_after_the_deletion_is_committed() {
    let (_d, app) = test_app().await;
    let (old, out, _) = finished(&app, "alice", "old", b"an output", &console_text(40)).await;
    age_job(&app, old.job, 31).await;
    let keep = Duration::from_secs(30 * 86400);
    let reason = |app: Shared, job: u64| async move {
        app.db
            .load_job(JobId(job))
            .await
            .unwrap()
            .unwrap()
            .snapshot
            .reason
    };
    // The deletion fails half-way (as a transaction cut short would).
    let refusal: &[&'static str] = match app.db.engine() {
        crate::db::Engine::Sqlite => &[
            "CREATE TRIGGER refuse_deletion BEFORE UPDATE OF console_deleted_ms ON attempts \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        ],
        crate::db::Engine::Postgres => &[
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
            "CREATE TRIGGER refuse_deletion BEFORE UPDATE OF console_deleted_ms ON attempts \
             FOR EACH ROW EXECUTE FUNCTION refuse()",
        ],
    };
    for sql in refusal {
        sqlx::query(*sql).execute(app.db.pool()).await.unwrap();
    }
    assert_eq!(
        crate::retention::apply_retention(&app, crate::db::now_ms(), keep)
            .await
            .unwrap(),
        0
    );
    let said = reason(app.clone(), old.job).await;
    assert!(!said.contains("retention"), "{said}");
    assert!(app.blobs.info(&out).await.unwrap().is_some());
    let fetched = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{}/output", old.job),
        &old.submitter,
        Body::empty(),
    )
    .await;
    assert_eq!(fetched.body, b"an output", "nothing was deleted");
    let pg = app.db.engine() == crate::db::Engine::Postgres;
    sqlx::query(match pg {
        true => "DROP TRIGGER refuse_deletion ON attempts",
        false => "DROP TRIGGER refuse_deletion",
    })
    .execute(app.db.pool())
    .await
    .unwrap();

    // Committed, then the note cannot be written (the server dies there): the next pass does.
    sqlx::query(match pg {
        true => {
            "CREATE TRIGGER refuse_note BEFORE UPDATE OF snapshot ON jobs FOR EACH ROW \
             WHEN (NEW.snapshot LIKE '%deleted by retention%') EXECUTE FUNCTION refuse()"
        }
        false => {
            "CREATE TRIGGER refuse_note BEFORE UPDATE OF snapshot ON jobs \
             WHEN NEW.snapshot LIKE '%deleted by retention%' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        }
    })
    .execute(app.db.pool())
    .await
    .unwrap();
    assert_eq!(
        crate::retention::apply_retention(&app, crate::db::now_ms(), keep)
            .await
            .unwrap(),
        0,
        "its trouble is logged, not counted"
    );
    assert_eq!(console_blob(&app, old.attempt).await, None, "committed");
    assert!(!reason(app.clone(), old.job).await.contains("retention"));
    sqlx::query(match pg {
        true => "DROP TRIGGER refuse_note ON jobs",
        false => "DROP TRIGGER refuse_note",
    })
    .execute(app.db.pool())
    .await
    .unwrap();
    crate::retention::apply_retention(&app, crate::db::now_ms(), keep)
        .await
        .unwrap();
    let said = reason(app.clone(), old.job).await;
    assert_eq!(
        said.matches("deleted by retention").count(),
        1,
        "noted once: {said}"
    );
    // Its blobs were unnamed; the ones not removed yet (the grace) are orphans.
    assert!(!crate::retention::referenced(&app, &out).await.unwrap());
}

/// Retention while other writers commit all the time: its transaction's first statement takes
/// the write lock (waiting its turn), so no job fails for a write between its read and its
/// first write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_not_refused_by_concurrent_writers() {
    let (_d, app) = test_app().await;
    let mut jobs = Vec::new();
    for i in 0..12 {
        let (run, _, _) = finished(&app, "alice", &format!("r{i}"), b"out", b"con").await;
        age_job(&app, run.job, 31).await;
        jobs.push(run.job);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sqlx::query("UPDATE runners SET last_seen_ms = last_seen_ms + 1")
                        .execute(app.db.pool())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let done = crate::retention::apply_retention(
        &app,
        crate::db::now_ms(),
        Duration::from_secs(30 * 86400),
    )
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(done, jobs.len());
}

#[tokio::test]
async fn a_recent_job_and_a_running_one_keep_everything() {
    let (_d, app) = test_app().await;
    let (done, out, console) = finished(&app, "alice", "recent", b"fresh", &console_text(20)).await;
    let running = start_job(&app, "bob", "busy", 1000).await;
    running.piece(&app, 0, b"still going\n").await;
    age_job(&app, running.job, 40).await;
    assert_eq!(
        crate::retention::apply_retention(&app, crate::db::now_ms(), Duration::from_secs(86400))
            .await
            .unwrap(),
        0
    );
    assert!(app.blobs.info(&out).await.unwrap().is_some());
    assert!(app.blobs.info(&console).await.unwrap().is_some());
    assert_eq!(running.read(&app, 0, 0).await.body, b"still going\n");
    let v = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{}", done.job),
        &done.submitter,
        Body::empty(),
    )
    .await;
    assert!(!v.json()["reason"].as_str().unwrap().contains("retention"));
}

#[tokio::test]
async fn orphan_blobs_go_once_an_hour_old_and_named_ones_never() {
    let (_d, app) = test_app().await;
    let (run, out, console) = finished(&app, "alice", "kept", b"named", &console_text(30)).await;
    // An upload published whose row a dead server never wrote, and one just published.
    let orphan = app
        .blobs
        .receive(Body::from(b"nobody names me".to_vec()), 1 << 20)
        .await
        .unwrap();
    app.blobs.publish(&orphan).await.unwrap();
    let young = app
        .blobs
        .receive(Body::from(b"nobody names me yet".to_vec()), 1 << 20)
        .await
        .unwrap();
    app.blobs.publish(&young).await.unwrap();
    let job_sha = app
        .db
        .load_job(JobId(run.job))
        .await
        .unwrap()
        .unwrap()
        .facts
        .sha256;
    for sha in [&orphan.sha256, &out, &console, &job_sha] {
        age_blob(&app, sha, 2 * 3600);
    }
    age_blob(&app, &young.sha256, 600);

    let removed = crate::retention::collect_orphans(&app, crate::db::now_ms())
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(app.blobs.info(&orphan.sha256).await.unwrap(), None);
    for sha in [&young.sha256, &out, &console, &job_sha] {
        assert!(app.blobs.info(sha).await.unwrap().is_some(), "{sha} stays");
    }
    // An old orphan published again by an equal upload is young again: its row comes next.
    age_blob(&app, &young.sha256, 2 * 3600);
    app.blobs.publish(&young).await.unwrap();
    assert_eq!(
        crate::retention::collect_orphans(&app, crate::db::now_ms())
            .await
            .unwrap(),
        0
    );
    assert!(app.blobs.info(&young.sha256).await.unwrap().is_some());
}
