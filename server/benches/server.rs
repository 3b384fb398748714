//! construir-server's figures (issue 11), measured side by side in one run, each against a
//! baseline measured in the same run on the same host, and labelled with the host kind:
//!
//! - **latency**: submit → attempt start with an idle runner parked in a long poll (target under
//!   50 ms), against the same claim and start with the job already queued (no wake-up). Measured
//!   with an emulated runner in this process (claim → start as the runner makes them), and with a
//!   real `construir-runner --server` if one is built (`target/release/construir-runner`) and
//!   image t0 is there, from the server's own times (the job's `created_ms` → the attempt's
//!   `started_ms`).
//! - **claims**: claims per second through the HTTP API against the same SQL statements a claim
//!   runs (the token lookup, `runners`, the claimable window, the running counts, the job read,
//!   the attempt insert, the conditional job write), run bare through sqlx on the same database
//!   file while the server is idle (target: at least half). Interleaved in rounds.
//! - **polls**: 1,000 runners (1,000 tokens) each holding a claim long poll open on its own
//!   connection: the server's RSS (target under 100 MiB) against the same server idle.
//! - **upload**: an output PUT (streamed, hashed, fsynced, published) against writing the same
//!   bytes to a file in the data directory and fsyncing it.
//!
//! `cargo bench -p construir-server --bench server [-- --only latency,claims,polls,upload]`, or
//! `tools/bench-server` (builds the runner and image t0 first). Prints Markdown tables.

mod common;

use common::harness::submit;
use common::harness::{
    Http, Res, Server, caps, claim_body_with, make_tokens, now_ms, raise_fd_limit, random_bytes,
    register, tar_of, trivial_job,
};
use common::{host_line, median, spread};
use construir_api::types::ClaimResponse;
use construir_server::tokens;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Row};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

fn claim_body(wait_s: u32, images: &[&str]) -> Vec<u8> {
    claim_body_with(wait_s, images, 1)
}

const REPORT: &[u8] = br#"{"status":"success","exit_code":0,"job_exit_status":0,"reason":"bench"}"#;

async fn job_view(c: &mut Http, token: &str, id: u64) -> Res<serde_json::Value> {
    c.call("GET", &format!("/api/v1/jobs/{id}"), token, None, b"")
        .await?
        .expect(200, "show")?
        .json()
}

// ---------------------------------------------------------------------------------------------
// (i) submit → start.

async fn bench_latency(root: &Path, rounds: usize) -> Res<()> {
    let data = root.join("latency");
    let sub = make_tokens(&data, "submitter", "submitter", 1)
        .await?
        .remove(0);
    let mut run = make_tokens(&data, "runner", "runner", 2).await?;
    let real_token = run.pop().ok_or("token")?;
    let run = run.remove(0);
    let server = Server::start(&data, &[])?;
    let addr = server.addr;
    let runner = register(addr, &run, "emulated").await?;
    let job = trivial_job();
    let mut c = Http::connect(addr).await?;
    let claim = claim_body(30, &["t0"]);
    let (mut woken, mut woken_server, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    // Warm-up: one of each, not counted.
    for round in 0..=rounds {
        // Parked: the runner's long poll is open before the job exists.
        let mut r = Http::connect(addr).await?;
        r.send("POST", "/api/v1/runner/claim", &run, Some(runner), &claim)
            .await?;
        let parked = tokio::spawn(async move {
            let a = r.answer().await?.expect(200, "claim")?;
            let offer: ClaimResponse = a.json()?;
            r.call(
                "POST",
                &format!("/api/v1/runner/attempts/{}/start", offer.attempt_id),
                &offer.attempt_token,
                None,
                b"",
            )
            .await?
            .expect(200, "start")?;
            let started = Instant::now();
            r.call(
                "POST",
                &format!("/api/v1/runner/attempts/{}/report", offer.attempt_id),
                &offer.attempt_token,
                None,
                REPORT,
            )
            .await?
            .expect(200, "report")?;
            Res::Ok(started)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let id = submit(&mut c, &sub, &job, "").await?;
        let acked = Instant::now();
        let started = parked.await??;
        let view = job_view(&mut c, &sub, id).await?;
        let server_ms = view["attempts"][0]["started_ms"].as_u64().unwrap_or(0) as f64
            - view["created_ms"].as_u64().unwrap_or(0) as f64;
        // Direct: the job is queued first, then claimed and started (nothing to wake).
        let id2 = submit(&mut c, &sub, &job, "").await?;
        let t = Instant::now();
        let a = c
            .call(
                "POST",
                "/api/v1/runner/claim",
                &run,
                Some(runner),
                &claim_body(0, &["t0"]),
            )
            .await?
            .expect(200, "claim")?;
        let offer: ClaimResponse = a.json()?;
        c.call(
            "POST",
            &format!("/api/v1/runner/attempts/{}/start", offer.attempt_id),
            &offer.attempt_token,
            None,
            b"",
        )
        .await?
        .expect(200, "start")?;
        let d = t.elapsed();
        c.call(
            "POST",
            &format!("/api/v1/runner/attempts/{}/report", offer.attempt_id),
            &offer.attempt_token,
            None,
            REPORT,
        )
        .await?
        .expect(200, "report")?;
        assert_eq!(
            offer.job_id.0, id2,
            "the direct claim took the job just queued"
        );
        if round > 0 {
            // Signed: the wake-up runs before the submit's answer is written, so the start
            // can be answered first.
            woken.push(
                started.saturating_duration_since(acked).as_secs_f64() * 1e3
                    - acked.saturating_duration_since(started).as_secs_f64() * 1e3,
            );
            woken_server.push(server_ms);
            direct.push(d.as_secs_f64() * 1e3);
        }
    }
    let base = median(&mut direct.clone());
    println!("\n### Submit → start, idle runner ({rounds} rounds each, median (min–max))");
    println!("| what | runner | time | ÷ baseline |");
    println!("|---|---|---|---|");
    println!(
        "| baseline: claim + start of a job already queued (no wake-up), client clock | emulated | {} | 1.0 |",
        spread(&mut direct)
    );
    println!(
        "| submit answered → start answered, runner parked in a long poll, client clock | emulated | {} | {:.2} |",
        spread(&mut woken.clone()),
        median(&mut woken) / base
    );
    println!(
        "| job created → attempt started, server clock (1 ms steps) | emulated | {} | {:.2} |",
        spread(&mut woken_server.clone()),
        median(&mut woken_server) / base
    );
    bench_latency_real(&server, &sub, &real_token, root, base).await
}

/// The same with a real construir-runner, if one is built and can run a job here.
async fn bench_latency_real(
    server: &Server,
    sub: &str,
    token: &str,
    root: &Path,
    base: f64,
) -> Res<()> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("construir-runner"))
        .ok_or("no target dir")?;
    let images = construir_contract::manifest::default_images_dir();
    if !bin.exists() || !images.join("t0.json").exists() {
        println!(
            "| job created → attempt started, server clock | construir-runner | NOT RUN: needs {} and image t0 in {} (tools/bench-server builds both) | |",
            bin.display(),
            images.display()
        );
        return Ok(());
    }
    let token_file = root.join("runner.token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let log = std::fs::File::create(root.join("runner.log"))?;
    let mut runner = Command::new(&bin)
        .args([
            "--server",
            &server.url(),
            "--name",
            "bench-real",
            "--jobs",
            "1",
        ])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--dir")
        .arg(root.join("runner"))
        .arg("--images-dir")
        .arg(&images)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut c = Http::connect(server.addr).await?;
    let job = trivial_job();
    let (mut created, mut submitted, mut claimed) = (Vec::new(), Vec::new(), Vec::new());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = 8;
    for i in 0..=samples {
        let id = submit(&mut c, sub, &job, "").await?;
        let acked = now_ms() as f64;
        let start = Instant::now();
        let view = loop {
            let v = job_view(&mut c, sub, id).await?;
            if !matches!(v["state"].as_str(), Some("queued" | "running")) {
                break v;
            }
            if start.elapsed() > Duration::from_secs(300) {
                let _ = runner.kill();
                return Err(format!("job {id} did not end in 300 s: {v}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let a = &view["attempts"][0];
        if view["state"] != "succeeded" {
            let _ = runner.kill();
            return Err(
                format!("the real runner's job {id} ended {}: {view}", view["state"]).into(),
            );
        }
        if i > 0 {
            let c0 = view["created_ms"].as_u64().unwrap_or(0) as f64;
            created.push(a["started_ms"].as_u64().unwrap_or(0) as f64 - c0);
            submitted.push(a["started_ms"].as_u64().unwrap_or(0) as f64 - acked);
            claimed.push(a["claimed_ms"].as_u64().unwrap_or(0) as f64 - c0);
        }
        // The runner parks its next long poll once the job is done.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = runner.kill();
    let _ = runner.wait();
    println!(
        "| job created → claimed, server clock (1 ms steps) | construir-runner ({samples} jobs, its own backend pick) | {} | {:.2} |",
        spread(&mut claimed.clone()),
        median(&mut claimed) / base
    );
    println!(
        "| job created → attempt started, server clock (1 ms steps) | construir-runner | {} | {:.2} |",
        spread(&mut created.clone()),
        median(&mut created) / base
    );
    println!(
        "| submit answered (client's wall clock) → attempt started (server's) | construir-runner | {} | {:.2} |",
        spread(&mut submitted.clone()),
        median(&mut submitted) / base
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (ii) claims per second: HTTP against the same SQL bare.

/// The SQL a claim runs, in the order it runs it, bare: the token lookup (http.rs `Caller`), the
/// runner's row and slots, its live and unstarted attempts, the claimable window, the running
/// counts, the job, the attempt row, the job again, and the conditional write within the
/// runner's cap (api_runner.rs `claim`, `try_claim`, `claim_job`; jobs.rs). The statements as of
/// this bench's writing: keep them in step with jobs.rs.
async fn bare_claim(
    pool: &AnyPool,
    token_digest: &str,
    runner: i64,
    caps_json: &str,
    free_slots: i64,
) -> Res<bool> {
    let now = now_ms() as i64;
    let who = sqlx::query(
        "SELECT u.id, u.name, t.role, t.id FROM tokens t JOIN users u ON u.id = t.user_id \
         WHERE t.sha256 = $1 AND t.revoked_ms IS NULL",
    )
    .bind(token_digest)
    .fetch_one(pool)
    .await?;
    let (user, token_id): (i64, i64) = (who.try_get(0)?, who.try_get(3)?);
    let slots: i64 = sqlx::query(
        "UPDATE runners SET last_seen_ms = $1, capabilities = $2, \
         slots = CASE WHEN slots IS NULL OR slots < $5 THEN $5 ELSE slots END \
         WHERE id = $3 AND user_id = $4 RETURNING slots",
    )
    .bind(now)
    .bind(caps_json)
    .bind(runner)
    .bind(user)
    .bind(free_slots)
    .fetch_one(pool)
    .await?
    .try_get(0)?;
    let (live_cap, unstarted_cap) = (slots, slots.clamp(1, 4));
    // The user's runners (a job one of them did not start is not handed to any).
    let own = sqlx::query("SELECT id FROM runners WHERE user_id = $1")
        .bind(user)
        .fetch_all(pool)
        .await?;
    std::hint::black_box(own.len());
    let load = sqlx::query(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN live_started = 0 THEN 1 ELSE 0 END), 0) \
         FROM jobs WHERE live_runner = $1",
    )
    .bind(runner)
    .fetch_one(pool)
    .await?;
    let (live, unstarted): (i64, i64) = (load.try_get(0)?, load.try_get(1)?);
    if live >= live_cap || unstarted >= unstarted_cap {
        return Err(format!("bare claim: runner {runner} at its cap").into());
    }
    let candidates = sqlx::query(
        "SELECT id, owner, priority FROM (SELECT id, owner, priority, ROW_NUMBER() OVER \
         (PARTITION BY owner ORDER BY priority DESC, id ASC) AS rank FROM jobs \
         WHERE state = 'queued' AND claimable_ms <= $1) AS ranked \
         WHERE rank <= $2 ORDER BY rank, id LIMIT 2000",
    )
    .bind(now)
    .bind(50i64)
    .fetch_all(pool)
    .await?;
    sqlx::query("SELECT owner, COUNT(*) FROM jobs WHERE state = 'running' GROUP BY owner")
        .fetch_all(pool)
        .await?;
    const JOB: &str = "SELECT id, owner, name, image, sha256, size, limits, priority, snapshot, \
                       version FROM jobs WHERE id = $1";
    for row in candidates {
        let id: i64 = row.try_get(0)?;
        let Some(job) = sqlx::query(JOB).bind(id).fetch_optional(pool).await? else {
            continue;
        };
        let limits: String = job.try_get("limits")?;
        let _: serde_json::Value = serde_json::from_str(&limits)?;
        let token = tokens::generate()?;
        let attempt: i64 = sqlx::query(
            "INSERT INTO attempts (job_id, runner_id, token_sha256, claim_token_id) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(id)
        .bind(runner)
        .bind(tokens::digest(&token))
        .bind(token_id)
        .fetch_one(pool)
        .await?
        .try_get(0)?;
        let job = sqlx::query(JOB).bind(id).fetch_one(pool).await?;
        let version: i64 = job.try_get("version")?;
        let snapshot: String = job.try_get("snapshot")?;
        let mut snap: serde_json::Value = serde_json::from_str(&snapshot)?;
        // The claimed snapshot: running, one attempt more (about the size of the real one).
        snap["state"] = "running".into();
        snap["bench_attempt"] = serde_json::json!({"id": attempt, "runner": runner,
            "state": "leased", "why": "claimed", "late": false, "claimed_ms": now,
            "accept_by_ms": now + 3_600_000, "lease_until_ms": now + 3_600_000, "started_ms": null,
            "ended_ms": null, "cancel_requested": false, "phase": null, "console_bytes": 0,
            "report": null});
        let stored = sqlx::query(
            "UPDATE jobs SET state = $1, claimable_ms = $2, next_deadline_ms = $3, \
             snapshot = $4, live_runner = $5, live_started = $6, version = version + 1 \
             WHERE id = $7 AND version = $8 \
             AND (SELECT COUNT(*) FROM jobs WHERE live_runner = $9) < $10 \
             AND (SELECT COUNT(*) FROM jobs WHERE live_runner = $9 AND live_started = 0) < $11",
        )
        .bind("running")
        .bind(0i64)
        .bind(now + 3_600_000)
        .bind(serde_json::to_string(&snap)?)
        .bind(runner)
        .bind(0i64)
        .bind(id)
        .bind(version)
        .bind(runner)
        .bind(live_cap)
        .bind(unstarted_cap)
        .execute(pool)
        .await?;
        if stored.rows_affected() == 1 {
            return Ok(true);
        }
        sqlx::query("DELETE FROM attempts WHERE id = $1")
            .bind(attempt)
            .execute(pool)
            .await?;
    }
    Ok(false)
}

/// The server's own pool settings (db.rs), on the same file.
async fn bare_pool(data: &Path) -> Res<AnyPool> {
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}?mode=rw", data.join("construir.db").display());
    Ok(AnyPoolOptions::new()
        .max_connections(8)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA synchronous = FULL").await?;
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                Ok(())
            })
        })
        .connect(&url)
        .await?)
}

/// Claims a runner makes before the next one takes over: a runner holds at most 4 claimed,
/// unstarted attempts (and no more live ones than its slots), and these are never started.
const CLAIMS_PER_RUNNER: usize = 4;

/// One row of the claims table: claimers at once, HTTP and bare rates, empty answers of each.
type ClaimCell = (usize, Vec<f64>, Vec<f64>, usize, usize);

async fn bench_claims(root: &Path, per_cell: usize, rounds: usize) -> Res<()> {
    let data = root.join("claims");
    let sub = make_tokens(&data, "submitter", "submitter", 1)
        .await?
        .remove(0);
    let concurrency = [1usize, 4];
    let claimers = *concurrency.iter().max().unwrap_or(&1);
    let run_tokens = make_tokens(&data, "claimer", "runner", claimers).await?;
    // Claimed attempts are never started: windows and leases long enough not to end in the run.
    let server = Server::start(&data, &["--accept-window", "3600s", "--lease", "3600s"])?;
    let addr = server.addr;
    // Each claimer's runners, used CLAIMS_PER_RUNNER claims each, in turn.
    let most = rounds * 2 * (per_cell + per_cell / 4 + 2);
    let mut runners: Vec<Vec<u64>> = Vec::new();
    for (k, t) in run_tokens.iter().enumerate() {
        let mut ids = Vec::new();
        for i in 0..most.div_ceil(CLAIMS_PER_RUNNER) {
            ids.push(register(addr, t, &format!("c{k}-r{i}")).await?);
        }
        runners.push(ids);
    }
    let mut next = vec![0usize; claimers];
    let total = per_cell * rounds * concurrency.len() * 2;
    let job = std::sync::Arc::new(trivial_job());
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..4 {
        let (job, sub) = (job.clone(), sub.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Http::connect(addr).await?;
            for _ in (k..total + 8).step_by(4) {
                submit(&mut c, &sub, &job, "").await?;
            }
            Res::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    eprintln!(
        "claims: {} jobs queued, {} runners registered, in {:.1} s",
        total + 8,
        runners.iter().map(Vec::len).sum::<usize>(),
        t.elapsed().as_secs_f64()
    );
    let pool = bare_pool(&data).await?;
    let slots = CLAIMS_PER_RUNNER as u32;
    let caps_json = serde_json::to_string(&caps(&["t0"], slots))?;
    let body = std::sync::Arc::new(claim_body_with(0, &["t0"], slots));
    let mut results: Vec<ClaimCell> = Vec::new();
    for &n in &concurrency {
        let (mut http, mut bare) = (Vec::new(), Vec::new());
        let (mut empty_http, mut empty_bare) = (0, 0);
        for _ in 0..rounds {
            for mode in ["http", "bare"] {
                let t = Instant::now();
                let mut tasks = Vec::new();
                for k in 0..n {
                    let share = per_cell / n + usize::from(k < per_cell % n);
                    let used = share.div_ceil(CLAIMS_PER_RUNNER);
                    let ids: Vec<u64> = runners[k][next[k]..next[k] + used].to_vec();
                    next[k] += used;
                    let (tok, body, pool, caps_json) = (
                        run_tokens[k].clone(),
                        body.clone(),
                        pool.clone(),
                        caps_json.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        if mode == "http" {
                            // Through HTTP, each claimer on its own connection.
                            let mut c = Http::connect(addr).await?;
                            let mut empty = 0usize;
                            for i in 0..share {
                                let rid = ids[i / CLAIMS_PER_RUNNER];
                                // A 204 with jobs queued: the claim lost every job of its
                                // window to concurrent claims (counted, and claimed again).
                                loop {
                                    let a = c
                                        .call(
                                            "POST",
                                            "/api/v1/runner/claim",
                                            &tok,
                                            Some(rid),
                                            &body,
                                        )
                                        .await?;
                                    if a.status == 204 && empty < 10 * share {
                                        empty += 1;
                                        continue;
                                    }
                                    a.expect(200, &format!("claim {i} of {share} (runner {rid})"))?;
                                    break;
                                }
                            }
                            Res::Ok(empty)
                        } else {
                            // Bare: the same statements on the same database file.
                            let digest = tokens::digest(&tok);
                            let mut empty = 0usize;
                            for i in 0..share {
                                let rid = ids[i / CLAIMS_PER_RUNNER] as i64;
                                while !bare_claim(&pool, &digest, rid, &caps_json, i64::from(slots))
                                    .await?
                                {
                                    empty += 1;
                                    if empty > 10 * share {
                                        return Err("bare claim: no job left".into());
                                    }
                                }
                            }
                            Res::Ok(empty)
                        }
                    }));
                }
                for task in tasks {
                    let e = task.await??;
                    if mode == "http" {
                        empty_http += e;
                    } else {
                        empty_bare += e;
                    }
                }
                let rate = per_cell as f64 / t.elapsed().as_secs_f64();
                if mode == "http" {
                    http.push(rate);
                } else {
                    bare.push(rate);
                }
            }
        }
        results.push((n, http, bare, empty_http, empty_bare));
    }
    pool.close().await;
    println!(
        "\n### Claims per second ({rounds} interleaved rounds of {per_cell} claims per cell, median (min–max); wait_s 0, a job always there)"
    );
    println!(
        "| claimers at once | bare SQL (baseline) | HTTP API | HTTP ÷ bare | empty answers with jobs queued (HTTP / bare) |"
    );
    println!("|---|---|---|---|---|");
    for (n, mut http, mut bare, eh, eb) in results {
        let (h, b) = (median(&mut http), median(&mut bare));
        let range = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            format!(
                "{:.0} ({:.0}–{:.0})",
                median(v),
                v.first().copied().unwrap_or(0.0),
                v.last().copied().unwrap_or(0.0)
            )
        };
        println!(
            "| {n} | {} /s | {} /s | {:.2} | {eh} / {eb} |",
            range(&mut bare),
            range(&mut http),
            h / b
        );
    }
    drop(server);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (iii) 1,000 idle long polls.

async fn bench_polls(root: &Path, n: usize) -> Res<()> {
    let data = root.join("polls");
    let tokens = make_tokens(&data, "volunteer", "runner", n).await?;
    let server = Server::start(&data, &[])?;
    let addr = server.addr;
    // Registered first, a few at a time, so that what is measured below is the polls alone.
    let mut ids = Vec::with_capacity(n);
    for chunk in tokens.chunks(32) {
        let mut tasks = Vec::new();
        for (i, t) in chunk.iter().enumerate() {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                register(addr, &t, &format!("home{i}")).await
            }));
        }
        for task in tasks {
            ids.push(task.await??);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = server.footprint();
    let body = std::sync::Arc::new(claim_body(30, &["t0"]));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (tok, id) in tokens.iter().zip(&ids) {
        let (tok, id, body) = (tok.clone(), *id, body.clone());
        let (answered, refused, sent) = (answered.clone(), refused.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Http::connect(addr).await?;
            c.send("POST", "/api/v1/runner/claim", &tok, Some(id), &body)
                .await?;
            sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let a = c.answer().await?;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if a.status != 204 {
                refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Res::Ok(c)
        }));
    }
    while sent.load(std::sync::atomic::Ordering::SeqCst) < n {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "only {} of {n} polls sent in 20 s",
                sent.load(std::sync::atomic::Ordering::SeqCst)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let opened = t.elapsed();
    // Sampled while every poll is open (they wait 30 s).
    let mut peak = (0, 0, 0, 0);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let f = server.footprint();
        if f.0 > peak.0 {
            peak = f;
        }
    }
    let early = answered.load(std::sync::atomic::Ordering::SeqCst);
    let refused_n = refused.load(std::sync::atomic::Ordering::SeqCst);
    let held = n - early;
    println!("\n### {n} idle long-polling runners ({n} tokens, one connection each, wait_s 30)");
    println!("| server state | RSS | ÷ idle | peak RSS (VmHWM) | threads | open fds |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| idle (baseline; {n} runners registered, nothing open) | {:.1} MiB | 1.0 | {:.1} MiB | {} | {} |",
        idle.0 as f64 / 1024.0,
        idle.1 as f64 / 1024.0,
        idle.2,
        idle.3
    );
    println!(
        "| {held} polls held open (answered early: {early}, refused: {refused_n}; all sent in {:.2} s) | **{:.1} MiB** | {:.2} | {:.1} MiB | {} | {} |",
        opened.as_secs_f64(),
        peak.0 as f64 / 1024.0,
        peak.0 as f64 / idle.0.max(1) as f64,
        peak.1 as f64 / 1024.0,
        peak.2,
        peak.3
    );
    for task in tasks {
        task.abort();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (iv) upload throughput.

async fn bench_upload(root: &Path, mib: usize, runs: usize) -> Res<()> {
    let data = root.join("upload");
    let sub = make_tokens(&data, "submitter", "submitter", 1)
        .await?
        .remove(0);
    let run = make_tokens(&data, "uploader", "runner", 1).await?.remove(0);
    let server = Server::start(&data, &[])?;
    let addr = server.addr;
    let runner = register(addr, &run, "uploader").await?;
    let job = trivial_job();
    let mut c = Http::connect(addr).await?;
    let (mut put, mut disk) = (Vec::new(), Vec::new());
    let size = mib << 20;
    for i in 0..runs {
        // Other bytes each run: equal blobs are stored once, and that is not what is measured.
        let output = tar_of(&random_bytes(size, 1000 + i as u64));
        // The disk: the same bytes into a file beside the server's blobs, then fsync.
        let t = Instant::now();
        {
            let path = server.data.join("disk-baseline");
            let mut f = tokio::fs::File::create(&path).await?;
            f.write_all(&output).await?;
            f.sync_all().await?;
            drop(f);
            tokio::fs::remove_file(&path).await?;
        }
        disk.push(output.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
        submit(
            &mut c,
            &sub,
            &job,
            &format!("&output_size={}", output.len() + (1 << 20)),
        )
        .await?;
        let offer: ClaimResponse = c
            .call(
                "POST",
                "/api/v1/runner/claim",
                &run,
                Some(runner),
                &claim_body(0, &["t0"]),
            )
            .await?
            .expect(200, "claim")?
            .json()?;
        c.call(
            "POST",
            &format!("/api/v1/runner/attempts/{}/start", offer.attempt_id),
            &offer.attempt_token,
            None,
            b"",
        )
        .await?
        .expect(200, "start")?;
        let t = Instant::now();
        let a = c
            .call(
                "PUT",
                &format!("/api/v1/runner/attempts/{}/output", offer.attempt_id),
                &offer.attempt_token,
                None,
                &output,
            )
            .await?
            .expect(201, "upload")?;
        put.push(output.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
        let v: serde_json::Value = a.json()?;
        assert_eq!(v["size"].as_u64(), Some(output.len() as u64));
        c.call(
            "POST",
            &format!("/api/v1/runner/attempts/{}/report", offer.attempt_id),
            &offer.attempt_token,
            None,
            REPORT,
        )
        .await?
        .expect(200, "report")?;
    }
    let (p, d) = (median(&mut put.clone()), median(&mut disk.clone()));
    let range = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        format!(
            "{:.0} MB/s ({:.0}–{:.0})",
            median(v),
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0)
        )
    };
    println!("\n### Upload throughput, {mib} MiB output ({runs} runs, median (min–max))");
    println!("| what | throughput | ÷ disk |");
    println!("|---|---|---|");
    println!(
        "| baseline: write the bytes to a file in the data directory + fsync | {} | 1.0 |",
        range(&mut disk)
    );
    println!(
        "| output PUT over loopback HTTP (streamed to a temporary file, hashed, fsynced, published into the blob store, fsynced) | {} | {:.2} |",
        range(&mut put),
        p / d
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let fds = raise_fd_limit();
    let root = tempfile::tempdir().expect("a temporary directory");
    println!("## construir-server benchmarks");
    println!("{}; descriptor limit {fds}", host_line());
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result: Res<()> = rt.block_on(async {
        if want("latency") {
            bench_latency(root.path(), 20).await?;
        }
        if want("claims") {
            bench_claims(root.path(), 200, 3).await?;
        }
        if want("polls") {
            bench_polls(root.path(), 1000).await?;
        }
        if want("upload") {
            bench_upload(root.path(), 128, 5).await?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("bench: error: {e}");
        std::process::exit(1);
    }
}
