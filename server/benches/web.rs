//! The website's figures (issue 13), each against a baseline measured in the same run, labelled
//! with the host kind:
//!
//! - **jobs page**: `GET /jobs` (a page of 50 rows) with 10,000 jobs of 20 owners in the
//!   database: the server's time from request to the last byte of the page, against the page's
//!   bare query (`Db::list_page`, the same rows) on the same database.
//! - **live console**: a console piece appended through the runner API until a follower's live
//!   console (Server-Sent Events, what the job page's script reads) yields it, against the API's
//!   own long poll of the same console waking for the same kind of piece.
//!
//! In process (the router called directly, as a reverse proxy would hand it requests): the
//! server's own time, without a network. `cargo bench -p construir-server --bench web
//! [-- --only jobs-page,live]`; the figures are in docs/benchmarks.md.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{host_line, median, spread};
use construir_api::state::{JobPolicy, JobSnapshot};
use construir_api::types::{JobLimits, UserId};
use construir_server::access::Viewer;
use construir_server::blobs::Blobs;
use construir_server::db::Db;
use construir_server::jobs::NewJob;
use construir_server::listing::JobFilter;
use construir_server::service::{App, Shared};
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use tower::ServiceExt;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn app_in(dir: &std::path::Path) -> Res<Shared> {
    let settings = construir_server::settings::SettingArgs {
        data: Some(dir.to_path_buf()),
        // What is measured is the page and the console, not the rate limiter.
        requests_per_second: Some(0),
        ..Default::default()
    }
    .resolve()?;
    let db = Db::open_embedded(dir).await?;
    let blobs = Blobs::open_local(dir)?;
    Ok(App::new(settings, db, blobs)?)
}

async fn call(
    app: &Shared,
    req: Request<Body>,
) -> Res<(StatusCode, axum::http::HeaderMap, Vec<u8>)> {
    let resp = construir_server::http::router(app.clone())
        .oneshot(req)
        .await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, headers, body))
}

fn api(method: Method, path: &str, token: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("Construir-Protocol", "1")
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .body(body)
        .expect("a request")
}

async fn token(app: &Shared, user: &str, role: &str) -> Res<String> {
    let id = app.db.ensure_user(user).await?;
    let t = construir_server::tokens::generate()?;
    app.db
        .add_token(id, role, &construir_server::tokens::digest(&t))
        .await?;
    Ok(t)
}

async fn bench_jobs_page(rounds: usize) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let app = app_in(dir.path()).await?;
    let mut owners = Vec::new();
    for i in 0..20 {
        owners.push(app.db.ensure_user(&format!("user-{i}")).await?);
    }
    let filling = Instant::now();
    let snapshot = JobSnapshot::submitted(JobPolicy::DEFAULT, 1_795_000_000_000).job;
    for i in 0..10_000usize {
        let job = NewJob {
            owner: UserId(owners[i % owners.len()] as u64),
            name: format!("job-{i}_i0.tar.xz"),
            image: "i0".into(),
            image_digest: None,
            sha256: "0".repeat(64),
            size: 1 << 20,
            limits: JobLimits::DEFAULT,
            priority: 0,
            private: i % 10 == 0,
        };
        app.db.insert_job(&job, &snapshot).await?;
    }
    eprintln!("10,000 jobs stored in {:?}", filling.elapsed());
    let (mut page, mut bare, mut filtered) = (Vec::new(), Vec::new(), Vec::new());
    let mut size = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let (status, _, body) =
            call(&app, Request::builder().uri("/jobs").body(Body::empty())?).await?;
        page.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, StatusCode::OK);
        size = body.len();
        let t = Instant::now();
        let rows = app
            .db
            .list_page(Viewer::ANONYMOUS, &JobFilter::default(), 51)
            .await?;
        bare.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(rows.len(), 51);
        let t = Instant::now();
        let (status, _, _) = call(
            &app,
            Request::builder()
                .uri("/jobs?owner=user-7&state=queued&before=5000")
                .body(Body::empty())?,
        )
        .await?;
        filtered.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, StatusCode::OK);
    }
    let ratio = median(&mut page) / median(&mut bare);
    println!("### A page of the jobs list, 10,000 jobs in the database ({rounds} rounds)\n");
    println!("{}\n", host_line());
    println!("| what | median (min–max) |\n|---|---|");
    println!(
        "| `GET /jobs`, 50 rows ({} KiB of HTML) | {} |",
        size / 1024,
        spread(&mut page)
    );
    println!(
        "| `GET /jobs?owner=…&state=…&before=…` | {} |",
        spread(&mut filtered)
    );
    println!(
        "| baseline: the page's bare query (`Db::list_page`) | {} |",
        spread(&mut bare)
    );
    println!(
        "\nThe page takes {ratio:.1}× its bare query; target: under 100 ms ({}).\n",
        if median(&mut page) < 100.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

/// One SSE frame of `body` that holds `needle`, within `limit`.
async fn frame_with(body: &mut Body, needle: &str, limit: Duration) -> Res<()> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, body.frame())
            .await?
            .ok_or("the live console ended")??;
        if let Ok(data) = frame.into_data()
            && String::from_utf8_lossy(&data).contains(needle)
        {
            return Ok(());
        }
    }
}

async fn bench_live_console(rounds: usize) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let app = app_in(dir.path()).await?;
    let alice = token(&app, "alice", "submitter").await?;
    let runner = token(&app, "volunteer", "runner").await?;
    // A job, claimed and started by a runner of the API.
    let job = {
        let mut b = tar::Builder::new(Vec::new());
        let script = b"#!/bin/sh\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(script.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, "opt/job/construir", &script[..])?;
        b.into_inner()?
    };
    let (s, _, body) = call(
        &app,
        api(
            Method::POST,
            "/api/v1/jobs?name=live_t0.tar&timeout_s=3600&private=false",
            &alice,
            Body::from(job),
        ),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    let id = serde_json::from_slice::<serde_json::Value>(&body)?["id"]
        .as_u64()
        .ok_or("id")?;
    let (_, _, body) = call(
        &app,
        api(
            Method::POST,
            "/api/v1/runner/register",
            &runner,
            Body::from(r#"{"name":"r"}"#),
        ),
    )
    .await?;
    let runner_id = serde_json::from_slice::<serde_json::Value>(&body)?["runner_id"]
        .as_u64()
        .ok_or("runner id")?;
    let claim = serde_json::json!({"wait_s": 0, "capabilities": {
        "arch": "x86_64", "backend": "qemu", "host_kind": "emulated", "images": ["t0"],
        "max_memory_mib": 4096, "max_vcpus": 4, "max_timeout_s": 7200,
        "max_job_size": 1u64 << 30, "max_output_size": 1u64 << 30,
        "free_slots": 1, "free_memory_mib": 4096}});
    let mut request = api(
        Method::POST,
        "/api/v1/runner/claim",
        &runner,
        Body::from(claim.to_string()),
    );
    request
        .headers_mut()
        .insert("Construir-Runner", runner_id.to_string().parse()?);
    let (s, _, body) = call(&app, request).await?;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let claimed: serde_json::Value = serde_json::from_slice(&body)?;
    let attempt = claimed["attempt_id"].as_u64().ok_or("attempt")?;
    let attempt_token = claimed["attempt_token"]
        .as_str()
        .ok_or("token")?
        .to_string();
    let base = format!("/api/v1/runner/attempts/{attempt}");
    call(
        &app,
        api(
            Method::POST,
            &format!("{base}/start"),
            &attempt_token,
            Body::empty(),
        ),
    )
    .await?;
    let mut offset = 0u64;
    let (mut live, mut poll) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The live console, following from where the console is.
        let resp = construir_server::http::router(app.clone())
            .oneshot(
                Request::builder()
                    .uri(format!("/jobs/{id}/live?attempt={attempt}&from={offset}"))
                    .body(Body::empty())?,
            )
            .await?;
        let mut stream = resp.into_body();
        // Let it reach its wait.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let piece = format!("live piece {round}\n");
        let needle = format!("live piece {round}");
        let waiting = tokio::spawn(async move {
            let t = Instant::now();
            frame_with(&mut stream, &needle, Duration::from_secs(10))
                .await
                .map(|()| t)
        });
        let sent = Instant::now();
        let (s, _, _) = call(
            &app,
            api(
                Method::PATCH,
                &format!("{base}/log?offset={offset}"),
                &attempt_token,
                Body::from(piece.clone()),
            ),
        )
        .await?;
        assert!(s.is_success());
        offset += piece.len() as u64;
        waiting.await?.map_err(|e| e.to_string())?;
        live.push(sent.elapsed().as_secs_f64() * 1000.0);

        // The baseline: the API's long poll of the same console, woken by a piece.
        let app2 = app.clone();
        let alice2 = alice.clone();
        let from = offset;
        let polling = tokio::spawn(async move {
            call(
                &app2,
                api(
                    Method::GET,
                    &format!("/api/v1/jobs/{id}/log?offset={from}&wait_s=10"),
                    &alice2,
                    Body::empty(),
                ),
            )
            .await
            .map(|(s, _, body)| (s, body))
            .map_err(|e| e.to_string())
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let piece = format!("poll piece {round}\n");
        let sent = Instant::now();
        call(
            &app,
            api(
                Method::PATCH,
                &format!("{base}/log?offset={offset}"),
                &attempt_token,
                Body::from(piece.clone()),
            ),
        )
        .await?;
        offset += piece.len() as u64;
        let (s, body) = polling.await??;
        assert_eq!(s, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("poll piece"));
        poll.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    let ratio = median(&mut live) / median(&mut poll);
    println!("### The live console: a piece from the runner to a follower ({rounds} rounds)\n");
    println!("{}\n", host_line());
    println!("| what | median (min–max) |\n|---|---|");
    println!(
        "| runner's `PATCH …/log` → the job page's event stream yields it | {} |",
        spread(&mut live)
    );
    println!(
        "| baseline: the same → the API's long poll (`GET …/log?wait_s`) answers | {} |",
        spread(&mut poll)
    );
    println!(
        "\nThe live console takes {ratio:.1}× the API's long poll; target: within 1 s ({}).\n",
        if median(&mut live) < 1000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let only: Vec<String> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let wants = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    rt.block_on(async {
        if wants("jobs-page") {
            bench_jobs_page(30).await.expect("the jobs page bench");
        }
        if wants("live") {
            bench_live_console(50)
                .await
                .expect("the live console bench");
        }
    });
}
