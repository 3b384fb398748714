//! The farm under load (issue 14): 10,000 jobs through 200 runners against a real
//! construir-server, on SQLite + files and on PostgreSQL + S3 in one run, each against the bare SQL
//! transaction rate of the same database measured in the same run.
//!
//! The runners are protocol-level: each an async task on a connection of its own speaking the
//! runner API as construir-runner does (claim by long poll, start, upload the output, report),
//! with no VM and no backend: a job's work is done at once, so what is measured is the server
//! and its database. Submitters send the jobs meanwhile. At the end every job is accounted for
//! from the database itself: succeeded, with exactly one output named (0 lost, 0 duplicated).
//!
//! `cargo bench -p construir-server --bench load [-- --jobs 10000 --runners 200]`; on SQLite +
//! files, and on PostgreSQL + S3 when `CONSTRUIR_BENCH_POSTGRES` is a URL of a role that may
//! create databases and `CONSTRUIR_BENCH_S3_ROOT` the root of an s3s-fs server the `AWS_*`
//! variables reach (tools/bench-server starts both, throw-away). Prints Markdown tables.

mod common;

use common::harness::{
    BackendSet, Http, Res, Server, claim_body_with, make_tokens_in, raise_fd_limit, register,
    tar_of, trivial_job,
};
use common::{host_line, pct};
use sqlx::Row;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What one run on one database gave.
struct Figures {
    engine: &'static str,
    jobs: usize,
    runners: usize,
    wall_s: f64,
    claim_ms: Vec<f64>,
    submit_ms: Vec<f64>,
    server_cpu_s: f64,
    server_rss_mib: f64,
    bare_tx_per_s: f64,
    succeeded: i64,
    lost: i64,
    duplicated: i64,
}

/// The server's CPU time (user + system) so far, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// The bare transaction rate of the database at `url`: each transaction updates a row (reading
/// it back) and inserts one, what a claim's write does at the least; 4 at a time, `n` in all.
async fn bare_rate(url: &str, n: usize) -> Res<f64> {
    sqlx::any::install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                use sqlx::Executor;
                if sqlite {
                    // As the server runs SQLite (db.rs): WAL, a commit on disk, writers wait.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = FULL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_bare (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_log (k BIGINT NOT NULL, at BIGINT NOT NULL)")
        .execute(&pool)
        .await?;
    for id in 0..64i64 {
        sqlx::query("INSERT INTO bench_bare (id, v) VALUES ($1, 0) ON CONFLICT (id) DO NOTHING")
            .bind(id)
            .execute(&pool)
            .await?;
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..4usize {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in (k..n).step_by(4) {
                let id = (i % 64) as i64;
                let mut tx = pool.begin().await?;
                // Written first (a SQLite transaction that reads, then writes after another
                // writer committed, is refused rather than waited for), as the server's are.
                let v: i64 =
                    sqlx::query("UPDATE bench_bare SET v = v + 1 WHERE id = $1 RETURNING v")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?
                        .try_get(0)?;
                sqlx::query("INSERT INTO bench_log (k, at) VALUES ($1, $2)")
                    .bind(v)
                    .bind(i as i64)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Res::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}

/// One protocol-level runner: claims (long polls of 5 s), starts, uploads `output`, reports,
/// until `done` reaches `jobs`; the latency of each claim that got a job.
async fn protocol_runner(
    addr: std::net::SocketAddr,
    token: String,
    name: String,
    output: Arc<Vec<u8>>,
    done: Arc<AtomicUsize>,
    jobs: usize,
) -> Res<Vec<f64>> {
    let runner = register(addr, &token, &name).await?;
    let mut c = Http::connect(addr).await?;
    let body = claim_body_with(5, &["t0"], 1);
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&output[..])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let tree = construir_contract::archive::index(
        &output[..],
        &construir_contract::archive::Limits::DEFAULT,
    )
    .map_err(|e| format!("index the output: {e}"))?
    .tree_sha256;
    let report = format!(
        "{{\"status\":\"success\",\"exit_code\":0,\"job_exit_status\":0,\"output_sha256\":\"{sha}\",\"output_tree_sha256\":\"{tree}\"}}"
    );
    let mut latencies = Vec::new();
    while done.load(Ordering::SeqCst) < jobs {
        let t = Instant::now();
        let a = c
            .call("POST", "/api/v1/runner/claim", &token, Some(runner), &body)
            .await?;
        if a.status == 204 {
            continue;
        }
        let a = a.expect(200, "claim")?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        let v: serde_json::Value = a.json()?;
        let (id, at) = (
            v["attempt_id"].as_u64().ok_or("no attempt_id")?,
            v["attempt_token"]
                .as_str()
                .ok_or("no attempt_token")?
                .to_string(),
        );
        let base = format!("/api/v1/runner/attempts/{id}");
        c.call("POST", &format!("{base}/start"), &at, None, b"")
            .await?
            .expect(200, "start")?;
        c.call("PUT", &format!("{base}/output"), &at, None, &output)
            .await?
            .expect(201, "output")?;
        c.call(
            "POST",
            &format!("{base}/report"),
            &at,
            None,
            report.as_bytes(),
        )
        .await?
        .expect(200, "report")?;
        done.fetch_add(1, Ordering::SeqCst);
    }
    Ok(latencies)
}

async fn run_on(
    set: &BackendSet,
    root: &std::path::Path,
    jobs: usize,
    runners: usize,
) -> Res<Figures> {
    let engine = set.name;
    let data = root.join(if set.database.is_some() {
        "postgres-s3"
    } else {
        "embedded"
    });
    let database = set.database.clone();
    let sub = make_tokens_in(&data, database.as_deref(), "submitter", "submitter", 4).await?;
    let run_tokens =
        make_tokens_in(&data, database.as_deref(), "volunteer", "runner", runners).await?;
    // The bare rate first, on the same database, with the server not yet started.
    let bare_url = match &database {
        Some(url) => url.clone(),
        None => format!("sqlite://{}?mode=rw", data.join("construir.db").display()),
    };
    let bare_tx_per_s = bare_rate(&bare_url, 4000).await?;
    let mut args = vec![
        "--lease",
        "600s",
        "--accept-window",
        "600s",
        "--max-queued-per-user",
        "100000",
        "--max-running-per-user",
        "100000",
        "--max-polls-per-token",
        "8",
    ];
    args.extend(set.args());
    let server = Server::start(&data, &args)?;
    let addr = server.addr;
    let pid = server.child.id();
    let job = Arc::new(trivial_job());
    let mut submit_tasks = Vec::new();
    for (k, token) in sub.into_iter().enumerate() {
        let job = job.clone();
        submit_tasks.push(tokio::spawn(async move {
            let mut c = Http::connect(addr).await?;
            let mut latencies = Vec::new();
            for _ in (k..jobs).step_by(4) {
                let t = Instant::now();
                c.call(
                    "POST",
                    "/api/v1/jobs?name=load_t0.tar.xz&memory_mib=256&vcpus=1&timeout_s=60",
                    &token,
                    None,
                    &job,
                )
                .await?
                .expect(201, "submit")?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Res::Ok(latencies)
        }));
    }
    let mut submit_ms = Vec::new();
    for t in submit_tasks {
        submit_ms.extend(t.await??);
    }
    eprintln!("load ({engine}): {jobs} jobs queued");
    // The runners start once every job is queued: a claim's latency is the server's, not a
    // wait for work.
    let cpu0 = cpu_s(pid);
    let t0 = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let output = Arc::new(tar_of(b"the output of a job done at once\n"));
    let mut runner_tasks = Vec::new();
    for (i, token) in run_tokens.into_iter().enumerate() {
        runner_tasks.push(tokio::spawn(protocol_runner(
            addr,
            token,
            format!("r{i:03}"),
            output.clone(),
            done.clone(),
            jobs,
        )));
    }
    let mut peak_rss = 0u64;
    let mut claim_ms = Vec::new();
    let watch = tokio::spawn({
        let done = done.clone();
        async move {
            let mut last = 0;
            while done.load(Ordering::SeqCst) < jobs {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let now = done.load(Ordering::SeqCst);
                eprintln!(
                    "load ({engine}): {now} of {jobs} jobs done (+{} in 5 s)",
                    now - last
                );
                last = now;
            }
        }
    });
    for t in runner_tasks {
        claim_ms.extend(t.await??);
        peak_rss = peak_rss.max(server.footprint().1);
    }
    watch.abort();
    let wall_s = t0.elapsed().as_secs_f64();
    let server_cpu_s = cpu_s(pid) - cpu0;
    peak_rss = peak_rss.max(server.footprint().1);
    drop(server);
    // Accounted for from the database itself.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&bare_url).await?;
    let succeeded: i64 = sqlx::query("SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'")
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    let duplicated: i64 = sqlx::query(
        "SELECT COUNT(*) FROM (SELECT job_id FROM attempts WHERE output_sha256 IS NOT NULL \
         GROUP BY job_id HAVING COUNT(*) > 1) AS twice",
    )
    .fetch_one(&pool)
    .await?
    .try_get(0)?;
    pool.close().await;
    Ok(Figures {
        engine,
        jobs,
        runners,
        wall_s,
        claim_ms,
        submit_ms,
        server_cpu_s,
        server_rss_mib: peak_rss as f64 / 1024.0,
        bare_tx_per_s,
        succeeded,
        lost: jobs as i64 - succeeded,
        duplicated,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (jobs, runners) = (flag("--jobs", 10_000), flag("--runners", 200));
    let fds = raise_fd_limit();
    let root = tempfile::tempdir().expect("a temporary directory");
    println!("## construir-server under load");
    println!("{}; descriptor limit {fds}", host_line());
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result: Res<Vec<Figures>> = rt.block_on(async {
        let mut all = vec![run_on(&BackendSet::embedded(), root.path(), jobs, runners).await?];
        if let Some(set) = BackendSet::postgres_s3("load").await? {
            all.push(run_on(&set, root.path(), jobs, runners).await?);
        }
        Ok(all)
    });
    let all = match result {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: error: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "\n### {jobs} jobs through {runners} protocol-level runners (claim by long poll, start, output, report; no VM)"
    );
    println!(
        "| backends | jobs/s (claims/s) | bare SQL tx/s (baseline) | jobs/s ÷ bare tx/s | claim p50 / p99 | submit p50 / p99 | server CPU | server peak RSS | succeeded / lost / duplicated |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for mut f in all {
        let rate = f.jobs as f64 / f.wall_s;
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} s ({:.0} % of a core) | {:.0} MiB | {} / {} / {} |",
            f.engine,
            rate,
            f.bare_tx_per_s,
            rate / f.bare_tx_per_s,
            pct(&mut f.claim_ms, 0.5),
            pct(&mut f.claim_ms, 0.99),
            pct(&mut f.submit_ms, 0.5),
            pct(&mut f.submit_ms, 0.99),
            f.server_cpu_s,
            100.0 * f.server_cpu_s / f.wall_s,
            f.server_rss_mib,
            f.succeeded,
            f.lost,
            f.duplicated
        );
        let _ = f.runners;
    }
}
