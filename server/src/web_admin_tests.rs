//! The operator's page in process: deleting a job (gone from every view, its blob names gone at
//! once, its blobs with the orphan collection), bans (a session, a token and the runners die),
//! runner revocation, `/admin` kept from everyone else, and `construir-server user`'s logic.

use crate::deletion::{read_password, set_user_password};
use crate::flow_tests::{Answer, caps, send, token};
use crate::http::tests::test_app;
use crate::log_tests::{compacted, start_job, stored_piece_bytes};
use crate::matching_tests::{claim, claimed, register};
use crate::retention::{collect_orphans, referenced};
use crate::service::Shared;
use crate::web_tests::{page, ran, sign_in, text, user_with_password};
use axum::body::Body;
use axum::http::{Method, StatusCode};
use construir_api::types::{JobId, RunnerId};
use sqlx::Row;

/// Posts `form` to `path` as `cookies`, with the page's CSRF token in front.
async fn post(app: &Shared, path: &str, cookies: &str, csrf: &str, form: &str) -> Answer {
    let body = format!("csrf={csrf}&{form}");
    page(app, Method::POST, path, cookies, Some(&body), &[]).await
}

/// The result line an action's 303 leads to, as the page shows it.
async fn result_of(app: &Shared, cookies: &str, a: &Answer) -> String {
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", text(a));
    let to = a.headers["location"].to_str().unwrap();
    assert!(to.starts_with("/admin?done="), "{to}");
    let shown = text(&page(app, Method::GET, to, cookies, None, &[]).await);
    let at = shown.find("id=\"done\">").expect("a result line") + 10;
    shown[at..at + shown[at..].find("</p>").unwrap()].to_string()
}

/// The blobs attempt `attempt` names: output, output index, console.
async fn attempt_names(app: &Shared, attempt: u64) -> Vec<String> {
    let r = sqlx::query(
        "SELECT output_sha256, output_index_sha256, console_sha256 FROM attempts WHERE id = $1",
    )
    .bind(attempt as i64)
    .fetch_one(app.db.pool())
    .await
    .unwrap();
    (0..3)
        .filter_map(|i| r.try_get::<Option<String>, _>(i).unwrap())
        .collect()
}

async fn first_attempt(app: &Shared, job: u64) -> u64 {
    let j = app.db.load_job(JobId(job)).await.unwrap().unwrap();
    j.snapshot.attempts[0].id.0
}

#[tokio::test]
async fn an_admin_deletes_a_job_its_names_go_at_once_and_its_blobs_with_the_collection() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "root", "rootpassword", true).await;
    let id = ran(
        &app,
        "alice",
        "",
        b"built\n",
        crate::replica_tests::output("x"),
    )
    .await;
    let attempt = first_attempt(&app, id).await;
    compacted(&app, attempt).await;
    let file = app
        .db
        .load_job(JobId(id))
        .await
        .unwrap()
        .unwrap()
        .facts
        .sha256;
    let mut blobs = attempt_names(&app, attempt).await;
    assert_eq!(blobs.len(), 3, "output, index and console: {blobs:?}");
    blobs.push(file);
    // A job still running, with a job file of its own, an output and console pieces.
    let busy = start_job(&app, "carol", "busy", 1000).await;
    assert!((200..300).contains(&busy.piece(&app, 0, b"working\n").await.0));
    busy.upload(&app, b"half an output").await;
    let busy_file = app
        .db
        .load_job(JobId(busy.job))
        .await
        .unwrap()
        .unwrap()
        .facts
        .sha256;
    let alice = token(&app, "alice", "submitter").await;
    let (root, csrf) = sign_in(&app, "root", "rootpassword").await;
    let admin = text(&page(&app, Method::GET, "/admin", &root, None, &[]).await);
    assert!(
        admin.contains("Delete a job") && admin.contains("<td>alice</td>"),
        "{admin}"
    );

    // Not without "I am sure"; not a job that is not there.
    let unsure = post(
        &app,
        "/admin/jobs/delete",
        &root,
        &csrf,
        &format!("id={id}"),
    )
    .await;
    assert_eq!(unsure.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(text(&unsure).contains("nothing was deleted"));
    let none = post(&app, "/admin/jobs/delete", &root, &csrf, "id=999&sure=yes").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert!(text(&none).contains("no job 999"));
    let seen = page(&app, Method::GET, &format!("/jobs/{id}"), "", None, &[]).await;
    assert_eq!(seen.status, StatusCode::OK);

    let deleted = post(
        &app,
        "/admin/jobs/delete",
        &root,
        &csrf,
        &format!("id={id}&sure=yes"),
    )
    .await;
    let line = result_of(&app, &root, &deleted).await;
    assert!(
        line.starts_with(&format!("job {id} deleted; 0 of the 4 blobs")),
        "{line}"
    );
    // Gone from every view, for everyone (its admin too).
    for who in ["", root.as_str()] {
        for path in ["", "/log.txt", "/output", "/receipt.json", "/live"] {
            let r = page(
                &app,
                Method::GET,
                &format!("/jobs/{id}{path}"),
                who,
                None,
                &[],
            )
            .await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path} as {who:?}");
        }
        let list = text(&page(&app, Method::GET, "/jobs", who, None, &[]).await);
        assert!(!list.contains(&format!("id=\"job-{id}\"")), "{list}");
    }
    for path in ["", "/output", "/receipt"] {
        let api = send(
            &app,
            Method::GET,
            &format!("/api/v1/jobs/{id}{path}"),
            &alice,
            Body::empty(),
            &[],
        )
        .await;
        assert_eq!(api.status, StatusCode::NOT_FOUND, "{path}: {}", text(&api));
    }
    // No row names its blobs any more; they stay through the grace (an equal upload may be
    // naming them right now), then the orphan collection removes them.
    assert!(attempt_names(&app, attempt).await.is_empty());
    for sha in &blobs {
        assert!(!referenced(&app, sha).await.unwrap(), "{sha}");
        assert!(app.blobs.info(sha).await.unwrap().is_some(), "{sha}");
    }
    let now = crate::db::now_ms();
    assert_eq!(
        collect_orphans(&app, now).await.unwrap(),
        0,
        "within the grace"
    );
    let later = now + crate::retention::ORPHAN_GRACE.as_millis() as i64 + 60_000;
    assert_eq!(collect_orphans(&app, later).await.unwrap(), 4);
    for sha in &blobs {
        assert_eq!(app.blobs.info(sha).await.unwrap(), None, "{sha}");
    }
    assert!(
        app.blobs.info(&busy_file).await.unwrap().is_some(),
        "another job's blobs stay"
    );
    // Retention leaves the tombstone alone.
    crate::retention::apply_retention(&app, later, std::time::Duration::ZERO)
        .await
        .unwrap();
    let tomb = app.db.load_job(JobId(id)).await.unwrap().unwrap();
    assert_eq!(tomb.facts.name, crate::deletion::DELETED_NAME);
    assert!(
        tomb.snapshot.reason.starts_with("deleted by root at "),
        "{}",
        tomb.snapshot.reason
    );

    let again = post(
        &app,
        "/admin/jobs/delete",
        &root,
        &csrf,
        &format!("id={id}&sure=yes"),
    )
    .await;
    assert_eq!(again.status, StatusCode::GONE);
    assert!(
        text(&again).contains(&format!("job {id} is gone")),
        "{}",
        text(&again)
    );

    // A tombstone leaves nothing an attempt may still send: not a live one, not one lapsed
    // within its late window.
    let before = app.db.load_job(JobId(busy.job)).await.unwrap().unwrap();
    let (now, settings) = (crate::db::now_ms() as u64, app.step_settings());
    let mut lapsed = before.snapshot.clone();
    lapsed.attempts[0].state = construir_api::types::AttemptState::Expired;
    lapsed.attempts[0].ended_ms = Some(now);
    for s in [&before.snapshot, &lapsed] {
        let a = s.attempts[0].id;
        assert!(s.attempt_access(a, &settings, now).is_ok());
        let t = crate::deletion::tombstone(s, now, "deleted".into());
        assert!(t.attempt_access(a, &settings, now).is_err());
        assert_eq!(t.invariant_violation(&settings), None);
    }
    // The running job: ended at once, its runner can send nothing more.
    let deleted = post(
        &app,
        "/admin/jobs/delete",
        &root,
        &csrf,
        &format!("id={}&sure=yes", busy.job),
    )
    .await;
    result_of(&app, &root, &deleted).await;
    assert_eq!(stored_piece_bytes(&app, busy.attempt).await, (0, 0));
    assert!(busy.piece(&app, 8, b"more\n").await.0 >= 400);
    for (method, what) in [(Method::PUT, "output"), (Method::POST, "report")] {
        let body = if what == "report" {
            r#"{"status": "success", "exit_code": 0, "job_exit_status": 0}"#
        } else {
            "another output"
        };
        let r = crate::log_tests::send(
            &app,
            method,
            &format!("{}/{what}", busy.base()),
            &busy.token,
            Body::from(body),
        )
        .await;
        assert!(!r.status.is_success(), "{what}: {}", text(&r));
    }
    let tomb = app.db.load_job(JobId(busy.job)).await.unwrap().unwrap();
    assert!(tomb.snapshot.state.is_terminal());
    assert!(tomb.snapshot.attempts.iter().all(|a| !a.state.is_live()));
    let runner = tomb.snapshot.attempts[0].runner;
    assert_eq!(app.db.runner_load(runner).await.unwrap().live, 0);
    assert!(!referenced(&app, &busy_file).await.unwrap());
}

#[tokio::test]
async fn admin_is_no_page_to_others_and_its_forms_need_the_sessions_token() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "root", "rootpassword", true).await;
    user_with_password(&app, "bob", "bobspassword", false).await;
    let id = ran(&app, "alice", "", b"x\n", crate::replica_tests::output("x")).await;
    let (bob, bob_csrf) = sign_in(&app, "bob", "bobspassword").await;
    let forms = [
        ("/admin/jobs/delete", format!("id={id}&sure=yes")),
        ("/admin/users/ban", "name=alice".to_string()),
        ("/admin/runners/revoke", "id=1".to_string()),
    ];
    for who in ["", bob.as_str()] {
        let nothing = page(&app, Method::GET, "/no-such-page", who, None, &[]).await;
        let r = page(&app, Method::GET, "/admin", who, None, &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(text(&r), text(&nothing), "as a page that is not there");
        for (path, form) in &forms {
            let r = post(&app, path, who, &bob_csrf, form).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path} as {who:?}");
            assert_eq!(text(&r), text(&nothing));
            let r = page(&app, Method::POST, path, who, None, &[]).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path} without a form");
            let r = page(&app, Method::GET, path, who, None, &[]).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "GET {path}");
        }
    }
    // An admin's post without the session's token, or from another site: refused.
    let (root, csrf) = sign_in(&app, "root", "rootpassword").await;
    for (path, form) in &forms {
        let r = page(&app, Method::POST, path, &root, Some(form), &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        let r = post(&app, path, &root, &"0".repeat(64), form).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        let body = format!("csrf={csrf}&{form}");
        let origin = [("Origin", "http://evil.example")];
        let r = page(&app, Method::POST, path, &root, Some(&body), &origin).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
    }
    let seen = page(&app, Method::GET, &format!("/jobs/{id}"), "", None, &[]).await;
    assert_eq!(seen.status, StatusCode::OK, "nothing was deleted");
    assert!(!app.db.account("alice").await.unwrap().unwrap().banned);
    // A result line is text.
    let shown = page(
        &app,
        Method::GET,
        "/admin?done=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        &root,
        None,
        &[],
    )
    .await;
    assert!(!text(&shown).contains("<script>alert"), "{}", text(&shown));
    assert!(
        text(&shown).contains("&#60;script&#62;alert(1)"),
        "{}",
        text(&shown)
    );
}

#[tokio::test]
async fn a_ban_ends_the_users_sessions_tokens_and_runners() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "root", "rootpassword", true).await;
    user_with_password(&app, "mallory", "mallorypassword", false).await;
    let (mallory, _) = sign_in(&app, "mallory", "mallorypassword").await;
    let api = token(&app, "mallory", "submitter").await;
    let runner_token = token(&app, "mallory", "runner").await;
    let runner = register(&app, &runner_token, "m1").await;
    // Her runner holds a job of alice's.
    let alice = token(&app, "alice", "submitter").await;
    let job = crate::flow_tests::submit(
        &app,
        &alice,
        "hello_t0.tar.xz",
        crate::flow_tests::job("held"),
    )
    .await
    .json()["id"]
        .as_u64()
        .unwrap();
    let held = claimed(&claim(&app, &runner_token, &runner, caps()).await);
    assert_eq!(held.job, job);
    let (root, csrf) = sign_in(&app, "root", "rootpassword").await;

    let own = post(&app, "/admin/users/ban", &root, &csrf, "name=root").await;
    assert_eq!(own.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(text(&own).contains("you cannot ban yourself"));
    let nobody = post(&app, "/admin/users/ban", &root, &csrf, "name=nobody").await;
    assert_eq!(nobody.status, StatusCode::NOT_FOUND);

    let banned = post(&app, "/admin/users/ban", &root, &csrf, "name=mallory").await;
    assert_eq!(
        result_of(&app, &root, &banned).await,
        "user mallory banned; 1 runners of theirs revoked"
    );
    let jobs = text(&page(&app, Method::GET, "/jobs", &mallory, None, &[]).await);
    assert!(
        !jobs.contains("Signed in as"),
        "her session is over: {jobs}"
    );
    let list = send(&app, Method::GET, "/api/v1/jobs", &api, Body::empty(), &[]).await;
    assert_eq!(list.status, StatusCode::UNAUTHORIZED);
    let runner = RunnerId(runner.parse().unwrap());
    assert!(app.db.runner_revoked(runner).await.unwrap());
    let beat = crate::matching_tests::call(&app, &held, Method::POST, "start", Body::empty()).await;
    assert_eq!(beat.status, StatusCode::UNAUTHORIZED, "{}", text(&beat));
    let stored = app.db.load_job(JobId(job)).await.unwrap().unwrap();
    assert!(
        stored.snapshot.attempts.iter().all(|a| !a.state.is_live()),
        "the job was told"
    );
    let again = post(&app, "/admin/users/ban", &root, &csrf, "name=mallory").await;
    assert!(
        result_of(&app, &root, &again)
            .await
            .contains("banned already")
    );
    let admin = text(&page(&app, Method::GET, "/admin", &root, None, &[]).await);
    let mallory_id = app.db.account("mallory").await.unwrap().unwrap().id;
    let row = &admin[admin.find(&format!("id=\"user-{mallory_id}\"")).unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(
        row.contains("<td>mallory</td>") && row.matches("UTC").count() == 2,
        "{row}"
    );
    assert!(row.ends_with("<td>0</td><td>1</td>\n"), "{row}");

    // A runner alone.
    let other = token(&app, "dave", "runner").await;
    let dave = register(&app, &other, "d1").await;
    let revoked = post(
        &app,
        "/admin/runners/revoke",
        &root,
        &csrf,
        &format!("id={dave}"),
    )
    .await;
    assert_eq!(
        result_of(&app, &root, &revoked).await,
        format!("runner {dave} revoked")
    );
    assert!(
        app.db
            .runner_revoked(RunnerId(dave.parse().unwrap()))
            .await
            .unwrap()
    );
    let none = post(&app, "/admin/runners/revoke", &root, &csrf, "id=9999").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    let bad = post(&app, "/admin/runners/revoke", &root, &csrf, "id=x").await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn user_add_and_password_set_a_password_read_as_one_line() {
    let d = tempfile::tempdir().unwrap();
    let db = crate::test_backends::open_db(d.path()).await;
    assert_eq!(
        read_password(&mut "correct horse\n".as_bytes()).unwrap(),
        "correct horse"
    );
    assert_eq!(
        read_password(&mut " spaced  \r\nmore\n".as_bytes()).unwrap(),
        " spaced  "
    );
    assert_eq!(
        read_password(&mut "no newline".as_bytes()).unwrap(),
        "no newline"
    );
    let empty = read_password(&mut "".as_bytes()).unwrap_err().to_string();
    assert!(empty.contains("no password on stdin"), "{empty}");

    let short = set_user_password(&db, "alice", Some(true), "short".into())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        short.contains("5 bytes") && short.contains("8 to 256"),
        "{short}"
    );
    assert!(db.account("alice").await.unwrap().is_none(), "nobody made");
    let done = set_user_password(&db, "alice", Some(true), "correct horse".into())
        .await
        .unwrap();
    assert_eq!(done, "user alice made: password set; an admin");
    let a = db.account("alice").await.unwrap().unwrap();
    assert!(a.admin);
    let phc = a.password_hash.unwrap();
    assert!(crate::accounts::password_matches("correct horse", &phc));

    let nobody = set_user_password(&db, "nobody", None, "a long password".into())
        .await
        .unwrap_err()
        .to_string();
    assert!(nobody.contains("no user nobody"), "{nobody}");
    let done = set_user_password(&db, "alice", None, "battery staple".into())
        .await
        .unwrap();
    assert_eq!(done, "user alice already there: password set; an admin");
    let a = db.account("alice").await.unwrap().unwrap();
    let phc = a.password_hash.unwrap();
    assert!(crate::accounts::password_matches("battery staple", &phc));
    assert!(!crate::accounts::password_matches("correct horse", &phc));
    let done = set_user_password(&db, "alice", Some(false), "battery staple".into())
        .await
        .unwrap();
    assert_eq!(
        done,
        "user alice already there: password set; no longer an admin"
    );
    assert!(!db.account("alice").await.unwrap().unwrap().admin);
    assert!(
        set_user_password(&db, "../x", Some(false), "a long password".into())
            .await
            .is_err()
    );
}
