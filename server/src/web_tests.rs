//! The website in process (no browser: the browser tests are tests/tests/web.rs): its headers,
//! sign-in and CSRF, who sees which job, a hostile console and output shown as text, downloads
//! as attachments, the live console, tokens.

use crate::flow_tests::{Answer, caps, job, json_call, submit, token};
use crate::http::router;
use crate::http::tests::test_app;
use crate::matching_tests::{call, claim, claimed};
use crate::service::Shared;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

/// A browser's request: cookies, an optional form body, extra headers.
pub(crate) async fn page(
    app: &Shared,
    method: Method,
    path: &str,
    cookies: &str,
    form: Option<&str>,
    extra: &[(&str, &str)],
) -> Answer {
    let mut b = Request::builder().method(method).uri(path);
    if !cookies.is_empty() {
        b = b.header("Cookie", cookies);
    }
    if form.is_some() {
        b = b.header("Content-Type", "application/x-www-form-urlencoded");
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let body = form.map_or_else(Body::empty, |f| Body::from(f.to_string()));
    let resp = router(app.clone())
        .oneshot(b.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

pub(crate) fn text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

/// `name=value` of each Set-Cookie (attributes dropped), joined as a Cookie header.
pub(crate) fn cookies_of(a: &Answer) -> String {
    a.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_string))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The value of the hidden `csrf` field of the page.
pub(crate) fn csrf_field(a: &Answer) -> String {
    let t = text(a);
    let at = t
        .find("name=\"csrf\" value=\"")
        .expect("a form with a csrf field")
        + 19;
    t[at..at + 64].to_string()
}

/// Signs `name` in with `password`: the session's cookies and its CSRF token.
pub(crate) async fn sign_in(app: &Shared, name: &str, password: &str) -> (String, String) {
    let form = page(app, Method::GET, "/signin", "", None, &[]).await;
    let anon = cookies_of(&form);
    let csrf = csrf_field(&form);
    let posted = page(
        app,
        Method::POST,
        "/signin",
        &anon,
        Some(&format!("csrf={csrf}&name={name}&password={password}")),
        &[],
    )
    .await;
    assert_eq!(posted.status, StatusCode::SEE_OTHER, "{}", text(&posted));
    let set = posted.headers.get_all("set-cookie");
    let session = set
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("construir_session="))
        .expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(session.contains(flag), "{session}");
    }
    assert!(!session.contains("Secure"), "no https here: {session}");
    let cookies = format!("{anon}; {}", cookies_of(&posted));
    let jobs = page(app, Method::GET, "/jobs", &cookies, None, &[]).await;
    assert!(
        text(&jobs).contains(&format!("Signed in as <strong>{name}</strong>")),
        "{}",
        text(&jobs)
    );
    (cookies, csrf_field(&jobs))
}

pub(crate) async fn user_with_password(app: &Shared, name: &str, password: &str, admin: bool) {
    let id = app.db.ensure_user(name).await.unwrap();
    let phc = crate::accounts::hash_password(password).unwrap();
    app.db.set_password(id, &phc, admin).await.unwrap();
}

/// A job of `owner` that ran: its console holds `console`, its output `output`.
pub(crate) async fn ran(
    app: &Shared,
    owner: &str,
    query: &str,
    console: &[u8],
    output: Vec<u8>,
) -> u64 {
    // Public unless the query says otherwise (left out, a job is private).
    let query = if query.contains("private=") {
        query.to_string()
    } else {
        format!("{query}&private=false")
    };
    let t = token(app, owner, "submitter").await;
    let id = crate::replica_tests::submit_replicated(app, &t, query.trim_start_matches('&')).await;
    let runner_token = token(app, &format!("{owner}-volunteer"), "runner").await;
    let reg = json_call(
        app,
        Method::POST,
        "/api/v1/runner/register",
        &runner_token,
        json!({"name": "r1"}),
        &[],
    )
    .await;
    let runner = reg.json()["runner_id"].as_u64().unwrap().to_string();
    let c = claimed(&claim(app, &runner_token, &runner, caps()).await);
    assert_eq!(c.job, id);
    assert_eq!(
        call(app, &c, Method::POST, "start", Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    let log = call(
        app,
        &c,
        Method::PATCH,
        "log?offset=0",
        Body::from(console.to_vec()),
    )
    .await;
    assert!(log.status.is_success(), "{}", text(&log));
    let sha = crate::replica_tests::sha256(&output);
    let up = call(app, &c, Method::PUT, "output", Body::from(output)).await;
    assert_eq!(up.status, StatusCode::CREATED, "{}", text(&up));
    let r = json_call(
        app,
        Method::POST,
        &format!("{}/report", c.base),
        &c.token,
        json!({"status": "success", "exit_code": 0, "job_exit_status": 0, "output_sha256": sha}),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", text(&r));
    // The output's index is made in the background: the pages list files once it is in.
    for _ in 0..500 {
        let blobs = app
            .db
            .attempt_blobs(construir_api::types::JobId(id))
            .await
            .unwrap();
        if blobs.values().any(|b| b.output_index.is_some()) {
            return id;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("job {id}'s output was not indexed");
}

#[tokio::test]
async fn every_page_has_a_csp_without_inline_scripts_and_a_404_page_for_the_rest() {
    let (_d, app) = test_app().await;
    let id = ran(
        &app,
        "alice",
        "",
        b"hello\n",
        crate::replica_tests::output("x"),
    )
    .await;
    for path in ["/jobs", &format!("/jobs/{id}"), "/signin", "/no-such-page"] {
        let a = page(&app, Method::GET, path, "", None, &[]).await;
        let csp = a.headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(a.headers["x-content-type-options"], "nosniff");
        assert_eq!(a.headers["x-frame-options"], "DENY");
        let html = text(&a);
        // Every script is a file of the server's; none inline, no inline handlers.
        for (at, _) in html.match_indices("<script") {
            let tag = &html[at..html[at..].find('>').unwrap() + at];
            assert!(tag.contains(" src="), "{path}: inline script {tag}");
        }
        assert!(
            !html.contains(" onclick=") && !html.contains(" onload="),
            "{path}"
        );
    }
    let missing = page(&app, Method::GET, "/no-such-page", "", None, &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(text(&missing).contains("there is no such page"));
    assert_eq!(
        page(&app, Method::GET, "/", "", None, &[]).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn a_hostile_console_and_file_names_are_shown_as_text() {
    let (_d, app) = test_app().await;
    let console =
        b"<script>alert(1)</script>\n\x1b[1;31m<b>red</b>\x1b[0m\x1b]0;sneaky-title\x07 \x07bell \xff\n";
    use construir_tools::pack::{JobFile, job_archive};
    let output = job_archive(&[
        JobFile::script("#!/bin/sh\n"),
        JobFile::new("out/<img src=x onerror=alert(2)>.txt", b"pwned?", 0o644),
    ])
    .unwrap();
    let id = ran(&app, "alice", "", console, output).await;
    let html = text(&page(&app, Method::GET, &format!("/jobs/{id}"), "", None, &[]).await);
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(!html.contains("<img src=x"), "{html}");
    assert!(!html.contains("<b>red"), "{html}");
    assert!(
        html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{html}"
    );
    assert!(
        html.contains(r#"<span class="b f1">&#60;b&#62;red&#60;/b&#62;</span>"#),
        "{html}"
    );
    assert!(
        html.contains("\u{2407}bell \u{fffd}"),
        "control characters shown: {html}"
    );
    assert!(
        !html.contains("sneaky-title"),
        "an escape sequence's text is dropped: {html}"
    );
    assert!(
        html.contains("&#60;img src=x onerror=alert(2)&#62;.txt"),
        "{html}"
    );
}

#[tokio::test]
async fn downloads_are_attachments_and_single_files_come_out_byte_for_byte() {
    let (_d, app) = test_app().await;
    use construir_tools::pack::{JobFile, job_archive};
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let output = job_archive(&[
        JobFile::script("#!/bin/sh\n"),
        JobFile::new("out/data.bin", data.clone(), 0o644),
        JobFile::new("out/page.html", b"<html><script>alert(3)</script>", 0o644),
    ])
    .unwrap();
    let id = ran(&app, "alice", "", b"built\n", output.clone()).await;
    let whole = page(
        &app,
        Method::GET,
        &format!("/jobs/{id}/output"),
        "",
        None,
        &[],
    )
    .await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body, output);
    assert_eq!(whole.headers["content-type"], "application/octet-stream");
    let disposition = whole.headers["content-disposition"].to_str().unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"job-"),
        "{disposition}"
    );
    let one = page(
        &app,
        Method::GET,
        &format!("/jobs/{id}/files/opt/job/out/data.bin"),
        "",
        None,
        &[],
    )
    .await;
    assert_eq!(one.status, StatusCode::OK, "{}", text(&one));
    assert_eq!(one.body, data);
    let html = page(
        &app,
        Method::GET,
        &format!("/jobs/{id}/files/opt/job/out/page.html"),
        "",
        None,
        &[],
    )
    .await;
    assert_eq!(html.headers["content-type"], "application/octet-stream");
    assert_eq!(
        html.headers["content-disposition"],
        "attachment; filename=\"page.html\""
    );
    let none = page(
        &app,
        Method::GET,
        &format!("/jobs/{id}/files/opt/job/out/nothing"),
        "",
        None,
        &[],
    )
    .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    let log = page(
        &app,
        Method::GET,
        &format!("/jobs/{id}/log.txt"),
        "",
        None,
        &[],
    )
    .await;
    assert_eq!(log.body, b"built\n");
    assert!(
        log.headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment;")
    );
    // The job page lists the files with their download links.
    let html = text(&page(&app, Method::GET, &format!("/jobs/{id}"), "", None, &[]).await);
    assert!(
        html.contains(&format!("/jobs/{id}/files/opt/job/out/data.bin")),
        "{html}"
    );
    assert!(html.contains("68.4 KiB"), "{html}");
}

#[tokio::test]
async fn sign_in_makes_a_session_and_forms_without_their_token_are_refused() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "alice", "correct horse", false).await;
    let id = ran(&app, "alice", "", b"x\n", crate::replica_tests::output("x")).await;
    // A wrong password says nothing about whether the name exists.
    let form = page(&app, Method::GET, "/signin", "", None, &[]).await;
    let anon = cookies_of(&form);
    let anon_cookie = form.headers["set-cookie"].to_str().unwrap();
    assert!(anon_cookie.contains("HttpOnly") && anon_cookie.contains("SameSite=Strict"));
    let csrf = csrf_field(&form);
    for (name, password) in [("alice", "wrong horse"), ("nobody", "correct horse")] {
        let bad = page(
            &app,
            Method::POST,
            "/signin",
            &anon,
            Some(&format!("csrf={csrf}&name={name}&password={password}")),
            &[],
        )
        .await;
        assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
        assert!(text(&bad).contains("do not match an account"));
    }
    // No token, or another one, or a post from another site: refused.
    for (form, origin) in [
        ("name=alice&password=correct+horse".to_string(), None),
        (
            format!("csrf={}&name=alice&password=correct+horse", "0".repeat(64)),
            None,
        ),
        (
            format!("csrf={csrf}&name=alice&password=correct+horse"),
            Some("http://evil.example"),
        ),
    ] {
        let extra: Vec<(&str, &str)> = origin.iter().map(|o| ("Origin", *o)).collect();
        let r = page(&app, Method::POST, "/signin", &anon, Some(&form), &extra).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{form} {origin:?}");
    }
    let (cookies, csrf) = sign_in(&app, "alice", "correct+horse").await;
    // Cancel without the session's token: refused; with it, the job is canceled (it ended
    // already here: the state machine says so).
    let r = page(
        &app,
        Method::POST,
        &format!("/jobs/{id}/cancel"),
        &cookies,
        Some("csrf=x"),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = page(
        &app,
        Method::POST,
        &format!("/jobs/{id}/resubmit"),
        &cookies,
        Some(&format!("csrf={csrf}")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    let again = r.headers["location"].to_str().unwrap().to_string();
    assert_eq!(again, format!("/jobs/{}", id + 1));
    let r = page(
        &app,
        Method::POST,
        &format!("{again}/cancel"),
        &cookies,
        Some(&format!("csrf={csrf}")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    let html = text(&page(&app, Method::GET, &again, &cookies, None, &[]).await);
    assert!(html.contains("st-canceled"), "{html}");
    // Signing out ends the session.
    let out = page(
        &app,
        Method::POST,
        "/signout",
        &cookies,
        Some(&format!("csrf={csrf}")),
        &[],
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    let jobs = page(&app, Method::GET, "/jobs", &cookies, None, &[]).await;
    assert!(!text(&jobs).contains("Signed in as"));
}

#[tokio::test]
async fn a_private_job_is_not_there_for_others_and_a_public_one_is_not_theirs_to_change() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "bob", "bobs password", false).await;
    let private = ran(
        &app,
        "alice",
        "&private=true",
        b"secret\n",
        crate::replica_tests::output("s"),
    )
    .await;
    let public = ran(
        &app,
        "alice",
        "",
        b"open\n",
        crate::replica_tests::output("p"),
    )
    .await;
    let (bob, csrf) = sign_in(&app, "bob", "bobs+password").await;
    for who in ["", bob.as_str()] {
        for path in [
            "",
            "/log.txt",
            "/output",
            "/files/out/result",
            "/live",
            "/receipt.json",
        ] {
            let r = page(
                &app,
                Method::GET,
                &format!("/jobs/{private}{path}"),
                who,
                None,
                &[],
            )
            .await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path} as {who:?}");
        }
        let list = text(&page(&app, Method::GET, "/jobs", who, None, &[]).await);
        assert!(!list.contains(&format!("id=\"job-{private}\"")), "{list}");
        assert!(list.contains(&format!("id=\"job-{public}\"")), "{list}");
    }
    let r = page(
        &app,
        Method::POST,
        &format!("/jobs/{public}/cancel"),
        &bob,
        Some(&format!("csrf={csrf}")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", text(&r));
    // Filters narrow the list.
    let list = text(
        &page(
            &app,
            Method::GET,
            "/jobs?state=queued&owner=alice",
            "",
            None,
            &[],
        )
        .await,
    );
    assert!(list.contains("No jobs here"), "{list}");
    let list = text(
        &page(
            &app,
            Method::GET,
            "/jobs?state=succeeded&owner=alice&image=t0",
            "",
            None,
            &[],
        )
        .await,
    );
    assert!(list.contains(&format!("id=\"job-{public}\"")), "{list}");
}

#[tokio::test]
async fn tokens_are_made_shown_once_and_revoked_and_a_session_of_a_revoked_token_ends() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "alice", "correct horse", false).await;
    let (cookies, csrf) = sign_in(&app, "alice", "correct+horse").await;
    let made = page(
        &app,
        Method::POST,
        "/tokens",
        &cookies,
        Some(&format!("csrf={csrf}&role=submitter")),
        &[],
    )
    .await;
    assert_eq!(made.status, StatusCode::OK, "{}", text(&made));
    assert_eq!(made.headers["cache-control"], "no-store");
    let html = text(&made);
    let at = html.find("id=\"new-token\">").unwrap() + 15;
    let new = html[at..at + 68].to_string();
    assert!(new.starts_with("cst_"), "{new}");
    // Shown once: the list afterwards does not hold it.
    let list = text(&page(&app, Method::GET, "/tokens", &cookies, None, &[]).await);
    assert!(!list.contains(&new));
    // No admin token from a user who is not one.
    let r = page(
        &app,
        Method::POST,
        "/tokens",
        &cookies,
        Some(&format!("csrf={csrf}&role=admin")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Signed in with that token, then the token revoked: that session ends.
    let form = page(&app, Method::GET, "/signin", "", None, &[]).await;
    let anon = cookies_of(&form);
    let r = page(
        &app,
        Method::POST,
        "/signin",
        &anon,
        Some(&format!("csrf={}&token={new}", csrf_field(&form))),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    let by_token = format!("{anon}; {}", cookies_of(&r));
    assert!(
        text(&page(&app, Method::GET, "/jobs", &by_token, None, &[]).await)
            .contains("Signed in as")
    );
    let id: i64 = app
        .db
        .tokens_of(app.db.ensure_user("alice").await.unwrap())
        .await
        .unwrap()[0]
        .0;
    let r = page(
        &app,
        Method::POST,
        &format!("/tokens/{id}/revoke"),
        &cookies,
        Some(&format!("csrf={csrf}")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    assert!(
        !text(&page(&app, Method::GET, "/jobs", &by_token, None, &[]).await)
            .contains("Signed in as")
    );
    // A runner token does not sign in.
    let runner = token(&app, "alice", "runner").await;
    let r = page(
        &app,
        Method::POST,
        "/signin",
        &anon,
        Some(&format!("csrf={}&token={runner}", csrf_field(&form))),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn sign_up_is_off_unless_the_server_allows_it() {
    let (_d, app) = test_app().await;
    assert_eq!(
        page(&app, Method::GET, "/signup", "", None, &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let (_d2, open) = crate::http::tests::app_with(crate::settings::SettingArgs {
        open_signup: Some(true),
        ..Default::default()
    })
    .await;
    let form = page(&open, Method::GET, "/signup", "", None, &[]).await;
    assert_eq!(form.status, StatusCode::OK);
    let anon = cookies_of(&form);
    let csrf = csrf_field(&form);
    let post = |body: String| {
        let (open, anon) = (open.clone(), anon.clone());
        async move { page(&open, Method::POST, "/signup", &anon, Some(&body), &[]).await }
    };
    let r = post(format!(
        "csrf={csrf}&name=carol&password=long+enough&again=long+enougH"
    ))
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = post(format!("csrf={csrf}&name=carol&password=short&again=short")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = post(format!(
        "csrf={csrf}&name=%3Cb%3E&password=long+enough&again=long+enough"
    ))
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!text(&r).contains("<b>"), "{}", text(&r));
    let r = post(format!(
        "csrf={csrf}&name=carol&password=long+enough&again=long+enough"
    ))
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    let r = post(format!(
        "csrf={csrf}&name=carol&password=long+enough&again=long+enough"
    ))
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    sign_in(&open, "carol", "long+enough").await;
}

#[tokio::test]
async fn the_live_console_streams_a_running_jobs_pieces_as_text_runs() {
    let (_d, app) = test_app().await;
    let alice = token(&app, "alice", "submitter").await;
    let a = submit(&app, &alice, "hello_t0.tar.xz&private=false", job("live")).await;
    let id = a.json()["id"].as_u64().unwrap();
    let runner_token = token(&app, "volunteer", "runner").await;
    let reg = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/register",
        &runner_token,
        json!({"name": "r1"}),
        &[],
    )
    .await;
    let runner = reg.json()["runner_id"].as_u64().unwrap().to_string();
    let c = claimed(&claim(&app, &runner_token, &runner, caps()).await);
    call(&app, &c, Method::POST, "start", Body::empty()).await;
    call(
        &app,
        &c,
        Method::PATCH,
        "log?offset=0",
        Body::from("booting <x>\n"),
    )
    .await;
    let attempt = c.base.rsplit('/').next().unwrap().to_string();
    let resp = router(app.clone())
        .oneshot(
            Request::builder()
                .uri(format!("/jobs/{id}/live?attempt={attempt}&from=0"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(first.contains("event: console"), "{first}");
    assert!(first.contains(r#""text":"booting <x>\n""#), "{first}");
    // A piece sent now arrives on the open stream.
    let sent = std::time::Instant::now();
    call(
        &app,
        &c,
        Method::PATCH,
        "log?offset=12",
        Body::from("\x1b[32mok\x1b[0m\n"),
    )
    .await;
    let next = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let next = String::from_utf8_lossy(&next).into_owned();
    assert!(next.contains(r#"{"class":"f2","text":"ok"}"#), "{next}");
    assert!(sent.elapsed() < std::time::Duration::from_secs(5));
}

/// A multipart form body of `fields` (name, value) then one file part; its content type.
fn multipart(fields: &[(&str, &str)], file: Option<(&str, &str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "construir-test-boundary-7f3a";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    if let Some((field, name, data)) = file {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
                 filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_multipart(app: &Shared, cookies: &str, kind: &str, body: Vec<u8>) -> Answer {
    let resp = router(app.clone())
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/submit")
                .header("Cookie", cookies)
                .header("Content-Type", kind)
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

#[tokio::test]
async fn the_submit_form_takes_a_job_file_or_packs_a_source_and_a_script() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "alice", "correct horse", false).await;
    assert_eq!(
        page(&app, Method::GET, "/submit", "", None, &[])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let (cookies, csrf) = sign_in(&app, "alice", "correct+horse").await;
    let form = page(&app, Method::GET, "/submit", &cookies, None, &[]).await;
    assert_eq!(form.status, StatusCode::OK);
    let bytes = job("from the form");
    let params = [
        ("csrf", csrf.as_str()),
        ("kind", "file"),
        ("image", "t0"),
        ("timeout_min", "5"),
        ("output_size", "16M"),
        ("replicas", "1"),
        ("private", "on"),
    ];
    let (kind, body) = multipart(&params, Some(("job", "hello_t0.tar.xz", &bytes)));
    let r = post_multipart(&app, &cookies, &kind, body).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    let id: u64 = r.headers["location"].to_str().unwrap()[6..]
        .parse()
        .unwrap();
    let stored = app
        .db
        .load_job(construir_api::types::JobId(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.facts.sha256, crate::replica_tests::sha256(&bytes));
    assert_eq!(
        (
            stored.facts.limits.timeout_s,
            stored.facts.limits.output_size
        ),
        (300, 16 << 20)
    );
    assert!(stored.facts.private);
    // Without the token first, or with another one: refused before the file is read.
    let (kind, body) = multipart(
        &[("kind", "file")],
        Some(("job", "hello_t0.tar.xz", &bytes)),
    );
    assert_eq!(
        post_multipart(&app, &cookies, &kind, body).await.status,
        StatusCode::FORBIDDEN
    );
    let (kind, body) = multipart(
        &[("csrf", &"0".repeat(64))],
        Some(("job", "hello_t0.tar.xz", &bytes)),
    );
    assert_eq!(
        post_multipart(&app, &cookies, &kind, body).await.status,
        StatusCode::FORBIDDEN
    );
    // Not a job: the form again, saying why.
    let (kind, body) = multipart(&params, Some(("job", "hello_t0.tar.xz", b"junk")));
    let r = post_multipart(&app, &cookies, &kind, body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", text(&r));
    assert!(text(&r).contains("not a job"), "{}", text(&r));
    // A source tarball and a script, packed into a job.
    let source = [
        ("csrf", csrf.as_str()),
        ("kind", "source"),
        ("name", "lua"),
        ("image", "t0"),
        ("script", "make\r\n"),
    ];
    let (kind, body) = multipart(
        &source,
        Some(("source", "lua-5.4.tar.gz", b"tarball bytes")),
    );
    let r = post_multipart(&app, &cookies, &kind, body).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    let id: u64 = r.headers["location"].to_str().unwrap()[6..]
        .parse()
        .unwrap();
    let stored = app
        .db
        .load_job(construir_api::types::JobId(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.facts.name, "lua_t0.tar.xz");
    let archive = std::fs::read(app.blobs.local_file(&stored.facts.sha256)).unwrap();
    let read = |p: &str| {
        construir_contract::archive::read_file(&archive[..], p, 1 << 20)
            .unwrap()
            .unwrap()
    };
    assert_eq!(read("opt/job/build.sh"), b"make\n");
    assert_eq!(read("opt/job/source.tar.gz"), b"tarball bytes");
    let (kind, body) = multipart(&source, Some(("source", "lua.zip", b"zip")));
    let r = post_multipart(&app, &cookies, &kind, body).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", text(&r));
}

#[tokio::test]
async fn the_live_console_follows_only_its_own_jobs_attempts() {
    let (_d, app) = test_app().await;
    // A private job with a console, and a public one no runner took (canceled while queued).
    let secret = ran(
        &app,
        "alice",
        "&private=true",
        b"the secret console\n",
        crate::replica_tests::output("s"),
    )
    .await;
    let alice = token(&app, "alice", "submitter").await;
    let open = submit(&app, &alice, "hello_t0.tar.xz&private=false", job("empty")).await;
    let open = open.json()["id"].as_u64().unwrap();
    let c = crate::flow_tests::send(
        &app,
        Method::POST,
        &format!("/api/v1/jobs/{open}/cancel"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    let stored = app
        .db
        .load_job(construir_api::types::JobId(secret))
        .await
        .unwrap()
        .unwrap();
    let theirs = stored.snapshot.attempts[0].id;
    let r = page(
        &app,
        Method::GET,
        &format!("/jobs/{open}/live?attempt={theirs}&from=0"),
        "",
        None,
        &[],
    )
    .await;
    let events = text(&r);
    assert!(!events.contains("secret"), "{events}");
    assert!(events.contains("event: end"), "{events}");
}
