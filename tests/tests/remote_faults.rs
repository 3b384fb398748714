//! The pull mode under process-level faults, end to end: construir-server and construir-runner
//! --server as child processes on 127.0.0.1, real VMs (QEMU with TCG, image t0), leases of 10 s
//! and more. Every job carries random bytes in and writes them back; every output is fetched and
//! checked by sha256 against what went in.
//!
//! - A runner killed with SIGKILL while its VM runs: its VM dies with it, its lease lapses, the
//!   job finishes on another runner; both attempts are listed (`construir show --json`), the first
//!   with why it ended; its token, replayed after the lapse, is refused for a heartbeat, and its
//!   output and report, within the late window, are kept aside, marked late, never the result.
//! - The server killed with SIGKILL with jobs queued, running and uploading, started again at
//!   once on the same data directory and port: every job ends, on its one attempt, each output
//!   taken once, every blob whole; then stopped for 30 s while a VM runs: the runner rides the
//!   outage out and delivers afterwards, on the same attempt.
//!
//! A runner stopped with SIGTERM (its job queued again at once, not blamed) is
//! tests/tests/remote.rs's `sigterm_on_the_runner_gives_its_attempt_back_at_once`.

mod support;

use construir_runner::remote::client::{Payload, http::Method};
use construir_tests::sha256_hex;
use std::time::{Duration, Instant};
use support::*;

fn attempts(job: &serde_json::Value) -> &Vec<serde_json::Value> {
    job["attempts"].as_array().expect("attempts, a list")
}

/// A tar holding `data.bin` = `bytes` (what a late runner would upload).
fn tar_of(bytes: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "data.bin", bytes).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn a_runner_killed_mid_job_loses_the_job_to_another_and_its_late_report_is_kept_aside() {
    let t0 = Instant::now();
    let farm = Farm::start(&["--lease", "10s"]);
    // Alpha talks through a proxy, which sees the attempt token the server gives it.
    let proxy = Proxy::start(farm.server.port, None);
    let mut alpha = farm.runner(
        "alpha",
        &proxy.url(),
        &["--jobs", "1", "--max-memory", "1G"],
    );
    let (job, data) = echo_job("killed", 200_000, 11, 8);
    let id = farm.submit(&job.path);
    let first = farm.wait(
        id,
        "its VM running on alpha",
        Duration::from_secs(120),
        |j| j["attempts"][0]["phase"] == "running",
    );
    let a1 = first["attempts"][0]["id"].as_u64().unwrap();
    let alpha_runner = first["attempts"][0]["runner"].clone();
    let tokens = proxy.tokens();
    assert_eq!(tokens.len(), 1, "alpha got one attempt token: {tokens:?}");
    let alpha_dir = farm.root.join("alpha");
    assert!(
        !processes_mentioning(&alpha_dir).is_empty(),
        "alpha's VM process is there (names its job under {})",
        alpha_dir.display()
    );
    let mut beta = farm.runner(
        "beta",
        &farm.server.url,
        &["--jobs", "1", "--max-memory", "1G"],
    );
    let killed = Instant::now();
    alpha.stop_with(libc::SIGKILL, Duration::from_secs(10));
    // Its VM dies with it.
    while let Some(p) = processes_mentioning(&alpha_dir).first() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "alpha's VM outlived it: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing heartbeats attempt 1 any more: its lease lapses (10 s after alpha's last
    // heartbeat), and the job goes back to the queue, for another runner.
    let lapsed = farm.wait(id, "attempt 1 expired", Duration::from_secs(30), |j| {
        j["attempts"][0]["state"] == "expired"
    });
    let lapse = killed.elapsed();
    assert!(
        lapse < Duration::from_secs(15),
        "the lease lapsed {lapse:?} after the kill"
    );
    let why = lapsed["attempts"][0]["why"].as_str().unwrap_or_default();
    assert!(why.contains("lease lapsed"), "why attempt 1 ended: {why}");
    assert_ne!(lapsed["state"], "succeeded", "{lapsed:#}");

    // The killed runner's token, replayed late (within the late window, one lease after the
    // lapse): no heartbeat, but its output and report are taken, kept aside, marked late.
    let token = &tokens[0];
    let e = farm
        .attempt_call(
            Method::POST,
            a1,
            "heartbeat",
            token,
            Payload::Json(br#"{"phase":"uploading","console_bytes":0}"#.to_vec()),
        )
        .expect_err("a lapsed attempt's heartbeat is refused");
    assert!(e.is_lease_lost(), "late heartbeat: {e}");
    let late_output = tar_of(b"a late output: never the result\n");
    let late_sha = sha256_hex(&late_output);
    let stored = farm
        .attempt_call(
            Method::PUT,
            a1,
            "output",
            token,
            Payload::Bytes(&late_output),
        )
        .expect("a late output is taken, within the late window");
    assert_eq!(
        stored["sha256"].as_str(),
        Some(late_sha.as_str()),
        "{stored:#}"
    );
    let report = format!(
        r#"{{"status":"success","exit_code":0,"job_exit_status":0,"reason":"late","output_sha256":"{late_sha}"}}"#
    );
    let late = farm
        .attempt_call(
            Method::POST,
            a1,
            "report",
            token,
            Payload::Json(report.into_bytes()),
        )
        .expect("a late report is taken");
    assert_eq!(late["late"], true, "{late:#}");
    assert_eq!(late["state"], "expired", "{late:#}");
    let after = farm.job(id);
    assert!(after["result_attempt"].is_null(), "{after:#}");
    assert!(
        matches!(after["state"].as_str(), Some("queued" | "running")),
        "{after:#}"
    );

    let done = farm.wait_end(id, Duration::from_secs(150));
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let shown = farm.show_json(id);
    for j in [&done, &shown] {
        let list = attempts(j);
        assert_eq!(list.len(), 2, "both attempts: {j:#}");
        let (first, second) = (&list[0], &list[1]);
        assert_eq!(first["id"].as_u64(), Some(a1));
        assert_eq!(first["runner"], alpha_runner);
        assert_ne!(second["runner"], alpha_runner, "the second ran elsewhere");
        assert_eq!(first["state"], "expired", "{j:#}");
        assert!(first["why"].as_str().unwrap().contains("lease lapsed"));
        assert_eq!(first["late"], true, "kept aside, marked late: {j:#}");
        assert_eq!(first["status"], "success", "the late report is kept: {j:#}");
        assert_eq!(
            first["output_sha256"].as_str(),
            Some(late_sha.as_str()),
            "its late output kept aside: {j:#}"
        );
        assert_eq!(second["state"], "reported", "{j:#}");
        assert_eq!(second["late"], false);
        assert_eq!(
            j["result_attempt"], second["id"],
            "the result is beta's: {j:#}"
        );
    }
    farm.check_output(id, &done, &data);
    assert!(beta.alive(), "beta runs on");
    let (status, _) = beta.stop_with(libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "beta: {status}");
    eprintln!(
        "runner killed mid-job: lease lapsed {:.1} s after the kill; {:.1} s in all",
        lapse.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn the_server_killed_with_jobs_queued_running_and_uploading_then_down_for_30_s_loses_nothing() {
    let t0 = Instant::now();
    // Leases long enough to ride out the outage below (the runner's retries back off to 30 s).
    let mut farm = Farm::start(&["--lease", "120s"]);
    // The runner's uploads go at 1.5 MB/s: a 6 MiB output is a few seconds in flight.
    let proxy = Proxy::start(farm.server.port, Some(1_500_000));
    let mut runner = farm.runner(
        "gamma",
        &proxy.url(),
        &["--jobs", "2", "--max-memory", "1G"],
    );
    let (uploading, u_data) = echo_job("uploading", 6 << 20, 21, 0);
    let (running, r_data) = echo_job("running", 100_000, 22, 15);
    let (queued, q_data) = echo_job("queued", 100_000, 23, 0);
    let u = farm.submit(&uploading.path);
    let r = farm.submit(&running.path);
    let q = farm.submit(&queued.path);

    // Kill -9 while U's output is on its way, R's VM runs and Q waits for a slot.
    let start = Instant::now();
    loop {
        let (ju, jr, jq) = (farm.job(u), farm.job(r), farm.job(q));
        if ju["attempts"][0]["state"] == "uploading"
            && jr["attempts"][0]["state"] == "running"
            && jq["state"] == "queued"
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never uploading, running and queued at once:\n{ju:#}\n{jr:#}\n{jq:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    farm.server.kill9();
    farm.server.start();
    let mut ended = Vec::new();
    for (id, data) in [(u, &u_data), (r, &r_data), (q, &q_data)] {
        let done = farm.wait_end(id, Duration::from_secs(180));
        assert_eq!(done["state"], "succeeded", "{done:#}");
        // Leases held through the restart: nothing ran twice, and the one attempt's result is
        // the job's, once.
        let list = attempts(&done);
        assert_eq!(list.len(), 1, "one attempt: {done:#}");
        assert_eq!(list[0]["state"], "reported", "{done:#}");
        assert_eq!(list[0]["late"], false);
        assert_eq!(done["result_attempt"], list[0]["id"]);
        farm.check_output(id, &done, data);
        ended.push(done);
    }
    let (blobs, garbage) = check_blobs(&farm.server.data);
    assert!(blobs >= 6, "3 job files and 3 outputs: {blobs} blobs");
    let tmp: Vec<_> = std::fs::read_dir(farm.server.data.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(tmp.is_empty(), "half-received uploads left behind: {tmp:?}");
    let crash_phase = t0.elapsed();

    // A 30 s outage while a VM runs: the runner keeps it running, retries, and delivers once the
    // server is back, on the same attempt.
    let (outage, o_data) = echo_job("outage", 100_000, 24, 8);
    let o = farm.submit(&outage.path);
    farm.wait(o, "its VM running", Duration::from_secs(120), |j| {
        j["attempts"][0]["phase"] == "running"
    });
    let down = Instant::now();
    let stop_took = farm.server.stop(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    farm.server.start();
    let back = Instant::now();
    let done = farm.wait_end(o, Duration::from_secs(120));
    let delivered = back.elapsed();
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let list = attempts(&done);
    assert_eq!(
        list.len(),
        1,
        "delivered by the attempt that rode it out: {done:#}"
    );
    assert_eq!(list[0]["late"], false);
    farm.check_output(o, &done, &o_data);
    assert!(runner.alive(), "the runner rode the outage out");
    let (status, _) = runner.stop_with(libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "runner: {status}");
    if !garbage.is_empty() {
        eprintln!("files in the blob store that are not blobs: {garbage:?}");
    }
    eprintln!(
        "server killed: {:.1} s; outage: SIGTERM took {:.1} s, down {:.1} s, delivered {:.1} s \
         after the restart; {:.1} s in all",
        crash_phase.as_secs_f64(),
        stop_took.as_secs_f64(),
        (back - down).as_secs_f64(),
        delivered.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
