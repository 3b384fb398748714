//! The server's other loads on both backend sets (issue 14), SQLite + files and PostgreSQL +
//! S3 in one run, each against a baseline measured in the same run:
//!
//!   polls    1,000 runners long-polling idle: the server's RSS against the same server idle,
//!            and how soon a job submitted then reaches one of them
//!   logs     100 running jobs streaming their consoles at once (4 KiB pieces, as fast as the
//!            server takes them): pieces per second against one job streaming alone
//!   upload   1 GiB outputs: the PUT's throughput against writing the same bytes to a file in
//!            the data directory (+ fsync)
//!
//! `cargo bench -p construir-server --bench backends [-- --polls 1000 --streams 100
//! --upload-mib 1024]`; PostgreSQL + S3 as in load.rs (tools/bench-server starts both).

mod common;

use common::harness::{
    BackendSet, Http, Res, Server, claim_body_with, make_tokens_in, raise_fd_limit, random_bytes,
    register, submit, tar_of, trivial_job,
};
use common::{host_line, median, pct};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How long the streams run, alone and together.
const STREAM_FOR: Duration = Duration::from_secs(15);
const PIECE: usize = 4096;

struct Sizes {
    polls: usize,
    streams: usize,
    upload_mib: usize,
}

/// What one backend set gave.
struct Figures {
    name: &'static str,
    idle_rss_kib: u64,
    polls_rss_kib: u64,
    polls_held: usize,
    wake_ms: f64,
    alone_pieces_per_s: f64,
    pieces_per_s: f64,
    piece_ms: Vec<f64>,
    console_checked: bool,
    disk_mb_s: Vec<f64>,
    put_mb_s: Vec<f64>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A job claimed and started by `runner`: (job id, (attempt id, attempt token)).
async fn claim_started(c: &mut Http, token: &str, runner: u64) -> Res<(u64, (u64, String))> {
    let a = c
        .call(
            "POST",
            "/api/v1/runner/claim",
            token,
            Some(runner),
            &claim_body_with(10, &["t0"], 1),
        )
        .await?
        .expect(200, "claim")?;
    let v: serde_json::Value = a.json()?;
    let job = v["job_id"].as_u64().ok_or("no job_id")?;
    let id = v["attempt_id"].as_u64().ok_or("no attempt_id")?;
    let at = v["attempt_token"]
        .as_str()
        .ok_or("no attempt_token")?
        .to_string();
    c.call(
        "POST",
        &format!("/api/v1/runner/attempts/{id}/start"),
        &at,
        None,
        b"",
    )
    .await?
    .expect(200, "start")?;
    Ok((job, (id, at)))
}

/// The bytes of piece `k` of a console: text, different for every piece and attempt.
fn piece(attempt: u64, k: usize) -> Vec<u8> {
    let line = format!("attempt {attempt} piece {k:08}: ");
    let mut out = Vec::with_capacity(PIECE);
    while out.len() < PIECE {
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(PIECE - 1);
    out.push(b'\n');
    out
}

/// Streams console pieces of one started attempt until `until`: the latency of each, and the
/// bytes sent.
async fn stream(
    addr: SocketAddr,
    (attempt, token): (u64, String),
    until: Instant,
) -> Res<(Vec<f64>, Vec<u8>)> {
    let mut c = Http::connect(addr).await?;
    let (mut latencies, mut sent) = (Vec::new(), Vec::new());
    let mut k = 0;
    while Instant::now() < until {
        let bytes = piece(attempt, k);
        let t = Instant::now();
        c.call(
            "PATCH",
            &format!(
                "/api/v1/runner/attempts/{attempt}/log?offset={}",
                sent.len()
            ),
            &token,
            None,
            &bytes,
        )
        .await?
        .expect(202, "console piece")?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        sent.extend_from_slice(&bytes);
        k += 1;
    }
    Ok((latencies, sent))
}

async fn run_on(set: &BackendSet, root: &std::path::Path, sizes: &Sizes) -> Res<Figures> {
    let data = root.join(if set.database.is_some() {
        "postgres-s3"
    } else {
        "embedded"
    });
    let db = set.database.as_deref();
    let sub = make_tokens_in(&data, db, "submitter", "submitter", 1)
        .await?
        .remove(0);
    let pollers = make_tokens_in(&data, db, "volunteer", "runner", sizes.polls).await?;
    let mut args = vec![
        "--max-queued-per-user",
        "100000",
        "--max-running-per-user",
        "100000",
        "--max-stored-per-user",
        "1T",
        // A 1 GiB output is a little more than 1 GiB as a tar, past the default limit.
        "--max-output-size",
        "2G",
    ];
    args.extend(set.args());
    let server = Server::start(&data, &args)?;
    let addr = server.addr;
    let name = set.name;

    // (i) Idle long polls.
    let mut runners = Vec::with_capacity(sizes.polls);
    for chunk in pollers.chunks(32) {
        let mut tasks = Vec::new();
        for (i, t) in chunk.iter().enumerate() {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                register(addr, &t, &format!("home{i}")).await
            }));
        }
        for task in tasks {
            runners.push(task.await??);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss_kib = server.footprint().0;
    let body = Arc::new(claim_body_with(25, &["t0"], 1));
    let sent = Arc::new(AtomicUsize::new(0));
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let mut polls = Vec::new();
    for (i, (tok, id)) in pollers.iter().zip(&runners).enumerate() {
        let (tok, id, body, sent) = (tok.clone(), *id, body.clone(), sent.clone());
        let answers = answers.clone();
        polls.push(tokio::spawn(async move {
            let mut c = Http::connect(addr).await?;
            c.send("POST", "/api/v1/runner/claim", &tok, Some(id), &body)
                .await?;
            sent.fetch_add(1, Ordering::SeqCst);
            let a = c.answer().await?;
            let _ = answers.send((i, a.status, Instant::now()));
            Res::Ok(())
        }));
    }
    let t = Instant::now();
    while sent.load(Ordering::SeqCst) < sizes.polls {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "{name}: only {} polls sent in 20 s",
                sent.load(Ordering::SeqCst)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut polls_rss_kib = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        polls_rss_kib = polls_rss_kib.max(server.footprint().0);
    }
    let mut early = 0;
    while let Ok((i, status, _)) = answered.try_recv() {
        eprintln!("{name}: poll {i} answered {status} before any job");
        early += 1;
    }
    // One job into the quiet farm: how soon one of the thousand has it.
    let job = trivial_job();
    let mut c = Http::connect(addr).await?;
    let submitted = Instant::now();
    submit(&mut c, &sub, &job, "").await?;
    let (taker, wake_ms) = loop {
        match tokio::time::timeout(Duration::from_secs(20), answered.recv()).await {
            Ok(Some((i, 200, at))) => {
                break (i, at.duration_since(submitted).as_secs_f64() * 1000.0);
            }
            Ok(Some((i, status, _))) => eprintln!("{name}: poll {i} answered {status}"),
            _ => return Err(format!("{name}: no idle poll got the job in 20 s").into()),
        }
    };
    // The others are still waiting: the job went to one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok((i, status, _)) = answered.try_recv() {
        return Err(format!("{name}: poll {i} answered {status} after {taker} got the job").into());
    }
    for p in &polls {
        p.abort();
    }
    // Their connections closed: the server lets go of the polls.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = &mut Http::connect(addr).await?;
    eprintln!(
        "{name}: {} polls held, the job reached one in {wake_ms:.0} ms",
        sizes.polls - early
    );

    // (ii) Consoles streamed: one alone, then `streams` at once. Each a job of its own,
    // claimed and started by a runner of its own (one of the pollers, which now wait no more).
    let mut started = Vec::new();
    // (The runners other than the one that took the job above.)
    let free: Vec<usize> = (0..sizes.polls).filter(|&i| i != taker).collect();
    for &i in &free[..=sizes.streams] {
        submit(c, &sub, &job, "&console_cap=67108864").await?;
        let mut rc = Http::connect(addr).await?;
        started.push(claim_started(&mut rc, &pollers[i], runners[i]).await?);
    }
    let (_, alone) = started.remove(0);
    let (alone_lat, _) = stream(addr, alone, Instant::now() + STREAM_FOR / 3).await?;
    let alone_pieces_per_s = alone_lat.len() as f64 / (STREAM_FOR / 3).as_secs_f64();
    let until = Instant::now() + STREAM_FOR;
    let first_job = started[0].0;
    let mut tasks = Vec::new();
    for (_, s) in started {
        tasks.push(tokio::spawn(stream(addr, s, until)));
    }
    let mut piece_ms = Vec::new();
    let mut first_sent = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (lat, bytes) = t.await??;
        piece_ms.extend(lat);
        if i == 0 {
            first_sent = bytes;
        }
    }
    let pieces_per_s = piece_ms.len() as f64 / STREAM_FOR.as_secs_f64();
    // One console read back whole by its submitter, byte for byte.
    let mut back = Vec::new();
    // (A connection of its own: the one above was idle while the consoles streamed.)
    let c = &mut Http::connect(addr).await?;
    loop {
        let a = c
            .call(
                "GET",
                &format!("/api/v1/jobs/{first_job}/log?offset={}", back.len()),
                &sub,
                None,
                b"",
            )
            .await?
            .expect(200, "console")?;
        if a.body.is_empty() {
            break;
        }
        back.extend_from_slice(&a.body);
    }
    let console_checked = sha256_hex(&back) == sha256_hex(&first_sent);
    if !console_checked {
        return Err(format!(
            "{name}: job {first_job}'s console read back is {} bytes, not the {} sent",
            back.len(),
            first_sent.len()
        )
        .into());
    }
    eprintln!(
        "{name}: {:.0} console pieces/s from {} jobs at once ({alone_pieces_per_s:.0}/s alone)",
        pieces_per_s, sizes.streams
    );

    // (iii) Uploads of `upload_mib` MiB outputs.
    let uploader = &pollers[free[sizes.streams + 1]];
    let uploader_id = runners[free[sizes.streams + 1]];
    let (mut disk_mb_s, mut put_mb_s) = (Vec::new(), Vec::new());
    for i in 0..2u64 {
        let output = tar_of(&random_bytes(sizes.upload_mib << 20, 7000 + i));
        let t = Instant::now();
        {
            let path = data.join("disk-baseline");
            let mut f = tokio::fs::File::create(&path).await?;
            f.write_all(&output).await?;
            f.sync_all().await?;
            drop(f);
            tokio::fs::remove_file(&path).await?;
        }
        disk_mb_s.push(output.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
        let c = &mut Http::connect(addr).await?;
        let wanted = submit(
            c,
            &sub,
            &job,
            &format!(
                "&priority={}&output_size={}",
                10 * (i + 1),
                output.len() + (1 << 20)
            ),
        )
        .await?;
        let mut uc = Http::connect(addr).await?;
        // The job the first part's poll took was never started: once its accept window
        // lapsed it is queued again, as is the upload before this one once aborted. Ours
        // goes before them by its priority.
        let (got, (attempt, token)) = claim_started(&mut uc, uploader, uploader_id).await?;
        if got != wanted {
            return Err(format!("{name}: the uploader got job {got}, not {wanted}").into());
        }
        let t = Instant::now();
        let a = uc
            .call(
                "PUT",
                &format!("/api/v1/runner/attempts/{attempt}/output"),
                &token,
                None,
                &output,
            )
            .await?
            .expect(201, "upload")?;
        put_mb_s.push(output.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
        let v: serde_json::Value = a.json()?;
        if v["sha256"].as_str() != Some(sha256_hex(&output).as_str()) {
            return Err(format!("{name}: the upload's digest is not the bytes': {v}").into());
        }
        uc.call(
            "POST",
            &format!("/api/v1/runner/attempts/{attempt}/abort"),
            &token,
            None,
            br#"{"reason":"bench"}"#,
        )
        .await?;
    }
    eprintln!(
        "{name}: {} MiB uploads at {:.0} MB/s (the disk {:.0} MB/s)",
        sizes.upload_mib,
        median(&mut put_mb_s.clone()),
        median(&mut disk_mb_s.clone())
    );
    drop(server);
    Ok(Figures {
        name,
        idle_rss_kib,
        polls_rss_kib,
        polls_held: sizes.polls - early,
        wake_ms,
        alone_pieces_per_s,
        pieces_per_s,
        piece_ms,
        console_checked,
        disk_mb_s,
        put_mb_s,
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
    let sizes = Sizes {
        polls: flag("--polls", 1000),
        streams: flag("--streams", 100),
        upload_mib: flag("--upload-mib", 1024),
    };
    assert!(
        sizes.polls >= sizes.streams + 3,
        "--polls must exceed --streams by 3"
    );
    let fds = raise_fd_limit();
    let root = tempfile::tempdir().expect("a temporary directory");
    println!("## construir-server on both backend sets");
    println!("{}; descriptor limit {fds}", host_line());
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result: Res<Vec<Figures>> = rt.block_on(async {
        let mut all = vec![run_on(&BackendSet::embedded(), root.path(), &sizes).await?];
        if let Some(set) = BackendSet::postgres_s3("backends").await? {
            all.push(run_on(&set, root.path(), &sizes).await?);
        }
        Ok(all)
    });
    let mut all = match result {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: error: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "\n### {} idle long-polling runners (one token and connection each, wait_s 25)",
        sizes.polls
    );
    println!(
        "| backends | RSS idle (baseline) | RSS, polls held | ÷ idle | polls held | a job submitted then reaches one |"
    );
    println!("|---|---|---|---|---|---|");
    for f in &all {
        println!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.2} | {} | {:.0} ms |",
            f.name,
            f.idle_rss_kib as f64 / 1024.0,
            f.polls_rss_kib as f64 / 1024.0,
            f.polls_rss_kib as f64 / f.idle_rss_kib.max(1) as f64,
            f.polls_held,
            f.wake_ms
        );
    }
    println!(
        "\n### Consoles of {} running jobs streamed at once ({PIECE}-byte pieces, each sent once the last is taken, {} s)",
        sizes.streams,
        STREAM_FOR.as_secs()
    );
    println!(
        "| backends | one job alone (baseline) | {} at once | ÷ alone | piece p50 / p99 | one console read back |",
        sizes.streams
    );
    println!("|---|---|---|---|---|---|");
    for f in &mut all {
        println!(
            "| {} | {:.0} pieces/s | {:.0} pieces/s ({:.1} MB/s) | {:.2} | {:.1} / {:.1} ms | {} |",
            f.name,
            f.alone_pieces_per_s,
            f.pieces_per_s,
            f.pieces_per_s * PIECE as f64 / 1e6,
            f.pieces_per_s / f.alone_pieces_per_s,
            pct(&mut f.piece_ms, 0.5),
            pct(&mut f.piece_ms, 0.99),
            if f.console_checked {
                "byte for byte"
            } else {
                "NOT checked"
            }
        );
    }
    println!(
        "\n### Uploads of {} MiB outputs (2 runs, median)",
        sizes.upload_mib
    );
    println!(
        "| backends | a file in the data directory + fsync (baseline) | output PUT | ÷ disk |"
    );
    println!("|---|---|---|---|");
    for f in &mut all {
        let (d, p) = (median(&mut f.disk_mb_s), median(&mut f.put_mb_s));
        println!("| {} | {d:.0} MB/s | {p:.0} MB/s | {:.2} |", f.name, p / d);
    }
}
